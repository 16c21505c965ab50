//! Drift at Android's 5.5 ms periods: 60 s of 48 kHz S16 stereo in 264-frame (1056-byte) tx
//! buffers through the worker and broker into the `null` backend (paced by the broker's timer
//! thread at the real-time rate), each buffer's completion time taken by an in-process guest.
//! The played rate is the slope of a least-squares line through (frames completed, completion
//! time); its error against 48000 Hz is the drift (goal: below 0.01 %), printed with the worst
//! deviation of a completion from that line (the jitter a guest sees).
//!
//! `cargo bench --bench drift` (VSOUND_DRIFT_S=N for another length). Under `cargo test` it
//! only says so: it is a measurement, not a test.

#[path = "../tests/common/mod.rs"]
mod common;

use common::frontend::FrontendOptions;
use common::vsound::*;
use virtio_snd::protocol as p;

const RATE: f64 = 48_000.0;
const PERIOD_FRAMES: u32 = 264;
const FRAME_BYTES: u32 = 4;

/// One stereo S16 48 kHz bus on the null backend, buffers up to 16 periods.
fn config() -> String {
    "[[streams]]\nname = \"media\"\ndirection = \"output\"\nbackend = \"null\"\n\
     formats = [\"S16\"]\nrates = [48000]\nchannels_min = 2\nchannels_max = 2\n"
        .to_string()
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("drift benchmark: run with `cargo bench --bench drift`");
        return;
    }
    let seconds: u32 = std::env::var("VSOUND_DRIFT_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let mut rig = Rig::start(Some(&config()), FrontendOptions::default());
    // 16 periods in flight (the most Linux uses): a guest that is late to queue (this
    // process, at normal priority) must not underrun the stream, or the drift measured would
    // be the guest's lateness, not the device's clock.
    let params = Params {
        period_bytes: PERIOD_FRAMES * FRAME_BYTES,
        periods: 16,
        ..Params::s16_48k(0)
    };
    prepare(&mut rig.vm, &params);
    let periods = (f64::from(seconds) * RATE / f64::from(PERIOD_FRAMES)).ceil() as usize;
    let data = vec![0u8; periods * params.period_bytes as usize];
    let (started, done) = play(&mut rig.vm, &params, &data);
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_STOP, 0)), 0x8000, "STOP");
    assert!(done.iter().all(|c| c.status == 0x8000), "a buffer failed");

    // (frames completed so far, seconds since START) for each completion; the first periods
    // (the ring's lookahead filling) are left out of the fit.
    let skip = 16.min(done.len() / 4);
    let points: Vec<(f64, f64)> = done
        .iter()
        .enumerate()
        .skip(skip)
        .map(|(i, c)| {
            let frames = f64::from(PERIOD_FRAMES) * (i + 1) as f64;
            (frames, (c.at - started).as_secs_f64())
        })
        .collect();
    let n = points.len() as f64;
    let (mean_x, mean_y) = (
        points.iter().map(|p| p.0).sum::<f64>() / n,
        points.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let sxy: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    let seconds_per_frame = sxy / sxx;
    let rate = 1.0 / seconds_per_frame;
    let intercept = mean_y - seconds_per_frame * mean_x;
    let worst = points
        .iter()
        .map(|p| (p.1 - (intercept + seconds_per_frame * p.0)).abs())
        .fold(0.0, f64::max);
    let error = (rate - RATE) / RATE * 100.0;
    println!(
        "drift at 264-frame periods: {} buffers over {:.1} s: played rate {rate:.3} Hz, \
         error {error:+.5} % (goal: |error| < 0.01 %), worst completion {:.2} ms off the line",
        done.len(),
        (done.last().unwrap().at - started).as_secs_f64(),
        worst * 1000.0
    );
}
