//! `vp-host`: the vp daemon and command-line tool.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use vp_host::exec::{self, ExecOptions};
use vp_host::sandbox::{GuestLimits, Sandbox};

/// mimalloc rather than glibc's malloc: every message allocates on one
/// thread and frees on another (API task, node task, member thread, network
/// writer), where glibc's arenas spent 10-12% of the busiest threads' samples
/// at the commit benchmark's peak (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// The host's data directory (identity, API token, virtual-peer state).
    /// Default: $VP_DATA_DIR, else ~/.local/share/vp-host.
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// The control API's address (loopback only). Clients default to the
    /// address the daemon recorded in its data directory, the daemon to 127.0.0.1:7070.
    #[arg(long, global = true, value_name = "ADDR", env = "VP_API")]
    api: Option<std::net::SocketAddr>,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a host and join the network (runs until SIGTERM or Ctrl-C, then
    /// leaves the overlay gracefully).
    Join(JoinArgs),
    /// Show this host (peer id, addresses, peers, overlay neighbours, virtual
    /// peers it is a member of), or one virtual peer.
    Status {
        /// A virtual peer (id or name): its members, leader, epoch, slots, state.
        vp: Option<String>,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Deploy an app as a virtual peer; prints its id once the members run.
    Spawn(SpawnArgs),
    /// Send one message (JSON) to a virtual peer and print its reply. Retries
    /// through leader changes with the same session and sequence number, so it
    /// takes effect exactly once. Exit status 3 for an error reply. With `-`
    /// for the message: one message per line of standard input, over one
    /// send stream, one answer line each in input order.
    Send {
        /// The virtual peer: id (16 hex digits) or a name known to this host.
        vp: String,
        /// The message, as JSON (e.g. '{"add": 5}'); `-` reads messages from
        /// standard input, one per line.
        msg: String,
        /// With `-`: messages in flight at once. 1 (the default) applies them
        /// in input order; more are concurrent (the virtual peer may order
        /// those in flight together either way); answers stay in input order.
        #[arg(long, default_value_t = 1,
              value_parser = clap::value_parser!(u32).range(1..=4096))]
        in_flight: u32,
        /// Answer through the linearizable read path (no log entry; the app's `read`).
        #[arg(long)]
        read: bool,
        /// Give up after this long, milliseconds (at most 300,000).
        #[arg(long, default_value_t = 30_000,
              value_parser = clap::value_parser!(u64).range(1..=300_000))]
        timeout_ms: u64,
    },
    /// Destroy a virtual peer: decided through its log like a message, then
    /// every member stops and deletes its state. Asks for confirmation
    /// (typing the id or name) unless --yes is given.
    Destroy {
        /// The virtual peer: id (16 hex digits) or a name known to this host.
        vp: String,
        /// Do not ask for confirmation (required when standard input is not a terminal).
        #[arg(long)]
        yes: bool,
    },
    /// Print what a virtual peer's app logged lately (`vp_guest_sdk::info!`
    /// and friends), oldest first, as one of its members keeps it (the latest
    /// 1,000 lines at most); --follow keeps printing new lines.
    Logs {
        /// The virtual peer: id (16 hex digits) or a name known to this host.
        vp: String,
        /// Keep printing new lines as they are logged (Ctrl-C to stop).
        #[arg(long, short)]
        follow: bool,
        /// Only lines after this one (`SLOT.N`, as printed).
        #[arg(long, value_name = "SLOT.N")]
        after: Option<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Leave gracefully: this host takes no new member, each virtual peer it
    /// is a member of replaces it while it still votes, and the command
    /// returns when it runs none; then stop the host (`vp-host join`). The host
    /// keeps leaving if restarted, until `vp-host drain --cancel`.
    Drain {
        /// Stop waiting after this many seconds (the host keeps draining).
        #[arg(long, default_value_t = 600, value_name = "SECONDS")]
        timeout: u64,
        /// Stay after all: the host takes members again (the members it has
        /// handed over stay where they went).
        #[arg(long, conflicts_with = "timeout")]
        cancel: bool,
    },
    /// Use the skip-graph overlay directly (diagnostics and tests).
    Overlay {
        #[command(subcommand)]
        which: OverlayCommand,
    },
    /// Create a private-network key file; give it to every host with
    /// `vp-host join --network-key FILE`.
    NetworkKey {
        /// Where to write the key (never overwritten).
        file: PathBuf,
    },
    /// Run an app on this machine: JSON messages on stdin (one per line), one
    /// JSON reply per line on stdout; calls and sends the app makes go to stderr.
    Exec(ExecArgs),
    /// Run a benchmark; prints one JSON summary line.
    Bench {
        #[command(subcommand)]
        which: BenchCommand,
    },
    /// The whole system on this machine: start 5 hosts on loopback, spawn the
    /// counter app with 3 members, send messages, SIGKILL a member while a
    /// client keeps sending, show the replacement, print a summary, stop.
    Demo(DemoArgs),
    /// Run the deterministic consensus simulator: replicas of the real Paxos
    /// core under message loss, partitions, crashes and membership churn, with
    /// safety, exactly-once, linearizability and progress checkers.
    Sim(SimArgs),
}

