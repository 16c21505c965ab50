//! Returning the guest's chains: which heads the device holds, the [`Held`] buffer that is
//! completed exactly once, and the [`Completer`] that batches one event's used-ring updates
//! into one interrupt per queue.

use std::sync::{Arc, Mutex};

use log::Level;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::GuestMemoryAtomic;
use zerocopy::IntoBytes;

use virtio_snd::guest::GuestBuffer;
use virtio_snd::protocol::{self as p, Status};
use vsound_shared::guest_log;
use vsound_shared::ratelimit::LogLimiter;

pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;
pub(crate) type Mem = GuestMemoryAtomic<GuestMemory>;

/// Largest queue size the device accepts (what `max_queue_size` offers the VMM).
pub(crate) const MAX_QUEUE_SIZE: usize = 1024;

/// Heads of one queue that the device holds (taken off the avail ring, not yet used). Only
/// heads below the queue's size can be held and each at most once, so the device never holds
/// more chains than the queue's size, however often the guest republishes a head.
#[derive(Default)]
struct HeldHeads {
    bits: [u64; MAX_QUEUE_SIZE / 64],
}

/// Why a chain cannot be held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HoldRefused {
    /// The guest republished a head the device still holds.
    AlreadyHeld,
    /// Not a head of this queue: it can never be returned in the used ring.
    OutOfRange,
}

impl std::fmt::Display for HoldRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HoldRefused::AlreadyHeld => "head republished while the device holds it",
            HoldRefused::OutOfRange => "head beyond the queue size",
        })
    }
}

impl HeldHeads {
    fn hold(&mut self, head: u16, queue_size: u16) -> Result<(), HoldRefused> {
        if head >= queue_size || usize::from(head) >= MAX_QUEUE_SIZE {
            return Err(HoldRefused::OutOfRange);
        }
        let (word, bit) = (usize::from(head) / 64, 1u64 << (head % 64));
        if self.bits[word] & bit != 0 {
            return Err(HoldRefused::AlreadyHeld);
        }
        self.bits[word] |= bit;
        Ok(())
    }

    fn release(&mut self, head: u16) {
        if let Some(word) = self.bits.get_mut(usize::from(head) / 64) {
            *word &= !(1u64 << (head % 64));
        }
    }
}

/// A held buffer dropped without being completed, waiting for the end of its event.
struct Orphan {
    queue: u16,
    head: u16,
    writable: GuestBuffer,
    status_at: Option<u64>,
}

/// Where dropped [`Held`] buffers go (a device with one vring thread: never contended).
type Orphans = Arc<Mutex<Vec<Orphan>>>;

/// A chain the device holds: taken off a queue's avail ring, not yet in its used ring.
///
/// Completed exactly once: [`Held::complete`] consumes it, so nothing completes it twice, and
/// one dropped on a path that forgot it is completed by the device at the end of the event
/// (with IO_ERR where it has a status, and an error in the log), so none leaks. Only a device
/// reset, after which nothing may be completed, gives it up on purpose ([`Held::abandon`]).
#[must_use = "a held guest buffer must be completed exactly once"]
pub(crate) struct Held {
    queue: u16,
    head: u16,
    writable: GuestBuffer,
    /// Where the PCM status goes in the writable part (tx: first, rx: after the frames); event
    /// buffers have none.
    status_at: Option<u64>,
    /// `None` once completed or abandoned.
    orphans: Option<Orphans>,
}

impl Held {
    pub(crate) fn head(&self) -> u16 {
        self.head
    }

    pub(crate) fn writable(&self) -> &GuestBuffer {
        &self.writable
    }

    /// Writes the PCM status (if the buffer has one) and returns the chain with `used_len`
    /// bytes written.
    pub(crate) fn complete(
        mut self,
        mem: &GuestMemory,
        done: &mut Completer,
        status: Status,
        latency_bytes: u32,
        used_len: u32,
    ) {
        self.orphans = None;
        if let Some(at) = self.status_at {
            done.write_status(mem, &self.writable, at, status, latency_bytes);
        }
        done.release(self.queue, self.head, used_len);
    }

    /// Gives the buffer up without completing it: only after a device reset or a stopped
    /// ring, when the used ring must not be touched.
    pub(crate) fn abandon(mut self) {
        self.orphans = None;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let Some(orphans) = self.orphans.take() else {
            return;
        };
        let orphan = Orphan {
            queue: self.queue,
            head: self.head,
            writable: std::mem::take(&mut self.writable),
            status_at: self.status_at,
        };
        if let Ok(mut list) = orphans.lock() {
            list.push(orphan);
        };
    }
}

/// What the device keeps about the guest's chains across events: the heads it holds per
/// queue, the held buffers dropped without completion, and the limiter of the log lines the
/// guest can trigger.
#[derive(Default)]
pub(crate) struct GuestLedger {
    held: [HeldHeads; p::NUM_QUEUES],
    orphans: Orphans,
    log: LogLimiter,
}

impl GuestLedger {
    pub(crate) fn report_log_if_due(&mut self, now: std::time::Instant) {
        self.log.report_if_due(now);
    }

    /// Forgets every held head (device reset); the log limiter keeps counting.
    pub(crate) fn reset(&mut self) {
        self.held = Default::default();
        if let Ok(mut list) = self.orphans.lock() {
            list.clear();
        }
    }
}

/// Completions gathered during one event, signalled once at the end. It carries the device's
/// ledger for the event, so that every completion of a held chain releases its head.
pub(crate) struct Completer<'a> {
    vrings: &'a [VringRwLock<Mem>],
    dirty: [bool; p::NUM_QUEUES],
    /// Each queue's negotiated size, read once per event.
    sizes: [u16; p::NUM_QUEUES],
    ledger: &'a mut GuestLedger,
}

