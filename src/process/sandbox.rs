//! Process confinement, applied after a process has opened what it needs and before it reads
//! a single untrusted byte. Layers, in order:
//!
//! 1. not dumpable (no core dumps, no ptrace by same-uid processes);
//! 2. namespaces (network, IPC, mount; a user namespace when not root) where the kernel allows;
//! 3. when root, a switch to an unprivileged user and group with no supplementary groups;
//! 4. no capabilities in any set, bounding and ambient included;
//! 5. no_new_privs;
//! 6. Landlock: no filesystem access beyond explicit rules, no TCP, scoped abstract sockets and
//!    signals (as far as the kernel's ABI goes);
//! 7. seccomp: the policy compiled from `policies/*.json`, default action kill-process; calls a
//!    library makes on its own that Landlock refuses anyway get an errno instead (`*_fs_errno`).
//!
//! In strict mode any layer that cannot be applied is an error (namespaces excepted: they are
//! used where the kernel allows, and logged); in best-effort mode it is logged. Every layer logs
//! what it applied.

use std::os::fd::RawFd;
use std::path::PathBuf;

use caps::{CapSet, Capability};
use landlock::{
    Access, AccessFs, AccessNet, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset,
    RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};
use nix::sched::{unshare, CloneFlags};
use nix::unistd::{Gid, Group, Uid, User};

mod filters {
    include!(concat!(env!("OUT_DIR"), "/seccomp_filters.rs"));
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Refuse to start if any layer cannot be applied.
    Strict,
    /// Apply what the system allows and log each missing layer.
    BestEffort,
}

/// Which seccomp policy to install.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Worker,
    Broker,
}

/// Filesystem access a process keeps under Landlock.
#[derive(Debug, Clone)]
pub enum PathRule {
    /// Read files beneath this directory (or this file).
    Read(PathBuf),
    /// Read, create, write and truncate files beneath this directory.
    ReadWrite(PathBuf),
    /// Remove (unlink) files beneath this directory, nothing else: for a process that removes
    /// the socket it bound itself when it is done.
    RemoveFiles(PathBuf),
}

#[derive(Debug, Clone)]
pub struct Options {
    pub mode: Mode,
    pub role: Role,
    /// When started as root: who to become. Required for the worker in strict mode.
    pub user: Option<String>,
    pub group: Option<String>,
    pub paths: Vec<PathRule>,
}

#[derive(Debug, thiserror::Error)]
#[error("sandbox: {0}")]
pub struct SandboxError(String);

/// What was applied, for logs and tests.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub namespaces: bool,
    pub user_switched: bool,
    pub landlock: Option<String>,
    pub seccomp_filters: usize,
}

struct Applier {
    mode: Mode,
}

impl Applier {
    /// Logs a missing layer; an error in strict mode.
    fn missing(&self, layer: &str, why: impl std::fmt::Display) -> Result<(), SandboxError> {
        match self.mode {
            Mode::Strict => Err(SandboxError(format!("{layer}: {why}"))),
            Mode::BestEffort => {
                log::warn!("sandbox: {layer} not applied: {why}");
                Ok(())
            }
        }
    }
}

/// Closes every fd above stderr inherited from whoever started us, except `keep` (the listening
/// sockets we were given, see `listen`). Call first thing in main, before anything is opened.
pub fn close_inherited_fds(keep: &[RawFd]) {
    let fds: Vec<RawFd> = match std::fs::read_dir("/proc/self/fd") {
        Ok(dir) => dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|&fd| fd > 2 && !keep.contains(&fd))
            .collect(),
        Err(e) => {
            log::warn!("sandbox: cannot list inherited fds: {e}");
            return;
        }
    };
    for fd in fds {
        // The directory's own fd is already closed: EBADF is expected for it.
        let _ = nix::unistd::close(fd);
    }
}

