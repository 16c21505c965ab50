//! Real-guest benchmark: a Debian guest (tests/e2e) plays 48 kHz stereo S16 for 30 s through
//! vsound into a private, headless PipeWire daemon, and this prints for the worker and the
//! broker the host CPU seconds per audio second and the wake-ups per second (context switches
//! of all their threads), plus the worker's playback latency figures.
//!
//! `cargo bench --bench guest` (needs what `cargo test --test e2e` needs). Under `cargo test`
//! it only says so: a 30 s guest run is a measurement, not a test.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::pipewire::PipeWire;
use common::vsound::{cpu_time, spawn_broker_with_env, Proc};

const SECONDS: u32 = 30;

const CONFIG: &str = r#"
[[streams]]
name = "media"
direction = "output"
backend = "pipewire"
formats = ["S16"]
rates = [48000]
target_object = "vsound-test-sink"
"#;

/// Context switches of every thread of a process: each voluntary one is a sleep, so a wake-up.
fn switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

#[derive(Clone, Copy)]
struct Sample {
    at: Instant,
    cpu: [Duration; 2],
    switches: [u64; 2],
}

fn sample(pids: [u32; 2]) -> Sample {
    Sample {
        at: Instant::now(),
        cpu: pids.map(cpu_time),
        switches: pids.map(switches),
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

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("guest benchmark: run with `cargo bench --bench guest`");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let pw = PipeWire::start(dir.path());
    let config = dir.path().join("vsound.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let (broker, broker_socket) = spawn_broker_with_env(dir.path(), Some(&config), &pw.env());

    // The worker, with its info log (the latency figures at RELEASE) read here.
    let socket = dir.path().join("vm.sock");
    let mut cmd = Command::new(common::bins::worker());
    cmd.arg("--socket")
        .arg(&socket)
        .arg("--broker")
        .arg(&broker_socket)
        .args(["--vm", "vm"]);
    cmd.arg("--config").arg(&config).env("RUST_LOG", "info");
    if nix::unistd::Uid::effective().is_root() {
        cmd.args(["--user", "nobody", "--group", "nogroup"]);
    }
    let mut worker = Proc {
        child: cmd.stderr(Stdio::piped()).spawn().expect("start worker"),
    };
    let (log_tx, log_rx) = mpsc::channel();
    forward(worker.child.stderr.take().unwrap(), log_tx);
    common::vsound::wait_for_path(&socket, &mut worker);

    let guest_command = format!(
        "echo @@E2E bench-start; \
         aplay -q -D hw:0,0 -t raw -f S16_LE -r 48000 -c 2 --period-time=10000 \
         --buffer-time=40000 -d {SECONDS} /dev/zero; echo @@E2E bench-end"
    );
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
    let (mut start, mut end) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(240);
    while end.is_none() && Instant::now() < deadline {
        match console_rx.recv_timeout(Duration::from_secs(1)) {
            Ok(line) if line.contains("@@E2E bench-start") => start = Some(sample(pids)),
            Ok(line) if line.contains("@@E2E bench-end") => end = Some(sample(pids)),
            Ok(line) if line.contains("@@E2E status") && !line.ends_with(" 0") => {
                panic!("the guest failed: {line}")
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            _ => {}
        }
    }
    let (Some(start), Some(end)) = (start, end) else {
        panic!("the guest did not play (no start/end markers within the timeout)");
    };
    let _ = qemu.child.wait();
    std::thread::sleep(Duration::from_millis(500));
    let latency: Vec<String> = log_rx
        .try_iter()
        .filter(|l| l.contains("tx buffers"))
        .collect();

    let wall = (end.at - start.at).as_secs_f64();
    println!("guest played {SECONDS} s of 48 kHz S16 stereo (10 ms periods) in {wall:.2} s");
    println!(
        "{:>8} {:>24} {:>16}",
        "process", "CPU s per audio s", "wake-ups per s"
    );
    for (i, name) in ["worker", "broker"].iter().enumerate() {
        let cpu = (end.cpu[i] - start.cpu[i]).as_secs_f64();
        let wakeups = (end.switches[i] - start.switches[i]) as f64 / wall;
        println!(
            "{name:>8} {:>24.4} {:>16.0}",
            cpu / f64::from(SECONDS),
            wakeups
        );
    }
    for line in latency {
        let figures = line.split("] ").nth(1).unwrap_or(&line);
        println!("worker latency: {figures}");
    }
}
