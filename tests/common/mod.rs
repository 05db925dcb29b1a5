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
pub struct Host {
    pub name: String,
    pub data_dir: PathBuf,
    pub child: Option<std::process::Child>,
    pub api: vp_host::api::ApiClient,
    pub listen: String,
}

impl Host {
    /// Status over the control API.
    pub async fn status(&self) -> anyhow::Result<vp_host::node::api::HostStatus> {
        self.api.get("/v1/status").await
    }

    /// Kill with SIGKILL (no graceful leave).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGKILL without waiting (for a host shared behind an `Arc`).
    pub fn sigkill(&self) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill").args(["-KILL", &child.id().to_string()]).status();
        }
    }

    /// Stop with SIGTERM and wait.
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            send_sigterm(child.id());
            let _ = child.wait();
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The host's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("host.log")).unwrap_or_default()
    }
}

fn send_sigterm(pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Start `vp-host join` with data in `dir`, bootstrapping through `bootstrap`.
pub async fn start_host(dir: &Path, name: &str, bootstrap: Option<&str>, extra: &[&str]) -> Host {
    let data_dir = dir.join(name);
    std::fs::create_dir_all(&data_dir).expect("data dir");
    // A restart: the old API address is stale until the daemon writes the new one.
    let _ = std::fs::remove_file(data_dir.join(vp_host::api::API_ADDR_FILE));
    let log = std::fs::OpenOptions::new().create(true).append(true).open(data_dir.join("host.log")).expect("log file");
    let mut cmd = vp_host();
    cmd.arg("--data-dir")
        .arg(&data_dir)
        .args([
            "--api",
            "127.0.0.1:0",
            "join",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ])
        .args(extra)
        .env("VP_LOG", "info,vp_host=debug,libp2p=warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
    if let Some(addr) = bootstrap {
        cmd.args(["--bootstrap", addr]);
    }
    let child = cmd.spawn().expect("vp-host join starts");
    // The daemon records its API address once it listens.
    let api = wait_for(std::time::Duration::from_secs(60), || {
        vp_host::api::ApiClient::locate(None, &data_dir)
            .ok()
            .filter(|_| data_dir.join(vp_host::api::API_ADDR_FILE).exists())
    })
    .await
    .unwrap_or_else(|| panic!("{name} did not start its API"));
    let mut host = Host {
        name: name.to_string(),
        data_dir,
        child: Some(child),
        api,
        listen: String::new(),
    };
    let status = wait_for_async(std::time::Duration::from_secs(60), || async {
        host.status().await.ok()
    })
    .await
    .unwrap_or_else(|| panic!("{name} does not answer status"));
    host.listen = format!("{}/p2p/{}", status.listen_addrs[0], status.peer_id);
    host
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
    mut f: impl FnMut() -> F,
) -> Option<T> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A set of hosts on loopback, all joined through the first.
pub struct Cluster {
    pub dir: PathBuf,
    pub hosts: Vec<Host>,
}

impl Cluster {
    /// Start `n` hosts and wait until each has joined the overlay.
    pub async fn start(name: &str, n: usize) -> Cluster {
        let dir = scratch_dir(name);
        let first = start_host(&dir, "h0", None, &[]).await;
        let bootstrap = first.listen.clone();
        let mut hosts = vec![first];
        for i in 1..n {
            hosts.push(start_host(&dir, &format!("h{i}"), Some(&bootstrap), &[]).await);
        }
        let cluster = Cluster { dir, hosts };
        for h in &cluster.hosts {
            let joined = wait_for_async(std::time::Duration::from_secs(60), || async {
                h.status().await.ok().filter(|s| s.overlay.joined).map(|_| ())
            })
            .await;
            assert!(joined.is_some(), "{} did not join the overlay", h.name);
        }
        cluster
    }

    /// A running host's listen address, for bootstrapping a restart.
    pub fn live_bootstrap(&self, except: usize) -> String {
        self.hosts.iter().enumerate().find(|(i, h)| *i != except && h.is_running()).map(|(_, h)| h.listen.clone()).expect("a live host")
    }

    /// Restart host `i` with its data directory, through a live host.
    pub async fn restart(&mut self, i: usize) {
        let bootstrap = self.live_bootstrap(i);
        let name = self.hosts[i].name.clone();
        self.hosts[i] = start_host(&self.dir, &name, Some(&bootstrap), &[]).await;
    }

    /// The index of the host with this host id.
    pub async fn index_of(&self, host_id: &str) -> Option<usize> {
        for (i, h) in self.hosts.iter().enumerate().filter(|(_, h)| h.is_running()) {
            // a host that does not answer (killed) is skipped
            if h.status().await.is_ok_and(|s| s.host_id == host_id) {
                return Some(i);
            }
        }
        None
    }

    /// Deploy `wasm` as a virtual peer through host `via`; returns its id.
    pub async fn spawn(&self, via: usize, wasm: &[u8], query: &str) -> anyhow::Result<String> {
        let mut outcome = None;
        self.hosts[via]
            .api
            .post_lines(&format!("/v1/vps?members=3{query}"), wasm.to_vec(), |line| {
                let v: serde_json::Value = serde_json::from_str(line).expect("JSON line");
                if let Some(done) = v.get("done") {
                    outcome = Some(Ok(done["vp"].as_str().expect("vp id").to_string()));
                } else if let Some(failed) = v.get("failed") {
                    outcome = Some(Err(anyhow::anyhow!("{}", failed["error"])));
                }
            })
            .await?;
        outcome.unwrap_or_else(|| Err(anyhow::anyhow!("spawn ended without an outcome")))
    }

    /// Send `msg` to `vp` through host `via`.
    pub async fn send(&self, via: usize, vp: &str, msg: serde_json::Value) -> anyhow::Result<vp_host::node::api::SendAnswer> {
        let req = vp_host::node::api::SendRequest { msg, read: false, timeout_ms: Some(60_000) };
        self.hosts[via].api.post(&format!("/v1/vps/{vp}/send"), &req).await
    }

    /// Send and expect a reply (not an error reply).
    pub async fn ask(&self, via: usize, vp: &str, msg: serde_json::Value) -> serde_json::Value {
        let answer = self.send(via, vp, msg.clone()).await.unwrap_or_else(|e| panic!("sending {msg}: {e:#}"));
        match (answer.reply, answer.error) {
            (_, Some(e)) => panic!("{msg} got an error reply: {e}"),
            (reply, None) => reply.unwrap_or(serde_json::Value::Null),
        }
    }

    /// The virtual peer's status as host `via` sees it (its own member, or the leader's).
    pub async fn vp_status(&self, via: usize, vp: &str) -> anyhow::Result<vp_host::vp::VpStatus> {
        self.hosts[via].api.get(&format!("/v1/vps/{vp}")).await
    }

    /// Wait until the virtual peer has `n` voters, none of them `excluded`,
    /// a leader, and no learner; return its status.
    pub async fn wait_voters(&self, via: usize, vp: &str, n: usize, excluded: &[String]) -> vp_host::vp::VpStatus {
        let mut last = None;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(90);
        while tokio::time::Instant::now() < deadline {
            if let Ok(s) = self.vp_status(via, vp).await {
                let ok = s.voters.len() == n
                    && s.learners.is_empty()
                    && s.leader.is_some()
                    && !s.voters.iter().any(|v| excluded.contains(v));
                if ok {
                    return s;
                }
                last = Some(s);
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        panic!("virtual peer {vp} did not reach {n} voters without {excluded:?}: {last:?}")
    }

    /// The state digest of each voter's copy, by host id.
    pub async fn digests(&self, vp: &str, voters: &[String]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for v in voters {
            let i = self.index_of(v).await.unwrap_or_else(|| panic!("voter {v} is not a live host"));
            let d: vp_host::node::api::DigestAnswer =
                self.hosts[i].api.get(&format!("/v1/vps/{vp}/digest")).await.expect("digest");
            out.push((v.clone(), d.digest));
        }
        out
    }
}
