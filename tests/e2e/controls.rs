//! The guest's mixer controls in a real guest (QEMU with `controls=on`): `amixer` lists the
//! bus's volume and switch with their dB scale; `amixer sset` of the bus to 50 % sets its
//! PipeWire node's channelVolumes to -25 dB; muted, a known signal leaves only silence at the
//! sink; unmuted at 100 % it arrives bit-exact; a volume set on PipeWire's side reaches the
//! guest as a control event and its next read. A bus's jack follows its PipeWire target: the
//! guest's "Headphone Jack" goes on when the host creates the sink and off when it goes.

use std::time::{Duration, Instant};

use crate::common::pipewire::{find, PipeWire};
use crate::common::vsound::*;
use crate::guest::*;

const CONFIG: &str = r#"
controls = true
[[streams]]
name = "media"
direction = "output"
backend = "pipewire"
formats = ["S16"]
rates = [48000]
node_name = "vsound-e2e-ctl-media"
target_object = "vsound-test-sink"
[[streams]]
name = "alerts"
direction = "output"
backend = "pipewire"
hda_fn_nid = 1
formats = ["S16"]
rates = [48000]
target_object = "vsound-e2e-jack-sink"
[[jacks]]
name = "Media Out"
hda_reg_defconf = 0x01014010
follows = "media"
# A headphone jack (device 2 in the HDA pin config): the guest names it "Headphone Jack".
[[jacks]]
name = "Alerts Out"
hda_fn_nid = 1
hda_reg_defconf = 0x02214020
follows = "alerts"
"#;

/// The PipeWire sink the alerts bus targets, created and destroyed by the test.
const JACK_SINK: &str = "vsound-e2e-jack-sink";

const NODE: &str = "vsound-e2e-ctl-media";

const SCRIPT: &str = r#"
echo "@@E2E controls"
amixer -c 0 controls || exit 50
amixer -c 0 cget name='Media Playback Volume' || exit 51
amixer -c 0 sget Media || exit 52
amixer -c 0 -q sset Media 50% || exit 53
aplay -q -D hw:0,0 half.wav &
PL=$!
echo "@@E2E half-playing"
wait $PL || exit 54
amixer -c 0 -q sset Media 100% mute || exit 55
amixer -c 0 cget name='Media Playback Switch'
echo "@@E2E muted-start"
aplay -q -D hw:0,0 muted.wav || exit 56
echo "@@E2E muted-end"
amixer -c 0 -q sset Media unmute || exit 57
aplay -q -D hw:0,0 loud.wav || exit 58
# Its lines ("event value: numid=...") go to the console as they come.
amixer -c 0 events &
EV=$!
aplay -q -D hw:0,0 long.wav &
PL=$!
sleep 1
echo "@@E2E host-change"
i=0
v=""
while [ $i -lt 60 ]; do
  v=$(amixer -c 0 cget name='Media Playback Volume' | grep ': values=')
  case "$v" in *=88) break ;; esac
  usleep 100000
  i=$((i + 1))
done
echo "@@E2E guest-sees $v"
wait $PL
kill $EV
jack() { amixer -c 0 cget iface=CARD,name='Headphone Jack' | grep ': values='; }
# Waits (up to 10 s) for the jack to read $1.
jack_is() {
  i=0
  while [ $i -lt 100 ]; do
    case "$(jack)" in *=$1) return 0 ;; esac
    usleep 100000
    i=$((i + 1))
  done
  return 1
}
echo "@@E2E jack-start $(jack)"
jack_is on
echo "@@E2E jack-plugged $(jack)"
jack_is off
echo "@@E2E jack-unplugged $(jack)"
"#;

