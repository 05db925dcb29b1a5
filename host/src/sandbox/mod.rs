//! The deterministic guest sandbox.
//!
//! One [`Sandbox`] per host: a Wasmtime engine configured for determinism and
//! a cache of compiled modules (one per module hash; a host's also on disk,
//! `compiled.rs`). One [`Guest`] per virtual-peer replica: a single instance
//! reused across messages.
//!
//! Determinism: NaNs are canonicalised, relaxed SIMD is deterministic, wasm
//! threads are not compiled in, every message runs under a fuel limit and the
//! guest under memory and table limits (all from the VP's configuration, so
//! every replica hits them alike), and the only inputs are the ordered
//! envelopes (time and randomness are stamped in them).
//!
//! Rollback: a message that traps (panic, `unreachable`, out of fuel, out of
//! memory, ABI violation) must leave no trace. The guest keeps a checkpoint
//! (memory + globals) and the envelopes applied since; on a failure it writes
//! the checkpoint back (into a fresh instance if memory grew) and replays
//! those envelopes, discarding their effects. Every replica does the same, so
//! they stay identical. See docs/abi.md.

mod compiled;
pub use compiled::COMPILED_BYTES_MAX;
pub mod module;
pub mod snapshot;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use vp_guest_sdk::abi::{self, Effect, Envelope, WireResult};
use wasmtime::{
    Caller, Config, Engine, ExternType, Global, InstancePre, Linker, Memory, ResourceLimiter,
    Store, Trap, TypedFunc, V128, Val, ValType, WasmBacktrace,
};

pub use module::{MODULE_BYTES_MAX, ModuleHash};
pub use snapshot::{
    GlobalValue, PAGE_BYTES, Snapshot, SnapshotError, SnapshotView, StateDigest, encode_state,
    state_digest,
};

use module::GlobalKind;

/// Compiled modules a sandbox keeps; unused ones are evicted to make room.
pub const MODULES_MAX: usize = 256;
/// Longest log line a guest may write, in bytes (longer lines are cut).
pub const LOG_LINE_BYTES_MAX: usize = 4096;
/// Log lines a guest may write per message; the rest are counted, not logged.
pub const LOG_LINES_PER_CALL_MAX: u32 = 64;
/// Largest stack region the read path saves and restores.
pub const STACK_REGION_BYTES_MAX: usize = 8 * 1024 * 1024;
/// Envelopes kept for replay before a new checkpoint is taken (plus 16 per
/// page of memory: bigger guests checkpoint less often, as a copy costs more).
pub const REPLAY_MESSAGES_BASE: usize = 1024;
/// Bytes of envelopes kept for replay before a new checkpoint is taken.
pub const REPLAY_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Fuel the loader's throwaway instance (start function plus `vp_abi_version`)
/// may use: loading a module, before any virtual peer's limits apply, costs
/// little whatever the module does.
pub const LOAD_CHECK_FUEL: u64 = 10_000_000;

/// Resource limits of one guest. They are part of a virtual peer's
/// configuration, so every replica enforces the same ones and a guest that
/// hits one does so on every replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestLimits {
    /// Fuel (roughly, wasm instructions) one message may use.
    pub fuel_per_message: u64,
    /// Linear memory the guest may grow to.
    pub memory_bytes_max: u64,
    /// Elements a table may hold.
    pub table_elements_max: u32,
    /// Largest envelope the guest is handed.
    pub input_bytes_max: u32,
    /// Largest output (effects of one message) the guest may return.
    pub output_bytes_max: u32,
}

impl Default for GuestLimits {
    fn default() -> Self {
        GuestLimits {
            fuel_per_message: 500_000_000,
            memory_bytes_max: 256 * 1024 * 1024,
            table_elements_max: 100_000,
            input_bytes_max: 8 * 1024 * 1024,
            output_bytes_max: 8 * 1024 * 1024,
        }
    }
}

/// Why a module could not be loaded or a guest not started.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "not a WebAssembly module (bad magic bytes): expected a .wasm file built for wasm32-unknown-unknown"
    )]
    NotWasm,
    #[error(
        "this is a WebAssembly component or an unknown binary version; vp runs core modules (wasm32-unknown-unknown)"
    )]
    NotCoreModule,
    #[error("module is {bytes} bytes; at most {max}")]
    TooLarge { bytes: usize, max: usize },
    #[error("invalid WebAssembly module: {0}")]
    Invalid(String),
    #[error(
        "module imports `{module}::{name}`, which the vp sandbox does not provide: guests get only the `vp` \
         imports of vp-guest-sdk (no WASI); build for wasm32-unknown-unknown"
    )]
    UnsupportedImport { module: String, name: String },
    #[error("module imports `vp::{name}` with the wrong type: {found}, expected {expected}")]
    BadImportType {
        name: String,
        found: String,
        expected: &'static str,
    },
    #[error("module does not export `{0}`: is it a vp guest (vp_guest_sdk::export_app!)?")]
    MissingExport(&'static str),
    #[error("export `{name}` has type {found}, expected {expected}")]
    BadExportType {
        name: &'static str,
        found: String,
        expected: &'static str,
    },
    #[error(
        "guest ABI version {found}; this host supports version {supported}: rebuild the app with a matching vp-guest-sdk"
    )]
    AbiMismatch { found: u32, supported: u32 },
    #[error(
        "module uses {0}, which vp snapshots cannot carry (tables and segments must not change at run time)"
    )]
    Unsnapshottable(&'static str),
    #[error("guest failed to start: {0}")]
    Start(GuestError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("the sandbox already holds {MODULES_MAX} modules in use")]
    CacheFull,
    #[error("wasmtime: {0}")]
    Engine(String),
}

