//! The worker and broker binaries driven by an in-process vhost-user frontend (the guest's side),
//! over real virtqueues in shared memfd guest memory.

mod common;

use std::time::{Duration, Instant};

use common::frontend::{FrontendOptions, GuestVm, RawDesc};
use common::vsound::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_snd::guest::MAX_SEGMENTS;
use virtio_snd::protocol as p;

const WAV_CONFIG: &str = r#"
[[streams]]
name = "media"
direction = "output"
backend = "wav"
wav_path = "$DIR/played-{client}.wav"
formats = ["S16"]
rates = [48000]
[[streams]]
name = "mic"
direction = "input"
backend = "wav"
wav_path = "$DIR/source.wav"
formats = ["S16"]
rates = [48000]
"#;

#[test]
fn probe_sees_the_configured_device() {
    let mut rig = Rig::start(None, FrontendOptions::default());
    let config = rig.vm.get_config(0, 12).unwrap();
    // One jack, two streams, twelve channel maps.
    assert_eq!(config, [1, 0, 0, 0, 2, 0, 0, 0, 12, 0, 0, 0]);
    // A VMM with VIRTIO 1.3 headers reads 16 bytes: controls must read as 0.
    assert_eq!(rig.vm.get_config(0, 16).unwrap()[12..], [0, 0, 0, 0]);
    let features = rig.vm.offered_features();
    assert_ne!(features & (1 << 32), 0, "VIRTIO_F_VERSION_1");

    let resp = rig
        .vm
        .request(p::CONTROL_QUEUE, &query(p::R_JACK_INFO, 0, 1, 24), 28);
    assert_eq!(status_of(&resp), 0x8000);
    let resp = rig
        .vm
        .request(p::CONTROL_QUEUE, &query(p::R_PCM_INFO, 0, 2, 32), 68);
    assert_eq!(status_of(&resp), 0x8000);
    let out: p::PcmInfo = p::read_prefix(&resp[4..]).unwrap();
    let input: p::PcmInfo = p::read_prefix(&resp[36..]).unwrap();
    assert_eq!((out.direction, input.direction), (p::D_OUTPUT, p::D_INPUT));
    // The default config on the null backend: every format with a sample size, every rate
    // the Linux driver maps, 1 to 8 channels.
    let want_formats = (0..=p::format::MAX)
        .filter(|&f| p::sample_bytes(f).is_some())
        .fold(0u64, |m, f| m | (1 << f));
    for info in [out, input] {
        assert_eq!(info.formats.get(), want_formats);
        assert_eq!(info.rates.get(), (1 << (p::rate::R384000 + 1)) - 1);
        assert_eq!((info.channels_min, info.channels_max), (1, 8));
    }
    // Mono, stereo, 2.1, quad, 5.1 and 7.1 for each direction.
    let resp = rig.vm.request(
        p::CONTROL_QUEUE,
        &query(p::R_CHMAP_INFO, 0, 12, 24),
        4 + 12 * 24,
    );
    assert_eq!(status_of(&resp), 0x8000);
    use p::chmap::*;
    let layouts: [&[u8]; 6] = [
        &[MONO],
        &[FL, FR],
        &[FL, FR, LFE],
        &[FL, FR, RL, RR],
        &[FL, FR, RL, RR, FC, LFE],
        &[FL, FR, RL, RR, FC, LFE, SL, SR],
    ];
    for (i, chunk) in resp[4..].chunks(24).enumerate() {
        let chmap: p::ChmapInfo = p::read_prefix(chunk).unwrap();
        let (direction, layout) = (if i < 6 { p::D_OUTPUT } else { p::D_INPUT }, layouts[i % 6]);
        assert_eq!(chmap.direction, direction, "chmap {i}");
        assert_eq!(
            &chmap.positions[..usize::from(chmap.channels)],
            layout,
            "chmap {i}"
        );
    }
}

/// Every rate, format and channel count the default config offers is accepted by SET_PARAMS
/// (with the Linux driver's largest buffer for it, 160 ms), and a PREPARE, START and a played
/// period work for each rate, each format and each channel count.
#[test]
fn every_offered_combination_is_accepted() {
    let mut rig = Rig::start(None, FrontendOptions::default());
    let formats: Vec<u8> = (0..=p::format::MAX)
        .filter(|&f| p::sample_bytes(f).is_some())
        .collect();
    let rates: Vec<u8> = (p::rate::R5512..=p::rate::R384000).collect();
    let mut accepted = 0;
    for &format in &formats {
        for &rate in &rates {
            for channels in 1..=8u8 {
                let params = driver_params(format, rate, channels);
                let status = control(&mut rig.vm, &params.request());
                assert_eq!(status, 0x8000, "SET_PARAMS {params:?}");
                accepted += 1;
            }
        }
    }
    println!("{accepted} combinations accepted by SET_PARAMS");
    // Each rate, each format, each channel count played once: 129 PREPARE, START and STOP,
    // past the broker's burst, so the later ones wait for their tokens (none fails).
    let mut played = Vec::new();
    played.extend(rates.iter().map(|&r| driver_params(p::format::S16, r, 2)));
    played.extend(
        formats
            .iter()
            .map(|&f| driver_params(f, p::rate::R48000, 2)),
    );
    played.extend((1..=8).map(|c| driver_params(p::format::S16, p::rate::R48000, c)));
    played.push(driver_params(p::format::FLOAT64, p::rate::R384000, 8));
    for params in played {
        assert_eq!(
            control(&mut rig.vm, &params.request()),
            0x8000,
            "{params:?}"
        );
        assert_eq!(
            control(&mut rig.vm, &pcm(p::R_PCM_PREPARE, 0)),
            0x8000,
            "{params:?}"
        );
        let period = vec![0u8; params.period_bytes as usize];
        tx_submit(&mut rig.vm, 0, &period);
        assert_eq!(
            control(&mut rig.vm, &pcm(p::R_PCM_START, 0)),
            0x8000,
            "{params:?}"
        );
        let used = rig
            .vm
            .wait_used(p::TX_QUEUE, Duration::from_secs(2))
            .unwrap_or_else(|| panic!("no completion at {params:?}"));
        assert_eq!(split_status(&used, 0).status, 0x8000, "{params:?}");
        assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_STOP, 0)), 0x8000);
        assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_RELEASE, 0)), 0x8000);
    }
}

