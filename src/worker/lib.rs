//! vsound's worker: one per VM. Serves the VMM's vhost-user socket as a virtio-sound device,
//! parses every guest request with `virtio_snd`, and moves PCM to and from the broker through
//! `vsound_shared`'s rings. Depends on no audio crate: the manifest is the proof.

pub mod broker_link;
pub mod local_clock;
pub mod worker;
