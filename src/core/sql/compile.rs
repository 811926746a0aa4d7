//! From the statement's text to a [`Statement`]. `sqlparser`'s tokenizer reads the text (SQL
//! strings and their escapes, quoted names, numbers, keywords, each token's line and column);
//! a small recursive-descent parser over its tokens reads the subset, straight into
//! `eval::Expr`. sqlparser's own parser is not used: its expression parser reaches the whole SQL
//! grammar (a subquery may hold any query), which added 1.3 MB to the release binary, where the
//! tokenizer adds about 0.1 MB. AWS IoT features the gateway cannot run are refused as "not
//! supported on the gateway", never as a bare parse error.
//!
//! ```text
//! statement := SELECT item {, item} FROM '<filter>' [WHERE expr] end
//! item      := * | expr [[AS] name]
//! expr      := and {OR and}          and := not {AND not}       not := NOT not | compare
//! compare   := sum [(= | <> | != | < | <= | > | >=) sum]
//! sum       := product {(+ | -) product}                     product := unary {(* | / | %) unary}
//! unary     := (- | +) unary | path                          path := primary {. name | [ number ]}
//! primary   := number | 'text' | true | false | null | name | name ( [expr {, expr}] ) | ( expr )
//! ```

use sqlparser::dialect::GenericDialect;
use sqlparser::keywords::Keyword;
use sqlparser::tokenizer::{Location, Token, TokenWithSpan, Tokenizer};

use super::cursor::{Parser, at, unsupported};
use super::eval::{Arith, Cmp, Expr, Func, Item, Step};
use super::{Condition, SqlError, Statement};

/// Longest statement accepted: far above any real rule, and it bounds what parsing may cost.
const MAX_SQL_LEN: usize = 16 * 1024;

/// Deepest nesting of parentheses and function calls: deep enough for any rule, shallow enough
/// for the parser's stack.
const MAX_DEPTH: usize = 64;

/// Most operators and function calls in one statement. It bounds the depth of the compiled
/// tree, which is evaluated (and dropped) recursively on a worker thread's stack; a real rule
/// has a few dozen.
pub(super) const MAX_NODES: usize = 512;

/// The functions the gateway runs, how they are written, and how many arguments each takes.
const FUNCTIONS: &[(&str, Func, usize, usize)] = &[
    ("topic", Func::Topic, 0, 1),
    ("timestamp", Func::Timestamp, 0, 0),
    ("abs", Func::Abs, 1, 1),
    ("ceil", Func::Ceil, 1, 1),
    ("floor", Func::Floor, 1, 1),
    ("round", Func::Round, 1, 1),
    ("lower", Func::Lower, 1, 1),
    ("upper", Func::Upper, 1, 1),
    ("concat", Func::Concat, 2, usize::MAX),
    ("startswith", Func::StartsWith, 2, 2),
    ("isUndefined", Func::IsUndefined, 1, 1),
    ("isNull", Func::IsNull, 1, 1),
];

/// AWS IoT SQL functions that need AWS or the MQTT connection's identity, or are not built here.
const AWS_ONLY: &[&str] = &[
    "aws_lambda",
    "get_thing_shadow",
    "get_dynamodb",
    "get_secret",
    "get_registry_data",
    "get_mqtt_property",
    "get_user_properties",
    "machinelearning_predict",
    "clientid",
    "principal",
    "traceid",
    "sourceip",
    "newuuid",
    "encode",
    "decode",
    "parse_time",
    "time_to_epoch",
    "sql_version",
    "cast",
    "regexp_matches",
    "regexp_replace",
    "regexp_substr",
    "substring",
    "indexof",
    "replace",
    "trim",
    "length",
    "nanvl",
    "mod",
    "power",
    "sqrt",
];

/// Compiles `sql`; the error says where and what.
pub fn compile(sql: &str) -> Result<Statement, SqlError> {
    if sql.len() > MAX_SQL_LEN {
        return Err(SqlError {
            at: None,
            message: format!("is {} bytes; at most {MAX_SQL_LEN}", sql.len()),
        });
    }
    let dialect = GenericDialect {};
    let tokens = Tokenizer::new(&dialect, sql)
        .tokenize_with_location()
        .map_err(|e| SqlError {
            at: at(e.location),
            message: format!("cannot read it: {}", e.message),
        })?;
    let tokens: Vec<TokenWithSpan> = tokens
        .into_iter()
        .filter(|t| !matches!(t.token, Token::Whitespace(_)))
        .collect();
    let mut parser = Parser {
        sql,
        tokens,
        next: 0,
        depth: 0,
        nodes: 0,
    };
    parser.statement(sql)
}

