//! The launcher's command line, `vsound run` and `vsound ctl`. Its own file, without the code that
//! runs it, so that the man page generator (`packaging/manpages.rs`, clap_mangen) includes the
//! same definition (`#[path]`) the binary parses.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use vsound_config::{BackendKind, VmName};
use vsound_process::sandbox::Mode;

#[derive(Parser)]
#[command(
    version,
    about = "vsound launcher: a broker plus one worker, for development"
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Run a broker and a worker serving one VM's vhost-user socket, restarting them as needed.
    Run {
        /// vhost-user socket for the VMM (the launcher binds it and removes it at exit).
        #[arg(long, visible_alias = "socket-path", value_name = "PATH")]
        socket: PathBuf,
        /// Device configuration (TOML).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The VM's name, passed to the worker (`vsound-worker --vm`): its node and file names,
        /// and its `[vms.NAME]` layout if the config has one. Checked here, so that a bad one
        /// stops the launcher instead of failing every worker it starts.
        #[arg(long, value_name = "NAME", default_value = "vm")]
        vm: VmName,
        /// Where the broker's socket goes (default: beside the vhost-user socket).
        #[arg(long)]
        broker_socket: Option<PathBuf>,
        /// Sandbox mode for both processes.
        #[arg(long, value_enum, default_value = "strict")]
        sandbox: Mode,
        /// Every stream on this backend, whatever the config says (the broker's `--backend`).
        #[arg(long, value_name = "BACKEND")]
        backend: Option<BackendKind>,
        /// The user the broker becomes when the launcher runs as root (default:
        /// `vsound-broker` where that user exists, as the package creates it, else `nobody`).
        #[arg(long, value_name = "USER")]
        broker_user: Option<String>,
        /// The user the worker becomes when the launcher runs as root.
        #[arg(long, default_value = "nobody")]
        worker_user: String,
        /// The worker's group when the launcher runs as root.
        #[arg(long, default_value = "nogroup")]
        worker_group: String,
    },
    /// The host command: list the broker's VMs and streams, set a VM's bus volume or mute.
    Ctl {
        /// The broker's control socket (`vsound-broker --control-socket`; `vsound run` puts
        /// it beside the broker's socket).
        #[arg(long, value_name = "PATH", default_value = vsound_admin::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// The broker's reply as JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: Action,
    },
}

// What `vsound ctl` asks the broker (`ctl.rs` carries it out).
#[derive(Subcommand)]
pub enum Action {
    /// Every connected VM and its streams: state, xruns, latency, volume, mute, host end.
    List,
    /// Sets a bus's volume on the guest's control scale: 0..=100 (0.5 dB steps from -50 dB;
    /// 100 is 0 dB), with or without a `%`.
    SetVolume {
        vm: String,
        bus: String,
        volume: String,
    },
    /// Mutes a bus.
    Mute { vm: String, bus: String },
    /// Unmutes a bus.
    Unmute { vm: String, bus: String },
    /// Mutes every output bus of a VM at once.
    MuteAll { vm: String },
    /// Unmutes every output bus of a VM.
    UnmuteAll { vm: String },
}
