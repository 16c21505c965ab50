//! The audio broker: serves many workers (one per VM), owns the backends, and moves frames
//! between each stream's ring and its backend at the stream's real-time rate.
//!
//! A worker is assumed compromised: every message is decoded with a size limit and checked
//! (stream ids, params, states), every ring position it publishes is bound-checked, and a worker
//! that breaks the protocol is disconnected with all its streams freed while the other workers
//! keep playing. One thread, one epoll runs the control messages; the timer-driven streams
//! (null, wav, ALSA) run on a timer thread of their own while they play ([`TimerThread`]), so
//! that no control work delays them. No lock is ever shared with a worker.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use crate::admin::AdminServer;
use crate::backends::clocked::{Returned, TimerCommand, TimerThread, TIMER_SLOTS};
use crate::backends::gain::GainCell;
use crate::backends::host_nodes::HostNodes;
use crate::backends::{self, BackendStream, Backends, RingPort, StreamRing, StreamSpec};
use crate::opener::{Opened, Opener, Outcome, Pending, OPEN_DEADLINE};
use virtio_snd::control::{PcmCaps, PcmParams};
use virtio_snd::ctl::Gain;
use virtio_snd::protocol::D_OUTPUT;
use vsound_admin::{Reply as AdminReply, Request as AdminRequest, StreamStatus, VmStatus};
use vsound_config::{Config, StreamConfig, VmName};
use vsound_shared::ipc::{self, BrokerMsg, Channel, IpcError, Listener, WorkerMsg};
use vsound_shared::ratelimit::LogLimiter;
use vsound_shared::ring::{Consumer, Producer, RingError, SharedRing, WakeSender};

/// Most workers (connections past Hello) one broker serves at once.
pub const MAX_CLIENTS: usize = 64;
/// Connections that have not said Hello yet. When full, the oldest is dropped for the newest:
/// a worker sends Hello as soon as it connects (and it is read at accept), so idle
/// connections cannot keep a worker out.
pub const MAX_PENDING: usize = 32;
/// How long a connection may take to say Hello.
pub const HELLO_DEADLINE: Duration = Duration::from_secs(1);
/// Connections one uid (SO_PEERCRED) may hold: before Hello, after it, and dropped ones whose
/// fds it has not read (see `Unread`). The shipped units give every VM's worker a uid of its
/// own, and a worker holds one connection (two for a moment when it reconnects); 8 leaves room
/// for a launcher or tests running a few workers as one user, while one compromised VM can take
/// at most 8 of the 64 worker slots and keep at most 16 of the broker's fds in flight.
pub const MAX_CONNECTIONS_PER_UID: usize = 8;
/// How long a request may wait behind an unread reply with fds before its worker is dropped
/// (the worker's own request times out after 500 ms).
pub const UNREAD_REPLY_DEADLINE: Duration = Duration::from_secs(2);
/// How often a request waiting behind an unread reply is checked again (the peer's reads wake
/// nothing on our side).
const RECHECK_INTERVAL: Duration = Duration::from_millis(10);
/// How often a dropped worker's socket with unread fds is checked again.
const UNREAD_RECHECK_INTERVAL: Duration = Duration::from_millis(100);
/// Connections accepted per wake-up, so that a connection flood cannot starve the streams.
const ACCEPTS_PER_WAKE: usize = 16;
/// Refused and dropped connections are logged at most this many times per period, then
/// counted: a hostile worker can connect and break the protocol at will.
const CONNECTION_LOG_BURST: u32 = 16;
const CONNECTION_LOG_PERIOD: Duration = Duration::from_secs(10);
/// Messages handled per client per wake-up, so one chatty worker cannot starve the others.
/// What is costly among them (PREPARE: a memfd, a socket pair and a backend open; START and
/// STOP: a backend call) is bounded by the request budget below; the rest are answered with
/// no backend work (a RELEASE frees at most what a PREPARE made).
const MESSAGES_PER_WAKE: usize = 16;
/// PREPARE, START and STOP requests a worker may send in a burst, and per second after it (a
/// token bucket per connection; more are answered `Failed`, which the worker maps to
/// IO_ERR). The Linux driver sends a handful per stream per open (PREPARE, START, STOP; a
/// PREPARE and a START again after an xrun or a resume), and a worker restoring its streams
/// after a broker restart sends a PREPARE and a START per stream: the burst is at least two
/// per stream granted, and 16 a second is a new sound every 0.2 s on every stream of a
/// two-stream VM, more than a guest's sound server asks for.
pub const REQUEST_BURST: u32 = 32;
/// Of the messages handled per wake-up, how many may be PREPARE, START or STOP: a turn of 64
/// workers then costs at most 256 backend calls before the loop waits again.
const COSTLY_PER_WAKE: usize = 4;
pub const REQUEST_RATE_PER_SEC: u32 = 16;
/// Over-budget requests are logged once per this period per worker (then counted).
const BUDGET_LOG_PERIOD: Duration = Duration::from_secs(10);
/// Opens abandoned past [`OPEN_DEADLINE`] whose backend has not returned yet that one uid may
/// have: beyond them its PREPAREs fail at once, so a hanging backend cannot be made to pile up
/// opener threads (each worker has at most one open in flight besides).
pub const MAX_ABANDONED_OPENS_PER_UID: usize = 2;
/// The rings one worker's streams may hold in all (the broker creates them and writes capture
/// rings first, so they are charged to it): the largest legal stream (384 kHz, 8 channels,
/// FLOAT64: 3 lookahead periods of up to 80 ms, about 6 MiB) ten times over; 64 workers then
/// hold at most 4 GiB, under the broker unit's MemoryMax.
pub const MAX_RING_BYTES_PER_WORKER: u64 = 64 << 20;
/// PCM features the broker implements: xrun reports.
const BROKER_PCM_FEATURES: u32 = 1 << virtio_snd::protocol::PCM_F_EVT_XRUNS;

const TOKEN_LISTENER: u64 = 0;
const TOKEN_STOP: u64 = 1;
const TOKEN_TIMER_THREAD: u64 = 2;
const TOKEN_OPENER: u64 = 3;
const TOKEN_HOST_NODES: u64 = 4;
const TOKEN_ADMIN: u64 = 5;
const KIND_CLIENT: u64 = 2 << 56;
const KIND_TIMER: u64 = 3 << 56;
const KIND_MASK: u64 = 0xff << 56;

fn client_token(client: u32) -> u64 {
    KIND_CLIENT | u64::from(client)
}

/// Watches a client's socket for input again, or stops (while one of its requests waits: its
/// level-triggered input would wake the loop for nothing).
fn watch_input(epoll: &Epoll, channel: &Channel, id: u32, watched: bool) -> nix::Result<()> {
    let flags = if watched {
        EpollFlags::EPOLLIN
    } else {
        EpollFlags::empty()
    };
    epoll.modify(channel, &mut EpollEvent::new(flags, client_token(id)))
}

fn timer_token(client: u32, stream: u32) -> u64 {
    KIND_TIMER | (u64::from(client) << 16) | u64::from(stream)
}

/// Why a client is dropped.
#[derive(Debug, thiserror::Error)]
enum Violation {
    /// Its Hello was answered `Refused` with this reason.
    #[error("refused: {0}")]
    Refused(String),
    #[error("{0}")]
    Ipc(#[from] IpcError),
    #[error("ring: {0}")]
    Ring(#[from] RingError),
    #[error("protocol: {0}")]
    Protocol(String),
}

struct BrokerStream {
    /// Its ring's size, counted against its worker's [`MAX_RING_BYTES_PER_WORKER`].
    ring_bytes: u64,
    /// `None` while the timer thread runs it (in `timer_slot`).
    stream: Option<Box<dyn BackendStream>>,
    timer_slot: Option<usize>,
    running: bool,
    xruns: u64,
    /// The ring's positions when the last xrun was reported: still the same at STOP, the
    /// stream ran dry (or full) at the end of what the guest gave and stayed so until it
    /// stopped. That is how every playback ends (a drain) and is not counted; a guest that
    /// underran and then stopped looks the same, and goes uncounted too.
    xrun_positions: Option<(u64, u64)>,
    /// Its volume and mute, read by whichever thread moves its frames.
    gain: Arc<GainCell>,
    params: PcmParams,
    /// Its ring, for the host command's statistics (what is queued).
    stats: SharedRing,
}

impl BrokerStream {
    /// What is queued between the guest and the host's device, in microseconds: the ring's
    /// frames and the backend's delay.
    fn latency_us(&self) -> Option<u64> {
        let ring = &self.stats;
        let frame = u64::from(self.params.frame_bytes().max(1));
        let frames = (ring.fill() / frame).saturating_add(ring.backend_delay());
        Some(frames.saturating_mul(1_000_000) / u64::from(self.params.rate_hz().max(1)))
    }
}

/// Who a timer thread slot belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotOwner {
    Free,
    /// A playing stream; `key` tells its xrun reports from a former occupant's.
    Stream {
        client: u32,
        stream: u32,
        key: u64,
    },
    /// Its worker was dropped: the stream is dropped when the thread gives it back.
    Orphan,
}

/// A token bucket: `burst` requests at once, `rate` per second after that.
#[derive(Debug)]
struct RequestBudget {
    burst: f64,
    tokens: f64,
    refilled: Instant,
}

impl RequestBudget {
    fn new(burst: u32) -> RequestBudget {
        RequestBudget {
            burst: f64::from(burst),
            tokens: f64::from(burst),
            refilled: Instant::now(),
        }
    }

