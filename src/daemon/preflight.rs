//! Preflight: everything `run` would refuse before it connects anywhere, checked after the
//! configuration is valid and without changing anything on disk. `check` and `run` both call
//! [`check`]; a problem here is a configuration problem (exit 78), so systemd's
//! `RestartPreventExitStatus=78` stops the restart loop instead of retrying a start that
//! cannot succeed.
//!
//! What is checked, each problem one [`Issue`] naming the key and the file:
//!
//! ```text
//! mqtt.password_file       readable
//! mqtt.tls.ca_file         readable, holds PEM certificates rustls accepts   (mqtt::options builds
//! mqtt.tls.cert_file       readable, a PEM chain that goes with key_file      the TLS config
//! mqtt.tls.key_file        readable, a PEM private key                        exactly as run does)
//! aws.iot.ca_file          readable, holds PEM certificates rustls accepts   (invoker::iot builds
//! aws.iot.cert_file        readable, a PEM chain that goes with key_file      the TLS config
//! aws.iot.key_file         readable, a PEM private key                        exactly as run does)
//! http.token_file          readable, its first line (the token) not empty
//! http.cert_file           readable, a PEM chain that goes with key_file     (http_ingest builds
//! http.key_file            readable, a PEM private key                        the TLS config)
//! buffer.dir               a directory this user can write, or creatable: its nearest existing
//!                          parent is a directory this user can write; inside it, `lock` and each
//!                          rule's directory and files are readable and writable
//! aws.region               set, or found by aws-config's region chain: AWS_REGION /
//!                          AWS_DEFAULT_REGION, the profile, then EC2 instance metadata (IMDS),
//!                          the last bounded by REGION_LOOKUP_TIMEOUT
//! ```
//!
//! Invariant: nothing here creates, truncates or locks a file: `buffer.dir` is examined with
//! `stat` and `access(2)` only, so `check` run as root never leaves a root-owned directory
//! where the daemon's own user must write.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_config::imds::region::ImdsRegionProvider;
use aws_config::meta::region::ProvideRegion;
use aws_config::profile::region::ProfileFileRegionProvider;
use aws_config::provider_config::ProviderConfig;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tracing::instrument::WithSubscriber;

use crate::core::config::{AwsConfig, Config, HttpConfig, Issue, MqttConfig, TlsConfig};
use crate::delivery::invoker::iot;
use crate::ingest::http::HttpError;
use crate::mqtt::{self, MqttError};

/// How long the region lookup may wait for EC2 instance metadata. On EC2 it answers in
/// milliseconds; elsewhere its address is often black-holed, and without a bound `check`
/// would hang for the SDK's own retries.
pub const REGION_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// The file the daemon locks in `buffer.dir` (lib.rs, `BufferLock`).
const LOCK_FILE: &str = "lock";

/// Every problem `run` would meet before connecting, in key order: `[mqtt]` files, the buffer
/// directory, the AWS region.
pub async fn check(config: &Config) -> Vec<Issue> {
    let mut issues = mqtt_files(&config.mqtt);
    issues.extend(iot_files(&config.aws));
    issues.extend(http_files(&config.http));
    issues.extend(buffer_dir(config));
    issues.extend(region(&config.aws).await);
    issues
}

/// The files `[mqtt]` names: each must be readable, and the TLS ones must build the rustls
/// configuration `run` builds (by calling the same [`mqtt::options`]).
pub fn mqtt_files(config: &MqttConfig) -> Vec<Issue> {
    let tls = config.tls.clone().unwrap_or_default();
    let named = [
        ("mqtt.password_file", &config.password_file),
        ("mqtt.tls.ca_file", &tls.ca_file),
        ("mqtt.tls.cert_file", &tls.cert_file),
        ("mqtt.tls.key_file", &tls.key_file),
    ];
    let mut issues = Vec::new();
    let mut readable = |key: &'static str, path: &Option<PathBuf>| match path {
        None => true,
        Some(path) => match readable_file(path) {
            Ok(()) => true,
            Err(why) => {
                issues.push(Issue::new(
                    key,
                    format!("cannot read {}: {why}", path.display()),
                ));
                false
            }
        },
    };
    let [password_ok, ca_ok, cert_ok, key_ok] = named.map(|(key, path)| readable(key, path));
    if config.tls.is_none() {
        if password_ok {
            issues.extend(options_issue(config));
        }
        return issues;
    }
    // mqtt::options stops at the first bad file: build the CA part and the client-certificate
    // part apart, without the password file, so that each problem is reported.
    if ca_ok {
        issues.extend(options_issue(&tls_only(
            config,
            TlsConfig {
                cert_file: None,
                key_file: None,
                ..tls.clone()
            },
        )));
    }
    if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file)
        && cert_ok
        && key_ok
    {
        issues.extend(mqtt_client_certificate(config, &tls, cert, key));
    }
    issues
}

