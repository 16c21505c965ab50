//! Real-time scheduling for the broker's audio threads, where the host allows it.
//!
//! A car's host gives its audio path real-time priority, so that a busy CPU (a VM's vCPUs, a
//! build) cannot make a period late. The broker asks for SCHED_FIFO at PipeWire's client
//! priority for the threads that move frames on the audio clock: its timer thread (null, wav,
//! ALSA) asks here, and PipeWire's data thread asks through PipeWire's own module-rt. Either
//! is granted only within RLIMIT_RTPRIO (the unit sets `LimitRTPRIO=`, and `LimitRTTIME=` so
//! that a real-time thread that never sleeps is stopped); otherwise the thread runs at normal
//! priority. Each outcome is logged once, with the limits that decided it.

use std::sync::atomic::{AtomicU32, Ordering};

use nix::sys::resource::{getrlimit, Resource, RLIM_INFINITY};
use thread_priority::unix::{
    set_thread_priority_and_policy, thread_native_id, thread_schedule_policy_param,
    RealtimeThreadSchedulePolicy, ThreadSchedulePolicy,
};
use thread_priority::{ThreadPriority, ThreadPriorityValue};

/// The SCHED_FIFO priority asked for: PipeWire's module-rt gives its clients' data threads 83
/// (the daemon's own runs at 88, above them).
pub const PRIORITY: u8 = 83;

/// How long a real-time thread of the broker may run without sleeping: past the soft limit
/// the kernel sends SIGXCPU (the broker ends, its unit restarts it, the workers reconnect),
/// past the hard one SIGKILL. Its audio threads sleep every period, so only a runaway thread
/// gets there; without this a compromised or looping real-time broker could hold a CPU.
pub const RTTIME_SOFT_US: u64 = 200_000;
pub const RTTIME_HARD_US: u64 = 1_000_000;

/// Bounds RLIMIT_RTTIME at [`RTTIME_SOFT_US`] / [`RTTIME_HARD_US`] where nothing bounded it
/// (the unit's `LimitRTTIME=` does; a broker started by hand may have none). Lowering a limit
/// needs no privilege; a tighter limit from the host is kept.
pub fn bound_realtime_cpu() {
    use nix::sys::resource::setrlimit;
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_RTTIME) else {
        return;
    };
    let new_hard = hard.min(RTTIME_HARD_US);
    let new_soft = soft.min(RTTIME_SOFT_US).min(new_hard);
    if (new_soft, new_hard) != (soft, hard) {
        if let Err(e) = setrlimit(Resource::RLIMIT_RTTIME, new_soft, new_hard) {
            log::warn!("broker: cannot bound RLIMIT_RTTIME: {e}");
        }
    }
}

/// A thread's scheduling, as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheduling {
    pub realtime: bool,
    pub priority: i32,
}

impl std::fmt::Display for Scheduling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.realtime {
            write!(f, "real-time priority {}", self.priority)
        } else {
            f.write_str("normal priority")
        }
    }
}

/// The calling thread's scheduling (two system calls, no allocation: safe on an audio thread).
pub fn current() -> Option<Scheduling> {
    let (policy, params) = thread_schedule_policy_param(thread_native_id()).ok()?;
    Some(Scheduling {
        realtime: matches!(policy, ThreadSchedulePolicy::Realtime(_)),
        priority: params.sched_priority,
    })
}

/// The limits that decide whether an unprivileged thread may become real-time, for the log.
pub fn limits() -> String {
    let show = |resource, unit: &str| match getrlimit(resource) {
        Ok((soft, _)) if soft == RLIM_INFINITY => "unlimited".to_string(),
        Ok((soft, _)) => format!("{soft}{unit}"),
        Err(e) => format!("unknown ({e})"),
    };
    format!(
        "RLIMIT_RTPRIO {}, RLIMIT_RTTIME {}",
        show(Resource::RLIMIT_RTPRIO, ""),
        show(Resource::RLIMIT_RTTIME, " us")
    )
}

