//! The command line: `check` and its preflight, `run` with a bad config, the `buffer`
//! commands, `--version`.

mod support;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mqtt_lambda_bridge::buffer::deadletter::{self, DeadLetter, DeadLetters};
use mqtt_lambda_bridge::buffer::{DiskQueue, DiskQueueConfig, Queue};
use mqtt_lambda_bridge::core::envelope::{Message, encode_event};
use support::binary;

/// The binary with nothing from this process's environment: no AWS region, no profile files
/// (HOME is `home`), no instance metadata, no MLB_ overrides. Add what a test needs.
fn bridge(home: &Path) -> Command {
    let mut cmd = Command::new(binary());
    cmd.env_clear()
        .env("HOME", home)
        .env("AWS_CONFIG_FILE", home.join("aws-config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", home.join("aws-credentials"))
        .env("AWS_EC2_METADATA_DISABLED", "true");
    cmd
}

fn check(path: &Path) -> Output {
    let home = path.parent().unwrap_or(Path::new("/"));
    bridge(home)
        .args(["check", "--config"])
        .arg(path)
        .output()
        .expect("run check")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A listener standing in for the broker: `run` must refuse before it ever connects.
fn broker_stand_in() -> (TcpListener, u16) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    (listener, port)
}

/// `run` with the config at `path` in the clean environment of [`bridge`], plus `env`.
fn run_refused(path: &Path, listener: &TcpListener, env: &[(&str, &str)]) -> Output {
    let home = path.parent().unwrap_or(Path::new("/"));
    let out = bridge(home)
        .args(["run", "--config"])
        .arg(path)
        .envs(env.iter().copied())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(listener.accept().is_err(), "no connection was attempted");
    out
}

fn write(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn the_example_config_is_valid() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.toml");
    // Its buffer.dir (/var/lib/…) need not be writable by whoever runs the tests.
    let dir = tempfile::tempdir().expect("tempdir");
    let out = bridge(dir.path())
        .args(["check", "--config"])
        .arg(&example)
        .env("MLB_BUFFER__DIR", dir.path().join("buffer"))
        .output()
        .expect("run check");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("valid (4 rules)"), "{stdout}");
    // Where the replying rule's replies may go, in words.
    assert!(
        stdout.contains(
            "rule door-events: replies go to the request's Response Topic when it matches \
             reply.allow [\"building/+/answers/#\"], else to reply.topic \"replies/{topic}\""
        ),
        "{stdout}"
    );
}

#[test]
fn check_names_each_reply_allow_filter_that_is_unusable_and_explains_where_replies_go() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = |allow: &str| {
        format!(
            "[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\nprotocol = \"5\"\n[aws]\nregion = \"eu-west-1\"\n\
             [buffer]\ndir = \"{}\"\n\n[[rules]]\nname = \"cmd\"\ntopic = \"dev/+/req\"\nfunction = \"f\"\n\
             invocation = \"request_response\"\n[rules.reply]\nallow = {allow}\n",
            dir.path().join("buffer").display()
        )
    };
    let path = write(
        dir.path(),
        &config(r#"["answers/#", "dev/#", "{topic}/x"]"#),
    );
    let out = check(&path);
    assert_eq!(out.status.code(), Some(78), "{}", stdout(&out));
    let errors = stderr(&out);
    let file = path.display().to_string();
    assert!(
        errors.contains(&format!(
            "{file}:15: rules[0].reply.allow[1]: \"dev/#\" overlaps rules[0].topic \"dev/+/req\""
        )),
        "{errors}"
    );
    assert!(
        errors.contains("rules[0].reply.allow[2]: \"{topic}/x\": reply.allow holds topic filters"),
        "{errors}"
    );
    assert!(!errors.contains("allow[0]"), "{errors}");

    let out = check(&write(dir.path(), &config("[]")));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(
            "rule cmd: replies to requests with a Response Topic are dead-lettered as \
             ReplyNotAllowed"
        ),
        "{}",
        stdout(&out)
    );
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
    let out = bridge(dir.path())
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

// ---- Messages for values of the wrong type, and rule names ----

#[test]
fn check_says_what_a_wrongly_typed_value_should_be() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(
        dir.path(),
        "[mqtt]\nurl = \"mqtt://127.0.0.1\"\n[aws]\nregion = \"eu-west-1\"\n\
         [[rules]]\nname = \"a\"\ntopic = \"a\"\nfunction = \"f\"\nqos = \"2\"\n",
    );
    let out = check(&path);
    assert_eq!(out.status.code(), Some(78));
    assert_eq!(
        stderr(&out).trim(),
        format!(
            "{}:9: rules[0].qos: expected a number 0, 1 or 2, got \"2\" (write it without quotes)",
            path.display()
        )
    );
}

