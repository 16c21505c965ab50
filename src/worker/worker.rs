//! The worker: the vhost-user virtio-sound device that parses every guest request.
//!
//! It runs one epoll thread (vhost-user-backend's) that serves the four virtqueues plus one
//! nested epoll of its own holding the broker channel, two timers and each stream's wake-up
//! socket (read only with MSG_DONTWAIT, so a broker cannot block this thread through it). Guest
//! input never makes it return an error (that would stop the thread): bad requests get the
//! spec's status, bad chains are completed empty and logged.
//!
//! Playback pacing: a tx buffer is copied into the stream's ring only when the ring has room
//! (it holds a few periods), and completed only once the broker has consumed its last byte at
//! the backend's clock. Capture: an rx buffer is completed only when it is full.
//!
//! The broker may go away under a running VM (the VMM cannot reconnect us, so the worker never
//! gives up its VMM session): its streams then run on the worker's own clock, in silence at
//! their real-time pace, until the reconnected link hands them to the new broker.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use zerocopy::IntoBytes;

use crate::broker_link::{BrokerLink, Fault, LinkError, LinkEvent};
use crate::local_clock::{LocalClock, WakeTimer};
use log::Level;
use virtio_snd::control::{ControlState, PcmHost, PcmParams};
use virtio_snd::guest::{Chain, GuestBuffer};
use virtio_snd::protocol::{self as p, Status};
use vsound_config::Config;
use vsound_shared::guest_log;
use vsound_shared::ipc::{BrokerMsg, WorkerMsg};
use vsound_shared::ratelimit::LogLimiter;
use vsound_shared::ring::{
    check_wakeup_fd, drain_wakeups, Consumer, Producer, SharedRing, Wakeups,
};

pub type GuestMemory = GuestMemoryMmap<()>;
type Mem = GuestMemoryAtomic<GuestMemory>;

/// Events waiting for a free event-queue buffer; older ones are dropped past this.
const MAX_PENDING_EVENTS: usize = 64;
/// Largest queue size the device accepts (what `max_queue_size` offers the VMM).
const MAX_QUEUE_SIZE: usize = 1024;
/// Device event id of the nested epoll (ids up to NUM_QUEUES are the library's).
pub const DEVICE_EVENT: u16 = p::NUM_QUEUES as u16 + 1;
/// Epoll data of the nested epoll's fds other than the streams' (whose data is their id).
const TOKEN_BROKER: u64 = u64::MAX;
const TOKEN_LINK_TIMER: u64 = u64::MAX - 1;
const TOKEN_LOCAL_CLOCK: u64 = u64::MAX - 2;
/// A PREPARE while the broker is away is served on the local clock if the link failed at most
/// this long ago (a restarting broker is back by then); later, it gets IO_ERR.
const LOCAL_PREPARE_WINDOW: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("{0}")]
    Link(#[from] LinkError),
    #[error("broker offers nothing usable for stream {0} ({1}): check the broker's config")]
    StreamUnavailable(usize, String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// A tx message held until the backend has played it.
struct TxBuf {
    head: u16,
    /// Readable part; the payload starts after the 4-byte header.
    readable: GuestBuffer,
    writable: GuestBuffer,
    /// Ring position just past this buffer's frames, once copied.
    ring_end: Option<u64>,
    status: Status,
    latency_bytes: u32,
    /// When the guest queued it, for the latency figures.
    arrived: Instant,
}

impl TxBuf {
    fn payload_len(&self) -> u64 {
        self.readable.len() - p::PcmXfer::SIZE
    }
}

/// An rx message being filled.
struct RxBuf {
    head: u16,
    /// Writable part: payload followed by the 8-byte status.
    writable: GuestBuffer,
    filled: u64,
    /// BAD_MSG once frames could not be written to it (like a tx buffer that cannot be read).
    status: Status,
}

impl RxBuf {
    fn payload_len(&self) -> u64 {
        self.writable.len() - p::PcmStatus::SIZE
    }
}

/// The broker's end of a stream's ring.
enum RingEnd {
    Playback(Producer),
    Capture(Consumer),
}

/// How a prepared stream's frames move.
enum Transport {
    /// Through the broker's ring; it signals `notify` (our end of a socketpair) whenever it
    /// moved the ring.
    Ring { end: RingEnd, notify: OwnedFd },
    /// The broker is away: the worker's own clock paces the stream (playback dropped, capture
    /// silent) until a broker takes it back.
    Local(LocalClock),
}

/// Data-path state of one stream.
struct StreamIo {
    output: bool,
    transport: Option<Transport>,
    params: Option<PcmParams>,
    /// Started by the guest (START without STOP since): what a new broker must be told.
    running: bool,
    tx: VecDeque<TxBuf>,
    rx: VecDeque<RxBuf>,
    /// Playback bytes on their way to the ring, capture bytes on their way to guest memory;
    /// silence for capture on the local clock.
    scratch: Vec<u8>,
    tx_stats: TxStats,
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
            Level::Info,
            "stream {stream_id}: {} tx buffers; arrival to completion mean {} us, max {} us; \
             queued ahead on copy (latency_bytes) mean {} us",
            stats.buffers,
            stats.total_ns / n / 1000,
            stats.max_ns / 1000,
            stats.ahead_bytes * 1_000_000 / n / bytes_per_s.max(1),
        );
    }
}

