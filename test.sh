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
# A real-time host keeps its CPUs out of deep idle while audio runs (PM QoS, as RT audio setups
# do): a halted vCPU of a virtual CI machine wakes late for PipeWire's timer and a TCG guest.
# Held (value 0) while this shell runs; skipped where the file cannot be opened.
if [ -w /dev/cpu_dma_latency ] && exec 9>/dev/cpu_dma_latency; then
  printf '\0\0\0\0' >&9
fi
cargo test --workspace --all-targets --no-fail-fast
