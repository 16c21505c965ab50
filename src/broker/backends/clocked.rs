//! Streams driven by the broker's own clock (a timerfd), for backends with no clock of their
//! own (`null`, `wav`). Frames due are computed from integer nanoseconds since START, so a
//! period of 5.5 ms or 10.67 ms never drifts by rounding.
//!
//! Every timer-driven stream (these and ALSA's) runs on the broker's [`TimerThread`] while it
//! plays, so that no control work on the broker's loop can delay a tick.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use rustix::event::{eventfd, EventfdFlags};

use super::{gain, BackendStream, RingPort, StreamRing, StreamSpec, Wake, XrunEdge};
use virtio_snd::control::PcmParams;
use vsound_shared::ring::RingError;

/// Largest chunk moved between the ring and the sink or source in one copy.
const SCRATCH_BYTES: usize = 64 * 1024;

/// A sink (playback) or source (capture) of frames with no clock of its own.
pub trait ClockedIo: Send {
    /// Playback: the frames the clock says are being played now.
    fn play(&mut self, frames: &[u8]) -> io::Result<()>;
    /// Capture: fills `out` with the frames captured now.
    fn capture(&mut self, out: &mut [u8]) -> io::Result<()>;
    /// The stream paused (STOP): a chance to flush.
    fn pause(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub struct ClockedStream {
    params: PcmParams,
    port: RingPort,
    io: Box<dyn ClockedIo>,
    timer: TimerFd,
    running: bool,
    clock_start: Instant,
    /// Frames the clock has accounted for since `clock_start`.
    frames_done: u64,
    xrun: XrunEdge,
    scratch: Vec<u8>,
}

impl ClockedStream {
    pub fn new(spec: &StreamSpec, port: RingPort, io: Box<dyn ClockedIo>) -> io::Result<Self> {
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        let capacity = port.ring.shared().capacity() as usize;
        Ok(ClockedStream {
            params: spec.params,
            port,
            io,
            timer,
            running: false,
            clock_start: Instant::now(),
            frames_done: 0,
            xrun: XrunEdge::default(),
            scratch: vec![0; SCRATCH_BYTES.min(capacity)],
        })
    }

    /// Moves the frames the clock says are due; returns whether an xrun began.
    fn advance(&mut self) -> Result<bool, RingError> {
        let rate = u128::from(self.params.rate_hz());
        let due_total = (self.clock_start.elapsed().as_nanos() * rate / 1_000_000_000) as u64;
        let due_frames = due_total.saturating_sub(self.frames_done);
        self.frames_done = due_total;
        let frame_bytes = u64::from(self.params.frame_bytes());
        let want = due_frames * frame_bytes;
        // Once per tick: a change made meanwhile applies from the next chunk on.
        let gain = self.port.gain.load();
        let format = self.params.format;
        let chunk_max = (self.scratch.len() as u64 / frame_bytes * frame_bytes).max(frame_bytes);
        let moved = match &mut self.port.ring {
            StreamRing::Playback(consumer) => {
                let available = consumer.available()? / frame_bytes * frame_bytes;
                let total = want.min(available);
                let mut left = total;
                while left > 0 {
                    let n = left.min(chunk_max) as usize;
                    let got = consumer.pop(&mut self.scratch[..n])?;
                    gain::apply(format, gain, &mut self.scratch[..got]);
                    if let Err(e) = self.io.play(&self.scratch[..got]) {
                        log::warn!("clocked backend: playback error: {e}");
                    }
                    left -= got as u64;
                    if got < n {
                        break;
                    }
                }
                total
            }
            StreamRing::Capture(producer) => {
                let free = producer.free()? / frame_bytes * frame_bytes;
                let total = want.min(free);
                let mut left = want;
                let mut stored = 0;
                while left > 0 {
                    let n = left.min(chunk_max) as usize;
                    if let Err(e) = self.io.capture(&mut self.scratch[..n]) {
                        log::warn!("clocked backend: capture error: {e}");
                        self.scratch[..n].fill(0);
                    }
                    gain::apply(format, gain, &mut self.scratch[..n]);
                    // Frames that do not fit are lost (an overrun), as on real hardware.
                    let keep = (total - stored).min(n as u64) as usize;
                    if keep > 0 {
                        producer.push(&self.scratch[..keep])?;
                        stored += keep as u64;
                    }
                    left -= n as u64;
                }
                total
            }
        };
        Ok(self.xrun.update(moved < want))
    }
}

/// Consumes a timerfd's expirations, so that it is not readable again until the next one.
pub(super) fn drain_timer(timer: &TimerFd) {
    let mut expirations = [0u8; 8];
    let _ = rustix::io::read(timer, &mut expirations);
}

impl BackendStream for ClockedStream {
    fn start(&mut self) -> io::Result<()> {
        let period_ns = u64::from(self.params.period_frames()) * 1_000_000_000
            / u64::from(self.params.rate_hz());
        // Wake once a period; what moves is computed from the absolute time, not the ticks.
        let interval = TimeSpec::from_duration(Duration::from_nanos(period_ns.max(1_000_000)));
        self.timer
            .set(Expiration::Interval(interval), TimerSetTimeFlags::empty())?;
        self.running = true;
        self.clock_start = Instant::now();
        self.frames_done = 0;
        self.xrun = XrunEdge::default();
        Ok(())
    }

    fn stop(&mut self) -> io::Result<()> {
        self.running = false;
        self.timer.unset()?;
        self.io.pause()
    }

    fn wake_fd(&self) -> BorrowedFd<'_> {
        self.timer.as_fd()
    }

    fn timer_driven(&self) -> bool {
        true
    }

    fn on_wake(&mut self) -> Result<Wake, RingError> {
        drain_timer(&self.timer);
        if !self.running {
            return Ok(Wake::default());
        }
        let xrun = self.advance()?;
        self.port.moved();
        Ok(Wake { xrun, gain: None })
    }
}

/// Streams the timer thread can run at once: every stream of every worker the broker serves.
pub const TIMER_SLOTS: usize = crate::broker::MAX_CLIENTS * vsound_config::MAX_STREAMS;
/// Xrun reports queued for the broker; more are dropped (a count, not a protocol message).
const XRUN_QUEUE: usize = 256;
/// The epoll token of the thread's command eventfd (slots are `0..TIMER_SLOTS`).
const TOKEN_COMMANDS: u64 = u64::MAX;

/// What the broker asks of the timer thread.
pub enum TimerCommand {
    /// Run this started stream in `slot` (free: the broker hands out slots) until returned.
    Adopt {
        slot: usize,
        key: u64,
        stream: Box<dyn BackendStream>,
    },
    /// Give back the stream in `slot`.
    Return { slot: usize },
}

/// A stream the timer thread gives back: on request, or because its worker broke the ring
/// (`broken`), after which it no longer runs it.
pub struct Returned {
    pub slot: usize,
    pub stream: Box<dyn BackendStream>,
    pub broken: Option<RingError>,
}

/// The broker's timer thread: one epoll for the timerfds of every timer-driven stream that
/// plays (null, wav, ALSA), so that control work on the broker's loop never delays a tick.
///
/// Ownership moves by bounded channels sized for every slot, used only with `try_send` and
/// `try_recv` (preallocated; no lock is taken when nobody blocks on them), and each side wakes
/// the other with an eventfd of its own that nobody else holds. The per-tick path allocates
/// nothing and waits on nothing: it reads the timerfd, moves frames, and wakes the worker.
/// Streams are opened, started, stopped and dropped (ALSA's close may block) on the broker's
/// loop, never here.
pub struct TimerThread {
    /// `None` once dropped: the thread ends when it finds the channel closed.
    commands: Option<SyncSender<TimerCommand>>,
    /// Written after each command; the thread's epoll watches it.
    kick: OwnedFd,
    returned: Receiver<Returned>,
    /// (slot, key) of a stream whose xrun began.
    xruns: Receiver<(usize, u64)>,
    /// Readable when `returned` or `xruns` may hold something; the broker's epoll watches it.
    news: std::sync::Arc<OwnedFd>,
}

impl TimerThread {
    pub fn start() -> io::Result<TimerThread> {
        let (commands, command_rx) = mpsc::sync_channel(2 * TIMER_SLOTS);
        let (returned_tx, returned) = mpsc::sync_channel(TIMER_SLOTS);
        let (xrun_tx, xruns) = mpsc::sync_channel(XRUN_QUEUE);
        let flags = EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC;
        let kick = eventfd(0, flags)?;
        let news = std::sync::Arc::new(eventfd(0, flags)?);
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(&kick, EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_COMMANDS))?;
        let thread_kick = kick.try_clone()?;
        let worker = TimerWorker {
            epoll,
            kick: thread_kick,
            commands: command_rx,
            returned: returned_tx,
            xruns: xrun_tx,
            news: news.clone(),
        };
        std::thread::Builder::new()
            .name("vsound-timer".into())
            .spawn(move || worker.run())?;
        Ok(TimerThread {
            commands: Some(commands),
            kick,
            returned,
            xruns,
            news,
        })
    }

