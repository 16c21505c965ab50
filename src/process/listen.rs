//! Listening sockets. A binary gets its one listening socket in exactly one of three ways:
//!
//! - systemd socket activation: `LISTEN_PID` is our pid and `LISTEN_FDS` is 1, the socket is
//!   fd 3 (`sd_listen_fds`); the broker's unit may pass a second one, its control socket for
//!   the host command, named `control` in `LISTEN_FDNAMES` (`FileDescriptorName=control`);
//! - `--fd N`: QEMU's vhost-user backend-program convention;
//! - `--socket PATH` (alias `--socket-path`): the binary binds the path itself. It refuses a path
//!   that a running process serves, replaces a stale socket file, never replaces anything that
//!   is not a socket, and removes its own socket when done (only while the path still is that
//!   socket).
//!
//! An inherited socket must be a listening unix socket of the expected type. Whoever passed it
//! owns its path and keeps it listening across our restarts, so connections that arrive while
//! no process accepts wait in its backlog.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rustix::fs::FileType;
use rustix::io::{Errno, FdFlags};
use rustix::net::{self, AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

/// The first fd of socket activation (`SD_LISTEN_FDS_START`).
pub const ACTIVATION_FD: RawFd = 3;
/// Connections that may wait for an accept: enough for every VMM that connects while one
/// process exits and the next starts.
const BACKLOG: i32 = 128;

/// The socket type a binary serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketKind {
    /// vhost-user (the worker).
    Stream,
    /// The worker ↔ broker channel (the broker).
    SeqPacket,
}

impl SocketKind {
    fn socket_type(self) -> SocketType {
        match self {
            SocketKind::Stream => SocketType::STREAM,
            SocketKind::SeqPacket => SocketType::SEQPACKET,
        }
    }

    fn name(self) -> &'static str {
        match self {
            SocketKind::Stream => "SOCK_STREAM",
            SocketKind::SeqPacket => "SOCK_SEQPACKET",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("{0} is served by a running process: stop it, or choose another path")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket: refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot listen on {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("fd {fd} ({origin}) {problem}")]
    BadFd {
        fd: RawFd,
        origin: &'static str,
        problem: String,
    },
    #[error("socket activation: {0}")]
    Activation(String),
    #[error("{0}")]
    Usage(String),
}

/// Where the listening socket comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Bind this path ourselves.
    Path(PathBuf),
    /// An inherited fd; `origin` says how it was given, for messages.
    Fd { fd: RawFd, origin: &'static str },
}

impl Source {
    /// The inherited fd that `sandbox::close_inherited_fds` must keep.
    pub fn inherited_fd(&self) -> Option<RawFd> {
        match self {
            Source::Fd { fd, .. } => Some(*fd),
            Source::Path(_) => None,
        }
    }

    /// For log lines.
    pub fn describe(&self) -> String {
        match self {
            Source::Path(path) => path.display().to_string(),
            Source::Fd { fd, origin } => format!("fd {fd} ({origin})"),
        }
    }
}

/// The name of the broker's control socket among the activated fds.
pub const CONTROL_FD_NAME: &str = "control";

/// What socket activation passed: the listening socket, and the control socket if named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Activated {
    pub listen: RawFd,
    pub control: Option<RawFd>,
}

/// Reads systemd's socket-activation variables and unsets them, so that no child mistakes our
/// fds for its own. Only call it while the process has a single thread (first thing in main).
pub fn take_activation() -> Result<Option<Activated>, ListenError> {
    let pid = std::env::var_os("LISTEN_PID");
    let fds = std::env::var_os("LISTEN_FDS");
    let names = std::env::var_os("LISTEN_FDNAMES");
    for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(name);
    }
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(None);
    };
    let Some(pid) = pid.to_str().and_then(|p| p.parse::<u32>().ok()) else {
        return Err(ListenError::Activation(format!(
            "LISTEN_PID={pid:?} is not a pid"
        )));
    };
    // Like sd_listen_fds: variables meant for another process are ignored.
    if pid != std::process::id() {
        return Ok(None);
    }
    let Some(count) = fds.to_str().and_then(|n| n.parse::<u32>().ok()) else {
        return Err(ListenError::Activation(format!(
            "LISTEN_FDS={fds:?} is not a number"
        )));
    };
    let names = names.map(|n| n.to_string_lossy().into_owned());
    activated(count, names.as_deref()).map(Some)
}

