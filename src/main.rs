//! The `mqtt-lambda-bridge` command: argument parsing, logging, exit codes. The daemon itself
//! is the library's `run`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use mqtt_lambda_bridge::buffer::layout::LayoutError;
use mqtt_lambda_bridge::cli::admin::AdminError;
use mqtt_lambda_bridge::cli::buffer_report as report;
use mqtt_lambda_bridge::cli::check_report;
use mqtt_lambda_bridge::core::config::{Config, DEFAULT_CONFIG_PATH, Source};

/// sysexits.h EX_CONFIG: the configuration is wrong; restarting will not help.
const EX_CONFIG: u8 = 78;
/// sysexits.h EX_USAGE: a command-line argument is wrong.
const EX_USAGE: u8 = 64;
/// sysexits.h EX_TEMPFAIL: try again later (the daemon holds the buffer).
const EX_TEMPFAIL: u8 = 75;
/// sysexits.h EX_NOINPUT: `buffer.dir` does not exist (nothing to inspect).
const EX_NOINPUT: u8 = 66;
/// sysexits.h EX_DATAERR: `replay` kept some dead letters in the store (each kind said on
/// stderr); what it could put back is back.
const EX_DATAERR: u8 = 65;

/// Bridges MQTT topics to AWS Lambda functions: durable, rate-limited, asynchronous.
#[derive(Debug, Parser)]
#[command(name = "mqtt-lambda-bridge", version, about)]
struct Cli {
    /// Log format; the filter comes from RUST_LOG (default "info").
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon; it performs `check`'s checks first and exits 78 when one fails.
    ///
    /// Then it resolves AWS credentials once: when no source has any (environment, profile,
    /// web identity, container endpoint, EC2 instance metadata, [aws.iot]) it exits 78 saying
    /// where it looked; when a source fails now (the IoT endpoint or the network is down), it
    /// warns once and runs, buffering, while deliveries retry.
    Run {
        /// The configuration file.
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Validate the configuration and what `run` needs: exit 0, or 78 with one line per problem.
    ///
    /// After the file, the files its keys name (password_file, TLS), buffer.dir (writable or
    /// creatable; nothing is created) and the AWS region (set, from the environment, the
    /// profile, or EC2 instance metadata within 2s) are checked, as `run` does before
    /// connecting.
    ///
    /// With --aws, then resolve AWS credentials and invoke every rule's function with
    /// InvocationType DryRun (nothing runs): one line per rule, `ok`, `not found`, `access
    /// denied`, `refused` or `unreachable`. Exit 0 when all are ok; 77 when any is denied, not
    /// found or refused (or there are no credentials); else 69 when Lambda or the credentials
    /// source cannot be reached. 77 wins over 69.
    Check {
        /// The configuration file.
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Also ask AWS: credentials, and a DryRun invocation of every rule's function.
        #[arg(long)]
        aws: bool,
    },
    /// Show what each rule would do with one message: `filtered out` (and the WHERE condition
    /// that is not true), or the exact event its function would receive for this message
    /// alone, with its size against Lambda's limit. Rules the topic does not match are not
    /// listed.
    ///
    /// Nothing is connected, stored or invoked. Exit 0 when some rule would invoke its
    /// function, 1 when none would, 78 when the configuration is invalid, 66 when
    /// --payload-file cannot be read.
    #[command(group(clap::ArgGroup::new("message").required(true).args(["payload", "payload_file"])))]
    Try {
        /// The configuration file.
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// The topic the message is published on.
        #[arg(long)]
        topic: String,
        /// The payload, as text.
        #[arg(long)]
        payload: Option<String>,
        /// A file holding the payload (any bytes).
        #[arg(long)]
        payload_file: Option<PathBuf>,
    },
    /// Print the least-privilege IAM policy: lambda:InvokeFunction on exactly the configured
    /// functions' ARNs, qualifiers included.
    ///
    /// Function names and partial ARNs are completed with aws.region (or AWS_REGION) and
    /// --account-id; what is missing is said, one line per rule, and the exit code is 78.
    Policy {
        /// The configuration file.
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// The account id for functions given by name (12 digits).
        #[arg(long)]
        account_id: Option<String>,
    },
    /// Inspect the disk buffer while the daemon is stopped.
    ///
    /// Exit 66 when buffer.dir does not exist (it is never created here), 75 while the daemon
    /// holds it, 64 for an unknown --rule.
    Buffer {
        #[command(subcommand)]
        command: BufferCommand,
    },
    /// What the configuration costs per 30-day month in Lambda requests and compute, per rule
    /// and in total, for given message rates or a running bridge's.
    ///
    /// Each rule's invocations follow its batching, windows, throttle and rate limit (the
    /// README states each formula). Exit 64 for a flag it cannot use, 78 for a bad
    /// configuration, 69 when --from cannot be read.
    Cost(mqtt_lambda_bridge::cli::cost::CostArgs),
    /// GET a loopback URL (e.g. http://127.0.0.1:9898/readyz): exit 0 on 200, else 1 with the
    /// reason on stderr. For container health checks, where there is no curl.
    Probe {
        /// http://HOST:PORT/PATH, HOST a loopback address.
        url: String,
    },
}

#[derive(Debug, Subcommand)]
enum BufferCommand {
    /// Per rule: pending messages and bytes, age of the oldest, dead letters.
    Stats {
        /// The configuration file.
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// The dead-letter stores: events Lambda can never accept.
    DeadLetters {
        #[command(subcommand)]
        command: DeadLetterCommand,
    },
}

#[derive(Debug, Subcommand)]
enum DeadLetterCommand {
    /// One line per dead letter: when, rule, error code, messages, reason.
    List {
        /// The configuration file.
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Only this rule.
        #[arg(long)]
        rule: Option<String>,
        /// Print the stored JSON lines instead.
        #[arg(long)]
        json: bool,
    },
    /// Put dead letters back into their rule's queue (same ids); the next `run` delivers them.
    ///
    /// What cannot go back (statistics windows, unreadable lines, messages older than
    /// buffer.max_age, messages the queue has no room for) stays in the store, one line per kind
    /// on stderr saying why and what to do, and the exit code is 65.
    Replay {
        /// The configuration file.
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Only this rule.
        #[arg(long)]
        rule: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Check { config, aws } => check(&config, aws),
        Command::Policy { config, account_id } => policy(&config, account_id.as_deref()),
        Command::Try {
            config,
            topic,
            payload,
            payload_file,
        } => try_message(&config, &topic, payload, payload_file.as_deref()),
        Command::Buffer { command } => buffer_command(command),
        Command::Cost(args) => cost(&args),
        Command::Probe { url } => match mqtt_lambda_bridge::cli::probe::probe(&url) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("mqtt-lambda-bridge: {err}");
                ExitCode::FAILURE
            }
        },
        Command::Run { config: path } => {
            let runtime = match runtime() {
                Ok(runtime) => runtime,
                Err(code) => return code,
            };
            let config = match runtime.block_on(load_and_preflight(&path)) {
                Ok(config) => config,
                Err(code) => return code,
            };
            let result = runtime.block_on(mqtt_lambda_bridge::run(
                config,
                &path,
                mqtt_lambda_bridge::daemon::signals::signal(),
            ));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    tracing::error!("{err:#}");
                    eprintln!("mqtt-lambda-bridge: {err:#}");
                    match err {
                        // Nothing changes until the configuration does: systemd's
                        // RestartPreventExitStatus=78 stops the restart loop.
                        mqtt_lambda_bridge::RunError::Lambda(_) => ExitCode::from(EX_CONFIG),
                        _ => ExitCode::FAILURE,
                    }
                }
            }
        }
    }
}

