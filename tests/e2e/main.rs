//! End-to-end test in a real guest: QEMU 10 (TCG) boots a Debian 6.12 kernel with a busybox
//! initramfs (tests/e2e/build-guest.sh, cached under target/e2e-cache) whose stock `virtio_snd`
//! driver talks to the real vsound-worker over vhost-user; the broker plays and records through
//! a private, headless PipeWire daemon. In the guest:
//!
//! - `aplay -l` lists the virtio card;
//! - `aplay` plays two known WAVs (default periods, then 10 ms periods); both arrive at the null
//!   sink's monitor bit-exact, and each takes its duration in the guest's clock and the host's
//!   (so completions are neither early nor stalled);
//! - `arecord` records 3 s while a known signal plays into a second null sink whose monitor is
//!   the capture stream's source; the WAV comes back on a virtio-blk disk and equals the signal
//!   sample for sample;
//! - when the guest powers off, the worker exits (its VMM hung up) and the broker stays.
//!
//! Needs (and fails, not skips, without them): qemu-system-x86 from bookworm-backports,
//! pipewire, pipewire-bin and wireplumber, and the guest packages build-guest.sh fetches with
//! `apt-get download`. Run alone: `cargo test --test e2e -- --nocapture`.

#[path = "../common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::pipewire::{find, PipeWire};
use common::vsound::*;

/// The second null sink: what plays into it is the guest's microphone.
const SOURCE_SINK: &str = "vsound-e2e-source";

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

const RATE: u32 = 48000;
const FRAME: usize = 4; // S16 stereo
/// Seconds of the first (default periods) and second (10 ms periods) playback, and of capture.
const PLAY1_S: f64 = 3.0;
const PLAY2_S: f64 = 2.0;
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
echo "@@E2E play2-start $(up)"
aplay -D hw:0,0 --period-time=10000 --buffer-time=40000 play2.wav || exit 12
echo "@@E2E play2-end $(up)"
echo "@@E2E record-start $(up)"
arecord -D hw:0,0 -f S16_LE -r 48000 -c 2 -d RECORD_S /out/rec.wav || exit 13
echo "@@E2E record-end $(up)"
"#;

/// A process group (play.sh, QEMU, tee) killed when dropped.
struct Group {
    child: std::process::Child,
}

impl Drop for Group {
    fn drop(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(-(self.child.id() as i32));
        let _ = nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// A console line and when the host read it.
struct Line {
    at: Instant,
    text: String,
}

fn e2e_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e")
}

fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VSOUND_E2E_CACHE") {
        return dir.into();
    }
    // CARGO_TARGET_TMPDIR is <target>/tmp.
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("e2e-cache")
}

fn require_qemu() {
    let qemu = std::env::var("QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    let out = Command::new(&qemu).args(["-device", "help"]).output();
    let out = match out {
        Ok(out) => out,
        Err(e) => panic!(
            "{qemu} cannot run ({e}): install QEMU 10 from bookworm-backports: \
             apt-get install -t bookworm-backports qemu-system-x86"
        ),
    };
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\"vhost-user-snd-pci\""),
        "{qemu} has no vhost-user-snd-pci device: install QEMU 10 from bookworm-backports \
         (apt-get install -t bookworm-backports qemu-system-x86)"
    );
}

