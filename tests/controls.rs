//! Control elements (VIRTIO_SND_F_CTLS) through the real worker and broker: what a guest that
//! negotiated them sees (names, ranges, the dB TLV), what its writes do to the audio the wav
//! backend writes and what the guest records from it (bit-exact at 0 dB, silence when muted,
//! -6 dB within half a code), that bad
//! values are refused while another stream plays on, and that a restarted broker gets the
//! values back.

mod common;

use std::time::Duration;

use common::frontend::FrontendOptions;
use common::vsound::*;
use virtio_snd::ctl::Gain;
use virtio_snd::protocol as p;
use zerocopy::IntoBytes;

const CONFIG: &str = r#"
controls = true
[[streams]]
name = "media"
direction = "output"
backend = "wav"
wav_path = "$DIR/media-{client}.wav"
formats = ["S16"]
rates = [48000]
[[streams]]
name = "navigation"
direction = "output"
backend = "wav"
wav_path = "$DIR/navigation-{client}.wav"
formats = ["S16"]
rates = [48000]
[[streams]]
name = "mic"
direction = "input"
backend = "null"
formats = ["S16"]
rates = [48000]
controls = false
"#;

const MEDIA_VOLUME: u32 = 0;
const MEDIA_SWITCH: u32 = 1;
const NAV_VOLUME: u32 = 2;
const NAV_SWITCH: u32 = 3;

fn with_controls() -> FrontendOptions {
    FrontendOptions {
        extra_features: 1 << p::F_CTLS,
        ..FrontendOptions::default()
    }
}

fn ctl(code: u32, id: u32) -> Vec<u8> {
    p::CtlHdr {
        hdr: p::Hdr { code: code.into() },
        control_id: id.into(),
    }
    .as_bytes()
    .to_vec()
}

/// CTL_WRITE as Linux sends it: the header and a whole 512-byte value.
fn ctl_write(id: u32, value: u32) -> Vec<u8> {
    let mut req = ctl(p::R_CTL_WRITE, id);
    let mut members = [0u8; p::ctl::VALUE_SIZE];
    members[..4].copy_from_slice(&value.to_le_bytes());
    req.extend_from_slice(&members);
    req
}

fn write(rig: &mut Rig, id: u32, value: u32) -> u32 {
    control(&mut rig.vm, &ctl_write(id, value))
}

fn read(rig: &mut Rig, id: u32) -> u32 {
    let resp = rig
        .vm
        .request(p::CONTROL_QUEUE, &ctl(p::R_CTL_READ, id), 516);
    assert_eq!(status_of(&resp), 0x8000, "CTL_READ {id}");
    assert_eq!(resp.len(), 516);
    u32::from_le_bytes(resp[4..8].try_into().unwrap())
}

/// Plays `data` on stream 0 and returns what the wav backend wrote.
fn play_media(rig: &mut Rig, data: &[u8]) -> Vec<u8> {
    let params = Params::s16_48k(0);
    prepare(&mut rig.vm, &params);
    let (_, done) = play(&mut rig.vm, &params, data);
    assert!(done.iter().all(|c| c.status == 0x8000), "{done:?}");
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_STOP, 0)), 0x8000);
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_RELEASE, 0)), 0x8000);
    wav_s16_bytes(&rig.path("media-1.wav"))
}

fn samples(bytes: &[u8]) -> Vec<i16> {
    bytes
        .chunks_exact(2)
        .map(|s| i16::from_le_bytes([s[0], s[1]]))
        .collect()
}