/// `check`: what `run` would refuse before connecting, without starting anything; with `aws`,
/// then credentials and a DryRun invocation per rule.
fn check(path: &Path, aws: bool) -> ExitCode {
    // One thread is enough for the region lookup, the only thing here that waits.
    let runtime = match current_thread_runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    match runtime.block_on(load_and_preflight(path)) {
        Ok(loaded) => {
            println!(
                "{}: valid ({} rule{})",
                path.display(),
                loaded.rules.len(),
                if loaded.rules.len() == 1 { "" } else { "s" }
            );
            check_report::explain(&loaded);
            if aws {
                runtime.block_on(check_aws(&loaded))
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(code) => code,
    }
}

/// `check --aws`: credentials first (without them every DryRun would say the same), then a
/// DryRun invocation per rule, one line each on stdout.
async fn check_aws(config: &Config) -> ExitCode {
    use mqtt_lambda_bridge::delivery::invoker::dry_run::{self, EX_NOPERM, EX_UNAVAILABLE};
    use mqtt_lambda_bridge::delivery::invoker::{LambdaInvoker, credentials, sdk_config};
    let sdk = match sdk_config(&config.aws).await {
        Ok(sdk) => sdk,
        Err(err) => {
            eprintln!("{err}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    match credentials::resolve(&sdk, &config.aws).await {
        Ok(found) => println!("credentials: ok: {found}"),
        Err(credentials::Problem::NoSource(line)) => {
            println!("credentials: missing: {line}");
            return ExitCode::from(EX_NOPERM);
        }
        Err(credentials::Problem::Unavailable(line)) => {
            println!("credentials: unreachable: {line}");
            return ExitCode::from(EX_UNAVAILABLE);
        }
    }
    let invoker = LambdaInvoker::from_sdk_config(&sdk);
    let results = dry_run::check_rules(&invoker, &config.rules).await;
    for result in &results {
        println!("{result}");
    }
    ExitCode::from(dry_run::exit_code(results.iter().map(|r| &r.status)))
}

/// `try`: one paragraph per rule the message matches; exit 0 when some rule would invoke.
fn try_message(
    path: &Path,
    topic: &str,
    payload: Option<String>,
    payload_file: Option<&Path>,
) -> ExitCode {
    use mqtt_lambda_bridge::cli::try_message::{Verdict, try_message};
    let config = match load(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let payload = match (payload, payload_file) {
        (Some(text), _) => text.into_bytes(),
        (None, Some(file)) => match std::fs::read(file) {
            Ok(bytes) => bytes,
            Err(err) => {
                eprintln!("--payload-file {}: cannot read it: {err}", file.display());
                return ExitCode::from(EX_NOINPUT);
            }
        },
        (None, None) => Vec::new(),
    };
    let verdicts = try_message(&config, topic, payload, std::time::SystemTime::now());
    if verdicts.is_empty() {
        println!(
            "no rule matches the topic {topic:?}: the message would be acknowledged and dropped"
        );
    }
    for (rule, verdict) in &verdicts {
        match verdict {
            Verdict::Invoke { event, limit } => {
                let function = config
                    .rules
                    .iter()
                    .find(|r| &r.name == rule)
                    .map_or("", |r| r.function.as_str());
                let pretty = mqtt_lambda_bridge::cli::try_message::pretty(event);
                println!(
                    "rule {rule}: invokes {function} with this event ({} bytes; Lambda accepts at most {limit} for this invocation type):\n{pretty}",
                    event.len()
                );
            }
            Verdict::Filtered(condition) => {
                println!("rule {rule}: filtered out: WHERE {condition} is not true");
            }
            Verdict::TooLarge { size, limit } => println!(
                "rule {rule}: not invoked: its event would be {size} bytes, over the {limit} Lambda accepts for this invocation type; it would go to the dead-letter store"
            ),
        }
    }
    if verdicts.iter().any(|(_, v)| v.invokes()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `policy`: the IAM policy document on stdout, or what is missing on stderr (exit 78).
fn policy(path: &Path, account_id: Option<&str>) -> ExitCode {
    let config = match load(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let region = mqtt_lambda_bridge::cli::configured_region(&config);
    match mqtt_lambda_bridge::delivery::invoker::policy::policy(
        &config.rules,
        region.as_deref(),
        account_id,
    ) {
        Ok(policy) => {
            println!("{}", policy.to_json());
            ExitCode::SUCCESS
        }
        Err(problems) => {
            for problem in problems {
                eprintln!("{}: {problem}", path.display());
            }
            ExitCode::from(EX_CONFIG)
        }
    }
}

/// `cost`: the table (or JSON) on stdout; a flag it cannot use exits 64, a bad configuration
/// 78, a --from URL it cannot read 69.
fn cost(args: &mqtt_lambda_bridge::cli::cost::CostArgs) -> ExitCode {
    use mqtt_lambda_bridge::cli::cost::{self, Rates};
    use mqtt_lambda_bridge::delivery::invoker::dry_run::EX_UNAVAILABLE;
    let usage = |err: &dyn std::fmt::Display| {
        eprintln!("mqtt-lambda-bridge cost: {err}");
        ExitCode::from(EX_USAGE)
    };
    let config = match load(&args.config) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let rates = match args.source() {
        Err(err) => return usage(&err),
        Ok(None) => match args.streams() {
            Ok(streams) => Rates::Given(streams),
            Err(err) => return usage(&err),
        },
        Ok(Some(url)) => match cost::scrape::fetch(url) {
            Ok(text) => Rates::Observed(cost::scrape::Observed::parse(&text), cost::now_seconds()),
            Err(err @ cost::scrape::ScrapeError::Url(_)) => return usage(&err),
            Err(err) => {
                eprintln!("mqtt-lambda-bridge cost: {err}");
                return ExitCode::from(EX_UNAVAILABLE);
            }
        },
    };
    match cost::report(&config, args, &rates) {
        Ok(report) if args.json => {
            println!("{:#}", cost::json(&report));
            ExitCode::SUCCESS
        }
        Ok(report) => {
            print!("{}", cost::table(&report));
            ExitCode::SUCCESS
        }
        Err(err) => usage(&err),
    }
}

/// Threads for blocking work (buffer reads, unsynced ack writes, dead letters, opening a
/// reloaded rule's buffer): each queue keeps at most one read and one ack write in flight, so
/// a few are enough; tokio's default allows 512, each with its own stack.
const MAX_BLOCKING_THREADS: usize = 8;

/// The runtime `run` uses: one thread runs the MQTT event loop, ingest, delivery and the HTTP
/// and metrics servers; fsyncs happen on each buffer's writer thread and reads on the blocking
/// pool. On a gateway's two cores, busy with the broker too, two workers cost more than they
/// gave: tasks woken across threads and stolen between them took more CPU for the same drain
/// (230-410 ms against 230-320 for 50,000 messages; the README's "Memory and drain rate under
/// a flood"); nothing here computes long enough to need a second worker. Nothing on it may
/// block, as everywhere on tokio. Called before any other thread starts.
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    one_malloc_arena();
    tokio::runtime::Builder::new_current_thread()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .enable_all()
        .build()
        .map_err(|err| {
            eprintln!("mqtt-lambda-bridge: cannot start the async runtime: {err}");
            ExitCode::FAILURE
        })
}

/// One malloc arena for the whole process. glibc gives each thread that allocates an arena of
/// its own (up to eight per core), and each arena keeps the pages of the most its thread ever
/// held: under a flood the runtime's workers, the buffer's writer and the blocking threads
/// each kept their own peak, about 5 MiB more RSS in all. Each thread's malloc cache still
/// serves most allocations without the arena's lock. Must run before other threads start.
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a malloc parameter; no other thread is running yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// The runtime of the one-shot commands (`check`, `buffer`): one thread is enough for what
/// they wait on.
fn current_thread_runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| {
            eprintln!("mqtt-lambda-bridge: cannot start the async runtime: {err}");
            ExitCode::FAILURE
        })
}

/// Loads and validates the configuration, then checks what `run` needs before connecting
/// (files, buffer directory, AWS region); every problem is one line on stderr, exit 78.
async fn load_and_preflight(path: &Path) -> Result<Config, ExitCode> {
    let config = load(path)?;
    let issues = mqtt_lambda_bridge::daemon::preflight::check(&config).await;
    if issues.is_empty() {
        return Ok(config);
    }
    for problem in Source::read(path).locate(issues) {
        eprintln!("{problem}");
    }
    Err(ExitCode::from(EX_CONFIG))
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|err| {
        for line in err.problems() {
            eprintln!("{line}");
        }
        ExitCode::from(EX_CONFIG)
    })
}

/// `buffer ...`: loads the configuration, runs the subcommand, and maps its failure to the exit
/// code the command's help promises.
fn buffer_command(command: BufferCommand) -> ExitCode {
    let config_path = match &command {
        BufferCommand::Stats { config } => config,
        BufferCommand::DeadLetters {
            command:
                DeadLetterCommand::List { config, .. } | DeadLetterCommand::Replay { config, .. },
        } => config,
    };
    let config = match load(config_path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let runtime = match current_thread_runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let result = match command {
        BufferCommand::Stats { .. } => runtime.block_on(buffer_stats(&config)),
        BufferCommand::DeadLetters {
            command: DeadLetterCommand::List { rule, json, .. },
        } => list_dead_letters(&config, rule.as_deref(), json),
        BufferCommand::DeadLetters {
            command: DeadLetterCommand::Replay { rule, .. },
        } => runtime.block_on(replay_dead_letters(&config, rule.as_deref())),
    };
    result.unwrap_or_else(admin_failure)
}

/// `buffer stats`: one row per rule.
async fn buffer_stats(config: &Config) -> Result<ExitCode, AdminError> {
    report::print_stats(config).await?;
    Ok(ExitCode::SUCCESS)
}

/// `buffer dead-letters list`.
fn list_dead_letters(
    config: &Config,
    rule: Option<&str>,
    json: bool,
) -> Result<ExitCode, AdminError> {
    report::print_dead_letters(config, rule, json)?;
    Ok(ExitCode::SUCCESS)
}

/// `buffer dead-letters replay`: exit 65 when some stayed in the store.
async fn replay_dead_letters(config: &Config, rule: Option<&str>) -> Result<ExitCode, AdminError> {
    Ok(if report::print_replay(config, rule).await? {
        ExitCode::from(EX_DATAERR)
    } else {
        ExitCode::SUCCESS
    })
}

/// The error of a `buffer` command on stderr, and the exit code its help promises.
fn admin_failure(err: AdminError) -> ExitCode {
    eprintln!("mqtt-lambda-bridge: {err}");
    match err {
        AdminError::NoBuffer(..) | AdminError::NotADirectory(..) => ExitCode::from(EX_NOINPUT),
        AdminError::NoSuchRule(..) => ExitCode::from(EX_USAGE),
        AdminError::Buffer(LayoutError::Locked(_)) => ExitCode::from(EX_TEMPFAIL),
        _ => ExitCode::FAILURE,
    }
}

/// aws-config's credentials chain logs each failing source at `warn` with the error's `Debug`
/// structure, many lines of it; the bridge says the same in one line (invoker::credentials), so
/// the chain is heard only at `error` unless RUST_LOG names it.
const QUIET_SDK_CHAIN_TARGET: &str = "aws_config::meta::credentials::chain";

fn init_logging(format: LogFormat) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let mut filter = match from_env.as_deref().map(str::parse::<Targets>) {
        Some(Ok(filter)) => filter,
        Some(Err(err)) => {
            eprintln!("mqtt-lambda-bridge: RUST_LOG is not a log filter ({err}); logging at info");
            Targets::new().with_default(LevelFilter::INFO)
        }
        None => Targets::new().with_default(LevelFilter::INFO),
    };
    if !from_env.is_some_and(|v| v.contains("aws_config")) {
        filter = filter.with_target(QUIET_SDK_CHAIN_TARGET, LevelFilter::ERROR);
    }
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => tracing_subscriber::registry().with(fmt).with(filter).init(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(fmt.json().flatten_event(true))
            .with(filter)
            .init(),
    }
}
