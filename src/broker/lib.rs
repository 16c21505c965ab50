//! vsound's audio broker: the only process holding PipeWire or ALSA. Serves the workers of every
//! VM, trusts nothing a worker sends, and plays and records through its backends.

#![forbid(unsafe_code)]

pub mod admin;
pub mod backends;
pub mod broker;
pub mod cli;
pub mod opener;
pub mod realtime;
