//! vsound: development launcher. Holds the broker's and the VMM's listening sockets itself,
//! like systemd's socket units, and passes them to a broker and a worker (`--fd 3`); restarts
//! the worker whenever its VMM disconnects and the broker whenever it dies, so a VMM or a worker
//! that connects meanwhile waits in the socket's backlog; stops both on Ctrl-C or SIGTERM and
//! removes its sockets. Production starts the two programs from the shipped systemd units.

#![forbid(unsafe_code)]

mod cli;
mod ctl;

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use command_fds::{CommandFdExt, FdMapping};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::unistd::Pid;

use cli::{Args, Cmd};
use vsound_config::{BackendKind, VmName};
use vsound_process::listen::{self, SocketKind, SocketPath};
use vsound_process::sandbox::Mode;

/// The fd a child finds its listening socket on (`--fd 3`).
const CHILD_LISTEN_FD: i32 = 3;
/// A child that dies sooner than this after its start counts as failing at once.
const QUICK_EXIT: Duration = Duration::from_secs(1);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

fn sibling_binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .filter(|path| path.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// One supervised child: its program, arguments and listening socket, and when to restart it.
struct Supervised {
    /// "broker" or "worker", for logs.
    role: &'static str,
    binary: PathBuf,
    args: Vec<OsString>,
    listening: OwnedFd,
    child: Option<Child>,
    started: Instant,
    restart_at: Option<Instant>,
    /// Exits in a row that came quickly after a start.
    quick_exits: u32,
}

impl Supervised {
    fn start(&mut self) -> Result<(), String> {
        let fd = self
            .listening
            .try_clone()
            .map_err(|e| format!("{}: cannot pass the socket: {e}", self.role))?;
        // The child gets the socket as fd 3, without FD_CLOEXEC there only. It inherits our
        // blocked signals: the broker and the worker clear their signal mask first thing.
        let mut command = Command::new(&self.binary);
        command
            .arg("--fd")
            .arg(CHILD_LISTEN_FD.to_string())
            .args(&self.args)
            .fd_mappings(vec![FdMapping {
                parent_fd: fd,
                child_fd: CHILD_LISTEN_FD,
            }])
            .map_err(|e| format!("{}: {e}", self.role))?;
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.binary.display()))?;
        log::info!("{} started (pid {})", self.role, child.id());
        self.child = Some(child);
        self.started = Instant::now();
        self.restart_at = None;
        Ok(())
    }

    /// Reaps the child if it exited and schedules its restart.
    fn check(&mut self) {
        let Some(child) = &mut self.child else {
            return;
        };
        let status = match child.try_wait() {
            Ok(Some(status)) => status,
            Ok(None) => return,
            Err(e) => {
                log::warn!("{}: cannot check the child: {e}", self.role);
                return;
            }
        };
        self.child = None;
        let lived = self.started.elapsed();
        let delay = self.restart_delay(status, lived);
        self.restart_at = Some(Instant::now() + delay);
        if self.role == "worker" && status.success() {
            log::info!("worker exited ({status}, its VMM disconnected); restarting it");
        } else {
            log::warn!(
                "{} exited ({status}) after {:.1} s; restarting it in {} ms",
                self.role,
                lived.as_secs_f64(),
                delay.as_millis()
            );
        }
    }

    /// At once, unless the child keeps failing right after its start: then 0.1 s, doubling up
    /// to 5 s. A worker whose VMM went away ends normally, however quickly.
    fn restart_delay(&mut self, status: ExitStatus, lived: Duration) -> Duration {
        let normal_end = self.role == "worker" && status.success();
        if normal_end || lived >= QUICK_EXIT {
            self.quick_exits = 0;
            return Duration::ZERO;
        }
        self.quick_exits += 1;
        FIRST_BACKOFF
            .saturating_mul(1 << (self.quick_exits - 1).min(6))
            .min(MAX_BACKOFF)
    }

    fn restart_if_due(&mut self) {
        let Some(at) = self.restart_at else {
            return;
        };
        if Instant::now() < at {
            return;
        }
        if let Err(e) = self.start() {
            // Not a reason to stop serving: try again later.
            let delay = MAX_BACKOFF;
            log::error!("{e}; trying again in {} s", delay.as_secs());
            self.restart_at = Some(Instant::now() + delay);
        }
    }

    fn stop(&mut self) {
        if let Some(child) = &mut self.child {
            terminate(child);
        }
        self.child = None;
    }
}

