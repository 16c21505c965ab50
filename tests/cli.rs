//! The command-line and service conventions a host integrator expects: QEMU's vhost-user
//! backend program conventions (`--print-capabilities`), `--version`, `--check-config`,
//! `--backend`, systemd readiness (`READY=1`, `STOPPING=1` on `$NOTIFY_SOCKET`), and argument
//! values checked before anything starts.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::bins;
use common::vsound::{spawn_broker_with_args, wait_exit};

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .expect("run")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn print_capabilities_prints_the_backend_type_as_json_and_ignores_every_other_argument() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vm.sock");
    let socket_arg = socket.to_string_lossy().into_owned();
    // Arguments that would otherwise bind a socket, and ones that are not valid at all.
    for args in [
        vec!["--print-capabilities"],
        vec![
            "--socket-path",
            &socket_arg,
            "--print-capabilities",
            "--vm",
            "a",
        ],
        vec![
            "--print-capabilities",
            "--no-such-option",
            "--sandbox",
            "bogus",
        ],
    ] {
        let output = run(bins::worker(), &args);
        assert!(output.status.success(), "{args:?}: {}", stderr(&output));
        let caps: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
        assert_eq!(caps["type"], "sound", "{args:?}");
        assert!(!socket.exists(), "{args:?}: it served a socket");
    }
}

#[test]
fn version_names_each_binary() {
    let version = env!("CARGO_PKG_VERSION");
    for (program, name) in [
        (bins::worker(), "vsound-worker"),
        (bins::broker(), "vsound-broker"),
        (env!("CARGO_BIN_EXE_vsound"), "vsound"),
    ] {
        let output = run(program, &["--version"]);
        assert!(output.status.success());
        assert_eq!(stdout(&output).trim(), format!("{name} {version}"));
    }
}

#[test]
fn check_config_validates_every_layout_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[[streams]]\nname = \"media\"\ndirection = \"output\"\nbackend = \"null\"\n\
         [vms.navi]\n[[vms.navi.streams]]\nname = \"prompt\"\ndirection = \"output\"\n",
    )
    .unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[streams]]\nname = \"media\"\ndirection = \"output\"\n\n\
         [vms.navi]\n[[vms.navi.streams]]\nname = \"prompt\"\ndirection = \"output\"\n\
         channels_min = 0\n",
    )
    .unwrap();
    let (good_arg, bad_arg) = (good.to_string_lossy(), bad.to_string_lossy());
    for program in [bins::worker(), bins::broker()] {
        let output = run(program, &["--check-config", &good_arg]);
        assert!(output.status.success(), "{program}: {}", stderr(&output));
        let shown = stdout(&output);
        assert!(shown.contains("valid"), "{shown}");
        assert!(shown.contains("media (output, null)"), "{shown}");
        assert!(
            shown.contains("vm navi: streams prompt (output, auto)"),
            "{shown}"
        );
        // With RUST_LOG=off too, the error reaches stderr: file, line, field, bad value.
        let output = run(program, &["--check-config", &bad_arg]);
        assert_eq!(output.status.code(), Some(1), "{program}");
        let shown = stderr(&output);
        assert!(
            shown.contains(&format!(
                "{bad_arg}:9: vms.navi.streams[0].channels_min: 0 with channels_max 8"
            )),
            "{program}: {shown}"
        );
    }
}

#[test]
fn backend_overrides_every_stream_and_a_missing_wav_directory_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("vsound.toml");
    let missing = dir.path().join("no-such-dir/{vm}.wav");
    std::fs::write(
        &config,
        format!(
            "[[streams]]\nname = \"media\"\ndirection = \"output\"\nbackend = \"wav\"\n\
             wav_path = \"{}\"\n[[streams]]\nname = \"mic\"\ndirection = \"input\"\n",
            missing.display()
        ),
    )
    .unwrap();
    let config_arg = config.to_string_lossy();
    let output = run(bins::broker(), &["--check-config", &config_arg]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("stream media: wav_path")
            && stderr(&output).contains("no-such-dir"),
        "{}",
        stderr(&output)
    );
    // The broker refuses to start on it, before it serves anything.
    let socket = dir.path().join("broker.sock");
    let output = run(
        bins::broker(),
        &[
            "--socket",
            &socket.to_string_lossy(),
            "--config",
            &config_arg,
        ],
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("no-such-dir"),
        "{}",
        stderr(&output)
    );
    assert!(!socket.exists());
    // `--backend null` puts every stream on null, so the WAV path no longer matters.
    let output = run(
        bins::broker(),
        &["--check-config", &config_arg, "--backend", "null"],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("media (output, null), mic (input, null)"));
    // A backend that does not exist is refused with the list.
    let output = run(
        bins::broker(),
        &["--check-config", &config_arg, "--backend", "jack"],
    );
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("`pipewire`"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn the_launcher_checks_its_sandbox_and_backend_values_before_it_starts_anything() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vm.sock");
    let socket_arg = socket.to_string_lossy();
    for (option, value) in [("--sandbox", "strct"), ("--backend", "jack")] {
        let output = run(
            env!("CARGO_BIN_EXE_vsound"),
            &["run", "--socket", &socket_arg, option, value],
        );
        assert_eq!(output.status.code(), Some(2), "{option} {value}");
        assert!(stderr(&output).contains(value), "{}", stderr(&output));
        assert!(!socket.exists());
    }
}

/// A stand-in for the service manager's notify socket.
fn notify_socket(dir: &Path) -> (UnixDatagram, std::path::PathBuf) {
    let path = dir.join("notify");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    (socket, path)
}

fn next_state(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).expect("a notification");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn terminate(pid: u32) {
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
}

