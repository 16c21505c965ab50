//! A hostile guest floods the worker with buffers it would hold (republished heads, far more
//! chains than the queue size over time) and with malformed chains, while one of its streams
//! plays: the worker's memory and its log stay bounded, the flood gets its status, and the
//! playing stream keeps its pace and its audio.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::frontend::{FrontendOptions, GuestVm, RawDesc, UsedBuf};
use common::vsound::*;
use virtio_snd::protocol as p;
use vsound_shared::ratelimit::{GUEST_LOG_BURST, GUEST_LOG_PERIOD};

const CONFIG: &str = r#"
[[streams]]
name = "media"
direction = "output"
backend = "wav"
wav_path = "$DIR/played-{client}.wav"
formats = ["S16"]
rates = [48000]
[[streams]]
name = "flood"
direction = "output"
backend = "null"
formats = ["S16"]
rates = [48000]
[[streams]]
name = "mic"
direction = "input"
backend = "null"
formats = ["S16"]
rates = [48000]
"#;

const PLAYING: u32 = 0;
const FLOOD_OUT: u32 = 1;
const FLOOD_IN: u32 = 2;
const QUEUE_SIZE: u16 = 256;
/// Chains held on each of the tx and rx queues (3 descriptors each), and event buffers held.
const HELD_TX: usize = 60;
const HELD_RX: usize = 60;
const HELD_EVENTS: usize = 100;
/// Heads republished per queue per round, and rounds: 3200 republished heads per queue,
/// 12.5 times the queue size, while the device holds the originals.
const BURST: usize = 32;
const ROUNDS: usize = 100;
const OK: u32 = 0x8000;
const BAD_MSG: u32 = 0x8001;

/// A process's resident memory from /proc/PID/status, in KiB: VmRSS is RssAnon (its own
/// heap and stacks) + RssFile (its binary and libraries) + RssShmem (the pages of guest memory
/// and rings it has touched, shared with the VMM and the broker).
#[derive(Debug, Clone, Copy)]
struct Rss {
    vm_rss: u64,
    anon: u64,
    file: u64,
    shmem: u64,
}

impl std::fmt::Display for Rss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VmRSS {} KiB (RssAnon {}, RssFile {}, RssShmem {})",
            self.vm_rss, self.anon, self.file, self.shmem
        )
    }
}

fn rss_kib(pid: u32) -> Rss {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    Rss {
        vm_rss: field("VmRSS:"),
        anon: field("RssAnon:"),
        file: field("RssFile:"),
        shmem: field("RssShmem:"),
    }
}

/// Stream 0, played the way the guest driver does, a period per tx buffer, `periods` in flight.
struct Player {
    params: Params,
    data: Vec<u8>,
    next_chunk: usize,
    in_flight: HashSet<u16>,
    started: Instant,
    /// Completion time and status of each buffer, in order.
    done: Vec<(Instant, u32)>,
}

impl Player {
    fn start(vm: &mut GuestVm, params: Params, periods: usize) -> Player {
        let data = known_signal(params.period_bytes as usize * periods, 7);
        let mut player = Player {
            params,
            data,
            next_chunk: 0,
            in_flight: HashSet::new(),
            started: Instant::now(),
            done: Vec::new(),
        };
        for _ in 0..params.periods {
            player.submit_next(vm);
        }
        player.started = Instant::now();
        assert_eq!(control(vm, &pcm(p::R_PCM_START, PLAYING)), OK);
        player
    }

    fn submit_next(&mut self, vm: &mut GuestVm) {
        let period = self.params.period_bytes as usize;
        let Some(chunk) = self.data.chunks(period).nth(self.next_chunk) else {
            return;
        };
        let head = tx_submit(vm, PLAYING, chunk);
        self.in_flight.insert(head);
        self.next_chunk += 1;
    }

    /// Takes a completion if it is one of ours, and queues the next period.
    fn take(&mut self, vm: &mut GuestVm, used: &UsedBuf) -> bool {
        if !self.in_flight.remove(&used.head) {
            return false;
        }
        self.done
            .push((Instant::now(), split_status(used, 0).status));
        self.submit_next(vm);
        true
    }

    fn finished(&self) -> bool {
        self.in_flight.is_empty()
    }

