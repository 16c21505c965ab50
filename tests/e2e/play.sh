#!/usr/bin/env bash
# Boots the end-to-end test guest (tests/e2e/build-guest.sh) against a running vsound worker and
# runs one shell command in it. For the e2e test and for benchmarks, e.g. the CPU the worker and
# the broker use while a guest plays 30 s:
#
#   target/debug/vsound run --socket /tmp/vs/vm.sock &          # or vsound-broker + vsound-worker
#   tests/e2e/play.sh --socket /tmp/vs/vm.sock -- \
#       'aplay -D hw:0,0 -t raw -f S16_LE -r 48000 -c 2 -d 30 /dev/zero'
#
# Usage: play.sh --socket SOCK [options] [--] 'GUEST COMMAND'
#   --socket SOCK      the worker's vhost-user socket (required)
#   --file PATH        copy PATH into the guest's /in (repeatable); the command runs in /in
#   --out DIR          attach a scratch disk; the guest's /out comes back into DIR (tar)
#   --out-size SIZE    its size for truncate (default 64M)
#   --console FILE     also write the serial console to FILE
#   --timeout SECS     kill QEMU after SECS (default 300)
#   --cache DIR        the guest cache (default target/e2e-cache)
#   --append ARGS      extra kernel command-line arguments
#   --no-controls      start QEMU without controls=on (its config space then has no room for
#                      the control elements the worker offers)
# Environment: QEMU (default qemu-system-x86_64), QEMU_EXTRA_ARGS (extra arguments, split on
# spaces).
#
# The serial console goes to stdout; the guest's init prints markers "@@E2E ..." (see
# tests/e2e/guest/init). Exit status: the guest command's, 124 if QEMU timed out, 125 if the guest
# ended without reporting a status (it crashed, or the device probe hung), 2 on bad usage or a
# missing tool. QEMU: 10.0 from bookworm-backports
# (`apt-get install -t bookworm-backports qemu-system-x86`), which has vhost-user-snd-pci; TCG,
# because this machine's KVM cannot run a stock kernel.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
die() { echo "play.sh: ERROR: $*" >&2; exit 2; }

SOCK="" OUT="" OUT_SIZE=64M CONSOLE="" TIMEOUT=300 CACHE="" APPEND="" CMD="" CONTROLS=",controls=on"
FILES=()
while [ $# -gt 0 ]; do
  case "$1" in
    --socket) SOCK=$2; shift 2 ;;
    --file) FILES+=("$2"); shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --out-size) OUT_SIZE=$2; shift 2 ;;
    --console) CONSOLE=$2; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    --cache) CACHE=$2; shift 2 ;;
    --append) APPEND=$2; shift 2 ;;
    --no-controls) CONTROLS=""; shift ;;
    --) shift; CMD="$*"; break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1" ;;
    *) CMD="$*"; break ;;
  esac
done
[ -n "$SOCK" ] || die "--socket is required"
[ -S "$SOCK" ] || die "$SOCK is not a socket (is the worker running?)"
[ -n "$CMD" ] || die "no guest command"
QEMU=${QEMU:-qemu-system-x86_64}
command -v "$QEMU" >/dev/null \
  || die "$QEMU not found: apt-get install -t bookworm-backports qemu-system-x86 (QEMU 10)"
DEVICES=$("$QEMU" -device help 2>/dev/null || true)
[[ $DEVICES == *'"vhost-user-snd-pci"'* ]] \
  || die "$QEMU has no vhost-user-snd-pci: install QEMU 10 from bookworm-backports"

GUEST=$("$HERE/build-guest.sh" ${CACHE:+"$CACHE"}) || die "building the guest failed"
KERNEL=$(echo "$GUEST" | sed -n 's/^KERNEL=//p')
INITRD=$(echo "$GUEST" | sed -n 's/^INITRD=//p')
BUSYBOX=$(echo "$GUEST" | sed -n 's/^BUSYBOX=//p')

WORK=$(mktemp -d "${TMPDIR:-/tmp}/vsound-e2e.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/in"
for f in "${FILES[@]+"${FILES[@]}"}"; do cp -- "$f" "$WORK/in/"; done
printf '%s\n' "$CMD" > "$WORK/in/run.sh"
# The kernel unpacks concatenated cpio archives in order: the guest plus /in.
(cd "$WORK" && "$BUSYBOX" find in | "$BUSYBOX" cpio -o -H newc 2>/dev/null) > "$WORK/in.cpio"
cat "$INITRD" "$WORK/in.cpio" > "$WORK/initrd"

DISK=()
if [ -n "$OUT" ]; then
  truncate -s "$OUT_SIZE" "$WORK/out.img"
  DISK=(-drive "file=$WORK/out.img,format=raw,if=virtio,cache=unsafe")
fi
CONSOLE_LOG=${CONSOLE:-$WORK/console.log}

# shellcheck disable=SC2086
set +e
timeout --foreground -k 5 "$TIMEOUT" "$QEMU" \
  -accel tcg -cpu max -smp 1 -m 512M -nodefaults -no-reboot -nographic -monitor none \
  -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
  -chardev "socket,id=snd,path=$SOCK" -device "vhost-user-snd-pci,chardev=snd${CONTROLS}" \
  "${DISK[@]+"${DISK[@]}"}" \
  -serial stdio \
  -kernel "$KERNEL" -initrd "$WORK/initrd" \
  -append "console=ttyS0 panic=-1 quiet $APPEND" \
  ${QEMU_EXTRA_ARGS:-} < /dev/null | tee "$CONSOLE_LOG"
QEMU_STATUS=${PIPESTATUS[0]}
set -e
if [ "$QEMU_STATUS" = 124 ] || [ "$QEMU_STATUS" = 137 ]; then
  echo "play.sh: QEMU timed out after ${TIMEOUT}s" >&2
  exit 124
fi
[ "$QEMU_STATUS" = 0 ] || echo "play.sh: QEMU exited with status $QEMU_STATUS" >&2

if [ -n "$OUT" ]; then
  mkdir -p "$OUT"
  if grep -q '^@@E2E out-written' "$CONSOLE_LOG"; then
    tar -xf "$WORK/out.img" -C "$OUT"
  else
    echo "play.sh: the guest did not write /out" >&2
  fi
fi
STATUS=$(tr -d '\r' < "$CONSOLE_LOG" | sed -n 's/^@@E2E status \([0-9]*\)$/\1/p' | tail -n 1)
if [ -z "$STATUS" ]; then
  echo "play.sh: the guest ended without reporting a status" >&2
  exit 125
fi
exit "$STATUS"