/// Which activated fd is which: one socket, or one plus the one named [`CONTROL_FD_NAME`].
fn activated(count: u32, names: Option<&str>) -> Result<Activated, ListenError> {
    let names: Vec<&str> = names.map(|n| n.split(':').collect()).unwrap_or_default();
    let is_control = |i: usize| names.get(i) == Some(&CONTROL_FD_NAME);
    match count {
        1 if is_control(0) => Err(ListenError::Activation(
            "only the control socket was passed, not the one to serve".into(),
        )),
        1 => Ok(Activated {
            listen: ACTIVATION_FD,
            control: None,
        }),
        2 if is_control(0) != is_control(1) => {
            let control = usize::from(is_control(1));
            Ok(Activated {
                listen: ACTIVATION_FD + (1 - control) as RawFd,
                control: Some(ACTIVATION_FD + control as RawFd),
            })
        }
        n => Err(ListenError::Activation(format!(
            "LISTEN_FDS={n} (names {names:?}): expected one socket, or one and one named \
             {CONTROL_FD_NAME:?}"
        ))),
    }
}

/// Chooses the source from the command line and socket activation; exactly one must be given.
/// Also returns an activated control socket's fd. Reads (and unsets) the activation
/// variables: call it first thing in main.
pub fn source(
    socket: Option<PathBuf>,
    fd: Option<RawFd>,
) -> Result<(Source, Option<RawFd>), ListenError> {
    let activation = take_activation()?;
    let source = choose(socket, fd, activation.map(|a| a.listen))?;
    Ok((source, activation.and_then(|a| a.control)))
}

fn choose(
    socket: Option<PathBuf>,
    fd: Option<RawFd>,
    activated: Option<RawFd>,
) -> Result<Source, ListenError> {
    match (socket, fd, activated) {
        (Some(path), None, None) => Ok(Source::Path(path)),
        (None, Some(fd), None) => Ok(Source::Fd { fd, origin: "--fd" }),
        (None, None, Some(fd)) => Ok(Source::Fd {
            fd,
            origin: "socket activation",
        }),
        (None, None, None) => Err(ListenError::Usage(
            "no listening socket: give --socket PATH or --fd N, or start by socket activation"
                .into(),
        )),
        (socket, fd, activated) => {
            let given: Vec<&str> = [
                socket.map(|_| "--socket"),
                fd.map(|_| "--fd"),
                activated.map(|_| "socket activation (LISTEN_FDS)"),
            ]
            .into_iter()
            .flatten()
            .collect();
            Err(ListenError::Usage(format!(
                "one listening socket only, but got {}",
                given.join(" and ")
            )))
        }
    }
}

/// A listening socket, and its path when we bound it ourselves.
pub struct Listening {
    pub fd: OwnedFd,
    pub path: Option<SocketPath>,
}

/// Opens the listening socket from its source.
pub fn open(source: &Source, kind: SocketKind) -> Result<Listening, ListenError> {
    match source {
        Source::Path(path) => {
            let (fd, path) = bind(path, kind)?;
            Ok(Listening {
                fd,
                path: Some(path),
            })
        }
        Source::Fd { fd, origin } => Ok(Listening {
            fd: adopt(*fd, origin, kind)?,
            path: None,
        }),
    }
}

