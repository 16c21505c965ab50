//! Control-storm benchmark (issue 9): prints, for 50 hostile clients storming the broker with
//! legal PREPARE, START and STOP requests (`common::hostile`'s `Attack::Storm`), the good
//! stream's worst stall (its completion jitter: worst lateness less the least) and worst
//! lateness, and the broker's latency from a PREPARE to its reply, each with and without the
//! storm. The storm is on a wav stream in tmpfs (a PREPARE creates a file, a STOP flushes
//! one); the good stream plays on null. Then the same figures during each of the other attacks:
//! a worker that never reads its replies, 304 idle connections, and a worker whose backend
//! opens hang (a WAV file at a FIFO nobody reads).
//!
//! `cargo bench --bench storm` (as root: the attackers run as uids of their own). Under `cargo
//! test` it only says so: it is a measurement, not a test.

#[path = "../tests/common/mod.rs"]
mod common;

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::frontend::{FrontendOptions, GuestVm};
use common::hostile::{wire, Attack, Attacker, Hostile, Reply, HUNG_STREAM, STORM_STREAM};
use common::vsound::*;
use virtio_snd::protocol as p;
use vsound_broker::broker::MAX_CONNECTIONS_PER_UID;

/// The config's layout (`config_text`): three output streams.
const LAYOUT: [u8; 3] = [common::hostile::DIRECTION_OUTPUT; 3];
const CLIENTS: usize = 50;
const ATTACKER_UID: u32 = 42_000;
/// Periods (10 ms) the good stream plays for each figure.
const PERIODS: usize = 400;
/// PREPAREs timed for each figure, one every `PROBE_INTERVAL` (well inside the rate limit).
const PROBES: usize = 30;
const PROBE_INTERVAL: Duration = Duration::from_millis(100);

fn config_text(wav: &Path, fifo: &Path) -> String {
    format!(
        "[[streams]]\nname = \"media\"\ndirection = \"output\"\nbackend = \"null\"\n\
         formats = [\"S16\"]\nrates = [48000]\n\
         [[streams]]\nname = \"storm\"\ndirection = \"output\"\nbackend = \"wav\"\n\
         wav_path = {:?}\nformats = [\"S16\"]\nrates = [48000]\n\
         [[streams]]\nname = \"hung\"\ndirection = \"output\"\nbackend = \"wav\"\n\
         wav_path = {:?}\nformats = [\"S16\"]\nrates = [48000]\n",
        wav.display().to_string(),
        fifo.display().to_string()
    )
}

/// An attack for `during`: starts its attackers (once they are attacking), and ends them.
struct AttackRun {
    name: &'static str,
    start: fn(&Path) -> Vec<Attacker>,
    finish: fn(Vec<Attacker>),
}

const OTHER_ATTACKS: [AttackRun; 3] = [
    AttackRun {
        name: "never-reading worker (8 connections)",
        start: |socket| {
            let mut a = Attacker::spawn(
                "attacker",
                ATTACKER_UID + 100,
                socket,
                Attack::NeverRead,
                8,
                &LAYOUT,
            );
            a.numbers("sent");
            vec![a]
        },
        finish: |attackers| {
            for mut a in attackers {
                a.durations("hangups");
                a.report("extra");
                a.end();
            }
        },
    },
    AttackRun {
        name: "304 idle connections (38 uids)",
        start: |socket| {
            (0..38)
                .map(|i| {
                    let mut a = Attacker::spawn(
                        "attacker",
                        ATTACKER_UID + 200 + i,
                        socket,
                        Attack::Idle,
                        8,
                        &LAYOUT,
                    );
                    a.numbers("connected");
                    a
                })
                .collect()
        },
        finish: |attackers| {
            for mut a in attackers {
                a.durations("hangups");
                a.end();
            }
        },
    },
    AttackRun {
        name: "hanging backend opens (1 worker)",
        start: |socket| {
            let mut a = Attacker::spawn(
                "attacker",
                ATTACKER_UID + 300,
                socket,
                Attack::HungOpen,
                1,
                &LAYOUT,
            );
            a.report("ready");
            vec![a]
        },
        finish: |attackers| {
            for mut a in attackers {
                a.tell("end");
                a.numbers("replies");
                a.end();
            }
        },
    },
];

/// The good stream's (stall, worst lateness) and the PREPARE latency (median, worst) while
/// `attack` runs.
fn during(
    vm: &mut GuestVm,
    params: &Params,
    socket: &Path,
    attack: &AttackRun,
) -> ((Duration, Duration), (Duration, Duration)) {
    let attackers = (attack.start)(socket);
    let probe_socket = socket.to_path_buf();
    let probe = std::thread::spawn(move || prepare_latency(&probe_socket));
    let play = play_figures(vm, params);
    let latency = probe.join().unwrap();
    (attack.finish)(attackers);
    (play, latency)
}

