//! SQL rules (SPEC.md, "Deciding at the edge"): a rule's `sql = "SELECT … FROM '<filter>'
//! WHERE …"`, compiled once at load into a small tree ([`Statement`]) and evaluated per message
//! over its JSON payload, before the message is stored. Pure: no I/O, no clock (`timestamp()`
//! reads the receipt time the caller passes in).
//!
//! The subset and its semantics are AWS IoT SQL's, so a statement copied from an AWS IoT rule
//! does the same thing here:
//!
//! ```text
//! value      JSON (null, true/false, numbers, strings, arrays, objects) or undefined
//! field      a, a.b.c, a[0]: undefined when the payload lacks it, or is not a JSON object
//! compare    = <> != : undefined if either side is; numbers by value, others as JSON
//!            < <= > >= : both sides as numbers (numeric strings too), else undefined
//! logic      AND OR NOT : booleans (or "true"/"false" strings), else undefined
//! arithmetic + - * / % : numbers (numeric strings too); Int op Int stays Int (/ truncates);
//!            division by zero, overflow or a non-number: undefined
//! WHERE      keeps the message only when every top-level AND condition is true; undefined
//!            is not true, so a comparison with a missing field drops the message
//! SELECT     * (the payload as received, untouched) and/or expressions with optional AS name;
//!            an undefined item is left out of the result object
//! ```
//!
//! Parsing is `sqlparser`'s (its generic dialect), driven clause by clause (`compile.rs`):
//! only the projection and expression parsers are called, because AWS IoT's `FROM 'a/b'`
//! (a string, not a table) is not standard SQL. Evaluation is `eval.rs`.

mod compile;
mod cursor;
mod eval;
mod payload;

use std::fmt;

use serde_json::Value;

pub use compile::compile;

/// A compiled SQL rule: its topic filter, what it selects and the conditions it keeps on.
pub struct Statement {
    /// The statement as written (what `Debug` shows, so a reload sees an edit as a change).
    text: String,
    /// The `FROM` topic filter: the rule's subscription.
    from: String,
    /// The SELECT list, in order.
    select: Vec<eval::Item>,
    /// The WHERE clause split at its top-level ANDs, each with its text as written.
    conditions: Vec<Condition>,
    /// The payload's top-level fields the statement reads; `None` when it selects `*`.
    roots: Option<Vec<String>>,
}

/// One top-level AND condition of a WHERE clause.
struct Condition {
    /// As written in the statement, for `try` to name the condition that dropped a message.
    text: String,
    expr: eval::Expr,
}

impl fmt::Debug for Statement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Statement({:?})", self.text)
    }
}

/// What a statement sees of one message.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// The concrete topic (for `topic()`).
    pub topic: &'a str,
    /// The payload parsed as JSON ([`parse_payload`]); `None` when it is not JSON: no fields.
    pub payload: Option<&'a Value>,
    /// Milliseconds since the Unix epoch at receipt (for `timestamp()`).
    pub received_ms: u64,
}

/// What a statement decided for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The message goes on: with this payload (the SELECT result as JSON), or unchanged
    /// (`None`: `SELECT *` alone).
    Kept(Option<Vec<u8>>),
    /// A WHERE condition was not true: the index of the first such top-level AND condition
    /// ([`Statement::condition`] has its text).
    Filtered(usize),
}

/// Why a statement cannot run: where in it (1-based line and column, when known) and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", position(*.at))]
pub struct SqlError {
    /// Line and column in the statement.
    pub at: Option<(u64, u64)>,
    /// What is wrong and, where it helps, what to write instead.
    pub message: String,
}

fn position(at: Option<(u64, u64)>) -> String {
    match at {
        Some((1, column)) => format!("column {column}: "),
        Some((line, column)) => format!("line {line}, column {column}: "),
        None => String::new(),
    }
}

/// The payload as JSON, or `None` when it is not JSON (empty, text, binary): it has no fields.
pub fn parse_payload(payload: &[u8]) -> Option<Value> {
    serde_json::from_slice(payload).ok()
}

impl Statement {
    /// Whether this statement needs the whole payload ([`parse_payload`], which several rules
    /// may share); otherwise [`Statement::parse_payload`] reads only the fields it names.
    pub fn reads_whole_payload(&self) -> bool {
        self.roots.is_none()
    }

    /// The payload as this statement sees it: only the top-level fields it names (all of them
    /// with `*`); `None` when it is not JSON.
    pub fn parse_payload(&self, payload: &[u8]) -> Option<Value> {
        match &self.roots {
            None => parse_payload(payload),
            Some(roots) => payload::parse_fields(payload, roots),
        }
    }
}

impl Statement {
    /// The statement as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The `FROM` topic filter.
    pub fn from(&self) -> &str {
        &self.from
    }

    /// The text of the WHERE clause's top-level AND condition `i`, as written (empty when
    /// there is none).
    pub fn condition(&self, i: usize) -> &str {
        self.conditions.get(i).map_or("", |c| c.text.as_str())
    }

    /// Whether the SELECT list is `*` alone: kept messages travel unchanged, so the payload
    /// need not be parsed unless a WHERE reads it.
    pub fn selects_all(&self) -> bool {
        matches!(self.select.as_slice(), [eval::Item::All])
    }

    /// Evaluates the statement for one message.
    pub fn apply(&self, input: &Input<'_>) -> Outcome {
        for (i, condition) in self.conditions.iter().enumerate() {
            if !eval::is_true(condition.expr.eval(input).as_deref()) {
                return Outcome::Filtered(i);
            }
        }
        if self.selects_all() {
            return Outcome::Kept(None);
        }
        let mut out = serde_json::Map::new();
        for item in &self.select {
            match item {
                eval::Item::All => {
                    if let Some(Value::Object(fields)) = input.payload {
                        out.extend(fields.iter().map(|(k, v)| (k.clone(), v.clone())));
                    }
                }
                eval::Item::Named(name, expr) => {
                    if let Some(value) = expr.eval(input) {
                        out.insert(name.clone(), value.into_owned());
                    }
                }
            }
        }
        Outcome::Kept(serde_json::to_vec(&Value::Object(out)).ok())
    }
}

#[cfg(test)]
mod tests;