/// Why a message failed. A failed message changed nothing in the guest.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum GuestError {
    #[error(
        "guest ran out of fuel (limit {limit} per message): an endless loop? otherwise raise the fuel limit"
    )]
    OutOfFuel { limit: u64 },
    #[error("guest exceeded its memory limit of {limit} bytes (it asked for {requested})")]
    MemoryLimit { limit: u64, requested: u64 },
    #[error("guest panicked: {0}")]
    Panic(String),
    #[error("guest trapped: {0}")]
    Trap(String),
    #[error("guest broke the ABI: {0}")]
    Abi(String),
    #[error("message of {bytes} bytes exceeds the guest's input limit of {max}")]
    InputTooLarge { bytes: usize, max: u32 },
    #[error("this app has no read path (it exports no vp_query)")]
    NoReadPath,
    #[error("guest is stopped: {0}")]
    Failed(String),
}

struct Limiter {
    memory_bytes_max: u64,
    table_elements_max: u32,
    denied_memory: Option<u64>,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired as u64 > self.memory_bytes_max {
            self.denied_memory = Some(desired as u64);
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= self.table_elements_max as usize)
    }

    fn instances(&self) -> usize {
        1
    }
    fn tables(&self) -> usize {
        8
    }
    fn memories(&self) -> usize {
        1
    }
}

/// Per-store state the host imports use.
struct GuestData {
    limiter: Limiter,
    memory: Option<Memory>,
    input: Vec<u8>,
    output: Vec<u8>,
    output_set: bool,
    output_bytes_max: u32,
    panic: Option<String>,
    abi_violation: Option<String>,
    log_lines: u32,
    /// The lines the current call logged (at most `LOG_LINES_PER_CALL_MAX`).
    captured: Vec<GuestLogLine>,
    label: Arc<str>,
}

/// A line a guest logged (`vp_guest_sdk::info!` and friends).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestLogLine {
    /// 0..=4: trace, debug, info, warn, error.
    pub level: u8,
    pub text: String,
}

impl GuestData {
    fn reset_for_call(&mut self) {
        self.output.clear();
        self.output_set = false;
        self.panic = None;
        self.abi_violation = None;
        self.limiter.denied_memory = None;
        self.log_lines = 0;
        self.captured.clear();
    }

    fn violation(&mut self, what: String) -> wasmtime::Error {
        let err = wasmtime::Error::msg(what.clone());
        self.abi_violation = Some(what);
        err
    }
}

/// The guest's memory, for a host import. Before instantiation finished (an
/// import called from the module's start function) there is none yet: that is
/// the guest's error, not the host's.
fn guest_memory(caller: &mut Caller<'_, GuestData>) -> wasmtime::Result<Memory> {
    match caller.data().memory {
        Some(memory) => Ok(memory),
        None => Err(caller.data_mut().violation(
            "a vp import was called during instantiation (from a start function)".to_string(),
        )),
    }
}

fn guest_range(ptr: u32, len: u32, memory_len: usize) -> Option<std::ops::Range<usize>> {
    let start = ptr as usize;
    let end = start.checked_add(len as usize)?;
    (end <= memory_len).then_some(start..end)
}

/// A compiled guest module with what the host learned about it.
pub struct LoadedModule {
    hash: ModuleHash,
    pre: InstancePre<GuestData>,
    globals: Vec<(String, GlobalKind)>,
    stack_pointer: Option<usize>,
    has_query: bool,
    abi_version: u32,
    bytes_len: usize,
}

impl LoadedModule {
    /// SHA-256 of the module's bytes as deployed.
    pub fn hash(&self) -> ModuleHash {
        self.hash
    }
    /// Size of the module as deployed.
    pub fn bytes_len(&self) -> usize {
        self.bytes_len
    }
    /// Whether the module answers reads.
    pub fn has_read_path(&self) -> bool {
        self.has_query
    }
}

impl std::fmt::Debug for LoadedModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModule")
            .field("hash", &self.hash)
            .field("globals", &self.globals.len())
            .finish()
    }
}

/// The engine and module cache of one host.
pub struct Sandbox {
    engine: Engine,
    linker: Linker<GuestData>,
    modules: DashMap<ModuleHash, Arc<LoadedModule>>,
    /// Compiled modules on disk (`Sandbox::with_compiled_cache`).
    compiled_cache: Option<compiled::CompiledCache>,
    counters: LoadCounters,
}

/// How the modules a sandbox loaded got their machine code.
#[derive(Debug, Default)]
pub struct LoadCounters {
    /// Compiled from WebAssembly.
    pub compiled: AtomicU64,
    /// Read back from the on-disk cache.
    pub from_disk: AtomicU64,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("modules", &self.modules.len())
            .field("compiled_cache", &self.compiled_cache)
            .finish()
    }
}

/// The imports a guest may use: name, parameter count (all i32), no results.
const IMPORTS: [(&str, usize); 3] = [("input", 2), ("output", 2), ("log", 3)];

impl Sandbox {
    /// A sandbox with the deterministic engine configuration.
    pub fn new() -> Result<Sandbox, LoadError> {
        let mut config = Config::new();
        config
            .consume_fuel(true)
            .cranelift_nan_canonicalization(true)
            .wasm_relaxed_simd(true)
            .relaxed_simd_deterministic(true)
            .wasm_memory64(false)
            .wasm_multi_memory(false)
            .memory_may_move(false)
            .max_wasm_stack(1024 * 1024)
            .cranelift_opt_level(wasmtime::OptLevel::Speed);
        let engine = Engine::new(&config).map_err(|e| LoadError::Engine(format!("{e:#}")))?;
        let mut linker = Linker::new(&engine);
        Self::define_imports(&mut linker).map_err(|e| LoadError::Engine(format!("{e:#}")))?;
        Ok(Sandbox {
            engine,
            linker,
            modules: DashMap::new(),
            compiled_cache: None,
            counters: LoadCounters::default(),
        })
    }