/// Whether a process holds a socket bound to the socket file at `path`. Asked with a datagram
/// connect, which creates no connection: a stream connect would be taken as the VMM by a
/// waiting one-connection worker, or start a socket-activated service.
fn is_served(path: &Path) -> io::Result<bool> {
    let probe = net::socket_with(
        AddressFamily::UNIX,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    match net::connect(&probe, &SocketAddrUnix::new(path)?) {
        // Some socket is bound there: of our type (EPROTOTYPE to a datagram) or a datagram one.
        Ok(()) | Err(Errno::PROTOTYPE) => Ok(true),
        // The file is left from a process that has gone.
        Err(Errno::CONNREFUSED) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Binds and listens on `path`, replacing a stale socket file; refuses a path that a running
/// process serves, or that is not a socket.
pub fn bind(path: &Path, kind: SocketKind) -> Result<(OwnedFd, SocketPath), ListenError> {
    let bind_error = |source: io::Error| ListenError::Bind {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(ListenError::NotASocket(path.to_path_buf()))
        }
        Ok(_) => {
            if is_served(path).map_err(bind_error)? {
                return Err(ListenError::InUse(path.to_path_buf()));
            }
            log::info!("replacing the stale socket {}", path.display());
            std::fs::remove_file(path).map_err(bind_error)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_error(e)),
    }
    let fd = net::socket_with(
        AddressFamily::UNIX,
        kind.socket_type(),
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| bind_error(e.into()))?;
    let address = SocketAddrUnix::new(path).map_err(|e| bind_error(e.into()))?;
    match net::bind(&fd, &address) {
        Ok(()) => {}
        // Another instance bound it between our check and our bind.
        Err(Errno::ADDRINUSE) => return Err(ListenError::InUse(path.to_path_buf())),
        Err(e) => return Err(bind_error(e.into())),
    }
    let ours = SocketPath::of(path, &fd).map_err(bind_error)?;
    net::listen(&fd, BACKLOG).map_err(|e| bind_error(e.into()))?;
    Ok((fd, ours))
}

/// Takes ownership of an inherited fd after checking that it is a listening unix socket of
/// `kind`.
#[allow(unsafe_code)] // taking ownership of an inherited fd number is unsafe by nature
pub fn adopt(fd: RawFd, origin: &'static str, kind: SocketKind) -> Result<OwnedFd, ListenError> {
    let bad = |problem: String| ListenError::BadFd {
        fd,
        origin,
        problem,
    };
    if fd <= 2 {
        return Err(bad("is a standard stream, not a listening socket".into()));
    }
    // /proc/self/fd/N resolves to the open file itself: this proves fd N is open (and a socket)
    // before anything takes ownership of it.
    match std::fs::metadata(format!("/proc/self/fd/{fd}")) {
        Ok(meta) if meta.file_type().is_socket() => {}
        Ok(_) => return Err(bad("is not a socket".into())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(bad("is not open".into())),
        Err(e) => return Err(bad(format!("cannot be checked: {e}"))),
    }
    // SAFETY: fd is open (checked above), was inherited from whoever started us, and nothing
    // else in this process owns it: it is taken once, here, and `close_inherited_fds` closed
    // every other inherited fd and kept this one.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let expected = format!("a listening {} unix socket", kind.name());
    let domain = net::sockopt::socket_domain(&owned).map_err(|e| bad(e.to_string()))?;
    let socket_type = net::sockopt::socket_type(&owned).map_err(|e| bad(e.to_string()))?;
    let listening = net::sockopt::socket_acceptconn(&owned).map_err(|e| bad(e.to_string()))?;
    if domain != AddressFamily::UNIX {
        return Err(bad(format!("is not a unix socket; expected {expected}")));
    }
    if socket_type != kind.socket_type() {
        let actual = match socket_type {
            SocketType::STREAM => "SOCK_STREAM",
            SocketType::SEQPACKET => "SOCK_SEQPACKET",
            SocketType::DGRAM => "SOCK_DGRAM",
            _ => "another type of",
        };
        return Err(bad(format!("is a {actual} socket; expected {expected}")));
    }
    if !listening {
        return Err(bad(format!("is not listening; expected {expected}")));
    }
    // Ours alone from now on: never leak it into a program we might start.
    rustix::io::fcntl_setfd(&owned, FdFlags::CLOEXEC).map_err(|e| bad(e.to_string()))?;
    Ok(owned)
}

/// The socket file we bound: removed on `remove` or drop, but only while the path still is
/// that socket (same device and inode), so a successor's socket is never removed. The
/// comparison is sound because this holds the socket open until then: a bound socket pins its
/// file's inode, so no other file can have that inode number meanwhile.
#[derive(Debug)]
pub struct SocketPath {
    path: PathBuf,
    dev: u64,
    ino: u64,
    pin: Mutex<Option<OwnedFd>>,
}

impl SocketPath {
    fn of(path: &Path, socket: &OwnedFd) -> io::Result<SocketPath> {
        let (dev, ino) =
            identity(path)?.ok_or_else(|| io::Error::other("the bound path is not a socket"))?;
        Ok(SocketPath {
            path: path.to_path_buf(),
            dev,
            ino,
            pin: Mutex::new(Some(socket.try_clone()?)),
        })
    }

    /// The directory the socket file is in (what removing it needs access to).
    pub fn directory(&self) -> PathBuf {
        match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }

    /// Removes the socket file if it still is ours; at most once. Failures are logged: a file
    /// left behind is replaced as stale by the next instance.
    pub fn remove(&self) {
        let mut pin = self
            .pin
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if pin.is_none() {
            return;
        }
        match identity(&self.path) {
            Ok(found) if found == Some((self.dev, self.ino)) => {
                match rustix::fs::unlink(&self.path) {
                    Ok(()) => log::debug!("removed {}", self.path.display()),
                    // Expected where the directory is not ours to write (a user switch, a
                    // service manager's directory): documented, and the next start copes.
                    Err(e) if matches!(e, rustix::io::Errno::ACCESS | rustix::io::Errno::PERM) => {
                        log::info!(
                            "left {} behind ({e}: its directory is not writable for this user); \
                             the next start replaces it",
                            self.path.display()
                        )
                    }
                    Err(e) => log::warn!("cannot remove {}: {e}", self.path.display()),
                }
            }
            Ok(_) => log::info!(
                "{} is another process's socket now: left in place",
                self.path.display()
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("cannot check {}: {e}", self.path.display()),
        }
        // Checked: the inode may go now.
        *pin = None;
    }
}

impl Drop for SocketPath {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Device and inode of the socket file at `path` itself (a symlink is not followed); `None`
/// when the file there is not a socket.
fn identity(path: &Path) -> io::Result<Option<(u64, u64)>> {
    let stat = rustix::fs::lstat(path)?;
    Ok((FileType::from_raw_mode(stat.st_mode) == FileType::Socket)
        .then_some((stat.st_dev, stat.st_ino)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_live_path_is_refused_and_a_stale_one_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let (fd, ours) = bind(&path, SocketKind::Stream).unwrap();
        assert!(matches!(
            bind(&path, SocketKind::Stream),
            Err(ListenError::InUse(p)) if p == path
        ));
        assert!(matches!(
            bind(&path, SocketKind::SeqPacket),
            Err(ListenError::InUse(_))
        ));
        // The check created no connection on the live socket.
        rustix::io::ioctl_fionbio(&fd, true).unwrap();
        assert_eq!(
            net::accept(&fd).map(drop).unwrap_err(),
            Errno::AGAIN,
            "the liveness check left a connection"
        );
        // Closed without removing its file: stale, replaced.
        *ours.pin.lock().unwrap() = None;
        std::mem::forget(ours);
        drop(fd);
        let (_fd, again) = bind(&path, SocketKind::Stream).unwrap();
        drop(again);
        assert!(!path.exists(), "our own socket is removed");
    }

    #[test]
    fn a_file_that_is_not_a_socket_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        std::fs::write(&path, b"keep").unwrap();
        assert!(matches!(
            bind(&path, SocketKind::Stream),
            Err(ListenError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"keep");
    }

    #[test]
    fn a_successors_socket_is_left_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let (fd, first) = bind(&path, SocketKind::Stream).unwrap();
        // Someone removed our file and a successor bound the path; even with our socket
        // closed (the file system may reuse a freed inode number at once) ours is told apart.
        std::fs::remove_file(&path).unwrap();
        drop(fd);
        let (_fd, second) = bind(&path, SocketKind::Stream).unwrap();
        first.remove();
        assert!(path.exists(), "the successor's socket was removed");
        drop(second);
        assert!(!path.exists());
    }

    #[test]
    fn only_one_source_is_accepted() {
        let err = choose(Some("/x".into()), Some(5), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--socket and --fd"), "{err}");
        let err = choose(Some("/x".into()), None, Some(3))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--socket and socket activation"), "{err}");
        assert!(choose(None, None, None).is_err());
        assert_eq!(choose(None, Some(7), None).unwrap().inherited_fd(), Some(7));
        assert_eq!(
            choose(None, None, Some(3)).unwrap(),
            Source::Fd {
                fd: 3,
                origin: "socket activation"
            }
        );
    }

    #[test]
    fn an_activated_control_socket_is_found_by_its_name() {
        let plain = Activated {
            listen: 3,
            control: None,
        };
        assert_eq!(activated(1, None).unwrap(), plain);
        assert_eq!(activated(1, Some("broker")).unwrap(), plain);
        assert_eq!(
            activated(2, Some("broker:control")).unwrap(),
            Activated {
                listen: 3,
                control: Some(4)
            }
        );
        assert_eq!(
            activated(2, Some("control:broker")).unwrap(),
            Activated {
                listen: 4,
                control: Some(3)
            }
        );
        for (count, names) in [
            (1, Some("control")),
            (2, None),
            (2, Some("control:control")),
            (2, Some("a:b")),
            (3, Some("a:control:b")),
            (0, None),
        ] {
            assert!(activated(count, names).is_err(), "{count} {names:?}");
        }
    }

    #[test]
    fn adopt_checks_type_and_listening() {
        let dir = tempfile::tempdir().unwrap();
        let (fd, _path) = bind(&dir.path().join("q.sock"), SocketKind::SeqPacket).unwrap();
        let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
        let err = adopt(raw, "--fd", SocketKind::Stream)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("is a SOCK_SEQPACKET socket; expected a listening SOCK_STREAM"),
            "{err}"
        );
        assert!(adopt(4000, "--fd", SocketKind::SeqPacket)
            .unwrap_err()
            .to_string()
            .contains("is not open"));

        let unbound = net::socket(AddressFamily::UNIX, SocketType::STREAM, None).unwrap();
        let raw = std::os::fd::IntoRawFd::into_raw_fd(unbound);
        let err = adopt(raw, "--fd", SocketKind::Stream)
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not listening"), "{err}");

        let (fd, _path) = bind(&dir.path().join("s.sock"), SocketKind::Stream).unwrap();
        let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
        let owned = adopt(raw, "--fd", SocketKind::Stream).unwrap();
        assert!(rustix::io::fcntl_getfd(owned.as_fd())
            .unwrap()
            .contains(FdFlags::CLOEXEC));
    }
}
