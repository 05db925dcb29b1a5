//! The sandbox against the real example apps (built to wasm32 by vp-apps).

use std::sync::Arc;

use serde_json::{Value as Json, json};
use vp_guest_sdk::abi::{self, Address, Effect, Envelope, Input, VpId, WireResult};
use vp_host::sandbox::{
    COMPILED_BYTES_MAX, Guest, GuestError, GuestLimits, LoadError, LoadedModule, Sandbox, Snapshot,
    SnapshotError,
};

const CLIENT: Address = Address::Client(42);

fn load(sandbox: &Sandbox, wasm: &[u8]) -> Arc<LoadedModule> {
    sandbox.load(wasm).expect("example app loads")
}

fn start(wasm: &[u8]) -> (Sandbox, Guest) {
    start_with(wasm, GuestLimits::default())
}

fn start_with(wasm: &[u8], limits: GuestLimits) -> (Sandbox, Guest) {
    let sandbox = Sandbox::new().unwrap();
    let module = load(&sandbox, wasm);
    let guest = Guest::start(&sandbox, module, limits).unwrap();
    (sandbox, guest)
}

fn request(id: u64, msg: &Json) -> Envelope {
    Envelope(
        1_700_000_000_000 + id,
        id,
        Input::Request(CLIENT, id, abi::encode(msg).unwrap().into()),
    )
}

fn decode_result(result: &WireResult) -> Result<Json, String> {
    result
        .as_ref()
        .map(|bytes| abi::decode::<Json>(bytes).unwrap())
        .map_err(Clone::clone)
}

/// Send one message; return its reply (the guest must reply at once).
fn send(guest: &mut Guest, id: u64, msg: Json) -> Result<Result<Json, String>, GuestError> {
    let effects = guest.handle(&request(id, &msg))?;
    let reply = effects.iter().find_map(|e| match e {
        Effect::Reply(to, rid, result) if *to == CLIENT && *rid == id => {
            Some(decode_result(result))
        }
        _ => None,
    });
    Ok(reply.expect("a reply to the request"))
}

fn ok(guest: &mut Guest, id: u64, msg: Json) -> Json {
    send(guest, id, msg)
        .expect("no trap")
        .expect("no error reply")
}

#[test]
fn counter_adds_and_gets_in_one_instance() {
    let (_sandbox, mut guest) = start(vp_apps::COUNTER);
    assert_eq!(ok(&mut guest, 1, json!({"add": 5})), json!(5));
    assert_eq!(ok(&mut guest, 2, json!({"add": 3})), json!(8));
    assert_eq!(ok(&mut guest, 3, json!("get")), json!(8));
    assert_eq!(guest.handled(), 3);
}

#[test]
fn kv_put_get_delete() {
    let (_sandbox, mut guest) = start(vp_apps::KV);
    assert_eq!(
        ok(
            &mut guest,
            1,
            json!({"put": {"key": "a", "value": [1, "x"]}})
        ),
        Json::Null
    );
    assert_eq!(ok(&mut guest, 2, json!({"get": "a"})), json!([1, "x"]));
    assert_eq!(ok(&mut guest, 3, json!({"delete": "a"})), json!([1, "x"]));
    assert_eq!(ok(&mut guest, 4, json!({"get": "a"})), Json::Null);
}

#[test]
fn undecodable_message_gets_an_error_reply() {
    let (_sandbox, mut guest) = start(vp_apps::COUNTER);
    let err = send(&mut guest, 1, json!({"multiply": 3}))
        .unwrap()
        .unwrap_err();
    assert!(err.contains("cannot decode message"), "{err}");
    assert_eq!(ok(&mut guest, 2, json!("get")), json!(0));
}

/// A twin that never saw the failing messages must end in the same state:
/// rollback leaves no trace, not even in dead memory.
fn assert_failure_leaves_no_trace(
    bad: Json,
    limits: GuestLimits,
    expect: impl Fn(&GuestError) -> bool,
) {
    let (_s1, mut guest) = start_with(vp_apps::STRESS, limits);
    let (_s2, mut twin) = start_with(vp_apps::STRESS, limits);
    // enough messages to cross a checkpoint, so rollback also replays
    for id in 1..=400 {
        assert_eq!(ok(&mut guest, id, json!({"add": 1})), json!(id));
        ok(&mut twin, id, json!({"add": 1}));
    }
    let before = guest.digest();
    let err = send(&mut guest, 401, bad.clone()).unwrap_err();
    assert!(expect(&err), "unexpected error for {bad}: {err}");
    assert_eq!(guest.digest(), before, "failed message {bad} left a trace");
    assert_eq!(guest.digest(), twin.digest());
    // and the guest keeps working
    assert_eq!(ok(&mut guest, 402, json!({"add": 1})), json!(401));
    ok(&mut twin, 402, json!({"add": 1}));
    assert_eq!(guest.digest(), twin.digest());
}

