//! The Debian package (README "Debian package"). `scripts/package.sh --profile dev` packages the
//! binaries the other tests run (no release build in CI; only the binaries' build differs from
//! the release package, which the same metadata and script make). The package's control fields
//! and every file in it are checked; it is then installed for real into a scratch root
//! (`dpkg --root --force-script-chrootless`, so its maintainer scripts run and apply sysusers.d
//! and tmpfiles.d to that root through DPKG_ROOT), the installed units pass
//! `systemd-analyze verify` there, the man pages render without a warning and document every
//! option the binaries accept; an upgrade in place configures again, and a purge removes what it
//! should. Installing needs root: elsewhere that half is skipped, and says so.

#[path = "common/bins.rs"]
mod bins;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// `program args`'s stdout, which must succeed.
fn checked(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The profile the tests' binaries were built with, as `scripts/package.sh --profile` takes it.
fn profile() -> &'static str {
    let exe = std::env::current_exe().expect("the test's own path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::file_name)
        .expect("a test runs from target/<profile>/deps");
    if dir == "debug" {
        "dev"
    } else {
        "release"
    }
}

/// Builds the package from the tests' binaries into `out`; its path.
fn build_package(out: &Path) -> PathBuf {
    // Fresh binaries only (a stale one is refused): the package holds these very files.
    bins::worker();
    bins::broker();
    let started = Instant::now();
    let profile = profile();
    let mut args = vec!["--profile", profile, "--output", out.to_str().unwrap()];
    if profile == "release" {
        args.push("--no-build");
    }
    let output = Command::new(repo().join("scripts/package.sh"))
        .args(&args)
        .output()
        .expect("cannot run scripts/package.sh");
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{stderr}");
    assert!(
        output.status.success(),
        "scripts/package.sh {args:?}: {}",
        output.status
    );
    let deb = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    println!(
        "scripts/package.sh {args:?}: {} in {:.1} s",
        deb.display(),
        started.elapsed().as_secs_f64()
    );
    let name = deb.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with("vsound_") && name.ends_with(".deb") && deb.starts_with(out),
        "the script printed {deb:?}"
    );
    deb
}

/// The package's files (not its directories): path (without the leading `.`) to mode, and
/// that every entry is root's.
fn contents(deb: &Path) -> BTreeMap<String, String> {
    let listing = checked("dpkg-deb", &["--contents", deb.to_str().unwrap()]);
    let mut files = BTreeMap::new();
    for line in listing.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert!(fields.len() >= 6, "dpkg-deb -c: {line}");
        assert_eq!(fields[1], "0/0", "not root's: {line}");
        let path = fields[5].trim_start_matches('.');
        if fields[0].starts_with('d') {
            continue;
        }
        assert!(fields[0].starts_with('-'), "not a regular file: {line}");
        files.insert(path.to_string(), fields[0].to_string());
    }
    files
}

const UNITS: [&str; 5] = [
    "vsound-broker.service",
    "vsound-broker.socket",
    "vsound-broker-control.socket",
    "vsound-worker@.service",
    "vsound-worker@.socket",
];

/// Every man page: the three programs', and one for each of the launcher's subcommands.
const MAN_PAGES: [&str; 11] = [
    "vsound-worker",
    "vsound-broker",
    "vsound",
    "vsound-run",
    "vsound-ctl",
    "vsound-ctl-list",
    "vsound-ctl-set-volume",
    "vsound-ctl-mute",
    "vsound-ctl-unmute",
    "vsound-ctl-mute-all",
    "vsound-ctl-unmute-all",
];

fn expected_files() -> BTreeMap<String, &'static str> {
    let mut files = BTreeMap::new();
    for bin in ["vsound-worker", "vsound-broker", "vsound"] {
        files.insert(format!("/usr/bin/{bin}"), "-rwxr-xr-x");
    }
    for unit in UNITS {
        files.insert(format!("/lib/systemd/system/{unit}"), "-rw-r--r--");
    }
    for page in MAN_PAGES {
        files.insert(format!("/usr/share/man/man1/{page}.1.gz"), "-rw-r--r--");
    }
    for file in [
        "/usr/lib/sysusers.d/vsound.conf",
        "/usr/lib/tmpfiles.d/vsound.conf",
        "/usr/share/selinux/packages/vsound.pp",
        "/usr/share/vsound/selinux/vsound.te",
        "/usr/share/vsound/selinux/vsound.fc",
        "/usr/share/vsound/selinux/vsound.if",
        "/usr/share/doc/vsound/README.md",
        "/usr/share/doc/vsound/SECURITY.md",
        "/usr/share/doc/vsound/BENCHMARKS.md",
        "/usr/share/doc/vsound/copyright",
        "/usr/share/doc/vsound/examples/aaos.toml",
    ] {
        files.insert(file.to_string(), "-rw-r--r--");
    }
    files
}

