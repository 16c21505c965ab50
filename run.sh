#!/usr/bin/env bash
# Sets up what is missing, builds, and runs vsound (a broker plus one worker) on a backend that
# needs no sound hardware. Prints the QEMU arguments that attach a VM. Ctrl-C stops both.
# Arguments go to `vsound run`; without --socket (or --socket-path) the vhost-user socket is
# $XDG_RUNTIME_DIR/vsound/vsound.sock.
set -euo pipefail
cd "$(dirname "$0")"
args=("$@")
socket_given=false
for arg in "$@"; do
  case "$arg" in
    --socket | --socket=* | --socket-path | --socket-path=*) socket_given=true ;;
  esac
done
if ! $socket_given; then
  runtime="${XDG_RUNTIME_DIR:-/tmp}/vsound"
  mode=0700
  if [ "$(id -u)" -eq 0 ]; then
    # As root the worker runs as nobody and must reach the broker's socket to reconnect to a
    # restarted broker: a directory it can traverse (the sockets themselves are not world-usable).
    runtime=/tmp/vsound
    mode=0711
  fi
  mkdir -p "$runtime"
  chmod "$mode" "$runtime"
  args=(--socket "$runtime/vsound.sock" "${args[@]}")
fi
./scripts/setup.sh
cargo build --release --workspace --bins
exec ./target/release/vsound run "${args[@]}"
