//! The `mqtt-lambda-bridge` command: argument parsing, logging, exit codes. The daemon itself
//! is the library's `run`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use mqtt_lambda_bridge::config::{Config, DEFAULT_CONFIG_PATH};

/// sysexits.h EX_CONFIG: the configuration is wrong; restarting will not help.
const EX_CONFIG: u8 = 78;

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
    /// Run the daemon.
    Run {
        /// The configuration file.
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Validate the configuration and exit: 0 when valid, 78 with one line per problem otherwise.
    Check {
        /// The configuration file.
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
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
        Command::Check { config } => match Config::load(&config) {
            Ok(loaded) => {
                println!(
                    "{}: valid ({} rule{})",
                    config.display(),
                    loaded.rules.len(),
                    if loaded.rules.len() == 1 { "" } else { "s" }
                );
                ExitCode::SUCCESS
            }
            Err(err) => {
                for line in err.problems() {
                    eprintln!("{line}");
                }
                ExitCode::from(EX_CONFIG)
            }
        },
        Command::Run { config } => {
            let loaded = match Config::load(&config) {
                Ok(loaded) => loaded,
                Err(err) => {
                    for line in err.problems() {
                        eprintln!("{line}");
                    }
                    return ExitCode::from(EX_CONFIG);
                }
            };
            match run(loaded) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    tracing::error!("{err:#}");
                    eprintln!("mqtt-lambda-bridge: {err:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn run(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(mqtt_lambda_bridge::run(
        config,
        mqtt_lambda_bridge::shutdown::signal(),
    ))?;
    Ok(())
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
