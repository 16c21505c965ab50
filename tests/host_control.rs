//! The host command (`vsound ctl`) against a real broker and worker: it lists the VMs with their
//! streams' state, xruns and latency (as a table and as JSON), sets a bus's volume and mute per
//! VM (the guest with controls sees a CTL_NOTIFY and reads the new value), mutes all of a VM's
//! output at once, refuses bad requests with a clear error, and is refused to a user outside
//! root and the admin group.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::frontend::{FrontendOptions, GuestVm};
use common::vsound::*;
use virtio_snd::protocol as p;

const CONFIG: &str = r#"
controls = true
[[streams]]
name = "media"
direction = "output"
backend = "null"
formats = ["S16"]
rates = [48000]
[[streams]]
name = "navigation"
direction = "output"
backend = "null"
formats = ["S16"]
rates = [48000]
[[streams]]
name = "mic"
direction = "input"
backend = "null"
formats = ["S16"]
rates = [48000]
"#;

fn ctl(control: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vsound"))
        .arg("ctl")
        .arg("--socket")
        .arg(control)
        .args(args)
        .output()
        .expect("vsound ctl")
}

fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "vsound ctl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// What `vsound ctl` said on stderr when it failed.
fn refused(output: Output) -> String {
    assert!(!output.status.success(), "vsound ctl succeeded");
    String::from_utf8(output.stderr).unwrap()
}

fn ctl_read(vm: &mut GuestVm, id: u32) -> u32 {
    let mut req = p::R_CTL_READ.to_le_bytes().to_vec();
    req.extend_from_slice(&id.to_le_bytes());
    let resp = vm.request(p::CONTROL_QUEUE, &req, 516);
    assert_eq!(status_of(&resp), 0x8000);
    u32::from_le_bytes(resp[4..8].try_into().unwrap())
}

#[test]
fn the_host_command_lists_and_sets_a_vms_buses() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("vsound.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let (_broker, broker_socket, control_socket) =
        spawn_broker_with_control(dir.path(), Some(&config));
    let (_worker, socket) = spawn_worker(dir.path(), "ivi", &broker_socket, Some(&config));
    let mut vm = GuestVm::connect(
        &socket,
        FrontendOptions {
            extra_features: 1 << p::F_CTLS,
            ..FrontendOptions::default()
        },
    )
    .unwrap();
    for _ in 0..8 {
        vm.submit_no_kick(p::EVENT_QUEUE, &[], &[8]);
    }
    vm.kick(p::EVENT_QUEUE);
    let params = Params::s16_48k(0);
    prepare(&mut vm, &params);
    let zeros = vec![0u8; params.period_bytes as usize];
    for _ in 0..params.periods {
        tx_submit(&mut vm, 0, &zeros);
    }
    assert_eq!(control(&mut vm, &pcm(p::R_PCM_START, 0)), 0x8000);

    // The table: one line per stream, the playing one running with a latency.
    let table = ok(ctl(&control_socket, &["list"]));
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(lines[0].starts_with("VM"), "{table}");
    let media: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        &media[..5],
        ["ivi", "media", "output", "null", "running"],
        "{table}"
    );
    assert!(
        lines[2].contains("navigation") && lines[2].contains("released"),
        "{table}"
    );
    assert!(
        lines[3].contains("mic") && lines[3].contains("input"),
        "{table}"
    );
    // The same as JSON, with the latency of what is queued (a few 10 ms periods at most).
    let json: serde_json::Value =
        serde_json::from_str(&ok(ctl(&control_socket, &["--json", "list"]))).unwrap();
    let vms = json["vms"].as_array().expect("a list of VMs");
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0]["vm"], "ivi");
    let streams = vms[0]["streams"].as_array().unwrap();
    assert_eq!(streams[0]["state"], "running");
    let latency = streams[0]["latency_us"]
        .as_u64()
        .expect("a running stream's latency");
    assert!(latency > 0 && latency < 200_000, "latency {latency} us");
    assert!(streams[1]["latency_us"].is_null());
    assert_eq!(streams[0]["volume"], 100);
    assert_eq!(streams[0]["host_present"], true);

    // set-volume: the guest is told (CTL_NOTIFY on Media Playback Volume) and reads it.
    ok(ctl(&control_socket, &["set-volume", "ivi", "media", "60%"]));
    let event = vm
        .wait_used(p::EVENT_QUEUE, Duration::from_secs(5))
        .expect("a CTL_NOTIFY event");
    let notify: p::CtlEvent = p::read_prefix(&event.written).unwrap();
    assert_eq!(notify.hdr.code.get(), p::EVT_CTL_NOTIFY);
    assert_eq!(notify.control_id.get(), 0, "Media Playback Volume");
    assert_eq!(ctl_read(&mut vm, 0), 60);
    // mute-all: every output bus muted (the guest's switches read 0), the mic untouched.
    ok(ctl(&control_socket, &["mute-all", "ivi"]));
    let json: serde_json::Value =
        serde_json::from_str(&ok(ctl(&control_socket, &["--json", "list"]))).unwrap();
    let mutes: Vec<bool> = json["vms"][0]["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["mute"].as_bool().unwrap())
        .collect();
    assert_eq!(mutes, [true, true, false]);
    assert_eq!(ctl_read(&mut vm, 1), 0, "Media Playback Switch");
    assert_eq!(ctl_read(&mut vm, 3), 0, "Navigation Playback Switch");
    assert_eq!(ctl_read(&mut vm, 0), 60, "the volume stays");
    ok(ctl(&control_socket, &["unmute", "ivi", "Media"]));
    assert_eq!(ctl_read(&mut vm, 1), 1);

    // Bad requests: a clear error, nothing changed, and the broker goes on.
    for (args, why) in [
        (&["set-volume", "ivi", "media", "101"][..], "off the scale"),
        (&["set-volume", "ivi", "media", "loud"][..], "give 0..=100"),
        (&["mute", "ivi", "radio"][..], "no bus \"radio\""),
        (&["mute", "cluster", "media"][..], "no VM \"cluster\""),
        (&["mute-all", "../x"][..], "VM name"),
    ] {
        let err = refused(ctl(&control_socket, args));
        assert!(err.contains(why), "{args:?}: {err}");
    }
    assert_eq!(ctl_read(&mut vm, 0), 60);
    let raw = std::os::unix::net::UnixStream::connect(&control_socket).unwrap();
    drop(raw); // a client that says nothing
    assert!(ok(ctl(&control_socket, &["list"])).contains("ivi"));
}