    /// A sandbox that keeps the machine code of the modules it compiles in
    /// `dir` and reads it back instead of compiling again (a host restarting
    /// with its virtual peers; see `compiled.rs` for what is checked), at
    /// most `bytes_max` bytes of it ([`COMPILED_BYTES_MAX`] for a host): the
    /// least recently used files go first.
    pub fn with_compiled_cache(
        dir: &std::path::Path,
        bytes_max: u64,
    ) -> Result<Sandbox, LoadError> {
        let mut sandbox = Sandbox::new()?;
        let cache =
            compiled::CompiledCache::open(dir, &sandbox.engine, bytes_max).map_err(|e| {
                LoadError::Engine(format!(
                    "cannot create the compiled-module cache {}: {e}",
                    dir.display()
                ))
            })?;
        sandbox.compiled_cache = Some(cache);
        Ok(sandbox)
    }

    /// How many modules were compiled, and how many read back from disk.
    pub fn counters(&self) -> &LoadCounters {
        &self.counters
    }

    fn define_imports(linker: &mut Linker<GuestData>) -> wasmtime::Result<()> {
        linker.func_wrap(
            abi::IMPORT_MODULE,
            "input",
            |mut caller: Caller<'_, GuestData>, ptr: u32, len: u32| {
                let memory = guest_memory(&mut caller)?;
                let (mem, data) = memory.data_and_store_mut(&mut caller);
                if len as usize != data.input.len() {
                    let what = format!(
                        "input asked for {len} bytes, the input is {}",
                        data.input.len()
                    );
                    return Err(data.violation(what));
                }
                let Some(range) = guest_range(ptr, len, mem.len()) else {
                    return Err(
                        data.violation(format!("input buffer {ptr}+{len} is outside memory"))
                    );
                };
                mem[range].copy_from_slice(&data.input);
                Ok(())
            },
        )?;
        linker.func_wrap(
            abi::IMPORT_MODULE,
            "output",
            |mut caller: Caller<'_, GuestData>, ptr: u32, len: u32| {
                let memory = guest_memory(&mut caller)?;
                let (mem, data) = memory.data_and_store_mut(&mut caller);
                if data.output_set {
                    return Err(data.violation("output called twice in one call".to_string()));
                }
                if len > data.output_bytes_max {
                    let what = format!(
                        "output of {len} bytes exceeds the limit of {}",
                        data.output_bytes_max
                    );
                    return Err(data.violation(what));
                }
                let Some(range) = guest_range(ptr, len, mem.len()) else {
                    return Err(
                        data.violation(format!("output buffer {ptr}+{len} is outside memory"))
                    );
                };
                data.output.extend_from_slice(&mem[range]);
                data.output_set = true;
                Ok(())
            },
        )?;
        linker.func_wrap(
            abi::IMPORT_MODULE,
            "log",
            |mut caller: Caller<'_, GuestData>, level: u32, ptr: u32, len: u32| {
                let memory = guest_memory(&mut caller)?;
                let (mem, data) = memory.data_and_store_mut(&mut caller);
                let Some(range) = guest_range(ptr, len.min(LOG_LINE_BYTES_MAX as u32), mem.len()) else {
                    return Err(data.violation(format!("log buffer {ptr}+{len} is outside memory")));
                };
                let line = String::from_utf8_lossy(&mem[range]).into_owned();
                if level == abi::LOG_LEVEL_PANIC {
                    data.panic = Some(line);
                    return Ok(());
                }
                data.log_lines += 1;
                if data.log_lines > LOG_LINES_PER_CALL_MAX {
                    if data.log_lines == LOG_LINES_PER_CALL_MAX + 1 {
                        tracing::warn!(target: "vp::guest", guest = %data.label, "guest log limit reached; further lines of this message are not logged");
                    }
                    return Ok(());
                }
                let level = level.min(abi::LOG_LEVEL_ERROR);
                match level {
                    0 => tracing::trace!(target: "vp::guest", guest = %data.label, "{line}"),
                    1 => tracing::debug!(target: "vp::guest", guest = %data.label, "{line}"),
                    2 => tracing::info!(target: "vp::guest", guest = %data.label, "{line}"),
                    3 => tracing::warn!(target: "vp::guest", guest = %data.label, "{line}"),
                    _ => tracing::error!(target: "vp::guest", guest = %data.label, "{line}"),
                }
                data.captured.push(GuestLogLine {
                    level: level as u8,
                    text: line,
                });
                Ok(())
            },
        )?;
        Ok(())
    }

    /// Compile and check a module, or return the cached one with the same hash.
    pub fn load(&self, bytes: &[u8]) -> Result<Arc<LoadedModule>, LoadError> {
        let hash = ModuleHash::of(bytes);
        if let Some(module) = self.modules.get(&hash) {
            return Ok(module.clone());
        }
        let rewritten = module::rewrite(bytes)?;
        // Machine code is named by what is compiled, the module as rewritten
        // here: a vp-host that rewrites differently never loads another's.
        let compiled_as = self
            .compiled_cache
            .as_ref()
            .map(|_| ModuleHash::of(&rewritten.bytes));
        let cached = self
            .compiled_cache
            .as_ref()
            .zip(compiled_as.as_ref())
            .and_then(|(c, h)| c.get(&self.engine, h));
        let module = match cached {
            Some(module) => {
                self.counters.from_disk.fetch_add(1, Ordering::Relaxed);
                module
            }
            None => {
                let module = wasmtime::Module::new(&self.engine, &rewritten.bytes)
                    .map_err(|e| LoadError::Invalid(format!("{:#}", e)))?;
                self.counters.compiled.fetch_add(1, Ordering::Relaxed);
                module
            }
        };
        for import in module.imports() {
            let expected = IMPORTS
                .iter()
                .find(|(name, _)| import.module() == abi::IMPORT_MODULE && *name == import.name());
            let Some((_, params)) = expected else {
                return Err(LoadError::UnsupportedImport {
                    module: import.module().to_string(),
                    name: import.name().to_string(),
                });
            };
            let ok = match import.ty() {
                ExternType::Func(f) => {
                    f.params().len() == *params
                        && f.params().all(|p| matches!(p, ValType::I32))
                        && f.results().len() == 0
                }
                _ => false,
            };
            if !ok {
                return Err(LoadError::BadImportType {
                    name: import.name().to_string(),
                    found: format!("{:?}", import.ty()),
                    expected: if *params == 3 {
                        "func(i32, i32, i32)"
                    } else {
                        "func(i32, i32)"
                    },
                });
            }
        }
        match module.get_export("memory") {
            Some(ExternType::Memory(_)) => {}
            Some(other) => {
                return Err(LoadError::BadExportType {
                    name: "memory",
                    found: format!("{other:?}"),
                    expected: "memory",
                });
            }
            None => return Err(LoadError::MissingExport("memory")),
        }
        check_func_export(&module, "vp_abi_version", 0)?;
        check_func_export(&module, "vp_init", 0)?;
        check_func_export(&module, "vp_handle", 1)?;
        let has_query = module.get_export("vp_query").is_some();
        if has_query {
            check_func_export(&module, "vp_query", 1)?;
        }
        let pre = self
            .linker
            .instantiate_pre(&module)
            .map_err(|e| LoadError::Invalid(format!("{e:#}")))?;
        let mut loaded = LoadedModule {
            hash,
            pre,
            globals: rewritten.globals,
            stack_pointer: rewritten.stack_pointer,
            has_query,
            abi_version: 0,
            bytes_len: bytes.len(),
        };
        // Ask the module its ABI version in a throwaway instance.
        let check_limits = GuestLimits {
            fuel_per_message: LOAD_CHECK_FUEL,
            ..GuestLimits::default()
        };
        let mut live = Live::instantiate(&self.engine, &loaded, &check_limits, "abi-check".into())?;
        let version = live.abi_version()?;
        if version != abi::ABI_VERSION {
            return Err(LoadError::AbiMismatch {
                found: version,
                supported: abi::ABI_VERSION,
            });
        }
        loaded.abi_version = version;
        // Only a module that passed every check is kept on disk.
        if let (Some(cache), Some(h)) = (&self.compiled_cache, &compiled_as)
            && !cache.contains(h)
        {
            cache.put(h, loaded.pre.module());
        }
        let loaded = Arc::new(loaded);
        if self.modules.len() >= MODULES_MAX {
            self.modules.retain(|_, m| Arc::strong_count(m) > 1);
            if self.modules.len() >= MODULES_MAX {
                return Err(LoadError::CacheFull);
            }
        }
        Ok(self.modules.entry(hash).or_insert(loaded).clone())
    }

    /// The cached module with this hash, if any.
    pub fn module(&self, hash: &ModuleHash) -> Option<Arc<LoadedModule>> {
        self.modules.get(hash).map(|m| m.clone())
    }
}

