#!/usr/bin/env bash
# Builds the end-to-end test guest from Debian packages and caches it.
#
#   tests/e2e/build-guest.sh [CACHE_DIR]      (default: target/e2e-cache)
#
# Prints, as its last lines:
#   KERNEL=/abs/path/vmlinuz
#   INITRD=/abs/path/initrd.cpio
#   BUSYBOX=/abs/path/busybox   (static, runs on the host too: play.sh uses its cpio)
#
# The guest: the Debian kernel that linux-image-amd64 from bookworm-backports depends on (6.12,
# with virtio_snd as a module), busybox-static, aplay/arecord and amixer from alsa-utils with libasound2,
# libasound2-data (alsa.conf) and libc6, in an uncompressed cpio initramfs whose /init is
# tests/e2e/guest/init. Only the modules virtio_snd and virtio_blk need (and their dependencies,
# read from each module's .modinfo) go in, decompressed for busybox insmod, with /modules.order
# listing them in load order.
#
# Packages are fetched with `apt-get download` into CACHE_DIR/debs (`apt-get update` is run once
# if they cannot be found); the initramfs is built into CACHE_DIR/guest-KEY, KEY being a hash of
# the package versions and of this script and the init script, so a rerun only resolves versions
# (apt-cache, no network) and returns the cached paths. Needs: apt-get, apt-cache, dpkg-deb, tar,
# sha256sum, flock (all in a base Debian). No cpio or xz on the host: the guest's static busybox
# provides both.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=${1:-$ROOT/target/e2e-cache}
mkdir -p "$CACHE/debs"
CACHE=$(cd "$CACHE" && pwd)

log() { echo "build-guest: $*" >&2; }
die() { echo "build-guest: ERROR: $*" >&2; exit 1; }

for tool in apt-get apt-cache dpkg-deb tar sha256sum flock; do
  command -v "$tool" >/dev/null || die "$tool is missing (Debian host needed)"
done
# One build at a time per cache (two test runs may start together).
exec 9>"$CACHE/lock"
flock 9

UPDATED=""
apt_update() {
  [ -n "$UPDATED" ] && return 1
  UPDATED=1
  log "running apt-get update"
  if [ "$(id -u)" -eq 0 ]; then apt-get update -qq >&2; else sudo apt-get update -qq >&2; fi
}