/// A worker for the VM `vm` on `DIR/vm.sock`, its command adjusted by `adjust`.
fn worker_command(
    dir: &Path,
    broker_socket: &Path,
    adjust: impl FnOnce(&mut Command),
) -> (common::vsound::Proc, std::path::PathBuf) {
    let vm_socket = dir.join("vm.sock");
    let mut worker = Command::new(bins::worker());
    worker
        .arg("--socket")
        .arg(&vm_socket)
        .arg("--broker")
        .arg(broker_socket)
        .args(["--vm", "vm"]);
    if nix::unistd::Uid::effective().is_root() {
        worker.args(["--user", "nobody", "--group", "nogroup"]);
    }
    adjust(&mut worker);
    let worker = common::vsound::Proc {
        child: worker.spawn().unwrap(),
    };
    (worker, vm_socket)
}

#[test]
fn the_broker_and_the_worker_tell_systemd_when_they_serve_and_when_they_stop() {
    let dir = tempfile::tempdir().unwrap();
    let (manager, path) = notify_socket(dir.path());
    let (mut broker, broker_socket) = spawn_broker_with_args(
        dir.path(),
        None,
        &[("NOTIFY_SOCKET", path.clone())],
        None,
        &["--backend", "null"],
    );
    // Sent once it serves its socket, from inside its sandbox.
    assert_eq!(next_state(&manager), "READY=1");

    let (mut worker, vm_socket) = worker_command(dir.path(), &broker_socket, |worker| {
        worker.env("NOTIFY_SOCKET", &path).env("RUST_LOG", "warn");
    });
    assert_eq!(next_state(&manager), "READY=1");
    assert!(vm_socket.exists(), "ready before its socket was bound");
    terminate(worker.pid());
    assert_eq!(next_state(&manager), "STOPPING=1");
    assert!(wait_exit(&mut worker, Duration::from_secs(10)).is_some());

    terminate(broker.pid());
    assert_eq!(next_state(&manager), "STOPPING=1");
    let status = wait_exit(&mut broker, Duration::from_secs(10)).expect("the broker exits");
    assert!(status.success(), "{status:?}");
}

/// Lines of `log` before the first that contains `until` (all of them without one).
fn lines_before<'a>(log: &'a str, until: &str) -> Vec<&'a str> {
    log.lines().take_while(|l| !l.contains(until)).collect()
}

#[test]
fn default_logs_are_short_readable_and_quiet_about_a_clean_session() {
    use common::frontend::{FrontendOptions, GuestVm};
    use common::vsound::{control, pcm, play, prepare, Params};
    use virtio_snd::protocol as p;

    let dir = tempfile::tempdir().unwrap();
    let broker_log = dir.path().join("broker.log");
    let worker_log = dir.path().join("worker.log");
    let (mut broker, broker_socket) = spawn_broker_with_args(
        dir.path(),
        None,
        &[("RUST_LOG", "info".into())],
        Some(&broker_log),
        &["--backend", "null"],
    );
    let (mut worker, vm_socket) = worker_command(dir.path(), &broker_socket, |worker| {
        worker
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&worker_log).unwrap());
    });
    common::vsound::wait_for_path(&vm_socket, &mut worker);

    // A clean session: play, drain, stop, release, and the VM goes away.
    let mut vm = GuestVm::connect(&vm_socket, FrontendOptions::default()).unwrap();
    let params = Params::s16_48k(0);
    prepare(&mut vm, &params);
    play(
        &mut vm,
        &params,
        &vec![0x11u8; params.period_bytes as usize * 10],
    );
    assert_eq!(control(&mut vm, &pcm(p::R_PCM_STOP, 0)), 0x8000);
    assert_eq!(control(&mut vm, &pcm(p::R_PCM_RELEASE, 0)), 0x8000);
    drop(vm);
    assert!(wait_exit(&mut worker, Duration::from_secs(10)).is_some());
    // The broker logs the worker's end as it happens.
    std::thread::sleep(Duration::from_millis(300));
    terminate(broker.pid());
    assert!(wait_exit(&mut broker, Duration::from_secs(10)).is_some());

    let broker_log = std::fs::read_to_string(&broker_log).unwrap();
    let worker_log = std::fs::read_to_string(&worker_log).unwrap();
    eprintln!("--- broker\n{broker_log}--- worker\n{worker_log}");
    // A handful of lines at start-up, one of them the sandbox's, under the process's name.
    let start = lines_before(&broker_log, "vm vm connected");
    assert!(
        start.len() <= 5,
        "{} start-up lines:\n{broker_log}",
        start.len()
    );
    let start = lines_before(&worker_log, "waiting for the VMM");
    assert!(
        start.len() <= 3,
        "{} start-up lines:\n{worker_log}",
        start.len()
    );
    for (who, log) in [("broker", &broker_log), ("worker", &worker_log)] {
        let sandbox = log.lines().filter(|l| l.contains("sandbox")).count();
        assert_eq!(sandbox, 1, "{who}: one sandbox line:\n{log}");
        assert!(log.contains(&format!("{who}: sandbox: ")), "{log}");
        // A clean session warns about nothing (its end included) and counts no xruns.
        assert!(
            !log.contains(" WARN ") && !log.contains(" ERROR "),
            "{who}:\n{log}"
        );
        assert!(!log.contains("xrun"), "{who}:\n{log}");
        assert!(
            !log.contains("CloneFlags") && !log.contains("format 5"),
            "{log}"
        );
    }
    assert!(
        broker_log.contains("prepared: S16 48000 Hz 2 ch"),
        "{broker_log}"
    );
    assert!(broker_log.contains("dropping vm vm"), "{broker_log}");
}
