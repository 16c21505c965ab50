//! The workspace's binaries. The worker and the broker are other packages' binaries, so cargo
//! gives this package no `CARGO_BIN_EXE_` for them: they sit next to this test's executable's
//! directory (target/<profile>/deps/<test> → target/<profile>/<name>), built by
//! `cargo build --workspace --bins` (./test.sh does it first).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::SystemTime;

/// The worker binary (`vsound-worker`).
pub fn worker() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| locate("vsound-worker", &["src/worker"]))
}

/// The broker binary (`vsound-broker`).
pub fn broker() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| locate("vsound-broker", &["src/broker", "src/admin"]))
}

/// The crates every binary is built from besides its own.
const COMMON_CRATES: [&str; 4] = ["src/virtio-snd", "src/config", "src/shared", "src/process"];

/// Finds `name` and refuses a binary older than its sources: a focused `cargo test --test X`
/// rebuilds only this package, and a stale worker or broker would test old code.
fn locate(name: &str, package_dirs: &[&str]) -> String {
    let exe = std::env::current_exe().expect("the test's own path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("a test runs from target/<profile>/deps");
    let path = profile_dir.join(name);
    let built = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}: build the workspace's binaries first (`cargo build --workspace --bins`, \
                 or --release for benches; ./test.sh does it)",
                path.display()
            )
        });
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for dir in COMMON_CRATES.iter().chain(package_dirs) {
        if let Some((source, changed)) = newest(&root.join(dir)) {
            assert!(
                changed <= built,
                "{} is older than {}: run `cargo build --workspace --bins` (or ./test.sh)",
                path.display(),
                source.display()
            );
        }
    }
    path.to_string_lossy().into_owned()
}

/// The most recently modified file under `dir`.
fn newest(dir: &Path) -> Option<(PathBuf, SystemTime)> {
    let mut newest: Option<(PathBuf, SystemTime)> = None;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).ok()?.flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                pending.push(path);
            } else if let Ok(changed) = meta.modified() {
                if newest.as_ref().is_none_or(|(_, t)| changed > *t) {
                    newest = Some((path, changed));
                }
            }
        }
    }
    newest
}