# Resolves PKGS (NAME=VERSION): the kernel package that linux-image-amd64 from bookworm-backports
# depends on, then the candidates of the userspace packages. Two apt-cache calls (each can take a
# second where apt keeps no binary cache).
USERSPACE=(busybox-static alsa-utils libasound2 libasound2-data libc6)
resolve_all() {
  local policy kver dep p ver
  policy=$(apt-cache policy linux-image-amd64 "${USERSPACE[@]}" 2>/dev/null) || return 1
  # The version line just above a "bookworm-backports" source line in linux-image-amd64's table.
  kver=$(echo "$policy" | awk '
      /^[^ ]/ { pkg = $1; sub(/:$/, "", pkg) }
      pkg == "linux-image-amd64" && $0 ~ /^ +(\*\*\* )?[0-9][^ ]* [0-9]+$/ {
        v = $1; if (v == "***") v = $2 }
      pkg == "linux-image-amd64" && /bookworm-backports/ && v != "" { print v; exit }')
  [ -n "$kver" ] || return 1
  dep=$(apt-cache show "linux-image-amd64=$kver" 2>/dev/null | sed -n 's/^Depends: //p' \
        | head -n 1 | tr ',' '\n' \
        | sed -n 's/^ *\(linux-image-[^ ]*\) *(= *\([^)]*\)).*/\1=\2/p' | head -n 1)
  [ -n "$dep" ] || return 1
  PKGS=("$dep")
  for p in "${USERSPACE[@]}"; do
    ver=$(echo "$policy" | awk -v p="$p:" '$1 == p { f = 1; next } /^[^ ]/ { f = 0 }
                                              f && /Candidate:/ { print $2; exit }')
    [ -n "$ver" ] && [ "$ver" != "(none)" ] || return 1
    PKGS+=("$p=$ver")
  done
}

# The resolution is cached for as long as apt's package lists and sources stay the same.
apt_state() {
  ls -l --time-style=+%s.%N /var/lib/apt/lists/ /etc/apt/ /etc/apt/sources.list.d/ \
     /etc/apt/preferences.d/ 2>/dev/null | sha256sum | cut -c1-16
}
RESOLVED=$CACHE/resolved-$(apt_state)
if [ -s "$RESOLVED" ]; then
  mapfile -t PKGS < "$RESOLVED"
else
  if ! resolve_all; then
    apt_update || true
    resolve_all || die "cannot resolve the guest packages with apt-cache: is bookworm-backports \
in the apt sources (scripts/setup.sh adds it)? needed: linux-image-amd64 (bookworm-backports), \
${USERSPACE[*]}"
    RESOLVED=$CACHE/resolved-$(apt_state)
  fi
  rm -f "$CACHE"/resolved-*
  printf '%s\n' "${PKGS[@]}" > "$RESOLVED"
fi

# The .deb file apt-get download writes for NAME=VERSION (epoch colon escaped as %3a).
deb_path() {
  local name=${1%%=*} ver=${1#*=}
  ls "$CACHE/debs/${name}_${ver/:/%3a}_"*.deb 2>/dev/null | head -n 1
}

download_missing() {
  local p missing=()
  for p in "${PKGS[@]}"; do
    [ -n "$(deb_path "$p")" ] || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "downloading ${missing[*]}"
  # apt's _apt sandbox user must be able to write here, or apt warns and downloads as root.
  chmod 0777 "$CACHE/debs" 2>/dev/null || true
  (cd "$CACHE/debs" && apt-get download -q "${missing[@]}" >&2) || return 1
  for p in "${PKGS[@]}"; do
    [ -n "$(deb_path "$p")" ] || die "apt-get download did not produce the .deb of $p"
  done
}
if ! download_missing; then
  # Stale package lists: update, resolve again, retry once.
  apt_update || die "apt-get download failed"
  resolve_all || die "cannot resolve the guest packages after apt-get update"
  rm -f "$CACHE"/resolved-*
  printf '%s\n' "${PKGS[@]}" > "$CACHE/resolved-$(apt_state)"
  download_missing || die "apt-get download ${PKGS[*]} failed"
fi

KEY=$( { printf '%s\n' "${PKGS[@]}"; cat "$0" "$HERE/guest/init"; } | sha256sum | cut -c1-16)
OUT=$CACHE/guest-$KEY
if [ ! -f "$OUT/done" ]; then
  log "building the guest initramfs in $OUT from ${PKGS[*]}"
  rm -rf "$OUT" "$OUT.tmp"
  mkdir -p "$OUT.tmp"
  X=$OUT.tmp/extract
  R=$OUT.tmp/root
  mkdir -p "$X" "$R"
  for p in "${PKGS[@]:1}"; do
    dpkg-deb -x "$(deb_path "$p")" "$X"
  done
  # Only the boot files and the modules from the kernel package (the rest is firmware-free).
  KD=$OUT.tmp/kernel
  mkdir -p "$KD"
  dpkg-deb --fsys-tarfile "$(deb_path "${PKGS[0]}")" \
    | tar -x -C "$KD" --wildcards './boot/vmlinuz-*' './lib/modules/*/kernel/*'
  KREL=$(ls "$KD/lib/modules")
  [ -n "$KREL" ] && [ "$(echo "$KREL" | wc -l)" -eq 1 ] || die "no single kernel release in ${PKGS[0]}"
  cp "$KD/boot/vmlinuz-$KREL" "$OUT.tmp/vmlinuz"

  # Module closure in load order (dependencies first), from each module's depends= field.
  find "$KD/lib/modules/$KREL/kernel" -name '*.ko.xz' > "$OUT.tmp/all-modules"
  module_file() {  # module name (- and _ are equivalent) -> path
    local n=${1//-/_}
    awk -v n="$n" '{ f = $0; sub(/.*\//, "", f); sub(/\.ko\.xz$/, "", f); gsub(/-/, "_", f);
                     if (f == n) { print $0; exit } }' "$OUT.tmp/all-modules"
  }
  ORDER=()
  add_module() {
    local name=${1//-/_} file deps d m
    for m in "${ORDER[@]+"${ORDER[@]}"}"; do [ "$m" = "$name" ] && return 0; done
    file=$(module_file "$name")
    [ -n "$file" ] || die "module $name not found in ${PKGS[0]} (built in? see boot/config)"
    mkdir -p "$R/lib/modules"
    "$X/bin/busybox" xz -dc "$file" > "$R/lib/modules/$name.ko"
    deps=$(tr '\0' '\n' < "$R/lib/modules/$name.ko" | sed -n 's/^depends=//p' | head -n 1)
    for d in ${deps//,/ }; do add_module "$d"; done
    ORDER+=("$name")
  }
  add_module virtio_snd
  add_module virtio_blk
  printf '%s\n' "${ORDER[@]}" > "$R/modules.order"
  log "modules (load order): ${ORDER[*]}"

  # Userspace: busybox, aplay (+ arecord), amixer, the loader, libc, libm, libasound, ALSA's
  # config.
  mkdir -p "$R/bin" "$R/usr/bin" "$R/lib64" "$R/lib/x86_64-linux-gnu" \
           "$R/usr/lib/x86_64-linux-gnu" "$R/usr/share" "$R/etc" "$R/proc" "$R/sys" "$R/dev" \
           "$R/tmp" "$R/out" "$R/in" "$R/root"
  cp "$X/bin/busybox" "$R/bin/busybox"
  cp "$X/usr/bin/aplay" "$R/usr/bin/aplay"
  ln -s aplay "$R/usr/bin/arecord"
  cp "$X/usr/bin/amixer" "$R/usr/bin/amixer"
  cp -L "$X/lib64/ld-linux-x86-64.so.2" "$R/lib64/ld-linux-x86-64.so.2"
  for lib in libc.so.6 libm.so.6; do
    cp -L "$X/lib/x86_64-linux-gnu/$lib" "$R/lib/x86_64-linux-gnu/$lib"
  done
  cp -L "$X/usr/lib/x86_64-linux-gnu/libasound.so.2" "$R/usr/lib/x86_64-linux-gnu/libasound.so.2"
  cp -a "$X/usr/share/alsa" "$R/usr/share/alsa"
  [ -f "$R/usr/share/alsa/alsa.conf" ] || die "alsa.conf missing from libasound2-data"
  cp "$HERE/guest/init" "$R/init"
  chmod 0755 "$R/init" "$R/bin/busybox" "$R/usr/bin/aplay" "$R/usr/bin/amixer"
  printf '%s\n' "${PKGS[@]}" > "$R/packages"

  (cd "$R" && "$X/bin/busybox" find . | LC_ALL=C sort \
     | "$X/bin/busybox" cpio -o -H newc 2>/dev/null) > "$OUT.tmp/initrd.cpio"
  cp "$X/bin/busybox" "$OUT.tmp/busybox"
  printf '%s\n' "${PKGS[@]}" > "$OUT.tmp/packages"
  rm -rf "$X" "$KD" "$R" "$OUT.tmp/all-modules"
  touch "$OUT.tmp/done"
  mv "$OUT.tmp" "$OUT"
  log "built $(du -h "$OUT/initrd.cpio" | cut -f1) initramfs"
  # Drop what older package versions or scripts left behind.
  for d in "$CACHE"/guest-*; do [ "$d" = "$OUT" ] || rm -rf "$d"; done
  for f in "$CACHE"/debs/*.deb; do
    keep=""
    for p in "${PKGS[@]}"; do [ "$f" = "$(deb_path "$p")" ] && keep=1; done
    [ -n "$keep" ] || rm -f "$f"
  done
fi

echo "KERNEL=$OUT/vmlinuz"
echo "INITRD=$OUT/initrd.cpio"
echo "BUSYBOX=$OUT/busybox"
