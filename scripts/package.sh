#!/usr/bin/env bash
# Builds the Debian package target/debian/vsound_VERSION-1_ARCH.deb and prints its path:
#  1. the binaries: `cargo build --release --workspace --bins`;
#  2. the man pages, generated from the binaries' clap definitions (clap_mangen:
#     `cargo run --example manpages`), into target/deb-assets/man;
#  3. the SELinux module vsound.pp (selinux-policy-dev's Makefile), into target/deb-assets/selinux;
#  4. `cargo deb --no-build`: the assets of [package.metadata.deb] in Cargo.toml, the maintainer
#     scripts of packaging/debian/.
#
#   scripts/package.sh                  the release package
#   scripts/package.sh --profile dev    packages the debug binaries `cargo build --workspace --bins`
#                                       already made, builds none, compresses fast: for the test
#                                       (tests/package.rs), not for shipping
#   scripts/package.sh --no-build       packages the release binaries as they are (no cargo build)
#   scripts/package.sh --output DIR     writes the .deb into DIR instead of target/debian
#
# Needs cargo-deb (scripts/setup.sh installs it), dpkg-dev (dpkg-shlibdeps: the Depends of the
# binaries) and selinux-policy-dev. SOURCE_DATE_EPOCH dates the man pages and the package's files
# (default: the last commit's time).
set -euo pipefail

cd "$(dirname "$0")/.."

PROFILE=release
BUILD=1
OUTPUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) PROFILE=${2:?--profile needs a value}; shift 2 ;;
    --profile=*) PROFILE=${1#--profile=}; shift ;;
    --no-build) BUILD=0; shift ;;
    --output) OUTPUT=${2:?--output needs a value}; shift 2 ;;
    --output=*) OUTPUT=${1#--output=}; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "package: unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$PROFILE" in
  release | dev) ;;
  *) echo "package: --profile is release or dev, not $PROFILE" >&2; exit 2 ;;
esac

need() {
  command -v "$1" >/dev/null 2>&1 || { echo "package: $1 is missing ($2)" >&2; exit 1; }
}
cargo deb --version >/dev/null 2>&1 || { echo "package: cargo-deb is missing (scripts/setup.sh installs it)" >&2; exit 1; }
need dpkg-shlibdeps "Debian package dpkg-dev"
[ -f /usr/share/selinux/devel/Makefile ] || {
  echo "package: /usr/share/selinux/devel/Makefile is missing (Debian package selinux-policy-dev)" >&2
  exit 1
}

ASSETS=target/deb-assets
TMP=$(mktemp -d "${TMPDIR:-/tmp}/vsound-package.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

# Progress to stderr: stdout is the .deb's path alone.
if [ "$PROFILE" = release ] && [ "$BUILD" = 1 ]; then
  echo "== cargo build --release --workspace --bins" >&2
  cargo build --quiet --release --workspace --bins >&2
fi

echo "== man pages (clap_mangen)" >&2
# Not exported to cargo: the PipeWire bindings' build scripts rebuild when it changes.
EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
rm -rf "$ASSETS/man"
cargo run --quiet --profile "$PROFILE" --example manpages -- "$ASSETS/man" \
  --date "$(date -u -d "@$EPOCH" +%Y-%m-%d)" >&2

echo "== SELinux module" >&2
rm -rf "$ASSETS/selinux"
mkdir -p "$ASSETS/selinux"
cp selinux/vsound.te selinux/vsound.fc selinux/vsound.if "$TMP/"
make --quiet -C "$TMP" -f /usr/share/selinux/devel/Makefile vsound.pp >"$TMP/make.log" 2>&1 || {
  cat "$TMP/make.log" >&2
  echo "package: the SELinux module does not build" >&2
  exit 1
}
cp "$TMP/vsound.pp" "$ASSETS/selinux/vsound.pp"

echo "== cargo deb --no-build --profile $PROFILE" >&2
DEB_ARGS=(--no-build --profile "$PROFILE")
if [ "$PROFILE" = dev ]; then
  # Debug binaries keep their symbols unless asked; xz's fast preset (a test's package);
  # --quiet: cargo-deb's warning that dev is no release profile (that is the point here).
  DEB_ARGS+=(--strip --fast --quiet)
fi
if [ -n "$OUTPUT" ]; then
  mkdir -p "$OUTPUT"
  DEB_ARGS+=(--output "$OUTPUT")
fi
# The files' times in the package (cargo-deb reads it; `cargo deb --no-build` builds nothing).
deb=$(SOURCE_DATE_EPOCH=$EPOCH cargo deb "${DEB_ARGS[@]}" | tail -n 1)
[ -f "$deb" ] || { echo "package: cargo deb made no package (it said: $deb)" >&2; exit 1; }
echo "$deb"
