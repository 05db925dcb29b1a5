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
    let log = std::fs::File::create(data_dir.join("host.log")).expect("log file");
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
