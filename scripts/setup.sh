#!/usr/bin/env bash
# Installs what vsound needs to build, run and test on Debian bookworm. Idempotent: installs
# only what is missing. Needs root (or sudo) only when something is missing.
set -euo pipefail

# Debian packages the build and the tests need.
PACKAGES=(
  build-essential   # cc and the linker for crates that build C
  pkg-config        # finds system libraries for -sys crates
  binutils          # readelf: the linkage test reads the worker's ELF dynamic section
  libclang-dev      # bindgen, for the PipeWire bindings
  libasound2-dev    # the broker's ALSA backend links libasound
  libgstreamer1.0-dev               # the broker's GStreamer backend links libgstreamer-1.0 (1.22)
  libgstreamer-plugins-base1.0-dev  # ... and libgstapp and libgstaudio (appsrc/appsink, audio caps)
  gstreamer1.0-plugins-base   # the GStreamer backend's audioconvert and audioresample (appsrc, appsink)
  gstreamer1.0-plugins-good   # autoaudiosink/autoaudiosrc (its defaults); tests/gstreamer.rs: wavenc, wavparse
  systemd           # tests: systemd-analyze verify/security of the shipped units
  systemd-container # tests: systemd-nspawn boots this machine's systemd to run the units for real
  python3           # tests: check-policies.sh (syscall sets, WAV files, a VMM stand-in)
  selinux-policy-dev selinux-policy-default  # tests: build the SELinux module, link it into Debian's policy
  strace            # tests/sandbox.rs: glibc's heap-trim open is refused (not killed) in the worker
  dbus-daemon       # tests/sandbox.rs: a private D-Bus system bus for the broker's PipeWire client
  libvirt-clients libxml2-utils  # tests/examples.rs: virt-xml-validate (xmllint, libvirt's schemas) on the libvirt example
  man-db groff-base # tests/package.rs: the packaged man pages render (man -l, groff warnings)
)

# From bookworm-backports: PipeWire 1.4 (the broker's backend, and the tests' private daemon).
BACKPORTS_PACKAGES=(
  libpipewire-0.3-dev libspa-0.2-dev   # the broker links libpipewire
  pipewire pipewire-bin wireplumber    # tests: a private daemon, pw-record, pw-play, pw-cli
  pipewire-alsa                        # tests: an ALSA PCM (the PipeWire plugin) for the ALSA backend
  qemu-system-x86                      # tests/e2e: QEMU 10, which has vhost-user-snd-pci
)

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Adds Debian's bookworm-backports suite on the same archive as the system's own sources.
enable_backports() {
  if grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    return
  fi
  local uri
  uri=$(grep -rhs -A3 "^Types: deb" /etc/apt/sources.list.d/*.sources \
          | awk '/^URIs:/ {print $2}' | grep -v security | head -n 1 || true)
  if [ -z "$uri" ]; then
    uri=$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  fi
  if [ -z "$uri" ]; then
    echo "setup: cannot find the Debian archive in the apt sources" >&2
    return 1
  fi
  echo "deb $uri bookworm-backports main" | as_root tee /etc/apt/sources.list.d/bookworm-backports.list >/dev/null
  APT_UPDATED=""
}

APT_UPDATED=""
apt_install() {
  local target=()
  if [ "${1:-}" = "--backports" ]; then
    target=(-t bookworm-backports)
    shift
  fi
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ -z "$APT_UPDATED" ]; then
    as_root apt-get update -qq
    APT_UPDATED=1
  fi
  echo "setup: installing ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${target[@]}" "${missing[@]}"
}

enable_backports
apt_install "${PACKAGES[@]}"
apt_install --backports "${BACKPORTS_PACKAGES[@]}"

if ! command -v cargo >/dev/null; then
  echo "setup: cargo is missing: install a Rust toolchain (rustup) first" >&2
  exit 1
fi
for component in fmt clippy; do
  if ! cargo "$component" --version >/dev/null 2>&1; then
    echo "setup: cargo $component is missing: rustup component add ${component/fmt/rustfmt}" >&2
    exit 1
  fi
done

# scripts/package.sh (and tests/package.rs) build the Debian package with cargo-deb: this version,
# installed (about a minute) where it is missing or another version is there.
CARGO_DEB_VERSION=3.8.0
if [ "$(cargo deb --version 2>/dev/null)" != "cargo-deb $CARGO_DEB_VERSION" ]; then
  echo "setup: installing cargo-deb $CARGO_DEB_VERSION"
  cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION" --quiet
fi

# scripts/fuzz.sh needs cargo-fuzz, on a nightly toolchain: installed (quietly) only where
# nightly is there, and never a reason for setup to fail.
if cargo +nightly --version >/dev/null 2>&1 && ! cargo fuzz --version >/dev/null 2>&1; then
  echo "setup: installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet >/dev/null 2>&1 \
    || echo "setup: could not install cargo-fuzz (only scripts/fuzz.sh needs it)" >&2
fi
