//! The deployment policies: the systemd units in `systemd/` and the SELinux module in `selinux/`.
//!
//! `scripts/check-policies.sh` verifies the units with systemd's own tools (verify, security
//! exposure thresholds), applies the sysusers.d/tmpfiles.d files to a temporary root and builds
//! the SELinux module; the tests below also read the unit files themselves, so that a weakened
//! directive fails here even where systemd would accept it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `[Service]` assignments of a unit file, every value of each key in file order
/// (systemd appends list settings; for single-valued ones the last assignment wins).
fn service_section(path: &Path) -> HashMap<String, Vec<String>> {
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
        if section != "Service" {
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

fn worker_unit() -> HashMap<String, Vec<String>> {
    service_section(&repo().join("systemd/vsound-worker@.service"))
}

fn broker_unit() -> HashMap<String, Vec<String>> {
    service_section(&repo().join("systemd/vsound-broker.service"))
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
        ("PrivateUsers", "yes"),
        ("RestrictNamespaces", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("LockPersonality", "yes"),
        ("RestrictRealtime", "yes"),
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

/// The binaries confine themselves at start-up (src/sandbox.rs): the unit's system call
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
    assert_eq!(last(&unit, "PrivateDevices"), Some("yes"));
    assert_eq!(last(&unit, "DynamicUser"), Some("yes"));
    assert!(
        !unit.contains_key("DeviceAllow"),
        "the worker never opens a device"
    );
    let exec = last(&unit, "ExecStart").unwrap();
    assert!(
        exec.contains("--socket /run/vsound/%i/"),
        "one socket per instance: {exec}"
    );
    assert_eq!(last(&unit, "RuntimeDirectory"), Some("vsound/%i"));
}

#[test]
fn broker_unit_is_confined() {
    let unit = broker_unit();
    assert_confined("vsound-broker.service", &unit);
    assert_sandbox_can_start("vsound-broker.service", &unit);
    // Sound devices only: everything else of /dev is private.
    assert_eq!(last(&unit, "PrivateDevices"), Some("yes"));
    assert_eq!(
        unit.get("DeviceAllow").map(Vec::as_slice),
        Some(&["char-alsa rw".to_string()][..])
    );
    // The workers connect to the socket the broker serves.
    let broker_socket = last(&unit, "ExecStart")
        .unwrap()
        .split_whitespace()
        .skip_while(|w| *w != "--socket")
        .nth(1)
        .expect("broker --socket")
        .to_string();
    let worker = worker_unit();
    assert!(
        last(&worker, "ExecStart")
            .unwrap()
            .contains(&format!("--broker {broker_socket}")),
        "the worker must connect to {broker_socket}"
    );
}

#[test]
fn check_policies_script_passes() {
    let output = Command::new("bash")
        .arg(repo().join("scripts/check-policies.sh"))
        .current_dir(repo())
        .env("VSOUND_WORKER_BIN", env!("CARGO_BIN_EXE_vsound-worker"))
        .env("VSOUND_BROKER_BIN", env!("CARGO_BIN_EXE_vsound-broker"))
        .output()
        .expect("cannot run scripts/check-policies.sh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        output.status.success(),
        "scripts/check-policies.sh failed ({})",
        output.status
    );
    for unit in ["vsound-worker@vm1.service", "vsound-broker.service"] {
        assert!(
            stdout.contains(&format!("exposure {unit}: ")),
            "no exposure printed for {unit}"
        );
    }
    assert!(stdout.contains("check-policies: all checks passed"));
}