#[test]
fn a_guest_with_f_ctls_sees_named_ranged_controls_with_a_db_scale() {
    let mut rig = Rig::start(Some(CONFIG), with_controls());
    assert_ne!(rig.vm.offered_features() & (1 << p::F_CTLS), 0);
    assert_ne!(rig.vm.negotiated_features() & (1 << p::F_CTLS), 0);
    let config = rig.vm.get_config(0, 16).unwrap();
    // One jack, three streams, twelve channel maps, four controls (the mic has none).
    assert_eq!(config, [1, 0, 0, 0, 3, 0, 0, 0, 12, 0, 0, 0, 4, 0, 0, 0]);
    // One bulk query, as Linux makes at probe.
    let resp = rig.vm.request(
        p::CONTROL_QUEUE,
        &query(p::R_CTL_INFO, 0, 4, 96),
        4 + 4 * 96,
    );
    assert_eq!(status_of(&resp), 0x8000);
    let infos: Vec<p::CtlInfo> = resp[4..]
        .chunks(96)
        .map(|c| p::read_prefix(c).unwrap())
        .collect();
    let names: Vec<String> = infos
        .iter()
        .map(|i| String::from_utf8(virtio_snd::ctl::name_of(i).to_vec()).unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "Media Playback Volume",
            "Media Playback Switch",
            "Navigation Playback Volume",
            "Navigation Playback Switch"
        ]
    );
    for volume in [&infos[0], &infos[2]] {
        assert_eq!(volume.r#type.get(), p::ctl::TYPE_INTEGER);
        assert_eq!(volume.role.get(), p::ctl::ROLE_VOLUME);
        assert_eq!((volume.min.get(), volume.max.get()), (0, 100));
        assert_ne!(volume.access.get() & (1 << p::ctl::ACCESS_TLV_READ), 0);
        assert_eq!(volume.count.get(), 1);
    }
    for switch in [&infos[1], &infos[3]] {
        assert_eq!(switch.r#type.get(), p::ctl::TYPE_BOOLEAN);
        assert_eq!(switch.access.get() & (1 << p::ctl::ACCESS_TLV_READ), 0);
    }
    let resp = rig.vm.request(
        p::CONTROL_QUEUE,
        &ctl(p::R_CTL_TLV_READ, NAV_VOLUME),
        4 + 256,
    );
    assert_eq!(status_of(&resp), 0x8000);
    assert_eq!(resp.len(), 20);
    let words: Vec<u32> = resp[4..]
        .chunks(4)
        .map(|w| u32::from_le_bytes(w.try_into().unwrap()))
        .collect();
    // SNDRV_CTL_TLVT_DB_SCALE, 8 bytes, -50.00 dB, 0.50 dB a step, the lowest muted.
    assert_eq!(words, [1, 8, (-5000i32) as u32, 0x1_0032]);
    // Unity at first.
    assert_eq!(read(&mut rig, MEDIA_VOLUME), 100);
    assert_eq!(read(&mut rig, MEDIA_SWITCH), 1);
    // The writable TLV calls are not supported; no control is ENUMERATED.
    assert_eq!(control(&mut rig.vm, &ctl(p::R_CTL_TLV_WRITE, 0)), 0x8002);
    assert_eq!(control(&mut rig.vm, &ctl(p::R_CTL_TLV_COMMAND, 0)), 0x8002);
    assert_eq!(control(&mut rig.vm, &ctl(p::R_CTL_ENUM_ITEMS, 0)), 0x8001);
}

#[test]
fn without_f_ctls_there_are_no_controls() {
    let mut rig = Rig::start(Some(CONFIG), FrontendOptions::default());
    assert_ne!(rig.vm.offered_features() & (1 << p::F_CTLS), 0);
    assert_eq!(rig.vm.negotiated_features() & (1 << p::F_CTLS), 0);
    assert_eq!(rig.vm.get_config(12, 4).unwrap(), [0, 0, 0, 0]);
    for req in [
        query(p::R_CTL_INFO, 0, 4, 96),
        ctl(p::R_CTL_READ, 0),
        ctl_write(0, 10),
        ctl(p::R_CTL_TLV_READ, 0),
    ] {
        // As any code the device does not know.
        let resp = rig.vm.request(p::CONTROL_QUEUE, &req, 1024);
        assert_eq!(resp, 0x8001u32.to_le_bytes());
    }
    // And the audio is untouched.
    let data = pattern(1920 * 8, 3);
    assert!(play_media(&mut rig, &data) == data);
}

#[test]
fn the_gain_is_bit_exact_at_0_db_silent_when_muted_and_halves_at_minus_6_db() {
    let mut rig = Rig::start(Some(CONFIG), with_controls());
    let data = known_signal(1920 * 20, 11);
    assert!(
        play_media(&mut rig, &data) == data,
        "unity is not bit-exact"
    );

    assert_eq!(write(&mut rig, MEDIA_SWITCH, 0), 0x8000);
    assert_eq!(read(&mut rig, MEDIA_SWITCH), 0);
    let muted = play_media(&mut rig, &data);
    assert_eq!(muted.len(), data.len());
    assert!(
        muted.iter().all(|&b| b == 0),
        "muted playback is not silence"
    );

    // -6.00 dB (step 88 of 100 at 0.5 dB) with the switch back on.
    assert_eq!(write(&mut rig, MEDIA_SWITCH, 1), 0x8000);
    assert_eq!(write(&mut rig, MEDIA_VOLUME, 88), 0x8000);
    assert_eq!(read(&mut rig, MEDIA_VOLUME), 88);
    let factor = Gain {
        volume: 88,
        mute: false,
    }
    .amplitude();
    let half = play_media(&mut rig, &data);
    assert_eq!(half.len(), data.len());
    let (got, want) = (samples(&half), samples(&data));
    let worst = got
        .iter()
        .zip(&want)
        .map(|(&g, &w)| (f32::from(g) - f32::from(w) * factor).abs())
        .fold(0f32, f32::max);
    assert!(worst <= 0.5, "a sample is {worst} codes off x{factor}");
    assert!(got.iter().zip(&want).any(|(&g, &w)| g != w));

    // The lowest step is silence too; back at the top, bit-exact again.
    assert_eq!(write(&mut rig, MEDIA_VOLUME, 0), 0x8000);
    assert!(play_media(&mut rig, &data).iter().all(|&b| b == 0));
    assert_eq!(write(&mut rig, MEDIA_VOLUME, 100), 0x8000);
    assert!(play_media(&mut rig, &data) == data);
}

#[test]
fn bad_values_get_bad_msg_while_another_stream_plays_on() {
    let mut rig = Rig::start(Some(CONFIG), with_controls());
    let params = Params::s16_48k(0);
    prepare(&mut rig.vm, &params);
    let data = known_signal(params.period_bytes as usize * 30, 5);
    let mut chunks = data.chunks(params.period_bytes as usize);
    let mut in_flight = 0;
    for chunk in chunks.by_ref().take(params.periods as usize) {
        tx_submit(&mut rig.vm, 0, chunk);
        in_flight += 1;
    }
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_START, 0)), 0x8000);
    let mut short = ctl_write(NAV_VOLUME, 10);
    short.truncate(8 + 100);
    let mut second_member = ctl_write(NAV_VOLUME, 10);
    second_member[8 + 4] = 1;
    let bad: Vec<Vec<u8>> = vec![
        ctl_write(NAV_VOLUME, 101),
        ctl_write(NAV_VOLUME, u32::MAX),
        ctl_write(NAV_SWITCH, 2),
        ctl_write(4, 1),
        ctl_write(u32::MAX, 0),
        second_member,
        short,
        ctl(p::R_CTL_WRITE, NAV_VOLUME)[..6].to_vec(),
        ctl(p::R_CTL_READ, 9),
        ctl(p::R_CTL_TLV_READ, NAV_SWITCH),
    ];
    let mut completions = Vec::new();
    let mut round = 0;
    while in_flight > 0 {
        // Between completions: a bad request, then a good one on the other bus.
        let req = &bad[round % bad.len()];
        let resp = rig.vm.request(p::CONTROL_QUEUE, req, 516);
        assert_eq!(
            resp,
            0x8001u32.to_le_bytes(),
            "{:?}",
            &req[..req.len().min(12)]
        );
        let value = (round % 100) as u32;
        assert_eq!(write(&mut rig, NAV_VOLUME, value), 0x8000);
        assert_eq!(read(&mut rig, NAV_VOLUME), value);
        round += 1;
        let used = rig.vm.wait_used(p::TX_QUEUE, WAIT).expect("tx completion");
        completions.push(split_status(&used, 0));
        in_flight -= 1;
        if let Some(chunk) = chunks.next() {
            tx_submit(&mut rig.vm, 0, chunk);
            in_flight += 1;
        }
    }
    assert!(completions.iter().all(|c| c.status == 0x8000));
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_STOP, 0)), 0x8000);
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_RELEASE, 0)), 0x8000);
    // Its own controls untouched, the media bus played bit-exact throughout.
    assert_eq!(read(&mut rig, MEDIA_VOLUME), 100);
    assert!(wav_s16_bytes(&rig.path("media-1.wav")) == data);
    assert!(rig.worker.is_running() && rig.broker.is_running());
}