/// Check that a snapshot belongs to `module` and fits `limits`.
fn check_snapshot_fits(
    module: &LoadedModule,
    hash: ModuleHash,
    abi_version: u32,
    memory_bytes: usize,
    globals: &[GlobalValue],
    limits: &GuestLimits,
) -> Result<(), SnapshotError> {
    if hash != module.hash {
        return Err(SnapshotError::ModuleMismatch {
            snapshot: hash.to_string(),
            module: module.hash.to_string(),
        });
    }
    if abi_version != module.abi_version {
        return Err(SnapshotError::AbiMismatch {
            snapshot: abi_version,
            module: module.abi_version,
        });
    }
    if memory_bytes as u64 > limits.memory_bytes_max {
        return Err(SnapshotError::TooLarge {
            bytes: memory_bytes as u64,
            max: limits.memory_bytes_max,
        });
    }
    let kinds_match = globals.len() == module.globals.len()
        && globals
            .iter()
            .zip(&module.globals)
            .all(|(v, (_, k))| v.kind() == *k);
    if !kinds_match {
        return Err(SnapshotError::GlobalsMismatch(format!(
            "snapshot has {} globals, the module {}",
            globals.len(),
            module.globals.len()
        )));
    }
    Ok(())
}

fn check_func_export(
    module: &wasmtime::Module,
    name: &'static str,
    params: usize,
) -> Result<(), LoadError> {
    let expected = if params == 0 {
        "func() -> i32"
    } else {
        "func(i32) -> i32"
    };
    match module.get_export(name) {
        None => Err(LoadError::MissingExport(name)),
        Some(ExternType::Func(f))
            if f.params().len() == params
                && f.params().all(|p| matches!(p, ValType::I32))
                && f.results().len() == 1
                && f.results().all(|r| matches!(r, ValType::I32)) =>
        {
            Ok(())
        }
        Some(other) => Err(LoadError::BadExportType {
            name,
            found: format!("{other:?}"),
            expected,
        }),
    }
}