    /// The longest wait for a completion among buffers `range` (the first one measured from
    /// START), and the earliest any buffer completed relative to its real-time end.
    fn worst_gap(&self, range: std::ops::Range<usize>) -> Duration {
        range
            .map(|i| {
                let previous = if i == 0 {
                    self.started
                } else {
                    self.done[i - 1].0
                };
                self.done[i].0 - previous
            })
            .max()
            .unwrap()
    }
}

/// Serves every used element waiting on the tx queue: ours go to the player, the others are the
/// flood's, checked to carry BAD_MSG. Returns how many flood completions it saw.
fn drain_tx(vm: &mut GuestVm, player: &mut Player) -> usize {
    let mut flood = 0;
    while let Some(used) = vm.try_used(p::TX_QUEUE) {
        if !player.take(vm, &used) {
            assert_eq!(
                status_of(&used.written),
                BAD_MSG,
                "republished tx head {}",
                used.head
            );
            flood += 1;
        }
    }
    flood
}

/// An rx chain whose status buffer the test can read itself (a short completion returns only
/// the status length, which the harness maps onto the first writable bytes).
struct HeldRx {
    head: u16,
    status_addr: u64,
}

fn submit_rx(vm: &mut GuestVm, stream: u32, frames: u32) -> HeldRx {
    let header = vm.alloc_guest(4);
    vm.write_guest(header, &stream.to_le_bytes());
    let frames_addr = vm.alloc_guest(u64::from(frames));
    let status_addr = vm.alloc_guest(8);
    let desc = |addr, len, write| RawDesc { addr, len, write };
    let head = vm.submit_raw(
        p::RX_QUEUE,
        &[
            desc(header, 4, false),
            desc(frames_addr, frames, true),
            desc(status_addr, 8, true),
        ],
    );
    HeldRx { head, status_addr }
}

