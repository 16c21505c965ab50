//! What crosses the boundary between a worker and the broker, used by both sides: the sealed
//! memfd PCM rings with their wake-up fds (`ring`, over memory the peer shares), the control messages over a SOCK_SEQPACKET unix socket
//! (`ipc`), and the rate limiter for logs about the untrusted peer (`ratelimit`).

// `unsafe` is denied; the one exception is marked where it is (an ioctl in `ipc`). The ring
// needs none: vm-memory does its volatile accesses.
#![deny(unsafe_code)]

pub mod ipc;
pub mod ratelimit;
pub mod ring;