#[derive(Debug, clap::Args)]
struct JoinArgs {
    /// Address to listen on (repeatable).
    #[arg(long, value_name = "MULTIADDR", default_values = ["/ip4/0.0.0.0/tcp/7071", "/ip4/0.0.0.0/udp/7071/quic-v1"])]
    listen: Vec<libp2p::Multiaddr>,
    /// A host already in the network to join through (repeatable). Without
    /// one, this host starts a new network.
    #[arg(long, value_name = "MULTIADDR")]
    bootstrap: Vec<libp2p::Multiaddr>,
    /// Private network: only hosts with the same key can connect (TCP only; see docs/host.md).
    #[arg(long, value_name = "FILE")]
    network_key: Option<PathBuf>,
    /// Virtual peers this host runs a member of, at most: what the machine
    /// lends to apps. Placement skips a host that is full. 0: none (the host
    /// routes overlay traffic and serves its API, and runs no app).
    #[arg(
        long,
        value_name = "N",
        default_value_t = vp_host::node::vps::MEMBERSHIPS_MAX,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new()
            .range(0..=vp_host::node::vps::MEMBERSHIPS_MAX as u64),
    )]
    memberships_max: usize,
    /// Guest memory this host lends, at most: a member counts for the most
    /// its guest may grow to (the app's `--memory-max`), and placement skips
    /// a host where a new one would not fit (suffixes K, M, G). Default: the
    /// machine's memory (MemTotal).
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    guest_memory_max: Option<u64>,
}

#[derive(Debug, clap::Args)]
struct DemoArgs {
    /// Hosts to start (child processes of this one).
    #[arg(long, default_value_t = 5)]
    hosts: usize,
    /// Members of the virtual peer.
    #[arg(long, default_value_t = 3)]
    members: usize,
    /// Messages sent before the crash and again after the recovery.
    #[arg(long, default_value_t = 10)]
    messages: u64,
    /// Kill the leader instead of a follower.
    #[arg(long)]
    kill_leader: bool,
    /// Directory for the hosts' data and logs (default: a new temporary one).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Keep the hosts' data and logs afterwards.
    #[arg(long)]
    keep: bool,
    /// Print the summary as one JSON line at the end.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct SpawnArgs {
    /// The app: a .wasm file, or the name of a bundled example (counter, kv, chat, stress).
    app: String,
    /// Members (hosts that each run the app and vote on the order of messages).
    #[arg(long, default_value_t = 3)]
    members: usize,
    /// A name for the virtual peer (usable instead of its id on this host).
    #[arg(long)]
    name: Option<String>,
    /// Fuel each message may use.
    #[arg(long, value_name = "F", default_value_t = GuestLimits::default().fuel_per_message)]
    fuel_per_message: u64,
    /// Largest linear memory the app may grow to (suffixes K, M, G; at most
    /// 496M, so that a member can snapshot the whole guest).
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes, default_value = "256M")]
    memory_max: u64,
    /// Replace a member the leader has not heard from for this long, ms.
    #[arg(long, value_name = "MS", default_value_t = 500)]
    replace_after_ms: u64,
}

