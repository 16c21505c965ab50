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

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use crate::backends::{self, Backend, BackendStream, RingPort, StreamRing, StreamSpec};
use crate::config::Config;
use crate::control::{PcmCaps, PcmParams};
use crate::ipc::{self, BrokerMsg, Channel, IpcError, Listener, WorkerMsg};
use crate::protocol::D_OUTPUT;
use crate::ring::{Consumer, Producer, RingError, SharedRing, WakeSender};

/// Most workers one broker serves at once.
pub const MAX_CLIENTS: usize = 64;
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
    /// Set by Hello: what each of its streams may use.
    caps: Option<Vec<PcmCaps>>,
    streams: HashMap<u32, BrokerStream>,
}

pub struct Broker {
    config: Config,
    backends: Vec<Box<dyn Backend>>,
    listener: Listener,
    epoll: Epoll,
    clients: HashMap<u32, Client>,
    next_client_id: u32,
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
        })
    }

    /// Adopts an already connected worker (a launcher's socketpair).
    pub fn add_client(&mut self, channel: Channel) -> io::Result<()> {
        rustix::io::ioctl_fionbio(&channel, true)?;
        self.register_client(channel)
    }

    /// Serves until `stop` becomes readable (or forever without one).
    pub fn run(&mut self, stop: Option<BorrowedFd<'_>>) -> io::Result<()> {
        if let Some(stop) = stop {
            self.epoll
                .add(stop, EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_STOP))?;
        }
        let mut events = vec![EpollEvent::empty(); 64];
        loop {
            let n = match self.epoll.wait(&mut events, EpollTimeout::NONE) {
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
                    KIND_CLIENT => self.serve_client((token & 0xffff_ffff) as u32),
                    KIND_TIMER => {
                        let client = ((token >> 16) & 0xffff_ffff) as u32;
                        let stream = (token & 0xffff) as u32;
                        self.tick(client, stream);
                    }
                    _ => log::error!("broker: unknown epoll token {token:#x}"),
                }
            }
        }
    }

    fn accept_clients(&mut self) {
        loop {
            match self.listener.accept() {
                Ok(channel) => {
                    if let Err(e) = self.register_client(channel) {
                        log::warn!("broker: cannot register a worker: {e}");
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

    fn register_client(&mut self, channel: Channel) -> io::Result<()> {
        if self.clients.len() >= MAX_CLIENTS {
            let _ = channel.send(
                &BrokerMsg::Refused {
                    reason: "too many workers".into(),
                },
                &[],
            );
            return Err(io::Error::other("too many workers"));
        }
        let id = self.next_client_id;
        self.next_client_id = self.next_client_id.wrapping_add(1).max(1);
        self.epoll.add(
            &channel,
            EpollEvent::new(EpollFlags::EPOLLIN, client_token(id)),
        )?;
        log::info!("broker: worker {id} connected");
        self.clients.insert(
            id,
            Client {
                channel,
                caps: None,
                streams: HashMap::new(),
            },
        );
        Ok(())
    }

    fn drop_client(&mut self, id: u32, why: &dyn std::fmt::Display) {
        if let Some(client) = self.clients.remove(&id) {
            log::warn!("broker: dropping worker {id}: {why}");
            for stream in client.streams.values() {
                let _ = self.epoll.delete(stream.stream.wake_fd());
            }
            let _ = self.epoll.delete(&client.channel);
        }
    }

    fn serve_client(&mut self, id: u32) {
        for _ in 0..MESSAGES_PER_WAKE {
            let Some(client) = self.clients.get(&id) else {
                return;
            };
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
                let _ = self.clients[&id].channel.send(
                    &BrokerMsg::Refused {
                        reason: format!("protocol version {version} not supported"),
                    },
                    &[],
                );
                return Err(Violation::Protocol("version mismatch".into()));
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
                    Ok(()) => return Ok(()), // `prepare` sent the reply with the fds
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
        let backend_stream = self.backends[stream_id as usize]
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
            self.backends[stream_id as usize].name()
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
