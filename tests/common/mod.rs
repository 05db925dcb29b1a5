//! Helpers shared by the process-level tests.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The `vp-host` binary cargo built for these tests.
pub fn vp_host() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vp-host"));
    cmd.env_remove("VP_LOG").env("NO_COLOR", "1");
    cmd
}

/// Run `vp-host` with `args`, feeding `stdin`.
pub fn run(args: &[&str], stdin: &str) -> Output {
    let mut child = vp_host()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vp-host starts");
    child
        .stdin
        .take()
        .expect("stdin piped")
        .write_all(stdin.as_bytes())
        .expect("stdin written");
    child.wait_with_output().expect("vp-host finishes")
}

/// Standard output as lines.
pub fn stdout_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// A scratch directory under the target directory, emptied first.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// A `vp-host join` process on loopback, killed when dropped.
pub use vp_host::local::LocalHost as Host;

/// Start `vp-host join` with data in `dir/name`, bootstrapping through `bootstrap`.
pub async fn start_host(dir: &Path, name: &str, bootstrap: Option<&str>, extra: &[&str]) -> Host {
    let exe = Path::new(env!("CARGO_BIN_EXE_vp-host"));
    Host::start(
        exe,
        dir,
        name,
        bootstrap,
        extra,
        vp_host::local::DEFAULT_LOG_FILTER,
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Poll `f` until it returns Some or `timeout` passes.
pub async fn wait_for<T>(
    timeout: std::time::Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if tokio::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Poll the async `f` until it returns Some or `timeout` passes.
pub async fn wait_for_async<T, F: std::future::Future<Output = Option<T>>>(
    timeout: std::time::Duration,
    f: impl FnMut() -> F,
) -> Option<T> {
    vp_host::local::poll(timeout, std::time::Duration::from_millis(100), f).await
}

/// Hosts on loopback, all joined through the first: `vp_host::local::LocalCluster`
/// with methods that panic with a clear message instead of returning errors.
pub struct Cluster {
    inner: vp_host::local::LocalCluster,
}

impl std::ops::Deref for Cluster {
    type Target = vp_host::local::LocalCluster;
    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl Cluster {
    /// Start `n` hosts under a fresh scratch directory and wait until each has joined the overlay.
    pub async fn start(name: &str, n: usize) -> Cluster {
        let dir = scratch_dir(name);
        let exe = Path::new(env!("CARGO_BIN_EXE_vp-host"));
        let inner =
            vp_host::local::LocalCluster::start(exe, &dir, n, vp_host::local::DEFAULT_LOG_FILTER)
                .await
                .unwrap_or_else(|e| panic!("{e:#}"));
        Cluster { inner }
    }

    /// `start`, one host per entry of `args`, each with those extra `join` arguments.
    pub async fn start_with(name: &str, args: &[&[&str]]) -> Cluster {
        let dir = scratch_dir(name);
        let exe = Path::new(env!("CARGO_BIN_EXE_vp-host"));
        let args: Vec<Vec<String>> = args
            .iter()
            .map(|a| a.iter().map(|s| s.to_string()).collect())
            .collect();
        let inner = vp_host::local::LocalCluster::start_with(
            exe,
            &dir,
            &args,
            vp_host::local::DEFAULT_LOG_FILTER,
        )
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
        Cluster { inner }
    }

    /// Restart host `i` with its data directory, through a live host.
    pub async fn restart(&mut self, i: usize) {
        self.inner
            .restart(i)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// Restart host `i` as `restart` does, with other `join` arguments.
    pub async fn restart_with(&mut self, i: usize, args: &[&str]) {
        self.inner.args[i] = args.iter().map(|s| s.to_string()).collect();
        self.restart(i).await;
    }

    /// The index of the running host with this host id.
    pub async fn index_of(&self, host_id: &str) -> Option<usize> {
        self.inner.index_of(host_id)
    }

    /// Deploy `wasm` with 3 members through host `via`; `query` adds to the
    /// query string (e.g. `&name=x`). Returns the virtual peer's id.
    pub async fn spawn(&self, via: usize, wasm: &[u8], query: &str) -> anyhow::Result<String> {
        self.inner
            .spawn(via, wasm, &format!("members=3{query}"), |_| {})
            .await
    }

    /// Deploy `wasm` through host `via` with the spawn route's whole query
    /// string (e.g. `members=1`). Returns the virtual peer's id.
    pub async fn spawn_with(&self, via: usize, wasm: &[u8], query: &str) -> anyhow::Result<String> {
        self.inner.spawn(via, wasm, query, |_| {}).await
    }

    /// Send `msg` to `vp` through host `via`.
    pub async fn send(
        &self,
        via: usize,
        vp: &str,
        msg: serde_json::Value,
    ) -> anyhow::Result<vp_host::node::api::SendAnswer> {
        self.inner.send(via, vp, msg, false).await
    }

    /// Send and expect a reply (not an error reply).
    pub async fn ask(&self, via: usize, vp: &str, msg: serde_json::Value) -> serde_json::Value {
        self.inner
            .ask(via, vp, msg)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Wait (90 s at most) until the virtual peer has `n` voters, none of them
    /// `excluded`, a leader, and no learner; return its status.
    pub async fn wait_voters(
        &self,
        via: usize,
        vp: &str,
        n: usize,
        excluded: &[String],
    ) -> vp_host::vp::VpStatus {
        self.inner
            .wait_voters(via, vp, n, excluded, std::time::Duration::from_secs(90))
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// The state digest of each voter's copy, by host id.
    pub async fn digests(&self, vp: &str, voters: &[String]) -> Vec<(String, String)> {
        self.inner
            .digests(vp, voters)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }
}