    /// When the next request will fit.
    fn next_token(&self) -> Instant {
        let missing = (1.0 - self.tokens).max(0.0);
        self.refilled + Duration::from_secs_f64(missing / f64::from(REQUEST_RATE_PER_SEC))
    }

    /// Whether one more request fits now (and takes it).
    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(REQUEST_RATE_PER_SEC)).min(self.burst);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A request that waits for its stream to come back from the timer thread.
struct Parked {
    stream_id: u32,
    caps: PcmCaps,
    msg: WorkerMsg,
}

/// A PREPARE whose backend open runs on an opener thread. The worker's socket is not watched
/// meanwhile, so that replies keep the requests' order; the reply goes out when the open is
/// done or at its deadline, whichever comes first.
struct Opening {
    ticket: u64,
    pending: Pending,
    stream_id: u32,
    params: PcmParams,
    capacity: u64,
    /// The fds the Prepared reply carries.
    ring_fd: OwnedFd,
    worker_notify: OwnedFd,
    backend_name: &'static str,
    deadline: Instant,
    gain: Arc<GainCell>,
    stats: SharedRing,
}

/// What the broker serves one VM: its layout's streams and their backends, by stream id.
struct VmLayout {
    streams: Vec<StreamConfig>,
    backends: Backends,
}

/// Who may claim a VM's name, from its `[vms.NAME]` table (`uid` or `user`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pin {
    Uid(u32),
    /// A `user` that did not exist when the broker started: nobody but root may claim it.
    Unknown(String),
}

/// The pins of the config's VM tables, users resolved now: call it before the sandbox (which
/// hides the user database). An unknown user is logged and pins its VM to nobody, so that a
/// typo locks that one VM out rather than every VM (or nobody).
pub fn resolve_pins(config: &Config) -> HashMap<String, Pin> {
    let mut pins = HashMap::new();
    for (name, vm) in &config.vms {
        let pin = match (vm.uid, &vm.user) {
            (Some(uid), _) => Pin::Uid(uid),
            (None, Some(user)) => match nix::unistd::User::from_name(user) {
                Ok(Some(found)) => Pin::Uid(found.uid.as_raw()),
                Ok(None) | Err(_) => {
                    log::error!(
                        "broker: vms.{name} is pinned to user {user:?}, which does not exist: \
                         no worker but root's may claim {name}"
                    );
                    Pin::Unknown(user.clone())
                }
            },
            (None, None) => continue,
        };
        pins.insert(name.clone(), pin);
    }
    pins
}