/// What the Linux driver asks for at `format`, `rate`, `channels`: its largest buffer (160 ms)
/// in periods of 10 ms, rounded to whole frames.
fn driver_params(format: u8, rate: u8, channels: u8) -> Params {
    let frame = p::sample_bytes(format).unwrap() * u32::from(channels);
    let hz = p::rate_hz(rate).unwrap();
    let period_frames = (hz / 100).max(1);
    Params {
        stream: 0,
        channels,
        format,
        rate,
        period_bytes: period_frames * frame,
        periods: 16,
        features: 0,
    }
}

#[test]
fn playback_reaches_the_wav_file_intact() {
    let mut rig = Rig::start(Some(WAV_CONFIG), FrontendOptions::default());
    let params = Params::s16_48k(0);
    prepare(&mut rig.vm, &params);
    let data = pattern(params.period_bytes as usize * 40, 1);
    let (_, done) = play(&mut rig.vm, &params, &data);
    assert_eq!(done.len(), 40);
    assert!(
        done.iter().all(|c| c.status == 0x8000),
        "all tx statuses OK"
    );
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_STOP, 0)), 0x8000);
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_RELEASE, 0)), 0x8000);
    let played = wav_s16_bytes(&rig.path("played-1.wav"));
    assert_eq!(played.len(), data.len());
    assert!(played == data, "played samples differ from the guest's");
}

#[test]
fn completions_are_paced_by_the_backend_clock() {
    let mut rig = Rig::start(None, FrontendOptions::default());
    // 5.5 ms periods (ARCVM's 1056 bytes) must not be rounded to whole milliseconds.
    let params = Params {
        period_bytes: 1056,
        periods: 4,
        ..Params::s16_48k(0)
    };
    prepare(&mut rig.vm, &params);
    let count = 60;
    let data = pattern(params.period_bytes as usize * count, 2);
    let (started, done) = play(&mut rig.vm, &params, &data);
    assert_eq!(done.len(), count);
    let period = params.period();
    assert_eq!(period, Duration::from_micros(5500));
    for (i, c) in done.iter().enumerate() {
        // Buffer i ends (i + 1) periods after START: it may never complete before that.
        let earliest = period * (i as u32 + 1);
        let at = c.at - started;
        assert!(
            at + Duration::from_millis(1) >= earliest,
            "buffer {i} completed at {at:?}, before its end at {earliest:?}"
        );
    }
    // latency_bytes is what was queued ahead of the buffer, not its own size.
    // The ring holds 3 periods ahead (the default lookahead).
    assert!(done
        .iter()
        .all(|c| c.latency_bytes <= 3 * params.period_bytes));
    assert!(done
        .iter()
        .skip(4)
        .any(|c| c.latency_bytes >= params.period_bytes));
    assert_eq!(done[0].latency_bytes, 0);
}

#[test]
fn capture_returns_the_source_wav() {
    let dir_config = WAV_CONFIG;
    let mut rig = Rig::start(Some(dir_config), FrontendOptions::default());
    let params = Params::s16_48k(1);
    let source = pattern(params.period_bytes as usize * 30, 3);
    write_wav_s16(&rig.path("source.wav"), 2, 48000, &source);
    prepare(&mut rig.vm, &params);
    let (started, done) = record(&mut rig.vm, &params, 30);
    assert!(done.iter().all(|c| c.status == 0x8000));
    let captured: Vec<u8> = done.iter().flat_map(|c| c.data.iter().copied()).collect();
    assert_eq!(captured.len(), source.len());
    assert!(
        captured == source,
        "captured bytes differ from the source file"
    );
    // An rx buffer is complete only when its period has been captured.
    let last = done.last().unwrap().at - started;
    assert!(
        last + Duration::from_millis(1) >= params.period() * 30,
        "capture too early: {last:?}"
    );
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_STOP, 1)), 0x8000);
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_RELEASE, 1)), 0x8000);
}

#[test]
fn two_workers_share_one_broker() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("vsound.toml");
    std::fs::write(
        &config,
        WAV_CONFIG.replace("$DIR", &dir.path().to_string_lossy()),
    )
    .unwrap();
    let (_broker, broker_socket) = spawn_broker(dir.path(), Some(&config));
    let (_w1, s1) = spawn_worker(dir.path(), "vm1", &broker_socket, Some(&config));
    let (_w2, s2) = spawn_worker(dir.path(), "vm2", &broker_socket, Some(&config));
    let params = Params::s16_48k(0);
    let threads: Vec<_> = [(s1, 10u32), (s2, 20u32)]
        .into_iter()
        .map(|(socket, seed)| {
            std::thread::spawn(move || {
                let mut vm =
                    common::frontend::GuestVm::connect(&socket, FrontendOptions::default())
                        .unwrap();
                prepare(&mut vm, &params);
                let data = pattern(params.period_bytes as usize * 30, seed);
                let (_, done) = play(&mut vm, &params, &data);
                assert!(done.iter().all(|c| c.status == 0x8000));
                assert_eq!(control(&mut vm, &pcm(p::R_PCM_STOP, 0)), 0x8000);
                assert_eq!(control(&mut vm, &pcm(p::R_PCM_RELEASE, 0)), 0x8000);
                data
            })
        })
        .collect();
    let mut inputs: Vec<Vec<u8>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let mut outputs = vec![
        wav_s16_bytes(&dir.path().join("played-1.wav")),
        wav_s16_bytes(&dir.path().join("played-2.wav")),
    ];
    inputs.sort();
    outputs.sort();
    assert!(
        inputs == outputs,
        "each VM's audio must reach its own file intact"
    );
}

