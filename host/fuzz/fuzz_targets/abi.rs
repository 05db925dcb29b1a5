//! cargo-fuzz target `abi`: see `vp_host::fuzzing::abi` and docs/fuzzing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vp_host::fuzzing::abi(data));