#[test]
fn republished_heads_are_refused_and_the_worker_stays_bounded() {
    let opts = FrontendOptions {
        queue_size: QUEUE_SIZE,
        ..FrontendOptions::default()
    };
    let mut rig = Rig::start(Some(CONFIG), opts);
    let pid = rig.worker.pid();
    let vm = &mut rig.vm;
    // 8 periods in flight: the test thread's own delays (it also runs the flood) must not
    // underrun the stream.
    let params = Params {
        periods: 8,
        ..Params::s16_48k(PLAYING)
    };
    let flood_out = Params::s16_48k(FLOOD_OUT);
    let flood_in = Params::s16_48k(FLOOD_IN);
    for params in [&params, &flood_out, &flood_in] {
        prepare(vm, params);
    }
    // The flood streams are never started: the device holds their buffers.
    let period = vec![0u8; flood_out.period_bytes as usize];
    let held_tx: Vec<u16> = (0..HELD_TX)
        .map(|_| tx_submit(vm, FLOOD_OUT, &period))
        .collect();
    let held_rx: Vec<HeldRx> = (0..HELD_RX)
        .map(|_| submit_rx(vm, FLOOD_IN, flood_in.period_bytes))
        .collect();
    vm.kick(p::RX_QUEUE);
    let held_events: Vec<u16> = (0..HELD_EVENTS)
        .map(|_| {
            vm.submit_no_kick(
                p::EVENT_QUEUE,
                &[],
                &[std::mem::size_of::<p::Event>() as u32],
            )
        })
        .collect();
    vm.kick(p::EVENT_QUEUE);
    std::thread::sleep(Duration::from_millis(200));
    for queue in [p::TX_QUEUE, p::RX_QUEUE, p::EVENT_QUEUE] {
        assert!(vm.try_used(queue).is_none(), "queue {queue}: not held");
    }

    // Phase 1: stream 0 plays alone (the baseline); phase 2: the same stream while the guest
    // republishes held heads on the three queues.
    let baseline_periods = 30;
    let mut player = Player::start(vm, params, 200);
    while player.done.len() < baseline_periods {
        let used = vm.wait_used(p::TX_QUEUE, WAIT).expect("tx completion");
        assert!(player.take(vm, &used), "only stream 0 completes");
    }
    let before = rss_kib(pid);
    let flood_from = player.done.len();

    let mut refused = [0usize; 3];
    for round in 0..ROUNDS {
        for k in 0..BURST {
            let i = round * BURST + k;
            vm.republish(p::TX_QUEUE, held_tx[i % HELD_TX]);
            vm.republish(p::RX_QUEUE, held_rx[i % HELD_RX].head);
            vm.republish(p::EVENT_QUEUE, held_events[i % HELD_EVENTS]);
        }
        for queue in [p::TX_QUEUE, p::RX_QUEUE, p::EVENT_QUEUE] {
            vm.kick(queue);
        }
        // Each republished head is answered at once; stream 0 is served meanwhile.
        let deadline = Instant::now() + WAIT;
        let mut got = [0usize; 3];
        while got != [BURST; 3] {
            assert!(
                Instant::now() < deadline,
                "round {round}: flood answered {got:?}"
            );
            got[0] += drain_tx(vm, &mut player);
            while let Some(used) = vm.try_used(p::RX_QUEUE) {
                assert_eq!(used.len, 8, "only the status");
                let rx = held_rx.iter().find(|r| r.head == used.head).unwrap();
                assert_eq!(status_of(&vm.read_guest(rx.status_addr, 8)), BAD_MSG);
                got[1] += 1;
            }
            while let Some(used) = vm.try_used(p::EVENT_QUEUE) {
                assert_eq!(used.len, 0, "event buffer {} returned empty", used.head);
                got[2] += 1;
            }
            if got != [BURST; 3] {
                vm.wait_call(p::TX_QUEUE, Duration::from_millis(2));
            }
        }
        for (total, n) in refused.iter_mut().zip(got) {
            *total += n;
        }
    }
    let flood_until = player.done.len();
    let after = rss_kib(pid);
    eprintln!(
        "flood: {refused:?} republished heads refused (tx, rx, event; queue size {QUEUE_SIZE}) \
         during periods {flood_from}..{flood_until}; worker before: {before}; after: {after}"
    );
    // Held lists cannot grow: whatever the guest publishes, the worker's own memory stays
    // where it was (1 MiB of slack for the allocator; 9600 held chains would take more).
    assert!(
        after.anon <= before.anon + 1024,
        "RssAnon grew from {} to {} KiB",
        before.anon,
        after.anon
    );
    assert!(
        after.vm_rss <= before.vm_rss + 1024,
        "VmRSS grew from {} to {} KiB",
        before.vm_rss,
        after.vm_rss
    );
    assert!(
        flood_until > flood_from + 2,
        "the flood overlapped only {} periods of playback",
        flood_until - flood_from
    );

    while !player.finished() {
        let used = vm.wait_used(p::TX_QUEUE, WAIT).expect("tx completion");
        assert!(player.take(vm, &used), "only stream 0 completes");
    }
    assert!(player.done.iter().all(|&(_, status)| status == OK));
    // On time: never before its real-time end, and no wait during the flood beyond the
    // baseline's worst plus one period.
    let period_len = params.period();
    for (i, &(at, _)) in player.done.iter().enumerate() {
        let end = player.started + period_len * (i as u32 + 1);
        assert!(
            at + Duration::from_millis(2) >= end,
            "buffer {i} completed {:?} before its end",
            end - at
        );
    }
    let baseline = player.worst_gap(1..flood_from);
    let flooded = player.worst_gap(flood_from..flood_until);
    eprintln!("stream 0 worst completion gap: baseline {baseline:?}, during the flood {flooded:?}");
    assert!(
        flooded <= baseline + period_len,
        "stream 0 stalled {flooded:?} during the flood (baseline {baseline:?})"
    );

    // The originals were held all along: RELEASE completes them, once each.
    assert_eq!(control(vm, &pcm(p::R_PCM_RELEASE, FLOOD_OUT)), OK);
    assert_eq!(control(vm, &pcm(p::R_PCM_RELEASE, FLOOD_IN)), OK);
    let mut returned: HashMap<u16, usize> = HashMap::new();
    for queue in [p::TX_QUEUE, p::RX_QUEUE] {
        while let Some(used) = vm.wait_used(queue, Duration::from_millis(500)) {
            *returned.entry(used.head).or_default() += 1;
        }
    }
    assert_eq!(returned.values().sum::<usize>(), HELD_TX + HELD_RX);
    assert_eq!(vm.in_flight(p::TX_QUEUE), 0);
    assert_eq!(vm.in_flight(p::RX_QUEUE), 0);

    assert_eq!(control(vm, &pcm(p::R_PCM_STOP, PLAYING)), OK);
    assert_eq!(control(vm, &pcm(p::R_PCM_RELEASE, PLAYING)), OK);
    let played = wav_s16_bytes(&rig.path("played-1.wav"));
    assert!(
        played == player.data,
        "stream 0's audio differs from the guest's"
    );
    assert!(rig.worker.is_running());
}