/// `config` with these TLS settings and no credentials, so that [`mqtt::options`] reads only
/// the TLS files.
fn tls_only(config: &MqttConfig, tls: TlsConfig) -> MqttConfig {
    MqttConfig {
        tls: Some(tls),
        username: None,
        password: None,
        password_file: None,
        ..config.clone()
    }
}

/// `mqtt.tls.cert_file` and `key_file`, both readable: each must parse, and together they must
/// be a pair rustls accepts.
fn mqtt_client_certificate(
    config: &MqttConfig,
    tls: &TlsConfig,
    cert: &Path,
    key: &Path,
) -> Vec<Issue> {
    let client = [
        ("mqtt.tls.cert_file", pem_certificates(cert)),
        ("mqtt.tls.key_file", pem_private_key(key)),
    ];
    let both_parse = client.iter().all(|(_, r)| r.is_ok());
    let mut issues: Vec<Issue> = client
        .into_iter()
        .filter_map(|(key, r)| r.err().map(|why| Issue::new(key, why)))
        .collect();
    if both_parse {
        // Whether they go together, as rustls sees it.
        let client_only = tls_only(
            config,
            TlsConfig {
                ca_file: None,
                ..tls.clone()
            },
        );
        issues.extend(options_issue(&client_only).map(|issue| {
            Issue::new(
                issue.key,
                format!(
                    "the certificate {} and the key {} cannot be used together: {}",
                    cert.display(),
                    key.display(),
                    issue.message
                ),
            )
        }));
    }
    issues
}

/// Reads a file and says what is wrong with it.
type Parse = fn(&Path) -> Result<(), String>;

/// Each named file that is set: readable, then parsed; one issue per file that fails.
fn named_files<'a>(
    named: impl IntoIterator<Item = (&'static str, Option<&'a PathBuf>, Parse)>,
) -> Vec<Issue> {
    let mut issues = Vec::new();
    for (key, path, parse) in named {
        let Some(path) = path else { continue };
        let result = readable_file(path)
            .map_err(|why| format!("cannot read {}: {why}", path.display()))
            .and_then(|()| parse(path));
        if let Err(message) = result {
            issues.push(Issue::new(key, message));
        }
    }
    issues
}

