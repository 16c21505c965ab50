//! vsound-worker: serves one VMM's vhost-user socket as a virtio-sound device and feeds the
//! audio broker. Never touches an audio device itself.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, RwLock};

use clap::Parser;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;

use vsound::config::Config;
use vsound::sandbox::{self, Mode, Role};
use vsound::worker::{GuestMemory, SoundDevice, DEVICE_EVENT};

#[derive(Parser)]
#[command(version, about = "vhost-user virtio-sound worker (one per VM)")]
struct Args {
    /// vhost-user socket the VMM connects to.
    #[arg(long)]
    socket: PathBuf,
    /// The audio broker's socket.
    #[arg(long)]
    broker: PathBuf,
    /// Device configuration (TOML); the built-in default without it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// `strict` refuses to start if any sandbox layer cannot be applied.
    #[arg(long, value_enum, default_value = "strict")]
    sandbox: Mode,
    /// When started as root: the unprivileged user to become.
    #[arg(long)]
    user: Option<String>,
    /// Group to become (default: the user's primary group).
    #[arg(long)]
    group: Option<String>,
}

fn run(args: Args) -> Result<(), String> {
    let config = match &args.config {
        Some(path) => Config::load(path).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    let device = SoundDevice::new(&config, &args.broker).map_err(|e| {
        format!(
            "cannot start with the broker at {}: {e}",
            args.broker.display()
        )
    })?;
    log::info!(
        "worker: broker client {}, {} streams",
        device.broker_client_id(),
        config.streams.len()
    );
    // Everything the worker will ever open is open now: confine it before any guest byte.
    // A stale socket from an earlier worker is replaced. The listener is built from a plain
    // UnixListener so that it does not unlink the path when it drops: the confined worker may
    // not (and the next worker replaces it anyway).
    let _ = std::fs::remove_file(&args.socket);
    let mut listener = std::os::unix::net::UnixListener::bind(&args.socket)
        .map(Listener::from)
        .map_err(|e| format!("cannot listen on {}: {e}", args.socket.display()))?;
    sandbox::apply(&sandbox::Options {
        mode: args.sandbox,
        role: Role::Worker,
        user: args.user.clone(),
        group: args.group.clone(),
        paths: Vec::new(),
    })
    .map_err(|e| e.to_string())?;
    sandbox::run_probe_if_asked();

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
    log::info!("worker: waiting for the VMM on {}", args.socket.display());
    daemon
        .start(&mut listener)
        .map_err(|e| format!("vhost-user: {e}"))?;
    log::info!("worker: VMM connected");
    // The socket file stays (no filesystem access now); the next worker replaces it.
    use vhost::vhost_user::Error as VhostUserError;
    match daemon.wait() {
        // A VMM that goes away, even mid-message, is a normal end.
        Ok(())
        | Err(vhost_user_backend::Error::HandleRequest(
            VhostUserError::Disconnected | VhostUserError::PartialMessage,
        )) => {
            log::info!("worker: VMM disconnected");
            Ok(())
        }
        Err(e) => Err(format!("vhost-user: {e}")),
    }
}

fn main() -> ExitCode {
    sandbox::close_inherited_fds();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("worker: {e}");
            ExitCode::FAILURE
        }
    }
}
