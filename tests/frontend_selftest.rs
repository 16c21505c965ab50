//! Self-test of the in-process vhost-user frontend harness (tests/common/frontend.rs) against
//! a tiny "reverser" device served by `vhost-user-backend` in this process.

mod common;

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::frontend::{FrontendOptions, GuestVm, RawDesc};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

const EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;
const WAIT: Duration = Duration::from_secs(5);
const CONFIG: [u8; 16] = *b"reverser-config!";

/// When the [`Reverser`] signals the guest after adding used elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Signal {
    /// After each element the driver wants a call for (virtio-queue's `needs_notification`).
    Each,
    /// Once after all the elements of a kick (one call covers them all).
    Batch,
    /// Like `Batch`, but only this long after the elements were published.
    Late(Duration),
    /// Never: a device that forgets to signal.
    Never,
}

/// Queue 0: for every chain, reads all device-readable bytes and writes them reversed into the
/// device-writable descriptors (as much as fits). Queue 1: ignored (chains stay in flight).
struct Reverser {
    offer_event_idx: bool,
    event_idx: bool,
    signal: Signal,
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
}

impl Reverser {
    fn process_queue0(&self, vring: &VringRwLock) -> io::Result<()> {
        let mem = self
            .mem
            .as_ref()
            .ok_or_else(|| io::Error::other("no memory table"))?
            .memory();
        let mut state = vring.get_mut();
        let mut added = false;
        loop {
            if self.event_idx {
                state
                    .disable_notification()
                    .map_err(|e| io::Error::other(e.to_string()))?;
            }
            while let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem.clone()) {
                let head = chain.head_index();
                let mut input = Vec::new();
                let mut writable = Vec::new();
                for desc in chain {
                    if desc.is_write_only() {
                        writable.push(desc);
                    } else {
                        let mut buf = vec![0u8; desc.len() as usize];
                        mem.read_slice(&mut buf, desc.addr())
                            .map_err(|e| io::Error::other(e.to_string()))?;
                        input.extend_from_slice(&buf);
                    }
                }
                input.reverse();
                let mut out = &input[..];
                let mut written = 0u32;
                for desc in writable {
                    let n = out.len().min(desc.len() as usize);
                    mem.write_slice(&out[..n], desc.addr())
                        .map_err(|e| io::Error::other(e.to_string()))?;
                    out = &out[n..];
                    written += n as u32;
                }
                state
                    .add_used(head, written)
                    .map_err(|e| io::Error::other(e.to_string()))?;
                added = true;
                if self.signal == Signal::Each
                    && state
                        .needs_notification()
                        .map_err(|e| io::Error::other(e.to_string()))?
                {
                    state.signal_used_queue()?;
                }
            }
            if !self.event_idx
                || !state
                    .enable_notification()
                    .map_err(|e| io::Error::other(e.to_string()))?
            {
                break;
            }
        }
        let batch_wants_call = added
            && matches!(self.signal, Signal::Batch | Signal::Late(_))
            && state
                .needs_notification()
                .map_err(|e| io::Error::other(e.to_string()))?;
        drop(state);
        if batch_wants_call {
            if let Signal::Late(delay) = self.signal {
                thread::sleep(delay);
            }
            vring.signal_used_queue()?;
        }
        Ok(())
    }
}

impl VhostUserBackendMut for Reverser {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2
    }

    fn max_queue_size(&self) -> usize {
        256
    }

    fn features(&self) -> u64 {
        // virtio-queue follows indirect tables by itself.
        let mut f = (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.offer_event_idx {
            f |= EVENT_IDX;
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let (offset, size) = (offset as usize, size as usize);
        match CONFIG.get(offset..offset + size) {
            Some(s) => s.to_vec(),
            // An empty reply makes the library send a zero-size reply (= error).
            None => Vec::new(),
        }
    }

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        Some(new_event_consumer_and_notifier(EventFlag::NONBLOCK).expect("exit event"))
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        match device_event {
            0 => self.process_queue0(&vrings[0]),
            // Queue 1 is deliberately never serviced.
            _ => Ok(()),
        }
    }
}

/// A backend daemon running in a thread; it exits when the frontend disconnects.
struct TestBackend {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    done: mpsc::Receiver<String>,
}

impl TestBackend {
    fn start(offer_event_idx: bool) -> TestBackend {
        Self::start_signalling(offer_event_idx, Signal::Each)
    }

