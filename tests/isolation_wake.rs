//! Issue 9, defect 1: a compromised worker must not be able to block the broker through the
//! wake-up fd it receives with each ring. A hostile client speaking the broker's wire protocol
//! with its own encoder prepares streams, makes their wake-up fds blocking, never reads them (and
//! floods or shuts down what it can), while a good worker plays at real time on another
//! connection: the good stream keeps the pace of a baseline measured in the same test, a fresh
//! worker is welcomed, the broker's thread is never parked in write(), and the attacker's fds
//! are freed once it is gone.

mod common;

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use common::frontend::{FrontendOptions, GuestVm};
use common::pipewire::PipeWire;
use common::vsound::*;
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use serde::{Deserialize, Serialize};
use virtio_snd::protocol as p;

// --- The hostile client's own encoder of the wire format (src/shared/ipc.rs): bincode 2's standard
// configuration over serde, one message per SOCK_SEQPACKET packet, variants in wire order. ---

#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
struct WireCaps {
    direction: u8,
    hda_fn_nid: u32,
    features: u32,
    formats: u64,
    rates: u64,
    channels_min: u8,
    channels_max: u8,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
struct WireParams {
    buffer_bytes: u32,
    period_bytes: u32,
    features: u32,
    channels: u8,
    format: u8,
    rate: u8,
}

#[derive(Serialize, Deserialize, Debug)]
enum ToBroker {
    Hello {
        version: u32,
        vm: String,
        streams: Vec<WireCaps>,
    },
    Prepare {
        stream_id: u32,
        params: WireParams,
    },
    Start {
        stream_id: u32,
    },
    Stop {
        stream_id: u32,
    },
    Release {
        stream_id: u32,
    },
}

// Decoded in full (that is the wire format), not every field is looked at.
#[allow(dead_code)]
#[derive(Serialize, Deserialize, Debug)]
enum FromBroker {
    Welcome {
        version: u32,
        client_id: u32,
        caps: Vec<WireCaps>,
    },
    Refused {
        reason: String,
    },
    Prepared {
        stream_id: u32,
        ring_capacity: u64,
    },
    Done {
        stream_id: u32,
    },
    Failed {
        stream_id: u32,
        reason: String,
    },
    Xrun {
        stream_id: u32,
    },
}

const WIRE_VERSION: u32 = 3;

struct Hostile {
    socket: OwnedFd,
}

impl Hostile {
    fn connect(path: &Path) -> Hostile {
        let socket = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        rustix::net::connect(&socket, &SocketAddrUnix::new(path).unwrap()).unwrap();
        Hostile { socket }
    }

