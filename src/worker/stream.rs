//! One PCM stream of the device, in one struct: its spec state ([`PcmStream`]), the params its
//! transport runs with, the transport (the broker's ring, or the worker's own clock while the
//! broker is away) and the guest buffers it holds.
//!
//! Playback pacing: a tx buffer is copied into the ring only when the ring has room (it holds
//! a few periods), straight from guest memory, and completed only once the broker has consumed
//! its last byte at the backend's clock. Capture: an rx buffer is completed only when it is
//! full.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use log::Level;
use nix::sys::epoll::{Epoll, EpollEvent, EpollFlags};

use crate::broker_link::{BrokerLink, Fault};
use crate::completion::{Completer, GuestMemory, Held};
use crate::local_clock::LocalClock;
use virtio_snd::control::{PcmParams, PcmState, PcmStream};
use virtio_snd::guest::GuestBuffer;
use virtio_snd::protocol::{self as p, Status};
use vsound_shared::guest_log;
use vsound_shared::ipc::{BrokerMsg, WorkerMsg};
use vsound_shared::ratelimit::LogLimiter;
use vsound_shared::ring::{check_wakeup_fd, Consumer, Producer, SharedRing};

/// Most pump rounds per wake-up (see [`Stream::pump`]).
const MAX_PUMP_ROUNDS: usize = 64;
/// How much a running stream must hold beyond its next completion to do without the guest's
/// kicks (see [`Stream::holds_enough`]): periods, and a floor in microseconds (the worker's
/// wake-up and a quantum of the backend must fit in it).
const KICKLESS_PERIODS: u64 = 2;
const KICKLESS_FLOOR_US: u64 = 10_000;

/// A tx message held until the backend has played it.
pub(crate) struct TxBuf {
    pub(crate) held: Held,
    /// Readable part; the payload starts after the 4-byte header.
    pub(crate) readable: GuestBuffer,
    /// Ring position just past this buffer's frames, once copied.
    ring_end: Option<u64>,
    status: Status,
    latency_bytes: u32,
    /// When the guest queued it, for the latency figures.
    arrived: Instant,
}

impl TxBuf {
    pub(crate) fn new(held: Held, readable: GuestBuffer) -> TxBuf {
        TxBuf {
            held,
            readable,
            ring_end: None,
            status: Status::Ok,
            latency_bytes: 0,
            arrived: Instant::now(),
        }
    }

    fn payload_len(&self) -> u64 {
        self.readable.len() - p::PcmXfer::SIZE
    }

    /// Completes it with its own status unless that is OK, else with `status`.
    fn complete(self, mem: &GuestMemory, done: &mut Completer, status: Status, latency: u32) {
        let status = if self.status == Status::Ok {
            status
        } else {
            self.status
        };
        let used = p::PcmStatus::SIZE as u32;
        self.held.complete(mem, done, status, latency, used);
    }
}

/// An rx message being filled: its writable part holds the payload, then the 8-byte status.
pub(crate) struct RxBuf {
    pub(crate) held: Held,
    payload_len: u64,
    filled: u64,
    /// BAD_MSG once frames could not be written to it (like a tx buffer that cannot be read).
    status: Status,
}

impl RxBuf {
    pub(crate) fn new(held: Held, payload_len: u64) -> RxBuf {
        RxBuf {
            held,
            payload_len,
            filled: 0,
            status: Status::Ok,
        }
    }

    /// Completes it with its own status unless that is OK, else with `status`. One whose
    /// frames could not be written reports only its status, BAD_MSG (the guest gave memory the
    /// device cannot write: a malformed message, as for tx).
    fn complete(self, mem: &GuestMemory, done: &mut Completer, status: Status, latency: u32) {
        let (status, filled) = if self.status == Status::Ok {
            (status, self.filled)
        } else {
            (self.status, 0)
        };
        let used = (filled + p::PcmStatus::SIZE) as u32;
        self.held.complete(mem, done, status, latency, used);
    }
}

/// The worker's end of a stream's ring.
pub(crate) enum RingEnd {
    Playback(Producer),
    Capture(Consumer),
}

/// How a prepared stream's frames move.
pub(crate) enum Transport {
    /// Through the broker's ring; it signals `notify` (our end of a socketpair) whenever it
    /// moved the ring.
    Ring { end: RingEnd, notify: OwnedFd },
    /// The broker is away: the worker's own clock paces the stream (playback dropped, capture
    /// silent) until a broker takes it back.
    Local(LocalClock),
}

/// Playback latency figures of one prepared stream, logged when it is released.
#[derive(Default)]
struct TxStats {
    buffers: u64,
    /// A buffer's arrival to its completion (its last frame consumed by the backend).
    total_ns: u128,
    max_ns: u64,
    /// `latency_bytes` as reported: what was queued ahead of the buffer when it was copied.
    ahead_bytes: u128,
}

