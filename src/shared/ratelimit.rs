//! Rate limit for the log lines a guest (or a worker, in the broker) can trigger at will
//! (malformed chains, republished heads, unwritable buffers; connections broken or dropped): it
//! must not be able to fill the host's journal or keep a thread busy formatting lines. The first few lines of each period are logged; the rest
//! are only counted, and the count is logged once the period is over.

use std::time::{Duration, Instant};

/// Lines logged per period before the limiter starts counting instead.
pub const GUEST_LOG_BURST: u32 = 8;
/// Length of one period.
pub const GUEST_LOG_PERIOD: Duration = Duration::from_secs(5);

/// Admits at most `burst` lines per `period` and counts the others (a counter: nothing is
/// allocated or formatted for a suppressed line).
#[derive(Debug)]
pub struct LogLimiter {
    /// Whose lines these are, for the count of suppressed ones.
    what: &'static str,
    burst: u32,
    period: Duration,
    period_start: Option<Instant>,
    admitted: u32,
    suppressed: u64,
}

impl Default for LogLimiter {
    fn default() -> Self {
        LogLimiter::new(GUEST_LOG_BURST, GUEST_LOG_PERIOD)
    }
}

impl LogLimiter {
    /// A limiter of guest-triggered lines.
    pub const fn new(burst: u32, period: Duration) -> LogLimiter {
        LogLimiter::named("guest-triggered", burst, period)
    }

    /// A limiter of `what` lines ("worker-triggered", ...).
    pub const fn named(what: &'static str, burst: u32, period: Duration) -> LogLimiter {
        LogLimiter {
            what,
            burst,
            period,
            period_start: None,
            admitted: 0,
            suppressed: 0,
        }
    }

    /// Whether one more line may be logged now. The first call of a new period first logs how
    /// many lines the previous one suppressed.
    pub fn admit(&mut self, now: Instant) -> bool {
        let period_over = self
            .period_start
            .is_none_or(|start| now.saturating_duration_since(start) >= self.period);
        if period_over {
            self.report_suppressed();
            self.period_start = Some(now);
            self.admitted = 0;
        }
        if self.admitted < self.burst {
            self.admitted += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// Logs the count of the lines a finished period suppressed, so that it appears even when
    /// no further line comes (the device calls this after every event).
    pub fn report_if_due(&mut self, now: Instant) {
        let period_over = self
            .period_start
            .is_some_and(|start| now.saturating_duration_since(start) >= self.period);
        if period_over && self.suppressed > 0 {
            self.report_suppressed();
            self.period_start = None;
        }
    }

    /// Lines counted but not logged since the last report.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }

    /// Logs the count of suppressed lines, if there are any, and resets it.
    pub fn report_suppressed(&mut self) {
        let suppressed = std::mem::take(&mut self.suppressed);
        if suppressed > 0 {
            log::warn!(
                "{suppressed} more {} log lines suppressed (at most {} per {:?})",
                self.what,
                self.burst,
                self.period
            );
        }
    }
}

/// `guest_log!(limiter, level, format, args...)`: logs like `log::log!` if the logger would
/// keep the line and `limiter` admits it. A line the logger filters out costs no budget.
#[macro_export]
macro_rules! guest_log {
    ($limiter:expr, $level:expr, $($arg:tt)+) => {{
        let level: ::log::Level = $level;
        if ::log::log_enabled!(level) && $limiter.admit(::std::time::Instant::now()) {
            ::log::log!(level, $($arg)+);
        }
    }};
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_a_burst_per_period_and_counts_the_rest() {
        let mut limiter = LogLimiter::new(3, Duration::from_secs(1));
        let start = Instant::now();
        let admitted = (0..100).filter(|_| limiter.admit(start)).count();
        assert_eq!(admitted, 3);
        assert_eq!(limiter.suppressed(), 97);
        // Still within the period.
        assert!(!limiter.admit(start + Duration::from_millis(999)));
        assert_eq!(limiter.suppressed(), 98);
        // A new period: the count is reported (and reset), a new burst is admitted.
        assert!(limiter.admit(start + Duration::from_secs(1)));
        assert_eq!(limiter.suppressed(), 0);
        let later = start + Duration::from_secs(1);
        assert_eq!((0..10).filter(|_| limiter.admit(later)).count(), 2);
        assert_eq!(limiter.suppressed(), 8);
        // With no further line, the count is reported once the period is over, not before.
        limiter.report_if_due(later + Duration::from_millis(500));
        assert_eq!(limiter.suppressed(), 8);
        limiter.report_if_due(later + Duration::from_secs(1));
        assert_eq!(limiter.suppressed(), 0);
        // And the next line starts a fresh period.
        let next = later + Duration::from_secs(1);
        assert_eq!((0..5).filter(|_| limiter.admit(next)).count(), 3);
    }

    #[test]
    fn a_clock_going_backwards_does_not_reopen_the_period() {
        let start = Instant::now() + Duration::from_secs(10);
        let mut limiter = LogLimiter::new(1, Duration::from_secs(1));
        assert!(limiter.admit(start));
        assert!(!limiter.admit(start - Duration::from_secs(5)));
    }
}
