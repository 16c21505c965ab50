//! End-to-end test in a real guest: QEMU 10 (TCG) boots a Debian 6.12 kernel with a busybox
//! initramfs (tests/e2e/build-guest.sh, cached under target/e2e-cache) whose stock `virtio_snd`
//! driver talks to the real vsound-worker over vhost-user; the broker plays and records through
//! a private, headless PipeWire daemon. In the guest:
//!
//! - `aplay -l` lists the virtio card;
//! - `aplay` plays three known WAVs (default periods, 10 ms and 160 ms periods); all arrive at the null
//!   sink's monitor bit-exact, and each takes its duration in the guest's clock and the host's
//!   (so completions are neither early nor stalled);
//! - `arecord` records 3 s while a known signal plays into a second null sink whose monitor is
//!   the capture stream's source; the WAV comes back on a virtio-blk disk and equals the signal
//!   sample for sample;
//! - when the guest powers off, the worker exits (its VMM hung up) and the broker stays.
//!
//! `controls` has the guest's `amixer` list its controls, set a bus's volume and mute (the
//! PipeWire node's channelVolumes and mute follow, a muted bus is silence at the sink) and see a
//! change made on PipeWire's side. `faults` kills the broker and another VM's worker under a playing guest; `matrix` plays and
//! records across rates, channel counts and period sizes on the wav and null backends, then runs
//! a long session of PREPARE / RELEASE cycles. `pasted` starts QEMU (stopped, no guest) with the
//! arguments `vsound run` prints and those in the README, as a user pastes them.
//!
//! Needs (and fails, not skips, without them): qemu-system-x86 from bookworm-backports,
//! pipewire, pipewire-bin and wireplumber, and the guest packages build-guest.sh fetches with
//! `apt-get download`. Run alone: `cargo test --test e2e -- --nocapture`.

mod aaos;
#[path = "../common/mod.rs"]
mod common;
mod controls;
mod faults;
mod guest;
mod matrix;
mod pasted;

use std::time::{Duration, Instant};

use common::pipewire::PipeWire;
use common::vsound::*;
use guest::*;

const CONFIG: &str = r#"
[[streams]]
name = "media"
direction = "output"
backend = "pipewire"
formats = ["S16"]
rates = [48000]
node_name = "vsound-e2e-media"
target_object = "vsound-test-sink"
[[streams]]
name = "mic"
direction = "input"
backend = "pipewire"
formats = ["S16"]
rates = [48000]
node_name = "vsound-e2e-mic"
target_object = "vsound-e2e-source"
capture_sink = true
"#;

/// Seconds of the first (default periods), second (10 ms periods) and third (160 ms periods)
/// playback, and of capture.
const PLAY1_S: f64 = 3.0;
const PLAY2_S: f64 = 2.0;
const PLAY3_S: f64 = 2.0;
/// The third playback's period (7680 frames at 48 kHz): 2 s is 12.5 of them, so 13 whole
/// periods, 2.08 s.
const PLAY3_PERIOD_S: f64 = 0.16;
const RECORD_S: u32 = 3;
/// The signal played into the source sink once the guest has booted; longer than the guest's
/// whole run, so that it is playing while the guest records.
const SOURCE_S: usize = 30;
/// The whole VM run, boot included.
const VM_TIMEOUT: Duration = Duration::from_secs(240);

/// The command the guest runs (in /in, where play.sh puts the files).
const GUEST_SCRIPT: &str = r#"
up() { cut -d' ' -f1 /proc/uptime; }
echo "@@E2E aplay-l"
aplay -l || exit 10
echo "@@E2E play1-start $(up)"
aplay -D hw:0,0 play1.wav || exit 11
echo "@@E2E play1-end $(up)"
# aplay's drain ends when the device completed the last period, while PipeWire still carries its
# last frames to the sink: a playback started at once would be mixed with them there.
sleep 0.3
echo "@@E2E play2-start $(up)"
aplay -D hw:0,0 --period-time=10000 --buffer-time=40000 play2.wav || exit 12
echo "@@E2E play2-end $(up)"
sleep 0.3
echo "@@E2E play3-start $(up)"
aplay -D hw:0,0 --period-time=160000 --buffer-time=320000 play3.wav || exit 14
echo "@@E2E play3-end $(up)"
echo "@@E2E record-start $(up)"
arecord -D hw:0,0 -f S16_LE -r 48000 -c 2 -d RECORD_S /out/rec.wav || exit 13
echo "@@E2E record-end $(up)"
"#;

