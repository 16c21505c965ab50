//! vsound-broker: owns the audio backends and serves the workers of many VMs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use vsound::broker::Broker;
use vsound::config::Config;
use vsound::ipc::Listener;

#[derive(Parser)]
#[command(version, about = "vsound audio broker")]
struct Args {
    /// Socket the workers connect to.
    #[arg(long)]
    socket: PathBuf,
    /// Device configuration (TOML), the same file the workers read.
    #[arg(long)]
    config: Option<PathBuf>,
}

fn run(args: Args) -> Result<(), String> {
    let config = match &args.config {
        Some(path) => Config::load(path).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block().map_err(|e| e.to_string())?;
    let stop = SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|e| e.to_string())?;
    let listener = Listener::bind(&args.socket)
        .map_err(|e| format!("cannot listen on {}: {e}", args.socket.display()))?;
    for stream in &config.streams {
        log::info!(
            "broker: stream {} ({:?}) on the {:?} backend",
            stream.name,
            stream.direction,
            stream.backend
        );
    }
    let mut broker = Broker::new(config, listener).map_err(|e| e.to_string())?;
    log::info!("broker: listening on {}", args.socket.display());
    let result = broker.run(Some(std::os::fd::AsFd::as_fd(&stop)));
    let _ = std::fs::remove_file(&args.socket);
    result.map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("broker: {e}");
            ExitCode::FAILURE
        }
    }
}
