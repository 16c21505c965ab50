//! The GStreamer backend with real GStreamer elements, the broker and worker binaries under
//! their strict sandbox (the default): what the guest plays reaches `wavenc ! filesink`
//! sample for sample and no faster than real time; a `filesrc ! wavparse` of a known signal
//! arrives in the guest's rx buffers sample for sample, at the real-time pace; a description
//! that names a missing element fails its PREPARE (IO_ERR) while another stream plays on; a
//! pipeline that fails once playing keeps its stream at the real-time pace, in silence.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::frontend::{FrontendOptions, GuestVm};
use common::vsound::*;
use virtio_snd::protocol as p;

const IO_ERR: u32 = 0x8003;

/// The pacer's lead at 10 ms periods (two ticks of 5 ms) and one tick of lateness: how far
/// ahead of the clock the ring may be consumed.
const LEAD: Duration = Duration::from_millis(15);

struct GstRig {
    dir: tempfile::TempDir,
    broker: Proc,
    _worker: Proc,
    vm: GuestVm,
    log: PathBuf,
}

impl GstRig {
    /// A broker (logging at info level to `DIR/broker.log`) and a worker with `config`
    /// (`$DIR` replaced by the rig's directory).
    fn start(config: &str, prepare_dir: impl FnOnce(&Path)) -> GstRig {
        let dir = tempfile::tempdir().unwrap();
        prepare_dir(dir.path());
        let path = dir.path().join("vsound.toml");
        std::fs::write(&path, config.replace("$DIR", &dir.path().to_string_lossy())).unwrap();
        let log = dir.path().join("broker.log");
        let env = [("RUST_LOG", PathBuf::from("info"))];
        let (broker, broker_socket) =
            spawn_broker_logging(dir.path(), Some(&path), &env, Some(&log));
        let (worker, socket) = spawn_worker(dir.path(), "vm", &broker_socket, Some(&path));
        let vm = GuestVm::connect(&socket, FrontendOptions::default()).unwrap();
        let rig = GstRig {
            dir,
            broker,
            _worker: worker,
            vm,
            log,
        };
        let log = rig.log_text();
        assert!(
            log.contains("broker: sandbox: ")
                && log.contains("seccomp policies/broker.json")
                && log.contains("Landlock "),
            "the broker is not under its strict sandbox:\n{log}"
        );
        rig
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// STOP and RELEASE of `stream`, both answered OK.
    fn stop_and_release(&mut self, stream: u32) {
        assert_eq!(control(&mut self.vm, &pcm(p::R_PCM_STOP, stream)), 0x8000);
        assert_eq!(
            control(&mut self.vm, &pcm(p::R_PCM_RELEASE, stream)),
            0x8000
        );
    }

    /// The WAV file `name` (of `channels`), once finished, holds `expected` sample for sample;
    /// and the broker still runs.
    fn assert_wav(&mut self, name: &str, channels: u16, expected: &[u8]) {
        let played = finished_wav_of(&self.path(name), expected.len(), channels);
        if let Some(difference) = first_difference(&played, expected) {
            panic!("{name} differs from what it should hold: {difference}");
        }
        self.assert_broker_alive();
    }

    /// The broker still runs (a system call its seccomp policy lacks would have killed it).
    fn assert_broker_alive(&mut self) {
        if let Ok(Some(status)) = self.broker.child.try_wait() {
            panic!("the broker ended ({status:?}):\n{}", self.log_text());
        }
    }
}

impl Drop for GstRig {
    fn drop(&mut self) {
        // VSOUND_TEST_SHOW_LOG=1 shows it for passing tests too.
        if std::thread::panicking() || std::env::var_os("VSOUND_TEST_SHOW_LOG").is_some() {
            eprintln!("--- broker log ---\n{}", self.log_text());
        }
    }
}

/// A WAV file's data once its writer finished it: `wavenc` writes the header's sizes at the
/// pipeline's end of stream, which the broker's pipeline reaches on its own thread after
/// RELEASE.
fn finished_wav_of(path: &Path, expect_bytes: usize, channels: u16) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // Until then its RIFF size is a placeholder, not the file's.
        let bytes = std::fs::read(path).unwrap_or_default();
        let riff = bytes
            .get(4..8)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize);
        if riff.is_some_and(|size| size + 8 == bytes.len()) && bytes.len() >= expect_bytes {
            let reader = hound::WavReader::open(path).unwrap();
            let spec = reader.spec();
            assert_eq!(
                (spec.channels, spec.sample_rate, spec.bits_per_sample),
                (channels, 48000, 16)
            );
            return wav_s16_bytes(path);
        }
        assert!(
            Instant::now() < deadline,
            "{} was not finished with {expect_bytes} bytes of data ({} bytes, RIFF size {riff:?})",
            path.display(),
            bytes.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Bytes of silence (whole S16 stereo frames) before `captured`'s first sound.
fn leading_silence(captured: &[u8]) -> usize {
    captured
        .chunks_exact(4)
        .take_while(|frame| frame.iter().all(|&b| b == 0))
        .count()
        * 4
}

/// Where two S16 signals first differ, sample by sample (`None`: equal).
fn first_difference(got: &[u8], want: &[u8]) -> Option<String> {
    let samples = |b: &[u8]| -> Vec<i16> {
        b.chunks_exact(2)
            .map(|s| i16::from_le_bytes([s[0], s[1]]))
            .collect()
    };
    let (got, want) = (samples(got), samples(want));
    if let Some(i) = (0..got.len().min(want.len())).find(|&i| got[i] != want[i]) {
        return Some(format!(
            "sample {i} (frame {}): got {}, sent {}",
            i / 2,
            got[i],
            want[i]
        ));
    }
    (got.len() != want.len()).then(|| format!("{} samples, sent {}", got.len(), want.len()))
}

/// Every buffer i of `done` completed no earlier than the end of its audio ((i + 1) periods
/// after START) less the pacer's lead: the pipeline's clock paces the stream.
fn assert_paced(started: Instant, done: &[Completion], period: Duration) {
    for (i, c) in done.iter().enumerate() {
        let end = period * (i as u32 + 1);
        let at = c.at - started;
        assert!(
            at + LEAD >= end,
            "buffer {i} completed at {at:?}, before its audio ended at {end:?} less the lead"
        );
    }
}

/// PREPAREs `params`' stream and plays `data` as the driver does: every buffer completes OK,
/// none before its audio's end less the lead. Returns the completions.
fn play_paced(vm: &mut GuestVm, params: &Params, data: &[u8]) -> Vec<Completion> {
    prepare(vm, params);
    play_more_paced(vm, params, data)
}

/// [`play_paced`] on a stream already prepared.
fn play_more_paced(vm: &mut GuestVm, params: &Params, data: &[u8]) -> Vec<Completion> {
    let (started, done) = play(vm, params, data);
    eprintln!(
        "{} periods of {:?} played in {:?}",
        done.len(),
        params.period(),
        done.last().map(|c| c.at - started)
    );
    assert!(done.iter().all(|c| c.status == 0x8000), "tx statuses OK");
    assert_paced(started, &done, params.period());
    done
}

/// PREPAREs `params`' stream and records `count` periods: every buffer completes OK, none
/// before its audio's end less the lead. Returns what was captured.
fn record_paced(vm: &mut GuestVm, params: &Params, count: usize) -> Vec<u8> {
    prepare(vm, params);
    let (started, done) = record(vm, params, count);
    eprintln!(
        "{count} periods of {:?} captured in {:?}",
        params.period(),
        done.last().map(|c| c.at - started)
    );
    assert!(done.iter().all(|c| c.status == 0x8000), "rx statuses OK");
    // Released on the pipeline's clock: never ahead of what real time has captured.
    assert_paced(started, &done, params.period());
    done.iter().flat_map(|c| c.data.iter().copied()).collect()
}

const PLAYBACK: &str = r#"
[[streams]]
name = "media"
direction = "output"
backend = "gstreamer"
gst_pipeline = "wavenc ! filesink location=$DIR/played.wav"
formats = ["S16"]
rates = [48000]
channels_min = 2
channels_max = 2
[[streams]]
name = "broken"
direction = "output"
backend = "gstreamer"
gst_pipeline = "nosuchelement ! fakesink"
formats = ["S16"]
rates = [48000]
channels_min = 2
channels_max = 2
[[streams]]
name = "failing"
direction = "output"
backend = "gstreamer"
gst_pipeline = "fakesink state-error=paused-to-playing"
formats = ["S16"]
rates = [48000]
channels_min = 2
channels_max = 2
"#;

#[test]
fn playback_reaches_wavenc_sample_for_sample_no_faster_than_real_time() {
    let mut rig = GstRig::start(PLAYBACK, |_| {});
    let params = Params::s16_48k(0);
    let data = known_signal(params.period_bytes as usize * 100, 14);
    let done = play_paced(&mut rig.vm, &params, &data);
    // The delay after the ring: what is pushed ahead of the clock (filesink's pipeline has no
    // latency of its own), at most the lead and a buffer.
    let most = done.iter().map(|c| c.latency_bytes).max().unwrap();
    eprintln!("largest latency_bytes {most}");
    assert!(most <= 6 * params.period_bytes, "latency_bytes {most}");
    rig.stop_and_release(0);
    rig.assert_wav("played.wav", 2, &data);
}

#[test]
fn a_stream_stopped_past_its_tail_and_started_again_plays_on_intact() {
    let mut rig = GstRig::start(PLAYBACK, |_| {});
    let params = Params::s16_48k(0);
    let first = known_signal(params.period_bytes as usize * 20, 20);
    let second = known_signal(params.period_bytes as usize * 30, 21);
    play_paced(&mut rig.vm, &params, &first);
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_STOP, 0)), 0x8000);
    // Past the tail (latency, lead and 50 ms): the pipeline pauses.
    std::thread::sleep(Duration::from_millis(300));
    play_more_paced(&mut rig.vm, &params, &second);
    rig.stop_and_release(0);
    rig.assert_wav("played.wav", 2, &[first, second].concat());
}