#[test]
fn guest_plays_and_records_through_pipewire() {
    let _one = guest::one_guest_test_at_a_time();
    let test_started = Instant::now();
    require_qemu();
    let cache = cache_dir();
    build_guest(&cache);

    let dir = tempfile::tempdir().unwrap();
    let pw = PipeWire::start(dir.path());
    create_source_sink(&pw);

    let play1 = signal(PLAY1_S, 21);
    let play2 = signal(PLAY2_S, 22);
    let play3 = signal(PLAY3_S, 24);
    let source = signal(SOURCE_S as f64, 23);
    let files = dir.path().join("in");
    std::fs::create_dir(&files).unwrap();
    write_wav_s16(&files.join("play1.wav"), 2, RATE, &play1);
    write_wav_s16(&files.join("play2.wav"), 2, RATE, &play2);
    write_wav_s16(&files.join("play3.wav"), 2, RATE, &play3);
    let source_wav = dir.path().join("source.wav");
    write_wav_s16(&source_wav, 2, RATE, &source);

    let config = dir.path().join("vsound.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let (mut broker, broker_socket) = spawn_broker_with_env(dir.path(), Some(&config), &pw.env());
    let (mut worker, socket) = spawn_worker(dir.path(), "vm", &broker_socket, Some(&config));

    let sink_raw = dir.path().join("sink.raw");
    let recorder = pw.record_sink(&sink_raw);
    std::thread::sleep(Duration::from_millis(300));

    let out_dir = dir.path().join("out");
    let script = GUEST_SCRIPT.replace("RECORD_S", &RECORD_S.to_string());
    let files = [
        files.join("play1.wav"),
        files.join("play2.wav"),
        files.join("play3.wav"),
    ];
    let spec = VmSpec {
        files: &files,
        out: Some(&out_dir),
        cache: &cache,
        timeout: VM_TIMEOUT,
        tmp: dir.path(),
    };
    let mut vm = Vm::start(&socket, &spec, &script);
    // Start the capture signal once the guest has its card.
    let deadline = vm.started + VM_TIMEOUT + Duration::from_secs(30);
    let player = vm
        .wait_for("@@E2E card", deadline)
        .then(|| play_into_source(&pw, &source_wav));
    let (status, _) = vm.finish(deadline);
    let vm_took = vm.started.elapsed();
    let lines = &vm.console;
    let console = vm.console_text();
    assert!(
        broker.is_running(),
        "the broker died during the guest's run"
    );
    assert!(
        status.success(),
        "the guest run failed ({status}); console and play.sh's messages above \
         (rerun with VSOUND_TEST_LOG=debug for the worker's and broker's logs)"
    );

    // The card.
    assert!(
        lines
            .iter()
            .any(|l| l.text.starts_with("card 0:") && l.text.contains("VirtIO")),
        "aplay -l does not list the virtio card:\n{console}"
    );
    let boot = marker(lines, "boot").expect("no boot marker");
    let card = marker(lines, "card").expect("no card marker");
    println!(
        "boot: init after {:.2} s of guest uptime, {:.2} s after play.sh started \
         (card {:.2} s later)",
        uptime(boot),
        (boot.at - vm.started).as_secs_f64(),
        uptime(card) - uptime(boot)
    );

    // Pacing.
    assert_paced(
        "aplay (default periods)",
        PLAY1_S,
        span(lines, "play1-start", "play1-end", &console),
    );
    assert_paced(
        "aplay (10 ms periods)",
        PLAY2_S,
        span(lines, "play2-start", "play2-end", &console),
    );
    // Large periods through PipeWire: the audio rounded up to whole periods, drain included,
    // plus at most 100 ms (the guest's aplay start and exit).
    let (guest, host) = span(lines, "play3-start", "play3-end", &console);
    let whole = (PLAY3_S / PLAY3_PERIOD_S).ceil() * PLAY3_PERIOD_S;
    println!(
        "aplay (160 ms periods): {PLAY3_S} s of audio ({whole:.2} s in whole periods) took \
         {guest:.2} s (guest clock), {host:.2} s (host)"
    );
    assert!(
        guest <= whole + 0.1 && guest >= PLAY3_S * 0.95,
        "aplay (160 ms periods): {guest:.2} s for {whole:.2} s of whole periods"
    );
    let (rec_guest, rec_host) = span(lines, "record-start", "record-end", &console);
    println!("arecord: {RECORD_S} s took {rec_guest:.2} s (guest), {rec_host:.2} s (host)");

    // Playback arrived at the sink bit-exact.
    std::thread::sleep(Duration::from_millis(300));
    drop(recorder);
    drop(player);
    let recording = std::fs::read(&sink_raw).unwrap();
    assert_arrived("aplay (default periods)", &recording, &play1);
    assert_arrived("aplay (10 ms periods)", &recording, &play2);
    assert_arrived("aplay (160 ms periods)", &recording, &play3);

    // The recording came back and holds the source signal.
    let rec_wav = out_dir.join("rec.wav");
    assert!(rec_wav.exists(), "no rec.wav came back from the guest");
    let spec = hound::WavReader::open(&rec_wav).unwrap().spec();
    assert_eq!(
        (spec.channels, spec.sample_rate, spec.bits_per_sample),
        (2, RATE, 16),
        "rec.wav format"
    );
    let captured = wav_s16_bytes(&rec_wav);
    assert_eq!(
        captured.len(),
        RECORD_S as usize * RATE as usize * FRAME,
        "rec.wav length"
    );
    assert_captured(&captured, &source, RATE as usize * FRAME / 4);

    // A worker serves one VMM connection and exits when the VMM disconnects (the launcher or
    // systemd starts the next one).
    let deadline = Instant::now() + Duration::from_secs(5);
    while worker.is_running() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !worker.is_running(),
        "the worker did not exit within 5 s of its VMM disconnecting"
    );
    assert!(broker.is_running(), "the broker died");

    println!(
        "e2e: VM run {:.1} s, whole test {:.1} s",
        vm_took.as_secs_f64(),
        test_started.elapsed().as_secs_f64()
    );
}
