//! The seed corpus (fuzz/corpus/<target>/<name>): well-formed inputs of every kind, built with
//! the wire structs and the targets' own encoders, and the Linux driver's recorded control
//! requests (fuzz/linux-control-requests.txt). tests/fuzz_corpus.rs checks that the committed
//! corpus holds each of them and writes them when asked.

use virtio_snd::control::{PcmCaps, PcmParams};
use virtio_snd::protocol::{self as p, format, rate};
use vsound_config::Config;
use vsound_shared::ipc::{self, BrokerMsg, WorkerMsg, PROTOCOL_VERSION};

use crate::chain::{self, Access, AccessKind, DescSeed, Patch, F_INDIRECT, F_NEXT, F_WRITE};
use crate::control::seeds::{device_of, jack_remap, pcm, query, set_params};
use crate::control::{self as ctl, Device};
use crate::ring::{self, Forged, Op};

/// One seed file.
pub struct Seed {
    pub target: &'static str,
    pub name: String,
    pub bytes: Vec<u8>,
}

/// The Linux driver's control requests, as recorded (hex, one per line, `#` comments).
pub const LINUX_CONTROL_REQUESTS: &str = include_str!("../../linux-control-requests.txt");

/// tests/e2e/main.rs's config, the device the Linux requests were recorded on.
pub const E2E_CONFIG: &str = r#"
[[streams]]
name = "media"
direction = "output"
backend = "pipewire"
formats = ["S16"]
rates = [48000]
node_name = "vsound-e2e-media"
target_object = "vsound-test-sink"
[[streams]]
name = "mic"
direction = "input"
backend = "pipewire"
formats = ["S16"]
rates = [48000]
node_name = "vsound-e2e-mic"
target_object = "vsound-e2e-source"
capture_sink = true
"#;

/// tests/device.rs's config.
pub const WAV_CONFIG: &str = r#"
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

/// Every seed of every target.
pub fn all() -> Vec<Seed> {
    let mut seeds = Vec::new();
    seeds.extend(control());
    seeds.extend(chain());
    seeds.extend(ipc());
    seeds.extend(ring());
    seeds.extend(config());
    seeds
}

fn seed(target: &'static str, name: impl Into<String>, bytes: Vec<u8>) -> Seed {
    Seed {
        target,
        name: name.into(),
        bytes,
    }
}

/// The recorded requests, in order.
pub fn linux_requests() -> Vec<Vec<u8>> {
    LINUX_CONTROL_REQUESTS
        .lines()
        .map(|l| l.split('#').next().unwrap().trim())
        .filter(|l| !l.is_empty())
        .map(|hex| {
            assert!(hex.len() % 2 == 0, "odd hex line {hex}");
            (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("a hex byte"))
                .collect()
        })
        .collect()
}

/// The room the driver gives a request's response: what its INFO query asks for, else a
/// status.
fn response_room(req: &[u8]) -> u16 {
    match (p::request_code(req), p::read_prefix::<p::QueryInfo>(req)) {
        (Some(p::R_JACK_INFO | p::R_PCM_INFO | p::R_CHMAP_INFO), Some(q)) => {
            (4 + q.count.get() * q.size.get()) as u16
        }
        _ => 4,
    }
}

