//! The command line: `check`, `run` with a bad config, `--version`.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use support::binary;

fn check(path: &Path) -> Output {
    Command::new(binary())
        .args(["check", "--config"])
        .arg(path)
        .env_remove("MLB_AWS__REGION")
        .output()
        .expect("run check")
}

fn write(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn the_example_config_is_valid() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.toml");
    let out = check(&example);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid (3 rules)"));
}

#[test]
fn the_demo_config_template_is_valid_once_filled() {
    let template = Path::new(env!("CARGO_MANIFEST_DIR")).join("demo/config.toml");
    let Ok(text) = std::fs::read_to_string(&template) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let text = text
        .replace("@MQTT_PORT@", "1883")
        .replace("@LAMBDA_PORT@", "4566")
        .replace("@BUFFER_DIR@", &dir.path().display().to_string());
    let out = check(&write(dir.path(), &text));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_reports_every_problem_with_file_key_and_line_and_exits_78() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(
        dir.path(),
        r#"[mqtt]
url = "tcp://broker:1883"

[[rules]]
name = "t"
topic = "sensors/#/temperature"
function = "f"

[[rules]]
name = "t"
topic = "a/b+"
function = "f"
[rules.batch]
max_wait = "soon"
"#,
    );
    let out = check(&path);
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let file = path.display().to_string();
    // A type error stops serde before validation: only that one is reported first.
    assert!(
        stderr.contains(&format!(
            "{file}:14: rules[1].batch.max_wait: expected a duration like \"1s\", got \"soon\""
        )),
        "{stderr}"
    );

    let path = write(
        dir.path(),
        r#"[mqtt]
url = "tcp://broker:1883"

[[rules]]
name = "t"
topic = "sensors/#/temperature"
function = "f"

[[rules]]
name = "t"
topic = "a/b+"
function = "f"
"#,
    );
    let out = check(&path);
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 4, "{stderr}");
    assert!(
        lines[0].starts_with(&format!("{file}:2: mqtt.url: ")),
        "{stderr}"
    );
    assert!(
        lines[1].starts_with(&format!(
            "{file}:6: rules[0].topic: '#' must be the last level"
        )),
        "{stderr}"
    );
    assert!(
        lines[2].starts_with(&format!(
            "{file}:10: rules[1].name: \"t\" is used by an earlier rule"
        )),
        "{stderr}"
    );
    assert!(
        lines[3].starts_with(&format!(
            "{file}:11: rules[1].topic: '+' must be a whole level"
        )),
        "{stderr}"
    );
}

#[test]
fn check_never_panics_on_garbage() {
    let dir = tempfile::tempdir().expect("tempdir");
    for text in [
        "",
        "\u{0}\u{1}",
        "[[rules]]\n[[rules]]\n",
        "mqtt = 5",
        "[mqtt]\nurl = [1, 2]\n",
        "rules = \"x\"",
    ] {
        let out = check(&write(dir.path(), text));
        assert_eq!(
            out.status.code(),
            Some(78),
            "{text:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(
            stderr.starts_with(&dir.path().join("config.toml").display().to_string()),
            "{stderr}"
        );
    }
    let out = check(&dir.path().join("absent.toml"));
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the configuration file"));
}

#[test]
fn environment_overrides_are_validated_and_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(
        dir.path(),
        "[mqtt]\nurl = \"mqtt://127.0.0.1\"\n[[rules]]\nname = \"a\"\ntopic = \"a\"\nfunction = \"f\"\n",
    );
    let out = Command::new(binary())
        .args(["check", "--config"])
        .arg(&path)
        .env("MLB_BUFFER__WHEN_FULL", "explode")
        .output()
        .expect("run check");
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "environment variable MLB_BUFFER__WHEN_FULL: buffer.when_full: unknown value \"explode\"; expected one of: drop_oldest, drop_newest, block"
        ),
        "{stderr}"
    );
}

#[test]
fn run_with_a_bad_config_exits_78_before_connecting() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Something listens on this port: a connection attempt would be seen.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let path = write(
        dir.path(),
        &format!(
            "[mqtt]\nurl = \"mqtt://127.0.0.1:{port}\"\n[[rules]]\nname = \"a\"\ntopic = \"a/#/b\"\nfunction = \"f\"\n"
        ),
    );
    let out = Command::new(binary())
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("rules[0].topic"));
    assert!(listener.accept().is_err(), "no connection was attempted");
}

#[test]
fn version_and_help_are_printed() {
    let out = Command::new(binary())
        .arg("--version")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("mqtt-lambda-bridge {}", env!("CARGO_PKG_VERSION"))
    );
    let out = Command::new(binary()).arg("--help").output().expect("run");
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("run") && help.contains("check"), "{help}");
}