impl TxStats {
    fn record(&mut self, buf: &TxBuf) {
        let ns = u64::try_from(buf.arrived.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.buffers += 1;
        self.total_ns += u128::from(ns);
        self.max_ns = self.max_ns.max(ns);
        self.ahead_bytes += u128::from(buf.latency_bytes);
    }

    /// One log line (the guest decides how often: rate-limited), then reset.
    fn report(&mut self, stream_id: u32, params: Option<PcmParams>, limiter: &mut LogLimiter) {
        let stats = std::mem::take(self);
        let Some(params) = params.filter(|_| stats.buffers > 0) else {
            return;
        };
        let n = u128::from(stats.buffers);
        let bytes_per_s = u128::from(params.frame_bytes()) * u128::from(params.rate_hz());
        guest_log!(
            limiter,
            Level::Debug,
            "stream {stream_id}: {} tx buffers; arrival to completion mean {} us, max {} us; \
             queued ahead on copy (latency_bytes) mean {} us",
            stats.buffers,
            stats.total_ns / n / 1000,
            stats.max_ns / 1000,
            stats.ahead_bytes * 1_000_000 / n / bytes_per_s.max(1),
        );
    }
}

/// One stream: everything the device knows about it.
pub(crate) struct Stream {
    /// The spec's view, changed by control requests only.
    pub(crate) pcm: PcmStream,
    /// The params the transport runs with (those of the last PREPARE).
    prepared: Option<PcmParams>,
    transport: Option<Transport>,
    tx: VecDeque<TxBuf>,
    rx: VecDeque<RxBuf>,
    /// Capture silence while on the local clock.
    scratch: Vec<u8>,
    tx_stats: TxStats,
}

impl AsRef<PcmStream> for Stream {
    fn as_ref(&self) -> &PcmStream {
        &self.pcm
    }
}

impl AsMut<PcmStream> for Stream {
    fn as_mut(&mut self) -> &mut PcmStream {
        &mut self.pcm
    }
}

/// Bytes the backend holds beyond the ring, from the broker's published delay (clamped).
fn delay_bytes(ring: &SharedRing, params: Option<PcmParams>) -> u64 {
    let frame = params.map_or(0, |p| u64::from(p.frame_bytes()));
    ring.backend_delay()
        .min(u64::from(u32::MAX))
        .saturating_mul(frame)
}

/// Saturates a byte count into the 32-bit `latency_bytes` field.
fn latency_field(bytes: u64) -> u32 {
    bytes.min(u64::from(u32::MAX)) as u32
}

impl Stream {
    pub(crate) fn new(pcm: PcmStream) -> Stream {
        Stream {
            pcm,
            prepared: None,
            transport: None,
            tx: VecDeque::new(),
            rx: VecDeque::new(),
            scratch: Vec::new(),
            tx_stats: TxStats::default(),
        }
    }

    pub(crate) fn output(&self) -> bool {
        self.pcm.is_output()
    }

    /// Started by the guest (START without STOP since): what a new broker must be told.
    fn running(&self) -> bool {
        self.pcm.state() == PcmState::Running
    }

    pub(crate) fn at_broker(&self) -> bool {
        matches!(self.transport, Some(Transport::Ring { .. }))
    }

    pub(crate) fn has_transport(&self) -> bool {
        self.transport.is_some()
    }

    /// The largest tx payload the transport can take.
    pub(crate) fn tx_limit(&self) -> Option<u64> {
        match &self.transport {
            Some(Transport::Ring {
                end: RingEnd::Playback(producer),
                ..
            }) => Some(producer.ring().capacity()),
            Some(Transport::Local(_)) => self.prepared.map(|p| u64::from(p.buffer_bytes)),
            _ => None,
        }
    }

    pub(crate) fn queue_tx(&mut self, buf: TxBuf) {
        self.tx.push_back(buf);
    }

    pub(crate) fn queue_rx(&mut self, buf: RxBuf) {
        self.rx.push_back(buf);
    }

    /// The ring's wake-up socket, while the broker holds the stream.
    pub(crate) fn wakeups(&self) -> Option<&OwnedFd> {
        match &self.transport {
            Some(Transport::Ring { notify, .. }) => Some(notify),
            _ => None,
        }
    }

    /// Completes every pending buffer (RELEASE, re-PREPARE, a broker breaking the ring).
    pub(crate) fn flush(&mut self, mem: &GuestMemory, status: Status, done: &mut Completer) {
        for buf in self.tx.drain(..) {
            buf.complete(mem, done, status, 0);
        }
        for buf in self.rx.drain(..) {
            buf.complete(mem, done, status, 0);
        }
    }

    /// Completes the pending buffers (OK: what was played or captured so far counts), logs the
    /// stream's figures and frees its transport; the caller tells the broker.
    pub(crate) fn drop_transport(
        &mut self,
        stream_id: u32,
        epoll: &Epoll,
        mem: &GuestMemory,
        done: &mut Completer,
    ) {
        self.flush(mem, Status::Ok, done);
        self.tx_stats.report(stream_id, self.prepared, done.log());
        self.close_transport(epoll);
    }

