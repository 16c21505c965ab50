//! The PipeWire backend against a real, private, headless PipeWire daemon: what the guest plays
//! arrives at the sink sample for sample; what plays into the sink arrives in the guest's rx
//! buffers; node properties come from the config. A node PipeWire does not schedule (never
//! linked, unlinked mid-stream) plays into silence at the real-time pace and plays again once
//! linked; a ring is sized from a pinned graph quantum, not only from the guest's period; one
//! VM's worker killed mid-play leaves another VM's playback intact; a 5.1 stream's node carries
//! the 5.1 channel positions; nodes are named after their VM, across worker restarts. The
//! guest's volume and mute controls set the node's channelVolumes and mute, and a change of
//! those on PipeWire's side reaches the guest as a CTL_NOTIFY and its next CTL_READ.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::frontend::{FrontendOptions, GuestVm};
use common::pipewire::{assert_arrived_intact, assert_carries_signal, find, PipeWire, SINK};
use common::vsound::*;
use virtio_snd::protocol as p;

const CONFIG: &str = r#"
controls = true
[[streams]]
name = "media"
direction = "output"
backend = "pipewire"
formats = ["S16"]
rates = [48000]
node_name = "vsound-test-media"
node_description = "Guest media bus"
media_role = "Music"
target_object = "vsound-test-sink"
[[streams]]
name = "mic"
direction = "input"
backend = "pipewire"
formats = ["S16"]
rates = [48000]
target_object = "vsound-test-sink"
capture_sink = true
"#;

struct PwRig {
    pw: PipeWire,
    _broker: Proc,
    _worker: Proc,
    vm: GuestVm,
    dir: tempfile::TempDir,
}

fn start() -> PwRig {
    start_with(FrontendOptions::default())
}

fn start_with(opts: FrontendOptions) -> PwRig {
    let dir = tempfile::tempdir().unwrap();
    let pw = PipeWire::start(dir.path());
    let config = dir.path().join("vsound.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let (broker, broker_socket) = spawn_broker_with_env(dir.path(), Some(&config), &pw.env());
    let (worker, socket) = spawn_worker(dir.path(), "vm", &broker_socket, Some(&config));
    let vm = GuestVm::connect(&socket, opts).unwrap();
    PwRig {
        pw,
        _broker: broker,
        _worker: worker,
        vm,
        dir,
    }
}

/// Plays `data` on `params`' stream (every buffer completing OK) while the sink is recorded
/// into `DIR/name`, from `settle` before it (pw-record's link) to 300 ms after; returns what
/// the sink got.
fn play_recorded(
    pw: &PipeWire,
    vm: &mut GuestVm,
    dir: &std::path::Path,
    name: &str,
    settle: Duration,
    params: &Params,
    data: &[u8],
) -> Vec<u8> {
    let recording = dir.join(name);
    let recorder = pw.record_sink(&recording);
    std::thread::sleep(settle);
    let (_, done) = play(vm, params, data);
    assert!(done.iter().all(|c| c.status == 0x8000));
    std::thread::sleep(Duration::from_millis(300));
    drop(recorder);
    std::fs::read(&recording).unwrap()
}

#[test]
fn playback_arrives_at_the_sink_sample_for_sample() {
    let mut rig = start();
    let params = Params::s16_48k(0);
    prepare(&mut rig.vm, &params);
    let info = rig.pw.node_info("vsound-test-media");
    assert!(info.contains("Guest media bus"), "{info}");
    assert!(info.contains("Music"), "{info}");
    let recording = rig.dir.path().join("sink.raw");
    let recorder = rig.pw.record_sink(&recording);
    std::thread::sleep(Duration::from_millis(500));
    // Non-zero everywhere, so that alignment against the silence around it is unambiguous.
    let data = known_signal(params.period_bytes as usize * 100, 11);
    let (started, done) = play(&mut rig.vm, &params, &data);
    assert_eq!(done.len(), 100);
    assert!(done.iter().all(|c| c.status == 0x8000));
    // Paced by the PipeWire graph: 100 periods of 10 ms take about a second.
    let took = done.last().unwrap().at - started;
    assert!(
        took >= params.period() * 90,
        "played 1 s of audio in {took:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    drop(recorder);
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_STOP, 0)), 0x8000);
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_RELEASE, 0)), 0x8000);
    let recorded = std::fs::read(&recording).unwrap();
    assert_arrived_intact(&recorded, &data);
}

/// Plays `periods` periods of a known signal, STOPs and RELEASEs as soon as the last buffer
/// completes (as aplay does after its drain), PREPAREs again at once and plays a second signal
/// the same way (while PipeWire may still hold the first one's tail: two streams briefly), and
/// checks that both signals, last frames included, reached the sink.
fn release_at_once_keeps_the_tail(period_bytes: u32, periods: usize, seed: u32) {
    let mut rig = start();
    let params = Params {
        period_bytes,
        ..Params::s16_48k(0)
    };
    let recording = rig.dir.path().join("sink.raw");
    let recorder = rig.pw.record_sink(&recording);
    std::thread::sleep(Duration::from_millis(500));
    let signals =
        [periods, periods / 3].map(|n| known_signal(period_bytes as usize * n, seed + n as u32));
    for data in &signals {
        prepare(&mut rig.vm, &params);
        let (_, done) = play(&mut rig.vm, &params, data);
        assert!(done.iter().all(|c| c.status == 0x8000));
        let released = std::time::Instant::now();
        assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_STOP, 0)), 0x8000);
        assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_RELEASE, 0)), 0x8000);
        let answered = released.elapsed();
        println!("STOP + RELEASE answered in {answered:?}");
        // The answers do not wait for the tail to play.
        assert!(
            answered < Duration::from_millis(100),
            "STOP + RELEASE answered after {answered:?}"
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    drop(recorder);
    let recorded = std::fs::read(&recording).unwrap();
    for data in &signals {
        assert_arrived_intact(&recorded, data);
    }
}

#[test]
fn a_playback_released_at_once_arrives_to_its_last_frame() {
    // aplay's default periods on the virtio card: 2048 frames, so node.latency raises the
    // graph's quantum to 2048 as the stream starts, and the converter carries most of a quantum.
    release_at_once_keeps_the_tail(8192, 30, 13);
}

#[test]
fn a_playback_of_10ms_periods_released_at_once_arrives_to_its_last_frame() {
    release_at_once_keeps_the_tail(1920, 100, 14);
}

#[test]
fn capture_receives_what_plays_into_the_sink() {
    let mut rig = start();
    let params = Params::s16_48k(1);
    // Two seconds of a known signal, non-zero everywhere.
    let source = known_signal(48000 * 4 * 2, 12);
    let wav = rig.dir.path().join("known.wav");
    write_wav_s16(&wav, 2, 48000, &source);
    prepare(&mut rig.vm, &params);
    let player = rig.pw.play_into_sink(&wav);
    let (_, done) = record(&mut rig.vm, &params, 150);
    drop(player);
    assert!(done.iter().all(|c| c.status == 0x8000));
    let captured: Vec<u8> = done.iter().flat_map(|c| c.data.iter().copied()).collect();
    assert_carries_signal(&source, &captured);
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_STOP, 1)), 0x8000);
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_RELEASE, 1)), 0x8000);
    let _ = SINK;
}

#[test]
fn daemon_loss_goes_silent_without_a_hang_and_streams_come_back() {
    let mut rig = start();
    let params = Params::s16_48k(0);
    prepare(&mut rig.vm, &params);
    let (_, done) = play(
        &mut rig.vm,
        &params,
        &pattern(params.period_bytes as usize * 20, 1),
    );
    assert!(done.iter().all(|c| c.status == 0x8000));
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_STOP, 0)), 0x8000);

    // The daemon goes away: the guest keeps playing, in silence, at the real-time pace.
    rig.pw.stop();
    std::thread::sleep(Duration::from_millis(300));
    let (started, done) = play(
        &mut rig.vm,
        &params,
        &pattern(params.period_bytes as usize * 50, 2),
    );
    assert_eq!(done.len(), 50);
    assert!(done.iter().all(|c| c.status == 0x8000));
    let took = done.last().unwrap().at - started;
    assert!(
        took >= params.period() * 40,
        "50 periods without PipeWire in {took:?}"
    );
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_STOP, 0)), 0x8000);

    // The daemon returns: the broker reconnects and the stream plays into the sink again.
    rig.pw.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !rig.pw.node_exists("vsound-test-media") {
        assert!(
            std::time::Instant::now() < deadline,
            "the stream never came back"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let data = known_signal(params.period_bytes as usize * 50, 3);
    let recorded = play_recorded(
        &rig.pw,
        &mut rig.vm,
        rig.dir.path(),
        "after.raw",
        Duration::from_millis(500),
        &params,
        &data,
    );
    assert_arrived_intact(&recorded, &data);
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_STOP, 0)), 0x8000);
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_RELEASE, 0)), 0x8000);
}

/// A rig whose broker logs (at info) to `log`, so that a test can read why it did what.
struct LoggedRig {
    pw: PipeWire,
    _broker: Proc,
    _worker: Proc,
    vm: GuestVm,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl LoggedRig {
    fn start(dir: tempfile::TempDir, pw: PipeWire) -> LoggedRig {
        let config = dir.path().join("vsound.toml");
        std::fs::write(&config, CONFIG).unwrap();
        let socket = dir.path().join("broker.sock");
        let log = dir.path().join("broker.log");
        let mut broker = Proc {
            child: Command::new(common::bins::broker())
                .arg("--socket")
                .arg(&socket)
                .arg("--config")
                .arg(&config)
                .env("RUST_LOG", "info")
                .env_remove("XDG_RUNTIME_DIR")
                .env_remove("PIPEWIRE_RUNTIME_DIR")
                .envs(pw.env())
                .stdin(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("start broker"),
        };
        wait_for_path(&socket, &mut broker);
        // As root the workers run as `nobody` (see spawn_broker_with_env).
        if nix::unistd::Uid::effective().is_root() {
            use std::os::unix::fs::PermissionsExt;
            let mode = |m| std::fs::Permissions::from_mode(m);
            std::fs::set_permissions(dir.path(), mode(0o711)).unwrap();
            std::fs::set_permissions(&socket, mode(0o666)).unwrap();
        }
        let (worker, vm_socket) = spawn_worker(dir.path(), "vm", &socket, Some(&config));
        let vm = GuestVm::connect(&vm_socket, FrontendOptions::default()).unwrap();
        LoggedRig {
            pw,
            _broker: broker,
            _worker: worker,
            vm,
            log,
            dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Prints the PipeWire backend's log lines (the figures a run reports).
    fn print_backend_log(&self) {
        for line in self.log().lines().filter(|l| l.contains("pipewire:")) {
            println!("broker: {line}");
        }
    }
}

/// How long a test waits for one completion: far beyond any pace, far below `WAIT`, so that a
/// stream that hangs fails quickly.
const HANG: Duration = Duration::from_secs(3);

/// Like `play`, but calls `at_completion(n, rig)` after the n-th completion (from 1).
fn play_with(
    rig: &mut LoggedRig,
    params: &Params,
    data: &[u8],
    mut at_completion: impl FnMut(usize, &mut LoggedRig),
) -> (Instant, Vec<Completion>) {
    let mut chunks = data.chunks(params.period_bytes as usize);
    let mut in_flight = 0;
    for chunk in chunks.by_ref().take(params.periods as usize) {
        tx_submit(&mut rig.vm, params.stream, chunk);
        in_flight += 1;
    }
    let started = Instant::now();
    assert_eq!(
        control(&mut rig.vm, &pcm(p::R_PCM_START, params.stream)),
        0x8000,
        "START"
    );
    let mut done = Vec::new();
    while in_flight > 0 {
        let Some(used) = rig.vm.wait_used(p::TX_QUEUE, HANG) else {
            panic!(
                "no tx completion for {HANG:?} after {} of {} (the guest's aplay would fail \
                 with EIO); broker log:\n{}",
                done.len(),
                data.len() / params.period_bytes as usize,
                rig.log()
            );
        };
        done.push(split_status(&used, 0));
        in_flight -= 1;
        at_completion(done.len(), rig);
        if let Some(chunk) = chunks.next() {
            tx_submit(&mut rig.vm, params.stream, chunk);
            in_flight += 1;
        }
    }
    (started, done)
}

/// Asserts what a guest needs from a stream's completions: all OK, none before the frames it
/// carries were due at the real-time pace from START (less `lead`: PipeWire takes a quantum
/// into its buffer at the start of the cycle that plays it), no gap a guest's ALSA would give
/// up on (100 ms), and the whole at about the audio's duration. Returns the first completion's
/// delay.
fn assert_paced(
    started: Instant,
    done: &[Completion],
    params: &Params,
    lead: Duration,
) -> Duration {
    assert!(
        done.iter().all(|c| c.status == 0x8000),
        "a completion not OK"
    );
    for (k, c) in done.iter().enumerate() {
        let due = (params.period() * (k as u32 + 1)).saturating_sub(lead);
        // The test's START instant precedes the broker's: a completion at its due time is
        // never before it here.
        assert!(
            c.at - started >= due,
            "completion {k} at {:?}, before its frames were due at {due:?}",
            c.at - started
        );
    }
    let mut last = started;
    for (k, c) in done.iter().enumerate() {
        assert!(
            c.at - last < Duration::from_millis(100),
            "no completion for {:?} before completion {k}",
            c.at - last
        );
        last = c.at;
    }
    let audio = params.period() * done.len() as u32;
    let took = done.last().unwrap().at - started;
    println!(
        "{} periods of {:?} completed in {took:?}",
        done.len(),
        params.period()
    );
    assert!(
        took >= audio && took < audio + Duration::from_millis(250),
        "{audio:?} of audio completed in {took:?}"
    );
    done[0].at - started
}

/// The underruns the sink heard while it played `data` (S16 stereo, non-zero everywhere): runs
/// of at least 16 silent frames between its first and its last frames in `recorded`.
fn silent_gaps(recorded: &[u8], data: &[u8]) -> Option<usize> {
    let skip = 480 * 4 * 10;
    let start = find(recorded, &data[skip..skip + 256], 4)?;
    let end = find(&recorded[start..], &data[data.len() - 256..], 4)? + start;
    let mut gaps = 0;
    let mut silent = 0;
    for frame in recorded[start..end].chunks(4) {
        if frame.iter().all(|&b| b == 0) {
            silent += 1;
            if silent == 16 {
                gaps += 1;
            }
        } else {
            silent = 0;
        }
    }
    Some(gaps)
}

/// 264-frame periods (5.5 ms at 48 kHz stereo S16), four of them: a 22 ms guest buffer.
fn short_periods(stream: u32) -> Params {
    Params {
        period_bytes: 264 * 4,
        periods: 4,
        ..Params::s16_48k(stream)
    }
}

/// What PipeWire's data thread got is logged once it ran a cycle: real-time if the broker may
/// have it (RLIMIT_RTPRIO), normal priority with the limits otherwise.
#[test]
fn the_pipewire_data_threads_scheduling_is_logged() {
    let dir = tempfile::tempdir().unwrap();
    let pw = PipeWire::start(dir.path());
    let mut rig = LoggedRig::start(dir, pw);
    let params = Params::s16_48k(0);
    prepare(&mut rig.vm, &params);
    let data = pattern(params.period_bytes as usize * 30, 5);
    let (_, done) = play(&mut rig.vm, &params, &data);
    assert!(done.iter().all(|c| c.status == 0x8000));
    // The PipeWire thread logs it on its next watchdog look (within its stall limit).
    std::thread::sleep(Duration::from_millis(200));
    let log = rig.log();
    let line = log
        .lines()
        .find(|l| l.contains("PipeWire's data thread runs at"))
        .unwrap_or_else(|| panic!("the data thread's scheduling is not logged:\n{log}"));
    println!("{line}");
    let rtprio = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_RTPRIO)
        .map_or(0, |(soft, _)| soft);
    if rtprio == 0 {
        // This broker has no capability and no RLIMIT_RTPRIO: module-rt cannot have it.
        assert!(
            line.contains("normal priority") && line.contains("RLIMIT_RTPRIO 0"),
            "{line}"
        );
    }
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_STOP, 0)), 0x8000);
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_RELEASE, 0)), 0x8000);
}

#[test]
fn a_node_never_linked_plays_into_silence_on_time_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let pw = PipeWire::start_without_session_manager(dir.path());
    let mut rig = LoggedRig::start(dir, pw);
    let params = short_periods(0);
    prepare(&mut rig.vm, &params);
    let data = pattern(params.period_bytes as usize * 100, 21);
    let (started, done) = play_with(&mut rig, &params, &data, |_, _| {});
    assert_eq!(done.len(), 100);
    // Only the silence clock consumes here: nothing may come before it is due.
    let first = assert_paced(started, &done, &params, Duration::ZERO);
    println!("START to the first completion (the silence clock took over): {first:?}");
    // Before the guest's ALSA gives up: it fails the stream with EIO once no period completes
    // for max(100 ms, 1.1 x the buffer's time), here 100 ms.
    assert!(
        first < Duration::from_millis(100),
        "first completion after {first:?}"
    );
    rig.print_backend_log();
    let log = rig.log();
    assert!(
        log.contains("not scheduled") && log.contains("PipeWire says"),
        "the broker does not say why the stream plays silence:\n{log}"
    );
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_STOP, 0)), 0x8000);
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_RELEASE, 0)), 0x8000);

    // Capture the same way: silence, at the real-time pace.
    let params = short_periods(1);
    prepare(&mut rig.vm, &params);
    let (started, done) = record(&mut rig.vm, &params, 100);
    let first = assert_paced(started, &done, &params, Duration::ZERO);
    println!("capture: START to the first completion: {first:?}");
    assert!(done.iter().all(|c| c.data.iter().all(|&b| b == 0)));
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_STOP, 1)), 0x8000);
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_RELEASE, 1)), 0x8000);
}

#[test]
fn a_node_unlinked_mid_stream_keeps_pace_and_plays_again_once_relinked() {
    let dir = tempfile::tempdir().unwrap();
    let pw = PipeWire::start(dir.path());
    let mut rig = LoggedRig::start(dir, pw);
    let params = Params::s16_48k(0);
    prepare(&mut rig.vm, &params);
    let recording = rig.dir.path().join("sink.raw");
    let recorder = rig.pw.record_sink(&recording);
    std::thread::sleep(Duration::from_millis(500));
    let periods = 250;
    let data = known_signal(params.period_bytes as usize * periods, 22);
    let mut relinked_at = None;
    let mut resumed_after = None;
    let (started, done) = play_with(&mut rig, &params, &data, |n, rig| match n {
        40 => {
            let node = "vsound-test-media";
            assert!(
                !rig.pw.links_of(node).is_empty(),
                "the node was not linked:\n{}",
                rig.pw.link_list()
            );
            // WirePlumber's links go with it, and nothing relinks the node.
            rig.pw.stop_session_manager();
            rig.pw.unlink_node(node);
        }
        100 => {
            rig.pw.start_session_manager();
            relinked_at = Some(Instant::now());
        }
        _ if n > 100 && resumed_after.is_none() && rig.log().contains("scheduled again") => {
            resumed_after = relinked_at.map(|t| t.elapsed());
        }
        _ => {}
    });
    assert_eq!(done.len(), periods);
    // The graph's quantum is the guest's period here.
    assert_paced(started, &done, &params, params.period());
    println!("relink (session manager started) to resumed: {resumed_after:?}");
    assert!(
        resumed_after.is_some(),
        "the stream never resumed:\n{}",
        rig.log()
    );
    std::thread::sleep(Duration::from_millis(300));
    drop(recorder);
    let recorded = std::fs::read(&recording).unwrap();
    // The last 0.5 s were played after the relink: they reached the sink sample for sample.
    assert_arrived_intact(
        &recorded,
        &data[data.len() - 50 * params.period_bytes as usize..],
    );
    rig.print_backend_log();
    let log = rig.log();
    assert!(log.contains("not scheduled"), "{log}");
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_STOP, 0)), 0x8000);
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_RELEASE, 0)), 0x8000);
}

#[test]
fn a_ring_is_sized_from_a_pinned_quantum_not_only_from_the_period() {
    let dir = tempfile::tempdir().unwrap();
    let pw = PipeWire::start(dir.path());
    pw.set_setting("clock.force-quantum", "1024");
    let mut rig = LoggedRig::start(dir, pw);
    const EVENT_BUFFERS: usize = 32;
    for _ in 0..EVENT_BUFFERS {
        rig.vm.submit_no_kick(p::EVENT_QUEUE, &[], &[8]);
    }
    rig.vm.kick(p::EVENT_QUEUE);
    // A 44 ms guest buffer: room for a 1024-frame quantum and a period more.
    let params = Params {
        periods: 8,
        features: 1 << p::PCM_F_EVT_XRUNS,
        ..short_periods(0)
    };
    prepare(&mut rig.vm, &params);
    let recording = rig.dir.path().join("sink.raw");
    let recorder = rig.pw.record_sink(&recording);
    std::thread::sleep(Duration::from_millis(500));
    let periods = 400;
    let data = known_signal(params.period_bytes as usize * periods, 23);
    let (started, done) = play_with(&mut rig, &params, &data, |_, _| {});
    assert_eq!(done.len(), periods);
    let took = done.last().unwrap().at - started;
    let audio = params.period() * periods as u32;
    std::thread::sleep(Duration::from_millis(300));
    drop(recorder);
    let mut xruns = 0;
    while let Some(event) = rig.vm.try_used(p::EVENT_QUEUE) {
        let code = u32::from_le_bytes(event.written[..4].try_into().unwrap());
        xruns += usize::from(code == p::EVT_PCM_XRUN);
    }
    rig.print_backend_log();
    let recorded = std::fs::read(&recording).unwrap();
    let gaps = silent_gaps(&recorded, &data);
    println!(
        "pinned quantum 1024, 264-frame periods: {audio:?} of audio in {took:?}, {xruns} xrun \
         events, {gaps:?} silent gaps at the sink"
    );
    assert!(took < audio * 21 / 20, "{audio:?} of audio took {took:?}");
    assert!(xruns <= 2, "{xruns} xrun events");
    assert_eq!(gaps, Some(0), "underruns at the sink");
    assert_arrived_intact(&recorded, &data);
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_STOP, 0)), 0x8000);
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_RELEASE, 0)), 0x8000);
}