/// (worst stall, worst lateness) of `PERIODS` periods played.
fn play_figures(vm: &mut GuestVm, params: &Params) -> (Duration, Duration) {
    prepare(vm, params);
    let data = pattern(params.period_bytes as usize * PERIODS, 7);
    let (started, done) = play(vm, params, &data);
    assert_eq!(control(vm, &pcm(p::R_PCM_STOP, params.stream)), 0x8000);
    assert_eq!(control(vm, &pcm(p::R_PCM_RELEASE, params.stream)), 0x8000);
    let period = params.period();
    let late: Vec<Duration> = done
        .iter()
        .enumerate()
        .map(|(i, c)| (c.at - started).saturating_sub(period * (i as u32 + 1)))
        .collect();
    let worst = late.iter().max().copied().unwrap_or_default();
    let least = late.iter().min().copied().unwrap_or_default();
    (worst - least, worst)
}

/// PREPARE → Prepared round trips of a client of our own (median, worst).
fn prepare_latency(socket: &Path) -> (Duration, Duration) {
    let probe = Hostile::hello(socket, &LAYOUT).unwrap();
    assert_eq!(
        probe.recv(Duration::from_secs(5)).unwrap(),
        Some(Reply::Welcome)
    );
    let mut times: Vec<Duration> = (0..PROBES)
        .map(|_| {
            std::thread::sleep(PROBE_INTERVAL);
            let sent = Instant::now();
            probe.send(&wire::prepare(0, 1920, 4)).unwrap();
            match probe.recv(Duration::from_secs(5)) {
                Ok(Some(Reply::Prepared { .. })) => sent.elapsed(),
                other => panic!("PREPARE answered {other:?}"),
            }
        })
        .collect();
    times.sort();
    (times[times.len() / 2], times[times.len() - 1])
}

fn main() {
    if common::hostile::is_attacker() {
        common::hostile::run_attacker();
        return;
    }
    if !std::env::args().any(|a| a == "--bench") {
        println!("storm benchmark: run with `cargo bench --bench storm`");
        return;
    }
    if !nix::unistd::Uid::effective().is_root() {
        println!("storm benchmark: skipped (the attackers need uids of their own: run as root)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let wav_dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let config = dir.path().join("vsound.toml");
    let fifo = dir.path().join("hung.wav");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
    std::fs::write(
        &config,
        config_text(&wav_dir.path().join("out-{client}.wav"), &fifo),
    )
    .unwrap();
    assert_eq!(STORM_STREAM, 1, "the config's wav stream");
    assert_eq!(HUNG_STREAM, 2, "the config's stream at a FIFO");
    let (_broker, socket) = spawn_broker(dir.path(), Some(&config));
    let (_worker, worker_socket) = spawn_worker(dir.path(), "good", &socket, Some(&config));
    let mut vm = GuestVm::connect(&worker_socket, FrontendOptions::default()).unwrap();
    let params = Params::s16_48k(0);

    let (quiet_stall, quiet_worst) = play_figures(&mut vm, &params);
    let (quiet_median, quiet_max) = prepare_latency(&socket);

    let uids = CLIENTS.div_ceil(MAX_CONNECTIONS_PER_UID);
    let mut attackers: Vec<Attacker> = (0..uids)
        .map(|i| {
            let count = MAX_CONNECTIONS_PER_UID.min(CLIENTS - i * MAX_CONNECTIONS_PER_UID);
            // Any name: the bench's main runs the attack whatever it is asked.
            Attacker::spawn(
                "attacker",
                ATTACKER_UID + i as u32,
                &socket,
                Attack::Storm,
                count,
                &LAYOUT,
            )
        })
        .collect();
    let storming: usize = attackers.iter_mut().map(|a| a.numbers("storming")[0]).sum();
    let probe_socket = socket.clone();
    let probe = std::thread::spawn(move || prepare_latency(&probe_socket));
    let (storm_stall, storm_worst) = play_figures(&mut vm, &params);
    let (storm_median, storm_max) = probe.join().unwrap();
    for attacker in &mut attackers {
        attacker.tell("end");
    }
    let replies: Vec<Vec<usize>> = attackers.iter_mut().map(|a| a.numbers("replies")).collect();
    for attacker in attackers {
        attacker.end();
    }
    let succeeded: usize = replies.iter().map(|r| r[0]).sum();
    let failed: usize = replies.iter().map(|r| r[1]).sum();

    println!("control storm: {storming} clients ({succeeded} requests served at their rate, {failed} answered Failed)");
    println!(
        "good stream, {PERIODS} periods of 10 ms: worst stall {quiet_stall:?} quiet, \
         {storm_stall:?} during the storm (worst lateness {quiet_worst:?} / {storm_worst:?})"
    );
    println!(
        "PREPARE -> reply, {PROBES} requests: median {quiet_median:?}, worst {quiet_max:?} quiet; \
         median {storm_median:?}, worst {storm_max:?} during the storm"
    );
    println!(
        "| attack | good stream: worst stall | worst lateness | PREPARE -> reply: median | worst |"
    );
    println!("|---|---|---|---|---|");
    println!("| none | {quiet_stall:?} | {quiet_worst:?} | {quiet_median:?} | {quiet_max:?} |");
    println!("| {storming}-client control storm | {storm_stall:?} | {storm_worst:?} | {storm_median:?} | {storm_max:?} |");
    for attack in &OTHER_ATTACKS {
        let ((stall, worst), (median, max)) = during(&mut vm, &params, &socket, attack);
        println!(
            "| {} | {stall:?} | {worst:?} | {median:?} | {max:?} |",
            attack.name
        );
    }
    // The hung opens' threads end once the FIFO is read.
    let _reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(&fifo);
}
