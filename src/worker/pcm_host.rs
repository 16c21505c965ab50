//! What a PCM control request does to a stream's data path: PREPARE opens the broker's ring
//! (or the worker's own clock while the broker is away), START and STOP go to whoever paces
//! the stream, RELEASE completes the stream's buffers and frees its ring.

use std::time::Duration;

use log::Level;
use nix::sys::epoll::Epoll;

use crate::broker_link::{BrokerLink, Fault};
use crate::completion::{Completer, GuestMemory};
use crate::stream::{open_ring, Stream};
use virtio_snd::control::{PcmHost, PcmParams};
use virtio_snd::ctl::Gain;
use virtio_snd::protocol::Status;
use vsound_shared::guest_log;
use vsound_shared::ipc::WorkerMsg;

/// A PREPARE while the broker is away is served on the local clock if the link failed at most
/// this long ago (a restarting broker is back by then); later, it gets IO_ERR.
const LOCAL_PREPARE_WINDOW: Duration = Duration::from_secs(1);

/// Everything a control request may touch besides its stream, borrowed from the device for one
/// request. A broker found gone here moves only this request's stream onto the local clock;
/// the device moves the others at the end of the event.
pub(crate) struct Host<'a, 'v> {
    pub(crate) link: &'a mut BrokerLink,
    pub(crate) epoll: &'a Epoll,
    pub(crate) mem: &'a GuestMemory,
    pub(crate) done: &'a mut Completer<'v>,
}

impl Host<'_, '_> {
    /// The broker refused `what`: the guest gets IO_ERR, and the log says why (the guest can
    /// repeat it: rate-limited).
    fn refused(&mut self, stream_id: u32, what: &str, reason: &str) -> Status {
        guest_log!(
            self.done.log(),
            Level::Warn,
            "stream {stream_id}: the broker refused {what}: {reason}; answering IO_ERR"
        );
        Status::IoErr
    }

    /// START or STOP: told to the broker if it holds the stream, else done on the local clock.
    fn set_running(
        &mut self,
        stream_id: u32,
        stream: &mut Stream,
        running: bool,
    ) -> Result<(), Status> {
        let msg = if running {
            WorkerMsg::Start { stream_id }
        } else {
            WorkerMsg::Stop { stream_id }
        };
        let what = if running { "START" } else { "STOP" };
        if stream.at_broker() {
            match self.link.simple(msg, stream_id) {
                Ok(()) => return Ok(()),
                Err(Fault::Refused(reason)) => return Err(self.refused(stream_id, what, &reason)),
                Err(Fault::Down) => stream.go_local(self.epoll),
            }
        }
        stream.set_local_running(running).inspect_err(|_| {
            guest_log!(
                self.done.log(),
                Level::Warn,
                "stream {stream_id}: {what} without a transport; answering IO_ERR"
            );
        })
    }
}

impl PcmHost<Stream> for Host<'_, '_> {
    fn prepare(
        &mut self,
        stream_id: u32,
        stream: &mut Stream,
        params: &PcmParams,
    ) -> Result<(), Status> {
        stream.drop_transport(stream_id, self.epoll, self.mem, self.done);
        if self.link.is_up() {
            match open_ring(self.link, self.epoll, stream_id, params, stream.output()) {
                Ok((end, notify)) => {
                    stream.use_ring(end, notify, *params);
                    return Ok(());
                }
                Err(Fault::Refused(_)) => return Err(Status::IoErr),
                Err(Fault::Down) => {}
            }
        }
        // A broker that restarts is back well within the guest's 1 s control timeout: until
        // then the stream runs on the worker's clock and is handed over when it is back. A
        // broker away for longer is reported.
        if self.link.down_for() > LOCAL_PREPARE_WINDOW {
            guest_log!(
                self.done.log(),
                Level::Warn,
                "stream {stream_id}: cannot prepare: the broker is away"
            );
            return Err(Status::IoErr);
        }
        stream.use_local_clock(*params, self.epoll);
        Ok(())
    }

    fn start(&mut self, stream_id: u32, stream: &mut Stream) -> Result<(), Status> {
        self.set_running(stream_id, stream, true)
    }

    fn stop(&mut self, stream_id: u32, stream: &mut Stream) -> Result<(), Status> {
        self.set_running(stream_id, stream, false)
    }

    fn release(&mut self, stream_id: u32, stream: &mut Stream) -> Result<(), Status> {
        // Every pending buffer is completed before the answer, as the spec requires.
        let at_broker = stream.at_broker();
        stream.drop_transport(stream_id, self.epoll, self.mem, self.done);
        if !at_broker {
            return Ok(());
        }
        match self
            .link
            .simple(WorkerMsg::Release { stream_id }, stream_id)
        {
            // A broker that went away holds nothing of ours any more.
            Ok(()) | Err(Fault::Down) => Ok(()),
            Err(Fault::Refused(reason)) => Err(self.refused(stream_id, "RELEASE", &reason)),
        }
    }

    /// Waits for the broker's answer, as PREPARE does (it validates the value and applies it
    /// before answering: a CTL_WRITE answered OK has taken effect). A broker that is away gets
    /// the value with the streams when it is back (`restore_streams`), so the write succeeds.
    fn set_gain(&mut self, stream_id: u32, _stream: &mut Stream, gain: Gain) -> Result<(), Status> {
        match self
            .link
            .simple(WorkerMsg::SetGain { stream_id, gain }, stream_id)
        {
            Ok(()) | Err(Fault::Down) => Ok(()),
            Err(Fault::Refused(reason)) => Err(self.refused(stream_id, "a gain", &reason)),
        }
    }
}