    fn send(&self, msg: &ToBroker) {
        let bytes = bincode::serde::encode_to_vec(msg, bincode::config::standard()).unwrap();
        let mut control = SendAncillaryBuffer::default();
        rustix::net::sendmsg(
            &self.socket,
            &[IoSlice::new(&bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        )
        .unwrap();
    }

    /// The next message that is not an xrun report, with its fds; `None` after `timeout`.
    fn recv(&self, timeout: Duration) -> Option<(FromBroker, Vec<OwnedFd>)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let wait = Timespec {
                tv_sec: left.as_secs() as i64,
                tv_nsec: i64::from(left.subsec_nanos()),
            };
            let mut fds = [PollFd::new(&self.socket, PollFlags::IN)];
            if poll(&mut fds, Some(&wait)).ok()? == 0 {
                return None;
            }
            let mut buf = vec![0u8; 8193];
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let got = rustix::net::recvmsg(
                &self.socket,
                &mut [IoSliceMut::new(&mut buf)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
            )
            .ok()?;
            if got.bytes == 0 {
                return None;
            }
            let mut received = Vec::new();
            for message in control.drain() {
                if let RecvAncillaryMessage::ScmRights(fds) = message {
                    received.extend(fds);
                }
            }
            let (msg, _): (FromBroker, usize) =
                bincode::serde::decode_from_slice(&buf[..got.bytes], bincode::config::standard())
                    .unwrap();
            if !matches!(msg, FromBroker::Xrun { .. }) {
                return Some((msg, received));
            }
        }
    }

    /// Hello with the default config's two streams, for a VM of its own (a newer connection
    /// of the same uid claiming a held name would take it over); true if the broker answered
    /// Welcome.
    fn hello(&self, timeout: Duration) -> bool {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let caps = |direction| WireCaps {
            direction,
            hda_fn_nid: 0,
            features: 0,
            formats: 1 << p::format::S16,
            rates: 1 << p::rate::R48000,
            channels_min: 1,
            channels_max: 2,
        };
        self.send(&ToBroker::Hello {
            version: WIRE_VERSION,
            vm: format!("hostile{}", NEXT.fetch_add(1, Ordering::Relaxed)),
            streams: vec![caps(p::D_OUTPUT), caps(p::D_INPUT)],
        });
        matches!(self.recv(timeout), Some((FromBroker::Welcome { .. }, _)))
    }

    /// PREPARE a 10 ms stream; returns its ring memfd, the ring's capacity and its wake-up fd.
    fn prepare(&self, stream_id: u32) -> (OwnedFd, u64, OwnedFd) {
        self.send(&ToBroker::Prepare {
            stream_id,
            params: WireParams {
                buffer_bytes: 4 * 1920,
                period_bytes: 1920,
                features: 0,
                channels: 2,
                format: p::format::S16,
                rate: p::rate::R48000,
            },
        });
        match self.recv(Duration::from_secs(5)) {
            Some((FromBroker::Prepared { ring_capacity, .. }, fds)) if fds.len() == 2 => {
                let mut fds = fds.into_iter();
                (fds.next().unwrap(), ring_capacity, fds.next().unwrap())
            }
            other => panic!("expected Prepared with two fds, got {other:?}"),
        }
    }

    fn start(&self, stream_id: u32) {
        self.send(&ToBroker::Start { stream_id });
        match self.recv(Duration::from_secs(5)) {
            Some((FromBroker::Done { .. }, _)) => {}
            other => panic!("expected Done, got {other:?}"),
        }
    }
}

/// What a worker can do to the wake-up fd it was given, short of reading it: make it blocking,
/// fill it (an eventfd's counter to its maximum; a socket is filled by never reading it), and
/// try to queue data towards the broker.
fn make_blocking_and_fill(notify: BorrowedFd<'_>) -> &'static str {
    let flags = rustix::fs::fcntl_getfl(notify).unwrap();
    rustix::fs::fcntl_setfl(notify, flags - rustix::fs::OFlags::NONBLOCK).unwrap();
    let kind = std::fs::read_link(format!("/proc/self/fd/{}", notify.as_raw_fd()))
        .unwrap()
        .to_string_lossy()
        .into_owned();
    if kind.contains("eventfd") {
        // The counter's largest value: the next write of 1 would overflow, so it blocks.
        rustix::io::write(notify, &(u64::MAX - 1).to_ne_bytes()).unwrap();
        "eventfd"
    } else {
        // Nothing can be queued towards the broker's end: it is shut for reading.
        let sent = rustix::net::send(
            notify,
            &[0u8; 512],
            SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
        );
        assert_eq!(
            sent,
            Err(rustix::io::Errno::PIPE),
            "a worker can queue data on the broker's end"
        );
        "socket"
    }
}

/// Packets (or counter reads) queued on the hostile end of a wake-up fd, drained without
/// blocking.
fn drain_count(notify: BorrowedFd<'_>) -> usize {
    let mut count = 0;
    let mut byte = [0u8; 8];
    while count < 1_000_000 {
        match rustix::net::recv(notify, &mut byte, RecvFlags::DONTWAIT) {
            Ok((n, _)) if n > 0 => count += 1,
            _ => break,
        }
    }
    count
}

/// Timing of one run of the good stream.
#[derive(Debug)]
struct Run {
    /// Longest time between two consecutive completions.
    worst_gap: Duration,
    /// START to last completion.
    total: Duration,
}

/// Plays `count` periods on the good VM; `Err` with what was seen if a completion takes more
/// than `stall` (the broker is stuck).
fn play_timed(
    vm: &mut GuestVm,
    params: &Params,
    count: usize,
    stall: Duration,
) -> Result<Run, String> {
    let data = pattern(params.period_bytes as usize * count, 7);
    let mut chunks = data.chunks(params.period_bytes as usize);
    let mut in_flight = 0;
    for chunk in chunks.by_ref().take(params.periods as usize) {
        tx_submit(vm, params.stream, chunk);
        in_flight += 1;
    }
    let started = Instant::now();
    assert_eq!(control(vm, &pcm(p::R_PCM_START, params.stream)), 0x8000);
    let mut last = started;
    let mut worst_gap = Duration::ZERO;
    let mut done = 0;
    while in_flight > 0 {
        let Some(used) = vm.wait_used(p::TX_QUEUE, stall) else {
            return Err(format!(
                "completion {done} of {count} did not come within {stall:?}"
            ));
        };
        let now = Instant::now();
        assert_eq!(split_status(&used, 0).status, 0x8000);
        worst_gap = worst_gap.max(now - last);
        last = now;
        done += 1;
        in_flight -= 1;
        if let Some(chunk) = chunks.next() {
            tx_submit(vm, params.stream, chunk);
            in_flight += 1;
        }
    }
    assert_eq!(control(vm, &pcm(p::R_PCM_STOP, params.stream)), 0x8000);
    Ok(Run {
        worst_gap,
        total: last - started,
    })
}

/// Keeps a hostile playback ring full (write position = read position + capacity, the most it
/// may publish; the header layout of src/shared/ring.rs), so that the broker consumes and wakes the
/// worker at every period whatever its backend, until `stop` is set.
fn keep_ring_full(
    ring: OwnedFd,
    capacity: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    use std::os::unix::fs::FileExt;
    const WRITE_POS: u64 = 64;
    const READ_POS: u64 = 128;
    let file = std::fs::File::from(ring);
    std::thread::spawn(move || {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let mut read_pos = [0u8; 8];
            if file.read_at(&mut read_pos, READ_POS).is_ok() {
                let full = u64::from_ne_bytes(read_pos) + capacity;
                let _ = file.write_at(&full.to_ne_bytes(), WRITE_POS);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    })
}

/// The current system call of each of the broker's threads (from /proc: the call number first,
/// "running" if none) with its wait channel.
fn broker_threads(pid: u32) -> Vec<(String, String, String)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .map(|task| {
            let path = task.path();
            let read = |name: &str| {
                std::fs::read_to_string(path.join(name))
                    .unwrap_or_default()
                    .trim()
                    .to_string()
            };
            (
                task.file_name().to_string_lossy().into_owned(),
                read("syscall"),
                read("wchan"),
            )
        })
        .collect()
}

/// write()'s number: the old eventfd wake-up parked the broker's thread there.
const WRITE_NR: &str = if cfg!(target_arch = "aarch64") {
    "64"
} else {
    "1"
};

fn open_fds(pid: u32) -> Option<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count())
}

/// The attack, against whatever backends the rig's broker has for its two streams.
fn attack_while_a_good_worker_plays(vm: &mut GuestVm, broker_pid: u32, broker_socket: &Path) {
    let params = Params::s16_48k(0);
    let period = params.period();
    let periods = 60;
    // A completion later than this means the broker stopped: far beyond any load jitter.
    let stall = Duration::from_secs(3);

    prepare(vm, &params);
    // The worse of two runs: the jitter this machine has right now, without an attacker.
    let first = play_timed(vm, &params, periods, stall).expect("baseline run");
    let second = play_timed(vm, &params, periods, stall).expect("baseline run");
    let baseline = Run {
        worst_gap: first.worst_gap.max(second.worst_gap),
        total: first.total.max(second.total),
    };
    let fds_before = open_fds(broker_pid);

    // Attacker 2: shuts its wake-up fd down and closes it at once.
    let quitter = Hostile::connect(broker_socket);
    assert!(
        quitter.hello(Duration::from_secs(5)),
        "second hostile Hello"
    );
    let (_ring, _, notify) = quitter.prepare(0);
    let _ = rustix::net::shutdown(&notify, rustix::net::Shutdown::Both);
    drop(notify);
    quitter.start(0);

    // Attacker 1: both streams prepared and started, each wake-up fd made blocking and filled,
    // never read; its playback ring kept full so that every backend wakes it each period.
    let hostile = Hostile::connect(broker_socket);
    assert!(hostile.hello(Duration::from_secs(5)), "hostile Hello");
    let mut held = Vec::new();
    let mut kinds = Vec::new();
    let stop_feeding = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut feeder = None;
    for stream_id in [0, 1] {
        let (ring, capacity, notify) = hostile.prepare(stream_id);
        kinds.push(make_blocking_and_fill(notify.as_fd()));
        if stream_id == 0 {
            let ring = ring.try_clone().unwrap();
            feeder = Some(keep_ring_full(ring, capacity, stop_feeding.clone()));
        }
        held.push((ring, notify));
    }
    // Both at once: a broker that blocks at the first stream's first wake-up would never
    // answer the second START (what it answers is checked below, once the evidence is in).
    hostile.send(&ToBroker::Start { stream_id: 0 });
    hostile.send(&ToBroker::Start { stream_id: 1 });
    let attack_started = Instant::now();

    let attacked = play_timed(vm, &params, periods, stall);
    // A thread parked in write() shows it in every sample.
    let samples = 10;
    let mut in_write = std::collections::HashMap::<String, usize>::new();
    let mut parked = Vec::new();
    for _ in 0..samples {
        for (tid, syscall, wchan) in broker_threads(broker_pid) {
            if syscall.split_whitespace().next() == Some(WRITE_NR) {
                *in_write.entry(tid.clone()).or_default() += 1;
                parked.push(format!("thread {tid}: {syscall} [{wchan}]"));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let most_in_write = in_write.values().copied().max().unwrap_or(0);
    let starts_done = (0..2)
        .filter(|_| {
            matches!(
                hostile.recv(Duration::from_millis(500)),
                Some((FromBroker::Done { .. }, _))
            )
        })
        .count();
    let fresh = Hostile::connect(broker_socket);
    let welcomed = fresh.hello(Duration::from_secs(3));
    eprintln!(
        "wake-up fd kinds {kinds:?}; baseline {baseline:?}; under attack {attacked:?}; \
         a broker thread in write() in {most_in_write}/{samples} samples {:?}; \
         fresh worker welcomed: {welcomed}",
        parked.first()
    );
    let attacked = attacked.unwrap_or_else(|e| {
        panic!("the good stream stalled under attack: {e}; broker threads in write(): {parked:?}")
    });
    assert!(welcomed, "a fresh worker got no Welcome");
    assert_eq!(starts_done, 2, "the hostile STARTs were not both answered");
    assert!(
        most_in_write < samples / 2,
        "a broker thread sits in write(): {parked:?}"
    );
    // No stall beyond one period plus the jitter the baseline run had, and the same pace.
    assert!(
        attacked.worst_gap <= baseline.worst_gap + period,
        "worst gap {:?} under attack, {:?} in the baseline",
        attacked.worst_gap,
        baseline.worst_gap
    );
    assert!(
        attacked.total <= baseline.total + baseline.worst_gap + period,
        "{periods} periods took {:?} under attack, {:?} in the baseline",
        attacked.total,
        baseline.total
    );

    // The broker had to refuse wake-ups (it kept waking while the fd was full), and what it
    // queued stays bounded: far fewer packets than periods.
    let ticks = (attack_started.elapsed().as_millis() / 10) as usize;
    let queued = drain_count(held[1].1.as_fd());
    eprintln!("wake-ups queued on the unread capture fd: {queued} over about {ticks} periods");
    if kinds[1] == "socket" {
        assert!(
            queued < ticks / 2,
            "{queued} wake-ups queued over {ticks} periods"
        );
    }

    // The attackers leave: everything they held is freed.
    stop_feeding.store(true, std::sync::atomic::Ordering::Relaxed);
    feeder.unwrap().join().unwrap();
    drop(held);
    drop(hostile);
    drop(quitter);
    drop(fresh);
    if let Some(before) = fds_before {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let now = open_fds(broker_pid).unwrap();
            if now <= before {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the broker holds {now} fds, {before} before the attack"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // And the good stream still plays.
    play_timed(vm, &params, 10, stall).expect("after the attack");
}

/// Null backends: the wake-ups are sent from the broker's own loop (its stream timers).
#[test]
fn a_worker_cannot_block_the_broker_loop_through_its_wake_up_fd() {
    let mut rig = Rig::start(None, FrontendOptions::default());
    let pid = rig.broker.pid();
    attack_while_a_good_worker_plays(&mut rig.vm, pid, &rig.broker_socket.clone());
}

const PIPEWIRE_CONFIG: &str = r#"
[[streams]]
name = "media"
direction = "output"
backend = "pipewire"
formats = ["S16"]
rates = [48000]
target_object = "vsound-test-sink"
[[streams]]
name = "mic"
direction = "input"
backend = "pipewire"
formats = ["S16"]
rates = [48000]
target_object = "vsound-test-sink"
capture_sink = true
"#;

/// PipeWire backends: the wake-ups are sent from PipeWire's real-time data thread.
#[test]
fn a_worker_cannot_block_the_pipewire_data_thread_through_its_wake_up_fd() {
    let dir = tempfile::tempdir().unwrap();
    let pw = PipeWire::start(dir.path());
    let config = dir.path().join("vsound.toml");
    std::fs::write(&config, PIPEWIRE_CONFIG).unwrap();
    let (broker, broker_socket) = spawn_broker_with_env(dir.path(), Some(&config), &pw.env());
    let (_worker, socket) = spawn_worker(dir.path(), "vm", &broker_socket, Some(&config));
    let mut vm = GuestVm::connect(&socket, FrontendOptions::default()).unwrap();
    attack_while_a_good_worker_plays(&mut vm, broker.pid(), &broker_socket);
}

// --- The other direction: a hostile broker's wake-up fd must not block the worker. ---

/// Sends one message with `fds` on a SOCK_SEQPACKET socket, in the wire format.
fn send_with_fds<T: Serialize>(socket: BorrowedFd<'_>, msg: &T, fds: &[BorrowedFd<'_>]) {
    let bytes = bincode::serde::encode_to_vec(msg, bincode::config::standard()).unwrap();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        assert!(control.push(rustix::net::SendAncillaryMessage::ScmRights(fds)));
    }
    let _ = rustix::net::sendmsg(
        socket,
        &[IoSlice::new(&bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    );
}

/// One worker message, or `None` once it hung up.
fn recv_request(socket: BorrowedFd<'_>) -> Option<ToBroker> {
    let mut buf = vec![0u8; 8193];
    let got = rustix::net::recv(socket, &mut buf, RecvFlags::empty()).ok()?;
    if got.0 == 0 {
        return None;
    }
    bincode::serde::decode_from_slice(&buf[..got.0], bincode::config::standard())
        .ok()
        .map(|(msg, _)| msg)
}

/// A broker that answers like the real one, but hands out as each stream's wake-up fd an
/// eventfd (what brokers used to send) it keeps a duplicate of, made blocking, and races the
/// worker for: it signals it and reads the signal back itself, over and over, so a worker that
/// read() it after epoll said "readable" would sleep in that read.
fn hostile_broker(listener: OwnedFd, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::Ordering;
    let Ok(channel) = rustix::net::accept(&listener) else {
        return;
    };
    let mut racers = Vec::new();
    while let Some(msg) = recv_request(channel.as_fd()) {
        let reply = match msg {
            ToBroker::Hello {
                version, streams, ..
            } => FromBroker::Welcome {
                version,
                client_id: 1,
                caps: streams,
            },
            ToBroker::Prepare { stream_id, params } => {
                let capacity = u64::from(params.period_bytes) * 3;
                let (_ring, ring_fd) = vsound_shared::ring::SharedRing::create(capacity).unwrap();
                let notify =
                    rustix::event::eventfd(0, rustix::event::EventfdFlags::empty()).unwrap();
                let ours = notify.try_clone().unwrap();
                let stop = stop.clone();
                racers.push(std::thread::spawn(move || {
                    let mut counter = [0u8; 8];
                    while !stop.load(Ordering::Relaxed) {
                        let _ = rustix::io::write(&ours, &1u64.to_ne_bytes());
                        let _ = rustix::io::read(&ours, &mut counter);
                    }
                    // Let a worker stuck in read() go, so that the test can end.
                    let _ = rustix::io::write(&ours, &1u64.to_ne_bytes());
                }));
                send_with_fds(
                    channel.as_fd(),
                    &FromBroker::Prepared {
                        stream_id,
                        ring_capacity: capacity,
                    },
                    &[ring_fd.as_fd(), notify.as_fd()],
                );
                continue;
            }
            ToBroker::Start { stream_id }
            | ToBroker::Stop { stream_id }
            | ToBroker::Release { stream_id } => FromBroker::Done { stream_id },
        };
        send_with_fds(channel.as_fd(), &reply, &[]);
    }
    // The worker hung up on us (it refused the fd): no second chance.
    for racer in racers {
        racer.join().unwrap();
    }
}

#[test]
fn a_hostile_brokers_wake_up_fd_cannot_block_the_worker() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("broker.sock");
    let listener = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .unwrap();
    rustix::net::bind(&listener, &SocketAddrUnix::new(&socket).unwrap()).unwrap();
    rustix::net::listen(&listener, 8).unwrap();
    // Tests run as root start the worker as nobody.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let broker = {
        let stop = stop.clone();
        std::thread::spawn(move || hostile_broker(listener, stop))
    };
    let (_worker, vm_socket) = spawn_worker(dir.path(), "vm", &socket, None);
    let mut vm = GuestVm::connect(&vm_socket, FrontendOptions::default()).unwrap();
    let params = Params::s16_48k(0);
    prepare(&mut vm, &params);
    // The worker refused the fd and plays on its own clock: the guest's stream keeps its
    // real-time pace and the device answers.
    let periods = 30;
    let run = play_timed(&mut vm, &params, periods, Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let run = run.expect("the worker's device thread stalled");
    eprintln!("behind a hostile broker's wake-up fd: {run:?}");
    assert!(
        run.total >= params.period() * (periods as u32 - 2),
        "{periods} periods in {:?}: not paced",
        run.total
    );
    assert_eq!(
        status_of(&vm.request(p::CONTROL_QUEUE, &query(p::R_PCM_INFO, 0, 1, 32), 36)),
        0x8000
    );
    drop(vm);
    broker.join().unwrap();
}

const ASOUNDRC: &str = r#"
pcm.vsound_test {
    type pipewire
    playback_node "vsound-test-sink"
    capture_node "vsound-test-sink"
}
"#;

const ALSA_CONFIG: &str = r#"
[[streams]]
name = "media"
direction = "output"
backend = "alsa"
alsa_device = "vsound_test"
formats = ["S16"]
rates = [48000]
[[streams]]
name = "mic"
direction = "input"
backend = "alsa"
alsa_device = "vsound_test"
formats = ["S16"]
rates = [48000]
"#;

/// ALSA backends (a PCM of the PipeWire ALSA plugin): the wake-ups are sent from the ALSA
/// path, on the broker's loop.
#[test]
fn a_worker_cannot_block_the_alsa_path_through_its_wake_up_fd() {
    let dir = tempfile::tempdir().unwrap();
    let pw = PipeWire::start(dir.path());
    std::fs::write(dir.path().join(".asoundrc"), ASOUNDRC).unwrap();
    let config = dir.path().join("vsound.toml");
    std::fs::write(&config, ALSA_CONFIG).unwrap();
    let mut env = pw.env();
    env.push(("HOME", dir.path().to_path_buf()));
    let (broker, broker_socket) = spawn_broker_with_env(dir.path(), Some(&config), &env);
    let (_worker, socket) = spawn_worker(dir.path(), "vm", &broker_socket, Some(&config));
    let mut vm = GuestVm::connect(&socket, FrontendOptions::default()).unwrap();
    attack_while_a_good_worker_plays(&mut vm, broker.pid(), &broker_socket);
}
