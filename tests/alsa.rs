//! The ALSA backend through a real ALSA PCM defined in a test asoundrc: the PipeWire ALSA
//! plugin, routed to a private PipeWire daemon's null sink, where the played samples are checked
//! and from whose monitor the capture stream records a known signal; the broker's gain on the
//! samples it writes to the PCM (-6 dB exactly as computed, silence when muted).

mod common;

use std::time::Duration;

use common::frontend::{FrontendOptions, GuestVm};
use common::pipewire::{assert_arrived_intact, assert_carries_signal, PipeWire};
use common::vsound::*;
use virtio_snd::protocol as p;

const ASOUNDRC: &str = r#"
pcm.vsound_test {
    type pipewire
    playback_node "vsound-test-sink"
    capture_node "vsound-test-sink"
}
"#;

const CONFIG: &str = r#"
controls = true
[[streams]]
name = "media"
direction = "output"
backend = "alsa"
alsa_device = "vsound_test"
formats = ["S16"]
rates = [48000]
[[streams]]
name = "mic"
direction = "input"
backend = "alsa"
alsa_device = "vsound_test"
formats = ["S16"]
rates = [48000]
"#;

struct AlsaRig {
    pw: PipeWire,
    _broker: Proc,
    _worker: Proc,
    vm: GuestVm,
    dir: tempfile::TempDir,
}

fn start() -> AlsaRig {
    start_with(FrontendOptions::default())
}

fn start_with(opts: FrontendOptions) -> AlsaRig {
    let dir = tempfile::tempdir().unwrap();
    let pw = PipeWire::start(dir.path());
    std::fs::write(dir.path().join(".asoundrc"), ASOUNDRC).unwrap();
    let config = dir.path().join("vsound.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let mut env = pw.env();
    env.push(("HOME", dir.path().to_path_buf()));
    let (broker, broker_socket) = spawn_broker_with_env(dir.path(), Some(&config), &env);
    let (worker, socket) = spawn_worker(dir.path(), "vm", &broker_socket, Some(&config));
    let vm = GuestVm::connect(&socket, opts).unwrap();
    AlsaRig {
        pw,
        _broker: broker,
        _worker: worker,
        vm,
        dir,
    }
}

#[test]
fn playback_through_an_alsa_pcm_arrives_intact_and_paced() {
    let mut rig = start();
    let params = Params::s16_48k(0);
    prepare(&mut rig.vm, &params);
    let recording = rig.dir.path().join("sink.raw");
    let recorder = rig.pw.record_sink(&recording);
    std::thread::sleep(Duration::from_millis(500));
    let data = known_signal(params.period_bytes as usize * 100, 21);
    let (started, done) = play(&mut rig.vm, &params, &data);
    assert_eq!(done.len(), 100);
    assert!(done.iter().all(|c| c.status == 0x8000));
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

#[test]
fn capture_through_an_alsa_pcm_receives_the_known_signal() {
    let mut rig = start();
    let params = Params::s16_48k(1);
    let source = known_signal(48000 * 4 * 2, 13);
    let wav = rig.dir.path().join("known.wav");
    write_wav_s16(&wav, 2, 48000, &source);
    prepare(&mut rig.vm, &params);
    let player = rig.pw.play_into_sink(&wav);
    // pw-play's own start (its connection and link) before the capture: 1.5 s of capture
    // then lies within its 2 s of signal, also when a loaded machine starts it late.
    std::thread::sleep(Duration::from_millis(300));
    let (_, done) = record(&mut rig.vm, &params, 150);
    drop(player);
    assert!(done.iter().all(|c| c.status == 0x8000));
    let captured: Vec<u8> = done.iter().flat_map(|c| c.data.iter().copied()).collect();
    assert_carries_signal(&source, &captured);
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_STOP, 1)), 0x8000);
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_RELEASE, 1)), 0x8000);
}

