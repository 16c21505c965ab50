//! In-process vhost-user frontend (the VMM side) for integration tests.
//!
//! [`GuestVm`] connects to a vhost-user backend socket, negotiates features, shares a
//! memfd-backed guest memory with the backend and drives split virtqueues that it lays out
//! itself in that memory. Tests then submit descriptor chains and collect used buffers
//! synchronously:
//!
//! ```ignore
//! let mut vm = GuestVm::connect(&socket, FrontendOptions::default())?;
//! let resp = vm.request(0, b"hello", 64);
//! ```
//!
//! Guest memory layout (guest physical address 0 is the start of the memfd):
//!
//! ```text
//! [queue 0 area][queue 1 area]...[queue n-1 area][data buffers ........................]
//!  each area (page aligned): descriptor table | avail ring (+used_event) | used ring (+avail_event)
//! ```
//!
//! Descriptors are recycled through a per-queue free list and data buffers through a first-fit
//! allocator, both released as soon as the chain comes back in the used ring, so tests can
//! run any number of chains as long as the number in flight fits.
//!
//! Used buffers are taken only once the device announced them, as a guest driver sleeping on
//! its interrupt would see them: by a call notification observed after they were published,
//! or, with `EVENT_IDX`, because they were already published when the driver last moved
//! `used_event` (the device owes no call for those). A used element that stays unannounced
//! fails the wait ([`MissingInterrupt`]); a test whose point is a driver that wants no
//! interrupts opts its queue out with [`GuestVm::suppress_interrupts`].

use std::collections::BTreeMap;
use std::io;
use std::num::Wrapping;
use std::os::fd::BorrowedFd;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::EfdFlags;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// How long [`GuestVm::connect`] keeps retrying to reach the socket.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Socket read/write timeout for vhost-user control messages, so that a stuck backend makes the
/// test fail instead of hanging forever.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeout used by [`GuestVm::request`].
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a queue whose interrupts are suppressed ([`GuestVm::suppress_interrupts`]) is
/// polled for used elements.
const POLL_SLICE: Duration = Duration::from_millis(20);
/// How long a used element may wait for its call notification (the device publishes, then
/// signals) before the wait fails, at least: a loaded machine may delay the device's signal.
const INTERRUPT_GRACE: Duration = Duration::from_secs(2);

const PAGE_SIZE: u64 = 4096;
/// Data buffers are allocated in multiples of this.
const BUF_ALIGN: u64 = 16;

/// Options of [`GuestVm::connect`].
#[derive(Clone, Debug)]
pub struct FrontendOptions {
    /// Size of every virtqueue (power of two, at most 32768). Default 64.
    pub queue_size: u16,
    /// Number of virtqueues to set up. Default 4.
    pub num_queues: usize,
    /// Negotiate `VIRTIO_RING_F_EVENT_IDX` if the backend offers it. Default false.
    pub event_idx: bool,
    /// Negotiate `VIRTIO_RING_F_INDIRECT_DESC` if the backend offers it, which
    /// [`GuestVm::submit_indirect`] needs. Default false.
    pub indirect_desc: bool,
    /// Guest memory size in bytes. Default 16 MiB.
    pub mem_size: usize,
    /// Extra device feature bits to acknowledge if offered (in addition to `VIRTIO_F_VERSION_1`,
    /// `VHOST_USER_F_PROTOCOL_FEATURES` and, if requested, `EVENT_IDX` and `INDIRECT_DESC`).
    /// Default 0.
    pub extra_features: u64,
    /// Kick only when the device asks for it, as Linux's `virtqueue_kick_prepare` decides
    /// (EVENT_IDX: the new buffers crossed avail_event; otherwise the used ring's NO_NOTIFY
    /// flag is clear), instead of after every submission. Default false.
    pub driver_kicks: bool,
}

impl Default for FrontendOptions {
    fn default() -> Self {
        FrontendOptions {
            queue_size: 64,
            num_queues: 4,
            event_idx: false,
            indirect_desc: false,
            mem_size: 16 << 20,
            extra_features: 0,
            driver_kicks: false,
        }
    }
}

/// One element taken from a used ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsedBuf {
    /// Head descriptor index of the chain.
    pub head: u16,
    /// Length reported by the device.
    pub len: u32,
    /// The first `len` bytes of the chain's device-writable descriptors, in order (truncated
    /// to the total writable size if the device reported more).
    pub written: Vec<u8>,
}

/// A descriptor for [`GuestVm::submit_raw`]: arbitrary guest address and length.
#[derive(Clone, Copy, Debug)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    /// Device-writable (`VRING_DESC_F_WRITE`).
    pub write: bool,
}

/// Bookkeeping for a chain that is in flight.
struct Chain {
    descs: Vec<u16>,
    /// Data buffers owned by the chain: (guest address, allocated size).
    bufs: Vec<(u64, u64)>,
    /// Device-writable descriptors: (guest address, length).
    writable: Vec<(u64, u32)>,
}

struct Queue {
    size: u16,
    desc_addr: u64,
    avail_addr: u64,
    used_addr: u64,
    free_descs: Vec<u16>,
    /// Indexed by head descriptor.
    chains: Vec<Option<Chain>>,
    /// Indexed by head descriptor: how many more times the head was published while in
    /// flight ([`GuestVm::republish`]), i.e. used elements expected before the chain's own.
    republished: Vec<u32>,
    in_flight: usize,
    next_avail: Wrapping<u16>,
    last_used: Wrapping<u16>,
    call: EventFd,
    kick: EventFd,
    notifications: u64,
    /// Avail index at the last kick decision, and the kicks made and left out
    /// ([`FrontendOptions::driver_kicks`]).
    kick_decided_at: Wrapping<u16>,
    kicks: u64,
    kicks_skipped: u64,
    /// Used index up to which the device announced its used elements: read after a call
    /// notification, or (EVENT_IDX) after moving used_event, when whatever is published
    /// already may have been published against the old used_event and owes no call.
    announced: Wrapping<u16>,
    /// Interrupts suppressed on purpose ([`GuestVm::suppress_interrupts`]): used elements
    /// are polled for and taken whether announced or not.
    polling: bool,
}

