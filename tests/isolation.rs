//! One VM's compromised worker cannot lock other VMs out of the broker or drain its fds: a
//! hostile client (`common::hostile`, its own encoder of the wire format) attacks the broker
//! while a real worker, driven by the in-process guest, plays at real time on the null backend.
//! Each test checks that the broker refuses or drops the attacker and frees what it held (its fd
//! count back to the baseline, its memory within 1 MiB of it), serves a fresh worker, and that the good stream's worst
//! completion lateness stays within one period of the baseline measured in the same test.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::frontend::{FrontendOptions, GuestVm};
use common::hostile::{
    open_fds, rss_kib, unique_vm_name, Attack, Attacker, Hostile, Reply, DEFAULT_LAYOUT,
    PREPARES_UNREAD, PROTOCOL_VERSION,
};
use common::vsound::*;
use virtio_snd::protocol as p;
use vsound_broker::broker::{
    HELLO_DEADLINE, MAX_CONNECTIONS_PER_UID, MAX_PENDING, UNREAD_REPLY_DEADLINE,
};

/// One attack at a time: the figures compare against a baseline, and 2 loaded cores are enough
/// noise without the other attacks.
static SERIAL: Mutex<()> = Mutex::new(());

const REPLY: Duration = Duration::from_secs(5);
/// Slack for 2 loaded cores on top of a deadline.
const SLACK: Duration = Duration::from_secs(2);
/// What the broker's resident memory may keep of an attack once it is over: the allocator keeps
/// some freed memory, but what an attacker held (its connections, streams, rings) is freed.
const RSS_SLACK_KIB: u64 = 1024;
/// A connection the broker is accepting (or refusing) when its fds are counted.
const MID_ACCEPT: usize = 1;

/// The attackers run as uids of their own (SO_PEERCRED tells them from the test's workers), so
/// the tests need root to start them.
fn can_switch_uids() -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    if !root {
        eprintln!("skipped: the attackers need uids of their own (run as root)");
    }
    root
}

/// The ignored test an `Attacker` runs.
const ATTACKER: &str = "attacker";
/// First uid of the attackers.
const ATTACKER_UID: u32 = 40_000;

/// The good stream's worst completion lateness and the broker's fds and RSS with no attack,
/// and the fds the good stream adds while prepared.
struct Baseline {
    lateness: Duration,
    fds: usize,
    rss: u64,
    stream_fds: usize,
}

/// A broker and one good worker with its guest.
struct Stage {
    dir: tempfile::TempDir,
    broker: Proc,
    socket: PathBuf,
    _worker: Proc,
    vm: GuestVm,
    params: Params,
}

impl Stage {
    fn start() -> Stage {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("broker.log");
        let (broker, socket) = spawn_broker_logging(dir.path(), None, &[], Some(&log));
        let (worker, vm) = fresh_worker(dir.path(), "good", &socket);
        Stage {
            dir,
            broker,
            socket,
            _worker: worker,
            vm,
            params: Params::s16_48k(0),
        }
    }

    fn pid(&self) -> u32 {
        self.broker.pid()
    }

    /// The figures an attack is measured against, before it starts.
    fn baseline(&mut self) -> Baseline {
        let params = self.params;
        Baseline {
            lateness: worst_lateness(&mut self.vm, &params, 100),
            fds: self.settled_fds(),
            rss: rss_kib(self.pid()),
            // The good stream is prepared while the attack runs.
            stream_fds: self.stream_fds(),
        }
    }

