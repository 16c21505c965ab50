//! What crosses the boundary between a worker and the broker, used by both sides: the sealed
//! memfd PCM rings with their wake-up fds (`ring`, the one module with `unsafe`: it reads and
//! writes memory the peer shares), the control messages over a SOCK_SEQPACKET unix socket
//! (`ipc`), and the rate limiter for logs about the untrusted peer (`ratelimit`).

pub mod ipc;
pub mod ratelimit;
pub mod ring;
