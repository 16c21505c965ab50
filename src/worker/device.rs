//! The device: the vhost-user virtio-sound backend that parses every guest request.
//!
//! It runs one epoll thread (vhost-user-backend's) that serves the four virtqueues plus one
//! nested epoll of its own holding the broker channel, two timers and each stream's wake-up
//! socket (read only with MSG_DONTWAIT, so a broker cannot block this thread through it). Guest
//! input never makes it return an error (that would stop the thread): bad requests get the
//! spec's status, bad chains are completed empty and logged.
//!
//! The broker may go away under a running VM (the VMM cannot reconnect us, so the worker never
//! gives up its VMM session): its streams then run on the worker's own clock, in silence at
//! their real-time pace, until the reconnected link hands them to the new broker.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use log::Level;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::QueueOwnedT;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use zerocopy::IntoBytes;

use crate::broker_link::{BrokerLink, Fault, LinkError, LinkEvent};
pub use crate::completion::GuestMemory;
use crate::completion::{Completer, GuestLedger, Held, Mem, MAX_QUEUE_SIZE};
use crate::local_clock::WakeTimer;
use crate::pcm_host::Host;
use crate::stream::{open_ring, RxBuf, Stream, TxBuf};
use virtio_snd::control::{ControlState, PcmStream};
use virtio_snd::ctl::Gain;
use virtio_snd::guest::{Chain, GuestBuffer};
use virtio_snd::protocol::{self as p, Status};
use virtio_snd::xfer::{Xfer, XferError};
use vsound_config::{Config, VmName};
use vsound_shared::guest_log;
use vsound_shared::ipc::{BrokerMsg, WorkerMsg};
use vsound_shared::ring::{take_wakeup, Wakeups};

/// Events waiting for a free event-queue buffer; older ones are dropped past this.
const MAX_PENDING_EVENTS: usize = 64;
/// Device event id of the nested epoll (ids up to NUM_QUEUES are the library's).
pub const DEVICE_EVENT: u16 = p::NUM_QUEUES as u16 + 1;
/// Epoll data of the nested epoll's fds other than the streams' (whose data is their id).
const TOKEN_BROKER: u64 = u64::MAX;
const TOKEN_LINK_TIMER: u64 = u64::MAX - 1;
const TOKEN_LOCAL_CLOCK: u64 = u64::MAX - 2;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("{0}")]
    Link(#[from] LinkError),
    #[error("broker offers nothing usable for stream {0} ({1}): check the broker's config")]
    StreamUnavailable(usize, String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// The vhost-user virtio-sound device.
pub struct SoundDevice {
    control: ControlState,
    streams: Vec<Stream>,
    link: BrokerLink,
    /// Holds the broker channel, the link's reconnection timer, the local clock's timer and
    /// every stream's wake-up socket.
    epoll: Epoll,
    /// Fires when the local clock completes a buffer of a stream the broker does not hold.
    local_timer: WakeTimer,
    mem: Option<Mem>,
    event_idx: bool,
    event_buffers: VecDeque<Held>,
    pending_events: VecDeque<p::Event>,
    /// Held heads and the guest-log limiter; lent to each event's [`Completer`].
    ledger: GuestLedger,
    /// Tells the vring thread to exit when the VMM has gone, so the worker can end. Handed
    /// over once (one vring thread), so no fd is duplicated under the seccomp policy.
    exit: std::sync::Mutex<Option<(EventConsumer, EventNotifier)>>,
    /// Whether the VMM's too small config space was reported.
    config_warned: AtomicBool,
    /// (jack, stream): the jacks that follow a stream's host end (`follows` in the config).
    jack_followers: Vec<(u32, u32)>,
    /// Per queue: the guest was last left not to kick it ([`SoundDevice::wants_kicks`]); the
    /// device reads it after every event instead.
    kicks_suppressed: [bool; p::NUM_QUEUES],
}

impl SoundDevice {
    /// Builds the device from `vm`'s layout (`config`, from `Config::for_vm`) and the grants of
    /// the broker at `broker_path`, which it will reconnect to whenever the link fails.
    pub fn new(
        config: &Config,
        vm: VmName,
        broker_path: &Path,
    ) -> Result<SoundDevice, WorkerError> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io::Error::from)?;
        let (link, granted) = BrokerLink::connect(
            broker_path,
            vm,
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
            control: ControlState::new(config.device_layout())
                .with_controls(config.control_specs()),
            jack_followers: config
                .jack_followers()
                .into_iter()
                .map(|(jack, stream)| (jack as u32, stream as u32))
                .collect(),
            streams: granted
                .into_iter()
                .map(|caps| Stream::new(PcmStream::new(caps)))
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
            config_warned: AtomicBool::new(false),
            kicks_suppressed: [false; p::NUM_QUEUES],
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
            let _ = vring.disable_notification();
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
            // Kicks stay off while every stream of the queue holds enough buffers: the
            // wake-up for the next completion reads the queue instead (`handle_event`).
            let suppress = !self.wants_kicks(queue);
            self.kicks_suppressed[queue as usize] = suppress;
            if suppress {
                break;
            }
            match vring.enable_notification() {
                Ok(true) => continue,
                _ => break,
            }
        }
    }

    /// Whether the guest must kick `queue` for new buffers. Only the tx and rx queues do
    /// without, and only while at least one stream of the direction runs and every prepared
    /// one holds enough ([`Stream::holds_enough`]): each of those has a completion coming,
    /// whose wake-up reads the queue. Any other prepared stream (not started, stopped, on the
    /// local clock, short of buffers) needs them.
    fn wants_kicks(&self, queue: u16) -> bool {
        let output = match queue {
            p::TX_QUEUE => true,
            p::RX_QUEUE => false,
            _ => return true,
        };
        let mut holding = false;
        for stream in self
            .streams
            .iter()
            .filter(|s| s.output() == output && s.pcm.state().accepts_io())
        {
            if !stream.holds_enough() {
                return true;
            }
            holding = true;
        }
        !holding
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
                link: &mut self.link,
                epoll: &self.epoll,
                mem,
                done,
            };
            self.control
                .handle(&request, capacity, &mut self.streams, &mut host)
        };
        // Each request and its status at debug; its bytes at trace (how the fuzz corpus's
        // requests from the Linux driver were recorded).
        let code = p::request_code(&request).unwrap_or(0);
        log::debug!(
            "control request {} ({code:#x}): {}",
            p::request_name(code),
            p::status_name(&response)
        );
        log::trace!("control request bytes {}", hex(&request));
        if let Err(e) = chain.writable.write(mem, 0, &response) {
            guest_log!(done.log(), Level::Warn, "control response: {e}");
        }
        done.used(p::CONTROL_QUEUE, chain.head, response.len() as u32);
    }
}