#[test]
fn check_refuses_rule_names_that_cannot_be_their_own_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut text =
        String::from("[mqtt]\nurl = \"mqtt://127.0.0.1\"\n[aws]\nregion = \"eu-west-1\"\n");
    for (i, name) in [".", "..", "lock"].iter().enumerate() {
        text.push_str(&format!(
            "[[rules]]\nname = \"{name}\"\ntopic = \"t/{i}\"\nfunction = \"f\"\n"
        ));
    }
    let path = write(dir.path(), &text);
    let out = check(&path);
    assert_eq!(out.status.code(), Some(78));
    let err = stderr(&out);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    let file = path.display().to_string();
    assert!(
        lines[0].starts_with(&format!(
            "{file}:6: rules[0].name: \".\" cannot be a rule name"
        )),
        "{err}"
    );
    assert!(
        lines[1].starts_with(&format!(
            "{file}:10: rules[1].name: \"..\" cannot be a rule name"
        )),
        "{err}"
    );
    assert!(
        lines[2].starts_with(&format!("{file}:14: rules[2].name: \"lock\" is reserved")),
        "{err}"
    );
}

// ---- Preflight: what `run` would refuse before connecting ----

/// A valid config with the broker at `port` and `extra` appended to `[mqtt]`, its buffer in
/// `dir/buffer`, without a region unless `extra_top` sets one.
fn config_text(dir: &Path, port: u16, mqtt_extra: &str, rest: &str) -> String {
    format!(
        "[mqtt]\nurl = \"mqtt://127.0.0.1:{port}\"\n{mqtt_extra}\n[buffer]\ndir = \"{}\"\n{rest}\n\
         [[rules]]\nname = \"a\"\ntopic = \"a\"\nfunction = \"f\"\n",
        dir.join("buffer").display()
    )
}

#[test]
fn no_resolvable_region_is_a_config_error_for_check_and_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (listener, port) = broker_stand_in();
    let path = write(dir.path(), &config_text(dir.path(), port, "", ""));
    let out = check(&path);
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "{}: aws.region: no AWS region: it is not set here, nor in AWS_REGION or AWS_DEFAULT_REGION, nor by the default profile",
            path.display()
        )),
        "{err}"
    );
    assert!(err.contains("set aws.region"), "{err}");
    let out = run_refused(&path, &listener, &[]);
    assert!(
        stderr(&out).contains("aws.region: no AWS region"),
        "{}",
        stderr(&out)
    );
    assert!(
        !dir.path().join("buffer").exists(),
        "run refused before touching the buffer"
    );
}

#[test]
fn the_region_may_come_from_the_environment_or_a_profile() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), &config_text(dir.path(), 1883, "", ""));
    for var in ["AWS_REGION", "AWS_DEFAULT_REGION", "MLB_AWS__REGION"] {
        let out = bridge(dir.path())
            .args(["check", "--config"])
            .arg(&path)
            .env(var, "eu-west-1")
            .output()
            .expect("check");
        assert_eq!(out.status.code(), Some(0), "{var}: {}", stderr(&out));
    }
    std::fs::write(
        dir.path().join("aws-config"),
        "[default]\nregion = us-east-1\n[profile edge]\nregion = eu-west-1\n",
    )
    .expect("write aws config");
    let out = check(&path);
    assert_eq!(
        out.status.code(),
        Some(0),
        "default profile: {}",
        stderr(&out)
    );
    // A named profile without a region does not fall back to the default profile's.
    std::fs::write(
        dir.path().join("aws-config"),
        "[profile edge]\nregion = eu-west-1\n[profile bare]\n",
    )
    .expect("write aws config");
    let with_profile = |name: &str| {
        let path = write(
            dir.path(),
            &config_text(
                dir.path(),
                1883,
                "",
                &format!("[aws]\nprofile = \"{name}\""),
            ),
        );
        check(&path)
    };
    let out = with_profile("edge");
    assert_eq!(out.status.code(), Some(0), "profile edge: {}", stderr(&out));
    let out = with_profile("bare");
    assert_eq!(out.status.code(), Some(78));
    assert!(
        stderr(&out).contains("nor by the profile \"bare\""),
        "{}",
        stderr(&out)
    );
}