#[test]
fn a_description_that_does_not_parse_fails_prepare_while_another_stream_plays() {
    let mut rig = GstRig::start(PLAYBACK, |_| {});
    let params = Params::s16_48k(0);
    prepare(&mut rig.vm, &params);
    let count = 60;
    let data = known_signal(params.period_bytes as usize * count, 15);
    let period = params.period_bytes as usize;
    let mut chunks = data.chunks(period);
    for chunk in chunks.by_ref().take(params.periods as usize) {
        tx_submit(&mut rig.vm, 0, chunk);
    }
    let started = Instant::now();
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_START, 0)), 0x8000);
    let mut done = Vec::new();
    let mut in_flight = params.periods as usize;
    let broken = Params::s16_48k(1);
    while in_flight > 0 {
        if done.len() == 20 {
            // Mid-play: the broken stream's PREPARE fails, the media stream goes on.
            assert_eq!(
                control(&mut rig.vm, &broken.request()),
                0x8000,
                "SET_PARAMS"
            );
            let before = Instant::now();
            assert_eq!(
                control(&mut rig.vm, &pcm(p::R_PCM_PREPARE, 1)),
                IO_ERR,
                "PREPARE of a description that does not parse"
            );
            eprintln!("broken PREPARE answered in {:?}", before.elapsed());
        }
        let used = rig.vm.wait_used(p::TX_QUEUE, WAIT).expect("tx completion");
        done.push(split_status(&used, 0));
        in_flight -= 1;
        if let Some(chunk) = chunks.next() {
            tx_submit(&mut rig.vm, 0, chunk);
            in_flight += 1;
        }
    }
    assert!(done.iter().all(|c| c.status == 0x8000));
    assert_paced(started, &done, params.period());
    rig.stop_and_release(0);
    // The other stream's audio is undisturbed.
    rig.assert_wav("played.wav", 2, &data);
    // The broker says which stream and what GStreamer said.
    let log = rig.log_text();
    assert!(
        log.contains("gstreamer stream broken") && log.contains("nosuchelement"),
        "{log}"
    );
    rig.assert_broker_alive();
}

