#!/usr/bin/env bash
# Checks the deployment policies: the systemd units (systemd/), their users and directories
# (sysusers.d, tmpfiles.d) and the SELinux module (selinux/).
#
#   scripts/check-policies.sh                  the static checks below (a few seconds)
#   scripts/check-policies.sh --boot           also boots this machine's systemd in a container
#                                              on an overlay of / and runs the units for real
#                                              (root, systemd-container; about 15 s)
#   scripts/check-policies.sh --boot --guest   and there a real QEMU guest plays and records
#                                              through them (tests/e2e; about 40 s more)
#
# Static checks:
#  1. every option in the services' ExecStart= is one the built binaries accept (--help);
#  2. `systemd-analyze verify` of the services and sockets installed into a temporary root
#     together with the built binaries (verify checks that ExecStart= programs exist there); any
#     warning fails;
#  3. sysusers.d and tmpfiles.d files applied to that root (systemd-sysusers, systemd-tmpfiles):
#     every user and group the units name exists, the socket directories get their modes;
#  4. `systemd-analyze security --offline=yes`: prints each unit's exposure, fails if the
#     worker's is above 1.5 or the broker's above 3.0;
#  5. the SELinux module compiles and packages with selinux-policy-dev's Makefile, in a
#     temporary copy of selinux/; its file contexts name the units' programs and directories;
#     if Debian's selinux-policy-default is installed, the module is also installed into a
#     temporary copy of its policy store, which links it against the whole reference policy.
#
# --boot: the sockets are enabled in the overlay and listen from boot; then, in the container:
#  - a member of `vsound` connects to /run/vsound/vm1/vhost-user.sock and holds the connection:
#    the socket starts the worker, whose connection to broker.sock starts the broker;
#  - both services are active, and their main processes (a unit without one fails every check
#    below) run as non-root users with no capabilities, no_new_privs, a seccomp filter and a
#    private network namespace; socket and directory modes; another user cannot connect;
#  - `systemctl restart vsound-broker.service`, then SIGKILL of the broker: it comes back
#    (Restart=always) and the worker keeps running with the same PID;
#  - the VMM disconnects: the worker exits cleanly, the socket listens on, and the next
#    connection starts a new worker; without a VMM none runs;
#  - 200 back-to-back VMM sessions (connect, GET_FEATURES, disconnect; VSOUND_BOOT_CYCLES) are
#    all answered, each by a fresh worker, and the socket stays up (no start or trigger limit).
# --guest: the broker restarts on a wav-backend config; tests/e2e/play.sh, run as the VMM's user
#  inside the container, boots the e2e guest (tests/e2e/build-guest.sh, built on the host first)
#  on the worker socket. The broker is restarted mid-aplay: that aplay must finish, the worker
#  keep its PID and log its reconnection; then the next aplay must arrive bit-exact in the
#  broker's output file, and arecord must return the broker's source file sample for sample.
#
# Binaries: $VSOUND_WORKER_BIN and $VSOUND_BROKER_BIN (the integration test sets them), else
# target/debug/vsound-{worker,broker}, built with `cargo build --workspace --bins` if missing.
#
# Debian packages needed: systemd (systemd-analyze, systemd-sysusers, systemd-tmpfiles),
# selinux-policy-dev (its Makefile; pulls checkpolicy, policycoreutils, m4, make);
# optional: selinux-policy-default (link check), systemd-container (--boot), QEMU 10 and the
# guest packages tests/e2e needs (--guest; the guest cache is $VSOUND_E2E_CACHE, else
# target/e2e-cache).
#
# Idempotent: everything is done in a temporary directory, removed on exit. Exits non-zero on
# any failure.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT_DIR=$(pwd)

WORKER_MAX=1.5
BROKER_MAX=3.0
BOOT=0
GUEST=0
for arg in "$@"; do
  case "$arg" in
    --boot) BOOT=1 ;;
    --guest) BOOT=1 GUEST=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "check-policies: unknown argument $arg" >&2; exit 2 ;;
  esac
done

FAILED=0
fail() { echo "FAIL: $*"; FAILED=1; }
pass() { echo "ok:   $*"; }
need() {
  command -v "$1" >/dev/null 2>&1 || { echo "check-policies: $1 is missing (Debian package: $2)" >&2; exit 1; }
}
need systemd-analyze systemd
need systemd-sysusers systemd
need systemd-tmpfiles systemd
need make make
[ -f /usr/share/selinux/devel/Makefile ] || {
  echo "check-policies: /usr/share/selinux/devel/Makefile is missing (Debian package: selinux-policy-dev)" >&2
  exit 1
}

TMP=$(mktemp -d "${TMPDIR:-/tmp}/vsound-check-policies.XXXXXX")
OVERLAY_MOUNTED=""
SCRATCH_MOUNTED=""
cleanup() {
  if [ -n "$OVERLAY_MOUNTED" ]; then umount "$OVERLAY_MOUNTED" 2>/dev/null || umount -l "$OVERLAY_MOUNTED" || true; fi
  if [ -n "$SCRATCH_MOUNTED" ]; then umount "$SCRATCH_MOUNTED" 2>/dev/null || umount -l "$SCRATCH_MOUNTED" || true; fi
  rm -rf "$TMP"
}
trap cleanup EXIT
# Killed (a test timeout, Ctrl-C): still unmount and remove everything.
trap 'exit 130' INT TERM HUP

SERVICES=(systemd/vsound-broker.service "systemd/vsound-worker@.service")
SOCKETS=(systemd/vsound-broker.socket systemd/vsound-broker-control.socket "systemd/vsound-worker@.socket")
UNITS=("${SERVICES[@]}" "${SOCKETS[@]}")
INSTANCE="vsound-worker@vm1.service"
INSTANCE_SOCKET="vsound-worker@vm1.socket"

# --- the binaries -----------------------------------------------------------------------------
WORKER_BIN=${VSOUND_WORKER_BIN:-$ROOT_DIR/target/debug/vsound-worker}
BROKER_BIN=${VSOUND_BROKER_BIN:-$ROOT_DIR/target/debug/vsound-broker}
# `vsound ctl`, the host command, against the control socket under the real systemd.
LAUNCHER_BIN=${VSOUND_LAUNCHER_BIN:-$ROOT_DIR/target/debug/vsound}
if [ ! -x "$WORKER_BIN" ] || [ ! -x "$BROKER_BIN" ] || [ ! -x "$LAUNCHER_BIN" ]; then
  echo "== building the binaries (cargo build --workspace --bins)"
  cargo build --quiet --workspace --bins