/// Directions as in a refusal's reason.
fn directions(directions: impl Iterator<Item = u8>) -> String {
    directions
        .map(|d| match d {
            D_OUTPUT => "output".to_string(),
            virtio_snd::protocol::D_INPUT => "input".to_string(),
            other => format!("direction {other}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

struct Client {
    channel: Channel,
    /// Who connected (SO_PEERCRED), for the per-uid limit and the VM name's binding.
    uid: u32,
    accepted: Instant,
    /// Set by Hello: the VM's name (held by this connection while it lives) and its layout.
    vm: Option<VmName>,
    layout: Option<Arc<VmLayout>>,
    /// Set by Hello: what each of its streams may use.
    caps: Option<Vec<PcmCaps>>,
    /// Each stream's volume and mute (set by Hello to unity), prepared or not: a stream
    /// opened later starts with it.
    gains: Vec<Gain>,
    /// Whether each stream's host end is there, as last told to the worker.
    presence: Vec<bool>,
    streams: HashMap<u32, BrokerStream>,
    /// A reply with fds went out and may still be unread: its fds count against the broker's
    /// RLIMIT_NOFILE until the peer reads them, so no request is served until it has.
    fds_maybe_unread: bool,
    /// Since when a request waits for that (the socket is then not watched for input).
    stalled_since: Option<Instant>,
    /// PREPARE, START and STOP requests it may still send (set by Hello).
    budget: RequestBudget,
    /// Its failed requests' log lines (a worker can fail requests at will).
    failure_log: LogLimiter,
    /// A request waiting for its playing stream to come back from the timer thread; the
    /// socket is not watched meanwhile, so that replies keep the requests' order.
    parked: Option<Parked>,
    /// A request over the request rate, served when its token comes (`throttled_until`).
    deferred: Option<Parked>,
    /// A PREPARE waiting for its backend open.
    opening: Option<Opening>,
    /// Over its request budget: its socket is not read until then (a storm of requests costs
    /// one `Failed` per token, not a busy loop answering them).
    throttled_until: Option<Instant>,
    /// PREPARE, START and STOP served in the current wake-up.
    costly_this_wake: usize,
}

/// A dropped client's socket, shut down but kept while the peer has not read the packets on
/// it: shutdown and close do not free them (only the peer's read or close does), and the fds in
/// them count against the broker. Kept, it still counts against the peer's uid.
struct Unread {
    channel: Channel,
    uid: u32,
}

pub struct Broker {
    config: Config,
    /// The default layout, for VMs without a table of their own.
    default_layout: Arc<VmLayout>,
    /// The layouts of VMs with streams or channel maps of their own.
    vm_layouts: HashMap<String, Arc<VmLayout>>,
    pins: HashMap<String, Pin>,
    /// Which connection holds each VM's name.
    names: HashMap<VmName, u32>,
    opener: Opener,
    next_ticket: u64,
    /// Abandoned opens still running, by ticket: the uid they count against.
    abandoned: HashMap<u64, u32>,
    listener: Listener,
    epoll: Epoll,
    clients: HashMap<u32, Client>,
    next_client_id: u32,
    unread: Vec<Unread>,
    /// When `housekeeping` has something to do: a Hello deadline or a recheck.
    next_due: Option<Instant>,
    refusals: u64,
    /// Lines about refused and dropped connections.
    connection_log: LogLimiter,
    timer: TimerThread,
    /// PipeWire's nodes (when a stream uses PipeWire): their changes are host presence news.
    host_nodes: Option<Arc<HostNodes>>,
    /// The host command's control socket, when served.
    admin: Option<AdminServer>,
    timer_slots: Vec<SlotOwner>,
    free_slots: Vec<usize>,
    next_timer_key: u64,
}

impl Broker {
    /// A broker serving `config`'s layouts; `pins` from [`resolve_pins`].
    pub fn new(
        config: Config,
        pins: HashMap<String, Pin>,
        listener: Listener,
    ) -> io::Result<Broker> {
        let built = backends::build(&config).map_err(io::Error::other)?;
        let default_layout = Arc::new(VmLayout {
            streams: config.streams.clone(),
            backends: built.default,
        });
        let mut vm_layouts = HashMap::new();
        for (name, backends) in built.vms {
            let streams = config
                .vms
                .get(&name)
                .and_then(|v| v.streams.clone())
                .unwrap_or_else(|| config.streams.clone());
            vm_layouts.insert(name, Arc::new(VmLayout { streams, backends }));
        }
        listener.set_nonblocking()?;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(
            &listener,
            EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_LISTENER),
        )?;
        let opener = Opener::new()?;
        epoll.add(
            opener.ready_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_OPENER),
        )?;
        let timer = TimerThread::start()?;
        epoll.add(
            timer.news_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_TIMER_THREAD),
        )?;
        if let Some(nodes) = &built.host_nodes {
            epoll.add(
                nodes.changed_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_HOST_NODES),
            )?;
        }
        Ok(Broker {
            config,
            default_layout,
            vm_layouts,
            pins,
            names: HashMap::new(),
            opener,
            next_ticket: 0,
            abandoned: HashMap::new(),
            listener,
            epoll,
            clients: HashMap::new(),
            next_client_id: 1,
            unread: Vec::new(),
            next_due: None,
            refusals: 0,
            connection_log: LogLimiter::named(
                "worker-triggered",
                CONNECTION_LOG_BURST,
                CONNECTION_LOG_PERIOD,
            ),
            timer,
            host_nodes: built.host_nodes,
            admin: None,
            timer_slots: vec![SlotOwner::Free; TIMER_SLOTS],
            free_slots: (0..TIMER_SLOTS).rev().collect(),
            next_timer_key: 0,
        })
    }

    /// Connections past Hello.
    fn worker_count(&self) -> usize {
        self.clients.values().filter(|c| c.caps.is_some()).count()
    }

    /// Serves until `stop` becomes readable (or forever without one).
    pub fn run(&mut self, stop: Option<BorrowedFd<'_>>) -> io::Result<()> {
        if let Some(stop) = stop {
            self.epoll
                .add(stop, EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_STOP))?;
        }
        let mut events = vec![EpollEvent::empty(); 64];
        loop {
            let n = match self.epoll.wait(&mut events, self.wait_timeout()) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            for event in &events[..n] {
                let token = event.data();
                match token & KIND_MASK {
                    _ if token == TOKEN_STOP => {
                        log::info!("broker: stopping");
                        return Ok(());
                    }
                    _ if token == TOKEN_LISTENER => self.accept_clients(),
                    _ if token == TOKEN_TIMER_THREAD => self.timer_news(),
                    _ if token == TOKEN_OPENER => self.opener_news(),
                    _ if token == TOKEN_HOST_NODES => self.host_nodes_changed(),
                    _ if token == TOKEN_ADMIN => self.admin_news(),
                    KIND_CLIENT => {
                        let id = (token & 0xffff_ffff) as u32;
                        let stalled = self.clients.get(&id).is_some_and(|c| {
                            c.stalled_since.is_some()
                                || c.parked.is_some()
                                || c.opening.is_some()
                                || c.throttled_until.is_some()
                        });
                        if stalled && event.events().contains(EpollFlags::EPOLLHUP) {
                            // It can send nothing more, and would wake us until dropped.
                            self.drop_client(id, &"hung up without reading its replies");
                        } else {
                            self.serve_client(id);
                        }
                    }
                    KIND_TIMER => {
                        let client = ((token >> 16) & 0xffff_ffff) as u32;
                        let stream = (token & 0xffff) as u32;
                        self.tick(client, stream);
                    }
                    _ => log::error!("broker: unknown epoll token {token:#x}"),
                }
            }
            if self.next_due.is_some_and(|due| Instant::now() >= due) {
                self.housekeeping();
            }
        }
    }

    /// Until the next Hello deadline or recheck (rounded up: waking early would spin).
    fn wait_timeout(&self) -> EpollTimeout {
        let Some(due) = self.next_due else {
            return EpollTimeout::NONE;
        };
        let left = due.saturating_duration_since(Instant::now());
        let ms = left.as_micros().div_ceil(1000);
        EpollTimeout::try_from(ms).unwrap_or(EpollTimeout::MAX)
    }

    fn due_at(&mut self, when: Instant) {
        self.next_due = Some(self.next_due.map_or(when, |due| due.min(when)));
    }

    /// Hello deadlines, requests waiting behind unread fds, dropped workers' unread fds.
    fn housekeeping(&mut self) {
        let now = Instant::now();
        self.connection_log.report_if_due(now);
        self.next_due = None;
        let late: Vec<u32> = self
            .clients
            .iter()
            .filter(|(_, c)| c.caps.is_none() && now >= c.accepted + HELLO_DEADLINE)
            .map(|(&id, _)| id)
            .collect();
        for id in late {
            self.drop_idle(id, "no Hello within the deadline");
        }
        let stalled: Vec<(u32, Instant)> = self
            .clients
            .iter()
            .filter_map(|(&id, c)| c.stalled_since.map(|since| (id, since)))
            .collect();
        for (id, since) in stalled {
            if now >= since + UNREAD_REPLY_DEADLINE {
                self.drop_client(id, &"did not read its replies");
            } else {
                // Serves it if the peer has read them by now, else schedules the next check.
                self.serve_client(id);
            }
        }
        let late_opens: Vec<u32> = self
            .clients
            .iter()
            .filter(|(_, c)| c.opening.as_ref().is_some_and(|o| now >= o.deadline))
            .map(|(&id, _)| id)
            .collect();
        for id in late_opens {
            self.abandon_open(id);
        }
        let open_deadline = self
            .clients
            .values()
            .filter_map(|c| c.opening.as_ref().map(|o| o.deadline))
            .min();
        if let Some(deadline) = open_deadline {
            self.due_at(deadline);
        }
        let throttled: Vec<(u32, Instant)> = self
            .clients
            .iter()
            .filter_map(|(&id, c)| c.throttled_until.map(|until| (id, until)))
            .collect();
        for (id, until) in throttled {
            if now < until {
                self.due_at(until);
                continue;
            }
            let Some(client) = self.clients.get_mut(&id) else {
                continue;
            };
            client.throttled_until = None;
            if let Some(deferred) = client.deferred.take() {
                if !client.budget.take(now) {
                    // Not quite refilled yet (rounding): a little later.
                    client.deferred = Some(deferred);
                    let until = client.budget.next_token();
                    client.throttled_until = Some(until);
                    self.due_at(until);
                    continue;
                }
                let Parked {
                    stream_id,
                    caps,
                    msg,
                } = deferred;
                if let Err(e) = self.serve_request(id, stream_id, caps, msg) {
                    self.drop_client(id, &e);
                    continue;
                }
            }
            // Unless the request now waits for the timer thread or a backend open.
            if self
                .clients
                .get(&id)
                .is_some_and(|c| c.parked.is_none() && c.opening.is_none())
            {
                self.resume(id);
            }
        }
        // Closing the ones whose peer read (or closed) frees them for good.
        self.unread
            .retain(|u| u.channel.unread_by_peer().is_ok_and(|bytes| bytes > 0));
        if !self.unread.is_empty() {
            self.due_at(now + UNREAD_RECHECK_INTERVAL);
        }
        let pending_deadline = self
            .clients
            .values()
            .filter(|c| c.caps.is_none())
            .map(|c| c.accepted + HELLO_DEADLINE)
            .min();
        if let Some(deadline) = pending_deadline {
            self.due_at(deadline);
        }
    }

    fn accept_clients(&mut self) {
        // The rest stay in the backlog: the listener is still readable at the next wait.
        for _ in 0..ACCEPTS_PER_WAKE {
            match self.listener.accept() {
                Ok(channel) => {
                    if let Err(e) = self.register_client(channel) {
                        self.log_refusal(&e);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("broker: accept failed: {e}");
                    return;
                }
            }
        }
    }

    fn log_refusal(&mut self, why: &io::Error) {
        self.refusals += 1;
        if self.connection_log.admit(Instant::now()) {
            log::warn!(
                "broker: refused a connection: {why} ({} refused so far)",
                self.refusals
            );
        }
    }

    /// Connections `uid` holds, dropped ones with unread fds included.
    fn connections_of(&self, uid: u32) -> usize {
        self.clients.values().filter(|c| c.uid == uid).count()
            + self.unread.iter().filter(|u| u.uid == uid).count()
    }

    fn register_client(&mut self, channel: Channel) -> io::Result<()> {
        let uid = channel.peer_uid()?;
        if self.connections_of(uid) >= MAX_CONNECTIONS_PER_UID {
            let reason = format!("too many connections from uid {uid}");
            let _ = channel.send(
                &BrokerMsg::Refused {
                    reason: reason.clone(),
                },
                &[],
            );
            discard_input(&channel);
            return Err(io::Error::other(reason));
        }
        let oldest_pending = self
            .clients
            .iter()
            .filter(|(_, c)| c.caps.is_none())
            .min_by_key(|(_, c)| c.accepted)
            .map(|(&id, _)| id);
        if self.clients.len() - self.worker_count() >= MAX_PENDING {
            if let Some(oldest) = oldest_pending {
                self.drop_idle(oldest, "too many connections before Hello: oldest dropped");
            }
        }
        let mut id = self.next_client_id;
        while self.clients.contains_key(&id) {
            id = id.wrapping_add(1).max(1);
        }
        self.next_client_id = id.wrapping_add(1).max(1);
        self.epoll.add(
            &channel,
            EpollEvent::new(EpollFlags::EPOLLIN, client_token(id)),
        )?;
        log::debug!("broker: connection {id} from uid {uid}");
        let accepted = Instant::now();
        self.clients.insert(
            id,
            Client {
                channel,
                uid,
                accepted,
                vm: None,
                layout: None,
                caps: None,
                gains: Vec::new(),
                presence: Vec::new(),
                streams: HashMap::new(),
                fds_maybe_unread: false,
                stalled_since: None,
                budget: RequestBudget::new(REQUEST_BURST),
                failure_log: LogLimiter::new(1, BUDGET_LOG_PERIOD),
                parked: None,
                deferred: None,
                opening: None,
                throttled_until: None,
                costly_this_wake: 0,
            },
        );
        self.due_at(accepted + HELLO_DEADLINE);
        // A worker's Hello is usually queued already: take it now, before newer connections
        // could push this one out of the pre-Hello slots.
        self.serve_client(id);
        Ok(())
    }

    fn drop_client(&mut self, id: u32, why: &dyn std::fmt::Display) {
        self.drop_connection(id, why, log::Level::Warn);
    }

    /// Drops a connection that never said Hello because of a limit (a flood of them must not
    /// fill the log).
    fn drop_idle(&mut self, id: u32, why: &str) {
        self.drop_connection(id, &why, log::Level::Info);
    }

    fn drop_connection(&mut self, id: u32, why: &dyn std::fmt::Display, level: log::Level) {
        let Some(client) = self.clients.remove(&id) else {
            return;
        };
        if log::log_enabled!(level) && self.connection_log.admit(Instant::now()) {
            let who = match client.vm {
                Some(vm) => format!("vm {vm} (connection {id}, uid {})", client.uid),
                None => format!("connection {id} (uid {})", client.uid),
            };
            log::log!(level, "broker: dropping {who}: {why}");
        }
        if let Some(vm) = client.vm {
            if self.names.get(&vm) == Some(&id) {
                self.names.remove(&vm);
            }
        }
        if let Some(opening) = &client.opening {
            opening.pending.abandon();
            self.abandoned.insert(opening.ticket, client.uid);
        }
        for stream in client.streams.values() {
            if let Some(slot) = stream.timer_slot {
                // Dropped when the thread gives it back.
                self.timer_slots[slot] = SlotOwner::Orphan;
                self.recall(slot);
            } else if let Some(backend_stream) = &stream.stream {
                if !backend_stream.timer_driven() {
                    let _ = self.epoll.delete(backend_stream.wake_fd());
                }
            }
        }
        let _ = self.epoll.delete(&client.channel);
        discard_input(&client.channel);
        // The peer sees the hang-up at once, whatever else holds its end.
        let _ = client.channel.shutdown();
        if client.fds_maybe_unread && client.channel.unread_by_peer().is_ok_and(|n| n > 0) {
            self.unread.push(Unread {
                channel: client.channel,
                uid: client.uid,
            });
            self.due_at(Instant::now() + UNREAD_RECHECK_INTERVAL);
        }
    }

    fn serve_client(&mut self, id: u32) {
        if let Some(client) = self.clients.get_mut(&id) {
            client.costly_this_wake = 0;
        }
        for _ in 0..MESSAGES_PER_WAKE {
            let Some(client) = self.clients.get_mut(&id) else {
                return;
            };
            // The rest waits for the next wake-up (input is level-triggered).
            if client.parked.is_some()
                || client.opening.is_some()
                || client.throttled_until.is_some()
                || client.costly_this_wake >= COSTLY_PER_WAKE
            {
                return;
            }
            if client.fds_maybe_unread {
                match client.channel.unread_by_peer() {
                    Ok(0) => {
                        client.fds_maybe_unread = false;
                        if client.stalled_since.take().is_some() {
                            if let Err(e) = watch_input(&self.epoll, &client.channel, id, true) {
                                self.drop_client(id, &format!("epoll: {e}"));
                                return;
                            }
                        }
                    }
                    Ok(_) => {
                        if client.stalled_since.is_none() {
                            // Level-triggered input would wake us for nothing until then.
                            if let Err(e) = watch_input(&self.epoll, &client.channel, id, false) {
                                self.drop_client(id, &format!("epoll: {e}"));
                                return;
                            }
                            client.stalled_since = Some(Instant::now());
                        }
                        self.due_at(Instant::now() + RECHECK_INTERVAL);
                        return;
                    }
                    Err(e) => {
                        self.drop_client(id, &format!("SIOCOUTQ: {e}"));
                        return;
                    }
                }
            }
            let received = client.channel.recv::<WorkerMsg>();
            let (msg, fds) = match received {
                Ok(m) => m,
                Err(IpcError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => return,
                // A worker ends when its VM does: a normal end, not a fault.
                Err(IpcError::Closed) => {
                    self.drop_connection(id, &"disconnected", log::Level::Info);
                    return;
                }
                Err(e) => {
                    self.drop_client(id, &e);
                    return;
                }
            };
            if !fds.is_empty() {
                self.drop_client(id, &"workers never send fds");
                return;
            }
            if let Err(e) = self.handle_message(id, msg) {
                self.drop_client(id, &e);
                return;
            }
        }
    }

    fn handle_message(&mut self, id: u32, msg: WorkerMsg) -> Result<(), Violation> {
        let hello_done = self.clients.get(&id).and_then(|c| c.caps.clone());
        let Some(caps) = hello_done else {
            let WorkerMsg::Hello {
                version,
                vm,
                streams,
            } = msg
            else {
                return Err(Violation::Protocol("first message must be Hello".into()));
            };
            return self.hello(id, version, &vm, streams);
        };
        if let WorkerMsg::SetGain { stream_id, gain } = msg {
            // Cheap (an atomic store, or one coalesced command to the PipeWire thread) and
            // never waits for a stream on the timer thread: not a costly request.
            return self.set_gain_from_worker(id, stream_id, gain);
        }
        let stream_id = match &msg {
            WorkerMsg::Hello { .. } => return Err(Violation::Protocol("second Hello".into())),
            WorkerMsg::SetGain { .. } => unreachable!("handled above"),
            WorkerMsg::Prepare { stream_id, .. }
            | WorkerMsg::Start { stream_id }
            | WorkerMsg::Stop { stream_id }
            | WorkerMsg::Release { stream_id } => *stream_id,
        };
        let Some(stream_caps) = caps.get(stream_id as usize).copied() else {
            return Err(Violation::Protocol(format!(
                "stream id {stream_id} out of range"
            )));
        };
        let now = Instant::now();
        let costly = !matches!(msg, WorkerMsg::Release { .. });
        let client = self
            .clients
            .get_mut(&id)
            .ok_or_else(|| Violation::Protocol("no such client".into()))?;
        if costly {
            client.costly_this_wake += 1;
        }
        if costly && !client.budget.take(now) {
            if client.failure_log.admit(now) {
                log::warn!(
                    "broker: {} is over its request rate ({REQUEST_BURST} at once, \
                     {REQUEST_RATE_PER_SEC}/s): its requests wait for their turn",
                    client
                        .vm
                        .map_or_else(|| format!("connection {id}"), |vm| vm.to_string())
                );
            }
            // Served when its token comes (at most 1/rate from now, well inside the worker's
            // patience), and nothing more is read from it until then: a storm costs the
            // stormer time, not the broker work, and a guest's burst of xrun recoveries slows
            // down instead of failing.
            let until = client.budget.next_token();
            client.deferred = Some(Parked {
                stream_id,
                caps: stream_caps,
                msg,
            });
            client.throttled_until = Some(until);
            watch_input(&self.epoll, &client.channel, id, false)
                .map_err(|e| Violation::Protocol(format!("epoll: {e}")))?;
            self.due_at(until);
            return Ok(());
        }
        self.serve_request(id, stream_id, stream_caps, msg)
    }

    /// Carries out a request within the worker's budget: at once, or once its stream is back
    /// from the timer thread.
    fn serve_request(
        &mut self,
        id: u32,
        stream_id: u32,
        stream_caps: PcmCaps,
        msg: WorkerMsg,
    ) -> Result<(), Violation> {
        let client = self
            .clients
            .get_mut(&id)
            .ok_or_else(|| Violation::Protocol("no such client".into()))?;
        // A playing timer-driven stream is on the timer thread: it must come back first, and
        // the worker's later requests wait behind this one.
        let on_timer_thread = client
            .streams
            .get(&stream_id)
            .and_then(|s| s.timer_slot)
            .filter(|_| !matches!(msg, WorkerMsg::Start { .. }));
        if let Some(slot) = on_timer_thread {
            client.parked = Some(Parked {
                stream_id,
                caps: stream_caps,
                msg,
            });
            watch_input(&self.epoll, &client.channel, id, false)
                .map_err(|e| Violation::Protocol(format!("epoll: {e}")))?;
            if !self.recall(slot) {
                return Err(Violation::Protocol("the timer thread is gone".into()));
            }
            return Ok(());
        }
        self.dispatch(id, stream_id, stream_caps, msg)
    }

    /// Carries out a checked request on a stream that is not on the timer thread, and answers.
    fn dispatch(
        &mut self,
        id: u32,
        stream_id: u32,
        stream_caps: PcmCaps,
        msg: WorkerMsg,
    ) -> Result<(), Violation> {
        let reply = match msg {
            WorkerMsg::Prepare { params, .. } => {
                match self.prepare(id, stream_id, stream_caps, params) {
                    // Answered when the open is done (`finish_open`).
                    Ok(()) => return Ok(()),
                    Err(reason) => Err(reason),
                }
            }
            WorkerMsg::Start { .. } => self.start(id, stream_id),
            WorkerMsg::Stop { .. } => self.stop(id, stream_id),
            _ => self.release(id, stream_id),
        };
        self.answer(id, stream_id, reply)
    }

    /// Answers a request Done or Failed (logging the failure, rate-limited per worker).
    fn answer(
        &mut self,
        id: u32,
        stream_id: u32,
        reply: Result<(), String>,
    ) -> Result<(), Violation> {
        let reply = match reply {
            Ok(()) => BrokerMsg::Done { stream_id },
            Err(reason) => {
                let now = Instant::now();
                let who = self.who(id);
                if let Some(client) = self.clients.get_mut(&id) {
                    if client.failure_log.admit(now) {
                        log::warn!("broker: {who} stream {stream_id}: {reason}");
                    }
                }
                BrokerMsg::Failed {
                    stream_id,
                    reason: ipc::reason(reason),
                }
            }
        };
        if let Some(client) = self.clients.get(&id) {
            client.channel.send(&reply, &[])?;
        }
        Ok(())
    }

    /// Answers a Hello `Refused` with `reason`; the connection is then dropped (and the reason
    /// logged, rate-limited, with it).
    fn refuse(&self, id: u32, reason: String) -> Result<(), Violation> {
        if let Some(client) = self.clients.get(&id) {
            let _ = client.channel.send(
                &BrokerMsg::Refused {
                    reason: ipc::reason(reason.clone()),
                },
                &[],
            );
        }
        Err(Violation::Refused(reason))
    }

    /// A worker's Hello: its version, its VM's name (which this connection's uid must be
    /// allowed to claim, see SECURITY.md) and its streams (which must be the broker's layout for
    /// that VM). Every check comes before anything changes, so a refused Hello takes nothing
    /// from the name's live holder.
    fn hello(
        &mut self,
        id: u32,
        version: u32,
        vm: &str,
        streams: Vec<PcmCaps>,
    ) -> Result<(), Violation> {
        if version != ipc::PROTOCOL_VERSION {
            return self.refuse(id, format!("protocol version {version} not supported"));
        }
        let vm = match VmName::new(vm) {
            Ok(vm) => vm,
            Err(e) => return self.refuse(id, e.to_string()),
        };
        let uid = self
            .clients
            .get(&id)
            .ok_or_else(|| Violation::Protocol("no such client".into()))?
            .uid;
        // Root may claim any name: a worker started as root connects as root before it
        // becomes its --user, and root needs no name to reach the audio anyway.
        let privileged = uid == 0;
        match self.pins.get(vm.as_str()) {
            Some(Pin::Uid(pinned)) if *pinned != uid && !privileged => {
                return self.refuse(
                    id,
                    format!("vm {vm} is pinned to uid {pinned} by the broker's config, not {uid}"),
                );
            }
            Some(Pin::Unknown(user)) if !privileged => {
                return self.refuse(
                    id,
                    format!("vm {vm} is pinned to user {user:?}, which does not exist"),
                );
            }
            _ => {}
        }
        // The name's holder, if it is still connected.
        let holder = self.names.get(&vm).copied().filter(|&held| held != id);
        let holder = match holder.and_then(|held| self.clients.get(&held).map(|c| (held, c))) {
            Some((held, c)) if c.channel.peer_hung_up() => {
                // Gone, only not noticed yet.
                self.drop_client(held, &"hung up");
                None
            }
            Some((held, c)) => Some((held, c.uid)),
            None => None,
        };
        let replaced = match holder {
            Some((held, holder_uid)) if holder_uid != uid && !privileged => {
                // Not the holder's uid in the reason: it is another VM's.
                log::debug!("broker: vm {vm} is held by connection {held} of uid {holder_uid}");
                return self.refuse(
                    id,
                    format!("vm {vm} is held by a live connection of another uid"),
                );
            }
            Some((held, _)) => Some(held),
            None => None,
        };
        // The cap counts workers only: connections before Hello have their own bound.
        if self.worker_count() - usize::from(replaced.is_some()) >= MAX_CLIENTS {
            return self.refuse(id, "too many workers".into());
        }
        if streams.len() > vsound_config::MAX_STREAMS {
            return Err(Violation::Protocol("too many streams".into()));
        }
        let layout = self
            .vm_layouts
            .get(vm.as_str())
            .unwrap_or(&self.default_layout)
            .clone();
        let theirs = streams.iter().map(|c| c.direction);
        let ours = layout.streams.iter().map(|s| s.direction.wire());
        if !theirs.clone().eq(ours.clone()) {
            return self.refuse(
                id,
                format!(
                    "vm {vm}: the worker's layout has {} streams ({}), the broker's for it {} \
                     ({}): do both read the same config?",
                    streams.len(),
                    directions(theirs),
                    layout.streams.len(),
                    directions(ours)
                ),
            );
        }
        if let Some(old) = replaced {
            // A restarted worker of the same uid whose predecessor's connection lingers: the
            // newer one is the VM's. The old one is told why, so it does not take it back.
            let reason = format!("vm {vm} was taken over by a newer connection of the same uid");
            if let Some(c) = self.clients.get(&old) {
                let _ = c.channel.send(
                    &BrokerMsg::Refused {
                        reason: ipc::reason(reason.clone()),
                    },
                    &[],
                );
            }
            self.drop_client(old, &reason);
        }
        let granted = grant_caps(&layout, &streams);
        let client = self
            .clients
            .get_mut(&id)
            .ok_or_else(|| Violation::Protocol("no such client".into()))?;
        // At least a PREPARE and a START for every stream it may use (a worker restoring
        // its streams after a broker restart).
        let usable = granted.iter().filter(|c| c.formats != 0 && c.rates != 0);
        client.budget = RequestBudget::new(REQUEST_BURST.max(2 * usable.count() as u32));
        client.gains = vec![Gain::UNITY; granted.len()];
        client.presence = vec![true; granted.len()];
        client.caps = Some(granted.clone());
        client.vm = Some(vm);
        client.layout = Some(layout);
        client.channel.send(
            &BrokerMsg::Welcome {
                version: ipc::PROTOCOL_VERSION,
                client_id: id,
                caps: granted,
            },
            &[],
        )?;
        self.names.insert(vm, id);
        self.report_presence(id);
        // A worker can connect at will: counted with the refused and dropped ones.
        if self.connection_log.admit(Instant::now()) {
            log::info!("broker: vm {vm} connected (connection {id}, uid {uid})");
        }
        Ok(())
    }

    /// A label for a client's log lines: its VM's name once it said Hello.
    fn who(&self, id: u32) -> String {
        match self.clients.get(&id).and_then(|c| c.vm) {
            Some(vm) => vm.to_string(),
            None => format!("connection {id}"),
        }
    }

    fn layout_of(&self, id: u32) -> Result<Arc<VmLayout>, String> {
        self.clients
            .get(&id)
            .and_then(|c| c.layout.clone())
            .ok_or_else(|| "no Hello yet".to_string())
    }
}

/// What each requested stream may use: the request ∩ the VM's layout ∩ the backend.
fn grant_caps(layout: &VmLayout, requested: &[PcmCaps]) -> Vec<PcmCaps> {
    requested
        .iter()
        .enumerate()
        .map(|(i, want)| {
            let (Some(cfg), Some(backend)) = (layout.streams.get(i), layout.backends.get(i)) else {
                return PcmCaps {
                    formats: 0,
                    rates: 0,
                    ..*want
                };
            };
            let offered = PcmCaps {
                direction: cfg.direction.wire(),
                hda_fn_nid: want.hda_fn_nid,
                features: want.features & BROKER_PCM_FEATURES,
                formats: cfg.format_mask() & want.formats,
                rates: cfg.rate_mask() & want.rates,
                channels_min: cfg.channels_min.max(want.channels_min),
                channels_max: cfg.channels_max.min(want.channels_max),
            };
            if offered.direction != want.direction || offered.channels_min > offered.channels_max {
                return PcmCaps {
                    formats: 0,
                    rates: 0,
                    ..*want
                };
            }
            backend.caps(&offered)
        })
        .collect()
}

impl Broker {
    fn prepare(
        &mut self,
        id: u32,
        stream_id: u32,
        caps: PcmCaps,
        params: PcmParams,
    ) -> Result<(), String> {
        params
            .validate(&caps, self.config.limits.max_buffer_bytes)
            .map_err(|s| format!("invalid params ({s:?})"))?;
        // Re-preparing replaces the old transport.
        self.free_stream(id, stream_id);
        let layout = self.layout_of(id)?;
        let vm = self
            .clients
            .get(&id)
            .and_then(|c| c.vm)
            .ok_or("no Hello yet")?;
        let backend = layout
            .backends
            .get(stream_id as usize)
            .ok_or("no such stream")?;
        let capacity = (u64::from(params.period_bytes)
            * u64::from(self.config.limits.lookahead_periods.max(2)))
        .max(backend.ring_bytes(&params));
        let held: u64 = self
            .clients
            .get(&id)
            .map_or(0, |c| c.streams.values().map(|s| s.ring_bytes).sum());
        if held + capacity > MAX_RING_BYTES_PER_WORKER {
            return Err(format!(
                "a ring of {capacity} bytes would take this worker's rings past {} MiB",
                MAX_RING_BYTES_PER_WORKER >> 20
            ));
        }
        let (ring, ring_fd) = SharedRing::create(capacity).map_err(|e| e.to_string())?;
        // Not an fd shared with the worker (an eventfd dup's flags and counter would be the
        // worker's to set): each side has its own end.
        let (notify, worker_notify) =
            WakeSender::pair().map_err(|e| format!("wake-up socket: {e}"))?;
        let spec = StreamSpec {
            client_id: id,
            vm,
            direction: caps.direction,
            params,
        };
        let stats = ring.clone();
        let ring = if caps.direction == D_OUTPUT {
            StreamRing::Playback(Consumer::new(ring))
        } else {
            StreamRing::Capture(Producer::new(ring))
        };
        // Checked although Hello granted nothing beyond the backends: a panic here would
        // silence every VM.
        let backend = layout
            .backends
            .get(stream_id as usize)
            .ok_or("no backend for this stream")?
            .clone();
        let client = self.clients.get(&id).ok_or("client vanished")?;
        let uid = client.uid;
        if self.abandoned.values().filter(|&&u| u == uid).count() >= MAX_ABANDONED_OPENS_PER_UID {
            return Err(format!(
                "{MAX_ABANDONED_OPENS_PER_UID} earlier opens of this uid are still hanging in the \
                 backend"
            ));
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let backend_name = backend.name();
        let gain = Arc::new(GainCell::new(
            client
                .gains
                .get(stream_id as usize)
                .copied()
                .unwrap_or(Gain::UNITY),
        ));
        let port = RingPort::new(ring, notify).with_gain(gain.clone());
        let pending = self
            .opener
            .open(ticket, backend, spec, port)
            .map_err(|e| format!("cannot start an open: {e}"))?;
        let deadline = Instant::now() + OPEN_DEADLINE;
        let client = self.clients.get_mut(&id).ok_or("client vanished")?;
        client.opening = Some(Opening {
            ticket,
            pending,
            stream_id,
            params,
            capacity,
            ring_fd,
            worker_notify,
            backend_name,
            deadline,
            gain,
            stats,
        });
        // Nothing more is read from it until the open is answered.
        if let Err(e) = watch_input(&self.epoll, &client.channel, id, false) {
            return Err(format!("epoll: {e}"));
        }
        self.due_at(deadline);
        Ok(())
    }

    /// Opens that came back from their threads.
    fn opener_news(&mut self) {
        for Opened { ticket, outcome } in self.opener.take() {
            if self.abandoned.remove(&ticket).is_some() {
                // Answered Failed at its deadline (or its worker is gone): dropped here.
                continue;
            }
            let owner = self
                .clients
                .iter()
                .find(|(_, c)| c.opening.as_ref().is_some_and(|o| o.ticket == ticket))
                .map(|(&id, _)| id);
            if let Some(id) = owner {
                self.finish_open(id, outcome);
                // An open tells whether an ALSA device is there.
                self.report_presence(id);
            }
        }
    }

    /// PipeWire's nodes changed: every VM is told where its streams' host ends changed.
    fn host_nodes_changed(&mut self) {
        if let Some(nodes) = &self.host_nodes {
            nodes.take_changed();
        }
        let ids: Vec<u32> = self.clients.keys().copied().collect();
        for id in ids {
            self.report_presence(id);
        }
    }

    /// Tells a welcomed worker where its streams' host ends (which its jacks follow) came or
    /// went since it was last told; a worker assumes every end is there until told otherwise,
    /// so right after Welcome it hears only of the absent ones. A message that cannot be sent
    /// now is sent with the next change.
    fn report_presence(&mut self, id: u32) {
        let who = self.who(id);
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        let Some(layout) = client.layout.clone() else {
            return;
        };
        for (stream_id, (cfg, backend)) in layout.streams.iter().zip(&layout.backends).enumerate() {
            let present = backend.host_present(cfg.direction.wire());
            let Some(told) = client.presence.get_mut(stream_id) else {
                continue;
            };
            if *told == present {
                continue;
            }
            let news = BrokerMsg::HostPresence {
                stream_id: stream_id as u32,
                present,
            };
            match client.channel.send(&news, &[]) {
                Ok(()) => *told = present,
                Err(e) => log::debug!("broker: {who}: cannot report host presence: {e}"),
            }
            log::info!(
                "broker: {who} stream {stream_id} ({}): host end {}",
                cfg.name,
                if present { "there" } else { "gone" }
            );
        }
    }

    /// Installs an opened stream and answers its PREPARE, or answers its failure; then serves
    /// the worker's next requests.
    fn finish_open(&mut self, id: u32, outcome: Outcome) {
        let Some(opening) = self.clients.get_mut(&id).and_then(|c| c.opening.take()) else {
            return;
        };
        let stream_id = opening.stream_id;
        let answered = match outcome {
            Outcome::Opened(backend_stream) => self.install(id, opening, backend_stream),
            Outcome::Failed(reason) => self.answer(id, stream_id, Err(reason)),
            Outcome::Abandoned => self.answer(id, stream_id, Err("open abandoned".into())),
        };
        if let Err(e) = answered {
            self.drop_client(id, &e);
            return;
        }
        self.resume(id);
    }

    /// Answers an open that missed its deadline `Failed`; its thread goes on until the backend
    /// returns and counts against the worker's uid until then.
    fn abandon_open(&mut self, id: u32) {
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        let Some(opening) = client.opening.take() else {
            return;
        };
        opening.pending.abandon();
        self.abandoned.insert(opening.ticket, client.uid);
        let reason = format!(
            "the {} backend did not open the stream within {} ms",
            opening.backend_name,
            OPEN_DEADLINE.as_millis()
        );
        if let Err(e) = self.answer(id, opening.stream_id, Err(reason)) {
            self.drop_client(id, &e);
            return;
        }
        self.resume(id);
    }

    /// Watches a worker's socket again after a request it waited for, and serves what queued.
    fn resume(&mut self, id: u32) {
        let Some(client) = self.clients.get(&id) else {
            return;
        };
        if let Err(e) = watch_input(&self.epoll, &client.channel, id, true) {
            self.drop_client(id, &format!("epoll: {e}"));
            return;
        }
        self.serve_client(id);
    }

    /// Takes an opened stream into the worker's table and sends it the ring and wake-up fds.
    fn install(
        &mut self,
        id: u32,
        opening: Opening,
        backend_stream: Box<dyn BackendStream>,
    ) -> Result<(), Violation> {
        let stream_id = opening.stream_id;
        // A timer-driven stream's wake-ups are the timer thread's, once it plays.
        if !backend_stream.timer_driven() {
            if let Err(e) = self.epoll.add(
                backend_stream.wake_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, timer_token(id, stream_id)),
            ) {
                return self.answer(id, stream_id, Err(format!("epoll: {e}")));
            }
        }
        let Some(client) = self.clients.get_mut(&id) else {
            return Ok(());
        };
        client.channel.send(
            &BrokerMsg::Prepared {
                stream_id,
                ring_capacity: opening.capacity,
            },
            &[opening.ring_fd.as_fd(), opening.worker_notify.as_fd()],
        )?;
        client.fds_maybe_unread = true;
        client.streams.insert(
            stream_id,
            BrokerStream {
                ring_bytes: opening.capacity,
                stream: Some(backend_stream),
                timer_slot: None,
                running: false,
                xruns: 0,
                xrun_positions: None,
                gain: opening.gain,
                params: opening.params,
                stats: opening.stats,
            },
        );
        let params = opening.params;
        let who = client
            .vm
            .map_or_else(|| format!("connection {id}"), |vm| vm.to_string());
        log::info!(
            "broker: {who} stream {stream_id} prepared: {} {} Hz {} ch, period {} bytes, {} backend",
            vsound_config::format_name(params.format),
            params.rate_hz(),
            params.channels,
            params.period_bytes,
            opening.backend_name
        );
        Ok(())
    }

    fn stream_mut(&mut self, id: u32, stream_id: u32) -> Result<&mut BrokerStream, String> {
        self.clients
            .get_mut(&id)
            .and_then(|c| c.streams.get_mut(&stream_id))
            .ok_or_else(|| "stream is not prepared".to_string())
    }

    fn start(&mut self, id: u32, stream_id: u32) -> Result<(), String> {
        let stream = self.stream_mut(id, stream_id)?;
        if stream.running {
            return Err("already running".into());
        }
        let backend_stream = stream.stream.as_mut().ok_or("stream is busy")?;
        backend_stream
            .start()
            .map_err(|e| format!("backend start: {e}"))?;
        stream.running = true;
        stream.xrun_positions = None;
        if backend_stream.timer_driven() {
            self.hand_to_timer_thread(id, stream_id)?;
        }
        Ok(())
    }

    /// Moves a started timer-driven stream to the timer thread (stopped again if it cannot go).
    fn hand_to_timer_thread(&mut self, id: u32, stream_id: u32) -> Result<(), String> {
        let key = self.next_timer_key;
        self.next_timer_key += 1;
        let slot = self.free_slots.pop();
        let stream = self.stream_mut(id, stream_id)?;
        let backend_stream = stream.stream.take().ok_or("stream is busy")?;
        let refused = match slot {
            Some(slot) => match self.timer.send(TimerCommand::Adopt {
                slot,
                key,
                stream: backend_stream,
            }) {
                Ok(()) => {
                    self.timer_slots[slot] = SlotOwner::Stream {
                        client: id,
                        stream: stream_id,
                        key,
                    };
                    let stream = self.stream_mut(id, stream_id)?;
                    stream.timer_slot = Some(slot);
                    return Ok(());
                }
                Err(TimerCommand::Adopt { stream, .. }) => {
                    self.free_slots.push(slot);
                    Some(stream)
                }
                Err(TimerCommand::Return { .. }) => None,
            },
            None => Some(backend_stream),
        };
        let stream = self.stream_mut(id, stream_id)?;
        stream.running = false;
        if let Some(mut back) = refused {
            let _ = back.stop();
            stream.stream = Some(back);
        }
        Err("the timer thread has no room".into())
    }

    /// Asks the timer thread for a stream back; false if it cannot be asked.
    fn recall(&mut self, slot: usize) -> bool {
        match self.timer.send(TimerCommand::Return { slot }) {
            Ok(()) => true,
            Err(_) => {
                log::error!("broker: the timer thread takes no commands");
                false
            }
        }
    }

    /// Xrun reports and streams given back by the timer thread.
    fn timer_news(&mut self) {
        self.timer.take_news();
        // Xruns first: a slot's xrun is queued before its stream is given back.
        while let Some((slot, key)) = self.timer.next_xrun() {
            if let Some(SlotOwner::Stream {
                client,
                stream,
                key: owner_key,
            }) = self.timer_slots.get(slot).copied()
            {
                if owner_key == key {
                    self.report_xrun(client, stream);
                }
            }
        }
        while let Some(returned) = self.timer.next_returned() {
            self.take_back(returned);
        }
    }

    fn take_back(&mut self, returned: Returned) {
        let Returned {
            slot,
            stream: backend_stream,
            broken,
        } = returned;
        let Some(owner) = self.timer_slots.get_mut(slot) else {
            return;
        };
        let owner = std::mem::replace(owner, SlotOwner::Free);
        self.free_slots.push(slot);
        let SlotOwner::Stream {
            client: id,
            stream: stream_id,
            ..
        } = owner
        else {
            // Its worker is gone: dropped here, on the broker's loop (an ALSA close may block).
            return;
        };
        let Ok(stream) = self.stream_mut(id, stream_id) else {
            return;
        };
        stream.stream = Some(backend_stream);
        stream.timer_slot = None;
        if let Some(e) = broken {
            self.drop_client(id, &Violation::Ring(e));
            return;
        }
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        let Some(parked) = client.parked.take() else {
            return;
        };
        if let Err(e) = self.dispatch(id, parked.stream_id, parked.caps, parked.msg) {
            self.drop_client(id, &e);
            return;
        }
        // A PREPARE goes on waiting for its open.
        if self.clients.get(&id).is_some_and(|c| c.opening.is_none()) {
            // And what it sent meanwhile.
            self.resume(id);
        }
    }

    fn report_xrun(&mut self, id: u32, stream_id: u32) {
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        // One noticed after its STOP (a backend thread's late report) is no xrun of a run.
        if let Some(stream) = client.streams.get_mut(&stream_id).filter(|s| s.running) {
            stream.xruns += 1;
            stream.xrun_positions = Some(stream.stats.positions());
        }
        if let Err(e) = client.channel.send(&BrokerMsg::Xrun { stream_id }, &[]) {
            log::debug!("broker: cannot report xrun: {e}");
        }
    }

    /// A worker's SetGain: a stream it was granted, a volume on the scale (else it broke the
    /// protocol), controls the config gives that stream (else `Failed`). Applied at once to a
    /// prepared stream, kept for a later one, and answered.
    fn set_gain_from_worker(
        &mut self,
        id: u32,
        stream_id: u32,
        gain: Gain,
    ) -> Result<(), Violation> {
        let granted = self
            .clients
            .get(&id)
            .is_some_and(|c| (stream_id as usize) < c.gains.len());
        if !granted {
            return Err(Violation::Protocol(format!(
                "gain for stream id {stream_id} out of range"
            )));
        }
        if !gain.is_valid() {
            return Err(Violation::Protocol(format!(
                "gain {gain:?} for stream {stream_id} is off the scale"
            )));
        }
        let reply = if self.config.stream_has_controls(stream_id as usize) {
            self.apply_gain(id, stream_id, gain);
            Ok(())
        } else {
            Err("the config gives this stream no controls".to_string())
        };
        self.answer(id, stream_id, reply)
    }

    /// Keeps a stream's gain and applies it to its backend stream, if one is open.
    fn apply_gain(&mut self, id: u32, stream_id: u32, gain: Gain) {
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        if let Some(slot) = client.gains.get_mut(stream_id as usize) {
            *slot = gain;
        }
        if let Some(stream) = client.streams.get_mut(&stream_id) {
            stream.gain.store(gain);
            // A stream on the timer thread reads the cell; one here may have a mixer to tell.
            if let Some(backend_stream) = stream.stream.as_mut() {
                backend_stream.gain_changed();
            }
        }
    }

    /// The host changed a stream's gain in its backend (PipeWire's node): kept, and told to
    /// the worker, whose guest sees it as a control change.
    fn host_gain_changed(&mut self, id: u32, stream_id: u32, gain: Gain) {
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        match client.gains.get_mut(stream_id as usize) {
            Some(slot) if *slot != gain => *slot = gain,
            _ => return,
        }
        log::info!("broker: worker {id} stream {stream_id}: the host set {gain:?}");
        if let Err(e) = client
            .channel
            .send(&BrokerMsg::GainChanged { stream_id, gain }, &[])
        {
            log::debug!("broker: cannot report a gain change: {e}");
        }
    }

    /// Sets a bus's volume and mute for one VM, as a host command would (`vsound ctl
    /// set-volume`): `client_id` is the broker's number for the VM's worker, `bus` the
    /// stream's configured name or its controls' bus name in the VM's layout. The stream plays
    /// with it at once (or from its next PREPARE); a guest with controls for it sees the change
    /// (a CTL_NOTIFY), one without just hears it.
    pub fn set_bus_gain(&mut self, client_id: u32, bus: &str, gain: Gain) -> Result<(), String> {
        if !gain.is_valid() {
            return Err(format!(
                "volume {} is off the scale (0..={})",
                gain.volume,
                virtio_snd::ctl::VOLUME_MAX
            ));
        }
        let stream_id = self.bus_stream(client_id, bus)?;
        self.apply_gain(client_id, stream_id, gain);
        let layout = self.layout_of(client_id)?;
        if !self.layout_has_controls(&layout, stream_id) {
            return Ok(());
        }
        if let Some(client) = self.clients.get(&client_id) {
            client
                .channel
                .send(&BrokerMsg::GainChanged { stream_id, gain }, &[])
                .map_err(|e| format!("cannot tell the VM's worker: {e}"))?;
        }
        Ok(())
    }

    /// Whether the guest has control elements for a stream of `layout`.
    fn layout_has_controls(&self, layout: &VmLayout, stream_id: u32) -> bool {
        self.config.controls
            && layout
                .streams
                .get(stream_id as usize)
                .is_some_and(|s| s.controls)
    }

    /// Serves the host command's control socket (bound by the caller) from now on.
    pub fn serve_admin(&mut self, listener: std::os::unix::net::UnixListener) -> io::Result<()> {
        let server = AdminServer::start(listener)?;
        self.epoll.add(
            server.ready_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_ADMIN),
        )?;
        self.admin = Some(server);
        Ok(())
    }

    fn admin_news(&mut self) {
        let calls = self
            .admin
            .as_ref()
            .map(AdminServer::take)
            .unwrap_or_default();
        for call in calls {
            let reply = self.admin_request(&call.request);
            call.answer(reply);
        }
    }

    /// Answers a host command's request.
    pub fn admin_request(&mut self, request: &AdminRequest) -> AdminReply {
        let result = match request {
            AdminRequest::List => return AdminReply::Vms(self.vm_statuses()),
            AdminRequest::SetVolume { vm, bus, volume } => self.vm_client(vm).and_then(|id| {
                let gain = self.bus_gain_by_name(id, bus)?;
                self.set_bus_gain(
                    id,
                    bus,
                    Gain {
                        volume: *volume,
                        ..gain
                    },
                )
            }),
            AdminRequest::SetMute { vm, bus, mute } => self.vm_client(vm).and_then(|id| {
                let gain = self.bus_gain_by_name(id, bus)?;
                self.set_bus_gain(
                    id,
                    bus,
                    Gain {
                        mute: *mute,
                        ..gain
                    },
                )
            }),
            AdminRequest::MuteAll { vm, mute } => self.vm_client(vm).and_then(|id| {
                let layout = self.layout_of(id)?;
                for stream in layout
                    .streams
                    .iter()
                    .filter(|s| s.direction.wire() == D_OUTPUT)
                {
                    let gain = self.bus_gain_by_name(id, &stream.name)?;
                    self.set_bus_gain(
                        id,
                        &stream.name,
                        Gain {
                            mute: *mute,
                            ..gain
                        },
                    )?;
                }
                Ok(())
            }),
        };
        match result {
            Ok(()) => {
                log::info!("broker: the host command: {request:?}");
                AdminReply::Done
            }
            Err(e) => AdminReply::Error(e),
        }
    }

    /// The connection that holds VM `vm`'s name.
    fn vm_client(&self, vm: &str) -> Result<u32, String> {
        let name = VmName::new(vm).map_err(|e| e.to_string())?;
        self.names
            .get(&name)
            .copied()
            .ok_or_else(|| format!("no VM {vm:?} is connected"))
    }

    /// The stream a welcomed VM's `bus` names in its layout.
    fn bus_stream(&self, id: u32, bus: &str) -> Result<u32, String> {
        let client = self
            .clients
            .get(&id)
            .filter(|c| c.caps.is_some())
            .ok_or_else(|| format!("no VM with client id {id}"))?;
        let layout = client.layout.as_ref().ok_or("no Hello yet")?;
        vsound_config::stream_by_bus(&layout.streams, bus)
            .filter(|&i| i < client.gains.len())
            .map(|i| i as u32)
            .ok_or_else(|| format!("{} has no bus {bus:?}", self.who(id)))
    }

    fn bus_gain_by_name(&self, id: u32, bus: &str) -> Result<Gain, String> {
        let stream_id = self.bus_stream(id, bus)?;
        self.bus_gain(id, stream_id)
            .ok_or_else(|| format!("{} has no bus {bus:?}", self.who(id)))
    }

    /// Every welcomed VM and its streams, by VM name.
    fn vm_statuses(&self) -> Vec<VmStatus> {
        let mut vms: Vec<VmStatus> = self
            .clients
            .iter()
            .filter_map(|(&id, client)| {
                let vm = client.vm?;
                let layout = client.layout.as_ref()?;
                let streams = layout
                    .streams
                    .iter()
                    .zip(&layout.backends)
                    .enumerate()
                    .map(|(i, (cfg, backend))| {
                        let stream = client.streams.get(&(i as u32));
                        let gain = client.gains.get(i).copied().unwrap_or(Gain::UNITY);
                        StreamStatus {
                            id: i as u32,
                            name: cfg.name.clone(),
                            direction: if cfg.direction.wire() == D_OUTPUT {
                                "output".into()
                            } else {
                                "input".into()
                            },
                            backend: backend.name().into(),
                            state: match stream {
                                Some(s) if s.running => "running".into(),
                                Some(_) => "prepared".into(),
                                None => "released".into(),
                            },
                            xruns: stream.map_or(0, |s| s.xruns),
                            latency_us: stream.and_then(BrokerStream::latency_us),
                            volume: gain.volume,
                            mute: gain.mute,
                            host_present: client.presence.get(i).copied().unwrap_or(true),
                            controls: self.layout_has_controls(layout, i as u32),
                        }
                    })
                    .collect();
                Some(VmStatus {
                    vm: vm.to_string(),
                    connection: id,
                    uid: client.uid,
                    streams,
                })
            })
            .collect();
        vms.sort_by(|a, b| a.vm.cmp(&b.vm));
        vms
    }

    /// The gain the broker keeps for a VM's stream (its worker's, or the host's last).
    pub fn bus_gain(&self, client_id: u32, stream_id: u32) -> Option<Gain> {
        self.clients
            .get(&client_id)
            .and_then(|c| c.gains.get(stream_id as usize))
            .copied()
    }

    fn stop(&mut self, id: u32, stream_id: u32) -> Result<(), String> {
        let stream = self.stream_mut(id, stream_id)?;
        if !stream.running {
            return Err("not running".into());
        }
        let backend_stream = stream.stream.as_mut().ok_or("stream is busy")?;
        stream.running = false;
        if stream.xrun_positions.take() == Some(stream.stats.positions()) {
            stream.xruns = stream.xruns.saturating_sub(1);
        }
        backend_stream
            .stop()
            .map_err(|e| format!("backend stop: {e}"))
    }

    fn release(&mut self, id: u32, stream_id: u32) -> Result<(), String> {
        if self.free_stream(id, stream_id) {
            Ok(())
        } else {
            Err("stream is not prepared".into())
        }
    }

    fn free_stream(&mut self, id: u32, stream_id: u32) -> bool {
        let Some(stream) = self
            .clients
            .get_mut(&id)
            .and_then(|c| c.streams.remove(&stream_id))
        else {
            return false;
        };
        if let Some(slot) = stream.timer_slot {
            // Requests wait for the stream to come back, so this is only a safety net.
            self.timer_slots[slot] = SlotOwner::Orphan;
            self.recall(slot);
        } else if let Some(backend_stream) = &stream.stream {
            if !backend_stream.timer_driven() {
                let _ = self.epoll.delete(backend_stream.wake_fd());
            }
        }
        if stream.xruns > 0 {
            log::info!(
                "broker: {} stream {stream_id} released after {} xruns",
                self.who(id),
                stream.xruns
            );
        }
        true
    }

    /// A wake-up of a stream the broker's loop watches (one whose backend has a thread of its
    /// own, which did the work: this passes on what it reported).
    fn tick(&mut self, id: u32, stream_id: u32) {
        let Some(stream) = self
            .clients
            .get_mut(&id)
            .and_then(|c| c.streams.get_mut(&stream_id))
        else {
            return;
        };
        let Some(backend_stream) = stream.stream.as_mut() else {
            return;
        };
        match backend_stream.on_wake() {
            Ok(wake) => {
                if wake.xrun {
                    self.report_xrun(id, stream_id);
                }
                if let Some(gain) = wake.gain {
                    self.host_gain_changed(id, stream_id, gain);
                }
            }
            Err(e) => self.drop_client(id, &Violation::Ring(e)),
        }
    }
}