/// VMs' workers killed one after another while another VM plays into the same sink: the other
/// VM's audio arrives sample for sample (the killed VMs played zeros, which change no sample of
/// the mix), but for PipeWire's own residual at a neighbour's removal (`lost_quantum`). The
/// broker once destroyed a dead VM's stream while it was still active, which cost the other
/// VM's stream a quantum in about 1 kill in 4; it now deactivates the stream first. `KILLED`
/// kills per run; a stress run (`VSOUND_STRESS_KILLS=4 VSOUND_STRICT_SAMPLES=1`: 4 of 32 runs
/// lost a quantum, as `pw_play_killed_beside_pw_play` measures PipeWire doing for native
/// clients) is left out of CI's single run.
#[test]
fn killed_workers_leave_another_vms_playback_intact() {
    let killed: usize = std::env::var("VSOUND_STRESS_KILLS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    let dir = tempfile::tempdir().unwrap();
    let pw = PipeWire::start(dir.path());
    let config = dir.path().join("vsound.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let (_broker, broker_socket) = spawn_broker_with_env(dir.path(), Some(&config), &pw.env());
    let params = Params::s16_48k(0);
    let mut doomed = Vec::new();
    for k in 0..killed {
        let (worker, socket) = spawn_worker(
            dir.path(),
            &format!("vm-{k}"),
            &broker_socket,
            Some(&config),
        );
        let dying = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let player_dying = dying.clone();
        let player = std::thread::spawn(move || {
            let mut vm = GuestVm::connect(&socket, FrontendOptions::default()).unwrap();
            prepare(&mut vm, &params);
            let zeros = vec![0u8; params.period_bytes as usize];
            for _ in 0..params.periods {
                tx_submit(&mut vm, 0, &zeros);
            }
            assert_eq!(control(&mut vm, &pcm(p::R_PCM_START, 0)), 0x8000);
            while wait_used_or_killed(&mut vm, p::TX_QUEUE, Duration::from_secs(2), &player_dying)
                .is_some()
            {
                tx_submit(&mut vm, 0, &zeros);
            }
        });
        doomed.push((worker, player, dying));
    }
    let (_worker_b, socket_b) = spawn_worker(dir.path(), "vm-b", &broker_socket, Some(&config));
    let recording = dir.path().join("sink.raw");
    let recorder = pw.record_sink(&recording);
    std::thread::sleep(Duration::from_millis(500));
    let mut vm_b = GuestVm::connect(&socket_b, FrontendOptions::default()).unwrap();
    prepare(&mut vm_b, &params);
    let data = known_signal(params.period_bytes as usize * 150 * (killed + 1), 23);
    let killer = std::thread::spawn(move || {
        for (mut worker, player, dying) in doomed {
            std::thread::sleep(Duration::from_millis(1100));
            dying.store(true, std::sync::atomic::Ordering::Release);
            worker.child.kill().unwrap();
            worker.child.wait().unwrap();
            player.join().unwrap();
        }
    });
    let (_, done) = play(&mut vm_b, &params, &data);
    assert!(done.iter().all(|c| c.status == 0x8000));
    killer.join().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(recorder);
    let recorded = std::fs::read(&recording).unwrap();
    assert_arrived_intact(&recorded, &data);
}

/// Without a `node_name` in the config, a stream's node is named after its VM
/// (`vsound.VM.STREAM`, with the VM in `vsound.vm` and the description), not after the broker's
/// connection number: a VM's worker restarted under the same name gets the same node name back,
/// which a session manager's routing rules can match.
#[test]
fn nodes_are_named_after_their_vm_across_worker_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let pw = PipeWire::start(dir.path());
    let config = dir.path().join("vsound.toml");
    std::fs::write(
        &config,
        r#"
[[streams]]
name = "media"
direction = "output"
backend = "pipewire"
formats = ["S16"]
rates = [48000]
target_object = "vsound-test-sink"
"#,
    )
    .unwrap();
    let (_broker, broker_socket) = spawn_broker_with_env(dir.path(), Some(&config), &pw.env());
    let params = Params::s16_48k(0);
    let node_of = |vm: &str| format!("vsound.{vm}.media");
    let serve = |vm: &str| {
        let (worker, socket) = spawn_worker(dir.path(), vm, &broker_socket, Some(&config));
        let mut guest = GuestVm::connect(&socket, FrontendOptions::default()).unwrap();
        prepare(&mut guest, &params);
        (worker, guest)
    };
    let wait_node = |name: &str, present: bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while pw.node_exists(name) != present {
            assert!(
                Instant::now() < deadline,
                "node {name} {} within 10 s",
                if present { "did not appear" } else { "stayed" }
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let (alpha, alpha_guest) = serve("alpha");
    let (_beta, mut beta_guest) = serve("beta");
    for vm in ["alpha", "beta"] {
        wait_node(&node_of(vm), true);
        let info = pw.node_info(&node_of(vm));
        assert!(info.contains(&format!("vsound.vm = \"{vm}\"")), "{info}");
        assert!(
            info.contains(&format!("node.description = \"vsound {vm} media\"")),
            "{info}"
        );
    }
    // The worker killed: its node goes; restarted under the same name: it comes back.
    drop((alpha_guest, alpha));
    wait_node(&node_of("alpha"), false);
    assert!(
        pw.node_exists(&node_of("beta")),
        "another VM's node went too"
    );
    let (_alpha, mut alpha_guest) = serve("alpha");
    wait_node(&node_of("alpha"), true);
    let info = pw.node_info(&node_of("alpha"));
    assert!(info.contains("vsound.vm = \"alpha\""), "{info}");
    // And it plays, at pace.
    let (started, done) = play(
        &mut alpha_guest,
        &params,
        &known_signal(params.period_bytes as usize * 30, 41),
    );
    assert!(done.iter().all(|c| c.status == 0x8000));
    let took = done.last().unwrap().at - started;
    assert!(took >= params.period() * 25, "30 periods in {took:?}");
    assert_eq!(control(&mut beta_guest, &pcm(p::R_PCM_RELEASE, 0)), 0x8000);
}

/// A 5.1 stream (six channels) is a PipeWire node with the positions of the config's 5.1
/// channel map (the default maps: FL FR RL RR FC LFE), so PipeWire mixes each channel to its
/// place; and it plays at pace.
#[test]
fn a_six_channel_stream_carries_the_51_positions() {
    let mut rig = start();
    let params = Params {
        channels: 6,
        period_bytes: 480 * 12,
        ..Params::s16_48k(0)
    };
    prepare(&mut rig.vm, &params);
    let info = rig.pw.node_info("vsound-test-media");
    let id: String = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("id: "))
        .unwrap_or_default()
        .to_string();
    let out = Command::new("pw-cli")
        .args(["enum-params", &id, "EnumFormat"])
        .envs(rig.pw.env())
        .output()
        .expect("pw-cli");
    let text = String::from_utf8_lossy(&out.stdout);
    let positions: Vec<&str> = text
        .split("Spa:Enum:AudioChannel:")
        .skip(1)
        .map(|rest| {
            rest.split(|c: char| !c.is_ascii_alphanumeric())
                .next()
                .unwrap_or("")
        })
        .collect();
    assert_eq!(
        positions,
        ["FL", "FR", "RL", "RR", "FC", "LFE"],
        "node {id}'s format:\n{text}"
    );
    let data = known_signal(params.period_bytes as usize * 50, 31);
    let (started, done) = play(&mut rig.vm, &params, &data);
    assert!(done.iter().all(|c| c.status == 0x8000));
    let took = done.last().unwrap().at - started;
    assert!(took >= params.period() * 45, "50 periods in {took:?}");
}

/// The sample-exact check lets exactly one lost graph quantum through (`lost_quantum`: silence,
/// a repeated quantum or nothing where about two quanta were lost), and nothing else: not two,
/// not a shift, not a wrong sample, not more than a quantum repeated.
#[test]
fn the_sample_check_lets_one_lost_quantum_through_and_nothing_more() {
    let data = known_signal(4 * 48000, 5);
    let frame = 4;
    let lose = |recording: &mut Vec<u8>, at: usize| {
        // 256 frames of silence where 512 frames were: 256 lost outright.
        let at = at * frame;
        recording.splice(at..at + 512 * frame, vec![0u8; 256 * frame]);
    };
    let mut once = data.clone();
    lose(&mut once, 20_000);
    once.extend(vec![0u8; 48000]);
    assert_arrived_intact(&once, &data);
    let check = |recording: Vec<u8>| {
        std::panic::catch_unwind(|| assert_arrived_intact(&recording, &data)).is_err()
    };
    let mut twice = once.clone();
    lose(&mut twice, 30_000);
    assert!(check(twice), "two lost quanta let through");
    let mut shifted = data.clone();
    shifted.splice(20_000 * frame..20_000 * frame, vec![0u8; 256 * frame]);
    assert!(check(shifted), "a shift let through");
    let mut wrong = data.clone();
    wrong[20_000 * frame] ^= 1;
    assert!(check(wrong), "a wrong sample let through");
    // The residual's other two faces, as recorded: the quantum two ahead played twice in place
    // of the two lost, or a quantum missing outright.
    let q = |k: usize| (20_000 + 256 * k) * frame;
    let repeated = [&data[..q(0)], &data[q(2)..q(3)], &data[q(2)..]].concat();
    assert_arrived_intact(&[repeated, vec![0u8; 48000]].concat(), &data);
    let dropped = [&data[..q(0)], &data[q(1)..]].concat();
    assert_arrived_intact(&[dropped, vec![0u8; 48000]].concat(), &data);
    // A quantum of silence in place of as many frames (seen in a CI run of the AAOS test).
    let mut silenced = data.clone();
    silenced[q(0)..q(1)].fill(0);
    assert_arrived_intact(&[silenced, vec![0u8; 48000]].concat(), &data);
    let repeated_twice = [&data[..q(0)], &data[q(2)..q(4)], &data[q(2)..]].concat();
    assert!(check(repeated_twice), "two repeated quanta let through");
}

fn ctl_request(code: u32, id: u32) -> Vec<u8> {
    let mut req = code.to_le_bytes().to_vec();
    req.extend_from_slice(&id.to_le_bytes());
    req
}

fn ctl_write(vm: &mut GuestVm, id: u32, value: u32) -> u32 {
    let mut req = ctl_request(p::R_CTL_WRITE, id);
    let mut members = [0u8; p::ctl::VALUE_SIZE];
    members[..4].copy_from_slice(&value.to_le_bytes());
    req.extend_from_slice(&members);
    control(vm, &req)
}

fn ctl_read(vm: &mut GuestVm, id: u32) -> u32 {
    let resp = vm.request(p::CONTROL_QUEUE, &ctl_request(p::R_CTL_READ, id), 516);
    assert_eq!(status_of(&resp), 0x8000);
    u32::from_le_bytes(resp[4..8].try_into().unwrap())
}

/// Polls the node's volume props until `want` holds (5 s at most).
fn wait_node_volume(
    pw: &PipeWire,
    name: &str,
    want: impl Fn(&[f32], bool) -> bool,
) -> (Vec<f32>, bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = pw.node_volume(name);
        if let Some((volumes, mute)) = &now {
            if want(volumes, *mute) {
                return (volumes.clone(), *mute);
            }
        }
        assert!(Instant::now() < deadline, "node {name} props: {now:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn with_controls() -> FrontendOptions {
    FrontendOptions {
        extra_features: 1 << p::F_CTLS,
        ..FrontendOptions::default()
    }
}

#[test]
fn the_guests_volume_and_mute_become_the_nodes_channel_volumes_and_mute() {
    let mut rig = start_with(with_controls());
    let params = Params::s16_48k(0);
    // Set before the stream exists: its node starts with it.
    assert_eq!(ctl_write(&mut rig.vm, 0, 50), 0x8000);
    prepare(&mut rig.vm, &params);
    // Running (silence: no buffers queued), as a node's props show while it plays.
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_START, 0)), 0x8000);
    let at_50 = virtio_snd::ctl::Gain {
        volume: 50,
        mute: false,
    }
    .volume_amplitude();
    let (volumes, mute) = wait_node_volume(&rig.pw, "vsound-test-media", |v, m| {
        !m && v.len() == 2 && v.iter().all(|x| (x - at_50).abs() < 1e-4)
    });
    println!("volume 50 (-25 dB): channelVolumes {volumes:?}, mute {mute}");
    // While it plays: -6 dB, then the switch off.
    assert_eq!(ctl_write(&mut rig.vm, 0, 88), 0x8000);
    wait_node_volume(&rig.pw, "vsound-test-media", |v, _| {
        v.iter().all(|x| (x - 0.501_187).abs() < 1e-4)
    });
    assert_eq!(ctl_write(&mut rig.vm, 1, 0), 0x8000);
    wait_node_volume(&rig.pw, "vsound-test-media", |_, m| m);
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_STOP, 0)), 0x8000);
    // Muted, a known signal leaves nothing at the sink but silence.
    let data = known_signal(params.period_bytes as usize * 50, 21);
    let recorded = play_recorded(
        &rig.pw,
        &mut rig.vm,
        rig.dir.path(),
        "sink.raw",
        Duration::from_millis(300),
        &params,
        &data,
    );
    assert!(
        recorded.len() > data.len(),
        "recorded {} bytes",
        recorded.len()
    );
    assert!(
        recorded.iter().all(|&b| b == 0),
        "a muted bus reached the sink"
    );
    // The guest reads back what it set; the switch on again unmutes the node.
    assert_eq!(ctl_read(&mut rig.vm, 0), 88);
    assert_eq!(ctl_write(&mut rig.vm, 1, 1), 0x8000);
    wait_node_volume(&rig.pw, "vsound-test-media", |_, m| !m);
}

