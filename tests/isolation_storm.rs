//! Control storms do not delay another VM's audio: 56 hostile clients (`common::hostile`, its own
//! encoder of the wire format; 7 uids × the per-uid limit) send bursts of legal PREPARE, START
//! and STOP requests as fast as the broker answers, while a real worker, driven by the
//! in-process guest, plays at real time on the null backend. The good stream's worst completion
//! lateness during the storm stays within one period of the baseline measured in the same test,
//! the storming clients are answered `Failed` once over their rate, the broker's fds come back
//! to the baseline, and a fresh worker is served.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::frontend::{FrontendOptions, GuestVm};
use common::hostile::{open_fds, Attack, Attacker, STORM_BURST};
use common::vsound::*;
use vsound::broker::MAX_CONNECTIONS_PER_UID;
use vsound::protocol as p;

/// The ignored test an `Attacker` runs.
const ATTACKER: &str = "attacker";
/// First uid of the attackers.
const ATTACKER_UID: u32 = 41_000;
/// Uids storming, each with the most connections the broker allows one uid: 56 clients.
const STORM_UIDS: u32 = 7;
/// Periods the good stream plays for each measurement (10 ms each).
const BASELINE_PERIODS: usize = 150;
const STORM_PERIODS: usize = 400;

/// The attackers run as uids of their own (the per-uid connection limit), so the test needs
/// root to start them.
fn can_switch_uids() -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    if !root {
        eprintln!("skipped: the attackers need uids of their own (run as root)");
    }
    root
}

/// Run by `Attacker` as another uid; does nothing otherwise.
#[test]
#[ignore]
fn attacker() {
    common::hostile::run_attacker();
}

fn fresh_worker(dir: &Path, name: &str, broker: &Path) -> (Proc, GuestVm) {
    let (worker, socket) = spawn_worker(dir, name, broker, None);
    let vm = GuestVm::connect(&socket, FrontendOptions::default()).expect("connect to the worker");
    (worker, vm)
}

/// Plays `periods` periods and returns the worst lateness of a completion against the end of
/// its period in real time (buffer i ends i + 1 periods after START).
fn worst_lateness(vm: &mut GuestVm, params: &Params, periods: usize) -> Duration {
    prepare(vm, params);
    let data = pattern(params.period_bytes as usize * periods, periods as u32);
    let (started, done) = play(vm, params, &data);
    assert_eq!(done.len(), periods);
    assert!(done.iter().all(|c| c.status == 0x8000), "tx statuses OK");
    assert_eq!(control(vm, &pcm(p::R_PCM_STOP, params.stream)), 0x8000);
    assert_eq!(control(vm, &pcm(p::R_PCM_RELEASE, params.stream)), 0x8000);
    let period = params.period();
    done.iter()
        .enumerate()
        .map(|(i, c)| (c.at - started).saturating_sub(period * (i as u32 + 1)))
        .max()
        .unwrap()
}

/// The broker's open fds once they settled.
fn settled_fds(pid: u32) -> usize {
    let mut last = open_fds(pid);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = open_fds(pid);
        if now == last {
            return now;
        }
        last = now;
    }
}

fn wait_fds(pid: u32, baseline: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = open_fds(pid);
        if now == baseline || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_control_storm_does_not_delay_another_vms_stream() {
    if !can_switch_uids() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut broker, socket) = spawn_broker(dir.path(), None);
    let (_worker, mut vm) = fresh_worker(dir.path(), "good", &socket);
    let params = Params::s16_48k(0);
    let period = params.period();
    let baseline = worst_lateness(&mut vm, &params, BASELINE_PERIODS);
    let baseline_fds = settled_fds(broker.pid());

    let mut attackers: Vec<Attacker> = (0..STORM_UIDS)
        .map(|i| {
            Attacker::spawn(
                ATTACKER,
                ATTACKER_UID + i,
                &socket,
                Attack::Storm,
                MAX_CONNECTIONS_PER_UID,
            )
        })
        .collect();
    let clients: usize = attackers.iter_mut().map(|a| a.numbers("storming")[0]).sum();
    let storm_start = Instant::now();
    let stormed = worst_lateness(&mut vm, &params, STORM_PERIODS);
    for attacker in &mut attackers {
        attacker.tell("end");
    }
    let replies: Vec<Vec<usize>> = attackers.iter_mut().map(|a| a.numbers("replies")).collect();
    let storm_time = storm_start.elapsed();
    let [succeeded, failed, missing] = replies.iter().fold([0; 3], |sum, r| {
        [sum[0] + r[0], sum[1] + r[1], sum[2] + r[2]]
    });
    // A fresh worker is served right after the storm.
    let (_fresh, mut fresh_vm) = fresh_worker(dir.path(), "fresh", &socket);
    let _ = worst_lateness(&mut fresh_vm, &params, 5);
    for attacker in attackers {
        attacker.end();
    }
    drop(fresh_vm);
    let after = wait_fds(broker.pid(), baseline_fds);

    let allowed = period + baseline;
    eprintln!(
        "control storm: {clients} clients for {storm_time:?} ({STORM_BURST}-request bursts): \
         {succeeded} requests succeeded, {failed} answered Failed, {missing} unanswered; good \
         stream's worst completion lateness {stormed:?} during the storm, {baseline:?} \
         baseline (allowed {allowed:?}); broker fds {baseline_fds} baseline, {after} after"
    );
    assert_eq!(clients, STORM_UIDS as usize * MAX_CONNECTIONS_PER_UID);
    assert!(broker.is_running());
    assert!(
        stormed <= allowed,
        "the good stream stalled {stormed:?} during the storm (baseline {baseline:?})"
    );
    assert!(failed > 0, "the storming clients were rate-limited");
    assert_eq!(missing, 0, "every request answered");
    assert_eq!(after, baseline_fds, "broker fds back to the baseline");
}