/// What serves one chain of a queue.
type XferHandler = fn(&mut SoundDevice, &GuestMemory, Chain, &mut Completer);

/// A tx or rx request that passed the checks common to both, ready to be held.
struct CheckedXfer {
    stream_id: u32,
    chain: Chain,
    /// Where its status goes in the writable part: first for tx, after the frames for rx.
    status_at: u64,
}

/// Completes a tx/rx chain at once with BAD_MSG. Requests a driver may get wrong are logged at
/// debug, a hostile driver's at warn.
#[allow(clippy::too_many_arguments)]
fn reject_xfer(
    mem: &GuestMemory,
    done: &mut Completer,
    queue: u16,
    head: u16,
    writable: &GuestBuffer,
    status_at: u64,
    level: Level,
    why: &dyn std::fmt::Display,
) {
    let direction = if queue == p::TX_QUEUE { "tx" } else { "rx" };
    guest_log!(done.log(), level, "{direction} buffer {head}: {why}");
    done.write_status(mem, writable, status_at, Status::BadMsg, 0);
    done.used(queue, head, p::PcmStatus::SIZE as u32);
}

impl SoundDevice {
    /// The checks tx and rx share: room for a status, a header naming a stream of the
    /// queue's direction, prepared, with a transport. A chain that fails one is completed.
    fn check_xfer(
        &mut self,
        queue: u16,
        mem: &GuestMemory,
        chain: Chain,
        done: &mut Completer,
    ) -> Option<CheckedXfer> {
        let output = queue == p::TX_QUEUE;
        let reject = |done: &mut Completer, status_at: u64, why: &dyn std::fmt::Display| {
            let (head, writable) = (chain.head, &chain.writable);
            let level = Level::Debug;
            reject_xfer(mem, done, queue, head, writable, status_at, level, why);
        };
        let xfer = match Xfer::parse(mem, &chain, output) {
            Ok(xfer) => xfer,
            Err(XferError::NoRoomForStatus) => {
                let direction = if output { "tx" } else { "rx" };
                let head = chain.head;
                guest_log!(
                    done.log(),
                    Level::Warn,
                    "{direction} buffer {head} has no room for a status"
                );
                done.used(queue, head, 0);
                return None;
            }
            Err(e @ XferError::ShortHeader { status_at }) => {
                reject(done, status_at, &e);
                return None;
            }
        };
        let (stream_id, status_at) = (xfer.stream_id, xfer.status_at);
        let why = match self.streams.get(stream_id as usize) {
            None => "no such stream",
            Some(stream) if stream.output() != output => "not a stream of this direction",
            Some(stream) if !stream.pcm.state().accepts_io() => "stream is not prepared",
            Some(stream) if !stream.has_transport() => "stream has no transport",
            Some(_) => {
                return Some(CheckedXfer {
                    stream_id,
                    chain,
                    status_at,
                })
            }
        };
        reject(done, status_at, &why);
        None
    }

