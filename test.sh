#!/usr/bin/env bash
# Sets up what is missing, then runs the whole test suite: formatting, lints, and every test.
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets
