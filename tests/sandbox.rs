//! The worker and broker run under their real, strict sandbox (every other integration test
//! runs them that way too, which proves the policies complete); here forbidden actions are
//! tried from inside, and the running processes' credentials are read from /proc.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::pipewire::{find, PipeWire};
use common::vsound::{
    control, known_signal, pcm, play, prepare, spawn_broker, spawn_worker, wait_for_path, Params,
    Proc,
};
use virtio_snd::protocol as p;

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Runs a binary with a sandbox probe and returns (how it ended, stderr).
fn probe(binary: &str, probe: &str, args: &[&std::ffi::OsStr]) -> (String, String) {
    probe_with(Command::new(binary), probe, args)
}

/// Runs `cmd` (a binary, or a tracer in front of one) with a sandbox probe.
fn probe_with(mut cmd: Command, probe: &str, args: &[&std::ffi::OsStr]) -> (String, String) {
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
        (Some(0), _) if stderr.contains(&format!("probe {probe}: survived")) => "survived".into(),
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
        "--vm".into(),
        "probe".into(),
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
        let (ended, stderr) = probe(common::bins::worker(), action, &args);
        assert!(
            ended == "denied" || ended == "killed by seccomp",
            "worker probe {action}: {ended}\n{stderr}"
        );
        // The probe runs only after every layer was applied.
        assert!(
            stderr.contains("worker: sandbox: ") && stderr.contains("seccomp policies/worker.json"),
            "{stderr}"
        );
        eprintln!("worker: {action}: {ended}");
        if action == "open" {
            // worker_fs_errno answers openat with EACCES (what Landlock would say), no kill.
            assert_eq!(ended, "denied", "{stderr}");
            assert!(stderr.contains("Permission denied"), "{stderr}");
        }
    }
}

/// glibc's malloc opens /proc/sys/vm/overcommit_memory the first time it shrinks a thread
/// arena's heap (the worker's vring thread did, mid-session): the worker must get an error
/// there (EACCES, from the `worker_fs_errno` filter), never SIGSYS.
#[test]
fn thread_arenas_grow_and_shrink_inside_the_worker() {
    let dir = tempfile::tempdir().unwrap();
    let (_broker, broker_socket) = spawn_broker(dir.path(), None);
    let args = worker_args(dir.path(), &broker_socket);
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let worker = common::bins::worker();
    let (ended, stderr) = probe(worker, "arena", &args);
    assert_eq!(ended, "survived", "{stderr}");
    assert!(
        stderr.contains("worker: sandbox: ") && stderr.contains("seccomp policies/worker.json"),
        "{stderr}"
    );

    // The same probe traced: it really reached glibc's heap shrink, and the open was refused
    // with an errno.
    let trace = dir.path().join("arena.strace");
    let mut strace = Command::new("strace");
    strace
        .args(["-f", "-qq", "-e", "trace=openat", "-e", "signal=none", "-o"])
        .arg(&trace)
        .arg(worker);
    let (ended, stderr) = probe_with(strace, "arena", &args);
    let trace = std::fs::read_to_string(&trace).expect("strace (apt package strace) ran");
    assert_eq!(ended, "survived", "{stderr}\n{trace}");
    // Only a root tracer may read the non-dumpable worker's memory, so only then does strace
    // print the path (nothing else opens a file once the sandbox is in).
    let path = if is_root() {
        "\"/proc/sys/vm/overcommit_memory\""
    } else {
        ""
    };
    assert!(
        trace.lines().any(|line| line.contains("openat(AT_FDCWD, ")
            && line.contains(&format!("{path}, O_RDONLY|O_CLOEXEC) = -1 EACCES"))),
        "glibc never tried to shrink a thread arena, or the open was not refused:\n{trace}"
    );
}

#[test]
fn forbidden_actions_are_stopped_inside_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("probe-broker.sock");
    let args = ["--socket".as_ref(), socket.as_os_str()];
    let outcomes: Vec<(String, String)> = ["open", "inet", "exec", "ptrace"]
        .iter()
        .map(|action| probe(common::bins::broker(), action, &args))
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
    let out = Command::new(common::bins::worker())
        .arg("--socket")
        .arg(dir.path().join("w.sock"))
        .arg("--broker")
        .arg(&broker_socket)
        .args(["--vm", "vm"])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no --user"));
}

const PIPEWIRE_CONFIG: &str = r#"
[[streams]]
name = "media"
direction = "output"
backend = "pipewire"
formats = ["S16"]
rates = [48000]
node_name = "vsound-sandbox-media"
target_object = "vsound-test-sink"
"#;

