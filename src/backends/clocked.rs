//! Streams driven by the broker's own clock (a timerfd), for backends with no clock of their
//! own (`null`, `wav`). Frames due are computed from integer nanoseconds since START, so a
//! period of 5.5 ms or 10.67 ms never drifts by rounding.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

use super::{BackendStream, RingPort, StreamRing, StreamSpec, Wake, XrunEdge};
use crate::control::PcmParams;
use crate::ring::RingError;

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
        let chunk_max = (self.scratch.len() as u64 / frame_bytes * frame_bytes).max(frame_bytes);
        let moved = match &mut self.port.ring {
            StreamRing::Playback(consumer) => {
                let available = consumer.available()? / frame_bytes * frame_bytes;
                let total = want.min(available);
                let mut left = total;
                while left > 0 {
                    let n = left.min(chunk_max) as usize;
                    let got = consumer.pop(&mut self.scratch[..n])?;
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

    fn on_wake(&mut self) -> Result<Wake, RingError> {
        drain_timer(&self.timer);
        if !self.running {
            return Ok(Wake::default());
        }
        let xrun = self.advance()?;
        self.port.notify_worker();
        Ok(Wake { xrun })
    }
}