#[test]
fn panic_is_rolled_back_and_named() {
    assert_failure_leaves_no_trace(
        json!({"add_then_panic": 10}),
        GuestLimits::default(),
        |e| matches!(e, GuestError::Panic(m) if m.contains("added 10, then panicked")),
    );
}

#[test]
fn endless_loop_runs_out_of_fuel() {
    let limits = GuestLimits {
        fuel_per_message: 20_000_000,
        ..GuestLimits::default()
    };
    assert_failure_leaves_no_trace(json!("spin"), limits, |e| {
        matches!(e, GuestError::OutOfFuel { limit: 20_000_000 })
    });
}

#[test]
fn memory_bomb_hits_the_memory_limit() {
    let limits = GuestLimits {
        memory_bytes_max: 32 << 20,
        ..GuestLimits::default()
    };
    assert_failure_leaves_no_trace(
        json!({"alloc": 1u64 << 30}),
        limits,
        |e| matches!(e, GuestError::MemoryLimit { limit, .. } if *limit == 32 << 20),
    );
}

#[test]
fn growing_memory_then_trapping_is_rolled_back_in_a_fresh_instance() {
    let (_s, mut guest) = start(vp_apps::STRESS);
    ok(&mut guest, 1, json!({"add": 7}));
    let (bytes_before, digest_before) = (guest.memory_bytes(), guest.digest());
    let err = send(&mut guest, 2, json!({"grow_then_panic": 8 << 20})).unwrap_err();
    assert!(matches!(err, GuestError::Panic(_)), "{err}");
    assert_eq!(guest.memory_bytes(), bytes_before, "memory growth undone");
    assert_eq!(guest.digest(), digest_before);
    assert_eq!(ok(&mut guest, 3, json!({"add": 1})), json!(8));
}

#[test]
fn unreachable_and_stack_overflow_trap() {
    assert_failure_leaves_no_trace(
        json!("trap"),
        GuestLimits::default(),
        |e| matches!(e, GuestError::Trap(m) if m.contains("unreachable")),
    );
    assert_failure_leaves_no_trace(json!({"recurse": 1_000_000}), GuestLimits::default(), |e| {
        matches!(e, GuestError::Trap(_))
    });
}

#[test]
fn snapshot_restores_into_a_fresh_engine_and_continues_exactly() {
    let (_s1, mut guest) = start(vp_apps::COUNTER);
    for id in 1..=10 {
        ok(&mut guest, id, json!({"add": id}));
    }
    let bytes = guest.snapshot().encode();
    let snapshot = Snapshot::decode(&bytes, u64::MAX).unwrap();
    assert_eq!(snapshot.digest(), guest.digest());

    let other = Sandbox::new().unwrap(); // another machine
    let mut restored = Guest::restore(
        &other,
        load(&other, vp_apps::COUNTER),
        snapshot,
        GuestLimits::default(),
    )
    .unwrap();
    assert_eq!(restored.digest(), guest.digest());
    assert_eq!(ok(&mut restored, 11, json!({"add": 100})), json!(155));
    assert_eq!(ok(&mut guest, 11, json!({"add": 100})), json!(155));
    assert_eq!(restored.digest(), guest.digest());
}

#[test]
fn restored_guest_rolls_back_to_the_restored_state() {
    let (_s1, mut guest) = start(vp_apps::STRESS);
    ok(&mut guest, 1, json!({"add": 3}));
    let mut encoded = Vec::new();
    guest.encode_snapshot_into(&mut encoded);
    assert_eq!(encoded, guest.snapshot().encode(), "both encoders agree");

    let other = Sandbox::new().unwrap();
    let module = load(&other, vp_apps::STRESS);
    let mut restored =
        Guest::restore_encoded(&other, module, encoded, GuestLimits::default()).unwrap();
    let before = restored.digest();
    assert_eq!(before, guest.digest());
    // the first message after a restore traps: back to the restored state
    assert!(matches!(
        send(&mut restored, 2, json!({"grow_then_panic": 4 << 20})),
        Err(GuestError::Panic(_))
    ));
    assert_eq!(restored.digest(), before);
    assert!(matches!(
        send(&mut restored, 3, json!({"add_then_panic": 1})),
        Err(GuestError::Panic(_))
    ));
    assert_eq!(restored.digest(), before);
    assert_eq!(ok(&mut restored, 4, json!({"add": 1})), json!(4));
}