/// The files `[aws.iot]` names: each readable and of the right kind, and together the TLS
/// configuration the IoT credentials provider builds (by calling the same
/// [`iot::tls_config`]).
pub fn iot_files(config: &AwsConfig) -> Vec<Issue> {
    let Some(iot_config) = &config.iot else {
        return Vec::new();
    };
    let named: [(&'static str, Option<&PathBuf>, Parse); 3] = [
        (
            "aws.iot.ca_file",
            iot_config.ca_file.as_ref(),
            pem_certificates,
        ),
        (
            "aws.iot.cert_file",
            Some(&iot_config.cert_file),
            pem_certificates,
        ),
        (
            "aws.iot.key_file",
            Some(&iot_config.key_file),
            pem_private_key,
        ),
    ];
    let mut issues = named_files(named);
    if issues.is_empty()
        && let Err(iot::IotError::File { key, message }) = iot::tls_config(iot_config)
    {
        issues.push(Issue::new(key, message));
    }
    issues
}

/// The files `[http]` names: the token file readable with a token on its first line, and the
/// TLS pair building the server configuration `run` builds (by calling the same
/// [`crate::ingest::http::tls_config`]).
pub fn http_files(config: &HttpConfig) -> Vec<Issue> {
    let token = |path: &Path| {
        crate::ingest::http::read_token(path)
            .map(|_| ())
            .map_err(http_message)
    };
    let named: [(&'static str, Option<&PathBuf>, Parse); 3] = [
        ("http.token_file", config.token_file.as_ref(), token),
        (
            "http.cert_file",
            config.cert_file.as_ref(),
            pem_certificates,
        ),
        ("http.key_file", config.key_file.as_ref(), pem_private_key),
    ];
    let mut issues = named_files(named);
    if issues.is_empty()
        && let Err(HttpError::File { key, message }) = crate::ingest::http::tls_config(config)
    {
        issues.push(Issue::new(key, message));
    }
    issues
}

/// The message of an [`HttpError`], without the key (the issue carries it).
fn http_message(err: HttpError) -> String {
    match err {
        HttpError::File { message, .. } => message,
        other => other.to_string(),
    }
}

/// A PEM file with at least one certificate in it.
fn pem_certificates(path: &Path) -> Result<(), String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: not a PEM file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no certificate in it; expected PEM with -----BEGIN CERTIFICATE-----",
            path.display()
        ));
    }
    Ok(())
}

/// A PEM file with a private key in it.
fn pem_private_key(path: &Path) -> Result<(), String> {
    match PrivateKeyDer::from_pem_file(path) {
        Ok(_) => Ok(()),
        Err(rustls_pki_types::pem::Error::NoItemsFound) => Err(format!(
            "{}: no private key in it; expected PEM with -----BEGIN PRIVATE KEY----- \
             (or RSA PRIVATE KEY, EC PRIVATE KEY)",
            path.display()
        )),
        Err(e) => Err(format!("{}: not a PEM private key: {e}", path.display())),
    }
}

/// What [`mqtt::options`] refuses in `config`, if anything.
fn options_issue(config: &MqttConfig) -> Option<Issue> {
    match mqtt::options(config) {
        Ok(_) => None,
        Err(MqttError::Url(message)) => Some(Issue::new("mqtt.url", message)),
        Err(MqttError::File { key, path, source }) => Some(Issue::new(
            key,
            format!("cannot read {path}: {}", os_reason(&source)),
        )),
        Err(MqttError::Tls { key, message }) => Some(Issue::new(key, message)),
    }
}

/// A regular file this process can open for reading.
fn readable_file(path: &Path) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => return Err("it is a directory, not a file".into()),
        Ok(_) => {}
        Err(e) => return Err(os_reason(&e)),
    }
    std::fs::File::open(path)
        .map(|_| ())
        .map_err(|e| refusal(&e))
}

/// `buffer.dir`: usable as it is, or creatable by `run`, without creating it here.
pub fn buffer_dir(config: &Config) -> Vec<Issue> {
    let dir = &config.buffer.dir;
    let issue = |message: String| Issue::new("buffer.dir", message);
    match std::fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => {
            vec![issue(format!(
                "{} exists but is not a directory",
                dir.display()
            ))]
        }
        Ok(_) => match access(dir, Access::Directory) {
            Err(e) => vec![issue(format!(
                "{} is not writable: {}",
                dir.display(),
                refusal(&e)
            ))],
            Ok(()) => buffer_contents(config),
        },
        Err(e) if is_missing(&e) => creatable(dir).err().map_or_else(Vec::new, |why| {
            vec![issue(format!(
                "{} does not exist and cannot be created: {why}",
                dir.display()
            ))]
        }),
        Err(e) => vec![issue(format!("{}: {}", dir.display(), os_reason(&e)))],
    }
}

