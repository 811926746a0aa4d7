//! From the statement's text to a [`Statement`]: `sqlparser` reads it clause by clause (SELECT
//! list, `FROM '<filter>'`, optional WHERE, nothing after), then each expression is turned into
//! an `eval::Expr` or refused with its position. AWS IoT features the gateway cannot run are
//! refused as "not supported on the gateway", never as a bare parse error.

use sqlparser::ast::{self, Spanned};
use sqlparser::dialect::GenericDialect;
use sqlparser::keywords::Keyword;
use sqlparser::parser::{Parser, ParserError};
use sqlparser::tokenizer::{Location, Token};

use super::eval::{Arith, Cmp, Expr, Func, Item, Step};
use super::{Condition, SqlError, Statement};

/// Longest statement accepted: far above any real rule, and it bounds what parsing may cost.
const MAX_SQL_LEN: usize = 16 * 1024;

/// Deepest nesting of expressions: deep enough for any rule, shallow enough for the stack.
const MAX_DEPTH: usize = 64;

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

/// AWS IoT SQL functions that need AWS, the MQTT connection's identity, or are not built here.
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
    let mut parser = Parser::new(&dialect)
        .with_recursion_limit(MAX_DEPTH)
        .try_with_sql(sql)
        .map_err(parse_error)?;
    parser
        .expect_keyword(Keyword::SELECT)
        .map_err(parse_error)?;
    let projection = parser.parse_projection().map_err(parse_error)?;
    parser.expect_keyword(Keyword::FROM).map_err(parse_error)?;
    let from = from_filter(&mut parser)?;
    let select = select(&projection)?;
    let mut conditions = Vec::new();
    if parser.parse_keyword(Keyword::WHERE) {
        let condition = parser.parse_expr().map_err(parse_error)?;
        conjuncts(sql, &condition, &mut conditions)?;
    }
    let next = parser.peek_token();
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
    Ok(Statement {
        text: sql.to_owned(),
        from,
        select,
        conditions,
    })
}

/// `FROM '<filter>'`: a quoted, valid MQTT topic filter.
fn from_filter(parser: &mut Parser<'_>) -> Result<String, SqlError> {
    let token = parser.next_token();
    let filter = match &token.token {
        Token::SingleQuotedString(s) => s.clone(),
        other => {
            return Err(SqlError {
                at: at(token.span.start),
                message: format!(
                    "FROM takes the topic filter in single quotes, as in FROM 'sensors/+/data'; \
                     got {other}"
                ),
            });
        }
    };
    crate::core::rules::validate_topic(&filter).map_err(|why| SqlError {
        at: at(token.span.start),
        message: format!("FROM {filter:?} is not a valid topic filter: {why}"),
    })?;
    Ok(filter)
}

/// The WHERE clause's top-level AND conditions, each with its text.
fn conjuncts(sql: &str, e: &ast::Expr, out: &mut Vec<Condition>) -> Result<(), SqlError> {
    if let ast::Expr::BinaryOp {
        left,
        op: ast::BinaryOperator::And,
        right,
    } = e
    {
        conjuncts(sql, left, out)?;
        return conjuncts(sql, right, out);
    }
    let span = e.span();
    let text = match (offset(sql, span.start), offset(sql, span.end)) {
        (Some(a), Some(b)) if a < b => sql[a..b].trim().to_owned(),
        _ => sql.to_owned(),
    };
    out.push(Condition {
        text,
        expr: expr(e)?,
    });
    Ok(())
}

/// The byte offset of a 1-based line and column (in characters) of `sql`.
fn offset(sql: &str, location: Location) -> Option<usize> {
    let (line, column) = (usize::try_from(location.line).ok()?, location.column);
    let column = usize::try_from(column).ok()?.checked_sub(1)?;
    let start: usize = sql
        .split_inclusive('\n')
        .take(line.checked_sub(1)?)
        .map(str::len)
        .sum();
    let rest = sql.get(start..)?;
    match rest.char_indices().nth(column) {
        Some((i, _)) => Some(start + i),
        None => (rest.chars().count() == column).then_some(sql.len()),
    }
}

fn select(projection: &[ast::SelectItem]) -> Result<Vec<Item>, SqlError> {
    let mut items = Vec::new();
    for (i, item) in projection.iter().enumerate() {
        items.push(match item {
            ast::SelectItem::Wildcard(_) => Item::All,
            ast::SelectItem::ExprWithAlias { expr: e, alias } => {
                Item::Named(alias.value.clone(), expr(e)?)
            }
            ast::SelectItem::UnnamedExpr(e) => Item::Named(item_name(e, i + 1), expr(e)?),
            other => {
                return Err(unsupported(
                    other.span(),
                    "this SELECT item (list the fields instead)",
                ));
            }
        });
    }
    Ok(items)
}