    /// Holds the chain until its frames are played.
    fn handle_tx(&mut self, mem: &GuestMemory, chain: Chain, done: &mut Completer) {
        let Some(CheckedXfer {
            stream_id, chain, ..
        }) = self.check_xfer(p::TX_QUEUE, mem, chain, done)
        else {
            return;
        };
        let stream = &mut self.streams[stream_id as usize];
        let Chain {
            head,
            readable,
            writable,
        } = chain;
        let payload = readable.len() - p::PcmXfer::SIZE;
        if payload == 0 || stream.tx_limit().is_none_or(|limit| payload > limit) {
            let why = "payload empty or larger than the ring";
            return reject_xfer(
                mem,
                done,
                p::TX_QUEUE,
                head,
                &writable,
                0,
                Level::Debug,
                &why,
            );
        }
        match done.hold(p::TX_QUEUE, head, writable, Some(0)) {
            Ok(held) => stream.queue_tx(TxBuf::new(held, readable)),
            Err((writable, refused)) => {
                let queue = p::TX_QUEUE;
                return reject_xfer(mem, done, queue, head, &writable, 0, Level::Warn, &refused);
            }
        }
        self.pump(stream_id, Some(mem), done);
    }

    /// Holds the chain until it is filled with captured frames.
    fn handle_rx(&mut self, mem: &GuestMemory, chain: Chain, done: &mut Completer) {
        let Some(CheckedXfer {
            stream_id,
            chain,
            status_at,
        }) = self.check_xfer(p::RX_QUEUE, mem, chain, done)
        else {
            return;
        };
        let Chain { head, writable, .. } = chain;
        let queue = p::RX_QUEUE;
        if status_at == 0 {
            let why = "no room for frames";
            return reject_xfer(mem, done, queue, head, &writable, 0, Level::Debug, &why);
        }
        match done.hold(queue, head, writable, Some(status_at)) {
            Ok(held) => self.streams[stream_id as usize].queue_rx(RxBuf::new(held, status_at)),
            Err((writable, refused)) => {
                let (at, level) = (status_at, Level::Warn);
                return reject_xfer(mem, done, queue, head, &writable, at, level, &refused);
            }
        }
        self.pump(stream_id, Some(mem), done);
    }

    fn handle_event_buffer(&mut self, _mem: &GuestMemory, chain: Chain, done: &mut Completer) {
        let head = chain.head;
        match done.hold(p::EVENT_QUEUE, head, chain.writable, None) {
            // Held until an event happens; never treated as work to do.
            Ok(held) => self.event_buffers.push_back(held),
            Err((_, refused)) => {
                guest_log!(done.log(), Level::Warn, "event buffer {head}: {refused}");
                done.used(p::EVENT_QUEUE, head, 0);
            }
        }
    }