#[test]
fn a_volume_change_on_pipewires_side_reaches_the_guest() {
    let mut rig = start_with(with_controls());
    for _ in 0..8 {
        rig.vm.submit_no_kick(p::EVENT_QUEUE, &[], &[8]);
    }
    rig.vm.kick(p::EVENT_QUEUE);
    let params = Params::s16_48k(0);
    prepare(&mut rig.vm, &params);
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_START, 0)), 0x8000);
    wait_node_volume(&rig.pw, "vsound-test-media", |v, m| {
        !m && v.iter().all(|&x| x == 1.0)
    });
    // Let the broker's proxy see the node's props first.
    std::thread::sleep(Duration::from_millis(300));
    rig.pw
        .set_node_props("vsound-test-media", "{ channelVolumes: [ 0.5, 0.5 ] }");
    let event = rig
        .vm
        .wait_used(p::EVENT_QUEUE, WAIT)
        .expect("a CTL_NOTIFY event");
    let notify: p::CtlEvent = p::read_prefix(&event.written).unwrap();
    assert_eq!(notify.hdr.code.get(), p::EVT_CTL_NOTIFY);
    assert_eq!(notify.control_id.get(), 0, "Media Playback Volume");
    assert_eq!(notify.mask.get(), 1 << p::ctl::EVT_MASK_VALUE);
    // 0.5 linear is -6.02 dB: the nearest step is 88 (-6.0 dB).
    assert_eq!(ctl_read(&mut rig.vm, 0), 88);
    assert_eq!(ctl_read(&mut rig.vm, 1), 1);
    rig.pw.set_node_props("vsound-test-media", "{ mute: true }");
    let event = rig
        .vm
        .wait_used(p::EVENT_QUEUE, WAIT)
        .expect("a CTL_NOTIFY event for the switch");
    let notify: p::CtlEvent = p::read_prefix(&event.written).unwrap();
    assert_eq!(notify.control_id.get(), 1, "Media Playback Switch");
    assert_eq!(ctl_read(&mut rig.vm, 1), 0);
    assert_eq!(ctl_read(&mut rig.vm, 0), 88);
    // The guest's own write is no news to itself: no event comes back for it.
    assert_eq!(ctl_write(&mut rig.vm, 0, 20), 0x8000);
    wait_node_volume(&rig.pw, "vsound-test-media", |v, _| {
        (v[0] - 0.01).abs() < 1e-4
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        rig.vm.try_used(p::EVENT_QUEUE).is_none(),
        "an echo of the guest's write"
    );
    assert_eq!(ctl_read(&mut rig.vm, 0), 20);
}