fn field(deb: &Path, name: &str) -> String {
    checked("dpkg-deb", &["--field", deb.to_str().unwrap(), name])
        .trim()
        .to_string()
}

fn check_control(deb: &Path) {
    assert_eq!(field(deb, "Package"), "vsound");
    let arch = checked("dpkg", &["--print-architecture"]);
    assert_eq!(field(deb, "Architecture"), arch.trim());
    assert_eq!(
        field(deb, "Version"),
        format!("{}-1", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(field(deb, "Section"), "sound");
    assert_eq!(field(deb, "Priority"), "optional");
    assert!(
        field(deb, "Maintainer").contains('<'),
        "Maintainer: NAME <ADDRESS>"
    );
    // $auto (dpkg-shlibdeps on the binaries) and systemd.
    let depends = field(deb, "Depends");
    let names: Vec<&str> = depends
        .split(',')
        .map(|d| d.split_whitespace().next().unwrap_or_default())
        .collect();
    for needed in [
        "libc6",
        "libpipewire-0.3-0",
        "libasound2",
        "libgstreamer1.0-0",
        "systemd",
    ] {
        assert!(names.contains(&needed), "Depends: {depends} lacks {needed}");
    }
    let recommends = field(deb, "Recommends");
    assert!(
        recommends.contains("gstreamer1.0-plugins-base"),
        "Recommends: {recommends}"
    );
    let description = field(deb, "Description");
    assert!(
        description.contains("No unit is enabled on installation."),
        "{description}"
    );
    // The maintainer scripts, executable and parseable by sh.
    let control = tempfile::tempdir().unwrap();
    checked(
        "dpkg-deb",
        &[
            "--control",
            deb.to_str().unwrap(),
            control.path().to_str().unwrap(),
        ],
    );
    for script in ["postinst", "prerm", "postrm"] {
        let path = control.path().join(script);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path)
                .unwrap_or_else(|e| panic!("no {script}: {e}"))
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o755, "{script}");
        checked("sh", &["-n", path.to_str().unwrap()]);
    }
    // No debhelper snippet was wanted: nothing enables or starts a unit.
    let postinst = std::fs::read_to_string(control.path().join("postinst")).unwrap();
    let code: Vec<&str> = postinst
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    let has = |word: &str| code.iter().any(|l| l.contains(word));
    for word in [
        "enable",
        "systemctl start",
        "--now",
        "deb-systemd",
        "#DEBHELPER#",
    ] {
        assert!(!has(word), "postinst: {word}");
    }
    for word in ["systemd-sysusers", "systemd-tmpfiles", "daemon-reload"] {
        assert!(has(word), "postinst lacks {word}");
    }
}

/// A scratch root as a merged-/usr Debian system has it, with the host's systemd units (the
/// targets ours name) and an empty dpkg database.
fn scratch_root(root: &Path) {
    for dir in [
        "usr/bin",
        "usr/sbin",
        "usr/lib",
        "etc",
        "run",
        "var/log",
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
    ] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    for (link, to) in [("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib")] {
        std::os::unix::fs::symlink(to, root.join(link)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    std::fs::create_dir_all(root.join("usr/lib/systemd")).unwrap();
    checked(
        "cp",
        &[
            "-a",
            "/lib/systemd/system",
            root.join("usr/lib/systemd/").to_str().unwrap(),
        ],
    );
}

/// dpkg on `root`: the maintainer scripts run outside a chroot, with DPKG_ROOT set to it
/// (the scratch root has no shell of its own); its dependencies are not in that root.
fn dpkg(root: &Path, args: &[&str]) -> String {
    let root_arg = format!("--root={}", root.display());
    let log = format!("--log={}", root.join("var/log/dpkg.log").display());
    let mut all = vec![
        root_arg.as_str(),
        log.as_str(),
        "--force-script-chrootless",
        "--force-depends",
    ];
    all.extend_from_slice(args);
    let out = run("dpkg", &all);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "dpkg {all:?}: {}\n{text}", out.status);
    text
}

fn lines_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(str::to_string)
        .collect()
}

fn has_entry(path: &Path, name: &str) -> bool {
    lines_of(path)
        .iter()
        .any(|l| l.split(':').next() == Some(name))
}