#[test]
fn guest_mixer_controls_set_the_pipewire_node_and_see_its_changes() {
    let _one = crate::guest::one_guest_test_at_a_time();
    require_qemu();
    let cache = cache_dir();
    build_guest(&cache);
    let dir = tempfile::tempdir().unwrap();
    let pw = PipeWire::start(dir.path());
    let files = dir.path().join("in");
    std::fs::create_dir(&files).unwrap();
    let half = signal(2.0, 31);
    let muted = signal(2.0, 32);
    let loud = signal(2.0, 33);
    let long = signal(6.0, 34);
    let names = ["half.wav", "muted.wav", "loud.wav", "long.wav"];
    for (name, data) in names.iter().zip([&half, &muted, &loud, &long]) {
        write_wav_s16(&files.join(name), 2, RATE, data);
    }
    let config = dir.path().join("vsound.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let (mut broker, broker_socket) = spawn_broker_with_env(dir.path(), Some(&config), &pw.env());
    let (_worker, socket) = spawn_worker(dir.path(), "vm", &broker_socket, Some(&config));
    let sink_raw = dir.path().join("sink.raw");
    let recorder = pw.record_sink(&sink_raw);
    std::thread::sleep(Duration::from_millis(300));

    let files: Vec<_> = names.iter().map(|n| files.join(n)).collect();
    let timeout = Duration::from_secs(240);
    let spec = VmSpec {
        files: &files,
        out: None,
        cache: &cache,
        timeout,
        tmp: dir.path(),
    };
    let mut vm = Vm::start(&socket, &spec, SCRIPT);
    let deadline = vm.started + timeout + Duration::from_secs(30);
    // amixer sset Media 50%: the raw middle of 0..=100, -25 dB, on the node while it plays.
    assert!(
        vm.wait_for("@@E2E half-playing", deadline),
        "{}",
        vm.console_text()
    );
    let at_50 = 10f32.powf(-25.0 / 20.0);
    let seen = wait_for_node(&pw, |v, m| {
        !m && !v.is_empty() && v.iter().all(|x| (x - at_50).abs() < 1e-4)
    });
    println!("amixer sset Media 50%: the node's channelVolumes {seen:?}");
    // A change on PipeWire's side while the guest plays.
    assert!(
        vm.wait_for("@@E2E host-change", deadline),
        "{}",
        vm.console_text()
    );
    wait_for_node(&pw, |v, m| !m && v.iter().all(|&x| x == 1.0));
    std::thread::sleep(Duration::from_millis(300));
    pw.set_node_props(NODE, "{ channelVolumes: [ 0.5, 0.5 ] }");
    // The alerts bus's sink plugged in, then out.
    assert!(
        vm.wait_for("@@E2E jack-start", deadline),
        "{}",
        vm.console_text()
    );
    pw.create_sink(JACK_SINK);
    assert!(
        vm.wait_for("@@E2E jack-plugged", deadline),
        "{}",
        vm.console_text()
    );
    pw.destroy_node(JACK_SINK);
    let (status, _) = vm.finish(deadline);
    drop(recorder);
    let console = vm.console_text();
    assert!(broker.is_running(), "the broker died");
    assert!(
        status.success(),
        "the guest run failed ({status}):\n{console}"
    );

    // What amixer shows.
    for want in [
        "name='Media Playback Volume'",
        "name='Media Playback Switch'",
        "type=INTEGER,access=rw---R--,values=1,min=0,max=100,step=1",
        "dBscale-min=-50.00dB,step=0.50dB,mute=1",
        "Simple mixer control 'Media',0",
    ] {
        assert!(
            console.contains(want),
            "amixer did not show {want:?}:\n{console}"
        );
    }
    // The jack was off without its sink, on with it, off again.
    for (marker, want) in [
        ("jack-start", "values=off"),
        ("jack-plugged", "values=on"),
        ("jack-unplugged", "values=off"),
    ] {
        let line = vm.marker(marker).unwrap_or_else(|| panic!("no {marker}"));
        assert!(
            line.text.ends_with(want),
            "{marker}: the guest's Headphone Jack reads {:?}:\n{console}",
            line.text
        );
    }
    // The guest saw the host's 0.5 (-6.02 dB) as step 88, and was told of it.
    let sees = vm.marker("guest-sees").expect("no guest-sees marker");
    assert!(
        sees.text.ends_with("values=88"),
        "the guest reads {:?} after the host set 0.5",
        sees.text
    );
    assert!(
        console
            .lines()
            .any(|l| l.contains("event value:") && l.contains("Media Playback Volume")),
        "no control event reached the guest's amixer:\n{console}"
    );
    // Muted: the signal never reached the sink; unmuted at 100 %: bit-exact.
    let recording = std::fs::read(&sink_raw).unwrap();
    assert!(!recording.is_empty());
    for at in [RATE as usize / 2, RATE as usize, 3 * RATE as usize / 2] {
        let chunk = &muted[at * FRAME..at * FRAME + 960 * FRAME];
        assert!(
            find(&recording, chunk, FRAME).is_none(),
            "the muted bus's signal reached the sink"
        );
    }
    assert_arrived("aplay at 100 % after unmute", &recording, &loud);
}

/// Polls the node's volume props until `want` holds (10 s at most).
fn wait_for_node(pw: &PipeWire, want: impl Fn(&[f32], bool) -> bool) -> (Vec<f32>, bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = pw.node_volume(NODE);
        if let Some((volumes, mute)) = &now {
            if want(volumes, *mute) {
                return (volumes.clone(), *mute);
            }
        }
        assert!(Instant::now() < deadline, "node {NODE}: {now:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
