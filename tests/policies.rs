//! The deployment policies: the systemd units in `systemd/` and the SELinux module in `selinux/`.
//!
//! `scripts/check-policies.sh` verifies the units with systemd's own tools (verify, security
//! exposure thresholds), applies the sysusers.d/tmpfiles.d files to a temporary root and builds
//! the SELinux module; the tests below also read the unit files themselves, so that a weakened
//! directive fails here even where systemd would accept it.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One section's assignments of a unit file, every value of each key in file order (systemd
/// appends list settings; for single-valued ones the last assignment wins).
fn unit_section(path: &Path, wanted: &str) -> HashMap<String, Vec<String>> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut section = String::new();
    let mut keys: HashMap<String, Vec<String>> = HashMap::new();
    let mut pending = String::new();
    for raw in text.lines() {
        let line = raw.trim();
        if pending.is_empty() && (line.is_empty() || line.starts_with('#') || line.starts_with(';'))
        {
            continue;
        }
        // A trailing backslash continues the line.
        if let Some(head) = line.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        let line = std::mem::take(&mut pending) + line;
        if line.starts_with('[') {
            section = line.trim_matches(['[', ']']).to_string();
            continue;
        }
        if section != wanted {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{}: not an assignment: {line}", path.display()));
        keys.entry(key.trim().to_string())
            .or_default()
            .push(value.trim().to_string());
    }
    keys
}

/// The effective value of a single-valued setting: its last assignment.
fn last<'a>(unit: &'a HashMap<String, Vec<String>>, key: &str) -> Option<&'a str> {
    unit.get(key)?.last().map(String::as_str)
}

fn service_section(path: &Path) -> HashMap<String, Vec<String>> {
    unit_section(path, "Service")
}

fn worker_unit() -> HashMap<String, Vec<String>> {
    service_section(&repo().join("systemd/vsound-worker@.service"))
}

fn broker_unit() -> HashMap<String, Vec<String>> {
    service_section(&repo().join("systemd/vsound-broker.service"))
}

fn socket_unit(name: &str) -> HashMap<String, Vec<String>> {
    unit_section(&repo().join("systemd").join(name), "Socket")
}

/// The value of `--OPTION VALUE` in a command line.
fn option<'a>(command: &'a str, name: &str) -> Option<&'a str> {
    command.split_whitespace().skip_while(|w| *w != name).nth(1)
}

