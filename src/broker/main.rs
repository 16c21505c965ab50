//! vsound-broker: owns the audio backends and serves the workers of many VMs.

#![forbid(unsafe_code)]

use std::os::fd::RawFd;
use std::process::ExitCode;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use virtio_snd::protocol::D_OUTPUT;
use vsound_broker::backends::gstreamer;
use vsound_broker::broker::{resolve_pins, Broker};
use vsound_broker::cli::Args;
use vsound_config::{BackendKind, Config, VmName};
use vsound_process::listen::{self, SocketKind, Source};
use vsound_process::sandbox::{self, PathRule, Role};
use vsound_shared::ipc::Listener;

/// The config the broker serves: `path`'s (the built-in default without one), on `backend`
/// if given, with what its backends need of the host checked now rather than at a PREPARE.
fn load_config(
    path: Option<&std::path::Path>,
    backend: Option<BackendKind>,
) -> Result<Config, String> {
    let config = match path {
        Some(path) => Config::load(path).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    let config = match backend {
        Some(backend) => config
            .with_backend(backend)
            .map_err(|e| format!("--backend {}: {e}", backend.name()))?,
        None => config,
    };
    check_wav_directories(&config)?;
    Ok(config)
}

/// A WAV stream's directory must exist: the broker's Landlock rules are made from it, and it
/// would otherwise fail only when a guest opens the stream.
fn check_wav_directories(config: &Config) -> Result<(), String> {
    for stream in config
        .all_streams()
        .filter(|s| s.backend == BackendKind::Wav)
    {
        let Some(path) = &stream.wav_path else {
            continue;
        };
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => std::path::Path::new("."),
        };
        if !dir.is_dir() {
            return Err(format!(
                "stream {}: wav_path {}: {} is not a directory the broker can reach",
                stream.name,
                path.display(),
                dir.display()
            ));
        }
    }
    Ok(())
}

/// Binds the control socket: mode 0660, owned by `admin_group` if given (resolved now, before
/// the sandbox hides the group database).
fn bind_control_socket(
    path: &std::path::Path,
    admin_group: Option<&str>,
) -> Result<(std::os::unix::net::UnixListener, listen::SocketPath), String> {
    use std::os::unix::fs::PermissionsExt;
    let (fd, bound) = listen::bind(path, SocketKind::Stream).map_err(|e| e.to_string())?;
    let shown = path.display();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| format!("{shown}: {e}"))?;
    if let Some(name) = admin_group {
        let group = nix::unistd::Group::from_name(name)
            .map_err(|e| format!("admin group {name}: {e}"))?
            .ok_or_else(|| format!("no group {name} for --admin-group"))?;
        nix::unistd::chown(path, None, Some(group.gid)).map_err(|e| format!("{shown}: {e}"))?;
    }
    Ok((std::os::unix::net::UnixListener::from(fd), bound))
}

/// What the backends of every layout (the default's, each VM's) need of the filesystem once the
/// broker is confined (`gst`: what the GStreamer descriptions' elements name).
fn backend_paths(config: &Config, gst: &gstreamer::Prepared) -> Vec<PathRule> {
    let mut rules = Vec::new();
    if config
        .all_streams()
        .any(|s| s.backend == BackendKind::Gstreamer)
    {
        rules.extend(
            gstreamer::sandbox_read_paths()
                .into_iter()
                .map(PathRule::Read),
        );
        // An autoaudiosink or autoaudiosrc may choose ALSA's devices.
        rules.extend(
            vsound_broker::backends::alsa::sandbox_device_paths()
                .into_iter()
                .map(PathRule::ReadWrite),
        );
        rules.extend(gst.read.iter().cloned().map(PathRule::Read));
        rules.extend(gst.write.iter().cloned().map(PathRule::ReadWrite));
    }
    if config
        .all_streams()
        .any(|s| matches!(s.backend, BackendKind::Pipewire | BackendKind::Auto))
    {
        rules.extend(
            vsound_broker::backends::pipewire::sandbox_read_paths()
                .into_iter()
                .map(PathRule::Read),
        );
    }
    if config
        .all_streams()
        .any(|s| matches!(s.backend, BackendKind::Alsa | BackendKind::Auto))
    {
        let alsa = &vsound_broker::backends::alsa::sandbox_read_paths;
        rules.extend(alsa().into_iter().map(PathRule::Read));
        rules.extend(
            vsound_broker::backends::alsa::sandbox_device_paths()
                .into_iter()
                .map(PathRule::ReadWrite),
        );
    }
    rules.extend(wav_paths(config));
    rules
}

fn wav_paths(config: &Config) -> Vec<PathRule> {
    config
        .all_streams()
        .filter(|s| s.backend == BackendKind::Wav)
        .filter_map(|s| {
            let path = s.wav_path.as_ref()?;
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty())?;
            Some(if s.direction.wire() == D_OUTPUT {
                PathRule::ReadWrite(dir.to_path_buf())
            } else {
                PathRule::Read(dir.to_path_buf())
            })
        })
        .collect()
}