impl Parser<'_> {
    fn statement(&mut self, sql: &str) -> Result<Statement, SqlError> {
        self.expect_keyword(Keyword::SELECT, "SELECT")?;
        let mut select = vec![self.item(1)?];
        while self.eat(&Token::Comma) {
            select.push(self.item(select.len() + 1)?);
        }
        self.expect_keyword(Keyword::FROM, "FROM")?;
        let from = self.topic_filter()?;
        let mut conditions = Vec::new();
        if self.eat_keyword(Keyword::WHERE) {
            let where_start = self.peek().span.start;
            loop {
                let start = self.peek().span.start;
                let expr = self.not()?;
                let text = self.text_since(start);
                conditions.push(Condition { text, expr });
                if !self.eat_keyword(Keyword::AND) {
                    break;
                }
            }
            if self.peek_keyword(Keyword::OR) {
                // `a AND b OR c` is `(a AND b) OR c`: one condition, the whole clause.
                let mut left = and_all(std::mem::take(&mut conditions));
                while self.eat_keyword(Keyword::OR) {
                    self.node()?;
                    let right = self.and()?;
                    left = Expr::Logic(false, Box::new(left), Box::new(right));
                }
                conditions.push(Condition {
                    text: self.text_since(where_start),
                    expr: left,
                });
            }
        }
        let next = self.peek();
        if next.token != Token::EOF {
            return Err(SqlError {
                at: at(next.span.start),
                message: format!(
                    "{} after the statement is not supported on the gateway: a rule is SELECT … \
                     FROM '<filter>' [WHERE …] (no GROUP BY, ORDER BY, LIMIT or ';')",
                    next.token
                ),
            });
        }
        let roots = super::payload::roots(&select, conditions.iter().map(|c| &c.expr));
        Ok(Statement {
            text: sql.to_owned(),
            from,
            select,
            conditions,
            roots,
        })
    }

    /// One SELECT item; `position` (from 1) names an unnamed expression.
    fn item(&mut self, position: usize) -> Result<Item, SqlError> {
        if self.eat(&Token::Mul) {
            return Ok(Item::All);
        }
        let start = self.peek().clone();
        let expr = self.expr()?;
        if self.peek().token == Token::Period {
            return Err(self.unsupported_here("a.* in the SELECT list (list the fields)"));
        }
        let name = if self.eat_keyword(Keyword::AS) {
            self.name()?
        } else if let Token::Word(w) = &self.peek().token
            && !matches!(w.keyword, Keyword::FROM)
        {
            self.name()?
        } else {
            unnamed(&expr, &start.token, position)
        };
        Ok(Item::Named(name, expr))
    }

    /// `FROM '<filter>'`: a quoted, valid MQTT topic filter.
    fn topic_filter(&mut self) -> Result<String, SqlError> {
        let token = self.advance();
        let Token::SingleQuotedString(filter) = token.token else {
            return Err(SqlError {
                at: at(token.span.start),
                message: format!(
                    "FROM takes the topic filter in single quotes, as in FROM 'sensors/+/data'; \
                     got {}",
                    token.token
                ),
            });
        };
        crate::core::rules::validate_topic(&filter).map_err(|why| SqlError {
            at: at(token.span.start),
            message: format!("FROM {filter:?} is not a valid topic filter: {why}"),
        })?;
        Ok(filter)
    }

    fn expr(&mut self) -> Result<Expr, SqlError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(SqlError {
                at: at(self.peek().span.start),
                message: format!("nested more than {MAX_DEPTH} deep"),
            });
        }
        let mut left = self.and()?;
        while self.eat_keyword(Keyword::OR) {
            self.node()?;
            let right = self.and()?;
            left = Expr::Logic(false, Box::new(left), Box::new(right));
        }
        self.depth -= 1;
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, SqlError> {
        let mut left = self.not()?;
        while self.eat_keyword(Keyword::AND) {
            self.node()?;
            let right = self.not()?;
            left = Expr::Logic(true, Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    /// `NOT`s are counted, not recursed into: a long run of them cannot exhaust the stack.
    fn not(&mut self) -> Result<Expr, SqlError> {
        let mut nots = 0;
        while self.eat_keyword(Keyword::NOT) {
            self.node()?;
            nots += 1;
        }
        let mut expr = self.compare()?;
        for _ in 0..nots {
            expr = Expr::Not(Box::new(expr));
        }
        Ok(expr)
    }

    fn compare(&mut self) -> Result<Expr, SqlError> {
        let left = self.sum()?;
        let op = match &self.peek().token {
            Token::Eq | Token::DoubleEq => Cmp::Eq,
            Token::Neq => Cmp::Ne,
            Token::Lt => Cmp::Lt,
            Token::LtEq => Cmp::Le,
            Token::Gt => Cmp::Gt,
            Token::GtEq => Cmp::Ge,
            Token::Word(w) => {
                let unsupported = match w.keyword {
                    Keyword::IS => {
                        "IS [NOT] NULL (write isNull(x), isUndefined(x) or NOT isNull(x))"
                    }
                    Keyword::IN => "IN (…) (write the comparisons with OR)",
                    Keyword::LIKE => "LIKE",
                    Keyword::BETWEEN => "BETWEEN (write a >= x AND a <= y)",
                    _ => return Ok(left),
                };
                return Err(self.unsupported_here(unsupported));
            }
            _ => return Ok(left),
        };
        self.advance();
        self.node()?;
        let right = self.sum()?;
        Ok(Expr::Compare(op, Box::new(left), Box::new(right)))
    }

    fn sum(&mut self) -> Result<Expr, SqlError> {
        let mut left = self.product()?;
        loop {
            let op = match self.peek().token {
                Token::Plus => Arith::Add,
                Token::Minus => Arith::Sub,
                Token::StringConcat => {
                    return Err(self.unsupported_here("|| (write concat(a, b))"));
                }
                _ => return Ok(left),
            };
            self.advance();
            self.node()?;
            let right = self.product()?;
            left = Expr::Arith(op, Box::new(left), Box::new(right));
        }
    }

    fn product(&mut self) -> Result<Expr, SqlError> {
        let mut left = self.unary()?;
        loop {
            let op = match self.peek().token {
                Token::Mul => Arith::Mul,
                Token::Div => Arith::Div,
                Token::Mod => Arith::Mod,
                _ => return Ok(left),
            };
            self.advance();
            self.node()?;
            let right = self.unary()?;
            left = Expr::Arith(op, Box::new(left), Box::new(right));
        }
    }

    /// Signs are counted, not recursed into, as `NOT`s are.
    fn unary(&mut self) -> Result<Expr, SqlError> {
        let mut negations = 0;
        loop {
            if self.eat(&Token::Minus) {
                self.node()?;
                negations += 1;
            } else if !self.eat(&Token::Plus) {
                break;
            }
        }
        let mut expr = self.path()?;
        for _ in 0..negations {
            expr = Expr::Neg(Box::new(expr));
        }
        Ok(expr)
    }

    /// A primary followed by `.name` and `[n]` steps (on a field path only).
    fn path(&mut self) -> Result<Expr, SqlError> {
        let mut expr = self.primary()?;
        loop {
            let step = match self.peek().token {
                Token::Period if matches!(self.peek_at(1).token, Token::Word(_)) => {
                    self.advance();
                    Step::Key(self.name()?)
                }
                Token::LBracket => {
                    self.advance();
                    let index = self.advance();
                    let Token::Number(n, _) = &index.token else {
                        return Err(unsupported(
                            index.span.start,
                            "an index that is not a number such as [0]",
                        ));
                    };
                    let Ok(i) = n.parse::<usize>() else {
                        return Err(unsupported(
                            index.span.start,
                            "an index that is not a number such as [0]",
                        ));
                    };
                    self.expect(&Token::RBracket, "]")?;
                    Step::Index(i)
                }
                _ => return Ok(expr),
            };
            match &mut expr {
                Expr::Field(path) => path.push(step),
                _ => return Err(self.unsupported_here("[…] or . on something not a field")),
            }
        }
    }

    fn primary(&mut self) -> Result<Expr, SqlError> {
        if self.peek().token == Token::EOF {
            return Err(self.expected("a value, a field or a function"));
        }
        let token = self.advance();
        let start = token.span.start;
        Ok(match token.token {
            Token::Number(n, _) => Expr::Literal(number(&n).ok_or_else(|| SqlError {
                at: at(start),
                message: format!("{n} is not a number the gateway can hold"),
            })?),
            Token::SingleQuotedString(s) => Expr::Literal(serde_json::Value::String(s)),
            Token::LParen => {
                if self.peek_keyword(Keyword::SELECT) {
                    return Err(self.unsupported_here("a nested SELECT"));
                }
                let inner = self.expr()?;
                self.expect(&Token::RParen, ")")?;
                inner
            }
            Token::Word(w) if w.quote_style.is_some() => Expr::Field(vec![Step::Key(w.value)]),
            Token::Word(w) => match w.keyword {
                Keyword::TRUE => Expr::Literal(serde_json::Value::Bool(true)),
                Keyword::FALSE => Expr::Literal(serde_json::Value::Bool(false)),
                Keyword::NULL => Expr::Literal(serde_json::Value::Null),
                Keyword::SELECT => return Err(unsupported(start, "a nested SELECT")),
                Keyword::CASE => return Err(unsupported(start, "CASE")),
                Keyword::EXISTS => return Err(unsupported(start, "EXISTS (a nested SELECT)")),
                _ if self.peek().token == Token::LParen => self.call(&w.value, start)?,
                _ => Expr::Field(vec![Step::Key(w.value)]),
            },
            other => {
                return Err(SqlError {
                    at: at(start),
                    message: format!(
                        "cannot parse: expected a value, a field or a function, found {other}"
                    ),
                });
            }
        })
    }

    /// `name(args)`, the name just read and `(` next.
    fn call(&mut self, name: &str, start: Location) -> Result<Expr, SqlError> {
        let Some(&(canonical, func, min, max)) = FUNCTIONS
            .iter()
            .find(|(n, ..)| n.eq_ignore_ascii_case(name))
        else {
            if AWS_ONLY.iter().any(|n| n.eq_ignore_ascii_case(name)) {
                return Err(unsupported(
                    start,
                    &format!("the AWS IoT function {name}()"),
                ));
            }
            let known: Vec<&str> = FUNCTIONS.iter().map(|(n, ..)| *n).collect();
            return Err(SqlError {
                at: at(start),
                message: format!(
                    "unknown function {name}(); the gateway knows {}",
                    known.join(", ")
                ),
            });
        };
        self.node()?;
        self.expect(&Token::LParen, "(")?;
        let mut args = Vec::new();
        if !self.eat(&Token::RParen) {
            loop {
                args.push(self.expr()?);
                if self.eat(&Token::RParen) {
                    break;
                }
                self.expect(&Token::Comma, ", or )")?;
            }
        }
        if args.len() < min || args.len() > max {
            let takes = match (min, max) {
                (a, b) if a == b => format!("{a}"),
                (a, usize::MAX) => format!("at least {a}"),
                (a, b) => format!("{a} or {b}"),
            };
            return Err(SqlError {
                at: at(start),
                message: format!(
                    "{canonical}() takes {takes} argument(s), got {}",
                    args.len()
                ),
            });
        }
        Ok(Expr::Call(func, args))
    }

    /// A name after `AS` or `.`: a word, quoted or not.
    fn name(&mut self) -> Result<String, SqlError> {
        let token = self.advance();
        match token.token {
            Token::Word(w) => Ok(w.value),
            other => Err(SqlError {
                at: at(token.span.start),
                message: format!("expected a name, found {other}"),
            }),
        }
    }
}

/// Conditions joined with AND again (for a WHERE whose top level is an OR).
fn and_all(conditions: Vec<Condition>) -> Expr {
    let mut exprs = conditions.into_iter().map(|c| c.expr);
    let first = exprs
        .next()
        .unwrap_or(Expr::Literal(serde_json::Value::Bool(true)));
    exprs.fold(first, |left, right| {
        Expr::Logic(true, Box::new(left), Box::new(right))
    })
}

/// The key of an unnamed SELECT item, as AWS IoT names it: a field's last name, a function's
/// name, otherwise `_<position>`.
fn unnamed(expr: &Expr, first: &Token, position: usize) -> String {
    match (expr, first) {
        (Expr::Field(path), _) => match path.iter().rev().find_map(|s| match s {
            Step::Key(k) => Some(k.clone()),
            Step::Index(_) => None,
        }) {
            Some(key) => key,
            None => format!("_{position}"),
        },
        (Expr::Call(..), Token::Word(w)) => w.value.clone(),
        _ => format!("_{position}"),
    }
}

fn number(text: &str) -> Option<serde_json::Value> {
    match text.parse::<i64>() {
        Ok(i) => Some(serde_json::Value::from(i)),
        Err(_) => text
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(serde_json::Value::Number),
    }
}
