//! VM names and per-VM layouts, with the real binaries: a worker's `--vm` is checked at start-up,
//! sent in its Hello and bound by the broker to the connection's uid (another uid's claim is
//! refused while the holder lives, the same uid's newer worker takes the name over, a config pin
//! refuses every other uid); WAV paths with `{vm}` stay the same across worker restarts; each VM's
//! guest sees its own layout from `[vms.NAME]`, which the broker refuses to serve to a worker that
//! read another one; and a broker that cannot see the workers' uids says so.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::frontend::{FrontendOptions, GuestVm};
use common::vsound::*;
use virtio_snd::control::PcmCaps;
use virtio_snd::protocol as p;
use vsound_shared::ipc::{BrokerMsg, Channel, WorkerMsg, PROTOCOL_VERSION};

const OK: u32 = 0x8000;
const BAD_MSG: u32 = 0x8001;
const IO_ERR: u32 = 0x8003;
/// Uids of the workers started as others than root (the name-binding tests).
const UID_A: u32 = 43_000;
const UID_B: u32 = 43_001;

/// The name-binding tests start workers as uids of their own, so they need root.
fn can_switch_uids() -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    if !root {
        eprintln!("skipped: the workers need uids of their own (run as root)");
    }
    root
}

fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text.replace("$DIR", &dir.to_string_lossy())).unwrap();
    path
}

fn caps(direction: u8) -> PcmCaps {
    PcmCaps {
        direction,
        hda_fn_nid: 0,
        features: 0,
        formats: 1 << p::format::S16,
        rates: 1 << p::rate::R48000,
        channels_min: 1,
        channels_max: 2,
    }
}

/// Says Hello on a fresh connection; the broker's answer (and the channel, to keep it held).
fn hello(socket: &Path, vm: &str, directions: &[u8]) -> (BrokerMsg, Channel) {
    let channel = Channel::connect(socket).unwrap();
    channel
        .send(
            &WorkerMsg::Hello {
                version: PROTOCOL_VERSION,
                vm: vm.into(),
                streams: directions.iter().map(|&d| caps(d)).collect(),
            },
            &[],
        )
        .unwrap();
    channel.wait_readable(Some(WAIT)).unwrap();
    (channel.recv::<BrokerMsg>().unwrap().0, channel)
}

fn refusal(reply: &BrokerMsg) -> &str {
    match reply {
        BrokerMsg::Refused { reason } => reason,
        other => panic!("expected Refused, got {other:?}"),
    }
}

/// How a worker started: listening for its VMM, or exited (with its stderr).
enum Started {
    Listening(Proc, PathBuf),
    Exited(ExitStatus, String),
}

impl Started {
    fn listening(self) -> (Proc, PathBuf) {
        match self {
            Started::Listening(proc, socket) => (proc, socket),
            Started::Exited(status, log) => panic!("the worker exited ({status}):\n{log}"),
        }
    }

    /// The error it exited with.
    fn refused(self) -> String {
        match self {
            Started::Listening(..) => panic!("the worker was served"),
            Started::Exited(status, log) => {
                assert!(!status.success(), "exited successfully:\n{log}");
                log
            }
        }
    }
}

