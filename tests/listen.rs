//! Listening sockets, on the real binaries: the launcher holds both sockets across restarts of
//! its children; the worker and the broker take a socket by fd (`--fd N`, socket activation)
//! or bind a path themselves, refusing a live path, replacing a stale one and removing their
//! own at exit.

mod common;

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use command_fds::{CommandFdExt, FdMapping};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use common::vsound::{
    spawn_broker, vhost_get_features, wait_exit, wait_for_path, Launcher, Proc, WAIT,
};
use vsound_process::listen::{self, SocketKind};
use vsound_shared::ipc::{BrokerMsg, Channel, WorkerMsg, PROTOCOL_VERSION};

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

fn signal(pid: u32, signal: Signal) {
    kill(Pid::from_raw(pid as i32), signal).unwrap();
}

/// Kills `pid` and waits until it is dead (a zombie or reaped). A process killed while it waits
/// in accept may still take one connection that was queued before it died, and close it: only
/// connections made after its death are sure to reach its successor.
fn kill_and_wait(pid: u32) {
    signal(pid, Signal::SIGKILL);
    let dead = || match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat[stat.rfind(')').unwrap() + 2..].starts_with('Z'),
        Err(_) => true,
    };
    assert!(eventually(dead), "{pid} survived SIGKILL");
}

/// Whether `check` holds within WAIT.
fn eventually(mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A broker at `socket` answers a Hello with a Welcome.
fn broker_welcomes(socket: &Path) -> bool {
    let Ok(channel) = Channel::connect(socket) else {
        return false;
    };
    // The default layout's streams (an output and an input): the broker refuses another.
    let caps = |direction| virtio_snd::control::PcmCaps {
        direction,
        hda_fn_nid: 0,
        features: 0,
        formats: 1 << virtio_snd::protocol::format::S16,
        rates: 1 << virtio_snd::protocol::rate::R48000,
        channels_min: 1,
        channels_max: 2,
    };
    let hello = WorkerMsg::Hello {
        version: PROTOCOL_VERSION,
        vm: "probe".into(),
        streams: vec![
            caps(virtio_snd::protocol::D_OUTPUT),
            caps(virtio_snd::protocol::D_INPUT),
        ],
    };
    if channel.send(&hello, &[]).is_err() || channel.wait_readable(Some(WAIT)).is_err() {
        return false;
    }
    matches!(
        channel.recv::<BrokerMsg>(),
        Ok((BrokerMsg::Welcome { .. }, _))
    )
}

fn worker_command(broker: &Path) -> Command {
    let mut cmd = Command::new(common::bins::worker());
    cmd.arg("--broker")
        .arg(broker)
        .args(["--vm", "vm"])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if is_root() {
        cmd.args(["--user", "nobody", "--group", "nogroup"]);
    }
    cmd
}

/// The worker command with `listening` as its fd 3.
fn with_fd3(mut cmd: Command, listening: &OwnedFd) -> Command {
    cmd.fd_mappings(vec![FdMapping {
        parent_fd: listening.try_clone().unwrap(),
        child_fd: 3,
    }])
    .unwrap();
    cmd
}

/// Runs `cmd` to its end (it must end within WAIT) and returns (success, stderr).
fn run_to_end(cmd: &mut Command) -> (bool, String) {
    let mut proc = Proc {
        child: cmd.stderr(Stdio::piped()).spawn().unwrap(),
    };
    let status = wait_exit(&mut proc, WAIT).expect("the process ends");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut proc.child.stderr.take().unwrap(), &mut stderr).unwrap();
    (status.success(), stderr)
}

#[test]
fn launcher_serves_200_back_to_back_connections() {
    let dir = tempfile::tempdir().unwrap();
    let mut launcher = Launcher::start(dir.path());
    let started = Instant::now();
    for cycle in 0..200 {
        // Each connection is accepted by a fresh worker (the last one exits when its VMM
        // disconnects); one arriving in between waits in the launcher's backlog.
        if let Err(e) = vhost_get_features(&launcher.socket) {
            panic!("cycle {cycle}: {e}\n{}", launcher.log());
        }
    }
    let took = started.elapsed();
    eprintln!("200 connect/GET_FEATURES/disconnect cycles in {took:?}");
    assert!(launcher.proc.is_running(), "{}", launcher.log());
    let log = launcher.log();
    assert!(
        log.matches("its VMM disconnected); restarting it").count() >= 199,
        "every disconnect restarts the worker:\n{log}"
    );

    // SIGTERM stops both children and removes the sockets the launcher created.
    signal(launcher.proc.pid(), Signal::SIGTERM);
    let status = wait_exit(&mut launcher.proc, WAIT).expect("the launcher stops");
    assert!(status.success(), "{status}\n{}", launcher.log());
    assert!(!launcher.socket.exists(), "vhost-user socket left behind");
    assert!(
        !launcher.broker_socket.exists(),
        "broker socket left behind"
    );
}