#[test]
fn same_input_gives_byte_identical_snapshots() {
    let run = || {
        let (_s, mut guest) = start(vp_apps::KV);
        for id in 1..=50 {
            ok(
                &mut guest,
                id,
                json!({"put": {"key": format!("k{}", id % 7), "value": id}}),
            );
        }
        guest.snapshot().encode()
    };
    assert_eq!(run(), run());
}

#[test]
fn suspended_async_handler_migrates_with_the_snapshot() {
    let (_s1, mut guest) = start(vp_apps::CHAT);
    let effects = guest
        .handle(&request(
            1,
            &json!({"ask": {"room": "00000000000000bb", "last": 3}}),
        ))
        .unwrap();
    let (call_id, to) = match effects.as_slice() {
        [Effect::Call(to, id, payload)] => {
            assert_eq!(
                abi::decode::<Json>(payload).unwrap(),
                json!({"history": {"last": 3}})
            );
            (*id, *to)
        }
        other => panic!("expected one call, got {other:?}"),
    };
    assert_eq!(to, VpId(0xbb));
    let snapshot = Snapshot::decode(&guest.snapshot().encode(), u64::MAX).unwrap();
    drop(guest);

    let other = Sandbox::new().unwrap();
    let mut restored = Guest::restore(
        &other,
        load(&other, vp_apps::CHAT),
        snapshot,
        GuestLimits::default(),
    )
    .unwrap();
    let posts = json!([{"n": 1, "time_ms": 5, "from": "cy", "text": "hello"}]);
    let reply = Envelope(
        1_700_000_001_000,
        9,
        Input::CallReply(call_id, Ok(abi::encode(&posts).unwrap().into())),
    );
    let effects = restored.handle(&reply).unwrap();
    match effects.as_slice() {
        [Effect::Reply(to, id, result)] => {
            assert_eq!(
                (*to, *id),
                (CLIENT, 1),
                "the reply goes to the original request"
            );
            assert_eq!(decode_result(result).unwrap(), posts);
        }
        other => panic!("expected the suspended handler's reply, got {other:?}"),
    }
}

#[test]
fn reads_answer_without_changing_state() {
    let (_s, mut guest) = start(vp_apps::KV);
    ok(
        &mut guest,
        1,
        json!({"put": {"key": "a", "value": "x".repeat(1000)}}),
    );
    let before = guest.digest();
    for _ in 0..3 {
        let reply = guest
            .query(&abi::encode(&json!({"get": "a"})).unwrap())
            .unwrap();
        assert_eq!(decode_result(&reply).unwrap(), json!("x".repeat(1000)));
        assert_eq!(guest.digest(), before, "a read changed the guest's state");
    }
    let refused = guest
        .query(&abi::encode(&json!({"delete": "a"})).unwrap())
        .unwrap();
    assert!(
        decode_result(&refused)
            .unwrap_err()
            .contains("only get and expiring are reads")
    );
    let garbage = guest.query(b"\xff\xff").unwrap();
    assert!(
        decode_result(&garbage)
            .unwrap_err()
            .contains("cannot decode")
    );
    assert_eq!(guest.digest(), before);
    assert_eq!(
        ok(&mut guest, 2, json!({"get": "a"})),
        json!("x".repeat(1000))
    );
}

#[test]
fn a_read_that_traps_changes_nothing() {
    // `stats` through the read path works; `trap` is not a read and is refused,
    // so exercise a trapping read through a read of huge input instead.
    let (_s, mut guest) = start(vp_apps::STRESS);
    ok(&mut guest, 1, json!({"add": 2}));
    let before = guest.digest();
    let stats =
        decode_result(&guest.query(&abi::encode(&json!("stats")).unwrap()).unwrap()).unwrap();
    assert_eq!(stats, json!([2, 0, 1]));
    let too_big = vec![0u8; 200 * 1024];
    assert!(matches!(
        guest.query(&too_big),
        Err(GuestError::InputTooLarge { .. })
    ));
    assert_eq!(guest.digest(), before);
}

// ---- bad modules -----------------------------------------------------------

