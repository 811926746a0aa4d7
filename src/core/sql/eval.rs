//! Evaluating a compiled statement over one message: values are JSON or undefined (`None`),
//! borrowed from the payload or the statement where they can be. The semantics table is in
//! the module above (`sql/mod.rs`).

use std::borrow::Cow;
use std::cmp::Ordering;

use serde_json::Value;

use super::Input;

/// A value while evaluating: `None` is AWS IoT's undefined.
pub(super) type Val<'a> = Option<Cow<'a, Value>>;

/// One item of the SELECT list.
pub(super) enum Item {
    /// `*`: the payload's fields.
    All,
    /// An expression and the key it takes in the result.
    Named(String, Expr),
}

/// A compiled expression.
#[derive(Debug)]
pub(super) enum Expr {
    Literal(Value),
    /// A field path from the payload's root.
    Field(Vec<Step>),
    Not(Box<Expr>),
    Neg(Box<Expr>),
    Compare(Cmp, Box<Expr>, Box<Expr>),
    /// `true` for AND, `false` for OR.
    Logic(bool, Box<Expr>, Box<Expr>),
    Arith(Arith, Box<Expr>, Box<Expr>),
    Call(Func, Vec<Expr>),
}

/// One step of a field path.
#[derive(Debug)]
pub(super) enum Step {
    Key(String),
    Index(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Arith {
    Add,
    Sub,
    Mul,
    Div,
    Mod,
}

/// The functions the gateway runs (SPEC.md's list).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Func {
    Topic,
    Timestamp,
    Abs,
    Ceil,
    Floor,
    Round,
    Lower,
    Upper,
    Concat,
    StartsWith,
    IsUndefined,
    IsNull,
}

/// A number as AWS IoT SQL keeps it: Int or Decimal.
#[derive(Debug, Clone, Copy)]
enum Num {
    Int(i64),
    Dec(f64),
}

impl Num {
    fn of(value: &Value) -> Option<Num> {
        match value {
            Value::Number(n) => n.as_i64().map(Num::Int).or(n.as_f64().map(Num::Dec)),
            Value::String(s) => {
                let s = s.trim();
                s.parse()
                    .map(Num::Int)
                    .ok()
                    .or(s.parse().ok().map(Num::Dec))
            }
            _ => None,
        }
    }

    fn as_f64(self) -> f64 {
        match self {
            Num::Int(i) => i as f64,
            Num::Dec(f) => f,
        }
    }

    fn value<'a>(self) -> Val<'a> {
        match self {
            Num::Int(i) => Some(Cow::Owned(Value::from(i))),
            Num::Dec(f) => serde_json::Number::from_f64(f).map(|n| Cow::Owned(Value::Number(n))),
        }
    }

    /// A Decimal rounded by `round` becomes an Int when it fits.
    fn to_int(self, round: fn(f64) -> f64) -> Num {
        match self {
            Num::Int(_) => self,
            Num::Dec(f) => {
                let r = round(f);
                if r.is_finite() && r.abs() < 9.0e15 {
                    Num::Int(r as i64)
                } else {
                    Num::Dec(r)
                }
            }
        }
    }
}

/// Whether a WHERE condition keeps the message: true, or the string "true" (AWS IoT converts
/// it for AND/OR/NOT alike).
pub(super) fn is_true(value: Option<&Value>) -> bool {
    value.and_then(truth) == Some(true)
}

fn truth(value: &Value) -> Option<bool> {
    match value {
        Value::Bool(b) => Some(*b),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Some(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    }
}

fn boolean<'a>(b: bool) -> Val<'a> {
    Some(Cow::Owned(Value::Bool(b)))
}

fn string<'a>(s: String) -> Val<'a> {
    Some(Cow::Owned(Value::String(s)))
}

impl Expr {
    /// The expression's value for one message.
    pub(super) fn eval<'a>(&'a self, input: &Input<'a>) -> Val<'a> {
        match self {
            Expr::Literal(v) => Some(Cow::Borrowed(v)),
            Expr::Field(path) => field(input.payload?, path).map(Cow::Borrowed),
            Expr::Not(e) => boolean(!truth(e.eval(input)?.as_ref())?),
            Expr::Neg(e) => match Num::of(e.eval(input)?.as_ref())? {
                Num::Int(i) => i.checked_neg().map_or(Num::Dec(-(i as f64)), Num::Int),
                Num::Dec(f) => Num::Dec(-f),
            }
            .value(),
            Expr::Compare(op, l, r) => {
                compare(*op, l.eval(input)?.as_ref(), r.eval(input)?.as_ref())
            }
            Expr::Logic(and, l, r) => {
                // Both sides always: AWS IoT's AND/OR are undefined when either side is not a
                // boolean, even when the other already decides.
                let (l, r) = (l.eval(input), r.eval(input));
                let (l, r) = (truth(l?.as_ref())?, truth(r?.as_ref())?);
                boolean(if *and { l && r } else { l || r })
            }
            Expr::Arith(op, l, r) => arith(
                *op,
                Num::of(l.eval(input)?.as_ref())?,
                Num::of(r.eval(input)?.as_ref())?,
            )
            .value(),
            Expr::Call(f, args) => call(*f, args, input),
        }
    }
}

fn field<'a>(root: &'a Value, path: &[Step]) -> Option<&'a Value> {
    path.iter().try_fold(root, |value, step| match step {
        Step::Key(key) => value.as_object()?.get(key),
        Step::Index(i) => value.as_array()?.get(*i),
    })
}

