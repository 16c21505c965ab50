//! The QEMU arguments a user pastes: those `vsound run` prints and those in the README's
//! "Running with QEMU" block. Each set, pasted after a QEMU command line through `sh`, must
//! start a machine (stopped with `-S`, no guest needed) whose vhost-user-snd device the worker
//! serves: QMP answers `query-status` and lists the device, and the worker keeps its VMM.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::vsound::{Launcher, WAIT};
use crate::guest::{require_qemu, Group};

/// Virtio 1.0 PCI device ID of a sound device: 0x1040 + 25.
const VIRTIO_SOUND_PCI_ID: u64 = 0x1059;

#[test]
fn qemu_starts_with_the_arguments_vsound_run_and_the_readme_print() {
    let _one = crate::guest::one_guest_test_at_a_time();
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let launcher = Launcher::start(dir.path());

    let deadline = Instant::now() + WAIT;
    while !launcher.stdout().contains("Press Ctrl-C") {
        assert!(
            Instant::now() < deadline,
            "vsound run printed no QEMU arguments:\n{}",
            launcher.stdout()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let stdout = launcher.stdout();
    let printed: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("Attach a VM"))
        .skip(1)
        .take_while(|l| !l.starts_with("Press Ctrl-C"))
        .collect();
    let printed = printed.join("\n");
    assert!(
        printed.contains("controls=on"),
        "vsound run's arguments lack controls=on (a guest that negotiates the controls \
         feature fails its probe without it):\n{printed}"
    );
    qemu_serves_with(&launcher, dir.path(), "vsound run's arguments", &printed, 1);

    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let readme_args = readme_qemu_args(&readme);
    let socket = launcher.socket.to_string_lossy();
    let pasted = readme_args.replace("/tmp/vsound/vsound.sock", &socket);
    assert!(
        pasted.contains(&*socket),
        "the README's QEMU arguments do not use /tmp/vsound/vsound.sock:\n{readme_args}"
    );
    qemu_serves_with(&launcher, dir.path(), "the README's arguments", &pasted, 2);
}

/// The lines after `qemu-system-x86_64 ... \` in the README's "Running with QEMU" block.
fn readme_qemu_args(readme: &str) -> String {
    let lines: Vec<&str> = readme
        .lines()
        .skip_while(|l| *l != "## Running with QEMU")
        .skip_while(|l| !l.starts_with("```"))
        .skip(1)
        .take_while(|l| !l.starts_with("```"))
        .skip_while(|l| !l.starts_with("qemu-system-x86_64"))
        .skip(1)
        .collect();
    assert!(
        !lines.is_empty(),
        "README.md has no qemu-system-x86_64 command in a code block under \"## Running with QEMU\""
    );
    lines.join("\n")
}

/// Starts QEMU with `args` pasted after its own options through `sh`, as a user's shell would
/// read them (continuation lines included), and checks that the machine is up with the sound
/// device while the worker keeps the connection; then quits QEMU. `connection` is how many VMM
/// connections the launcher's workers have seen with this one.
fn qemu_serves_with(launcher: &Launcher, dir: &Path, what: &str, args: &str, connection: usize) {
    let qemu = std::env::var("QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    let qmp = dir.join(format!("qmp{connection}.sock"));
    let stderr = dir.join(format!("qemu{connection}.err"));
    let line = format!(
        "exec {qemu} -accel tcg -cpu max -nodefaults -display none -S \
         -qmp unix:{},server=on,wait=off {args}",
        qmp.display()
    );
    let mut group = Group {
        child: Command::new("sh")
            .arg("-c")
            .arg(&line)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .process_group(0)
            .spawn()
            .expect("run sh"),
    };
    let started = Instant::now();
    let qemu_said = || std::fs::read_to_string(&stderr).unwrap_or_default();
    let exited = |group: &mut Group| group.child.try_wait().unwrap();

    let deadline = started + WAIT;
    let mut stream = loop {
        if let Some(status) = exited(&mut group) {
            panic!(
                "QEMU with {what} exited ({status}) instead of starting:\n{}\n{line}",
                qemu_said()
            );
        }
        if let Ok(stream) = UnixStream::connect(&qmp) {
            break stream;
        }
        assert!(
            Instant::now() < deadline,
            "QEMU with {what} opened no QMP socket in {WAIT:?}:\n{}",
            qemu_said()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut qmp_call = |command: &str| -> serde_json::Value {
        writeln!(stream, "{{\"execute\": \"{command}\"}}").unwrap();
        loop {
            let mut reply = String::new();
            let read = reader.read_line(&mut reply).unwrap_or(0);
            assert!(read > 0, "QMP closed during {command}:\n{}", qemu_said());
            let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
            // Skip the greeting and asynchronous events.
            if let Some(value) = reply.get("return") {
                return value.clone();
            }
            assert!(
                reply.get("error").is_none(),
                "QMP {command}: {reply}\n{}",
                qemu_said()
            );
        }
    };
    qmp_call("qmp_capabilities");
    let status = qmp_call("query-status");
    assert_eq!(status["status"], "prelaunch", "QEMU with {what}: {status}");
    // The device was realized, which needs the worker's answers to the vhost-user handshake.
    let pci = qmp_call("query-pci");
    let devices = pci[0]["devices"].as_array().cloned().unwrap_or_default();
    assert!(
        devices
            .iter()
            .any(|d| d["id"]["device"].as_u64() == Some(VIRTIO_SOUND_PCI_ID)),
        "QEMU with {what} has no virtio sound device on its PCI bus: {pci}"
    );
    // Still up a while later, the worker still serving it.
    std::thread::sleep(Duration::from_secs(3).saturating_sub(started.elapsed()));
    assert!(
        exited(&mut group).is_none(),
        "QEMU with {what} exited within 3 s:\n{}",
        qemu_said()
    );
    let log = launcher.log();
    assert_eq!(
        log.matches("worker: VMM connected").count(),
        connection,
        "the worker did not log QEMU's connection:\n{log}"
    );
    assert_eq!(
        log.matches("worker: VMM disconnected").count(),
        connection - 1,
        "the worker lost QEMU's connection with {what}:\n{log}"
    );
    println!(
        "QEMU with {what} is up ({}), its sound device served, after {:.1?}",
        status["status"],
        started.elapsed()
    );

    // Quit; the worker sees its VMM go, and the launcher starts the next worker.
    let _ = qmp_call("quit");
    let deadline = Instant::now() + WAIT;
    while exited(&mut group).is_none() {
        assert!(Instant::now() < deadline, "QEMU did not quit");
        std::thread::sleep(Duration::from_millis(20));
    }
    while launcher.log().matches("worker: VMM disconnected").count() < connection {
        assert!(
            Instant::now() < deadline,
            "the worker did not see QEMU quit:\n{}",
            launcher.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
