//! The broker asks for real-time scheduling for its audio threads and logs what it got: a
//! refusal names the limits that decided it, a grant the priority.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::vsound::{wait_for_path, Proc};

const NULL_CONFIG: &str =
    "[[streams]]\nname = \"media\"\ndirection = \"output\"\nbackend = \"null\"\n";

/// Starts a broker with `prefix` (a command that then runs it) and returns its log once the
/// timer thread's line is in it.
fn broker_log(prefix: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("vsound.toml");
    std::fs::write(&config, NULL_CONFIG).unwrap();
    let socket = dir.path().join("broker.sock");
    let log = dir.path().join("broker.log");
    let mut cmd = Command::new(prefix[0]);
    cmd.args(&prefix[1..])
        .arg(common::bins::broker())
        .arg("--socket")
        .arg(&socket)
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info");
    if nix::unistd::Uid::effective().is_root() {
        cmd.args(["--user", "nobody", "--group", "nogroup"]);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let mut broker = Proc {
        child: cmd
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start broker"),
    };
    wait_for_path(&socket, &mut broker);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("timer thread") || Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_refused_real_time_request_is_logged_with_the_limits_that_refused_it() {
    // RLIMIT_RTPRIO 0 and no capability (the sandbox drops them): the kernel must refuse.
    let log = broker_log(&["prlimit", "--rtprio=0:0", "--"]);
    let line = log
        .lines()
        .find(|l| l.contains("timer thread"))
        .unwrap_or_else(|| panic!("no line about the timer thread's scheduling:\n{log}"));
    println!("{line}");
    assert!(
        line.contains("real-time priority 83 refused")
            && line.contains("EPERM")
            && line.contains("RLIMIT_RTPRIO 0"),
        "{line}"
    );
    // The broker bounded an unlimited RLIMIT_RTTIME itself before asking.
    assert!(line.contains("RLIMIT_RTTIME 200000 us"), "{line}");
    assert!(line.contains("runs at normal priority"), "{line}");
}

#[test]
fn a_granted_real_time_request_is_logged_with_its_priority() {
    if !common::realtime::available() {
        println!("skipped: this host grants no SCHED_FIFO (chrt fails)");
        return;
    }
    // Started real-time (as the tests start it where they can): the timer thread keeps
    // SCHED_FIFO 83 after the sandbox drops every capability, and says so.
    let log = broker_log(&["chrt", "--fifo", "83"]);
    assert!(
        log.lines()
            .any(|l| l.contains("the timer thread") && l.contains("runs at real-time priority 83")),
        "{log}"
    );
}