fn load_wat(wat: &str) -> Result<Arc<LoadedModule>, LoadError> {
    Sandbox::new().unwrap().load(&wat::parse_str(wat).unwrap())
}

const GOOD_EXPORTS: &str = r#"
    (memory (export "memory") 1)
    (func (export "vp_init") (result i32) i32.const 0)
    (func (export "vp_handle") (param i32) (result i32) i32.const 0)"#;

#[test]
fn garbage_is_not_a_module() {
    let sandbox = Sandbox::new().unwrap();
    let err = sandbox.load(b"\x7fELF this is not wasm").unwrap_err();
    assert!(
        err.to_string().contains("not a WebAssembly module"),
        "{err}"
    );
    let err = sandbox.load(&vp_apps::COUNTER[..1000]).unwrap_err();
    assert!(
        matches!(err, LoadError::Invalid(_)),
        "truncated module: {err}"
    );
}

#[test]
fn wasi_imports_are_refused() {
    let wat = format!(
        r#"(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
        (func (export "vp_abi_version") (result i32) i32.const 1) {GOOD_EXPORTS})"#
    );
    let err = load_wat(&wat).unwrap_err();
    assert!(
        err.to_string().contains("wasi_snapshot_preview1::fd_write"),
        "{err}"
    );
}

#[test]
fn missing_exports_are_named() {
    let err = load_wat(r#"(module (memory (export "memory") 1))"#).unwrap_err();
    assert!(
        matches!(err, LoadError::MissingExport("vp_abi_version")),
        "{err}"
    );
    let err =
        load_wat(r#"(module (func (export "vp_handle") (param i32) (result i32) i32.const 0))"#)
            .unwrap_err();
    assert!(matches!(err, LoadError::MissingExport("memory")), "{err}");
}

#[test]
fn wrong_abi_version_is_refused() {
    let wat = format!(
        r#"(module (func (export "vp_abi_version") (result i32) i32.const 2) {GOOD_EXPORTS})"#
    );
    let err = load_wat(&wat).unwrap_err();
    assert!(
        matches!(
            err,
            LoadError::AbiMismatch {
                found: 2,
                supported: 1
            }
        ),
        "{err}"
    );
}

#[test]
fn module_that_traps_at_start_is_refused() {
    let wat = format!(
        r#"(module (func $boom unreachable) (start $boom)
        (func (export "vp_abi_version") (result i32) i32.const 1) {GOOD_EXPORTS})"#
    );
    let err = load_wat(&wat).unwrap_err();
    assert!(
        matches!(err, LoadError::Start(GuestError::Trap(_))),
        "{err}"
    );
}

/// Loading runs the module's start function and `vp_abi_version` in a throwaway
/// instance under `LOAD_CHECK_FUEL`, not a virtual peer's 500 million: a hostile
/// module costs the loader little (this keeps the `guest_module` fuzz target's
/// per-input cost bounded too).
#[test]
fn a_module_that_loops_while_loading_is_refused_cheaply() {
    for (start, abi) in [
        ("(start $spin)", "i32.const 1"),
        ("", "call $spin i32.const 1"),
    ] {
        let wat = format!(
            r#"(module (func $spin (loop $l br $l)) {start}
            (func (export "vp_abi_version") (result i32) {abi}) {GOOD_EXPORTS})"#
        );
        let err = load_wat(&wat).unwrap_err();
        assert!(
            matches!(
                &err,
                LoadError::Start(GuestError::OutOfFuel { limit }) if *limit == vp_host::sandbox::LOAD_CHECK_FUEL
            ) || matches!(&err, LoadError::Start(GuestError::Trap(why)) if why.contains("fuel")),
            "{start}: {err}"
        );
    }
}

/// Found by the `guest_module` fuzz target: a start function that called a
/// `vp` import panicked the host (the import expected the guest's memory,
/// which is only known once instantiation is over).
#[test]
fn start_function_calling_an_import_is_refused_not_a_panic() {
    for (import, params, call) in [
        (
            "log",
            "(param i32 i32 i32)",
            "i32.const 3 i32.const 0 i32.const 4",
        ),
        ("input", "(param i32 i32)", "i32.const 0 i32.const 0"),
        ("output", "(param i32 i32)", "i32.const 0 i32.const 1"),
    ] {
        let wat = format!(
            r#"(module (import "vp" "{import}" (func $f {params}))
            (func $start {call} call $f) (start $start)
            (func (export "vp_abi_version") (result i32) i32.const 1) {GOOD_EXPORTS})"#
        );
        let err = load_wat(&wat).unwrap_err();
        assert!(
            matches!(&err, LoadError::Start(GuestError::Abi(why)) if why.contains("start function")),
            "{import}: {err}"
        );
    }
}

