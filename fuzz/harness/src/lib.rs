//! The bodies of vsound's fuzz targets, one `pub fn(&[u8])` per target. The libFuzzer crate in
//! `fuzz/` only calls them, so they build and run on the stable toolchain too: the root
//! package's `tests/fuzz_corpus.rs` replays the seed corpus and the regressions through them.
//!
//! Each function panics when an invariant of what it drives does not hold, not only when that
//! code panics. Inputs are read with [`input::Input`], which reads zeros past the end, so every
//! byte string is a valid input and a short one is a small case. The `seeds` submodules build
//! well-formed inputs for the corpus.

#![forbid(unsafe_code)]

pub mod chain;
pub mod config;
pub mod control;
pub mod input;
pub mod ipc;
pub mod ring;
pub mod seeds;

/// A target's body.
pub type Body = fn(&[u8]);

/// Every target: its name (the fuzz target's, and its corpus directory's) and its body.
pub const TARGETS: &[(&str, Body)] = &[
    ("control", control::control),
    ("chain", chain::chain),
    ("ipc_worker_msg", ipc::worker_msg),
    ("ipc_broker_msg", ipc::broker_msg),
    ("ring", ring::ring),
    ("config", config::config),
];

/// A message formatted only when shown: an assertion's context costs nothing while it holds.
pub(crate) struct Lazy<F>(pub F);

impl<F: Fn() -> String> std::fmt::Display for Lazy<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&(self.0)())
    }
}
