//! Faults under a real guest: the broker killed mid-aplay (the worker keeps its VMM session,
//! reconnects, and the next aplay arrives bit-exact), and one VM's worker killed while another
//! VM plays on the same broker (the other VM's audio reaches the sink without a gap).

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::common::pipewire::PipeWire;
use crate::common::vsound::*;
use crate::guest::*;

const VM_TIMEOUT: Duration = Duration::from_secs(180);

/// One playback stream into the test sink (each worker gets its own node).
const PLAYBACK_CONFIG: &str = r#"
[[streams]]
name = "media"
direction = "output"
backend = "pipewire"
formats = ["S16"]
rates = [48000]
target_object = "vsound-test-sink"
"#;

struct Setup {
    dir: tempfile::TempDir,
    cache: std::path::PathBuf,
    pw: PipeWire,
    config: std::path::PathBuf,
}

fn setup() -> Setup {
    require_qemu();
    let cache = cache_dir();
    build_guest(&cache);
    let dir = tempfile::tempdir().unwrap();
    let pw = PipeWire::start(dir.path());
    let config = dir.path().join("vsound.toml");
    std::fs::write(&config, PLAYBACK_CONFIG).unwrap();
    Setup {
        dir,
        cache,
        pw,
        config,
    }
}

fn write_signal(dir: &Path, name: &str, seconds: f64, seed: u32) -> (std::path::PathBuf, Vec<u8>) {
    let data = signal(seconds, seed);
    let path = dir.join(name);
    write_wav_s16(&path, 2, RATE, &data);
    (path, data)
}

fn sigkill(proc: &mut Proc) {
    let _ = kill(Pid::from_raw(proc.pid() as i32), Signal::SIGKILL);
    let _ = proc.child.wait();
}

const BROKER_KILL_SCRIPT: &str = r#"
up() { cut -d' ' -f1 /proc/uptime; }
echo "@@E2E long-start $(up)"
aplay -D hw:0,0 --period-time=10000 --buffer-time=40000 long.wav
status=$?
echo "@@E2E long-end $(up) $status"
# Apart, so that the sink does not mix the last frames of one with the first of the other, and
# so that the first one's node has left the graph (its tail takes up to 0.5 s): a node leaving
# costs a neighbour a quantum or two at the sink now and then, PipeWire's own residual
# (tests/common/pipewire.rs, lost_quantum). A CI run lost 512 frames 0.19 s into after.wav
# with a 0.3 s gap.
sleep 1
echo "@@E2E after-start $(up)"
# 10 ms periods as before the restart: what this checks is the way through the new broker. (With
# default periods right after 10 ms ones, the graph's quantum switches from 256 to 2048 as the
# stream starts, and PipeWire sometimes drops up to 50 ms of its first frames then: a known
# residual, see the README's tests section.)
aplay -D hw:0,0 --period-time=10000 --buffer-time=40000 after.wav || exit 12
echo "@@E2E after-end $(up)"
"#;

