#!/bin/sh
# The guest side of scripts/soak.sh: CYCLES open/play/close cycles on hw:0,0, each a 2 s aplay
# of silence then a 1 s arecord, cycling through formats, rates, channel counts, period and
# buffer sizes. Markers for the host (one line each, fields separated by spaces):
#   @@SOAK play-start I UPTIME PARAMS   aplay of cycle I begins (the host may kill the broker now)
#   @@SOAK cycle I PLAY_STATUS REC_STATUS PLAY_S REC_S UPTIME
#                                       cycle I ended: aplay's and arecord's exit statuses and
#                                       how long each took (guest clock)
#   @@SOAK done FAILED                  all cycles ran; FAILED of them had a non-zero status
# Run by play.sh as `CYCLES=N sh soak-guest.sh`; exits 0 only if every cycle succeeded.
CYCLES=${CYCLES:-40}
up() { cut -d' ' -f1 /proc/uptime; }
# Seconds between two uptime readings, to the centisecond (busybox sh has integer arithmetic).
cs() { echo "$1" | tr -d .; }
secs() { d=$(( $(cs "$2") - $(cs "$1") )); echo "$((d / 100)).$(printf %02d $((d % 100)))"; }

# FORMAT RATE CHANNELS PERIOD_FRAMES BUFFER_FRAMES: from 5.5 ms periods (Android's 1056-byte
# period) to 80 ms, 2 to 8 periods per buffer, within the limits the guest driver derives from
# the streams scripts/soak.sh configures (S16/S32, 44.1/48 kHz, 1-2 channels).
SHAPES="S16_LE:48000:2:264:1056
S16_LE:48000:2:480:1920
S32_LE:48000:2:960:3840
S16_LE:44100:1:1764:7056
S16_LE:48000:2:3840:7680
S32_LE:44100:2:441:3528
S16_LE:48000:1:1920:3840
S32_LE:48000:1:240:1920"
NSHAPES=$(echo "$SHAPES" | wc -l)

failed=0
i=1
while [ "$i" -le "$CYCLES" ]; do
  play=$(echo "$SHAPES" | sed -n "$(( (i - 1) % NSHAPES + 1 ))p")
  rec=$(echo "$SHAPES" | sed -n "$(( (i + 2) % NSHAPES + 1 ))p")
  IFS=: read -r pf pr pc pp pb <<EOF
$play
EOF
  IFS=: read -r rf rr rc rp rb <<EOF
$rec
EOF
  t0=$(up)
  echo "@@SOAK play-start $i $t0 $play"
  aplay -q -D hw:0,0 -t raw -f "$pf" -r "$pr" -c "$pc" --period-size="$pp" --buffer-size="$pb" \
    -d 2 /dev/zero
  ps=$?
  t1=$(up)
  arecord -q -D hw:0,0 -t raw -f "$rf" -r "$rr" -c "$rc" --period-size="$rp" \
    --buffer-size="$rb" -d 1 /tmp/rec.raw
  rs=$?
  t2=$(up)
  [ "$ps" = 0 ] && [ "$rs" = 0 ] || failed=$((failed + 1))
  echo "@@SOAK cycle $i $ps $rs $(secs "$t0" "$t1") $(secs "$t1" "$t2") $t2"
  i=$((i + 1))
done
echo "@@SOAK done $failed"
# The last period is still in the backend when arecord returns; give the host a moment to take
# its last sample before the VM powers off (and the worker exits with it).
sleep 1
[ "$failed" = 0 ]