/// A running instance: the store and the handles into it.
struct Live {
    store: Store<GuestData>,
    memory: Memory,
    abi_version: TypedFunc<(), u32>,
    init: TypedFunc<(), u32>,
    handle: TypedFunc<u32, u32>,
    query: Option<TypedFunc<u32, u32>>,
    globals: Vec<Global>,
}

impl Live {
    fn instantiate(
        engine: &Engine,
        module: &LoadedModule,
        limits: &GuestLimits,
        label: Arc<str>,
    ) -> Result<Live, LoadError> {
        let data = GuestData {
            limiter: Limiter {
                memory_bytes_max: limits.memory_bytes_max,
                table_elements_max: limits.table_elements_max,
                denied_memory: None,
            },
            memory: None,
            input: Vec::new(),
            output: Vec::new(),
            output_set: false,
            output_bytes_max: limits.output_bytes_max,
            panic: None,
            abi_violation: None,
            log_lines: 0,
            captured: Vec::new(),
            label,
        };
        let mut store = Store::new(engine, data);
        store.limiter(|d| &mut d.limiter);
        store
            .set_fuel(limits.fuel_per_message)
            .map_err(|e| LoadError::Engine(format!("{e:#}")))?;
        let instance = module
            .pre
            .instantiate(&mut store)
            .map_err(|e| LoadError::Start(classify(e, store.data_mut(), limits)))?;
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or(LoadError::MissingExport("memory"))?;
        store.data_mut().memory = Some(memory);
        let typed = |store: &mut Store<GuestData>, name: &'static str| {
            instance
                .get_typed_func::<u32, u32>(store, name)
                .map_err(|_| LoadError::MissingExport(name))
        };
        let nullary = |store: &mut Store<GuestData>, name: &'static str| {
            instance
                .get_typed_func::<(), u32>(store, name)
                .map_err(|_| LoadError::MissingExport(name))
        };
        let abi_version = nullary(&mut store, "vp_abi_version")?;
        let init = nullary(&mut store, "vp_init")?;
        let handle = typed(&mut store, "vp_handle")?;
        let query = if module.has_query {
            Some(typed(&mut store, "vp_query")?)
        } else {
            None
        };
        let mut globals = Vec::with_capacity(module.globals.len());
        for (name, _) in &module.globals {
            globals.push(
                instance
                    .get_global(&mut store, name)
                    .ok_or(LoadError::MissingExport("mutable global"))?,
            );
        }
        Ok(Live {
            store,
            memory,
            abi_version,
            init,
            handle,
            query,
            globals,
        })
    }

    fn abi_version(&mut self) -> Result<u32, LoadError> {
        self.abi_version
            .call(&mut self.store, ())
            .map_err(|e| LoadError::Start(GuestError::Trap(format!("{e:#}"))))
    }

    /// Run `vp_init` (a fresh guest only; a restored one has its state already).
    fn init(&mut self, limits: &GuestLimits) -> Result<(), LoadError> {
        self.store.data_mut().reset_for_call();
        self.store
            .set_fuel(limits.fuel_per_message)
            .expect("fuel is enabled");
        match self.init.call(&mut self.store, ()) {
            Ok(abi::STATUS_OK) => Ok(()),
            Ok(status) => Err(LoadError::Start(GuestError::Abi(format!(
                "vp_init returned status {status}"
            )))),
            Err(e) => Err(LoadError::Start(classify(e, self.store.data_mut(), limits))),
        }
    }

    fn memory_bytes(&self) -> usize {
        self.memory.data_size(&self.store)
    }

    fn call(&mut self, func: TypedFunc<u32, u32>, limits: &GuestLimits) -> Result<u32, GuestError> {
        let len = self.store.data().input.len() as u32;
        self.store.data_mut().reset_for_call();
        self.store
            .set_fuel(limits.fuel_per_message)
            .expect("fuel is enabled");
        match func.call(&mut self.store, len) {
            Ok(status) => {
                let data = self.store.data();
                if !data.output_set {
                    return Err(GuestError::Abi(
                        "returned without calling output".to_string(),
                    ));
                }
                Ok(status)
            }
            Err(err) => Err(classify(err, self.store.data_mut(), limits)),
        }
    }

    fn globals(&mut self) -> Vec<GlobalValue> {
        self.globals
            .iter()
            .map(|g| match g.get(&mut self.store) {
                Val::I32(v) => GlobalValue::I32(v),
                Val::I64(v) => GlobalValue::I64(v),
                Val::F32(v) => GlobalValue::F32(v),
                Val::F64(v) => GlobalValue::F64(v),
                Val::V128(v) => GlobalValue::V128(v.as_u128()),
                other => panic!("mutable global of unsupported type {other:?} passed the loader"),
            })
            .collect()
    }

    fn set_globals(&mut self, values: &[GlobalValue]) {
        for (g, v) in self.globals.iter().zip(values) {
            let val = match *v {
                GlobalValue::I32(v) => Val::I32(v),
                GlobalValue::I64(v) => Val::I64(v),
                GlobalValue::F32(v) => Val::F32(v),
                GlobalValue::F64(v) => Val::F64(v),
                GlobalValue::V128(v) => Val::V128(V128::from(v)),
            };
            g.set(&mut self.store, val)
                .expect("global types were checked against the module");
        }
    }

    /// Make memory exactly `memory_bytes` long, let `fill` write all of it,
    /// and set the globals. Memory cannot shrink: a smaller state is refused.
    fn write_state(
        &mut self,
        memory_bytes: usize,
        fill: impl FnOnce(&mut [u8]),
        globals: &[GlobalValue],
    ) -> Result<(), LoadError> {
        let current = self.memory.data_size(&self.store);
        if memory_bytes < current {
            return Err(SnapshotError::MemoryTooSmall {
                snapshot: memory_bytes as u64,
                module: current as u64,
            }
            .into());
        }
        let grow = ((memory_bytes - current) / PAGE_BYTES) as u64;
        if grow > 0 {
            self.memory.grow(&mut self.store, grow).map_err(|_| {
                LoadError::Start(GuestError::MemoryLimit {
                    limit: self.store.data().limiter.memory_bytes_max,
                    requested: memory_bytes as u64,
                })
            })?;
        }
        fill(self.memory.data_mut(&mut self.store));
        self.set_globals(globals);
        Ok(())
    }

    /// Make memory and globals exactly those of `checkpoint`.
    fn write_checkpoint(&mut self, checkpoint: &Checkpoint) -> Result<(), LoadError> {
        match checkpoint {
            Checkpoint::Image { memory, globals } => {
                self.write_state(memory.len(), |dst| dst.copy_from_slice(memory), globals)
            }
            Checkpoint::Encoded { bytes, range, .. } => {
                let view = SnapshotView::parse(&bytes[range.clone()], u64::MAX)?;
                self.write_state(
                    view.memory_bytes,
                    |dst| view.copy_memory_into(dst),
                    &view.globals,
                )
            }
        }
    }
}

