//! vsound-worker: serves one VMM's vhost-user socket as a virtio-sound device and feeds the
//! audio broker. Never touches an audio device itself.

#![forbid(unsafe_code)]

use std::os::fd::RawFd;
use std::process::ExitCode;
use std::sync::{Arc, RwLock};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;

use vsound_config::Config;
use vsound_process::listen::{self, SocketKind, SocketPath, Source};
use vsound_process::sandbox::{self, PathRule, Role};
use vsound_worker::cli::Args;
use vsound_worker::device::{GuestMemory, SoundDevice, DEVICE_EVENT};

/// What `--print-capabilities` prints: QEMU's `VHostUserBackendCapabilities` (its
/// docs/interop/vhost-user.json). That schema names no `sound` type yet, and so defines no
/// features for one.
const CAPABILITIES: &str = r#"{"type": "sound"}"#;

/// Ends the process on SIGINT/SIGTERM after removing the socket file it bound; runs on a thread
/// started after the sandbox, so it is confined like every other.
fn remove_socket_on_stop(stop: SignalFd, socket_path: Arc<SocketPath>) {
    std::thread::spawn(move || loop {
        match stop.read_signal() {
            Ok(Some(info)) => {
                log::info!("worker: stopped by signal {}", info.ssi_signo);
                vsound_process::notify::stopping();
                socket_path.remove();
                std::process::exit(0);
            }
            Ok(None) => {}
            Err(e) => {
                log::warn!("worker: cannot read stop signals: {e}");
                return;
            }
        }
    });
}

fn run(args: Args, source: Source, control: Option<RawFd>) -> Result<(), String> {
    if control.is_some() {
        return Err("socket activation passed a control socket: the worker serves none".into());
    }
    // A worker that binds its path itself removes it when stopped: the signals wait for the
    // watcher thread, blocked in every thread (threads inherit this mask).
    let stop = match source {
        Source::Path(_) => {
            let mut signals = SigSet::empty();
            signals.add(Signal::SIGINT);
            signals.add(Signal::SIGTERM);
            signals.thread_block().map_err(|e| e.to_string())?;
            Some(SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC).map_err(|e| e.to_string())?)
        }
        Source::Fd { .. } => None,
    };
    let (Some(broker), Some(vm)) = (args.broker.clone(), args.vm) else {
        return Err("--broker and --vm are required".into());
    };
    let file = match &args.config {
        Some(path) => Config::load(path).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    // The broker serves this VM the same layout from the same file, and refuses a Hello whose
    // streams are not it.
    let own = file
        .vms
        .get(vm.as_str())
        .is_some_and(|v| v.has_own_layout());
    let config = file.for_vm(&vm);
    let device = SoundDevice::new(&config, vm, &broker).map_err(|e| {
        format!(
            "vm {vm}: cannot start with the broker at {}: {e}",
            broker.display()
        )
    })?;
    log::info!(
        "worker: vm {vm}, broker client {}, {} streams ({})",
        device.broker_client_id(),
        config.streams.len(),
        if own {
            format!("its own layout from [vms.{vm}]")
        } else {
            "the default layout".to_string()
        }
    );
    // Everything the worker will ever open is open now: confine it before any guest byte.
    // The vhost-user listener is built from a plain UnixListener, so it never unlinks a path
    // on drop: a socket we bound is removed by `SocketPath`, an inherited one is its owner's.
    let listening = listen::open(&source, SocketKind::Stream).map_err(|e| e.to_string())?;
    let socket_path = listening.path.map(Arc::new);
    let listener = std::os::unix::net::UnixListener::from(listening.fd);
    // The daemon's accept loop spins on a non-blocking socket, and an inherited one may be.
    listener
        .set_nonblocking(false)
        .map_err(|e| format!("cannot make the listening socket blocking: {e}"))?;
    let mut listener = Listener::from(listener);
    let mut paths = Vec::new();
    if let Some(socket_path) = &socket_path {
        // Only to remove our own socket file (checked by device and inode first).
        paths.push(PathRule::RemoveFiles(socket_path.directory()));
    }
    sandbox::apply(&sandbox::Options {
        mode: args.sandbox,
        role: Role::Worker,
        user: args.user.clone(),
        group: args.group.clone(),
        paths,
    })
    .map_err(|e| e.to_string())?;
    sandbox::run_probe_if_asked();
    if let (Some(stop), Some(socket_path)) = (stop, &socket_path) {
        remove_socket_on_stop(stop, socket_path.clone());
    }

    let device_fd = std::os::fd::AsRawFd::as_raw_fd(&device.device_fd());
    let device = Arc::new(RwLock::new(device));
    let mut daemon = VhostUserDaemon::new(
        "vsound".to_string(),
        device.clone(),
        GuestMemoryAtomic::new(GuestMemory::new()),
    )
    .map_err(|e| format!("cannot create the vhost-user daemon: {e}"))?;
    for handler in daemon.get_epoll_handlers() {
        handler
            .register_listener(device_fd, EventSet::IN, u64::from(DEVICE_EVENT))
            .map_err(|e| format!("cannot watch the broker: {e}"))?;
    }
    log::info!("worker: waiting for the VMM on {}", source.describe());
    vsound_process::notify::ready();
    daemon
        .start(&mut listener)
        .map_err(|e| format!("vhost-user: {e}"))?;
    log::info!("worker: VMM connected");
    // One connection per worker: a later VMM must find no socket here (a path we bound) or
    // wait in the backlog of whoever holds the socket for the next worker (an inherited one).
    drop(listener);
    if let Some(socket_path) = &socket_path {
        socket_path.remove();
    }
    use vhost::vhost_user::Error as VhostUserError;
    match daemon.wait() {
        // A VMM that goes away, even mid-message, is a normal end.
        Ok(())
        | Err(vhost_user_backend::Error::HandleRequest(
            VhostUserError::Disconnected | VhostUserError::PartialMessage,
        )) => {
            log::info!("worker: VMM disconnected");
            vsound_process::notify::stopping();
            Ok(())
        }
        Err(e) => Err(format!("vhost-user: {e}")),
    }
}

fn main() -> ExitCode {
    // Before parsing: the convention has every other argument ignored, even a missing or bad one.
    if std::env::args_os()
        .skip(1)
        .any(|arg| arg == "--print-capabilities")
    {
        println!("{CAPABILITIES}");
        return ExitCode::SUCCESS;
    }
    vsound_process::daemon::start(
        "worker",
        |args: &Args| {
            let path = args.check_config.as_ref()?;
            Some(
                Config::load(path)
                    .map(|config| {
                        println!("{}", vsound_config::summary(path, &config));
                    })
                    .map_err(|e| e.to_string()),
            )
        },
        |args: &Args| (args.socket.clone(), args.fd),
        run,
    )
}
