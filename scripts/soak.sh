#!/usr/bin/env bash
# Soak: one real guest runs repeated open/play/close cycles through `vsound run` while the
# broker is killed (SIGKILL) and restarted under it; the worker's and the broker's resident
# memory, open fds, threads and memory mappings are sampled after every cycle.
#
#   scripts/soak.sh [--cycles N] [--restart-every K] [--backend pipewire|null] [--debug]
#                   [--keep]
#
#   --cycles N         guest cycles (default 40; about 3.3 s each under TCG, plus ~10 s to boot)
#   --restart-every K  kill the broker 0.8 s into the aplay of every K-th cycle (default 5;
#                      0: never); the launcher restarts it and the worker reconnects
#   --backend B        pipewire (default: a private headless daemon with WirePlumber and a null
#                      sink, as in tests/common/pipewire.rs) or null (no audio server at all)
#   --debug            use target/debug binaries (default: target/release; built first)
#   --keep             keep the work directory (console, launcher log, samples)
#
# Each cycle (tests/e2e/soak-guest.sh) is a 2 s aplay of silence and a 1 s arecord on hw:0,0
# with one of eight format/rate/channels/period/buffer shapes (5.5 ms to 80 ms periods).
# At the end it prints every sample and a start/end table, and exits non-zero if
#   - the worker that served the VM exited or was replaced while the VM ran (QEMU cannot
#     reconnect, so that would be the VM's audio gone until it reboots),
#   - a guest cycle failed (aplay or arecord exit status), or the guest did not run them all,
#   - a broker kill was not followed by a new broker,
#   - the worker leaked: see TOLERANCE below.
# Needs root (the launcher then runs the worker as nobody, as in production), QEMU 10 with
# vhost-user-snd-pci, and for the pipewire backend pipewire, wireplumber and pw-cli. Not part
# of ./test.sh: a default run takes about 2 minutes 15 s.
#
# TOLERANCE. Samples are taken when the guest prints its end-of-cycle marker, when no stream is
# open, so a worker without leaks is in the same state at each. Compared: the first third of
# the samples against the last third.
#   - fds, threads, mappings: the smallest count in the last third must not exceed the largest
#     in the first third. Anything the worker keeps per cycle or per reconnect raises every
#     later sample, so it raises the minimum; an fd that is merely still open at one sample (a
#     RELEASE in flight as the marker prints) raises one sample and does not count.
#   - memory: RssAnon (heap and stacks), by the same rule with 128 KiB of slack: glibc's malloc
#     trims a heap only past 128 KiB free (M_TRIM_THRESHOLD), so a worker that frees everything
#     still moves by up to that between samples. VmRSS is printed, not judged: it also counts
#     RssShmem, the guest RAM the worker has touched through its mapping of the VM's memory
#     (grows as the guest's buffers land on new pages, bounded by the VM's RAM, not the
#     worker's), and RssFile, the binary's pages as code paths are first used.
# The broker's figures are printed but not judged: it is replaced every K cycles by design.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
die() { echo "soak: ERROR: $*" >&2; exit 2; }
log() { echo "soak: $*" >&2; }

CYCLES=40 RESTART_EVERY=5 BACKEND=pipewire PROFILE=release KEEP=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cycles) CYCLES=$2; shift 2 ;;
    --restart-every) RESTART_EVERY=$2; shift 2 ;;
    --backend) BACKEND=$2; shift 2 ;;
    --debug) PROFILE=debug; shift ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[[ $CYCLES =~ ^[1-9][0-9]*$ ]] || die "--cycles wants a positive number"
[[ $RESTART_EVERY =~ ^[0-9]+$ ]] || die "--restart-every wants a number"
case "$BACKEND" in pipewire|null) ;; *) die "--backend is pipewire or null" ;; esac
[ "$(id -u)" -eq 0 ] || die "run as root (the launcher drops the worker to nobody)"
if [ "$BACKEND" = pipewire ]; then
  for tool in pipewire wireplumber pw-cli; do
    command -v "$tool" >/dev/null || die "$tool not found (scripts/setup.sh installs it)"
  done
fi

BIN=$ROOT/target/$PROFILE
# Always (a no-op when they are current): stale binaries would soak yesterday's code.
log "building the $PROFILE binaries"
if [ "$PROFILE" = release ]; then flags=(--release); else flags=(); fi
(cd "$ROOT" && cargo build "${flags[@]}" --workspace --bins) || die "cargo build failed"