impl Queue {
    fn avail_flags_addr(&self) -> GuestAddress {
        GuestAddress(self.avail_addr)
    }
    fn avail_idx_addr(&self) -> GuestAddress {
        GuestAddress(self.avail_addr + 2)
    }
    fn avail_ring_addr(&self, slot: u16) -> GuestAddress {
        GuestAddress(self.avail_addr + 4 + 2 * u64::from(slot % self.size))
    }
    fn used_event_addr(&self) -> GuestAddress {
        GuestAddress(self.avail_addr + 4 + 2 * u64::from(self.size))
    }
    fn used_flags_addr(&self) -> GuestAddress {
        GuestAddress(self.used_addr)
    }
    fn used_idx_addr(&self) -> GuestAddress {
        GuestAddress(self.used_addr + 2)
    }
    fn avail_event_addr(&self) -> GuestAddress {
        GuestAddress(self.used_addr + 4 + 8 * u64::from(self.size))
    }
    fn used_elem_addr(&self, slot: u16) -> GuestAddress {
        GuestAddress(self.used_addr + 4 + 8 * u64::from(slot % self.size))
    }
    fn desc_entry_addr(&self, index: u16) -> GuestAddress {
        GuestAddress(self.desc_addr + 16 * u64::from(index))
    }

    /// The device's used index. The full fence orders the driver's earlier used_event store
    /// before this load (the device does the mirror image: store used->idx, fence, load
    /// used_event); Acquire makes the elements and data it publishes visible.
    fn used_idx(&self, mem: &GuestMemoryMmap) -> Wrapping<u16> {
        fence(Ordering::SeqCst);
        let idx: u16 = mem
            .load(self.used_idx_addr(), Ordering::Acquire)
            .expect("read used idx");
        Wrapping(u16::from_le(idx))
    }

    /// Reads a pending call notification, if any. The device signals after publishing, so
    /// every element published by the time it is read is announced.
    fn collect_call(&mut self, mem: &GuestMemoryMmap) -> bool {
        match self.call.read() {
            Ok(n) => {
                self.notifications += n;
                self.announced = self.used_idx(mem);
                true
            }
            Err(_) => false,
        }
    }

    /// How many of the pending used elements are announced.
    fn announced_pending(&self) -> u16 {
        let n = (self.announced - self.last_used).0;
        // Behind last_used: elements were taken by polling past what was announced.
        if n <= self.size {
            n
        } else {
            0
        }
    }

    /// Sleeps until the call eventfd is readable or `timeout` passed (without reading it).
    fn poll_call(&self, timeout: Duration) {
        let ms = timeout.as_millis().clamp(1, 1000) as u16;
        // SAFETY: the eventfd is owned by `self`, which outlives this borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(self.call.as_raw_fd()) };
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::from(ms));
    }
}

/// A used element that the device published without announcing it: no call notification came
/// within the grace (see [`GuestVm::try_wait_used`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MissingInterrupt {
    pub queue: u16,
    /// The device's used index and the driver's count of consumed elements.
    pub used_idx: u16,
    pub last_used: u16,
    /// How long the driver waited for the call after it first saw the element.
    pub waited: Duration,
    /// Call notifications observed on the queue so far.
    pub notifications: u64,
}

impl std::fmt::Display for MissingInterrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "used buffer on queue {} without an interrupt: used idx {}, driver consumed {}, no \
             call notification within {:?} of seeing it ({} notifications so far)",
            self.queue, self.used_idx, self.last_used, self.waited, self.notifications
        )
    }
}

impl std::error::Error for MissingInterrupt {}

/// First-fit allocator over a guest address range, with coalescing on free.
struct BufAllocator {
    /// start -> length of every free range.
    free: BTreeMap<u64, u64>,
}

impl BufAllocator {
    fn new(start: u64, len: u64) -> Self {
        let mut free = BTreeMap::new();
        if len > 0 {
            free.insert(start, len);
        }
        BufAllocator { free }
    }

    fn round(len: u64) -> u64 {
        len.max(1).div_ceil(BUF_ALIGN) * BUF_ALIGN
    }

    /// Returns (address, allocated size).
    fn alloc(&mut self, len: u64) -> Option<(u64, u64)> {
        let size = Self::round(len);
        let (&start, &flen) = self.free.iter().find(|(_, &l)| l >= size)?;
        self.free.remove(&start);
        if flen > size {
            self.free.insert(start + size, flen - size);
        }
        Some((start, size))
    }

    fn release(&mut self, mut start: u64, mut size: u64) {
        if let Some((&pstart, &plen)) = self.free.range(..start).next_back() {
            assert!(
                pstart + plen <= start,
                "double free of guest buffer {start:#x}"
            );
            if pstart + plen == start {
                self.free.remove(&pstart);
                start = pstart;
                size += plen;
            }
        }
        if let Some(nlen) = self.free.remove(&(start + size)) {
            size += nlen;
        }
        assert!(
            self.free.range(start..start + size).next().is_none(),
            "double free of guest buffer {start:#x}"
        );
        self.free.insert(start, size);
    }

    fn free_bytes(&self) -> u64 {
        self.free.values().sum()
    }
}

fn vhost_err(what: &str, e: vhost::Error) -> io::Error {
    io::Error::other(format!("vhost-user {what} failed: {e}"))
}

fn new_eventfd() -> io::Result<EventFd> {
    // Like QEMU's event notifiers: non-blocking and close-on-exec.
    EventFd::new((EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC).bits())
}

fn connect_with_retry(socket: &Path, timeout: Duration) -> io::Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(socket) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("connecting to {}: {e}", socket.display()),
                ))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// A fake guest plus VMM: owns the vhost-user connection, the guest memory and the virtqueues.