#[test]
fn instance_metadata_that_never_answers_does_not_hang_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), &config_text(dir.path(), 1883, "", ""));
    // Accepts connections and never answers, like a black-holed metadata address.
    let imds = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = imds.local_addr().expect("addr").port();
    let held = std::thread::spawn(move || {
        let mut open = Vec::new();
        for stream in imds.incoming().take(16) {
            open.push(stream);
        }
        open
    });
    let started = Instant::now();
    let out = bridge(dir.path())
        .args(["check", "--config"])
        .arg(&path)
        .env_remove("AWS_EC2_METADATA_DISABLED")
        .env(
            "AWS_EC2_METADATA_SERVICE_ENDPOINT",
            format!("http://127.0.0.1:{port}"),
        )
        .output()
        .expect("check");
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("EC2 instance metadata"),
        "{}",
        stderr(&out)
    );
    assert!(
        took < mqtt_lambda_bridge::daemon::preflight::REGION_LOOKUP_TIMEOUT
            + Duration::from_secs(3),
        "check took {took:?}"
    );
    drop(held);
}

#[test]
fn an_unreadable_password_file_is_a_config_error_for_check_and_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (listener, port) = broker_stand_in();
    let missing = dir.path().join("no-such-password");
    let path = write(
        dir.path(),
        &config_text(
            dir.path(),
            port,
            &format!(
                "username = \"u\"\npassword_file = \"{}\"",
                missing.display()
            ),
            "[aws]\nregion = \"eu-west-1\"",
        ),
    );
    let out = check(&path);
    assert_eq!(out.status.code(), Some(78));
    assert_eq!(
        stderr(&out).trim(),
        format!(
            "{}:4: mqtt.password_file: cannot read {}: No such file or directory",
            path.display(),
            missing.display()
        )
    );
    let out = run_refused(&path, &listener, &[]);
    assert!(
        stderr(&out).contains("mqtt.password_file: cannot read"),
        "{}",
        stderr(&out)
    );

    // A directory where the file should be is named as such.
    let path = write(
        dir.path(),
        &config_text(
            dir.path(),
            port,
            &format!(
                "username = \"u\"\npassword_file = \"{}\"",
                dir.path().display()
            ),
            "[aws]\nregion = \"eu-west-1\"",
        ),
    );
    let out = check(&path);
    assert_eq!(out.status.code(), Some(78));
    assert!(
        stderr(&out).contains("it is a directory, not a file"),
        "{}",
        stderr(&out)
    );
}

/// A self-signed certificate with its key, and a second key that does not go with it.
fn tls_files(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let other = dir.join("other-key.pem");
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=mlb-test", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (Debian package openssl) makes the test certificate");
    assert!(status.status.success(), "{}", stderr(&status));
    let status = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-out",
        ])
        .arg(&other)
        .output()
        .expect("openssl");
    assert!(status.status.success(), "{}", stderr(&status));
    (cert, key, other)
}

