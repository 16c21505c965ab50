//! vsound: development launcher. Starts one broker and one worker, prints the QEMU arguments
//! that attach a VM, restarts the worker whenever its VMM disconnects, and stops both on
//! Ctrl-C. Production starts the two programs from the shipped systemd units instead.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::unistd::Pid;

#[derive(Parser)]
#[command(
    version,
    about = "vsound launcher: a broker plus one worker, for development"
)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a broker and a worker serving one VM's vhost-user socket.
    Run {
        /// vhost-user socket for the VMM.
        #[arg(long)]
        socket: PathBuf,
        /// Device configuration (TOML).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where the broker's socket goes (default: beside the vhost-user socket).
        #[arg(long)]
        broker_socket: Option<PathBuf>,
        /// Sandbox mode for both processes.
        #[arg(long, default_value = "strict")]
        sandbox: String,
        /// The user the worker becomes when the launcher runs as root.
        #[arg(long, default_value = "nobody")]
        worker_user: String,
        /// The worker's group when the launcher runs as root.
        #[arg(long, default_value = "nogroup")]
        worker_group: String,
    },
}

fn sibling_binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .filter(|path| path.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

fn spawn(binary: &str, args: &[&std::ffi::OsStr]) -> Result<Child, String> {
    Command::new(sibling_binary(binary))
        .args(args)
        .spawn()
        .map_err(|e| format!("cannot start {binary}: {e}"))
}

fn wait_for_socket(path: &Path, child: &mut Child) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited early ({status})"));
        }
        if Instant::now() > deadline {
            return Err(format!("{} did not appear", path.display()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
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

struct RunOptions {
    socket: PathBuf,
    config: Option<PathBuf>,
    broker_socket: Option<PathBuf>,
    sandbox: String,
    worker_user: String,
    worker_group: String,
}

fn run(options: RunOptions) -> Result<(), String> {
    let RunOptions {
        socket,
        config,
        broker_socket,
        sandbox,
        worker_user,
        worker_group,
    } = options;
    let broker_socket = broker_socket.unwrap_or_else(|| {
        let mut name = socket.file_name().unwrap_or_default().to_os_string();
        name.push(".broker");
        socket.with_file_name(name)
    });
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block().map_err(|e| e.to_string())?;
    let stop = SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|e| e.to_string())?;

    let _ = std::fs::remove_file(&broker_socket);
    let mut broker_args: Vec<&std::ffi::OsStr> = vec![
        "--socket".as_ref(),
        broker_socket.as_os_str(),
        "--sandbox".as_ref(),
        sandbox.as_ref(),
    ];
    if let Some(config) = &config {
        broker_args.extend(["--config".as_ref(), config.as_os_str()]);
    }
    // Children must not inherit our blocked signal mask.
    signals.thread_unblock().map_err(|e| e.to_string())?;
    let mut broker = spawn("vsound-broker", &broker_args)?;
    signals.thread_block().map_err(|e| e.to_string())?;
    wait_for_socket(&broker_socket, &mut broker).map_err(|e| format!("broker: {e}"))?;

    let mut worker_args: Vec<&std::ffi::OsStr> = vec![
        "--socket".as_ref(),
        socket.as_os_str(),
        "--broker".as_ref(),
        broker_socket.as_os_str(),
        "--sandbox".as_ref(),
        sandbox.as_ref(),
    ];
    if nix::unistd::Uid::effective().is_root() {
        worker_args.extend::<[&std::ffi::OsStr; 4]>([
            "--user".as_ref(),
            worker_user.as_ref(),
            "--group".as_ref(),
            worker_group.as_ref(),
        ]);
    }
    if let Some(config) = &config {
        worker_args.extend(["--config".as_ref(), config.as_os_str()]);
    }
    let start_worker = || -> Result<Child, String> {
        signals.thread_unblock().map_err(|e| e.to_string())?;
        let child = spawn("vsound-worker", &worker_args);
        signals.thread_block().map_err(|e| e.to_string())?;
        child
    };
    let _ = std::fs::remove_file(&socket);
    let mut worker = start_worker()?;
    if let Err(e) = wait_for_socket(&socket, &mut worker) {
        terminate(&mut broker);
        return Err(format!("worker: {e}"));
    }
    println!("vsound is serving {}", socket.display());
    println!("Attach a VM with these QEMU arguments:");
    println!(
        "  -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \\\n  -chardev socket,id=vsound,path={} -device vhost-user-snd-pci,chardev=vsound",
        socket.display()
    );
    println!("Press Ctrl-C to stop.");

    let result = loop {
        if let Ok(Some(_)) = stop.read_signal() {
            break Ok(());
        }
        if let Ok(Some(status)) = broker.try_wait() {
            break Err(format!("the broker exited ({status})"));
        }
        if let Ok(Some(status)) = worker.try_wait() {
            log::info!("worker exited ({status}); starting a fresh one for the next VMM");
            worker = start_worker()?;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    terminate(&mut worker);
    terminate(&mut broker);
    let _ = std::fs::remove_file(&socket);
    println!("vsound stopped");
    result
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let Args { command } = Args::parse();
    let result = match command {
        Cmd::Run {
            socket,
            config,
            broker_socket,
            sandbox,
            worker_user,
            worker_group,
        } => run(RunOptions {
            socket,
            config,
            broker_socket,
            sandbox,
            worker_user,
            worker_group,
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vsound: {e}");
            ExitCode::FAILURE
        }
    }
}