/// Plays `data` on stream 0 and returns what reached the sink.
fn play_to_sink(rig: &mut AlsaRig, data: &[u8]) -> Vec<u8> {
    let params = Params::s16_48k(0);
    prepare(&mut rig.vm, &params);
    let recording = rig.dir.path().join("sink.raw");
    let recorder = rig.pw.record_sink(&recording);
    std::thread::sleep(Duration::from_millis(500));
    let (_, done) = play(&mut rig.vm, &params, data);
    assert!(done.iter().all(|c| c.status == 0x8000));
    std::thread::sleep(Duration::from_millis(300));
    drop(recorder);
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_STOP, 0)), 0x8000);
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_RELEASE, 0)), 0x8000);
    std::fs::read(&recording).unwrap()
}

fn ctl_write(vm: &mut GuestVm, id: u32, value: u32) -> u32 {
    let mut req = p::R_CTL_WRITE.to_le_bytes().to_vec();
    req.extend_from_slice(&id.to_le_bytes());
    let mut members = [0u8; p::ctl::VALUE_SIZE];
    members[..4].copy_from_slice(&value.to_le_bytes());
    req.extend_from_slice(&members);
    control(vm, &req)
}

#[test]
fn the_brokers_gain_reaches_an_alsa_pcm() {
    let mut rig = start_with(FrontendOptions {
        extra_features: 1 << p::F_CTLS,
        ..FrontendOptions::default()
    });
    // -6 dB: each sample rounded to the nearest code of x0.501, which PipeWire's plugin then
    // passes on unchanged.
    assert_eq!(ctl_write(&mut rig.vm, 0, 88), 0x8000);
    let factor = f64::from(
        virtio_snd::ctl::Gain {
            volume: 88,
            mute: false,
        }
        .amplitude(),
    );
    let data = known_signal(1920 * 60, 41);
    let want: Vec<u8> = data
        .chunks_exact(2)
        .flat_map(|s| {
            let v = f64::from(i16::from_le_bytes([s[0], s[1]]));
            ((v * factor).round() as i16).to_le_bytes()
        })
        .collect();
    let recorded = play_to_sink(&mut rig, &data);
    assert_arrived_intact(&recorded, &want);
    // Muted: the sink hears nothing at all.
    assert_eq!(ctl_write(&mut rig.vm, 1, 0), 0x8000);
    let recorded = play_to_sink(&mut rig, &data);
    assert!(recorded.len() > data.len());
    assert!(
        recorded.iter().all(|&b| b == 0),
        "a muted bus reached the sink"
    );
}

/// A jack that follows an ALSA stream is connected while the stream's device opens: one on the
/// test PCM is, one on a PCM that does not exist is not (and an open tried at its PREPARE
/// does not change that), as JACK_INFO reports.
#[test]
fn a_jack_follows_whether_its_alsa_device_opens() {
    let dir = tempfile::tempdir().unwrap();
    let pw = PipeWire::start(dir.path());
    std::fs::write(dir.path().join(".asoundrc"), ASOUNDRC).unwrap();
    let config = dir.path().join("vsound.toml");
    std::fs::write(
        &config,
        r#"
[[streams]]
name = "media"
direction = "output"
backend = "alsa"
alsa_device = "vsound_test"
formats = ["S16"]
rates = [48000]
[[streams]]
name = "rear"
direction = "output"
backend = "alsa"
alsa_device = "vsound_not_plugged_in"
formats = ["S16"]
rates = [48000]
[[jacks]]
name = "Media Out"
follows = "media"
[[jacks]]
name = "Rear Out"
follows = "rear"
"#,
    )
    .unwrap();
    let mut env = pw.env();
    env.push(("HOME", dir.path().to_path_buf()));
    let (_broker, broker_socket) = spawn_broker_with_env(dir.path(), Some(&config), &env);
    let (_worker, socket) = spawn_worker(dir.path(), "vm", &broker_socket, Some(&config));
    let mut vm = GuestVm::connect(&socket, FrontendOptions::default()).unwrap();
    let jacks = |vm: &mut GuestVm| jacks_connected(vm, 2);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while jacks(&mut vm) != [1, 0] {
        assert!(
            std::time::Instant::now() < deadline,
            "jacks {:?}",
            jacks(&mut vm)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The worker plays a stream the broker cannot open into silence, at its pace; the open
    // it tried confirms the device is not there.
    control(&mut vm, &Params::s16_48k(1).request());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(jacks(&mut vm), [1, 0]);
    prepare(&mut vm, &Params::s16_48k(0));
    assert_eq!(jacks(&mut vm), [1, 0]);
}
