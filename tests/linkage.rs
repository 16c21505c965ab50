//! The worker must never link an audio library: only the broker touches audio.

mod common;

use std::process::Command;

fn needed_libraries(binary: &str) -> Vec<String> {
    let out = Command::new("readelf")
        .args(["--dynamic", "--wide", binary])
        .output()
        .expect("readelf (binutils) is installed");
    assert!(out.status.success(), "readelf failed on {binary}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|line| line.contains("(NEEDED)"))
        .filter_map(|line| {
            let start = line.find('[')? + 1;
            let end = line.rfind(']')?;
            Some(line[start..end].to_string())
        })
        .collect()
}

#[test]
fn worker_links_no_audio_library() {
    // The check can fail: the broker links GStreamer (and GLib with it).
    let broker = needed_libraries(common::bins::broker());
    assert!(
        broker.iter().any(|lib| lib.starts_with("libgstreamer-1.0")),
        "the broker does not link GStreamer: {broker:?}"
    );
    let needed = needed_libraries(common::bins::worker());
    assert!(
        needed.iter().any(|lib| lib.starts_with("libc.so")),
        "could not read the dynamic section: {needed:?}"
    );
    for lib in &needed {
        assert!(
            !lib.contains("pipewire")
                && !lib.contains("asound")
                && !lib.contains("pulse")
                && !lib.starts_with("libgst")
                && !lib.starts_with("libglib")
                && !lib.starts_with("libgobject"),
            "the worker links {lib}"
        );
    }
}

/// The crates a package depends on for its normal (not dev, not build) code, from `cargo tree`.
fn dependency_tree(package: &str) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["tree", "--offline", "--edges", "normal", "--prefix", "none"])
        .args(["--format", "{p}", "--package", package])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo tree -p {package}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// Crates that bind an audio stack.
fn is_audio_crate(name: &str) -> bool {
    [
        "pipewire",
        "libspa",
        "alsa",
        "hound",
        "pulse",
        "cpal",
        "gstreamer",
    ]
    .iter()
    .any(|audio| name == *audio || name.starts_with(&format!("{audio}-")))
}

#[test]
fn the_workers_package_depends_on_no_audio_crate() {
    let worker = dependency_tree("vsound-worker");
    assert!(
        worker.iter().any(|c| c == "vhost-user-backend"),
        "not the worker's tree: {worker:?}"
    );
    let audio: Vec<_> = worker.iter().filter(|c| is_audio_crate(c)).collect();
    assert!(audio.is_empty(), "the worker depends on {audio:?}");
    // The check can fail: the broker's tree has them.
    let broker = dependency_tree("vsound-broker");
    assert!(
        broker.iter().any(|c| c == "pipewire")
            && broker.iter().any(|c| c == "alsa")
            && broker.iter().any(|c| c == "gstreamer")
    );
    // And the spec crate does no I/O of its own: no system-call, socket or vhost crates
    // (vm-memory and virtio-queue bring libc and vmm-sys-util for their mappings).
    let spec = dependency_tree("vsound-virtio-snd");
    for io in [
        "nix",
        "rustix",
        "memfd",
        "vhost",
        "vhost-user-backend",
        "bincode",
    ] {
        assert!(!spec.iter().any(|c| c == io), "virtio-snd depends on {io}");
    }
}

/// The man page generator (clap_mangen, `examples: manpages`) is a development tool: no shipped
/// binary's package depends on it, the worker's least of all.
#[test]
fn no_shipped_binary_depends_on_the_man_page_generator() {
    for package in ["vsound-worker", "vsound-broker", "vsound"] {
        let tree = dependency_tree(package);
        assert!(tree.iter().any(|c| c == "clap"), "not {package}'s tree");
        for generator in ["clap_mangen", "roff"] {
            assert!(
                !tree.iter().any(|c| c == generator),
                "{package} depends on {generator}"
            );
        }
    }
}
