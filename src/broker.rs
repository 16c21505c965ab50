//! The audio broker: serves many workers (one per VM), owns the backends, and moves frames
//! between each stream's ring and its backend at the stream's real-time rate.
//!
//! A worker is assumed compromised: every message is decoded with a size limit and checked
//! (stream ids, params, states), every ring position it publishes is bound-checked, and a worker
//! that breaks the protocol is disconnected with all its streams freed while the other workers
//! keep playing. One thread, one epoll: no lock is ever shared with a worker.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use crate::backends::{self, Backend, BackendStream, RingPort, StreamRing, StreamSpec};
use crate::config::Config;
use crate::control::{PcmCaps, PcmParams};
use crate::ipc::{self, BrokerMsg, Channel, IpcError, Listener, WorkerMsg};
use crate::protocol::D_OUTPUT;
use crate::ring::{Consumer, Producer, RingError, SharedRing, WakeSender};

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
/// Refused connections are logged at most this often (a flood would fill the log).
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Messages handled per client per wake-up, so one chatty worker cannot starve the others.
const MESSAGES_PER_WAKE: usize = 16;
/// PCM features the broker implements: xrun reports.
const BROKER_PCM_FEATURES: u32 = 1 << crate::protocol::PCM_F_EVT_XRUNS;

const TOKEN_LISTENER: u64 = 0;
const TOKEN_STOP: u64 = 1;
const KIND_CLIENT: u64 = 2 << 56;
const KIND_TIMER: u64 = 3 << 56;
const KIND_MASK: u64 = 0xff << 56;

fn client_token(client: u32) -> u64 {
    KIND_CLIENT | u64::from(client)
}

fn timer_token(client: u32, stream: u32) -> u64 {
    KIND_TIMER | (u64::from(client) << 16) | u64::from(stream)
}

/// Why a client is dropped.
#[derive(Debug, thiserror::Error)]
enum Violation {
    #[error("{0}")]
    Ipc(#[from] IpcError),
    #[error("ring: {0}")]
    Ring(#[from] RingError),
    #[error("protocol: {0}")]
    Protocol(String),
}

struct BrokerStream {
    stream: Box<dyn BackendStream>,
    running: bool,
    xruns: u64,
}

struct Client {
    channel: Channel,
    /// Who connected (SO_PEERCRED), for the per-uid limit.
    uid: u32,
    accepted: Instant,
    /// Set by Hello: what each of its streams may use.
    caps: Option<Vec<PcmCaps>>,
    streams: HashMap<u32, BrokerStream>,
    /// A reply with fds went out and may still be unread: its fds count against the broker's
    /// RLIMIT_NOFILE until the peer reads them, so no request is served until it has.
    fds_maybe_unread: bool,
    /// Since when a request waits for that (the socket is then not watched for input).
    stalled_since: Option<Instant>,
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
    backends: Vec<Box<dyn Backend>>,
    listener: Listener,
    epoll: Epoll,
    clients: HashMap<u32, Client>,
    next_client_id: u32,
    unread: Vec<Unread>,
    /// When `housekeeping` has something to do: a Hello deadline or a recheck.
    next_due: Option<Instant>,
    refusals: u64,
    refusal_logged: Option<Instant>,
}

impl Broker {
    pub fn new(config: Config, listener: Listener) -> io::Result<Broker> {
        let backends = backends::build(&config).map_err(io::Error::other)?;
        listener.set_nonblocking()?;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(
            &listener,
            EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_LISTENER),
        )?;
        Ok(Broker {
            config,
            backends,
            listener,
            epoll,
            clients: HashMap::new(),
            next_client_id: 1,
            unread: Vec::new(),
            next_due: None,
            refusals: 0,
            refusal_logged: None,
        })
    }

    /// Adopts an already connected worker (a launcher's socketpair).
    pub fn add_client(&mut self, channel: Channel) -> io::Result<()> {
        rustix::io::ioctl_fionbio(&channel, true)?;
        self.register_client(channel)
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
                    KIND_CLIENT => {
                        let id = (token & 0xffff_ffff) as u32;
                        let stalled = self
                            .clients
                            .get(&id)
                            .is_some_and(|c| c.stalled_since.is_some());
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
        let now = Instant::now();
        if self
            .refusal_logged
            .is_none_or(|at| now >= at + REFUSAL_LOG_INTERVAL)
        {
            log::warn!(
                "broker: refused a connection: {why} ({} refused so far)",
                self.refusals
            );
            self.refusal_logged = Some(now);
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
                caps: None,
                streams: HashMap::new(),
                fds_maybe_unread: false,
                stalled_since: None,
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
        log::log!(level, "broker: dropping worker {id}: {why}");
        for stream in client.streams.values() {
            let _ = self.epoll.delete(stream.stream.wake_fd());
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
        for _ in 0..MESSAGES_PER_WAKE {
            let Some(client) = self.clients.get_mut(&id) else {
                return;
            };
            if client.fds_maybe_unread {
                match client.channel.unread_by_peer() {
                    Ok(0) => {
                        client.fds_maybe_unread = false;
                        if client.stalled_since.take().is_some() {
                            let mut watch = EpollEvent::new(EpollFlags::EPOLLIN, client_token(id));
                            if let Err(e) = self.epoll.modify(&client.channel, &mut watch) {
                                self.drop_client(id, &format!("epoll: {e}"));
                                return;
                            }
                        }
                    }
                    Ok(_) => {
                        if client.stalled_since.is_none() {
                            // Level-triggered input would wake us for nothing until then.
                            let mut none = EpollEvent::new(EpollFlags::empty(), client_token(id));
                            if let Err(e) = self.epoll.modify(&client.channel, &mut none) {
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
                Err(IpcError::Closed) => {
                    self.drop_client(id, &"disconnected");
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
            let WorkerMsg::Hello { version, streams } = msg else {
                return Err(Violation::Protocol("first message must be Hello".into()));
            };
            if version != ipc::PROTOCOL_VERSION {
                self.refuse(id, format!("protocol version {version} not supported"));
                return Err(Violation::Protocol("version mismatch".into()));
            }
            // The cap counts workers only: connections before Hello have their own bound.
            if self.worker_count() >= MAX_CLIENTS {
                self.refuse(id, "too many workers".into());
                return Err(Violation::Protocol("too many workers".into()));
            }
            if streams.len() > crate::config::MAX_STREAMS {
                return Err(Violation::Protocol("too many streams".into()));
            }
            let granted = self.grant_caps(&streams);
            let client = self
                .clients
                .get_mut(&id)
                .ok_or_else(|| Violation::Protocol("no such client".into()))?;
            client.caps = Some(granted.clone());
            client.channel.send(
                &BrokerMsg::Welcome {
                    version: ipc::PROTOCOL_VERSION,
                    client_id: id,
                    caps: granted,
                },
                &[],
            )?;
            return Ok(());
        };
        let stream_id = match &msg {
            WorkerMsg::Hello { .. } => return Err(Violation::Protocol("second Hello".into())),
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
        let reply = match msg {
            WorkerMsg::Prepare { params, .. } => {
                match self.prepare(id, stream_id, stream_caps, params) {
                    Ok(()) => {
                        // `prepare` sent the reply with the fds.
                        if let Some(client) = self.clients.get_mut(&id) {
                            client.fds_maybe_unread = true;
                        }
                        return Ok(());
                    }
                    Err(reason) => Err(reason),
                }
            }
            WorkerMsg::Start { .. } => self.start(id, stream_id),
            WorkerMsg::Stop { .. } => self.stop(id, stream_id),
            _ => self.release(id, stream_id),
        };
        let reply = match reply {
            Ok(()) => BrokerMsg::Done { stream_id },
            Err(reason) => {
                log::warn!("broker: worker {id} stream {stream_id}: {reason}");
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

    fn refuse(&self, id: u32, reason: String) {
        if let Some(client) = self.clients.get(&id) {
            let _ = client.channel.send(&BrokerMsg::Refused { reason }, &[]);
        }
    }

    /// What each requested stream may use: the request ∩ our config ∩ the backend.
    fn grant_caps(&self, requested: &[PcmCaps]) -> Vec<PcmCaps> {
        requested
            .iter()
            .enumerate()
            .map(|(i, want)| {
                let (Some(cfg), Some(backend)) = (self.config.streams.get(i), self.backends.get(i))
                else {
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
                if offered.direction != want.direction
                    || offered.channels_min > offered.channels_max
                {
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
        let backend = self
            .backends
            .get(stream_id as usize)
            .ok_or("no such stream")?;
        let capacity = (u64::from(params.period_bytes)
            * u64::from(self.config.limits.lookahead_periods.max(2)))
        .max(backend.ring_bytes(&params));
        let (ring, ring_fd) = SharedRing::create(capacity).map_err(|e| e.to_string())?;
        // Not an fd shared with the worker (an eventfd dup's flags and counter would be the
        // worker's to set): each side has its own end.
        let (notify, worker_notify) =
            WakeSender::pair().map_err(|e| format!("wake-up socket: {e}"))?;
        let spec = StreamSpec {
            client_id: id,
            stream_id,
            direction: caps.direction,
            params,
        };
        let ring = if caps.direction == D_OUTPUT {
            StreamRing::Playback(Consumer::new(ring))
        } else {
            StreamRing::Capture(Producer::new(ring))
        };
        // Checked although Hello granted nothing beyond the backends: a panic here would
        // silence every VM.
        let backend = self
            .backends
            .get(stream_id as usize)
            .ok_or("no backend for this stream")?;
        let backend_name = backend.name();
        let backend_stream = backend
            .open(&spec, RingPort::new(ring, notify))
            .map_err(|e| format!("backend: {e}"))?;
        self.epoll
            .add(
                backend_stream.wake_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, timer_token(id, stream_id)),
            )
            .map_err(|e| format!("epoll: {e}"))?;
        let stream = BrokerStream {
            stream: backend_stream,
            running: false,
            xruns: 0,
        };
        let client = self.clients.get_mut(&id).ok_or("client vanished")?;
        client
            .channel
            .send(
                &BrokerMsg::Prepared {
                    stream_id,
                    ring_capacity: capacity,
                },
                &[ring_fd.as_fd(), worker_notify.as_fd()],
            )
            .map_err(|e| e.to_string())?;
        client.streams.insert(stream_id, stream);
        log::info!(
            "broker: worker {id} stream {stream_id} prepared: {} Hz, {} ch, format {}, period {} bytes, {} backend",
            params.rate_hz(),
            params.channels,
            params.format,
            params.period_bytes,
            backend_name
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
        stream
            .stream
            .start()
            .map_err(|e| format!("backend start: {e}"))?;
        stream.running = true;
        Ok(())
    }

    fn stop(&mut self, id: u32, stream_id: u32) -> Result<(), String> {
        let stream = self.stream_mut(id, stream_id)?;
        if !stream.running {
            return Err("not running".into());
        }
        stream.running = false;
        stream
            .stream
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
        let _ = self.epoll.delete(stream.stream.wake_fd());
        if stream.xruns > 0 {
            log::info!(
                "broker: worker {id} stream {stream_id} released after {} xruns",
                stream.xruns
            );
        }
        true
    }

    fn tick(&mut self, id: u32, stream_id: u32) {
        let Some(stream) = self
            .clients
            .get_mut(&id)
            .and_then(|c| c.streams.get_mut(&stream_id))
        else {
            return;
        };
        match stream.stream.on_wake() {
            Ok(wake) => {
                if wake.xrun {
                    stream.xruns += 1;
                    if let Some(client) = self.clients.get(&id) {
                        if let Err(e) = client.channel.send(&BrokerMsg::Xrun { stream_id }, &[]) {
                            log::debug!("broker: cannot report xrun: {e}");
                        }
                    }
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
