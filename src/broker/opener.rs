//! Backend opens off the broker's control loop. Opening a stream may block (ALSA's open and
//! hw_params, a WAV file's creation, the PipeWire thread's answer), and one VM's PREPARE must
//! not delay another VM's START: each open runs on a short-lived thread of its own and its
//! result comes back through a channel and an eventfd the broker's epoll watches.
//!
//! The broker answers every PREPARE within [`OPEN_DEADLINE`], which is shorter than the time
//! the worker waits for any reply ([`vsound_shared::ipc::BROKER_REPLY_TIMEOUT`]): a slow backend
//! gets the worker a `Failed` (the guest an IO_ERR), never a link that times out. An open that
//! outlives its deadline is abandoned: its thread closes the stream when the backend returns, and
//! until then it counts against its worker's uid, so that a backend that hangs cannot be made to
//! pile up threads.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use rustix::event::{eventfd, EventfdFlags};

use crate::backends::{Backend, BackendStream, RingPort, StreamSpec};

/// How long a backend may take to open a stream before the broker answers `Failed`.
pub const OPEN_DEADLINE: Duration = Duration::from_millis(400);

// The worker must hear the broker's answer before it gives up on the link.
const _: () =
    assert!(OPEN_DEADLINE.as_millis() < vsound_shared::ipc::BROKER_REPLY_TIMEOUT.as_millis());

/// Opener threads' stack: the backends' open paths (ALSA's config parser included) need far
/// less than the default 2 MiB.
const OPENER_STACK: usize = 512 * 1024;

/// A finished open, for the broker's loop.
pub struct Opened {
    pub ticket: u64,
    pub outcome: Outcome,
}

pub enum Outcome {
    Opened(Box<dyn BackendStream>),
    Failed(String),
    /// Abandoned before the backend returned; whatever it opened is closed already.
    Abandoned,
}

/// An open in flight; dropping it does not cancel it ([`Pending::abandon`] does).
pub struct Pending {
    abandoned: Arc<AtomicBool>,
}

impl Pending {
    /// The broker no longer wants the stream: the thread drops it when the backend returns
    /// (or the broker's loop does, if the result was already on its way).
    pub fn abandon(&self) {
        self.abandoned.store(true, Ordering::Release);
    }
}

pub struct Opener {
    sender: mpsc::Sender<Opened>,
    results: mpsc::Receiver<Opened>,
    /// Written by opener threads when a result is queued; never shared with a worker.
    ready: Arc<OwnedFd>,
}

impl Opener {
    pub fn new() -> io::Result<Opener> {
        let ready = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        let (sender, results) = mpsc::channel();
        Ok(Opener {
            sender,
            results,
            ready: Arc::new(ready),
        })
    }

    /// Readable while results wait in [`Opener::take`].
    pub fn ready_fd(&self) -> BorrowedFd<'_> {
        self.ready.as_fd()
    }

    /// Opens `spec` on `backend` on a new thread.
    pub fn open(
        &self,
        ticket: u64,
        backend: Arc<dyn Backend>,
        spec: StreamSpec,
        port: RingPort,
    ) -> io::Result<Pending> {
        let abandoned = Arc::new(AtomicBool::new(false));
        let pending = Pending {
            abandoned: abandoned.clone(),
        };
        let sender = self.sender.clone();
        let ready = self.ready.clone();
        std::thread::Builder::new()
            .name("vsound-open".into())
            .stack_size(OPENER_STACK)
            .spawn(move || {
                let outcome = match backend.open(&spec, port) {
                    // Closed here, not on the broker's loop: a close may block as an open does.
                    Ok(stream) if abandoned.load(Ordering::Acquire) => {
                        drop(stream);
                        Outcome::Abandoned
                    }
                    Ok(stream) => Outcome::Opened(stream),
                    Err(_) if abandoned.load(Ordering::Acquire) => Outcome::Abandoned,
                    Err(e) => Outcome::Failed(format!("backend: {e}")),
                };
                // Abandoned ones too: the broker counts them until they are done.
                if sender.send(Opened { ticket, outcome }).is_ok() {
                    // A full counter (never reached: one per result) would still be readable.
                    let _ = rustix::io::write(&*ready, &1u64.to_ne_bytes());
                }
            })?;
        Ok(pending)
    }

    /// The results that came back since the last call.
    pub fn take(&self) -> Vec<Opened> {
        let mut counter = [0u8; 8];
        let _ = rustix::io::read(&*self.ready, &mut counter);
        self.results.try_iter().collect()
    }
}
