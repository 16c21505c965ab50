//! The worker's command line. A module of the library so that the man page generator
//! (`packaging/manpages.rs`, clap_mangen) renders the same definition the binary parses, while
//! the binary itself links no generator.

use std::os::fd::RawFd;
use std::path::PathBuf;

use clap::Parser;

use vsound_config::VmName;
use vsound_process::sandbox::Mode;

#[derive(Parser)]
#[command(version, about = "vhost-user virtio-sound worker (one per VM)")]
pub struct Args {
    /// vhost-user socket the VMM connects to: bound here, removed once the VMM connected (or
    /// at exit). Without it (or --fd), the socket comes from systemd socket activation.
    #[arg(long, visible_alias = "socket-path", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// An inherited listening SOCK_STREAM unix socket to accept the VMM on (QEMU's
    /// backend-program convention); whoever passed it keeps it across worker restarts.
    #[arg(long, value_name = "N", conflicts_with = "socket")]
    pub fd: Option<RawFd>,
    /// The audio broker's socket.
    #[arg(long, required_unless_present = "check_config")]
    pub broker: Option<PathBuf>,
    /// This VM's name (1 to 32 of A-Z a-z 0-9 _ -, starting with a letter or digit): the
    /// broker binds it to this worker's uid, and names the VM's PipeWire nodes and WAV files
    /// after it; its `[vms.NAME]` table in the config, if any, gives the VM's layout. The
    /// shipped unit passes its instance name.
    #[arg(long, value_name = "NAME", required_unless_present = "check_config")]
    pub vm: Option<VmName>,
    /// Device configuration (TOML); the built-in default without it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// `strict` refuses to start if any sandbox layer cannot be applied.
    #[arg(long, value_enum, default_value = "strict")]
    pub sandbox: Mode,
    /// When started as root: the unprivileged user to become.
    #[arg(long)]
    pub user: Option<String>,
    /// Group to become (default: the user's primary group).
    #[arg(long)]
    pub group: Option<String>,
    /// Validate FILE (every VM's layout too), print what it describes, and exit.
    #[arg(long, value_name = "FILE", exclusive = true)]
    pub check_config: Option<PathBuf>,
    /// Print the backend's capabilities as JSON (QEMU's vhost-user backend program
    /// convention) and exit; every other argument is ignored.
    #[arg(long)]
    pub print_capabilities: bool,
}