# 0711: the worker runs as nobody and must reach the broker's socket in here to reconnect after a
# restart (the launcher gives the socket itself to the worker's group, mode 0660).
WORK=$(mktemp -d /tmp/vsound-soak.XXXXXX)
chmod 0711 "$WORK"
PW_PID="" WP_PID="" LAUNCHER_PID="" VM_PID=""
cleanup() {
  local pid
  for pid in "$VM_PID" "$LAUNCHER_PID" "$WP_PID" "$PW_PID"; do
    [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  done
  if [ -n "$KEEP" ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP PIPE

SINK=vsound-soak-sink
ENV=()
if [ "$BACKEND" = pipewire ]; then
  RUNTIME=$WORK/pw-run
  mkdir -m 0700 "$RUNTIME"
  ENV=(XDG_RUNTIME_DIR="$RUNTIME" PIPEWIRE_RUNTIME_DIR="$RUNTIME")
  # The tests' daemon config (a driver node and a null sink, no devices), with our sink's name.
  sed "s/node.name = vsound-test-sink/node.name = $SINK/" "$ROOT/tests/common/pipewire.conf" \
    > "$WORK/pipewire.conf"
  env "${ENV[@]}" pipewire -c "$WORK/pipewire.conf" </dev/null >"$WORK/pipewire.log" 2>&1 &
  PW_PID=$!
  for _ in $(seq 200); do [ -S "$RUNTIME/pipewire-0" ] && break; sleep 0.05; done
  [ -S "$RUNTIME/pipewire-0" ] || die "pipewire did not create its socket ($WORK/pipewire.log)"
  env "${ENV[@]}" wireplumber </dev/null >"$WORK/wireplumber.log" 2>&1 &
  WP_PID=$!
  sink_exists() {  # (pw-cli's whole output first: grep -q would cut it off with SIGPIPE)
    local nodes
    nodes=$(env "${ENV[@]}" pw-cli ls Node 2>/dev/null) || true
    [[ $nodes == *"\"$SINK\""* ]]
  }
  for _ in $(seq 100); do sink_exists && break; sleep 0.1; done
  sink_exists || die "the null sink never appeared"
fi

# One playback and one capture stream (the capture records the sink's monitor), both offering
# S16/S32 at 44.1/48 kHz, 1-2 channels: the guest driver then allows 4.6 ms to 160 ms periods
# at 48 kHz S16 stereo.
stream() {  # NAME DIRECTION [EXTRA LINE]
  printf '[[streams]]\nname = "%s"\ndirection = "%s"\nbackend = "%s"\n' "$1" "$2" "$BACKEND"
  printf 'formats = ["S16", "S32"]\nrates = [44100, 48000]\nchannels_min = 1\nchannels_max = 2\n'
  if [ "$BACKEND" = pipewire ]; then printf 'target_object = "%s"\n%s\n' "$SINK" "${3:-}"; fi
}
{ stream media output; stream mic input "capture_sink = true"; } > "$WORK/vsound.toml"

SOCK=$WORK/vm.sock
env "${ENV[@]}" RUST_LOG=${RUST_LOG:-info} "$BIN/vsound" run --socket "$SOCK" \
  --config "$WORK/vsound.toml" </dev/null >"$WORK/vsound.log" 2>&1 &
LAUNCHER_PID=$!

child() {  # NAME: the launcher's current child of that name, or nothing
  pgrep -P "$LAUNCHER_PID" -x "$1" 2>/dev/null | head -n 1 || true
}
# SAMPLE: "VmRSS RssAnon RssShmem fds threads maps" of PID (KiB, counts), or dashes if it is
# gone. VmRSS = RssAnon (heap, stacks) + RssFile (the binary's and libraries' pages) + RssShmem
# (shared memory: for the worker, the guest RAM it has touched and the rings).
sample() {
  local pid=$1 status rss anon shmem fds threads maps
  status=$(cat "/proc/$pid/status" 2>/dev/null) || status=""
  if [ -z "$pid" ] || [ -z "$status" ]; then echo "- - - - - -"; return; fi
  field() { awk -v k="$1:" '$1 == k { print $2 }' <<< "$status"; }
  rss=$(field VmRSS) anon=$(field RssAnon) shmem=$(field RssShmem) threads=$(field Threads)
  fds=$(ls "/proc/$pid/fd" 2>/dev/null | wc -l)
  maps=$(wc -l < "/proc/$pid/maps" 2>/dev/null) || maps=""
  echo "${rss:--} ${anon:--} ${shmem:--} ${fds:--} ${threads:--} ${maps:--}"
}

for _ in $(seq 100); do
  [ -S "$SOCK" ] && [ -n "$(child vsound-worker)" ] && [ -n "$(child vsound-broker)" ] && break
  kill -0 "$LAUNCHER_PID" 2>/dev/null || die "vsound run exited: $(tail -n 5 "$WORK/vsound.log")"
  sleep 0.1
done
[ -S "$SOCK" ] || die "vsound run did not create $SOCK"
WORKER=$(child vsound-worker)
[ -n "$WORKER" ] || die "the launcher has no worker child"
# The worker serves one VMM: whatever pid waits for it now must serve the whole VM run.
log "launcher $LAUNCHER_PID, worker $WORKER, broker $(child vsound-broker), backend $BACKEND"

CONSOLE=$WORK/console.log
: > "$CONSOLE"
VM_TIMEOUT=$((CYCLES * 20 + 180))
"$ROOT/tests/e2e/play.sh" --socket "$SOCK" --console "$CONSOLE" --timeout "$VM_TIMEOUT" \
  --file "$ROOT/tests/e2e/soak-guest.sh" -- "CYCLES=$CYCLES sh soak-guest.sh" \
  >/dev/null 2>"$WORK/play.err" &
VM_PID=$!
STARTED=$(date +%s)

SAMPLES=$WORK/samples.tsv
printf 'cycle\tplay\trec\tplay_s\trec_s\tworker\tw_rss\tw_anon\tw_shm\tw_fds\tw_thr\tw_maps\tbroker\tb_rss\tb_anon\tb_shm\tb_fds\tb_thr\tb_maps\n' \
  > "$SAMPLES"
RESTARTS=0 KILLS=0 FAILED_CYCLES=() MISSING_BROKER=0 WORKER_LOST="" DONE=""
BROKER_PIDS=("$(child vsound-broker)")
# Follows the console as the VM writes it: kills the broker mid-play on every K-th cycle and
# samples both processes at every end-of-cycle marker.
while IFS= read -r line; do
  line=${line%$'\r'}
  case "$line" in
    "@@SOAK play-start "*)
      read -r _ _ i _ <<< "$line"
      if [ "$RESTART_EVERY" -gt 0 ] && [ $((i % RESTART_EVERY)) -eq 0 ]; then
        sleep 0.8
        victim=$(child vsound-broker)
        if [ -n "$victim" ]; then
          kill -KILL "$victim"
          KILLS=$((KILLS + 1))
          log "cycle $i: killed broker $victim 0.8 s into aplay"
        else
          log "cycle $i: no broker to kill"
          MISSING_BROKER=$((MISSING_BROKER + 1))
        fi
      fi
      ;;
    "@@SOAK cycle "*)
      read -r _ _ i ps rs pt rt _ <<< "$line"
      w=$(child vsound-worker)
      b=$(child vsound-broker)
      if [ "$w" != "$WORKER" ] && [ -z "$WORKER_LOST" ]; then
        WORKER_LOST="at cycle $i the worker is '${w:-none}', not $WORKER"
        log "$WORKER_LOST"
      fi
      if [ -n "$b" ] && [ "${BROKER_PIDS[-1]}" != "$b" ]; then
        BROKER_PIDS+=("$b")
      fi
      [ "$ps" = 0 ] && [ "$rs" = 0 ] || FAILED_CYCLES+=("$i(aplay $ps, arecord $rs)")
      # The worker is sampled by its original pid: if it were replaced, its row shows "-".
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$i" "$ps" "$rs" "$pt" "$rt" \
        "$WORKER" "$(sample "$WORKER" | tr ' ' '\t')" "${b:--}" "$(sample "$b" | tr ' ' '\t')" \
        >> "$SAMPLES"
      ;;
    "@@SOAK done "*) DONE=$line ;;
  esac