fn control() -> Vec<Seed> {
    let e2e = device_of(&Config::parse(E2E_CONFIG).unwrap(), 0);
    let default = device_of(&Config::default(), 0);
    let mut out = Vec::new();

    // The Linux driver: its whole session, and each distinct request on its own.
    let linux = linux_requests();
    let session: Vec<(u16, Vec<u8>)> = linux
        .iter()
        .map(|r| (response_room(r), r.clone()))
        .collect();
    out.push(seed("control", "linux-session", ctl::seed(&e2e, &session)));
    let mut distinct: Vec<&Vec<u8>> = Vec::new();
    for r in &linux {
        if !distinct.contains(&r) {
            distinct.push(r);
        }
    }
    let mut per_code = std::collections::BTreeMap::<u32, usize>::new();
    for r in distinct {
        let code = p::request_code(r).unwrap();
        let n = per_code.entry(code).or_default();
        let name = format!("linux-{code:04x}-{n}");
        *n += 1;
        out.push(seed(
            "control",
            name,
            ctl::seed(&e2e, &[(response_room(r), r.clone())]),
        ));
    }

    let s16 = format::S16;
    let r48 = rate::R48000;
    let good = |id| (4, set_params(id, 4 * 1920, 1920, 2, s16, r48));
    let cmd = |code, id| (4u16, pcm(code, id));
    let lifecycle = |id| {
        vec![
            good(id),
            cmd(p::R_PCM_PREPARE, id),
            cmd(p::R_PCM_START, id),
            cmd(p::R_PCM_STOP, id),
            cmd(p::R_PCM_START, id),
            cmd(p::R_PCM_STOP, id),
            cmd(p::R_PCM_RELEASE, id),
            cmd(p::R_PCM_PREPARE, id),
            cmd(p::R_PCM_RELEASE, id),
        ]
    };
    out.push(seed(
        "control",
        "lifecycle",
        ctl::seed(&default, &lifecycle(0)),
    ));
    out.push(seed(
        "control",
        "lifecycle-input",
        ctl::seed(&default, &lifecycle(1)),
    ));
    for (name, failures) in [
        ("host-fails", u64::MAX),
        ("host-flaky", 0xaaaa_aaaa_aaaa_aaaa),
    ] {
        let dev = Device {
            host_failures: failures,
            ..default.clone()
        };
        let mut reqs = lifecycle(0);
        reqs.extend(lifecycle(0));
        out.push(seed(
            "control",
            format!("lifecycle-{name}"),
            ctl::seed(&dev, &reqs),
        ));
    }
    out.push(seed(
        "control",
        "lifecycle-out-of-order",
        ctl::seed(
            &default,
            &[
                cmd(p::R_PCM_START, 0),
                cmd(p::R_PCM_PREPARE, 0),
                good(0),
                cmd(p::R_PCM_STOP, 0),
                cmd(p::R_PCM_RELEASE, 0),
                cmd(p::R_PCM_PREPARE, 0),
                cmd(p::R_PCM_START, 0),
                good(0),
                cmd(p::R_PCM_START, 0),
                cmd(p::R_PCM_RELEASE, 0),
                cmd(p::R_PCM_PREPARE, 7),
            ],
        ),
    ));
    let queries = [
        ("pcm-info", query(p::R_PCM_INFO, 0, 2, 32), 68),
        ("pcm-info-second", query(p::R_PCM_INFO, 1, 1, 32), 36),
        ("pcm-info-padded", query(p::R_PCM_INFO, 0, 2, 64), 132),
        ("pcm-info-no-room", query(p::R_PCM_INFO, 0, 2, 32), 67),
        ("pcm-info-past-end", query(p::R_PCM_INFO, 1, 2, 32), 100),
        (
            "pcm-info-overflow",
            query(p::R_PCM_INFO, u32::MAX, 2, 32),
            100,
        ),
        (
            "pcm-info-huge-size",
            query(p::R_PCM_INFO, 0, 2, u32::MAX),
            1000,
        ),
        ("pcm-info-small-size", query(p::R_PCM_INFO, 0, 1, 31), 100),
        ("jack-info", query(p::R_JACK_INFO, 0, 1, 24), 28),
        ("chmap-info", query(p::R_CHMAP_INFO, 0, 12, 24), 292),
        ("chmap-info-padded", query(p::R_CHMAP_INFO, 7, 1, 40), 44),
        ("chmap-info-none", query(p::R_CHMAP_INFO, 0, 0, 24), 4),
        (
            "query-short",
            query(p::R_JACK_INFO, 0, 1, 24)[..12].to_vec(),
            28,
        ),
    ];
    for (name, req, room) in queries {
        out.push(seed("control", name, ctl::seed(&default, &[(room, req)])));
    }
    out.push(seed(
        "control",
        "jack-remap",
        ctl::seed(
            &default,
            &[
                (4, jack_remap(0, 2, 3)),
                (28, query(p::R_JACK_INFO, 0, 1, 24)),
                (4, jack_remap(0, 16, 0)),
                (4, jack_remap(1, 1, 1)),
                (4, jack_remap(0, 1, 1)[..12].to_vec()),
            ],
        ),
    ));
    let mut no_remap = default.clone();
    no_remap.layout.jacks[0].features = 0.into();
    out.push(seed(
        "control",
        "jack-remap-not-offered",
        ctl::seed(&no_remap, &[(4, jack_remap(0, 1, 1))]),
    ));
    let bad_params = [
        set_params(0, 7680, 1920, 2, 200, r48),
        set_params(0, 7680, 1920, 2, s16, 99),
        set_params(0, 7680, 1920, 0, s16, r48),
        set_params(0, 7680, 0, 2, s16, r48),
        set_params(0, 1920, 3840, 2, s16, r48),
        set_params(0, 5000, 1920, 2, s16, r48),
        set_params(0, 7682, 3841, 2, s16, r48),
        set_params(0, u32::MAX - 3, 4, 1, s16, r48),
        set_params(0, 7680, 1920, 9, s16, r48),
        set_params(0, 7680, 1920, 2, format::IMA_ADPCM, r48),
        set_params(2, 7680, 1920, 2, s16, r48),
        good(0).1[..20].to_vec(),
    ];
    out.push(seed(
        "control",
        "set-params-refused",
        ctl::seed(&default, &bad_params.map(|r| (4, r))),
    ));
    let formats = [
        format::U8,
        format::S24_3,
        format::S32,
        format::FLOAT64,
        format::MU_LAW,
    ];
    let each_format: Vec<(u16, Vec<u8>)> = formats
        .iter()
        .map(|&f| {
            let frame = p::sample_bytes(f).unwrap() * 6;
            (4, set_params(1, frame * 64, frame * 16, 6, f, rate::R44100))
        })
        .collect();
    out.push(seed(
        "control",
        "set-params-formats",
        ctl::seed(&default, &each_format),
    ));
    let mut shmem = good(0).1;
    shmem[16] = 1 << p::PCM_F_SHMEM_HOST;
    out.push(seed(
        "control",
        "set-params-feature",
        ctl::seed(&default, &[(4, shmem)]),
    ));
    out.push(seed(
        "control",
        "no-room-for-status",
        ctl::seed(
            &default,
            &[
                (0, good(0).1),
                (3, pcm(p::R_PCM_PREPARE, 0)),
                (2, query(p::R_PCM_INFO, 0, 1, 32)),
            ],
        ),
    ));
    out.push(seed(
        "control",
        "unknown-and-short",
        ctl::seed(
            &default,
            &[
                (4, 0xdeadu32.to_le_bytes().to_vec()),
                (4, vec![1, 0]),
                (4, vec![]),
                (8, pcm(p::R_PCM_START, 0)[..6].to_vec()),
            ],
        ),
    ));
    let empty = Device::default();
    out.push(seed(
        "control",
        "no-streams",
        ctl::seed(
            &empty,
            &[
                (4, query(p::R_PCM_INFO, 0, 0, 0)),
                (4, query(p::R_JACK_INFO, 0, 0, 24)),
                (4, good(0).1),
            ],
        ),
    ));
    // The largest device a config may describe, with unusual caps.
    let wide = PcmCaps {
        direction: p::D_INPUT,
        hda_fn_nid: 3,
        features: (1 << p::PCM_F_EVT_XRUNS) | (1 << p::PCM_F_MSG_POLLING),
        formats: u64::MAX,
        rates: u64::MAX,
        channels_min: 1,
        channels_max: 18,
    };
    let big = Device {
        caps: vec![wide; vsound_config::MAX_STREAMS],
        layout: virtio_snd::control::DeviceLayout {
            jacks: vec![default.layout.jacks[0]; vsound_config::MAX_JACKS],
            chmaps: [
                default.layout.chmaps.clone(),
                default.layout.chmaps.clone(),
                default.layout.chmaps[..8].to_vec(),
            ]
            .concat(),
            max_buffer_bytes: 16 << 20,
        },
        host_failures: 0x0f0f,
    };
    let mut polling = set_params(
        31,
        18 * 8 * 1024,
        18 * 8 * 256,
        18,
        format::FLOAT64,
        rate::R384000,
    );
    polling[16] = 1 << p::PCM_F_MSG_POLLING;
    out.push(seed(
        "control",
        "largest-device",
        ctl::seed(
            &big,
            &[
                (4 + 32 * 32, query(p::R_PCM_INFO, 0, 32, 32)),
                (4 + 32 * 24, query(p::R_JACK_INFO, 0, 32, 24)),
                (4 + 32 * 24, query(p::R_CHMAP_INFO, 0, 32, 24)),
                (4, polling),
                (4, pcm(p::R_PCM_PREPARE, 31)),
                (4, pcm(p::R_PCM_START, 31)),
            ],
        ),
    ));
    out
}