#[test]
fn tls_files_that_cannot_be_read_or_parsed_are_config_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key, other) = tls_files(dir.path());
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").expect("write");
    let (listener, port) = broker_stand_in();
    let with_tls = |ca: &Path, cert: &Path, key: &Path| {
        let text = format!(
            "[mqtt]\nurl = \"mqtts://127.0.0.1:{port}\"\n[mqtt.tls]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n\
             [aws]\nregion = \"eu-west-1\"\n[buffer]\ndir = \"{}\"\n\
             [[rules]]\nname = \"a\"\ntopic = \"a\"\nfunction = \"f\"\n",
            ca.display(),
            cert.display(),
            key.display(),
            dir.path().join("buffer").display()
        );
        write(dir.path(), &text)
    };
    let path = with_tls(&cert, &cert, &key);
    let out = check(&path);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let file = path.display().to_string();
    let missing = dir.path().join("absent.pem");
    let cases: Vec<(&Path, &Path, &Path, Vec<String>)> = vec![
        (
            &garbage,
            &cert,
            &key,
            vec![format!(
                "{file}:4: mqtt.tls.ca_file: {}: no usable CA certificate in it",
                garbage.display()
            )],
        ),
        (
            &cert,
            &garbage,
            &key,
            vec![format!(
                "{file}:5: mqtt.tls.cert_file: {}: no certificate in it; expected PEM with -----BEGIN CERTIFICATE-----",
                garbage.display()
            )],
        ),
        (
            &cert,
            &cert,
            &garbage,
            vec![format!(
                "{file}:6: mqtt.tls.key_file: {}: no private key in it",
                garbage.display()
            )],
        ),
        (
            &garbage,
            &garbage,
            &garbage,
            vec![
                format!("{file}:4: mqtt.tls.ca_file: "),
                format!("{file}:5: mqtt.tls.cert_file: "),
                format!("{file}:6: mqtt.tls.key_file: "),
            ],
        ),
        (
            &cert,
            &cert,
            &other,
            vec![format!(
                "{file}:5: mqtt.tls.cert_file: the certificate {} and the key {} cannot be used together",
                cert.display(),
                other.display()
            )],
        ),
        (
            &missing,
            &cert,
            &key,
            vec![format!(
                "{file}:4: mqtt.tls.ca_file: cannot read {}: No such file or directory",
                missing.display()
            )],
        ),
    ];
    for (ca, cert, key, expected) in cases {
        let out = check(&with_tls(ca, cert, key));
        assert_eq!(
            out.status.code(),
            Some(78),
            "{expected:?}: {}",
            stderr(&out)
        );
        let err = stderr(&out);
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), expected.len(), "{err}");
        for (line, want) in lines.iter().zip(&expected) {
            assert!(
                line.starts_with(want.as_str()),
                "expected {want}\ngot      {line}"
            );
        }
    }
    let path = with_tls(&cert, &cert, &other);
    let out = run_refused(&path, &listener, &[]);
    assert!(
        stderr(&out).contains("cannot be used together"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn buffer_dir_problems_are_named_and_check_creates_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (listener, port) = broker_stand_in();
    let with_buffer = |buffer: &Path| {
        let text = format!(
            "[mqtt]\nurl = \"mqtt://127.0.0.1:{port}\"\n[aws]\nregion = \"eu-west-1\"\n\
             [buffer]\ndir = \"{}\"\n[[rules]]\nname = \"a\"\ntopic = \"a\"\nfunction = \"f\"\n",
            buffer.display()
        );
        write(dir.path(), &text)
    };
    // Absent under a writable parent: valid, and still absent afterwards.
    let fresh = dir.path().join("new/buffer");
    let out = check(&with_buffer(&fresh));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!dir.path().join("new").exists(), "check created nothing");

    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").expect("write");
    let path = with_buffer(&file.join("buffer"));
    let out = check(&path);
    assert_eq!(out.status.code(), Some(78));
    assert_eq!(
        stderr(&out).trim(),
        format!(
            "{}:6: buffer.dir: {} does not exist and cannot be created: {} is not a directory",
            path.display(),
            file.join("buffer").display(),
            file.display()
        )
    );
    run_refused(&path, &listener, &[]);

    let out = check(&with_buffer(&file));
    assert_eq!(out.status.code(), Some(78));
    assert!(
        stderr(&out).contains(&format!(
            "buffer.dir: {} exists but is not a directory",
            file.display()
        )),
        "{}",
        stderr(&out)
    );

    // A file where the rule's directory or the lock file belongs.
    let buffer = dir.path().join("buffer");
    std::fs::create_dir_all(buffer.join("lock")).expect("mkdir");
    std::fs::write(buffer.join("a"), "x").expect("write");
    let out = check(&with_buffer(&buffer));
    assert_eq!(out.status.code(), Some(78));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "buffer.dir: {} is in the way: it should be a file",
            buffer.join("lock").display()
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "buffer.dir: {} is in the way: it should be a directory",
            buffer.join("a").display()
        )),
        "{err}"
    );

    // As another user, a directory without write permission is refused. Permissions say
    // nothing to root; a read-only file system does (when this root may mount one).
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        use std::os::unix::fs::PermissionsExt;
        let locked = dir.path().join("read-only");
        std::fs::create_dir(&locked).expect("mkdir");
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).expect("chmod");
        let out = check(&with_buffer(&locked.join("buffer")));
        assert_eq!(out.status.code(), Some(78));
        assert!(
            stderr(&out).contains("is not writable: Permission denied for this user (uid "),
            "{}",
            stderr(&out)
        );
    } else if let Some(read_only) = ReadOnlyMount::new(&dir.path().join("read-only")) {
        let out = check(&with_buffer(&read_only.0.join("buffer")));
        assert_eq!(out.status.code(), Some(78));
        assert!(
            stderr(&out).contains(&format!(
                "buffer.dir: {} does not exist and cannot be created: {} is not writable: Read-only file system",
                read_only.0.join("buffer").display(),
                read_only.0.display()
            )),
            "{}",
            stderr(&out)
        );
        let out = check(&with_buffer(&read_only.0));
        assert_eq!(out.status.code(), Some(78));
        assert!(
            stderr(&out).contains("is not writable: Read-only file system"),
            "{}",
            stderr(&out)
        );
    }
}