/// The key of an unnamed SELECT item, as AWS IoT names it: a field's last name, a function's
/// name, otherwise `_<position>`.
fn item_name(e: &ast::Expr, position: usize) -> String {
    match e {
        ast::Expr::Identifier(ident) => ident.value.clone(),
        ast::Expr::CompoundIdentifier(idents) => {
            idents.last().map_or_else(String::new, |i| i.value.clone())
        }
        ast::Expr::Function(f) => function_name(f).unwrap_or_default(),
        ast::Expr::Ceil { .. } => "ceil".into(),
        ast::Expr::Floor { .. } => "floor".into(),
        _ => format!("_{position}"),
    }
}

fn function_name(f: &ast::Function) -> Option<String> {
    match f.name.0.as_slice() {
        [ast::ObjectNamePart::Identifier(ident)] => Some(ident.value.clone()),
        _ => None,
    }
}

/// One expression, compiled.
fn expr(e: &ast::Expr) -> Result<Expr, SqlError> {
    use ast::Expr as E;
    let boxed = |e: &ast::Expr| expr(e).map(Box::new);
    Ok(match e {
        E::Identifier(ident) => Expr::Field(vec![Step::Key(ident.value.clone())]),
        E::CompoundIdentifier(idents) => {
            Expr::Field(idents.iter().map(|i| Step::Key(i.value.clone())).collect())
        }
        E::CompoundFieldAccess { root, access_chain } => field_access(root, access_chain)?,
        E::Value(v) => Expr::Literal(literal(v)?),
        E::Nested(inner) => expr(inner)?,
        E::UnaryOp { op, expr: inner } => match op {
            ast::UnaryOperator::Not => Expr::Not(boxed(inner)?),
            ast::UnaryOperator::Minus => Expr::Neg(boxed(inner)?),
            ast::UnaryOperator::Plus => expr(inner)?,
            _ => return Err(unsupported(e.span(), &format!("the operator {op}"))),
        },
        E::BinaryOp { left, op, right } => binary(e, left, op, right)?,
        E::Ceil { expr: inner, .. } => Expr::Call(Func::Ceil, vec![expr(inner)?]),
        E::Floor { expr: inner, .. } => Expr::Call(Func::Floor, vec![expr(inner)?]),
        E::Function(f) => function(f)?,
        E::Subquery(_) | E::Exists { .. } => {
            return Err(unsupported(e.span(), "a nested SELECT"));
        }
        E::IsNull(_) | E::IsNotNull(_) => {
            return Err(SqlError {
                at: at(e.span().start),
                message: "IS [NOT] NULL is not supported on the gateway (nor in AWS IoT SQL): \
                          write isNull(x), isUndefined(x), or NOT isNull(x)"
                    .into(),
            });
        }
        E::Case { .. } => return Err(unsupported(e.span(), "CASE")),
        E::In { .. } => {
            return Err(unsupported(
                e.span(),
                "IN (…) (write the comparisons with OR)",
            ));
        }
        _ => return Err(unsupported(e.span(), "this expression")),
    })
}

fn binary(
    e: &ast::Expr,
    left: &ast::Expr,
    op: &ast::BinaryOperator,
    right: &ast::Expr,
) -> Result<Expr, SqlError> {
    use ast::BinaryOperator as B;
    let (l, r) = (Box::new(expr(left)?), Box::new(expr(right)?));
    let cmp = |c| Ok(Expr::Compare(c, l, r));
    match op {
        B::Eq => cmp(Cmp::Eq),
        B::NotEq => cmp(Cmp::Ne),
        B::Lt => cmp(Cmp::Lt),
        B::LtEq => cmp(Cmp::Le),
        B::Gt => cmp(Cmp::Gt),
        B::GtEq => cmp(Cmp::Ge),
        B::And | B::Or => {
            let (l, r) = (Box::new(expr(left)?), Box::new(expr(right)?));
            Ok(Expr::Logic(*op == B::And, l, r))
        }
        B::Plus | B::Minus | B::Multiply | B::Divide | B::Modulo => {
            let (l, r) = (Box::new(expr(left)?), Box::new(expr(right)?));
            let a = match op {
                B::Plus => Arith::Add,
                B::Minus => Arith::Sub,
                B::Multiply => Arith::Mul,
                B::Divide => Arith::Div,
                _ => Arith::Mod,
            };
            Ok(Expr::Arith(a, l, r))
        }
        B::StringConcat => Err(unsupported(e.span(), "|| (write concat(a, b))")),
        other => Err(unsupported(e.span(), &format!("the operator {other}"))),
    }
}

