//! The worker's link to the audio broker. The broker may die or restart under a running VM, and
//! the VMM cannot reconnect a vhost-user-snd backend, so the worker never gives up its VMM
//! session for it: when the link fails it reconnects by path with backoff (never blocking the
//! device thread: the connect is non-blocking and the Hello is answered asynchronously), and
//! the device paces its streams itself meanwhile (`local_clock`).

use std::collections::VecDeque;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollEvent, EpollFlags};

use crate::local_clock::WakeTimer;
use virtio_snd::control::PcmCaps;
use vsound_config::VmName;
use vsound_shared::ipc::{self, BrokerMsg, Channel, IpcError, WorkerMsg, BROKER_REPLY_TIMEOUT};

/// How long the first Hello at start-up may wait for the broker.
const FIRST_WELCOME_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a reconnection's Hello may wait before the connection is dropped and retried.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(2);
const FIRST_RETRY: Duration = Duration::from_millis(10);
/// Attempts cost a socket and a connect: keep trying often, the guest is waiting.
const MAX_RETRY: Duration = Duration::from_millis(200);
/// Broker events held for the device at most (it takes them after every wake-up).
const MAX_QUEUED_EVENTS: usize = 256;
/// A failing reconnection is logged at most this often.
const RETRY_LOG_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("broker: {0}")]
    Ipc(#[from] IpcError),
    #[error("broker refused us: {0}")]
    Refused(String),
    #[error("broker answered Hello with {0:?}")]
    UnexpectedReply(Box<BrokerMsg>),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Why a request did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The link is down (or just failed): the broker has none of our streams now.
    Down,
    /// The broker answered that it cannot do it.
    Refused(String),
}

/// What a wake-up of the link meant for the device.
#[derive(Debug, PartialEq, Eq)]
pub enum LinkEvent {
    Nothing,
    /// The link failed: every stream the broker held is gone.
    Lost,
    /// A new broker welcomed us after a gap: restore the streams.
    Restored,
}

enum State {
    Up(Channel),
    /// Hello sent on a fresh connection; the Welcome is awaited until `deadline`.
    Greeting {
        channel: Channel,
        deadline: Instant,
    },
    /// Not connected; the timer fires for the next attempt.
    Away,
    /// A newer worker of the same uid took this VM's name over at the broker (which dropped
    /// us): this worker is on its way out, and taking the name back would only drop that one
    /// in turn. No more attempts; the streams go on at their pace on the local clock.
    Superseded,
}

/// When the link went down and how the reconnection goes.
struct Outage {
    since: Instant,
    attempts: u32,
    retry: Duration,
    last_logged: Instant,
}

pub struct BrokerLink {
    path: PathBuf,
    vm: VmName,
    wanted: Vec<PcmCaps>,
    granted: Vec<PcmCaps>,
    state: State,
    outage: Option<Outage>,
    /// Xruns and gain news not yet handed to the device (also those that arrived while a
    /// reply was awaited).
    events: VecDeque<BrokerMsg>,
    /// Next reconnection attempt, or the Welcome deadline.
    timer: WakeTimer,
    token: u64,
    pub client_id: u32,
}

impl BrokerLink {
    /// Connects and greets the broker at start-up (blocking, bounded); returns what it grants
    /// for each stream. `token` is the epoll data of the channel in the device's epoll, and
    /// `timer_token` that of the reconnection timer.
    pub fn connect(
        path: &Path,
        vm: VmName,
        wanted: Vec<PcmCaps>,
        epoll: &Epoll,
        token: u64,
        timer_token: u64,
    ) -> Result<(BrokerLink, Vec<PcmCaps>), LinkError> {
        let channel = Channel::connect(path)?;
        channel.send(&hello(vm, &wanted), &[])?;
        channel.wait_readable(Some(FIRST_WELCOME_TIMEOUT))?;
        let (reply, _fds) = channel.recv::<BrokerMsg>()?;
        let (client_id, granted) = welcome(reply, wanted.len())?;
        rustix::io::ioctl_fionbio(&channel, true).map_err(io::Error::from)?;
        let timer = WakeTimer::new().map_err(io::Error::from)?;
        epoll
            .add(&timer, EpollEvent::new(EpollFlags::EPOLLIN, timer_token))
            .map_err(io::Error::from)?;
        epoll
            .add(&channel, EpollEvent::new(EpollFlags::EPOLLIN, token))
            .map_err(io::Error::from)?;
        let link = BrokerLink {
            path: path.to_path_buf(),
            vm,
            wanted,
            granted: granted.clone(),
            state: State::Up(channel),
            outage: None,
            events: VecDeque::new(),
            timer,
            token,
            client_id,
        };
        Ok((link, granted))
    }

    pub fn is_up(&self) -> bool {
        matches!(self.state, State::Up(_))
    }