trait SizeOf {
    const SIZE: u64;
}
impl<T: zerocopy::KnownLayout + Sized> SizeOf for T {
    const SIZE: u64 = std::mem::size_of::<T>() as u64;
}

/// Heads of one queue that the device holds (taken off the avail ring, not yet used). Only
/// heads below the queue's size can be held and each at most once, so the device never holds
/// more chains than the queue's size, however often the guest republishes a head.
#[derive(Default)]
struct HeldHeads {
    bits: [u64; MAX_QUEUE_SIZE / 64],
}

/// Why a chain cannot be held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HoldRefused {
    /// The guest republished a head the device still holds.
    AlreadyHeld,
    /// Not a head of this queue: it can never be returned in the used ring.
    OutOfRange,
}

impl std::fmt::Display for HoldRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HoldRefused::AlreadyHeld => "head republished while the device holds it",
            HoldRefused::OutOfRange => "head beyond the queue size",
        })
    }
}

impl HeldHeads {
    fn hold(&mut self, head: u16, queue_size: u16) -> Result<(), HoldRefused> {
        if head >= queue_size || usize::from(head) >= MAX_QUEUE_SIZE {
            return Err(HoldRefused::OutOfRange);
        }
        let (word, bit) = (usize::from(head) / 64, 1u64 << (head % 64));
        if self.bits[word] & bit != 0 {
            return Err(HoldRefused::AlreadyHeld);
        }
        self.bits[word] |= bit;
        Ok(())
    }

    fn release(&mut self, head: u16) {
        if let Some(word) = self.bits.get_mut(usize::from(head) / 64) {
            *word &= !(1u64 << (head % 64));
        }
    }
}

/// What the device keeps about the guest's chains across events: the heads it holds per
/// queue, and the limiter of the log lines the guest can trigger.
#[derive(Default)]
struct GuestLedger {
    held: [HeldHeads; p::NUM_QUEUES],
    log: LogLimiter,
}

/// Completions gathered during one event, signalled once at the end. It carries the device's
/// ledger for the event, so that every completion of a held chain releases its head.
struct Completer<'a> {
    vrings: &'a [VringRwLock<Mem>],
    dirty: [bool; p::NUM_QUEUES],
    /// Each queue's negotiated size, read once per event.
    sizes: [u16; p::NUM_QUEUES],
    ledger: &'a mut GuestLedger,
}

impl<'a> Completer<'a> {
    fn new(vrings: &'a [VringRwLock<Mem>], ledger: &'a mut GuestLedger) -> Self {
        let mut sizes = [0; p::NUM_QUEUES];
        for (size, vring) in sizes.iter_mut().zip(vrings) {
            *size = vring.get_ref().get_queue().size();
        }
        Completer {
            vrings,
            dirty: [false; p::NUM_QUEUES],
            sizes,
            ledger,
        }
    }

    fn log(&mut self) -> &mut LogLimiter {
        &mut self.ledger.log
    }

    fn queue_size(&self, queue: u16) -> u16 {
        self.sizes.get(queue as usize).copied().unwrap_or(0)
    }

    /// Records that the device holds `head` until it calls [`Completer::release`].
    fn hold(&mut self, queue: u16, head: u16) -> Result<(), HoldRefused> {
        let size = self.queue_size(queue);
        match self.ledger.held.get_mut(queue as usize) {
            Some(held) => held.hold(head, size),
            None => Err(HoldRefused::OutOfRange),
        }
    }

    /// Completes a chain the device held.
    fn release(&mut self, queue: u16, head: u16, len: u32) {
        if let Some(held) = self.ledger.held.get_mut(queue as usize) {
            held.release(head);
        }
        self.used(queue, head, len);
    }

    /// Completes a chain the device did not hold (answered at once).
    fn used(&mut self, queue: u16, head: u16, len: u32) {
        let Some(vring) = self.vrings.get(queue as usize) else {
            return;
        };
        match vring.add_used(head, len) {
            Ok(()) => self.dirty[queue as usize] = true,
            Err(e) => guest_log!(
                self.ledger.log,
                Level::Error,
                "queue {queue}: add_used failed: {e}"
            ),
        }
    }

    /// Writes a tx/rx status at `offset` of a chain's writable part.
    fn write_status(
        &mut self,
        mem: &GuestMemory,
        writable: &GuestBuffer,
        offset: u64,
        status: Status,
        latency: u32,
    ) {
        let st = p::PcmStatus {
            status: status.code().into(),
            latency_bytes: latency.into(),
        };
        if let Err(e) = writable.write(mem, offset, st.as_bytes()) {
            guest_log!(self.log(), Level::Warn, "cannot write a pcm status: {e}");
        }
    }