fn terminate(child: &mut Child) {
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn bind(path: &Path, kind: SocketKind) -> Result<(OwnedFd, SocketPath), String> {
    listen::bind(path, kind).map_err(|e| e.to_string())
}

/// As root the worker runs as `worker_group`'s member and reconnects to the broker by path
/// whenever the broker restarts: the broker socket is made its group's (0660), like the shipped
/// units do with the `vsound-broker` group, and an unreachable directory is reported at once.
fn let_worker_reconnect(broker_socket: &Path, worker_group: &str) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let group = nix::unistd::Group::from_name(worker_group)
        .map_err(|e| format!("looking up group {worker_group}: {e}"))?
        .ok_or_else(|| format!("no group {worker_group}"))?;
    nix::unistd::chown(broker_socket, None, Some(group.gid))
        .map_err(|e| format!("chown {}: {e}", broker_socket.display()))?;
    std::fs::set_permissions(broker_socket, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| format!("chmod {}: {e}", broker_socket.display()))?;
    for dir in broker_socket.ancestors().skip(1) {
        let Ok(meta) = std::fs::metadata(dir) else {
            continue;
        };
        use std::os::unix::fs::MetadataExt;
        let traversable = meta.mode() & 0o001 != 0
            || (meta.gid() == group.gid.as_raw() && meta.mode() & 0o010 != 0);
        if !traversable {
            log::warn!(
                "the worker (group {worker_group}) cannot reach {}: {} is not searchable for \
                 it, so the worker cannot reconnect after a broker restart; choose a \
                 --broker-socket in a directory it can traverse",
                broker_socket.display(),
                dir.display()
            );
            break;
        }
    }
    Ok(())
}

/// The broker's user when none is given: the package's system user if it exists.
fn default_broker_user() -> String {
    match nix::unistd::User::from_name("vsound-broker") {
        Ok(Some(_)) => "vsound-broker".to_string(),
        _ => "nobody".to_string(),
    }
}

struct RunOptions {
    socket: PathBuf,
    config: Option<PathBuf>,
    vm: VmName,
    broker_socket: Option<PathBuf>,
    sandbox: Mode,
    backend: Option<BackendKind>,
    broker_user: Option<String>,
    worker_user: String,
    worker_group: String,
}

fn run(options: RunOptions) -> Result<(), String> {
    let RunOptions {
        socket,
        config,
        vm,
        broker_socket,
        sandbox,
        backend,
        broker_user,
        worker_user,
        worker_group,
    } = options;
    let broker_socket = broker_socket.unwrap_or_else(|| {
        let mut name = socket.file_name().unwrap_or_default().to_os_string();
        name.push(".broker");
        socket.with_file_name(name)
    });
    // Child exits and stop requests all arrive here; blocked so that none is lost.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGCHLD);
    signals.thread_block().map_err(|e| e.to_string())?;
    let events = SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|e| e.to_string())?;

    // Dropped at the end of run: removes both socket files (while they still are ours).
    let (broker_fd, _broker_path) = bind(&broker_socket, SocketKind::SeqPacket)?;
    let (worker_fd, _worker_path) = bind(&socket, SocketKind::Stream)?;
    if nix::unistd::Uid::effective().is_root() {
        let_worker_reconnect(&broker_socket, &worker_group)?;
    }

    let sandbox = sandbox
        .to_possible_value()
        .map_or("strict".to_string(), |v| v.get_name().to_string());
    let mut common: Vec<OsString> = vec!["--sandbox".into(), sandbox.into()];
    if let Some(config) = &config {
        common.extend(["--config".into(), config.into()]);
    }
    let mut worker_args: Vec<OsString> = vec![
        "--broker".into(),
        broker_socket.clone().into(),
        "--vm".into(),
        vm.as_str().into(),
    ];
    worker_args.extend(common.iter().cloned());
    if nix::unistd::Uid::effective().is_root() {
        worker_args.extend([
            "--user".into(),
            worker_user.clone().into(),
            "--group".into(),
            worker_group.into(),
        ]);
    }
    let supervised = |role, binary, args, listening| Supervised {
        role,
        binary: sibling_binary(binary),
        args,
        listening,
        child: None,
        started: Instant::now(),
        restart_at: None,
        quick_exits: 0,
    };
    // The broker binds its control socket itself (and replaces it when it restarts).
    let control_socket = {
        let mut name = socket.file_name().unwrap_or_default().to_os_string();
        name.push(".control");
        socket.with_file_name(name)
    };
    let mut broker_args = common;
    broker_args.extend(["--control-socket".into(), control_socket.clone().into()]);
    if let Some(backend) = backend {
        broker_args.extend(["--backend".into(), backend.name().into()]);
    }
    if nix::unistd::Uid::effective().is_root() {
        let user = broker_user.unwrap_or_else(default_broker_user);
        if user == worker_user {
            log::warn!(
                "the broker and the worker both run as {user}: the broker cannot tell the \
                 worker's uid from its own (create the user vsound-broker, or pass \
                 --broker-user)"
            );
        } else {
            log::info!("the broker runs as {user}, the worker as {worker_user}");
        }
        broker_args.extend(["--user".into(), user.into()]);
    }
    let mut children = [
        supervised("broker", "vsound-broker", broker_args, broker_fd),
        supervised("worker", "vsound-worker", worker_args, worker_fd),
    ];
    let result = supervise(
        &mut children,
        &events,
        &socket,
        &broker_socket,
        &control_socket,
    );
    for child in children.iter_mut().rev() {
        child.stop();
    }
    // The broker bound it, but as another user it may not remove it from our directory.
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(&control_socket).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(&control_socket);
    }
    println!("vsound stopped");
    result
}

