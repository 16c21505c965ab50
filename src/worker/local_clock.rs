//! The worker's own stream clock, used while the broker is away (it died or restarts): a running
//! playback stream consumes its buffers at its real-time rate (the audio is dropped) and a
//! running capture stream produces silence at that rate, so the guest driver, which advances its
//! period pointer on completions, neither hangs nor runs fast. Positions are byte counts; the
//! clock counts whole frames from integer nanoseconds since its anchor, like the broker's.

use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

use virtio_snd::control::PcmParams;

const NS_PER_S: u128 = 1_000_000_000;

/// A stream paced by the worker alone.
#[derive(Debug)]
pub struct LocalClock {
    frame_bytes: u64,
    rate: u64,
    /// When the clock last (re)started and its position then; `None` while stopped.
    anchor: Option<(Instant, u64)>,
    /// The position while stopped.
    stopped_at: u64,
    /// Playback: end of the bytes queued so far. Capture: bytes handed to rx buffers so far.
    fed: u64,
    /// Capture: at most this many produced bytes wait for an rx buffer; older ones are dropped
    /// (an overrun), as a full ring would drop them.
    capture_limit: u64,
}

impl LocalClock {
    pub fn new(params: &PcmParams) -> LocalClock {
        LocalClock {
            frame_bytes: u64::from(params.frame_bytes()).max(1),
            rate: u64::from(params.rate_hz()).max(1),
            anchor: None,
            stopped_at: 0,
            fed: 0,
            capture_limit: u64::from(params.buffer_bytes),
        }
    }

    pub fn start(&mut self, now: Instant) {
        if self.anchor.is_none() {
            self.anchor = Some((now, self.stopped_at));
        }
    }

    pub fn stop(&mut self, now: Instant) {
        self.stopped_at = self.position(now);
        self.anchor = None;
    }

    /// Bytes the clock has moved in all, in whole frames.
    fn position(&self, now: Instant) -> u64 {
        match self.anchor {
            Some((since, at)) => {
                let ns = now.saturating_duration_since(since).as_nanos();
                let frames = ns * u128::from(self.rate) / NS_PER_S;
                at.saturating_add(
                    u64::try_from(frames)
                        .unwrap_or(u64::MAX)
                        .saturating_mul(self.frame_bytes),
                )
            }
            None => self.stopped_at,
        }
    }

    /// Restarts the clock's count at `pos` from `now` (when it ran out of data or overran).
    fn rebase(&mut self, now: Instant, pos: u64) {
        self.stopped_at = pos;
        if self.anchor.is_some() {
            self.anchor = Some((now, pos));
        }
    }

    /// When the clock reaches `pos` (rounded up to the frame), if it runs.
    pub fn when(&self, pos: u64) -> Option<Instant> {
        let (since, at) = self.anchor?;
        let frames = pos.saturating_sub(at).div_ceil(self.frame_bytes);
        let ns = (u128::from(frames) * NS_PER_S).div_ceil(u128::from(self.rate));
        Some(since + Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX)))
    }

    /// Playback: queues `len` bytes; returns the position just past them.
    pub fn queue(&mut self, len: u64) -> u64 {
        self.fed = self.fed.saturating_add(len);
        self.fed
    }

    /// Playback: bytes played so far. A clock that ran out of queued bytes does not bank the
    /// time: the next bytes play from now, as a real device after an underrun.
    pub fn played(&mut self, now: Instant) -> u64 {
        let pos = self.position(now);
        if pos > self.fed {
            self.rebase(now, self.fed);
            return self.fed;
        }
        pos
    }

    /// Playback: bytes queued and not yet played.
    pub fn queued(&mut self, now: Instant) -> u64 {
        self.fed - self.played(now)
    }

    /// Capture: bytes produced and not yet taken, at most the capture limit.
    pub fn captured(&mut self, now: Instant) -> u64 {
        let pos = self.position(now);
        let waiting = pos.saturating_sub(self.fed);
        if waiting > self.capture_limit {
            self.fed = pos - self.capture_limit;
        }
        pos.saturating_sub(self.fed)
    }

    /// Capture: `len` produced bytes were handed to the guest.
    pub fn take(&mut self, len: u64) {
        self.fed = self.fed.saturating_add(len);
    }

    /// Capture: when `len` more bytes than those taken so far will have been produced.
    pub fn when_captured(&self, len: u64) -> Option<Instant> {
        self.when(self.fed.saturating_add(len))
    }
}