    fn signal(&mut self, event_idx: bool) {
        for (queue, dirty) in self.dirty.iter_mut().enumerate() {
            if !std::mem::take(dirty) {
                continue;
            }
            let vring = &self.vrings[queue];
            let needed = !event_idx || vring.needs_notification().unwrap_or(true);
            if needed {
                if let Err(e) = vring.signal_used_queue() {
                    log::warn!("queue {queue}: cannot signal the guest: {e}");
                }
            }
        }
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

impl StreamIo {
    fn new(output: bool) -> StreamIo {
        StreamIo {
            output,
            transport: None,
            params: None,
            running: false,
            tx: VecDeque::new(),
            rx: VecDeque::new(),
            scratch: Vec::new(),
            tx_stats: TxStats::default(),
        }
    }

    fn at_broker(&self) -> bool {
        matches!(self.transport, Some(Transport::Ring { .. }))
    }

    /// Completes every pending buffer (RELEASE, re-PREPARE, a broker breaking the ring).
    fn flush(&mut self, mem: &GuestMemory, status: Status, done: &mut Completer) {
        for buf in self.tx.drain(..) {
            let status = if buf.status == Status::Ok {
                status
            } else {
                buf.status
            };
            done.write_status(mem, &buf.writable, 0, status, 0);
            done.release(p::TX_QUEUE, buf.head, p::PcmStatus::SIZE as u32);
        }
        for buf in self.rx.drain(..) {
            let (status, filled) = if buf.status == Status::Ok {
                (status, buf.filled)
            } else {
                (buf.status, 0)
            };
            done.write_status(mem, &buf.writable, buf.payload_len(), status, 0);
            done.release(p::RX_QUEUE, buf.head, (filled + p::PcmStatus::SIZE) as u32);
        }
    }

    /// Takes the broker's ring for this stream; pending buffers go into it from the start.
    fn use_ring(&mut self, end: RingEnd, notify: OwnedFd, params: PcmParams) {
        let capacity = match &end {
            RingEnd::Playback(producer) => producer.ring().capacity(),
            RingEnd::Capture(consumer) => consumer.ring().capacity(),
        };
        self.scratch = vec![0; capacity as usize];
        for buf in &mut self.tx {
            buf.ring_end = None;
        }
        self.transport = Some(Transport::Ring { end, notify });
        self.params = Some(params);
    }

    /// Moves the stream onto the worker's own clock (the broker is away): it keeps the
    /// guest's running state, and its pending buffers are paced from now.
    fn use_local_clock(&mut self, params: PcmParams, epoll: &Epoll) {
        if let Some(Transport::Ring { notify, .. }) = &self.transport {
            let _ = epoll.delete(notify);
        }
        let mut clock = LocalClock::new(&params);
        if self.running {
            clock.start(Instant::now());
        }
        self.scratch = if self.output {
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
        self.params = Some(params);
    }

    /// Completes played tx buffers and queues the next ones (into the ring while it has room).
    fn pump_tx(&mut self, mem: &GuestMemory, done: &mut Completer) -> Result<(), String> {
        let played = match &mut self.transport {
            Some(Transport::Ring {
                end: RingEnd::Playback(producer),
                ..
            }) => producer.read_pos().map_err(|e| e.to_string())?,
            Some(Transport::Local(clock)) if self.output => clock.played(Instant::now()),
            _ => return Ok(()),
        };
        while let Some(front) = self.tx.front() {
            match front.ring_end {
                Some(end) if end <= played => {
                    let buf = self.tx.pop_front().expect("front exists");
                    if buf.status == Status::Ok {
                        self.tx_stats.record(&buf);
                    }
                    done.write_status(mem, &buf.writable, 0, buf.status, buf.latency_bytes);
                    done.release(p::TX_QUEUE, buf.head, p::PcmStatus::SIZE as u32);
                }
                _ => break,
            }
        }
        match &mut self.transport {
            Some(Transport::Ring {
                end: RingEnd::Playback(producer),
                ..
            }) => {
                let delay = delay_bytes(producer.ring(), self.params);
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
                    let data = &mut self.scratch[..len as usize];
                    match buf.readable.read(mem, p::PcmXfer::SIZE, data) {
                        Ok(()) => {
                            producer.push(data).map_err(|e| e.to_string())?;
                        }
                        Err(e) => {
                            guest_log!(done.log(), Level::Warn, "tx buffer {}: {e}", buf.head);
                            buf.status = Status::BadMsg;
                        }
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
                    let want = buf.payload_len() - buf.filled;
                    if want > 0 {
                        let n = want.min(self.scratch.len() as u64) as usize;
                        let got = consumer
                            .pop(&mut self.scratch[..n])
                            .map_err(|e| e.to_string())?;
                        if got == 0 {
                            break;
                        }
                        // Once a write failed, the buffer's frames are lost: consume them only.
                        let written = if buf.status == Status::Ok {
                            buf.writable.write(mem, buf.filled, &self.scratch[..got])
                        } else {
                            Ok(())
                        };
                        if let Err(e) = written {
                            guest_log!(done.log(), Level::Warn, "rx buffer {}: {e}", buf.head);
                            buf.status = Status::BadMsg;
                        }
                        buf.filled += got as u64;
                    }
                    if buf.filled == buf.payload_len() {
                        let ahead = consumer.available().map_err(|e| e.to_string())?;
                        let latency =
                            latency_field(ahead + delay_bytes(consumer.ring(), self.params));
                        complete_rx(&mut self.rx, mem, latency, done);
                    }
                }
            }
            Some(Transport::Local(clock)) if !self.output => {
                let sample = self.params.map_or(1, |p| p::silence_sample(p.format).len());
                let mut produced = clock.captured(Instant::now());
                while let Some(buf) = self.rx.front_mut() {
                    let want = (buf.payload_len() - buf.filled).min(produced);
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
                            buf.writable
                                .write(mem, buf.filled + written, &chunk[..n as usize])
                        } else {
                            Ok(())
                        };
                        if let Err(e) = result {
                            guest_log!(done.log(), Level::Warn, "rx buffer {}: {e}", buf.head);
                            buf.status = Status::BadMsg;
                        }
                        written += n;
                    }
                    clock.take(written);
                    produced -= written;
                    buf.filled += written;
                    if buf.filled < buf.payload_len() {
                        break;
                    }
                    complete_rx(&mut self.rx, mem, latency_field(produced), done);
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// When the local clock next completes a buffer of this stream.
    fn next_local_completion(&self) -> Option<Instant> {
        let Some(Transport::Local(clock)) = &self.transport else {
            return None;
        };
        if self.output {
            clock.when(self.tx.front()?.ring_end?)
        } else {
            let buf = self.rx.front()?;
            clock.when_captured(buf.payload_len() - buf.filled)
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

/// Completes the front rx buffer, which is full. One whose frames could not be written
/// reports only its status, BAD_MSG (the guest gave memory the device cannot write: a
/// malformed message, as for tx), still at the capture pace so that it cannot be used to spin.
fn complete_rx(rx: &mut VecDeque<RxBuf>, mem: &GuestMemory, latency: u32, done: &mut Completer) {
    let Some(buf) = rx.pop_front() else {
        return;
    };
    let filled = if buf.status == Status::Ok {
        buf.filled
    } else {
        0
    };
    done.write_status(mem, &buf.writable, buf.payload_len(), buf.status, latency);
    done.release(p::RX_QUEUE, buf.head, (filled + p::PcmStatus::SIZE) as u32);
}

/// Asks the broker for a stream's ring and maps it.
fn open_ring(
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

/// The broker is gone: every stream it held moves onto the worker's clock.
fn streams_go_local(streams: &mut [StreamIo], epoll: &Epoll) {
    for io in streams.iter_mut().filter(|io| io.at_broker()) {
        if let Some(params) = io.params {
            io.use_local_clock(params, epoll);
        }
    }
}

/// Everything the control handler may touch, borrowed from the device for one request.
struct Host<'a, 'v> {
    streams: &'a mut [StreamIo],
    link: &'a mut BrokerLink,
    epoll: &'a Epoll,
    mem: &'a GuestMemory,
    done: &'a mut Completer<'v>,
}

impl Host<'_, '_> {
    fn drop_transport(&mut self, stream_id: u32) {
        let io = &mut self.streams[stream_id as usize];
        io.flush(self.mem, Status::Ok, self.done);
        io.tx_stats.report(stream_id, io.params, self.done.log());
        if let Some(Transport::Ring { notify, .. }) = io.transport.take() {
            let _ = self.epoll.delete(&notify);
        }
        io.running = false;
    }

    /// START or STOP: told to the broker if it holds the stream, else done on the local clock.
    fn set_running(&mut self, stream_id: u32, running: bool) -> Result<(), Status> {
        let msg = if running {
            WorkerMsg::Start { stream_id }
        } else {
            WorkerMsg::Stop { stream_id }
        };
        if self.streams[stream_id as usize].at_broker() {
            match self.link.simple(msg, stream_id) {
                Ok(()) => {
                    self.streams[stream_id as usize].running = running;
                    return Ok(());
                }
                Err(Fault::Refused(_)) => return Err(Status::IoErr),
                Err(Fault::Down) => streams_go_local(self.streams, self.epoll),
            }
        }
        let io = &mut self.streams[stream_id as usize];
        let Some(Transport::Local(clock)) = &mut io.transport else {
            return Err(Status::IoErr);
        };
        if running {
            clock.start(Instant::now());
        } else {
            clock.stop(Instant::now());
        }
        io.running = running;
        Ok(())
    }
}

impl PcmHost for Host<'_, '_> {
    fn prepare(&mut self, stream_id: u32, params: &PcmParams) -> Result<(), Status> {
        self.drop_transport(stream_id);
        let output = self.streams[stream_id as usize].output;
        if self.link.is_up() {
            match open_ring(self.link, self.epoll, stream_id, params, output) {
                Ok((end, notify)) => {
                    self.streams[stream_id as usize].use_ring(end, notify, *params);
                    return Ok(());
                }
                Err(Fault::Refused(_)) => return Err(Status::IoErr),
                Err(Fault::Down) => streams_go_local(self.streams, self.epoll),
            }
        }
        // A broker that restarts is back well within the guest's 1 s control timeout: until
        // then the stream runs on the worker's clock and is handed over when it is back. A
        // broker away for longer is reported.
        if self.link.down_for() > LOCAL_PREPARE_WINDOW {
            guest_log!(
                self.done.log(),
                Level::Warn,
                "stream {stream_id}: cannot prepare: the broker is away"
            );
            return Err(Status::IoErr);
        }
        self.streams[stream_id as usize].use_local_clock(*params, self.epoll);
        Ok(())
    }

    fn start(&mut self, stream_id: u32) -> Result<(), Status> {
        self.set_running(stream_id, true)
    }

    fn stop(&mut self, stream_id: u32) -> Result<(), Status> {
        self.set_running(stream_id, false)
    }

    fn release(&mut self, stream_id: u32) -> Result<(), Status> {
        // Every pending buffer is completed before the answer, as the spec requires.
        let at_broker = self.streams[stream_id as usize].at_broker();
        self.drop_transport(stream_id);
        if !at_broker {
            return Ok(());
        }
        match self
            .link
            .simple(WorkerMsg::Release { stream_id }, stream_id)
        {
            Ok(()) => Ok(()),
            // A broker that went away holds nothing of ours any more.
            Err(Fault::Down) => {
                streams_go_local(self.streams, self.epoll);
                Ok(())
            }
            Err(Fault::Refused(_)) => Err(Status::IoErr),
        }
    }
}

/// The vhost-user virtio-sound device.
pub struct SoundDevice {
    control: ControlState,
    streams: Vec<StreamIo>,
    link: BrokerLink,
    /// Holds the broker channel, the link's reconnection timer, the local clock's timer and
    /// every stream's wake-up socket.
    epoll: Epoll,
    /// Fires when the local clock completes a buffer of a stream the broker does not hold.
    local_timer: WakeTimer,
    mem: Option<Mem>,
    event_idx: bool,
    event_buffers: VecDeque<Chain>,
    pending_events: VecDeque<p::Event>,
    /// Held heads and the guest-log limiter; lent to each event's [`Completer`].
    ledger: GuestLedger,
    /// Tells the vring thread to exit when the VMM has gone, so the worker can end. Handed
    /// over once (one vring thread), so no fd is duplicated under the seccomp policy.
    exit: std::sync::Mutex<Option<(EventConsumer, EventNotifier)>>,
}

impl SoundDevice {
    /// Builds the device from the config and the grants of the broker at `broker_path`, which
    /// it will reconnect to whenever the link fails.
    pub fn new(config: &Config, broker_path: &Path) -> Result<SoundDevice, WorkerError> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io::Error::from)?;
        let (link, granted) = BrokerLink::connect(
            broker_path,
            config.pcm_caps(),
            &epoll,
            TOKEN_BROKER,
            TOKEN_LINK_TIMER,
        )?;
        for (i, caps) in granted.iter().enumerate() {
            if caps.formats == 0 || caps.rates == 0 || caps.channels_min > caps.channels_max {
                return Err(WorkerError::StreamUnavailable(
                    i,
                    config.streams[i].name.clone(),
                ));
            }
        }
        let local_timer = WakeTimer::new().map_err(io::Error::from)?;
        epoll
            .add(
                &local_timer,
                EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_LOCAL_CLOCK),
            )
            .map_err(io::Error::from)?;
        Ok(SoundDevice {
            control: ControlState::new(config.device_layout(), &granted),
            streams: granted
                .iter()
                .map(|c| StreamIo::new(c.direction == p::D_OUTPUT))
                .collect(),
            link,
            epoll,
            local_timer,
            mem: None,
            event_idx: false,
            event_buffers: VecDeque::new(),
            pending_events: VecDeque::new(),
            ledger: GuestLedger::default(),
            exit: std::sync::Mutex::new(Some(new_event_consumer_and_notifier(
                EventFlag::NONBLOCK | EventFlag::CLOEXEC,
            )?)),
        })
    }

    /// The fd the vhost-user epoll loop must watch for [`DEVICE_EVENT`].
    pub fn device_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.epoll.0.as_fd()
    }

    pub fn broker_client_id(&self) -> u32 {
        self.link.client_id
    }

    fn process_queue(
        &mut self,
        queue: u16,
        vrings: &[VringRwLock<Mem>],
        done: &mut Completer,
        mut f: impl FnMut(&mut Self, &GuestMemory, Chain, &mut Completer),
    ) {
        let Some(mem) = self.mem.clone() else {
            return;
        };
        let Some(vring) = vrings.get(queue as usize) else {
            return;
        };
        loop {
            if self.event_idx {
                let _ = vring.disable_notification();
            }
            let guard = mem.memory();
            let chains: Vec<_> = {
                let mut state = vring.get_mut();
                match state.get_queue_mut().iter(guard.clone()) {
                    Ok(iter) => iter
                        .map(|chain| {
                            let head = chain.head_index();
                            Chain::from_descriptors(chain).map_err(|e| (head, e))
                        })
                        .collect(),
                    Err(e) => {
                        guest_log!(
                            done.log(),
                            Level::Error,
                            "queue {queue}: {e}; ignoring it until the next kick"
                        );
                        return;
                    }
                }
            };
            // The chains were taken off the ring; hand each to the handler.
            let size = done.queue_size(queue);
            for chain in chains {
                match chain {
                    // Not a descriptor of this queue: there is nothing to read, and the used
                    // ring cannot take it back.
                    Ok(Chain { head, .. }) | Err((head, _)) if head >= size => {
                        guest_log!(
                            done.log(),
                            Level::Warn,
                            "queue {queue}: head {head} ignored: beyond the queue size {size}"
                        );
                    }
                    Ok(chain) => f(self, &guard, chain, done),
                    Err((head, e)) => {
                        guest_log!(
                            done.log(),
                            Level::Warn,
                            "queue {queue}: malformed chain {head}: {e}"
                        );
                        done.used(queue, head, 0);
                    }
                }
            }
            if !self.event_idx {
                break;
            }
            match vring.enable_notification() {
                Ok(true) => continue,
                _ => break,
            }
        }
    }

    fn handle_control(&mut self, mem: &GuestMemory, chain: Chain, done: &mut Completer) {
        let capacity = chain.writable.len().min(usize::MAX as u64) as usize;
        if capacity < p::Hdr::SIZE as usize {
            guest_log!(
                done.log(),
                Level::Warn,
                "control request without room for a status ({capacity} bytes)"
            );
            done.used(p::CONTROL_QUEUE, chain.head, 0);
            return;
        }
        let request_len = chain.readable.len().min(4096) as usize;
        let mut request = vec![0u8; request_len];
        if let Err(e) = chain.readable.read(mem, 0, &mut request) {
            guest_log!(done.log(), Level::Warn, "control request: {e}");
            request.clear();
        }
        let response = {
            let mut host = Host {
                streams: &mut self.streams,
                link: &mut self.link,
                epoll: &self.epoll,
                mem,
                done,
            };
            self.control.handle(&request, capacity, &mut host)
        };
        if let Err(e) = chain.writable.write(mem, 0, &response) {
            guest_log!(done.log(), Level::Warn, "control response: {e}");
        }
        done.used(p::CONTROL_QUEUE, chain.head, response.len() as u32);
    }
}

impl SoundDevice {
    fn handle_tx(&mut self, mem: &GuestMemory, chain: Chain, done: &mut Completer) {
        let status_len = p::PcmStatus::SIZE;
        if chain.writable.len() < status_len {
            guest_log!(
                done.log(),
                Level::Warn,
                "tx buffer {} has no room for a status",
                chain.head
            );
            done.used(p::TX_QUEUE, chain.head, 0);
            return;
        }
        // Requests a driver may get wrong are logged at debug, a hostile driver's at warn.
        let reject = |done: &mut Completer, level: Level, why: &dyn std::fmt::Display| {
            guest_log!(done.log(), level, "tx buffer {}: {why}", chain.head);
            done.write_status(mem, &chain.writable, 0, Status::BadMsg, 0);
            done.used(p::TX_QUEUE, chain.head, status_len as u32);
        };
        let mut header = [0u8; 4];
        if chain.readable.len() < p::PcmXfer::SIZE
            || chain.readable.read(mem, 0, &mut header).is_err()
        {
            return reject(done, Level::Debug, &"short header");
        }
        let stream_id = u32::from_le_bytes(header);
        let state = self.control.stream_state(stream_id);
        if !self
            .streams
            .get(stream_id as usize)
            .is_some_and(|s| s.output)
        {
            return reject(done, Level::Debug, &"not an output stream");
        }
        if !state.is_some_and(|s| s.accepts_io()) {
            return reject(done, Level::Debug, &"stream is not prepared");
        }
        let io = &mut self.streams[stream_id as usize];
        let limit = match &io.transport {
            Some(Transport::Ring {
                end: RingEnd::Playback(producer),
                ..
            }) => producer.ring().capacity(),
            Some(Transport::Local(_)) => io.params.map_or(0, |p| u64::from(p.buffer_bytes)),
            _ => return reject(done, Level::Debug, &"stream has no transport"),
        };
        let payload = chain.readable.len() - p::PcmXfer::SIZE;
        if payload == 0 || payload > limit {
            return reject(done, Level::Debug, &"payload empty or larger than the ring");
        }
        if let Err(refused) = done.hold(p::TX_QUEUE, chain.head) {
            return reject(done, Level::Warn, &refused);
        }
        io.tx.push_back(TxBuf {
            head: chain.head,
            readable: chain.readable,
            writable: chain.writable,
            ring_end: None,
            status: Status::Ok,
            latency_bytes: 0,
            arrived: Instant::now(),
        });
        self.pump(stream_id, Some(mem), done);
    }

    fn handle_rx(&mut self, mem: &GuestMemory, chain: Chain, done: &mut Completer) {
        let status_len = p::PcmStatus::SIZE;
        if chain.writable.len() < status_len {
            guest_log!(
                done.log(),
                Level::Warn,
                "rx buffer {} has no room for a status",
                chain.head
            );
            done.used(p::RX_QUEUE, chain.head, 0);
            return;
        }
        let status_at = chain.writable.len() - status_len;
        // Requests a driver may get wrong are logged at debug, a hostile driver's at warn.
        let reject = |done: &mut Completer, level: Level, why: &dyn std::fmt::Display| {
            guest_log!(done.log(), level, "rx buffer {}: {why}", chain.head);
            done.write_status(mem, &chain.writable, status_at, Status::BadMsg, 0);
            done.used(p::RX_QUEUE, chain.head, status_len as u32);
        };
        let mut header = [0u8; 4];
        if chain.readable.len() < p::PcmXfer::SIZE
            || chain.readable.read(mem, 0, &mut header).is_err()
        {
            return reject(done, Level::Debug, &"short header");
        }
        let stream_id = u32::from_le_bytes(header);
        if self
            .streams
            .get(stream_id as usize)
            .is_none_or(|s| s.output)
        {
            return reject(done, Level::Debug, &"not an input stream");
        }
        if !self
            .control
            .stream_state(stream_id)
            .is_some_and(|s| s.accepts_io())
        {
            return reject(done, Level::Debug, &"stream is not prepared");
        }
        if status_at == 0 {
            return reject(done, Level::Debug, &"no room for frames");
        }
        let io = &mut self.streams[stream_id as usize];
        if io.transport.is_none() {
            return reject(done, Level::Debug, &"stream has no transport");
        }
        if let Err(refused) = done.hold(p::RX_QUEUE, chain.head) {
            return reject(done, Level::Warn, &refused);
        }
        io.rx.push_back(RxBuf {
            head: chain.head,
            writable: chain.writable,
            filled: 0,
            status: Status::Ok,
        });
        self.pump(stream_id, Some(mem), done);
    }

    fn handle_event_buffer(&mut self, _mem: &GuestMemory, chain: Chain, done: &mut Completer) {
        if let Err(refused) = done.hold(p::EVENT_QUEUE, chain.head) {
            guest_log!(
                done.log(),
                Level::Warn,
                "event buffer {}: {refused}",
                chain.head
            );
            done.used(p::EVENT_QUEUE, chain.head, 0);
            return;
        }
        // Held until an event happens; never treated as work to do.
        self.event_buffers.push_back(chain);
    }

    /// Moves a stream's data; a broker that breaks the ring protocol loses the stream. Without
    /// guest memory no buffer can be pending: there is nothing to move.
    fn pump(&mut self, stream_id: u32, mem: Option<&GuestMemory>, done: &mut Completer) {
        let (Some(io), Some(mem)) = (self.streams.get_mut(stream_id as usize), mem) else {
            return;
        };
        let result = io.pump_tx(mem, done).and_then(|()| io.pump_rx(mem, done));
        if let Err(e) = result {
            log::error!("stream {stream_id}: {e}; failing its buffers");
            io.flush(mem, Status::IoErr, done);
            if let Some(Transport::Ring { notify, .. }) = io.transport.take() {
                let _ = self.epoll.delete(&notify);
            }
        }
    }

    fn queue_event(&mut self, event: p::Event, done: &mut Completer) {
        if self.pending_events.len() >= MAX_PENDING_EVENTS {
            self.pending_events.pop_front();
            guest_log!(
                done.log(),
                Level::Warn,
                "event queue full: dropping the oldest event"
            );
        }
        self.pending_events.push_back(event);
    }

    fn deliver_events(&mut self, mem: &GuestMemory, done: &mut Completer) {
        while !self.pending_events.is_empty() {
            let Some(chain) = self.event_buffers.pop_front() else {
                return;
            };
            if chain.writable.len() < p::Event::SIZE {
                guest_log!(
                    done.log(),
                    Level::Warn,
                    "event buffer {} too small",
                    chain.head
                );
                done.release(p::EVENT_QUEUE, chain.head, 0);
                continue;
            }
            let event = self.pending_events.pop_front().expect("not empty");
            if let Err(e) = chain.writable.write(mem, 0, event.as_bytes()) {
                guest_log!(done.log(), Level::Warn, "event buffer {}: {e}", chain.head);
            }
            done.release(p::EVENT_QUEUE, chain.head, p::Event::SIZE as u32);
        }
    }

    /// Broker channel, timers and stream wake-ups; served also before the VMM set up guest
    /// memory, so that the level-triggered epoll never stays readable.
    fn handle_device_event(&mut self, mem: Option<&GuestMemory>, done: &mut Completer) {
        let mut events = [EpollEvent::empty(); 16];
        let n = match self.epoll.wait(&mut events, EpollTimeout::ZERO) {
            Ok(n) => n,
            Err(e) => {
                log::error!("device epoll: {e}");
                return;
            }
        };
        for event in &events[..n] {
            match event.data() {
                TOKEN_BROKER => {
                    if self.link.on_readable() == LinkEvent::Restored {
                        self.restore_streams(mem, done);
                    }
                }
                TOKEN_LINK_TIMER => self.link.on_timer(&self.epoll),
                TOKEN_LOCAL_CLOCK => {
                    self.local_timer.clear();
                    for stream_id in 0..self.streams.len() as u32 {
                        if !self.streams[stream_id as usize].at_broker() {
                            self.pump(stream_id, mem, done);
                        }
                    }
                }
                token => {
                    let stream_id = token as u32;
                    if let Some(Transport::Ring { notify, .. }) = self
                        .streams
                        .get(stream_id as usize)
                        .and_then(|io| io.transport.as_ref())
                    {
                        // A closed end stays readable: stop watching it (a broker that went
                        // away is the link's to notice).
                        if drain_wakeups(notify.as_fd()) == Wakeups::Closed {
                            log::debug!("stream {stream_id}: the broker closed its wake-ups");
                            let _ = self.epoll.delete(notify);
                        }
                    }
                    self.pump(stream_id, mem, done);
                }
            }
        }
    }

    fn handle_broker_messages(&mut self, done: &mut Completer) {
        for msg in self.link.take_events() {
            if let BrokerMsg::Xrun { stream_id } = msg {
                let wants_xruns = self
                    .control
                    .stream_params(stream_id)
                    .is_some_and(|p| p.features & (1 << p::PCM_F_EVT_XRUNS) != 0);
                if wants_xruns {
                    self.queue_event(
                        p::Event {
                            hdr: p::Hdr {
                                code: p::EVT_PCM_XRUN.into(),
                            },
                            data: stream_id.into(),
                        },
                        done,
                    );
                }
            }
        }
    }

    /// A new broker welcomed us: it gets back every stream the local clock kept going, with
    /// the guest's params and running state, and the buffers still pending.
    fn restore_streams(&mut self, mem: Option<&GuestMemory>, done: &mut Completer) {
        let mut restored = 0;
        for stream_id in 0..self.streams.len() as u32 {
            let io = &mut self.streams[stream_id as usize];
            let Some(params) = io
                .params
                .filter(|_| io.transport.is_some() && !io.at_broker())
            else {
                continue;
            };
            match open_ring(&mut self.link, &self.epoll, stream_id, &params, io.output) {
                Ok((end, notify)) => io.use_ring(end, notify, params),
                Err(Fault::Refused(reason)) => {
                    log::warn!("stream {stream_id} stays on the worker's clock: {reason}");
                    continue;
                }
                Err(Fault::Down) => return,
            }
            // Fill the new ring before its clock starts, so that it does not begin with an xrun.
            self.pump(stream_id, mem, done);
            let io = &mut self.streams[stream_id as usize];
            if io.running {
                match self.link.simple(WorkerMsg::Start { stream_id }, stream_id) {
                    Ok(()) => {}
                    Err(Fault::Refused(reason)) => {
                        log::warn!("stream {stream_id} stays on the worker's clock: {reason}");
                        let _ = self
                            .link
                            .simple(WorkerMsg::Release { stream_id }, stream_id);
                        io.use_local_clock(params, &self.epoll);
                        continue;
                    }
                    Err(Fault::Down) => return,
                }
            }
            restored += 1;
        }
        log::info!("broker link restored: {restored} streams handed back to the broker");
    }

    /// Keeps the data path consistent with the link after every event: streams of a broker
    /// that went away move onto the local clock, whose timer is set for the next completion.
    fn settle(&mut self) {
        if !self.link.is_up() {
            streams_go_local(&mut self.streams, &self.epoll);
        }
        let next = self
            .streams
            .iter()
            .filter_map(StreamIo::next_local_completion)
            .min();
        self.local_timer.arm(next);
    }

    /// Frees every stream (VMM reset or disconnect).
    fn release_all(&mut self) {
        for stream_id in 0..self.streams.len() as u32 {
            let io = &mut self.streams[stream_id as usize];
            io.tx.clear();
            io.rx.clear();
            io.running = false;
            io.params = None;
            if let Some(Transport::Ring { notify, .. }) = io.transport.take() {
                let _ = self.epoll.delete(&notify);
                let _ = self
                    .link
                    .simple(WorkerMsg::Release { stream_id }, stream_id);
            }
        }
        self.control.reset();
        self.event_buffers.clear();
        self.pending_events.clear();
        // Nothing is held any more; the log limiter keeps counting across resets.
        self.ledger.held = Default::default();
        self.local_timer.arm(None);
    }
}

impl VhostUserBackendMut for SoundDevice {
    type Bitmap = ();
    type Vring = VringRwLock<Mem>;

    fn num_queues(&self) -> usize {
        p::NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn reset_device(&mut self) {
        self.release_all();
    }

    /// GET_VRING_BASE: the VMM stops the rings when the guest resets the device (a reboot, a
    /// driver reload; QEMU sends no RESET_DEVICE for this): nothing held can be completed any
    /// more, and the next driver must find a fresh device, not streams still running.
    fn stop_vring(&mut self, _queue_index: u32) -> io::Result<()> {
        self.release_all();
        Ok(())
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // 12 bytes of config, zero-extended (a VMM built with VIRTIO 1.3 headers reads 16).
        let config = self.control.config_space();
        let mut space = [0u8; 16];
        space[..12].copy_from_slice(config.as_bytes());
        let start = (offset as usize).min(space.len());
        let end = start.saturating_add(size as usize).min(space.len());
        let mut out = space[start..end].to_vec();
        out.resize((size as usize).min(256), 0);
        out
    }

    fn update_memory(&mut self, mem: Mem) -> io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exit.lock().ok()?.take()
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        let guard = self.mem.as_ref().map(|mem| mem.memory());
        let mem = guard.as_deref();
        // Lent to the event's completer and returned below (handlers reach it through it).
        let mut ledger = std::mem::take(&mut self.ledger);
        let mut done = Completer::new(vrings, &mut ledger);
        match device_event {
            DEVICE_EVENT => self.handle_device_event(mem, &mut done),
            // The queues' buffers live in guest memory: none can be read before it is set.
            _ if mem.is_none() => {}
            p::CONTROL_QUEUE => {
                self.process_queue(device_event, vrings, &mut done, Self::handle_control)
            }
            p::EVENT_QUEUE => {
                self.process_queue(device_event, vrings, &mut done, Self::handle_event_buffer)
            }
            p::TX_QUEUE => self.process_queue(device_event, vrings, &mut done, Self::handle_tx),
            p::RX_QUEUE => self.process_queue(device_event, vrings, &mut done, Self::handle_rx),
            other => log::warn!("unexpected device event {other}"),
        }
        self.handle_broker_messages(&mut done);
        self.settle();
        if let Some(mem) = mem {
            self.deliver_events(mem, &mut done);
        }
        done.signal(self.event_idx);
        ledger.log.report_if_due(Instant::now());
        self.ledger = ledger;
        // Errors here would stop the device thread: everything was handled and logged above.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_is_held_once_and_only_below_the_queue_size() {
        let mut held = HeldHeads::default();
        for head in 0..64 {
            assert_eq!(held.hold(head, 64), Ok(()));
        }
        // Republished while held, or not a head of a 64-entry queue.
        assert_eq!(held.hold(5, 64), Err(HoldRefused::AlreadyHeld));
        assert_eq!(held.hold(64, 64), Err(HoldRefused::OutOfRange));
        assert_eq!(held.hold(u16::MAX, u16::MAX), Err(HoldRefused::OutOfRange));
        held.release(5);
        assert_eq!(held.hold(5, 64), Ok(()));
        // Releasing what is not held (or cannot be) changes nothing.
        held.release(u16::MAX);
        assert_eq!(held.hold(63, 64), Err(HoldRefused::AlreadyHeld));
        let mut large = HeldHeads::default();
        assert_eq!(large.hold(1023, 1024), Ok(()));
        assert_eq!(large.hold(1023, 1024), Err(HoldRefused::AlreadyHeld));
    }
}