/// Starts `cmd` (a worker that binds `socket`, its stderr going to `log`) and waits until it
/// listens or exits.
fn start(mut cmd: Command, socket: PathBuf, log: &Path) -> Started {
    cmd.stdin(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    let mut proc = Proc {
        child: cmd.spawn().expect("start a worker"),
    };
    let deadline = Instant::now() + WAIT;
    loop {
        if socket.exists() {
            return Started::Listening(proc, socket);
        }
        if let Ok(Some(status)) = proc.child.try_wait() {
            return Started::Exited(status, std::fs::read_to_string(log).unwrap_or_default());
        }
        assert!(
            Instant::now() < deadline,
            "the worker neither listened nor exited"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A worker for `vm` run as `uid` from its first instruction (so every connection it makes is
/// that uid's; a root-started one connects as root first). Its socket is in a directory of
/// its own that it may write; its log is `DIR/<vm>-<uid>-<n>.log`.
fn worker_as(dir: &Path, uid: u32, vm: &str, broker: &Path, config: &Path, n: u32) -> Started {
    use std::os::unix::fs::PermissionsExt;
    let home = dir.join(format!("{vm}-{uid}-{n}"));
    std::fs::create_dir(&home).unwrap();
    nix::unistd::chown(&home, Some(nix::unistd::Uid::from_raw(uid)), None).unwrap();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
    let socket = home.join("vhost.sock");
    let mut cmd = Command::new(common::bins::worker());
    cmd.arg("--socket")
        .arg(&socket)
        .arg("--broker")
        .arg(broker)
        .arg("--vm")
        .arg(vm)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info")
        .uid(uid)
        .gid(65534);
    start(cmd, socket, &dir.join(format!("{vm}-{uid}-{n}.log")))
}

/// A guest on `socket` whose stream 0 (48 kHz S16 stereo output) prepares and plays 5 periods.
fn guest_plays(socket: &Path) -> GuestVm {
    let mut vm = GuestVm::connect(socket, FrontendOptions::default()).unwrap();
    let params = Params::s16_48k(0);
    prepare(&mut vm, &params);
    let (_, done) = play(
        &mut vm,
        &params,
        &pattern(params.period_bytes as usize * 5, 3),
    );
    assert!(done.iter().all(|c| c.status == OK), "tx statuses");
    assert_eq!(control(&mut vm, &pcm(p::R_PCM_STOP, 0)), OK);
    assert_eq!(control(&mut vm, &pcm(p::R_PCM_RELEASE, 0)), OK);
    vm
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Waits until `path`'s text contains `what`; the text then.
fn wait_for_text(path: &Path, what: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = read(path);
        if text.contains(what) || Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

const NULL_CONFIG: &str = r#"
[[streams]]
name = "media"
direction = "output"
backend = "null"
formats = ["S16"]
rates = [48000]
"#;

#[test]
fn a_bad_vm_name_is_refused_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let (_broker, broker_socket) = spawn_broker(dir.path(), None);
    let long = "x".repeat(33);
    for name in ["", "a/b", "..", "-vm", "vm.1", "vm 1", long.as_str()] {
        let socket = dir.path().join("bad.sock");
        let out = Command::new(common::bins::worker())
            .arg("--socket")
            .arg(&socket)
            .arg("--broker")
            .arg(&broker_socket)
            // One argument, so that clap never takes "-vm" for options.
            .arg(format!("--vm={name}"))
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--vm {name:?} accepted");
        assert!(
            stderr.contains("invalid VM name")
                && stderr.contains("1 to 32 characters of A-Z, a-z, 0-9, '_' and '-'"),
            "--vm {name:?}: {stderr}"
        );
        assert!(!socket.exists(), "--vm {name:?}: the worker listened");
    }
    // Required: a worker without a name would share one with every other.
    let out = Command::new(common::bins::worker())
        .arg("--broker")
        .arg(&broker_socket)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--vm <NAME>"));
    // The launcher checks it before it binds anything.
    let socket = dir.path().join("launched.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_vsound"))
        .args(["run", "--vm", "../etc", "--socket"])
        .arg(&socket)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid VM name \"../etc\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!socket.exists());
}

/// A worker's Hello with a name no `--vm` allows is refused by the broker too, whatever its
/// bytes, and the refusals are logged rate-limited and escaped.
#[test]
fn the_broker_refuses_bad_names_and_logs_them_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("broker.log");
    let (mut broker, socket) =
        spawn_broker_logging(dir.path(), None, &[("RUST_LOG", "info".into())], Some(&log));
    let hostile = format!("\u{1b}[2J{}", "y".repeat(3000));
    for i in 0..40 {
        let name = if i % 2 == 0 { "a/../../b" } else { &hostile };
        let (reply, channel) = hello(&socket, name, &[p::D_OUTPUT, p::D_INPUT]);
        assert!(
            refusal(&reply).contains("invalid VM name"),
            "{}",
            refusal(&reply)
        );
        // Then hung up.
        channel.wait_readable(Some(WAIT)).unwrap();
        assert!(channel.recv::<BrokerMsg>().is_err());
    }
    let text = read(&log);
    let lines = text
        .lines()
        .filter(|l| l.contains("invalid VM name"))
        .count();
    assert!((1..=16).contains(&lines), "{lines} lines:\n{text}");
    assert!(!text.contains('\u{1b}') && !text.contains(&"y".repeat(200)));
    assert!(broker.is_running());
    // A good name is still welcomed.
    let (reply, _held) = hello(&socket, "vm", &[p::D_OUTPUT, p::D_INPUT]);
    assert!(matches!(reply, BrokerMsg::Welcome { .. }), "{reply:?}");
}

/// VM `a` gets one output stream, VM `b` three buses of its own, jacks and channel maps; a VM
/// without a table gets the default layout. Their WAV files are named after the VM: the same
/// file again after a worker restart, where `{client}` names a new one.
#[test]
fn each_vm_gets_its_own_layout_and_stable_wav_paths() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "vsound.toml",
        r#"
[[streams]]
name = "media"
direction = "output"
backend = "wav"
wav_path = "$DIR/{vm}-media.wav"
formats = ["S16"]
rates = [48000]
[[streams]]
name = "mic"
direction = "input"
backend = "null"

[vms.a]
[[vms.a.streams]]
name = "media"
direction = "output"
backend = "wav"
wav_path = "$DIR/{vm}-media.wav"
formats = ["S16"]
rates = [48000]

[vms.b]
[[vms.b.jacks]]
name = "Cabin"
[[vms.b.jacks]]
name = "Headrest"
hda_fn_nid = 1
[[vms.b.streams]]
name = "media"
direction = "output"
backend = "wav"
wav_path = "$DIR/{vm}-media.wav"
formats = ["S16"]
rates = [48000]
[[vms.b.streams]]
name = "navigation"
direction = "output"
hda_fn_nid = 1
backend = "wav"
wav_path = "$DIR/{vm}-{client}-nav.wav"
formats = ["S16"]
rates = [48000]
[[vms.b.streams]]
name = "mic"
direction = "input"
backend = "null"
[[vms.b.chmaps]]
direction = "output"
positions = ["FL", "FR"]
[[vms.b.chmaps]]
direction = "output"
hda_fn_nid = 1
positions = ["FL", "FR"]
[[vms.b.chmaps]]
direction = "input"
positions = ["MONO"]
"#,
    );
    let (_broker, broker_socket) = spawn_broker(dir.path(), Some(&config));
    let (worker_a, socket_a) = spawn_worker(dir.path(), "a", &broker_socket, Some(&config));
    let (worker_b, socket_b) = spawn_worker(dir.path(), "b", &broker_socket, Some(&config));
    let (_worker_c, socket_c) = spawn_worker(dir.path(), "c", &broker_socket, Some(&config));
    let mut a = GuestVm::connect(&socket_a, FrontendOptions::default()).unwrap();
    let mut b = GuestVm::connect(&socket_b, FrontendOptions::default()).unwrap();
    let mut c = GuestVm::connect(&socket_c, FrontendOptions::default()).unwrap();

    // {jacks, streams, chmaps}: a's own stream with the default jack and the standard maps of
    // its own device (mono to 7.1 output); b's own all through; c, without a table, the
    // default.
    let words = |config: Vec<u8>| -> Vec<u32> {
        config
            .chunks(4)
            .map(|w| u32::from_le_bytes(w.try_into().unwrap()))
            .collect()
    };
    assert_eq!(words(a.get_config(0, 12).unwrap()), [1, 1, 6]);
    assert_eq!(words(b.get_config(0, 12).unwrap()), [2, 3, 3]);
    assert_eq!(words(c.get_config(0, 12).unwrap()), [1, 2, 12]);

    // PCM_INFO through each guest's control queue.
    let resp = a.request(p::CONTROL_QUEUE, &query(p::R_PCM_INFO, 0, 1, 32), 36);
    assert_eq!(status_of(&resp), OK);
    let info: p::PcmInfo = p::read_prefix(&resp[4..]).unwrap();
    assert_eq!(info.direction, p::D_OUTPUT);
    assert_eq!(info.formats.get(), 1 << p::format::S16);
    let resp = a.request(p::CONTROL_QUEUE, &query(p::R_PCM_INFO, 0, 2, 32), 68);
    assert_eq!(status_of(&resp), BAD_MSG, "a has one stream");
    let resp = b.request(p::CONTROL_QUEUE, &query(p::R_PCM_INFO, 0, 3, 32), 100);
    assert_eq!(status_of(&resp), OK);
    let infos: Vec<p::PcmInfo> = resp[4..]
        .chunks(32)
        .map(|chunk| p::read_prefix(chunk).unwrap())
        .collect();
    let shape: Vec<(u8, u32)> = infos
        .iter()
        .map(|i| (i.direction, i.hdr.hda_fn_nid.get()))
        .collect();
    assert_eq!(shape, [(p::D_OUTPUT, 0), (p::D_OUTPUT, 1), (p::D_INPUT, 0)]);
    let resp = b.request(p::CONTROL_QUEUE, &query(p::R_JACK_INFO, 0, 2, 24), 52);
    assert_eq!(status_of(&resp), OK);
    let resp = c.request(p::CONTROL_QUEUE, &query(p::R_PCM_INFO, 0, 2, 32), 68);
    assert_eq!(status_of(&resp), OK);
    let input: p::PcmInfo = p::read_prefix(&resp[36..]).unwrap();
    assert_eq!(input.direction, p::D_INPUT);

    // Each VM's audio in its own files, named after it.
    let play_on = |vm: &mut GuestVm, stream: u32, seed: u32| {
        let params = Params::s16_48k(stream);
        prepare(vm, &params);
        let data = pattern(params.period_bytes as usize * 10, seed);
        let (_, done) = play(vm, &params, &data);
        assert!(done.iter().all(|c| c.status == OK), "tx statuses");
        assert_eq!(control(vm, &pcm(p::R_PCM_STOP, stream)), OK);
        assert_eq!(control(vm, &pcm(p::R_PCM_RELEASE, stream)), OK);
        data
    };
    let nav_files = || {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                name.starts_with("b-") && name.ends_with("-nav.wav")
            })
            .collect();
        files.sort();
        files
    };
    let first = play_on(&mut a, 0, 1);
    assert_eq!(wav_s16_bytes(&dir.path().join("a-media.wav")), first);
    let nav = play_on(&mut b, 1, 2);
    let navs = nav_files();
    assert_eq!(navs.len(), 1, "{navs:?}");
    assert_eq!(wav_s16_bytes(&navs[0]), nav);
    let media_b = play_on(&mut b, 0, 3);
    assert_eq!(wav_s16_bytes(&dir.path().join("b-media.wav")), media_b);
    let media_c = play_on(&mut c, 0, 4);
    assert_eq!(wav_s16_bytes(&dir.path().join("c-media.wav")), media_c);

    // Restarted workers: {vm} names the same file, {client} a new one.
    drop((a, b, worker_a, worker_b));
    let (_worker_a, socket_a) = spawn_worker(dir.path(), "a", &broker_socket, Some(&config));
    let (_worker_b, socket_b) = spawn_worker(dir.path(), "b", &broker_socket, Some(&config));
    let mut a = GuestVm::connect(&socket_a, FrontendOptions::default()).unwrap();
    let mut b = GuestVm::connect(&socket_b, FrontendOptions::default()).unwrap();
    let second = play_on(&mut a, 0, 5);
    assert_ne!(first, second);
    assert_eq!(wav_s16_bytes(&dir.path().join("a-media.wav")), second);
    let nav_again = play_on(&mut b, 1, 6);
    let navs_now = nav_files();
    assert_eq!(navs_now.len(), 2, "{navs_now:?}");
    let new_nav = navs_now.iter().find(|p| !navs.contains(p)).unwrap();
    assert_eq!(wav_s16_bytes(new_nav), nav_again);
    assert_eq!(wav_s16_bytes(&navs[0]), nav, "the old file is left alone");
}