/// Reads (a bounded number of) packets the peer queued: closing a socket with unread input
/// resets the connection (ECONNRESET), and the peer would never see our last message (a
/// `Refused` and its reason).
fn discard_input(channel: &Channel) {
    for _ in 0..MESSAGES_PER_WAKE {
        match channel.recv::<WorkerMsg>() {
            Err(IpcError::Io(_)) | Err(IpcError::Closed) => return,
            _ => {}
        }
    }
}

#[cfg(test)]
mod budget_tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let mut budget = RequestBudget::new(REQUEST_BURST);
        let start = budget.refilled;
        let served = (0..100).filter(|_| budget.take(start)).count();
        assert_eq!(served, REQUEST_BURST as usize);
        // One more fits once a token's time has passed, and not before.
        let token = Duration::from_secs(1) / REQUEST_RATE_PER_SEC;
        assert!(!budget.take(start + token / 2));
        assert!(budget.next_token() <= start + token + Duration::from_millis(1));
        assert!(budget.take(start + token + Duration::from_millis(1)));
        // A quiet minute refills the burst, not more.
        let later = start + Duration::from_secs(60);
        let served = (0..100).filter(|_| budget.take(later)).count();
        assert_eq!(served, REQUEST_BURST as usize);
    }
}

#[cfg(test)]
mod gain_tests {
    use super::*;
    use rustix::net::{
        bind, listen, socket_with, AddressFamily, SocketAddrUnix, SocketFlags, SocketType,
    };

