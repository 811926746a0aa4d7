//! Reading a payload for a statement: as JSON, keeping only the top-level fields the statement
//! names when it does not select `*`. A payload is read for every message an SQL rule matches;
//! the fields nobody reads are scanned but not built (no keys, strings or nested objects
//! allocated). On the benchmark's 8-field, 200-byte payload the gain is within the noise; it
//! grows with the payload's unread part.
//!
//! The result is the same as a full parse for everything the statement can see: a payload that
//! is not JSON is `None`, a JSON value that is not an object has no fields (`None` too, since no
//! field of it can be read), and a repeated key keeps its last value, as `serde_json::Value` does.

use std::borrow::Cow;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use super::eval::{Expr, Item, Step};

/// The top-level field names `select` and `conditions` read; `None` when `*` needs them all.
pub(super) fn roots<'a>(
    select: &[Item],
    conditions: impl Iterator<Item = &'a Expr>,
) -> Option<Vec<String>> {
    let mut roots = Vec::new();
    let mut stack: Vec<&Expr> = conditions.collect();
    for item in select {
        match item {
            Item::All => return None,
            Item::Named(_, expr) => stack.push(expr),
        }
    }
    while let Some(expr) = stack.pop() {
        match expr {
            Expr::Literal(_) => {}
            Expr::Field(path) => {
                if let Some(Step::Key(key)) = path.first()
                    && !roots.contains(key)
                {
                    roots.push(key.clone());
                }
            }
            Expr::Not(e) | Expr::Neg(e) => stack.push(e),
            Expr::Compare(_, l, r) | Expr::Logic(_, l, r) | Expr::Arith(_, l, r) => {
                stack.push(l);
                stack.push(r);
            }
            Expr::Call(_, args) => stack.extend(args),
        }
    }
    Some(roots)
}

/// The payload as JSON with only the fields in `roots` (see the module's head).
pub(super) fn parse_fields(payload: &[u8], roots: &[String]) -> Option<Value> {
    let mut de = serde_json::Deserializer::from_slice(payload);
    let value = Fields(roots).deserialize(&mut de).ok()?;
    de.end().ok()?;
    value
}

struct Fields<'r>(&'r [String]);

impl<'de> DeserializeSeed<'de> for Fields<'_> {
    type Value = Option<Value>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Fields<'_> {
    type Value = Option<Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Map::new();
        while let Some(Key(key)) = map.next_key()? {
            if self.0.iter().any(|r| *r == key) {
                out.insert(key.into_owned(), map.next_value()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(Some(Value::Object(out)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

/// An object key, borrowed from the payload when it has no escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(s.to_owned())))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}