#[test]
fn back_at_0_db_after_a_change_the_sink_gets_every_sample_again() {
    let mut rig = start_with(with_controls());
    let params = Params::s16_48k(0);
    assert_eq!(ctl_write(&mut rig.vm, 0, 88), 0x8000);
    prepare(&mut rig.vm, &params);
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_START, 0)), 0x8000);
    wait_node_volume(&rig.pw, "vsound-test-media", |v, _| {
        v.iter().all(|x| (x - 0.501_187).abs() < 1e-4)
    });
    assert_eq!(ctl_write(&mut rig.vm, 0, 100), 0x8000);
    wait_node_volume(&rig.pw, "vsound-test-media", |v, m| {
        !m && v.iter().all(|&x| x == 1.0)
    });
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_STOP, 0)), 0x8000);
    let data = known_signal(params.period_bytes as usize * 100, 12);
    let recorded = play_recorded(
        &rig.pw,
        &mut rig.vm,
        rig.dir.path(),
        "sink.raw",
        Duration::from_millis(500),
        &params,
        &data,
    );
    assert_arrived_intact(&recorded, &data);
}

const JACK_CONFIG: &str = r#"
[[streams]]
name = "media"
direction = "output"
backend = "pipewire"
formats = ["S16"]
rates = [48000]
target_object = "vsound-jack-sink"
[[streams]]
name = "navigation"
direction = "output"
backend = "pipewire"
formats = ["S16"]
rates = [48000]
[[jacks]]
name = "Media Out"
hda_reg_defconf = 0x01014010
follows = "media"
[[jacks]]
name = "Navigation Out"
hda_reg_defconf = 0x01014020
follows = "navigation"
[[jacks]]
name = "Fixed"
connected = false
"#;

