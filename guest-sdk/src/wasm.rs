//! The wasm32 side of the ABI: host imports, the exported entry points'
//! bodies (called from [`crate::export_app!`]), and the guest allocator.
//!
//! A guest is single-threaded (the host enables no threads), so the statics
//! here are plain cells.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;

use crate::abi::{
    LOG_LEVEL_PANIC, QUERY_SCRATCH_BYTES, STATUS_BAD_INPUT, STATUS_BAD_STATE, STATUS_OK,
};
use crate::{App, Runtime};

#[link(wasm_import_module = "vp")]
unsafe extern "C" {
    /// Copy the pending input (exactly `len` bytes, as announced) to `ptr`.
    #[link_name = "input"]
    fn host_input(ptr: *mut u8, len: u32);
    /// Hand the call's output to the host (called at most once per call).
    #[link_name = "output"]
    fn host_output(ptr: *const u8, len: u32);
    /// Log a UTF-8 line; level 5 is a panic message.
    #[link_name = "log"]
    fn host_log(level: u32, ptr: *const u8, len: u32);
}

/// A cell for a single-threaded guest's statics.
struct GuestCell<T>(UnsafeCell<T>);

// SAFETY: wasm32 guests run on one thread; the host enables no wasm threads.
unsafe impl<T> Sync for GuestCell<T> {}

impl<T> GuestCell<T> {
    const fn new(value: T) -> Self {
        GuestCell(UnsafeCell::new(value))
    }
    fn get(&self) -> *mut T {
        self.0.get()
    }
}

/// Where the exported functions keep the app's runtime and its input buffer.
pub struct RuntimeSlot<A: App> {
    runtime: UnsafeCell<Option<Runtime<A>>>,
    input: UnsafeCell<Vec<u8>>,
}

// SAFETY: wasm32 guests run on one thread; the host enables no wasm threads.
unsafe impl<A: App> Sync for RuntimeSlot<A> {}

impl<A: App> RuntimeSlot<A> {
    /// An empty slot; `vp_init` fills it.
    #[allow(clippy::new_without_default)]
    pub const fn new() -> Self {
        RuntimeSlot {
            runtime: UnsafeCell::new(None),
            input: UnsafeCell::new(Vec::new()),
        }
    }
}

fn output(bytes: &[u8]) {
    // SAFETY: the host reads `len` bytes at `ptr` from this instance's memory.
    unsafe { host_output(bytes.as_ptr(), bytes.len() as u32) }
}

/// Send a line to the host's log (at info level). Logging has no effect on
/// the guest's state or on other replicas.
pub fn log(level: u32, msg: &str) {
    // SAFETY: as for `output`.
    unsafe { host_log(level, msg.as_ptr(), msg.len() as u32) }
}

/// Body of `vp_init`: create the app and route panics to the host.
pub fn init<A: App>(slot: &RuntimeSlot<A>) -> u32 {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(non-string panic payload)");
        let line = match info.location() {
            Some(at) => format!("{msg} (at {}:{}:{})", at.file(), at.line(), at.column()),
            None => msg.to_string(),
        };
        log(LOG_LEVEL_PANIC, &line);
    }));
    // SAFETY: single-threaded; no other reference to the slot is live.
    unsafe { *slot.runtime.get() = Some(Runtime::new()) };
    STATUS_OK
}

/// Body of `vp_handle`: read the envelope, process it, hand back the effects.
pub fn handle<A: App>(slot: &RuntimeSlot<A>, len: u32) -> u32 {
    // SAFETY: single-threaded; these are the only live references to the slot.
    let (runtime, input) = unsafe { (&mut *slot.runtime.get(), &mut *slot.input.get()) };
    let Some(runtime) = runtime else {
        output(b"vp_handle called before vp_init");
        return STATUS_BAD_STATE;
    };
    input.clear();
    input.resize(len as usize, 0);
    // SAFETY: `input` has exactly `len` writable bytes.
    unsafe { host_input(input.as_mut_ptr(), len) };
    match runtime.process(input) {
        Ok(effects) => {
            output(effects);
            STATUS_OK
        }
        Err(msg) => {
            output(msg.as_bytes());
            STATUS_BAD_INPUT
        }
    }
}

