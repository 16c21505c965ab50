//! Scaling to 16 streams: two VMs with 8 playback buses each (an AAOS layout) play 48 kHz S16
//! stereo at 10 ms periods into a private, headless PipeWire daemon through one broker, driven
//! by in-process guests that kick only when the device asks (as Linux's driver does). Prints
//! the host CPU seconds per audio second of the broker and the workers, and per stream, at 1,
//! 4 and 16 streams, with what each stream beyond the first adds (goal: that flat within
//! 20 %, so the cost is linear), and their wake-ups.
//!
//! `cargo bench --bench streams` (VSOUND_STREAMS_S=N for another phase length). Under `cargo
//! test` it only says so: it is a measurement, not a test.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::frontend::{FrontendOptions, GuestVm};
use common::pipewire::PipeWire;
use common::vsound::*;
use virtio_snd::protocol as p;

const BUSES: u32 = 8;
const PERIODS_IN_FLIGHT: usize = 4;

fn layout() -> String {
    (0..BUSES)
        .map(|bus| {
            format!(
                "[[streams]]\nname = \"bus{bus}\"\ndirection = \"output\"\nbackend = \
                 \"pipewire\"\nformats = [\"S16\"]\nrates = [48000]\nchannels_min = 2\n\
                 channels_max = 2\ntarget_object = \"vsound-test-sink\"\n"
            )
        })
        .collect()
}

/// Plays silence on `streams` of one VM for `periods` periods each, 4 in flight per stream,
/// re-queued as they complete, as the guest driver does.
fn play_streams(vm: &mut GuestVm, streams: &[u32], periods: usize) {
    let data = vec![0u8; 1920];
    let mut owner: HashMap<u16, usize> = HashMap::new();
    let mut submitted = vec![0usize; streams.len()];
    let mut completed = vec![0usize; streams.len()];
    for (i, &stream) in streams.iter().enumerate() {
        prepare(vm, &Params::s16_48k(stream));
        for _ in 0..PERIODS_IN_FLIGHT {
            owner.insert(tx_submit(vm, stream, &data), i);
            submitted[i] += 1;
        }
    }
    for &stream in streams {
        assert_eq!(control(vm, &pcm(p::R_PCM_START, stream)), 0x8000, "START");
    }
    while completed.iter().any(|&n| n < periods) {
        let used = vm
            .wait_used(p::TX_QUEUE, Duration::from_secs(5))
            .expect("a tx completion within 5 s");
        let i = owner.remove(&used.head).expect("a head this guest queued");
        assert_eq!(split_status(&used, 0).status, 0x8000, "a buffer failed");
        completed[i] += 1;
        if submitted[i] < periods {
            owner.insert(tx_submit(vm, streams[i], &data), i);
            submitted[i] += 1;
        }
    }
    for &stream in streams {
        assert_eq!(control(vm, &pcm(p::R_PCM_STOP, stream)), 0x8000, "STOP");
        assert_eq!(
            control(vm, &pcm(p::R_PCM_RELEASE, stream)),
            0x8000,
            "RELEASE"
        );
    }
}

struct Usage {
    at: Instant,
    cpu: Vec<Duration>,
    switches: Vec<u64>,
}

fn usage(pids: &[u32]) -> Usage {
    Usage {
        at: Instant::now(),
        cpu: pids.iter().map(|&p| cpu_time_precise(p)).collect(),
        switches: pids.iter().map(|&p| context_switches(p)).collect(),
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("streams benchmark: run with `cargo bench --bench streams`");
        return;
    }
    let seconds: u64 = std::env::var("VSOUND_STREAMS_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    let dir = tempfile::tempdir().unwrap();
    let pw = PipeWire::start(dir.path());
    let config = dir.path().join("vsound.toml");
    std::fs::write(&config, layout()).unwrap();
    let (broker, broker_socket) = spawn_broker_with_env(dir.path(), Some(&config), &pw.env());
    let opts = FrontendOptions {
        event_idx: true,
        driver_kicks: true,
        queue_size: 256,
        ..FrontendOptions::default()
    };
    let mut workers = Vec::new();
    let mut vms = Vec::new();
    for name in ["vma", "vmb"] {
        let (worker, socket) = spawn_worker(dir.path(), name, &broker_socket, Some(&config));
        vms.push(Some(
            GuestVm::connect(&socket, opts.clone()).expect("connect"),
        ));
        workers.push(worker);
    }
    let pids: Vec<u32> = std::iter::once(broker.pid())
        .chain(workers.iter().map(Proc::pid))
        .collect();

    println!(
        "{:>8} {:>14} {:>14} {:>18} {:>16} {:>16}",
        "streams", "broker CPU", "workers CPU", "CPU per stream", "broker wake/s", "workers wake/s"
    );
    let mut per_stream = Vec::new();
    for (streams_a, streams_b) in [(1u32, 0u32), (4, 0), (BUSES, BUSES)] {
        let periods = (seconds * 100) as usize;
        let handles: Vec<_> = [(0usize, streams_a), (1, streams_b)]
            .into_iter()
            .filter(|&(_, n)| n > 0)
            .map(|(i, n)| {
                let mut vm = vms[i].take().expect("the VM is free");
                let handle = std::thread::spawn(move || {
                    let streams: Vec<u32> = (0..n).collect();
                    play_streams(&mut vm, &streams, periods);
                    vm
                });
                (i, handle)
            })
            .collect();
        // Measured from 1 s in (links made, the graph settled) to 1 s before the end.
        std::thread::sleep(Duration::from_secs(1));
        let start = usage(&pids);
        std::thread::sleep(Duration::from_secs(seconds - 2));
        let end = usage(&pids);
        for (i, handle) in handles {
            vms[i] = Some(handle.join().expect("a guest failed"));
        }
        let wall = (end.at - start.at).as_secs_f64();
        let cpu = |range: std::ops::Range<usize>| -> f64 {
            range
                .map(|k| (end.cpu[k] - start.cpu[k]).as_secs_f64())
                .sum::<f64>()
                / wall
        };
        let wakeups = |range: std::ops::Range<usize>| -> f64 {
            range
                .map(|k| end.switches[k] - start.switches[k])
                .sum::<u64>() as f64
                / wall
        };
        let streams = streams_a + streams_b;
        let (broker_cpu, workers_cpu) = (cpu(0..1), cpu(1..pids.len()));
        let each = (broker_cpu + workers_cpu) / f64::from(streams);
        per_stream.push(each);
        println!(
            "{streams:>8} {broker_cpu:>14.4} {workers_cpu:>14.4} {each:>18.4} {:>16.0} {:>16.0}",
            wakeups(0..1),
            wakeups(1..pids.len())
        );
    }
    // What each stream beyond the first adds: the first pays for the fixed part (the broker's
    // PipeWire cycle, which runs once per quantum for all streams).
    let total: Vec<f64> = per_stream
        .iter()
        .zip([1.0, 4.0, 16.0])
        .map(|(each, n)| each * n)
        .collect();
    let added_4 = (total[1] - total[0]) / 3.0;
    let added_16 = (total[2] - total[0]) / 15.0;
    println!(
        "(CPU: host CPU seconds per audio second.) Each stream beyond the first adds {added_4:.4} \
         (4 streams) and {added_16:.4} (16 streams): {:+.0} % apart (goal: flat within 20 %)",
        (added_16 / added_4 - 1.0) * 100.0
    );
}
