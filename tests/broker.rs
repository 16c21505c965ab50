//! The broker treats every worker as compromised: bad messages, ids, params, fds and ring
//! positions disconnect that worker (or fail that request) while the other workers play on.

mod common;

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use common::vsound::{spawn_broker, Proc};
use virtio_snd::control::{PcmCaps, PcmParams};
use virtio_snd::protocol as p;
use vsound_shared::ipc::{BrokerMsg, Channel, IpcError, WorkerMsg, PROTOCOL_VERSION};
use vsound_shared::ring::{Producer, SharedRing};

const REPLY: Duration = Duration::from_secs(5);

fn caps(direction: u8) -> PcmCaps {
    PcmCaps {
        direction,
        hda_fn_nid: 0,
        features: 0,
        formats: 1 << p::format::S16,
        rates: 1 << p::rate::R48000,
        channels_min: 1,
        channels_max: 2,
    }
}

fn params() -> PcmParams {
    PcmParams {
        buffer_bytes: 4 * 1920,
        period_bytes: 1920,
        features: 0,
        channels: 2,
        format: p::format::S16,
        rate: p::rate::R48000,
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    broker: Proc,
    socket: std::path::PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (broker, socket) = spawn_broker(dir.path(), None);
    Setup {
        _dir: dir,
        broker,
        socket,
    }
}

fn recv(channel: &Channel) -> Result<(BrokerMsg, Vec<OwnedFd>), IpcError> {
    channel.wait_readable(Some(REPLY))?;
    channel.recv::<BrokerMsg>()
}

/// A VM name of its own for each connection (all of this test's are one uid's, and a newer
/// connection claiming a held name takes it over).
fn vm_name() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("vm{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Says Hello for a VM of its own with the default layout (an output and an input stream).
fn hello(setup: &Setup) -> Channel {
    let channel = Channel::connect(&setup.socket).unwrap();
    channel
        .send(
            &WorkerMsg::Hello {
                version: PROTOCOL_VERSION,
                vm: vm_name(),
                streams: vec![caps(p::D_OUTPUT), caps(p::D_INPUT)],
            },
            &[],
        )
        .unwrap();
    match recv(&channel).unwrap().0 {
        BrokerMsg::Welcome { caps: granted, .. } => {
            assert_eq!(granted.len(), 2);
            assert_eq!(granted[0].formats, 1 << p::format::S16);
        }
        other => panic!("expected Welcome, got {other:?}"),
    }
    channel
}

/// The broker hung up on this channel.
fn assert_dropped(channel: &Channel) {
    loop {
        match recv(channel) {
            Err(IpcError::Closed) | Err(IpcError::Io(_)) => return,
            Ok((BrokerMsg::Refused { .. }, _)) => continue,
            other => panic!("expected the broker to hang up, got {other:?}"),
        }
    }
}

fn prepare(channel: &Channel, stream_id: u32) -> (SharedRing, OwnedFd, OwnedFd, u64) {
    channel
        .send(
            &WorkerMsg::Prepare {
                stream_id,
                params: params(),
            },
            &[],
        )
        .unwrap();
    let (reply, mut fds) = recv(channel).unwrap();
    let BrokerMsg::Prepared { ring_capacity, .. } = reply else {
        panic!("expected Prepared, got {reply:?}");
    };
    assert_eq!(fds.len(), 2);
    let notify = fds.pop().unwrap();
    let ring_fd = fds.pop().unwrap();
    let raw = ring_fd.try_clone().unwrap();
    let ring = SharedRing::open(ring_fd, ring_capacity).unwrap();
    (ring, raw, notify, ring_capacity)
}

fn expect_done(channel: &Channel) {
    match recv(channel).unwrap().0 {
        BrokerMsg::Done { .. } => {}
        other => panic!("expected Done, got {other:?}"),
    }
}

#[test]
fn broken_messages_disconnect_only_that_worker() {
    let setup = setup();
    let good = hello(&setup);

    // Garbage instead of Hello.
    let bad = Channel::connect(&setup.socket).unwrap();
    rustix::net::send(
        &bad,
        &[0xde, 0xad, 0xbe, 0xef],
        rustix::net::SendFlags::empty(),
    )
    .unwrap();
    assert_dropped(&bad);

    // A valid message, but not Hello first.
    let bad = Channel::connect(&setup.socket).unwrap();
    bad.send(&WorkerMsg::Start { stream_id: 0 }, &[]).unwrap();
    assert_dropped(&bad);

    // Wrong protocol version: refused.
    let bad = Channel::connect(&setup.socket).unwrap();
    bad.send(
        &WorkerMsg::Hello {
            version: PROTOCOL_VERSION + 1,
            vm: vm_name(),
            streams: vec![],
        },
        &[],
    )
    .unwrap();
    assert!(matches!(recv(&bad).unwrap().0, BrokerMsg::Refused { .. }));
    assert_dropped(&bad);

    // Stream id out of range.
    let bad = hello(&setup);
    bad.send(&WorkerMsg::Start { stream_id: 7 }, &[]).unwrap();
    assert_dropped(&bad);

    // A second Hello.
    let bad = hello(&setup);
    bad.send(
        &WorkerMsg::Hello {
            version: PROTOCOL_VERSION,
            vm: vm_name(),
            streams: vec![],
        },
        &[],
    )
    .unwrap();
    assert_dropped(&bad);

    // Workers never send fds.
    let bad = hello(&setup);
    let file = File::open("/dev/null").unwrap();
    bad.send(&WorkerMsg::Stop { stream_id: 0 }, &[file.as_fd()])
        .unwrap();
    assert_dropped(&bad);

    // Too many streams in Hello.
    let bad = Channel::connect(&setup.socket).unwrap();
    bad.send(
        &WorkerMsg::Hello {
            version: PROTOCOL_VERSION,
            vm: vm_name(),
            streams: vec![caps(p::D_OUTPUT); 100],
        },
        &[],
    )
    .unwrap();
    assert_dropped(&bad);

    // The good worker was never disturbed.
    let _ = prepare(&good, 0);
    good.send(&WorkerMsg::Release { stream_id: 0 }, &[])
        .unwrap();
    expect_done(&good);
}

#[test]
fn invalid_requests_fail_without_disconnecting() {
    let setup = setup();
    let worker = hello(&setup);
    let bad_params = [
        PcmParams {
            period_bytes: 0,
            ..params()
        },
        PcmParams {
            buffer_bytes: 1000,
            ..params()
        },
        PcmParams {
            format: p::format::S32,
            ..params()
        },
        PcmParams {
            channels: 8,
            ..params()
        },
        PcmParams {
            buffer_bytes: u32::MAX - 127,
            period_bytes: 128,
            ..params()
        },
    ];
    for params in bad_params {
        worker
            .send(
                &WorkerMsg::Prepare {
                    stream_id: 0,
                    params,
                },
                &[],
            )
            .unwrap();
        let (reply, fds) = recv(&worker).unwrap();
        assert!(
            matches!(reply, BrokerMsg::Failed { .. }),
            "{params:?}: {reply:?}"
        );
        assert!(fds.is_empty());
    }
    // Illegal states.
    for msg in [
        WorkerMsg::Start { stream_id: 0 },
        WorkerMsg::Stop { stream_id: 1 },
        WorkerMsg::Release { stream_id: 0 },
    ] {
        worker.send(&msg, &[]).unwrap();
        assert!(matches!(recv(&worker).unwrap().0, BrokerMsg::Failed { .. }));
    }
    let _ = prepare(&worker, 0);
    worker.send(&WorkerMsg::Stop { stream_id: 0 }, &[]).unwrap();
    assert!(matches!(recv(&worker).unwrap().0, BrokerMsg::Failed { .. }));
    worker
        .send(&WorkerMsg::Start { stream_id: 0 }, &[])
        .unwrap();
    expect_done(&worker);
    worker
        .send(&WorkerMsg::Start { stream_id: 0 }, &[])
        .unwrap();
    assert!(matches!(recv(&worker).unwrap().0, BrokerMsg::Failed { .. }));
}

/// Reads the broker's published read position straight from the shared memory.
fn read_pos(raw: &File) -> u64 {
    let mut b = [0u8; 8];
    raw.read_exact_at(&mut b, 128).unwrap();
    u64::from_ne_bytes(b)
}

#[test]
fn hostile_ring_positions_disconnect_only_that_worker() {
    let setup = setup();
    let good = hello(&setup);
    let evil = hello(&setup);
    let (good_ring, good_raw, _n1, _) = prepare(&good, 0);
    let (_evil_ring, evil_raw, _n2, capacity) = prepare(&evil, 0);
    let good_raw = File::from(good_raw);
    let evil_raw = File::from(evil_raw);
    let mut producer = Producer::new(good_ring);
    for msg in [&good, &evil] {
        msg.send(&WorkerMsg::Start { stream_id: 0 }, &[]).unwrap();
        expect_done(msg);
    }
    // The evil worker claims to have written far more than the ring holds.
    evil_raw
        .write_all_at(&(capacity * 10).to_ne_bytes(), 64)
        .unwrap();
    assert_dropped(&evil);

    // The good one keeps being consumed at the real-time rate.
    let period = vec![0x11u8; 1920];
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut pushed = 0u64;
    while pushed < 20 * 1920 {
        assert!(Instant::now() < deadline, "good worker's ring stalled");
        if producer.push(&period).unwrap() {
            pushed += 1920;
        } else {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    assert!(read_pos(&good_raw) > 10 * 1920);
    assert!(setup_is_alive(setup));
}

fn setup_is_alive(mut setup: Setup) -> bool {
    setup.broker.is_running()
}

#[test]
fn a_worker_going_backwards_is_caught() {
    let setup = setup();
    let evil = hello(&setup);
    let (ring, raw, _notify, _) = prepare(&evil, 0);
    let raw = File::from(raw);
    let mut producer = Producer::new(ring);
    assert!(producer.push(&[0u8; 3840]).unwrap());
    evil.send(&WorkerMsg::Start { stream_id: 0 }, &[]).unwrap();
    expect_done(&evil);
    // Wait until the broker consumed some, then move the write position behind its reader.
    let deadline = Instant::now() + Duration::from_secs(5);
    while read_pos(&raw) == 0 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(2));
    }
    raw.write_all_at(&0u64.to_ne_bytes(), 64).unwrap();
    assert_dropped(&evil);
    let mut setup = setup;
    assert!(setup.broker.is_running());
    // A new worker is served.
    let _ = hello(&setup);
}