/// Builds (or finds in the cache) the guest; fails with build-guest.sh's own message.
fn build_guest(cache: &Path) {
    let started = Instant::now();
    let out = Command::new(e2e_dir().join("build-guest.sh"))
        .arg(cache)
        .stdin(Stdio::null())
        .output()
        .expect("run tests/e2e/build-guest.sh");
    assert!(
        out.status.success(),
        "building the guest failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "guest ready in {:.1?}: {}{}",
        started.elapsed(),
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Non-zero everywhere, so that alignment against silence is unambiguous.
fn signal(seconds: f64, seed: u32) -> Vec<u8> {
    let len = (seconds * f64::from(RATE)) as usize * FRAME;
    pattern(len, seed)
        .chunks(2)
        .flat_map(|s| (i16::from_le_bytes([s[0], s[1]]) | 1).to_le_bytes())
        .collect()
}

fn create_source_sink(pw: &PipeWire) {
    let props = format!(
        "{{ factory.name = support.null-audio-sink node.name = {SOURCE_SINK} \
         media.class = Audio/Sink audio.position = [ FL FR ] audio.rate = 48000 \
         monitor.channel-volumes = true node.group = pipewire.dummy priority.session = 1000 \
         object.linger = true }}"
    );
    let out = Command::new("pw-cli")
        .args(["create-node", "adapter", &props])
        .envs(pw.env())
        .output()
        .expect("pw-cli (apt package pipewire-bin)");
    assert!(out.status.success(), "pw-cli create-node: {out:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pw.node_exists(SOURCE_SINK) {
        assert!(Instant::now() < deadline, "the source sink never appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Plays a WAV file into the source sink.
fn play_into_source(pw: &PipeWire, wav: &Path) -> Proc {
    Proc {
        child: Command::new("pw-play")
            .args(["--target", SOURCE_SINK])
            .arg(wav)
            .envs(pw.env())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pw-play (apt package pipewire-bin)"),
    }
}

/// The guest uptime a marker line carries (`@@E2E name UPTIME`).
fn marker<'a>(lines: &'a [Line], name: &str) -> Option<&'a Line> {
    let prefix = format!("@@E2E {name}");
    lines
        .iter()
        .find(|l| l.text == prefix || l.text.starts_with(&format!("{prefix} ")))
}

fn uptime(line: &Line) -> f64 {
    line.text
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no uptime in {:?}", line.text))
}

/// Guest and host durations between two markers.
fn span(lines: &[Line], start: &str, end: &str, console: &str) -> (f64, f64) {
    let a = marker(lines, start).unwrap_or_else(|| panic!("no {start} marker:\n{console}"));
    let b = marker(lines, end).unwrap_or_else(|| panic!("no {end} marker:\n{console}"));
    (uptime(b) - uptime(a), (b.at - a.at).as_secs_f64())
}

/// A playback of `t` seconds takes `t` within a few periods: not less (completions returned
/// early make aplay run fast), and not much more (a stall).
fn assert_paced(what: &str, t: f64, (guest, host): (f64, f64)) {
    println!("{what}: {t} s of audio took {guest:.2} s (guest clock), {host:.2} s (host)");
    for (clock, took) in [("guest", guest), ("host", host)] {
        assert!(
            took >= t * 0.9 && took <= t * 1.5 + 2.0,
            "{what}: {t} s of audio took {took:.2} s by the {clock}'s clock"
        );
    }
}

/// `data` appears in `recording` bit-exact. On a difference, says what happened there: how
/// many frames of silence or other samples the sink got instead, and how many of the guest's
/// frames were skipped, by finding where the guest's signal resumes.
fn assert_arrived(what: &str, recording: &[u8], data: &[u8]) {
    let at = find(recording, &data[..256], FRAME)
        .unwrap_or_else(|| panic!("{what}: the guest's samples never reached the sink"));
    let got = &recording[at..(at + data.len()).min(recording.len())];
    let Some(first) = (0..got.len())
        .step_by(FRAME)
        .find(|&i| got[i..i + FRAME] != data[i..i + FRAME])
    else {
        assert_eq!(
            got.len(),
            data.len(),
            "{what}: the sink recording ended early"
        );
        return;
    };
    let frame = first / FRAME;
    let after = &got[first..];
    let silent = after.chunks(FRAME).take_while(|f| *f == [0; FRAME]).count();
    // Which of the guest's frames the sink holds after that (past any silence).
    let next = at + first + silent * FRAME;
    let resume = recording
        .get(next..next + 256)
        .and_then(|needle| find(data, needle, FRAME))
        .map(|d| d / FRAME);
    let next_frame = (next - at) / FRAME;
    let what_next = match resume {
        Some(d) => format!(
            "then the guest's frame {d} at sink frame {next_frame} ({} guest frames missing, \
             {} frames shifted)",
            d as i64 - frame as i64,
            next_frame as i64 - d as i64
        ),
        None => "then samples that are not the guest's".into(),
    };
    panic!(
        "{what}: the sink differs from the guest's {} frames at frame {frame} ({:.3} s): \
         {silent} frames of silence there; {what_next}. (One lost graph quantum can also come \
         from host CPU contention: the PipeWire daemon, pw-record and the broker's PipeWire \
         thread run without real-time priority.)",
        data.len() / FRAME,
        frame as f64 / f64::from(RATE)
    );
}

/// The guest's capture equals a contiguous stretch of the source signal. Up to `lead` bytes of
/// silence may come first (the capture stream starting), nothing else.
fn assert_captured(captured: &[u8], source: &[u8], lead: usize) {
    let start = captured
        .chunks(FRAME)
        .position(|f| f != [0; FRAME])
        .expect("the guest recorded only silence")
        * FRAME;
    assert!(
        start <= lead,
        "the guest's recording starts with {} ms of silence",
        start / FRAME * 1000 / RATE as usize
    );
    let signal = &captured[start..];
    let at = find(source, &signal[..64.min(signal.len())], FRAME)
        .expect("the guest's recording does not contain the host's signal");
    let expected = &source[at..(at + signal.len()).min(source.len())];
    assert_eq!(
        expected.len(),
        signal.len(),
        "the source signal ended before the recording"
    );
    if let Some(i) = (0..signal.len())
        .step_by(2)
        .find(|&i| signal[i..i + 2] != expected[i..i + 2])
    {
        panic!(
            "the guest's recording departs from the source at frame {} of {}",
            (start + i) / FRAME,
            captured.len() / FRAME
        );
    }
}

#[test]
fn guest_plays_and_records_through_pipewire() {
    let test_started = Instant::now();
    require_qemu();
    let cache = cache_dir();
    build_guest(&cache);

    let dir = tempfile::tempdir().unwrap();
    let pw = PipeWire::start(dir.path());
    create_source_sink(&pw);

    let play1 = signal(PLAY1_S, 21);
    let play2 = signal(PLAY2_S, 22);
    let source = signal(SOURCE_S as f64, 23);
    let files = dir.path().join("in");
    std::fs::create_dir(&files).unwrap();
    write_wav_s16(&files.join("play1.wav"), 2, RATE, &play1);
    write_wav_s16(&files.join("play2.wav"), 2, RATE, &play2);
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
    let vm_started = Instant::now();
    let mut vm = Group {
        child: Command::new(e2e_dir().join("play.sh"))
            .arg("--socket")
            .arg(&socket)
            .arg("--file")
            .arg(files.join("play1.wav"))
            .arg("--file")
            .arg(files.join("play2.wav"))
            .arg("--out")
            .arg(&out_dir)
            .arg("--cache")
            .arg(&cache)
            .args(["--timeout", &VM_TIMEOUT.as_secs().to_string(), "--"])
            .arg(script)
            // play.sh's scratch files go in our temporary directory, also if it is killed.
            .env("TMPDIR", dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("run tests/e2e/play.sh"),
    };
    let (tx, rx) = mpsc::channel();
    let stdout = vm.child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for text in BufReader::new(stdout).lines() {
            let Ok(text) = text else { break };
            let mut text = text.trim_end_matches('\r').to_string();
            // SeaBIOS leaves terminal escapes on the line where the guest's first output goes.
            if let Some(at) = text.find("@@E2E ") {
                text.drain(..at);
            }
            if tx
                .send(Line {
                    at: Instant::now(),
                    text,
                })
                .is_err()
            {
                break;
            }
        }
    });
    let mut stderr = vm.child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });

    // Follow the console; start the capture signal once the guest has its card.
    let mut lines: Vec<Line> = Vec::new();
    let mut player = None;
    let deadline = vm_started + VM_TIMEOUT + Duration::from_secs(30);
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                if player.is_none() && line.text.starts_with("@@E2E card") {
                    player = Some(play_into_source(&pw, &source_wav));
                }
                lines.push(line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                assert!(Instant::now() < deadline, "the VM did not end in time");
            }
        }
    }
    let status = vm.child.wait().unwrap();
    let vm_took = vm_started.elapsed();
    let stderr = stderr.join().unwrap();
    let console: String = lines.iter().map(|l| format!("{}\n", l.text)).collect();
    println!("---- guest console ----\n{console}---- play.sh stderr ----\n{stderr}----");
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
    let boot = marker(&lines, "boot").expect("no boot marker");
    let card = marker(&lines, "card").expect("no card marker");
    println!(
        "boot: init after {:.2} s of guest uptime, {:.2} s after play.sh started \
         (card {:.2} s later)",
        uptime(boot),
        (boot.at - vm_started).as_secs_f64(),
        uptime(card) - uptime(boot)
    );

    // Pacing.
    assert_paced(
        "aplay (default periods)",
        PLAY1_S,
        span(&lines, "play1-start", "play1-end", &console),
    );
    assert_paced(
        "aplay (10 ms periods)",
        PLAY2_S,
        span(&lines, "play2-start", "play2-end", &console),
    );
    let (rec_guest, rec_host) = span(&lines, "record-start", "record-end", &console);
    println!("arecord: {RECORD_S} s took {rec_guest:.2} s (guest), {rec_host:.2} s (host)");

    // Playback arrived at the sink bit-exact.
    std::thread::sleep(Duration::from_millis(300));
    drop(recorder);
    drop(player);
    let recording = std::fs::read(&sink_raw).unwrap();
    assert_arrived("aplay (default periods)", &recording, &play1);
    assert_arrived("aplay (10 ms periods)", &recording, &play2);

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