#[derive(Debug, Subcommand)]
enum OverlayCommand {
    /// Find the node holding KEY (or the nearest one).
    Search { key: String },
    /// Deliver PAYLOAD to every key in a range, exactly once each.
    Multicast {
        /// Every key starting with this.
        #[arg(long, conflicts_with_all = ["lo", "hi"])]
        prefix: Option<String>,
        /// Lowest key of the range.
        #[arg(long, requires = "hi")]
        lo: Option<String>,
        /// Highest key of the range.
        #[arg(long, requires = "lo")]
        hi: Option<String>,
        payload: String,
    },
    /// Multicasts this host's keys received recently.
    Deliveries,
    /// Insert an extra key held by this host.
    Insert { key: String },
    /// Remove a key this host holds.
    Remove { key: String },
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
    /// The skip graph in simulation: search hops, multicast to a 5-member
    /// group, delivery ratio, join cost; with churn, the same after repair.
    Alm {
        /// Hosts in the simulated network.
        #[arg(long, default_value_t = 10_000)]
        hosts: usize,
        /// Percentage of hosts that crash (and as many that join) before measuring again.
        #[arg(long, default_value_t = 0.0)]
        churn: f64,
        /// Seed of the simulation.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// A virtual peer of 3 member processes on loopback (durable storage):
    /// peak throughput of C closed-loop clients, then latency at a quarter of it.
    Commit {
        /// Concurrent clients.
        #[arg(long, default_value_t = 64)]
        clients: usize,
        /// Send streams (kept-open connections carrying many messages each,
        /// docs/host.md) the clients share; 0 sends each message as its own
        /// HTTP request, as `vp-host send <vp> <json>` does.
        #[arg(long, default_value_t = 4)]
        streams: usize,
        /// Size of each message (JSON), bytes.
        #[arg(long, default_value_t = 100)]
        message_bytes: usize,
        /// Seconds per phase.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// After the quarter-load phase, one more open-loop phase at each of
        /// these rates (messages/s, comma-separated), e.g. `--rates 200,1000,4000`.
        #[arg(long, value_delimiter = ',', value_parser = positive_rate)]
        rates: Vec<f64>,
    },
    /// SIGKILL the leader of a virtual peer under load, N times: time from the
    /// kill to the first reply to a message sent after it.
    Failover {
        /// Leader kills.
        #[arg(long, default_value_t = 10)]
        kills: usize,
        /// Concurrent clients (on a host outside the virtual peer).
        #[arg(long, default_value_t = 4)]
        clients: usize,
    },
    /// SIGKILL a member of a virtual peer holding bulk state: time until its
    /// replacement votes.
    Replace {
        /// Guest state, MiB.
        #[arg(long, default_value_t = 64)]
        state_mib: u64,
        /// Kills (each replaced before the next).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// The virtual peer's replacement timeout, ms.
        #[arg(long, default_value_t = 500)]
        replace_after_ms: u64,
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
/// The machine's memory in bytes (`MemTotal` of /proc/meminfo); no limit
/// where it cannot be read.
fn machine_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            kib.checked_mul(1024)
        })
        .unwrap_or(u64::MAX)
}

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

/// A rate in messages per second: a finite number above zero.
fn positive_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!(
            "`{s}` is not a rate: use a number of messages/s above 0"
        )),
    }
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

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot watch SIGTERM: {e}");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("Ctrl-C received"),
    }
}

fn run_join(args: JoinArgs, data_dir: PathBuf, api: Option<std::net::SocketAddr>) -> Result<()> {
    let psk = args
        .network_key
        .as_deref()
        .map(vp_host::net::identity::load_network_key)
        .transpose()?;
    let config = vp_host::node::NodeConfig {
        data_dir,
        listen: args.listen,
        bootstrap: args.bootstrap,
        api: api.unwrap_or_else(|| {
            vp_host::api::DEFAULT_API_ADDR
                .parse()
                .expect("default parses")
        }),
        psk,
        alm: vp_alm::Config::default(),
        net: vp_host::net::NetConfig::default(),
        memberships_max: args.memberships_max,
        guest_memory_max: args.guest_memory_max.unwrap_or_else(machine_memory),
    };
    // The node runs as a task on the worker threads, not on this thread: a
    // request then goes from the API's task to the node's and back without
    // waking a thread that is not a worker.
    runtime()?.block_on(async {
        tokio::spawn(vp_host::node::run(config, shutdown_signal()))
            .await
            .context("the node task panicked")?
    })
}

fn client(
    cli_api: Option<std::net::SocketAddr>,
    data_dir: &std::path::Path,
) -> Result<vp_host::api::ApiClient> {
    vp_host::api::ApiClient::locate(cli_api, data_dir)
}