/// The control socket is for root and the admin group: another user cannot connect.
#[test]
fn the_host_command_is_refused_to_other_users() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("not root: no other user to try it as");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_broker, _broker_socket, control) = spawn_broker_with_control(dir.path(), None);
    // The tests' directory is reachable for nobody (the workers run as nobody).
    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_vsound"))
        .arg("ctl")
        .arg("--socket")
        .arg(&control)
        .arg("list")
        .output()
        .expect("setpriv (util-linux)");
    let err = refused(output);
    assert!(err.contains("Permission denied"), "{err}");
    assert!(err.contains("root and the broker's admin group"), "{err}");
    // Root still may.
    assert!(ok(ctl(&control, &["list"])).contains("no VM is connected"));
}

/// Under systemd the control socket is a socket unit's (`FileDescriptorName=control`), passed
/// with the broker's own: the broker tells them apart by LISTEN_FDNAMES, in either order.
#[test]
fn an_activated_control_socket_serves_the_host_command() {
    use command_fds::{CommandFdExt, FdMapping};
    use vsound_process::listen::{self, SocketKind};
    let dir = tempfile::tempdir().unwrap();
    let broker_path = dir.path().join("broker.sock");
    let control_path = dir.path().join("control.sock");
    let (broker_fd, _b) = listen::bind(&broker_path, SocketKind::SeqPacket).unwrap();
    let (control_fd, _c) = listen::bind(&control_path, SocketKind::Stream).unwrap();
    // LISTEN_PID must be the broker's own pid: the shell execs the broker in its place.
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(r#"LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES=control:broker exec "$0""#)
        .arg(common::bins::broker())
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    cmd.fd_mappings(vec![
        FdMapping {
            parent_fd: control_fd,
            child_fd: 3,
        },
        FdMapping {
            parent_fd: broker_fd,
            child_fd: 4,
        },
    ])
    .unwrap();
    let _broker = Proc {
        child: cmd.spawn().unwrap(),
    };
    let (_worker, _socket) = spawn_worker(dir.path(), "ivi", &broker_path, None);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let output = ctl(&control_path, &["list"]);
        if output.status.success() && String::from_utf8_lossy(&output.stdout).contains("ivi") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "vsound ctl: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