fn supervise(
    children: &mut [Supervised],
    events: &SignalFd,
    socket: &Path,
    broker_socket: &Path,
    control_socket: &Path,
) -> Result<(), String> {
    for child in children.iter_mut() {
        child.start()?;
    }
    println!(
        "vsound is serving {} (broker at {})",
        socket.display(),
        broker_socket.display()
    );
    println!(
        "Host commands: vsound ctl --socket {} list (or set-volume, mute, mute-all)",
        control_socket.display()
    );
    // vhost-user needs the guest's RAM shared (a memfd backend); QEMU refuses to start unless
    // `-m` equals the backend's size ("total memory for NUMA nodes ... should equal RAM size").
    // `controls=on` sizes QEMU's config space for the control elements: QEMU passes the
    // worker's VIRTIO_SND_F_CTLS to the guest either way, and without it the guest reads its
    // `controls` count past a 12-byte space (as 0xffffffff) and fails its probe.
    println!("Attach a VM with these QEMU arguments (-m and size= must be equal):");
    println!(
        "  -m 512M -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \\\n  -chardev socket,id=vsound,path={} -device vhost-user-snd-pci,chardev=vsound,controls=on",
        socket.display()
    );
    println!("Press Ctrl-C to stop.");
    loop {
        let next_restart = children.iter().filter_map(|c| c.restart_at).min();
        let timeout = match next_restart {
            None => PollTimeout::NONE,
            // Rounded up, so that the restart is due when poll returns.
            Some(at) => PollTimeout::try_from(
                at.saturating_duration_since(Instant::now()) + Duration::from_millis(1),
            )
            .unwrap_or(PollTimeout::MAX),
        };
        let mut fds = [PollFd::new(
            std::os::fd::AsFd::as_fd(events),
            PollFlags::POLLIN,
        )];
        match poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(format!("poll: {e}")),
        }
        while let Ok(Some(info)) = events.read_signal() {
            if info.ssi_signo != Signal::SIGCHLD as u32 {
                log::info!("stopping (signal {})", info.ssi_signo);
                return Ok(());
            }
        }
        for child in children.iter_mut() {
            child.check();
        }
        for child in children.iter_mut() {
            child.restart_if_due();
        }
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let Args { command } = Args::parse();
    let result = match command {
        Cmd::Run {
            socket,
            config,
            vm,
            broker_socket,
            sandbox,
            backend,
            broker_user,
            worker_user,
            worker_group,
        } => run(RunOptions {
            socket,
            config,
            vm,
            broker_socket,
            sandbox,
            backend,
            broker_user,
            worker_user,
            worker_group,
        }),
        Cmd::Ctl {
            socket,
            json,
            action,
        } => ctl::run(socket, json, action),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vsound: {e}");
            ExitCode::FAILURE
        }
    }
}
