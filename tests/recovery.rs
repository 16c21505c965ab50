//! The broker dies and restarts under a running guest (the VMM cannot reconnect a vhost-user-snd
//! backend, so the worker must keep its session): streams go on at their real-time pace in
//! silence while it is away, the worker reconnects, and the new broker gets the streams back
//! with the guest's params, running state and pending buffers.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::frontend::FrontendOptions;
use common::vsound::*;
use virtio_snd::protocol as p;

/// Stream 0 plays into `NAME-{client}.wav`, stream 1 records `source.wav`.
fn wav_config(dir: &Path, name: &str) -> std::path::PathBuf {
    let text = format!(
        r#"
[[streams]]
name = "media"
direction = "output"
backend = "wav"
wav_path = "{dir}/{name}-{{client}}.wav"
formats = ["S16"]
rates = [48000]
[[streams]]
name = "mic"
direction = "input"
backend = "wav"
wav_path = "{dir}/source.wav"
formats = ["S16"]
rates = [48000]
"#,
        dir = dir.display()
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

struct Restartable {
    rig: Rig,
}

impl Restartable {
    fn start() -> Restartable {
        let dir = tempfile::tempdir().unwrap();
        let config = wav_config(dir.path(), "before");
        let (broker, broker_socket) = spawn_broker(dir.path(), Some(&config));
        let (worker, socket) = spawn_worker(dir.path(), "vm", &broker_socket, Some(&config));
        let vm = common::frontend::GuestVm::connect(&socket, FrontendOptions::default())
            .expect("connect to the worker");
        Restartable {
            rig: Rig {
                dir,
                broker,
                broker_socket,
                worker,
                vm,
            },
        }
    }

    fn kill_broker(&mut self) {
        let _ = self.rig.broker.child.kill();
        let _ = self.rig.broker.child.wait();
    }

    /// A new broker on the same socket, writing playback to `after-{client}.wav`.
    fn restart_broker(&mut self) {
        let config = wav_config(self.rig.dir.path(), "after");
        let (broker, _) = spawn_broker(self.rig.dir.path(), Some(&config));
        self.rig.broker = broker;
    }
}

/// Whether `part` is a slice of `whole` that starts at a multiple of `align`.
fn aligned_slice_of(part: &[u8], whole: &[u8], align: usize) -> bool {
    (0..whole.len().saturating_sub(part.len()) + 1)
        .step_by(align)
        .any(|at| &whole[at..at + part.len()] == part)
}

#[test]
fn playback_goes_on_through_a_broker_restart() {
    let mut r = Restartable::start();
    let worker_pid = r.rig.worker.pid();
    let params = Params::s16_48k(0);
    prepare(&mut r.rig.vm, &params);
    let periods = 200;
    let (kill_at, restart_at) = (50, 80);
    let period = params.period_bytes as usize;
    let data = pattern(period * periods, 7);
    let mut chunks = data.chunks(period);
    let mut in_flight = 0;
    for chunk in chunks.by_ref().take(params.periods as usize) {
        tx_submit(&mut r.rig.vm, 0, chunk);
        in_flight += 1;
    }
    let started = Instant::now();
    assert_eq!(control(&mut r.rig.vm, &pcm(p::R_PCM_START, 0)), 0x8000);
    let mut done = Vec::new();
    while in_flight > 0 {
        let used = r
            .rig
            .vm
            .wait_used(p::TX_QUEUE, WAIT)
            .expect("tx completions go on while the broker is away");
        done.push(split_status(&used, 0));
        in_flight -= 1;
        if done.len() == kill_at {
            r.kill_broker();
        }
        if done.len() == restart_at {
            r.restart_broker();
        }
        if let Some(chunk) = chunks.next() {
            tx_submit(&mut r.rig.vm, 0, chunk);
            in_flight += 1;
        }
    }
    let took = started.elapsed();
    assert_eq!(done.len(), periods);
    assert!(
        done.iter().all(|c| c.status == 0x8000),
        "the guest never sees the broker go: {:?}",
        done.iter().map(|c| c.status).collect::<Vec<_>>()
    );
    // Never early: buffer i ends (i + 1) periods after START at the earliest.
    for (i, c) in done.iter().enumerate() {
        let earliest = params.period() * (i as u32 + 1);
        assert!(
            c.at - started + Duration::from_millis(1) >= earliest,
            "buffer {i} completed {:?} after START, before {earliest:?}",
            c.at - started
        );
    }
    // And never stalled: the gap costs at most the periods that were in flight, replayed.
    let audio = params.period() * periods as u32;
    assert!(
        took < audio + Duration::from_millis(400),
        "2 s of audio took {took:?}"
    );
    assert_eq!(control(&mut r.rig.vm, &pcm(p::R_PCM_STOP, 0)), 0x8000);
    assert_eq!(control(&mut r.rig.vm, &pcm(p::R_PCM_RELEASE, 0)), 0x8000);
    // The new broker got the stream back and played the rest of the guest's audio, bit-exact;
    // the worker retries at least every 200 ms, and the new broker takes a moment to start.
    let after = wav_s16_bytes(&r.rig.path("after-1.wav"));
    assert!(
        after.len() >= period * (periods - restart_at - 40),
        "only {} bytes reached the new broker",
        after.len()
    );
    assert!(
        aligned_slice_of(&after, &data, period),
        "what the new broker played is not the guest's audio from a period on"
    );
    assert!(data.ends_with(&after), "the new broker played to the end");
    assert!(r.rig.worker.is_running());
    assert_eq!(r.rig.worker.pid(), worker_pid);
}

#[test]
fn capture_goes_on_in_silence_while_the_broker_is_away() {
    let mut r = Restartable::start();
    let params = Params::s16_48k(1);
    let period = params.period_bytes as usize;
    // Never silent, so that silence can only come from the worker's clock.
    let source: Vec<u8> = pattern(period * 400, 9)
        .chunks(2)
        .flat_map(|s| (i16::from_le_bytes([s[0], s[1]]) | 1).to_le_bytes())
        .collect();
    write_wav_s16(&r.rig.path("source.wav"), 2, 48000, &source);
    prepare(&mut r.rig.vm, &params);
    for _ in 0..params.periods {
        rx_submit(&mut r.rig.vm, 1, params.period_bytes);
    }
    let started = Instant::now();
    assert_eq!(control(&mut r.rig.vm, &pcm(p::R_PCM_START, 1)), 0x8000);
    let count = 150;
    let (kill_at, restart_at) = (30, 60);
    let mut done = Vec::new();
    while done.len() < count {
        let used = r
            .rig
            .vm
            .wait_used(p::RX_QUEUE, WAIT)
            .expect("rx completions go on while the broker is away");
        done.push(split_status(&used, period));
        if done.len() == kill_at {
            r.kill_broker();
        }
        if done.len() == restart_at {
            r.restart_broker();
        }
        rx_submit(&mut r.rig.vm, 1, params.period_bytes);
    }
    assert!(done.iter().all(|c| c.status == 0x8000));
    for (i, c) in done.iter().enumerate() {
        assert_eq!(c.data.len(), period, "rx {i} is full");
        let earliest = params.period() * (i as u32 + 1);
        assert!(
            c.at - started + Duration::from_millis(1) >= earliest,
            "rx {i} completed before its frames could exist"
        );
    }
    let silent = |c: &Completion| c.data.iter().all(|&b| b == 0);
    let gap: Vec<usize> = (0..count).filter(|&i| silent(&done[i])).collect();
    assert!(
        gap.len() >= 20,
        "about 30 periods of silence while the broker was away: {gap:?}"
    );
    assert!(gap
        .iter()
        .all(|&i| i + 1 >= kill_at - params.periods as usize));
    // After the restart the new broker's capture comes through again.
    let last_silent = *gap.last().unwrap();
    let resumed: Vec<u8> = done[last_silent + 2..]
        .iter()
        .flat_map(|c| c.data.clone())
        .collect();
    assert!(resumed.len() >= period * 50, "capture resumed");
    assert!(
        aligned_slice_of(&resumed, &source, 4),
        "capture after the restart is the new broker's source, frame for frame"
    );
}

#[test]
fn prepare_during_a_short_gap_succeeds_and_a_long_gap_is_reported() {
    let mut r = Restartable::start();
    let params = Params::s16_48k(0);
    assert_eq!(control(&mut r.rig.vm, &params.request()), 0x8000);
    r.kill_broker();
    // Within the guest's 1 s control timeout of the loss: served on the worker's clock.
    assert_eq!(control(&mut r.rig.vm, &pcm(p::R_PCM_PREPARE, 0)), 0x8000);
    let data = pattern(params.period_bytes as usize * 10, 3);
    let (started, done) = play(&mut r.rig.vm, &params, &data);
    assert!(done.iter().all(|c| c.status == 0x8000));
    assert!(done.last().unwrap().at - started >= params.period() * 10 - Duration::from_millis(1));
    assert_eq!(control(&mut r.rig.vm, &pcm(p::R_PCM_STOP, 0)), 0x8000);
    assert_eq!(control(&mut r.rig.vm, &pcm(p::R_PCM_RELEASE, 0)), 0x8000);
    // Long after the loss, with no broker: the guest is told.
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(control(&mut r.rig.vm, &pcm(p::R_PCM_PREPARE, 0)), 0x8003);
    // A broker comes back: the next PREPARE reaches it, and the audio too.
    r.restart_broker();
    let deadline = Instant::now() + Duration::from_secs(5);
    while control(&mut r.rig.vm, &pcm(p::R_PCM_PREPARE, 0)) != 0x8000 {
        assert!(Instant::now() < deadline, "the worker reconnected");
        std::thread::sleep(Duration::from_millis(100));
    }
    let data = pattern(params.period_bytes as usize * 10, 4);
    let (_, done) = play(&mut r.rig.vm, &params, &data);
    assert!(done.iter().all(|c| c.status == 0x8000));
    assert_eq!(control(&mut r.rig.vm, &pcm(p::R_PCM_STOP, 0)), 0x8000);
    assert_eq!(control(&mut r.rig.vm, &pcm(p::R_PCM_RELEASE, 0)), 0x8000);
    assert!(wav_s16_bytes(&r.rig.path("after-1.wav")) == data);
}

#[test]
fn two_vms_both_come_back_after_a_broker_restart() {
    let mut r = Restartable::start();
    let (_worker_b, socket_b) = spawn_worker(
        r.rig.dir.path(),
        "vm-b",
        &r.rig.broker_socket,
        Some(&r.rig.dir.path().join("before.toml")),
    );
    let mut vm_b = common::frontend::GuestVm::connect(&socket_b, FrontendOptions::default())
        .expect("connect to the second worker");
    let params = Params::s16_48k(0);
    let period = params.period_bytes as usize;
    let periods = 120;
    let data: Vec<Vec<u8>> = (0..2)
        .map(|vm| pattern(period * periods, 20 + vm))
        .collect();
    let mut vms = [&mut r.rig.vm, &mut vm_b];
    let mut chunks: Vec<_> = data.iter().map(|d| d.chunks(period)).collect();
    for (vm, chunks) in vms.iter_mut().zip(&mut chunks) {
        prepare(vm, &params);
        for chunk in chunks.by_ref().take(params.periods as usize) {
            tx_submit(vm, 0, chunk);
        }
        assert_eq!(control(vm, &pcm(p::R_PCM_START, 0)), 0x8000);
    }
    let mut completed = [0usize; 2];
    let mut restarted = false;
    while completed.iter().any(|&n| n < periods) {
        for (i, vm) in vms.iter_mut().enumerate() {
            while let Some(used) = vm.try_used(p::TX_QUEUE) {
                assert_eq!(split_status(&used, 0).status, 0x8000, "VM {i}");
                completed[i] += 1;
                if let Some(chunk) = chunks[i].next() {
                    tx_submit(vm, 0, chunk);
                }
            }
        }
        if completed[0] == 30 && !restarted {
            let _ = r.rig.broker.child.kill();
            let _ = r.rig.broker.child.wait();
            let config = wav_config(r.rig.dir.path(), "after");
            r.rig.broker = spawn_broker(r.rig.dir.path(), Some(&config)).0;
            restarted = true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    for vm in vms.iter_mut() {
        assert_eq!(control(vm, &pcm(p::R_PCM_STOP, 0)), 0x8000);
        assert_eq!(control(vm, &pcm(p::R_PCM_RELEASE, 0)), 0x8000);
    }
    // Each VM's worker is a client of the new broker again: its file holds the end of that
    // VM's audio, and no other VM's.
    let mut matched = [false; 2];
    for client in 1..=2 {
        let after = wav_s16_bytes(&r.rig.path(&format!("after-{client}.wav")));
        assert!(
            after.len() >= period * 40,
            "client {client} played too little"
        );
        let vm = (0..2)
            .find(|&vm| data[vm].ends_with(&after))
            .unwrap_or_else(|| panic!("after-{client}.wav is no VM's audio"));
        matched[vm] = true;
    }
    assert_eq!(matched, [true, true], "both VMs came back");
}

#[test]
fn a_broker_restart_before_the_vmm_set_up_memory_neither_spins_nor_strands_the_worker() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let config = wav_config(dir.path(), "before");
    let (mut broker, broker_socket) = spawn_broker(dir.path(), Some(&config));
    let (mut worker, socket) = spawn_worker(dir.path(), "vm", &broker_socket, Some(&config));
    // A VMM that connected and asked for features, but has not set up guest memory yet.
    let mut vmm = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    let get_features: Vec<u8> = [1u32, 1, 0].iter().flat_map(|w| w.to_le_bytes()).collect();
    vmm.write_all(&get_features).unwrap();
    let mut reply = [0u8; 20];
    vmm.set_read_timeout(Some(WAIT)).unwrap();
    vmm.read_exact(&mut reply).unwrap();
    let _ = broker.child.kill();
    let _ = broker.child.wait();
    std::thread::sleep(Duration::from_millis(200));
    // The link's events are served without guest memory, so its epoll does not stay readable.
    let cpu_before = cpu_time(worker.pid());
    std::thread::sleep(Duration::from_secs(1));
    let spent = cpu_time(worker.pid()) - cpu_before;
    assert!(
        spent < Duration::from_millis(200),
        "the worker spun while its broker was away: {spent:?} of CPU in 1 s"
    );
    // A new broker: the worker reconnects (its Hello makes the broker count a worker).
    let (_broker, _) = spawn_broker(dir.path(), Some(&config));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let sockets = std::fs::read_dir(format!("/proc/{}/fd", worker.pid()))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|target| target.to_string_lossy().starts_with("socket:"))
            .count();
        // The vhost-user connection and the broker channel (the listener is closed).
        if sockets >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the worker did not reconnect");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(worker.is_running());
    drop(vmm);
}

#[test]
fn buffers_in_flight_complete_when_the_broker_dies_and_the_guest_queues_nothing_more() {
    let mut r = Restartable::start();
    let params = Params::s16_48k(0);
    prepare(&mut r.rig.vm, &params);
    let data = pattern(params.period_bytes as usize * params.periods as usize, 5);
    for chunk in data.chunks(params.period_bytes as usize) {
        tx_submit(&mut r.rig.vm, 0, chunk);
    }
    let started = Instant::now();
    assert_eq!(control(&mut r.rig.vm, &pcm(p::R_PCM_START, 0)), 0x8000);
    let first = r.rig.vm.wait_used(p::TX_QUEUE, WAIT).expect("first period");
    assert_eq!(split_status(&first, 0).status, 0x8000);
    r.kill_broker();
    // No kick from the guest from here on: only the worker's own clock can complete these.
    let killed = Instant::now();
    for i in 1..params.periods {
        let used =
            r.rig.vm.wait_used(p::TX_QUEUE, WAIT).unwrap_or_else(|| {
                panic!("period {i} in flight when the broker died never completed")
            });
        assert_eq!(split_status(&used, 0).status, 0x8000);
        assert!(
            started.elapsed() + Duration::from_millis(1) >= params.period() * (i + 1),
            "period {i} completed early"
        );
    }
    // Replayed from the loss at most: the three left take three periods, plus the detection.
    let took = killed.elapsed();
    assert!(
        took < params.period() * (params.periods - 1) + Duration::from_millis(200),
        "the buffers in flight took {took:?}"
    );
}