/// The mode and group (a name from the root's own /etc/group) of `path` in `root`.
fn mode_and_group(root: &Path, path: &str) -> (u32, String) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(root.join(path.trim_start_matches('/')))
        .unwrap_or_else(|e| panic!("{path} in the scratch root: {e}"));
    let gid = meta.gid().to_string();
    let group = lines_of(&root.join("etc/group"))
        .iter()
        .find(|l| l.split(':').nth(2) == Some(gid.as_str()))
        .and_then(|l| l.split(':').next().map(str::to_string))
        .unwrap_or(gid);
    (meta.mode() & 0o7777, group)
}

/// The long options `BINARY ARGS --help` lists.
fn long_options(binary: &str, args: &[&str]) -> Vec<String> {
    let mut all = args.to_vec();
    all.push("--help");
    let help = checked(binary, &all);
    let mut options: Vec<String> = help
        .lines()
        .filter_map(|l| {
            l.trim_start().strip_prefix("--").or_else(|| {
                l.trim_start()
                    .strip_prefix("-")
                    .and_then(|l| l.split_once(", --").map(|(_, long)| long))
            })
        })
        .map(|l| format!("--{}", l.split([' ', ',', '=']).next().unwrap()))
        .collect();
    options.dedup();
    assert!(options.len() >= 2, "{binary} {args:?} --help: {help}");
    options
}

/// A man page of the installed root: no groff warning, and the text `man` shows.
fn render(root: &Path, page: &str) -> String {
    let path = root.join(format!("usr/share/man/man1/{page}.1.gz"));
    let path = path.to_str().unwrap();
    let warnings = run(
        "sh",
        &["-c", "zcat \"$1\" | groff -man -Tutf8 -ww -z", "sh", path],
    );
    assert!(
        warnings.status.success(),
        "groff {page}.1: {}",
        warnings.status
    );
    let warnings = String::from_utf8_lossy(&warnings.stderr);
    assert!(
        warnings.is_empty(),
        "groff warns about {page}.1:\n{warnings}"
    );
    let out = Command::new("man")
        .args(["-l", path])
        .env("MANWIDTH", "120")
        .env("MAN_KEEP_FORMATTING", "")
        .output()
        .expect("cannot run man (Debian package man-db)");
    assert!(out.status.success(), "man -l {page}.1: {}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn check_man_pages(root: &Path) {
    let launcher = env!("CARGO_BIN_EXE_vsound");
    let programs: [(&str, &str, &[&str]); 5] = [
        ("vsound-worker", bins::worker(), &[]),
        ("vsound-broker", bins::broker(), &[]),
        ("vsound", launcher, &[]),
        ("vsound-run", launcher, &["run"]),
        ("vsound-ctl", launcher, &["ctl"]),
    ];
    for (page, binary, args) in programs {
        let text = render(root, page);
        assert!(
            text.contains("NAME") && text.contains(&format!("{page} - ")),
            "{page}.1:\n{text}"
        );
        for option in long_options(binary, args) {
            assert!(
                text.contains(&option),
                "{page}.1 does not document {option} (of {binary} {args:?} --help):\n{text}"
            );
        }
    }
    for page in ["vsound-worker", "vsound-broker", "vsound"] {
        let text = render(root, page);
        assert!(text.contains("SEE ALSO") && text.contains("/usr/share/doc/vsound/README.md"));
    }
    for page in &MAN_PAGES[5..] {
        assert!(render(root, page).contains("vsound ctl "), "{page}.1");
    }
}

/// What the maintainer scripts did to the scratch root.
fn check_configured(root: &Path) {
    for group in ["vsound", "vsound-admin", "vsound-broker"] {
        assert!(
            has_entry(&root.join("etc/group"), group),
            "no group {group}"
        );
    }
    assert!(has_entry(&root.join("etc/passwd"), "vsound-broker"));
    for (dir, group) in [
        ("/run/vsound", "vsound"),
        ("/run/vsound-broker", "vsound-broker"),
        ("/run/vsound-admin", "vsound-admin"),
    ] {
        assert_eq!(
            mode_and_group(root, dir),
            (0o750, group.to_string()),
            "{dir}"
        );
    }
    // The configuration the units pass: tmpfiles.d's empty file (the built-in default).
    let config = root.join("etc/vsound/vsound.toml");
    assert_eq!(
        std::fs::read(&config).expect("/etc/vsound/vsound.toml"),
        b""
    );
    assert_eq!(mode_and_group(root, "/etc/vsound/vsound.toml").0, 0o644);
    let status = checked(
        "dpkg-query",
        &[
            &format!("--admindir={}", root.join("var/lib/dpkg").display()),
            "--show",
            "--showformat=${Status}",
            "vsound",
        ],
    );
    assert_eq!(status, "install ok installed");
}

/// `systemd-analyze verify` of the installed units (an instance of each template) in the root:
/// it checks the ExecStart= programs exist there; any output (an unknown key, a bad value) fails.
fn check_units(root: &Path) {
    let root_arg = format!("--root={}", root.display());
    let units = [
        "vsound-broker.socket",
        "vsound-broker-control.socket",
        "vsound-broker.service",
        "vsound-worker@vm1.socket",
        "vsound-worker@vm1.service",
    ];
    let mut args = vec!["verify", root_arg.as_str()];
    args.extend(units);
    let out = run("systemd-analyze", &args);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify {units:?} ({}):\n{said}",
        out.status
    );
    // And what the units name is there: their programs, their Documentation= files.
    for unit in UNITS {
        let text = std::fs::read_to_string(root.join("lib/systemd/system").join(unit)).unwrap();
        for line in text.lines() {
            if let Some(docs) = line.strip_prefix("Documentation=") {
                for doc in docs.split_whitespace() {
                    let path = doc.strip_prefix("file:").expect("file: documentation");
                    assert!(
                        root.join(path.trim_start_matches('/')).is_file(),
                        "{unit}: Documentation={doc} is not installed"
                    );
                }
            }
        }
    }
}

