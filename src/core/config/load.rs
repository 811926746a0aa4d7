//! Loading: figment reads the TOML file and the `MLB_` environment overrides into [`Config`]
//! (serde rejects unknown keys), then every section's validation runs, and each problem is
//! placed where the user wrote the value: the file and its line, or the environment variable.
//!
//! Invariant: a [`Config`] leaves here only when both steps passed; every problem found is
//! reported, none stops the others.

use std::fmt;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Toml};

use super::{Config, Issue, keys};

/// Where `run` and `check` look when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/mqtt-lambda-bridge/config.toml";
/// Environment variables with this prefix override the file; `__` separates levels.
pub const ENV_PREFIX: &str = "MLB_";

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where the value came from: the file's path or the environment variable.
    pub source: String,
    /// The key as a user writes it: `rules[1].topic`; empty for the file as a whole.
    pub key: String,
    /// 1-based line in the file, where known.
    pub line: Option<usize>,
    /// What is wrong and, where it helps, what to write instead.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("{path}: cannot read the configuration file: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file was read but has problems; each is one line of output.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

impl ConfigError {
    /// Every problem, one per line, as `check` prints them.
    pub fn problems(&self) -> Vec<String> {
        match self {
            ConfigError::Read { .. } => vec![self.to_string()],
            ConfigError::Invalid(problems) => problems.iter().map(ToString::to_string).collect(),
        }
    }
}

impl Config {
    /// Reads `path`, applies `MLB_` overrides from the process environment, and validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with_env(path, Env::prefixed(ENV_PREFIX))
    }

    /// As [`Config::load`], with the environment provider given (tests pass a fixed one).
    pub fn load_with_env(path: &Path, env: Env) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_str(&text, path, env)
    }

    /// Parses TOML text (read from `path`, which only names it in messages), then validates.
    pub fn from_toml_str(text: &str, path: &Path, env: Env) -> Result<Config, ConfigError> {
        let file_name = path.display().to_string();
        let env = env.split("__");
        let figment = Figment::new()
            .merge(Toml::string(text))
            .merge(env.clone())
            .merge(keys::EnvText(env.clone()));
        let config: Config = figment.extract().map_err(|err| {
            ConfigError::Invalid(
                err.into_iter()
                    .map(|e| keys::figment_problem(e, &file_name, text))
                    .collect(),
            )
        })?;
        config.validate_with(&Source::new(&file_name, text, &env))
    }

    /// Checks what serde cannot, section by section; every problem is collected, none stops
    /// the others. `text` is the file's, to find lines; `MLB_` variables of the process name
    /// the keys they set.
    pub fn validate(self, file_name: &str, text: &str) -> Result<Config, ConfigError> {
        let env = Env::prefixed(ENV_PREFIX).split("__");
        self.validate_with(&Source::new(file_name, text, &env))
    }

    fn validate_with(mut self, source: &Source) -> Result<Config, ConfigError> {
        let mut issues = self.compile_sql();
        issues.extend(self.issues());
        if issues.is_empty() {
            Ok(self)
        } else {
            Err(ConfigError::Invalid(source.locate(issues)))
        }
    }
}

/// Where the configuration's values came from: the file (its name and text, for lines) and
/// the keys the environment set.
#[derive(Debug, Clone)]
pub struct Source {
    /// The file's path as given.
    file_name: String,
    /// The file's text.
    text: String,
    /// Keys set by `MLB_` variables (`mqtt.password_file`).
    from_env: std::collections::HashSet<String>,
}

impl Source {
    fn new(file_name: &str, text: &str, env: &Env) -> Self {
        Source {
            file_name: file_name.to_owned(),
            text: text.to_owned(),
            from_env: env.iter().map(|(k, _)| k.as_str().to_owned()).collect(),
        }
    }