/// Asks SCHED_FIFO at [`PRIORITY`] for the calling thread and logs what it got: `what` names
/// the thread. A refusal leaves it as it was.
pub fn promote_current_thread(what: &str) -> Option<Scheduling> {
    let asked = ThreadPriorityValue::try_from(PRIORITY).map(ThreadPriority::Crossplatform);
    let result = match asked {
        Ok(priority) => set_thread_priority_and_policy(
            thread_native_id(),
            priority,
            ThreadSchedulePolicy::Realtime(RealtimeThreadSchedulePolicy::Fifo),
        )
        .map_err(|e| match e {
            thread_priority::Error::OS(code) => nix::errno::Errno::from_raw(code).to_string(),
            other => format!("{other:?}"),
        }),
        Err(e) => Err(e.to_string()),
    };
    let now = current();
    let shown = now.map_or("unknown scheduling".to_string(), |s| s.to_string());
    match result {
        Ok(()) => log::info!("broker: the {what} runs at {shown} (SCHED_FIFO)"),
        Err(e) => log::info!(
            "broker: real-time priority {PRIORITY} refused for the {what} ({e}; {}): it runs \
             at {shown}",
            limits()
        ),
    }
    now
}

/// What PipeWire's data thread got, recorded by its first cycle for the broker to log
/// ([`take_data_thread_report`]): 0 while unknown, else the priority + 1, high bit set for a
/// real-time policy.
static DATA_THREAD: AtomicU32 = AtomicU32::new(0);
const REALTIME_BIT: u32 = 1 << 31;
/// Set once the report was logged.
const LOGGED: u32 = u32::MAX;

/// Called on PipeWire's data thread by every stream's first cycle: records its scheduling
/// once (no allocation, no lock, no log: it is the real-time thread).
pub fn record_data_thread() {
    if DATA_THREAD.load(Ordering::Relaxed) != 0 {
        return;
    }
    if let Some(now) = current() {
        let value = (now.priority.clamp(0, 1 << 16) as u32 + 1)
            | if now.realtime { REALTIME_BIT } else { 0 };
        let _ = DATA_THREAD.compare_exchange(0, value, Ordering::AcqRel, Ordering::Relaxed);
    }
}

/// Logs, once, what PipeWire's data thread runs at (once a stream has run a cycle).
pub fn take_data_thread_report() {
    let value = DATA_THREAD.load(Ordering::Acquire);
    if value == 0 || value == LOGGED {
        return;
    }
    if DATA_THREAD
        .compare_exchange(value, LOGGED, Ordering::AcqRel, Ordering::Relaxed)
        .is_err()
    {
        return;
    }
    let scheduling = Scheduling {
        realtime: value & REALTIME_BIT != 0,
        priority: (value & !REALTIME_BIT) as i32 - 1,
    };
    if scheduling.realtime {
        log::info!("broker: PipeWire's data thread runs at {scheduling} (module-rt)");
    } else {
        log::info!(
            "broker: PipeWire's data thread runs at {scheduling}: its module-rt got no \
             real-time priority ({})",
            limits()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_or_granted_request_leaves_a_consistent_thread() {
        // On its own thread, so the test runner's threads keep their scheduling.
        let got = std::thread::spawn(|| {
            let before = current().expect("the kernel reports a thread's scheduling");
            let after = promote_current_thread("test thread").expect("scheduling after");
            (before, after)
        })
        .join()
        .unwrap();
        let (before, after) = got;
        // Granted: SCHED_FIFO at the priority asked; refused: as it was.
        assert!(
            after
                == Scheduling {
                    realtime: true,
                    priority: i32::from(PRIORITY)
                }
                || after == before,
            "{before:?} became {after:?}"
        );
    }

    #[test]
    fn the_limits_name_both_resources() {
        let shown = limits();
        assert!(
            shown.contains("RLIMIT_RTPRIO ") && shown.contains("RLIMIT_RTTIME "),
            "{shown}"
        );
    }
}