    /// A broker on a fresh socket with a worker that said Hello for `streams` streams.
    fn broker_with_worker(config: &str, streams: usize) -> (Broker, Channel, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.sock");
        let fd = socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        bind(&fd, &SocketAddrUnix::new(&path).unwrap()).unwrap();
        listen(&fd, 8).unwrap();
        let config = Config::parse(config).unwrap();
        let wanted = config.pcm_caps();
        let mut broker = Broker::new(config, HashMap::new(), Listener::from_fd(fd)).unwrap();
        let worker = Channel::connect(&path).unwrap();
        worker
            .send(
                &WorkerMsg::Hello {
                    version: ipc::PROTOCOL_VERSION,
                    vm: "vm".into(),
                    streams: wanted[..streams].to_vec(),
                },
                &[],
            )
            .unwrap();
        broker.accept_clients();
        let (welcome, _) = worker.recv::<BrokerMsg>().unwrap();
        assert!(matches!(welcome, BrokerMsg::Welcome { client_id: 1, .. }));
        (broker, worker, dir)
    }

    const CONFIG: &str = r#"
        controls = true
        [[streams]]
        name = "media"
        direction = "output"
        backend = "null"
        [[streams]]
        name = "chime"
        direction = "output"
        backend = "null"
        controls = false
    "#;

