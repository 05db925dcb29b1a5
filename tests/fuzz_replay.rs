//! A bounded run of every fuzz target (`host/fuzz`, `vp_host::fuzzing`) in the
//! normal test suite: each target runs over its committed corpus
//! (`host/fuzz/corpus/<target>/`), over the seeds the current encoders make,
//! and over a deterministic, seeded set of mutations of both (bit flips,
//! interesting bytes, truncations, splices, length-field edits, insertions).
//!
//! A panic fails the test and names the input, which is also written to
//! `<target dir>/tmp/fuzz_replay/<target>-<n>` so it can be replayed with
//! `cargo fuzz run <target> <file>` or added to the corpus. Every single
//! allocation above `ALLOCATION_BYTES_MAX` (and live memory above
//! `LIVE_BYTES_MAX`) aborts the run after printing the input, and an input
//! that runs longer than `INPUT_SECONDS_MAX` does too: those are the
//! "unbounded allocation" and "hang" failures of a fuzzer.
//!
//! The mutation count is bounded, and so is the time spent per target
//! (`MUTATION_SECONDS`): on a slow machine fewer mutants run, never a failure
//! for slowness. `VP_FUZZ_REPLAY_MUTANTS=<n>` changes the count, e.g. for a
//! longer run.
//!
//! `cargo run -p vp-host --example fuzz_seeds` (re)writes the seed files
//! `host/fuzz/corpus/<target>/seed-*`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use vp_host::fuzzing::{self, Target};

/// One allocation larger than this is a bug in the code under test.
const ALLOCATION_BYTES_MAX: usize = 256 << 20;
/// Live heap of the whole test process above this is a bug too.
const LIVE_BYTES_MAX: usize = 2 << 30;
/// An input that runs longer than this is a hang.
const INPUT_SECONDS_MAX: u64 = 120;
/// Time spent on mutants per target, at most.
const MUTATION_SECONDS: f64 = 2.0;

// ----- the allocation cap ----------------------------------------------------------

struct Capped;

static LIVE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// The input the current thread is running (for the abort message).
    static CURRENT: Cell<(*const u8, usize, &'static str)> =
        const { Cell::new((std::ptr::null(), 0, "")) };
}

fn write_raw(bytes: &[u8]) {
    // Straight to the file descriptor: no allocation, not captured.
    let _ = std::io::stderr().write_all(bytes);
}

/// Print the current input without allocating, then abort.
fn die(what: &str, size: usize) -> ! {
    let (ptr, len, target) = CURRENT.with(Cell::get);
    die_with(what, size, target, ptr, len)
}

fn die_with(what: &str, size: usize, target: &str, ptr: *const u8, len: usize) -> ! {
    write_raw(b"\nfuzz_replay: ");
    write_raw(what.as_bytes());
    let mut num = [0u8; 20];
    let mut n = size;
    let mut at = num.len();
    loop {
        at -= 1;
        num[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    write_raw(b" (");
    write_raw(&num[at..]);
    write_raw(b") while running target ");
    write_raw(target.as_bytes());
    write_raw(b" on this input (hex):\n");
    if !ptr.is_null() {
        // SAFETY: `run_one` keeps the input alive (and unchanged) while it runs.
        let input = unsafe { std::slice::from_raw_parts(ptr, len) };
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for chunk in input.chunks(64) {
            let mut line = [0u8; 129];
            for (i, b) in chunk.iter().enumerate() {
                line[2 * i] = HEX[usize::from(b >> 4)];
                line[2 * i + 1] = HEX[usize::from(b & 15)];
            }
            line[2 * chunk.len()] = b'\n';
            write_raw(&line[..2 * chunk.len() + 1]);
        }
    }
    std::process::abort();
}

// SAFETY: forwards to the system allocator; only refuses (aborts) oversized requests.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: same contract as ours.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: same contract as ours.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(new_size);
        // SAFETY: same contract as ours.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            LIVE.fetch_add(new_size, Ordering::Relaxed);
        }
        p
    }
}

fn check(size: usize) {
    if size > ALLOCATION_BYTES_MAX {
        die("allocation above ALLOCATION_BYTES_MAX", size);
    }
    let live = LIVE.load(Ordering::Relaxed);
    if live.saturating_add(size) > LIVE_BYTES_MAX {
        die("live heap above LIVE_BYTES_MAX", live + size);
    }
}