/// A small read-only tmpfs, unmounted on drop; `None` where this process may not mount.
struct ReadOnlyMount(PathBuf);

impl ReadOnlyMount {
    fn new(at: &Path) -> Option<ReadOnlyMount> {
        std::fs::create_dir_all(at).ok()?;
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "ro,size=64k", "tmpfs"])
            .arg(at)
            .output()
            .ok()?
            .status
            .success();
        mounted.then(|| ReadOnlyMount(at.to_owned()))
    }
}

impl Drop for ReadOnlyMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).output();
    }
}

// ---- The buffer commands ----

fn buffer_config(dir: &Path, buffer: &Path, extra: &str) -> PathBuf {
    write(
        dir,
        &format!(
            "[mqtt]\nurl = \"mqtt://127.0.0.1\"\n[aws]\nregion = \"eu-west-1\"\n\
             [buffer]\ndir = \"{}\"\n{extra}\n[[rules]]\nname = \"t\"\ntopic = \"t/#\"\nfunction = \"f\"\n",
            buffer.display()
        ),
    )
}

fn buffer_cmd(dir: &Path, config: &Path, args: &[&str]) -> Output {
    bridge(dir)
        .arg("buffer")
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("buffer command")
}

#[test]
fn buffer_commands_on_a_missing_buffer_dir_say_so_and_create_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let buffer = dir.path().join("never-started");
    let config = buffer_config(dir.path(), &buffer, "");
    for args in [
        &["stats"][..],
        &["dead-letters", "list"][..],
        &["dead-letters", "replay"][..],
    ] {
        let out = buffer_cmd(dir.path(), &config, args);
        assert_eq!(out.status.code(), Some(66), "{args:?}: {}", stderr(&out));
        assert_eq!(
            stderr(&out).trim(),
            format!(
                "mqtt-lambda-bridge: buffer.dir {}: no such directory, so nothing is buffered there (is this the daemon's configuration? the daemon creates the directory when it first starts)",
                buffer.display()
            )
        );
        assert!(!buffer.exists(), "{args:?} created buffer.dir");
    }
}

#[test]
fn buffer_stats_does_not_create_a_rule_directory_and_refuses_while_the_daemon_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let buffer = dir.path().join("buffer");
    std::fs::create_dir(&buffer).expect("mkdir");
    let config = buffer_config(dir.path(), &buffer, "");
    let out = buffer_cmd(dir.path(), &config, &["stats"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let table = stdout(&out);
    let row: Vec<&str> = table
        .lines()
        .nth(1)
        .expect("a row")
        .split_whitespace()
        .collect();
    assert_eq!(row, ["t", "0", "0", "-", "0"], "{table}");
    assert!(
        !buffer.join("t").exists(),
        "stats created the rule's directory"
    );

    let lock = std::fs::File::open(buffer.join("lock")).expect("lock file");
    lock.try_lock().expect("take the lock as a daemon would");
    let out = buffer_cmd(dir.path(), &config, &["stats"]);
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("in use by another mqtt-lambda-bridge process"),
        "{}",
        stderr(&out)
    );
}

/// A message received `ago` before now. Built from its own UUIDv7 so that a back-dated id is
/// not moved forward by the shared, monotonic id context `Message::received` uses.
fn message_received(topic: &str, payload: &[u8], ago: Duration) -> Message {
    let at = SystemTime::now() - ago;
    let since = at.duration_since(UNIX_EPOCH).expect("after 1970");
    let ts = uuid::Timestamp::from_unix(uuid::NoContext, since.as_secs(), since.subsec_nanos());
    Message {
        id: uuid::Uuid::new_v7(ts),
        topic: topic.to_owned(),
        payload: payload.to_vec(),
        qos: 1,
        retain: false,
        properties: None,
    }
}

fn dead_letter(event: serde_json::Value) -> DeadLetter {
    DeadLetter {
        rule: "t".into(),
        reason: "function not found".into(),
        code: "ResourceNotFoundException".into(),
        attempts: 1,
        first_attempt_at: deadletter::timestamp(SystemTime::now()),
        last_attempt_at: deadletter::timestamp(SystemTime::now()),
        event,
    }
}

fn event_of(messages: &[Message]) -> serde_json::Value {
    serde_json::from_slice(&encode_event("t", messages)).expect("event json")
}