fn chain() -> Vec<Seed> {
    use AccessKind::*;
    let acc = |kind, chain, offset, len| Access {
        kind,
        chain,
        offset,
        len,
    };
    let base = chain::Seed {
        region0_pages: 4,
        region1_pages: 0,
        gap_pages: 0,
        queue_log2: 3,
        memory_seed: 7,
        table: vec![],
        patches: vec![],
        heads: vec![0],
        accesses: vec![],
    };
    // A tx request: header (stream 0) and 96 frame bytes readable, an 8-byte status writable.
    let header = |addr: u64, stream: u32| Patch::Bytes {
        addr,
        bytes: stream.to_le_bytes().to_vec(),
    };
    let mut out = Vec::new();
    let tx = chain::Seed {
        table: vec![
            DescSeed::new(0x1000, 4, F_NEXT, 1),
            DescSeed::new(0x1100, 96, F_NEXT, 2),
            DescSeed::new(0x1200, 8, F_WRITE, 0),
        ],
        patches: vec![header(0x1000, 0)],
        accesses: vec![
            acc(ReadReadable, 0, 0, 100),
            acc(ReadIntoReadable, 0, 4, 96),
            acc(WriteWritable, 0, 0, 8),
        ],
        ..base.clone()
    };
    out.push(seed("chain", "tx", tx.encode()));
    let rx = chain::Seed {
        table: vec![
            DescSeed::new(0x1000, 4, F_NEXT, 1),
            DescSeed::new(0x2000, 40, F_NEXT | F_WRITE, 2),
            DescSeed::new(0x2100, 32, F_WRITE, 0),
        ],
        patches: vec![header(0x1000, 1)],
        accesses: vec![
            acc(WriteWritable, 0, 0, 64),
            acc(WriteWritable, 0, 64, 8),
            acc(ReadWritable, 0, 30, 42),
        ],
        ..base.clone()
    };
    out.push(seed("chain", "rx", rx.encode()));
    let control = chain::Seed {
        table: vec![
            DescSeed::new(0x1000, 24, F_NEXT, 1),
            DescSeed::new(0x1400, 292, F_WRITE, 0),
        ],
        patches: vec![Patch::Bytes {
            addr: 0x1000,
            bytes: set_params(0, 7680, 1920, 2, format::S16, rate::R48000),
        }],
        accesses: vec![
            acc(ReadReadable, 0, 0, 24),
            acc(WriteWritable, 0, 0, 292),
            acc(WriteWritable, 0, 290, 3),
        ],
        ..base.clone()
    };
    out.push(seed("chain", "control-request", control.encode()));
    // Indirect: the head points at a table elsewhere in memory.
    let indirect = |name: &str, descs: Vec<DescSeed>, accesses: Vec<Access>| {
        let n = descs.len() as u32;
        let s = chain::Seed {
            table: vec![DescSeed::new(0x2000, 16 * n, F_INDIRECT, 0)],
            patches: vec![
                header(0x1000, 0),
                Patch::Descriptors {
                    addr: 0x2000,
                    descs,
                },
            ],
            accesses,
            ..base.clone()
        };
        seed("chain", name, s.encode())
    };
    out.push(indirect(
        "indirect-tx",
        vec![
            DescSeed::new(0x1000, 4, F_NEXT, 1),
            DescSeed::new(0x1010, 480, F_NEXT, 2),
            DescSeed::new(0x3000, 8, F_WRITE, 0),
        ],
        vec![
            acc(ReadIntoReadable, 0, 0, 484),
            acc(WriteWritable, 0, 0, 8),
        ],
    ));
    out.push(indirect(
        "indirect-rx",
        vec![
            DescSeed::new(0x1000, 4, F_NEXT, 1),
            DescSeed::new(0x3000, 256, F_NEXT | F_WRITE, 2),
            DescSeed::new(0x3200, 256, F_NEXT | F_WRITE, 3),
            DescSeed::new(0x3400, 8, F_WRITE, 0),
        ],
        vec![
            acc(WriteWritable, 0, 100, 300),
            acc(ReadWritable, 0, 0, 520),
        ],
    ));
    out.push(indirect(
        "indirect-nested",
        vec![
            DescSeed::new(0x1000, 4, F_NEXT, 1),
            DescSeed::new(0x2000, 32, F_INDIRECT, 0),
        ],
        vec![],
    ));
    out.push(indirect(
        "indirect-unaligned",
        vec![DescSeed::new(0x1000, 4, 0, 0)],
        vec![acc(ReadReadable, 0, 0, 4)],
    ));
    out.push(indirect(
        "indirect-next-outside",
        vec![
            DescSeed::new(0x1000, 4, F_NEXT, 9),
            DescSeed::new(0x1000, 4, F_WRITE, 0),
        ],
        vec![],
    ));
    // Indirect tables of MAX_SEGMENTS descriptors and one more.
    for (name, count) in [
        ("indirect-max-segments", 1024u16),
        ("indirect-too-long", 1025),
    ] {
        let s = chain::Seed {
            region0_pages: 8,
            table: vec![DescSeed::new(0x1000, 16 * u32::from(count), F_INDIRECT, 0)],
            patches: vec![Patch::LinkedRun {
                addr: 0x1000,
                count,
                template: DescSeed::new(0x800, 3, F_WRITE, 0),
            }],
            accesses: vec![
                acc(WriteWritable, 0, 0, 3072),
                acc(ReadIntoWritable, 0, 1, 3000),
            ],
            ..base.clone()
        };
        out.push(seed("chain", name, s.encode()));
    }
    // Two regions: a gap between them, or adjacent ones a buffer runs across.
    for (name, gap) in [("two-regions-gap", 2u8), ("two-regions-adjacent", 0)] {
        let r0 = 4 * chain::PAGE;
        let s = chain::Seed {
            region1_pages: 2,
            gap_pages: gap,
            table: vec![
                DescSeed::new(r0 - 8, 16, F_NEXT, 1),
                DescSeed::new(r0 + 0x100, 64, F_NEXT | F_WRITE, 2),
                DescSeed::new(r0 - 4, 16, F_WRITE, 0),
            ],
            heads: vec![0, 1],
            accesses: vec![
                acc(ReadReadable, 0, 0, 16),
                acc(WriteWritable, 0, 60, 20),
                acc(ReadIntoWritable, 0, 0, 80),
                acc(WriteReadable, 1, 0, 64),
            ],
            ..base.clone()
        };
        out.push(seed("chain", name, s.encode()));
    }
    let misc = [
        (
            "readable-after-writable",
            vec![
                DescSeed::new(0x1000, 8, F_NEXT | F_WRITE, 1),
                DescSeed::new(0x1100, 4, 0, 0),
            ],
            vec![0],
        ),
        (
            "loop",
            vec![
                DescSeed::new(0x1000, 8, F_NEXT, 1),
                DescSeed::new(0x1100, 8, F_NEXT, 0),
            ],
            vec![0, 1],
        ),
        (
            "outside-memory",
            vec![
                DescSeed::new(0xfff0_0000, 64, F_NEXT, 1),
                DescSeed::new(u64::MAX - 8, 16, F_WRITE, 0),
            ],
            vec![0],
        ),
        (
            "zero-lengths",
            vec![
                DescSeed::new(0x1000, 0, F_NEXT, 1),
                DescSeed::new(0x1000, 4, F_NEXT, 2),
                DescSeed::new(0, 0, F_WRITE | F_NEXT, 3),
                DescSeed::new(0x1400, 8, F_WRITE, 0),
            ],
            vec![0],
        ),
        (
            "head-out-of-range",
            vec![DescSeed::new(0x1000, 8, 0, 0)],
            vec![200, 0],
        ),
    ];
    for (name, table, heads) in misc {
        let s = chain::Seed {
            table,
            heads,
            accesses: vec![
                acc(ReadReadable, 0, 0, 8),
                acc(WriteWritable, 0, 0, 8),
                acc(ReadReadable, 1, 2, 0),
            ],
            ..base.clone()
        };
        out.push(seed("chain", name, s.encode()));
    }
    // A full queue of one-descriptor chains, and an avail idx past the queue's size.
    let full = chain::Seed {
        queue_log2: 6,
        table: (0..64)
            .map(|i| DescSeed::new(0x1000 + 64 * i, 64, if i % 2 == 1 { F_WRITE } else { 0 }, 0))
            .collect(),
        heads: (0..64).collect(),
        accesses: (0..16)
            .map(|i| {
                acc(
                    if i % 2 == 0 {
                        ReadReadable
                    } else {
                        WriteWritable
                    },
                    i * 3,
                    0,
                    64,
                )
            })
            .collect(),
        ..base.clone()
    };
    out.push(seed("chain", "full-queue", full.encode()));
    let mut past = full.clone();
    past.queue_log2 = 3;
    past.table.truncate(8);
    past.heads = (0..9).collect();
    out.push(seed("chain", "avail-past-size", past.encode()));
    let offsets = chain::Seed {
        table: vec![
            DescSeed::new(0x1000, 100, F_NEXT, 1),
            DescSeed::new(0x2000, 100, F_WRITE, 0),
        ],
        accesses: vec![
            acc(ReadReadable, 0, 99, 2),
            acc(ReadReadable, 0, 100, 0),
            acc(ReadReadable, 0, u64::MAX, 1),
            acc(WriteWritable, 0, 1 << 40, 4),
            acc(ReadIntoWritable, 0, 50, 50),
        ],
        ..base.clone()
    };
    out.push(seed("chain", "offsets", offsets.encode()));
    out
}