done < <(tail -n +1 -F --pid="$VM_PID" "$CONSOLE" 2>/dev/null)
set +e
wait "$VM_PID"
VM_STATUS=$?
set -e
VM_PID=""
DURATION=$(( $(date +%s) - STARTED ))
RESTARTS=$(( ${#BROKER_PIDS[@]} - 1 ))
LAUNCHER_RESTARTS=$(grep -c 'broker exited' "$WORK/vsound.log" || true)

echo
echo "== samples (after each cycle; memory in KiB) =="
column -t -s $'\t' "$SAMPLES"

# Judging: first vs last third of the worker's samples (see TOLERANCE in the header).
mapfile -t ROWS < <(tail -n +2 "$SAMPLES")
N=${#ROWS[@]}
FAIL=()
[ -n "$WORKER_LOST" ] && FAIL+=("worker: $WORKER_LOST")
[ "$N" -eq "$CYCLES" ] || FAIL+=("the guest ran $N of $CYCLES cycles (VM status $VM_STATUS; $WORK/play.err)")
[ -n "$DONE" ] || FAIL+=("the guest never reported the end of its cycles")
[ ${#FAILED_CYCLES[@]} -eq 0 ] || FAIL+=("guest cycles failed: ${FAILED_CYCLES[*]}")
[ "$RESTARTS" -eq "$KILLS" ] || FAIL+=("$KILLS broker kills but $RESTARTS new brokers seen")
[ "$MISSING_BROKER" -eq 0 ] || FAIL+=("$MISSING_BROKER times no broker was running to kill")

column_of() {  # FIELD FIRST LAST: that column (1-based) of rows FIRST..LAST (0-based, exclusive)
  local f=$1 r
  for r in "${ROWS[@]:$2:$(($3 - $2))}"; do echo "$r" | cut -f "$f"; done
}
judge() {  # NAME FIELD SLACK
  local third=$(( N / 3 > 0 ? N / 3 : 1 )) first_max last_min
  first_max=$(column_of "$2" 0 "$third" | { grep -v '^-$' || true; } | sort -n | tail -n 1)
  last_min=$(column_of "$2" $((N - third)) "$N" | { grep -v '^-$' || true; } | sort -n | head -n 1)
  if [ -z "$first_max" ] || [ -z "$last_min" ]; then
    FAIL+=("worker $1: no samples"); return
  fi
  JUDGED+=("worker $1: first third max $first_max, last third min $last_min (slack $3)")
  [ "$last_min" -le $((first_max + $3)) ] \
    || FAIL+=("worker $1 grew: last third min $last_min > first third max $first_max + $3")
}
# Columns of samples.tsv (1-based): the worker's from W_RSS, the broker's from B_PID.
W_RSS=7 W_ANON=8 W_FDS=10 W_THR=11 W_MAPS=12 B_PID=13
JUDGED=()
if [ "$N" -gt 0 ]; then
  judge RssAnon $W_ANON 128
  judge fds $W_FDS 0
  judge threads $W_THR 0
  judge mappings $W_MAPS 0
fi

first() { echo "${ROWS[0]}" | cut -f "$1"; }
last() { echo "${ROWS[N - 1]}" | cut -f "$1"; }
ROW='%-7s %-12s %6s %6s %6s %6s %6s %6s %5s %5s %5s %5s %5s %5s\n'
row() {  # LABEL PID FIRST_COLUMN: start and end of the six sampled figures
  local c=$3 k cells=()
  for k in 0 1 2 3 4 5; do cells+=("$(first $((c + k)))" "$(last $((c + k)))"); done
  # shellcheck disable=SC2059
  printf "$ROW" "$1" "$2" "${cells[@]}"
}
echo
echo "== soak: $N cycles in ${DURATION} s (boot included), backend $BACKEND, $PROFILE binaries =="
if [ "$N" -gt 0 ]; then
  echo "start = after cycle 1, end = after cycle $(last 1); KiB"
  printf '%-7s %-12s %13s %13s %13s %11s %11s %11s\n' "" pid VmRSS RssAnon RssShmem fds \
    threads maps
  # shellcheck disable=SC2059
  printf "$ROW" "" "" start end start end start end start end start end start end
  row worker "$WORKER" $W_RSS
  row broker "$(first $B_PID)..$(last $B_PID)" $((B_PID + 1))
fi
echo "broker kills: $KILLS; new brokers seen: $RESTARTS; launcher logged $LAUNCHER_RESTARTS broker exits"
echo "guest cycles failed: ${#FAILED_CYCLES[@]}${FAILED_CYCLES[*]:+ (${FAILED_CYCLES[*]})}"
tr -d '\r' < "$CONSOLE" | grep -E '^(aplay|arecord):' | sort | uniq -c | sed 's/^ */guest said (times): /' \
  || true
if [ "$N" -gt 0 ]; then
  echo "aplay seconds (2 s of audio): $(column_of 4 0 "$N" | sort -n | head -n 1) to $(column_of 4 0 "$N" | sort -n | tail -n 1);" \
    "arecord seconds (1 s): $(column_of 5 0 "$N" | sort -n | head -n 1) to $(column_of 5 0 "$N" | sort -n | tail -n 1)"
fi
# The worker logs each reconnection: "broker back after a N ms gap (M failed attempts)".
GAPS=$(sed -n 's/.*broker back after a \([0-9]*\) ms gap.*/\1/p' "$WORK/vsound.log" | sort -n)
if [ -n "$GAPS" ]; then
  echo "worker reconnections: $(echo "$GAPS" | wc -l), gaps $(echo "$GAPS" | head -n 1) to" \
    "$(echo "$GAPS" | tail -n 1) ms"
fi
for j in "${JUDGED[@]+"${JUDGED[@]}"}"; do echo "$j"; done
if [ ${#FAIL[@]} -gt 0 ]; then
  for f in "${FAIL[@]}"; do echo "soak: FAIL: $f"; done
  KEEP=1
  exit 1
fi
echo "soak: ok"
