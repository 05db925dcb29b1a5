//! cargo-fuzz target `consensus_message`: see `vp_host::fuzzing::consensus_message` and docs/fuzzing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vp_host::fuzzing::consensus_message(data));
