#!/usr/bin/env bash
# Checks the deployment policies: the systemd units (systemd/), their users and directories
# (sysusers.d, tmpfiles.d) and the SELinux module (selinux/).
#
#   scripts/check-policies.sh          the static checks below (a few seconds)
#   scripts/check-policies.sh --boot   also boots this machine's systemd in a container on an
#                                      overlay of / and starts both units for real (root,
#                                      systemd-container; about 10 s)
#
# Static checks:
#  1. every option in the units' ExecStart= is one the built binaries accept (--help);
#  2. `systemd-analyze verify` of the units installed into a temporary root together with the
#     built binaries (verify checks that ExecStart= programs exist there); any warning fails;
#  3. sysusers.d and tmpfiles.d files applied to that root (systemd-sysusers, systemd-tmpfiles);
#  4. `systemd-analyze security --offline=yes`: prints each unit's exposure, fails if the
#     worker's is above 1.5 or the broker's above 3.0;
#  5. the SELinux module compiles and packages with selinux-policy-dev's Makefile, in a
#     temporary copy of selinux/; its file contexts name the units' programs and directories;
#     if Debian's selinux-policy-default is installed, the module is also installed into a
#     temporary copy of its policy store, which links it against the whole reference policy.
#
# Binaries: $VSOUND_WORKER_BIN and $VSOUND_BROKER_BIN (the integration test sets them), else
# target/debug/vsound-{worker,broker}, built with `cargo build --bins` if missing.
#
# Debian packages needed: systemd (systemd-analyze, systemd-sysusers, systemd-tmpfiles),
# selinux-policy-dev (its Makefile; pulls checkpolicy, policycoreutils, m4, make);
# optional: selinux-policy-default (link check), systemd-container (--boot).
#
# Idempotent: everything is done in a temporary directory, removed on exit. Exits non-zero on
# any failure.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT_DIR=$(pwd)

WORKER_MAX=1.5
BROKER_MAX=3.0
BOOT=0
for arg in "$@"; do
  case "$arg" in
    --boot) BOOT=1 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
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
cleanup() {
  if [ -n "$OVERLAY_MOUNTED" ]; then umount "$OVERLAY_MOUNTED" 2>/dev/null || umount -l "$OVERLAY_MOUNTED" || true; fi
  rm -rf "$TMP"
}
trap cleanup EXIT

UNITS=(systemd/vsound-broker.service "systemd/vsound-worker@.service")
INSTANCE="vsound-worker@vm1.service"

# --- the binaries -----------------------------------------------------------------------------
WORKER_BIN=${VSOUND_WORKER_BIN:-$ROOT_DIR/target/debug/vsound-worker}
BROKER_BIN=${VSOUND_BROKER_BIN:-$ROOT_DIR/target/debug/vsound-broker}
if [ ! -x "$WORKER_BIN" ] || [ ! -x "$BROKER_BIN" ]; then
  echo "== building the binaries (cargo build --bins)"
  cargo build --quiet --bins
fi
[ -x "$WORKER_BIN" ] || { echo "check-policies: no worker binary at $WORKER_BIN" >&2; exit 1; }
[ -x "$BROKER_BIN" ] || { echo "check-policies: no broker binary at $BROKER_BIN" >&2; exit 1; }

# The ExecStart= line of a unit file (one line, no continuation in ours).
exec_start() { sed -n 's/^ExecStart=//p' "$1"; }

# --- 1. ExecStart options against the binaries ----------------------------------------------
echo "== 1. ExecStart= options are accepted by the binaries"
for unit in "${UNITS[@]}"; do
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
# And what src/sandbox.rs calls before its own policy is in force.
needed |= {"prctl", "unshare", "capget", "capset", "seccomp",
           "landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self"}
missing = sorted(needed - allowed)
if missing:
    sys.exit(f"{unit}: SystemCallFilter= refuses {', '.join(missing)} (needed by {policy} or src/sandbox.rs)")
