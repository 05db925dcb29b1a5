//! Stall watchdog: notices when the async runtime or the node task stops
//! making progress and records, while it is stuck, what each thread of the
//! process is doing (state, system call, kernel wait channel, from /proc).
//!
//! A host that stops running for half a second misses elections and
//! heartbeats; the watchdog turns such a pause from a silent gap in the log
//! into a warning that says which thread was blocked where. It reads only
//! this process's own /proc entries and costs one atomic load per check.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What keeps beating while the host is healthy.
#[derive(Clone, Copy, Debug)]
pub enum Beat {
    /// A task on the tokio runtime's worker threads.
    Runtime = 0,
    /// The node task's 25 ms tick (the node is one task: a long input
    /// stops it while the other tasks run on).
    Node = 1,
    /// A member thread's loop, which wakes at least every 20 ms. Shared by
    /// all member threads of the host: with one virtual peer per host (the
    /// benchmarks) it is that member's; with several, only a stall of all
    /// of them shows.
    Member = 2,
}

const BEAT_NAMES: [&str; 3] = ["async runtime", "node task", "member thread"];
static BEATS: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];
static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// A beat older than this is a stall.
pub const STALL_AFTER: Duration = Duration::from_millis(200);
/// How often the runtime beats and the watchdog looks.
const PERIOD: Duration = Duration::from_millis(20);

fn now_ms() -> u64 {
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Records that `beat` made progress now.
pub fn beat(beat: Beat) {
    BEATS[beat as usize].store(now_ms().max(1), Ordering::Relaxed);
}

static MEMBERS_RUNNING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Held by a running member thread: while none runs, [`Beat::Member`] is not
/// watched (a host whose last member left is not stalled).
pub struct MemberRunning(());

impl MemberRunning {
    pub fn new() -> MemberRunning {
        MEMBERS_RUNNING.fetch_add(1, Ordering::Relaxed);
        beat(Beat::Member);
        MemberRunning(())
    }
}

impl Default for MemberRunning {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for MemberRunning {
    fn drop(&mut self) {
        if MEMBERS_RUNNING.fetch_sub(1, Ordering::Relaxed) == 1 {
            BEATS[Beat::Member as usize].store(0, Ordering::Relaxed);
        }
    }
}

/// Starts the watchdog: a runtime task that beats, and a thread that looks.
/// Call from inside the runtime; once per process (later calls, as from a
/// second node in one test process, do nothing). A beat that has never
/// beaten is not watched.
pub fn start() {
    static STARTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if STARTED.swap(true, Ordering::Relaxed) {
        return;
    }
    now_ms();
    tokio::spawn(async {
        let mut tick = tokio::time::interval(PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            beat(Beat::Runtime);
        }
    });
    let spawned = std::thread::Builder::new()
        .name("vp-watchdog".into())
        .spawn(watch);
    if let Err(e) = spawned {
        tracing::warn!("cannot start the stall watchdog: {e}");
    }
}

fn watch() {
    // Per beat: when the current stall was reported (its start), if any.
    let mut reported: [Option<u64>; 3] = [None; 3];
    loop {
        std::thread::sleep(PERIOD);
        let now = now_ms();
        for (i, b) in BEATS.iter().enumerate() {
            let last = b.load(Ordering::Relaxed);
            if last == 0 {
                reported[i] = None;
                continue;
            }
            let silent = now.saturating_sub(last);
            match reported[i] {
                None if silent >= STALL_AFTER.as_millis() as u64 => {
                    // Look first: logging may be what is blocked.
                    let threads = threads_now();
                    reported[i] = Some(last);
                    tracing::warn!(
                        silent_ms = silent,
                        "the {} has not run for {silent} ms; threads now: {threads}",
                        BEAT_NAMES[i]
                    );
                }
                Some(since) if last != since => {
                    reported[i] = None;
                    tracing::warn!(
                        stalled_ms = last.saturating_sub(since),
                        "the {} runs again after a stall of about {} ms",
                        BEAT_NAMES[i],
                        last.saturating_sub(since)
                    );
                }
                _ => {}
            }
        }
    }
}

/// One line per thread of this process that is not idle in the usual
/// places: `name state syscall [wchan] [kernel stack top]`.
pub fn threads_now() -> String {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return "(no /proc)".into();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let path = entry.path();
        let read = |f: &str| std::fs::read_to_string(path.join(f)).unwrap_or_default();
        let comm = read("comm").trim().to_string();
        if comm == "vp-watchdog" {
            continue;
        }
        let stat = read("stat");
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .unwrap_or("?")
            .to_string();
        let syscall = syscall_name(read("syscall").split_whitespace().next().unwrap_or("?"));
        let wchan = read("wchan");
        let mut line = format!("{comm} {state} {syscall}");
        if !wchan.is_empty() && wchan != "0" {
            line.push_str(&format!(" wchan={wchan}"));
        }
        if state == "D" {
            // Kernel stack of a thread blocked in the kernel (needs root).
            let stack: Vec<String> = read("stack")
                .lines()
                .take(6)
                .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
                .collect();
            if !stack.is_empty() {
                line.push_str(&format!(" stack={}", stack.join("<")));
            }
        }
        out.push(line);
    }
    out.sort();
    out.join("; ")
}

/// Names of the system calls a host's threads usually wait in (x86_64
/// numbers; others are printed as numbers).
fn syscall_name(nr: &str) -> String {
    let name = match (std::env::consts::ARCH, nr) {
        (_, "running") => "running",
        ("x86_64", "0") => "read",
        ("x86_64", "1") => "write",
        ("x86_64", "7") => "poll",
        ("x86_64", "17") => "pread64",
        ("x86_64", "18") => "pwrite64",
        ("x86_64", "20") => "writev",
        ("x86_64", "44") => "sendto",
        ("x86_64", "45") => "recvfrom",
        ("x86_64", "74") => "fsync",
        ("x86_64", "75") => "fdatasync",
        ("x86_64", "202") => "futex",
        ("x86_64", "230") => "clock_nanosleep",
        ("x86_64", "232") => "epoll_wait",
        ("x86_64", "281") => "epoll_pwait",
        _ => return format!("syscall:{nr}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_now_lists_this_thread_running() {
        let me = std::thread::Builder::new()
            .name("watchdog-probe".into())
            .spawn(threads_now)
            .expect("spawn")
            .join()
            .expect("join");
        let line = me
            .split("; ")
            .find(|l| l.starts_with("watchdog-probe "))
            .unwrap_or_else(|| panic!("no line for the probe thread in {me}"));
        // The thread reading /proc is running (state R), in the read of
        // its own syscall file.
        assert_eq!(line, "watchdog-probe R read", "{me}");
    }
}