fn run_status(
    vp: Option<String>,
    json: bool,
    api: Option<std::net::SocketAddr>,
    data_dir: &std::path::Path,
) -> Result<()> {
    use vp_host::node::api::HostStatus;
    if let Some(vp) = vp {
        let status: vp_host::vp::VpStatus =
            runtime()?.block_on(client(api, data_dir)?.get(&format!("/v1/vps/{vp}")))?;
        if json {
            return print_json(&status);
        }
        print_vp_status(&status);
        return Ok(());
    }
    let status: HostStatus = runtime()?.block_on(client(api, data_dir)?.get("/v1/status"))?;
    if json {
        return print_json(&status);
    }
    println!(
        "host      {} (host id {}, vp-host {})",
        status.peer_id, status.host_id, status.version
    );
    println!("data dir  {}", status.data_dir);
    println!("listening {}", status.listen_addrs.join(", "));
    if let Some(fingerprint) = &status.private_network {
        println!("network   private (key fingerprint {fingerprint})");
    }
    println!("peers     {} connected", status.connected_peers.len());
    for peer in &status.connected_peers {
        let rtt = peer
            .rtt_us
            .map(|us| format!(" rtt {:.2} ms", us as f64 / 1000.0))
            .unwrap_or_default();
        println!("          {} at {}{rtt}", peer.peer_id, peer.addr);
    }
    let overlay = &status.overlay;
    println!(
        "overlay   {}, {} keys",
        if overlay.joined {
            "joined"
        } else {
            "not joined yet"
        },
        overlay.keys.len()
    );
    for key in &overlay.keys {
        let linked = key
            .levels
            .iter()
            .filter(|l| l[0].is_some() || l[1].is_some())
            .count();
        println!(
            "          {} ({}; linked at {linked} levels)",
            key.key,
            if key.joined { "joined" } else { "joining" }
        );
        if let Some([left, right]) = key.levels.first() {
            let show = |n: &Option<vp_host::node::api::NeighbourStatus>| {
                n.as_ref().map_or("-".to_string(), |n| n.key.clone())
            };
            println!("            level 0: {} <- -> {}", show(left), show(right));
        }
    }
    println!(
        "vps       member of {} (at most {}); guest memory {} MiB of {} committed",
        status.virtual_peers.len(),
        status.memberships_max,
        status.guest_memory_committed >> 20,
        if status.guest_memory_max == u64::MAX {
            "no limit".to_string()
        } else {
            format!("{} MiB", status.guest_memory_max >> 20)
        }
    );
    if status.draining {
        println!(
            "          draining (vp-host drain): takes no new member, hands over the ones it has"
        );
    }
    for vp in &status.virtual_peers {
        let name = vp
            .name
            .as_deref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default();
        println!(
            "          {}{name}: {}, leader {}, epoch {}, applied below slot {}",
            vp.vp,
            vp.role,
            vp.leader.as_deref().unwrap_or("unknown"),
            vp.epoch,
            vp.applied_below
        );
    }
    let c = &status.counters;
    println!(
        "frames    {} sent, {} received, {} dropped (queue full), {} dropped (unreachable), {} bad",
        c.frames_sent,
        c.frames_received,
        c.frames_dropped_queue_full,
        c.frames_dropped_unreachable,
        c.bad_frames
    );
    Ok(())
}

fn print_vp_status(s: &vp_host::vp::VpStatus) {
    let name = s
        .name
        .as_deref()
        .map(|n| format!(" ({n})"))
        .unwrap_or_default();
    println!("vp        {}{name}", s.vp);
    println!("module    {}", s.module);
    println!(
        "reported  by member {} ({}), epoch {}",
        s.host, s.role, s.epoch
    );
    println!("leader    {}", s.leader.as_deref().unwrap_or("none known"));
    println!("members   {}", s.voters.join(", "));
    if !s.learners.is_empty() {
        println!("joining   {}", s.learners.join(", "));
    }
    if let Some(dead) = &s.replacing {
        println!("replacing {dead}");
    }
    println!(
        "slots     decided below {}, applied below {}, last snapshot at {}",
        s.decided_below, s.applied_below, s.snapshot_slot
    );
    println!(
        "state     {} bytes of memory, digest {}, {} messages handled here, {} outbound pending, \
         {} timers armed",
        s.state_bytes,
        s.state_digest.as_deref().unwrap_or("-"),
        s.guest_handled,
        s.outbox,
        s.timers
    );
    let t = &s.timings;
    let ms = |us: u64| us as f64 / 1000.0;
    let line = |r: &vp_host::vp::Recent, what: &str| {
        format!(
            "{what} p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (last {})",
            ms(r.p50_us),
            ms(r.p99_us),
            ms(r.max_us),
            r.samples
        )
    };
    if t.log_write.samples > 0 {
        println!("disk      {}", line(&t.log_write, "log write + sync"));
    }
    if t.commit.samples > 0 {
        println!("ordering  {}", line(&t.commit, "slot accepted to decided"));
    }
    if t.request.samples > 0 {
        println!(
            "          {}",
            line(&t.request, "request proposed to answered")
        );
    }
    if t.checkpoint.samples > 0 {
        println!("pauses    {}", line(&t.checkpoint, "checkpoint"));
    }
}

