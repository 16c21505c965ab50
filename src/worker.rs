//! The worker: the vhost-user virtio-sound device that parses every guest request.
//!
//! It runs one epoll thread (vhost-user-backend's) that serves the four virtqueues plus one
//! nested epoll of its own holding the broker channel and each stream's wake-up eventfd.
//! Guest input never makes it return an error (that would stop the thread): bad requests get
//! the spec's status, bad chains are completed empty and logged.
//!
//! Playback pacing: a tx buffer is copied into the stream's ring only when the ring has room
//! (it holds a few periods), and completed only once the broker has consumed its last byte at
//! the backend's clock. Capture: an rx buffer is completed only when it is full.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::QueueOwnedT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use zerocopy::IntoBytes;

use crate::config::Config;
use crate::control::{ControlState, PcmCaps, PcmHost, PcmParams};
use crate::guest::{Chain, GuestBuffer};
use crate::ipc::{self, BrokerMsg, Channel, IpcError, WorkerMsg};
use crate::protocol::{self as p, Status};
use crate::ring::{Consumer, Producer, SharedRing};

pub type GuestMemory = GuestMemoryMmap<()>;
type Mem = GuestMemoryAtomic<GuestMemory>;

/// How long a control request waits for the broker; the guest driver gives up after 1 s.
pub const BROKER_REPLY_TIMEOUT: Duration = Duration::from_millis(500);
/// Events waiting for a free event-queue buffer; older ones are dropped past this.
const MAX_PENDING_EVENTS: usize = 64;
/// Device event id of the nested epoll (ids up to NUM_QUEUES are the library's).
pub const DEVICE_EVENT: u16 = p::NUM_QUEUES as u16 + 1;
const TOKEN_BROKER: u64 = u64::MAX;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("broker: {0}")]
    Ipc(#[from] IpcError),
    #[error("broker refused us: {0}")]
    Refused(String),
    #[error("broker answered Hello with {0:?}")]
    UnexpectedReply(Box<BrokerMsg>),
    #[error("broker offers nothing usable for stream {0} ({1}): check the broker's config")]
    StreamUnavailable(usize, String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// The worker's side of the broker channel.
pub struct BrokerLink {
    channel: Channel,
    /// Asynchronous messages (xruns) that arrived while we waited for a reply.
    events: VecDeque<BrokerMsg>,
    alive: bool,
    pub client_id: u32,
}

impl BrokerLink {
    /// Greets the broker with our streams and returns what it grants for each.
    pub fn connect(
        channel: Channel,
        wanted: Vec<PcmCaps>,
    ) -> Result<(BrokerLink, Vec<PcmCaps>), WorkerError> {
        let count = wanted.len();
        channel.send(
            &WorkerMsg::Hello {
                version: ipc::PROTOCOL_VERSION,
                streams: wanted,
            },
            &[],
        )?;
        channel.wait_readable(Some(Duration::from_secs(5)))?;
        let (reply, _fds) = channel.recv::<BrokerMsg>()?;
        match reply {
            BrokerMsg::Welcome {
                version,
                client_id,
                caps,
            } if version == ipc::PROTOCOL_VERSION && caps.len() == count => {
                rustix::io::ioctl_fionbio(&channel, true).map_err(io::Error::from)?;
                Ok((
                    BrokerLink {
                        channel,
                        events: VecDeque::new(),
                        alive: true,
                        client_id,
                    },
                    caps,
                ))
            }
            BrokerMsg::Refused { reason } => Err(WorkerError::Refused(reason)),
            other => Err(WorkerError::UnexpectedReply(Box::new(other))),
        }
    }

    fn fail(&mut self, why: &dyn std::fmt::Display) -> Status {
        if self.alive {
            log::error!("broker link lost: {why}");
        }
        self.alive = false;
        Status::IoErr
    }

    /// Sends a request and waits (bounded) for its reply.
    fn request(&mut self, msg: WorkerMsg) -> Result<(BrokerMsg, Vec<OwnedFd>), Status> {
        if !self.alive {
            return Err(Status::IoErr);
        }
        if let Err(e) = self.channel.send(&msg, &[]) {
            return Err(self.fail(&e));
        }
        let deadline = std::time::Instant::now() + BROKER_REPLY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if let Err(e) = self.channel.wait_readable(Some(left)) {
                return Err(self.fail(&e));
            }
            match self.channel.recv::<BrokerMsg>() {
                Ok((BrokerMsg::Xrun { stream_id }, _)) => {
                    self.events.push_back(BrokerMsg::Xrun { stream_id });
                }
                Ok((reply, fds)) => {
                    if fds.len() != reply.fd_count() {
                        return Err(self.fail(&"wrong number of fds from the broker"));
                    }
                    return Ok((reply, fds));
                }
                Err(IpcError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(self.fail(&e)),
            }
        }
    }

    /// Sends a request that is answered by Done/Failed.
    fn simple(&mut self, msg: WorkerMsg, stream_id: u32) -> Result<(), Status> {
        match self.request(msg)? {
            (BrokerMsg::Done { stream_id: id }, _) if id == stream_id => Ok(()),
            (
                BrokerMsg::Failed {
                    stream_id: id,
                    reason,
                },
                _,
            ) if id == stream_id => {
                log::warn!("broker: stream {stream_id}: {reason}");
                Err(Status::IoErr)
            }
            (other, _) => Err(self.fail(&format!("unexpected reply {other:?}"))),
        }
    }

    /// Reads every message waiting without blocking.
    fn drain(&mut self) -> Vec<BrokerMsg> {
        let mut out: Vec<BrokerMsg> = self.events.drain(..).collect();
        while self.alive {
            match self.channel.recv::<BrokerMsg>() {
                Ok((msg @ BrokerMsg::Xrun { .. }, _)) => out.push(msg),
                Ok((other, _)) => {
                    self.fail(&format!("unsolicited message {other:?}"));
                }
                Err(IpcError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.fail(&e);
                }
            }
        }
        out
    }
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
}

impl RxBuf {
    fn payload_len(&self) -> u64 {
        self.writable.len() - p::PcmStatus::SIZE
    }
}

enum Transport {
    Playback(Producer),
    Capture(Consumer),
}

/// Data-path state of one stream.
#[derive(Default)]
struct StreamIo {
    transport: Option<(Transport, OwnedFd)>,
    params: Option<PcmParams>,
    tx: VecDeque<TxBuf>,
    rx: VecDeque<RxBuf>,
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

    /// One log line, then reset.
    fn report(&mut self, stream_id: u32, params: Option<PcmParams>) {
        let stats = std::mem::take(self);
        let Some(params) = params.filter(|_| stats.buffers > 0) else {
            return;
        };
        let n = u128::from(stats.buffers);
        let bytes_per_s = u128::from(params.frame_bytes()) * u128::from(params.rate_hz());
        log::info!(
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

/// Completions gathered during one event, signalled once at the end.
struct Completer<'a> {
    vrings: &'a [VringRwLock<Mem>],
    dirty: [bool; p::NUM_QUEUES],
}

impl<'a> Completer<'a> {
    fn new(vrings: &'a [VringRwLock<Mem>]) -> Self {
        Completer {
            vrings,
            dirty: [false; p::NUM_QUEUES],
        }
    }

    fn used(&mut self, queue: u16, head: u16, len: u32) {
        let Some(vring) = self.vrings.get(queue as usize) else {
            return;
        };
        match vring.add_used(head, len) {
            Ok(()) => self.dirty[queue as usize] = true,
            Err(e) => log::error!("queue {queue}: add_used failed: {e}"),
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

fn write_status(
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
        log::warn!("cannot write a pcm status: {e}");
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
    /// Completes every pending buffer (RELEASE, re-PREPARE, broker loss).
    fn flush(&mut self, mem: &GuestMemory, status: Status, done: &mut Completer) {
        for buf in self.tx.drain(..) {
            let status = if buf.status == Status::Ok {
                status
            } else {
                buf.status
            };
            write_status(mem, &buf.writable, 0, status, 0);
            done.used(p::TX_QUEUE, buf.head, p::PcmStatus::SIZE as u32);
        }
        for buf in self.rx.drain(..) {
            write_status(mem, &buf.writable, buf.payload_len(), status, 0);
            done.used(
                p::RX_QUEUE,
                buf.head,
                (buf.filled + p::PcmStatus::SIZE) as u32,
            );
        }
    }

    /// Completes played tx buffers and copies the next ones into the ring while it has room.
    fn pump_tx(&mut self, mem: &GuestMemory, done: &mut Completer) -> Result<(), String> {
        let Some((Transport::Playback(producer), _)) = &mut self.transport else {
            return Ok(());
        };
        let read_pos = producer.read_pos().map_err(|e| e.to_string())?;
        while let Some(front) = self.tx.front() {
            match front.ring_end {
                Some(end) if end <= read_pos => {
                    let buf = self.tx.pop_front().expect("front exists");
                    if buf.status == Status::Ok {
                        self.tx_stats.record(&buf);
                    }
                    write_status(mem, &buf.writable, 0, buf.status, buf.latency_bytes);
                    done.used(p::TX_QUEUE, buf.head, p::PcmStatus::SIZE as u32);
                }
                _ => break,
            }
        }
        let delay = delay_bytes(producer.ring(), self.params);
        for buf in self.tx.iter_mut().filter(|b| b.ring_end.is_none()) {
            let len = buf.payload_len();
            let queued = producer.queued().map_err(|e| e.to_string())?;
            if queued + len > producer.ring().capacity() {
                break;
            }
            let data = &mut self.scratch[..len as usize];
            match buf.readable.read(mem, p::PcmXfer::SIZE, data) {
                Ok(()) => {
                    producer.push(data).map_err(|e| e.to_string())?;
                }
                Err(e) => {
                    log::warn!("tx buffer {}: {e}", buf.head);
                    buf.status = Status::BadMsg;
                }
            }
            buf.ring_end = Some(producer.write_pos());
            buf.latency_bytes = latency_field(queued + delay);
        }
        Ok(())
    }

    /// Fills pending rx buffers from the ring; completes each one that is full.
    fn pump_rx(&mut self, mem: &GuestMemory, done: &mut Completer) -> Result<(), String> {
        let Some((Transport::Capture(consumer), _)) = &mut self.transport else {
            return Ok(());
        };
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
                if let Err(e) = buf.writable.write(mem, buf.filled, &self.scratch[..got]) {
                    log::warn!("rx buffer {}: {e}", buf.head);
                }
                buf.filled += got as u64;
            }
            if buf.filled == buf.payload_len() {
                let buf = self.rx.pop_front().expect("front exists");
                let ahead = consumer.available().map_err(|e| e.to_string())?;
                let latency = latency_field(ahead + delay_bytes(consumer.ring(), self.params));
                write_status(mem, &buf.writable, buf.payload_len(), Status::Ok, latency);
                done.used(
                    p::RX_QUEUE,
                    buf.head,
                    (buf.filled + p::PcmStatus::SIZE) as u32,
                );
            }
        }
        Ok(())
    }
}

/// Everything the control handler may touch, borrowed from the device for one request.
struct Host<'a, 'v> {
    streams: &'a mut [StreamIo],
    directions: &'a [u8],
    broker: &'a mut BrokerLink,
    epoll: &'a Epoll,
    mem: &'a GuestMemory,
    done: &'a mut Completer<'v>,
}

impl Host<'_, '_> {
    fn drop_transport(&mut self, stream_id: u32) {
        let io = &mut self.streams[stream_id as usize];
        io.flush(self.mem, Status::Ok, self.done);
        io.tx_stats.report(stream_id, io.params);
        if let Some((_, notify)) = io.transport.take() {
            let _ = self.epoll.delete(&notify);
        }
    }
}

impl PcmHost for Host<'_, '_> {
    fn prepare(&mut self, stream_id: u32, params: &PcmParams) -> Result<(), Status> {
        self.drop_transport(stream_id);
        let (reply, mut fds) = self.broker.request(WorkerMsg::Prepare {
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
                return Err(Status::IoErr);
            }
            other => return Err(self.broker.fail(&format!("unexpected reply {other:?}"))),
        };
        let notify = fds.pop().ok_or(Status::IoErr)?;
        let ring_fd = fds.pop().ok_or(Status::IoErr)?;
        // The ring must hold at least one period, and stay within our own limit.
        if capacity < u64::from(params.period_bytes) {
            return Err(self.broker.fail(&"ring smaller than a period"));
        }
        let ring = SharedRing::open(ring_fd, capacity)
            .map_err(|e| self.broker.fail(&format!("ring: {e}")))?;
        self.epoll
            .add(
                &notify,
                EpollEvent::new(EpollFlags::EPOLLIN, u64::from(stream_id)),
            )
            .map_err(|e| self.broker.fail(&format!("epoll: {e}")))?;
        let output = self.directions[stream_id as usize] == p::D_OUTPUT;
        let io = &mut self.streams[stream_id as usize];
        let transport = if output {
            Transport::Playback(Producer::new(ring))
        } else {
            Transport::Capture(Consumer::new(ring))
        };
        io.scratch = vec![0; capacity as usize];
        io.transport = Some((transport, notify));
        io.params = Some(*params);
        Ok(())
    }

    fn start(&mut self, stream_id: u32) -> Result<(), Status> {
        self.broker
            .simple(WorkerMsg::Start { stream_id }, stream_id)
    }

    fn stop(&mut self, stream_id: u32) -> Result<(), Status> {
        self.broker.simple(WorkerMsg::Stop { stream_id }, stream_id)
    }

    fn release(&mut self, stream_id: u32) -> Result<(), Status> {
        // Every pending buffer is completed before the answer, as the spec requires.
        self.drop_transport(stream_id);
        self.broker
            .simple(WorkerMsg::Release { stream_id }, stream_id)
    }
}

/// The vhost-user virtio-sound device.
pub struct SoundDevice {
    control: ControlState,
    directions: Vec<u8>,
    streams: Vec<StreamIo>,
    broker: BrokerLink,
    /// Holds the broker channel and every stream's wake-up eventfd.
    epoll: Epoll,
    mem: Option<Mem>,
    event_idx: bool,
    event_buffers: VecDeque<Chain>,
    pending_events: VecDeque<p::Event>,
    /// Tells the vring thread to exit when the VMM has gone, so the worker can end. Handed
    /// over once (one vring thread), so no fd is duplicated under the seccomp policy.
    exit: std::sync::Mutex<Option<(EventConsumer, EventNotifier)>>,
}

impl SoundDevice {
    /// Builds the device from the config and the broker's grants.
    pub fn new(config: &Config, broker_channel: Channel) -> Result<SoundDevice, WorkerError> {
        let wanted = wanted_caps(config);
        let (broker, granted) = BrokerLink::connect(broker_channel, wanted)?;
        for (i, caps) in granted.iter().enumerate() {
            if caps.formats == 0 || caps.rates == 0 || caps.channels_min > caps.channels_max {
                return Err(WorkerError::StreamUnavailable(
                    i,
                    config.streams[i].name.clone(),
                ));
            }
        }
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io::Error::from)?;
        epoll
            .add(
                &broker.channel,
                EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_BROKER),
            )
            .map_err(io::Error::from)?;
        Ok(SoundDevice {
            control: ControlState::new(config, &granted),
            directions: granted.iter().map(|c| c.direction).collect(),
            streams: granted.iter().map(|_| StreamIo::default()).collect(),
            broker,
            epoll,
            mem: None,
            event_idx: false,
            event_buffers: VecDeque::new(),
            pending_events: VecDeque::new(),
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
        self.broker.client_id
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
                        log::error!("queue {queue}: {e}; ignoring it until the next kick");
                        return;
                    }
                }
            };
            // The chains were taken off the ring; hand each to the handler.
            for chain in chains {
                match chain {
                    Ok(chain) => f(self, &guard, chain, done),
                    Err((head, e)) => {
                        log::warn!("queue {queue}: malformed chain {head}: {e}");
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
        let request_len = chain.readable.len().min(4096) as usize;
        let mut request = vec![0u8; request_len];
        if let Err(e) = chain.readable.read(mem, 0, &mut request) {
            log::warn!("control request: {e}");
            request.clear();
        }
        let capacity = chain.writable.len().min(usize::MAX as u64) as usize;
        let response = {
            let mut host = Host {
                streams: &mut self.streams,
                broker: &mut self.broker,
                epoll: &self.epoll,
                mem,
                directions: &self.directions,
                done,
            };
            self.control.handle(&request, capacity, &mut host)
        };
        if let Err(e) = chain.writable.write(mem, 0, &response) {
            log::warn!("control response: {e}");
        }
        done.used(p::CONTROL_QUEUE, chain.head, response.len() as u32);
    }
}

/// The caps the worker asks the broker for, from its config.
pub fn wanted_caps(config: &Config) -> Vec<PcmCaps> {
    config
        .streams
        .iter()
        .map(|s| PcmCaps {
            direction: s.direction.wire(),
            hda_fn_nid: s.hda_fn_nid,
            features: 1 << p::PCM_F_EVT_XRUNS,
            formats: s.format_mask(),
            rates: s.rate_mask(),
            channels_min: s.channels_min,
            channels_max: s.channels_max,
        })
        .collect()
}

impl SoundDevice {
    fn handle_tx(&mut self, mem: &GuestMemory, chain: Chain, done: &mut Completer) {
        let status_len = p::PcmStatus::SIZE;
        if chain.writable.len() < status_len {
            log::warn!("tx buffer {} has no room for a status", chain.head);
            done.used(p::TX_QUEUE, chain.head, 0);
            return;
        }
        let reject = |done: &mut Completer, why: &str| {
            log::debug!("tx buffer {}: {why}", chain.head);
            write_status(mem, &chain.writable, 0, Status::BadMsg, 0);
            done.used(p::TX_QUEUE, chain.head, status_len as u32);
        };
        let mut header = [0u8; 4];
        if chain.readable.len() < p::PcmXfer::SIZE
            || chain.readable.read(mem, 0, &mut header).is_err()
        {
            return reject(done, "short header");
        }
        let stream_id = u32::from_le_bytes(header);
        let state = self.control.stream_state(stream_id);
        if self.directions.get(stream_id as usize) != Some(&p::D_OUTPUT) {
            return reject(done, "not an output stream");
        }
        if !state.is_some_and(|s| s.accepts_io()) {
            return reject(done, "stream is not prepared");
        }
        let io = &mut self.streams[stream_id as usize];
        let Some((Transport::Playback(producer), _)) = &io.transport else {
            return reject(done, "stream has no transport");
        };
        let payload = chain.readable.len() - p::PcmXfer::SIZE;
        if payload == 0 || payload > producer.ring().capacity() {
            return reject(done, "payload empty or larger than the ring");
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
        self.pump(stream_id, mem, done);
    }

    fn handle_rx(&mut self, mem: &GuestMemory, chain: Chain, done: &mut Completer) {
        let status_len = p::PcmStatus::SIZE;
        if chain.writable.len() < status_len {
            log::warn!("rx buffer {} has no room for a status", chain.head);
            done.used(p::RX_QUEUE, chain.head, 0);
            return;
        }
        let status_at = chain.writable.len() - status_len;
        let reject = |done: &mut Completer, why: &str| {
            log::debug!("rx buffer {}: {why}", chain.head);
            write_status(mem, &chain.writable, status_at, Status::BadMsg, 0);
            done.used(p::RX_QUEUE, chain.head, status_len as u32);
        };
        let mut header = [0u8; 4];
        if chain.readable.len() < p::PcmXfer::SIZE
            || chain.readable.read(mem, 0, &mut header).is_err()
        {
            return reject(done, "short header");
        }
        let stream_id = u32::from_le_bytes(header);
        if self.directions.get(stream_id as usize) != Some(&p::D_INPUT) {
            return reject(done, "not an input stream");
        }
        if !self
            .control
            .stream_state(stream_id)
            .is_some_and(|s| s.accepts_io())
        {
            return reject(done, "stream is not prepared");
        }
        if status_at == 0 {
            return reject(done, "no room for frames");
        }
        let io = &mut self.streams[stream_id as usize];
        if io.transport.is_none() {
            return reject(done, "stream has no transport");
        }
        io.rx.push_back(RxBuf {
            head: chain.head,
            writable: chain.writable,
            filled: 0,
        });
        self.pump(stream_id, mem, done);
    }

    fn handle_event_buffer(&mut self, _mem: &GuestMemory, chain: Chain, _done: &mut Completer) {
        // Held until an event happens; never treated as work to do.
        self.event_buffers.push_back(chain);
    }

    /// Moves a stream's data; a broker that breaks the ring protocol loses the stream.
    fn pump(&mut self, stream_id: u32, mem: &GuestMemory, done: &mut Completer) {
        let Some(io) = self.streams.get_mut(stream_id as usize) else {
            return;
        };
        let result = io.pump_tx(mem, done).and_then(|()| io.pump_rx(mem, done));
        if let Err(e) = result {
            log::error!("stream {stream_id}: {e}; failing its buffers");
            io.flush(mem, Status::IoErr, done);
            if let Some((_, notify)) = io.transport.take() {
                let _ = self.epoll.delete(&notify);
            }
        }
    }

    fn queue_event(&mut self, event: p::Event) {
        if self.pending_events.len() >= MAX_PENDING_EVENTS {
            self.pending_events.pop_front();
            log::warn!("event queue full: dropping the oldest event");
        }
        self.pending_events.push_back(event);
    }

    fn deliver_events(&mut self, mem: &GuestMemory, done: &mut Completer) {
        while !self.pending_events.is_empty() {
            let Some(chain) = self.event_buffers.pop_front() else {
                return;
            };
            if chain.writable.len() < p::Event::SIZE {
                log::warn!("event buffer {} too small", chain.head);
                done.used(p::EVENT_QUEUE, chain.head, 0);
                continue;
            }
            let event = self.pending_events.pop_front().expect("not empty");
            if let Err(e) = chain.writable.write(mem, 0, event.as_bytes()) {
                log::warn!("event buffer {}: {e}", chain.head);
            }
            done.used(p::EVENT_QUEUE, chain.head, p::Event::SIZE as u32);
        }
    }

    /// Broker channel and stream wake-ups.
    fn handle_device_event(&mut self, mem: &GuestMemory, done: &mut Completer) {
        let mut events = [EpollEvent::empty(); 16];
        let n = match self.epoll.wait(&mut events, EpollTimeout::ZERO) {
            Ok(n) => n,
            Err(e) => {
                log::error!("device epoll: {e}");
                return;
            }
        };
        for event in &events[..n] {
            let token = event.data();
            if token == TOKEN_BROKER {
                self.handle_broker_messages();
                if !self.broker.alive {
                    self.broker_lost(mem, done);
                }
                continue;
            }
            let stream_id = token as u32;
            if let Some((_, notify)) = self
                .streams
                .get(stream_id as usize)
                .and_then(|io| io.transport.as_ref())
            {
                let mut counter = [0u8; 8];
                let _ = rustix::io::read(notify, &mut counter);
            }
            self.pump(stream_id, mem, done);
        }
    }

    fn handle_broker_messages(&mut self) {
        for msg in self.broker.drain() {
            if let BrokerMsg::Xrun { stream_id } = msg {
                let wants_xruns = self
                    .control
                    .stream_params(stream_id)
                    .is_some_and(|p| p.features & (1 << p::PCM_F_EVT_XRUNS) != 0);
                if wants_xruns {
                    self.queue_event(p::Event {
                        hdr: p::Hdr {
                            code: p::EVT_PCM_XRUN.into(),
                        },
                        data: stream_id.into(),
                    });
                }
            }
        }
    }

    fn broker_lost(&mut self, mem: &GuestMemory, done: &mut Completer) {
        let _ = self.epoll.delete(&self.broker.channel);
        for io in &mut self.streams {
            io.flush(mem, Status::IoErr, done);
            if let Some((_, notify)) = io.transport.take() {
                let _ = self.epoll.delete(&notify);
            }
        }
    }

    /// Frees every stream (VMM reset or disconnect).
    fn release_all(&mut self) {
        for stream_id in 0..self.streams.len() as u32 {
            let io = &mut self.streams[stream_id as usize];
            io.tx.clear();
            io.rx.clear();
            if let Some((_, notify)) = io.transport.take() {
                let _ = self.epoll.delete(&notify);
                let _ = self
                    .broker
                    .simple(WorkerMsg::Release { stream_id }, stream_id);
            }
        }
        self.control.reset();
        self.event_buffers.clear();
        self.pending_events.clear();
    }
}

impl VhostUserBackendMut for SoundDevice {
    type Bitmap = ();
    type Vring = VringRwLock<Mem>;

    fn num_queues(&self) -> usize {
        p::NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        1024
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
        let Some(mem) = self.mem.clone() else {
            return Ok(());
        };
        let mut done = Completer::new(vrings);
        match device_event {
            p::CONTROL_QUEUE => {
                self.process_queue(device_event, vrings, &mut done, Self::handle_control)
            }
            p::EVENT_QUEUE => {
                self.process_queue(device_event, vrings, &mut done, Self::handle_event_buffer)
            }
            p::TX_QUEUE => self.process_queue(device_event, vrings, &mut done, Self::handle_tx),
            p::RX_QUEUE => self.process_queue(device_event, vrings, &mut done, Self::handle_rx),
            DEVICE_EVENT => self.handle_device_event(&mem.memory(), &mut done),
            other => log::warn!("unexpected device event {other}"),
        }
        self.handle_broker_messages();
        self.deliver_events(&mem.memory(), &mut done);
        done.signal(self.event_idx);
        // Errors here would stop the device thread: everything was handled and logged above.
        Ok(())
    }
}