    fn broker_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default()
    }

    /// The broker's open fds once they settled (a stream being prepared or dropped moves them).
    fn settled_fds(&self) -> usize {
        let mut last = open_fds(self.pid());
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let now = open_fds(self.pid());
            if now == last {
                return now;
            }
            last = now;
        }
    }

    /// What the good stream costs the broker in fds while prepared.
    fn stream_fds(&mut self) -> usize {
        let idle = self.settled_fds();
        let params = self.params;
        prepare(&mut self.vm, &params);
        let prepared = self.settled_fds();
        assert_eq!(control(&mut self.vm, &pcm(p::R_PCM_RELEASE, 0)), 0x8000);
        prepared.saturating_sub(idle)
    }

    /// The broker's RSS once the attack is over is within [`RSS_SLACK_KIB`] of `baseline`.
    fn assert_memory_back(&self, what: &str, baseline: u64) {
        let after = rss_kib(self.pid());
        eprintln!("{what}: broker RSS {baseline} KiB baseline, {after} KiB after the attack");
        assert!(
            after <= baseline + RSS_SLACK_KIB,
            "{what}: the broker kept {} KiB after the attack",
            after.saturating_sub(baseline)
        );
    }

    /// Waits until the broker holds `baseline` fds again; what it held at the end.
    fn wait_fds(&self, baseline: usize) -> usize {
        let deadline = Instant::now() + SLACK * 2;
        loop {
            let now = open_fds(self.pid());
            if now == baseline || Instant::now() > deadline {
                return now;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
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

/// No stall beyond one period plus the jitter the same stream showed without the attack (the
/// baseline's worst, and at least 10 ms: a scheduling quantum of 2 loaded cores).
fn assert_kept_pace(what: &str, baseline: Duration, attacked: Duration, period: Duration) {
    let allowed = period + baseline.max(Duration::from_millis(10)) * 2;
    eprintln!(
        "{what}: good stream's worst completion lateness {attacked:?} under attack, \
         {baseline:?} baseline (allowed {allowed:?})"
    );
    assert!(
        attacked <= allowed,
        "{what}: the good stream stalled {attacked:?} (baseline {baseline:?})"
    );
}

/// A fresh legitimate worker is served: its guest's PREPARE (a Prepared with two fds from the
/// broker) succeeds and a few periods play.
fn fresh_worker_plays(dir: &Path, name: &str, broker: &Path) {
    let (_worker, mut vm) = fresh_worker(dir, name, broker);
    let params = Params::s16_48k(0);
    let _ = worst_lateness(&mut vm, &params, 5);
}

/// Run by `Attacker` as another uid; does nothing otherwise.
#[test]
#[ignore]
fn attacker() {
    common::hostile::run_attacker();
}

#[test]
fn a_worker_that_never_reads_its_replies_cannot_drain_the_brokers_fds() {
    if !can_switch_uids() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut stage = Stage::start();
    // A limit the attack would pass many times over if the broker kept answering it (640 fds
    // in flight): every other worker's PREPARE would then fail with ETOOMANYREFS.
    let limit = rustix::process::Rlimit {
        current: Some(256),
        maximum: Some(256),
    };
    rustix::process::prlimit(
        rustix::process::Pid::from_raw(stage.pid() as i32),
        rustix::process::Resource::Nofile,
        limit,
    )
    .unwrap();
    let params = stage.params;
    let Baseline {
        lateness: baseline_lateness,
        fds: baseline_fds,
        rss: baseline_rss,
        stream_fds,
    } = stage.baseline();

    let socket = stage.socket.clone();
    let dir = stage.dir.path().to_path_buf();
    let pid = stage.pid();
    let attack = std::thread::spawn(move || {
        let mut attacker = Attacker::spawn(
            ATTACKER,
            ATTACKER_UID,
            &socket,
            Attack::NeverRead,
            MAX_CONNECTIONS_PER_UID,
            DEFAULT_LAYOUT,
        );
        let sent = attacker.numbers("sent")[0];
        std::thread::sleep(Duration::from_millis(300));
        let during = open_fds(pid);
        // Each connection is dropped once a request waited too long behind its unread reply.
        let hang_ups = attacker.durations("hangups");
        let after_drop = open_fds(pid);
        // Its unread fds still count against its uid: no new connection.
        let extra = attacker.report("extra");
        // A fresh worker of another uid is served all along.
        fresh_worker_plays(&dir, "fresh", &socket);
        // The attacker ends: everything it held is freed.
        attacker.end();
        (sent, during, hang_ups, after_drop, extra)
    });
    let attacked_lateness = worst_lateness(&mut stage.vm, &params, 500);
    let (sent, during, hang_ups, after_drop, extra) = attack.join().unwrap();
    let after = stage.wait_fds(baseline_fds);
    let dropped: Vec<Duration> = hang_ups.iter().flatten().copied().collect();
    eprintln!(
        "never-reading worker: {sent} PREPAREs sent on {MAX_CONNECTIONS_PER_UID} connections; \
         dropped after {:?} to {:?}; broker fds {baseline_fds} baseline (+{stream_fds} for the \
         good stream while it plays), {during} during, \
         {after_drop} after the drop (the attacker holding its sockets), {after} after it \
         closed them; one more connection: {extra}",
        dropped.iter().min(),
        dropped.iter().max(),
    );
    assert_eq!(sent, MAX_CONNECTIONS_PER_UID * PREPARES_UNREAD);
    assert_eq!(
        dropped.len(),
        MAX_CONNECTIONS_PER_UID,
        "every connection dropped"
    );
    assert!(dropped.iter().all(|t| *t >= UNREAD_REPLY_DEADLINE));
    // A stream and its socket per connection at most, not two fds per request.
    assert!(
        during <= baseline_fds + stream_fds + 4 * MAX_CONNECTIONS_PER_UID + MID_ACCEPT,
        "{during} fds during the attack"
    );
    // A dropped connection keeps only its socket while its peer holds the unread fds.
    assert!(after_drop <= baseline_fds + stream_fds + MAX_CONNECTIONS_PER_UID + MID_ACCEPT);
    assert!(extra.contains("too many connections"), "{extra}");
    assert_eq!(after, baseline_fds, "broker fds back to the baseline");
    assert!(stage.broker.is_running());
    stage.assert_memory_back("never-reading worker", baseline_rss);
    assert_kept_pace(
        "never-reading worker",
        baseline_lateness,
        attacked_lateness,
        params.period(),
    );
}

#[test]
fn hundreds_of_idle_connections_lock_out_no_worker() {
    if !can_switch_uids() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut stage = Stage::start();
    let params = stage.params;
    let Baseline {
        lateness: baseline_lateness,
        fds: baseline_fds,
        rss: baseline_rss,
        stream_fds,
    } = stage.baseline();

    let socket = stage.socket.clone();
    let dir = stage.dir.path().to_path_buf();
    let pid = stage.pid();
    let uids = 38;
    let attack = std::thread::spawn(move || {
        // 38 uids × the per-uid limit: 304 connections that never say Hello.
        let mut attackers: Vec<Attacker> = (0..uids)
            .map(|i| {
                Attacker::spawn(
                    ATTACKER,
                    ATTACKER_UID + i,
                    &socket,
                    Attack::Idle,
                    MAX_CONNECTIONS_PER_UID,
                    DEFAULT_LAYOUT,
                )
            })
            .collect();
        let connected: usize = attackers
            .iter_mut()
            .map(|a| a.numbers("connected")[0])
            .sum();
        let during = open_fds(pid);
        // A worker's Hello is answered at once, pre-Hello slots full or not.
        let hello_at = Instant::now();
        let worker = Hostile::hello(&socket, DEFAULT_LAYOUT).unwrap();
        let welcome = worker.recv(REPLY).unwrap();
        let welcomed_in = hello_at.elapsed();
        assert_eq!(welcome, Some(Reply::Welcome));
        fresh_worker_plays(&dir, "fresh", &socket);
        let hang_ups: Vec<Option<Duration>> = attackers
            .iter_mut()
            .flat_map(|a| a.durations("hangups"))
            .collect();
        drop(worker);
        (connected, during, welcomed_in, hang_ups)
    });
    let attacked_lateness = worst_lateness(&mut stage.vm, &params, 400);
    let (connected, during, welcomed_in, hang_ups) = attack.join().unwrap();
    let after = stage.wait_fds(baseline_fds);
    let dropped: Vec<Duration> = hang_ups.iter().flatten().copied().collect();
    let longest = dropped.iter().max().copied().unwrap_or_default();
    let lived_long = dropped.iter().filter(|t| **t >= HELLO_DEADLINE / 2).count();
    eprintln!(
        "idle connections: {connected} connected from {uids} uids, {} hung up (longest lived \
         {longest:?}; {lived_long} lived past half the {HELLO_DEADLINE:?} deadline, the others \
         were pushed out by newer ones); a worker's Hello answered in {welcomed_in:?}; broker \
         fds {baseline_fds} baseline (+{stream_fds} for the good stream), {during} during, \
         {after} after",
        dropped.len(),
    );
    assert_eq!(connected, uids as usize * MAX_CONNECTIONS_PER_UID);
    assert_eq!(
        dropped.len(),
        connected,
        "every idle connection was dropped"
    );
    assert!(
        longest >= HELLO_DEADLINE,
        "dropped before the deadline: {longest:?}"
    );
    assert!(longest <= HELLO_DEADLINE + SLACK, "{longest:?}");
    assert!(lived_long <= MAX_PENDING, "the pre-Hello slots are bounded");
    assert!(welcomed_in < HELLO_DEADLINE, "{welcomed_in:?}");
    assert!(
        during <= baseline_fds + stream_fds + MAX_PENDING + MID_ACCEPT,
        "{during} fds"
    );
    assert_eq!(after, baseline_fds, "broker fds back to the baseline");
    assert!(stage.broker.is_running());
    stage.assert_memory_back("idle connections", baseline_rss);
    assert_kept_pace(
        "idle connections",
        baseline_lateness,
        attacked_lateness,
        params.period(),
    );
}

#[test]
fn one_uid_cannot_take_every_slot() {
    if !can_switch_uids() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut stage = Stage::start();
    let params = stage.params;
    let Baseline {
        lateness: baseline_lateness,
        fds: baseline_fds,
        rss: baseline_rss,
        stream_fds,
    } = stage.baseline();

    let socket = stage.socket.clone();
    let dir = stage.dir.path().to_path_buf();
    let pid = stage.pid();
    let attack = std::thread::spawn(move || {
        let mut attacker = Attacker::spawn(
            ATTACKER,
            ATTACKER_UID,
            &socket,
            Attack::Greedy,
            3 * MAX_CONNECTIONS_PER_UID,
            DEFAULT_LAYOUT,
        );
        let counts = attacker.numbers("counts");
        let during = open_fds(pid);
        // Another uid is served meanwhile.
        fresh_worker_plays(&dir, "fresh", &socket);
        attacker.tell("close-one");
        let again = attacker.report("again");
        attacker.end();
        (counts, during, again)
    });
    let attacked_lateness = worst_lateness(&mut stage.vm, &params, 300);
    let (counts, during, again) = attack.join().unwrap();
    let after = stage.wait_fds(baseline_fds);
    eprintln!(
        "one uid: {} connections welcomed, {} refused; broker fds {baseline_fds} baseline \
         (+{stream_fds} for the good stream), {during} during, {after} after",
        counts[0], counts[1]
    );
    assert_eq!(
        counts,
        [MAX_CONNECTIONS_PER_UID, 2 * MAX_CONNECTIONS_PER_UID]
    );
    assert_eq!(again, "true", "a closed connection's slot is given back");
    assert!(during <= baseline_fds + stream_fds + MAX_CONNECTIONS_PER_UID + MID_ACCEPT);
    assert_eq!(after, baseline_fds, "broker fds back to the baseline");
    assert!(stage.broker.is_running());
    stage.assert_memory_back("one uid's connections", baseline_rss);
    assert_kept_pace(
        "one uid's connections",
        baseline_lateness,
        attacked_lateness,
        params.period(),
    );
}

/// The classic attacks, each on a connection of its own, over and over while the good stream
/// plays: what breaks the protocol is hung up on, absurd params are answered `Failed` on a
/// connection that stays usable; afterwards the broker's fds and memory are back, a fresh
/// worker is served, the good stream kept its pace, and the broker's log took a bounded number
/// of lines for it.
#[test]
fn classic_attacks_are_dropped_and_leave_nothing_behind() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut stage = Stage::start();
    let params = stage.params;
    let Baseline {
        lateness: baseline_lateness,
        fds: baseline_fds,
        rss: baseline_rss,
        stream_fds,
    } = stage.baseline();

    let socket = stage.socket.clone();
    let dir = stage.dir.path().to_path_buf();
    let attack = std::thread::spawn(move || {
        let rounds = 20;
        let mut attacks = 0;
        for _ in 0..rounds {
            attacks += classic_attacks(&socket);
        }
        fresh_worker_plays(&dir, "fresh", &socket);
        attacks
    });
    let attacked_lateness = worst_lateness(&mut stage.vm, &params, 300);
    let attacks = attack.join().unwrap();
    let after = stage.wait_fds(baseline_fds);
    let log = stage.broker_log();
    // "broker: dropping vm V (connection N, uid U): why" or "broker: dropping connection N
    // (uid U): refused: why" (a refused Hello), and "broker: refused a connection: why".
    let lines = log
        .lines()
        .filter(|l| l.contains("broker: dropping ") || l.contains("broker: refused "))
        .count();
    eprintln!(
        "classic attacks: {lines} lines about dropped or refused workers in the broker's log"
    );
    // 16 per 10 s (the attack takes a few seconds), and not one per attacked connection.
    assert!(
        (1..=2 * 16).contains(&lines) && lines < attacks,
        "{lines} lines for {attacks} attacked connections"
    );
    eprintln!(
        "classic attacks: {attacks} connections attacked; broker fds {baseline_fds} baseline \
         (+{stream_fds} for the good stream), {after} after"
    );
    assert_eq!(after, baseline_fds, "broker fds back to the baseline");
    assert!(stage.broker.is_running());
    stage.assert_memory_back("classic attacks", baseline_rss);
    assert_kept_pace(
        "classic attacks",
        baseline_lateness,
        attacked_lateness,
        params.period(),
    );
}

/// One round of the classic attacks; how many connections it used.
fn classic_attacks(socket: &Path) -> usize {
    use common::hostile::wire;
    let hung_up = |conn: &Hostile, what: &str| {
        assert!(
            conn.wait_hung_up(REPLY).is_some(),
            "{what}: the broker did not hang up"
        );
    };
    let welcomed = || {
        let conn = Hostile::hello(socket, DEFAULT_LAYOUT).unwrap();
        assert_eq!(conn.recv(REPLY).unwrap(), Some(Reply::Welcome));
        conn
    };
    let mut used = 0;
    let mut attack = |what: &str, packet: &[u8]| {
        let conn = Hostile::connect(socket).unwrap();
        conn.send(packet).unwrap();
        hung_up(&conn, what);
        used += 1;
    };
    attack("garbage", &[0xde, 0xad, 0xbe, 0xef]);
    attack("an oversize packet", &vec![0u8; 9000]);
    let hello = wire::hello(PROTOCOL_VERSION, &unique_vm_name(), DEFAULT_LAYOUT);
    attack("a truncated Hello", &hello[..hello.len() / 2]);
    let mut trailing = hello.clone();
    trailing.extend([0, 0, 0]);
    attack("a Hello with trailing bytes", &trailing);
    attack("a Start before Hello", &wire::stream_request(2, 0));

    let conn = Hostile::connect(socket).unwrap();
    conn.send(&wire::hello(
        PROTOCOL_VERSION + 1,
        &unique_vm_name(),
        DEFAULT_LAYOUT,
    ))
    .unwrap();
    assert!(matches!(conn.recv(REPLY).unwrap(), Some(Reply::Refused(_))));
    hung_up(&conn, "a wrong version");

    let conn = welcomed();
    conn.send(&wire::stream_request(2, 99)).unwrap();
    hung_up(&conn, "an out-of-range stream id");

    let conn = welcomed();
    for (period_bytes, periods) in [(0, 4), (1920, 1_000_000), (1919, 4), (u32::MAX / 2, 2)] {
        conn.send(&wire::prepare(0, period_bytes, periods)).unwrap();
        assert_eq!(
            conn.recv(REPLY).unwrap(),
            Some(Reply::Failed),
            "PREPARE of {periods} periods of {period_bytes} bytes"
        );
    }
    conn.send(&wire::prepare(0, 1920, 4)).unwrap();
    assert!(matches!(
        conn.recv(REPLY).unwrap(),
        Some(Reply::Prepared { fds: 2 })
    ));

    // 200 fds on a request: workers never send any.
    let null = std::fs::File::open("/dev/null").unwrap();
    let fds: Vec<std::os::fd::BorrowedFd> =
        (0..200).map(|_| std::os::fd::AsFd::as_fd(&null)).collect();
    let flood = welcomed();
    flood
        .send_with_fds(&wire::stream_request(3, 0), &fds)
        .unwrap();
    hung_up(&flood, "a request with 200 fds");

    // Gone right after a PREPARE, its reply and fds unread.
    let abrupt = welcomed();
    abrupt.send(&wire::prepare(0, 1920, 4)).unwrap();
    drop(abrupt);
    used + 5
}