    /// The file at `path` and the process's `MLB_` variables, for problems found after loading
    /// (preflight). An unreadable file only loses the line numbers.
    pub fn read(path: &Path) -> Self {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let env = Env::prefixed(ENV_PREFIX).split("__");
        Source::new(&path.display().to_string(), &text, &env)
    }

    /// Places each issue: in the environment variable that set its key when one did,
    /// otherwise in the file, at the key's line where the file has it.
    pub fn locate(&self, issues: Vec<Issue>) -> Vec<Problem> {
        issues
            .into_iter()
            .map(|issue| {
                if self.from_env.contains(&issue.key) {
                    Problem {
                        source: format!("environment variable {}", keys::env_var(&issue.key)),
                        key: issue.key,
                        line: None,
                        message: issue.message,
                    }
                } else {
                    Problem {
                        source: self.file_name.clone(),
                        line: keys::line_of(&self.text, &issue.key),
                        key: issue.key,
                        message: issue.message,
                    }
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::core::config::{InvocationType, Secret, WhenFull};

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(
            text,
            Path::new("test.toml"),
            Env::prefixed("MLB_TEST_UNUSED_"),
        )
    }

    const MINIMAL: &str = r#"
[mqtt]
url = "mqtt://127.0.0.1:1883"
client_id = "gw"

[[rules]]
name = "t"
topic = "sensors/+/temperature"
function = "ingest"
"#;

    fn problems(text: &str) -> Vec<String> {
        match load(text) {
            Ok(_) => vec![],
            Err(e) => e.problems(),
        }
    }

    #[test]
    fn minimal_config_loads_with_defaults() {
        let config = load(MINIMAL).expect("valid");
        assert!(!config.mqtt.clean_start);
        assert_eq!(config.mqtt.keep_alive.0, Duration::from_secs(30));
        assert_eq!(config.rules[0].qos, 1);
        assert_eq!(config.rules[0].invocation, InvocationType::Event);
        assert_eq!(config.buffer.when_full, WhenFull::DropOldest);
        assert_eq!(config.buffer.max_size.0, 256 * 1024 * 1024);
    }

    #[test]
    fn every_config_error_names_file_key_and_line() {
        // (what is appended to MINIMAL or replaces a part, the expected problem line)
        let table: &[(&str, &str)] = &[
            (
                "[[rules]]\nname = \"a\"\ntopic = \"sensors/#/x\"\nfunction = \"f\"\n",
                "test.toml:12: rules[1].topic: '#' must be the last level",
            ),
            (
                "[[rules]]\nname = \"a\"\ntopic = \"sensors/a+\"\nfunction = \"f\"\n",
                "test.toml:12: rules[1].topic: '+' must be a whole level",
            ),
            (
                "[[rules]]\nname = \"a\"\ntopic = \"\"\nfunction = \"f\"\n",
                "test.toml:12: rules[1].topic: the filter is empty",
            ),
            (
                "[[rules]]\nname = \"t\"\ntopic = \"a\"\nfunction = \"f\"\n",
                "test.toml:11: rules[1].name: \"t\" is used by an earlier rule",
            ),
            (
                "[[rules]]\nname = \"a\"\ntopic = \"a\"\nfunction = \"\"\n",
                "test.toml:13: rules[1].function: must not be empty",
            ),
            (
                "[[rules]]\nname = \"a\"\ntopic = \"a\"\nfunction = \"f\"\nqos = 3\n",
                "test.toml:14: rules[1].qos: expected a number 0, 1 or 2, got 3",
            ),
            (
                "[[rules]]\nname = \"a\"\ntopic = \"a\"\nfunction = \"f\"\n[rules.batch]\nmax_wait = \"5 parsecs\"\n",
                "test.toml:15: rules[1].batch.max_wait: expected a duration like \"1s\", got \"5 parsecs\" (unknown time unit \"parsecs\"",
            ),
            (
                "[[rules]]\nname = \"a\"\ntopic = \"a\"\nfunction = \"f\"\n[rules.batch]\nmax_bytes = \"2MiB\"\n",
                "test.toml:15: rules[1].batch.max_bytes: must be between 1 and 1048576 bytes",
            ),
            (
                "[[rules]]\nname = \"a\"\ntopic = \"a\"\nfunction = \"f\"\ntopic_typo = 1\n",
                "test.toml:14: rules[1].topic_typo: unknown key \"topic_typo\"",
            ),
            (
                "[[rules]]\nname = \"a\"\ntopic = \"a\"\nfunction = \"f\"\ninvocation = \"sync\"\n",
                "rules[1].invocation: unknown value \"sync\"; expected one of: event, request_response",
            ),
            (
                "[[rules]]\nname = \"a b\"\ntopic = \"a\"\nfunction = \"f\"\n",
                "test.toml:11: rules[1].name: \"a b\": use letters",
            ),
            (
                "[[rules]]\nname = \"a\"\ntopic = \"a\"\nfunction = \"arn:aws:s3:::bucket\"\n",
                "rules[1].function: \"arn:aws:s3:::bucket\" is not a Lambda function ARN",
            ),
            (
                "[[rules]]\nname = \"a\"\ntopic = \"a\"\nfunction = \"f\"\n[rules.rate_limit]\ninvocations_per_second = 0\n",
                "rules[1].rate_limit.invocations_per_second: must be a number above zero",
            ),
            (
                "[buffer]\nmax_size = \"lots\"\n",
                "test.toml:11: buffer.max_size: expected a size like \"256MiB\" or a number of bytes, got \"lots\"",
            ),
            (
                "[buffer]\nwhen_full = \"panic\"\n",
                "buffer.when_full: unknown value \"panic\"; expected one of: drop_oldest, drop_newest, block",
            ),
            (
                "[aws]\nendpoint_url = \"localhost:4566\"\n",
                "test.toml:11: aws.endpoint_url: must start with http:// or https://",
            ),
        ];
        for (extra, expected) in table {
            let text = format!("{MINIMAL}{extra}");
            let got = problems(&text);
            assert!(
                got.iter().any(|p| p.contains(expected)),
                "for {extra:?}\nexpected a line containing {expected:?}\ngot {got:#?}"
            );
        }
    }

    #[test]
    fn mqtt_section_errors_are_reported() {
        let table: &[(&str, &str)] = &[
            (
                "http://broker:1883",
                "mqtt.url: \"http://broker:1883\": the scheme must be mqtt:// or mqtts://",
            ),
            ("mqtt://", "mqtt.url: \"mqtt://\": the host is missing"),
            (
                "mqtt://broker:99999",
                "the port must be a number from 1 to 65535",
            ),
            ("mqtt://user:pw@broker", "write only scheme, host and port"),
        ];
        for (url, expected) in table {
            let text = MINIMAL.replace("mqtt://127.0.0.1:1883", url);
            let got = problems(&text);
            assert!(
                got.iter()
                    .any(|p| p.contains(expected) && p.starts_with("test.toml:3: ")),
                "for {url}: expected {expected:?}, got {got:#?}"
            );
        }
    }

    #[test]
    fn several_problems_are_all_reported() {
        let text =
            format!("{MINIMAL}[[rules]]\nname = \"t\"\ntopic = \"a/#/b\"\nfunction = \"\"\n");
        let got = problems(&text);
        assert_eq!(got.len(), 3, "{got:#?}");
    }

    #[test]
    fn missing_sections_and_rules_are_named() {
        let got = problems("[[rules]]\nname = \"a\"\ntopic = \"a\"\nfunction = \"f\"\n");
        assert!(
            got.iter()
                .any(|p| p.contains("mqtt: is required but missing")),
            "{got:#?}"
        );
        let got = problems("[mqtt]\nurl = \"mqtt://h\"\n");
        assert!(
            got.iter().any(|p| p.contains("rules: no [[rules]]")),
            "{got:#?}"
        );
    }

    #[test]
    fn toml_syntax_error_is_a_problem_not_a_panic() {
        let got = problems("[mqtt\nurl = 1");
        assert_eq!(got.len(), 1, "{got:#?}");
        assert!(got[0].starts_with("test.toml"), "{got:#?}");
    }

    #[test]
    fn password_is_never_in_debug_output() {
        let text = MINIMAL.replace(
            "client_id = \"gw\"",
            "client_id = \"gw\"\nusername = \"u\"\npassword = \"hunter2\"",
        );
        let config = load(&text).expect("valid");
        assert!(!format!("{config:?}").contains("hunter2"));
        assert_eq!(
            config.mqtt.password.as_ref().map(Secret::expose),
            Some("hunter2")
        );
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure signature
    fn environment_overrides_the_file() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("MLB_AWS__REGION", "eu-west-1");
            jail.set_env("MLB_MQTT__KEEP_ALIVE", "45s");
            let config = Config::from_toml_str(MINIMAL, Path::new("t.toml"), Env::prefixed("MLB_"))
                .map_err(|e| e.to_string())?;
            assert_eq!(config.aws.region.as_deref(), Some("eu-west-1"));
            assert_eq!(config.mqtt.keep_alive.0, Duration::from_secs(45));
            jail.set_env("MLB_MQTT__KEEP_ALIVE", "soon");
            let err = Config::from_toml_str(MINIMAL, Path::new("t.toml"), Env::prefixed("MLB_"))
                .expect_err("invalid duration");
            let text = err.to_string();
            assert!(
                text.contains(
                    "environment variable MLB_MQTT__KEEP_ALIVE: mqtt.keep_alive: expected a duration like \"30s\", got \"soon\""
                ),
                "{text}"
            );
            Ok(())
        });
    }

    /// Replaces `key = …` in MINIMAL or appends `extra`, returning the only problem line.
    fn only_problem(text: &str) -> String {
        let got = problems(text);
        assert_eq!(got.len(), 1, "{text}\n{got:#?}");
        got.into_iter().next().unwrap_or_default()
    }

    const RULE: &str = "[[rules]]\nname = \"a\"\ntopic = \"a\"\nfunction = \"f\"\n";

    /// A rule's key with a value of the wrong type, appended to MINIMAL and RULE, and the whole
    /// problem line expected.
    const WRONG_RULE_VALUES: &[(&str, &str)] = &[
        (
            "qos = \"2\"\n",
            "test.toml:14: rules[1].qos: expected a number 0, 1 or 2, got \"2\" (write it without quotes)",
        ),
        (
            "qos = 300\n",
            "test.toml:14: rules[1].qos: expected a number 0, 1 or 2, got 300",
        ),
        (
            "qos = -1\n",
            "test.toml:14: rules[1].qos: expected a number 0, 1 or 2, got -1",
        ),
        (
            "max_concurrency = 2.5\n",
            "test.toml:14: rules[1].max_concurrency: expected a whole number like 4, got 2.5",
        ),
        (
            "invocation = 1\n",
            "test.toml:14: rules[1].invocation: expected one of \"event\", \"request_response\", got 1 (write the word in quotes)",
        ),
        (
            "[rules.batch]\nmax_messages = \"100\"\n",
            "test.toml:15: rules[1].batch.max_messages: expected a whole number like 100, got \"100\" (write it without quotes)",
        ),
        (
            "[rules.batch]\nmax_bytes = 12.5\n",
            "test.toml:15: rules[1].batch.max_bytes: expected a size like \"256KiB\" or a number of bytes, got 12.5",
        ),
        (
            "[rules.batch]\nmax_wait = 5\n",
            "test.toml:15: rules[1].batch.max_wait: expected a duration like \"1s\", got 5 (write \"5s\" for seconds)",
        ),
        (
            "[rules.rate_limit]\ninvocations_per_second = \"5\"\n",
            "test.toml:15: rules[1].rate_limit.invocations_per_second: expected a number like 5 or 0.2, got \"5\" (write it without quotes)",
        ),
        (
            "[rules.throttle]\nonly_changes = \"yes\"\n",
            "test.toml:15: rules[1].throttle.only_changes: expected true or false, got \"yes\"",
        ),
        (
            "[rules.throttle]\nonly_changes = \"true\"\n",
            "test.toml:15: rules[1].throttle.only_changes: expected true or false, got \"true\" (write it without quotes)",
        ),
        (
            "[rules.aggregate]\nwindow = \"1m\"\nfields = \"/x\"\n",
            "test.toml:16: rules[1].aggregate.fields: expected a list of strings like [\"/temperature\"], got \"/x\"",
        ),
        (
            "[rules.aggregate]\nwindow = \"1m\"\nfields = [1]\n",
            "test.toml:16: rules[1].aggregate.fields[0]: expected a string like \"/temperature\", got 1 (put it in quotes: \"1\")",
        ),
        (
            "batch = 3\n",
            "test.toml:14: rules[1].batch: expected a table (a [rules.batch] header with its keys below), got 3",
        ),
    ];

    /// A section's key replaced (from, to) in MINIMAL with a value of the wrong type, and the
    /// problem line expected.
    const WRONG_SECTION_VALUES: &[(&str, &str, &str)] = &[
        (
            "client_id = \"gw\"",
            "client_id = \"gw\"\nkeep_alive = 30",
            "test.toml:5: mqtt.keep_alive: expected a duration like \"30s\", got 30 (write \"30s\" for seconds)",
        ),
        (
            "client_id = \"gw\"",
            "client_id = 1234",
            "test.toml:4: mqtt.client_id: expected a string like \"gw-01-lambda-bridge\", got 1234 (put it in quotes: \"1234\")",
        ),
        (
            "client_id = \"gw\"",
            "client_id = \"gw\"\nclean_start = 1",
            "test.toml:5: mqtt.clean_start: expected true or false, got 1",
        ),
        (
            "client_id = \"gw\"",
            "client_id = \"gw\"\nusername = \"u\"\npassword = 123456",
            "test.toml:6: mqtt.password: expected a string, got a number",
        ),
        (
            "client_id = \"gw\"",
            "client_id = \"gw\"\n[mqtt.tls]\nca_file = [\"a\"]",
            "test.toml:6: mqtt.tls.ca_file: expected a path like \"/etc/mqtt-lambda-bridge/ca.pem\", got a list",
        ),
        (
            "[mqtt]",
            "shutdown_timeout = \"8 sec0nds\"\n[mqtt]",
            "test.toml:2: shutdown_timeout: expected a duration like \"8s\", got \"8 sec0nds\"",
        ),
        (
            "[mqtt]",
            "[buffer]\nmax_size = 12.5\n[mqtt]",
            "test.toml:3: buffer.max_size: expected a size like \"256MiB\" or a number of bytes, got 12.5",
        ),
        (
            "[mqtt]",
            "[buffer]\nmax_size = -5\n[mqtt]",
            "test.toml:3: buffer.max_size: expected a size like \"256MiB\" or a number of bytes, got -5",
        ),
        (
            "[mqtt]",
            "[buffer]\ndir = 5\n[mqtt]",
            "test.toml:3: buffer.dir: expected a path like \"/var/lib/mqtt-lambda-bridge\", got 5 (put it in quotes: \"5\")",
        ),
        (
            "[mqtt]",
            "[buffer]\nwhen_full = true\n[mqtt]",
            "test.toml:3: buffer.when_full: expected one of \"drop_oldest\", \"drop_newest\", \"block\", got true",
        ),
        (
            "[mqtt]",
            "[aws]\nregion = [\"eu-west-1\"]\n[mqtt]",
            "test.toml:3: aws.region: expected a string like \"eu-west-1\", got a list",
        ),
        (
            "[mqtt]",
            "[aws]\nmax_concurrency = \"lots\"\n[mqtt]",
            "test.toml:3: aws.max_concurrency: expected a whole number like 32, got \"lots\"",
        ),
        (
            "[mqtt]",
            "aws = 5\n[mqtt]",
            "test.toml:2: aws: expected a table (a [aws] header with its keys below), got 5",
        ),
        (
            "[[rules]]",
            "[rules]\nx = 1\n[[rules_]]",
            "test.toml:6: rules: expected one or more [[rules]] tables (double brackets, one per rule), got a table",
        ),
    ];

    #[test]
    fn a_rule_value_of_the_wrong_type_is_described_as_a_person_would() {
        for (extra, expected) in WRONG_RULE_VALUES {
            let got = only_problem(&format!("{MINIMAL}{RULE}{extra}"));
            assert!(
                got.starts_with(expected),
                "for {extra:?}\nexpected {expected}\ngot      {got}"
            );
        }
    }

    #[test]
    fn a_section_value_of_the_wrong_type_is_described_as_a_person_would() {
        for (from, to, expected) in WRONG_SECTION_VALUES {
            let text = MINIMAL.replacen(from, to, 1);
            let got = only_problem(&text);
            assert!(
                got.starts_with(expected),
                "for {to:?}\nexpected {expected}\ngot      {got}"
            );
            assert!(
                !got.contains("123456"),
                "a password is never repeated: {got}"
            );
        }
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure signature
    fn text_from_the_environment_stays_text() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("MLB_MQTT__CLIENT_ID", "0042");
            jail.set_env("MLB_MQTT__USERNAME", "true");
            jail.set_env("MLB_MQTT__PASSWORD", "1.50");
            jail.set_env("MLB_AWS__MAX_CONCURRENCY", "8");
            let config = Config::from_toml_str(MINIMAL, Path::new("t.toml"), Env::prefixed("MLB_"))
                .map_err(|e| e.to_string())?;
            assert_eq!(config.mqtt.client_id, "0042");
            assert_eq!(config.mqtt.username.as_deref(), Some("true"));
            assert_eq!(
                config.mqtt.password.as_ref().map(Secret::expose),
                Some("1.50")
            );
            assert_eq!(config.aws.max_concurrency, 8);
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure signature
    fn a_problem_with_a_value_from_the_environment_names_the_variable() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("MLB_MQTT__URL", "tcp://broker");
            jail.set_env("MLB_MQTT__KEEP_ALIVE", "30");
            let err = Config::from_toml_str(MINIMAL, Path::new("t.toml"), Env::prefixed("MLB_"))
                .expect_err("a number is not a duration");
            assert_eq!(
                err.problems(),
                [
                    "environment variable MLB_MQTT__KEEP_ALIVE: mqtt.keep_alive: expected a duration like \"30s\", got 30 (write \"30s\" for seconds)"
                ]
            );
            jail.set_env("MLB_MQTT__KEEP_ALIVE", "30s");
            let err = Config::from_toml_str(MINIMAL, Path::new("t.toml"), Env::prefixed("MLB_"))
                .expect_err("bad url");
            let problems = err.problems();
            assert_eq!(problems.len(), 1, "{problems:#?}");
            assert!(
                problems[0]
                    .starts_with("environment variable MLB_MQTT__URL: mqtt.url: \"tcp://broker\""),
                "{problems:#?}"
            );
            Ok(())
        });
    }

    #[test]
    fn rule_names_that_are_no_directory_of_their_own_name_the_key() {
        for name in [".", "..", "lock"] {
            let text =
                format!("{MINIMAL}[[rules]]\nname = \"{name}\"\ntopic = \"a\"\nfunction = \"f\"\n");
            let got = only_problem(&text);
            assert!(got.starts_with("test.toml:11: rules[1].name: "), "{got}");
            assert!(got.contains("directory in buffer.dir"), "{got}");
        }
    }
}
