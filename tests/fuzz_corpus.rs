//! Replays the fuzz targets' seed corpus (fuzz/corpus/<target>/) and their regressions
//! (fuzz/regressions/<target>/) through the same bodies the fuzzer runs (vsound_fuzz_harness),
//! on the stable toolchain: every file must pass every invariant, every target must have a
//! corpus, and the corpus must hold every seed the harness builds (regenerate it with
//! `cargo test --test fuzz_corpus -- --ignored write_seed_corpus` after changing an input
//! format).

use std::collections::BTreeSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use vsound_fuzz_harness::{seeds, TARGETS};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files of a directory, sorted; none if it does not exist.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `body` on each file; the names of those that fail, with the panic's message.
fn replay(body: fn(&[u8]), files: &[PathBuf]) -> Vec<String> {
    let mut failed = Vec::new();
    for file in files {
        let data = std::fs::read(file).unwrap();
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| body(&data))) {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failed.push(format!("{}: {message}", file.display()));
        }
    }
    failed
}

#[test]
fn every_corpus_and_regression_file_passes() {
    let mut failed = Vec::new();
    let mut replayed = 0;
    for &(target, body) in TARGETS {
        let corpus = files(&fuzz_dir().join("corpus").join(target));
        assert!(
            !corpus.is_empty(),
            "fuzz/corpus/{target}/ is empty or missing"
        );
        let regressions = files(&fuzz_dir().join("regressions").join(target));
        replayed += corpus.len() + regressions.len();
        failed.extend(replay(body, &corpus));
        failed.extend(replay(body, &regressions));
    }
    assert!(
        failed.is_empty(),
        "{} of {replayed} inputs failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

#[test]
fn corpus_directories_are_targets() {
    let targets: BTreeSet<&str> = TARGETS.iter().map(|&(t, _)| t).collect();
    for kind in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz_dir().join(kind)) else {
            continue;
        };
        for entry in entries {
            let name = entry.unwrap().file_name().into_string().unwrap();
            assert!(
                targets.contains(name.as_str()),
                "fuzz/{kind}/{name} is no target's"
            );
        }
    }
}

#[test]
fn corpus_holds_every_seed() {
    let mut stale = Vec::new();
    for seed in seeds::all() {
        let path = fuzz_dir().join("corpus").join(seed.target).join(&seed.name);
        if std::fs::read(&path).ok().as_ref() != Some(&seed.bytes) {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "missing or stale seeds (run `cargo test --test fuzz_corpus -- --ignored \
         write_seed_corpus`):\n{}",
        stale.join("\n")
    );
}

#[test]
fn linux_requests_are_in_the_corpus() {
    // The recorded session and each distinct request on its own.
    let requests = seeds::linux_requests();
    assert!(
        requests.len() >= 10,
        "only {} recorded requests",
        requests.len()
    );
    let linux = seeds::all()
        .into_iter()
        .filter(|s| s.target == "control" && s.name.starts_with("linux-"))
        .count();
    let distinct: BTreeSet<&Vec<u8>> = requests.iter().collect();
    assert_eq!(linux, distinct.len() + 1);
}

/// Writes the seeds into fuzz/corpus (files of other names are left alone).
#[test]
#[ignore]
fn write_seed_corpus() {
    for seed in seeds::all() {
        let dir = fuzz_dir().join("corpus").join(seed.target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(&seed.name), &seed.bytes).unwrap();
    }
}
