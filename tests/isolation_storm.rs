//! Control storms do not delay another VM's audio: 56 hostile clients (`common::hostile`, its own
//! encoder of the wire format; 7 uids × the per-uid limit) send bursts of legal PREPARE, START
//! and STOP requests as fast as the broker answers, while a real worker, driven by the
//! in-process guest, plays at real time on the null backend. The storm is on a stream of the
//! wav backend (clocked like null, but its PREPARE creates a file and its STOP flushes one, as a
//! device's cost a driver call). The good stream's jitter (its worst completion lateness less its
//! least: a START answered late shifts all completions alike) during the storm stays within one
//! period of the baseline jitter measured in the same test, the storming clients are served no faster than their rate (their requests wait for
//! their tokens), every request is answered, the broker's fds come back
//! to the baseline, and a fresh worker is served.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::frontend::{FrontendOptions, GuestVm};
use common::hostile::{open_fds, outputs, Attack, Attacker, STORM_BURST, STORM_STREAM};
use common::pipewire::PipeWire;
use common::vsound::*;
use virtio_snd::protocol as p;
use vsound_broker::broker::{MAX_CONNECTIONS_PER_UID, REQUEST_BURST, REQUEST_RATE_PER_SEC};

/// The ignored test an `Attacker` runs.
const ATTACKER: &str = "attacker";
/// First uid of the attackers.
const ATTACKER_UID: u32 = 41_000;
/// Uids storming, each with the most connections the broker allows one uid: 56 clients.
const STORM_UIDS: u32 = 7;
/// Periods the good stream plays for each measurement (10 ms each).
const BASELINE_PERIODS: usize = 400;
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

/// Stream 0, the good one: of `backend` (config lines). Stream 1 (`STORM_STREAM`), the
/// storm's: WAV files, one per client.
fn config_text(backend: &str, wav: &Path) -> String {
    format!(
        "[[streams]]\nname = \"media\"\ndirection = \"output\"\n{backend}\n\
         formats = [\"S16\"]\nrates = [48000]\n\
         [[streams]]\nname = \"storm\"\ndirection = \"output\"\nbackend = \"wav\"\n\
         wav_path = {:?}\nformats = [\"S16\"]\nrates = [48000]\n",
        wav.display().to_string()
    )
}

fn fresh_worker(dir: &Path, name: &str, broker: &Path, config: &Path) -> (Proc, GuestVm) {
    let (worker, socket) = spawn_worker(dir, name, broker, Some(config));
    let vm = GuestVm::connect(&socket, FrontendOptions::default()).expect("connect to the worker");
    (worker, vm)
}

/// Plays `periods` periods and returns the lateness of each completion against 3 periods before
/// the end of its period in real time (buffer i ends i + 1 periods after START), sorted.
fn lateness(vm: &mut GuestVm, params: &Params, periods: usize) -> Vec<Duration> {
    prepare(vm, params);
    let data = pattern(params.period_bytes as usize * periods, periods as u32);
    let (started, done) = play(vm, params, &data);
    assert_eq!(done.len(), periods);
    assert!(done.iter().all(|c| c.status == 0x8000), "tx statuses OK");
    assert_eq!(control(vm, &pcm(p::R_PCM_STOP, params.stream)), 0x8000);
    assert_eq!(control(vm, &pcm(p::R_PCM_RELEASE, params.stream)), 0x8000);
    let period = params.period();
    // ALSA completes up to its device buffer (2 periods) early: counted from 3 periods before
    // the end of its period, no completion is cut off at zero.
    let early = period * 3;
    let mut late: Vec<Duration> = done
        .iter()
        .enumerate()
        .map(|(i, c)| (c.at - started + early).saturating_sub(period * (i as u32 + 1)))
        .collect();
    late.sort();
    late
}

/// How far the completions strayed from a steady pace: the worst lateness less the least (a
/// START answered late shifts every completion alike; a stall delays some).
fn jitter(sorted: &[Duration]) -> Duration {
    sorted[sorted.len() - 1] - sorted[0]
}

/// The `percent` percentile of sorted latenesses.
fn percentile(sorted: &[Duration], percent: usize) -> Duration {
    sorted[(sorted.len() - 1) * percent / 100]
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

/// Per thread of a process: its id, its name, and the CPU time it ran and waited for a CPU
/// (/proc/PID/task/TID/schedstat, nanoseconds).
fn thread_times(pid: u32) -> Vec<(String, String, u64, u64)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut times: Vec<(String, String, u64, u64)> = tasks
        .flatten()
        .filter_map(|task| {
            let tid = task.file_name().to_string_lossy().into_owned();
            let name = std::fs::read_to_string(task.path().join("comm")).ok()?;
            let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
            let mut fields = stat
                .split_whitespace()
                .map(|f| f.parse::<u64>().unwrap_or(0));
            Some((tid, name.trim().to_string(), fields.next()?, fields.next()?))
        })
        .collect();
    times.sort();
    times
}

/// What each thread ran and waited for a CPU between two `thread_times`, in ms.
fn thread_deltas(
    before: &[(String, String, u64, u64)],
    after: &[(String, String, u64, u64)],
) -> String {
    after
        .iter()
        .map(|(tid, name, ran, waited)| {
            let (r0, w0) = before
                .iter()
                .find(|(t, ..)| t == tid)
                .map_or((0, 0), |(.., r, w)| (*r, *w));
            format!(
                "{name} ran {} ms, waited {} ms",
                ran.saturating_sub(r0) / 1_000_000,
                waited.saturating_sub(w0) / 1_000_000
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The PipeWire ALSA plugin's PCM, routed to a private daemon's null sink (as tests/alsa.rs).
const ASOUNDRC: &str = r#"
pcm.vsound_test {
    type pipewire
    playback_node "vsound-test-sink"
}
"#;

/// One storm at a time: each compares against its own baseline.
static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn a_control_storm_does_not_delay_another_vms_stream() {
    if !can_switch_uids() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    storm_against("null", dir.path(), "backend = \"null\"", &[]);
}

#[test]
fn a_control_storm_does_not_delay_another_vms_alsa_stream() {
    if !can_switch_uids() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let pw = PipeWire::start(dir.path());
    std::fs::write(dir.path().join(".asoundrc"), ASOUNDRC).unwrap();
    let mut env = pw.env();
    env.push(("HOME", dir.path().to_path_buf()));
    storm_against(
        "alsa",
        dir.path(),
        "backend = \"alsa\"\nalsa_device = \"vsound_test\"",
        &env,
    );
}

/// The storm, against a good stream 0 of `backend` (config lines), the broker run with `env`.
fn storm_against(name: &str, dir: &Path, backend: &str, env: &[(&'static str, PathBuf)]) {
    let config = dir.join("vsound.toml");
    // On tmpfs: a file's creation and flush are then the broker's own CPU time, as a device
    // call's is, not a disk journal's.
    let wav_dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let wav = wav_dir.path().join("out-{client}.wav");
    std::fs::write(&config, config_text(backend, &wav)).unwrap();
    assert_eq!(STORM_STREAM, 1, "the config's wav stream");
    let (mut broker, socket) = spawn_broker_with_env(dir, Some(&config), env);
    let (worker, mut vm) = fresh_worker(dir, "good", &socket, &config);
    let params = Params::s16_48k(0);
    let period = params.period();
    let baseline_all = lateness(&mut vm, &params, BASELINE_PERIODS);
    let baseline = jitter(&baseline_all);
    let baseline_fds = settled_fds(broker.pid());

    let mut attackers: Vec<Attacker> = (0..STORM_UIDS)
        .map(|i| {
            Attacker::spawn(
                ATTACKER,
                ATTACKER_UID + i,
                &socket,
                Attack::Storm,
                MAX_CONNECTIONS_PER_UID,
                &outputs(2),
            )
        })
        .collect();
    let clients: usize = attackers.iter_mut().map(|a| a.numbers("storming")[0]).sum();
    // The good VM's guest (this thread) at its worker's real-time priority, once every
    // attacker is started (they would inherit it): the storm's processes compete with it for
    // the CPUs as any host load would, and a guest kept from running is the host scheduler's
    // doing, not the broker's, which is what this measures.
    if common::realtime::available() {
        vsound_broker::realtime::promote_current_thread("good VM's guest");
    }
    let storm_start = Instant::now();
    let threads_before = thread_times(broker.pid());
    let worker_before = thread_times(worker.pid());
    let stormed_all = lateness(&mut vm, &params, STORM_PERIODS);
    let stormed = jitter(&stormed_all);
    let threads = thread_deltas(&threads_before, &thread_times(broker.pid()));
    let worker_threads = thread_deltas(&worker_before, &thread_times(worker.pid()));
    for attacker in &mut attackers {
        attacker.tell("end");
    }
    let replies: Vec<Vec<usize>> = attackers.iter_mut().map(|a| a.numbers("replies")).collect();
    let storm_time = storm_start.elapsed();
    let [succeeded, failed, missing] = replies.iter().fold([0; 3], |sum, r| {
        [sum[0] + r[0], sum[1] + r[1], sum[2] + r[2]]
    });
    // A fresh worker is served right after the storm.
    let (_fresh, mut fresh_vm) = fresh_worker(dir, "fresh", &socket, &config);
    let _ = lateness(&mut fresh_vm, &params, 5);
    for attacker in attackers {
        attacker.end();
    }
    drop(fresh_vm);
    let after = wait_fds(broker.pid(), baseline_fds);

    // One period plus the baseline's jitter, taken as at least 5 ms: a scheduling slice or two
    // of 2 loaded cores (a quiet baseline can be well under 1 ms).
    let allowed = period + baseline.max(Duration::from_millis(5));
    eprintln!(
        "{name}: lateness (+3 periods) percentiles 0/50/90/99/100: baseline {:?}, storm {:?}",
        [0, 50, 90, 99, 100].map(|p| percentile(&baseline_all, p)),
        [0, 50, 90, 99, 100].map(|p| percentile(&stormed_all, p)),
    );
    eprintln!(
        "control storm ({name}): {clients} clients for {storm_time:?} ({STORM_BURST}-request bursts): \
         {succeeded} requests succeeded, {failed} answered Failed, {missing} unanswered; good \
         stream's completion jitter (worst lateness less the least) {stormed:?} during the \
         storm, {baseline:?} baseline (allowed {allowed:?}); broker fds {baseline_fds} baseline, {after} after; \
         broker threads during the storm: {threads}; worker threads: {worker_threads}"
    );
    assert_eq!(clients, STORM_UIDS as usize * MAX_CONNECTIONS_PER_UID);
    assert!(broker.is_running());
    assert!(
        stormed <= allowed,
        "the good stream stalled {stormed:?} during the storm (baseline {baseline:?})"
    );
    // Rate-limited by waiting, not by failing: no client got more than its burst and its rate
    // since, and none of its requests failed for it.
    assert_eq!(failed, 0, "storm requests answered Failed");
    let budget = clients as f64
        * (f64::from(REQUEST_BURST) + f64::from(REQUEST_RATE_PER_SEC) * storm_time.as_secs_f64());
    assert!(
        succeeded as f64 <= budget,
        "{succeeded} requests served, more than the {budget} the rate allows"
    );
    assert_eq!(missing, 0, "every request answered");
    assert_eq!(after, baseline_fds, "broker fds back to the baseline");
}