impl<'a> Completer<'a> {
    pub(crate) fn new(vrings: &'a [VringRwLock<Mem>], ledger: &'a mut GuestLedger) -> Self {
        let mut sizes = [0; p::NUM_QUEUES];
        for (size, vring) in sizes.iter_mut().zip(vrings) {
            *size = vring.get_ref().get_queue().size();
        }
        Completer {
            vrings,
            dirty: [false; p::NUM_QUEUES],
            sizes,
            ledger,
        }
    }

    pub(crate) fn log(&mut self) -> &mut LogLimiter {
        &mut self.ledger.log
    }

    pub(crate) fn queue_size(&self, queue: u16) -> u16 {
        self.sizes.get(queue as usize).copied().unwrap_or(0)
    }

    /// Holds chain `head` of `queue` until its [`Held`] is completed; `status_at` is where
    /// its PCM status goes in the writable part. A refused chain's writable part is handed
    /// back.
    pub(crate) fn hold(
        &mut self,
        queue: u16,
        head: u16,
        writable: GuestBuffer,
        status_at: Option<u64>,
    ) -> Result<Held, (GuestBuffer, HoldRefused)> {
        let size = self.queue_size(queue);
        let result = match self.ledger.held.get_mut(queue as usize) {
            Some(held) => held.hold(head, size),
            None => Err(HoldRefused::OutOfRange),
        };
        match result {
            Ok(()) => Ok(Held {
                queue,
                head,
                writable,
                status_at,
                orphans: Some(Arc::clone(&self.ledger.orphans)),
            }),
            Err(refused) => Err((writable, refused)),
        }
    }

    /// Completes a chain the device held.
    fn release(&mut self, queue: u16, head: u16, len: u32) {
        if let Some(held) = self.ledger.held.get_mut(queue as usize) {
            held.release(head);
        }
        self.used(queue, head, len);
    }

    /// Completes a chain the device did not hold (answered at once).
    pub(crate) fn used(&mut self, queue: u16, head: u16, len: u32) {
        let Some(vring) = self.vrings.get(queue as usize) else {
            return;
        };
        match vring.add_used(head, len) {
            Ok(()) => self.dirty[queue as usize] = true,
            Err(e) => guest_log!(
                self.ledger.log,
                Level::Error,
                "queue {queue}: add_used failed: {e}"
            ),
        }
    }

    /// Writes a tx/rx status at `offset` of a chain's writable part.
    pub(crate) fn write_status(
        &mut self,
        mem: &GuestMemory,
        writable: &GuestBuffer,
        offset: u64,
        status: Status,
        latency: u32,
    ) {
        let st = p::PcmStatus {
            status: status.code().into(),
            latency_bytes: latency.into(),
        };
        if let Err(e) = writable.write(mem, offset, st.as_bytes()) {
            guest_log!(self.log(), Level::Warn, "cannot write a pcm status: {e}");
        }
    }

    /// Completes the held buffers that were dropped without completion during this event:
    /// IO_ERR where they have a status. Each is a device bug, logged as an error.
    pub(crate) fn complete_orphans(&mut self, mem: &GuestMemory) {
        let orphans = match self.ledger.orphans.lock() {
            Ok(mut list) if !list.is_empty() => std::mem::take(&mut *list),
            _ => return,
        };
        for orphan in orphans {
            guest_log!(
                self.log(),
                Level::Error,
                "queue {}: buffer {} was dropped without completion; completed with IO_ERR",
                orphan.queue,
                orphan.head
            );
            let used_len = match orphan.status_at {
                Some(at) => {
                    self.write_status(mem, &orphan.writable, at, Status::IoErr, 0);
                    p::PcmStatus::SIZE as u32
                }
                None => 0,
            };
            self.release(orphan.queue, orphan.head, used_len);
        }
    }

    /// One interrupt per queue that got used buffers (with EVENT_IDX: only where the driver
    /// asked for one).
    pub(crate) fn signal(&mut self, event_idx: bool) {
        for (queue, dirty) in self.dirty.iter_mut().enumerate() {
            if !std::mem::take(dirty) {
                continue;
            }
            let vring = &self.vrings[queue];
            let needed = !event_idx || vring.needs_notification().unwrap_or(true);
            if needed {
                if let Err(e) = vring.signal_used_queue() {
                    log::warn!("queue {queue}: cannot signal the guest: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_is_held_once_and_only_below_the_queue_size() {
        let mut held = HeldHeads::default();
        for head in 0..64 {
            assert_eq!(held.hold(head, 64), Ok(()));
        }
        // Republished while held, or not a head of a 64-entry queue.
        assert_eq!(held.hold(5, 64), Err(HoldRefused::AlreadyHeld));
        assert_eq!(held.hold(64, 64), Err(HoldRefused::OutOfRange));
        assert_eq!(held.hold(u16::MAX, u16::MAX), Err(HoldRefused::OutOfRange));
        held.release(5);
        assert_eq!(held.hold(5, 64), Ok(()));
        // Releasing what is not held (or cannot be) changes nothing.
        held.release(u16::MAX);
        assert_eq!(held.hold(63, 64), Err(HoldRefused::AlreadyHeld));
        let mut large = HeldHeads::default();
        assert_eq!(large.hold(1023, 1024), Ok(()));
        assert_eq!(large.hold(1023, 1024), Err(HoldRefused::AlreadyHeld));
    }
}
