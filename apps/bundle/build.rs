//! Compile the example apps to wasm32-unknown-unknown and embed them.
//!
//! Runs a nested `cargo build` with its own target directory (the outer build
//! holds the lock on the main one), in release mode, with the workspace's
//! `.cargo/config.toml` flags for wasm32.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const APPS: [&str; 4] = ["counter", "kv", "chat", "stress"];
const TARGET: &str = "wasm32-unknown-unknown";

fn main() {
    let manifest_dir =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir
        .join("../..")
        .canonicalize()
        .expect("workspace root exists");
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    for path in [
        "guest-sdk",
        "apps/counter",
        "apps/kv",
        "apps/chat",
        "apps/stress",
        "Cargo.lock",
        ".cargo/config.toml",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(path).display());
    }

    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    check_target_installed();
    let target_dir = shared_target_dir(&out_dir).join("guest-build");
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&workspace)
        .args(["build", "--release", "--target", TARGET, "--target-dir"])
        .arg(&target_dir);
    for app in APPS {
        cmd.args(["-p", app]);
    }
    // The outer build's settings are not the guests' settings.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cargo}: {e}"));
    if !status.success() {
        panic!("building the example apps for {TARGET} failed (see the cargo output above)");
    }
    for app in APPS {
        let built = target_dir
            .join(TARGET)
            .join("release")
            .join(format!("{app}.wasm"));
        std::fs::copy(&built, out_dir.join(format!("{app}.wasm")))
            .unwrap_or_else(|e| panic!("cannot copy {}: {e}", built.display()));
    }
}

/// The outer target directory (it holds `CACHEDIR.TAG`), so debug, release
/// and clippy builds share one guest build.
fn shared_target_dir(out_dir: &Path) -> PathBuf {
    out_dir
        .ancestors()
        .find(|dir| dir.join("CACHEDIR.TAG").exists())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| out_dir.to_path_buf())
}

fn check_target_installed() {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success());
    if let Some(out) = sysroot {
        let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if !sysroot.join("lib/rustlib").join(TARGET).exists() {
            panic!("the {TARGET} target is not installed: run `rustup target add {TARGET}`");
        }
    }
}
