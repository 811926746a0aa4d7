//! `check --aws`: invoke every rule's function with `InvocationType=DryRun` (Lambda checks that
//! the function, the qualifier and the caller's permission exist, runs nothing, answers 204) and
//! sort each answer into what an operator does next.
//!
//! ```text
//! status          when                                          exit code (worst wins)
//! ok              204                                           0
//! unreachable     no connection, timeout, 5xx, throttled        69 EX_UNAVAILABLE
//! access denied   403 AccessDeniedException, no credentials     77 EX_NOPERM
//! not found       404 ResourceNotFoundException                 77 EX_NOPERM
//! refused         any other 4xx (e.g. an invalid qualifier)     77 EX_NOPERM
//! ```
//!
//! Precedence: 77 over 69 over 0. A denial or a missing function needs someone to change the
//! policy or the configuration, and trying again later will not fix it; 69 alone says "try
//! again when Lambda can be reached".

use std::fmt;

use crate::core::config::RuleConfig;
use crate::delivery::invoker::{InvokeError, LambdaInvoker, classify};

/// What one rule's DryRun found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// The function exists and we may invoke it.
    Ok,
    /// No such function, version or alias.
    NotFound,
    /// The credentials may not invoke it, or there are none.
    AccessDenied,
    /// Lambda refused the request for another reason.
    Refused,
    /// Lambda could not be asked.
    Unreachable,
}

impl Status {
    /// The words `check --aws` prints.
    pub fn as_str(&self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::NotFound => "not found",
            Status::AccessDenied => "access denied",
            Status::Refused => "refused",
            Status::Unreachable => "unreachable",
        }
    }

    /// The exit code this status alone asks for (sysexits.h).
    pub fn exit_code(&self) -> u8 {
        match self {
            Status::Ok => 0,
            Status::Unreachable => EX_UNAVAILABLE,
            Status::NotFound | Status::AccessDenied | Status::Refused => EX_NOPERM,
        }
    }
}

/// sysexits.h EX_UNAVAILABLE: Lambda (or the credentials source) cannot be reached.
pub const EX_UNAVAILABLE: u8 = 69;
/// sysexits.h EX_NOPERM: a function is missing or may not be invoked.
pub const EX_NOPERM: u8 = 77;

/// One rule's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleCheck {
    /// The rule's name.
    pub rule: String,
    /// The function as invoked, with `:qualifier` when one is set.
    pub target: String,
    /// What Lambda said.
    pub status: Status,
    /// AWS's code and message, for everything but `ok`.
    pub reason: Option<String>,
}

impl fmt::Display for RuleCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}: {}",
            self.rule,
            self.status.as_str(),
            self.target
        )?;
        if let Some(reason) = &self.reason {
            write!(f, " ({reason})")?;
        }
        Ok(())
    }
}

/// The exit code for a set of results: 77 over 69 over 0.
pub fn exit_code<'a>(statuses: impl IntoIterator<Item = &'a Status>) -> u8 {
    statuses
        .into_iter()
        .map(Status::exit_code)
        .max_by_key(|code| match *code {
            EX_NOPERM => 2,
            EX_UNAVAILABLE => 1,
            _ => 0,
        })
        .unwrap_or(0)
}

/// Sorts a failed DryRun.
pub fn status_of(err: &InvokeError) -> Status {
    match err {
        InvokeError::Permanent { code, .. } if code == "ResourceNotFoundException" => {
            Status::NotFound
        }
        InvokeError::Permanent { code, .. } if code.starts_with("AccessDenied") => {
            Status::AccessDenied
        }
        // Lambda signs the request and checks the signature before anything else: a key it
        // does not know, or an expired session, is a denial too.
        InvokeError::Transient { code, .. } | InvokeError::Permanent { code, .. }
            if matches!(
                code.as_str(),
                "NoCredentials"
                    | "UnrecognizedClientException"
                    | "InvalidSignatureException"
                    | "ExpiredTokenException"
                    | "SignatureDoesNotMatch"
            ) =>
        {
            Status::AccessDenied
        }
        InvokeError::Permanent { .. } | InvokeError::FunctionError { .. } => Status::Refused,
        InvokeError::Throttled { .. } | InvokeError::Transient { .. } => Status::Unreachable,
    }
}