/// The messages in the rule's queue, read as the daemon would, with the given max_age.
async fn queued(rule_dir: &Path, max_age: Duration) -> Vec<Message> {
    let queue = DiskQueue::open(DiskQueueConfig {
        dir: rule_dir.to_owned(),
        segment_size: 1024 * 1024,
        max_size: 256 * 1024 * 1024,
        when_full: mqtt_lambda_bridge::core::config::WhenFull::DropOldest,
        max_age: Some(max_age),
        max_ack_delay: std::time::Duration::ZERO,
    })
    .expect("open queue");
    let messages = queue
        .read_ready(1000)
        .await
        .expect("read")
        .into_iter()
        .map(|e| e.message)
        .collect();
    queue.close().await;
    messages
}

#[tokio::test]
async fn replay_puts_back_what_it_can_and_keeps_the_rest_with_reasons() {
    let dir = tempfile::tempdir().expect("tempdir");
    let buffer = dir.path().join("buffer");
    let rule_dir = buffer.join("t");
    std::fs::create_dir_all(&rule_dir).expect("mkdir");
    let store = DeadLetters::new(&rule_dir);

    let fresh = message_received("t/1", b"{\"c\":21.5}", Duration::from_secs(60));
    let old = message_received("t/2", b"old", Duration::from_secs(10 * 24 * 3600));
    let also_fresh = message_received("t/3", b"text", Duration::from_secs(30));
    store
        .append(&dead_letter(event_of(&[fresh.clone(), old.clone()])))
        .expect("append");
    let window = dead_letter(serde_json::json!({
        "rule": "t",
        "window": {"start": "2026-11-27T10:15:00.000Z", "end": "2026-11-27T10:16:00.000Z"},
        "groups": [{"group": "dev1", "messages": 3, "fields": {}}]
    }));
    store.append(&window).expect("append");
    let garbage = "this line is not JSON";
    let mut text = std::fs::read_to_string(store.path()).expect("read");
    text.push_str(garbage);
    text.push('\n');
    std::fs::write(store.path(), &text).expect("write");
    store
        .append(&dead_letter(event_of(std::slice::from_ref(&also_fresh))))
        .expect("append");

    let config = buffer_config(dir.path(), &buffer, "");
    let out = buffer_cmd(dir.path(), &config, &["dead-letters", "replay"]);
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "t: 2 message(s) back in the queue");
    let err = stderr(&out);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    let path = store.path().display().to_string();
    assert!(
        lines[0].starts_with(&format!(
            "t: kept 1 line(s) of {path} that are not dead-letter entries"
        )),
        "{err}"
    );
    assert!(
        lines[1].starts_with(
            "t: kept 1 statistics-window event(s): a summary cannot go back into the queue"
        ),
        "{err}"
    );
    assert!(
        lines[2].starts_with(
            "t: kept 1 message(s) older than buffer.max_age (7days) (the oldest is 10days"
        ),
        "{err}"
    );
    assert!(lines[2].contains("raise buffer.max_age"), "{err}");

    // The fresh messages are in the queue with their own ids; the daemon will not expire them.
    assert_eq!(
        queued(&rule_dir, Duration::from_secs(7 * 24 * 3600)).await,
        vec![fresh.clone(), also_fresh.clone()]
    );

    // The store keeps, in order: the old message's letter, the window verbatim, the garbage.
    let kept = std::fs::read_to_string(store.path()).expect("store");
    let kept: Vec<&str> = kept.lines().collect();
    assert_eq!(kept.len(), 3, "{kept:#?}");
    let first: DeadLetter = serde_json::from_str(kept[0]).expect("entry");
    assert_eq!(deadletter::messages_of(&first), vec![old.clone()]);
    assert_eq!(kept[1], serde_json::to_string(&window).expect("json"));
    assert_eq!(kept[2], garbage);
    assert!(!rule_dir.join(deadletter::TEMP_FILE_NAME).exists());

    // With max_age raised the old message goes back too, with its own id; the rest stays.
    let config = buffer_config(dir.path(), &buffer, "max_age = \"30d\"");
    let out = buffer_cmd(dir.path(), &config, &["dead-letters", "replay"]);
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "t: 1 message(s) back in the queue");
    assert_eq!(stderr(&out).lines().count(), 2, "{}", stderr(&out));
    assert_eq!(
        queued(&rule_dir, Duration::from_secs(30 * 24 * 3600)).await,
        vec![fresh, also_fresh, old]
    );
    let kept = std::fs::read_to_string(store.path()).expect("store");
    assert_eq!(kept.lines().count(), 2, "{kept}");
    let out = buffer_cmd(dir.path(), &config, &["dead-letters", "list"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("{path}:2: not a dead-letter entry")),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("1 dead letter(s)"),
        "{}",
        stderr(&out)
    );
    assert!(
        stdout(&out).contains("  t  ResourceNotFoundException  a statistics window, 1 attempt(s)"),
        "{}",
        stdout(&out)
    );
}