fn check_purged(root: &Path) {
    for gone in [
        "usr/bin/vsound-worker",
        "usr/bin/vsound-broker",
        "usr/bin/vsound",
        "lib/systemd/system/vsound-broker.service",
        "usr/lib/tmpfiles.d/vsound.conf",
        "usr/share/doc/vsound",
        "etc/vsound",
        "run/vsound",
        "run/vsound-broker",
        "run/vsound-admin",
        "etc/systemd/system/sockets.target.wants/vsound-worker@vm1.socket",
    ] {
        assert!(
            std::fs::symlink_metadata(root.join(gone)).is_err(),
            "/{gone} is still there after the purge"
        );
    }
    // Users and groups stay (Debian does not remove them: files may still be theirs).
    assert!(has_entry(&root.join("etc/passwd"), "vsound-broker"));
}

#[test]
fn the_debian_package_installs_its_units_users_directories_and_man_pages() {
    let started = Instant::now();
    let out = tempfile::tempdir().unwrap();
    let deb = build_package(out.path());
    check_control(&deb);
    let files = contents(&deb);
    let expected = expected_files();
    let got: Vec<&String> = files.keys().collect();
    let want: Vec<&String> = expected.keys().collect();
    assert_eq!(got, want, "the package's files");
    for (path, mode) in &expected {
        assert_eq!(&files[path], mode, "{path}");
    }
    println!("contents and control fields: ok ({} files)", files.len());

    if !nix::unistd::Uid::effective().is_root() {
        eprintln!(
            "not root: the package was built and its contents checked, but not installed \
             (dpkg --root, the maintainer scripts and systemd-analyze verify need root)"
        );
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    scratch_root(root);
    let said = dpkg(root, &["--install", deb.to_str().unwrap()]);
    println!("{said}");
    check_configured(root);
    check_units(root);
    check_man_pages(root);
    println!("installed into a scratch root: users, directories, config, units, man pages ok");

    // An upgrade in place (the same version again): unpacks over itself, configures again.
    std::fs::write(root.join("etc/vsound/vsound.toml"), "# the integrator's\n").unwrap();
    dpkg(root, &["--install", deb.to_str().unwrap()]);
    check_configured_keeping(root);

    // An integrator enabled a VM's socket; the purge removes that link with the rest.
    let wants = root.join("etc/systemd/system/sockets.target.wants");
    std::fs::create_dir_all(&wants).unwrap();
    std::os::unix::fs::symlink(
        "/lib/systemd/system/vsound-worker@.socket",
        wants.join("vsound-worker@vm1.socket"),
    )
    .unwrap();
    dpkg(root, &["--purge", "vsound"]);
    check_purged(root);
    println!(
        "upgrade in place and purge: ok; the whole test took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// After a second configure: an integrator's configuration is kept (tmpfiles.d's `f` never
/// overwrites), everything else as after the first.
fn check_configured_keeping(root: &Path) {
    assert_eq!(
        std::fs::read_to_string(root.join("etc/vsound/vsound.toml")).unwrap(),
        "# the integrator's\n"
    );
    for group in ["vsound", "vsound-admin", "vsound-broker"] {
        let count = lines_of(&root.join("etc/group"))
            .iter()
            .filter(|l| l.split(':').next() == Some(group))
            .count();
        assert_eq!(count, 1, "group {group} once");
    }
}
