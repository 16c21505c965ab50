#!/usr/bin/env bash
# Runs the fuzz targets (fuzz/, libFuzzer with AddressSanitizer, on the nightly toolchain) for a
# bounded time each, from a scratch copy of the seed corpus (fuzz/corpus/<target>/ and
# fuzz/regressions/<target>/; what the fuzzer adds stays in fuzz/scratch/, the repo corpus
# never grows), and prints per target: execs/s, coverage (libFuzzer's cov and ft), corpus size
# and any crash artifact. Exits non-zero if a target crashed (or timed out, or ran out of
# memory).
#
#   scripts/fuzz.sh [seconds-per-target] [target...]    (default: 60 s, every target)
#
# A crash is in fuzz/artifacts/<target>/; reproduce it with
#   (cd fuzz && cargo +nightly fuzz run <target> artifacts/<target>/<file>)
# minimize it with `cargo +nightly fuzz tmin <target> <file>`, and keep it as a regression in
# fuzz/regressions/<target>/ (tests/fuzz_corpus.rs replays those).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -eq 0 ]; then
  echo "usage: $0 [seconds-per-target] [target...]" >&2
  exit 2
fi
shift || true

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz: needs a nightly toolchain (cargo +nightly)" >&2
  exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install cargo-fuzz --locked || cargo install cargo-fuzz
fi

cd fuzz
if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo +nightly fuzz list)
fi
# Every target built once up front, so each target's time is spent fuzzing.
mkdir -p scratch
if ! cargo +nightly fuzz build >scratch/build.log 2>&1; then
  cat scratch/build.log >&2
  exit 2
fi

results=()
crashed=0
for target in "${targets[@]}"; do
  scratch="scratch/$target"
  log="scratch/$target.log"
  rm -rf "$scratch" "$log"
  mkdir -p "$scratch" "artifacts/$target"
  for seeds in "corpus/$target" "regressions/$target"; do
    if [ -d "$seeds" ]; then
      cp -r "$seeds/." "$scratch/"
    fi
  done
  echo "fuzz: $target for ${seconds}s ($(find "$scratch" -type f | wc -l) seeds)"
  status=0
  # -timeout: an input running 10 s is a hang, reported as a crash.
  cargo +nightly fuzz run "$target" "$scratch" -- \
    -max_total_time="$seconds" -print_final_stats=1 -timeout=10 \
    -artifact_prefix="artifacts/$target/" >"$log" 2>&1 || status=$?
  # The last status line: "#N  DONE  cov: C ft: F corp: K/S ... exec/s: E ...".
  last=$(grep -E '^#[0-9]+.* cov: ' "$log" | tail -n 1 || true)
  cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")
  ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$last")
  execs=$(sed -nE 's/^stat::average_exec_per_sec: *([0-9]+).*/\1/p' "$log" | tail -n 1)
  runs=$(sed -nE 's/^stat::number_of_executed_units: *([0-9]+).*/\1/p' "$log" | tail -n 1)
  corpus=$(find "$scratch" -type f | wc -l)
  artifact=$(sed -nE 's/.*Test unit written to (.*)$/\1/p' "$log" | tail -n 1)
  if [ "$status" -ne 0 ] || [ -n "$artifact" ]; then
    crashed=1
    outcome="CRASH ${artifact:-(no artifact; exit $status, see fuzz/$log)}"
    if [ -n "$artifact" ]; then
      outcome="CRASH fuzz/$artifact"
    fi
  else
    outcome="ok"
  fi
  results+=("$(printf '%-16s %8s %8s %7s %7s %8s %12s  %s' "$target" "${seconds}s" "${execs:-?}" \
    "${cov:-?}" "${ft:-?}" "$corpus" "${runs:-?}" "$outcome")")
done

echo
printf '%-16s %8s %8s %7s %7s %8s %12s  %s\n' target time execs/s cov ft corpus runs outcome
printf '%s\n' "${results[@]}"
if [ "$crashed" -ne 0 ]; then
  echo "fuzz: a target crashed; its log is in fuzz/scratch/<target>.log" >&2
  exit 1
fi