/// Applies every layer; returns what was applied.
pub fn apply(options: &Options) -> Result<Report, SandboxError> {
    let applier = Applier { mode: options.mode };
    let mut report = Report::default();
    let is_root = Uid::effective().is_root();

    // Resolve names while /etc is still readable.
    let target = match (&options.user, is_root) {
        (Some(user), true) => Some(resolve_user(user, options.group.as_deref())?),
        (None, true) if options.role == Role::Worker => {
            applier.missing("user switch", "started as root but no --user given")?;
            None
        }
        _ => None,
    };

    // What was applied, for the one line that sums the sandbox up.
    let mut applied: Vec<String> = Vec::new();

    // 1. Not dumpable.
    match nix::sys::prctl::set_dumpable(false) {
        Ok(()) => applied.push("not dumpable".into()),
        Err(e) => applier.missing("dumpable", e)?,
    }

    // 2. Namespaces. Without root a user namespace makes the others possible.
    let mut flags = CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWNS;
    if !is_root {
        flags |= CloneFlags::CLONE_NEWUSER;
    }
    match unshare(flags) {
        Ok(()) => {
            report.namespaces = true;
            let names = [
                (CloneFlags::CLONE_NEWUSER, "user"),
                (CloneFlags::CLONE_NEWNET, "network"),
                (CloneFlags::CLONE_NEWIPC, "IPC"),
                (CloneFlags::CLONE_NEWNS, "mount"),
            ];
            let new: Vec<&str> = names
                .iter()
                .filter(|(flag, _)| flags.contains(*flag))
                .map(|(_, name)| *name)
                .collect();
            applied.push(format!("new {} namespaces", new.join(", ")));
        }
        // "Where the kernel allows": a service manager may already have given us private
        // namespaces and forbidden new ones (RestrictNamespaces=); seccomp and Landlock still
        // forbid every network socket.
        Err(e) => {
            log::warn!("sandbox: namespaces not available ({e}); relying on seccomp and Landlock")
        }
    }

    // 3 and 4. Capabilities: the bounding set needs CAP_SETPCAP, so drop it before the switch.
    drop_bounding_set(&applier)?;
    if let Some((uid, gid, name)) = target {
        switch_user(uid, gid).map_err(|e| SandboxError(format!("switching to {name}: {e}")))?;
        report.user_switched = true;
        applied.push(format!(
            "user {name} (uid {uid}, gid {gid}, no supplementary groups)"
        ));
    }
    clear_capabilities(&applier)?;
    applied.push("no capabilities".into());

    // 5. No new privileges.
    match nix::sys::prctl::set_no_new_privs() {
        Ok(()) => applied.push("no_new_privs".into()),
        Err(e) => applier.missing("no_new_privs", e)?,
    }

    // 6. Landlock.
    report.landlock = apply_landlock(&applier, &options.paths)?;
    if let Some(landlock) = &report.landlock {
        applied.push(format!("Landlock {landlock}"));
    }

    // 7. Seccomp, last: the layers above need calls the policy forbids.
    let installed = apply_seccomp(options.role)?;
    report.seccomp_filters = installed.len();
    let (role, policy) = match options.role {
        Role::Worker => ("worker", "policies/worker.json"),
        Role::Broker => ("broker", "policies/broker.json"),
    };
    // The allow-list is the last filter; the others turn listed calls into an errno.
    log::debug!("{role}: seccomp filters {}", installed.join(", "));
    applied.push(format!(
        "seccomp {policy} ({} filters, kill-process by default)",
        installed.len()
    ));
    log::info!("{role}: sandbox: {}", applied.join(", "));
    Ok(report)
}

fn resolve_user(user: &str, group: Option<&str>) -> Result<(Uid, Gid, String), SandboxError> {
    let found = User::from_name(user)
        .map_err(|e| SandboxError(format!("looking up user {user}: {e}")))?
        .ok_or_else(|| SandboxError(format!("no user {user}")))?;
    let gid = match group {
        Some(name) => {
            Group::from_name(name)
                .map_err(|e| SandboxError(format!("looking up group {name}: {e}")))?
                .ok_or_else(|| SandboxError(format!("no group {name}")))?
                .gid
        }
        None => found.gid,
    };
    if found.uid.is_root() || gid.as_raw() == 0 {
        return Err(SandboxError(format!(
            "{user} is root: choose an unprivileged user"
        )));
    }
    Ok((found.uid, gid, user.to_string()))
}