    fn start_signalling(offer_event_idx: bool, signal: Signal) -> TestBackend {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("reverser.sock");
        let (tx, done) = mpsc::channel();
        let path = socket.clone();
        thread::spawn(move || {
            // Start a little late so that GuestVm::connect has to retry.
            thread::sleep(Duration::from_millis(50));
            let backend = Arc::new(Mutex::new(Reverser {
                offer_event_idx,
                event_idx: false,
                signal,
                mem: None,
            }));
            let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
            let mut daemon = VhostUserDaemon::new("reverser".into(), backend, mem).unwrap();
            let mut listener = Listener::new(&path, true).unwrap();
            daemon.start(&mut listener).unwrap();
            let res = daemon.wait();
            for handler in daemon.get_epoll_handlers() {
                handler.send_exit_event();
            }
            let _ = tx.send(format!("{res:?}"));
        });
        TestBackend {
            _dir: dir,
            socket,
            done,
        }
    }

    fn connect(&self, opts: FrontendOptions) -> GuestVm {
        GuestVm::connect(&self.socket, opts).expect("connect to test backend")
    }

    /// Drops the VM (closing the socket) and checks that the daemon thread notices.
    fn finish(self, vm: GuestVm) {
        drop(vm);
        self.done
            .recv_timeout(WAIT)
            .expect("backend daemon did not exit after disconnect");
    }
}

fn reversed(data: &[u8]) -> Vec<u8> {
    data.iter().rev().copied().collect()
}

fn opts(event_idx: bool) -> FrontendOptions {
    FrontendOptions {
        num_queues: 2,
        event_idx,
        ..Default::default()
    }
}

#[test]
fn single_request_and_config() {
    let backend = TestBackend::start(false);
    // EVENT_IDX requested but not offered: must not be negotiated.
    let mut vm = backend.connect(opts(true));
    assert_eq!(vm.offered_features() & EVENT_IDX, 0);
    assert_eq!(vm.negotiated_features() & EVENT_IDX, 0);
    assert!(!vm.event_idx());
    assert_ne!(vm.negotiated_features() & (1 << VIRTIO_F_VERSION_1), 0);
    assert!(vm.negotiated_protocol_features().contains(
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    ));

    assert_eq!(vm.request(0, b"hello world", 64), b"dlrow olleh");
    assert_eq!(vm.in_flight(0), 0);
    assert!(vm.notifications(0) >= 1);

    assert_eq!(vm.get_config(0, 16).unwrap(), CONFIG);
    assert_eq!(vm.get_config(9, 6).unwrap(), b"config");
    assert_eq!(vm.request(0, b"abc", 3), b"cba");
    backend.finish(vm);
}

fn sequential_requests(event_idx: bool) {
    let backend = TestBackend::start(event_idx);
    let mut vm = backend.connect(opts(event_idx));
    assert_eq!(vm.event_idx(), event_idx);
    let free_before = vm.free_guest_bytes();
    for i in 0..1000usize {
        let len = 1 + (i * 37) % 3000;
        let req: Vec<u8> = (0..len).map(|j| (i + j) as u8).collect();
        let resp = vm.request(0, &req, len as u32 + 16);
        assert_eq!(resp, reversed(&req), "request {i}");
    }
    assert_eq!(vm.in_flight(0), 0);
    assert_eq!(vm.free_guest_bytes(), free_before, "data buffers leaked");
    backend.finish(vm);
}

#[test]
fn thousand_sequential_requests() {
    sequential_requests(false);
}

#[test]
fn thousand_sequential_requests_event_idx() {
    sequential_requests(true);
}

fn batch(event_idx: bool) {
    let backend = TestBackend::start(event_idx);
    let mut vm = backend.connect(opts(event_idx));
    for round in 0..50 {
        let mut heads = HashSet::new();
        for i in 0..10u8 {
            let req = [round as u8, i, 0xaa];
            assert!(heads.insert(vm.submit_no_kick(0, &[&req], &[8])));
        }
        assert_eq!(vm.in_flight(0), 10);
        vm.kick(0);
        for _ in 0..10 {
            let used = vm.wait_used(0, WAIT).expect("used element of batch");
            assert!(heads.remove(&used.head), "unexpected head {}", used.head);
            assert_eq!(used.len, 3);
            // The dummy backend answers with the request reversed: [0xaa, i, round].
            assert_eq!(used.written[0], 0xaa);
            assert_eq!(used.written[2], round as u8);
        }
        assert!(heads.is_empty());
        assert_eq!(vm.in_flight(0), 0);
        assert!(vm.try_used(0).is_none());
    }
    backend.finish(vm);
}

#[test]
fn batch_of_ten() {
    batch(false);
}

