#![no_main]
//! The body and its invariants: vsound_fuzz_harness::ipc.

libfuzzer_sys::fuzz_target!(|data: &[u8]| vsound_fuzz_harness::ipc::broker_msg(data));