#[test]
fn release_completes_every_pending_buffer_first() {
    let mut rig = Rig::start(None, FrontendOptions::default());
    let params = Params::s16_48k(0);
    prepare(&mut rig.vm, &params);
    // More buffers than the ring holds, never started: none may complete on its own.
    for i in 0..6 {
        tx_submit(&mut rig.vm, 0, &pattern(params.period_bytes as usize, i));
    }
    std::thread::sleep(params.period() * 6);
    assert!(
        rig.vm.try_used(p::TX_QUEUE).is_none(),
        "completed before playback"
    );
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_RELEASE, 0)), 0x8000);
    // Completed before the RELEASE answer was written, so they are all there now.
    for _ in 0..6 {
        let used = rig.vm.try_used(p::TX_QUEUE).expect("flushed by RELEASE");
        assert_eq!(split_status(&used, 0).status, 0x8000);
    }
    // Also after STOP.
    prepare(&mut rig.vm, &params);
    let (_, done) = play(
        &mut rig.vm,
        &params,
        &pattern(params.period_bytes as usize * 4, 9),
    );
    assert_eq!(done.len(), 4);
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_STOP, 0)), 0x8000);
    tx_submit(&mut rig.vm, 0, &pattern(params.period_bytes as usize, 5));
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_RELEASE, 0)), 0x8000);
    assert!(rig.vm.try_used(p::TX_QUEUE).is_some());
}

#[test]
fn rx_pending_at_release_is_completed() {
    let mut rig = Rig::start(None, FrontendOptions::default());
    let params = Params::s16_48k(1);
    prepare(&mut rig.vm, &params);
    rx_submit(&mut rig.vm, 1, params.period_bytes);
    rx_submit(&mut rig.vm, 1, params.period_bytes);
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_RELEASE, 1)), 0x8000);
    for _ in 0..2 {
        // The rx kick and the control kick are separate events: if RELEASE was served first,
        // the buffers are refused, also with just a status.
        let used = rig
            .vm
            .wait_used(p::RX_QUEUE, WAIT)
            .expect("flushed by RELEASE");
        assert_eq!(used.len, 8, "nothing captured, just the status");
    }
}

#[test]
fn malformed_control_requests_get_their_status_and_the_device_goes_on() {
    let mut rig = Rig::start(None, FrontendOptions::default());
    let vm = &mut rig.vm;
    let bad = 0x8001;
    let cases: Vec<(Vec<u8>, u32, u32)> = vec![
        (0x7777u32.to_le_bytes().to_vec(), 4, bad), // unknown code
        (vec![0x00, 0x01], 4, bad),                 // short header
        (query(p::R_PCM_INFO, 0, 3, 32), 200, bad), // past the last stream
        (query(p::R_PCM_INFO, u32::MAX, 2, 32), 200, bad), // start_id + count overflows
        (query(p::R_JACK_INFO, 0, u32::MAX, 24), 200, bad), // huge count
        (query(p::R_CHMAP_INFO, 0, 1, u32::MAX), 200, bad), // huge size
        (query(p::R_PCM_INFO, 0, 2, 32), 40, bad),  // response too small
        (pcm(p::R_PCM_PREPARE, 2), 4, bad),         // no such stream
        (pcm(p::R_PCM_START, 0), 4, bad),           // START before params
        (pcm(p::R_PCM_STOP, 0), 4, bad),            // STOP while not running
        (pcm(p::R_PCM_RELEASE, 1), 4, bad),         // RELEASE unprepared
        (
            Params {
                period_bytes: 0,
                ..Params::s16_48k(0)
            }
            .request(),
            4,
            bad,
        ),
        (
            Params {
                periods: 0,
                ..Params::s16_48k(0)
            }
            .request(),
            4,
            bad,
        ),
        (
            Params {
                format: 77,
                ..Params::s16_48k(0)
            }
            .request(),
            4,
            bad,
        ),
        (
            Params {
                rate: 40,
                ..Params::s16_48k(0)
            }
            .request(),
            4,
            bad,
        ),
        (
            Params {
                channels: 9,
                ..Params::s16_48k(0)
            }
            .request(),
            4,
            0x8002,
        ),
        (
            Params {
                format: 0, // IMA_ADPCM: no fixed sample size, never offered
                ..Params::s16_48k(0)
            }
            .request(),
            4,
            0x8002,
        ),
        (
            Params {
                period_bytes: 1 << 20,
                periods: 1000,
                ..Params::s16_48k(0)
            }
            .request(),
            4,
            0x8002,
        ),
        (
            Params {
                features: 1 << p::PCM_F_SHMEM_GUEST,
                ..Params::s16_48k(0)
            }
            .request(),
            4,
            0x8002,
        ),
        (Params::s16_48k(0).request()[..20].to_vec(), 4, bad), // short SET_PARAMS
    ];
    for (req, resp_len, want) in cases {
        let resp = vm.request(p::CONTROL_QUEUE, &req, resp_len);
        assert_eq!(status_of(&resp), want, "request {req:x?}");
    }
    // A request with no room for the status is completed empty.
    let head = vm.submit(p::CONTROL_QUEUE, &[&pcm(p::R_PCM_START, 0)], &[]);
    let used = vm.wait_used(p::CONTROL_QUEUE, WAIT).unwrap();
    assert_eq!((used.head, used.len), (head, 0));
    // Readable after writable: a malformed chain, completed empty.
    let a = vm.alloc_guest(64);
    let head = vm.submit_raw(
        p::CONTROL_QUEUE,
        &[
            RawDesc {
                addr: a,
                len: 4,
                write: true,
            },
            RawDesc {
                addr: a + 16,
                len: 4,
                write: false,
            },
        ],
    );
    vm.kick(p::CONTROL_QUEUE);
    let used = vm.wait_used(p::CONTROL_QUEUE, WAIT).unwrap();
    assert_eq!((used.head, used.len), (head, 0));
    // A descriptor outside guest memory: the request cannot be read, so BAD_MSG.
    let head = vm.submit_raw(
        p::CONTROL_QUEUE,
        &[
            RawDesc {
                addr: 1 << 40,
                len: 8,
                write: false,
            },
            RawDesc {
                addr: a + 32,
                len: 4,
                write: true,
            },
        ],
    );
    vm.kick(p::CONTROL_QUEUE);
    let used = vm.wait_used(p::CONTROL_QUEUE, WAIT).unwrap();
    assert_eq!(used.head, head);
    assert_eq!(status_of(&used.written), bad);
    // A batch: the unknown request in the middle does not stop the others.
    vm.submit_no_kick(p::CONTROL_QUEUE, &[&Params::s16_48k(0).request()], &[4]);
    vm.submit_no_kick(p::CONTROL_QUEUE, &[&0xabcdu32.to_le_bytes()], &[4]);
    vm.submit_no_kick(p::CONTROL_QUEUE, &[&pcm(p::R_PCM_PREPARE, 0)], &[4]);
    vm.kick(p::CONTROL_QUEUE);
    let statuses: Vec<u32> = (0..3)
        .map(|_| status_of(&vm.wait_used(p::CONTROL_QUEUE, WAIT).unwrap().written))
        .collect();
    assert_eq!(statuses, [0x8000, bad, 0x8000]);
    // Still serving: repeated START/STOP get BAD_MSG, the real ones OK.
    assert_eq!(control(vm, &pcm(p::R_PCM_START, 0)), 0x8000);
    assert_eq!(control(vm, &pcm(p::R_PCM_START, 0)), bad);
    assert_eq!(control(vm, &pcm(p::R_PCM_STOP, 0)), 0x8000);
    assert_eq!(control(vm, &pcm(p::R_PCM_STOP, 0)), bad);
    assert!(rig.worker.is_running());
}