#[test]
fn broker_killed_mid_aplay_then_the_next_aplay_arrives_bit_exact() {
    let _one = crate::guest::one_guest_test_at_a_time();
    let s = setup();
    let (long_wav, _) = write_signal(s.dir.path(), "long.wav", 6.0, 31);
    let (after_wav, after) = write_signal(s.dir.path(), "after.wav", 2.0, 32);
    let (mut broker, broker_socket) =
        spawn_broker_with_env(s.dir.path(), Some(&s.config), &s.pw.env());
    let (mut worker, socket) = spawn_worker(s.dir.path(), "vm", &broker_socket, Some(&s.config));
    let sink_raw = s.dir.path().join("sink.raw");
    let recorder = s.pw.record_sink(&sink_raw);
    std::thread::sleep(Duration::from_millis(300));

    let files = [long_wav, after_wav];
    let spec = VmSpec {
        files: &files,
        out: None,
        cache: &s.cache,
        timeout: VM_TIMEOUT,
        tmp: s.dir.path(),
    };
    let mut vm = Vm::start(&socket, &spec, BROKER_KILL_SCRIPT);
    let deadline = vm.started + VM_TIMEOUT + Duration::from_secs(30);
    assert!(
        vm.wait_for("@@E2E long-start", deadline),
        "the guest never started playing:\n{}",
        vm.console_text()
    );
    std::thread::sleep(Duration::from_secs(2));
    sigkill(&mut broker);
    let killed = Instant::now();
    // As systemd's Restart= (or the launcher) would: a new broker on the same socket.
    let (new_broker, _) = spawn_broker_with_env(s.dir.path(), Some(&s.config), &s.pw.env());
    broker = new_broker;
    println!(
        "broker killed 2 s into the guest's aplay; a new one listens {:.0} ms later",
        killed.elapsed().as_secs_f64() * 1000.0
    );
    let (status, _) = vm.finish(deadline);
    assert!(broker.is_running(), "the new broker died");
    assert!(
        status.success(),
        "the guest run failed ({status}): the aplay after the broker restart must work"
    );
    let long_end = vm.marker("long-end").expect("no long-end marker");
    let long_status = long_end.text.split_whitespace().nth(3).unwrap_or("?");
    println!("the aplay the broker died under exited with status {long_status}");
    assert_paced(
        "aplay through the broker's death and restart",
        6.0,
        vm.span("long-start", "long-end"),
    );
    assert_paced(
        "aplay after the restart",
        2.0,
        vm.span("after-start", "after-end"),
    );
    std::thread::sleep(Duration::from_millis(300));
    drop(recorder);
    let recording = std::fs::read(&sink_raw).unwrap();
    if let Ok(keep) = std::env::var("VSOUND_E2E_KEEP") {
        std::fs::write(Path::new(&keep).join("sink.raw"), &recording).unwrap();
        std::fs::write(Path::new(&keep).join("after.raw"), &after).unwrap();
    }
    assert_arrived("aplay after the broker restart", &recording, &after);
    // The worker kept its VMM session to the end and left cleanly when the VM powered off.
    let deadline = Instant::now() + Duration::from_secs(5);
    let ended = loop {
        if let Some(status) = worker.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the worker did not exit after its VMM left"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(ended.success(), "the worker ended with {ended}");
}

const PLAY_SCRIPT: &str = r#"
up() { cut -d' ' -f1 /proc/uptime; }
echo "@@E2E play-start $(up)"
aplay -D hw:0,0 --period-time=10000 --buffer-time=40000 b.wav || exit 11
echo "@@E2E play-end $(up)"
"#;

#[test]
fn a_vm_whose_worker_is_killed_leaves_the_other_vms_audio_without_a_gap() {
    let _one = crate::guest::one_guest_test_at_a_time();
    let s = setup();
    let (b_wav, b_signal) = write_signal(s.dir.path(), "b.wav", 6.0, 41);
    let (mut broker, broker_socket) =
        spawn_broker_with_env(s.dir.path(), Some(&s.config), &s.pw.env());
    let (mut worker_a, socket_a) =
        spawn_worker(s.dir.path(), "vm-a", &broker_socket, Some(&s.config));
    let (_worker_b, socket_b) = spawn_worker(s.dir.path(), "vm-b", &broker_socket, Some(&s.config));
    let sink_raw = s.dir.path().join("sink.raw");
    let recorder = s.pw.record_sink(&sink_raw);
    std::thread::sleep(Duration::from_millis(300));

    // VM A plays zeros into the same sink: mixed with VM B's signal they change no sample, so
    // VM B's audio must arrive bit-exact. VM A is the in-process frontend driving its worker
    // like a guest driver (a second TCG guest would take the CPU PipeWire needs on 2 cores).
    let playing_a = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let killed_a = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let vm_a = {
        let playing_a = playing_a.clone();
        let killed_a = killed_a.clone();
        let socket_a = socket_a.clone();
        std::thread::spawn(move || {
            play_zeros_until_the_worker_dies(&socket_a, &playing_a, &killed_a)
        })
    };
    let files = [b_wav];
    let spec_b = VmSpec {
        files: &files,
        out: None,
        cache: &s.cache,
        timeout: VM_TIMEOUT,
        tmp: s.dir.path(),
    };
    let mut vm_b = Vm::start(&socket_b, &spec_b, PLAY_SCRIPT);
    let deadline = vm_b.started + VM_TIMEOUT + Duration::from_secs(30);
    assert!(
        vm_b.wait_for("@@E2E play-start", deadline),
        "VM B never started playing:\n{}",
        vm_b.console_text()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        playing_a.load(std::sync::atomic::Ordering::Acquire),
        "VM A was playing"
    );
    killed_a.store(true, std::sync::atomic::Ordering::Release);
    sigkill(&mut worker_a);
    println!("VM A's worker killed 2 s into VM B's aplay");
    let (status, _) = vm_b.finish(deadline);
    let a_periods = vm_a.join().expect("VM A's thread");
    println!("VM A played {a_periods} periods of zeros before its worker was killed");
    assert!(status.success(), "VM B's run failed ({status})");
    assert!(broker.is_running(), "the broker died with VM A's worker");
    assert_paced("VM B's aplay", 6.0, vm_b.span("play-start", "play-end"));
    std::thread::sleep(Duration::from_millis(300));
    drop(recorder);
    let recording = std::fs::read(&sink_raw).unwrap();
    assert_arrived("VM B's aplay", &recording, &b_signal);
}

/// A guest driver's playback of zeros, period by period, until its worker stops answering
/// (`killed` is set just before it is killed); returns the periods completed.
fn play_zeros_until_the_worker_dies(
    socket: &Path,
    playing: &std::sync::atomic::AtomicBool,
    killed: &std::sync::atomic::AtomicBool,
) -> usize {
    use crate::common::frontend::{FrontendOptions, GuestVm};
    use virtio_snd::protocol as p;
    let mut vm = GuestVm::connect(socket, FrontendOptions::default()).expect("VM A connects");
    let params = Params::s16_48k(0);
    prepare(&mut vm, &params);
    let zeros = vec![0u8; params.period_bytes as usize];
    for _ in 0..params.periods {
        tx_submit(&mut vm, 0, &zeros);
    }
    assert_eq!(
        control(&mut vm, &pcm(p::R_PCM_START, 0)),
        0x8000,
        "VM A's START"
    );
    playing.store(true, std::sync::atomic::Ordering::Release);
    let mut completed = 0;
    while wait_used_or_killed(&mut vm, p::TX_QUEUE, Duration::from_secs(2), killed).is_some() {
        completed += 1;
        tx_submit(&mut vm, 0, &zeros);
    }
    completed
}