    /// How long the link has been down (zero when up).
    pub fn down_for(&self) -> Duration {
        self.outage
            .as_ref()
            .map_or(Duration::ZERO, |o| o.since.elapsed())
    }

    /// Marks the link failed: logs once, drops the connection, schedules a reconnection.
    pub fn fail(&mut self, why: &dyn std::fmt::Display) {
        if matches!(self.state, State::Superseded) {
            return;
        }
        if self.is_up() {
            log::error!(
                "broker link lost: {why}; streams go on at their real-time pace in silence \
                 while the worker reconnects to {}",
                self.path.display()
            );
        } else if matches!(self.state, State::Greeting { .. }) {
            log::debug!("broker reconnection failed: {why}");
        }
        // Dropping the channel closes it, which also takes it out of the epoll.
        self.state = State::Away;
        let now = Instant::now();
        let outage = self.outage.get_or_insert(Outage {
            since: now,
            attempts: 0,
            retry: FIRST_RETRY,
            last_logged: now,
        });
        let wait = outage.retry;
        outage.retry = (outage.retry * 2).min(MAX_RETRY);
        self.timer.arm(Some(now + wait));
    }

    /// Stops using the broker for good (see [`State::Superseded`]).
    fn superseded(&mut self, reason: &str) {
        log::error!(
            "broker dropped this worker of vm {}: {reason}; it no longer uses the broker (its \
             streams go on in silence at their pace)",
            self.vm
        );
        self.state = State::Superseded;
        self.timer.arm(None);
        let now = Instant::now();
        self.outage.get_or_insert(Outage {
            since: now,
            attempts: 0,
            retry: MAX_RETRY,
            last_logged: now,
        });
    }

    /// A reconnection the broker refused (its reason says why: the VM's name held by another
    /// uid, a layout that is not the broker's for this VM): logged at most every
    /// `RETRY_LOG_INTERVAL`, and retried like any failed attempt.
    fn refused(&mut self, reason: &str) {
        if let Some(outage) = &mut self.outage {
            outage.attempts += 1;
            if outage.attempts == 1 || outage.last_logged.elapsed() >= RETRY_LOG_INTERVAL {
                outage.last_logged = Instant::now();
                log::warn!(
                    "broker refused vm {} after {:.1} s away ({} attempts): {reason}",
                    self.vm,
                    outage.since.elapsed().as_secs_f64(),
                    outage.attempts
                );
            }
        }
        self.fail(&reason);
    }

    /// The timer fired: attempt a reconnection, or give up on a Welcome that is late.
    pub fn on_timer(&mut self, epoll: &Epoll) {
        self.timer.clear();
        match &self.state {
            State::Up(_) | State::Superseded => {}
            State::Greeting { deadline, .. } => {
                if Instant::now() >= *deadline {
                    self.fail(&"no Welcome in time");
                } else {
                    self.timer.arm(Some(*deadline));
                }
            }
            State::Away => self.attempt(epoll),
        }
    }

    fn attempt(&mut self, epoll: &Epoll) {
        let greeted = Channel::connect_nonblocking(&self.path)
            .map_err(IpcError::from)
            .and_then(|channel| {
                channel.send(&hello(self.vm, &self.wanted), &[])?;
                epoll
                    .add(&channel, EpollEvent::new(EpollFlags::EPOLLIN, self.token))
                    .map_err(io::Error::from)?;
                Ok(channel)
            });
        match greeted {
            Ok(channel) => {
                let deadline = Instant::now() + WELCOME_TIMEOUT;
                self.state = State::Greeting { channel, deadline };
                self.timer.arm(Some(deadline));
            }
            Err(e) => {
                if let Some(outage) = &mut self.outage {
                    outage.attempts += 1;
                    if outage.attempts == 1 || outage.last_logged.elapsed() >= RETRY_LOG_INTERVAL {
                        outage.last_logged = Instant::now();
                        log::warn!(
                            "broker still away after {:.1} s ({} attempts to reach {}): {e}",
                            outage.since.elapsed().as_secs_f64(),
                            outage.attempts,
                            self.path.display()
                        );
                    }
                }
                self.fail(&e)
            }
        }
    }

