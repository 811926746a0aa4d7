//! The least-privilege IAM policy for the bridge: `lambda:InvokeFunction` on exactly the ARNs
//! it invokes, qualifiers included (IAM matches the qualified ARN for a qualified invocation, so
//! an unqualified ARN would not allow invoking `:live`, and `:*` would allow every version).
//! `check --aws`'s DryRun needs the same permission and nothing more.
//!
//! A function is written in one of three ways; what each needs to become an ARN:
//!
//! ```text
//! arn:aws:lambda:eu-west-1:123456789012:function:ingest[:live]   nothing: used as it is
//! 123456789012:function:ingest[:live]                            the region
//! ingest[:live]                                                  the region and the account id
//! ```
//!
//! The region is `aws.region` (or AWS_REGION / AWS_DEFAULT_REGION, as the SDK would use), the
//! account id `--account-id`. Nothing is guessed and no wildcard is ever written: when something
//! is missing, each affected rule gets one line saying what.

use serde::Serialize;

use crate::core::config::RuleConfig;

/// The IAM policy document's version (the only current one).
const POLICY_VERSION: &str = "2012-10-17";
/// The one action the bridge needs.
const ACTION: &str = "lambda:InvokeFunction";
/// Digits in an AWS account id.
const ACCOUNT_ID_LEN: usize = 12;

/// An IAM policy document, fields in the order AWS's own examples use.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Policy {
    #[serde(rename = "Version")]
    version: &'static str,
    #[serde(rename = "Statement")]
    statement: Vec<Statement>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
struct Statement {
    #[serde(rename = "Sid")]
    sid: &'static str,
    #[serde(rename = "Effect")]
    effect: &'static str,
    #[serde(rename = "Action")]
    action: &'static str,
    #[serde(rename = "Resource")]
    resource: Vec<String>,
}

impl Policy {
    /// The JSON document, indented, as `aws iam create-policy --policy-document` takes it.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The ARNs the policy allows.
    pub fn resources(&self) -> &[String] {
        self.statement
            .first()
            .map_or(&[], |s| s.resource.as_slice())
    }
}

