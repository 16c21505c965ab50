//! Real-guest benchmark: a Debian guest (tests/e2e) plays 48 kHz stereo S16 through vsound into
//! a private, headless PipeWire daemon, first 30 s at 10 ms periods, then 15 s at Android's
//! 5.5 ms (264-frame) periods. For each it prints the host CPU seconds per audio second and
//! the wake-ups per second (context switches of all threads, and per thread) of the worker and
//! the broker, next to `pw-play` playing silence at the same latency at the same time into a
//! daemon of its own (the native client vsound is measured against, under the same load), and
//! the worker's latency figures.
//!
//! `cargo bench --bench guest` (needs what `cargo test --test e2e` needs;
//! VSOUND_BENCH_LOOKAHEAD=N rings of N periods instead of 3). Under `cargo test`
//! it only says so: a guest run is a measurement, not a test.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::pipewire::PipeWire;
use common::vsound::{
    context_switches, cpu_time_precise, spawn_broker_with_env, switches_in_status, write_wav_s16,
    Proc,
};

const CONFIG: &str = r#"
[[streams]]
name = "media"
direction = "output"
backend = "pipewire"
formats = ["S16"]
rates = [48000]
target_object = "vsound-test-sink"
"#;

/// One measured playback: `periods` periods of `period_frames` for `seconds`.
struct Phase {
    label: &'static str,
    period_frames: u32,
    periods: u32,
    seconds: u32,
}

const PHASES: [Phase; 2] = [
    Phase {
        label: "10 ms periods",
        period_frames: 480,
        periods: 4,
        seconds: 30,
    },
    Phase {
        label: "5.5 ms periods",
        period_frames: 264,
        periods: 4,
        seconds: 15,
    },
];

/// Context switches (each voluntary one is a sleep, so a wake-up) and CPU time of each thread
/// of a process, by thread name and id.
fn switches_by_thread(pid: u32) -> BTreeMap<String, (u64, Duration)> {
    let mut by_name = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return by_name;
    };
    for task in tasks.flatten() {
        // Threads a library starts inherit their creator's name: the id tells them apart.
        let name = format!(
            "{}[{}]",
            std::fs::read_to_string(task.path().join("comm"))
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            task.file_name().to_string_lossy()
        );
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        let switches = switches_in_status(&status);
        // Run time in ns (schedstat's first field), not clock ticks of 10 ms.
        let cpu = std::fs::read_to_string(task.path().join("schedstat"))
            .ok()
            .and_then(|line| line.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
        by_name.insert(name, (switches, Duration::from_nanos(cpu)));
    }
    by_name
}

#[derive(Clone)]
struct Sample {
    at: Instant,
    cpu: [Duration; 2],
    threads: [BTreeMap<String, (u64, Duration)>; 2],
}

fn sample(pids: [u32; 2]) -> Sample {
    Sample {
        at: Instant::now(),
        cpu: pids.map(cpu_time_precise),
        threads: pids.map(switches_by_thread),
    }
}

/// Sends each line of a child's output to `tx`.
fn forward(out: impl std::io::Read + Send + 'static, tx: mpsc::Sender<String>) {
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
}

/// `pw-play` of silence during a phase, at the guest's period as its latency: the native client
/// vsound is measured against, under the same load on the machine (the TCG guest keeps a CPU
/// busy). It plays into a second private daemon of its own: in the guest's graph it would
/// change how that graph wakes its clients (two clients: twice the broker's wake-ups). Sampled
/// from 1 s after its start (its connection and link made) to the phase's end.
struct Reference {
    player: Proc,
    spawned: Instant,
    start: Option<(Instant, Duration, u64)>,
    end: Option<(Instant, Duration, u64)>,
}

impl Reference {
    fn start(pw: &PipeWire, dir: &Path, phase: &Phase) -> Reference {
        let seconds = phase.seconds + 3;
        let wav = dir.join(format!("zeros-{seconds}.wav"));
        write_wav_s16(&wav, 2, 48000, &vec![0u8; 48000 * 4 * seconds as usize]);
        let latency = phase.period_frames.to_string();
        Reference {
            player: pw.play_into_sink_with(&wav, &["--latency", &latency]),
            spawned: Instant::now(),
            start: None,
            end: None,
        }
    }

