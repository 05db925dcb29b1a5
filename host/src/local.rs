//! A cluster of `vp-host join` child processes on loopback.
//!
//! `vp-host demo`, the process benchmarks (`vp-host bench commit|failover|replace`)
//! and the process tests all run real hosts this way: one data directory and
//! one log file per host under a cluster directory, every host bootstrapped
//! through the first, all reached through their control APIs. Crashes are real
//! SIGKILLs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

use crate::api::{API_ADDR_FILE, ApiClient};
use crate::node::api::{DigestAnswer, HostStatus, SendAnswer, SendRequest};
use crate::node::vps::SpawnEvent;
use crate::vp::VpStatus;

/// How long a host may take to start its API and join the overlay.
pub const HOST_START_TIMEOUT: Duration = Duration::from_secs(60);
/// Log filter for the hosts' log files.
pub const DEFAULT_LOG_FILTER: &str = "info,vp_host=debug,libp2p=warn";

/// Poll `f` every `every` until it returns `Some` or `timeout` passes.
pub async fn poll<T, F>(timeout: Duration, every: Duration, mut f: impl FnMut() -> F) -> Option<T>
where
    F: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}

/// One `vp-host join` child process, killed when dropped.
pub struct LocalHost {
    pub name: String,
    pub data_dir: PathBuf,
    pub api: ApiClient,
    /// A multiaddr with `/p2p/<peer id>`, for bootstrapping others.
    pub listen: String,
    pub peer_id: String,
    pub host_id: String,
    child: Mutex<Option<Child>>,
}

impl LocalHost {
    /// Start `exe join` with its data in `dir/name` (kept across restarts),
    /// listening on loopback, and wait until its API answers.
    pub async fn start(
        exe: &Path,
        dir: &Path,
        name: &str,
        bootstrap: Option<&str>,
        extra: &[&str],
        log_filter: &str,
    ) -> Result<LocalHost> {
        let data_dir = dir.join(name);
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("cannot create {}", data_dir.display()))?;
        // After a restart the old API address is stale until the daemon writes the new one.
        let _ = std::fs::remove_file(data_dir.join(API_ADDR_FILE));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.join("host.log"))
            .context("cannot open the host's log file")?;
        let mut cmd = Command::new(exe);
        cmd.arg("--data-dir")
            .arg(&data_dir)
            .args(["--api", "127.0.0.1:0", "join"])
            .args(extra)
            .env("VP_LOG", log_filter)
            .env("NO_COLOR", "1")
            .env_remove("VP_LOG_FORMAT")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if !extra.contains(&"--listen") {
            cmd.args(["--listen", "/ip4/127.0.0.1/tcp/0"]);
        }
        if let Some(addr) = bootstrap {
            cmd.args(["--bootstrap", addr]);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", exe.display()))?;
        let addr_file = data_dir.join(API_ADDR_FILE);
        let mut exited = None;
        let api = poll(HOST_START_TIMEOUT, Duration::from_millis(20), || {
            let found = match child.try_wait() {
                Ok(None) => addr_file
                    .exists()
                    .then(|| ApiClient::locate(None, &data_dir).ok())
                    .flatten(),
                Ok(Some(status)) => {
                    exited = Some(status);
                    None
                }
                Err(_) => None,
            };
            // An exited host will not start its API: stop polling.
            let stop = exited.is_some();
            async move { if stop { Some(None) } else { found.map(Some) } }
        })
        .await
        .flatten();
        let Some(api) = api else {
            let _ = child.kill();
            let _ = child.wait();
            let what = match exited {
                Some(status) => format!("exited ({status})"),
                None => "did not start its control API".to_string(),
            };
            return Err(log_tail_error(name, &data_dir, &what));
        };
        let mut host = LocalHost {
            name: name.to_string(),
            data_dir,
            api,
            listen: String::new(),
            peer_id: String::new(),
            host_id: String::new(),
            child: Mutex::new(Some(child)),
        };
        let status = poll(HOST_START_TIMEOUT, Duration::from_millis(20), || async {
            host.status().await.ok()
        })
        .await
        .ok_or_else(|| host.failure("does not answer status"))?;
        let addr = status
            .listen_addrs
            .first()
            .ok_or_else(|| host.failure("listens nowhere"))?;
        host.listen = format!("{addr}/p2p/{}", status.peer_id);
        host.peer_id = status.peer_id;
        host.host_id = status.host_id;
        Ok(host)
    }

    fn failure(&self, what: &str) -> anyhow::Error {
        log_tail_error(&self.name, &self.data_dir, what)
    }

    /// The host's status over the control API.
    pub async fn status(&self) -> Result<HostStatus> {
        self.api.get("/v1/status").await
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child
            .lock()
            .expect("child lock")
            .as_ref()
            .map(Child::id)
    }

    /// Kill with SIGKILL (no graceful leave) and reap.
    pub fn kill(&self) {
        if let Some(mut child) = self.child.lock().expect("child lock").take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stop with SIGTERM (graceful leave) and wait.
    pub fn terminate(&self) {
        if let Some(mut child) = self.child.lock().expect("child lock").take() {
            // SAFETY: kill(2) with a pid we own and have not reaped.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
            let _ = child.wait();
        }
    }

    /// Whether the process still runs (it may have exited by itself).
    pub fn is_running(&self) -> bool {
        let mut child = self.child.lock().expect("child lock");
        match child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(_) => {
                *child = None;
                false
            }
            None => false,
        }
    }

    /// The host's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("host.log")).unwrap_or_default()
    }
}