/// `a.b[0].c`: a field path with literal, non-negative indices.
fn field_access(root: &ast::Expr, chain: &[ast::AccessExpr]) -> Result<Expr, SqlError> {
    let Expr::Field(mut path) = expr(root)? else {
        return Err(unsupported(
            root.span(),
            "[…] or . on something not a field",
        ));
    };
    for access in chain {
        match access {
            ast::AccessExpr::Dot(ast::Expr::Identifier(ident)) => {
                path.push(Step::Key(ident.value.clone()));
            }
            ast::AccessExpr::Subscript(ast::Subscript::Index {
                index: ast::Expr::Value(v),
            }) if matches!(&v.value, ast::Value::Number(n, _) if n.parse::<usize>().is_ok()) => {
                if let ast::Value::Number(n, _) = &v.value {
                    path.push(Step::Index(n.parse().unwrap_or(usize::MAX)));
                }
            }
            ast::AccessExpr::Subscript(_) => {
                return Err(unsupported(
                    root.span(),
                    "an index that is not a number such as [0]",
                ));
            }
            ast::AccessExpr::Dot(other) => {
                return Err(unsupported(other.span(), "this field name"));
            }
        }
    }
    Ok(Expr::Field(path))
}

fn literal(v: &ast::ValueWithSpan) -> Result<serde_json::Value, SqlError> {
    use serde_json::Value as J;
    Ok(match &v.value {
        ast::Value::Number(n, _) => match n.parse::<i64>() {
            Ok(i) => J::from(i),
            Err(_) => n
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .map(J::Number)
                .ok_or_else(|| SqlError {
                    at: at(v.span.start),
                    message: format!("{n} is not a number the gateway can hold"),
                })?,
        },
        ast::Value::SingleQuotedString(s) => J::String(s.clone()),
        ast::Value::Boolean(b) => J::Bool(*b),
        ast::Value::Null => J::Null,
        _ => {
            return Err(unsupported(
                v.span,
                "this literal (use 'text', numbers, true, false, null)",
            ));
        }
    })
}

fn function(f: &ast::Function) -> Result<Expr, SqlError> {
    let span = f.span();
    let Some(name) = function_name(f) else {
        return Err(unsupported(span, "a qualified function name"));
    };
    let Some(&(canonical, func, min, max)) = FUNCTIONS
        .iter()
        .find(|(n, ..)| n.eq_ignore_ascii_case(&name))
    else {
        if AWS_ONLY.iter().any(|n| n.eq_ignore_ascii_case(&name)) {
            return Err(unsupported(span, &format!("the AWS IoT function {name}()")));
        }
        let known: Vec<&str> = FUNCTIONS.iter().map(|(n, ..)| *n).collect();
        return Err(SqlError {
            at: at(span.start),
            message: format!(
                "unknown function {name}(); the gateway knows {}",
                known.join(", ")
            ),
        });
    };
    let args = match &f.args {
        ast::FunctionArguments::None => Vec::new(),
        ast::FunctionArguments::List(list)
            if list.duplicate_treatment.is_none() && list.clauses.is_empty() =>
        {
            let mut args = Vec::new();
            for arg in &list.args {
                match arg {
                    ast::FunctionArg::Unnamed(ast::FunctionArgExpr::Expr(e)) => args.push(expr(e)?),
                    _ => return Err(unsupported(span, &format!("this argument of {name}()"))),
                }
            }
            args
        }
        _ => return Err(unsupported(span, &format!("these arguments of {name}()"))),
    };
    if f.filter.is_some() || f.over.is_some() || !f.within_group.is_empty() {
        return Err(unsupported(
            span,
            &format!("FILTER, OVER or WITHIN GROUP on {name}()"),
        ));
    }
    if args.len() < min || args.len() > max {
        let takes = match (min, max) {
            (a, b) if a == b => format!("{a}"),
            (a, usize::MAX) => format!("at least {a}"),
            (a, b) => format!("{a} or {b}"),
        };
        return Err(SqlError {
            at: at(span.start),
            message: format!(
                "{canonical}() takes {takes} argument(s), got {}",
                args.len()
            ),
        });
    }
    Ok(Expr::Call(func, args))
}

fn unsupported(span: sqlparser::tokenizer::Span, what: &str) -> SqlError {
    SqlError {
        at: at(span.start),
        message: format!("{what} is not supported on the gateway"),
    }
}

fn at(location: Location) -> Option<(u64, u64)> {
    (location.line > 0).then_some((location.line, location.column))
}

/// A parser's error, its position moved out of the message into [`SqlError::at`].
fn parse_error(error: ParserError) -> SqlError {
    let text = match &error {
        ParserError::TokenizerError(s) | ParserError::ParserError(s) => s.clone(),
        ParserError::RecursionLimitExceeded => {
            return SqlError {
                at: None,
                message: format!("nested more than {MAX_DEPTH} deep"),
            };
        }
    };
    // "Expected: ), found: 'a' at Line: 1, Column: 18"
    let (message, position) = match text.rsplit_once(" at Line: ") {
        Some((message, position)) => (message.to_owned(), Some(position)),
        None => (text, None),
    };
    let at = position.and_then(|p| {
        let (line, column) = p.split_once(", Column: ")?;
        Some((line.trim().parse().ok()?, column.trim().parse().ok()?))
    });
    SqlError {
        at,
        message: format!("cannot parse: {message}"),
    }
}
