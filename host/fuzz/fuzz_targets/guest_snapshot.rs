//! cargo-fuzz target `guest_snapshot`: see `vp_host::fuzzing::guest_snapshot` and docs/fuzzing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vp_host::fuzzing::guest_snapshot(data));