/// Turn a wasmtime error from a guest call into the reason the message failed.
fn classify(err: wasmtime::Error, data: &mut GuestData, limits: &GuestLimits) -> GuestError {
    if let Some(what) = data.abi_violation.take() {
        return GuestError::Abi(what);
    }
    let trap = err.downcast_ref::<Trap>().copied();
    if trap == Some(Trap::OutOfFuel) {
        return GuestError::OutOfFuel {
            limit: limits.fuel_per_message,
        };
    }
    if let Some(requested) = data.limiter.denied_memory.take() {
        return GuestError::MemoryLimit {
            limit: limits.memory_bytes_max,
            requested,
        };
    }
    if let Some(msg) = data.panic.take() {
        return GuestError::Panic(msg);
    }
    let place = err
        .downcast_ref::<WasmBacktrace>()
        .and_then(|bt| {
            bt.frames().iter().find_map(|f| {
                f.func_name()
                    .map(|n| format!("{:#}", rustc_demangle::demangle(n)))
            })
        })
        .map(|name| format!(" in {name}"))
        .unwrap_or_default();
    match trap {
        Some(trap) => {
            let what = trap.to_string();
            let what = what.strip_prefix("wasm trap: ").unwrap_or(&what);
            GuestError::Trap(format!("{what}{place}"))
        }
        None => GuestError::Trap(format!("{err:#}")),
    }
}

/// The state a guest returns to when a message fails: a copy of memory and
/// globals, or (right after a restore) the encoded snapshot it came from.
enum Checkpoint {
    Image {
        memory: Vec<u8>,
        globals: Vec<GlobalValue>,
    },
    Encoded {
        bytes: bytes::Bytes,
        range: std::ops::Range<usize>,
        memory_bytes: usize,
    },
}

impl Checkpoint {
    fn memory_bytes(&self) -> usize {
        match self {
            Checkpoint::Image { memory, .. } => memory.len(),
            Checkpoint::Encoded { memory_bytes, .. } => *memory_bytes,
        }
    }
}

/// Envelopes applied since the checkpoint, length-prefixed in one buffer.
#[derive(Default)]
struct ReplayLog {
    bytes: Vec<u8>,
    count: usize,
}

impl ReplayLog {
    fn push(&mut self, envelope: &[u8]) {
        self.bytes
            .extend_from_slice(&(envelope.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(envelope);
        self.count += 1;
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.count = 0;
    }

    fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let mut at = 0;
        std::iter::from_fn(move || {
            let len = u32::from_le_bytes(self.bytes.get(at..at + 4)?.try_into().ok()?) as usize;
            let env = &self.bytes[at + 4..at + 4 + len];
            at += 4 + len;
            Some(env)
        })
    }
}

/// One replica's guest: a single instance, reused for every message.
pub struct Guest {
    engine: Engine,
    module: Arc<LoadedModule>,
    limits: GuestLimits,
    label: Arc<str>,
    live: Live,
    checkpoint: Checkpoint,
    replay: ReplayLog,
    /// Saved stack region and globals around a read.
    read_save: Vec<u8>,
    failed: Option<String>,
    handled: u64,
    /// What the last `handle` logged, until `take_log`.
    logged: Vec<GuestLogLine>,
}

impl std::fmt::Debug for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guest")
            .field("module", &self.module.hash)
            .field("label", &self.label)
            .field("memory_bytes", &self.memory_bytes())
            .field("handled", &self.handled)
            .finish()
    }
}

impl Guest {
    /// Start a fresh guest: instantiate and run `vp_init`.
    pub fn start(
        sandbox: &Sandbox,
        module: Arc<LoadedModule>,
        limits: GuestLimits,
    ) -> Result<Guest, LoadError> {
        let label: Arc<str> = module.hash.short().into();
        let mut live = Live::instantiate(&sandbox.engine, &module, &limits, label.clone())?;
        live.init(&limits)?;
        let checkpoint = Checkpoint::Image {
            memory: live.memory.data(&live.store).to_vec(),
            globals: live.globals(),
        };
        Ok(Self::assemble(
            sandbox, module, limits, label, live, checkpoint,
        ))
    }