print(f"{unit}: {len(needed)} calls of {policy} and src/sandbox.rs allowed ({len(allowed)} in the unit's allow-list)")
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
# The host's own units (sysinit.target, ...) that ours depend on, and /bin/sh (ExecStartPost=).
cp -a /usr/lib/systemd/system "$ROOTFS/usr/lib/systemd/"
cp -L /bin/sh "$ROOTFS/usr/bin/sh"
install -m 0755 "$WORKER_BIN" "$ROOTFS/usr/bin/vsound-worker"
install -m 0755 "$BROKER_BIN" "$ROOTFS/usr/bin/vsound-broker"
install -m 0644 "${UNITS[@]}" "$ROOTFS/etc/systemd/system/"
install -m 0644 systemd/sysusers.d/vsound.conf "$ROOTFS/usr/lib/sysusers.d/vsound.conf"
install -m 0644 systemd/tmpfiles.d/vsound.conf "$ROOTFS/usr/lib/tmpfiles.d/vsound.conf"
# systemd-analyze verify exits 0 on unknown keys and unparsable values: any output fails.
if out=$(systemd-analyze verify --root="$ROOTFS" vsound-broker.service "$INSTANCE" 2>&1) && [ -z "$out" ]; then
  pass "systemd-analyze verify vsound-broker.service $INSTANCE: no errors, no warnings"
else
  fail "systemd-analyze verify:"; echo "$out" | sed 's/^/    /'
fi

# --- 3. sysusers.d and tmpfiles.d --------------------------------------------------------------
echo "== 3. sysusers.d and tmpfiles.d applied to the temporary root"
touch "$ROOTFS/etc/passwd" "$ROOTFS/etc/group" "$ROOTFS/etc/shadow" "$ROOTFS/etc/gshadow"
if out=$(systemd-sysusers --root="$ROOTFS" 2>&1); then
  echo "$out" | sed 's/^/    /'
  for name in vsound vsound-broker; do
    grep -q "^$name:" "$ROOTFS/etc/group" && pass "sysusers: group $name" || fail "sysusers: no group $name"
  done
  grep -q "^vsound-broker:" "$ROOTFS/etc/passwd" && pass "sysusers: user vsound-broker" || fail "sysusers: no user vsound-broker"
else
  fail "systemd-sysusers:"; echo "$out" | sed 's/^/    /'
