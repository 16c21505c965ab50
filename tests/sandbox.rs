//! The worker and broker run under their real, strict sandbox (every other integration test
//! runs them that way too, which proves the policies complete); here forbidden actions are
//! tried from inside, and the running processes' credentials are read from /proc.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::vsound::{spawn_broker, spawn_worker};

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Runs a binary with a sandbox probe and returns (how it ended, stderr).
fn probe(binary: &str, probe: &str, args: &[&std::ffi::OsStr]) -> (String, String) {
    let mut cmd = Command::new(binary);
    cmd.args(args)
        .env("VSOUND_SANDBOX_PROBE", probe)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let out = cmd.output().expect("run the probe");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let ended = match (out.status.code(), out.status.signal()) {
        (Some(0), _) if stderr.contains(&format!("probe {probe}: denied")) => "denied".to_string(),
        (Some(3), _) => "ALLOWED".to_string(),
        (_, Some(sig)) if sig == nix::sys::signal::Signal::SIGSYS as i32 => {
            "killed by seccomp".into()
        }
        other => format!("unexpected end {other:?}"),
    };
    (ended, stderr)
}

fn worker_args<'a>(
    dir: &'a std::path::Path,
    broker: &'a std::path::Path,
) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = vec![
        "--socket".into(),
        dir.join("probe.sock").into(),
        "--broker".into(),
        broker.into(),
    ];
    if is_root() {
        args.extend([
            "--user".into(),
            "nobody".into(),
            "--group".into(),
            "nogroup".into(),
        ]);
    }
    args
}

#[test]
fn forbidden_actions_are_stopped_inside_the_worker() {
    let dir = tempfile::tempdir().unwrap();
    let (_broker, broker_socket) = spawn_broker(dir.path(), None);
    let args = worker_args(dir.path(), &broker_socket);
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    for action in ["open", "inet", "exec", "ptrace"] {
        let (ended, stderr) = probe(env!("CARGO_BIN_EXE_vsound-worker"), action, &args);
        assert!(
            ended == "denied" || ended == "killed by seccomp",
            "worker probe {action}: {ended}\n{stderr}"
        );
        // The probe runs only after every layer was applied.
        assert!(
            stderr.contains("seccomp policy policies/worker.json installed"),
            "{stderr}"
        );
        eprintln!("worker: {action}: {ended}");
    }
}

#[test]
fn forbidden_actions_are_stopped_inside_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("probe-broker.sock");
    let args = ["--socket".as_ref(), socket.as_os_str()];
    let outcomes: Vec<(String, String)> = ["open", "inet", "exec", "ptrace"]
        .iter()
        .map(|action| probe(env!("CARGO_BIN_EXE_vsound-broker"), action, &args))
        .collect();
    for ((ended, stderr), action) in outcomes.iter().zip(["open", "inet", "exec", "ptrace"]) {
        assert!(
            ended == "denied" || ended == "killed by seccomp",
            "broker probe {action}: {ended}\n{stderr}"
        );
    }
    // The broker's policy allows openat (for its backends), so it is Landlock that refuses.
    assert_eq!(outcomes[0].0, "denied", "{}", outcomes[0].1);
}

fn status_field(pid: u32, task: Option<&str>, field: &str) -> String {
    let path = match task {
        Some(tid) => format!("/proc/{pid}/task/{tid}/status"),
        None => format!("/proc/{pid}/status"),
    };
    let status = std::fs::read_to_string(&path).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("{field} missing in {path}"))
        .trim()
        .to_string()
}

fn assert_confined(pid: u32, who: &str) {
    // Wait until the process reached its serving state (sandbox applied, threads started).
    let deadline = Instant::now() + Duration::from_secs(5);
    while status_field(pid, None, "Seccomp") != "2" {
        assert!(Instant::now() < deadline, "{who}: seccomp never applied");
        std::thread::sleep(Duration::from_millis(10));
    }
    let tasks: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    for tid in &tasks {
        let task = Some(tid.as_str());
        for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(
                status_field(pid, task, cap),
                "0000000000000000",
                "{who} thread {tid}: {cap}"
            );
        }
        assert_eq!(
            status_field(pid, task, "NoNewPrivs"),
            "1",
            "{who} thread {tid}"
        );
        assert_eq!(
            status_field(pid, task, "Seccomp"),
            "2",
            "{who} thread {tid}"
        );
    }
    let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    assert_ne!(ours, theirs, "{who} shares our network namespace");
    eprintln!("{who}: {} threads confined", tasks.len());
}

#[test]
fn running_processes_hold_no_privilege() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, broker_socket) = spawn_broker(dir.path(), None);
    let (worker, socket) = spawn_worker(dir.path(), "vm", &broker_socket, None);
    // A connected VMM: the worker's device thread is running too.
    let _vm = common::frontend::GuestVm::connect(&socket, Default::default()).unwrap();
    assert_confined(worker.pid(), "worker");
    assert_confined(broker.pid(), "broker");
    if is_root() {
        let uid = status_field(worker.pid(), None, "Uid");
        assert!(
            uid.split_whitespace().all(|id| id == "65534"),
            "worker uid {uid}"
        );
        assert_eq!(status_field(worker.pid(), None, "Groups"), "");
    }
}

#[test]
fn strict_worker_refuses_to_run_as_root_without_a_user() {
    if !is_root() {
        eprintln!("not root: nothing to switch from");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_broker, broker_socket) = spawn_broker(dir.path(), None);
    let out = Command::new(env!("CARGO_BIN_EXE_vsound-worker"))
        .arg("--socket")
        .arg(dir.path().join("w.sock"))
        .arg("--broker")
        .arg(&broker_socket)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no --user"));
}