#[test]
fn snapshot_of_another_module_is_refused() {
    let (sandbox, mut guest) = start(vp_apps::COUNTER);
    let snapshot = guest.snapshot();
    let kv = load(&sandbox, vp_apps::KV);
    let err = Guest::restore(&sandbox, kv, snapshot.clone(), GuestLimits::default()).unwrap_err();
    assert!(
        matches!(
            err,
            LoadError::Snapshot(SnapshotError::ModuleMismatch { .. })
        ),
        "{err}"
    );
    let small = GuestLimits {
        memory_bytes_max: 65536,
        ..GuestLimits::default()
    };
    let counter = load(&sandbox, vp_apps::COUNTER);
    let err = Guest::restore(&sandbox, counter, snapshot, small).unwrap_err();
    assert!(
        matches!(err, LoadError::Snapshot(SnapshotError::TooLarge { .. })),
        "{err}"
    );
}

#[test]
fn modules_are_compiled_once_per_hash() {
    let sandbox = Sandbox::new().unwrap();
    let a = load(&sandbox, vp_apps::COUNTER);
    let b = load(&sandbox, vp_apps::COUNTER);
    assert!(Arc::ptr_eq(&a, &b));
    assert_eq!(
        sandbox.module(&a.hash()).map(|m| Arc::ptr_eq(&m, &a)),
        Some(true)
    );
}

// ---- compiled modules kept on disk ----------------------------------------------------

/// A fresh directory for one test, removed when dropped.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("vp-sandbox-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Scratch(dir)
    }

    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn counts(sandbox: &Sandbox) -> (u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    let c = sandbox.counters();
    (c.compiled.load(Relaxed), c.from_disk.load(Relaxed))
}

/// The cache directory's `.cwasm` files.
fn cwasm_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "cwasm"))
        .collect()
}

/// A counter started from `sandbox` adds and reads back.
fn counter_works(sandbox: &Sandbox) {
    let module = load(sandbox, vp_apps::COUNTER);
    let mut guest = Guest::start(sandbox, module, GuestLimits::default()).unwrap();
    assert_eq!(ok(&mut guest, 1, json!({"add": 5})), json!(5));
    assert_eq!(ok(&mut guest, 2, json!("get")), json!(5));
}

#[test]
fn a_module_compiled_once_is_read_back_from_disk() {
    let dir = Scratch::new("cache-reuse");
    let first = Sandbox::with_compiled_cache(dir.path(), COMPILED_BYTES_MAX).unwrap();
    counter_works(&first);
    assert_eq!(counts(&first), (1, 0));
    assert_eq!(cwasm_files(dir.path()).len(), 1);

    // Another sandbox (a restarted host) does not compile it again.
    let second = Sandbox::with_compiled_cache(dir.path(), COMPILED_BYTES_MAX).unwrap();
    counter_works(&second);
    assert_eq!(counts(&second), (0, 1));
    // A sandbox without the cache compiles.
    let plain = Sandbox::new().unwrap();
    counter_works(&plain);
    assert_eq!(counts(&plain), (1, 0));
}

#[test]
fn a_damaged_compiled_module_is_compiled_again_never_run() {
    let dir = Scratch::new("cache-damaged");
    counter_works(&Sandbox::with_compiled_cache(dir.path(), COMPILED_BYTES_MAX).unwrap());
    let file = cwasm_files(dir.path()).pop().unwrap();
    let intact = std::fs::read(&file).unwrap();

    // One flipped bit in the machine code; then a file cut short (a crash
    // during the write); then a file from something else altogether.
    let mut flipped = intact.clone();
    let at = intact.len() / 2;
    flipped[at] ^= 0x10;
    let damaged = [
        flipped,
        intact[..intact.len() / 3].to_vec(),
        b"hello".to_vec(),
    ];
    for bytes in damaged {
        std::fs::write(&file, &bytes).unwrap();
        let sandbox = Sandbox::with_compiled_cache(dir.path(), COMPILED_BYTES_MAX).unwrap();
        counter_works(&sandbox);
        assert_eq!(counts(&sandbox), (1, 0), "a damaged file is not loaded");
        // Compiled again and written back whole.
        assert_eq!(std::fs::read(&file).unwrap().len(), intact.len());
        let next = Sandbox::with_compiled_cache(dir.path(), COMPILED_BYTES_MAX).unwrap();
        counter_works(&next);
        assert_eq!(counts(&next), (0, 1));
    }
}