    /// Frees the transport without completing anything.
    pub(crate) fn close_transport(&mut self, epoll: &Epoll) {
        if let Some(Transport::Ring { notify, .. }) = self.transport.take() {
            let _ = epoll.delete(&notify);
        }
    }

    /// Forgets everything (device reset): held buffers are given up, not completed.
    pub(crate) fn reset(&mut self, epoll: &Epoll) {
        for buf in self.tx.drain(..) {
            buf.held.abandon();
        }
        for buf in self.rx.drain(..) {
            buf.held.abandon();
        }
        self.close_transport(epoll);
        self.prepared = None;
        self.pcm.reset();
    }

    /// Takes the broker's ring for this stream; pending buffers go into it from the start.
    pub(crate) fn use_ring(&mut self, end: RingEnd, notify: OwnedFd, params: PcmParams) {
        // Frames cross between the ring and guest memory directly.
        self.scratch = Vec::new();
        for buf in &mut self.tx {
            buf.ring_end = None;
        }
        self.transport = Some(Transport::Ring { end, notify });
        self.prepared = Some(params);
    }

    /// Moves the stream onto the worker's own clock (the broker is away): it keeps the
    /// guest's running state, and its pending buffers are paced from now.
    pub(crate) fn use_local_clock(&mut self, params: PcmParams, epoll: &Epoll) {
        self.close_transport(epoll);
        let mut clock = LocalClock::new(&params);
        if self.running() {
            clock.start(Instant::now());
        }
        self.scratch = if self.output() {
            Vec::new()
        } else {
            let silence = p::silence_sample(params.format);
            silence
                .iter()
                .copied()
                .cycle()
                .take(params.buffer_bytes as usize)
                .collect()
        };
        // Pending buffers are paced from now, and the timer is set for the first of them even
        // if the guest queues nothing more.
        for buf in &mut self.tx {
            buf.ring_end = None;
        }
        queue_on_local_clock(&mut self.tx, &mut clock);
        self.transport = Some(Transport::Local(clock));
        self.prepared = Some(params);
    }

    /// The broker is gone: a stream it held moves onto the worker's clock.
    pub(crate) fn go_local(&mut self, epoll: &Epoll) {
        if let Some(params) = self.prepared.filter(|_| self.at_broker()) {
            self.use_local_clock(params, epoll);
        }
    }

    /// START or STOP on the worker's clock.
    pub(crate) fn set_local_running(&mut self, running: bool) -> Result<(), Status> {
        let Some(Transport::Local(clock)) = &mut self.transport else {
            return Err(Status::IoErr);
        };
        if running {
            clock.start(Instant::now());
        } else {
            clock.stop(Instant::now());
        }
        Ok(())
    }

    /// The params a new broker must prepare, for a stream the local clock is keeping.
    pub(crate) fn to_restore(&self) -> Option<PcmParams> {
        self.prepared
            .filter(|_| self.transport.is_some() && !self.at_broker())
    }

    /// Whether a new broker must also be told START.
    pub(crate) fn restore_running(&self) -> bool {
        self.running()
    }

    /// Moves the stream's data: completes what was played or captured, queues what fits.
    /// An error is a broker breaking the ring protocol.
    pub(crate) fn pump(&mut self, mem: &GuestMemory, done: &mut Completer) -> Result<(), String> {
        // Each round that finds its wake-up point already passed completes a buffer: bounded
        // by the buffers held, and by this cap against a broker racing ahead.
        for _ in 0..MAX_PUMP_ROUNDS {
            self.pump_tx(mem, done)?;
            self.pump_rx(mem, done)?;
            if !self.ask_for_wakeup()? {
                break;
            }
        }
        Ok(())
    }

    /// Tells the broker where to wake us next: when its position completes the oldest held
    /// buffer (tx: consumes its last byte; rx: writes enough to fill it, or half the ring for
    /// a larger one), or never while none is held (a new one arrives with the guest's kick). Returns whether the broker is
    /// already there (then there is more to do now: the request may have come too late).
    fn ask_for_wakeup(&mut self) -> Result<bool, String> {
        let Some(Transport::Ring { end, .. }) = &mut self.transport else {
            return Ok(false);
        };
        match end {
            RingEnd::Playback(producer) => {
                let target = self.tx.front().and_then(|b| b.ring_end).unwrap_or(u64::MAX);
                producer.ring().set_wake_at(target);
                Ok(producer.read_pos().map_err(|e| e.to_string())? >= target)
            }
            RingEnd::Capture(consumer) => {
                // A buffer larger than half the ring is filled in parts: the ring could never
                // hold all it still needs at once.
                let most = (consumer.ring().capacity() / 2).max(1);
                let target = self.rx.front().map_or(u64::MAX, |b| {
                    consumer
                        .read_pos()
                        .saturating_add((b.payload_len - b.filled).min(most))
                });
                consumer.ring().set_wake_at(target);
                Ok(consumer.write_pos().map_err(|e| e.to_string())? >= target)
            }
        }
    }

