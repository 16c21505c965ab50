#!/usr/bin/env bash
# Sets up what is missing, builds, and runs vsound (a broker plus one worker) on a backend that
# needs no sound hardware. Prints the QEMU arguments that attach a VM. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup.sh
cargo build --release --bins
runtime="${XDG_RUNTIME_DIR:-/tmp}/vsound"
mkdir -p "$runtime"
chmod 0700 "$runtime"
exec ./target/release/vsound run --socket "$runtime/vsound.sock" "$@"
