//! The broker's command line. A module of the library so that the man page generator
//! (`packaging/manpages.rs`, clap_mangen) renders the same definition the binary parses, while
//! the binary itself links no generator.

use std::os::fd::RawFd;
use std::path::PathBuf;

use clap::Parser;

use vsound_config::BackendKind;
use vsound_process::sandbox::Mode;

#[derive(Parser)]
#[command(version, about = "vsound audio broker")]
pub struct Args {
    /// Socket the workers connect to: bound here, and removed at exit. Without it (or --fd),
    /// the socket comes from systemd socket activation (LISTEN_FDS).
    #[arg(long, visible_alias = "socket-path", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// An inherited listening SOCK_SEQPACKET unix socket to serve instead of binding a path.
    #[arg(long, value_name = "N", conflicts_with = "socket")]
    pub fd: Option<RawFd>,
    /// Device configuration (TOML), the same file the workers read.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// `strict` refuses to start if any sandbox layer cannot be applied.
    #[arg(long, value_enum, default_value = "strict")]
    pub sandbox: Mode,
    /// When started as root: the unprivileged user to become (optional for the broker).
    #[arg(long)]
    pub user: Option<String>,
    /// Group to become (default: the user's primary group).
    #[arg(long)]
    pub group: Option<String>,
    /// The host command's control socket (`vsound ctl`): bound here (mode 0660), removed at
    /// exit. Without it the broker takes no host commands.
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// The group whose members may use the control socket besides root (its file's group).
    #[arg(long, value_name = "GROUP", requires = "control_socket")]
    pub admin_group: Option<String>,
    /// Every stream of every layout on this backend, whatever the config says: auto,
    /// pipewire, alsa, gstreamer (each stream's `gst_pipeline`, default autoaudiosink or
    /// autoaudiosrc), null or wav (which needs each stream's `wav_path` from the config).
    #[arg(long, value_name = "BACKEND")]
    pub backend: Option<BackendKind>,
    /// Validate FILE (every VM's layout, and what its backends need of the host, such as
    /// the WAV files' directories), print what it describes, and exit.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["socket", "fd", "control_socket"])]
    pub check_config: Option<PathBuf>,
}