fi
[ -x "$WORKER_BIN" ] || { echo "check-policies: no worker binary at $WORKER_BIN" >&2; exit 1; }
[ -x "$BROKER_BIN" ] || { echo "check-policies: no broker binary at $BROKER_BIN" >&2; exit 1; }
[ -x "$LAUNCHER_BIN" ] || { echo "check-policies: no vsound binary at $LAUNCHER_BIN" >&2; exit 1; }

# The ExecStart= line of a unit file (one line, no continuation in ours).
exec_start() { sed -n 's/^ExecStart=//p' "$1"; }

# --- 1. ExecStart options against the binaries ----------------------------------------------
echo "== 1. ExecStart= options are accepted by the binaries"
for unit in "${SERVICES[@]}"; do
  line=$(exec_start "$unit")
  [ -n "$line" ] || { fail "$unit has no ExecStart="; continue; }
  prog=${line%% *}
  case "$prog" in
    /usr/bin/vsound-worker) bin=$WORKER_BIN ;;
    /usr/bin/vsound-broker) bin=$BROKER_BIN ;;
    *) fail "$unit: unexpected program $prog"; continue ;;
  esac
  help=$("$bin" --help)
  for opt in $(grep -o -- '--[a-z][a-z-]*' <<<"$line" | sort -u); do
    if grep -q -- "^ *$opt " <<<"$help"; then
      pass "$unit: $prog accepts $opt"
    else
      fail "$unit: $prog does not accept $opt"
    fi
  done
  if grep -q -- '--sandbox strict' <<<"$line"; then
    pass "$unit: runs with --sandbox strict"
  else
    fail "$unit: ExecStart= must pass --sandbox strict"
  fi
done

# --- 1b. SystemCallFilter= against the binaries' own seccomp policies ---------------------------
echo "== 1b. each unit's SystemCallFilter= allows every call of its binary's seccomp policy"
need python3 python3
syscall_check() {  # unit policy.json
  python3 - "$1" "$2" <<'PY'
import json, re, subprocess, sys

unit, policy = sys.argv[1], sys.argv[2]
cache = {}
def expand(name):
    """A call, or a systemd group expanded recursively (systemd-analyze syscall-filter)."""
    if not name.startswith("@"):
        return {name}
    if name not in cache:
        out = subprocess.run(["systemd-analyze", "syscall-filter", "--no-pager", name],
                             capture_output=True, text=True, check=True).stdout
        calls = set()
        for line in out.splitlines()[1:]:
            item = line.strip()
            if item and not item.startswith("#"):
                calls |= expand(item)
        cache[name] = calls
    return cache[name]

lines = [l.split("=", 1)[1].strip() for l in open(unit)
         if re.match(r"SystemCallFilter=", l)]
allowed = None
for line in lines:
    deny = line.startswith("~")
    names = set()
    for item in line.lstrip("~").split():
        names |= expand(item)
    if allowed is None:
        if deny:
            sys.exit(f"{unit}: the first SystemCallFilter= is a deny-list")
        allowed = set(names)
    elif deny:
        allowed -= names
    else:
        allowed |= names
if allowed is None:
    sys.exit(f"{unit}: no SystemCallFilter=")
needed = set()
for filt in json.load(open(policy)).values():
    needed |= {rule["syscall"] for rule in filt["filter"]}
# And what src/process/sandbox.rs calls before its own policy is in force.
needed |= {"prctl", "unshare", "capget", "capset", "seccomp",
           "landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self"}
missing = sorted(needed - allowed)
if missing:
    sys.exit(f"{unit}: SystemCallFilter= refuses {', '.join(missing)} (needed by {policy} or src/process/sandbox.rs)")
print(f"{unit}: {len(needed)} calls of {policy} and src/process/sandbox.rs allowed ({len(allowed)} in the unit's allow-list)")
PY
}
for pair in "systemd/vsound-worker@.service:policies/worker.json" "systemd/vsound-broker.service:policies/broker.json"; do
  unit=${pair%%:*} policy=${pair#*:}
  if out=$(syscall_check "$unit" "$policy" 2>&1); then pass "$out"; else fail "$out"; fi
done

# --- 2. systemd-analyze verify in a temporary root --------------------------------------------
echo "== 2. systemd-analyze verify (units and binaries installed into a temporary root)"
ROOTFS=$TMP/root
mkdir -p "$ROOTFS/etc/systemd/system" "$ROOTFS/usr/bin" "$ROOTFS/usr/lib/systemd" \
         "$ROOTFS/usr/lib/sysusers.d" "$ROOTFS/usr/lib/tmpfiles.d" "$ROOTFS/etc"
ln -s usr/bin "$ROOTFS/bin"
# The host's own units (sysinit.target, sockets.target, ...) that ours depend on.
cp -a /usr/lib/systemd/system "$ROOTFS/usr/lib/systemd/"
install -m 0755 "$WORKER_BIN" "$ROOTFS/usr/bin/vsound-worker"
install -m 0755 "$BROKER_BIN" "$ROOTFS/usr/bin/vsound-broker"
install -m 0644 "${UNITS[@]}" "$ROOTFS/etc/systemd/system/"
install -m 0644 systemd/sysusers.d/vsound.conf "$ROOTFS/usr/lib/sysusers.d/vsound.conf"
install -m 0644 systemd/tmpfiles.d/vsound.conf "$ROOTFS/usr/lib/tmpfiles.d/vsound.conf"
# systemd-analyze verify exits 0 on unknown keys and unparsable values: any output fails.
VERIFY=(vsound-broker.socket vsound-broker-control.socket vsound-broker.service "$INSTANCE_SOCKET" "$INSTANCE")
if out=$(systemd-analyze verify --root="$ROOTFS" "${VERIFY[@]}" 2>&1) && [ -z "$out" ]; then
  pass "systemd-analyze verify ${VERIFY[*]}: no errors, no warnings"
else
  fail "systemd-analyze verify:"; echo "$out" | sed 's/^/    /'
fi

# --- 3. sysusers.d and tmpfiles.d --------------------------------------------------------------
echo "== 3. sysusers.d and tmpfiles.d applied to the temporary root"
touch "$ROOTFS/etc/passwd" "$ROOTFS/etc/group" "$ROOTFS/etc/shadow" "$ROOTFS/etc/gshadow"
if out=$(systemd-sysusers --root="$ROOTFS" 2>&1); then
  echo "$out" | sed 's/^/    /'
  for name in vsound vsound-broker vsound-admin; do
    grep -q "^$name:" "$ROOTFS/etc/group" && pass "sysusers: group $name" || fail "sysusers: no group $name"
  done
  grep -q "^vsound-broker:" "$ROOTFS/etc/passwd" && pass "sysusers: user vsound-broker" || fail "sysusers: no user vsound-broker"
else
  fail "systemd-sysusers:"; echo "$out" | sed 's/^/    /'
fi
# Every static user and group the units name must come from sysusers.d or the base system.
for unit in "${UNITS[@]}"; do
  for key in User Group SupplementaryGroups SocketUser SocketGroup; do
    for name in $(sed -n "s/^$key=//p" "$unit"); do
      case "$name" in *%*) continue ;; esac   # the worker's per-instance dynamic user
      if grep -q "^$name:" "$ROOTFS/etc/group" "$ROOTFS/etc/passwd" || getent group "$name" >/dev/null; then
        pass "$unit: $key=$name exists"
      else
        fail "$unit: $key=$name is created by nothing"
      fi
    done
  done