/// A jack that follows a stream is connected while the stream's PipeWire target exists: a
/// sink plugged in and out again gives JACK_CONNECTED and JACK_DISCONNECTED events and the
/// state in JACK_INFO; a jack following a stream without a target follows any sink (the test
/// sink stays), and a jack that follows nothing keeps its configured state.
#[test]
fn jacks_follow_their_streams_pipewire_targets() {
    let dir = tempfile::tempdir().unwrap();
    let pw = PipeWire::start(dir.path());
    let config = dir.path().join("vsound.toml");
    std::fs::write(&config, JACK_CONFIG).unwrap();
    let (_broker, broker_socket) = spawn_broker_with_env(dir.path(), Some(&config), &pw.env());
    let (_worker, socket) = spawn_worker(dir.path(), "vm", &broker_socket, Some(&config));
    let mut vm = GuestVm::connect(&socket, FrontendOptions::default()).unwrap();
    for _ in 0..8 {
        vm.submit_no_kick(p::EVENT_QUEUE, &[], &[8]);
    }
    vm.kick(p::EVENT_QUEUE);
    let wait_jacks = |vm: &mut GuestVm, want: [u8; 3]| {
        let deadline = Instant::now() + WAIT;
        loop {
            let now = jacks_connected(vm, 3);
            if now == want {
                return;
            }
            assert!(Instant::now() < deadline, "jacks {now:?}, not {want:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let jack_event = |vm: &mut GuestVm| {
        let event = vm.wait_used(p::EVENT_QUEUE, WAIT).expect("a jack event");
        vm.submit(p::EVENT_QUEUE, &[], &[8]);
        let code = u32::from_le_bytes(event.written[..4].try_into().unwrap());
        let jack = u32::from_le_bytes(event.written[4..8].try_into().unwrap());
        (code, jack)
    };
    wait_jacks(&mut vm, [0, 1, 0]);
    assert!(
        vm.try_used(p::EVENT_QUEUE).is_none(),
        "an event before any change"
    );
    pw.create_sink("vsound-jack-sink");
    assert_eq!(jack_event(&mut vm), (p::EVT_JACK_CONNECTED, 0));
    wait_jacks(&mut vm, [1, 1, 0]);
    pw.destroy_node("vsound-jack-sink");
    assert_eq!(jack_event(&mut vm), (p::EVT_JACK_DISCONNECTED, 0));
    wait_jacks(&mut vm, [0, 1, 0]);
    pw.create_sink("vsound-jack-sink");
    assert_eq!(jack_event(&mut vm), (p::EVT_JACK_CONNECTED, 0));
    assert!(
        vm.try_used(p::EVENT_QUEUE).is_none(),
        "one event per change"
    );
}

/// The reference for `lost_quantum`'s residual: native `pw-play` clients playing zeros, killed
/// one after another beside a `pw-play` of a known signal, at the same latency as the guest's
/// period. Not in CI (PipeWire's own loss makes it fail about once in 20 runs); run it with
/// `VSOUND_STRICT_SAMPLES=1 cargo test --test pipewire pw_play_killed -- --ignored` to
/// compare PipeWire's rate with `killed_workers_leave_another_vms_playback_intact`'s.
#[test]
#[ignore = "a measurement of PipeWire itself, see its doc"]
fn pw_play_killed_beside_pw_play() {
    // The guest's period.
    const LATENCY: &[&str] = &["--latency", "480"];
    let dir = tempfile::tempdir().unwrap();
    let pw = PipeWire::start(dir.path());
    let killed = 4;
    let zeros_wav = dir.path().join("zeros.wav");
    write_wav_s16(&zeros_wav, 2, 48000, &vec![0u8; 48000 * 4 * 10]);
    let data = known_signal(480 * 4 * 150 * (killed + 1), 23);
    let b_wav = dir.path().join("b.wav");
    write_wav_s16(&b_wav, 2, 48000, &data);
    let recording = dir.path().join("sink.raw");
    let mut doomed: Vec<_> = (0..killed)
        .map(|_| pw.play_into_sink_with(&zeros_wav, LATENCY))
        .collect();
    let recorder = pw.record_sink(&recording);
    std::thread::sleep(Duration::from_millis(500));
    let mut b = pw.play_into_sink_with(&b_wav, LATENCY);
    for d in doomed.iter_mut() {
        std::thread::sleep(Duration::from_millis(1100));
        d.child.kill().unwrap();
        d.child.wait().unwrap();
    }
    b.child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(recorder);
    let recorded = std::fs::read(&recording).unwrap();
    assert_arrived_intact(&recorded, &data);
}