pub struct GuestVm {
    frontend: Frontend,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    alloc: BufAllocator,
    /// The guest memory's address in this process (rings are given to the backend in it).
    host_base: u64,
    /// Where buffers go: everything past the rings.
    data: (u64, u64),
    offered_features: u64,
    negotiated_features: u64,
    offered_protocol_features: VhostUserProtocolFeatures,
    negotiated_protocol_features: VhostUserProtocolFeatures,
    event_idx: bool,
    /// [`FrontendOptions::driver_kicks`].
    driver_kicks: bool,
}

impl GuestVm {
    /// Connects to the backend at `socket` (retrying for up to 5 s) and brings up
    /// `opts.num_queues` queues: SET_OWNER, GET/SET_FEATURES, GET/SET_PROTOCOL_FEATURES,
    /// SET_MEM_TABLE, then SET_VRING_NUM/ADDR/BASE/CALL/KICK/ENABLE for every queue.
    pub fn connect(socket: &Path, opts: FrontendOptions) -> io::Result<GuestVm> {
        let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
        let qsize = opts.queue_size;
        if qsize == 0 || !qsize.is_power_of_two() || qsize > 32768 {
            return Err(invalid(format!("bad queue size {qsize}")));
        }
        if opts.num_queues == 0 {
            return Err(invalid("num_queues must be at least 1".into()));
        }

        // Layout of one queue area.
        let q = u64::from(qsize);
        let desc_off = 0u64;
        let avail_off = 16 * q;
        let used_off = (avail_off + 6 + 2 * q).next_multiple_of(4);
        let area = (used_off + 6 + 8 * q).next_multiple_of(PAGE_SIZE);
        let data_start = area * opts.num_queues as u64;
        let mem_size = (opts.mem_size as u64).next_multiple_of(PAGE_SIZE);
        if data_start + PAGE_SIZE > mem_size {
            return Err(invalid(format!(
                "mem_size {mem_size:#x} too small for {} queues of size {qsize}",
                opts.num_queues
            )));
        }

        // Guest memory: one memfd region at guest physical address 0.
        let memfd = memfd::MemfdOptions::default()
            .close_on_exec(true)
            .create("vsound-test-guest")
            .map_err(|e| io::Error::other(format!("memfd_create: {e}")))?;
        let file = memfd.into_file();
        file.set_len(mem_size)?;
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0),
            mem_size as usize,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(|e| io::Error::other(format!("mapping guest memory: {e}")))?;

