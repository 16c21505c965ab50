//! Ring throughput against plain memcpy on this machine.
//!
//! `cargo bench --bench ring` prints, for period-sized chunks (5.5 ms and 10 ms of 48 kHz S16
//! stereo, and 64 KiB), the bytes per second through a sealed memfd ring (push by the producer,
//! pop by the consumer, both mappings of one memfd as between worker and broker) on one thread
//! and across two threads, and plain `copy_from_slice` of the same chunks in and out of a
//! buffer. Under `cargo test`
//! it runs a few iterations only, as a smoke test.

use std::hint::black_box;
use std::time::{Duration, Instant};

use vsound_shared::ring::{Consumer, Producer, SharedRing};

const CAPACITY: u64 = 256 * 1024;

fn pair() -> (Producer, Consumer) {
    let (ring, fd) = SharedRing::create(CAPACITY).expect("create ring");
    let peer = SharedRing::open(fd, CAPACITY).expect("open ring");
    (Producer::new(ring), Consumer::new(peer))
}

/// Bytes per second of `run(total)`, which moves `total` bytes.
fn rate(total: u64, run: impl FnOnce()) -> f64 {
    let start = Instant::now();
    run();
    total as f64 / start.elapsed().as_secs_f64()
}

fn ring_one_thread(chunk: usize, total: u64) -> f64 {
    let (mut producer, mut consumer) = pair();
    let data = vec![0x5au8; chunk];
    let mut out = vec![0u8; chunk];
    rate(total, || {
        let mut moved = 0;
        while moved < total {
            assert!(producer.push(&data).unwrap(), "ring full");
            let n = consumer.pop(&mut out).unwrap();
            black_box(&out);
            moved += n as u64;
        }
    })
}

fn ring_two_threads(chunk: usize, total: u64) -> f64 {
    let (mut producer, mut consumer) = pair();
    rate(total, || {
        let writer = std::thread::spawn(move || {
            let data = vec![0x5au8; chunk];
            let mut pushed = 0;
            while pushed < total {
                if producer.free().unwrap() >= chunk as u64 {
                    producer.push(&data).unwrap();
                    pushed += chunk as u64;
                } else {
                    std::hint::spin_loop();
                }
            }
        });
        let mut out = vec![0u8; chunk];
        let mut popped = 0;
        while popped < total {
            let n = consumer.pop(&mut out).unwrap();
            black_box(&out);
            popped += n as u64;
        }
        writer.join().unwrap();
    })
}

/// The baseline: the same chunks copied in and out of a middle buffer, as a ring copies them
/// (offset by a cache line, so that source and destination do not alias on 4 KiB boundaries).
fn memcpy(chunk: usize, total: u64) -> f64 {
    let data = vec![0x5au8; chunk];
    let mut middle = vec![0u8; chunk + 64];
    let mut out = vec![0u8; chunk];
    rate(total, || {
        let mut moved = 0;
        while moved < total {
            middle[64..].copy_from_slice(black_box(&data));
            out.copy_from_slice(black_box(&middle[64..]));
            black_box(&out);
            moved += chunk as u64;
        }
    })
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let total: u64 = if full { 4 << 30 } else { 4 << 20 };
    println!(
        "{:>10} {:>16} {:>16} {:>16} {:>12}",
        "chunk", "ring 1 thread", "ring 2 threads", "memcpy", "ring/memcpy"
    );
    for chunk in [1056usize, 1920, 65536] {
        let one = ring_one_thread(chunk, total);
        let two = ring_two_threads(chunk, total);
        let copy = memcpy(chunk, total);
        let gib = |r: f64| format!("{:.2} GiB/s", r / (1u64 << 30) as f64);
        println!(
            "{:>10} {:>16} {:>16} {:>16} {:>11.2}x",
            chunk,
            gib(one),
            gib(two),
            gib(copy),
            one / copy
        );
    }
    // 48 kHz S16 stereo is 192000 B/s: how many such streams one core's ring path could carry.
    let one = ring_one_thread(1920, total);
    println!(
        "one core moves {:.0} streams of 48 kHz S16 stereo through rings ({:?} per 10 ms period)",
        one / 192_000.0,
        Duration::from_secs_f64(1920.0 / one)
    );
}