/// A Hello whose streams are not the broker's layout for its VM is refused with the reason,
/// and a real worker that read another config exits at start-up saying so.
#[test]
fn a_worker_with_another_layout_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let broker_config = write_config(
        dir.path(),
        "broker.toml",
        &format!(
            "{NULL_CONFIG}
[[streams]]
name = \"mic\"
direction = \"input\"
backend = \"null\"
[vms.solo]
[[vms.solo.streams]]
name = \"media\"
direction = \"output\"
backend = \"null\"
"
        ),
    );
    // The same default layout, no table for `solo`.
    let worker_config = write_config(
        dir.path(),
        "worker.toml",
        &format!("{NULL_CONFIG}[[streams]]\nname = \"mic\"\ndirection = \"input\"\n"),
    );
    let log = dir.path().join("broker.log");
    let (_broker, socket) = spawn_broker_logging(
        dir.path(),
        Some(&broker_config),
        &[("RUST_LOG", "info".into())],
        Some(&log),
    );
    let (reply, _) = hello(&socket, "solo", &[p::D_OUTPUT, p::D_INPUT]);
    assert_eq!(
        refusal(&reply),
        "vm solo: the worker's layout has 2 streams (output, input), the broker's for it 1 \
         (output): do both read the same config?"
    );
    let (reply, _) = hello(&socket, "solo", &[p::D_INPUT]);
    assert!(refusal(&reply).contains("has 1 streams (input)"));
    let (reply, _) = hello(&socket, "other", &[p::D_OUTPUT]);
    assert!(refusal(&reply).contains("the broker's for it 2 (output, input)"));
    let (reply, _) = hello(&socket, "solo", &[p::D_OUTPUT]);
    assert!(matches!(reply, BrokerMsg::Welcome { .. }), "{reply:?}");

    let run = |vm: &str, config: &Path, n: u32| {
        let socket_path = dir.path().join(format!("{vm}-{n}.sock"));
        let mut cmd = Command::new(common::bins::worker());
        cmd.arg("--socket")
            .arg(&socket_path)
            .arg("--broker")
            .arg(&socket)
            .arg("--vm")
            .arg(vm)
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info");
        if nix::unistd::Uid::effective().is_root() {
            cmd.args(["--user", "nobody", "--group", "nogroup"]);
        }
        start(cmd, socket_path, &dir.path().join(format!("{vm}-{n}.log")))
    };
    let error = run("solo", &worker_config, 1).refused();
    assert!(
        error.contains(
            "vm solo: cannot start with the broker at ") && error.contains(
            "broker refused us: vm solo: the worker's layout has 2 streams (output, input), the \
             broker's for it 1 (output)"
        ),
        "{error}"
    );
    // Reading the broker's file it is served, and says which layout it shows.
    let (_worker, vm_socket) = run("solo", &broker_config, 2).listening();
    let mut vm = GuestVm::connect(&vm_socket, FrontendOptions::default()).unwrap();
    assert_eq!(vm.get_config(4, 4).unwrap(), [1, 0, 0, 0]);
    assert!(read(&dir.path().join("solo-2.log")).contains("its own layout from [vms.solo]"));
    assert!(read(&log).contains("refused: vm solo: the worker's layout has 2 streams"));
}