#[test]
fn launcher_restarts_a_killed_broker_and_worker() {
    let dir = tempfile::tempdir().unwrap();
    let launcher = Launcher::start(dir.path());
    let broker = launcher.child("vsound-broker");
    assert!(broker_welcomes(&launcher.broker_socket));
    if nix::unistd::Uid::effective().is_root() {
        // Started as root, the launcher's children both drop to users of their own (the
        // worker once its sandbox is applied, which it may still be doing).
        let worker = launcher.child("vsound-worker");
        for (pid, role) in [(broker, "broker"), (worker, "worker")] {
            let uid = || {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
                status
                    .lines()
                    .find(|l| l.starts_with("Uid:"))
                    .unwrap()
                    .to_string()
            };
            let deadline = Instant::now() + WAIT;
            while uid().split_whitespace().skip(1).any(|id| id == "0") {
                assert!(
                    Instant::now() < deadline,
                    "the {role} runs as root: {}\n{}",
                    uid(),
                    launcher.log()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    kill_and_wait(broker);
    // The launcher holds the broker's socket: it stays connectable while no broker runs, and
    // the connection is served by the next broker.
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        assert!(
            broker_welcomes(&launcher.broker_socket),
            "broker socket not served during the restart\n{}",
            launcher.log()
        );
    }
    let restarted = launcher.child("vsound-broker");
    assert_ne!(restarted, broker);
    assert!(launcher
        .log()
        .contains("broker exited (signal: 9 (SIGKILL))"));

    let worker = launcher.child("vsound-worker");
    kill_and_wait(worker);
    vhost_get_features(&launcher.socket).expect("a restarted worker serves the VMM");
    assert_ne!(launcher.child("vsound-worker"), worker);
    let log = launcher.log();
    assert!(log.contains("worker exited (signal: 9 (SIGKILL))"), "{log}");
}

#[test]
fn worker_takes_its_socket_by_fd_and_by_socket_activation() {
    let dir = tempfile::tempdir().unwrap();
    let (_broker, broker_socket) = spawn_broker(dir.path(), None);
    let socket = dir.path().join("vm.sock");
    let (listening, _ours) = listen::bind(&socket, SocketKind::Stream).unwrap();

    // A VMM that connects before any worker runs waits in the backlog.
    let early = std::thread::spawn({
        let socket = socket.clone();
        move || vhost_get_features(&socket)
    });
    let mut by_fd = worker_command(&broker_socket);
    by_fd.args(["--fd", "3"]);
    let (ok, stderr) = run_to_end(&mut with_fd3(by_fd, &listening));
    assert!(ok, "{stderr}");
    early.join().unwrap().expect("the queued VMM was served");
    assert!(
        stderr.contains("waiting for the VMM on fd 3 (--fd)"),
        "{stderr}"
    );
    // An inherited socket is its owner's: the worker leaves the path.
    assert!(socket.exists());

    let mut activated = {
        let worker = worker_command(&broker_socket);
        // LISTEN_PID must be the worker's own pid: the shell execs the worker in its place.
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(r#"LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" "$@""#)
            .arg(worker.get_program())
            .args(worker.get_args())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null());
        with_fd3(cmd, &listening)
    };
    let vmm = std::thread::spawn({
        let socket = socket.clone();
        move || vhost_get_features(&socket)
    });
    let (ok, stderr) = run_to_end(&mut activated);
    assert!(ok, "{stderr}");
    vmm.join().unwrap().expect("served by the activated worker");
    assert!(
        stderr.contains("waiting for the VMM on fd 3 (socket activation)"),
        "{stderr}"
    );
}

#[test]
fn an_inherited_socket_of_the_wrong_type_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_broker, broker_socket) = spawn_broker(dir.path(), None);
    let (seqpacket, _a) = listen::bind(&dir.path().join("q.sock"), SocketKind::SeqPacket).unwrap();
    let mut worker = worker_command(&broker_socket);
    worker.args(["--fd", "3"]);
    let (ok, stderr) = run_to_end(&mut with_fd3(worker, &seqpacket));
    assert!(!ok);
    assert!(
        stderr.contains(
            "fd 3 (--fd) is a SOCK_SEQPACKET socket; expected a listening SOCK_STREAM unix socket"
        ),
        "{stderr}"
    );

    let (stream, _b) = listen::bind(&dir.path().join("s.sock"), SocketKind::Stream).unwrap();
    let mut broker = Command::new(common::bins::broker());
    broker.args(["--fd", "3"]).stdin(Stdio::null());
    let (ok, stderr) = run_to_end(&mut with_fd3(broker, &stream));
    assert!(!ok);
    assert!(
        stderr.contains("is a SOCK_STREAM socket; expected a listening SOCK_SEQPACKET"),
        "{stderr}"
    );
}

#[test]
fn a_second_instance_on_a_live_path_refuses_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut broker, broker_socket) = spawn_broker(dir.path(), None);
    let mut second = Command::new(common::bins::broker());
    second
        .arg("--socket")
        .arg(&broker_socket)
        .stdin(Stdio::null());
    let (ok, stderr) = run_to_end(&mut second);
    assert!(!ok);
    let expected = format!("{} is served by a running process", broker_socket.display());
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(broker.is_running());
    assert!(
        broker_welcomes(&broker_socket),
        "the first broker still serves"
    );

    // A worker waiting for its VMM keeps it: the second one's check is not a connection.
    let socket = dir.path().join("vm.sock");
    let mut first = Proc {
        child: worker_command(&broker_socket)
            .arg("--socket")
            .arg(&socket)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    };
    wait_for_path(&socket, &mut first);
    let (ok, stderr) = run_to_end(
        worker_command(&broker_socket)
            .arg("--socket-path")
            .arg(&socket),
    );
    assert!(!ok);
    let expected = format!("{} is served by a running process", socket.display());
    assert!(stderr.contains(&expected), "{stderr}");
    vhost_get_features(&socket).expect("the first worker still serves its path");
    assert_eq!(wait_exit(&mut first, WAIT).map(|s| s.success()), Some(true));
}