fn ipc() -> Vec<Seed> {
    let caps = Config::default().pcm_caps();
    let params = PcmParams {
        buffer_bytes: 7680,
        period_bytes: 1920,
        features: 0,
        channels: 2,
        format: format::S16,
        rate: rate::R48000,
    };
    let worker = [
        (
            "hello",
            WorkerMsg::Hello {
                version: PROTOCOL_VERSION,
                vm: "navi".into(),
                streams: caps.clone(),
            },
        ),
        (
            "hello-empty",
            WorkerMsg::Hello {
                version: PROTOCOL_VERSION,
                vm: "vm".into(),
                streams: vec![],
            },
        ),
        (
            "hello-max",
            WorkerMsg::Hello {
                version: PROTOCOL_VERSION,
                vm: "a".repeat(32),
                streams: vec![caps[0]; vsound_config::MAX_STREAMS],
            },
        ),
        (
            "hello-too-many",
            WorkerMsg::Hello {
                version: PROTOCOL_VERSION,
                vm: "../escape".into(),
                streams: vec![caps[1]; vsound_config::MAX_STREAMS + 1],
            },
        ),
        (
            "prepare",
            WorkerMsg::Prepare {
                stream_id: 0,
                params,
            },
        ),
        (
            "prepare-invalid",
            WorkerMsg::Prepare {
                stream_id: 1,
                params: PcmParams {
                    period_bytes: 1921,
                    channels: 0,
                    ..params
                },
            },
        ),
        (
            "prepare-float64",
            WorkerMsg::Prepare {
                stream_id: 1,
                params: PcmParams {
                    buffer_bytes: 8 * 8 * 4096,
                    period_bytes: 8 * 8 * 1024,
                    channels: 8,
                    format: format::FLOAT64,
                    rate: rate::R384000,
                    features: 1 << p::PCM_F_EVT_XRUNS,
                },
            },
        ),
        ("start", WorkerMsg::Start { stream_id: 0 }),
        ("stop", WorkerMsg::Stop { stream_id: 1 }),
        (
            "release",
            WorkerMsg::Release {
                stream_id: u32::MAX,
            },
        ),
    ];
    let mut out = Vec::new();
    for (name, msg) in worker {
        out.push(seed("ipc_worker_msg", name, ipc::encode(&msg).unwrap()));
    }
    let mut trailing = ipc::encode(&WorkerMsg::Start { stream_id: 0 }).unwrap();
    trailing.push(0);
    out.push(seed("ipc_worker_msg", "trailing-byte", trailing));
    out.push(seed("ipc_worker_msg", "bad-tag", vec![0xff, 0xff, 0xff]));
    let broker = [
        (
            "welcome",
            BrokerMsg::Welcome {
                version: PROTOCOL_VERSION,
                client_id: 3,
                caps: caps.clone(),
            },
        ),
        (
            "welcome-nothing",
            BrokerMsg::Welcome {
                version: PROTOCOL_VERSION,
                client_id: u32::MAX,
                caps: vec![],
            },
        ),
        (
            "refused",
            BrokerMsg::Refused {
                reason: "too many workers".into(),
            },
        ),
        (
            "refused-long",
            BrokerMsg::Refused {
                reason: "é".repeat(200),
            },
        ),
        (
            "prepared",
            BrokerMsg::Prepared {
                stream_id: 0,
                ring_capacity: 23040,
            },
        ),
        (
            "prepared-huge",
            BrokerMsg::Prepared {
                stream_id: 1,
                ring_capacity: u64::MAX,
            },
        ),
        ("done", BrokerMsg::Done { stream_id: 1 }),
        (
            "failed",
            BrokerMsg::Failed {
                stream_id: 0,
                reason: ipc::reason("invalid params (NotSupp)"),
            },
        ),
        (
            "failed-unicode",
            BrokerMsg::Failed {
                stream_id: 0,
                reason: "\u{1F50A}\u{0}".repeat(80),
            },
        ),
        ("xrun", BrokerMsg::Xrun { stream_id: 0 }),
        (
            "gain-changed",
            BrokerMsg::GainChanged {
                stream_id: 0,
                gain: virtio_snd::ctl::Gain {
                    volume: 88,
                    mute: true,
                },
            },
        ),
        (
            "host-presence",
            BrokerMsg::HostPresence {
                stream_id: 2,
                present: false,
            },
        ),
    ];
    for (name, msg) in broker {
        out.push(seed("ipc_broker_msg", name, ipc::encode(&msg).unwrap()));
    }
    out
}