/// The policy for `rules`; `region` and `account_id` complete names and partial ARNs.
/// Every problem is one line naming the rule's key.
pub fn policy(
    rules: &[RuleConfig],
    region: Option<&str>,
    account_id: Option<&str>,
) -> Result<Policy, Vec<String>> {
    let mut problems = Vec::new();
    if let Some(account) = account_id
        && !valid_account(account)
    {
        problems.push(format!(
            "--account-id {account:?}: an AWS account id is {ACCOUNT_ID_LEN} digits"
        ));
        return Err(problems);
    }
    let mut resources = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        match function_arn(
            &rule.function,
            rule.qualifier.as_deref(),
            region,
            account_id,
        ) {
            Ok(arn) => resources.push(arn),
            Err(missing) => problems.push(format!(
                "rules[{i}].function {:?}: {missing}",
                rule.function
            )),
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    resources.sort();
    resources.dedup();
    Ok(Policy {
        version: POLICY_VERSION,
        statement: vec![Statement {
            sid: "InvokeConfiguredFunctions",
            effect: "Allow",
            action: ACTION,
            resource: resources,
        }],
    })
}

/// The full ARN of `function` with its qualifier, or what is missing to write it.
pub fn function_arn(
    function: &str,
    qualifier: Option<&str>,
    region: Option<&str>,
    account_id: Option<&str>,
) -> Result<String, String> {
    let parts: Vec<&str> = function.split(':').collect();
    let (partition, region, account, name, embedded) = match parts.as_slice() {
        [
            "arn",
            partition,
            "lambda",
            region,
            account,
            "function",
            name,
            rest @ ..,
        ] => (
            partition.to_string(),
            region.to_string(),
            account.to_string(),
            *name,
            rest.first().copied(),
        ),
        [account, "function", name, rest @ ..] => {
            let region = region.ok_or(
                "a partial ARN needs the region: set aws.region (or AWS_REGION), or write the full ARN",
            )?;
            (
                partition_of(region).to_owned(),
                region.to_owned(),
                account.to_string(),
                *name,
                rest.first().copied(),
            )
        }
        [name, rest @ ..] => {
            let (region, account) = match (region, account_id) {
                (Some(r), Some(a)) => (r, a),
                (None, Some(_)) => {
                    return Err("a function name needs the region: set aws.region (or AWS_REGION), or write the full ARN".into());
                }
                (Some(_), None) => {
                    return Err("a function name needs the account id: pass --account-id 123456789012, or write the full ARN".into());
                }
                (None, None) => {
                    return Err("a function name needs the region and the account id: set aws.region and pass --account-id, or write the full ARN".into());
                }
            };
            (
                partition_of(region).to_owned(),
                region.to_owned(),
                account.to_owned(),
                *name,
                rest.first().copied(),
            )
        }
        [] => return Err("is empty".into()),
    };
    if !valid_account(&account) {
        return Err(format!(
            "{account:?} is not an account id ({ACCOUNT_ID_LEN} digits)"
        ));
    }
    let qualifier = match (embedded, qualifier) {
        (Some(a), Some(b)) if a != b => {
            return Err(format!(
                "names the qualifier {a:?} and the rule's qualifier is {b:?}; Lambda refuses both at once"
            ));
        }
        (Some(q), _) | (None, Some(q)) => Some(q),
        (None, None) => None,
    };
    let mut arn = format!("arn:{partition}:lambda:{region}:{account}:function:{name}");
    if let Some(q) = qualifier {
        arn.push(':');
        arn.push_str(q);
    }
    Ok(arn)
}

fn valid_account(account: &str) -> bool {
    account.len() == ACCOUNT_ID_LEN && account.bytes().all(|b| b.is_ascii_digit())
}

/// The AWS partition a region belongs to.
fn partition_of(region: &str) -> &'static str {
    if region.starts_with("cn-") {
        "aws-cn"
    } else if region.starts_with("us-gov-") {
        "aws-us-gov"
    } else {
        "aws"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACCOUNT: &str = "123456789012";

    #[test]
    fn every_form_becomes_a_qualified_arn() {
        let arn = |f: &str, q: Option<&str>| function_arn(f, q, Some("eu-west-1"), Some(ACCOUNT));
        assert_eq!(
            arn("ingest", Some("live")),
            Ok("arn:aws:lambda:eu-west-1:123456789012:function:ingest:live".into())
        );
        assert_eq!(
            arn("ingest:3", None),
            Ok("arn:aws:lambda:eu-west-1:123456789012:function:ingest:3".into())
        );
        assert_eq!(
            arn("210987654321:function:other", None),
            Ok("arn:aws:lambda:eu-west-1:210987654321:function:other".into())
        );
        assert_eq!(
            arn(
                "arn:aws-cn:lambda:cn-north-1:210987654321:function:f",
                Some("live")
            ),
            Ok("arn:aws-cn:lambda:cn-north-1:210987654321:function:f:live".into())
        );
        assert_eq!(
            function_arn("f", None, Some("us-gov-west-1"), Some(ACCOUNT)),
            Ok("arn:aws-us-gov:lambda:us-gov-west-1:123456789012:function:f".into())
        );
    }

    #[test]
    fn what_is_missing_is_said_and_nothing_is_guessed() {
        let err = function_arn("ingest", None, Some("eu-west-1"), None).expect_err("account");
        assert!(err.contains("--account-id"), "{err}");
        let err = function_arn("123456789012:function:f", None, None, None).expect_err("region");
        assert!(err.contains("aws.region"), "{err}");
        let err = function_arn("f:live", Some("dev"), Some("eu-west-1"), Some(ACCOUNT))
            .expect_err("two qualifiers");
        assert!(err.contains("\"live\""), "{err}");
    }
}