#[test]
fn a_stale_path_is_replaced_and_a_file_never() {
    let dir = tempfile::tempdir().unwrap();
    let broker_socket = dir.path().join("broker.sock");
    // A socket file whose process has gone (std's listener leaves its file).
    drop(UnixListener::bind(&broker_socket).unwrap());
    // The path exists from the start: wait until the new broker serves it.
    let (_broker, broker_socket) = spawn_broker(dir.path(), None);
    assert!(eventually(|| broker_welcomes(&broker_socket)));

    let socket = dir.path().join("vm.sock");
    drop(UnixListener::bind(&socket).unwrap());
    let mut worker = Proc {
        child: worker_command(&broker_socket)
            .arg("--socket")
            .arg(&socket)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    };
    assert!(eventually(|| vhost_get_features(&socket).is_ok()));
    assert_eq!(
        wait_exit(&mut worker, WAIT).map(|s| s.success()),
        Some(true)
    );

    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, b"data").unwrap();
    let (ok, stderr) = run_to_end(worker_command(&broker_socket).arg("--socket").arg(&file));
    assert!(!ok);
    assert!(
        stderr.contains(&format!("{} exists and is not a socket", file.display())),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"data");
}

#[test]
fn own_sockets_are_removed_at_exit() {
    let dir = tempfile::tempdir().unwrap();
    let (mut broker, broker_socket) = spawn_broker(dir.path(), None);
    // The worker removes its socket after it dropped root: a directory it may write to.
    let vm_dir = dir.path().join("vm");
    std::fs::create_dir(&vm_dir).unwrap();
    if is_root() {
        use std::os::unix::fs::PermissionsExt;
        let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
        nix::unistd::chown(&vm_dir, Some(nobody.uid), None).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    let socket = vm_dir.join("vm.sock");
    let spawn_worker = || {
        let mut proc = Proc {
            child: worker_command(&broker_socket)
                .arg("--socket")
                .arg(&socket)
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        };
        wait_for_path(&socket, &mut proc);
        proc
    };

    // Stopped while it waits for its VMM.
    let mut worker = spawn_worker();
    signal(worker.pid(), Signal::SIGTERM);
    assert_eq!(
        wait_exit(&mut worker, WAIT).map(|s| s.success()),
        Some(true)
    );
    assert!(!socket.exists(), "worker socket left after SIGTERM");

    // After its one VMM: the path goes as soon as the VMM is connected.
    let mut worker = spawn_worker();
    vhost_get_features(&socket).unwrap();
    assert_eq!(
        wait_exit(&mut worker, WAIT).map(|s| s.success()),
        Some(true)
    );
    assert!(!socket.exists(), "worker socket left after its VMM");

    signal(broker.pid(), Signal::SIGTERM);
    assert_eq!(
        wait_exit(&mut broker, WAIT).map(|s| s.success()),
        Some(true)
    );
    assert!(!broker_socket.exists(), "broker socket left after SIGTERM");
}
