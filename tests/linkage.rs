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
    let needed = needed_libraries(common::bins::worker());
    assert!(
        needed.iter().any(|lib| lib.starts_with("libc.so")),
        "could not read the dynamic section: {needed:?}"
    );
    for lib in &needed {
        assert!(
            !lib.contains("pipewire") && !lib.contains("asound") && !lib.contains("pulse"),
            "the worker links {lib}"
        );
    }
}