fn ring() -> Vec<Seed> {
    let honest = |cap| {
        let mut ops = Vec::new();
        for i in 0..40u8 {
            ops.push(Op::Push(7 + i % 5));
            ops.push(Op::Push(cap as u8));
            ops.push(Op::Pop(5 + i % 7));
            if i % 9 == 0 {
                ops.push(Op::Queued);
                ops.push(Op::Available);
                ops.push(Op::Free);
            }
        }
        ops
    };
    let mut out = Vec::new();
    for cap in [1u16, 7, 16, 256] {
        out.push(seed(
            "ring",
            format!("honest-{cap}"),
            ring::seed(cap, &honest(cap)),
        ));
    }
    let with = [
        Op::PushWith(10, 0),
        Op::Pop(6),
        Op::PushWith(10, 0),
        Op::PushWith(5, 0),
        Op::Pop(16),
        Op::PushWith(12, 2),
        Op::PushWith(12, 1),
        Op::Queued,
        Op::PushWith(12, 0),
        Op::Skip(3),
        Op::Pop(16),
        Op::Skip(1000),
        Op::Available,
    ];
    out.push(seed("ring", "push-with", ring::seed(16, &with)));
    let hostile = [
        Op::Push(8),
        Op::ForgeWritePos(Forged::Raw(100)),
        Op::Available,
        Op::ForgeWritePos(Forged::Delta(-100)),
        Op::Pop(4),
        Op::ForgeReadPos(Forged::Delta(5)),
        Op::Queued,
        Op::ForgeReadPos(Forged::Delta(-7)),
        Op::Push(1),
        Op::ForgeReadPos(Forged::Raw(4)),
        Op::Free,
        Op::ForgeReadPos(Forged::Raw(3)),
        Op::Queued,
        Op::ForgeWritePos(Forged::Delta(1)),
        Op::Pop(16),
        Op::ForgeWritePos(Forged::Raw(u64::MAX)),
        Op::Skip(1),
    ];
    out.push(seed("ring", "hostile-positions", ring::seed(16, &hostile)));
    // Each bound of each check, and one past it.
    let bounds = [
        Op::Push(8),
        Op::ForgeReadPos(Forged::Raw(9)),
        Op::Queued,
        Op::ForgeReadPos(Forged::Raw(8)),
        Op::Free,
        Op::ForgeWritePos(Forged::Raw(17)),
        Op::Available,
        Op::ForgeWritePos(Forged::Raw(16)),
        Op::Pop(16),
        Op::ForgeWritePos(Forged::Raw(15)),
        Op::Available,
        Op::ForgeReadPos(Forged::Raw(7)),
        Op::Queued,
    ];
    out.push(seed("ring", "hostile-bounds", ring::seed(16, &bounds)));
    let ahead = [
        Op::Push(4),
        Op::ForgeReadPos(Forged::Delta(4)),
        Op::Push(16),
        Op::Pop(16),
        Op::Queued,
        Op::ForgeWritePos(Forged::Delta(16)),
        Op::Available,
        Op::Pop(255),
    ];
    out.push(seed("ring", "hostile-ahead", ring::seed(16, &ahead)));
    let data = [
        Op::Push(16),
        Op::ForgeData(3, 0xee),
        Op::ForgeData(40, 1),
        Op::Pop(16),
        Op::BackendDelay(480),
        Op::BackendDelay(u64::MAX),
    ];
    out.push(seed("ring", "hostile-data", ring::seed(16, &data)));
    out
}

fn config() -> Vec<Seed> {
    let mut out = Vec::new();
    let valid = [
        ("empty", String::new()),
        ("e2e", E2E_CONFIG.to_string()),
        // The tests replace $DIR with their directory; a seed needs an absolute path too.
        ("wav", WAV_CONFIG.replace("$DIR", "/var/lib/vsound")),
        (
            "buses",
            "[[streams]]\nname = \"media\"\ndirection = \"output\"\nhda_fn_nid = 0\n\
             [[streams]]\nname = \"navigation\"\ndirection = \"output\"\nhda_fn_nid = 1\n\
             rates = [48000, 24000]\n"
                .to_string(),
        ),
        (
            "full",
            "[[jacks]]\nname = \"Line Out\"\nhda_reg_defconf = 0x01014010\nremap = true\n\
             [[jacks]]\nname = \"Mic\"\nconnected = false\n\
             [[streams]]\nname = \"out\"\ndirection = \"output\"\nformats = [\"S16\", \"float64\"]\n\
             rates = [8000, 384000]\nchannels_min = 2\nchannels_max = 18\nbackend = \"null\"\n\
             [[streams]]\nname = \"in\"\ndirection = \"input\"\nbackend = \"alsa\"\nalsa_device = \"hw:0\"\n\
             [[chmaps]]\ndirection = \"output\"\npositions = [\"FL\", \"FR\", \"BRC\"]\n\
             [[chmaps]]\ndirection = \"input\"\nhda_fn_nid = 2\npositions = [\"MONO\"]\n\
             [limits]\nmax_buffer_bytes = 16777216\nlookahead_periods = 16\n"
                .to_string(),
        ),
        ("tiny-buffer", "[limits]\nmax_buffer_bytes = 1\nlookahead_periods = 2\n".to_string()),
    ];
    for (name, text) in valid {
        assert!(
            Config::parse(&text).is_ok(),
            "seed config {name} is invalid"
        );
        out.push(seed("config", name, text.into_bytes()));
    }
    let invalid = [
        (
            "dsd",
            "[[streams]]\nname='a'\ndirection='output'\nformats=['DSD_U8']",
        ),
        (
            "rate",
            "[[streams]]\nname='a'\ndirection='output'\nrates=[12345]",
        ),
        (
            "channels-order",
            "[[streams]]\nname='a'\ndirection='output'\nchannels_min=3\nchannels_max=2",
        ),
        (
            "channels-max",
            "[[streams]]\nname='a'\ndirection='output'\nchannels_max=19",
        ),
        (
            "wav-without-path",
            "[[streams]]\nname='a'\ndirection='output'\nbackend='wav'",
        ),
        (
            "position",
            "[[chmaps]]\ndirection='output'\npositions=['XX']",
        ),
        ("lookahead", "[limits]\nlookahead_periods=1"),
        ("unknown-key", "unknown_key=1"),
        ("no-streams", "streams = []"),
        (
            "name-too-long",
            "[[jacks]]\nname='aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'",
        ),
        ("not-toml", "[[streams]\nname="),
    ];
    for (name, text) in invalid {
        assert!(Config::parse(text).is_err(), "seed config {name} is valid");
        out.push(seed(
            "config",
            format!("invalid-{name}"),
            text.as_bytes().to_vec(),
        ));
    }
    out
}