/// Whether a path does not exist: absent, or a file stands where a directory on the way should be.
fn is_missing(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

/// Whether `run` could create `dir`: its nearest existing ancestor is a writable directory.
fn creatable(dir: &Path) -> Result<(), String> {
    let mut ancestor: PathBuf = dir.to_owned();
    loop {
        ancestor = match ancestor.parent() {
            Some(p) if p.as_os_str().is_empty() => PathBuf::from("."),
            Some(p) => p.to_owned(),
            None => return Err("no parent directory exists".into()),
        };
        match std::fs::metadata(&ancestor) {
            Ok(meta) if !meta.is_dir() => {
                return Err(format!("{} is not a directory", ancestor.display()));
            }
            Ok(_) => {
                return access(&ancestor, Access::Directory).map_err(|e| {
                    format!("{} is not writable: {}", ancestor.display(), refusal(&e))
                });
            }
            Err(e) if is_missing(&e) => continue,
            Err(e) => return Err(format!("{}: {}", ancestor.display(), os_reason(&e))),
        }
    }
}

/// Inside an existing `buffer.dir`: the lock file and each rule's directory and files, where
/// they exist (what does not exist yet, `run` creates).
fn buffer_contents(config: &Config) -> Vec<Issue> {
    let mut issues = Vec::new();
    let lock = config.buffer.dir.join(LOCK_FILE);
    if let Err(why) = existing_is(&lock, Access::File) {
        issues.push(Issue::new("buffer.dir", why));
    }
    for rule in &config.rules {
        let dir = crate::buffer::layout::rule_dir(config, &rule.name);
        if let Err(why) = existing_is(&dir, Access::Directory) {
            issues.push(Issue::new("buffer.dir", why));
            continue;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue; // absent: run creates it
        };
        let mut refused = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .filter_map(|p| access(&p, Access::File).err().map(|e| (p, e)));
        if let Some((first, e)) = refused.next() {
            let more = refused.count();
            let others = if more > 0 {
                format!(" (and {more} more file(s) there)")
            } else {
                String::new()
            };
            issues.push(Issue::new(
                "buffer.dir",
                format!(
                    "{} is not writable: {}{others}; rule {:?} cannot use its buffer",
                    first.display(),
                    refusal(&e),
                    rule.name
                ),
            ));
        }
    }
    issues
}

/// `path`, when it exists, is of `kind` and readable and writable.
fn existing_is(path: &Path, kind: Access) -> Result<(), String> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(_) => std::fs::metadata(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(e),
    }
    .map_err(|e| format!("{}: {}", path.display(), os_reason(&e)))?;
    match kind {
        Access::Directory if !meta.is_dir() => {
            return Err(format!(
                "{} is in the way: it should be a directory",
                path.display()
            ));
        }
        Access::File if meta.is_dir() => {
            return Err(format!(
                "{} is in the way: it should be a file",
                path.display()
            ));
        }
        _ => {}
    }
    access(path, kind).map_err(|e| format!("{} is not writable: {}", path.display(), refusal(&e)))
}

/// What the daemon needs of a path.
#[derive(Debug, Clone, Copy)]
enum Access {
    /// List, enter, create and delete entries.
    Directory,
    /// Read and write.
    File,
}

/// `faccessat(2)` with the effective ids: what this process may do, read-only file systems
/// included, without opening or creating anything.
fn access(path: &Path, kind: Access) -> io::Result<()> {
    let mode = match kind {
        Access::Directory => libc::R_OK | libc::W_OK | libc::X_OK,
        Access::File => libc::R_OK | libc::W_OK,
    };
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "the path contains a NUL"))?;
    // SAFETY: `c_path` is a NUL-terminated string that lives across the call; faccessat only
    // reads it and touches no other memory.
    let rc = unsafe { libc::faccessat(libc::AT_FDCWD, c_path.as_ptr(), mode, libc::AT_EACCESS) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Why access was refused; for a permission, to whom, since `check` may run as another user
/// than the daemon.
fn refusal(e: &io::Error) -> String {
    if e.kind() == io::ErrorKind::PermissionDenied {
        format!("{}{}", os_reason(e), as_user())
    } else {
        os_reason(e)
    }
}

/// " for this user (uid N)".
fn as_user() -> String {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    format!(" for this user (uid {uid})")
}

/// An I/O error in words, without Rust's "(os error N)" suffix.
fn os_reason(e: &io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(cut) => text[..cut].to_owned(),
        None => text,
    }
}

