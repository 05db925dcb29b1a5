//! `vp-host`: the vp daemon and command-line tool.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use vp_host::exec::{self, ExecOptions};
use vp_host::sandbox::{GuestLimits, Sandbox};

/// Run WebAssembly apps as virtual peers: processes that keep running while
/// the volunteer machines under them crash and are replaced.
#[derive(Debug, Parser)]
#[command(name = "vp-host", version, about, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "VP_LOG_FORMAT"
    )]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run an app on this machine: JSON messages on stdin (one per line), one
    /// JSON reply per line on stdout; calls and sends the app makes go to stderr.
    Exec(ExecArgs),
    /// Run a benchmark; prints one JSON summary line.
    Bench {
        #[command(subcommand)]
        which: BenchCommand,
    },
    /// Run the deterministic consensus simulator: replicas of the real Paxos
    /// core under message loss, partitions, crashes and membership churn, with
    /// safety, exactly-once, linearizability and progress checkers.
    Sim(SimArgs),
}

#[derive(Debug, clap::Args)]
struct SimArgs {
    /// Replay one seed and print its report as JSON.
    #[arg(long, conflicts_with = "seeds")]
    seed: Option<u64>,
    /// Run this many seeds and print a summary line (JSON).
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// First seed of a multi-seed run.
    #[arg(long, default_value_t = 0)]
    first_seed: u64,
    /// Founding voters per run.
    #[arg(long, default_value_t = 3)]
    voters: usize,
}

#[derive(Debug, clap::Args)]
struct ExecArgs {
    /// The app: a .wasm file, or the name of a bundled example (counter, kv, chat, stress).
    app: String,
    /// Start from this snapshot instead of a fresh app.
    #[arg(long, value_name = "FILE")]
    snapshot_in: Option<PathBuf>,
    /// After the last line, write the app's snapshot here (atomically).
    #[arg(long, value_name = "FILE")]
    snapshot_out: Option<PathBuf>,
    /// Fuel (about one per wasm instruction) each message may use.
    #[arg(long, value_name = "N", default_value_t = GuestLimits::default().fuel_per_message)]
    fuel: u64,
    /// Largest linear memory the app may grow to, in bytes (suffixes K, M, G: powers of 1024).
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes, default_value = "256M")]
    memory_max: u64,
    /// Time stamped on the first message, ms since the Unix epoch; each line adds 1.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    time_ms: u64,
    /// Seed of the entropy stamped on messages.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print each reply as {"id": LINE, "ok": VALUE} or {"id": LINE, "error": WHY}.
    #[arg(long)]
    tagged: bool,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// One small message through the sandbox into the counter guest and back.
    Dispatch {
        /// Messages to time (after 10,000 warm-up messages).
        #[arg(long, default_value_t = 1_000_000)]
        messages: u64,
    },
    /// The Paxos core alone: 3 in-process replicas, in-memory storage, no-op
    /// state machine, C closed-loop proposers.
    Core {
        /// Concurrent proposers.
        #[arg(long, default_value_t = 1)]
        proposers: usize,
        /// How long to run, seconds.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Payload of each command, bytes.
        #[arg(long, default_value_t = 16)]
        payload_bytes: usize,
    },
    /// Snapshot and restore (into a fresh engine) of a guest holding bulk state.
    Snapshot {
        /// State the guest holds, MiB.
        #[arg(long, default_value_t = 64)]
        state_mib: u64,
        /// Rounds to take the median of.
        #[arg(long, default_value_t = 5)]
        rounds: u32,
    },
}

/// Parse `65536`, `64K`, `256M`, `1G` (also `KiB`/`MiB`/`GiB`, powers of 1024).
fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a size: use e.g. 65536, 64K, 256M or 1G"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        other => return Err(format!("unknown size unit `{other}`: use K, M or G")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("`{s}` is too large"))
}