fn run_spawn(
    args: SpawnArgs,
    api: Option<std::net::SocketAddr>,
    data_dir: &std::path::Path,
) -> Result<()> {
    use vp_host::node::vps::SpawnEvent;
    let wasm = app_bytes(&args.app)?;
    let mut query = format!(
        "/v1/vps?members={}&fuel_per_message={}&memory_max={}&replace_after_ms={}",
        args.members, args.fuel_per_message, args.memory_max, args.replace_after_ms
    );
    if let Some(name) = &args.name {
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            anyhow::bail!("a name may use letters, digits, - and _ only");
        }
        query.push_str(&format!("&name={name}"));
    }
    let client = client(api, data_dir)?;
    let mut outcome: Option<Result<String, String>> = None;
    runtime()?.block_on(client.post_lines(&query, wasm, |line| {
        match serde_json::from_str::<SpawnEvent>(line) {
            Ok(SpawnEvent::Progress { message }) => eprintln!("  {message}"),
            Ok(SpawnEvent::Done {
                vp,
                members,
                leader,
            }) => {
                eprintln!("  members: {}; leader: {leader}", members.join(", "));
                outcome = Some(Ok(vp));
            }
            Ok(SpawnEvent::Failed { error }) => outcome = Some(Err(error)),
            Err(_) => eprintln!("  {line}"),
        }
    }))?;
    match outcome {
        Some(Ok(vp)) => {
            println!("{vp}");
            Ok(())
        }
        Some(Err(e)) => anyhow::bail!("spawn failed: {e}"),
        None => anyhow::bail!("the daemon stopped answering before the spawn finished"),
    }
}

/// Returns whether the reply was a success (false: an error reply).
/// How `vp-host send` ended: exit status 0, 3 (an error reply) or 1 (a
/// message not delivered, with `-`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum SendOutcome {
    Replied,
    ErrorReply,
    Failed,
}

/// Print an answer as `vp-host send` does: the reply as it is, an error reply
/// as `{"error": ...}`.
fn print_answer(answer: vp_host::node::api::SendAnswer) -> SendOutcome {
    match (answer.reply, answer.error) {
        (_, Some(error)) => {
            println!("{}", serde_json::json!({ "error": error }));
            SendOutcome::ErrorReply
        }
        (reply, None) => {
            println!("{}", reply.unwrap_or(serde_json::Value::Null));
            SendOutcome::Replied
        }
    }
}

fn run_send(
    vp: &str,
    msg: &str,
    read: bool,
    timeout_ms: u64,
    api: Option<std::net::SocketAddr>,
    data_dir: &std::path::Path,
) -> Result<SendOutcome> {
    use vp_host::node::api::{SendAnswer, SendRequest};
    let msg: serde_json::Value =
        serde_json::from_str(msg).with_context(|| format!("the message is not JSON: {msg}"))?;
    let request = SendRequest {
        msg,
        read,
        timeout_ms: Some(timeout_ms),
    };
    let answer: SendAnswer = runtime()?
        .block_on(client(api, data_dir)?.post(&format!("/v1/vps/{vp}/send"), &request))?;
    Ok(print_answer(answer))
}

/// `vp-host destroy <vp>`: confirm (unless `yes`), then ask the local host.
fn run_destroy(
    vp: &str,
    yes: bool,
    api: Option<std::net::SocketAddr>,
    data_dir: &std::path::Path,
) -> Result<()> {
    use vp_host::node::api::DestroyAnswer;
    let client = client(api, data_dir)?;
    let rt = runtime()?;
    if !yes {
        if !std::io::stdin().is_terminal() {
            anyhow::bail!(
                "not destroying virtual peer {vp} without confirmation: standard input is not a \
                 terminal; pass --yes"
            );
        }
        eprint!(
            "This destroys virtual peer {vp}: every member stops and deletes its state; it cannot \
             be undone.\nType `{vp}` to confirm: "
        );
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        if line.trim() != vp {
            anyhow::bail!("not confirmed; nothing destroyed");
        }
    }
    let path = format!("/v1/vps/{vp}");
    let answer: DestroyAnswer = rt.block_on(client.delete(&path))?;
    if answer.already {
        println!("virtual peer {} was already destroyed", answer.vp);
    } else {
        println!(
            "destroyed virtual peer {}: its members stop and delete its state",
            answer.vp
        );
    }
    Ok(())
}