    /// The channel is readable: a Welcome after a reconnection, or broker events.
    pub fn on_readable(&mut self) -> LinkEvent {
        match &self.state {
            State::Up(_) => {
                // Xruns are queued in `events`; a failure shows in the state.
                self.read_events();
                if self.is_up() {
                    LinkEvent::Nothing
                } else {
                    LinkEvent::Lost
                }
            }
            State::Greeting { channel, .. } => {
                let reply = match channel.recv::<BrokerMsg>() {
                    Ok((reply, _fds)) => reply,
                    Err(IpcError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                        return LinkEvent::Nothing
                    }
                    Err(e) => {
                        self.fail(&e);
                        return LinkEvent::Nothing;
                    }
                };
                match welcome(reply, self.wanted.len()) {
                    Ok((client_id, granted)) => {
                        let State::Greeting { channel, .. } =
                            std::mem::replace(&mut self.state, State::Away)
                        else {
                            unreachable!("matched above")
                        };
                        self.state = State::Up(channel);
                        self.timer.arm(None);
                        if granted != self.granted {
                            log::warn!(
                                "the new broker grants other stream caps than the first one; \
                                 the guest keeps those it was offered at start-up"
                            );
                        }
                        self.client_id = client_id;
                        if let Some(outage) = self.outage.take() {
                            log::info!(
                                "broker back after a {} ms gap ({} failed attempts): client {client_id}",
                                outage.since.elapsed().as_millis(),
                                outage.attempts
                            );
                        }
                        LinkEvent::Restored
                    }
                    Err(LinkError::Refused(reason)) => {
                        self.refused(&reason);
                        LinkEvent::Nothing
                    }
                    Err(e) => {
                        self.fail(&e);
                        LinkEvent::Nothing
                    }
                }
            }
            State::Away | State::Superseded => LinkEvent::Nothing,
        }
    }

    /// Sends a request and waits (bounded) for its reply.
    pub fn request(&mut self, msg: WorkerMsg) -> Result<(BrokerMsg, Vec<OwnedFd>), Fault> {
        let State::Up(channel) = &self.state else {
            return Err(Fault::Down);
        };
        if let Err(e) = channel.send(&msg, &[]) {
            return Err(self.down(&e));
        }
        let deadline = Instant::now() + BROKER_REPLY_TIMEOUT;
        loop {
            let State::Up(channel) = &self.state else {
                return Err(Fault::Down);
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if let Err(e) = channel.wait_readable(Some(left)) {
                return Err(self.down(&e));
            }
            match channel.recv::<BrokerMsg>() {
                Ok((msg, _)) if msg.is_unsolicited() => self.push_event(msg),
                Ok((BrokerMsg::Refused { reason }, _)) => {
                    self.superseded(&reason);
                    return Err(Fault::Down);
                }
                Ok((reply, fds)) => {
                    if fds.len() != reply.fd_count() {
                        return Err(self.down(&"wrong number of fds from the broker"));
                    }
                    return Ok((reply, fds));
                }
                Err(IpcError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(self.down(&e)),
            }
        }
    }

    /// A request answered by Done or Failed.
    pub fn simple(&mut self, msg: WorkerMsg, stream_id: u32) -> Result<(), Fault> {
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
                Err(Fault::Refused(reason))
            }
            (other, _) => Err(self.down(&format!("unexpected reply {other:?}"))),
        }
    }

    /// Fails the link for a broker that broke the protocol.
    pub fn down(&mut self, why: &dyn std::fmt::Display) -> Fault {
        self.fail(why);
        Fault::Down
    }

    /// The broker's news received so far (the channel is read when its fd is readable, not here: this
    /// runs after every event of the device).
    pub fn take_events(&mut self) -> VecDeque<BrokerMsg> {
        std::mem::take(&mut self.events)
    }

    /// Queues an event; a broker sending faster than the device takes them loses the oldest
    /// (the device takes them after every wake-up, so only a hostile broker gets here).
    fn push_event(&mut self, msg: BrokerMsg) {
        if self.events.len() >= MAX_QUEUED_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(msg);
    }

    fn read_events(&mut self) {
        while let State::Up(channel) = &self.state {
            match channel.recv::<BrokerMsg>() {
                Ok((msg, _)) if msg.is_unsolicited() => self.push_event(msg),
                Ok((BrokerMsg::Refused { reason }, _)) => self.superseded(&reason),
                Ok((other, _)) => self.fail(&format!("unsolicited message {other:?}")),
                Err(IpcError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => self.fail(&e),
            }
        }
    }
}

fn hello(vm: VmName, wanted: &[PcmCaps]) -> WorkerMsg {
    WorkerMsg::Hello {
        version: ipc::PROTOCOL_VERSION,
        vm: vm.as_str().to_string(),
        streams: wanted.to_vec(),
    }
}

fn welcome(reply: BrokerMsg, streams: usize) -> Result<(u32, Vec<PcmCaps>), LinkError> {
    match reply {
        BrokerMsg::Welcome {
            version,
            client_id,
            caps,
        } if version == ipc::PROTOCOL_VERSION && caps.len() == streams => Ok((client_id, caps)),
        BrokerMsg::Refused { reason } => Err(LinkError::Refused(reason)),
        other => Err(LinkError::UnexpectedReply(Box::new(other))),
    }
}