/// A name is held by one live connection: another uid's claim is refused while the holder
/// lives and granted once it is gone; the same uid's newer worker takes it over, and the older
/// one, told so, stops using the broker but keeps its VM's session.
#[test]
fn a_vm_name_is_bound_to_its_workers_uid() {
    if !can_switch_uids() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "vsound.toml", NULL_CONFIG);
    let log = dir.path().join("broker.log");
    let (mut broker, broker_socket) = spawn_broker_logging(
        dir.path(),
        Some(&config),
        &[("RUST_LOG", "info".into())],
        Some(&log),
    );
    let (mut holder, holder_socket) =
        worker_as(dir.path(), UID_A, "shared", &broker_socket, &config, 1).listening();
    let mut holder_vm = guest_plays(&holder_socket);

    // Another uid's worker: refused at start-up, the holder undisturbed.
    let error = worker_as(dir.path(), UID_B, "shared", &broker_socket, &config, 2).refused();
    assert!(
        error.contains("broker refused us: vm shared is held by a live connection of another uid"),
        "{error}"
    );
    assert!(
        !error.contains(&UID_A.to_string()),
        "the holder's uid leaked: {error}"
    );
    let params = Params::s16_48k(0);
    prepare(&mut holder_vm, &params);
    assert_eq!(control(&mut holder_vm, &pcm(p::R_PCM_RELEASE, 0)), OK);
    let text = read(&log);
    assert!(
        text.contains(&format!(
            "(uid {UID_B}): refused: vm shared is held by a live connection of another uid"
        )),
        "{text}"
    );

    // The same uid's newer worker takes the name over.
    let (newer, newer_socket) =
        worker_as(dir.path(), UID_A, "shared", &broker_socket, &config, 3).listening();
    let _newer_vm = guest_plays(&newer_socket);
    let old_log = dir.path().join(format!("shared-{UID_A}-1.log"));
    let old_text = wait_for_text(&old_log, "no longer uses the broker");
    assert!(
        old_text.contains("vm shared was taken over by a newer connection of the same uid"),
        "{old_text}"
    );
    assert!(
        read(&log).contains("vm shared was taken over by a newer connection of the same uid"),
        "{}",
        read(&log)
    );
    // It does not take the name back (that would drop the newer one), and keeps serving its
    // VMM: the worker must never exit under a running VM.
    // (Longer than the worker's 1 s window for PREPAREs on its own clock, checked below.)
    std::thread::sleep(Duration::from_millis(1100));
    assert!(holder.is_running(), "the superseded worker exited");
    let takeovers = read(&log)
        .matches("taken over by a newer connection")
        .count();
    assert_eq!(takeovers, 1, "{}", read(&log));
    let resp = holder_vm.request(p::CONTROL_QUEUE, &query(p::R_PCM_INFO, 0, 1, 32), 36);
    assert_eq!(
        status_of(&resp),
        OK,
        "the superseded worker answers its guest"
    );
    // Past the local clock's PREPARE window (1 s) without a broker: IO_ERR, not a hang.
    assert_eq!(control(&mut holder_vm, &params.request()), OK);
    assert_eq!(control(&mut holder_vm, &pcm(p::R_PCM_PREPARE, 0)), IO_ERR);

    // Once no connection holds it, another uid may claim it (the holder killed just now: the
    // broker checks the hang-up it may not have read yet).
    drop(newer);
    drop(holder);
    let (_other, other_socket) =
        worker_as(dir.path(), UID_B, "shared", &broker_socket, &config, 4).listening();
    guest_plays(&other_socket);
    assert!(broker.is_running());
}