/// `aws.region`, or what aws-config's region chain finds in its order: AWS_REGION /
/// AWS_DEFAULT_REGION, the profile, EC2 instance metadata (bounded by
/// [`REGION_LOOKUP_TIMEOUT`]).
pub async fn region(aws: &AwsConfig) -> Vec<Issue> {
    if aws.region.is_some() {
        return Vec::new();
    }
    // Silenced: the SDK logs each source that has no region as a warning, some with a debug
    // dump; the one line below says what matters.
    let Err(imds_said) = find_region(aws)
        .with_subscriber(tracing::subscriber::NoSubscriber::default())
        .await
    else {
        return Vec::new();
    };
    let profile = match &aws.profile {
        Some(name) => format!("profile {name:?}"),
        None => "default profile".to_owned(),
    };
    vec![Issue::new(
        "aws.region",
        format!(
            "no AWS region: it is not set here, nor in AWS_REGION or AWS_DEFAULT_REGION, nor by \
             the {profile} in ~/.aws/config, and {imds_said}; set aws.region, e.g. \
             region = \"eu-west-1\" (or MLB_AWS__REGION)"
        ),
    )]
}

/// The region chain, source by source; `Err` says what instance metadata answered.
async fn find_region(aws: &AwsConfig) -> Result<(), String> {
    // The same HTTPS client the Lambda client gets, so IMDS is reached the way `run` would.
    let http_client = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let provider_config = ProviderConfig::default().with_http_client(http_client);
    let env = aws_config::environment::region::EnvironmentVariableRegionProvider::new();
    if env.region().await.is_some() {
        return Ok(());
    }
    let mut profile = ProfileFileRegionProvider::builder().configure(&provider_config);
    if let Some(name) = &aws.profile {
        profile = profile.profile_name(name);
    }
    if profile.build().region().await.is_some() {
        return Ok(());
    }
    let imds = ImdsRegionProvider::builder()
        .configure(&provider_config)
        .build();
    match tokio::time::timeout(REGION_LOOKUP_TIMEOUT, imds.region()).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err("EC2 instance metadata gave none (not an EC2 instance?)".to_owned()),
        Err(_) => Err(format!(
            "EC2 instance metadata did not answer within {}s (not an EC2 instance?)",
            REGION_LOOKUP_TIMEOUT.as_secs()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_errors_read_without_their_number() {
        let e = io::Error::from_raw_os_error(libc::EACCES);
        assert_eq!(os_reason(&e), "Permission denied");
    }

    #[test]
    fn a_missing_directory_is_creatable_under_a_writable_parent_and_not_under_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(creatable(&dir.path().join("a/b/c")), Ok(()));
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").expect("write");
        let err = creatable(&file.join("buffer")).expect_err("under a file");
        assert!(err.contains("is not a directory"), "{err}");
        assert!(!dir.path().join("a").exists(), "nothing was created");
    }

    #[test]
    fn http_files_are_read_and_the_tls_pair_must_go_together() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write");
            path
        };
        let one = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        let two = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        let config = HttpConfig {
            token_file: Some(write("token", "\n")),
            cert_file: Some(write("cert.pem", &one.cert.pem())),
            key_file: Some(dir.path().join("missing.key")),
            ..HttpConfig::default()
        };
        let issues = http_files(&config);
        let keys: Vec<&str> = issues.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(keys, ["http.token_file", "http.key_file"], "{issues:?}");
        assert!(
            issues[0].message.contains("first line is empty"),
            "{issues:?}"
        );
        assert!(issues[1].message.contains("cannot read"), "{issues:?}");

        let mismatched = HttpConfig {
            token_file: Some(write("token", "t0ken\n")),
            key_file: Some(write("other.key", &two.signing_key.serialize_pem())),
            ..config.clone()
        };
        let issues = http_files(&mismatched);
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert!(
            issues[0].message.contains("cannot be used together"),
            "{issues:?}"
        );
        let matched = HttpConfig {
            key_file: Some(write("one.key", &one.signing_key.serialize_pem())),
            ..mismatched
        };
        assert!(http_files(&matched).is_empty());
    }
}
