#!/usr/bin/env bash
# Sets up what is missing, then runs the whole test suite: formatting, lints, and every test
# (as root, tests/policies.rs also boots the units under systemd-nspawn with a real guest;
# VSOUND_SKIP_BOOT=1 leaves that out).
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The integration tests run the worker and broker binaries of the other packages.
cargo build --workspace --bins
cargo test --workspace --all-targets