#[test]
fn bad_tx_and_rx_buffers_are_completed_with_bad_msg() {
    let mut rig = Rig::start(None, FrontendOptions::default());
    let params = Params::s16_48k(0);
    let period = vec![0u8; params.period_bytes as usize];
    let vm = &mut rig.vm;
    let expect_bad = |vm: &mut common::frontend::GuestVm, queue: u16, payload: usize| {
        let used = vm.wait_used(queue, WAIT).expect("completed");
        let c = split_status(&used, payload);
        assert_eq!(c.status, 0x8001, "queue {queue}: {used:?}");
    };
    // Unprepared stream.
    tx_submit(vm, 0, &period);
    expect_bad(vm, p::TX_QUEUE, 0);
    prepare(vm, &params);
    prepare(vm, &Params::s16_48k(1));
    // tx on the input stream, rx on the output stream, unknown streams.
    tx_submit(vm, 1, &period);
    expect_bad(vm, p::TX_QUEUE, 0);
    tx_submit(vm, 99, &period);
    expect_bad(vm, p::TX_QUEUE, 0);
    for stream in [0, u32::MAX] {
        // The status sits after the frames: read it where the driver would.
        let header = vm.alloc_guest(4);
        vm.write_guest(header, &stream.to_le_bytes());
        let frames = vm.alloc_guest(u64::from(params.period_bytes));
        let status = vm.alloc_guest(8);
        vm.submit_raw(
            p::RX_QUEUE,
            &[
                RawDesc {
                    addr: header,
                    len: 4,
                    write: false,
                },
                RawDesc {
                    addr: frames,
                    len: params.period_bytes,
                    write: true,
                },
                RawDesc {
                    addr: status,
                    len: 8,
                    write: true,
                },
            ],
        );
        vm.kick(p::RX_QUEUE);
        let used = vm.wait_used(p::RX_QUEUE, WAIT).expect("completed");
        assert_eq!(used.len, 8, "no frames, only the status");
        assert_eq!(
            status_of(&vm.read_guest(status, 8)),
            0x8001,
            "rx on stream {stream}"
        );
    }
    // Short header, empty payload, payload larger than the ring.
    vm.submit(p::TX_QUEUE, &[&[0, 0]], &[8]);
    expect_bad(vm, p::TX_QUEUE, 0);
    tx_submit(vm, 0, &[]);
    expect_bad(vm, p::TX_QUEUE, 0);
    tx_submit(vm, 0, &vec![0u8; 1 << 20]);
    expect_bad(vm, p::TX_QUEUE, 0);
    // No room for the status: completed empty.
    vm.submit(p::TX_QUEUE, &[&0u32.to_le_bytes(), &period], &[4]);
    assert_eq!(vm.wait_used(p::TX_QUEUE, WAIT).unwrap().len, 0);
    // Payload outside guest memory.
    let status = vm.alloc_guest(8);
    let header = vm.alloc_guest(4);
    vm.submit_raw(
        p::TX_QUEUE,
        &[
            RawDesc {
                addr: header,
                len: 4,
                write: false,
            },
            RawDesc {
                addr: 1 << 40,
                len: 1920,
                write: false,
            },
            RawDesc {
                addr: status,
                len: 8,
                write: true,
            },
        ],
    );
    vm.kick(p::TX_QUEUE);
    // Queued like a normal buffer (its bytes are unreadable): completed in order with BAD_MSG
    // once played, so the guest's position still advances.
    assert_eq!(control(vm, &pcm(p::R_PCM_START, 0)), 0x8000);
    expect_bad(vm, p::TX_QUEUE, 0);
    // The stream still plays.
    let (_, done) = play_more(vm, &params, 3);
    assert!(done.iter().all(|c| c.status == 0x8000));
    assert!(rig.worker.is_running());
}

/// Plays `count` more periods on an already running stream.
fn play_more(
    vm: &mut common::frontend::GuestVm,
    params: &Params,
    count: usize,
) -> (Instant, Vec<Completion>) {
    let started = Instant::now();
    for i in 0..count {
        tx_submit(
            vm,
            params.stream,
            &pattern(params.period_bytes as usize, i as u32),
        );
    }
    let done = (0..count)
        .map(|_| split_status(&vm.wait_used(p::TX_QUEUE, WAIT).expect("played"), 0))
        .collect();
    (started, done)
}

#[test]
fn held_event_buffers_do_not_spin_the_worker_with_event_idx() {
    let opts = FrontendOptions {
        event_idx: true,
        ..FrontendOptions::default()
    };
    let mut rig = Rig::start(None, opts);
    assert!(
        rig.vm.event_idx(),
        "EVENT_IDX must be offered and negotiated"
    );
    // The driver fills the event queue at probe; the device keeps those buffers.
    for _ in 0..32 {
        rig.vm.submit_no_kick(p::EVENT_QUEUE, &[], &[8]);
    }
    rig.vm.kick(p::EVENT_QUEUE);
    let before = cpu_time(rig.worker.pid());
    let wall = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    let used = cpu_time(rig.worker.pid()) - before;
    // A spinning worker burns a whole core; an idle one almost nothing.
    assert!(
        used < wall.elapsed() / 4,
        "worker used {used:?} of CPU in {:?} while idle",
        wall.elapsed()
    );
    assert!(
        rig.vm.try_used(p::EVENT_QUEUE).is_none(),
        "no event happened"
    );
    // And the control queue is served meanwhile.
    let resp = rig
        .vm
        .request(p::CONTROL_QUEUE, &query(p::R_PCM_INFO, 0, 1, 32), 36);
    assert_eq!(status_of(&resp), 0x8000);
}

/// With EVENT_IDX and INDIRECT_DESC negotiated, a control request and every tx buffer go
/// through indirect tables: the answer spans the table's two writable descriptors, and the
/// played audio is bit-exact.
#[test]
fn playback_works_with_event_idx_and_indirect_descriptors() {
    let opts = FrontendOptions {
        event_idx: true,
        indirect_desc: true,
        ..FrontendOptions::default()
    };
    let mut rig = Rig::start(Some(WAV_CONFIG), opts);
    let offered = rig.vm.offered_features();
    assert_ne!(offered & (1 << 28), 0, "INDIRECT_DESC offered");
    assert!(rig.vm.event_idx(), "EVENT_IDX negotiated");
    assert!(rig.vm.indirect_desc(), "INDIRECT_DESC negotiated");
    let head = rig.vm.submit_indirect(
        p::CONTROL_QUEUE,
        &[&query(p::R_PCM_INFO, 0, 2, 32)],
        &[20, 48],
    );
    let used = rig.vm.wait_used(p::CONTROL_QUEUE, WAIT).expect("answered");
    assert_eq!((used.head, used.len), (head, 68));
    assert_eq!(status_of(&used.written), 0x8000);
    let out: p::PcmInfo = p::read_prefix(&used.written[4..]).unwrap();
    let input: p::PcmInfo = p::read_prefix(&used.written[36..]).unwrap();
    assert_eq!((out.direction, input.direction), (p::D_OUTPUT, p::D_INPUT));

    let params = Params::s16_48k(0);
    prepare(&mut rig.vm, &params);
    let data = pattern(params.period_bytes as usize * 20, 4);
    let (_, done) = play_as(&mut rig.vm, &params, &data, Layout::Indirect);
    assert_eq!(done.len(), 20);
    assert!(done.iter().all(|c| c.status == 0x8000), "{done:?}");
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_STOP, 0)), 0x8000);
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_RELEASE, 0)), 0x8000);
    assert!(wav_s16_bytes(&rig.path("played-1.wav")) == data);
}

/// Every rx buffer through an indirect table: the capture is the source file, bit-exact.
#[test]
fn capture_works_with_indirect_descriptors() {
    let opts = FrontendOptions {
        indirect_desc: true,
        ..FrontendOptions::default()
    };
    let mut rig = Rig::start(Some(WAV_CONFIG), opts);
    assert!(rig.vm.indirect_desc(), "INDIRECT_DESC negotiated");
    let params = Params::s16_48k(1);
    let source = pattern(params.period_bytes as usize * 12, 12);
    write_wav_s16(&rig.path("source.wav"), 2, 48000, &source);
    prepare(&mut rig.vm, &params);
    let (_, done) = record_as(&mut rig.vm, &params, 12, Layout::Indirect);
    assert!(done.iter().all(|c| c.status == 0x8000), "{done:?}");
    let captured: Vec<u8> = done.iter().flat_map(|c| c.data.iter().copied()).collect();
    assert!(
        captured == source,
        "captured bytes differ from the source file"
    );
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_STOP, 1)), 0x8000);
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_RELEASE, 1)), 0x8000);
}

/// Submits malformed indirect tables on `queue`, each built around `good` (the entries of a
/// well-formed request that the device would answer or hold), one at a time. Each must come
/// back at once with a used length of 0 and nothing written into the buffers `good` points at:
/// the device neither held it nor followed it anywhere.
fn malformed_indirect_tables_complete_empty(vm: &mut GuestVm, queue: u16, good: &[RawDesc]) {
    let entries = good.len() as u32;
    // Room for half an entry more than the table holds (see the first case).
    let table = vm.alloc_guest(16 * u64::from(entries) + 8);
    vm.write_indirect_table(table, good);
    let first_flags = if good[0].write {
        VRING_DESC_F_WRITE as u16
    } else {
        0
    };
    // The first entry, then the good table nested as a second one.
    let nested = vm.alloc_guest(32);
    vm.write_desc(
        nested,
        good[0].addr,
        good[0].len,
        first_flags | VRING_DESC_F_NEXT as u16,
        1,
    );
    vm.write_desc(
        nested + 16,
        table,
        16 * entries,
        VRING_DESC_F_INDIRECT as u16,
        0,
    );
    // The first entry chains to an index past the end of its table.
    let past_end = vm.alloc_guest(16 * u64::from(entries));
    vm.write_indirect_table(past_end, good);
    vm.write_desc(
        past_end,
        good[0].addr,
        good[0].len,
        first_flags | VRING_DESC_F_NEXT as u16,
        entries as u16 + 5,
    );
    // More descriptors than the device takes in one chain: writable ones after the good ones.
    let last = *good.last().unwrap();
    assert!(
        last.write,
        "the good request ends with a writable descriptor"
    );
    let mut long_descs = good.to_vec();
    long_descs.resize(MAX_SEGMENTS + 1, last);
    let long = vm.alloc_guest(16 * long_descs.len() as u64);
    vm.write_indirect_table(long, &long_descs);

    let cases = [
        // Rounded down, it would be the good request.
        (
            "a length that is not a multiple of 16",
            table,
            16 * entries + 8,
        ),
        ("an empty table", table, 0),
        ("a table outside guest memory", 1 << 40, 16 * entries),
        ("a table nested in a table", nested, 32),
        (
            "a next index past the end of the table",
            past_end,
            16 * entries,
        ),
        (
            "a table longer than MAX_SEGMENTS",
            long,
            16 * long_descs.len() as u32,
        ),
    ];
    for (what, addr, len) in cases {
        let head = vm.submit_raw_indirect(queue, addr, len);
        vm.kick(queue);
        let used = vm
            .wait_used(queue, WAIT)
            .unwrap_or_else(|| panic!("queue {queue}, {what}: not completed"));
        assert_eq!((used.head, used.len), (head, 0), "queue {queue}, {what}");
        for d in good.iter().filter(|d| d.write) {
            assert!(
                vm.read_guest(d.addr, d.len as usize)
                    .iter()
                    .all(|&b| b == 0),
                "queue {queue}, {what}: the device wrote through a malformed table"
            );
        }
    }
}

#[test]
fn malformed_indirect_tables_are_completed_empty_and_the_streams_go_on() {
    let opts = FrontendOptions {
        indirect_desc: true,
        ..FrontendOptions::default()
    };
    let mut rig = Rig::start(Some(WAV_CONFIG), opts);
    let params = Params::s16_48k(0);
    let capture = Params::s16_48k(1);
    let source = pattern(capture.period_bytes as usize * 3, 13);
    write_wav_s16(&rig.path("source.wav"), 2, 48000, &source);
    let vm = &mut rig.vm;
    // Prepared, not started: the device would hold well-formed tx and rx buffers.
    prepare(vm, &params);
    prepare(vm, &capture);
    let desc = |addr, len, write| RawDesc { addr, len, write };

    let header = vm.alloc_guest(4);
    let payload = vm.alloc_guest(u64::from(params.period_bytes));
    vm.write_guest(payload, &pattern(params.period_bytes as usize, 14));
    let status = vm.alloc_guest(8);
    let tx = [
        desc(header, 4, false),
        desc(payload, params.period_bytes, false),
        desc(status, 8, true),
    ];
    malformed_indirect_tables_complete_empty(vm, p::TX_QUEUE, &tx);

    let header = vm.alloc_guest(4);
    vm.write_guest(header, &1u32.to_le_bytes());
    let frames = vm.alloc_guest(u64::from(capture.period_bytes));
    let status = vm.alloc_guest(8);
    let rx = [
        desc(header, 4, false),
        desc(frames, capture.period_bytes, true),
        desc(status, 8, true),
    ];
    malformed_indirect_tables_complete_empty(vm, p::RX_QUEUE, &rx);

    let request = vm.alloc_guest(8);
    vm.write_guest(request, &pcm(p::R_PCM_START, 0));
    let response = vm.alloc_guest(4);
    let ctl = [desc(request, 8, false), desc(response, 4, true)];
    malformed_indirect_tables_complete_empty(vm, p::CONTROL_QUEUE, &ctl);

    // Both streams go on with well-formed indirect buffers: the playback reaches the file
    // bit-exact (nothing of the malformed tables' payload in it), the capture is the source.
    let data = pattern(params.period_bytes as usize * 6, 15);
    let (_, done) = play_as(vm, &params, &data, Layout::Indirect);
    assert!(done.iter().all(|c| c.status == 0x8000), "{done:?}");
    let (_, done) = record_as(vm, &capture, 3, Layout::Indirect);
    assert!(done.iter().all(|c| c.status == 0x8000), "{done:?}");
    let captured: Vec<u8> = done.iter().flat_map(|c| c.data.iter().copied()).collect();
    assert!(captured == source, "captured bytes differ from the source");
    for stream in [0, 1] {
        assert_eq!(control(vm, &pcm(p::R_PCM_STOP, stream)), 0x8000);
        assert_eq!(control(vm, &pcm(p::R_PCM_RELEASE, stream)), 0x8000);
    }
    assert!(wav_s16_bytes(&rig.path("played-1.wav")) == data);
    assert!(rig.worker.is_running());
}