#[test]
fn a_restarted_broker_gets_the_guests_gain_back() {
    let mut rig = Rig::start(Some(CONFIG), with_controls());
    // Set while the broker runs, then one while it is away: both are kept by the worker.
    assert_eq!(write(&mut rig, MEDIA_VOLUME, 88), 0x8000);
    rig.broker.child.kill().unwrap();
    let _ = rig.broker.child.wait();
    assert_eq!(write(&mut rig, MEDIA_SWITCH, 0), 0x8000);
    assert_eq!(read(&mut rig, MEDIA_SWITCH), 0);
    let config = rig.path("vsound.toml");
    let (broker, _) = spawn_broker(rig.dir.path(), Some(&config));
    rig.broker = broker;
    // The worker reconnects by path (10 ms, backing off to 200 ms) and restores its gains.
    std::thread::sleep(Duration::from_millis(600));
    let data = known_signal(1920 * 10, 4);
    let muted = play_media(&mut rig, &data);
    assert_eq!(muted.len(), data.len());
    assert!(
        muted.iter().all(|&b| b == 0),
        "the new broker does not mute"
    );
    assert_eq!(write(&mut rig, MEDIA_SWITCH, 1), 0x8000);
    let half = samples(&play_media(&mut rig, &data));
    let factor = Gain {
        volume: 88,
        mute: false,
    }
    .amplitude();
    for (&g, &w) in half.iter().zip(&samples(&data)) {
        assert!((f32::from(g) - f32::from(w) * factor).abs() <= 0.5);
    }
}