fi
# Every static user and group the units name must come from sysusers.d or the base system.
for unit in "${UNITS[@]}"; do
  for key in User Group SupplementaryGroups; do
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
for unit in "${UNITS[@]}"; do
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
  for key in RuntimeDirectory StateDirectory; do
    for dir in $(sed -n "s/^$key=//p" "$unit"); do
      top=${dir%%/*}
      case "$key" in RuntimeDirectory) path=/run/$top ;; StateDirectory) path=/var/lib/$top ;; esac
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
if [ "$BOOT" = 1 ]; then
  echo "== boot: this machine's systemd in a container on an overlay of /, both units started"
  need systemd-nspawn systemd-container
  [ "$(id -u)" -eq 0 ] || { fail "--boot needs root"; exit 1; }
  mkdir -p "$TMP/ov/up" "$TMP/ov/work" "$TMP/ov/root"
  mount -t overlay overlay -o "lowerdir=/,upperdir=$TMP/ov/up,workdir=$TMP/ov/work" "$TMP/ov/root"
  OVERLAY_MOUNTED=$TMP/ov/root
  R=$TMP/ov/root
  install -m 0755 "$WORKER_BIN" "$R/usr/bin/vsound-worker"
  install -m 0755 "$BROKER_BIN" "$R/usr/bin/vsound-broker"
  install -m 0644 "${UNITS[@]}" "$R/etc/systemd/system/"
  install -m 0644 systemd/sysusers.d/vsound.conf "$R/usr/lib/sysusers.d/vsound.conf"
  install -m 0644 systemd/tmpfiles.d/vsound.conf "$R/usr/lib/tmpfiles.d/vsound.conf"
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
ExecStart=/bin/sh /vsound-check.sh
ExecStopPost=/bin/systemctl --no-block poweroff
StandardOutput=file:/vsound-check.out
StandardError=inherit
EOF
  cat > "$R/vsound-check.sh" <<'EOF'
useradd -r -M -G vsound vsound-vmm 2>/dev/null || true
systemctl start vsound-worker@vm1.service
for u in vsound-broker.service vsound-worker@vm1.service; do
  echo "state $u $(systemctl is-active $u)"
  pid=$(systemctl show -p MainPID --value $u)
  grep -E '^(Uid|Gid|Groups|CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/$pid/status | sed "s/^/status $u /"
  [ "$(readlink /proc/$pid/ns/net)" != "$(readlink /proc/1/ns/net)" ] && echo "netns $u private"
done
echo "socket $(stat -c '%a %G' /run/vsound/vm1/vhost-user.sock) $(stat -c '%a %G' /run/vsound-broker/broker.sock)"
connect='import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])'
runuser -u vsound-vmm -- python3 -c "$connect" /run/vsound/vm1/vhost-user.sock && echo "connect vmm ok"
runuser -u nobody -- python3 -c "$connect" /run/vsound/vm1/vhost-user.sock 2>/dev/null || echo "connect nobody denied"
journalctl --no-pager -o cat -u vsound-broker -u vsound-worker@vm1 | sed 's/^/log /'
EOF
  # nspawn 252's own seccomp filter refuses the Landlock calls: let them through.
  timeout 120 systemd-nspawn -q -D "$R" --register=no --keep-unit --link-journal=no \
    --console=pipe --system-call-filter='landlock_create_ruleset landlock_add_rule landlock_restrict_self' \
    -b -- systemd.unit=vsound-check.target >"$TMP/nspawn.log" 2>&1 || true
  OUT=$R/vsound-check.out
  if [ ! -s "$OUT" ]; then
    fail "boot: no result"; sed 's/^/    /' "$TMP/nspawn.log"
  else
    grep -v '^log ' "$OUT" | sed 's/^/    /'
    grep 'sandbox:' "$OUT" | sed 's/^log /    /'
    for u in vsound-broker.service vsound-worker@vm1.service; do
      grep -q "^state $u active" "$OUT" && pass "boot: $u active with --sandbox strict" || fail "boot: $u not active"
      grep -q "^status $u Seccomp:[[:space:]]*2" "$OUT" && pass "boot: $u seccomp filter mode" || fail "boot: $u seccomp"
      grep -q "^status $u NoNewPrivs:[[:space:]]*1" "$OUT" && pass "boot: $u no_new_privs" || fail "boot: $u no_new_privs"
      if grep "^status $u Cap" "$OUT" | grep -qv '0000000000000000$'; then fail "boot: $u holds capabilities"; else pass "boot: $u no capabilities"; fi
      grep -q "^status $u Uid:[[:space:]]*0[[:space:]]" "$OUT" && fail "boot: $u runs as root" || pass "boot: $u not root"
      grep -q "^netns $u private" "$OUT" && pass "boot: $u private network namespace" || fail "boot: $u host network"
    done
    grep -q '^socket 660 vsound 660 vsound-broker$' "$OUT" && pass "boot: sockets 0660, groups vsound and vsound-broker" || fail "boot: socket modes"
    grep -q '^connect vmm ok' "$OUT" && pass "boot: a member of vsound connects to the worker" || fail "boot: the VMM's user cannot connect"
    grep -q '^connect nobody denied' "$OUT" && pass "boot: another user cannot connect" || fail "boot: another user connects"
  fi
fi

if [ "$FAILED" != 0 ]; then
  echo "check-policies: FAILED" >&2
  exit 1
fi
echo "check-policies: all checks passed"
