//! Single-producer single-consumer byte rings in sealed memfds, shared by worker and broker.
//!
//! Layout: a 4 KiB header page with one 64-byte line per field, then `capacity` data bytes.
//! Positions are free-running 64-bit byte counters; `pos % capacity` is the offset in the data.
//! Each side owns one counter and keeps its own authoritative copy of it; the peer's counter is
//! read once per operation, checked against what it could legally be, and only then used. Data
//! is copied out of the mapping before anyone looks at it. Nothing in the mapping is a lock.
//!
//! The memfd is sealed against shrinking and growing, so the peer can never make our mapping
//! fault (SIGBUS); the side that maps it checks those seals and the size first.
//! Mapping and volatile access go through vm-memory's `MmapRegion`, so this module needs no
//! `unsafe`.

use std::fs::File;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use memfd::{FileSeal, Memfd, MemfdOptions};
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, VolatileMemory, VolatileSlice};

pub const HEADER_BYTES: usize = 4096;
/// Largest ring the broker creates or the worker accepts.
pub const MAX_CAPACITY: u64 = 16 << 20;

const OFF_WRITE_POS: usize = 64;
const OFF_READ_POS: usize = 128;
/// Frames buffered in the backend after leaving (playback) or before entering (capture) the ring.
const OFF_BACKEND_DELAY: usize = 192;
/// The broker's position at which the worker wants to be woken (its `used_event`): playback,
/// the read position that completes its oldest buffer; capture, the write position that fills
/// it. The broker wakes the worker once when its position reaches it, not on every cycle.
const OFF_WAKE_AT: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("ring capacity {0} out of range")]
    Capacity(u64),
    #[error("memfd: {0}")]
    Memfd(String),
    #[error("ring memfd is missing the shrink/grow/seal seals")]
    NotSealed,
    #[error("ring memfd has {actual} bytes, expected {expected}")]
    Size { actual: u64, expected: u64 },
    #[error("mapping the ring failed: {0}")]
    Map(String),
    #[error("peer published an impossible position {pos} (valid {min}..={max})")]
    BadPeerPosition { pos: u64, min: u64, max: u64 },
    #[error("shared memory access failed: {0}")]
    Access(String),
    #[error("the wake-up fd is not an open socket")]
    WakeupFd,
}

/// One mapping of a ring; used through [`Producer`] or [`Consumer`]. A clone is another
/// handle on the same mapping (no new mapping, no fd): the broker reads its statistics so.
#[derive(Clone)]
pub struct SharedRing {
    region: Arc<MmapRegion<()>>,
    capacity: u64,
}

fn total_len(capacity: u64) -> u64 {
    HEADER_BYTES as u64 + capacity
}

impl SharedRing {
    /// Creates a sealed ring; returns our mapping and the fd to hand to the peer.
    pub fn create(capacity: u64) -> Result<(SharedRing, OwnedFd), RingError> {
        if capacity == 0 || capacity > MAX_CAPACITY {
            return Err(RingError::Capacity(capacity));
        }
        let memfd = MemfdOptions::default()
            .allow_sealing(true)
            .close_on_exec(true)
            .create("vsound-ring")
            .map_err(|e| RingError::Memfd(e.to_string()))?;
        memfd
            .as_file()
            .set_len(total_len(capacity))
            .map_err(|e| RingError::Memfd(e.to_string()))?;
        memfd
            .add_seals(&[FileSeal::SealShrink, FileSeal::SealGrow, FileSeal::SealSeal])
            .map_err(|e| RingError::Memfd(e.to_string()))?;
        let peer_fd = memfd
            .as_file()
            .try_clone()
            .map_err(|e| RingError::Memfd(e.to_string()))?;
        let ring = SharedRing::map_file(memfd.into_file(), capacity)?;
        Ok((ring, peer_fd.into()))
    }