#[test]
fn a_module_that_fails_its_checks_is_not_kept() {
    let dir = Scratch::new("cache-refused");
    let sandbox = Sandbox::with_compiled_cache(dir.path(), COMPILED_BYTES_MAX).unwrap();
    let wasm = wat::parse_str(
        r#"(module (import "wasi" "fd_write" (func)) (memory (export "memory") 1))"#,
    )
    .unwrap();
    assert!(matches!(
        sandbox.load(&wasm),
        Err(LoadError::UnsupportedImport { .. })
    ));
    assert!(cwasm_files(dir.path()).is_empty());
}

#[test]
fn other_engines_files_and_leftovers_are_cleared_when_the_cache_opens() {
    let dir = Scratch::new("cache-stale");
    counter_works(&Sandbox::with_compiled_cache(dir.path(), COMPILED_BYTES_MAX).unwrap());
    let ours = cwasm_files(dir.path()).pop().unwrap();
    let hash = ours.file_name().unwrap().to_string_lossy()[..64].to_string();
    let older = dir.path().join(format!("{hash}-0123456789abcdef.cwasm"));
    let leftover = dir.path().join(format!(".{hash}.00000000deadbeef.tmp"));
    let unrelated = dir.path().join("notes.txt");
    for f in [&older, &leftover, &unrelated] {
        std::fs::write(f, b"x").unwrap();
    }
    let sandbox = Sandbox::with_compiled_cache(dir.path(), COMPILED_BYTES_MAX).unwrap();
    assert!(ours.exists());
    assert!(!older.exists());
    assert!(!leftover.exists());
    assert!(
        unrelated.exists(),
        "only the cache's own kinds of file are removed"
    );
    counter_works(&sandbox);
    assert_eq!(counts(&sandbox), (0, 1));
}

#[test]
fn the_cache_keeps_to_its_bound_dropping_the_least_recently_used() {
    use std::time::{Duration, SystemTime};
    let dir = Scratch::new("cache-bound");
    let apps = [vp_apps::COUNTER, vp_apps::KV, vp_apps::CHAT];
    // Each app's file, found as the one its load adds.
    Sandbox::with_compiled_cache(dir.path(), COMPILED_BYTES_MAX).unwrap();
    let mut files = Vec::new();
    for app in apps {
        let before = cwasm_files(dir.path());
        load(
            &Sandbox::with_compiled_cache(dir.path(), COMPILED_BYTES_MAX).unwrap(),
            app,
        );
        let added: Vec<_> = cwasm_files(dir.path())
            .into_iter()
            .filter(|f| !before.contains(f))
            .collect();
        assert_eq!(added.len(), 1);
        files.push(added[0].clone());
    }
    let len = |f: &std::path::PathBuf| std::fs::metadata(f).unwrap().len();
    let total: u64 = files.iter().map(len).sum();
    // Last used: the counter most recently, then the chat, then the kv.
    let base = SystemTime::now() - Duration::from_secs(3600);
    for (file, minutes) in files.iter().zip([30, 10, 20]) {
        std::fs::File::options()
            .append(true)
            .open(file)
            .unwrap()
            .set_modified(base + Duration::from_secs(60 * minutes))
            .unwrap();
    }

    // A bound one byte short of all three: opening drops the kv's file only.
    let sandbox = Sandbox::with_compiled_cache(dir.path(), total - 1).unwrap();
    let present = || files.iter().map(|f| f.exists()).collect::<Vec<_>>();
    assert_eq!(present(), [true, false, true]);
    // Reading the chat's back marks it used now; compiling the kv again then
    // takes the cache over its bound, and the counter is now the least
    // recently used.
    load(&sandbox, vp_apps::CHAT);
    load(&sandbox, vp_apps::KV);
    assert_eq!(counts(&sandbox), (1, 1));
    assert_eq!(present(), [false, true, true]);
    let kept: u64 = files.iter().filter(|f| f.exists()).map(len).sum();
    assert!(kept < total);

    // A bound below one file keeps nothing, and loading still works.
    let tiny = Sandbox::with_compiled_cache(dir.path(), 1).unwrap();
    assert!(cwasm_files(dir.path()).is_empty());
    counter_works(&tiny);
    assert!(cwasm_files(dir.path()).is_empty());
}
