//! A backend open that hangs delays no other VM: the broker opens streams off its control loop
//! and answers every PREPARE within its deadline, which is shorter than the worker's patience.
//!
//! VM A's stream 1 is a WAV file at a FIFO nobody reads, so its open blocks in the kernel (as a
//! hung ALSA device or PipeWire would). While it hangs, VM B prepares, starts and plays on the
//! null backend: its requests are answered at once and its audio keeps the real-time pace.
//! VM A's PREPARE is answered IO_ERR in time (its link to the broker survives: its next
//! requests are served), a uid's hanging opens are bounded, and once the FIFO is read the
//! abandoned opens finish and are freed.

mod common;

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::frontend::{FrontendOptions, GuestVm};
use common::vsound::*;
use virtio_snd::protocol as p;
use vsound_broker::broker::MAX_ABANDONED_OPENS_PER_UID;
use vsound_broker::opener::OPEN_DEADLINE;
use vsound_shared::ipc::BROKER_REPLY_TIMEOUT;

const IO_ERR: u32 = 0x8003;

fn config_text(fifo: &Path) -> String {
    format!(
        "[[streams]]\nname = \"media\"\ndirection = \"output\"\nbackend = \"null\"\n\
         formats = [\"S16\"]\nrates = [48000]\n\
         [[streams]]\nname = \"hung\"\ndirection = \"output\"\nbackend = \"wav\"\n\
         wav_path = {:?}\nformats = [\"S16\"]\nrates = [48000]\n",
        fifo.display().to_string()
    )
}

fn connect(dir: &Path, name: &str, broker: &Path, config: &Path) -> (Proc, GuestVm) {
    let (worker, socket) = spawn_worker(dir, name, broker, Some(config));
    let vm = GuestVm::connect(&socket, FrontendOptions::default()).expect("connect to the worker");
    (worker, vm)
}

/// A request's status and how long the answer took.
fn timed(vm: &mut GuestVm, request: &[u8]) -> (u32, Duration) {
    let asked = Instant::now();
    let status = control(vm, request);
    (status, asked.elapsed())
}

/// SET_PARAMS and PREPARE of the hung stream: PREPARE's status and answer time.
fn prepare_hung(vm: &mut GuestVm) -> (u32, Duration) {
    let params = Params::s16_48k(1);
    assert_eq!(control(vm, &params.request()), 0x8000, "SET_PARAMS");
    timed(vm, &pcm(p::R_PCM_PREPARE, 1))
}

#[test]
fn a_hanging_backend_open_delays_no_other_vm() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("hung.wav");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
    let config = dir.path().join("vsound.toml");
    std::fs::write(&config, config_text(&fifo)).unwrap();
    let (mut broker, broker_socket) = spawn_broker(dir.path(), Some(&config));
    let (_worker_a, mut vm_a) = connect(dir.path(), "vm-a", &broker_socket, &config);
    let (_worker_b, mut vm_b) = connect(dir.path(), "vm-b", &broker_socket, &config);

    // VM A's PREPARE hangs in the backend, on a thread of its own.
    let hung = std::thread::spawn(move || {
        let answer = prepare_hung(&mut vm_a);
        (vm_a, answer)
    });
    std::thread::sleep(Duration::from_millis(50));

    // Meanwhile VM B is served at once and plays at the real-time pace.
    let params = Params::s16_48k(0);
    let (status, set_params) = timed(&mut vm_b, &params.request());
    assert_eq!(status, 0x8000, "VM B's SET_PARAMS");
    let (status, prepared) = timed(&mut vm_b, &pcm(p::R_PCM_PREPARE, 0));
    assert_eq!(status, 0x8000, "VM B's PREPARE while VM A's open hangs");
    println!("VM B: SET_PARAMS in {set_params:?}, PREPARE in {prepared:?} while VM A's open hangs");
    assert!(
        prepared < Duration::from_millis(100),
        "VM B's PREPARE waited {prepared:?} behind VM A's open"
    );
    let periods = 60;
    let data = pattern(params.period_bytes as usize * periods, 5);
    let (started, done) = play(&mut vm_b, &params, &data);
    assert!(
        done.iter().all(|c| c.status == 0x8000),
        "VM B's tx statuses"
    );
    let took = done.last().unwrap().at - started;
    let audio = params.period() * periods as u32;
    println!("VM B: {audio:?} of audio completed in {took:?}");
    assert!(
        took >= audio - params.period() * 3 && took < audio + Duration::from_millis(100),
        "VM B's {audio:?} of audio completed in {took:?}"
    );
    let (status, stopped) = timed(&mut vm_b, &pcm(p::R_PCM_STOP, 0));
    assert_eq!(status, 0x8000, "VM B's STOP");
    assert!(
        stopped < Duration::from_millis(100),
        "STOP took {stopped:?}"
    );

    // VM A got IO_ERR at the broker's deadline, before the worker's own timeout.
    let (mut vm_a, (status, answered)) = hung.join().unwrap();
    println!("VM A: PREPARE of the hung stream answered {status:#x} in {answered:?}");
    assert_eq!(status, IO_ERR, "VM A's PREPARE of a hung backend");
    assert!(
        answered >= OPEN_DEADLINE && answered < BROKER_REPLY_TIMEOUT,
        "VM A's PREPARE answered after {answered:?} (deadline {OPEN_DEADLINE:?}, the worker \
         waits {BROKER_REPLY_TIMEOUT:?})"
    );
    // Its link survived: its other stream is served at once.
    let (status, took) = timed(&mut vm_a, &Params::s16_48k(0).request());
    assert_eq!(status, 0x8000, "VM A's SET_PARAMS after the hung open");
    let (status, took_prepare) = timed(&mut vm_a, &pcm(p::R_PCM_PREPARE, 0));
    assert_eq!(
        status, 0x8000,
        "VM A's PREPARE of its null stream after the hung open"
    );
    assert!(
        took + took_prepare < Duration::from_millis(100),
        "VM A's link was lost: its next requests took {:?}",
        took + took_prepare
    );

    // A uid's hanging opens are bounded: past the limit its PREPAREs fail at once.
    for _ in 1..MAX_ABANDONED_OPENS_PER_UID {
        let (status, answered) = prepare_hung(&mut vm_a);
        assert_eq!(status, IO_ERR);
        assert!(answered >= OPEN_DEADLINE, "answered in {answered:?}");
    }
    let (status, answered) = prepare_hung(&mut vm_a);
    assert_eq!(status, IO_ERR, "a PREPARE past the limit of hanging opens");
    println!("past {MAX_ABANDONED_OPENS_PER_UID} hanging opens: IO_ERR in {answered:?}");
    assert!(
        answered < OPEN_DEADLINE,
        "past the limit of hanging opens, PREPARE still waited {answered:?}"
    );

    // Once the FIFO is read the hung opens finish; their threads free them and the uid may
    // open again.
    let _reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _) = prepare_hung(&mut vm_a);
        if status == 0x8000 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the abandoned opens were never freed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(broker.is_running(), "the broker died");
}