#[test]
fn batch_of_ten_event_idx() {
    batch(true);
}

#[test]
fn multi_descriptor_chain() {
    let backend = TestBackend::start(false);
    let mut vm = backend.connect(opts(false));
    let head = vm.submit(0, &[b"abc", b"defg"], &[3, 2, 10]);
    let used = vm.wait_used(0, WAIT).unwrap();
    assert_eq!(used.head, head);
    assert_eq!(used.len, 7);
    assert_eq!(used.written, b"gfedcba");

    // Raw descriptors into a caller-owned buffer.
    let buf = vm.alloc_guest(64);
    vm.write_guest(buf, b"xyz");
    let head = vm.submit_raw(
        0,
        &[
            RawDesc {
                addr: buf,
                len: 3,
                write: false,
            },
            RawDesc {
                addr: buf + 32,
                len: 8,
                write: true,
            },
        ],
    );
    vm.kick(0);
    let used = vm.wait_used(0, WAIT).unwrap();
    assert_eq!((used.head, used.written.as_slice()), (head, &b"zyx"[..]));
    assert_eq!(vm.read_guest(buf + 32, 3), b"zyx");
    vm.free_guest(buf, 64);
    backend.finish(vm);
}

#[test]
fn unserviced_queue_stays_in_flight() {
    let backend = TestBackend::start(false);
    let mut vm = backend.connect(opts(false));
    vm.submit(1, &[b"nobody reads this"], &[16]);
    assert_eq!(vm.in_flight(1), 1);
    assert!(vm.wait_used(1, Duration::from_millis(100)).is_none());
    assert_eq!(vm.in_flight(1), 1);
    // Queue 0 still works meanwhile.
    assert_eq!(vm.request(0, b"12", 2), b"21");
    backend.finish(vm);
}

#[test]
#[should_panic(expected = "does not fit")]
fn descriptor_exhaustion_panics() {
    let backend = TestBackend::start(false);
    let mut vm = backend.connect(FrontendOptions {
        queue_size: 8,
        ..opts(false)
    });
    for _ in 0..4 {
        vm.submit(1, &[b"x"], &[1]);
    }
    // 4 chains of 2 descriptors use the whole queue.
    vm.submit(1, &[b"x"], &[1]);
}

/// A device that publishes used elements but never signals: every wait for them fails, with or
/// without EVENT_IDX, although the elements are there (polling finds them).
fn never_signalled(event_idx: bool) {
    let backend = TestBackend::start_signalling(event_idx, Signal::Never);
    let mut vm = backend.connect(opts(event_idx));
    assert_eq!(vm.event_idx(), event_idx);
    let head = vm.submit(0, &[b"unannounced"], &[16]);
    let started = Instant::now();
    let err = vm
        .try_wait_used(0, Duration::from_millis(100))
        .expect_err("a used buffer without a call must not be taken");
    // The grace for a late call was given before failing.
    assert!(started.elapsed() >= Duration::from_secs(1), "{err}");
    assert_eq!((err.queue, err.used_idx, err.last_used), (0, 1, 0), "{err}");
    assert_eq!(err.notifications, 0);
    assert!(
        err.to_string()
            .starts_with("used buffer on queue 0 without an interrupt"),
        "{err}"
    );
    assert_eq!(vm.in_flight(0), 1, "the element was not taken");
    // It is there: the opt-out polls it.
    vm.suppress_interrupts(0);
    let used = vm.wait_used(0, WAIT).expect("polled");
    assert_eq!(
        (used.head, used.written.as_slice()),
        (head, &b"decnuonnanu"[..])
    );
    assert_eq!(vm.request(0, b"polled", 8), b"dellop");
    assert_eq!(vm.notifications(0), 0);
    backend.finish(vm);
}

#[test]
fn a_used_buffer_without_a_call_fails_the_wait() {
    never_signalled(false);
}

#[test]
fn a_used_buffer_without_a_call_fails_the_wait_event_idx() {
    never_signalled(true);
}

#[test]
#[should_panic(expected = "used buffer on queue 0 without an interrupt")]
fn wait_used_panics_on_a_missing_call() {
    let backend = TestBackend::start_signalling(false, Signal::Never);
    let mut vm = backend.connect(opts(false));
    vm.request(0, b"x", 1);
}

