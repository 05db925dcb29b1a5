//! cargo-fuzz target `consensus_storage`: see `vp_host::fuzzing::consensus_storage` and docs/fuzzing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vp_host::fuzzing::consensus_storage(data));
