//! The broker's control socket for the host command (`vsound ctl`, protocol in `vsound_admin`).
//! A thread of its own accepts one connection at a time, reads its request line (bounded, with
//! a timeout) and hands the request to the broker's loop through a channel and an eventfd; the
//! loop answers from its state. A slow or silent admin client never holds the loop up, and the
//! VMs' workers never see this socket. Who may connect is the socket file's mode: 0660, owned
//! by the admin group when one is given.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags, Timespec};
use vsound_admin::{Reply, Request, MAX_REQUEST_BYTES, TIMEOUT};

/// A request waiting for the broker's loop, and the way back to its client.
pub struct AdminCall {
    pub request: Request,
    answer: mpsc::SyncSender<Reply>,
}

impl AdminCall {
    pub fn answer(self, reply: Reply) {
        // The client's thread gave up waiting: nothing to do.
        let _ = self.answer.send(reply);
    }
}

pub struct AdminServer {
    calls: mpsc::Receiver<AdminCall>,
    /// Written by the server thread when a call is queued; never shared with a worker.
    ready: Arc<OwnedFd>,
}

impl AdminServer {
    /// Serves `listener` (a bound SOCK_STREAM socket) on a new thread.
    pub fn start(listener: UnixListener) -> io::Result<AdminServer> {
        let ready = Arc::new(eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?);
        let (sender, calls) = mpsc::channel();
        let wake = ready.clone();
        std::thread::Builder::new()
            .name("vsound-admin".into())
            .spawn(move || {
                for connection in listener.incoming() {
                    match connection {
                        Ok(stream) => serve(stream, &sender, &wake),
                        Err(e) => {
                            log::warn!("control socket: accept: {e}");
                            std::thread::sleep(std::time::Duration::from_millis(100));
                        }
                    }
                }
            })?;
        Ok(AdminServer { calls, ready })
    }

    /// Readable while calls wait in [`AdminServer::take`].
    pub fn ready_fd(&self) -> BorrowedFd<'_> {
        self.ready.as_fd()
    }

    pub fn take(&self) -> Vec<AdminCall> {
        let mut counter = [0u8; 8];
        let _ = rustix::io::read(&*self.ready, &mut counter);
        self.calls.try_iter().collect()
    }
}

fn serve(stream: UnixStream, calls: &mpsc::Sender<AdminCall>, ready: &OwnedFd) {
    let uid = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
        .map(|c| c.uid().to_string())
        .unwrap_or_else(|_| "?".into());
    // Timeouts by poll (the sandbox allows no socket timeouts): a silent client costs TIMEOUT.
    if stream.set_nonblocking(true).is_err() {
        return;
    }
    let deadline = Instant::now() + TIMEOUT;
    let reply = match read_line(&stream, deadline) {
        Err(e) => Reply::Error(e),
        Ok(line) => match vsound_admin::parse_request(&line) {
            Err(e) => Reply::Error(e),
            Ok(request) => {
                log::debug!("control socket: uid {uid}: {request:?}");
                let (answer, reply) = mpsc::sync_channel(1);
                if calls.send(AdminCall { request, answer }).is_err() {
                    return;
                }
                let _ = rustix::io::write(ready, &1u64.to_ne_bytes());
                reply
                    .recv_timeout(TIMEOUT)
                    .unwrap_or_else(|_| Reply::Error("the broker did not answer in time".into()))
            }
        },
    };
    if let Reply::Error(e) = &reply {
        log::info!("control socket: uid {uid}: {e}");
    }
    let line = vsound_admin::reply_line(&reply);
    let _ = write_all(&stream, line.as_bytes(), Instant::now() + TIMEOUT);
}

/// Waits until `stream` is ready for `flags` or `deadline` passes.
fn wait(stream: &UnixStream, flags: PollFlags, deadline: Instant) -> Result<(), String> {
    let left = deadline.saturating_duration_since(Instant::now());
    let timeout = Timespec {
        tv_sec: left.as_secs() as i64,
        tv_nsec: i64::from(left.subsec_nanos()),
    };
    let mut fds = [PollFd::new(stream, flags)];
    match poll(&mut fds, Some(&timeout)) {
        Ok(0) => Err("timed out".into()),
        Ok(_) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

/// One request line, at most MAX_REQUEST_BYTES.
/// (rustix's read and write are the read(2) and write(2) the sandbox allows; std's socket I/O
/// is recv(2) and send(2).)
fn read_line(stream: &UnixStream, deadline: Instant) -> Result<String, String> {
    let mut line = Vec::new();
    let mut chunk = [0u8; 512];
    while !line.ends_with(b"\n") {
        if line.len() as u64 >= MAX_REQUEST_BYTES {
            return Err(format!(
                "a request is one line of at most {MAX_REQUEST_BYTES} bytes"
            ));
        }
        match rustix::io::read(stream, &mut chunk) {
            Ok(0) => return Err("the request ended before its newline".into()),
            Ok(n) => line.extend_from_slice(&chunk[..n]),
            Err(rustix::io::Errno::AGAIN) => {
                wait(stream, PollFlags::IN, deadline)
                    .map_err(|e| format!("reading the request: {e}"))?;
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(format!("reading the request: {e}")),
        }
    }
    String::from_utf8(line).map_err(|_| "the request is not UTF-8".into())
}

fn write_all(stream: &UnixStream, mut bytes: &[u8], deadline: Instant) -> Result<(), String> {
    while !bytes.is_empty() {
        match rustix::io::write(stream, bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(rustix::io::Errno::AGAIN) => wait(stream, PollFlags::OUT, deadline)?,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}
