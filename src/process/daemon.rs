//! The start the worker and the broker share: signals unblocked (whoever started us, e.g. the
//! launcher, may have blocked the ones it reads), logging, arguments (a one-shot command such as
//! `--check-config` runs and exits here), the listening socket (every other inherited fd
//! closed), the service manager's notify socket, then the daemon's own `run`; a failure is
//! logged under the daemon's name and ends the process with a failure status.

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::process::ExitCode;

use nix::sys::signal::SigSet;

use crate::listen::{self, Source};
use crate::{notify, sandbox};

/// Runs daemon `name`: `one_shot` runs a command that replaces serving (e.g.
/// `--check-config`) if the arguments ask for one; `socket_of` picks its `--socket`/`--fd` from
/// the parsed arguments; `run` gets the listening socket and an activated control socket's fd
/// (the broker's unit passes one).
pub fn start<A: clap::Parser>(
    name: &str,
    one_shot: impl FnOnce(&A) -> Option<Result<(), String>>,
    socket_of: impl FnOnce(&A) -> (Option<PathBuf>, Option<RawFd>),
    run: impl FnOnce(A, Source, Option<RawFd>) -> Result<(), String>,
) -> ExitCode {
    let _ = SigSet::empty().thread_set_mask();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = A::parse();
    match one_shot(&args) {
        Some(Ok(())) => return ExitCode::SUCCESS,
        Some(Err(e)) => {
            fatal(name, &e);
            return ExitCode::FAILURE;
        }
        None => {}
    }
    let (socket, fd) = socket_of(&args);
    let (source, control) = match listen::source(socket, fd) {
        Ok(sockets) => sockets,
        Err(e) => {
            fatal(name, &e.to_string());
            return ExitCode::FAILURE;
        }
    };
    let keep: Vec<RawFd> = source.inherited_fd().into_iter().chain(control).collect();
    sandbox::close_inherited_fds(&keep);
    // After the close, which would take it too; before `run` confines the process.
    notify::connect_from_env();
    match run(args, source, control) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            fatal(name, &e);
            ExitCode::FAILURE
        }
    }
}

/// A fatal error always reaches stderr: through the log where it is enabled, else directly
/// (with `RUST_LOG=off`, or a filter that leaves errors out, the process must not end silently).
fn fatal(name: &str, error: &str) {
    if log::log_enabled!(log::Level::Error) {
        log::error!("{name}: {error}");
    } else {
        eprintln!("{name}: {error}");
    }
}