#[test]
fn a_pipeline_that_fails_to_play_keeps_its_stream_at_the_real_time_pace() {
    let mut rig = GstRig::start(PLAYBACK, |_| {});
    let params = Params::s16_48k(2);
    let data = known_signal(params.period_bytes as usize * 40, 16);
    // Its elements open (PREPARE succeeds); the sink refuses PLAYING at START. Not early (the
    // monotonic clock paces the silence) and not hung (the guest waited at most the stall
    // limit, within its patience, for each).
    let done = play_paced(&mut rig.vm, &params, &data);
    for pair in done.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(
            gap < Duration::from_millis(500),
            "a completion waited {gap:?}"
        );
    }
    rig.stop_and_release(2);
    let log = rig.log_text();
    assert!(
        log.contains("vm vm stream failing") && log.contains("in silence"),
        "{log}"
    );
    rig.assert_broker_alive();
}

const SURROUND: &str = r#"
[[streams]]
name = "surround"
direction = "output"
backend = "gstreamer"
gst_pipeline = "wavenc ! filesink location=$DIR/surround.wav"
formats = ["S16"]
rates = [48000]
channels_min = 6
channels_max = 6
"#;

#[test]
fn a_5_1_stream_reaches_wavenc_in_gstreamers_channel_order() {
    let mut rig = GstRig::start(SURROUND, |_| {});
    // The guest's 5.1 is ALSA's order (the default channel map): FL FR RL RR FC LFE.
    let params = Params {
        channels: 6,
        period_bytes: 480 * 12,
        ..Params::s16_48k(0)
    };
    let data = known_signal(params.period_bytes as usize * 30, 19);
    play_paced(&mut rig.vm, &params, &data);
    rig.stop_and_release(0);
    // WAV's (and GStreamer's) order: FL FR FC LFE RL RR; nothing else changes.
    let expected: Vec<u8> = data
        .chunks_exact(12)
        .flat_map(|frame| {
            [0, 1, 4, 5, 2, 3]
                .into_iter()
                .flat_map(move |c| frame[2 * c..2 * c + 2].to_vec())
        })
        .collect();
    rig.assert_wav("surround.wav", 6, &expected);
}