    fn sample(&self) -> (Instant, Duration, u64) {
        let pid = self.player.pid();
        let switches = context_switches(pid);
        (Instant::now(), cpu_time_precise(pid), switches)
    }

    /// Takes the start sample once the player has run for a second.
    fn tick(&mut self) {
        if self.start.is_none() && self.spawned.elapsed() >= Duration::from_secs(1) {
            self.start = Some(self.sample());
        }
    }

    /// CPU seconds per audio second and wake-ups per second.
    fn figures(&self) -> (f64, f64) {
        let (Some(start), Some(end)) = (self.start, self.end) else {
            panic!("pw-play was not sampled (the phase was shorter than a second?)");
        };
        let wall = (end.0 - start.0).as_secs_f64();
        (
            (end.1 - start.1).as_secs_f64() / wall,
            (end.2 - start.2) as f64 / wall,
        )
    }
}

fn print_phase(phase: &Phase, start: &Sample, end: &Sample, reference: (f64, f64)) {
    let wall = (end.at - start.at).as_secs_f64();
    let audio = f64::from(phase.seconds);
    let periods_per_s = 48000.0 / f64::from(phase.period_frames);
    println!(
        "\n== {}: the guest played {} s of 48 kHz S16 stereo ({} frames a period, {} \
         periods) in {wall:.2} s",
        phase.label, phase.seconds, phase.period_frames, phase.periods
    );
    println!(
        "{:>8} {:>20} {:>12} {:>16} {:>18}",
        "process", "CPU s per audio s", "x pw-play", "wake-ups per s", "wake-ups a period"
    );
    let (ref_cpu, ref_wakeups) = reference;
    for (i, name) in ["worker", "broker"].iter().enumerate() {
        let cpu = (end.cpu[i] - start.cpu[i]).as_secs_f64() / audio;
        let total: u64 = end.threads[i]
            .iter()
            .map(|(thread, (n, _))| {
                n.saturating_sub(start.threads[i].get(thread).map_or(0, |t| t.0))
            })
            .sum();
        let wakeups = total as f64 / wall;
        println!(
            "{name:>8} {cpu:>20.4} {:>12.2} {wakeups:>16.0} {:>18.2}",
            cpu / ref_cpu.max(f64::MIN_POSITIVE),
            wakeups / periods_per_s
        );
    }
    println!(
        "{:>8} {ref_cpu:>20.4} {:>12.2} {ref_wakeups:>16.0} {:>18.2}",
        "pw-play",
        1.0,
        ref_wakeups / periods_per_s
    );
    for (i, name) in ["worker", "broker"].iter().enumerate() {
        let per_thread: Vec<String> = end.threads[i]
            .iter()
            .map(|(thread, (n, cpu))| {
                let (n0, cpu0) = start.threads[i].get(thread).copied().unwrap_or_default();
                format!(
                    "{thread} {:.0}/s {:.4}",
                    n.saturating_sub(n0) as f64 / wall,
                    cpu.saturating_sub(cpu0).as_secs_f64() / audio
                )
            })
            .collect();
        println!(
            "{name} by thread (wake-ups, CPU s per audio s): {}",
            per_thread.join(", ")
        );
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("guest benchmark: run with `cargo bench --bench guest`");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let pw = PipeWire::start(dir.path());
    let reference_dir = dir.path().join("reference");
    std::fs::create_dir(&reference_dir).unwrap();
    let reference_pw = PipeWire::start_beside(&reference_dir);
    let config = dir.path().join("vsound.toml");
    // VSOUND_BENCH_LOOKAHEAD=N: the ring holds N periods (`limits.lookahead_periods`, default 3).
    let limits = std::env::var("VSOUND_BENCH_LOOKAHEAD")
        .ok()
        .and_then(|n| n.parse::<u32>().ok())
        .map_or(String::new(), |n| {
            format!("\n[limits]\nlookahead_periods = {n}\n")
        });
    std::fs::write(&config, format!("{CONFIG}{limits}")).unwrap();
    let (broker, broker_socket) = spawn_broker_with_env(dir.path(), Some(&config), &pw.env());

    // The worker, with its info log (the latency figures at RELEASE) read here.
    let socket = dir.path().join("vm.sock");
    let mut cmd = Command::new(common::bins::worker());
    cmd.arg("--socket")
        .arg(&socket)
        .arg("--broker")
        .arg(&broker_socket)
        .args(["--vm", "vm"]);
    cmd.arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info,vsound_worker::stream=debug");
    if nix::unistd::Uid::effective().is_root() {
        cmd.args(["--user", "nobody", "--group", "nogroup"]);
    }
    let mut worker = Proc {
        child: cmd.stderr(Stdio::piped()).spawn().expect("start worker"),
    };
    let (log_tx, log_rx) = mpsc::channel();
    forward(worker.child.stderr.take().unwrap(), log_tx);
    common::vsound::wait_for_path(&socket, &mut worker);

    let guest_command: String = PHASES
        .iter()
        .enumerate()
        .map(|(i, phase)| {
            format!(
                "echo @@E2E bench-start {i}; aplay -q -D hw:0,0 -t raw -f S16_LE -r 48000 -c 2 \
                 --period-size={} --buffer-size={} -d {} /dev/zero; echo @@E2E bench-end {i}; ",
                phase.period_frames,
                phase.period_frames * phase.periods,
                phase.seconds
            )
        })
        .collect();
    let mut qemu = Command::new(root.join("tests/e2e/play.sh"));
    qemu.arg("--socket")
        .arg(&socket)
        .arg("--")
        .arg(guest_command);
    qemu.stdout(Stdio::piped()).process_group(0);
    let mut qemu = Proc {
        child: qemu.spawn().expect("tests/e2e/play.sh"),
    };
    let (console_tx, console_rx) = mpsc::channel();
    forward(qemu.child.stdout.take().unwrap(), console_tx);

    let pids = [worker.pid(), broker.pid()];
    let mut samples: Vec<(Option<Sample>, Option<Sample>)> = vec![(None, None); PHASES.len()];
    let mut references: Vec<Option<Reference>> = PHASES.iter().map(|_| None).collect();
    let deadline = Instant::now() + Duration::from_secs(300);
    while samples.last().is_some_and(|s| s.1.is_none()) && Instant::now() < deadline {
        references.iter_mut().flatten().for_each(Reference::tick);
        match console_rx.recv_timeout(Duration::from_millis(50)) {
            Ok(line) if line.contains("@@E2E status") && !line.ends_with(" 0") => {
                panic!("the guest failed: {line}")
            }
            Ok(line) => {
                let marker = |what: &str| {
                    line.split(what)
                        .nth(1)
                        .and_then(|rest| rest.trim().parse::<usize>().ok())
                        .filter(|&i| i < PHASES.len())
                };
                if let Some(i) = marker("@@E2E bench-start") {
                    samples[i].0 = Some(sample(pids));
                    references[i] = Some(Reference::start(&reference_pw, dir.path(), &PHASES[i]));
                } else if let Some(i) = marker("@@E2E bench-end") {
                    samples[i].1 = Some(sample(pids));
                    if let Some(reference) = &mut references[i] {
                        reference.end = Some(reference.sample());
                        let _ = reference.player.child.kill();
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
    let _ = qemu.child.wait();
    std::thread::sleep(Duration::from_millis(500));
    let latency: Vec<String> = log_rx
        .try_iter()
        .filter(|l| l.contains("tx buffers"))
        .collect();

    for (i, phase) in PHASES.iter().enumerate() {
        let (Some(start), Some(end)) = &samples[i] else {
            panic!(
                "the guest did not play {} (no markers in time)",
                phase.label
            );
        };
        let reference = references[i]
            .as_ref()
            .expect("pw-play ran beside the phase");
        print_phase(phase, start, end, reference.figures());
        if let Some(line) = latency.get(i) {
            let figures = line.split("] ").nth(1).unwrap_or(line);
            println!("worker latency: {figures}");
        }
    }
}