fn compare<'a>(op: Cmp, l: &Value, r: &Value) -> Val<'a> {
    let ordering = match op {
        Cmp::Eq | Cmp::Ne => {
            let equal = match (l, r) {
                (Value::Number(_), Value::Number(_)) => {
                    Num::of(l)?.as_f64() == Num::of(r)?.as_f64()
                }
                _ => l == r,
            };
            return boolean(equal == (op == Cmp::Eq));
        }
        _ => match (Num::of(l)?, Num::of(r)?) {
            (Num::Int(a), Num::Int(b)) => a.cmp(&b),
            (a, b) => a.as_f64().partial_cmp(&b.as_f64())?,
        },
    };
    boolean(match op {
        Cmp::Lt => ordering == Ordering::Less,
        Cmp::Le => ordering != Ordering::Greater,
        Cmp::Gt => ordering == Ordering::Greater,
        _ => ordering != Ordering::Less,
    })
}

fn arith(op: Arith, l: Num, r: Num) -> Num {
    if let (Num::Int(a), Num::Int(b)) = (l, r) {
        let int = match op {
            Arith::Add => a.checked_add(b),
            Arith::Sub => a.checked_sub(b),
            Arith::Mul => a.checked_mul(b),
            Arith::Div => a.checked_div(b),
            Arith::Mod => a.checked_rem(b),
        };
        if let Some(i) = int {
            return Num::Int(i);
        }
        if b == 0 {
            // Division by zero: NaN, which has no JSON value, so the result is undefined.
            return Num::Dec(f64::NAN);
        }
    }
    let (a, b) = (l.as_f64(), r.as_f64());
    Num::Dec(match op {
        Arith::Add => a + b,
        Arith::Sub => a - b,
        Arith::Mul => a * b,
        Arith::Div if b == 0.0 => f64::NAN,
        Arith::Div => a / b,
        Arith::Mod if b == 0.0 => f64::NAN,
        Arith::Mod => a % b,
    })
}

fn call<'a>(f: Func, args: &'a [Expr], input: &Input<'a>) -> Val<'a> {
    let arg = |i: usize| args.get(i).and_then(|a| a.eval(input));
    match f {
        Func::Topic if args.is_empty() => string(input.topic.to_owned()),
        Func::Topic => {
            let n = match Num::of(arg(0)?.as_ref())? {
                Num::Int(n) => usize::try_from(n).ok()?,
                Num::Dec(_) => return None,
            };
            string(input.topic.split('/').nth(n.checked_sub(1)?)?.to_owned())
        }
        Func::Timestamp => Some(Cow::Owned(Value::from(input.received_ms))),
        Func::Abs => match Num::of(arg(0)?.as_ref())? {
            Num::Int(i) => i.checked_abs().map_or(Num::Dec((i as f64).abs()), Num::Int),
            Num::Dec(d) => Num::Dec(d.abs()),
        }
        .value(),
        Func::Ceil => Num::of(arg(0)?.as_ref())?.to_int(f64::ceil).value(),
        Func::Floor => Num::of(arg(0)?.as_ref())?.to_int(f64::floor).value(),
        Func::Round => Num::of(arg(0)?.as_ref())?.to_int(f64::round).value(),
        Func::Lower => string(arg(0)?.as_str()?.to_lowercase()),
        Func::Upper => string(arg(0)?.as_str()?.to_uppercase()),
        Func::Concat => concat(args, input),
        Func::StartsWith => boolean(arg(0)?.as_str()?.starts_with(arg(1)?.as_str()?)),
        Func::IsUndefined => boolean(arg(0).is_none()),
        Func::IsNull => boolean(matches!(arg(0).as_deref(), Some(Value::Null))),
    }
}

/// AWS IoT's `concat`: arrays are joined into one array (other values appended as elements);
/// otherwise every argument as text, joined. Undefined when any argument is.
fn concat<'a>(args: &'a [Expr], input: &Input<'a>) -> Val<'a> {
    let values: Vec<Val<'a>> = args.iter().map(|a| a.eval(input)).collect();
    let values: Vec<Cow<'a, Value>> = values.into_iter().collect::<Option<_>>()?;
    if values.iter().any(|v| v.is_array()) {
        let mut out = Vec::new();
        for v in values {
            match v.into_owned() {
                Value::Array(items) => out.extend(items),
                other => out.push(other),
            }
        }
        return Some(Cow::Owned(Value::Array(out)));
    }
    let mut out = String::new();
    for v in &values {
        match v.as_ref() {
            Value::String(s) => out.push_str(s),
            other => out.push_str(&other.to_string()),
        }
    }
    string(out)
}