        // Control connection.
        let sock = connect_with_retry(socket, CONNECT_TIMEOUT)?;
        sock.set_read_timeout(Some(CONTROL_TIMEOUT))?;
        sock.set_write_timeout(Some(CONTROL_TIMEOUT))?;
        let mut frontend = Frontend::from_stream(sock, opts.num_queues as u64);
        // Ask for an ack on every message that has no reply of its own. This only has an
        // effect once REPLY_ACK is negotiated; it makes backend errors surface as errors here.
        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);

        frontend
            .set_owner()
            .map_err(|e| vhost_err("SET_OWNER", e))?;
        let offered_features = frontend
            .get_features()
            .map_err(|e| vhost_err("GET_FEATURES", e))?;
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let mut wanted = (1u64 << VIRTIO_F_VERSION_1) | protocol_bit | opts.extra_features;
        if opts.event_idx {
            wanted |= 1u64 << VIRTIO_RING_F_EVENT_IDX;
        }
        if opts.indirect_desc {
            wanted |= 1u64 << VIRTIO_RING_F_INDIRECT_DESC;
        }
        let negotiated_features = wanted & offered_features;
        frontend
            .set_features(negotiated_features)
            .map_err(|e| vhost_err("SET_FEATURES", e))?;

        let mut offered_protocol_features = VhostUserProtocolFeatures::empty();
        let mut negotiated_protocol_features = VhostUserProtocolFeatures::empty();
        if negotiated_features & protocol_bit != 0 {
            offered_protocol_features = frontend
                .get_protocol_features()
                .map_err(|e| vhost_err("GET_PROTOCOL_FEATURES", e))?;
            negotiated_protocol_features = offered_protocol_features
                & (VhostUserProtocolFeatures::CONFIG
                    | VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::REPLY_ACK);
            frontend
                .set_protocol_features(negotiated_protocol_features)
                .map_err(|e| vhost_err("SET_PROTOCOL_FEATURES", e))?;
        }
        if negotiated_protocol_features.contains(VhostUserProtocolFeatures::MQ) {
            let n = frontend
                .get_queue_num()
                .map_err(|e| vhost_err("GET_QUEUE_NUM", e))?;
            if n < opts.num_queues as u64 {
                return Err(invalid(format!(
                    "backend has {n} queues, {} requested",
                    opts.num_queues
                )));
            }
        }

        let region = mem.iter().next().expect("guest memory has one region");
        let region_info = VhostUserMemoryRegionInfo::from_guest_region(region)
            .map_err(|e| vhost_err("SET_MEM_TABLE (region info)", e))?;
        let host_base = region_info.userspace_addr;
        frontend
            .set_mem_table(&[region_info])
            .map_err(|e| vhost_err("SET_MEM_TABLE", e))?;

        let mut queues = Vec::with_capacity(opts.num_queues);
        for i in 0..opts.num_queues {
            let base = area * i as u64;
            let queue = Queue {
                size: qsize,
                desc_addr: base + desc_off,
                avail_addr: base + avail_off,
                used_addr: base + used_off,
                // Pop from the end: hand out low indices first.
                free_descs: (0..qsize).rev().collect(),
                chains: (0..qsize).map(|_| None).collect(),
                republished: vec![0; usize::from(qsize)],
                in_flight: 0,
                next_avail: Wrapping(0),
                last_used: Wrapping(0),
                call: new_eventfd()?,
                kick: new_eventfd()?,
                notifications: 0,
                kick_decided_at: Wrapping(0),
                kicks: 0,
                kicks_skipped: 0,
                announced: Wrapping(0),
                polling: false,
            };
            // The memfd starts zeroed, so the rings are already empty (flags, idx, used_event
            // and avail_event all 0), which the backend relies on: it reads used->idx on
            // SET_VRING_ADDR.
            frontend
                .set_vring_num(i, qsize)
                .map_err(|e| vhost_err("SET_VRING_NUM", e))?;
            // Ring addresses are in the frontend's virtual address space, like QEMU does;
            // the backend translates them through the SET_MEM_TABLE user_addr.
            let config = VringConfigData {
                queue_max_size: qsize,
                queue_size: qsize,
                flags: 0,
                desc_table_addr: host_base + queue.desc_addr,
                used_ring_addr: host_base + queue.used_addr,
                avail_ring_addr: host_base + queue.avail_addr,
                log_addr: None,
            };
            frontend
                .set_vring_addr(i, &config)
                .map_err(|e| vhost_err("SET_VRING_ADDR", e))?;
            frontend
                .set_vring_base(i, 0)
                .map_err(|e| vhost_err("SET_VRING_BASE", e))?;
            frontend
                .set_vring_call(i, &queue.call)
                .map_err(|e| vhost_err("SET_VRING_CALL", e))?;
            frontend
                .set_vring_kick(i, &queue.kick)
                .map_err(|e| vhost_err("SET_VRING_KICK", e))?;
            if negotiated_features & protocol_bit != 0 {
                frontend
                    .set_vring_enable(i, true)
                    .map_err(|e| vhost_err("SET_VRING_ENABLE", e))?;
            }
            queues.push(queue);
        }

        Ok(GuestVm {
            frontend,
            mem,
            queues,
            alloc: BufAllocator::new(data_start, mem_size - data_start),
            host_base,
            data: (data_start, mem_size - data_start),
            offered_features,
            negotiated_features,
            offered_protocol_features,
            negotiated_protocol_features,
            event_idx: negotiated_features & (1u64 << VIRTIO_RING_F_EVENT_IDX) != 0,
            driver_kicks: opts.driver_kicks,
        })
    }

    /// Virtio features acknowledged with SET_FEATURES.
    /// What QEMU does when the guest resets the device (a reboot, a driver reload): stops every
    /// ring (GET_VRING_BASE), then the new driver brings up fresh, empty rings at the same
    /// addresses (SET_VRING_NUM/ADDR/BASE 0/CALL/KICK/ENABLE). Every buffer the device held is
    /// forgotten on both sides.
    pub fn reset_rings(&mut self) -> io::Result<()> {
        for i in 0..self.queues.len() {
            self.frontend
                .get_vring_base(i)
                .map_err(|e| vhost_err("GET_VRING_BASE", e))?;
        }
        for (i, q) in self.queues.iter_mut().enumerate() {
            // A call still pending is the old ring's: it must not announce the new one's
            // elements.
            q.collect_call(&self.mem);
            let end = q.used_addr + 6 + 8 * u64::from(q.size);
            let zeros = vec![0u8; (end - q.desc_addr) as usize];
            self.mem
                .write_slice(&zeros, GuestAddress(q.desc_addr))
                .map_err(|e| io::Error::other(format!("clearing ring {i}: {e}")))?;
            q.free_descs = (0..q.size).rev().collect();
            q.chains = (0..q.size).map(|_| None).collect();
            q.republished = vec![0; usize::from(q.size)];
            q.in_flight = 0;
            q.next_avail = Wrapping(0);
            q.kick_decided_at = Wrapping(0);
            q.last_used = Wrapping(0);
            q.announced = Wrapping(0);
            // The new driver's avail flags and used_event are zero: interrupts wanted.
            q.polling = false;
            let config = VringConfigData {
                queue_max_size: q.size,
                queue_size: q.size,
                flags: 0,
                desc_table_addr: self.host_base + q.desc_addr,
                used_ring_addr: self.host_base + q.used_addr,
                avail_ring_addr: self.host_base + q.avail_addr,
                log_addr: None,
            };
            self.frontend
                .set_vring_num(i, q.size)
                .map_err(|e| vhost_err("SET_VRING_NUM", e))?;
            self.frontend
                .set_vring_addr(i, &config)
                .map_err(|e| vhost_err("SET_VRING_ADDR", e))?;
            self.frontend
                .set_vring_base(i, 0)
                .map_err(|e| vhost_err("SET_VRING_BASE", e))?;
            self.frontend
                .set_vring_call(i, &q.call)
                .map_err(|e| vhost_err("SET_VRING_CALL", e))?;
            self.frontend
                .set_vring_kick(i, &q.kick)
                .map_err(|e| vhost_err("SET_VRING_KICK", e))?;
            if self.negotiated_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
                self.frontend
                    .set_vring_enable(i, true)
                    .map_err(|e| vhost_err("SET_VRING_ENABLE", e))?;
            }
        }
        self.alloc = BufAllocator::new(self.data.0, self.data.1);
        Ok(())
    }

    pub fn negotiated_features(&self) -> u64 {
        self.negotiated_features
    }

    /// Virtio features returned by GET_FEATURES.
    pub fn offered_features(&self) -> u64 {
        self.offered_features
    }

    /// Protocol features returned by GET_PROTOCOL_FEATURES (empty if not negotiated).
    pub fn offered_protocol_features(&self) -> VhostUserProtocolFeatures {
        self.offered_protocol_features
    }

    /// Protocol features acknowledged with SET_PROTOCOL_FEATURES.
    pub fn negotiated_protocol_features(&self) -> VhostUserProtocolFeatures {
        self.negotiated_protocol_features
    }

    /// Whether `VIRTIO_RING_F_EVENT_IDX` was negotiated.
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    /// Whether `VIRTIO_RING_F_INDIRECT_DESC` was negotiated.
    pub fn indirect_desc(&self) -> bool {
        self.negotiated_features & (1u64 << VIRTIO_RING_F_INDIRECT_DESC) != 0
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    pub fn queue_size(&self) -> u16 {
        self.queues[0].size
    }

    /// VHOST_USER_GET_CONFIG for `len` bytes at `offset` (requires the CONFIG protocol
    /// feature). A backend that returns a payload of the wrong size gets an error here.
    pub fn get_config(&mut self, offset: u32, len: u32) -> io::Result<Vec<u8>> {
        let buf = vec![0u8; len as usize];
        let (_, payload) = self
            .frontend
            .get_config(offset, len, VhostUserConfigFlags::empty(), &buf)
            .map_err(|e| vhost_err("GET_CONFIG", e))?;
        Ok(payload)
    }

    /// VHOST_USER_SET_CONFIG (requires the CONFIG protocol feature).
    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> io::Result<()> {
        self.frontend
            .set_config(offset, VhostUserConfigFlags::WRITABLE, data)
            .map_err(|e| vhost_err("SET_CONFIG", e))
    }

    /// The underlying vhost-user frontend, for sending messages the harness has no helper for.
    pub fn frontend_mut(&mut self) -> &mut Frontend {
        &mut self.frontend
    }

    /// The guest memory (guest physical address 0 .. mem_size).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Lays out one descriptor chain (see [`GuestVm::submit_no_kick`]) and kicks the queue.
    pub fn submit(&mut self, queue: u16, readable: &[&[u8]], writable_lens: &[u32]) -> u16 {
        let head = self.submit_no_kick(queue, readable, writable_lens);
        self.kick_after_submit(queue);
        head
    }

    /// The kick after a submission: always, or as a driver decides
    /// ([`FrontendOptions::driver_kicks`]).
    fn kick_after_submit(&mut self, queue: u16) {
        if self.driver_kicks {
            self.kick_if_asked(queue);
        } else {
            self.kick(queue);
        }
    }

    /// Kicks the queue if the device asks for it for the buffers published since the last
    /// decision, as Linux's `virtqueue_kick_prepare`: with EVENT_IDX when they crossed the
    /// device's avail_event (`vring_need_event`), otherwise when the used ring's NO_NOTIFY
    /// flag is clear. Returns whether it kicked.
    pub fn kick_if_asked(&mut self, queue: u16) -> bool {
        // The publication's full barrier orders the new avail index before these loads.
        fence(Ordering::SeqCst);
        let event_idx = self.event_idx;
        let q = &mut self.queues[queue as usize];
        let (old, new) = (q.kick_decided_at, q.next_avail);
        q.kick_decided_at = new;
        let asked = if event_idx {
            let event: u16 = self
                .mem
                .load(q.avail_event_addr(), Ordering::Acquire)
                .expect("read avail_event");
            let event = Wrapping(u16::from_le(event));
            (new - event - Wrapping(1)).0 < (new - old).0
        } else {
            let flags: u16 = self
                .mem
                .load(q.used_flags_addr(), Ordering::Acquire)
                .expect("read used flags");
            u16::from_le(flags) & 1 == 0
        };
        if asked {
            q.kicks += 1;
            self.kick(queue);
        } else {
            q.kicks_skipped += 1;
        }
        asked
    }

    /// Kicks made and left out on `queue` ([`FrontendOptions::driver_kicks`]).
    pub fn kick_counts(&self, queue: u16) -> (u64, u64) {
        let q = self.queue(queue);
        (q.kicks, q.kicks_skipped)
    }

    /// Lays out one descriptor chain: each readable buffer is copied into guest memory as a
    /// device-readable descriptor, followed by one zero-filled device-writable descriptor per
    /// entry of `writable_lens`. Publishes the head in the avail ring without kicking.
    /// Panics if the queue has too few free descriptors or guest memory is exhausted.
    pub fn submit_no_kick(&mut self, queue: u16, readable: &[&[u8]], writable_lens: &[u32]) -> u16 {
        let n = readable.len() + writable_lens.len();
        assert!(
            n > 0,
            "queue {queue}: cannot submit an empty descriptor chain"
        );
        self.check_fits(queue, n);
        let (descs, bufs, writable) = self.lay_out_buffers(queue, readable, writable_lens);
        self.publish_chain(queue, &descs, bufs, writable)
    }

    /// Lays out the buffers like [`GuestVm::submit`] and kicks, but as an indirect chain (see
    /// [`GuestVm::submit_indirect_no_kick`]).
    pub fn submit_indirect(
        &mut self,
        queue: u16,
        readable: &[&[u8]],
        writable_lens: &[u32],
    ) -> u16 {
        let head = self.submit_indirect_no_kick(queue, readable, writable_lens);
        self.kick_after_submit(queue);
        head
    }

    /// Lays out the buffers like [`GuestVm::submit_no_kick`], but their descriptors go into an
    /// indirect table in guest memory (entry i chaining to entry i + 1), and the ring gets a
    /// single descriptor with VRING_DESC_F_INDIRECT pointing at it. Publishes that head
    /// without kicking. Panics unless INDIRECT_DESC was negotiated (a driver must not use
    /// indirect descriptors otherwise; [`GuestVm::submit_raw_indirect`] does, for hostile
    /// tests).
    pub fn submit_indirect_no_kick(
        &mut self,
        queue: u16,
        readable: &[&[u8]],
        writable_lens: &[u32],
    ) -> u16 {
        assert!(
            self.indirect_desc(),
            "queue {queue}: indirect descriptors without VIRTIO_RING_F_INDIRECT_DESC (set \
             FrontendOptions::indirect_desc)"
        );
        let n = readable.len() + writable_lens.len();
        let size = usize::from(self.queue(queue).size);
        // The spec bounds a chain by the queue size, indirect or not.
        assert!(
            n > 0 && n <= size,
            "queue {queue}: an indirect chain of {n} descriptors (queue size {size})"
        );
        self.check_fits(queue, 1);
        let (descs, mut bufs, writable) = self.lay_out_buffers(queue, readable, writable_lens);
        let table_len = 16 * descs.len() as u32;
        let (table, table_size) = self.alloc_buf(&format!("queue {queue}"), table_len.into());
        self.write_indirect_table(table, &descs);
        bufs.push((table, table_size));
        self.publish(
            queue,
            &[(table, table_len, VRING_DESC_F_INDIRECT as u16)],
            bufs,
            writable,
        )
    }

    /// Publishes one ring descriptor with VRING_DESC_F_INDIRECT pointing at `len` bytes at
    /// guest address `table`, which the caller lays out (see
    /// [`GuestVm::write_indirect_table`], [`GuestVm::write_desc`]) and owns, without kicking
    /// and whether INDIRECT_DESC was negotiated or not. Useful for malformed tables; the used
    /// element's `written` is empty (read what the device wrote with
    /// [`GuestVm::read_guest`]).
    pub fn submit_raw_indirect(&mut self, queue: u16, table: u64, len: u32) -> u16 {
        self.check_fits(queue, 1);
        self.publish(
            queue,
            &[(table, len, VRING_DESC_F_INDIRECT as u16)],
            Vec::new(),
            Vec::new(),
        )
    }

    /// Writes `descs` at guest address `table` as an indirect descriptor table: entry i
    /// chains to entry i + 1 with VRING_DESC_F_NEXT, writable ones have VRING_DESC_F_WRITE.
    pub fn write_indirect_table(&self, table: u64, descs: &[RawDesc]) {
        for (i, d) in descs.iter().enumerate() {
            let mut flags = 0u16;
            let mut next = 0u16;
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
                next = u16::try_from(i + 1).expect("indirect table of more than 65536 entries");
            }
            if d.write {
                flags |= VRING_DESC_F_WRITE as u16;
            }
            self.write_desc(table + 16 * i as u64, d.addr, d.len, flags, next);
        }
    }

    /// Writes one raw 16-byte descriptor (any flags, any next index) at guest address `at`.
    pub fn write_desc(&self, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem
            .write_slice(&raw, GuestAddress(at))
            .expect("write descriptor");
    }

    /// Copies each readable buffer into guest memory and zero-fills one buffer per writable
    /// length: their descriptors, the allocations and the writable parts.
    #[allow(clippy::type_complexity)]
    fn lay_out_buffers(
        &mut self,
        queue: u16,
        readable: &[&[u8]],
        writable_lens: &[u32],
    ) -> (Vec<RawDesc>, Vec<(u64, u64)>, Vec<(u64, u32)>) {
        let n = readable.len() + writable_lens.len();
        let mut bufs = Vec::with_capacity(n + 1);
        let mut descs = Vec::with_capacity(n);
        let mut writable = Vec::with_capacity(writable_lens.len());
        for data in readable {
            let (addr, size) = self.alloc_buf(&format!("queue {queue}"), data.len() as u64);
            self.mem
                .write_slice(data, GuestAddress(addr))
                .expect("write readable buffer");
            bufs.push((addr, size));
            descs.push(RawDesc {
                addr,
                len: u32::try_from(data.len()).expect("readable buffer larger than 4 GiB"),
                write: false,
            });
        }
        for &len in writable_lens {
            let (addr, size) = self.alloc_buf(&format!("queue {queue}"), u64::from(len));
            self.mem
                .write_slice(&vec![0u8; size as usize], GuestAddress(addr))
                .expect("zero writable buffer");
            bufs.push((addr, size));
            writable.push((addr, len));
            descs.push(RawDesc {
                addr,
                len,
                write: true,
            });
        }
        (descs, bufs, writable)
    }

    /// Submits a chain of descriptors pointing at arbitrary guest addresses (which the harness
    /// neither allocates nor frees; see [`GuestVm::alloc_guest`]), without kicking. Useful for
    /// malformed requests (out-of-range addresses, readable-after-writable, ...).
    pub fn submit_raw(&mut self, queue: u16, descs: &[RawDesc]) -> u16 {
        assert!(
            !descs.is_empty(),
            "queue {queue}: cannot submit an empty descriptor chain"
        );
        self.check_fits(queue, descs.len());
        let writable = descs
            .iter()
            .filter(|d| d.write)
            .map(|d| (d.addr, d.len))
            .collect();
        self.publish_chain(queue, descs, Vec::new(), writable)
    }

    /// Allocates a zero-filled guest buffer that the caller owns (free with
    /// [`GuestVm::free_guest`]). Returns its guest physical address.
    pub fn alloc_guest(&mut self, len: u64) -> u64 {
        let (addr, size) = self.alloc_buf("alloc_guest", len);
        self.mem
            .write_slice(&vec![0u8; size as usize], GuestAddress(addr))
            .expect("zero guest buffer");
        addr
    }

    /// Frees a buffer returned by [`GuestVm::alloc_guest`] (`len` as passed to it).
    pub fn free_guest(&mut self, addr: u64, len: u64) {
        self.alloc.release(addr, BufAllocator::round(len));
    }

    pub fn write_guest(&self, addr: u64, data: &[u8]) {
        self.mem
            .write_slice(data, GuestAddress(addr))
            .expect("write_guest out of range");
    }

    pub fn read_guest(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem
            .read_slice(&mut buf, GuestAddress(addr))
            .expect("read_guest out of range");
        buf
    }

    /// Free bytes in the data buffer area (for leak checks).
    pub fn free_guest_bytes(&self) -> u64 {
        self.alloc.free_bytes()
    }

    /// Signals the queue's kick eventfd.
    pub fn kick(&self, queue: u16) {
        self.queue(queue)
            .kick
            .write(1)
            .unwrap_or_else(|e| panic!("queue {queue}: kick failed: {e}"));
    }

    /// Returns the next used element of the queue if the device has published one, without
    /// waiting when there is none. An element not yet announced is given
    /// [`INTERRUPT_GRACE`] for its call notification; panics if none comes (see
    /// [`GuestVm::try_wait_used`]).
    pub fn try_used(&mut self, queue: u16) -> Option<UsedBuf> {
        self.wait_used(queue, Duration::ZERO)
    }

    /// Waits up to `timeout` for the next used element, sleeping on the queue's call eventfd.
    /// Panics with "used buffer on queue N without an interrupt" if an element is published
    /// but never announced (see [`GuestVm::try_wait_used`]).
    pub fn wait_used(&mut self, queue: u16, timeout: Duration) -> Option<UsedBuf> {
        self.try_wait_used(queue, timeout)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Waits up to `timeout` for the next used element the device announced (a call
    /// notification read after it was published, or with EVENT_IDX, published before the
    /// driver last moved used_event). `Ok(None)` when nothing was published in time. An
    /// element published but not announced is given the rest of `timeout`, and at least
    /// [`INTERRUPT_GRACE`], for its call (the device signals after publishing); after that
    /// the wait fails with [`MissingInterrupt`]. A queue opted out with
    /// [`GuestVm::suppress_interrupts`] is polled instead.
    pub fn try_wait_used(
        &mut self,
        queue: u16,
        timeout: Duration,
    ) -> Result<Option<UsedBuf>, MissingInterrupt> {
        let deadline = Instant::now() + timeout;
        let mut unannounced_since: Option<Instant> = None;
        loop {
            let mem = &self.mem;
            let q = self
                .queues
                .get_mut(queue as usize)
                .unwrap_or_else(|| panic!("no queue {queue}"));
            q.collect_call(mem);
            let used_idx = q.used_idx(mem);
            let pending = (used_idx - q.last_used).0;
            assert!(
                pending <= q.size,
                "queue {queue}: device advanced used idx to {} but we consumed {} (size {})",
                used_idx.0,
                q.last_used.0,
                q.size
            );
            if pending > 0 && (q.polling || q.announced_pending() > 0) {
                return Ok(Some(self.take_used(queue)));
            }
            let now = Instant::now();
            let until = if pending == 0 {
                if now >= deadline {
                    return Ok(None);
                }
                if q.polling {
                    deadline.min(now + POLL_SLICE)
                } else {
                    deadline
                }
            } else {
                let since = *unannounced_since.get_or_insert(now);
                let grace_end = deadline.max(since + INTERRUPT_GRACE);
                if now >= grace_end {
                    return Err(MissingInterrupt {
                        queue,
                        used_idx: used_idx.0,
                        last_used: q.last_used.0,
                        waited: now - since,
                        notifications: q.notifications,
                    });
                }
                grace_end
            };
            q.poll_call(until - now);
        }
    }

    /// Opts `queue` out of the interrupt check, for a test whose point is a driver that wants
    /// no interrupts: sets VRING_AVAIL_F_NO_INTERRUPT (with EVENT_IDX, where the device ignores
    /// that flag, keeps used_event behind the used index instead), and from then on
    /// [`GuestVm::wait_used`] and [`GuestVm::try_used`] poll the used ring every 20 ms and
    /// take every element, announced or not. Until [`GuestVm::reset_rings`].
    pub fn suppress_interrupts(&mut self, queue: u16) {
        let event_idx = self.event_idx;
        let mem = &self.mem;
        let q = self
            .queues
            .get_mut(queue as usize)
            .unwrap_or_else(|| panic!("no queue {queue}"));
        q.polling = true;
        if event_idx {
            // The device calls when it writes the element at used_event; the one before
            // last_used was written already.
            mem.store(
                (q.last_used - Wrapping(1)).0.to_le(),
                q.used_event_addr(),
                Ordering::Release,
            )
            .expect("write used_event");
        } else {
            mem.store(
                (VRING_AVAIL_F_NO_INTERRUPT as u16).to_le(),
                q.avail_flags_addr(),
                Ordering::Release,
            )
            .expect("write avail flags");
        }
        fence(Ordering::SeqCst);
    }

    /// Takes the next used element, which the caller saw published.
    fn take_used(&mut self, queue: u16) -> UsedBuf {
        let event_idx = self.event_idx;
        let mem = &self.mem;
        let q = &mut self.queues[queue as usize];

        let elem = q.used_elem_addr(q.last_used.0);
        let id = u32::from_le(mem.read_obj::<u32>(elem).expect("read used elem id"));
        let len = u32::from_le(
            mem.read_obj::<u32>(GuestAddress(elem.0 + 4))
                .expect("read used elem len"),
        );
        let index = usize::try_from(id)
            .ok()
            .filter(|&i| q.chains.get(i).is_some_and(Option::is_some))
            .unwrap_or_else(|| {
                panic!(
                    "queue {queue}: device returned head {id} (len {len}) which is not in flight"
                )
            });
        // A republished head comes back once per publication: the chain stays in flight
        // until the last one.
        let republished = q.republished[index] > 0;
        let chain = if republished {
            q.republished[index] -= 1;
            let chain = q.chains[index].as_ref().expect("checked above");
            Chain {
                descs: Vec::new(),
                bufs: Vec::new(),
                writable: chain.writable.clone(),
            }
        } else {
            q.in_flight -= 1;
            q.chains[index].take().expect("checked above")
        };
        q.last_used += Wrapping(1);
        if event_idx {
            // used_event = the count of elements consumed: the device must call when it
            // writes the next one (while polling: one behind, never written again until the
            // index wraps).
            let event = if q.polling {
                q.last_used - Wrapping(1)
            } else {
                q.last_used
            };
            mem.store(event.0.to_le(), q.used_event_addr(), Ordering::Release)
                .expect("write used_event");
            if !q.polling {
                // Re-check after moving used_event, like Linux's virtqueue_enable_cb: what
                // the device published before it could see the new value owes no call.
                q.announced = q.used_idx(mem);
            }
        }

        let mut written = Vec::new();
        let mut remaining = len as usize;
        for &(addr, dlen) in &chain.writable {
            if remaining == 0 {
                break;
            }
            let n = remaining.min(dlen as usize);
            let mut buf = vec![0u8; n];
            if mem.read_slice(&mut buf, GuestAddress(addr)).is_err() {
                break;
            }
            written.extend_from_slice(&buf);
            remaining -= n;
        }

        q.free_descs.extend(chain.descs.iter().rev());
        for (addr, size) in chain.bufs {
            self.alloc.release(addr, size);
        }

        UsedBuf {
            head: id as u16,
            len,
            written,
        }
    }

    /// Waits up to `timeout` for the call eventfd of `queue` to be signalled; returns whether
    /// it was. Consumes the notification (it is counted in [`GuestVm::notifications`]) and
    /// with it announces what the device had published.
    pub fn wait_call(&mut self, queue: u16, timeout: Duration) -> bool {
        let mem = &self.mem;
        let q = self
            .queues
            .get_mut(queue as usize)
            .unwrap_or_else(|| panic!("no queue {queue}"));
        let deadline = Instant::now() + timeout;
        loop {
            if q.collect_call(mem) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            q.poll_call(deadline - now);
        }
    }

    /// Total number of call notifications observed on `queue` so far (eventfd counter values
    /// consumed by [`GuestVm::wait_used`] / [`GuestVm::wait_call`]), plus any pending one.
    pub fn notifications(&mut self, queue: u16) -> u64 {
        let mem = &self.mem;
        let q = &mut self.queues[queue as usize];
        q.collect_call(mem);
        q.notifications
    }

    /// Submits one readable buffer `req` and one writable buffer of `resp_len` bytes, waits
    /// up to 5 s for the reply and returns the bytes written. Panics on timeout.
    pub fn request(&mut self, queue: u16, req: &[u8], resp_len: u32) -> Vec<u8> {
        let head = self.submit(queue, &[req], &[resp_len]);
        let used = self.wait_used(queue, REQUEST_TIMEOUT).unwrap_or_else(|| {
            panic!(
                "queue {queue}: no used buffer for request head {head} within {REQUEST_TIMEOUT:?}"
            )
        });
        assert_eq!(
            used.head, head,
            "queue {queue}: used head differs from the request just submitted"
        );
        used.written
    }

    /// Publishes `head`, a chain still in flight, once more in the avail ring, the way a
    /// malicious driver would, without kicking. Its extra used element is expected first
    /// (see [`GuestVm::try_used`]); the chain stays in flight until its last one.
    pub fn republish(&mut self, queue: u16, head: u16) {
        let q = &mut self.queues[queue as usize];
        assert!(
            q.chains[usize::from(head)].is_some(),
            "queue {queue}: head {head} is not in flight"
        );
        q.republished[usize::from(head)] += 1;
        self.publish_head(queue, head);
    }

    /// Publishes an arbitrary head value (for example one beyond the queue size) without
    /// bookkeeping and without kicking: the device must never return it.
    pub fn publish_raw_head(&mut self, queue: u16, head: u16) {
        self.publish_head(queue, head);
    }

    /// Number of chains submitted on `queue` and not yet returned as used.
    pub fn in_flight(&self, queue: u16) -> usize {
        self.queue(queue).in_flight
    }

    fn queue(&self, queue: u16) -> &Queue {
        self.queues
            .get(queue as usize)
            .unwrap_or_else(|| panic!("no queue {queue}"))
    }

    fn check_fits(&self, queue: u16, n: usize) {
        let q = self.queue(queue);
        if q.free_descs.len() < n {
            panic!(
                "queue {queue}: descriptor chain of {n} descriptors does not fit: only {} of {} \
                 descriptors free ({} chains in flight); consume used buffers first",
                q.free_descs.len(),
                q.size,
                q.in_flight
            );
        }
    }

    fn alloc_buf(&mut self, what: &str, len: u64) -> (u64, u64) {
        self.alloc.alloc(len).unwrap_or_else(|| {
            panic!(
                "{what}: guest memory exhausted allocating {len} bytes ({} bytes free in \
                 total, maybe fragmented); raise FrontendOptions::mem_size or consume used \
                 buffers",
                self.alloc.free_bytes()
            )
        })
    }

    /// Writes the descriptors, records the chain and publishes the head in the avail ring.
    fn publish_chain(
        &mut self,
        queue: u16,
        descs: &[RawDesc],
        bufs: Vec<(u64, u64)>,
        writable: Vec<(u64, u32)>,
    ) -> u16 {
        let entries: Vec<(u64, u32, u16)> = descs
            .iter()
            .map(|d| {
                let flags = if d.write {
                    VRING_DESC_F_WRITE as u16
                } else {
                    0
                };
                (d.addr, d.len, flags)
            })
            .collect();
        self.publish(queue, &entries, bufs, writable)
    }

    /// Writes ring descriptors (address, length, flags but NEXT), chained in order, records
    /// the chain and publishes its head in the avail ring.
    fn publish(
        &mut self,
        queue: u16,
        entries: &[(u64, u32, u16)],
        bufs: Vec<(u64, u64)>,
        writable: Vec<(u64, u32)>,
    ) -> u16 {
        let q = &mut self.queues[queue as usize];
        let indices: Vec<u16> = (0..entries.len())
            .map(|_| q.free_descs.pop().expect("checked by check_fits"))
            .collect();
        let desc_addrs: Vec<u64> = indices.iter().map(|&i| q.desc_entry_addr(i).0).collect();
        for (i, &(addr, len, mut flags)) in entries.iter().enumerate() {
            let mut next = 0u16;
            if i + 1 < entries.len() {
                flags |= VRING_DESC_F_NEXT as u16;
                next = indices[i + 1];
            }
            self.write_desc(desc_addrs[i], addr, len, flags, next);
        }
        let head = indices[0];
        let q = &mut self.queues[queue as usize];
        q.chains[head as usize] = Some(Chain {
            descs: indices,
            bufs,
            writable,
        });
        q.in_flight += 1;
        self.publish_head(queue, head);
        head
    }

    /// Writes `head` into the next avail ring slot and publishes the new index.
    fn publish_head(&mut self, queue: u16, head: u16) {
        let mem = &self.mem;
        let q = &mut self.queues[queue as usize];
        mem.write_obj(head.to_le(), q.avail_ring_addr(q.next_avail.0))
            .expect("write avail ring");
        q.next_avail += Wrapping(1);
        // Release: descriptors, buffers and the ring entry are visible before the new index.
        mem.store(
            q.next_avail.0.to_le(),
            q.avail_idx_addr(),
            Ordering::Release,
        )
        .expect("write avail idx");
        // Full barrier before a following kick / avail_event check (virtio spec 2.7.13).
        fence(Ordering::SeqCst);
    }
}
