//! The PipeWire backend against a real, private, headless PipeWire daemon: what the guest plays
//! arrives at the sink sample for sample; what plays into the sink arrives in the guest's rx
//! buffers; node properties come from the config.

mod common;

use std::time::Duration;

use common::frontend::{FrontendOptions, GuestVm};
use common::pipewire::{assert_arrived_intact, assert_carries_signal, PipeWire, SINK};
use common::vsound::*;
use vsound::protocol as p;

const CONFIG: &str = r#"
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
    let dir = tempfile::tempdir().unwrap();
    let pw = PipeWire::start(dir.path());
    let config = dir.path().join("vsound.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let (broker, broker_socket) = spawn_broker_with_env(dir.path(), Some(&config), &pw.env());
    let (worker, socket) = spawn_worker(dir.path(), "vm", &broker_socket, Some(&config));
    let vm = GuestVm::connect(&socket, FrontendOptions::default()).unwrap();
    PwRig {
        pw,
        _broker: broker,
        _worker: worker,
        vm,
        dir,
    }
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
    let recording = rig.dir.path().join("after.raw");
    let recorder = rig.pw.record_sink(&recording);
    std::thread::sleep(Duration::from_millis(500));
    let data = known_signal(params.period_bytes as usize * 50, 3);
    let (_, done) = play(&mut rig.vm, &params, &data);
    assert!(done.iter().all(|c| c.status == 0x8000));
    std::thread::sleep(Duration::from_millis(300));
    drop(recorder);
    let recorded = std::fs::read(&recording).unwrap();
    assert_arrived_intact(&recorded, &data);
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_STOP, 0)), 0x8000);
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_RELEASE, 0)), 0x8000);
}
