//! Real-time priority for the test's audio path, where this host allows it (as root with
//! CAP_SYS_NICE): a car's host gives its audio path real-time scheduling, and without it the
//! sample-exact checks measure this machine's CPU contention (a TCG guest keeps one of two cores
//! busy), not vsound. The PipeWire daemon takes it through module-rt (tests/common/pipewire.conf);
//! the broker, the workers and PipeWire's recorder and player are started under `chrt`.

use std::ffi::OsStr;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The SCHED_FIFO priority PipeWire's module-rt gives a client's data thread.
const CLIENT_PRIORITY: &str = "83";

/// Whether SCHED_FIFO is granted here (probed once with `chrt`).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        Command::new("chrt")
            .args(["--fifo", CLIENT_PRIORITY, "true"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// A command for `program` that runs it (and the threads it starts) at a PipeWire client's
/// real-time priority if this host grants it, else at the normal priority.
pub fn command(program: impl AsRef<OsStr>) -> Command {
    if available() {
        let mut cmd = Command::new("chrt");
        cmd.args(["--fifo", CLIENT_PRIORITY]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}