fn switch_user(uid: Uid, gid: Gid) -> nix::Result<()> {
    nix::unistd::setgroups(&[])?;
    nix::unistd::setresgid(gid, gid, gid)?;
    nix::unistd::setresuid(uid, uid, uid)?;
    Ok(())
}

fn drop_bounding_set(applier: &Applier) -> Result<(), SandboxError> {
    let held = caps::read(None, CapSet::Bounding).unwrap_or_default();
    if held.is_empty() {
        log::debug!("sandbox: capability bounding set already empty");
        return Ok(());
    }
    let mut failed = Vec::new();
    for cap in held {
        if caps::drop(None, CapSet::Bounding, cap).is_err() {
            failed.push(cap);
        }
    }
    if failed.is_empty() {
        log::debug!("sandbox: capability bounding set cleared");
        return Ok(());
    }
    // Without CAP_SETPCAP an unprivileged process cannot shrink its bounding set; with no
    // capability in any other set, no_new_privs and no execve it can never use one.
    let permitted = caps::read(None, CapSet::Permitted).unwrap_or_default();
    if permitted.contains(&Capability::CAP_SETPCAP) {
        applier.missing("capability bounding set", format!("cannot drop {failed:?}"))
    } else {
        log::warn!(
            "sandbox: bounding set kept ({} capabilities): unprivileged, no CAP_SETPCAP; \
             every other set is cleared and no_new_privs forbids gaining any",
            failed.len()
        );
        Ok(())
    }
}

fn clear_capabilities(applier: &Applier) -> Result<(), SandboxError> {
    for set in [
        CapSet::Ambient,
        CapSet::Inheritable,
        CapSet::Effective,
        CapSet::Permitted,
    ] {
        if let Err(e) = caps::clear(None, set) {
            applier.missing("capabilities", format!("clearing {set:?}: {e}"))?;
        }
        let left = caps::read(None, set).unwrap_or_default();
        if !left.is_empty() {
            applier.missing("capabilities", format!("{set:?} still holds {left:?}"))?;
        }
    }
    log::debug!("sandbox: no capabilities (effective, permitted, inheritable, ambient)");
    Ok(())
}

fn apply_landlock(applier: &Applier, paths: &[PathRule]) -> Result<Option<String>, SandboxError> {
    let abi = ABI::V6;
    let build = || -> Result<landlock::RestrictionStatus, landlock::RulesetError> {
        let mut ruleset = Ruleset::default()
            .set_compatibility(CompatLevel::BestEffort)
            .handle_access(AccessFs::from_all(abi))?
            .handle_access(AccessNet::from_all(abi))?
            .scope(Scope::AbstractUnixSocket | Scope::Signal)?
            .create()?;
        for rule in paths {
            let (path, access) = match rule {
                PathRule::Read(path) => (path, AccessFs::from_read(abi)),
                PathRule::ReadWrite(path) => (path, AccessFs::from_all(abi)),
                PathRule::RemoveFiles(path) => (path, AccessFs::RemoveFile.into()),
            };
            match PathFd::new(path) {
                Ok(fd) => ruleset = ruleset.add_rule(PathBeneath::new(fd, access))?,
                Err(e) => log::warn!("sandbox: landlock rule for {}: {e}", path.display()),
            }
        }
        ruleset.restrict_self()
    };
    match build() {
        Ok(status) => match status.ruleset {
            RulesetStatus::NotEnforced => {
                applier.missing(
                    "landlock",
                    "not enforced: the kernel lacks it, or a seccomp filter of whoever started \
                     us (a container runtime) refuses its system calls",
                )?;
                Ok(None)
            }
            enforced => {
                let how = match enforced {
                    RulesetStatus::FullyEnforced => "fully enforced",
                    _ => "partly enforced (an older kernel ABI)",
                };
                let text = format!(
                    "{how} ({} path rules, no TCP, abstract sockets and signals scoped)",
                    paths.len()
                );
                Ok(Some(text))
            }
        },
        Err(e) => {
            applier.missing("landlock", e)?;
            Ok(None)
        }
    }
}