#[tokio::test]
async fn replay_keeps_what_the_full_queue_has_no_room_for() {
    let dir = tempfile::tempdir().expect("tempdir");
    let buffer = dir.path().join("buffer");
    let rule_dir = buffer.join("t");
    std::fs::create_dir_all(&rule_dir).expect("mkdir");
    let store = DeadLetters::new(&rule_dir);
    // 64 KiB is the smallest share; 100 messages of 1 KiB do not fit in it.
    let messages: Vec<Message> = (0..100)
        .map(|i| message_received(&format!("t/{i}"), &[b'x'; 1024], Duration::from_secs(1)))
        .collect();
    store
        .append(&dead_letter(event_of(&messages)))
        .expect("append");
    let config = buffer_config(
        dir.path(),
        &buffer,
        "max_size = \"64KiB\"\nwhen_full = \"drop_newest\"",
    );
    let out = buffer_cmd(dir.path(), &config, &["dead-letters", "replay"]);
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    let restored: usize = stdout(&out)
        .trim()
        .strip_prefix("t: ")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("a count");
    assert!(restored > 0 && restored < 100, "{}", stdout(&out));
    assert!(
        stderr(&out).contains(&format!(
            "t: kept {} message(s): the rule's share of buffer.max_size is full",
            100 - restored
        )),
        "{}",
        stderr(&out)
    );
    // Nothing was dropped: the queue holds the first ones, the store the rest, in order.
    let in_queue = queued(&rule_dir, Duration::from_secs(3600)).await;
    assert_eq!(in_queue, messages[..restored]);
    let left = store.list().expect("list");
    assert_eq!(left.len(), 1);
    assert_eq!(deadletter::messages_of(&left[0]), messages[restored..]);
}

#[tokio::test]
async fn a_replay_that_puts_everything_back_exits_0_and_empties_the_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let buffer = dir.path().join("buffer");
    let rule_dir = buffer.join("t");
    std::fs::create_dir_all(&rule_dir).expect("mkdir");
    let store = DeadLetters::new(&rule_dir);
    let m = message_received("t/1", &[0xff, 0x00], Duration::from_secs(5));
    store
        .append(&dead_letter(event_of(std::slice::from_ref(&m))))
        .expect("append");
    let config = buffer_config(dir.path(), &buffer, "");
    let out = buffer_cmd(
        dir.path(),
        &config,
        &["dead-letters", "replay", "--rule", "t"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "t: 1 message(s) back in the queue");
    assert_eq!(stderr(&out), "");
    assert!(!store.path().exists());
    assert_eq!(queued(&rule_dir, Duration::from_secs(3600)).await, vec![m]);
    let out = buffer_cmd(
        dir.path(),
        &config,
        &["dead-letters", "replay", "--rule", "nope"],
    );
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
}

#[test]
fn every_unusable_mqtt_file_is_reported_not_only_the_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").expect("write");
    let missing = dir.path().join("no-such-password");
    let path = write(
        dir.path(),
        &format!(
            "[mqtt]\nurl = \"mqtts://127.0.0.1\"\nusername = \"u\"\npassword_file = \"{}\"\n\
             [mqtt.tls]\nca_file = \"{}\"\n[aws]\nregion = \"eu-west-1\"\n[buffer]\ndir = \"{}\"\n\
             [[rules]]\nname = \"a\"\ntopic = \"a\"\nfunction = \"f\"\n",
            missing.display(),
            garbage.display(),
            dir.path().join("buffer").display()
        ),
    );
    let out = check(&path);
    assert_eq!(out.status.code(), Some(78));
    let file = path.display().to_string();
    assert_eq!(
        stderr(&out).lines().collect::<Vec<_>>(),
        [
            format!(
                "{file}:4: mqtt.password_file: cannot read {}: No such file or directory",
                missing.display()
            ),
            format!(
                "{file}:6: mqtt.tls.ca_file: {}: no usable CA certificate in it",
                garbage.display()
            ),
        ]
    );
}

const SQL_RULES: &str = r#"
[mqtt]
url = "mqtt://127.0.0.1:1883"
client_id = "gw"

[[rules]]
name = "hot"
function = "alarm"
sql = "SELECT temperature AS t, topic(2) AS device FROM 'sensors/+/temperature' WHERE temperature > 50"
[rules.batch]
max_messages = 10