/// A `[vms.NAME]` pin: only that uid (and root, whose workers connect as root before they
/// switch users) may claim the name, held or not; a `user` pin is resolved at the broker's
/// start, an unknown user locks the name.
#[test]
fn a_pinned_vm_name_is_refused_to_other_uids() {
    if !can_switch_uids() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "vsound.toml",
        &format!(
            "{NULL_CONFIG}
[vms.pinned]
uid = {UID_A}
[vms.byuser]
user = \"nobody\"
[vms.ghost]
user = \"vsound-no-such-user\"
"
        ),
    );
    let log = dir.path().join("broker.log");
    let (_broker, broker_socket) = spawn_broker_logging(
        dir.path(),
        Some(&config),
        &[("RUST_LOG", "info".into())],
        Some(&log),
    );
    // The broker binds its socket before it resolves the pins: wait for the line.
    let ghost = "vms.ghost is pinned to user \"vsound-no-such-user\", which does not exist";
    let text = wait_for_text(&log, ghost);
    assert!(text.contains(ghost), "{text}");
    let error = worker_as(dir.path(), UID_B, "pinned", &broker_socket, &config, 1).refused();
    assert!(
        error.contains(&format!(
            "vm pinned is pinned to uid {UID_A} by the broker's config, not {UID_B}"
        )),
        "{error}"
    );
    let (_pinned, pinned_socket) =
        worker_as(dir.path(), UID_A, "pinned", &broker_socket, &config, 2).listening();
    guest_plays(&pinned_socket);
    let error = worker_as(dir.path(), UID_A, "byuser", &broker_socket, &config, 3).refused();
    assert!(
        error.contains("vm byuser is pinned to uid 65534"),
        "{error}"
    );
    let error = worker_as(dir.path(), UID_A, "ghost", &broker_socket, &config, 4).refused();
    assert!(
        error.contains("vm ghost is pinned to user \"vsound-no-such-user\", which does not exist"),
        "{error}"
    );
    // A root-started worker becoming `nobody`: welcomed as root, and again as `nobody` by a
    // restarted broker.
    let (mut byuser, byuser_socket) =
        spawn_worker(dir.path(), "byuser", &broker_socket, Some(&config));
    // Held: a worker whose VMM leaves exits.
    let _byuser_vm = guest_plays(&byuser_socket);
    drop(_broker);
    let log2 = dir.path().join("broker2.log");
    let (_broker, _) = spawn_broker_logging(
        dir.path(),
        Some(&config),
        &[("RUST_LOG", "info".into())],
        Some(&log2),
    );
    let text = wait_for_text(&log2, "vm byuser connected");
    let line = text
        .lines()
        .find(|l| l.contains("vm byuser connected"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(line.ends_with("uid 65534)"), "{line}");
    assert!(byuser.is_running());
}

/// A broker in a user namespace that maps only its own uid (as `PrivateUsers=` or its own
/// unprivileged sandbox make) would see every worker as the overflow uid: it says so at start.
#[test]
fn a_broker_that_cannot_tell_uids_apart_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let run = |wrapped: bool, name: &str| {
        let socket = dir.path().join(format!("{name}.sock"));
        let log = dir.path().join(format!("{name}.log"));
        let mut cmd = if wrapped {
            let mut cmd = Command::new("unshare");
            if nix::unistd::Uid::effective().is_root() {
                cmd.args(["--user", "--map-user=0", "--map-group=0"]);
            } else {
                cmd.args(["--user", "--map-current-user"]);
            }
            cmd.arg(common::bins::broker());
            cmd
        } else {
            Command::new(common::bins::broker())
        };
        cmd.arg("--socket")
            .arg(&socket)
            .args(["--sandbox", "best-effort"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let mut broker = Proc {
            child: cmd.spawn().expect("unshare (apt package util-linux)"),
        };
        wait_for_path(&socket, &mut broker);
        wait_for_text(&log, "broker: listening on")
    };
    let warning = "in a user namespace that does not map the workers' uids";
    let wrapped = run(true, "private");
    assert!(wrapped.contains(warning), "{wrapped}");
    if nix::unistd::Uid::effective().is_root() {
        // In the initial namespace (the shipped unit has no PrivateUsers=): silent. An
        // unprivileged broker makes a user namespace of its own, so it always warns.
        let plain = run(false, "plain");
        assert!(!plain.contains(warning), "{plain}");
    }
}

/// A fatal start-up error reaches stderr whatever RUST_LOG says (with `off` the log says
/// nothing): here a config file that does not exist, for the worker and the broker.
#[test]
fn a_fatal_error_reaches_stderr_even_with_logging_off() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.toml");
    for (binary, extra) in [
        (
            common::bins::worker(),
            vec!["--vm", "vm", "--broker", "/nonexistent.sock"],
        ),
        (common::bins::broker(), vec![]),
    ] {
        let out = Command::new(binary)
            .arg("--socket")
            .arg(dir.path().join("never.sock"))
            .arg("--config")
            .arg(&missing)
            .args(extra)
            .env("RUST_LOG", "off")
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{binary} started with a missing config"
        );
        assert!(stderr.contains("missing.toml"), "{binary} said: {stderr:?}");
    }
}
