//! Worker ↔ broker control channel: serde + bincode 2 messages over a unix SOCK_SEQPACKET
//! socket, one message per packet, fds passed by SCM_RIGHTS.
//!
//! Both sides treat the other as untrusted: packets are size-limited, decoding is bounded by
//! bincode's byte limit (so no length prefix can make us allocate more than a packet), truncated
//! packets or fd lists are errors, and the number of fds must match what the message announces.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::net::{
    self, AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, Shutdown, SocketAddrUnix, SocketFlags,
    SocketType,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// How long a request waits for the broker's reply; the guest driver gives up after 1 s.
pub const BROKER_REPLY_TIMEOUT: Duration = Duration::from_millis(500);

use virtio_snd::control::{PcmCaps, PcmParams};
use virtio_snd::ctl::Gain;

/// 2: Hello carries the VM's name. 3: HostPresence.
pub const PROTOCOL_VERSION: u32 = 3;
/// Largest packet either side sends or accepts.
pub const MAX_MESSAGE_BYTES: usize = 8192;
/// Largest number of fds in one packet.
pub const MAX_FDS: usize = 2;
/// Longest text in a message (error reasons).
pub const MAX_REASON_LEN: usize = 256;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WorkerMsg {
    /// First message: protocol version, the VM's name (`--vm`; the broker checks it and binds
    /// it to this connection's uid) and the streams the worker wants to offer the guest (its
    /// VM's layout: the broker refuses a Hello whose streams are not its layout for that VM).
    Hello {
        version: u32,
        vm: String,
        streams: Vec<PcmCaps>,
    },
    /// Set up a stream's transport; answered by `Prepared` (with fds) or `Failed`.
    Prepare {
        stream_id: u32,
        params: PcmParams,
    },
    /// Answered by `Done` or `Failed`.
    Start {
        stream_id: u32,
    },
    Stop {
        stream_id: u32,
    },
    Release {
        stream_id: u32,
    },
    /// The guest set the stream's volume or mute (CTL_WRITE), or the worker restores it to a
    /// new broker; whether or not the stream is prepared. Answered by `Done` or `Failed`.
    SetGain {
        stream_id: u32,
        gain: Gain,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BrokerMsg {
    /// Answer to `Hello`: for every requested stream, what the backend really accepts.
    Welcome {
        version: u32,
        client_id: u32,
        caps: Vec<PcmCaps>,
    },
    /// The broker refuses the connection (an answer to Hello), or drops a welcomed one because
    /// a newer connection of the same uid took its VM's name over; it hangs up after it.
    Refused {
        reason: String,
    },
    /// The stream's ring; carries two fds: the ring memfd and the worker's end of a
    /// SOCK_SEQPACKET socketpair on which the broker sends a byte whenever it moved the ring's
    /// position (`ring::WakeSender`: the broker keeps the other end, never a shared file).
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
    /// The backend under- or overran.
    Xrun {
        stream_id: u32,
    },
    /// The host changed the stream's volume or mute (PipeWire's node, or a host command):
    /// unsolicited, like `Xrun`.
    GainChanged {
        stream_id: u32,
        gain: Gain,
    },
    /// Whether the stream's backend has a host end to play to or record from (its PipeWire
    /// target, its ALSA device); the jacks that follow the stream show it. A worker assumes
    /// every end is there until told otherwise: after `Welcome` come the absent ones, then
    /// each change.
    HostPresence {
        stream_id: u32,
        present: bool,
    },
}

impl BrokerMsg {
    /// News the broker sends on its own, between or before the answers to requests.
    pub fn is_unsolicited(&self) -> bool {
        matches!(
            self,
            BrokerMsg::Xrun { .. } | BrokerMsg::GainChanged { .. } | BrokerMsg::HostPresence { .. }
        )
    }

    /// Fds that must accompany this message.
    pub fn fd_count(&self) -> usize {
        match self {
            BrokerMsg::Prepared { .. } => 2,
            _ => 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IpcError {
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    #[error("peer closed the connection")]
    Closed,
    #[error("message or fd list truncated")]
    Truncated,
    #[error("cannot decode message: {0}")]
    Decode(String),
    #[error("cannot encode message: {0}")]
    Encode(String),
    #[error("expected {expected} fds, got {got}")]
    FdCount { expected: usize, got: usize },
    #[error("timed out waiting for the peer")]
    Timeout,
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_MESSAGE_BYTES>()
}

pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, IpcError> {
    let bytes = bincode::serde::encode_to_vec(msg, bincode_config())
        .map_err(|e| IpcError::Encode(e.to_string()))?;
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(IpcError::Encode("message too large".into()));
    }
    Ok(bytes)
}

/// Decodes exactly one message that must fill the whole packet.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, IpcError> {
    let (msg, used) = bincode::serde::decode_from_slice(bytes, bincode_config())
        .map_err(|e| IpcError::Decode(e.to_string()))?;
    if used != bytes.len() {
        return Err(IpcError::Decode("trailing bytes".into()));
    }
    Ok(msg)
}

/// Clips a reason text so it always fits a packet.
pub fn reason(text: impl Into<String>) -> String {
    let mut text = text.into();
    if text.len() > MAX_REASON_LEN {
        let mut end = MAX_REASON_LEN;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// A connected SOCK_SEQPACKET unix socket carrying one message per packet.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Channel {
    pub fn from_fd(fd: OwnedFd) -> Channel {
        Channel { fd }
    }

    pub fn connect(path: &Path) -> io::Result<Channel> {
        Self::connect_with(path, SocketFlags::CLOEXEC)
    }

    /// Connects without ever blocking: a listener whose backlog is full gives `WouldBlock`.
    pub fn connect_nonblocking(path: &Path) -> io::Result<Channel> {
        Self::connect_with(path, SocketFlags::CLOEXEC | SocketFlags::NONBLOCK)
    }

    fn connect_with(path: &Path, flags: SocketFlags) -> io::Result<Channel> {
        let fd = net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, flags, None)?;
        net::connect(&fd, &SocketAddrUnix::new(path)?)?;
        Ok(Channel { fd })
    }

    /// A connected pair, for a launcher that hands one end to each process.
    pub fn pair() -> io::Result<(Channel, Channel)> {
        let (a, b) = net::socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )?;
        Ok((Channel { fd: a }, Channel { fd: b }))
    }

    pub fn send<T: Serialize>(&self, msg: &T, fds: &[BorrowedFd<'_>]) -> Result<(), IpcError> {
        let bytes = encode(msg)?;
        if fds.len() > MAX_FDS {
            return Err(IpcError::Encode("too many fds".into()));
        }
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(IpcError::Encode("too many fds".into()));
        }
        let sent = net::sendmsg(
            &self.fd,
            &[IoSlice::new(&bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        )
        .map_err(io::Error::from)?;
        if sent != bytes.len() {
            return Err(IpcError::Truncated);
        }
        Ok(())
    }

    /// The uid of the process that connected (or created the pair), as the kernel recorded it
    /// then (SO_PEERCRED): the peer cannot choose or change it.
    pub fn peer_uid(&self) -> io::Result<u32> {
        Ok(net::sockopt::socket_peercred(&self.fd)?.uid.as_raw())
    }

    /// Bytes this end sent that the peer has not read yet (SIOCOUTQ, which AF_UNIX answers
    /// with the kernel buffers of every unread packet, fds and all); 0 once the peer read
    /// everything or closed its end.
    #[allow(unsafe_code)] // an ioctl no safe wrapper offers (SIOCOUTQ)
    pub fn unread_by_peer(&self) -> io::Result<usize> {
        const SIOCOUTQ: rustix::ioctl::Opcode = nix::libc::TIOCOUTQ as rustix::ioctl::Opcode;
        // SAFETY: SIOCOUTQ (the same number as TIOCOUTQ) on a socket writes one C int, the
        // type the getter provides; the fd is a socket this Channel owns.
        let unread = unsafe {
            rustix::ioctl::ioctl(
                &self.fd,
                rustix::ioctl::Getter::<SIOCOUTQ, std::ffi::c_int>::new(),
            )
        }?;
        Ok(usize::try_from(unread).unwrap_or(0))
    }

    /// Hangs up both directions at once, even if another process holds a duplicate: the peer
    /// reads end-of-file and can send nothing more.
    pub fn shutdown(&self) -> io::Result<()> {
        net::shutdown(&self.fd, Shutdown::Both)?;
        Ok(())
    }

    /// Whether the peer has closed its end (or shut it down), found without reading or waiting.
    pub fn peer_hung_up(&self) -> bool {
        let mut fds = [PollFd::new(&self.fd, PollFlags::RDHUP)];
        let now = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        matches!(poll(&mut fds, Some(&now)), Ok(1))
            && fds[0]
                .revents()
                .intersects(PollFlags::HUP | PollFlags::RDHUP | PollFlags::ERR)
    }

    /// Waits until a packet is readable, up to `timeout` (forever if `None`).
    pub fn wait_readable(&self, timeout: Option<Duration>) -> Result<(), IpcError> {
        let timeout = timeout.map(|t| Timespec {
            tv_sec: t.as_secs() as i64,
            tv_nsec: i64::from(t.subsec_nanos()),
        });
        let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
        loop {
            match poll(&mut fds, timeout.as_ref()) {
                Ok(0) => return Err(IpcError::Timeout),
                Ok(_) => return Ok(()),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(IpcError::Io(e.into())),
            }
        }
    }

    /// Receives one packet (blocking unless the socket is non-blocking) and decodes it.
    pub fn recv<T: DeserializeOwned>(&self) -> Result<(T, Vec<OwnedFd>), IpcError> {
        let mut buf = vec![0u8; MAX_MESSAGE_BYTES + 1];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let msg = loop {
            match net::recvmsg(
                &self.fd,
                &mut [IoSliceMut::new(&mut buf)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            ) {
                Err(rustix::io::Errno::INTR) => continue,
                other => break other.map_err(io::Error::from)?,
            }
        };
        // Collect fds first so that they are closed (dropped) on every error path.
        let mut fds = Vec::new();
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = message {
                fds.extend(received);
            }
        }
        if msg.flags.contains(ReturnFlags::TRUNC)
            || msg.flags.contains(ReturnFlags::CTRUNC)
            || fds.len() > MAX_FDS
        {
            return Err(IpcError::Truncated);
        }
        if msg.bytes == 0 {
            return Err(IpcError::Closed);
        }
        if msg.bytes > MAX_MESSAGE_BYTES {
            return Err(IpcError::Truncated);
        }
        Ok((decode(&buf[..msg.bytes])?, fds))
    }
}

/// A listening SOCK_SEQPACKET unix socket.
pub struct Listener {
    fd: OwnedFd,
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Listener {
    /// A listening SOCK_SEQPACKET socket (an inherited one checked by `listen::adopt`).
    pub fn from_fd(fd: OwnedFd) -> Listener {
        Listener { fd }
    }

    /// Accepts one connection as a non-blocking channel.
    pub fn accept(&self) -> io::Result<Channel> {
        let fd = net::accept_with(&self.fd, SocketFlags::CLOEXEC | SocketFlags::NONBLOCK)?;
        Ok(Channel { fd })
    }

    pub fn set_nonblocking(&self) -> io::Result<()> {
        rustix::io::ioctl_fionbio(&self.fd, true)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_snd::protocol as p;

    fn caps() -> PcmCaps {
        PcmCaps {
            direction: p::D_OUTPUT,
            hda_fn_nid: 0,
            features: 0,
            formats: 1 << p::format::S16,
            rates: 1 << p::rate::R48000,
            channels_min: 1,
            channels_max: 2,
        }
    }

    #[test]
    fn messages_round_trip_with_fds() {
        let (a, b) = Channel::pair().unwrap();
        let hello = WorkerMsg::Hello {
            version: PROTOCOL_VERSION,
            vm: "navi".into(),
            streams: vec![caps(); 3],
        };
        a.send(&hello, &[]).unwrap();
        let (got, fds) = b.recv::<WorkerMsg>().unwrap();
        assert_eq!(got, hello);
        assert!(fds.is_empty());

        let file = std::fs::File::open("/dev/null").unwrap();
        let msg = BrokerMsg::Prepared {
            stream_id: 1,
            ring_capacity: 4096,
        };
        b.send(&msg, &[file.as_fd(), file.as_fd()]).unwrap();
        let (got, fds) = a.recv::<BrokerMsg>().unwrap();
        assert_eq!(got, msg);
        assert_eq!(fds.len(), got.fd_count());
    }

    #[test]
    fn garbage_and_oversized_packets_are_errors() {
        let (a, b) = Channel::pair().unwrap();
        // Not a valid enum tag.
        net::send(&a, &[0xff, 0xff, 0xff], SendFlags::empty()).unwrap();
        assert!(matches!(b.recv::<WorkerMsg>(), Err(IpcError::Decode(_))));
        // A Vec length prefix claiming a huge count must not allocate it.
        let mut huge = encode(&WorkerMsg::Hello {
            version: 1,
            vm: "vm".into(),
            streams: vec![],
        })
        .unwrap();
        huge.truncate(huge.len() - 1);
        huge.extend_from_slice(&[0xfc, 0xff, 0xff, 0xff, 0x7f]);
        net::send(&a, &huge, SendFlags::empty()).unwrap();
        assert!(matches!(b.recv::<WorkerMsg>(), Err(IpcError::Decode(_))));
        // Longer than the limit.
        net::send(&a, &vec![0u8; MAX_MESSAGE_BYTES + 100], SendFlags::empty()).unwrap();
        assert!(matches!(b.recv::<WorkerMsg>(), Err(IpcError::Truncated)));
        // Trailing bytes after a valid message.
        let mut extra = encode(&WorkerMsg::Start { stream_id: 0 }).unwrap();
        extra.push(0);
        net::send(&a, &extra, SendFlags::empty()).unwrap();
        assert!(matches!(b.recv::<WorkerMsg>(), Err(IpcError::Decode(_))));
        // The channel still works afterwards.
        a.send(&WorkerMsg::Stop { stream_id: 3 }, &[]).unwrap();
        assert_eq!(
            b.recv::<WorkerMsg>().unwrap().0,
            WorkerMsg::Stop { stream_id: 3 }
        );
        drop(a);
        assert!(matches!(b.recv::<WorkerMsg>(), Err(IpcError::Closed)));
    }

    #[test]
    fn too_many_fds_are_refused() {
        let (a, b) = Channel::pair().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        let fds = [file.as_fd(); 3];
        assert!(a.send(&WorkerMsg::Start { stream_id: 0 }, &fds).is_err());
        // Sent raw with more fds than the receiver has room for: truncated, not accepted.
        let bytes = encode(&WorkerMsg::Start { stream_id: 0 }).unwrap();
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        let four = [file.as_fd(); 4];
        assert!(control.push(SendAncillaryMessage::ScmRights(&four)));
        net::sendmsg(
            &a,
            &[IoSlice::new(&bytes)],
            &mut control,
            SendFlags::empty(),
        )
        .unwrap();
        assert!(matches!(b.recv::<WorkerMsg>(), Err(IpcError::Truncated)));
    }

    #[test]
    fn unread_bytes_and_peer_uid() {
        let (a, b) = Channel::pair().unwrap();
        assert_eq!(a.peer_uid().unwrap(), rustix::process::getuid().as_raw());
        assert_eq!(a.unread_by_peer().unwrap(), 0);
        let file = std::fs::File::open("/dev/null").unwrap();
        let msg = BrokerMsg::Prepared {
            stream_id: 0,
            ring_capacity: 64,
        };
        a.send(&msg, &[file.as_fd(), file.as_fd()]).unwrap();
        assert!(a.unread_by_peer().unwrap() > 0);
        let _ = b.recv::<BrokerMsg>().unwrap();
        assert_eq!(a.unread_by_peer().unwrap(), 0);
        // Unread packets stay charged to the sender after its shutdown, until the peer closes.
        a.send(&msg, &[file.as_fd(), file.as_fd()]).unwrap();
        a.shutdown().unwrap();
        assert!(a.unread_by_peer().unwrap() > 0);
        drop(b);
        assert_eq!(a.unread_by_peer().unwrap(), 0);
    }

    #[test]
    fn gain_messages_round_trip() {
        let (a, b) = Channel::pair().unwrap();
        let gain = Gain {
            volume: 37,
            mute: true,
        };
        a.send(&WorkerMsg::SetGain { stream_id: 3, gain }, &[])
            .unwrap();
        let (msg, fds) = b.recv::<WorkerMsg>().unwrap();
        assert_eq!(msg, WorkerMsg::SetGain { stream_id: 3, gain });
        assert!(fds.is_empty());
        let news = BrokerMsg::GainChanged { stream_id: 1, gain };
        assert_eq!(news.fd_count(), 0);
        b.send(&news, &[]).unwrap();
        assert_eq!(a.recv::<BrokerMsg>().unwrap().0, news);
    }

    #[test]
    fn reasons_are_clipped() {
        assert_eq!(reason("é".repeat(200)).len(), MAX_REASON_LEN);
    }

    #[test]
    fn a_closed_or_shut_peer_is_seen_without_reading() {
        let (a, b) = Channel::pair().unwrap();
        assert!(!a.peer_hung_up());
        // Unread input is no hang-up.
        b.send(&WorkerMsg::Start { stream_id: 0 }, &[]).unwrap();
        assert!(!a.peer_hung_up());
        drop(b);
        assert!(a.peer_hung_up());
        let (c, d) = Channel::pair().unwrap();
        d.shutdown().unwrap();
        assert!(c.peer_hung_up());
    }

    #[test]
    fn wait_readable_times_out() {
        let (a, _b) = Channel::pair().unwrap();
        assert!(matches!(
            a.wait_readable(Some(Duration::from_millis(10))),
            Err(IpcError::Timeout)
        ));
    }
}