/// A worker whose stderr goes to `log`, at RUST_LOG=warn.
fn spawn_logging_worker(dir: &Path, broker: &Path, log: &Path) -> (Proc, PathBuf) {
    let socket = dir.join("vm.sock");
    let mut cmd = Command::new(common::bins::worker());
    cmd.arg("--socket")
        .arg(&socket)
        .arg("--broker")
        .arg(broker)
        .args(["--vm", "vm"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    if nix::unistd::Uid::effective().is_root() {
        cmd.args(["--user", "nobody", "--group", "nogroup"]);
    }
    let mut proc = Proc {
        child: cmd.spawn().expect("start worker"),
    };
    wait_for_path(&socket, &mut proc);
    (proc, socket)
}

/// Submits one malformed chain of the given kind on its queue; returns the queue.
fn submit_malformed(vm: &mut GuestVm, kind: usize, scratch: u64) -> u16 {
    let desc = |addr, len, write| RawDesc { addr, len, write };
    match kind % 4 {
        // A device-readable descriptor after a device-writable one.
        0 => {
            vm.submit_raw(
                p::TX_QUEUE,
                &[desc(scratch, 8, true), desc(scratch + 64, 4, false)],
            );
            p::TX_QUEUE
        }
        1 => {
            vm.submit_raw(
                p::RX_QUEUE,
                &[desc(scratch, 8, true), desc(scratch + 64, 4, false)],
            );
            p::RX_QUEUE
        }
        // No room for a status.
        2 => {
            vm.submit_raw(
                p::TX_QUEUE,
                &[desc(scratch + 64, 4, false), desc(scratch, 4, true)],
            );
            p::TX_QUEUE
        }
        _ => {
            vm.submit_raw(p::CONTROL_QUEUE, &[desc(scratch + 64, 4, false)]);
            p::CONTROL_QUEUE
        }
    }
}

/// Every log line after byte `from` of the file.
fn lines_since(log: &Path, from: usize) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap();
    text[from.min(text.len())..]
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The counts of "N more guest-triggered log lines suppressed" lines.
fn suppressed_counts(lines: &[String]) -> Vec<u64> {
    lines
        .iter()
        .filter_map(|l| {
            let (before, _) = l.split_once(" more guest-triggered log lines suppressed")?;
            before.rsplit(' ').next()?.parse().ok()
        })
        .collect()
}

#[test]
fn a_flood_of_malformed_chains_logs_a_bounded_number_of_lines() {
    let dir = tempfile::tempdir().unwrap();
    let (_broker, broker_socket) = spawn_broker(dir.path(), None);
    let log = dir.path().join("worker.log");
    let (mut worker, socket) = spawn_logging_worker(dir.path(), &broker_socket, &log);
    let mut vm = GuestVm::connect(&socket, FrontendOptions::default()).unwrap();
    let scratch = vm.alloc_guest(128);
    // Probe once so that start-up lines are behind us.
    assert_eq!(
        status_of(&vm.request(p::CONTROL_QUEUE, &query(p::R_PCM_INFO, 0, 1, 32), 36)),
        OK
    );
    let from = std::fs::metadata(&log).unwrap().len() as usize;

    let bad_chains = 4000;
    let started = Instant::now();
    for burst in 0..bad_chains / 40 {
        let mut pending = [0usize; p::NUM_QUEUES];
        for k in 0..40 {
            pending[submit_malformed(&mut vm, burst * 40 + k, scratch) as usize] += 1;
        }
        for queue in 0..p::NUM_QUEUES as u16 {
            if pending[queue as usize] > 0 {
                vm.kick(queue);
            }
        }
        for queue in 0..p::NUM_QUEUES as u16 {
            for _ in 0..pending[queue as usize] {
                let used = vm
                    .wait_used(queue, WAIT)
                    .expect("malformed chain completed");
                assert_eq!(used.len, 0, "queue {queue}: completed empty");
            }
        }
    }
    let flood_time = started.elapsed();
    // A head beyond the queue size: ignored (it cannot be returned), and counted like the rest.
    vm.publish_raw_head(p::TX_QUEUE, 1000);
    vm.kick(p::TX_QUEUE);
    std::thread::sleep(Duration::from_millis(100));
    assert!(vm.try_used(p::TX_QUEUE).is_none());
    let during = lines_since(&log, from);

    // Once the period is over, the next event (a valid request) reports the suppressed count.
    std::thread::sleep(GUEST_LOG_PERIOD + Duration::from_millis(200));
    assert_eq!(
        status_of(&vm.request(p::CONTROL_QUEUE, &query(p::R_PCM_INFO, 0, 1, 32), 36)),
        OK
    );
    std::thread::sleep(Duration::from_millis(200));
    let all = lines_since(&log, from);

    let periods = (flood_time.as_secs_f64() / GUEST_LOG_PERIOD.as_secs_f64()).ceil() as usize + 1;
    let bound = periods * (GUEST_LOG_BURST as usize + 1);
    let suppressed: u64 = suppressed_counts(&all).iter().sum();
    let logged = all.len() - suppressed_counts(&all).len();
    eprintln!(
        "{} bad chains in {flood_time:?}: {} log lines during the flood, {} in all ({logged} \
         logged + {} reports of {suppressed} suppressed); bound {bound}",
        bad_chains + 1,
        during.len(),
        all.len(),
        all.len() - logged,
    );
    assert!(
        during.len() <= bound,
        "{} lines for {bad_chains} bad chains:\n{}",
        during.len(),
        during.join("\n")
    );
    // Every bad chain is either logged or counted (the worker logs nothing else here).
    assert_eq!(
        logged as u64 + suppressed,
        bad_chains as u64 + 1,
        "{}",
        all.join("\n")
    );
    assert!(worker.is_running());
}

#[test]
fn an_rx_buffer_the_device_cannot_write_gets_bad_msg_at_the_capture_pace() {
    let mut rig = Rig::start(Some(CONFIG), FrontendOptions::default());
    let vm = &mut rig.vm;
    let params = Params::s16_48k(FLOOD_IN);
    prepare(vm, &params);
    // Frames outside guest memory, status inside: like a tx buffer the device cannot read.
    let header = vm.alloc_guest(4);
    vm.write_guest(header, &FLOOD_IN.to_le_bytes());
    let status = vm.alloc_guest(8);
    let desc = |addr, len, write| RawDesc { addr, len, write };
    vm.submit_raw(
        p::RX_QUEUE,
        &[
            desc(header, 4, false),
            desc(1 << 40, params.period_bytes, true),
            desc(status, 8, true),
        ],
    );
    vm.kick(p::RX_QUEUE);
    let good = submit_rx(vm, FLOOD_IN, params.period_bytes);
    vm.kick(p::RX_QUEUE);
    let started = Instant::now();
    assert_eq!(control(vm, &pcm(p::R_PCM_START, FLOOD_IN)), OK);
    let bad = vm.wait_used(p::RX_QUEUE, WAIT).expect("completed");
    let at = started.elapsed();
    assert_eq!(bad.len, 8, "no frames, only the status");
    assert_eq!(status_of(&vm.read_guest(status, 8)), BAD_MSG);
    assert!(
        at + Duration::from_millis(2) >= params.period(),
        "completed after {at:?}, before its period was captured"
    );
    // The stream goes on.
    let used = vm.wait_used(p::RX_QUEUE, WAIT).expect("completed");
    assert_eq!(used.head, good.head);
    assert_eq!(used.len, params.period_bytes + 8);
    assert_eq!(status_of(&vm.read_guest(good.status_addr, 8)), OK);
    assert!(rig.worker.is_running());
}