/// DryRun-invokes every rule's function, all at once, and returns the results in rule order.
pub async fn check_rules(invoker: &LambdaInvoker, rules: &[RuleConfig]) -> Vec<RuleCheck> {
    let mut tasks = tokio::task::JoinSet::new();
    for (index, rule) in rules.iter().enumerate() {
        let client = invoker.client().clone();
        let rule = rule.clone();
        tasks.spawn(async move {
            let target = match &rule.qualifier {
                Some(q) => format!("{}:{q}", rule.function),
                None => rule.function.clone(),
            };
            let result = client
                .invoke()
                .function_name(&rule.function)
                .set_qualifier(rule.qualifier.clone())
                .invocation_type(aws_sdk_lambda::types::InvocationType::DryRun)
                .send()
                .await
                .map_err(classify);
            let (status, reason) = match result {
                Ok(_) => (Status::Ok, None),
                Err(err) => {
                    let reason = match &err {
                        InvokeError::FunctionError { kind, detail } => format!("{kind}: {detail}"),
                        other => other.to_string(),
                    };
                    (status_of(&err), Some(reason))
                }
            };
            (
                index,
                RuleCheck {
                    rule: rule.name,
                    target,
                    status,
                    reason,
                },
            )
        });
    }
    let mut results: Vec<(usize, RuleCheck)> = Vec::with_capacity(rules.len());
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(result) => results.push(result),
            // A panicking task is a bug; its rule is reported as not checked below.
            Err(err) => tracing::error!(error = %err, "a DryRun task failed"),
        }
    }
    results.sort_by_key(|(index, _)| *index);
    let mut checks = Vec::with_capacity(rules.len());
    for (index, rule) in rules.iter().enumerate() {
        match results.iter().position(|(i, _)| *i == index) {
            Some(at) => checks.push(results[at].1.clone()),
            None => checks.push(RuleCheck {
                rule: rule.name.clone(),
                target: rule.function.clone(),
                status: Status::Unreachable,
                reason: Some("the check did not finish".to_owned()),
            }),
        }
    }
    checks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denial_outranks_unreachable_which_outranks_ok() {
        use Status::*;
        assert_eq!(exit_code(&[Ok, Ok]), 0);
        assert_eq!(exit_code(&[Ok, Unreachable]), 69);
        assert_eq!(exit_code(&[Unreachable, NotFound, Ok]), 77);
        assert_eq!(exit_code(&[AccessDenied, Unreachable]), 77);
        assert_eq!(exit_code(&[]), 0);
    }

    #[test]
    fn lambda_codes_map_to_what_to_do() {
        let permanent = |code: &str| InvokeError::Permanent {
            code: code.into(),
            message: String::new(),
        };
        let transient = |code: &str| InvokeError::Transient {
            code: code.into(),
            message: String::new(),
        };
        assert_eq!(
            status_of(&permanent("ResourceNotFoundException")),
            Status::NotFound
        );
        assert_eq!(
            status_of(&permanent("AccessDeniedException")),
            Status::AccessDenied
        );
        assert_eq!(
            status_of(&transient("UnrecognizedClientException")),
            Status::AccessDenied
        );
        assert_eq!(status_of(&transient("NoCredentials")), Status::AccessDenied);
        assert_eq!(
            status_of(&permanent("InvalidParameterValueException")),
            Status::Refused
        );
        assert_eq!(
            status_of(&transient("ConnectionFailed")),
            Status::Unreachable
        );
        assert_eq!(
            status_of(&transient("ServiceException")),
            Status::Unreachable
        );
    }
}