    /// Sends a command; a full queue or a dead thread gives it back.
    pub fn send(&self, command: TimerCommand) -> Result<(), TimerCommand> {
        let Some(commands) = &self.commands else {
            return Err(command);
        };
        match commands.try_send(command) {
            Ok(()) => {
                signal(self.kick.as_fd());
                Ok(())
            }
            Err(TrySendError::Full(c) | TrySendError::Disconnected(c)) => Err(c),
        }
    }

    /// The fd that is readable when the thread has news; read it with [`take_news`].
    ///
    /// [`take_news`]: TimerThread::take_news
    pub fn news_fd(&self) -> BorrowedFd<'_> {
        self.news.as_fd()
    }

    /// Clears the news fd; then drain `xruns` before `returned` (a slot's xrun is queued before
    /// its stream is given back).
    pub fn take_news(&self) {
        let mut counter = [0u8; 8];
        let _ = rustix::io::read(&*self.news, &mut counter);
    }

    pub fn next_xrun(&self) -> Option<(usize, u64)> {
        self.xruns.try_recv().ok()
    }

    pub fn next_returned(&self) -> Option<Returned> {
        self.returned.try_recv().ok()
    }
}

impl Drop for TimerThread {
    fn drop(&mut self) {
        // Closed first, then the thread is woken to find it closed (and drop its streams).
        self.commands = None;
        signal(self.kick.as_fd());
    }
}

