//! cargo-fuzz target `wire`: see `vp_host::fuzzing::wire` and docs/fuzzing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vp_host::fuzzing::wire(data));
