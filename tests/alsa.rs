//! The ALSA backend through a real ALSA PCM defined in a test asoundrc: the PipeWire ALSA
//! plugin, routed to a private PipeWire daemon's null sink, where the played samples are checked
//! and from whose monitor the capture stream records a known signal.

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
    let dir = tempfile::tempdir().unwrap();
    let pw = PipeWire::start(dir.path());
    std::fs::write(dir.path().join(".asoundrc"), ASOUNDRC).unwrap();
    let config = dir.path().join("vsound.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let mut env = pw.env();
    env.push(("HOME", dir.path().to_path_buf()));
    let (broker, broker_socket) = spawn_broker_with_env(dir.path(), Some(&config), &env);
    let (worker, socket) = spawn_worker(dir.path(), "vm", &broker_socket, Some(&config));
    let vm = GuestVm::connect(&socket, FrontendOptions::default()).unwrap();
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
    let (_, done) = record(&mut rig.vm, &params, 150);
    drop(player);
    assert!(done.iter().all(|c| c.status == 0x8000));
    let captured: Vec<u8> = done.iter().flat_map(|c| c.data.iter().copied()).collect();
    assert_carries_signal(&source, &captured);
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_STOP, 1)), 0x8000);
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_RELEASE, 1)), 0x8000);
}
