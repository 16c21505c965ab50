//! The virtio-snd device's logic as the spec (VIRTIO 1.2/1.3, device ID 25) defines it: the wire
//! structs (`protocol`), the control request handler and PCM state machine (`control`), the control elements
//! (`ctl`), the parsing
//! of a descriptor chain into guest buffers (`guest`) and of a PCM I/O request (`xfer`). Pure: no I/O, no threads, no
//! `unsafe`; everything a guest sends is parsed here, which is what the fuzz targets exercise.

#![forbid(unsafe_code)]

pub mod control;
pub mod ctl;
pub mod guest;
pub mod protocol;
pub mod xfer;
