//! The command line's own work beside `run`: the `buffer` commands ([`admin`], printed by
//! [`buffer_report`]), what a
//! configuration costs ([`cost`]) and the container health probe ([`probe`]). `main.rs` parses the arguments and maps results to exit
//! codes.

pub mod admin;
pub mod buffer_report;
pub mod check_report;
pub mod cost;
pub mod probe;

/// The Region the configuration means: `aws.region`, else `AWS_REGION` or `AWS_DEFAULT_REGION`
/// (`policy`'s ARNs, `cost`'s prices).
pub fn configured_region(config: &crate::core::config::Config) -> Option<String> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    config
        .aws
        .region
        .clone()
        .or_else(|| env("AWS_REGION"))
        .or_else(|| env("AWS_DEFAULT_REGION"))
}
pub mod try_message;
