//! Readiness for systemd (`Type=notify`, sd_notify(3)): `READY=1` once the listening socket is
//! served, `STOPPING=1` when a stop begins.
//!
//! The notify socket is connected at start-up, before the sandbox: a confined process may have
//! no filesystem to reach `$NOTIFY_SOCKET` by (Landlock, a mount namespace) and no `socket`
//! left to create one with, so the per-call connect that sd_notify libraries do would fail
//! there. What remains is one `sendmsg` on an fd the process already holds, which both seccomp
//! policies allow. Without `$NOTIFY_SOCKET` (not started by systemd) every call does nothing.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::OnceLock;

use nix::sys::socket::{sendmsg, MsgFlags, UnixAddr};

static NOTIFY: OnceLock<OwnedFd> = OnceLock::new();

/// Connects to `$NOTIFY_SOCKET` (a path, or `@name` for an abstract socket) and unsets it, so
/// nothing this process starts inherits it. Call once, before the sandbox.
pub fn connect_from_env() {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    std::env::remove_var("NOTIFY_SOCKET");
    let target = target.to_string_lossy().into_owned();
    let address = match target.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(&target),
    };
    let connected = address.and_then(|address| {
        let socket = UnixDatagram::unbound()?;
        socket.connect_addr(&address)?;
        Ok(socket)
    });
    match connected {
        Ok(socket) => {
            let _ = NOTIFY.set(OwnedFd::from(socket));
        }
        Err(e) => log::warn!("cannot reach the service manager's notify socket {target}: {e}"),
    }
}

/// The service serves its socket (`READY=1`).
pub fn ready() {
    send("READY=1");
}

/// The service begins to stop (`STOPPING=1`).
pub fn stopping() {
    send("STOPPING=1");
}

fn send(state: &str) {
    let Some(fd) = NOTIFY.get() else { return };
    let iov = [IoSlice::new(state.as_bytes())];
    let sent = sendmsg::<UnixAddr>(fd.as_raw_fd(), &iov, &[], MsgFlags::MSG_DONTWAIT, None);
    if let Err(e) = sent {
        log::warn!("cannot tell the service manager {state}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_and_stopping_reach_the_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let manager = UnixDatagram::bind(&path).unwrap();
        std::env::set_var("NOTIFY_SOCKET", &path);
        connect_from_env();
        assert!(std::env::var_os("NOTIFY_SOCKET").is_none());
        ready();
        stopping();
        let mut buf = [0u8; 64];
        let n = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        let n = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }
}
