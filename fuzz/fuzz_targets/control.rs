#![no_main]
//! The body and its invariants: vsound_fuzz_harness::control.

libfuzzer_sys::fuzz_target!(|data: &[u8]| vsound_fuzz_harness::control::control(data));