/// Adds one to an eventfd we own (never blocks: non-blocking, and nobody else can fill it).
fn signal(fd: BorrowedFd<'_>) {
    let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
}

struct TimerWorker {
    epoll: Epoll,
    kick: OwnedFd,
    commands: Receiver<TimerCommand>,
    returned: SyncSender<Returned>,
    xruns: SyncSender<(usize, u64)>,
    news: std::sync::Arc<OwnedFd>,
}

/// A stream the timer thread runs.
struct Running {
    key: u64,
    stream: Box<dyn BackendStream>,
}

impl TimerWorker {
    fn run(self) {
        crate::realtime::promote_current_thread("timer thread (null, wav and ALSA streams)");
        // Allocated once: the loop below allocates nothing.
        let mut slots: Vec<Option<Running>> = (0..TIMER_SLOTS).map(|_| None).collect();
        let mut events = [EpollEvent::empty(); 64];
        loop {
            let n = match self.epoll.wait(&mut events, EpollTimeout::NONE) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    log::error!("timer thread: epoll: {e}; timer-driven streams stop");
                    return;
                }
            };
            for event in &events[..n] {
                if event.data() == TOKEN_COMMANDS {
                    if !self.take_commands(&mut slots) {
                        // The broker is gone; dropping the streams here is all that is left.
                        return;
                    }
                    continue;
                }
                let slot = event.data() as usize;
                let Some(running) = slots.get_mut(slot).and_then(Option::as_mut) else {
                    continue;
                };
                match running.stream.on_wake() {
                    Ok(wake) => {
                        if wake.xrun && self.xruns.try_send((slot, running.key)).is_ok() {
                            signal(self.news.as_fd());
                        }
                    }
                    Err(e) => {
                        if let Some(running) = slots[slot].take() {
                            self.give_back(slot, running.stream, Some(e));
                        }
                    }
                }
            }
        }
    }

    /// Carries out the queued commands; false once the broker has gone.
    fn take_commands(&self, slots: &mut [Option<Running>]) -> bool {
        let mut counter = [0u8; 8];
        let _ = rustix::io::read(&self.kick, &mut counter);
        loop {
            match self.commands.try_recv() {
                Ok(TimerCommand::Adopt { slot, key, stream }) => {
                    let Some(place) = slots.get_mut(slot) else {
                        continue;
                    };
                    let watch = EpollEvent::new(EpollFlags::EPOLLIN, slot as u64);
                    match self.epoll.add(stream.wake_fd(), watch) {
                        Ok(()) => *place = Some(Running { key, stream }),
                        Err(e) => {
                            let error = RingError::Access(format!("timer thread: epoll: {e}"));
                            self.give_back_unwatched(slot, stream, Some(error));
                        }
                    }
                }
                Ok(TimerCommand::Return { slot }) => {
                    if let Some(running) = slots.get_mut(slot).and_then(Option::take) {
                        self.give_back(slot, running.stream, None);
                    }
                }
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => return false,
            }
        }
    }

    fn give_back(&self, slot: usize, stream: Box<dyn BackendStream>, broken: Option<RingError>) {
        let _ = self.epoll.delete(stream.wake_fd());
        self.give_back_unwatched(slot, stream, broken);
    }

    fn give_back_unwatched(
        &self,
        slot: usize,
        stream: Box<dyn BackendStream>,
        broken: Option<RingError>,
    ) {
        // Never full: it has room for every slot, and a slot is given back once per adoption.
        let returned = Returned {
            slot,
            stream,
            broken,
        };
        if let Err(e) = self.returned.try_send(returned) {
            log::error!("timer thread: cannot give a stream back; dropping it here");
            drop(e);
        }
        signal(self.news.as_fd());
    }
}
