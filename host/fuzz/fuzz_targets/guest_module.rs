//! cargo-fuzz target `guest_module`: see `vp_host::fuzzing::guest_module` and docs/fuzzing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vp_host::fuzzing::guest_module(data));