/// A one-shot monotonic timer the device's epoll watches.
pub struct WakeTimer {
    fd: TimerFd,
    armed_for: Option<Instant>,
}

impl AsFd for WakeTimer {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl WakeTimer {
    pub fn new() -> nix::Result<WakeTimer> {
        Ok(WakeTimer {
            fd: TimerFd::new(
                ClockId::CLOCK_MONOTONIC,
                TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
            )?,
            armed_for: None,
        })
    }

    /// Fires once at `at` (at once if it has passed); `None` disarms. Re-arming for the same
    /// instant makes no system call.
    pub fn arm(&mut self, at: Option<Instant>) {
        if at == self.armed_for {
            return;
        }
        let result = match at {
            Some(at) => {
                // A zero expiry would disarm the timer: wait at least a nanosecond.
                let wait = at
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_nanos(1));
                self.fd.set(
                    Expiration::OneShot(TimeSpec::from_duration(wait)),
                    TimerSetTimeFlags::empty(),
                )
            }
            None => self.fd.unset(),
        };
        match result {
            Ok(()) => self.armed_for = at,
            Err(e) => log::error!("cannot arm a timer: {e}"),
        }
    }

    /// Consumes an expiry, so the fd is not readable again until the next one.
    pub fn clear(&mut self) {
        let mut count = [0u8; 8];
        if rustix::io::read(&self.fd, &mut count).is_ok() {
            self.armed_for = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_snd::protocol::{format, rate};

    fn params() -> PcmParams {
        PcmParams {
            buffer_bytes: 4 * 1920,
            period_bytes: 1920,
            features: 0,
            channels: 2,
            format: format::S16,
            rate: rate::R48000,
        }
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn playback_plays_at_the_rate_and_never_ahead_of_the_queue() {
        let mut clock = LocalClock::new(&params());
        let t0 = Instant::now();
        let end = clock.queue(1920);
        assert_eq!(clock.played(t0 + 20 * MS), 0, "not started");
        clock.start(t0);
        assert_eq!(clock.played(t0 + 5 * MS), 960);
        assert_eq!(clock.when(end), Some(t0 + 10 * MS));
        assert_eq!(clock.played(t0 + 30 * MS), 1920, "capped at the queue");
        // The underrun is not banked: the next period takes a full period from its arrival.
        let end = clock.queue(1920);
        assert_eq!(clock.when(end), Some(t0 + 40 * MS));
        assert_eq!(clock.queued(t0 + 35 * MS), 960);
    }

    #[test]
    fn a_stopped_clock_keeps_its_position() {
        let mut clock = LocalClock::new(&params());
        let t0 = Instant::now();
        clock.queue(19200);
        clock.start(t0);
        clock.stop(t0 + 10 * MS);
        assert_eq!(clock.played(t0 + 50 * MS), 1920);
        assert_eq!(clock.when(3840), None);
        clock.start(t0 + 50 * MS);
        assert_eq!(clock.when(3840), Some(t0 + 60 * MS));
    }

    #[test]
    fn odd_periods_do_not_drift() {
        // 1056-byte periods (5.5 ms): a thousand of them end at exactly 5.5 s.
        let mut clock = LocalClock::new(&params());
        let t0 = Instant::now();
        clock.start(t0);
        let end = clock.queue(1056 * 1000);
        assert_eq!(clock.when(end), Some(t0 + Duration::from_millis(5500)));
    }

    #[test]
    fn capture_produces_at_the_rate_and_drops_what_waits_too_long() {
        let mut clock = LocalClock::new(&params());
        let t0 = Instant::now();
        clock.start(t0);
        assert_eq!(clock.captured(t0 + 10 * MS), 1920);
        clock.take(1920);
        assert_eq!(clock.when_captured(1920), Some(t0 + 20 * MS));
        // A second with nobody reading: only the capture limit (the buffer) is kept.
        assert_eq!(clock.captured(t0 + 1010 * MS), 4 * 1920);
        clock.take(4 * 1920);
        assert_eq!(clock.captured(t0 + 1010 * MS), 0);
        assert_eq!(clock.when_captured(1920), Some(t0 + 1020 * MS));
    }
}