    #[test]
    fn a_host_sets_a_bus_gain_per_vm_and_its_worker_hears_of_it() {
        let (mut broker, worker, _dir) = broker_with_worker(CONFIG, 2);
        let half = Gain {
            volume: 88,
            mute: false,
        };
        assert_eq!(broker.bus_gain(1, 0), Some(Gain::UNITY));
        // By the stream's name or its controls' bus name.
        broker.set_bus_gain(1, "media", half).unwrap();
        assert_eq!(broker.bus_gain(1, 0), Some(half));
        let (news, _) = worker.recv::<BrokerMsg>().unwrap();
        assert_eq!(
            news,
            BrokerMsg::GainChanged {
                stream_id: 0,
                gain: half
            }
        );
        let muted = Gain { mute: true, ..half };
        broker.set_bus_gain(1, "Media", muted).unwrap();
        assert_eq!(broker.bus_gain(1, 0), Some(muted));
        let (news, _) = worker.recv::<BrokerMsg>().unwrap();
        assert_eq!(
            news,
            BrokerMsg::GainChanged {
                stream_id: 0,
                gain: muted
            }
        );
        // A bus without controls plays with it too; its guest is not told (it has nothing
        // to show it with).
        broker.set_bus_gain(1, "chime", half).unwrap();
        assert_eq!(broker.bus_gain(1, 1), Some(half));
        assert!(
            matches!(
                worker.wait_readable(Some(Duration::from_millis(100))),
                Err(IpcError::Timeout)
            ),
            "news of a bus without controls"
        );
        for (client, bus, gain) in [
            (1, "radio", half), // no such bus
            (
                1,
                "media",
                Gain {
                    volume: 101,
                    ..half
                },
            ), // off the scale
            (2, "media", half), // no such VM
        ] {
            assert!(broker.set_bus_gain(client, bus, gain).is_err(), "{bus}");
        }
        assert_eq!(broker.bus_gain(1, 0), Some(muted));
        assert_eq!(broker.bus_gain(1, 1), Some(half));
    }