#[global_allocator]
static ALLOCATOR: Capped = Capped;

// ----- the hang watchdog -----------------------------------------------------------

/// An input being run: thread, start, the input (address, length), target.
type Running = (std::thread::ThreadId, Instant, usize, usize, &'static str);

/// What each replaying thread is running.
static RUNNING: Mutex<Vec<Running>> = Mutex::new(Vec::new());

fn start_watchdog() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        std::thread::spawn(|| {
            loop {
                std::thread::sleep(Duration::from_secs(1));
                let running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((_, started, ptr, len, target)) = running
                    .iter()
                    .find(|r| r.1.elapsed() > Duration::from_secs(INPUT_SECONDS_MAX))
                {
                    die_with(
                        "an input ran longer than INPUT_SECONDS_MAX (a hang)",
                        started.elapsed().as_secs() as usize,
                        target,
                        *ptr as *const u8,
                        *len,
                    );
                }
            }
        });
    });
}

// ----- inputs ----------------------------------------------------------------------

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

/// The committed corpus (sorted by file name) and the generated seeds.
fn base_inputs(target: &Target) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir(target.name))
        .map(|dir| dir.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    let mut inputs: Vec<(String, Vec<u8>)> = files
        .into_iter()
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).expect("corpus file reads");
            (
                format!("corpus/{}", p.file_name().unwrap().to_string_lossy()),
                bytes,
            )
        })
        .collect();
    // Seeds as the current encoders make them, unless committed as they are.
    let committed: std::collections::HashSet<Vec<u8>> =
        inputs.iter().map(|(_, b)| b.clone()).collect();
    inputs.extend(
        fuzzing::seeds(target.name)
            .into_iter()
            .filter(|(_, bytes)| !committed.contains(bytes))
            .map(|(name, bytes)| (format!("seed {name}"), bytes)),
    );
    inputs
}

/// splitmix64: a small deterministic generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const INTERESTING: [u8; 10] = [0x00, 0x01, 0x7f, 0x80, 0xff, 0x17, 0x18, 0x1b, 0x9f, 0xbf];

/// A mutant of `base` (`other` is another input of the same target, for splices).
fn mutate(rng: &mut Rng, base: &[u8], other: &[u8], max_len: usize) -> Vec<u8> {
    let mut m = base.to_vec();
    for _ in 0..1 + rng.below(3) {
        let len = m.len();
        match rng.below(8) {
            // Flip one bit.
            0 if len > 0 => {
                let at = rng.below(len);
                m[at] ^= 1 << rng.below(8);
            }
            // An interesting byte.
            1 if len > 0 => {
                let at = rng.below(len);
                m[at] = INTERESTING[rng.below(INTERESTING.len())];
            }
            // Truncate.
            2 if len > 0 => m.truncate(rng.below(len)),
            // Splice: our head, their tail.
            3 => {
                let head = rng.below(len + 1);
                let tail = rng.below(other.len() + 1);
                m.truncate(head);
                m.extend_from_slice(&other[tail..]);
            }
            // A length field: 1, 2, 4 or 8 bytes, either byte order, set to an
            // edge value or nudged by one.
            4 if len > 0 => {
                let width = [1usize, 2, 4, 8][rng.below(4)].min(len);
                let at = rng.below(len - width + 1);
                let field = &mut m[at..at + width];
                let big_endian = rng.below(2) == 0;
                let mut value = field.iter().rev().enumerate().fold(0u64, |acc, (i, &b)| {
                    let i = if big_endian { i } else { width - 1 - i };
                    acc | (u64::from(b) << (8 * i))
                });
                value = match rng.below(6) {
                    0 => 0,
                    1 => u64::MAX,
                    2 => value.wrapping_add(1),
                    3 => value.wrapping_sub(1),
                    4 => value.wrapping_mul(2),
                    _ => 1 << rng.below(64),
                };
                for (i, b) in field.iter_mut().enumerate() {
                    let shift = if big_endian { width - 1 - i } else { i };
                    *b = (value >> (8 * shift)) as u8;
                }
            }
            // Insert random bytes.
            5 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                m.splice(at..at, bytes);
            }
            // Duplicate a stretch (repeated frames, records).
            6 if len > 0 => {
                let from = rng.below(len);
                let to = (from + 1 + rng.below(64)).min(len);
                let stretch = m[from..to].to_vec();
                let at = rng.below(len + 1);
                m.splice(at..at, stretch);
            }
            // Delete a stretch.
            _ if len > 0 => {
                let from = rng.below(len);
                let to = (from + 1 + rng.below(16)).min(len);
                m.drain(from..to);
            }
            _ => m.push(rng.next() as u8),
        }
    }
    m.truncate(max_len);
    m
}