    /// Continue from a snapshot, in a fresh instance (as on another machine).
    /// The snapshot's memory becomes the rollback checkpoint (no copy).
    pub fn restore(
        sandbox: &Sandbox,
        module: Arc<LoadedModule>,
        snapshot: Snapshot,
        limits: GuestLimits,
    ) -> Result<Guest, LoadError> {
        check_snapshot_fits(
            &module,
            snapshot.module_hash,
            snapshot.abi_version,
            snapshot.memory.len(),
            &snapshot.globals,
            &limits,
        )?;
        let label: Arc<str> = module.hash.short().into();
        let mut live = Live::instantiate(&sandbox.engine, &module, &limits, label.clone())?;
        let memory = &snapshot.memory;
        live.write_state(
            memory.len(),
            |dst| dst.copy_from_slice(memory),
            &snapshot.globals,
        )?;
        let checkpoint = Checkpoint::Image {
            memory: snapshot.memory,
            globals: snapshot.globals,
        };
        Ok(Self::assemble(
            sandbox, module, limits, label, live, checkpoint,
        ))
    }

    /// Continue from an encoded snapshot (as received from another machine),
    /// copying each stored page once, straight into the new instance. The
    /// encoded bytes are kept as the rollback checkpoint.
    pub fn restore_encoded(
        sandbox: &Sandbox,
        module: Arc<LoadedModule>,
        encoded: Vec<u8>,
        limits: GuestLimits,
    ) -> Result<Guest, LoadError> {
        let len = encoded.len();
        Self::restore_shared(sandbox, module, encoded.into(), 0..len, limits)
    }

    /// Like [`Guest::restore_encoded`], for a snapshot that is the `range` of
    /// shared bytes (e.g. inside a replicated image): nothing is copied but
    /// the pages into the instance.
    pub fn restore_shared(
        sandbox: &Sandbox,
        module: Arc<LoadedModule>,
        bytes: bytes::Bytes,
        range: std::ops::Range<usize>,
        limits: GuestLimits,
    ) -> Result<Guest, LoadError> {
        let encoded = bytes
            .get(range.clone())
            .ok_or(SnapshotError::Truncated(bytes.len()))?;
        let view = SnapshotView::parse(encoded, limits.memory_bytes_max)?;
        check_snapshot_fits(
            &module,
            view.module_hash,
            view.abi_version,
            view.memory_bytes,
            &view.globals,
            &limits,
        )?;
        let label: Arc<str> = module.hash.short().into();
        let mut live = Live::instantiate(&sandbox.engine, &module, &limits, label.clone())?;
        live.write_state(
            view.memory_bytes,
            |dst| view.copy_memory_into(dst),
            &view.globals,
        )?;
        let memory_bytes = view.memory_bytes;
        drop(view);
        let checkpoint = Checkpoint::Encoded {
            bytes,
            range,
            memory_bytes,
        };
        Ok(Self::assemble(
            sandbox, module, limits, label, live, checkpoint,
        ))
    }

    fn assemble(
        sandbox: &Sandbox,
        module: Arc<LoadedModule>,
        limits: GuestLimits,
        label: Arc<str>,
        live: Live,
        checkpoint: Checkpoint,
    ) -> Guest {
        Guest {
            engine: sandbox.engine.clone(),
            module,
            limits,
            label,
            live,
            checkpoint,
            replay: ReplayLog::default(),
            read_save: Vec::new(),
            failed: None,
            handled: 0,
            logged: Vec::new(),
        }
    }

    /// Name this guest in log lines (e.g. the virtual peer's id).
    pub fn set_label(&mut self, label: &str) {
        self.label = label.into();
        self.live.store.data_mut().label = self.label.clone();
    }

    /// The module this guest runs.
    pub fn module(&self) -> &Arc<LoadedModule> {
        &self.module
    }

    /// The limits this guest runs under.
    pub fn limits(&self) -> GuestLimits {
        self.limits
    }

    /// Size of linear memory.
    pub fn memory_bytes(&self) -> usize {
        self.live.memory_bytes()
    }

    /// Messages handled successfully since this guest was started or restored.
    pub fn handled(&self) -> u64 {
        self.handled
    }

    /// The lines the last `handle` logged (also when it failed: they help
    /// find out why), leaving none.
    pub fn take_log(&mut self) -> Vec<GuestLogLine> {
        std::mem::take(&mut self.logged)
    }

    /// Handle one ordered envelope and return what the guest asks the host to
    /// do. On error the guest is exactly as before the call.
    pub fn handle(&mut self, envelope: &Envelope) -> Result<Vec<Effect>, GuestError> {
        if let Some(why) = &self.failed {
            return Err(GuestError::Failed(why.clone()));
        }
        let data = self.live.store.data_mut();
        data.input.clear();
        abi::codec::encode_envelope(envelope, &mut data.input);
        if data.input.len() > self.limits.input_bytes_max as usize {
            return Err(GuestError::InputTooLarge {
                bytes: data.input.len(),
                max: self.limits.input_bytes_max,
            });
        }
        let called = self.call_handle();
        // Taken before a roll-back, whose replay would log earlier messages' lines again.
        self.logged = std::mem::take(&mut self.live.store.data_mut().captured);
        let outcome = called.and_then(|()| {
            let output = &self.live.store.data().output;
            abi::codec::decode_effects(output)
                .map_err(|e| GuestError::Abi(format!("effects did not decode: {e}")))
        });
        match outcome {
            Ok(effects) => {
                self.handled += 1;
                self.replay.push(&self.live.store.data().input);
                if self.replay.count
                    >= REPLAY_MESSAGES_BASE + 16 * (self.memory_bytes() / PAGE_BYTES)
                    || self.replay.bytes.len() >= REPLAY_BYTES_MAX
                {
                    self.take_checkpoint();
                }
                Ok(effects)
            }
            Err(e) => {
                tracing::debug!(guest = %self.label, error = %e, "message failed; rolling back");
                self.roll_back()?;
                Err(e)
            }
        }
    }

