//! How each vsound process starts, shared by the worker, the broker and the launcher: its
//! listening socket (bound to a path, inherited as `--fd N`, or from systemd socket activation;
//! `listen`) and its sandbox (namespaces, Landlock, capabilities, no_new_privs and the seccomp
//! filters compiled from `policies/*.json` at build time; `sandbox`), and its readiness for
//! systemd (`notify`).

// `unsafe` is denied; the one exception is marked where it is (adopting an inherited fd).
#![deny(unsafe_code)]

pub mod daemon;
pub mod listen;
pub mod notify;
pub mod sandbox;