impl Drop for LocalHost {
    fn drop(&mut self) {
        self.kill();
    }
}

/// "host NAME WHAT", with the end of its log.
fn log_tail_error(name: &str, data_dir: &Path, what: &str) -> anyhow::Error {
    let path = data_dir.join("host.log");
    let log = std::fs::read_to_string(&path).unwrap_or_default();
    let mut tail: Vec<&str> = log.lines().rev().take(10).collect();
    tail.reverse();
    anyhow!(
        "host {name} {what}; the end of its log ({}):\n{}",
        path.display(),
        tail.join("\n")
    )
}

/// Hosts on loopback, all joined through the first.
pub struct LocalCluster {
    pub dir: PathBuf,
    pub exe: PathBuf,
    pub hosts: Vec<LocalHost>,
    pub log_filter: String,
    /// Each host's own `join` arguments (kept for its restarts).
    pub args: Vec<Vec<String>>,
}

impl LocalCluster {
    /// Start `n` hosts of `exe` under `dir` and wait until each has joined the overlay.
    pub async fn start(exe: &Path, dir: &Path, n: usize, log_filter: &str) -> Result<LocalCluster> {
        LocalCluster::start_with(exe, dir, &vec![Vec::new(); n], log_filter).await
    }

    /// `start`, one host per entry of `args`, each with those extra `join`
    /// arguments (e.g. `--memberships-max 1`).
    pub async fn start_with(
        exe: &Path,
        dir: &Path,
        args: &[Vec<String>],
        log_filter: &str,
    ) -> Result<LocalCluster> {
        let extra = |i: usize| args[i].iter().map(String::as_str).collect::<Vec<_>>();
        let first = LocalHost::start(exe, dir, "h0", None, &extra(0), log_filter).await?;
        let bootstrap = first.listen.clone();
        let mut hosts = vec![first];
        for i in 1..args.len() {
            let name = format!("h{i}");
            hosts.push(
                LocalHost::start(exe, dir, &name, Some(&bootstrap), &extra(i), log_filter).await?,
            );
        }
        let cluster = LocalCluster {
            dir: dir.to_path_buf(),
            exe: exe.to_path_buf(),
            hosts,
            log_filter: log_filter.to_string(),
            args: args.to_vec(),
        };
        for h in &cluster.hosts {
            poll(HOST_START_TIMEOUT, Duration::from_millis(50), || async {
                h.status()
                    .await
                    .ok()
                    .filter(|s| s.overlay.joined)
                    .map(|_| ())
            })
            .await
            .ok_or_else(|| h.failure("did not join the overlay"))?;
        }
        Ok(cluster)
    }

    /// A running host's listen address, for bootstrapping a restart.
    pub fn live_bootstrap(&self, except: usize) -> Result<String> {
        self.hosts
            .iter()
            .enumerate()
            .find(|(i, h)| *i != except && h.is_running())
            .map(|(_, h)| h.listen.clone())
            .ok_or_else(|| anyhow!("no live host to bootstrap through"))
    }

    /// Restart host `i` with its data directory and its listen address (as a
    /// volunteer's machine restarts on its configured port), through a live host.
    pub async fn restart(&mut self, i: usize) -> Result<()> {
        let bootstrap = self.live_bootstrap(i)?;
        let name = self.hosts[i].name.clone();
        let listen = self.hosts[i]
            .listen
            .split("/p2p/")
            .next()
            .unwrap_or_default()
            .to_string();
        self.hosts[i].kill();
        let mut extra = vec!["--listen", &listen];
        extra.extend(self.args.get(i).into_iter().flatten().map(String::as_str));
        self.hosts[i] = LocalHost::start(
            &self.exe,
            &self.dir,
            &name,
            Some(&bootstrap),
            &extra,
            &self.log_filter,
        )
        .await?;
        Ok(())
    }