    /// Whether the stream holds enough guest buffers that it needs no kick for new ones: it
    /// runs at the broker, a completion (and with it a wake-up, on which the queue is read)
    /// is coming, and beyond the buffer that completes next it holds at least
    /// [`KICKLESS_PERIODS`] periods and [`KICKLESS_FLOOR_US`]. A guest that keeps its buffer
    /// full (ALSA's default: all periods queued) then never kicks while it plays, and the
    /// worker wakes once per period, for its completion.
    pub(crate) fn holds_enough(&self) -> bool {
        let (Some(params), Some(Transport::Ring { end, .. })) = (self.prepared, &self.transport)
        else {
            return false;
        };
        if !self.running() {
            return false;
        }
        let floor_bytes =
            u64::from(params.frame_bytes()) * u64::from(params.rate_hz()) * KICKLESS_FLOOR_US
                / 1_000_000;
        let floor = (u64::from(params.period_bytes) * KICKLESS_PERIODS).max(floor_bytes);
        let beyond_next = match end {
            RingEnd::Playback(producer) => {
                let Some(next_end) = self.tx.front().and_then(|b| b.ring_end) else {
                    return false;
                };
                let queued = producer.write_pos().saturating_sub(next_end);
                let waiting: u64 = self
                    .tx
                    .iter()
                    .filter(|b| b.ring_end.is_none())
                    .map(TxBuf::payload_len)
                    .sum();
                queued + waiting
            }
            RingEnd::Capture(_) => {
                if self.rx.is_empty() {
                    return false;
                }
                self.rx
                    .iter()
                    .skip(1)
                    .map(|b| b.payload_len - b.filled)
                    .sum()
            }
        };
        beyond_next >= floor
    }

    /// Completes played tx buffers and queues the next ones (into the ring while it has room).
    fn pump_tx(&mut self, mem: &GuestMemory, done: &mut Completer) -> Result<(), String> {
        let played = match &mut self.transport {
            Some(Transport::Ring {
                end: RingEnd::Playback(producer),
                ..
            }) => producer.read_pos().map_err(|e| e.to_string())?,
            Some(Transport::Local(clock)) if self.pcm.is_output() => clock.played(Instant::now()),
            _ => return Ok(()),
        };
        while let Some(front) = self.tx.front() {
            match front.ring_end {
                Some(end) if end <= played => {
                    let buf = self.tx.pop_front().expect("front exists");
                    if buf.status == Status::Ok {
                        self.tx_stats.record(&buf);
                    }
                    let latency = buf.latency_bytes;
                    buf.complete(mem, done, Status::Ok, latency);
                }
                _ => break,
            }
        }
        match &mut self.transport {
            Some(Transport::Ring {
                end: RingEnd::Playback(producer),
                ..
            }) => {
                let delay = delay_bytes(producer.ring(), self.prepared);
                for buf in self.tx.iter_mut().filter(|b| b.ring_end.is_none()) {
                    let len = buf.payload_len();
                    let capacity = producer.ring().capacity();
                    if len > capacity {
                        // Queued while the stream was on the local clock, larger than the ring
                        // the new broker gave: it can never be copied.
                        buf.status = Status::BadMsg;
                        buf.ring_end = Some(producer.write_pos());
                        continue;
                    }
                    let queued = producer.queued().map_err(|e| e.to_string())?;
                    if queued + len > capacity {
                        break;
                    }
                    // Straight from guest memory into the ring: one copy.
                    let mut failed = None;
                    producer
                        .push_with(len, |offset, piece| {
                            let at = p::PcmXfer::SIZE + offset;
                            match buf.readable.read_into(mem, at, &piece) {
                                Ok(()) => true,
                                Err(e) => {
                                    failed = Some(e);
                                    false
                                }
                            }
                        })
                        .map_err(|e| e.to_string())?;
                    if let Some(e) = failed {
                        guest_log!(
                            done.log(),
                            Level::Warn,
                            "tx buffer {}: {e}",
                            buf.held.head()
                        );
                        buf.status = Status::BadMsg;
                    }
                    buf.ring_end = Some(producer.write_pos());
                    buf.latency_bytes = latency_field(queued + delay);
                }
            }
            Some(Transport::Local(clock)) => queue_on_local_clock(&mut self.tx, clock),
            _ => {}
        }
        Ok(())
    }