/// `vp-host drain`: ask the local host to leave, then wait (printing each
/// change) until it is a member of no virtual peer.
fn run_drain(
    timeout_s: u64,
    api: Option<std::net::SocketAddr>,
    data_dir: &std::path::Path,
) -> Result<()> {
    use vp_host::node::api::{DrainAnswer, HostStatus};
    let client = client(api, data_dir)?;
    let rt = runtime()?;
    rt.block_on(async {
        let answer: DrainAnswer = client.post("/v1/drain", &()).await?;
        println!(
            "leaving: this host takes no new member; handing over its {} membership(s)",
            answer.memberships
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(timeout_s);
        let mut left = answer.memberships;
        loop {
            if left == 0 {
                println!(
                    "this host is a member of no virtual peer: stop it now (Ctrl-C or SIGTERM to \
                     `vp-host join`). Started again with this data directory, it goes on \
                     leaving until `vp-host drain --cancel`"
                );
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "still a member of {left} virtual peer(s) after {timeout_s} s (the host goes \
                     on handing them over; `vp-host status` shows them)"
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            let status: HostStatus = client.get("/v1/status").await?;
            if status.virtual_peers.len() != left {
                left = status.virtual_peers.len();
                println!("{left} membership(s) left");
            }
        }
    })
}

/// `vp-host drain --cancel`: the local host takes members again.
fn run_stay(api: Option<std::net::SocketAddr>, data_dir: &std::path::Path) -> Result<()> {
    use vp_host::node::api::DrainAnswer;
    let client = client(api, data_dir)?;
    let answer: DrainAnswer = runtime()?.block_on(client.delete("/v1/drain"))?;
    println!(
        "staying: this host takes members again; it is a member of {} virtual peer(s)",
        answer.memberships
    );
    Ok(())
}

/// `vp-host logs <vp>`: the app's recent log lines; with `follow`, new ones
/// each second until interrupted (errors meanwhile are reported and retried).
fn run_logs(
    vp: &str,
    follow: bool,
    after: Option<&str>,
    json: bool,
    api: Option<std::net::SocketAddr>,
    data_dir: &std::path::Path,
) -> Result<()> {
    use vp_host::node::api::{LogsAnswer, parse_log_cursor};
    let client = client(api, data_dir)?;
    let rt = runtime()?;
    let mut cursor = match after {
        Some(text) => parse_log_cursor(text).map_err(anyhow::Error::msg)?,
        None => (0, 0),
    };
    rt.block_on(async {
        loop {
            let path = format!("/v1/vps/{vp}/logs?after={}.{}", cursor.0, cursor.1);
            let mut full = false;
            match client.get::<LogsAnswer>(&path).await {
                Ok(answer) => {
                    full = answer.lines.len() >= vp_host::vp::guest_log::GUEST_LOG_ANSWER_MAX;
                    if answer.skipped > 0 {
                        eprintln!("({} earlier line(s) not shown)", answer.skipped);
                    }
                    if answer.gap {
                        eprintln!(
                            "(lines after {}.{} may be missing: the member answering keeps its \
                             last {} lines, and only those since it started from a snapshot)",
                            cursor.0,
                            cursor.1,
                            vp_host::vp::guest_log::GUEST_LOG_LINES_MAX
                        );
                    }
                    for line in &answer.lines {
                        if json {
                            println!("{}", serde_json::to_string(line)?);
                        } else {
                            println!(
                                "{} {:<5} [{}.{}] {}",
                                utc_text(line.time_ms),
                                line.level,
                                line.slot,
                                line.n,
                                line.text
                            );
                        }
                        cursor = line.cursor();
                    }
                }
                Err(e) if follow => eprintln!("{e:#}; trying again"),
                Err(e) => return Err(e),
            }
            if full {
                // there may be more after the last line: the next page at once
                continue;
            }
            if !follow {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    })
}

/// `ms` since the Unix epoch as UTC, `2026-12-03T05:28:46.123Z`.
fn utc_text(ms: u64) -> String {
    let days = (ms / 86_400_000) as i64;
    let in_day = ms % 86_400_000;
    // Civil date from days since 1970-01-01, in 400-year eras starting in March.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        in_day / 3_600_000,
        in_day / 60_000 % 60,
        in_day / 1000 % 60,
        in_day % 1000
    )
}

/// `vp-host send <vp> -`: messages from standard input over one send stream,
/// at most `in_flight` at once, answers printed in input order. A line that
/// is not JSON, or a message that cannot be delivered, prints
/// `{"failed": ...}` in its place and the rest go on.
fn run_send_lines(
    vp: &str,
    in_flight: usize,
    read: bool,
    timeout_ms: u64,
    api: Option<std::net::SocketAddr>,
    data_dir: &std::path::Path,
) -> Result<SendOutcome> {
    use futures::StreamExt;
    use std::io::BufRead;
    use vp_host::node::api::SendRequest;
    let client = client(api, data_dir)?;
    let rt = runtime()?;
    rt.block_on(async {
        let stream = client.stream(vp).await?;
        // Lines are read on a blocking thread so a slow producer (a pipe)
        // does not hold up answers already due.
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<String>>(in_flight);
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let last = line.is_err();
                if tx.blocking_send(line).is_err() || last {
                    return;
                }
            }
        });
        let answers = tokio_stream_of(rx)
            .filter(|line| std::future::ready(!matches!(line, Ok(l) if l.trim().is_empty())))
            .map(|line| {
                let stream = stream.clone();
                async move {
                    let line = line.map_err(|e| format!("cannot read standard input: {e}"))?;
                    let msg: serde_json::Value = serde_json::from_str(&line)
                        .map_err(|e| format!("not JSON ({e}): {line}"))?;
                    let req = SendRequest {
                        msg,
                        read,
                        timeout_ms: Some(timeout_ms),
                    };
                    stream.send(req).await.map_err(|e| e.message)
                }
            })
            .buffered(in_flight);
        futures::pin_mut!(answers);
        let mut worst = SendOutcome::Replied;
        while let Some(answer) = answers.next().await {
            let outcome = match answer {
                Ok(answer) => print_answer(answer),
                Err(failed) => {
                    println!("{}", serde_json::json!({ "failed": failed }));
                    SendOutcome::Failed
                }
            };
            worst = worst.max(outcome);
        }
        Ok(worst)
    })
}