const CAPTURE_CONFIG: &str = r#"
controls = true
[[streams]]
name = "media"
direction = "output"
backend = "null"
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

/// Records `periods` periods of the source on stream 1.
fn record_mic(rig: &mut Rig, periods: usize) -> Vec<u8> {
    let params = Params::s16_48k(1);
    prepare(&mut rig.vm, &params);
    let (_, done) = record(&mut rig.vm, &params, periods);
    assert!(done.iter().all(|c| c.status == 0x8000), "{done:?}");
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_STOP, 1)), 0x8000);
    assert_eq!(control(&mut rig.vm, &pcm(p::R_PCM_RELEASE, 1)), 0x8000);
    done.iter().flat_map(|c| c.data.iter().copied()).collect()
}

#[test]
fn capture_controls_scale_and_mute_what_the_guest_records() {
    let mut rig = Rig::start(Some(CAPTURE_CONFIG), with_controls());
    let resp = rig.vm.request(
        p::CONTROL_QUEUE,
        &query(p::R_CTL_INFO, 2, 2, 96),
        4 + 2 * 96,
    );
    let names: Vec<String> = resp[4..]
        .chunks(96)
        .map(|c| {
            let info: p::CtlInfo = p::read_prefix(c).unwrap();
            String::from_utf8(virtio_snd::ctl::name_of(&info).to_vec()).unwrap()
        })
        .collect();
    assert_eq!(names, ["Mic Capture Volume", "Mic Capture Switch"]);
    let source = known_signal(1920 * 10, 8);
    write_wav_s16(&rig.path("source.wav"), 2, 48000, &source);
    assert!(
        record_mic(&mut rig, 10) == source,
        "unity capture is not bit-exact"
    );
    assert_eq!(write(&mut rig, 2, 88), 0x8000);
    let half = samples(&record_mic(&mut rig, 10));
    let factor = Gain {
        volume: 88,
        mute: false,
    }
    .amplitude();
    assert_eq!(half.len(), source.len() / 2);
    for (&g, &w) in half.iter().zip(&samples(&source)) {
        assert!(
            (f32::from(g) - f32::from(w) * factor).abs() <= 0.5,
            "{w} -> {g}"
        );
    }
    assert_eq!(write(&mut rig, 3, 0), 0x8000);
    let muted = record_mic(&mut rig, 10);
    assert_eq!(muted.len(), source.len());
    assert!(
        muted.iter().all(|&b| b == 0),
        "a muted capture is not silence"
    );
    // The output bus is another stream: its controls are untouched.
    assert_eq!(read(&mut rig, MEDIA_VOLUME), 100);
    assert_eq!(read(&mut rig, MEDIA_SWITCH), 1);
}
