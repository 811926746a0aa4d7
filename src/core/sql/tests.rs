//! The evaluator against AWS IoT SQL's semantics: one table per concern, each row an
//! expression, a payload and the value it must give (`None`: undefined).

use serde_json::{Value, json};

use super::*;

const TOPIC: &str = "sensors/dev1/temperature";
const RECEIVED_MS: u64 = 1_764_000_000_123;

fn run(sql: &str, payload: &[u8]) -> Outcome {
    let statement = compile(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    let parsed = statement.parse_payload(payload);
    // Reading only the named fields sees what the whole payload shows.
    let whole = parse_payload(payload);
    let named = |v: &Option<Value>| {
        v.as_ref()
            .and_then(Value::as_object)
            .map(|o| match &statement.roots {
                Some(roots) => o
                    .iter()
                    .filter(|(k, _)| roots.contains(k))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                None => o.clone(),
            })
    };
    assert_eq!(named(&parsed), named(&whole), "{sql}");
    statement.apply(&Input {
        topic: TOPIC,
        payload: parsed.as_ref(),
        received_ms: RECEIVED_MS,
    })
}

/// The value of `expr` for `payload`; `None` when undefined (left out of the SELECT result).
fn value(expr: &str, payload: &str) -> Option<Value> {
    let sql = format!("SELECT {expr} AS v FROM '#'");
    match run(&sql, payload.as_bytes()) {
        Outcome::Kept(Some(out)) => {
            let out: Value = serde_json::from_slice(&out).expect("JSON");
            out.get("v").cloned()
        }
        other => panic!("{sql}: {other:?}"),
    }
}

fn check(table: &[(&str, &str, Option<Value>)]) {
    for (expr, payload, expected) in table {
        assert_eq!(&value(expr, payload), expected, "{expr} with {payload}");
    }
}

#[test]
fn fields_paths_and_indices_are_undefined_when_missing() {
    let p = r#"{"a":{"b":[10,{"c":"x"}]},"n":null,"t":21.5}"#;
    check(&[
        ("t", p, Some(json!(21.5))),
        ("a.b[0]", p, Some(json!(10))),
        ("a.b[1].c", p, Some(json!("x"))),
        ("a.b[2]", p, None),
        ("a.x.y", p, None),
        ("missing", p, None),
        ("n", p, Some(Value::Null)),
        ("t.deeper", p, None),
        // A payload that is not JSON, or not an object, has no fields.
        ("t", "not json", None),
        ("t", "", None),
        ("t", "42", None),
    ]);
}

#[test]
fn comparisons_follow_aws_iot_and_are_undefined_with_undefined() {
    let p = r#"{"t":50,"s":"abc","f":50.0,"ns":"51","b":true,"n":null}"#;
    check(&[
        ("t > 49", p, Some(json!(true))),
        ("t >= 50", p, Some(json!(true))),
        ("t < 50", p, Some(json!(false))),
        ("t <= 49.5", p, Some(json!(false))),
        ("t = 50", p, Some(json!(true))),
        ("t = f", p, Some(json!(true))),
        ("t <> 50", p, Some(json!(false))),
        ("t != 51", p, Some(json!(true))),
        ("s = 'abc'", p, Some(json!(true))),
        ("s <> 'abd'", p, Some(json!(true))),
        // Ordering converts to numbers: a numeric string compares, another is undefined.
        ("ns > t", p, Some(json!(true))),
        ("s > 1", p, None),
        ("b = true", p, Some(json!(true))),
        ("n = null", p, Some(json!(true))),
        ("t = 'x'", p, Some(json!(false))),
        ("missing > 1", p, None),
        ("missing = 1", p, None),
        ("missing <> 1", p, None),
        ("n > 1", p, None),
    ]);
}

#[test]
fn logic_needs_booleans_and_undefined_stays_undefined() {
    let p = r#"{"y":true,"no":false,"ts":"TRUE","x":1}"#;
    check(&[
        ("y AND no", p, Some(json!(false))),
        ("y OR no", p, Some(json!(true))),
        ("NOT no", p, Some(json!(true))),
        ("ts AND y", p, Some(json!(true))),
        ("x AND y", p, None),
        ("missing OR y", p, None),
        ("NOT missing", p, None),
        ("NOT (x > 5)", p, Some(json!(true))),
        ("NOT (missing > 5)", p, None),
    ]);
}

#[test]
fn arithmetic_keeps_ints_and_is_undefined_when_it_cannot_be_done() {
    let p = r#"{"i":7,"d":1.5,"s":"2","w":"x"}"#;
    check(&[
        ("i + 1", p, Some(json!(8))),
        ("i - 10", p, Some(json!(-3))),
        ("i * 2", p, Some(json!(14))),
        ("i / 2", p, Some(json!(3))),
        ("i % 4", p, Some(json!(3))),
        ("d * 2", p, Some(json!(3.0))),
        ("i / 2.0", p, Some(json!(3.5))),
        ("i + s", p, Some(json!(9))),
        ("-i", p, Some(json!(-7))),
        ("(i + 1) * 2", p, Some(json!(16))),
        ("i / 0", p, None),
        ("i % 0", p, None),
        ("d / 0", p, None),
        ("w + 1", p, None),
        ("missing + 1", p, None),
    ]);
}

#[test]
fn every_function_of_the_spec() {
    let p = r#"{"d":-2.5,"i":-3,"s":"MiXed","arr":[1],"n":null}"#;
    check(&[
        ("topic()", p, Some(json!(TOPIC))),
        ("topic(1)", p, Some(json!("sensors"))),
        ("topic(2)", p, Some(json!("dev1"))),
        ("topic(3)", p, Some(json!("temperature"))),
        ("topic(4)", p, None),
        ("topic(0)", p, None),
        ("timestamp()", p, Some(json!(RECEIVED_MS))),
        ("abs(d)", p, Some(json!(2.5))),
        ("abs(i)", p, Some(json!(3))),
        ("ceil(d)", p, Some(json!(-2))),
        ("floor(d)", p, Some(json!(-3))),
        ("round(d)", p, Some(json!(-3))),
        ("round(2.4)", p, Some(json!(2))),
        ("ceil(i)", p, Some(json!(-3))),
        ("abs(s)", p, None),
        ("lower(s)", p, Some(json!("mixed"))),
        ("upper(s)", p, Some(json!("MIXED"))),
        ("lower(i)", p, None),
        ("concat(s, '-', i)", p, Some(json!("MiXed--3"))),
        ("concat(arr, 2)", p, Some(json!([1, 2]))),
        ("concat(s, missing)", p, None),
        ("startswith(s, 'Mi')", p, Some(json!(true))),
        ("startswith(s, 'x')", p, Some(json!(false))),
        ("startswith(i, 'x')", p, None),
        ("isUndefined(missing)", p, Some(json!(true))),
        ("isUndefined(n)", p, Some(json!(false))),
        ("isNull(n)", p, Some(json!(true))),
        ("isNull(missing)", p, Some(json!(false))),
        ("ISNULL(n)", p, Some(json!(true))),
    ]);
    // Functions work on a payload that is not JSON.
    assert_eq!(value("topic(2)", "\u{1}binary"), Some(json!("dev1")));
}

#[test]
fn where_keeps_only_when_every_condition_is_true_and_names_the_first_that_is_not() {
    let sql = "SELECT * FROM 'sensors/#' WHERE t > 50 AND topic(2) = 'dev1'";
    assert_eq!(run(sql, br#"{"t":51}"#), Outcome::Kept(None));
    let statement = compile(sql).expect("compiles");
    for payload in [&br#"{"t":50}"#[..], br#"{"x":1}"#, b"not json"] {
        assert_eq!(run(sql, payload), Outcome::Filtered(0), "{payload:?}");
    }
    assert_eq!(statement.condition(0), "t > 50");
    assert_eq!(statement.condition(1), "topic(2) = 'dev1'");
    let other = "SELECT * FROM '#' WHERE t > 50 AND topic(2) = 'dev2'";
    assert_eq!(run(other, br#"{"t":51}"#), Outcome::Filtered(1));
    // An OR at the top level makes the whole clause one condition; AND binds tighter.
    let or = "SELECT * FROM '#' WHERE t > 50 AND t < 60 OR alarm = true";
    let statement = compile(or).expect("compiles");
    assert_eq!(statement.condition(0), "t > 50 AND t < 60 OR alarm = true");
    assert_eq!(run(or, br#"{"t":70,"alarm":true}"#), Outcome::Kept(None));
    assert_eq!(run(or, br#"{"t":55,"alarm":false}"#), Outcome::Kept(None));
    assert_eq!(run(or, br#"{"t":70,"alarm":false}"#), Outcome::Filtered(0));
    let or_first = "SELECT * FROM '#' WHERE alarm = true OR t > 50 AND t < 60";
    assert_eq!(
        run(or_first, br#"{"t":70,"alarm":true}"#),
        Outcome::Kept(None)
    );
    assert_eq!(
        run(or_first, br#"{"t":70,"alarm":false}"#),
        Outcome::Filtered(0)
    );
}

#[test]
fn select_leaves_undefined_items_out_and_names_unnamed_ones_as_aws_iot_does() {
    let payload = br#"{"a":{"b":1},"t":2,"keep":"me"}"#;
    let out = |sql: &str| match run(sql, payload) {
        Outcome::Kept(Some(out)) => serde_json::from_slice::<Value>(&out).expect("JSON"),
        other => panic!("{sql}: {other:?}"),
    };
    assert_eq!(
        out("SELECT a.b, t AS temp, missing, topic(2), t + 1 FROM '#'"),
        json!({"b": 1, "temp": 2, "topic": "dev1", "_5": 3})
    );
    assert_eq!(
        out("SELECT *, topic(2) AS device FROM '#'"),
        json!({"a": {"b": 1}, "t": 2, "keep": "me", "device": "dev1"})
    );
    assert_eq!(out("SELECT missing FROM '#'"), json!({}));
    // SELECT * alone keeps the payload byte for byte, JSON or not.
    assert_eq!(run("SELECT * FROM '#'", b"\xff raw"), Outcome::Kept(None));
}

// One piece: a table of statements, each with where and why it is refused.
#[test]
fn statements_that_cannot_run_are_refused_with_their_column() {
    for (sql, at, expected) in [
        (
            "SELECT foo(a) FROM 'x'",
            Some((1, 8)),
            "unknown function foo()",
        ),
        (
            "SELECT get_thing_shadow('a','b') FROM 'x'",
            Some((1, 8)),
            "get_thing_shadow() is not supported on the gateway",
        ),
        (
            "SELECT aws_lambda('arn', *) FROM 'x'",
            Some((1, 8)),
            "not supported on the gateway",
        ),
        (
            "SELECT * FROM 'x' WHERE a IN (SELECT 1)",
            Some((1, 27)),
            "not supported on the gateway",
        ),
        (
            "SELECT (SELECT 1) AS n FROM 'x'",
            Some((1, 9)),
            "a nested SELECT is not supported on the gateway",
        ),
        (
            "SELECT * FROM x",
            Some((1, 15)),
            "FROM takes the topic filter in single quotes",
        ),
        (
            "SELECT * FROM 'a/#/b'",
            Some((1, 15)),
            "is not a valid topic filter",
        ),
        (
            "SELECT * FROM 'x' LIMIT 1",
            Some((1, 19)),
            "LIMIT after the statement",
        ),
        (
            "SELECT a FROM 'x' WHERE (a > ",
            Some((1, 30)),
            "cannot parse",
        ),
        (
            "SELECT topic(1, 2) FROM 'x'",
            Some((1, 8)),
            "topic() takes 0 or 1",
        ),
        (
            "SELECT * FROM 'x' WHERE a IS NULL",
            Some((1, 27)),
            "write isNull(x)",
        ),
        (
            "DELETE FROM 'x'",
            Some((1, 1)),
            "cannot parse: expected SELECT, found DELETE",
        ),
    ] {
        let error = compile(sql).expect_err(sql);
        assert!(error.message.contains(expected), "{sql}: {error}");
        assert_eq!(error.at, at, "{sql}: {error}");
    }
    let deep = format!("SELECT {}1{} FROM 'x'", "(".repeat(200), ")".repeat(200));
    assert!(
        compile(&deep)
            .expect_err("deep")
            .message
            .contains("nested more than")
    );
    // Long runs of operators are refused before they make a tree too deep to evaluate.
    let nots = format!("SELECT * FROM 'x' WHERE {} true", "NOT ".repeat(4000));
    assert!(
        compile(&nots)
            .expect_err("nots")
            .message
            .contains("split the rule")
    );
    let sum = format!("SELECT 1{} AS v FROM 'x'", " + 1".repeat(3000));
    assert!(
        compile(&sum)
            .expect_err("sum")
            .message
            .contains("split the rule")
    );
    let nots = format!("SELECT * FROM 'x' WHERE {} true", "NOT ".repeat(100));
    assert_eq!(run(&nots, b"{}"), Outcome::Kept(None));
}

#[test]
fn a_statement_shows_as_its_text_so_an_edit_is_a_change() {
    let a = compile("SELECT * FROM 'x' WHERE t > 1").expect("a");
    let b = compile("SELECT * FROM 'x' WHERE t > 2").expect("b");
    assert_ne!(format!("{a:?}"), format!("{b:?}"));
    assert_eq!(a.from(), "x");
}