/// A stream of what arrives on `rx`.
fn tokio_stream_of<T>(rx: tokio::sync::mpsc::Receiver<T>) -> impl futures::Stream<Item = T> {
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

fn run_overlay(
    which: OverlayCommand,
    api: Option<std::net::SocketAddr>,
    data_dir: &std::path::Path,
) -> Result<()> {
    use vp_host::node::api::*;
    let client = client(api, data_dir)?;
    let rt = runtime()?;
    match which {
        OverlayCommand::Search { key } => {
            let answer: SearchAnswer =
                rt.block_on(client.post("/v1/overlay/search", &SearchRequest { key }))?;
            print_json(&answer)
        }
        OverlayCommand::Multicast {
            prefix,
            lo,
            hi,
            payload,
        } => {
            let request = MulticastRequest {
                prefix,
                lo,
                hi,
                payload,
            };
            let answer: MulticastAnswer =
                rt.block_on(client.post("/v1/overlay/multicast", &request))?;
            print_json(&answer)
        }
        OverlayCommand::Deliveries => {
            let list: Vec<DeliveryRecord> = rt.block_on(client.get("/v1/overlay/deliveries"))?;
            for d in list {
                print_json(&d)?;
            }
            Ok(())
        }
        OverlayCommand::Insert { key } => {
            let _: Done = rt.block_on(client.post("/v1/overlay/keys", &KeyRequest { key }))?;
            Ok(())
        }
        OverlayCommand::Remove { key } => {
            let _: Done =
                rt.block_on(client.post("/v1/overlay/keys/remove", &KeyRequest { key }))?;
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    // Like other Unix tools, end quietly when stdout is a closed pipe
    // (`vp-host status | head`) instead of panicking on the write.
    // SAFETY: called first thing in main, before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let data_dir = cli
        .data_dir
        .clone()
        .unwrap_or_else(vp_host::api::default_data_dir);
    let result = match cli.command {
        Command::Join(args) => {
            init_logging(cli.log_format, "info,libp2p=warn,libp2p_swarm=warn");
            run_join(args, data_dir, cli.api)
        }
        Command::Status { vp, json } => {
            init_logging(cli.log_format, "warn");
            run_status(vp, json, cli.api, &data_dir)
        }
        Command::Spawn(args) => {
            init_logging(cli.log_format, "warn");
            run_spawn(args, cli.api, &data_dir)
        }
        Command::Send {
            vp,
            msg,
            in_flight,
            read,
            timeout_ms,
        } => {
            init_logging(cli.log_format, "warn");
            let sent = if msg == "-" {
                run_send_lines(
                    &vp,
                    in_flight as usize,
                    read,
                    timeout_ms,
                    cli.api,
                    &data_dir,
                )
            } else {
                run_send(&vp, &msg, read, timeout_ms, cli.api, &data_dir)
            };
            match sent {
                Ok(SendOutcome::Replied) => Ok(()),
                Ok(SendOutcome::ErrorReply) => return ExitCode::from(3),
                Ok(SendOutcome::Failed) => return ExitCode::from(1),
                Err(e) => Err(e),
            }
        }
        Command::Destroy { vp, yes } => {
            init_logging(cli.log_format, "warn");
            run_destroy(&vp, yes, cli.api, &data_dir)
        }
        Command::Logs {
            vp,
            follow,
            after,
            json,
        } => {
            init_logging(cli.log_format, "warn");
            run_logs(&vp, follow, after.as_deref(), json, cli.api, &data_dir)
        }
        Command::Drain { cancel: true, .. } => {
            init_logging(cli.log_format, "warn");
            run_stay(cli.api, &data_dir)
        }
        Command::Drain { timeout, .. } => {
            init_logging(cli.log_format, "warn");
            run_drain(timeout, cli.api, &data_dir)
        }
        Command::Overlay { which } => {
            init_logging(cli.log_format, "warn");
            run_overlay(which, cli.api, &data_dir)
        }
        Command::NetworkKey { file } => {
            init_logging(cli.log_format, "warn");
            vp_host::net::identity::create_network_key(&file).map(|psk| {
                println!("wrote {} (fingerprint {}); pass it to every host: vp-host join --network-key {}", file.display(), psk.fingerprint(), file.display());
            })
        }
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
                BenchCommand::Commit {
                    clients,
                    streams,
                    message_bytes,
                    seconds,
                    rates,
                } => runtime().and_then(|rt| {
                    rt.block_on(vp_host::bench_vp::commit(
                        clients,
                        streams,
                        message_bytes,
                        seconds,
                        &rates,
                    ))
                    .and_then(|r| print_json(&r))
                }),
                BenchCommand::Failover { kills, clients } => runtime().and_then(|rt| {
                    rt.block_on(vp_host::bench_vp::failover(kills, clients))
                        .and_then(|r| print_json(&r))
                }),
                BenchCommand::Replace {
                    state_mib,
                    rounds,
                    replace_after_ms,
                } => runtime().and_then(|rt| {
                    rt.block_on(vp_host::bench_vp::replace(
                        state_mib,
                        rounds,
                        replace_after_ms,
                    ))
                    .and_then(|r| print_json(&r))
                }),
                BenchCommand::Snapshot { state_mib, rounds } => {
                    vp_host::bench::snapshot(state_mib, rounds).and_then(|r| print_json(&r))
                }
                BenchCommand::Alm { hosts, churn, seed } => {
                    let options = vp_alm::bench::AlmBenchOptions {
                        hosts,
                        churn_pct: churn,
                        seed,
                        ..vp_alm::bench::AlmBenchOptions::default()
                    };
                    print_json(&vp_alm::bench::run(options))
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
        Command::Demo(args) => {
            init_logging(cli.log_format, "warn");
            let json = args.json;
            let options = vp_host::demo::DemoOptions {
                hosts: args.hosts,
                members: args.members,
                messages: args.messages,
                kill_leader: args.kill_leader,
                dir: args.dir,
                keep: args.keep,
            };
            runtime()
                .and_then(|rt| rt.block_on(vp_host::demo::run(options)))
                .and_then(|summary| if json { print_json(&summary) } else { Ok(()) })
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
    fn log_times_print_as_utc() {
        assert_eq!(utc_text(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc_text(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(utc_text(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(utc_text(4_102_444_799_999), "2099-12-31T23:59:59.999Z");
    }

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