// ----- running ---------------------------------------------------------------------

fn failures_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz_replay")
}

/// Run one input; `Err` with the panic message if it panicked.
fn run_one(target: &Target, input: &[u8]) -> Result<(), String> {
    let me = std::thread::current().id();
    CURRENT.with(|c| c.set((input.as_ptr(), input.len(), target.name)));
    {
        let mut running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        running.retain(|r| r.0 != me);
        running.push((
            me,
            Instant::now(),
            input.as_ptr() as usize,
            input.len(),
            target.name,
        ));
    }
    let outcome = catch_unwind(AssertUnwindSafe(|| (target.run)(input)));
    RUNNING
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|r| r.0 != me);
    CURRENT.with(|c| c.set((std::ptr::null(), 0, "")));
    outcome.map_err(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic with a non-text payload".to_string())
    })
}

fn mutant_count(default: usize) -> usize {
    std::env::var("VP_FUZZ_REPLAY_MUTANTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Replay `name`: base inputs, then up to `mutants` mutants (within the time
/// budget). Fails listing every input that panicked.
fn replay(name: &str, mutants: usize) {
    start_watchdog();
    let target = fuzzing::target(name).expect("a known target");
    let base = base_inputs(&target);
    assert!(!base.is_empty(), "target {name} has no corpus and no seeds");
    let mut failures: Vec<(String, Vec<u8>, String)> = Vec::new();
    for (label, input) in &base {
        if let Err(why) = run_one(&target, input) {
            failures.push((label.clone(), input.clone(), why));
        }
    }
    let mut rng = Rng(0x00f0_22ed ^ name.len() as u64);
    let started = Instant::now();
    let mut ran = 0;
    for n in 0..mutant_count(mutants) {
        if started.elapsed().as_secs_f64() > MUTATION_SECONDS {
            break;
        }
        let (_, a) = &base[rng.below(base.len())];
        let (_, b) = &base[rng.below(base.len())];
        let input = mutate(&mut rng, a, b, target.max_len);
        ran += 1;
        if let Err(why) = run_one(&target, &input) {
            failures.push((format!("mutant {n}"), input, why));
            if failures.len() >= 20 {
                break;
            }
        }
    }
    eprintln!(
        "fuzz_replay {name}: {} base inputs, {ran} mutants, {:.2} s",
        base.len(),
        started.elapsed().as_secs_f64()
    );
    if failures.is_empty() {
        return;
    }
    let dir = failures_dir();
    let _ = std::fs::create_dir_all(&dir);
    let mut report = format!("{} input(s) of target {name} panicked:\n", failures.len());
    for (i, (label, input, why)) in failures.iter().enumerate() {
        let path = dir.join(format!("{name}-{i}"));
        let _ = std::fs::write(&path, input);
        report.push_str(&format!(
            "- {label} ({} bytes, saved to {}): {why}\n",
            input.len(),
            path.display()
        ));
    }
    panic!("{report}");
}

#[test]
fn wire() {
    replay("wire", 3000);
}

#[test]
fn consensus_message() {
    replay("consensus_message", 3000);
}

#[test]
fn consensus_storage() {
    replay("consensus_storage", 3000);
}

#[test]
fn abi() {
    replay("abi", 5000);
}

#[test]
fn guest_snapshot() {
    replay("guest_snapshot", 1000);
}

#[test]
fn guest_module() {
    replay("guest_module", 200);
}

#[test]
fn local_input() {
    replay("local_input", 2000);
}

#[test]
fn every_target_is_replayed() {
    let replayed = [
        "local_input",
        "wire",
        "consensus_message",
        "consensus_storage",
        "abi",
        "guest_snapshot",
        "guest_module",
    ];
    for t in fuzzing::TARGETS {
        assert!(
            replayed.contains(&t.name),
            "target {} has no replay test",
            t.name
        );
        assert!(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fuzz/fuzz_targets")
                .join(format!("{}.rs", t.name))
                .is_file(),
            "target {} has no cargo-fuzz target",
            t.name
        );
    }
}
