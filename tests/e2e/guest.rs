//! The end-to-end guest, shared by the e2e tests: building it, running QEMU on a worker's
//! socket with a shell script for the guest, following its console markers, and checking what
//! it played and recorded.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::common::pipewire::{find, PipeWire};
use crate::common::vsound::*;

pub const RATE: u32 = 48000;
pub const FRAME: usize = 4; // S16 stereo
/// The second null sink: what plays into it is the guest's microphone.
pub const SOURCE_SINK: &str = "vsound-e2e-source";

/// A process group (play.sh, QEMU, tee) killed when dropped.
pub struct Group {
    pub child: std::process::Child,
}

impl Drop for Group {
    fn drop(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(-(self.child.id() as i32));
        let _ = nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// A console line and when the host read it.
pub struct Line {
    pub at: Instant,
    pub text: String,
}

pub fn e2e_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e")
}

pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VSOUND_E2E_CACHE") {
        return dir.into();
    }
    // CARGO_TARGET_TMPDIR is <target>/tmp.
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("e2e-cache")
}

/// Held by each real-guest test for its whole run: a TCG guest keeps a core busy, and with two
/// tests' guests on this 2-core machine each one's timing (the driver's 100 ms period timeout,
/// the pace checks) measured the other's load, not vsound.
pub fn one_guest_test_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static GUESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // A failed test poisons it; the next test's guest is unaffected.
    GUESTS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn require_qemu() {
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
pub fn build_guest(cache: &Path) {
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
pub fn signal(seconds: f64, seed: u32) -> Vec<u8> {
    let len = (seconds * f64::from(RATE)) as usize * FRAME;
    pattern(len, seed)
        .chunks(2)
        .flat_map(|s| (i16::from_le_bytes([s[0], s[1]]) | 1).to_le_bytes())
        .collect()
}

pub fn create_source_sink(pw: &PipeWire) {
    create_null_sink(pw, SOURCE_SINK);
}

/// A stereo 48 kHz null sink named `name` in the test's PipeWire, waited for.
pub fn create_null_sink(pw: &PipeWire, name: &str) {
    let props = format!(
        "{{ factory.name = support.null-audio-sink node.name = {name} \
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
    while !pw.node_exists(name) {
        assert!(
            Instant::now() < deadline,
            "the null sink {name} never appeared"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Plays a WAV file into the source sink.
pub fn play_into_source(pw: &PipeWire, wav: &Path) -> Proc {
    Proc {
        child: crate::common::realtime::command("pw-play")
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
pub fn marker<'a>(lines: &'a [Line], name: &str) -> Option<&'a Line> {
    let prefix = format!("@@E2E {name}");
    lines
        .iter()
        .find(|l| l.text == prefix || l.text.starts_with(&format!("{prefix} ")))
}

pub fn uptime(line: &Line) -> f64 {
    line.text
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no uptime in {:?}", line.text))
}

/// Guest and host durations between two markers.
pub fn span(lines: &[Line], start: &str, end: &str, console: &str) -> (f64, f64) {
    let a = marker(lines, start).unwrap_or_else(|| panic!("no {start} marker:\n{console}"));
    let b = marker(lines, end).unwrap_or_else(|| panic!("no {end} marker:\n{console}"));
    (uptime(b) - uptime(a), (b.at - a.at).as_secs_f64())
}

/// A playback of `t` seconds takes `t` within a few periods: not less (completions returned
/// early make aplay run fast), and not much more (a stall).
pub fn assert_paced(what: &str, t: f64, (guest, host): (f64, f64)) {
    println!("{what}: {t} s of audio took {guest:.2} s (guest clock), {host:.2} s (host)");
    for (clock, took) in [("guest", guest), ("host", host)] {
        assert!(
            took >= t * 0.9 && took <= t * 1.5 + 2.0,
            "{what}: {t} s of audio took {took:.2} s by the {clock}'s clock"
        );
    }
}

/// How many bytes of `data`'s start never reached the sink: the known start residual (README
/// "Known residuals": a stream that joins a running graph may lose up to a quantum or two of
/// its first frames), let through up to 10 periods of 10 ms as the frontend tests'
/// `assert_arrived_intact` does, and reported; everything after must arrive exact.
pub fn start_lost(recorded: &[u8], data: &[u8]) -> usize {
    const STEP: usize = 480 * 4;
    let lost = (0..data.len().min(STEP * 10))
        .step_by(STEP)
        .find(|&skip| crate::common::pipewire::find(recorded, &data[skip..skip + 256], 4).is_some())
        .unwrap_or(0);
    if lost > 0 {
        println!(
            "KNOWN start residual: the first {} (at most {}) frames never reached the sink",
            lost / 4,
            lost / 4 + 480
        );
    }
    lost
}

/// `data` appears in `recording` bit-exact, but for the known start residual ([`start_lost`]).
/// On a difference, says what happened there: how many frames of silence or other samples the
/// sink got instead, and how many of the guest's frames were skipped, by finding where the
/// guest's signal resumes.
pub fn assert_arrived(what: &str, recording: &[u8], data: &[u8]) {
    let data = &data[start_lost(recording, data)..];
    // KNOWN GAP, to fix (issue 10's drain timing): at 10 ms periods the final PipeWire buffer
    // (256 frames) of a playback is sometimes (about one run in three here) silence at the sink,
    // although the broker handed it over and played 50 ms of silence after it. Everything
    // before it must be exact; only that final buffer, all silence, is let through.
    const FINAL_BUFFER_FRAMES: usize = 256;
    let Some(at) = find(recording, &data[..256], FRAME) else {
        if let Some(dir) = std::env::var_os("VSOUND_DUMP_SAMPLES") {
            let dir = std::path::Path::new(&dir);
            let _ = std::fs::write(dir.join("recorded.raw"), recording);
            let _ = std::fs::write(dir.join("expected.raw"), data);
            eprintln!("{what}: dumped to {}", dir.display());
        }
        // Say whether only its beginning was lost, and how much of it.
        let step = 480 * FRAME;
        let later = (step..data.len().saturating_sub(256))
            .step_by(step)
            .find(|&i| find(recording, &data[i..i + 256], FRAME).is_some());
        match later {
            Some(i) => panic!(
                "{what}: the guest's first frames never reached the sink: the first found is \
                 within its first {} frames",
                i / FRAME
            ),
            None => panic!("{what}: the guest's samples never reached the sink"),
        }
    };
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
    // One graph quantum lost (see `lost_quantum`), then everything in place (or but for the
    // known final-buffer gap below).
    if let Some((next, resume)) =
        crate::common::pipewire::lost_quantum(&recording[at..], data, first, FRAME)
    {
        let rest = &data[resume..];
        let got_rest = &recording[at + next..(at + next + rest.len()).min(recording.len())];
        let again = (0..got_rest.len().min(rest.len()))
            .step_by(FRAME)
            .find(|&i| got_rest[i..i + FRAME] != rest[i..i + FRAME]);
        let Some(again) = again else {
            assert_eq!(
                got_rest.len(),
                rest.len(),
                "{what}: the sink recording ended early"
            );
            println!("{what}: one graph quantum lost at the sink (the known PipeWire residual)");
            return;
        };
        // Then only the final-buffer gap below may follow: silence to the end.
        if rest.len() - again <= FINAL_BUFFER_FRAMES * FRAME
            && got_rest.len() == rest.len()
            && got_rest[again..].iter().all(|&b| b == 0)
        {
            println!(
                "{what}: one graph quantum lost at the sink (the known PipeWire residual) and \
                 the known final-buffer gap"
            );
            return;
        }
        panic!(
            "{what}: after one lost graph quantum at frame {} (the known PipeWire residual), the \
             sink differs again at the guest's frame {} of {}",
            first / FRAME,
            (resume + again) / FRAME,
            data.len() / FRAME
        );
    }
    let frame = first / FRAME;
    let after = &got[first..];
    let silent = after.chunks(FRAME).take_while(|f| *f == [0; FRAME]).count();
    let left = (data.len() - first) / FRAME;
    if left <= FINAL_BUFFER_FRAMES && silent >= left {
        println!(
            "{what}: its last {left} frames did not reach the sink (the known final-buffer gap)"
        );
        return;
    }
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
pub fn assert_captured(captured: &[u8], source: &[u8], lead: usize) {
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
    // The host's player joins a running graph when the recording already runs: the known
    // start residual (README "Known residuals", [`start_lost`]) is on its side here, and its
    // first quanta may reach the sink's monitor altered. Let through up to 10 of 480 frames
    // (reported), then everything must be exact.
    const STEP: usize = 480 * FRAME;
    let located = (0..captured.len().saturating_sub(start + 64).min(STEP * 10) + 1)
        .step_by(STEP)
        .find_map(|skip| {
            let window = &captured[start + skip..start + skip + 64];
            find(source, window, FRAME).map(|at| (skip, at))
        });
    let Some((skip, at)) = located else {
        let shown: Vec<String> = captured[start..(start + 32).min(captured.len())]
            .chunks(FRAME)
            .map(|f| format!("{f:02x?}"))
            .collect();
        panic!(
            "the guest's recording does not contain the host's signal (its first frames after \
             {} of silence: {})",
            start / FRAME,
            shown.join(" ")
        );
    };
    if skip > 0 {
        println!(
            "KNOWN start residual: the recording's first {} frames after its silence are not \
             the source's; from there it is",
            skip / FRAME
        );
    }
    let start = start + skip;
    let signal = &captured[start..];
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

/// A running guest: play.sh with its console followed line by line.
pub struct Vm {
    group: Group,
    lines: mpsc::Receiver<Line>,
    stderr: Option<std::thread::JoinHandle<String>>,
    pub console: Vec<Line>,
    pub started: Instant,
}

/// What a guest run needs besides its worker's socket.
pub struct VmSpec<'a> {
    pub files: &'a [PathBuf],
    /// Where the guest's /out comes back, if it has one.
    pub out: Option<&'a Path>,
    pub cache: &'a Path,
    pub timeout: Duration,
    /// play.sh's scratch files go here, also if it is killed.
    pub tmp: &'a Path,
}

impl Vm {
    pub fn start(socket: &Path, spec: &VmSpec, script: &str) -> Vm {
        let mut cmd = Command::new(e2e_dir().join("play.sh"));
        cmd.arg("--socket").arg(socket);
        for file in spec.files {
            cmd.arg("--file").arg(file);
        }
        if let Some(out) = spec.out {
            cmd.arg("--out").arg(out);
        }
        cmd.arg("--cache")
            .arg(spec.cache)
            .args(["--timeout", &spec.timeout.as_secs().to_string(), "--"])
            .arg(script)
            .env("TMPDIR", spec.tmp)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut group = Group {
            child: cmd.spawn().expect("run tests/e2e/play.sh"),
        };
        let (tx, rx) = mpsc::channel();
        let stdout = group.child.stdout.take().unwrap();
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
        let mut stderr = group.child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        Vm {
            group,
            lines: rx,
            stderr: Some(stderr),
            console: Vec::new(),
            started: Instant::now(),
        }
    }

    /// Follows the console until a line starts with `prefix` (true) or the console ends or
    /// `deadline` passes (false).
    pub fn wait_for(&mut self, prefix: &str, deadline: Instant) -> bool {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok(line) => {
                    let found = line.text.starts_with(prefix);
                    self.console.push(line);
                    if found {
                        return true;
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return false,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if Instant::now() >= deadline {
                        return false;
                    }
                }
            }
        }
    }

    /// Follows the console to its end (bounded by `deadline`); returns play.sh's status and
    /// its stderr, and prints both with the console.
    pub fn finish(&mut self, deadline: Instant) -> (ExitStatus, String) {
        while self.wait_for("\0never", deadline) {}
        assert!(Instant::now() < deadline, "the VM did not end in time");
        let status = self.group.child.wait().unwrap();
        let stderr = self
            .stderr
            .take()
            .map(|t| t.join().unwrap())
            .unwrap_or_default();
        println!(
            "---- guest console ----\n{}---- play.sh stderr ----\n{stderr}----",
            self.console_text()
        );
        (status, stderr)
    }

    pub fn console_text(&self) -> String {
        self.console
            .iter()
            .map(|l| format!("{}\n", l.text))
            .collect()
    }

    pub fn marker(&self, name: &str) -> Option<&Line> {
        marker(&self.console, name)
    }

    pub fn span(&self, start: &str, end: &str) -> (f64, f64) {
        span(&self.console, start, end, &self.console_text())
    }
}