done
if out=$(systemd-tmpfiles --root="$ROOTFS" --create 2>&1) \
   && [ -f "$ROOTFS/etc/vsound/vsound.toml" ]; then
  pass "tmpfiles: /etc/vsound/vsound.toml created"
else
  fail "systemd-tmpfiles:"; echo "$out" | sed 's/^/    /'
fi
# The sockets' directories: root's (no service or VMM can replace a socket), traversable by the
# socket's group only.
for sock in "${SOCKETS[@]}"; do
  listen=$(sed -n 's/^Listen[A-Za-z]*=//p' "$sock")
  group=$(sed -n 's/^SocketGroup=//p' "$sock")
  top=/run/$(cut -d/ -f3 <<<"$listen")
  want="750 root $group"
  # Group names from the temporary root's /etc/group (stat would use the host's).
  got=$(stat -c '%a %U %g' "$ROOTFS$top" 2>&1 || true)
  gid=${got##* }
  got="${got% *} $(awk -F: -v g="$gid" '$3 == g { print $1 }' "$ROOTFS/etc/group")"
  [ "$got" = "$want" ] && pass "tmpfiles: $top is $want ($sock listens on $listen)" \
    || fail "tmpfiles: $top is '$got', want '$want' ($sock)"
done
for unit in "${SERVICES[@]}"; do
  conf=$(exec_start "$unit" | grep -o -- '--config [^ ]*' | cut -d' ' -f2)
  [ -f "$ROOTFS$conf" ] && pass "$unit: --config $conf is provided by tmpfiles.d" \
    || fail "$unit: --config $conf is provided by nothing"
done

# --- 4. systemd-analyze security ---------------------------------------------------------------
echo "== 4. systemd-analyze security --offline=yes"
check_exposure() {  # unit max
  local out level
  out=$(systemd-analyze security --offline=yes --root="$ROOTFS" --no-pager "$1" 2>&1) || true
  level=$(sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p' <<<"$out")
  if [ -z "$level" ]; then
    fail "systemd-analyze security $1 gave no exposure:"; echo "$out" | sed 's/^/    /'
    return
  fi
  echo "exposure $1: $level (maximum $2)"
  grep '✗' <<<"$out" | sed 's/^/    /' || true
  if awk -v l="$level" -v m="$2" 'BEGIN { exit !(l <= m) }'; then
    pass "$1 exposure $level <= $2"
  else
    fail "$1 exposure $level > $2"
  fi
}
check_exposure "$INSTANCE" "$WORKER_MAX"
check_exposure vsound-broker.service "$BROKER_MAX"

# --- 5. SELinux module ----------------------------------------------------------------------------
echo "== 5. SELinux module (selinux-policy-dev Makefile)"
SEL=$TMP/selinux
cp -r selinux "$SEL"
if out=$(make -C "$SEL" -f /usr/share/selinux/devel/Makefile vsound.pp 2>&1) && [ -s "$SEL/vsound.pp" ]; then
  echo "$out" | sed 's/^/    /'
  pass "selinux: vsound.pp compiled and packaged ($(stat -c %s "$SEL/vsound.pp") bytes)"
else
  fail "selinux: make failed:"; echo "$out" | sed 's/^/    /'
fi
# The file contexts label what the units run and create.
for path in /usr/bin/vsound-worker /usr/bin/vsound-broker; do
  grep -q "^${path}[[:space:]]" selinux/vsound.fc && pass "selinux: vsound.fc labels $path" \
    || fail "selinux: vsound.fc does not label $path"
done
for unit in "${UNITS[@]}"; do
  for key in RuntimeDirectory StateDirectory ListenStream ListenSequentialPacket; do
    for dir in $(sed -n "s/^$key=//p" "$unit"); do
      case "$key" in
        RuntimeDirectory) path=/run/${dir%%/*} ;;
        StateDirectory) path=/var/lib/${dir%%/*} ;;
        *) path=/run/$(cut -d/ -f3 <<<"$dir") ;;
      esac
      grep -q "^${path}(/\.\*)?[[:space:]]" selinux/vsound.fc && pass "selinux: vsound.fc labels $path ($unit $key=)" \
        || fail "selinux: vsound.fc does not label $path ($unit $key=)"
    done
  done
done
conf_dir=/etc/vsound
grep -q "^${conf_dir}(/\.\*)?[[:space:]]" selinux/vsound.fc && pass "selinux: vsound.fc labels $conf_dir" \
  || fail "selinux: vsound.fc does not label $conf_dir"
if [ -s "$SEL/vsound.pp" ] && [ -d /var/lib/selinux/default ] && command -v semodule >/dev/null; then
  STORE=$TMP/selstore
  mkdir -p "$STORE/var/lib" "$STORE/etc"
  cp -a /var/lib/selinux "$STORE/var/lib/"
  cp -a /etc/selinux "$STORE/etc/"
  if out=$(semodule -n -p "$STORE" -i "$SEL/vsound.pp" 2>&1); then
    pass "selinux: vsound.pp links into Debian's reference policy (temporary store copy)"
  else
    fail "selinux: semodule -i into a copy of the policy store:"; echo "$out" | sed 's/^/    /'
  fi
else
  echo "skip: link check (install selinux-policy-default to link the module against the full policy)"
fi

# --- optional: boot ---------------------------------------------------------------------------
# The WAV files of --guest: known signals in, the data chunks compared out (python3's wave module
# cannot read every header hound writes, so the chunks are found by hand).
wav_tool() {
  python3 - "$@" <<'PY'
import random, struct, sys

RATE, FRAME = 48000, 4  # S16 stereo

def signal(seconds, seed):
    """Non-zero in every sample, so that silence is never mistaken for it."""
    data = bytearray(random.Random(seed).randbytes(int(seconds * RATE) * FRAME))
    data[0::2] = bytes(b | 1 for b in data[0::2])
    return bytes(data)

def write(path, data):
    fmt = struct.pack("<HHIIHH", 1, 2, RATE, RATE * FRAME, FRAME, 16)
    with open(path, "wb") as f:
        f.write(b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE")
        f.write(b"fmt " + struct.pack("<I", len(fmt)) + fmt)
        f.write(b"data" + struct.pack("<I", len(data)) + data)

def data(path):
    raw = open(path, "rb").read()
    assert raw[:4] == b"RIFF" and raw[8:12] == b"WAVE", f"{path}: not a WAV file"
    at, fmt = 12, None
    while at + 8 <= len(raw):
        tag, size = raw[at:at + 4], struct.unpack("<I", raw[at + 4:at + 8])[0]
        body = raw[at + 8:at + 8 + size]
        if tag == b"fmt ":
            fmt = struct.unpack("<HHIIHH", body[:16])
        if tag == b"data":
            channels, rate, bits = fmt[1], fmt[2], fmt[5]
            assert (channels, rate, bits) == (2, RATE, 16), f"{path}: {channels} ch {rate} Hz {bits} bit"
            return body
        at += 8 + size + (size & 1)
    sys.exit(f"{path}: no data chunk")

cmd = sys.argv[1]
if cmd == "make":  # make PATH SECONDS SEED
    write(sys.argv[2], signal(float(sys.argv[3]), int(sys.argv[4])))
elif cmd == "played":  # played SENT ARRIVED: ARRIVED is SENT, then at most silence
    sent, got = data(sys.argv[2]), data(sys.argv[3])
    if len(got) < len(sent):
        sys.exit(f"the broker's file has {len(got) // FRAME} frames, the guest played {len(sent) // FRAME}")
    if got[:len(sent)] != sent:
        first = next(i for i in range(0, len(sent), FRAME) if got[i:i + FRAME] != sent[i:i + FRAME])
        sys.exit(f"the broker's file differs from what the guest played at frame {first // FRAME} of {len(sent) // FRAME}")
    if got[len(sent):].strip(b"\0"):
        sys.exit("the broker's file has other samples after the guest's")
    print(f"{len(sent) // FRAME} frames bit-exact, then {(len(got) - len(sent)) // FRAME} frames of silence (the last period's padding)")
elif cmd == "recorded":  # recorded SOURCE RECORDED: equal
    source, got = data(sys.argv[2]), data(sys.argv[3])
    if got != source:
        same = next((i for i in range(0, min(len(got), len(source)), FRAME) if got[i:i + FRAME] != source[i:i + FRAME]), min(len(got), len(source)))
        sys.exit(f"the guest recorded {len(got) // FRAME} frames, the source has {len(source) // FRAME}; equal for the first {same // FRAME}")
    print(f"{len(got) // FRAME} frames, equal to the source")
PY
}

if [ "$BOOT" = 1 ]; then
  echo "== boot: this machine's systemd in a container on an overlay of /, the units started by their sockets"
  need systemd-nspawn systemd-container
  need setpriv util-linux
  [ "$(id -u)" -eq 0 ] || { fail "--boot needs root"; exit 1; }
  GUEST_SECONDS=2
  CYCLES=${VSOUND_BOOT_CYCLES:-200}
  if [ "$GUEST" = 1 ]; then
    # Built (or found in the cache) on the host: the container sees the same path.
    E2E_CACHE=${VSOUND_E2E_CACHE:-$ROOT_DIR/target/e2e-cache}
    if ! guest_out=$(tests/e2e/build-guest.sh "$E2E_CACHE" 2>&1); then
      fail "guest: tests/e2e/build-guest.sh failed:"; echo "$guest_out" | sed 's/^/    /'
      exit 1
    fi
    E2E_CACHE=$(cd "$E2E_CACHE" && pwd)
  fi
  # The overlay's writable layer on a tmpfs: an upper directory cannot be on an overlayfs (as
  # /tmp is where / itself is one, e.g. in a container), and nothing is left on disk.
  mkdir -p "$TMP/ov"
  mount -t tmpfs -o mode=0700 tmpfs "$TMP/ov"
  SCRATCH_MOUNTED=$TMP/ov
  mkdir -p "$TMP/ov/up" "$TMP/ov/work" "$TMP/ov/root"
  mount -t overlay overlay -o "lowerdir=/,upperdir=$TMP/ov/up,workdir=$TMP/ov/work" "$TMP/ov/root"
  OVERLAY_MOUNTED=$TMP/ov/root
  R=$TMP/ov/root
  install -m 0755 "$WORKER_BIN" "$R/usr/bin/vsound-worker"
  install -m 0755 "$BROKER_BIN" "$R/usr/bin/vsound-broker"
  install -m 0755 "$LAUNCHER_BIN" "$R/usr/bin/vsound"
  rm -f "$R"/etc/systemd/system/vsound-*
  install -m 0644 "${UNITS[@]}" "$R/etc/systemd/system/"
  install -m 0644 systemd/sysusers.d/vsound.conf "$R/usr/lib/sysusers.d/vsound.conf"
  install -m 0644 systemd/tmpfiles.d/vsound.conf "$R/usr/lib/tmpfiles.d/vsound.conf"
  # As a package would: the sockets listen from boot ([Install] WantedBy=sockets.target).
  if out=$(systemctl --root="$R" enable vsound-broker.socket vsound-broker-control.socket "$INSTANCE_SOCKET" 2>&1); then
    pass "boot: systemctl enable vsound-broker.socket vsound-broker-control.socket $INSTANCE_SOCKET"
  else
    fail "boot: systemctl enable:"; echo "$out" | sed 's/^/    /'
  fi
  # The units first run on the default configuration (tmpfiles.d's empty file: the `auto`
  # backend probes PipeWire and ALSA under the unit's identity); the guest's comes later.
  rm -rf "$R/vsound-guest" "$R/var/lib/vsound" "$R/etc/vsound"
  if [ "$GUEST" = 1 ]; then
    mkdir -p "$R/vsound-guest" "$R/var/lib/vsound"
    wav_tool make "$R/vsound-guest/long.wav" 4 30
    wav_tool make "$R/vsound-guest/play.wav" "$GUEST_SECONDS" 31
    wav_tool make "$R/var/lib/vsound/source.wav" "$GUEST_SECONDS" 32
    cat > "$R/vsound-guest/vsound.toml" <<'EOF'
# --guest: the broker plays into and records from files of its StateDirectory=.
[[streams]]
name = "media"
direction = "output"
backend = "wav"
formats = ["S16"]
rates = [48000]
wav_path = "/var/lib/vsound/played.wav"
[[streams]]
name = "mic"
direction = "input"
backend = "wav"
formats = ["S16"]
rates = [48000]
wav_path = "/var/lib/vsound/source.wav"
EOF
  fi
  cat > "$R/etc/systemd/system/vsound-check.target" <<'EOF'
[Unit]
Description=vsound policy check
Requires=basic.target vsound-check.service
After=basic.target
EOF
  cat > "$R/etc/systemd/system/vsound-check.service" <<'EOF'
[Unit]
Description=vsound policy check runner
After=basic.target
[Service]
Type=oneshot
ExecStart=/bin/bash /vsound-check.sh
ExecStopPost=/bin/systemctl --no-block poweroff
# append: the ExecStopPost= opens it again, and must not write over the results.
StandardOutput=append:/vsound-check.out
StandardError=inherit
EOF
  {
    # tests/e2e and the guest cache are bound in read-only (they may be on another mount than /).
    printf 'GUEST=%q E2E_CACHE=/vsound-e2e-cache E2E_DIR=/vsound-e2e GUEST_SECONDS=%q CYCLES=%q\n' "$GUEST" "$GUEST_SECONDS" "$CYCLES"
    cat <<'EOF'
B=vsound-broker.service W=vsound-worker@vm1.service
BS=vsound-broker.socket WS=vsound-worker@vm1.socket
SOCK=/run/vsound/vm1/vhost-user.sock
useradd -r -M -G vsound vsound-vmm
# Runs a command as the VMM's user; setpriv execs it, so $! of "${AS_VMM[@]}" ... & is its PID.
AS_VMM=(setpriv --reuid=vsound-vmm --regid=vsound-vmm --init-groups --reset-env --)
wait_state() {  # UNIT STATE SECONDS
  local n=0
  until [ "$(systemctl is-active "$1")" = "$2" ]; do
    n=$((n + 1)); [ $n -le $(($3 * 10)) ] || return 1; sleep 0.1
  done
}
mainpid() { systemctl show -p MainPID --value "$1"; }
report() {  # TAG UNIT: its main process's credentials, or its absence
  local pid
  pid=$(mainpid "$2")
  echo "$1 state $2 $(systemctl is-active "$2")"
  echo "$1 mainpid $2 ${pid:-none}"
  [ -n "$pid" ] && [ "$pid" != 0 ] && [ -r "/proc/$pid/status" ] || return 0
  grep -E '^(Uid|Gid|Groups|CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' "/proc/$pid/status" | sed "s/^/$1 status $2 /"
  [ "$(readlink "/proc/$pid/ns/net")" != "$(readlink /proc/1/ns/net)" ] && echo "$1 netns $2 private"
}
# A VMM stand-in: connects as vsound-vmm and holds the connection until killed.
hold='import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
print("connected", flush=True)
time.sleep(600)'
connect='import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])'
# N back-to-back VMM sessions: connect, GET_FEATURES, answer read, disconnect; each is served by
# a fresh worker that the socket starts.
cycles='import socket, struct, sys, time
path, count = sys.argv[1], int(sys.argv[2])
answered, started = 0, time.monotonic()
for i in range(count):
    try:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(path)
        s.sendall(struct.pack("<III", 1, 1, 0))
        reply = b""
        while len(reply) < 20:
            chunk = s.recv(20 - len(reply))
            if not chunk:
                break
            reply += chunk
        s.close()
        if len(reply) == 20 and struct.unpack("<III", reply[:12]) == (1, 5, 8):
            answered += 1
        else:
            print(f"cycle {i}: reply {reply!r}", file=sys.stderr)
    except OSError as e:
        print(f"cycle {i}: {e}", file=sys.stderr)
print(f"{answered} of {count} in {time.monotonic() - started:.1f} s")'

for u in $BS vsound-broker-control.socket $WS; do echo "listening $u $(systemctl is-active $u)"; done
echo "before $W $(systemctl is-active $W) $B $(systemctl is-active $B)"
echo "socket $(stat -c '%a %U %G' $SOCK) $(stat -c '%a %U %G' /run/vsound-broker/broker.sock)"
echo "dirs $(stat -c '%a %U %G' /run/vsound /run/vsound/vm1 /run/vsound-broker | tr '\n' ' ')"
"${AS_VMM[@]}" python3 -c "$connect" /run/vsound-broker/broker.sock 2>/dev/null && echo "vmm reaches broker.sock" || echo "vmm kept from broker.sock"
setpriv --reuid=nobody --regid=nogroup --clear-groups python3 -c "$connect" $SOCK 2>/dev/null && echo "nobody connected" || echo "nobody denied"

# The VMM connects: the socket starts the worker, the worker's broker connection the broker.
"${AS_VMM[@]}" python3 -c "$hold" $SOCK > /tmp/vmm1.out 2>&1 &
vmm=$!
wait_state $W active 10; wait_state $B active 10
sleep 0.5
echo "vmm1 $(cat /tmp/vmm1.out)"
report up $B; report up $W
worker=$(mainpid $W)
# Still the same processes a moment later (a library thread killed by seccomp takes a while).
sleep 2
for u in $B $W; do echo "stable $u $(systemctl is-active $u) $(mainpid $u) restarts $(systemctl show -p NRestarts --value $u)"; done
# The host command through the control socket systemd passed the broker with its own.
CTL=/run/vsound-admin/control.sock
echo "ctl-rows $(vsound ctl --socket $CTL list 2>/tmp/ctl.err | grep -c '^vm1 ')"
sed 's/^/ctl-error /' /tmp/ctl.err | head -n 3
echo "ctl-mode $(stat -c '%a %U %G' $CTL /run/vsound-admin | tr '\n' ' ')"
"${AS_VMM[@]}" vsound ctl --socket $CTL list >/dev/null 2>&1 && echo "ctl vmm allowed" || echo "ctl vmm refused"
phases() {  # the rest only means something with both running (and a failure stays short)

# The broker restarts, then is killed: it comes back, the worker stays.
systemctl restart $B
wait_state $B active 10
broker=$(mainpid $B)
echo "restarted $B $(systemctl is-active $B) $W $(systemctl is-active $W) $(mainpid $W) was $worker"
systemctl kill -s KILL $B
n=0
while [ "$(mainpid $B)" = "$broker" ] || [ "$(mainpid $B)" = 0 ] || [ "$(systemctl is-active $B)" != active ]; do
  n=$((n + 1)); [ $n -le 100 ] && sleep 0.1 || break
done
echo "killed $B $(systemctl is-active $B) restarts $(systemctl show -p NRestarts --value $B) $W $(systemctl is-active $W) $(mainpid $W) was $worker"
report again $B; report again $W

# The VMM disconnects: the worker exits; the socket listens on and starts the next one.
kill $vmm; wait $vmm 2>/dev/null
wait_state $W inactive 10
echo "disconnected $W $(systemctl is-active $W) result $(systemctl show -p Result --value $W) $WS $(systemctl is-active $WS)"
"${AS_VMM[@]}" python3 -c "$hold" $SOCK > /tmp/vmm2.out 2>&1 &
vmm=$!
wait_state $W active 10
sleep 0.5
echo "second $W $(systemctl is-active $W) $(mainpid $W) was $worker"
kill $vmm; wait $vmm 2>/dev/null
wait_state $W inactive 10
sleep 1
echo "idle $W $(systemctl is-active $W) $WS $(systemctl is-active $WS)"
echo "cycles $("${AS_VMM[@]}" python3 -c "$cycles" $SOCK $CYCLES 2>/tmp/cycles.err) $WS $(systemctl is-active $WS)"
sed 's/^/cycles-error /' /tmp/cycles.err | head -n 5
wait_state $W inactive 10

if [ "$GUEST" = 1 ]; then
  # The e2e guest as the VMM's user; its guest cache is the host's, through links in a
  # directory that user may write (build-guest.sh takes a lock and may re-resolve there).
  G=/vsound-guest
  # The guest's configuration, read by the restarted broker and the guest's fresh worker.
  cp $G/vsound.toml /etc/vsound/vsound.toml
  systemctl restart $B
  wait_state $B active 10
  echo "guest-config $B $(systemctl is-active $B)"
  mkdir -p $G/cache/debs $G/tmp $G/out
  ln -s "$E2E_CACHE"/debs/*.deb $G/cache/debs/
  ln -s "$E2E_CACHE"/guest-* $G/cache/
  cp "$E2E_CACHE"/resolved-* $G/cache/ 2>/dev/null
  chown -R vsound-vmm $G
  # The guest plays long.wav, during which the broker restarts under it; that aplay must
  # finish, and the next one (play.wav) and the recording go through the new broker.
  started=$(date +%s%N)
  "${AS_VMM[@]}" env PATH=/usr/sbin:/usr/bin:/sbin:/bin TMPDIR=$G/tmp "$E2E_DIR/play.sh" --socket $SOCK \
    --file $G/long.wav --file $G/play.wav --out $G/out --cache $G/cache --timeout 150 -- \
    "echo @@E2E long-start; aplay -D hw:0,0 long.wav || exit 11; echo @@E2E long-end
     aplay -D hw:0,0 play.wav || exit 12
     arecord -D hw:0,0 -f S16_LE -r 48000 -c 2 -d $GUEST_SECONDS /out/rec.wav || exit 13" \
    > $G/console.log 2>&1 &
  guest=$!
  n=0
  until grep -q '^@@E2E long-start' $G/console.log; do
    n=$((n + 1)); [ $n -le 1200 ] && kill -0 $guest 2>/dev/null || break; sleep 0.1
  done
  sleep 1
  worker=$(mainpid $W)
  systemctl restart $B
  wait_state $B active 10
  echo "mid-play restart $B $(systemctl is-active $B) $W $(systemctl is-active $W) $(mainpid $W) was $worker"
  wait $guest
  status=$?
  echo "guest status $status seconds $(( ($(date +%s%N) - started) / 1000000 ))"
  journalctl --no-pager -o cat _PID="$worker" | grep -o 'broker back after a [0-9]* ms gap.*' | sed 's/^/reconnect /'
  wait_state $W inactive 10
  echo "guest-after $W $(systemctl is-active $W) result $(systemctl show -p Result --value $W) $B $(systemctl is-active $B)"
  sed 's/^/console /' $G/console.log
fi
}
if [ "$(systemctl is-active $W)" = active ] && [ "$(systemctl is-active $B)" = active ]; then
  phases
else
  echo "skipped: the restart, reconnect and guest checks (a unit did not start)"
fi
journalctl --no-pager -o cat -u $B -u $W -u $BS -u $WS | sed 's/^/log /'
EOF
  } > "$R/vsound-check.sh"
  # nspawn 252's own seccomp filter refuses the Landlock calls: let them through.
  NSPAWN_TIMEOUT=120
  [ "$GUEST" = 1 ] && NSPAWN_TIMEOUT=300
  BINDS=()
  [ "$GUEST" = 1 ] && BINDS=(--bind-ro="$ROOT_DIR/tests/e2e:/vsound-e2e" --bind-ro="$E2E_CACHE:/vsound-e2e-cache")
  boot_started=$(date +%s)
  timeout "$NSPAWN_TIMEOUT" systemd-nspawn -q -D "$R" --register=no --keep-unit --link-journal=no \
    "${BINDS[@]+"${BINDS[@]}"}" --console=pipe --system-call-filter='landlock_create_ruleset landlock_add_rule landlock_restrict_self' \
    -b -- systemd.unit=vsound-check.target >"$TMP/nspawn.log" 2>&1 || true
  echo "boot: container ran $(( $(date +%s) - boot_started )) s"
  OUT=$R/vsound-check.out
  if [ ! -s "$OUT" ]; then
    fail "boot: no result"; sed 's/^/    /' "$TMP/nspawn.log"
  else
    grep -v '^log \|^console ' "$OUT" | sed 's/^/    /'
    # Each distinct start-up and error line once (timestamps dropped).
    sed -n 's/^log \(\[[^]]*\] \)\{0,1\}//p' "$OUT" | grep 'sandbox:\|ERROR\|WARN\|error\|status=\|code=' \
      | awk '!seen[$0]++' | head -n 40 | sed 's/^/    /'
    # (Not finding a line is a result here, not an error of this script: || true under set -e.)
    line() { grep -F -- "$1" "$OUT" | head -n 1 || true; }
    has() { grep -qxF -- "$1" "$OUT"; }
    # The main process of UNIT at TAG: present, confined. Nothing passes without it.
    check_main() {  # TAG UNIT WHAT
      local tag=$1 u=$2 what=$3 pid caps
      has "$tag state $u active" && pass "boot: $u active ($what)" || fail "boot: $u not active ($what): $(line "$tag state $u ")"
      pid=$(sed -n "s/^$tag mainpid ${u//./\\.} //p" "$OUT" | head -n 1)
      if ! [ "${pid:-0}" -gt 0 ] 2>/dev/null; then
        fail "boot: $u has no main process ($what: MainPID ${pid:-missing}): its confinement cannot be checked"
        return
      fi
      if ! grep -qF "$tag status $u Uid:" "$OUT"; then
        fail "boot: $u: no /proc/$pid/status ($what): the main process is gone"
        return
      fi
      field() { sed -n "s/^$tag status ${u//./\\.} $1:[[:space:]]*//p" "$OUT"; }
      [ "$(field Seccomp)" = 2 ] && pass "boot: $u seccomp filter mode ($what)" || fail "boot: $u Seccomp: $(field Seccomp) ($what)"
      [ "$(field NoNewPrivs)" = 1 ] && pass "boot: $u no_new_privs ($what)" || fail "boot: $u NoNewPrivs: $(field NoNewPrivs) ($what)"
      caps=$(grep -cE "^$tag status ${u//./\\.} Cap(Inh|Prm|Eff|Bnd|Amb):[[:space:]]*0+$" "$OUT" || true)
      [ "$caps" = 5 ] && pass "boot: $u no capabilities ($what)" \
        || fail "boot: $u holds capabilities ($what): $(grep -F "$tag status $u Cap" "$OUT" | tr '\n' ' ')"
      if field Uid | awk '{ for (i = 1; i <= 4; i++) if ($i == "" || $i == 0) exit 1 }'; then
        pass "boot: $u not root (uid $(field Uid | cut -f1)) ($what)"
      else
        fail "boot: $u runs as root: Uid $(field Uid) ($what)"
      fi
      has "$tag netns $u private" && pass "boot: $u private network namespace ($what)" || fail "boot: $u host network ($what)"
    }
    B=vsound-broker.service W=$INSTANCE
    for u in vsound-broker.socket vsound-broker-control.socket "$INSTANCE_SOCKET"; do
      has "listening $u active" && pass "boot: $u listening from boot" || fail "boot: $u not listening: $(line "listening $u")"
    done
    grep -q "^before $W inactive $B inactive$" "$OUT" && pass "boot: nothing started before a VMM connects" \
      || fail "boot: before any connection: $(line before)"
    grep -q '^socket 660 root vsound 660 root vsound-broker$' "$OUT" \
      && pass "boot: sockets 0660 root:vsound and root:vsound-broker" || fail "boot: socket modes: $(line socket)"
    grep -q '^dirs 750 root vsound 755 root root 750 root vsound-broker $' "$OUT" \
      && pass "boot: /run/vsound 0750 root:vsound, /run/vsound/vm1 0755 root, /run/vsound-broker 0750 root:vsound-broker" \
      || fail "boot: directory modes: $(line dirs)"
    has "vmm kept from broker.sock" && pass "boot: the VMM's user cannot reach the broker's socket" || fail "boot: the VMM's user reaches broker.sock"
    has "nobody denied" && pass "boot: another user cannot connect to the worker socket" || fail "boot: another user connects"
    has "vmm1 connected" && pass "boot: a member of vsound connects to the worker socket" || fail "boot: the VMM's user cannot connect: $(line vmm1)"
    check_main up "$B" "started by its socket"
    check_main up "$W" "started by its socket"
    # Real-time scheduling (SECURITY.md): the broker asks for its timer thread and logs what it
    # got under the unit's LimitRTPRIO=; a host may still refuse (its RT group throttling, or a
    # container without the capability to raise the limit), which the log must say.
    rt=$(grep -m1 '^log .*broker: .*timer thread' "$OUT" | sed 's/^log \(\[[^]]*\] \)\{0,1\}//' || true)
    case "$rt" in
      *"runs at real-time priority 83"*) pass "boot: the broker's timer thread got real-time priority 83 (${rt})" ;;
      *"refused for the timer thread"*) pass "boot: the broker asked for real-time priority and logged the refusal (${rt})" ;;
      *) fail "boot: the broker logged no real-time request for its timer thread" ;;
    esac
    # The broker sees the worker as its own uid (SO_PEERCRED, as the broker's user namespace
    # reports it): a namespace that maps only the broker's uid (PrivateUsers=) would show every
    # worker as nobody, and the per-uid limits and the VM names' binding would take all VMs for one.
    wuid=$(sed -n "s/^up status ${W//./\\.} Uid:[[:space:]]*\([0-9]*\).*/\1/p" "$OUT" | head -n 1)
    seen=$(sed -n 's/.*broker: vm vm1 connected (connection [0-9]*, uid \([0-9]*\)).*/\1/p' "$OUT" | head -n 1)
    if [ -n "$wuid" ] && [ "$seen" = "$wuid" ]; then
      pass "boot: the broker sees vm1's worker (--vm %i) as its own uid $wuid"
    else
      fail "boot: the broker sees vm1's worker as uid ${seen:-(no 'vm vm1 connected' line)}; it runs as ${wuid:-?}"
    fi
    worker=$(sed -n "s/^up mainpid ${W//./\\.} //p" "$OUT" | head -n 1)
    for u in "$B" "$W"; do
      first=$(sed -n "s/^up mainpid ${u//./\\.} //p" "$OUT" | head -n 1)
      has "stable $u active ${first:-none} restarts 0" && pass "boot: $u still the same process 2 s later" \
        || fail "boot: $u did not stay up: $(line "stable $u")"
    done
    # The default config's two streams, each a line of `vsound ctl list` for vm1.
    has "ctl-rows 2" && pass "boot: vsound ctl lists vm1's streams through the activated control socket" \
      || fail "boot: vsound ctl: $(line "ctl-rows") $(grep '^ctl-error ' "$OUT" | tr '\n' ' ')"
    has "ctl-mode 660 root vsound-admin 750 root vsound-admin " \
      && pass "boot: control.sock 0660 root:vsound-admin in /run/vsound-admin 0750" \
      || fail "boot: control socket modes: $(line "ctl-mode")"
    has "ctl vmm refused" && pass "boot: the VMM's user cannot use the host command" \
      || fail "boot: the VMM's user reached the control socket"
    restarted=$(line "restarted $B")
    [[ $restarted == "restarted $B active $W active $worker was $worker" ]] \
      && pass "boot: systemctl restart $B: the broker is back, the worker runs on (same PID)" \
      || fail "boot: after systemctl restart $B: $restarted"
    killed=$(line "killed $B")
    [[ $killed =~ ^killed\ $B\ active\ restarts\ [1-9][0-9]*\ $W\ active\ $worker\ was\ $worker$ ]] \
      && pass "boot: SIGKILL of the broker: Restart=always brings it back, the worker runs on (same PID)" \
      || fail "boot: after SIGKILL of the broker: $killed"
    check_main again "$B" "after its restarts"
    check_main again "$W" "after the broker's restarts"
    has "disconnected $W inactive result success $INSTANCE_SOCKET active" \
      && pass "boot: the VMM disconnects: the worker exits cleanly, the socket listens on" \
      || fail "boot: after the VMM disconnected: $(line disconnected)"
    second=$(line "second $W")
    if [[ $second =~ ^second\ $W\ active\ ([0-9]+)\ was\ $worker$ ]] && [ "${BASH_REMATCH[1]}" != "$worker" ] \
       && [ "${BASH_REMATCH[1]}" != 0 ]; then
      pass "boot: the next connection starts a new worker (PID ${BASH_REMATCH[1]})"
    else
      fail "boot: the next connection: $second"
    fi
    has "idle $W inactive $INSTANCE_SOCKET active" \
      && pass "boot: without a VMM no worker runs (no restart loop), the socket listens" \
      || fail "boot: without a VMM: $(line "idle $W")"
    cycles=$(line "cycles ")
    [[ $cycles =~ ^cycles\ $CYCLES\ of\ $CYCLES\ in\ [0-9.]+\ s\ $INSTANCE_SOCKET\ active$ ]] \
      && pass "boot: $CYCLES back-to-back VMM sessions (connect, GET_FEATURES, disconnect), each served by a fresh worker: ${cycles#cycles }" \
      || { fail "boot: back-to-back VMM sessions: $cycles"; grep '^cycles-error ' "$OUT" | sed 's/^/    /'; }
    if [ "$GUEST" = 1 ]; then
      has "guest-config $B active" && pass "guest: the broker restarted on the guest's configuration (wav backend)" \
        || fail "guest: the broker did not restart on the guest's configuration: $(line guest-config)"
      midplay=$(line "mid-play restart")
      worker=$(sed -n "s/^mid-play restart .* was //p" "$OUT")
      [[ $midplay == "mid-play restart $B active $W active ${worker:-none} was ${worker:-none}" ]] \
        && pass "guest: the broker restarted mid-aplay; the guest's worker runs on (same PID)" \
        || fail "guest: the broker restarted mid-aplay: $midplay"
      reconnect=$(line "reconnect broker back")
      [ -n "$reconnect" ] && pass "guest: the worker reconnected to the new broker (${reconnect#reconnect })" \
        || fail "guest: the worker did not log its reconnection to the new broker"
      guest=$(line "guest status")
      if [[ $guest =~ ^guest\ status\ 0\ seconds\ ([0-9]+)$ ]]; then
        pass "guest: the aplay across the restart finished, then played and recorded through the units' worker and broker (play.sh: $(( BASH_REMATCH[1] / 1000 )).$(( BASH_REMATCH[1] % 1000 / 100 )) s)"
      else
        fail "guest: $guest"; sed -n 's/^console /    /p' "$OUT" | tail -n 60
      fi
      has "guest-after $W inactive result success $B active" \
        && pass "guest: at power-off the worker exits cleanly, the broker stays" || fail "guest: after the guest: $(line guest-after)"
      if out=$(wav_tool played "$R/vsound-guest/play.wav" "$R/var/lib/vsound/played.wav" 2>&1); then
        pass "guest: aplay arrived in the broker's file: $out"
      else
        fail "guest: aplay: $out"
      fi
      if out=$(wav_tool recorded "$R/var/lib/vsound/source.wav" "$R/vsound-guest/out/rec.wav" 2>&1); then
        pass "guest: arecord returned the broker's source: $out"
      else
        fail "guest: arecord: $out"
      fi
    fi
    if [ "$FAILED" != 0 ]; then
      echo "    journal of the units:"; sed -n 's/^log /    /p' "$OUT" | tail -n 80
    fi
  fi
fi

if [ "$FAILED" != 0 ]; then
  echo "check-policies: FAILED" >&2
  exit 1
fi
echo "check-policies: all checks passed"