#[test]
#[should_panic(expected = "used buffer on queue 0 without an interrupt")]
fn try_used_panics_on_a_missing_call() {
    let backend = TestBackend::start_signalling(false, Signal::Never);
    let mut vm = backend.connect(opts(false));
    vm.submit(0, &[b"x"], &[1]);
    // Only once the element is published does try_used look for its call.
    let deadline = Instant::now() + WAIT;
    while vm.try_used(0).is_none() {
        assert!(Instant::now() < deadline, "never published");
        thread::sleep(Duration::from_millis(5));
    }
}

/// The device publishes, then signals a moment later: the element is taken, but only once the
/// call came.
#[test]
fn a_late_call_is_waited_for() {
    let delay = Duration::from_millis(300);
    let backend = TestBackend::start_signalling(false, Signal::Late(delay));
    let mut vm = backend.connect(opts(false));
    for i in 0..3u8 {
        let started = Instant::now();
        assert_eq!(vm.request(0, &[i, 1, 2], 3), [2, 1, i]);
        assert!(
            started.elapsed() >= delay,
            "taken after {:?}, before the call",
            started.elapsed()
        );
    }
    backend.finish(vm);
}

/// One call for a whole batch announces every element of it.
#[test]
fn one_call_covers_a_batch() {
    let backend = TestBackend::start_signalling(false, Signal::Batch);
    let mut vm = backend.connect(opts(false));
    let heads: HashSet<u16> = (0..10u8)
        .map(|i| vm.submit_no_kick(0, &[&[i]], &[1]))
        .collect();
    vm.kick(0);
    let got: HashSet<u16> = (0..10)
        .map(|_| vm.wait_used(0, WAIT).expect("element of the batch").head)
        .collect();
    assert_eq!(got, heads);
    assert_eq!(vm.notifications(0), 1, "one call for the batch");
    assert!(vm.try_used(0).is_none());
    backend.finish(vm);
}

/// With EVENT_IDX, suppressing interrupts keeps used_event behind the used index: a device that
/// honours it (virtio-queue's `needs_notification`) sends no more calls, and polling still
/// finds every element.
#[test]
fn suppressed_interrupts_are_not_sent_with_event_idx() {
    let backend = TestBackend::start(true);
    let mut vm = backend.connect(opts(true));
    assert!(vm.event_idx());
    assert_eq!(vm.request(0, b"ab", 2), b"ba");
    let calls = vm.notifications(0);
    assert!(calls >= 1);
    vm.suppress_interrupts(0);
    for i in 0..20u8 {
        assert_eq!(vm.request(0, &[i, 7], 2), [7, i]);
    }
    assert_eq!(vm.notifications(0), calls, "called while suppressed");
    backend.finish(vm);
}

/// An indirect chain takes one ring descriptor, however long its table: eight chains of five
/// descriptors fit a queue of eight, and the device reads and writes through the tables.
#[test]
fn indirect_chains_take_one_ring_descriptor_each() {
    let backend = TestBackend::start(false);
    let mut vm = backend.connect(FrontendOptions {
        queue_size: 8,
        indirect_desc: true,
        ..opts(false)
    });
    assert!(vm.indirect_desc());
    assert_ne!(
        vm.negotiated_features() & (1 << VIRTIO_RING_F_INDIRECT_DESC),
        0
    );
    let free_before = vm.free_guest_bytes();
    let mut heads = HashMap::new();
    for i in 0..8u8 {
        let head = vm.submit_indirect_no_kick(0, &[&[i, 1], &[2, 3, 4]], &[2, 1, 8]);
        assert!(heads.insert(head, i).is_none());
    }
    vm.kick(0);
    for _ in 0..8 {
        let used = vm.wait_used(0, WAIT).expect("indirect chain completed");
        let i = heads
            .remove(&used.head)
            .unwrap_or_else(|| panic!("unexpected head {}", used.head));
        assert_eq!(used.written, [4, 3, 2, 1, i]);
    }
    assert_eq!(vm.in_flight(0), 0);
    assert_eq!(
        vm.free_guest_bytes(),
        free_before,
        "tables or buffers leaked"
    );
    // Direct and indirect chains mix on one queue.
    assert_eq!(vm.request(0, b"direct", 6), b"tcerid");
    vm.submit_indirect(0, &[b"indirect"], &[8]);
    assert_eq!(vm.wait_used(0, WAIT).unwrap().written, b"tceridni");
    backend.finish(vm);
}

#[test]
#[should_panic(expected = "indirect descriptors without VIRTIO_RING_F_INDIRECT_DESC")]
fn indirect_chains_need_the_feature() {
    let backend = TestBackend::start(false);
    let mut vm = backend.connect(opts(false));
    assert!(!vm.indirect_desc());
    vm.submit_indirect(0, &[b"x"], &[1]);
}