fn init_logging(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn app_bytes(app: &str) -> Result<Vec<u8>> {
    let path = std::path::Path::new(app);
    if path.exists() {
        return std::fs::read(path).with_context(|| format!("cannot read {app}"));
    }
    if let Some(bytes) = vp_apps::by_name(app) {
        return Ok(bytes.to_vec());
    }
    let names: Vec<&str> = vp_apps::ALL.iter().map(|(n, _)| *n).collect();
    anyhow::bail!(
        "no such file: {app} (bundled examples: {})",
        names.join(", ")
    )
}

fn run_exec(args: ExecArgs) -> Result<()> {
    let wasm = app_bytes(&args.app)?;
    let limits = GuestLimits {
        fuel_per_message: args.fuel,
        memory_bytes_max: args.memory_max,
        ..GuestLimits::default()
    };
    let sandbox = Sandbox::new()?;
    let mut guest = exec::start_guest(&sandbox, &wasm, args.snapshot_in.as_deref(), limits)
        .with_context(|| format!("cannot start {}", args.app))?;
    let options = ExecOptions {
        limits,
        time_ms: args.time_ms,
        seed: args.seed,
        tagged: args.tagged,
    };
    let summary = exec::run(
        &mut guest,
        std::io::stdin().lock(),
        std::io::stdout().lock(),
        std::io::stderr(),
        &options,
    )?;
    tracing::info!(messages = summary.messages, errors = summary.errors, "done");
    if let Some(path) = args.snapshot_out {
        exec::write_atomically(&path, &guest.snapshot().encode())
            .with_context(|| format!("cannot write snapshot {}", path.display()))?;
    }
    Ok(())
}

fn run_sim(args: SimArgs) -> Result<()> {
    use vp_consensus::sim::{SimOptions, run, run_many};
    let start = std::time::Instant::now();
    let result = match args.seed {
        Some(seed) => run(SimOptions {
            voters: args.voters,
            ..SimOptions::new(seed)
        })
        .map(serde_json::to_value),
        None => run_many(
            SimOptions {
                voters: args.voters,
                ..SimOptions::new(args.first_seed)
            },
            args.seeds,
        )
        .map(|r| {
            let mut v = serde_json::to_value(r)?;
            v["seeds_per_s"] = serde_json::json!(args.seeds as f64 / start.elapsed().as_secs_f64());
            Ok(v)
        }),
    };
    match result {
        Ok(report) => print_json(&report?),
        // The failure names the seed and the command that replays it.
        Err(failure) => anyhow::bail!("{failure}"),
    }
}

fn print_json(report: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string(report)?);
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Exec(args) => {
            init_logging(cli.log_format, "warn,vp::guest=info");
            run_exec(args)
        }
        Command::Bench { which } => {
            init_logging(cli.log_format, "warn");
            match which {
                BenchCommand::Dispatch { messages } => {
                    vp_host::bench::dispatch(messages).and_then(|r| print_json(&r))
                }
                BenchCommand::Snapshot { state_mib, rounds } => {
                    vp_host::bench::snapshot(state_mib, rounds).and_then(|r| print_json(&r))
                }
                BenchCommand::Core {
                    proposers,
                    seconds,
                    payload_bytes,
                } => {
                    let options = vp_consensus::bench::BenchOptions {
                        proposers,
                        duration: std::time::Duration::from_secs_f64(seconds),
                        payload_bytes,
                    };
                    print_json(&vp_consensus::bench::core(options))
                }
            }
        }
        Command::Sim(args) => {
            init_logging(cli.log_format, "warn");
            run_sim(args)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_bytes("65536"), Ok(65536));
        assert_eq!(parse_bytes("64K"), Ok(64 << 10));
        assert_eq!(parse_bytes("256MiB"), Ok(256 << 20));
        assert_eq!(parse_bytes("1g"), Ok(1 << 30));
        assert!(
            parse_bytes("12Q")
                .unwrap_err()
                .contains("unknown size unit")
        );
        assert!(parse_bytes("lots").unwrap_err().contains("not a size"));
        assert!(parse_bytes("99999999999999999999G").is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