#[test]
fn underrun_is_reported_as_an_xrun_event_when_selected() {
    let mut rig = Rig::start(None, FrontendOptions::default());
    let resp = rig
        .vm
        .request(p::CONTROL_QUEUE, &query(p::R_PCM_INFO, 0, 1, 32), 36);
    let info: p::PcmInfo = p::read_prefix(&resp[4..]).unwrap();
    assert_eq!(info.features.get(), 1 << p::PCM_F_EVT_XRUNS);
    for _ in 0..8 {
        rig.vm.submit_no_kick(p::EVENT_QUEUE, &[], &[8]);
    }
    rig.vm.kick(p::EVENT_QUEUE);
    let params = Params {
        features: 1 << p::PCM_F_EVT_XRUNS,
        ..Params::s16_48k(0)
    };
    prepare(&mut rig.vm, &params);
    // Two periods, then nothing: the backend runs dry.
    let (_, done) = play(
        &mut rig.vm,
        &Params {
            periods: 2,
            ..params
        },
        &pattern(params.period_bytes as usize * 2, 6),
    );
    assert_eq!(done.len(), 2);
    let event = rig
        .vm
        .wait_used(p::EVENT_QUEUE, WAIT)
        .expect("an xrun event");
    assert_eq!(event.len, 8);
    let code = u32::from_le_bytes(event.written[..4].try_into().unwrap());
    let data = u32::from_le_bytes(event.written[4..8].try_into().unwrap());
    assert_eq!((code, data), (p::EVT_PCM_XRUN, 0));
    // Without the feature selected, no event is sent.
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_STOP, 0)), 0x8000);
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_RELEASE, 0)), 0x8000);
    while rig.vm.try_used(p::EVENT_QUEUE).is_some() {}
    prepare(&mut rig.vm, &Params::s16_48k(0));
    let plain = Params {
        periods: 2,
        ..Params::s16_48k(0)
    };
    play(
        &mut rig.vm,
        &plain,
        &pattern(plain.period_bytes as usize * 2, 7),
    );
    std::thread::sleep(plain.period() * 5);
    assert!(
        rig.vm.try_used(p::EVENT_QUEUE).is_none(),
        "xrun sent without the feature"
    );
}

/// Waits for a process to exit on its own and returns its exit code.
fn exit_code_within(proc: &mut Proc, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = proc.child.try_wait() {
            return status.code();
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn worker_exits_cleanly_when_the_vmm_hangs_up() {
    // Before the handshake: a VMM that connects and closes at once.
    let dir = tempfile::tempdir().unwrap();
    let (_broker, broker_socket) = spawn_broker(dir.path(), None);
    let (mut worker, socket) = spawn_worker(dir.path(), "vm", &broker_socket, None);
    drop(std::os::unix::net::UnixStream::connect(&socket).unwrap());
    assert_eq!(exit_code_within(&mut worker, WAIT), Some(0));

    // After a session: the guest played, then the VMM went away.
    let mut rig = Rig::start(None, FrontendOptions::default());
    let params = Params::s16_48k(0);
    prepare(&mut rig.vm, &params);
    play(
        &mut rig.vm,
        &params,
        &pattern(params.period_bytes as usize * 4, 5),
    );
    drop(rig.vm);
    assert_eq!(exit_code_within(&mut rig.worker, WAIT), Some(0));
    assert!(rig.broker.is_running(), "the broker outlives its workers");
}

#[test]
fn a_guest_reset_finds_a_fresh_device() {
    let mut rig = Rig::start(Some(WAV_CONFIG), FrontendOptions::default());
    let params = Params::s16_48k(0);
    prepare(&mut rig.vm, &params);
    for _ in 0..8 {
        rig.vm.submit_no_kick(p::EVENT_QUEUE, &[], &[8]);
    }
    rig.vm.kick(p::EVENT_QUEUE);
    for i in 0..params.periods {
        tx_submit(&mut rig.vm, 0, &pattern(params.period_bytes as usize, i));
    }
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_START, 0)), 0x8000);
    // The guest reboots mid-play: QEMU stops the rings, the new driver brings up fresh ones,
    // reusing the same heads.
    rig.vm.reset_rings().expect("reset the rings");
    for _ in 0..8 {
        rig.vm.submit_no_kick(p::EVENT_QUEUE, &[], &[8]);
    }
    rig.vm.kick(p::EVENT_QUEUE);
    // Its event buffers are held again, not handed back as if republished (a driver re-adds
    // what comes back at once, and the two would spin).
    assert!(
        rig.vm
            .wait_used(p::EVENT_QUEUE, Duration::from_millis(200))
            .is_none(),
        "the new driver's event buffers came back at once"
    );
    // The streams start over: SET_PARAMS (not allowed while running) and a whole playback work.
    let data = pattern(params.period_bytes as usize * 10, 9);
    prepare(&mut rig.vm, &params);
    let (_, done) = play(&mut rig.vm, &params, &data);
    assert!(done.iter().all(|c| c.status == 0x8000), "{done:?}");
    assert!(rig.worker.is_running());
}