    /// Maps a ring received from the peer, after checking that it is a sealed memfd of exactly
    /// the announced size.
    pub fn open(fd: OwnedFd, capacity: u64) -> Result<SharedRing, RingError> {
        if capacity == 0 || capacity > MAX_CAPACITY {
            return Err(RingError::Capacity(capacity));
        }
        let memfd =
            Memfd::try_from_fd(fd).map_err(|_| RingError::Memfd("the fd is not a memfd".into()))?;
        let seals = memfd.seals().map_err(|e| RingError::Memfd(e.to_string()))?;
        if !(seals.contains(&FileSeal::SealShrink)
            && seals.contains(&FileSeal::SealGrow)
            && seals.contains(&FileSeal::SealSeal))
        {
            return Err(RingError::NotSealed);
        }
        let actual = memfd
            .as_file()
            .metadata()
            .map_err(|e| RingError::Memfd(e.to_string()))?
            .len();
        if actual != total_len(capacity) {
            return Err(RingError::Size {
                actual,
                expected: total_len(capacity),
            });
        }
        SharedRing::map_file(memfd.into_file(), capacity)
    }

    fn map_file(file: File, capacity: u64) -> Result<SharedRing, RingError> {
        let region =
            MmapRegion::<()>::from_file(FileOffset::new(file, 0), total_len(capacity) as usize)
                .map_err(|e| RingError::Map(e.to_string()))?;
        Ok(SharedRing {
            region: Arc::new(region),
            capacity,
        })
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn counter(&self, offset: usize) -> Result<&AtomicU64, RingError> {
        self.region
            .get_atomic_ref::<AtomicU64>(offset)
            .map_err(|e| RingError::Access(e.to_string()))
    }

    fn load(&self, offset: usize) -> Result<u64, RingError> {
        Ok(self.counter(offset)?.load(Ordering::Acquire))
    }

    fn store(&self, offset: usize, value: u64) -> Result<(), RingError> {
        self.counter(offset)?.store(value, Ordering::Release);
        Ok(())
    }

    /// The two contiguous pieces of `len` bytes starting at position `pos`.
    fn pieces(&self, pos: u64, len: usize) -> [(usize, usize); 2] {
        let start = (pos % self.capacity) as usize;
        let first = len.min(self.capacity as usize - start);
        [(HEADER_BYTES + start, first), (HEADER_BYTES, len - first)]
    }

    /// Hands the ring's memory of the `len` bytes at position `pos` to `f(offset, piece)`, in
    /// order, in at most two pieces (`offset` counts from the first byte); stops at the first
    /// `f` that returns false and returns whether every one returned true.
    fn with_pieces(
        &self,
        pos: u64,
        len: u64,
        mut f: impl FnMut(u64, VolatileSlice<'_>) -> bool,
    ) -> Result<bool, RingError> {
        let mut done = 0u64;
        for (offset, piece) in self.pieces(pos, len as usize) {
            if piece > 0 {
                let slice = self
                    .region
                    .get_slice(offset, piece)
                    .map_err(|e| RingError::Access(e.to_string()))?;
                if !f(done, slice) {
                    return Ok(false);
                }
                done += piece as u64;
            }
        }
        Ok(true)
    }

    fn write_at(&self, pos: u64, data: &[u8]) -> Result<(), RingError> {
        self.with_pieces(pos, data.len() as u64, |offset, piece| {
            let at = offset as usize;
            piece.copy_from(&data[at..at + piece.len()]);
            true
        })
        .map(|_| ())
    }

    fn read_at(&self, pos: u64, out: &mut [u8]) -> Result<(), RingError> {
        self.with_pieces(pos, out.len() as u64, |offset, piece| {
            let at = offset as usize;
            piece.copy_to(&mut out[at..at + piece.len()]);
            true
        })
        .map(|_| ())
    }

    /// Bytes between the two positions as the header says now, clamped to the capacity (one
    /// side's position is the peer's to write): what is queued, for statistics only.
    pub fn fill(&self) -> u64 {
        let write = self.load(OFF_WRITE_POS).unwrap_or(0);
        let read = self.load(OFF_READ_POS).unwrap_or(0);
        write.saturating_sub(read).min(self.capacity)
    }

    /// Both positions (write, read) as the header says now: for statistics only.
    pub fn positions(&self) -> (u64, u64) {
        (
            self.load(OFF_WRITE_POS).unwrap_or(0),
            self.load(OFF_READ_POS).unwrap_or(0),
        )
    }

    /// Backend delay in frames, published by the broker (a hint: the worker clamps its use).
    pub fn backend_delay(&self) -> u64 {
        self.load(OFF_BACKEND_DELAY).unwrap_or(0)
    }

    pub fn set_backend_delay(&self, frames: u64) {
        let _ = self.store(OFF_BACKEND_DELAY, frames);
    }

    /// The worker asks to be woken once the broker's position reaches `pos` (`u64::MAX`:
    /// not at all). The fence pairs with [`SharedRing::wake_at`]'s: after it the worker reads
    /// the broker's position, so either it sees the position already there or the broker
    /// sees the new request (no wake-up is lost between the two).
    pub fn set_wake_at(&self, pos: u64) {
        let _ = self.store(OFF_WAKE_AT, pos);
        std::sync::atomic::fence(Ordering::SeqCst);
    }

    /// Where the worker wants to be woken (a hint from the peer: any value is safe). Called by
    /// the broker after it published its own position.
    pub fn wake_at(&self) -> u64 {
        std::sync::atomic::fence(Ordering::SeqCst);
        self.load(OFF_WAKE_AT).unwrap_or(0)
    }
}

/// The writing side of a ring.
pub struct Producer {
    ring: SharedRing,
    write_pos: u64,
    /// Last read position the consumer published; it may only grow.
    seen_read_pos: u64,
}

impl Producer {
    pub fn new(ring: SharedRing) -> Producer {
        Producer {
            ring,
            write_pos: 0,
            seen_read_pos: 0,
        }
    }

    pub fn ring(&self) -> &SharedRing {
        &self.ring
    }

    pub fn write_pos(&self) -> u64 {
        self.write_pos
    }

    /// The consumer's position, read once and checked to lie in `seen..=write_pos`.
    pub fn read_pos(&mut self) -> Result<u64, RingError> {
        let pos = self.ring.load(OFF_READ_POS)?;
        if pos < self.seen_read_pos || pos > self.write_pos {
            return Err(RingError::BadPeerPosition {
                pos,
                min: self.seen_read_pos,
                max: self.write_pos,
            });
        }
        self.seen_read_pos = pos;
        Ok(pos)
    }

    /// Bytes queued and not yet consumed.
    pub fn queued(&mut self) -> Result<u64, RingError> {
        Ok(self.write_pos - self.read_pos()?)
    }

    pub fn free(&mut self) -> Result<u64, RingError> {
        Ok(self.ring.capacity - self.queued()?)
    }

    /// Appends `len` bytes that `fill(offset, piece)` writes straight into the ring's memory,
    /// in order, in at most two pieces (`offset` counts from the start of the `len` bytes), if
    /// they fit entirely; returns whether they were appended. Nothing is published unless
    /// every `fill` returned true, so a failed source leaves the ring as it was.
    pub fn push_with(
        &mut self,
        len: u64,
        mut fill: impl FnMut(u64, VolatileSlice<'_>) -> bool,
    ) -> Result<bool, RingError> {
        if len > self.free()? {
            return Ok(false);
        }
        if !self.ring.with_pieces(self.write_pos, len, &mut fill)? {
            return Ok(false);
        }
        self.write_pos += len;
        self.ring.store(OFF_WRITE_POS, self.write_pos)?;
        Ok(true)
    }

    /// Appends `data` if it fits entirely; returns whether it did.
    pub fn push(&mut self, data: &[u8]) -> Result<bool, RingError> {
        if data.len() as u64 > self.free()? {
            return Ok(false);
        }
        self.ring.write_at(self.write_pos, data)?;
        self.write_pos += data.len() as u64;
        self.ring.store(OFF_WRITE_POS, self.write_pos)?;
        Ok(true)
    }
}

/// The reading side of a ring.
pub struct Consumer {
    ring: SharedRing,
    read_pos: u64,
    /// Last write position the producer published; it may only grow.
    seen_write_pos: u64,
}

impl Consumer {
    pub fn new(ring: SharedRing) -> Consumer {
        Consumer {
            ring,
            read_pos: 0,
            seen_write_pos: 0,
        }
    }

    pub fn ring(&self) -> &SharedRing {
        &self.ring
    }

    pub fn read_pos(&self) -> u64 {
        self.read_pos
    }

    /// The producer's position, read once and checked to lie in
    /// `max(seen, read_pos)..=read_pos + capacity`.
    pub fn write_pos(&mut self) -> Result<u64, RingError> {
        let pos = self.ring.load(OFF_WRITE_POS)?;
        let min = self.seen_write_pos.max(self.read_pos);
        let max = self.read_pos + self.ring.capacity;
        if pos < min || pos > max {
            return Err(RingError::BadPeerPosition { pos, min, max });
        }
        self.seen_write_pos = pos;
        Ok(pos)
    }

    pub fn available(&mut self) -> Result<u64, RingError> {
        Ok(self.write_pos()? - self.read_pos)
    }

    /// Copies up to `out.len()` available bytes out and consumes them; returns how many.
    pub fn pop(&mut self, out: &mut [u8]) -> Result<usize, RingError> {
        let n = (self.available()? as usize).min(out.len());
        self.ring.read_at(self.read_pos, &mut out[..n])?;
        self.read_pos += n as u64;
        self.ring.store(OFF_READ_POS, self.read_pos)?;
        Ok(n)
    }

    /// Consumes up to `max` available bytes, handing them to `take(offset, piece)` straight
    /// from the ring's memory, in order, in at most two pieces (`offset` counts from the first
    /// byte taken); returns how many were consumed. They are consumed whatever `take` does
    /// with them.
    pub fn pop_with(
        &mut self,
        max: u64,
        mut take: impl FnMut(u64, VolatileSlice<'_>),
    ) -> Result<u64, RingError> {
        let n = self.available()?.min(max);
        self.ring.with_pieces(self.read_pos, n, |offset, piece| {
            take(offset, piece);
            true
        })?;
        self.read_pos += n;
        self.ring.store(OFF_READ_POS, self.read_pos)?;
        Ok(n)
    }

    /// Consumes `n` available bytes without copying them (`n` must not exceed `available`).
    pub fn skip(&mut self, n: u64) -> Result<(), RingError> {
        let n = n.min(self.available()?);
        self.read_pos += n;
        self.ring.store(OFF_READ_POS, self.read_pos)
    }
}

/// How the broker tells a worker that a ring moved: a SOCK_SEQPACKET socketpair, one end each.
///
/// The two ends are separate open files, so nothing the worker does to its end (flags, never
/// reading, shutdown, close) can make the broker's sends block: they are `MSG_DONTWAIT`, a full
/// queue means a wake-up is already pending, and a gone peer means nobody is left to wake. The
/// broker's end gets the smallest send buffer, so an unread end pins a few kilobytes of kernel
/// memory, and it is shut for reading, so the worker cannot queue anything towards it. The
/// worker in turn only ever reads its end with `MSG_DONTWAIT`, so a hostile broker cannot block
/// the worker's device thread either.
pub struct WakeSender {
    fd: OwnedFd,
}

/// What the worker's end of a [`WakeSender`] had to say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wakeups {
    /// Nothing more to read now: wait for the next wake-up.
    Drained,
    /// The broker's end is gone, or the fd is not a socket: it will never wake us again.
    Closed,
}

impl WakeSender {
    /// A new pair: the broker keeps the sender, the other end is for the worker (SCM_RIGHTS).
    pub fn pair() -> std::io::Result<(WakeSender, OwnedFd)> {
        let (broker_end, worker_end) = rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::SEQPACKET,
            rustix::net::SocketFlags::CLOEXEC | rustix::net::SocketFlags::NONBLOCK,
            None,
        )?;
        // The kernel raises this to its minimum: a few queued one-byte packets.
        rustix::net::sockopt::set_socket_send_buffer_size(&broker_end, 1)?;
        // Also shuts the worker's end for sending: its packets fail with EPIPE.
        rustix::net::shutdown(&broker_end, rustix::net::Shutdown::Read)?;
        Ok((WakeSender { fd: broker_end }, worker_end))
    }

    /// Signals the worker. Never blocks and never allocates (one system call), so it is safe on
    /// the broker's loop and on a real-time audio thread; every error means there is nothing to
    /// do (EAGAIN: a wake-up is pending; EPIPE, ECONNRESET: the worker is gone).
    pub fn wake(&self) {
        let _ = rustix::net::send(
            &self.fd,
            &[1],
            rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL,
        );
    }
}

/// Reads the worker's end of a wake-up socket without ever blocking, whatever its flags.
fn recv_wakeup(fd: BorrowedFd<'_>) -> Result<usize, rustix::io::Errno> {
    let mut byte = [0u8; 1];
    // No room for ancillary data: fds a hostile broker attaches are discarded by the kernel.
    let mut control = rustix::net::RecvAncillaryBuffer::default();
    rustix::net::recvmsg(
        fd,
        &mut [std::io::IoSliceMut::new(&mut byte)],
        &mut control,
        rustix::net::RecvFlags::DONTWAIT,
    )
    .map(|msg| msg.bytes)
}

/// Reads one queued wake-up without blocking. The broker sends one per request of the
/// worker's ([`SharedRing::set_wake_at`]) and the level-triggered epoll reports any other, so
/// a wake-up costs one read, not a second one to find the queue empty; and a broker that
/// floods its end cannot keep the worker's device thread reading.
pub fn take_wakeup(fd: BorrowedFd<'_>) -> Wakeups {
    loop {
        return match recv_wakeup(fd) {
            Ok(0) => Wakeups::Closed,
            Ok(_) | Err(rustix::io::Errno::AGAIN) => Wakeups::Drained,
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => Wakeups::Closed,
        };
    }
}

/// Checks that a wake-up fd from the broker is one the worker can read without blocking (a
/// socket): anything else would be reported readable by epoll forever.
pub fn check_wakeup_fd(fd: BorrowedFd<'_>) -> Result<(), RingError> {
    match recv_wakeup(fd) {
        Ok(n) if n > 0 => Ok(()),
        Err(rustix::io::Errno::AGAIN) => Ok(()),
        _ => Err(RingError::WakeupFd),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn pair(capacity: u64) -> (Producer, Consumer) {
        let (ring, fd) = SharedRing::create(capacity).unwrap();
        let peer = SharedRing::open(fd, capacity).unwrap();
        (Producer::new(ring), Consumer::new(peer))
    }

    #[test]
    fn bytes_cross_with_wrap_around() {
        let (mut tx, mut rx) = pair(10);
        let mut out = [0u8; 10];
        let mut expected = Vec::new();
        let mut got = Vec::new();
        for round in 0u8..50 {
            let chunk: Vec<u8> = (0..7)
                .map(|i| round.wrapping_mul(7).wrapping_add(i))
                .collect();
            assert!(tx.push(&chunk).unwrap());
            expected.extend_from_slice(&chunk);
            assert!(!tx.push(&chunk).unwrap(), "must not overfill");
            let n = rx.pop(&mut out).unwrap();
            got.extend_from_slice(&out[..n]);
        }
        assert_eq!(got, expected);
        assert_eq!(tx.queued().unwrap(), 0);
    }

    #[test]
    fn pop_with_hands_out_both_pieces_in_order_and_consumes_them() {
        let (mut tx, mut rx) = pair(10);
        assert!(tx.push(&[0; 7]).unwrap());
        assert_eq!(rx.pop(&mut [0; 7]).unwrap(), 7);
        // 6 bytes from position 7: 3 before the wrap, 3 after.
        assert!(tx.push(&[1, 2, 3, 4, 5, 6]).unwrap());
        let mut seen = Vec::new();
        let taken = rx
            .pop_with(5, |offset, piece| {
                let mut bytes = vec![0u8; piece.len()];
                piece.copy_to(&mut bytes[..]);
                seen.push((offset, bytes));
            })
            .unwrap();
        assert_eq!(taken, 5);
        assert_eq!(seen, [(0, vec![1, 2, 3]), (3, vec![4, 5])]);
        assert_eq!(rx.available().unwrap(), 1);
        assert_eq!(tx.queued().unwrap(), 1);
        assert_eq!(rx.pop_with(100, |_, _| {}).unwrap(), 1);
    }

    #[test]
    fn open_rejects_unsealed_or_wrong_size() {
        let memfd = MemfdOptions::default()
            .allow_sealing(true)
            .create("x")
            .unwrap();
        memfd.as_file().set_len(total_len(64)).unwrap();
        let fd: OwnedFd = memfd.as_file().try_clone().unwrap().into();
        assert!(matches!(
            SharedRing::open(fd, 64),
            Err(RingError::NotSealed)
        ));

        let (_ring, fd) = SharedRing::create(64).unwrap();
        assert!(matches!(
            SharedRing::open(fd, 128),
            Err(RingError::Size { .. })
        ));
        let (_ring, fd) = SharedRing::create(64).unwrap();
        assert!(matches!(
            SharedRing::open(fd, MAX_CAPACITY + 1),
            Err(RingError::Capacity(_))
        ));
        let file: OwnedFd = File::open("/dev/null").unwrap().into();
        assert!(SharedRing::open(file, 64).is_err());
        assert!(SharedRing::create(0).is_err());
    }

    #[test]
    fn sealed_ring_cannot_be_resized() {
        let (_ring, fd) = SharedRing::create(64).unwrap();
        let file = File::from(fd);
        assert!(file.set_len(1).is_err());
        assert!(file.set_len(1 << 20).is_err());
        let _ = file.as_fd();
    }

    #[test]
    fn hostile_positions_are_detected() {
        let (mut tx, mut rx) = pair(16);
        assert!(tx.push(&[1; 8]).unwrap());
        // The producer claims more than the capacity ahead of the reader.
        tx.ring.store(OFF_WRITE_POS, 100).unwrap();
        assert!(matches!(
            rx.available(),
            Err(RingError::BadPeerPosition { pos: 100, .. })
        ));
        // The consumer claims to have read more than was written.
        tx.ring.store(OFF_WRITE_POS, 8).unwrap();
        rx.ring.store(OFF_READ_POS, 9).unwrap();
        assert!(tx.queued().is_err());
        // Or moves backwards.
        rx.ring.store(OFF_READ_POS, 4).unwrap();
        assert_eq!(tx.queued().unwrap(), 4);
        rx.ring.store(OFF_READ_POS, 3).unwrap();
        assert!(tx.queued().is_err());
        // A write position going backwards is refused too.
        let (mut tx, mut rx) = pair(16);
        tx.push(&[0; 8]).unwrap();
        assert_eq!(rx.available().unwrap(), 8);
        tx.ring.store(OFF_WRITE_POS, 7).unwrap();
        assert!(rx.available().is_err());
    }

    #[test]
    fn wake_at_is_shared_and_starts_at_zero() {
        let (tx, rx) = pair(16);
        // A fresh ring asks to be woken at once (a worker that set nothing yet still hears).
        assert_eq!(rx.ring().wake_at(), 0);
        tx.ring().set_wake_at(1234);
        assert_eq!(rx.ring().wake_at(), 1234);
    }

    #[test]
    fn backend_delay_is_shared() {
        let (tx, rx) = pair(16);
        rx.ring().set_backend_delay(480);
        assert_eq!(tx.ring().backend_delay(), 480);
    }

    #[test]
    fn fill_is_what_is_queued_and_never_more_than_the_ring() {
        let (mut tx, mut rx) = pair(16);
        assert_eq!(rx.ring().fill(), 0);
        tx.push(&[1; 10]).unwrap();
        assert_eq!(rx.ring().fill(), 10);
        rx.pop(&mut [0; 4]).unwrap();
        assert_eq!(tx.ring().fill(), 6);
        // A peer's impossible position reads as a full ring, not as more.
        tx.ring().store(OFF_WRITE_POS, u64::MAX).unwrap();
        assert_eq!(rx.ring().fill(), 16);
    }

    /// Clears O_NONBLOCK on a worker's end, as a hostile worker would.
    fn make_blocking(fd: BorrowedFd<'_>) {
        let flags = rustix::fs::fcntl_getfl(fd).unwrap();
        rustix::fs::fcntl_setfl(fd, flags - rustix::fs::OFlags::NONBLOCK).unwrap();
    }

    #[test]
    fn waking_never_blocks_on_an_unread_blocking_end() {
        let (sender, worker_end) = WakeSender::pair().unwrap();
        make_blocking(worker_end.as_fd());
        let started = std::time::Instant::now();
        for _ in 0..10_000 {
            sender.wake();
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        // Only a few wake-ups are ever queued: the broker's end has the smallest send buffer.
        let mut queued = 0;
        while recv_wakeup(worker_end.as_fd()).is_ok_and(|n| n > 0) {
            queued += 1;
        }
        assert!((1..100).contains(&queued), "{queued} wake-ups queued");
        // A drained end reads as such without blocking, although it is blocking.
        assert_eq!(take_wakeup(worker_end.as_fd()), Wakeups::Drained);
        sender.wake();
        assert_eq!(take_wakeup(worker_end.as_fd()), Wakeups::Drained);
        assert_eq!(
            recv_wakeup(worker_end.as_fd()),
            Err(rustix::io::Errno::AGAIN)
        );
    }

    #[test]
    fn the_worker_cannot_queue_data_towards_the_broker() {
        let (_sender, worker_end) = WakeSender::pair().unwrap();
        let sent = rustix::net::send(
            &worker_end,
            &[0; 64],
            rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL,
        );
        assert_eq!(sent, Err(rustix::io::Errno::PIPE));
    }

    #[test]
    fn waking_a_gone_or_shut_worker_is_nothing_to_do() {
        let (sender, worker_end) = WakeSender::pair().unwrap();
        rustix::net::shutdown(&worker_end, rustix::net::Shutdown::Both).unwrap();
        sender.wake();
        drop(worker_end);
        sender.wake();
    }

    #[test]
    fn a_closed_broker_end_or_a_foreign_fd_is_reported() {
        let (sender, worker_end) = WakeSender::pair().unwrap();
        assert!(check_wakeup_fd(worker_end.as_fd()).is_ok());
        sender.wake();
        drop(sender);
        // The pending wake-up first, then the end of the socket.
        assert_eq!(take_wakeup(worker_end.as_fd()), Wakeups::Drained);
        assert_eq!(take_wakeup(worker_end.as_fd()), Wakeups::Closed);
        assert!(check_wakeup_fd(worker_end.as_fd()).is_err());
        // An eventfd (what the broker used to send) or a pipe is refused.
        let eventfd = rustix::event::eventfd(0, rustix::event::EventfdFlags::empty()).unwrap();
        assert!(matches!(
            check_wakeup_fd(eventfd.as_fd()),
            Err(RingError::WakeupFd)
        ));
        let (read_end, _write_end) = rustix::pipe::pipe().unwrap();
        assert!(check_wakeup_fd(read_end.as_fd()).is_err());
        assert_eq!(take_wakeup(read_end.as_fd()), Wakeups::Closed);
    }

    #[test]
    fn a_flooding_broker_gets_one_read_per_wake_up() {
        let (sender, worker_end) = WakeSender::pair().unwrap();
        // A hostile broker with a large buffer: more wake-ups than one drain reads.
        rustix::net::sockopt::set_socket_send_buffer_size(&sender.fd, 1 << 20).unwrap();
        for _ in 0..128 {
            sender.wake();
        }
        assert_eq!(take_wakeup(worker_end.as_fd()), Wakeups::Drained);
        assert!(recv_wakeup(worker_end.as_fd()).is_ok_and(|n| n == 1));
    }
}