/// The settings both units must keep: no network, no privileges, unix sockets only.
fn assert_confined(name: &str, unit: &HashMap<String, Vec<String>>) {
    let expect = [
        ("PrivateNetwork", "yes"),
        ("NoNewPrivileges", "yes"),
        ("IPAddressDeny", "any"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("RestrictNamespaces", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("LockPersonality", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("ProtectProc", "invisible"),
        ("SystemCallArchitectures", "native"),
        ("DevicePolicy", "closed"),
    ];
    for (key, value) in expect {
        assert_eq!(
            last(unit, key),
            Some(value),
            "{name}: {key}= must be {value}"
        );
    }
    // Every assignment of RestrictAddressFamilies= together: exactly AF_UNIX.
    let families: Vec<&str> = unit
        .get("RestrictAddressFamilies")
        .unwrap_or_else(|| panic!("{name}: no RestrictAddressFamilies="))
        .iter()
        .flat_map(|v| v.split_whitespace())
        .collect();
    assert_eq!(families, ["AF_UNIX"], "{name}: RestrictAddressFamilies=");
    // An empty assignment resets the set; the last one must leave it empty.
    assert_eq!(
        last(unit, "CapabilityBoundingSet"),
        Some(""),
        "{name}: CapabilityBoundingSet= must be empty"
    );
    assert_eq!(
        last(unit, "AmbientCapabilities"),
        Some(""),
        "{name}: AmbientCapabilities= must be empty"
    );
    let umask = last(unit, "UMask").unwrap_or_else(|| panic!("{name}: no UMask="));
    let umask = u32::from_str_radix(umask, 8).expect("UMask= is octal");
    assert_eq!(
        umask & 0o007,
        0o007,
        "{name}: UMask= must hide files from others"
    );
}

/// The binaries confine themselves at start-up (src/process/sandbox.rs): the unit's system call
/// allow-list must let those calls through, or `--sandbox strict` could never start.
fn assert_sandbox_can_start(name: &str, unit: &HashMap<String, Vec<String>>) {
    let filters = unit
        .get("SystemCallFilter")
        .unwrap_or_else(|| panic!("{name}: no SystemCallFilter="));
    assert!(
        !filters[0].starts_with('~'),
        "{name}: the first SystemCallFilter= must be an allow-list"
    );
    // Each call with the systemd groups that contain it: a deny line naming either, after the
    // last allow line naming the call, removes it again.
    let needed = [
        ("seccomp", "@sandbox"),
        ("landlock_create_ruleset", "@sandbox"),
        ("landlock_add_rule", "@sandbox"),
        ("landlock_restrict_self", "@sandbox"),
        ("capset", "@privileged"),
    ];
    for (call, group) in needed {
        let names = |line: &str| {
            line.trim_start_matches('~')
                .split_whitespace()
                .any(|c| c == call || c == group)
        };
        let last_allow = filters
            .iter()
            .rposition(|f| !f.starts_with('~') && f.split_whitespace().any(|c| c == call));
        let last_deny = filters.iter().rposition(|f| f.starts_with('~') && names(f));
        let Some(allow) = last_allow else {
            panic!("{name}: SystemCallFilter= must allow {call}");
        };
        assert!(
            last_deny.is_none_or(|deny| deny < allow),
            "{name}: {call} is removed again by a later SystemCallFilter=~"
        );
    }
    let exec = last(unit, "ExecStart").unwrap_or_else(|| panic!("{name}: no ExecStart="));
    assert!(
        exec.contains("--sandbox strict"),
        "{name}: ExecStart= must run --sandbox strict"
    );
    // With an empty bounding set a root start could not switch users: the unit must start the
    // program unprivileged, and then --user has no meaning.
    let user = last(unit, "User").unwrap_or("root");
    assert!(
        user != "root" && user != "0",
        "{name}: must run as a non-root User="
    );
    assert!(
        !exec.contains("--user"),
        "{name}: --user is for root starts; the unit sets User= instead"
    );
}

#[test]
fn worker_unit_is_confined() {
    let unit = worker_unit();
    assert_confined("vsound-worker@.service", &unit);
    assert_sandbox_can_start("vsound-worker@.service", &unit);
    // Ready once it serves its socket (sd_notify), which it reaches under `TemporaryFileSystem=`.
    assert_eq!(last(&unit, "Type"), Some("notify"));
    let bound = last(&unit, "BindReadOnlyPaths").unwrap_or_default();
    assert!(
        bound.split_whitespace().any(|p| p == "/run/systemd/notify"),
        "{bound}"
    );
    // Only the broker's audio threads may be real-time (SECURITY.md "Real-time scheduling").
    assert_eq!(last(&unit, "RestrictRealtime"), Some("yes"));
    assert!(
        !unit.contains_key("LimitRTPRIO"),
        "the worker gets no real-time priority"
    );
    assert_eq!(last(&unit, "PrivateDevices"), Some("yes"));
    assert_eq!(last(&unit, "DynamicUser"), Some("yes"));
    assert_eq!(last(&unit, "PrivateUsers"), Some("yes"));
    assert!(
        !unit.contains_key("DeviceAllow"),
        "the worker never opens a device"
    );
    // The instance is the VM: its name, bound by the broker to this instance's user.
    let exec = last(&unit, "ExecStart").unwrap();
    assert_eq!(option(exec, "--vm"), Some("%i"), "{exec}");
    assert_eq!(last(&unit, "User"), Some("vsound-vm-%i"));
    // The listening socket comes from vsound-worker@.socket; a RuntimeDirectory= would be
    // removed, with the socket systemd holds in it, whenever a worker stops.
    let exec = last(&unit, "ExecStart").unwrap();
    assert!(
        option(exec, "--socket").is_none() && option(exec, "--fd").is_none(),
        "the worker takes its socket from systemd (LISTEN_FDS): {exec}"
    );
    assert!(
        !unit.contains_key("RuntimeDirectory"),
        "the worker unit must not own the directory of the socket systemd holds"
    );
    assert!(
        !unit.contains_key("ExecStartPost"),
        "socket activation needs no wait for the socket"
    );
    // One worker per VMM connection, started by the socket: no restart loop without a VMM.
    assert_eq!(last(&unit, "Restart"), Some("no"));
}

#[test]
fn worker_socket_serves_one_vm_per_instance() {
    let socket = socket_unit("vsound-worker@.socket");
    assert_eq!(
        last(&socket, "ListenStream"),
        Some("/run/vsound/%i/vhost-user.sock"),
        "one socket per instance"
    );
    // One worker process is passed the listening socket; it accepts exactly one connection.
    assert_eq!(last(&socket, "Accept"), Some("no"));
    assert_eq!(last(&socket, "SocketMode"), Some("0660"));
    assert_eq!(last(&socket, "SocketGroup"), Some("vsound"));
    assert_eq!(last(&socket, "SocketUser"), Some("root"));
    // Created by systemd, root's: the VMM (group vsound) traverses it, cannot replace a socket.
    let mode = u32::from_str_radix(last(&socket, "DirectoryMode").unwrap(), 8).unwrap();
    assert_eq!(mode & 0o022, 0, "DirectoryMode= must not let others write");
    assert_eq!(
        mode & 0o011,
        0o011,
        "DirectoryMode= must let the group traverse"
    );
}

/// Each VMM session starts a worker: systemd's default limits (5 starts in 10 s, 20 triggers in
/// 2 s) would fail the socket after a few back-to-back sessions and refuse the VM for good.
#[test]
fn worker_limits_allow_back_to_back_sessions() {
    let path = repo().join("systemd/vsound-worker@.service");
    let unit = unit_section(&path, "Unit");
    let burst: u32 = last(&unit, "StartLimitBurst")
        .expect("StartLimitBurst=")
        .parse()
        .unwrap();
    assert!(burst >= 200, "StartLimitBurst={burst}");
    let socket = socket_unit("vsound-worker@.socket");
    let triggers: u32 = last(&socket, "TriggerLimitBurst")
        .expect("TriggerLimitBurst=")
        .parse()
        .unwrap();
    assert!(triggers >= 200, "TriggerLimitBurst={triggers}");
}

#[test]
fn broker_socket_is_the_one_workers_connect_to() {
    let socket = socket_unit("vsound-broker.socket");
    let path = last(&socket, "ListenSequentialPacket").expect("a SOCK_SEQPACKET socket");
    let worker = worker_unit();
    let exec = last(&worker, "ExecStart").unwrap();
    assert_eq!(
        option(exec, "--broker"),
        Some(path),
        "the worker connects to {path}"
    );
    assert_eq!(last(&socket, "SocketMode"), Some("0660"));
    assert_eq!(last(&socket, "SocketGroup"), Some("vsound-broker"));
    assert_eq!(last(&socket, "SocketUser"), Some("root"));
    // The worker may connect through its supplementary group.
    assert!(worker["SupplementaryGroups"]
        .iter()
        .any(|g| g.split_whitespace().any(|g| g == "vsound-broker")));
    let broker = broker_unit();
    let exec = last(&broker, "ExecStart").unwrap();
    assert!(
        option(exec, "--socket").is_none() && option(exec, "--fd").is_none(),
        "the broker takes its socket from systemd (LISTEN_FDS): {exec}"
    );
    // A RuntimeDirectory= is removed when the broker stops, taking the socket with it.
    assert!(!broker.contains_key("RuntimeDirectory"));
    assert!(!broker.contains_key("ExecStartPost"));
    assert_eq!(last(&broker, "Restart"), Some("always"));
}

/// A broker restart must not stop or restart any worker: the worker unit orders itself after
/// the broker and wants its socket, and nothing stronger.
#[test]
fn workers_survive_broker_restarts() {
    let path = repo().join("systemd/vsound-worker@.service");
    let unit = unit_section(&path, "Unit");
    for strong in ["Requires", "Requisite", "BindsTo", "PartOf", "Upholds"] {
        for value in unit.get(strong).into_iter().flatten() {
            assert!(
                !value.contains("vsound-broker"),
                "{strong}={value}: a broker stop or restart would reach the workers"
            );
        }
    }
    let names = |key: &str| -> Vec<String> {
        unit.get(key)
            .into_iter()
            .flatten()
            .flat_map(|v| v.split_whitespace().map(str::to_string))
            .collect()
    };
    assert!(names("Wants").contains(&"vsound-broker.socket".to_string()));
    for after in ["vsound-broker.socket", "vsound-broker.service"] {
        assert!(names("After").contains(&after.to_string()), "After={after}");
    }
    // And the broker side names no worker either (PartOf=/BindsTo= there would work backwards).
    let broker = unit_section(&repo().join("systemd/vsound-broker.service"), "Unit");
    assert!(broker
        .values()
        .flatten()
        .all(|v| !v.contains("vsound-worker")));
}

/// The worker arms timerfds (pacing, the broker reconnect backoff) and connects to the broker
/// again after a restart: the unit's system call filter must leave those calls in.
#[test]
fn worker_unit_allows_timers_and_reconnects() {
    let unit = worker_unit();
    for line in &unit["SystemCallFilter"][1..] {
        let Some(denied) = line.strip_prefix('~') else {
            continue;
        };
        for call in denied.split_whitespace() {
            assert!(
                ![
                    "@timer",
                    "@network-io",
                    "timerfd_create",
                    "timerfd_settime",
                    "socket",
                    "connect"
                ]
                .contains(&call),
                "SystemCallFilter=~ removes {call}"
            );
        }
    }
}

#[test]
fn broker_unit_is_confined() {
    let unit = broker_unit();
    assert_confined("vsound-broker.service", &unit);
    assert_sandbox_can_start("vsound-broker.service", &unit);
    assert_eq!(last(&unit, "Type"), Some("notify"));
    // Real-time scheduling for its audio threads, bounded in priority and in CPU time without
    // a sleep (SECURITY.md "Real-time scheduling").
    assert_eq!(last(&unit, "RestrictRealtime"), Some("no"));
    assert_eq!(last(&unit, "LimitRTPRIO"), Some("83"));
    assert_eq!(last(&unit, "LimitRTTIME"), Some("200ms:1s"));
    // Sound devices only: everything else of /dev is private.
    assert_eq!(last(&unit, "PrivateDevices"), Some("yes"));
    assert_eq!(
        unit.get("DeviceAllow").map(Vec::as_slice),
        Some(&["char-alsa rw".to_string()][..])
    );
    // SO_PEERCRED reports a worker's uid in the broker's user namespace: one of its own
    // (PrivateUsers=) shows every worker as nobody, and the per-uid limits and the VM names'
    // binding to uids would treat all VMs as one.
    assert!(
        last(&unit, "PrivateUsers").is_none_or(|v| v == "no"),
        "vsound-broker.service: PrivateUsers= hides the workers' uids from the broker"
    );
}

/// Runs scripts/check-policies.sh with ARGS on the built binaries; its output, on success.
fn check_policies(args: &[&str]) -> String {
    let started = std::time::Instant::now();
    let output = Command::new("bash")
        .arg(repo().join("scripts/check-policies.sh"))
        .args(args)
        .current_dir(repo())
        .env("VSOUND_WORKER_BIN", common::bins::worker())
        .env("VSOUND_BROKER_BIN", common::bins::broker())
        .output()
        .expect("cannot run scripts/check-policies.sh");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    println!(
        "check-policies.sh {args:?}: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        output.status.success(),
        "scripts/check-policies.sh {args:?} failed ({})",
        output.status
    );
    assert!(stdout.contains("check-policies: all checks passed"));
    stdout
}

#[test]
fn check_policies_script_passes() {
    let stdout = check_policies(&[]);
    for unit in ["vsound-worker@vm1.service", "vsound-broker.service"] {
        assert!(
            stdout.contains(&format!("exposure {unit}: ")),
            "no exposure printed for {unit}"
        );
    }
}

/// The shipped units under a real systemd (this machine's, booted in systemd-nspawn on an
/// overlay of /): started by their sockets, confined, the worker surviving broker restarts and
/// exits, and a real QEMU guest playing and recording through them, the broker restarted under
/// it mid-aplay. Needs root; set
/// VSOUND_SKIP_BOOT=1 to leave it out knowingly (it then fails nothing and says so).
#[test]
fn units_run_under_real_systemd_with_a_real_guest() {
    if std::env::var_os("VSOUND_SKIP_BOOT").is_some_and(|v| v == "1") {
        eprintln!("VSOUND_SKIP_BOOT=1: the real-systemd checks were not run");
        return;
    }
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "check-policies.sh --boot needs root (systemd-nspawn, an overlay mount): run the tests \
         as root, or set VSOUND_SKIP_BOOT=1 to skip this test knowingly"
    );
    let stdout = check_policies(&["--boot", "--guest"]);
    for expected in [
        "ok:   boot: vsound-broker.service active (started by its socket)",
        "ok:   boot: vsound-worker@vm1.service active (started by its socket)",
        "ok:   boot: systemctl restart vsound-broker.service: the broker is back, the worker runs on (same PID)",
        "ok:   boot: the next connection starts a new worker",
        "ok:   boot: without a VMM no worker runs (no restart loop), the socket listens",
        "ok:   boot: 200 back-to-back VMM sessions",
        "ok:   guest: the broker restarted mid-aplay; the guest's worker runs on (same PID)",
        "ok:   guest: the worker reconnected to the new broker",
        "ok:   guest: the aplay across the restart finished",
        "ok:   guest: aplay arrived in the broker's file",
        "ok:   guest: arecord returned the broker's source",
    ] {
        assert!(stdout.contains(expected), "missing: {expected}");
    }
    assert!(!stdout.contains("FAIL:"));
}