    #[test]
    fn a_workers_gain_is_checked_kept_and_answered() {
        let (mut broker, worker, _dir) = broker_with_worker(CONFIG, 2);
        let gain = Gain {
            volume: 10,
            mute: true,
        };
        worker
            .send(&WorkerMsg::SetGain { stream_id: 0, gain }, &[])
            .unwrap();
        broker.serve_client(1);
        let (reply, _) = worker.recv::<BrokerMsg>().unwrap();
        assert_eq!(reply, BrokerMsg::Done { stream_id: 0 });
        assert_eq!(broker.bus_gain(1, 0), Some(gain));
        // A stream the config gives no controls: refused, nothing kept.
        worker
            .send(&WorkerMsg::SetGain { stream_id: 1, gain }, &[])
            .unwrap();
        broker.serve_client(1);
        let (reply, _) = worker.recv::<BrokerMsg>().unwrap();
        assert!(matches!(reply, BrokerMsg::Failed { stream_id: 1, .. }));
        assert_eq!(broker.bus_gain(1, 1), Some(Gain::UNITY));
        // Off the scale: a broken worker, dropped.
        let wild = Gain {
            volume: 1000,
            mute: false,
        };
        worker
            .send(
                &WorkerMsg::SetGain {
                    stream_id: 0,
                    gain: wild,
                },
                &[],
            )
            .unwrap();
        broker.serve_client(1);
        assert!(!broker.clients.contains_key(&1));
    }

    #[test]
    fn a_gain_for_a_stream_it_was_not_granted_drops_the_worker() {
        let (mut broker, worker, _dir) = broker_with_worker(CONFIG, 2);
        worker
            .send(
                &WorkerMsg::SetGain {
                    stream_id: 2,
                    gain: Gain::UNITY,
                },
                &[],
            )
            .unwrap();
        broker.serve_client(1);
        assert!(!broker.clients.contains_key(&1));
    }
}