    /// The index of the running host with this host id.
    pub fn index_of(&self, host_id: &str) -> Option<usize> {
        self.hosts
            .iter()
            .position(|h| h.host_id == host_id && h.is_running())
    }

    /// Deploy `wasm` as a virtual peer through host `via`; `query` is the
    /// spawn route's query string (e.g. `members=3&name=x`). Progress lines go
    /// to `progress`. Returns the virtual peer's id.
    pub async fn spawn(
        &self,
        via: usize,
        wasm: &[u8],
        query: &str,
        mut progress: impl FnMut(&SpawnEvent),
    ) -> Result<String> {
        let mut outcome = None;
        self.hosts[via]
            .api
            .post_lines(&format!("/v1/vps?{query}"), wasm.to_vec(), |line| {
                match serde_json::from_str::<SpawnEvent>(line) {
                    Ok(event) => {
                        progress(&event);
                        match event {
                            SpawnEvent::Done { vp, .. } => outcome = Some(Ok(vp)),
                            SpawnEvent::Failed { error } => outcome = Some(Err(anyhow!("{error}"))),
                            SpawnEvent::Progress { .. } => {}
                        }
                    }
                    Err(e) => outcome = Some(Err(anyhow!("bad progress line {line:?}: {e}"))),
                }
            })
            .await?;
        outcome.unwrap_or_else(|| Err(anyhow!("the spawn ended without an outcome")))
    }

    /// Send `msg` to `vp` through host `via` (`read`: the read path).
    pub async fn send(
        &self,
        via: usize,
        vp: &str,
        msg: serde_json::Value,
        read: bool,
    ) -> Result<SendAnswer> {
        let req = SendRequest {
            msg,
            read,
            timeout_ms: Some(60_000),
        };
        self.hosts[via]
            .api
            .post(&format!("/v1/vps/{vp}/send"), &req)
            .await
    }

    /// Send and expect a reply (an error reply is an error).
    pub async fn ask(
        &self,
        via: usize,
        vp: &str,
        msg: serde_json::Value,
    ) -> Result<serde_json::Value> {
        let answer = self
            .send(via, vp, msg.clone(), false)
            .await
            .with_context(|| format!("sending {msg}"))?;
        match (answer.reply, answer.error) {
            (_, Some(e)) => bail!("{msg} got an error reply: {e}"),
            (reply, None) => Ok(reply.unwrap_or(serde_json::Value::Null)),
        }
    }

    /// The virtual peer's status as host `via` sees it (its own member's, or the leader's).
    pub async fn vp_status(&self, via: usize, vp: &str) -> Result<VpStatus> {
        self.hosts[via].api.get(&format!("/v1/vps/{vp}")).await
    }

    /// The virtual peer's status through host `via`, or, if it does not
    /// answer (killed), through the first running host that does.
    pub async fn any_vp_status(&self, via: usize, vp: &str) -> Option<VpStatus> {
        let order = std::iter::once(via).chain((0..self.hosts.len()).filter(|&i| i != via));
        for i in order {
            if self.hosts[i].is_running()
                && let Ok(s) = self.vp_status(i, vp).await
            {
                return Some(s);
            }
        }
        None
    }

    /// Wait until the virtual peer has `n` voters, none of them in `excluded`,
    /// a leader, and no learner; return its status. Asks `via`, or another
    /// running host if `via` does not answer.
    pub async fn wait_voters(
        &self,
        via: usize,
        vp: &str,
        n: usize,
        excluded: &[String],
        timeout: Duration,
    ) -> Result<VpStatus> {
        let last = std::cell::RefCell::new(None);
        let found = poll(timeout, Duration::from_millis(50), || {
            let last = &last;
            async move {
                let s = self.any_vp_status(via, vp).await?;
                if s.is_whole(n, excluded) {
                    return Some(s);
                }
                *last.borrow_mut() = Some(s);
                None
            }
        })
        .await;
        found.ok_or_else(|| {
            anyhow!(
                "virtual peer {vp} did not reach {n} voters without {excluded:?}; last seen: {:?}",
                last.borrow()
            )
        })
    }

    /// The state digest of each voter's copy, by host id.
    pub async fn digests(&self, vp: &str, voters: &[String]) -> Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        for v in voters {
            let i = self
                .index_of(v)
                .ok_or_else(|| anyhow!("voter {v} is not a live host"))?;
            let d: DigestAnswer = self.hosts[i]
                .api
                .get(&format!("/v1/vps/{vp}/digest"))
                .await?;
            out.push((v.clone(), d.digest));
        }
        Ok(out)
    }
}