/// Whether this process's user namespace maps every uid to itself (the initial one does):
/// only then are the uids SO_PEERCRED reports the workers' own.
fn maps_every_uid() -> bool {
    std::fs::read_to_string("/proc/self/uid_map").is_ok_and(|map| {
        map.lines()
            .any(|l| l.split_whitespace().eq(["0", "0", "4294967295"]))
    })
}

fn run(args: Args, source: Source, activated_control: Option<RawFd>) -> Result<(), String> {
    let config = load_config(args.config.as_deref(), args.backend)?;
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block().map_err(|e| e.to_string())?;
    let stop = SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|e| e.to_string())?;
    let listening = listen::open(&source, SocketKind::SeqPacket).map_err(|e| e.to_string())?;
    // Dropped when run returns, however it ends: removes the socket file we bound.
    let socket_path = listening.path;
    let listener = Listener::from_fd(listening.fd);
    log::info!("broker: default layout: {}", config.describe());
    for (name, vm) in &config.vms {
        if let (true, Ok(vm_name)) = (vm.has_own_backends(), VmName::new(name)) {
            log::info!("broker: vm {name}: {}", config.for_vm(&vm_name).describe());
        }
    }
    // Before the sandbox, which hides the user database.
    let pins = resolve_pins(&config);
    // Before any thread asks for real-time priority.
    vsound_broker::realtime::bound_realtime_cpu();
    let control = match (&args.control_socket, activated_control) {
        (Some(_), Some(_)) => {
            return Err("a control socket both by --control-socket and socket activation".into())
        }
        (Some(path), None) => {
            let (listener, bound) = bind_control_socket(path, args.admin_group.as_deref())?;
            Some((listener, Some(bound)))
        }
        (None, Some(fd)) => {
            let fd = listen::adopt(fd, "socket activation", SocketKind::Stream)
                .map_err(|e| format!("control socket: {e}"))?;
            Some((std::os::unix::net::UnixListener::from(fd), None))
        }
        (None, None) => None,
    };
    // Before the sandbox: GStreamer's registry (and its scanner) and the files its
    // descriptions name.
    let gst = gstreamer::init_before_sandbox(&config)?;
    let mut paths = backend_paths(&config, &gst);
    if let Some(socket_path) = &socket_path {
        paths.push(PathRule::RemoveFiles(socket_path.directory()));
    }
    if let Some((_, Some(bound))) = &control {
        paths.push(PathRule::RemoveFiles(bound.directory()));
    }
    let mapped = maps_every_uid();
    let root = nix::unistd::Uid::effective().is_root();
    // Backends start after the sandbox so that every thread they create is confined too.
    let report = sandbox::apply(&sandbox::Options {
        mode: args.sandbox,
        role: Role::Broker,
        user: args.user.clone(),
        group: args.group.clone(),
        paths,
    })
    .map_err(|e| e.to_string())?;
    sandbox::run_probe_if_asked();
    // An unprivileged broker confines itself in a user namespace of its own, which maps no uid.
    if !mapped || (report.namespaces && !root) {
        log::warn!(
            "broker: in a user namespace that does not map the workers' uids (PrivateUsers=, or \
             started unprivileged): every worker's SO_PEERCRED uid reads as the overflow uid, so \
             the per-uid limits and the VM names' binding treat all workers as one uid and uid \
             pins match none"
        );
    }
    let mut broker = Broker::new(config, pins, listener).map_err(|e| e.to_string())?;
    // Its file is removed when `control_path` drops, however run ends.
    let control_path = match control {
        Some((listener, bound)) => {
            broker
                .serve_admin(listener)
                .map_err(|e| format!("control socket: {e}"))?;
            bound
        }
        None => None,
    };
    let host_commands = match (&control_path, &args.control_socket) {
        (_, Some(path)) => format!("host commands on {}", path.display()),
        (None, None) if activated_control.is_some() => {
            "host commands on the activated control socket".to_string()
        }
        _ => "no host commands (no --control-socket)".to_string(),
    };
    log::info!(
        "broker: listening on {}; {host_commands}",
        source.describe()
    );
    vsound_process::notify::ready();
    let result = broker
        .run(Some(std::os::fd::AsFd::as_fd(&stop)))
        .map_err(|e| e.to_string());
    vsound_process::notify::stopping();
    // Its streams close with it; released GStreamer playback finishes its pipeline (a file
    // sink's last buffers and header) on threads of its own.
    drop(broker);
    gstreamer::wait_for_pipelines(std::time::Duration::from_secs(4));
    result
}

fn main() -> ExitCode {
    vsound_process::daemon::start(
        "broker",
        |args: &Args| {
            let path = args.check_config.as_ref()?;
            Some(
                load_config(Some(path), args.backend)
                    .map(|config| println!("{}", vsound_config::summary(path, &config))),
            )
        },
        |args: &Args| (args.socket.clone(), args.fd),
        run,
    )
}