const CAPTURE: &str = r#"
[[streams]]
name = "media"
direction = "output"
backend = "null"
[[streams]]
name = "mic"
direction = "input"
backend = "gstreamer"
gst_pipeline = "filesrc location=$DIR/source.wav ! wavparse"
formats = ["S16"]
rates = [48000]
channels_min = 2
channels_max = 2
"#;

#[test]
fn capture_from_wavparse_arrives_sample_for_sample_at_the_real_time_pace() {
    let params = Params::s16_48k(1);
    let count = 60;
    // Longer than what is recorded; no sample of it is 0, so silence never matches it.
    let source = known_signal(params.period_bytes as usize * (count + 20), 17);
    let mut rig = GstRig::start(CAPTURE, |dir| {
        write_wav_s16(&dir.join("source.wav"), 2, 48000, &source)
    });
    let captured = record_paced(&mut rig.vm, &params, count);
    rig.stop_and_release(1);
    assert_eq!(captured.len(), params.period_bytes as usize * count);
    // Silence may only lead (a pipeline that started later than the stall limit), in whole
    // frames; then the file's signal from its first sample on.
    let lead = leading_silence(&captured);
    eprintln!("{} frames of leading silence", lead / 4);
    assert!(
        lead <= params.period_bytes as usize * 10,
        "{lead} bytes of leading silence"
    );
    let signal = &captured[lead..];
    if let Some(difference) = first_difference(signal, &source[..signal.len()]) {
        panic!(
            "the guest's capture differs from the file after {} frames of silence: {difference}",
            lead / 4
        );
    }
    rig.assert_broker_alive();
}

#[test]
fn capture_past_the_end_of_the_file_is_silence_at_the_real_time_pace() {
    let params = Params::s16_48k(1);
    let count = 50;
    // Shorter than what is recorded: all of it, then silence.
    let source = known_signal(params.period_bytes as usize * 30, 18);
    let mut rig = GstRig::start(CAPTURE, |dir| {
        write_wav_s16(&dir.join("source.wav"), 2, 48000, &source)
    });
    let captured = record_paced(&mut rig.vm, &params, count);
    let lead = leading_silence(&captured);
    let signal = &captured[lead..lead + source.len()];
    if let Some(difference) = first_difference(signal, &source) {
        panic!("the file's end was not captured whole: {difference}");
    }
    assert!(
        captured[lead + source.len()..].iter().all(|&b| b == 0),
        "not silence after the file's end"
    );
    assert!(rig.log_text().contains("the source ended"));
    rig.stop_and_release(1);
    rig.assert_broker_alive();
}

const CONVERTING: &str = r#"
[[streams]]
name = "converted"
direction = "output"
backend = "gstreamer"
gst_pipeline = "capsfilter caps=audio/x-raw,format=F32LE,rate=44100 ! volume volume=0.5 ! fakesink sync=true"
formats = ["S16"]
rates = [48000]
channels_min = 2
channels_max = 2
"#;

/// A description that makes audioconvert, audioresample and volume really work (S16 48 kHz to
/// F32 44.1 kHz, a gain): ORC would compile their kernels into executable memory, which the
/// broker's seccomp policy kills; with its C fallbacks the stream plays at its pace under the
/// strict sandbox.
#[test]
fn a_converting_pipeline_plays_at_its_pace_under_the_strict_sandbox() {
    let mut rig = GstRig::start(CONVERTING, |_| {});
    let params = Params::s16_48k(0);
    let data = known_signal(params.period_bytes as usize * 30, 3);
    play_paced(&mut rig.vm, &params, &data);
    rig.stop_and_release(0);
    rig.assert_broker_alive();
}
