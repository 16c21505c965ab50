//! vsound: a hardened vhost-user virtio-sound device.
//!
//! The `worker` serves one VMM's vhost-user socket and parses every guest request; the `broker`
//! owns the audio backends. PCM crosses between them through sealed memfd rings (`ring`), control
//! messages through `ipc`.

pub mod backends;
pub mod broker;
pub mod broker_link;
pub mod config;
pub mod control;
pub mod guest;
pub mod ipc;
pub mod listen;
pub mod local_clock;
pub mod opener;
pub mod protocol;
pub mod ratelimit;
pub mod ring;
pub mod sandbox;
pub mod worker;