    /// Moves a stream's data; a broker that breaks the ring protocol loses the stream. Without
    /// guest memory no buffer can be pending: there is nothing to move.
    fn pump(&mut self, stream_id: u32, mem: Option<&GuestMemory>, done: &mut Completer) {
        let (Some(stream), Some(mem)) = (self.streams.get_mut(stream_id as usize), mem) else {
            return;
        };
        if let Err(e) = stream.pump(mem, done) {
            log::error!("stream {stream_id}: {e}; failing its buffers");
            stream.flush(mem, Status::IoErr, done);
            stream.close_transport(&self.epoll);
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
            let Some(held) = self.event_buffers.pop_front() else {
                return;
            };
            if held.writable().len() < p::Event::SIZE {
                guest_log!(
                    done.log(),
                    Level::Warn,
                    "event buffer {} too small",
                    held.head()
                );
                held.complete(mem, done, Status::Ok, 0, 0);
                continue;
            }
            let event = self.pending_events.pop_front().expect("not empty");
            if let Err(e) = held.writable().write(mem, 0, event.as_bytes()) {
                guest_log!(done.log(), Level::Warn, "event buffer {}: {e}", held.head());
            }
            held.complete(mem, done, Status::Ok, 0, p::Event::SIZE as u32);
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
                    if let Some(notify) = self
                        .streams
                        .get(stream_id as usize)
                        .and_then(Stream::wakeups)
                    {
                        // A closed end stays readable: stop watching it (a broker that went
                        // away is the link's to notice).
                        if take_wakeup(notify.as_fd()) == Wakeups::Closed {
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
            if let BrokerMsg::GainChanged { stream_id, gain } = msg {
                self.host_gain_changed(stream_id, gain, done);
                continue;
            }
            if let BrokerMsg::HostPresence { stream_id, present } = msg {
                self.host_presence(stream_id, present, done);
                continue;
            }
            if let BrokerMsg::Xrun { stream_id } = msg {
                let wants_xruns = self
                    .streams
                    .get(stream_id as usize)
                    .and_then(|s| s.pcm.params())
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

    /// A stream's host end appeared or went: the jacks that follow it say so (JACK_INFO) and
    /// the driver is told of each that changed. Before a driver runs (no guest memory yet:
    /// the worker hears the broker before its VM boots) there is no one to tell: the driver
    /// reads the state at probe.
    fn host_presence(&mut self, stream_id: u32, present: bool, done: &mut Completer) {
        let driver_up = self.mem.is_some();
        let jacks: Vec<u32> = self
            .jack_followers
            .iter()
            .filter(|(_, stream)| *stream == stream_id)
            .map(|(jack, _)| *jack)
            .collect();
        for jack in jacks {
            if let Some(event) = self.control.set_jack_connected(jack, present) {
                log::info!(
                    "jack {jack}: {} (stream {stream_id}'s host end {})",
                    if present { "connected" } else { "disconnected" },
                    if present { "is there" } else { "went" }
                );
                if driver_up {
                    self.queue_event(event, done);
                }
            }
        }
    }

    /// The host changed a stream's volume or mute: the stream keeps the new value (the
    /// guest's next CTL_READ shows it) and the driver is told which controls changed. A
    /// broker's news about a stream without controls, or off the scale, is dropped.
    fn host_gain_changed(&mut self, stream_id: u32, gain: Gain, done: &mut Completer) {
        let Some(stream) = self.streams.get_mut(stream_id as usize) else {
            guest_log!(
                done.log(),
                Level::Warn,
                "broker: gain news for no stream {stream_id}"
            );
            return;
        };
        if !gain.is_valid() || !self.control.stream_has_controls(stream_id) {
            guest_log!(
                done.log(),
                Level::Warn,
                "broker: gain news for stream {stream_id} ignored: {gain:?}"
            );
            return;
        }
        let old = stream.pcm.gain();
        stream.pcm.set_gain(gain);
        log::debug!("stream {stream_id}: the host set {gain:?}");
        for event in self.control.gain_events(stream_id, old, gain) {
            self.queue_event(event, done);
        }
    }

    /// A new broker welcomed us: it gets back every stream the local clock kept going, with
    /// the guest's params and running state, and the buffers still pending; and every
    /// stream's volume and mute that is not the default, prepared or not.
    fn restore_streams(&mut self, mem: Option<&GuestMemory>, done: &mut Completer) {
        for stream_id in 0..self.streams.len() as u32 {
            let gain = self.streams[stream_id as usize].pcm.gain();
            if gain.is_unity() {
                continue;
            }
            match self
                .link
                .simple(WorkerMsg::SetGain { stream_id, gain }, stream_id)
            {
                Ok(()) => {}
                Err(Fault::Refused(reason)) => {
                    log::warn!("stream {stream_id}: the new broker refused its gain: {reason}")
                }
                Err(Fault::Down) => return,
            }
        }
        let mut restored = 0;
        for stream_id in 0..self.streams.len() as u32 {
            let stream = &mut self.streams[stream_id as usize];
            let Some(params) = stream.to_restore() else {
                continue;
            };
            match open_ring(
                &mut self.link,
                &self.epoll,
                stream_id,
                &params,
                stream.output(),
            ) {
                Ok((end, notify)) => stream.use_ring(end, notify, params),
                Err(Fault::Refused(reason)) => {
                    log::warn!("stream {stream_id} stays on the worker's clock: {reason}");
                    continue;
                }
                Err(Fault::Down) => return,
            }
            // Fill the new ring before its clock starts, so that it does not begin with an xrun.
            self.pump(stream_id, mem, done);
            let stream = &mut self.streams[stream_id as usize];
            if stream.restore_running() {
                match self.link.simple(WorkerMsg::Start { stream_id }, stream_id) {
                    Ok(()) => {}
                    Err(Fault::Refused(reason)) => {
                        log::warn!("stream {stream_id} stays on the worker's clock: {reason}");
                        let _ = self
                            .link
                            .simple(WorkerMsg::Release { stream_id }, stream_id);
                        stream.use_local_clock(params, &self.epoll);
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
            for stream in &mut self.streams {
                stream.go_local(&self.epoll);
            }
        }
        let next = self
            .streams
            .iter()
            .filter_map(Stream::next_local_completion)
            .min();
        self.local_timer.arm(next);
    }

    /// Frees every stream (VMM reset or disconnect): nothing held may be completed any more.
    fn release_all(&mut self) {
        for stream_id in 0..self.streams.len() as u32 {
            let stream = &mut self.streams[stream_id as usize];
            let at_broker = stream.at_broker();
            stream.reset(&self.epoll);
            if at_broker {
                let _ = self
                    .link
                    .simple(WorkerMsg::Release { stream_id }, stream_id);
            }
        }
        for held in self.event_buffers.drain(..) {
            held.abandon();
        }
        self.pending_events.clear();
        self.kicks_suppressed = [false; p::NUM_QUEUES];
        self.ledger.reset();
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
        let controls = if self.control.offers_controls() {
            1 << p::F_CTLS
        } else {
            0
        };
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | controls
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&mut self, features: u64) {
        self.control.set_features(features);
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
        // 16 bytes: `controls` is 0 unless F_CTLS was negotiated, so a VMM that reads 16
        // without it sees the 12 of VIRTIO 1.2, zero-extended.
        let config = self.control.config_space(self.streams.len());
        let mut space = [0u8; 16];
        space.copy_from_slice(config.as_bytes());
        // QEMU sizes the space by its own `controls` property, not by the features it passes
        // through: without `controls=on` the guest reads `controls` beyond the 12 bytes as
        // 0xffffffff and its probe fails. Say so once.
        if self.control.controls_negotiated()
            && offset == 0
            && size < p::VirtioSndConfigCtls::SIZE as u32
            && !self.config_warned.swap(true, Ordering::Relaxed)
        {
            log::error!(
                "the VMM reads a {size}-byte config space but the guest negotiated control \
                 elements: start QEMU with -device vhost-user-snd-pci,...,controls=on (or set \
                 `controls = false` in the config)"
            );
        }
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
        // A queue whose kicks are off is read after every event (a completion's wake-up
        // above all), and gets its kicks back once a stream needs them.
        if mem.is_some() {
            for (queue, handler) in [
                (p::TX_QUEUE, Self::handle_tx as XferHandler),
                (p::RX_QUEUE, Self::handle_rx as XferHandler),
            ] {
                if self.kicks_suppressed[queue as usize] {
                    self.process_queue(queue, vrings, &mut done, handler);
                }
            }
        }
        if let Some(mem) = mem {
            self.deliver_events(mem, &mut done);
            done.complete_orphans(mem);
        }
        done.signal(self.event_idx);
        ledger.report_log_if_due(Instant::now());
        self.ledger = ledger;
        // Errors here would stop the device thread: everything was handled and logged above.
        Ok(())
    }
}

/// `bytes` as lowercase hex digits.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
