//! cargo-fuzz target `local_input`: see `vp_host::fuzzing::local_input` and docs/fuzzing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vp_host::fuzzing::local_input(data));