    fn call_handle(&mut self) -> Result<(), GuestError> {
        let handle = self.live.handle.clone();
        match self.live.call(handle, &self.limits)? {
            abi::STATUS_OK => Ok(()),
            status => {
                let why = String::from_utf8_lossy(&self.live.store.data().output).into_owned();
                Err(GuestError::Abi(format!(
                    "guest refused the envelope (status {status}): {why}"
                )))
            }
        }
    }

    /// Answer a read (`App::read`) for CBOR message bytes, leaving the guest's
    /// state exactly as it was (verified by the tests through the digest).
    pub fn query(&mut self, payload: &[u8]) -> Result<WireResult, GuestError> {
        if let Some(why) = &self.failed {
            return Err(GuestError::Failed(why.clone()));
        }
        let Some(query) = self.live.query.clone() else {
            return Err(GuestError::NoReadPath);
        };
        // The stack region: everything below the shadow-stack pointer at rest.
        let stack_end = match self
            .module
            .stack_pointer
            .map(|i| self.live.globals[i].get(&mut self.live.store))
        {
            Some(Val::I32(sp)) if (sp as u32 as usize) <= STACK_REGION_BYTES_MAX => {
                sp as u32 as usize
            }
            _ => return Err(GuestError::NoReadPath),
        };
        if payload.len() > vp_guest_sdk::abi::QUERY_SCRATCH_BYTES / 2 {
            return Err(GuestError::InputTooLarge {
                bytes: payload.len(),
                max: (vp_guest_sdk::abi::QUERY_SCRATCH_BYTES / 2) as u32,
            });
        }
        let memory_before = self.memory_bytes();
        let globals_before = self.live.globals();
        let stack_end = stack_end.min(memory_before);
        self.read_save.clear();
        self.read_save
            .extend_from_slice(&self.live.memory.data(&self.live.store)[..stack_end]);
        let data = self.live.store.data_mut();
        data.input.clear();
        data.input.extend_from_slice(payload);
        let outcome = match self.live.call(query, &self.limits) {
            Ok(abi::STATUS_OK) => abi::codec::decode_result(&self.live.store.data().output)
                .map_err(|e| GuestError::Abi(format!("read output did not decode: {e}"))),
            Ok(status) => Err(GuestError::Abi(format!(
                "guest refused the read (status {status}): {}",
                String::from_utf8_lossy(&self.live.store.data().output)
            ))),
            Err(e) => Err(e),
        };
        if outcome.is_ok() && self.memory_bytes() == memory_before {
            self.live.memory.data_mut(&mut self.live.store)[..stack_end]
                .copy_from_slice(&self.read_save);
            self.live.set_globals(&globals_before);
        } else {
            self.roll_back()?;
        }
        outcome
    }

    /// Copy the current state as the new rollback point.
    fn take_checkpoint(&mut self) {
        let globals = self.live.globals();
        let live = self.live.memory.data(&self.live.store);
        match &mut self.checkpoint {
            Checkpoint::Image {
                memory,
                globals: saved,
            } => {
                memory.clear();
                memory.extend_from_slice(live);
                *saved = globals;
            }
            Checkpoint::Encoded { .. } => {
                self.checkpoint = Checkpoint::Image {
                    memory: live.to_vec(),
                    globals,
                }
            }
        }
        self.replay.clear();
    }

    /// Return to the state after the last successful message: write the
    /// checkpoint back (into a fresh instance if memory grew since) and replay.
    fn roll_back(&mut self) -> Result<(), GuestError> {
        if self.memory_bytes() != self.checkpoint.memory_bytes() {
            let fresh =
                Live::instantiate(&self.engine, &self.module, &self.limits, self.label.clone());
            self.live = fresh.map_err(|e| self.fail(format!("cannot re-instantiate: {e}")))?;
        }
        if let Err(e) = self.live.write_checkpoint(&self.checkpoint) {
            return Err(self.fail(format!("cannot restore the checkpoint: {e}")));
        }
        let replay = std::mem::take(&mut self.replay);
        for envelope in replay.iter() {
            let data = self.live.store.data_mut();
            data.input.clear();
            data.input.extend_from_slice(envelope);
            if let Err(e) = self.call_handle() {
                // Replaying what succeeded before failed: the guest is not deterministic.
                return Err(self.fail(format!("replay diverged: {e}")));
            }
        }
        if replay.count > 0 {
            self.take_checkpoint();
        }
        Ok(())
    }

    fn fail(&mut self, why: String) -> GuestError {
        tracing::error!(guest = %self.label, "{why}; the guest is stopped");
        self.failed = Some(why.clone());
        GuestError::Failed(why)
    }

    /// The guest's state, for another machine.
    pub fn snapshot(&mut self) -> Snapshot {
        Snapshot {
            module_hash: self.module.hash,
            abi_version: self.module.abi_version,
            memory: self.live.memory.data(&self.live.store).to_vec(),
            globals: self.live.globals(),
        }
    }

    /// Encode the guest's state (the snapshot format) into `out`, straight
    /// from live memory.
    pub fn encode_snapshot_into(&mut self, out: &mut Vec<u8>) {
        let globals = self.live.globals();
        let memory = self.live.memory.data(&self.live.store);
        encode_state(
            self.module.hash,
            self.module.abi_version,
            memory,
            &globals,
            out,
        );
    }

    /// Digest of the guest's state (memory and globals).
    pub fn digest(&mut self) -> StateDigest {
        let globals = self.live.globals();
        state_digest(self.live.memory.data(&self.live.store), &globals)
    }
}