[[rules]]
name = "other"
function = "f"
topic = "elsewhere/#"
"#;

fn try_message(config: &Path, topic: &str, payload: &str) -> Output {
    bridge(config.parent().unwrap_or(Path::new("/")))
        .args(["try", "--config"])
        .arg(config)
        .args(["--topic", topic, "--payload", payload])
        .output()
        .expect("run try")
}

#[test]
fn check_refuses_sql_it_cannot_run_naming_the_rule_the_key_and_the_column() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(
        dir.path(),
        r#"
[mqtt]
url = "mqtt://127.0.0.1:1883"
client_id = "gw"

[[rules]]
name = "shadow"
function = "f"
sql = "SELECT get_thing_shadow('t', 'role') FROM 'a/#'"

[[rules]]
name = "both"
function = "f"
topic = "b/#"
sql = "SELECT * FROM 'b/#'"

[[rules]]
name = "typo"
function = "f"
sql = "SELECT * FROM 'c/#' WHERE temprature >"

[[rules]]
name = "unknown"
function = "f"
sql = "SELECT avg(t) FROM 'd/#'"

[[rules]]
name = "badfrom"
function = "f"
sql = "SELECT * FROM 'e/#/x'"

[[rules]]
name = "nested"
function = "f"
sql = "SELECT (SELECT 1) AS one FROM 'g/#'"
"#,
    );
    let out = check(&path);
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    let err = stderr(&out);
    let line = |key: &str| -> String {
        err.lines()
            .find(|l| l.contains(key))
            .unwrap_or_else(|| panic!("no line for {key}: {err}"))
            .to_owned()
    };
    let config = path.display().to_string();
    assert_eq!(
        line("rules[0].sql"),
        format!(
            "{config}:9: rules[0].sql: column 8: the AWS IoT function get_thing_shadow() is not supported on the gateway"
        )
    );
    assert!(line("rules[1].sql").contains("give either topic or sql, not both"));
    assert!(
        line("rules[2].sql").contains(
            "column 39: cannot parse: expected a value, a field or a function, found the end"
        ),
        "{err}"
    );
    assert!(line("rules[3].sql").contains("column 8: unknown function avg()"));
    assert!(line("rules[4].sql").contains("column 15: FROM \"e/#/x\" is not a valid topic filter"));
    assert!(line("rules[5].sql").contains("a nested SELECT is not supported on the gateway"));
    assert_eq!(err.lines().count(), 6, "{err}");
}

#[test]
fn try_prints_the_event_a_rule_would_send_and_exits_0() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), SQL_RULES);
    let out = try_message(&path, "sensors/dev7/temperature", r#"{"temperature": 61}"#);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let (head, json) = text.split_once('\n').expect("a head line and the event");
    assert!(
        head.starts_with("rule hot: invokes alarm with this event (")
            && head.ends_with("bytes; Lambda accepts at most 1048576 for this invocation type):"),
        "{head}"
    );
    let event: serde_json::Value = serde_json::from_str(json).expect("the event is JSON");
    let size = head
        .split('(')
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse::<usize>().ok())
        .expect("size");
    assert_eq!(size, serde_json::to_vec(&event).expect("json").len());
    assert_eq!(event["rule"], "hot");
    let message = &event["messages"][0];
    assert_eq!(
        message["payload"],
        serde_json::json!({"device": "dev7", "t": 61})
    );
    assert_eq!(message["topic"], "sensors/dev7/temperature");
    assert!(
        !text.contains("rule other"),
        "unmatched rules are not listed: {text}"
    );
}

#[test]
fn try_names_the_condition_that_filtered_and_exits_1_when_no_rule_would_invoke() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), SQL_RULES);
    let out = try_message(&path, "sensors/dev7/temperature", r#"{"temperature": 20}"#);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "rule hot: filtered out: WHERE temperature > 50 is not true\n"
    );
    let out = try_message(&path, "nowhere", "x");
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("no rule matches the topic \"nowhere\""));
}

#[test]
fn try_exits_78_on_a_bad_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(
        dir.path(),
        &SQL_RULES.replace("WHERE temperature > 50", "WHERE temperature >"),
    );
    let out = try_message(&path, "sensors/dev7/temperature", "{}");
    assert_eq!(out.status.code(), Some(78));
    assert!(
        stderr(&out).contains("rules[0].sql: column"),
        "{}",
        stderr(&out)
    );
    assert!(stdout(&out).is_empty());
}
