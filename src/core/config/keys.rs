//! Every key of the configuration and what it holds, so that a value of the wrong type is
//! described as a person would say it (`rules[2].qos: expected a number 0, 1 or 2, got "2"`)
//! instead of as serde does (`invalid type: found string "2", expected u8`). The same table
//! tells the environment provider which keys are text, so `MLB_MQTT__PASSWORD=007` stays the
//! string "007" instead of becoming the number 7.
//!
//! Invariant: [`expectation`] knows every key of [`super::Config`]; a test walks
//! `config/example.toml` (which shows every key) to keep it so.

use figment::error::{Actual, Kind};
use figment::value::{Dict, Map, Value};
use figment::{Metadata, Profile, Provider};

use super::{ENV_PREFIX, Problem};

/// What a key holds, with an example to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// A humantime duration string.
    Duration(&'static str),
    /// A byte size string, or a number of bytes.
    Size(&'static str),
    /// A string.
    Text(&'static str),
    /// A file or directory path.
    Path(&'static str),
    /// A secret string: what was given is never repeated.
    Secret,
    /// `true` or `false`.
    Bool,
    /// One of these words.
    Choice(&'static [&'static str]),
    /// A subscription QoS: 0, 1 or 2.
    Qos,
    /// A whole number of at least zero.
    Count(&'static str),
    /// Any number.
    Number(&'static str),
    /// A table, written as this header.
    Table(&'static str),
    /// An array of tables, written as this header once per entry.
    Tables(&'static str),
    /// A list of strings.
    TextList(&'static str),
}

/// `rules[3].aggregate.fields[0]` → `rules[].aggregate.fields[]`: the key without indices.
fn generic(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    let mut in_index = false;
    for c in key.chars() {
        match c {
            '[' => {
                in_index = true;
                out.push('[');
            }
            ']' => {
                in_index = false;
                out.push(']');
            }
            _ if in_index => {}
            c => out.push(c),
        }
    }
    out
}

/// Every key the file may have (indices left out), with what it holds.
pub const KEYS: &[(&str, Expect)] = &[
    ("shutdown_timeout", Expect::Duration("8s")),
    ("mqtt", Expect::Table("[mqtt]")),
    ("mqtt.url", Expect::Text("mqtt://127.0.0.1:1883")),
    ("mqtt.client_id", Expect::Text("gw-01-lambda-bridge")),
    ("mqtt.clean_start", Expect::Bool),
    ("mqtt.keep_alive", Expect::Duration("30s")),
    ("mqtt.protocol", Expect::Choice(&["3.1.1", "5"])),
    ("mqtt.session_expiry", Expect::Duration("7d")),
    ("mqtt.receive_maximum", Expect::Count("256")),
    ("mqtt.username", Expect::Text("bridge")),
    ("mqtt.password", Expect::Secret),
    (
        "mqtt.password_file",
        Expect::Path("/etc/mqtt-lambda-bridge/mqtt-password"),
    ),
    ("mqtt.tls", Expect::Table("[mqtt.tls]")),
    (
        "mqtt.tls.ca_file",
        Expect::Path("/etc/mqtt-lambda-bridge/ca.pem"),
    ),
    (
        "mqtt.tls.cert_file",
        Expect::Path("/etc/mqtt-lambda-bridge/client.pem"),
    ),
    (
        "mqtt.tls.key_file",
        Expect::Path("/etc/mqtt-lambda-bridge/client.key"),
    ),
    ("aws", Expect::Table("[aws]")),
    ("aws.region", Expect::Text("eu-west-1")),
    ("aws.endpoint_url", Expect::Text("http://127.0.0.1:4566")),
    ("aws.profile", Expect::Text("edge")),
    ("aws.connect_timeout", Expect::Duration("5s")),
    ("aws.operation_timeout", Expect::Duration("30s")),
    ("aws.max_concurrency", Expect::Count("32")),
    ("aws.iot", Expect::Table("[aws.iot]")),
    (
        "aws.iot.credentials_endpoint",
        Expect::Text("c1234567890abc.credentials.iot.eu-west-1.amazonaws.com"),
    ),
    ("aws.iot.role_alias", Expect::Text("mqtt-lambda-bridge")),
    ("aws.iot.thing_name", Expect::Text("gw-01")),
    (
        "aws.iot.cert_file",
        Expect::Path("/etc/mqtt-lambda-bridge/device.pem"),
    ),
    (
        "aws.iot.key_file",
        Expect::Path("/etc/mqtt-lambda-bridge/device.key"),
    ),
    (
        "aws.iot.ca_file",
        Expect::Path("/etc/mqtt-lambda-bridge/AmazonRootCA1.pem"),
    ),
    ("buffer", Expect::Table("[buffer]")),
    ("buffer.dir", Expect::Path("/var/lib/mqtt-lambda-bridge")),
    ("buffer.max_size", Expect::Size("256MiB")),
    (
        "buffer.when_full",
        Expect::Choice(&["drop_oldest", "drop_newest", "block"]),
    ),
    ("buffer.max_age", Expect::Duration("7d")),
    ("buffer.segment_size", Expect::Size("8MiB")),
    ("buffer.max_ack_delay", Expect::Duration("100ms")),
    ("metrics", Expect::Table("[metrics]")),
    ("metrics.listen", Expect::Text("127.0.0.1:9464")),
    ("telemetry", Expect::Table("[telemetry]")),
    (
        "telemetry.topic",
        Expect::Text("gateways/gw-01/bridge/health"),
    ),
    ("telemetry.interval", Expect::Duration("60s")),
    ("http", Expect::Table("[http]")),
    ("http.listen", Expect::Text("127.0.0.1:8080")),
    (
        "http.token_file",
        Expect::Path("/etc/mqtt-lambda-bridge/http-token"),
    ),
    ("http.max_body", Expect::Size("256KiB")),
    ("http.read_timeout", Expect::Duration("30s")),
    (
        "http.cert_file",
        Expect::Path("/etc/mqtt-lambda-bridge/http.pem"),
    ),
    (
        "http.key_file",
        Expect::Path("/etc/mqtt-lambda-bridge/http.key"),
    ),
    ("rules", Expect::Tables("[[rules]]")),
    ("rules[]", Expect::Table("[[rules]]")),
    ("rules[].name", Expect::Text("temperature")),
    ("rules[].topic", Expect::Text("sensors/+/temperature")),
    (
        "rules[].sql",
        Expect::Text("SELECT * FROM 'sensors/+/temperature' WHERE temperature > 50"),
    ),
    ("rules[].function", Expect::Text("ingest-temperature")),
    ("rules[].qualifier", Expect::Text("live")),
    (
        "rules[].invocation",
        Expect::Choice(&["event", "request_response"]),
    ),
    ("rules[].qos", Expect::Qos),
    ("rules[].max_concurrency", Expect::Count("4")),
    ("rules[].batch", Expect::Table("[rules.batch]")),
    ("rules[].batch.max_messages", Expect::Count("100")),
    ("rules[].batch.max_bytes", Expect::Size("256KiB")),
    ("rules[].batch.max_wait", Expect::Duration("1s")),
    ("rules[].rate_limit", Expect::Table("[rules.rate_limit]")),
    (
        "rules[].rate_limit.invocations_per_second",
        Expect::Number("5 or 0.2"),
    ),
    ("rules[].rate_limit.burst", Expect::Count("10")),
    ("rules[].throttle", Expect::Table("[rules.throttle]")),
    ("rules[].throttle.min_interval", Expect::Duration("10s")),
    (
        "rules[].throttle.keep",
        Expect::Choice(&["latest", "first"]),
    ),
    ("rules[].throttle.only_changes", Expect::Bool),
    ("rules[].throttle.deadband", Expect::Number("0.5")),
    (
        "rules[].throttle.deadband_field",
        Expect::Text("/temperature"),
    ),
    ("rules[].aggregate", Expect::Table("[rules.aggregate]")),
    ("rules[].aggregate.window", Expect::Duration("60s")),
    (
        "rules[].aggregate.fields",
        Expect::TextList("[\"/temperature\"]"),
    ),
    ("rules[].aggregate.fields[]", Expect::Text("/temperature")),
    ("rules[].aggregate.group_by", Expect::Text("topic")),
    ("rules[].reply", Expect::Table("[rules.reply]")),
    ("rules[].reply.topic", Expect::Text("{topic}/reply")),
    ("rules[].reply.retain", Expect::Bool),
    ("rules[].reply.allow", Expect::TextList("[\"replies/#\"]")),
    ("rules[].reply.allow[]", Expect::Text("replies/#")),
];

/// What `key` (as a user writes it, indices included) holds; `None` for a key the file may not
/// have.
pub fn expectation(key: &str) -> Option<Expect> {
    let key = generic(key);
    KEYS.iter().find(|(k, _)| *k == key).map(|(_, e)| *e)
}

/// Whether a value for `key` is text, to be taken exactly as written (environment variables).
fn is_text(key: &str) -> bool {
    matches!(
        expectation(key),
        Some(Expect::Text(_) | Expect::Path(_) | Expect::Secret)
    )
}

impl Expect {
    /// "a duration like \"30s\"": what to write, with an example.
    fn phrase(self) -> String {
        match self {
            Expect::Duration(ex) => format!("a duration like \"{ex}\""),
            Expect::Size(ex) => format!("a size like \"{ex}\" or a number of bytes"),
            Expect::Text(ex) => format!("a string like \"{ex}\""),
            Expect::Path(ex) => format!("a path like \"{ex}\""),
            Expect::Secret => "a string".to_owned(),
            Expect::Bool => "true or false".to_owned(),
            Expect::Choice(words) => format!(
                "one of {}",
                words
                    .iter()
                    .map(|w| format!("\"{w}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Expect::Qos => "a number 0, 1 or 2".to_owned(),
            Expect::Count(ex) => format!("a whole number like {ex}"),
            Expect::Number(ex) => format!("a number like {ex}"),
            Expect::Table(header) => format!("a table (a {header} header with its keys below)"),
            Expect::Tables(header) => {
                format!("one or more {header} tables (double brackets, one per rule)")
            }
            Expect::TextList(ex) => format!("a list of strings like {ex}"),
        }
    }

    /// A hint for a common slip, given what was written.
    fn hint(self, actual: &Actual) -> Option<String> {
        let number = match actual {
            Actual::Unsigned(n) => Some(n.to_string()),
            Actual::Signed(n) => Some(n.to_string()),
            Actual::Float(f) => Some(f.to_string()),
            _ => None,
        };
        match (self, actual) {
            (Expect::Duration(_), Actual::Str(text)) => humantime::parse_duration(text.trim())
                .err()
                .map(|e| e.to_string()),
            (Expect::Duration(_), _) => number.map(|n| format!("write \"{n}s\" for seconds")),
            (Expect::Size(_), Actual::Str(text)) => {
                <bytesize::ByteSize as std::str::FromStr>::from_str(text.trim()).err()
            }
            (Expect::Text(_) | Expect::Path(_), _) => {
                number.map(|n| format!("put it in quotes: \"{n}\""))
            }
            (
                Expect::Qos | Expect::Count(_) | Expect::Number(_) | Expect::Bool,
                Actual::Str(text),
            ) if is_bare_word(text) => Some("write it without quotes".to_owned()),
            (Expect::Choice(_), _) if number.is_some() => {
                Some("write the word in quotes".to_owned())
            }
            _ => None,
        }
    }
}

/// Whether `text` would be a number or a boolean if its quotes were removed.
fn is_bare_word(text: &str) -> bool {
    let text = text.trim();
    text == "true" || text == "false" || text.parse::<f64>().is_ok()
}

/// What was written, as a person would quote it; a secret is only described.
fn describe(actual: &Actual, secret: bool) -> String {
    match actual {
        Actual::Str(_) | Actual::Char(_) if secret => "a string".to_owned(),
        Actual::Unsigned(_) | Actual::Signed(_) | Actual::Float(_) if secret => {
            "a number".to_owned()
        }
        Actual::Str(s) => format!("{s:?}"),
        Actual::Char(c) => format!("{:?}", c.to_string()),
        Actual::Bool(b) => b.to_string(),
        Actual::Unsigned(n) => n.to_string(),
        Actual::Signed(n) => n.to_string(),
        // Debug keeps "5.0" apart from the whole number 5.
        Actual::Float(f) => format!("{f:?}"),
        Actual::Seq => "a list".to_owned(),
        Actual::Map => "a table".to_owned(),
        Actual::Unit | Actual::Option => "nothing".to_owned(),
        Actual::Other(text) => text.clone(),
        other => other.to_string(),
    }
}

/// serde's own words for a type (`u8`, `a boolean`), for a key the table does not know.
fn plain_expected(serde: &str) -> String {
    match serde {
        "u8" | "u16" | "u32" | "u64" | "usize" => "a whole number".to_owned(),
        "i8" | "i16" | "i32" | "i64" | "isize" => "a whole number".to_owned(),
        "f32" | "f64" => "a number".to_owned(),
        "a boolean" => "true or false".to_owned(),
        "a sequence" => "a list".to_owned(),
        "a string" | "path string" => "a string".to_owned(),
        s if s.starts_with("struct ") || s == "a map" => "a table".to_owned(),
        other => other.to_owned(),
    }
}

/// "expected …, got …" for a value of the wrong type or out of range at `key`.
fn wrong_value(key: &str, actual: &Actual, serde_expected: &str) -> String {
    match expectation(key) {
        Some(expect) => {
            let got = describe(actual, expect == Expect::Secret);
            match expect.hint(actual) {
                Some(hint) => format!("expected {}, got {got} ({hint})", expect.phrase()),
                None => format!("expected {}, got {got}", expect.phrase()),
            }
        }
        None => format!(
            "expected {}, got {}",
            plain_expected(serde_expected),
            describe(actual, false)
        ),
    }
}

/// Turns one figment error into a problem naming the file (or variable), key and line.
pub fn figment_problem(err: figment::Error, file_name: &str, text: &str) -> Problem {
    let mut path = err.path.clone();
    let message = match &err.kind {
        Kind::UnknownField(field, expected) => {
            if path.last() != Some(field) {
                path.push(field.clone());
            }
            if expected.is_empty() {
                format!("unknown key {field:?}")
            } else {
                format!(
                    "unknown key {field:?}; expected one of: {}",
                    expected.join(", ")
                )
            }
        }
        Kind::MissingField(field) => {
            if path.last().map(String::as_str) != Some(field.as_ref()) {
                path.push(field.to_string());
            }
            "is required but missing".to_owned()
        }
        Kind::UnknownVariant(found, expected) => {
            format!(
                "unknown value {found:?}; expected one of: {}",
                expected.join(", ")
            )
        }
        Kind::InvalidType(actual, expected) | Kind::InvalidValue(actual, expected) => {
            wrong_value(&render_key(&path), actual, expected)
        }
        Kind::ISizeOutOfRange(n) => wrong_value(
            &render_key(&path),
            &Actual::Signed(*n as i128),
            "a whole number",
        ),
        Kind::USizeOutOfRange(n) => wrong_value(
            &render_key(&path),
            &Actual::Unsigned(*n as u128),
            "a whole number",
        ),
        Kind::InvalidLength(len, expected) => format!("expected {expected}, got {len} entries"),
        other => other.to_string(),
    };
    let key = render_key(&path);
    let source = match &err.metadata {
        Some(meta) if meta.name.contains("environment") => {
            format!("environment variable {}", env_var(&path.join(".")))
        }
        _ => file_name.to_owned(),
    };
    // A TOML syntax error carries its own line in the message; no key then.
    let line = if source == file_name {
        line_of(text, &key)
    } else {
        None
    };
    Problem {
        source,
        key,
        line,
        message,
    }
}

/// The variable that sets `key`: `mqtt.keep_alive` → `MLB_MQTT__KEEP_ALIVE`.
pub fn env_var(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.to_uppercase().replace('.', "__"))
}

/// `["rules", "1", "topic"]` → `rules[1].topic`.
pub fn render_key(path: &[String]) -> String {
    let mut key = String::new();
    for part in path {
        if part.parse::<usize>().is_ok() {
            key.push_str(&format!("[{part}]"));
        } else {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(part);
        }
    }
    key
}

/// The 1-based line of `key` (`rules[1].batch.max_wait`) in the TOML `text`, where it is written.
pub fn line_of(text: &str, key: &str) -> Option<usize> {
    if key.is_empty() {
        return None;
    }
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    let mut table: &dyn toml_edit::TableLike = doc.as_table();
    let mut span = None;
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        let (name, index) = match part.split_once('[') {
            Some((name, rest)) => (name, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        let (k, item) = table.get_key_value(name)?;
        span = k.span().or_else(|| item.span()).or(span);
        let item = match (index, item) {
            (Some(i), toml_edit::Item::ArrayOfTables(array)) => {
                let t = array.get(i)?;
                span = t.span().or(span);
                if parts.peek().is_none() {
                    break;
                }
                table = t;
                continue;
            }
            (_, item) => item,
        };
        if parts.peek().is_none() {
            break;
        }
        table = item.as_table_like()?;
    }
    let offset = span?.start;
    Some(text[..offset.min(text.len())].matches('\n').count() + 1)
}

/// The `MLB_` overrides of text keys, exactly as written. figment's `Env` reads `007` as the
/// number 7 and `1.50` as 1.5, which a string key then refuses; merged after `Env`, this
/// provider puts the text back. Its metadata is `Env`'s, so problems still name the variable.
pub struct EnvText(pub figment::providers::Env);

impl Provider for EnvText {
    fn metadata(&self) -> Metadata {
        self.0.metadata()
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut root = Dict::new();
        for (key, raw) in self.0.iter() {
            let key = key.as_str();
            if !is_text(key) {
                continue;
            }
            let parts: Vec<&str> = key.split('.').collect();
            insert(&mut root, &parts, Value::from(raw));
        }
        Ok(Profile::Default.collect(root))
    }
}

/// Puts `value` at `path` in `table`, creating the tables on the way.
fn insert(table: &mut Dict, path: &[&str], value: Value) {
    match path {
        [] => {}
        [last] => {
            table.insert((*last).to_owned(), value);
        }
        [first, rest @ ..] => {
            let entry = table
                .entry((*first).to_owned())
                .or_insert_with(|| Value::from(Dict::new()));
            if !matches!(entry, Value::Dict(..)) {
                *entry = Value::from(Dict::new());
            }
            if let Value::Dict(_, inner) = entry {
                insert(inner, rest, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_generic_without_indices() {
        assert_eq!(
            generic("rules[3].aggregate.fields[10]"),
            "rules[].aggregate.fields[]"
        );
        assert_eq!(expectation("rules[12].qos"), Some(Expect::Qos));
        assert_eq!(expectation("rules[0].nonsense"), None);
    }

    /// Every key `config/example.toml` shows, commented out or not, leaf or table.
    fn example_keys() -> Vec<String> {
        let text = include_str!("../../../config/example.toml");
        // Uncomment `# key = value` and `# [table]` lines so optional keys count too.
        let uncommented: String = text
            .lines()
            .map(|line| {
                let rest = line.strip_prefix("# ").unwrap_or(line);
                let is_key = rest
                    .split_once(" = ")
                    .is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
                if rest.starts_with('[') || is_key {
                    rest.to_owned()
                } else {
                    line.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let doc = toml_edit::ImDocument::parse(uncommented).expect("example parses");
        let mut keys = Vec::new();
        fn walk(prefix: &str, table: &dyn toml_edit::TableLike, keys: &mut Vec<String>) {
            for (k, item) in table.iter() {
                let key = if prefix.is_empty() {
                    k.to_owned()
                } else {
                    format!("{prefix}.{k}")
                };
                match item {
                    toml_edit::Item::Table(t) => {
                        keys.push(key.clone());
                        walk(&key, t, keys);
                    }
                    toml_edit::Item::ArrayOfTables(array) => {
                        keys.push(key.clone());
                        for (i, t) in array.iter().enumerate() {
                            let entry = format!("{key}[{i}]");
                            keys.push(entry.clone());
                            walk(&entry, t, keys);
                        }
                    }
                    toml_edit::Item::Value(toml_edit::Value::Array(a)) => {
                        keys.push(key.clone());
                        for i in 0..a.len() {
                            keys.push(format!("{key}[{i}]"));
                        }
                    }
                    _ => keys.push(key),
                }
            }
        }
        walk("", doc.as_table(), &mut keys);
        keys
    }

    #[test]
    fn every_key_of_the_example_has_an_expectation_and_back() {
        let keys = example_keys();
        for key in &keys {
            assert!(expectation(key).is_some(), "{key} is not in the key table");
        }
        let generic_keys: Vec<String> = keys.iter().map(|k| generic(k)).collect();
        // The other direction: every key of the table is shown in the example.
        for (known, _) in KEYS {
            assert!(
                generic_keys.iter().any(|k| k == known),
                "{known} is in the key table but config/example.toml does not show it"
            );
        }
    }
}