/// Body of `vp_query`: answer a read with every allocation in the scratch
/// arena, then wipe the arena, so linear memory is exactly as before (the host
/// restores the stack region; see docs/abi.md).
pub fn query<A: App>(slot: &RuntimeSlot<A>, len: u32) -> u32 {
    // SAFETY: single-threaded; the only live reference to the slot.
    let Some(runtime) = (unsafe { &*slot.runtime.get() }) else {
        output(b"vp_query called before vp_init");
        return STATUS_BAD_STATE;
    };
    if len as usize > QUERY_SCRATCH_BYTES / 2 {
        output(b"read message too large for the query scratch arena");
        return STATUS_BAD_INPUT;
    }
    enter_query_mode();
    {
        let mut input = vec![0u8; len as usize];
        // SAFETY: `input` has exactly `len` writable bytes.
        unsafe { host_input(input.as_mut_ptr(), len) };
        let reply = runtime.query(&input);
        output(&reply);
    }
    leave_query_mode();
    STATUS_OK
}

// ---- allocator -------------------------------------------------------------

#[repr(C, align(16))]
struct Scratch([u8; QUERY_SCRATCH_BYTES]);

static QUERY_MODE: GuestCell<bool> = GuestCell::new(false);
static SCRATCH_USED: GuestCell<usize> = GuestCell::new(0);
static SCRATCH: GuestCell<Scratch> = GuestCell::new(Scratch([0; QUERY_SCRATCH_BYTES]));

fn enter_query_mode() {
    // SAFETY: single-threaded access to the allocator's statics.
    unsafe { *QUERY_MODE.get() = true };
}

fn leave_query_mode() {
    // SAFETY: single-threaded; nothing allocated in scratch outlives the query.
    unsafe {
        std::ptr::write_bytes(SCRATCH.get().cast::<u8>(), 0, *SCRATCH_USED.get());
        *SCRATCH_USED.get() = 0;
        *QUERY_MODE.get() = false;
    }
}

fn in_scratch(ptr: *mut u8) -> bool {
    let start = SCRATCH.get() as usize;
    (start..start + QUERY_SCRATCH_BYTES).contains(&(ptr as usize))
}

/// The guest allocator: the system allocator (dlmalloc), except during a read,
/// when allocations come from a bump arena that is zeroed afterwards and frees
/// are ignored. So a read cannot change the heap.
pub struct VpAllocator;

impl VpAllocator {
    /// # Safety
    /// Single-threaded, in query mode.
    unsafe fn bump(layout: Layout) -> *mut u8 {
        // SAFETY: single-threaded access to the allocator's statics.
        unsafe {
            let used = &mut *SCRATCH_USED.get();
            let start = (*used + layout.align() - 1) & !(layout.align() - 1);
            let Some(end) = start
                .checked_add(layout.size())
                .filter(|&end| end <= QUERY_SCRATCH_BYTES)
            else {
                return std::ptr::null_mut();
            };
            *used = end;
            SCRATCH.get().cast::<u8>().add(start)
        }
    }
}

// SAFETY: follows the GlobalAlloc contract; scratch memory is zero outside a read.
unsafe impl GlobalAlloc for VpAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: single-threaded; delegating keeps System's contract.
        unsafe {
            if *QUERY_MODE.get() {
                Self::bump(layout)
            } else {
                System.alloc(layout)
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: scratch memory is all zeros outside the part already handed out.
        unsafe {
            if *QUERY_MODE.get() {
                Self::bump(layout)
            } else {
                System.alloc_zeroed(layout)
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: a pointer outside scratch came from System.
        unsafe {
            if *QUERY_MODE.get() || in_scratch(ptr) {
                return;
            }
            System.dealloc(ptr, layout)
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for alloc/dealloc; the copy stays within both blocks.
        unsafe {
            if *QUERY_MODE.get() || in_scratch(ptr) {
                let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
                let new = self.alloc(new_layout);
                if !new.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                }
                return new;
            }
            System.realloc(ptr, layout, new_size)
        }
    }
}

#[global_allocator]
static ALLOCATOR: VpAllocator = VpAllocator;