    /// Fills pending rx buffers from the ring (or with silence at the local clock's pace);
    /// completes each one that is full.
    fn pump_rx(&mut self, mem: &GuestMemory, done: &mut Completer) -> Result<(), String> {
        match &mut self.transport {
            Some(Transport::Ring {
                end: RingEnd::Capture(consumer),
                ..
            }) => {
                while let Some(buf) = self.rx.front_mut() {
                    let want = buf.payload_len - buf.filled;
                    if want > 0 {
                        // Straight from the ring into guest memory: one copy. Once a write
                        // failed, the buffer's frames are lost: they are consumed only.
                        let mut failed = None;
                        let (filled, writable) = (buf.filled, buf.held.writable());
                        let intact = buf.status == Status::Ok;
                        let got = consumer
                            .pop_with(want, |offset, piece| {
                                if intact && failed.is_none() {
                                    failed =
                                        writable.write_from(mem, filled + offset, &piece).err();
                                }
                            })
                            .map_err(|e| e.to_string())?;
                        if got == 0 {
                            break;
                        }
                        if let Some(e) = failed {
                            let head = buf.held.head();
                            guest_log!(done.log(), Level::Warn, "rx buffer {head}: {e}");
                            buf.status = Status::BadMsg;
                        }
                        buf.filled += got;
                    }
                    if buf.filled == buf.payload_len {
                        let ahead = consumer.available().map_err(|e| e.to_string())?;
                        let latency =
                            latency_field(ahead + delay_bytes(consumer.ring(), self.prepared));
                        if let Some(buf) = self.rx.pop_front() {
                            buf.complete(mem, done, Status::Ok, latency);
                        }
                    }
                }
            }
            Some(Transport::Local(clock)) if !self.pcm.is_output() => {
                let sample = self
                    .prepared
                    .map_or(1, |p| p::silence_sample(p.format).len());
                let mut produced = clock.captured(Instant::now());
                while let Some(buf) = self.rx.front_mut() {
                    let want = (buf.payload_len - buf.filled).min(produced);
                    let mut written = 0;
                    while written < want {
                        // Start the silence on the sample boundary the buffer is at.
                        let skew = ((buf.filled + written) % sample as u64) as usize;
                        let chunk = &self.scratch[skew.min(self.scratch.len())..];
                        let n = (want - written).min(chunk.len() as u64);
                        if n == 0 {
                            break;
                        }
                        let result = if buf.status == Status::Ok {
                            buf.held.writable().write(
                                mem,
                                buf.filled + written,
                                &chunk[..n as usize],
                            )
                        } else {
                            Ok(())
                        };
                        if let Err(e) = result {
                            let head = buf.held.head();
                            guest_log!(done.log(), Level::Warn, "rx buffer {head}: {e}");
                            buf.status = Status::BadMsg;
                        }
                        written += n;
                    }
                    clock.take(written);
                    produced -= written;
                    buf.filled += written;
                    if buf.filled < buf.payload_len {
                        break;
                    }
                    // Still at the capture pace, also for a buffer that failed, so that it
                    // cannot be used to spin.
                    if let Some(buf) = self.rx.pop_front() {
                        buf.complete(mem, done, Status::Ok, latency_field(produced));
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// When the local clock next completes a buffer of this stream.
    pub(crate) fn next_local_completion(&self) -> Option<Instant> {
        let Some(Transport::Local(clock)) = &self.transport else {
            return None;
        };
        if self.pcm.is_output() {
            clock.when(self.tx.front()?.ring_end?)
        } else {
            let buf = self.rx.front()?;
            clock.when_captured(buf.payload_len - buf.filled)
        }
    }
}

/// Gives the tx buffers not yet queued their end on the local clock.
fn queue_on_local_clock(tx: &mut VecDeque<TxBuf>, clock: &mut LocalClock) {
    let now = Instant::now();
    for buf in tx.iter_mut().filter(|b| b.ring_end.is_none()) {
        buf.latency_bytes = latency_field(clock.queued(now));
        buf.ring_end = Some(clock.queue(buf.payload_len()));
    }
}

/// Asks the broker for a stream's ring and maps it.
pub(crate) fn open_ring(
    link: &mut BrokerLink,
    epoll: &Epoll,
    stream_id: u32,
    params: &PcmParams,
    output: bool,
) -> Result<(RingEnd, OwnedFd), Fault> {
    let (reply, mut fds) = link.request(WorkerMsg::Prepare {
        stream_id,
        params: *params,
    })?;
    let capacity = match reply {
        BrokerMsg::Prepared {
            stream_id: id,
            ring_capacity,
        } if id == stream_id => ring_capacity,
        BrokerMsg::Failed { reason, .. } => {
            log::warn!("stream {stream_id}: broker cannot prepare: {reason}");
            return Err(Fault::Refused(reason));
        }
        other => return Err(link.down(&format!("unexpected reply {other:?}"))),
    };
    let (Some(notify), Some(ring_fd)) = (fds.pop(), fds.pop()) else {
        return Err(link.down(&"Prepared without its fds"));
    };
    check_wakeup_fd(notify.as_fd()).map_err(|e| link.down(&e))?;
    // The ring must hold at least one period, and stay within our own limit.
    if capacity < u64::from(params.period_bytes) {
        return Err(link.down(&"ring smaller than a period"));
    }
    let ring = SharedRing::open(ring_fd, capacity).map_err(|e| link.down(&format!("ring: {e}")))?;
    epoll
        .add(
            &notify,
            EpollEvent::new(EpollFlags::EPOLLIN, u64::from(stream_id)),
        )
        .map_err(|e| link.down(&format!("epoll: {e}")))?;
    let end = if output {
        RingEnd::Playback(Producer::new(ring))
    } else {
        RingEnd::Capture(Consumer::new(ring))
    };
    Ok((end, notify))
}

#[cfg(test)]
mod tests {
    //! Pacing and completion of one stream, against real vrings in guest memory and a real
    //! ring whose broker side the test plays: no buffer completes before its frames are
    //! consumed (or, on the worker's clock, before their time), none is forgotten.

    use std::time::Duration;

    use nix::sys::epoll::EpollCreateFlags;
    use vhost_user_backend::{VringRwLock, VringT};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
    use zerocopy::IntoBytes;

    use super::*;
    use crate::completion::{GuestLedger, Mem};
    use virtio_snd::control::{ControlState, DeviceLayout, PcmCaps, PcmHost};
    use vsound_shared::ring::WakeSender;

    const QUEUE_SIZE: u16 = 16;
    /// 10 ms of 48 kHz S16 stereo.
    const PERIOD: u32 = 1920;
    const HEADERS: u64 = 0x4_0000;
    const STATUSES: u64 = 0x8_0000;

    /// Guest memory with the four queues set up, as a VMM would.
    struct Rig {
        mem: GuestMemory,
        vrings: Vec<VringRwLock<Mem>>,
        used_rings: Vec<GuestAddress>,
        ledger: GuestLedger,
        epoll: Epoll,
    }

    impl Rig {
        fn new() -> Rig {
            let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
            let atomic = GuestMemoryAtomic::new(mem.clone());
            let mut vrings = Vec::new();
            let mut used_rings = Vec::new();
            for queue in 0..p::NUM_QUEUES as u64 {
                let mock = MockSplitQueue::create(&mem, GuestAddress(0x1000 * (queue + 1)), 16);
                let vring = VringRwLock::new(atomic.clone(), QUEUE_SIZE).unwrap();
                vring.set_queue_size(QUEUE_SIZE);
                vring
                    .set_queue_info(
                        mock.desc_table_addr().0,
                        mock.avail_addr().0,
                        mock.used_addr().0,
                    )
                    .unwrap();
                vring.set_queue_ready(true);
                used_rings.push(mock.used_addr());
                vrings.push(vring);
            }
            Rig {
                mem,
                vrings,
                used_rings,
                ledger: GuestLedger::default(),
                epoll: Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).unwrap(),
            }
        }

        /// (head, length) of every used entry of `queue` so far.
        fn used(&self, queue: u16) -> Vec<(u32, u32)> {
            let ring = self.used_rings[queue as usize];
            let idx: u16 = self.mem.read_obj(ring.unchecked_add(2)).unwrap();
            (0..u64::from(idx))
                .map(|i| {
                    let entry = ring.unchecked_add(4 + 8 * (i % u64::from(QUEUE_SIZE)));
                    let id: u32 = self.mem.read_obj(entry).unwrap();
                    let len: u32 = self.mem.read_obj(entry.unchecked_add(4)).unwrap();
                    (id, len)
                })
                .collect()
        }

        fn status(&self, head: u16) -> u32 {
            let at = GuestAddress(STATUSES + 16 * u64::from(head));
            self.mem.read_obj(at).unwrap()
        }

        /// Runs `f` as one device event: completions are batched and signalled at its end.
        fn event<T>(&mut self, f: impl FnOnce(&GuestMemory, &mut Completer, &Epoll) -> T) -> T {
            let mut done = Completer::new(&self.vrings, &mut self.ledger);
            let out = f(&self.mem, &mut done, &self.epoll);
            done.complete_orphans(&self.mem);
            done.signal(false);
            out
        }
    }

    /// Completes every PCM request with OK: the tests drive the transport themselves.
    struct AgreeingHost;

    impl PcmHost<Stream> for AgreeingHost {
        fn prepare(&mut self, _: u32, _: &mut Stream, _: &PcmParams) -> Result<(), Status> {
            Ok(())
        }
        fn start(&mut self, _: u32, _: &mut Stream) -> Result<(), Status> {
            Ok(())
        }
        fn stop(&mut self, _: u32, _: &mut Stream) -> Result<(), Status> {
            Ok(())
        }
        fn release(&mut self, _: u32, _: &mut Stream) -> Result<(), Status> {
            Ok(())
        }
    }

    fn params() -> PcmParams {
        PcmParams {
            buffer_bytes: 4 * PERIOD,
            period_bytes: PERIOD,
            features: 0,
            channels: 2,
            format: p::format::S16,
            rate: p::rate::R48000,
        }
    }

    /// A playback stream taken through SET_PARAMS, PREPARE and START by the control handler.
    fn running_stream() -> Stream {
        let caps = PcmCaps {
            direction: p::D_OUTPUT,
            hda_fn_nid: 0,
            features: 0,
            formats: 1 << p::format::S16,
            rates: 1 << p::rate::R48000,
            channels_min: 2,
            channels_max: 2,
        };
        let mut control = ControlState::new(DeviceLayout {
            max_buffer_bytes: 1 << 20,
            ..DeviceLayout::default()
        });
        let mut streams = vec![Stream::new(PcmStream::new(caps))];
        let params = params();
        let hdr = |code: u32| p::PcmHdr {
            hdr: p::Hdr { code: code.into() },
            stream_id: 0.into(),
        };
        let set_params = p::PcmSetParams {
            hdr: hdr(p::R_PCM_SET_PARAMS),
            buffer_bytes: params.buffer_bytes.into(),
            period_bytes: params.period_bytes.into(),
            features: 0.into(),
            channels: params.channels,
            format: params.format,
            rate: params.rate,
            padding: 0,
        };
        let requests = [
            set_params.as_bytes().to_vec(),
            hdr(p::R_PCM_PREPARE).as_bytes().to_vec(),
            hdr(p::R_PCM_START).as_bytes().to_vec(),
        ];
        for request in requests {
            let response = control.handle(&request, 4, &mut streams, &mut AgreeingHost);
            assert_eq!(response, p::status_bytes(Status::Ok));
        }
        assert_eq!(streams[0].pcm.state(), PcmState::Running);
        streams.pop().unwrap()
    }

    /// Gives the stream a ring of `periods` periods; returns the broker's end.
    fn attach_ring(stream: &mut Stream, periods: u32) -> (Consumer, WakeSender) {
        let capacity = u64::from(periods * PERIOD);
        let (ring, fd) = SharedRing::create(capacity).unwrap();
        let broker_side = SharedRing::open(fd, capacity).unwrap();
        let (sender, notify) = WakeSender::pair().unwrap();
        stream.use_ring(RingEnd::Playback(Producer::new(ring)), notify, params());
        (Consumer::new(broker_side), sender)
    }

    /// Queues tx buffer `head`: one period of frames whose bytes are `head`.
    fn queue_tx(rig: &mut Rig, stream: &mut Stream, head: u16) {
        let header = GuestAddress(HEADERS + 0x1000 * u64::from(head));
        rig.mem.write_slice(&0u32.to_le_bytes(), header).unwrap();
        let frames = vec![head as u8; PERIOD as usize];
        rig.mem
            .write_slice(&frames, header.unchecked_add(4))
            .unwrap();
        let readable = GuestBuffer::from_segments(&[(header.0, 4 + PERIOD)]);
        let writable = GuestBuffer::from_segments(&[(STATUSES + 16 * u64::from(head), 8)]);
        let held = rig.event(|_, done, _| {
            done.hold(p::TX_QUEUE, head, writable, Some(0))
                .map_err(|(_, refused)| refused)
                .unwrap()
        });
        stream.queue_tx(TxBuf::new(held, readable));
    }

    fn pump(rig: &mut Rig, stream: &mut Stream) {
        rig.event(|mem, done, _| stream.pump(mem, done)).unwrap();
    }

    #[test]
    fn a_tx_buffer_completes_only_once_its_last_frame_was_consumed() {
        let mut rig = Rig::new();
        let mut stream = running_stream();
        let (mut broker, _wake) = attach_ring(&mut stream, 3);
        for head in 0..5 {
            queue_tx(&mut rig, &mut stream, head);
        }
        pump(&mut rig, &mut stream);
        assert_eq!(rig.used(p::TX_QUEUE), [], "copied is not played");
        assert_eq!(broker.available().unwrap(), 3 * u64::from(PERIOD));

        let mut out = vec![0u8; PERIOD as usize];
        assert_eq!(broker.pop(&mut out[..1919]).unwrap(), 1919);
        pump(&mut rig, &mut stream);
        assert_eq!(
            rig.used(p::TX_QUEUE),
            [],
            "one frame of buffer 0 is still queued"
        );

        assert_eq!(broker.pop(&mut out[1919..]).unwrap(), 1);
        assert!(
            out.iter().all(|&b| b == 0),
            "buffer 0's frames, copied once"
        );
        pump(&mut rig, &mut stream);
        assert_eq!(rig.used(p::TX_QUEUE), [(0, 8)]);
        assert_eq!(rig.status(0), Status::Ok.code());
        // Its room went to buffer 3; buffer 4 waits in guest memory.
        assert_eq!(broker.available().unwrap(), 3 * u64::from(PERIOD));
        assert_eq!(broker.pop(&mut out).unwrap(), PERIOD as usize);
        assert!(out.iter().all(|&b| b == 1));
    }

    #[test]
    fn the_broker_is_asked_to_wake_the_worker_when_the_oldest_buffer_completes() {
        let mut rig = Rig::new();
        let mut stream = running_stream();
        let (mut broker, _wake) = attach_ring(&mut stream, 3);
        let period = u64::from(PERIOD);
        assert_eq!(
            broker.ring().wake_at(),
            0,
            "nothing asked before any buffer"
        );
        for head in 0..4 {
            queue_tx(&mut rig, &mut stream, head);
        }
        pump(&mut rig, &mut stream);
        assert_eq!(broker.ring().wake_at(), period, "at buffer 0's last byte");
        // Beyond buffer 0: two periods in the ring and one in guest memory.
        assert!(stream.holds_enough());
        let mut out = vec![0u8; PERIOD as usize];
        broker.pop(&mut out).unwrap();
        pump(&mut rig, &mut stream);
        assert_eq!(rig.used(p::TX_QUEUE), [(0, 8)]);
        assert_eq!(
            broker.ring().wake_at(),
            2 * period,
            "at buffer 1's last byte"
        );
        // Buffers 1 to 3 held: two periods beyond the next completion.
        assert!(stream.holds_enough());
        broker.pop(&mut out).unwrap();
        pump(&mut rig, &mut stream);
        assert!(
            !stream.holds_enough(),
            "one period beyond the next completion"
        );
        for _ in 0..2 {
            broker.pop(&mut out).unwrap();
        }
        pump(&mut rig, &mut stream);
        assert_eq!(rig.used(p::TX_QUEUE).len(), 4);
        assert_eq!(
            broker.ring().wake_at(),
            u64::MAX,
            "nothing held, nothing to wake for"
        );
        assert!(!stream.holds_enough());
    }

    #[test]
    fn release_completes_every_pending_buffer_once_and_frees_its_head() {
        let mut rig = Rig::new();
        let mut stream = running_stream();
        let (_broker, _wake) = attach_ring(&mut stream, 2);
        for head in 0..4 {
            queue_tx(&mut rig, &mut stream, head);
        }
        pump(&mut rig, &mut stream);
        assert_eq!(rig.used(p::TX_QUEUE), []);
        // RELEASE returns them all, played or not.
        rig.event(|mem, done, epoll| stream.drop_transport(0, epoll, mem, done));
        let mut used = rig.used(p::TX_QUEUE);
        used.sort();
        assert_eq!(used, [(0, 8), (1, 8), (2, 8), (3, 8)]);
        assert!((0..4).all(|head| rig.status(head) == Status::Ok.code()));
        // Nothing is held any more: the guest may publish the same heads again.
        queue_tx(&mut rig, &mut stream, 0);
        rig.event(|mem, done, _| stream.flush(mem, Status::IoErr, done));
        assert_eq!(rig.used(p::TX_QUEUE).len(), 5);
        assert_eq!(rig.status(0), Status::IoErr.code());
    }

    #[test]
    fn on_broker_loss_pending_buffers_complete_at_the_local_clocks_pace_never_early() {
        let mut rig = Rig::new();
        let mut stream = running_stream();
        let (_broker, _wake) = attach_ring(&mut stream, 2);
        for head in 0..4 {
            queue_tx(&mut rig, &mut stream, head);
        }
        pump(&mut rig, &mut stream);
        let lost = Instant::now();
        stream.go_local(&rig.epoll);
        assert!(!stream.at_broker());
        pump(&mut rig, &mut stream);
        let period = Duration::from_millis(10);
        let on_time = |completed: usize| period * completed as u32 <= lost.elapsed();
        assert!(on_time(rig.used(p::TX_QUEUE).len()), "completed early");
        assert!(
            stream.next_local_completion().is_some(),
            "the timer has a target"
        );
        std::thread::sleep(period * 5 / 2);
        pump(&mut rig, &mut stream);
        let completed = rig.used(p::TX_QUEUE).len();
        assert!(on_time(completed), "{completed} completed early");
        assert!(completed >= 2, "only {completed} of 4 after 2.5 periods");
        std::thread::sleep(period * 2);
        pump(&mut rig, &mut stream);
        assert_eq!(rig.used(p::TX_QUEUE).len(), 4, "none forgotten");
    }

    #[test]
    fn a_held_buffer_dropped_without_completion_is_completed_with_io_err() {
        let mut rig = Rig::new();
        let mut stream = running_stream();
        let (_broker, _wake) = attach_ring(&mut stream, 2);
        queue_tx(&mut rig, &mut stream, 3);
        // A path that forgets the buffer: the stream is dropped with it.
        drop(stream);
        assert_eq!(rig.used(p::TX_QUEUE), []);
        rig.event(|_, _, _| ());
        assert_eq!(rig.used(p::TX_QUEUE), [(3, 8)]);
        assert_eq!(rig.status(3), Status::IoErr.code());
    }

    #[test]
    fn a_reset_gives_held_buffers_up_without_completing_them() {
        let mut rig = Rig::new();
        let mut stream = running_stream();
        let (_broker, _wake) = attach_ring(&mut stream, 2);
        queue_tx(&mut rig, &mut stream, 1);
        stream.reset(&rig.epoll);
        rig.event(|_, _, _| ());
        assert_eq!(rig.used(p::TX_QUEUE), []);
        assert_eq!(stream.pcm.state(), PcmState::Initial);
    }
}
