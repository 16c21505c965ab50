//! vsound's worker: one per VM. Serves the VMM's vhost-user socket as a virtio-sound device,
//! parses every guest request with `virtio_snd`, and moves PCM to and from the broker through
//! `vsound_shared`'s rings. Depends on no audio crate: the manifest is the proof.
//!
//! - `cli`: the command line (the binary's and its man page's);
//! - `device`: the vhost-user backend: queues, events, the broker link's ups and downs;
//! - `stream`: one stream's state and data path (pacing, ring, local clock);
//! - `pcm_host`: what PCM control requests do to a stream's data path;
//! - `completion`: held guest buffers, completed exactly once, signalled in batches;
//! - `broker_link`: the client of the broker, reconnecting when it restarts;
//! - `local_clock`: the pace of a stream while the broker is away.

#![forbid(unsafe_code)]

mod broker_link;
pub mod cli;
mod completion;
pub mod device;
mod local_clock;
mod pcm_host;
mod stream;