/// A guest that keeps its whole buffer queued (4 periods, as ALSA does) is not asked to kick
/// while its stream runs: the worker takes each new buffer on the wake-up that completes an
/// older one. The playback stays bit-exact; with EVENT_IDX (avail_event left behind) and
/// without (the used ring's NO_NOTIFY flag).
#[test]
fn a_guest_keeping_its_buffer_queued_is_not_asked_to_kick_while_it_plays() {
    for event_idx in [true, false] {
        let opts = FrontendOptions {
            event_idx,
            driver_kicks: true,
            ..FrontendOptions::default()
        };
        let mut rig = Rig::start(Some(WAV_CONFIG), opts);
        assert_eq!(rig.vm.event_idx(), event_idx);
        let params = Params::s16_48k(0);
        prepare(&mut rig.vm, &params);
        let periods = 40;
        let data = pattern(params.period_bytes as usize * periods, 9);
        let (_, done) = play(&mut rig.vm, &params, &data);
        assert_eq!(done.len(), periods);
        assert!(done.iter().all(|c| c.status == 0x8000), "{done:?}");
        let (kicks, skipped) = rig.vm.kick_counts(p::TX_QUEUE);
        assert_eq!(kicks + skipped, periods as u64);
        // The 4 buffers queued before START kick (nothing runs yet); of the 36 queued while
        // it runs, nearly none may.
        assert!(
            skipped >= 30,
            "event_idx {event_idx}: {kicks} kicks, {skipped} left out of {periods} buffers"
        );
        assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_STOP, 0)), 0x8000);
        assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_RELEASE, 0)), 0x8000);
        assert!(wav_s16_bytes(&rig.path("played-1.wav")) == data);
    }
}

/// A guest with only 2 periods queued has too little ahead of the next completion to wait for
/// it: it is asked to kick for every buffer it queues while the stream runs.
#[test]
fn a_guest_with_two_periods_queued_is_asked_to_kick_for_every_buffer() {
    let opts = FrontendOptions {
        event_idx: true,
        driver_kicks: true,
        ..FrontendOptions::default()
    };
    let mut rig = Rig::start(Some(WAV_CONFIG), opts);
    let params = Params {
        periods: 2,
        ..Params::s16_48k(0)
    };
    prepare(&mut rig.vm, &params);
    let data = pattern(params.period_bytes as usize * 20, 10);
    let (_, done) = play(&mut rig.vm, &params, &data);
    assert!(done.iter().all(|c| c.status == 0x8000), "{done:?}");
    // A kick may be left out only for a buffer published before the device served the
    // previous kick (it reads both then): at most the one queued right before START.
    let (kicks, skipped) = rig.vm.kick_counts(p::TX_QUEUE);
    assert!(
        skipped <= 1,
        "{kicks} kicks, {skipped} left out of 20 buffers"
    );
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_STOP, 0)), 0x8000);
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_RELEASE, 0)), 0x8000);
    assert!(wav_s16_bytes(&rig.path("played-1.wav")) == data);
}

/// Capture the same way: 4 rx buffers queued, re-queued as they complete, are taken without
/// kicks while the stream runs, and the capture is the source, bit-exact. After STOP the
/// guest is asked to kick again (a buffer queued then is answered at once, not on a wake-up
/// that no longer comes).
#[test]
fn a_guest_keeping_its_capture_buffers_queued_is_not_asked_to_kick() {
    let opts = FrontendOptions {
        event_idx: true,
        driver_kicks: true,
        ..FrontendOptions::default()
    };
    let mut rig = Rig::start(Some(WAV_CONFIG), opts);
    let params = Params::s16_48k(1);
    let periods = 40;
    let source = pattern(params.period_bytes as usize * periods, 11);
    write_wav_s16(&rig.path("source.wav"), 2, 48000, &source);
    prepare(&mut rig.vm, &params);
    let (_, done) = record(&mut rig.vm, &params, periods);
    assert!(done.iter().all(|c| c.status == 0x8000), "{done:?}");
    let captured: Vec<u8> = done.iter().flat_map(|c| c.data.iter().copied()).collect();
    assert!(captured == source, "captured bytes differ from the source");
    let (kicks, skipped) = rig.vm.kick_counts(p::RX_QUEUE);
    assert!(skipped >= 30, "{kicks} kicks, {skipped} left out");
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_STOP, 1)), 0x8000);
    // Stopped: a new buffer must kick, and is completed by RELEASE.
    rx_submit(&mut rig.vm, 1, params.period_bytes);
    assert_eq!(
        rig.vm.kick_counts(p::RX_QUEUE).0,
        kicks + 1,
        "no kick asked after STOP"
    );
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_RELEASE, 1)), 0x8000);
    assert!(rig.vm.wait_used(p::RX_QUEUE, WAIT).is_some());
}

/// An rx buffer larger than the ring (4 periods into a ring of 3) still fills and completes,
/// bit-exact: the worker takes it in parts, woken at half the ring each time.
#[test]
fn an_rx_buffer_larger_than_the_ring_is_filled_in_parts() {
    let mut rig = Rig::start(Some(WAV_CONFIG), FrontendOptions::default());
    let params = Params::s16_48k(1);
    let big = params.period_bytes * 4;
    let source = pattern(big as usize * 2, 13);
    write_wav_s16(&rig.path("source.wav"), 2, 48000, &source);
    prepare(&mut rig.vm, &params);
    rx_submit(&mut rig.vm, 1, big);
    rx_submit(&mut rig.vm, 1, big);
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_START, 1)), 0x8000);
    let mut captured = Vec::new();
    for _ in 0..2 {
        let used = rig
            .vm
            .wait_used(p::RX_QUEUE, WAIT)
            .expect("a large rx buffer completes");
        let done = split_status(&used, big as usize);
        assert_eq!(done.status, 0x8000);
        captured.extend_from_slice(&done.data);
    }
    assert!(captured == source, "captured bytes differ from the source");
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_STOP, 1)), 0x8000);
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_RELEASE, 1)), 0x8000);
}