/// A private D-Bus system bus that any user may connect to, as on a host under systemd:
/// PipeWire's client asks it for real-time scheduling (RTKit, through module-rt).
fn start_system_bus(dir: &std::path::Path) -> (Proc, String) {
    let socket = dir.join("system_bus_socket");
    let config = dir.join("system-bus.conf");
    std::fs::write(
        &config,
        format!(
            "<busconfig><type>system</type><listen>unix:path={}</listen><auth>EXTERNAL</auth>\
             <policy context=\"default\"><allow user=\"*\"/><allow own=\"*\"/>\
             <allow send_destination=\"*\" eavesdrop=\"true\"/><allow eavesdrop=\"true\"/>\
             </policy></busconfig>",
            socket.display()
        ),
    )
    .unwrap();
    let mut bus = Proc {
        child: Command::new("dbus-daemon")
            .arg(format!("--config-file={}", config.display()))
            .args(["--nofork", "--nopidfile"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dbus-daemon (apt package dbus-daemon)"),
    };
    wait_for_path(&socket, &mut bus);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    (bus, format!("unix:path={}", socket.display()))
}

/// The shipped broker unit runs as an unprivileged user (User=vsound-broker) on a host with a
/// D-Bus system bus, and PipeWire's client library then authenticates to that bus (geteuid,
/// getsockname, send) on the broker's PipeWire thread: that thread, started with
/// geteuid != 0, must play a stream to the end.
#[test]
fn broker_pipewire_thread_runs_as_an_unprivileged_user() {
    let dir = tempfile::tempdir().unwrap();
    let pw = PipeWire::start(dir.path());
    let (_bus, bus_address) = start_system_bus(dir.path());
    let config = dir.path().join("vsound.toml");
    std::fs::write(&config, PIPEWIRE_CONFIG).unwrap();
    let broker_socket = dir.path().join("broker.sock");
    let log = dir.path().join("broker.log");
    let mut cmd = Command::new(common::bins::broker());
    cmd.arg("--socket")
        .arg(&broker_socket)
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info")
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bus_address)
        .envs(pw.env())
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    if is_root() {
        // Become an unprivileged user as the unit's broker is: the daemon's socket (root's)
        // must then be reachable by that user.
        use std::os::unix::fs::PermissionsExt;
        for path in [dir.path(), pw.runtime.as_path()] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o711)).unwrap();
        }
        let daemon_socket = pw.runtime.join("pipewire-0");
        std::fs::set_permissions(&daemon_socket, std::fs::Permissions::from_mode(0o666)).unwrap();
        cmd.args(["--user", "nobody", "--group", "nogroup"]);
    }
    let mut broker = Proc {
        child: cmd.spawn().expect("start broker"),
    };
    wait_for_path(&broker_socket, &mut broker);
    let recording = dir.path().join("sink.raw");
    let data = known_signal(Params::s16_48k(0).period_bytes as usize * 100, 21);
    // A broker killed mid-stream fails the worker or the guest's requests first: say why it
    // died instead.
    let streamed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let (_worker, socket) = spawn_worker(dir.path(), "vm", &broker_socket, Some(&config));
        let mut vm = common::frontend::GuestVm::connect(&socket, Default::default()).unwrap();
        let params = Params::s16_48k(0);
        prepare(&mut vm, &params);
        let recorder = pw.record_sink(&recording);
        std::thread::sleep(Duration::from_millis(500));
        let (_, done) = play(&mut vm, &params, &data);
        std::thread::sleep(Duration::from_millis(300));
        drop(recorder);
        assert!(done.iter().all(|c| c.status == 0x8000), "{done:?}");
        assert_eq!(control(&mut vm, &pcm(p::R_PCM_STOP, 0)), 0x8000);
        assert_eq!(control(&mut vm, &pcm(p::R_PCM_RELEASE, 0)), 0x8000);
    }));
    if !broker.is_running() {
        let status = broker.child.wait().unwrap();
        let log = std::fs::read_to_string(&log).unwrap();
        panic!("the broker died ({status:?}) during the stream:\n{log}");
    }
    if let Err(panic) = streamed {
        std::panic::resume_unwind(panic);
    }
    let uid = status_field(broker.pid(), None, "Uid");
    assert!(
        uid.split_whitespace().all(|id| id != "0"),
        "broker uid {uid}: not the unit's unprivileged identity"
    );
    // Audio flowed: a tenth of a second from the middle of what was played is at the sink,
    // sample for sample (bit-exactness of the whole stream is tests/pipewire.rs's subject).
    let recorded = std::fs::read(&recording).unwrap();
    let middle = data.len() / 2 / 4 * 4;
    let run = 48000 * 4 / 10;
    let at = find(&recorded, &data[middle..middle + 64], 4)
        .expect("the played samples reached the sink");
    assert!(
        recorded.len() >= at + run && recorded[at..at + run] == data[middle..middle + run],
        "the samples at the sink differ from what was played"
    );
}