/// Installs the role's filters and returns their names in installation order. The kernel runs
/// every filter on each call and applies the strictest verdict, so an errno filter's answer
/// wins over the allow-list's "allow", and the allow-list's kill wins over any errno: a call
/// an errno filter answers must therefore be allowed by the allow-list.
fn apply_seccomp(role: Role) -> Result<Vec<&'static str>, SandboxError> {
    let (filters, main) = match role {
        Role::Worker => (filters::WORKER, "worker"),
        Role::Broker => (filters::BROKER, "broker"),
    };
    // The main allow-list goes last: once it is in, installing another filter is forbidden.
    let ordered = filters
        .iter()
        .filter(|(name, _)| *name != main)
        .chain(filters.iter().filter(|(name, _)| *name == main));
    let mut installed = Vec::with_capacity(filters.len());
    for (name, program) in ordered {
        let program: seccompiler::BpfProgram = program
            .iter()
            .map(|&(code, jt, jf, k)| seccompiler::sock_filter { code, jt, jf, k })
            .collect();
        seccompiler::apply_filter(&program)
            .map_err(|e| SandboxError(format!("seccomp filter {name}: {e}")))?;
        installed.push(*name);
    }
    Ok(installed)
}

/// Test-only probes of the sandbox (debug builds only; unreachable from guest or broker input):
/// with `VSOUND_SANDBOX_PROBE` set, the process tries a forbidden action right after
/// sandboxing and exits with 0 if it was refused, 3 if it was allowed. Seccomp may instead kill
/// it with SIGSYS. The probe `arena` instead does something the libraries do on their own and
/// the sandbox must survive: it exits with 0 ("survived") unless seccomp kills it.
#[cfg(debug_assertions)]
pub fn run_probe_if_asked() {
    let Ok(probe) = std::env::var("VSOUND_SANDBOX_PROBE") else {
        return;
    };
    if probe == "arena" {
        grow_and_shrink_thread_arenas();
        eprintln!("probe arena: survived");
        std::process::exit(0);
    }
    let outcome: Result<(), String> = match probe.as_str() {
        "open" => std::fs::File::open("/etc/hostname")
            .map(drop)
            .map_err(|e| e.to_string()),
        "inet" => std::net::UdpSocket::bind("127.0.0.1:0")
            .map(drop)
            .map_err(|e| e.to_string()),
        "exec" => std::process::Command::new("/bin/true")
            .status()
            .map(drop)
            .map_err(|e| e.to_string()),
        "ptrace" => {
            nix::sys::ptrace::attach(nix::unistd::Pid::from_raw(1)).map_err(|e| e.to_string())
        }
        other => Err(format!("unknown probe {other}")),
    };
    match outcome {
        Ok(()) => {
            eprintln!("probe {probe}: ALLOWED");
            std::process::exit(3);
        }
        Err(e) => {
            eprintln!("probe {probe}: denied ({e})");
            std::process::exit(0);
        }
    }
}

/// Makes glibc grow and then shrink the heaps of non-main arenas, as the worker's vring thread
/// does with guest-sized buffers: threads allocate many 30-200 KiB blocks (below the mmap
/// threshold once it has adapted, so they come from the thread's arena heap), then free them
/// all, so the arena's top chunk passes the trim threshold and `heap_trim` shrinks the heap.
/// The first shrink in a process makes glibc open `/proc/sys/vm/overcommit_memory`
/// (`check_may_shrink_heap`).
#[cfg(debug_assertions)]
fn grow_and_shrink_thread_arenas() {
    const THREADS: usize = 4;
    const ROUNDS: usize = 20;
    const BLOCKS: usize = 64;
    let workers: Vec<_> = (0..THREADS)
        .map(|thread| {
            std::thread::spawn(move || {
                for round in 0..ROUNDS {
                    let blocks: Vec<Vec<u8>> = (0..BLOCKS)
                        .map(|i| {
                            let kib = 30 + (i * 37 + round * 11 + thread * 5) % 171;
                            // Touched, so the pages are really used and returned.
                            vec![1u8; kib * 1024]
                        })
                        .collect();
                    std::hint::black_box(&blocks);
                }
            })
        })
        .collect();
    for worker in workers {
        if worker.join().is_err() {
            eprintln!("probe arena: a thread panicked");
            std::process::exit(4);
        }
    }
}

#[cfg(not(debug_assertions))]
pub fn run_probe_if_asked() {}
