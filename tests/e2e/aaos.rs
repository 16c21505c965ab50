//! The shipped Android Automotive layout (`examples/aaos.toml`) in a real guest: 8 output buses
//! and a mic, each its own guest PCM device; two buses playing at once (media at Android's
//! 5.5 ms periods, a navigation prompt at its defaults half a second later) arrive bit-exact
//! (but for the known start residual, reported) at two different PipeWire sinks,
//! from nodes that carry their buses' media roles.

use std::time::Duration;

use crate::common::pipewire::PipeWire;
use crate::common::vsound::*;
use crate::guest::*;

const VM_TIMEOUT: Duration = Duration::from_secs(240);
const MEDIA_S: f64 = 3.0;
const NAVIGATION_S: f64 = 2.0;
/// Android's period: 5.5 ms at 48 kHz (1056 bytes of S16 stereo); 8 of them buffered (44 ms),
/// so that a guest under TCG on a loaded host keeps up.
const ANDROID_PERIOD_FRAMES: u32 = 264;

/// The buses the test listens to: (stream name, node name, the sink it is linked to).
const HEARD: [(&str, &str, &str); 2] = [
    ("media", "vsound-aaos-media", "vsound-aaos-media-sink"),
    (
        "navigation",
        "vsound-aaos-navigation",
        "vsound-aaos-navigation-sink",
    ),
];

/// examples/aaos.toml as shipped, with the two heard buses pinned to their sinks by node name;
/// the other buses and the mic on the null backend (nobody listens to them).
fn config_text() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/aaos.toml");
    let mut config: toml::Table = std::fs::read_to_string(path)
        .expect("examples/aaos.toml")
        .parse()
        .expect("examples/aaos.toml is TOML");
    let streams = config["streams"].as_array_mut().expect("a streams array");
    assert_eq!(streams.len(), 9, "8 buses and a mic");
    for stream in streams.iter_mut() {
        let stream = stream.as_table_mut().unwrap();
        let name = stream["name"].as_str().unwrap().to_owned();
        match HEARD.iter().find(|(bus, ..)| *bus == name) {
            Some((_, node, sink)) => {
                stream.insert("backend".into(), "pipewire".into());
                stream.insert("node_name".into(), (*node).into());
                stream.insert("target_object".into(), (*sink).into());
            }
            None => {
                stream.insert("backend".into(), "null".into());
            }
        }
    }
    config.to_string()
}

fn guest_script() -> String {
    format!(
        r#"
up() {{ cut -d' ' -f1 /proc/uptime; }}
aplay -l
echo "@@E2E playback-devices $(aplay -l | grep -c '^card 0: .* device [0-9]*:')"
echo "@@E2E capture-devices $(arecord -l | grep -c '^card 0: .* device [0-9]*:')"
echo "@@E2E line-out-jacks-on $(for i in 0 1 2 3 4 5 6 7; do amixer -c 0 cget iface=CARD,name='Line Out Jack',index=$i; done | grep -c ': values=on')"
echo "@@E2E mic-jack $(amixer -c 0 cget iface=CARD,name='Mic Jack' | grep ': values=')"
echo "@@E2E play-start $(up)"
aplay -q -D hw:0,0 --period-size={p} --buffer-size={b} media.wav &
media=$!
# The navigation prompt comes while media plays (as in a car; starting both in the same instant
# is the known quantum-switch residual at a stream's start, README "Known residuals").
sleep 0.5
aplay -q -D hw:0,1 navigation.wav &
navigation=$!
wait $media || exit 21
echo "@@E2E media-end $(up)"
wait $navigation || exit 22
echo "@@E2E navigation-end $(up)"
"#,
        p = ANDROID_PERIOD_FRAMES,
        b = 8 * ANDROID_PERIOD_FRAMES,
    )
}

#[test]
fn eight_aaos_buses_each_a_device_two_at_once_bit_exact_at_their_sinks() {
    let _one = crate::guest::one_guest_test_at_a_time();
    require_qemu();
    let cache = cache_dir();
    build_guest(&cache);

    let dir = tempfile::tempdir().unwrap();
    let pw = PipeWire::start(dir.path());
    for (_, _, sink) in HEARD {
        create_null_sink(&pw, sink);
    }
    let media = signal(MEDIA_S, 41);
    let navigation = signal(NAVIGATION_S, 42);
    let files = dir.path().join("in");
    std::fs::create_dir(&files).unwrap();
    write_wav_s16(&files.join("media.wav"), 2, 48000, &media);
    write_wav_s16(&files.join("navigation.wav"), 2, 48000, &navigation);

    let config = dir.path().join("vsound.toml");
    std::fs::write(&config, config_text()).unwrap();
    let (mut broker, broker_socket) = spawn_broker_with_env(dir.path(), Some(&config), &pw.env());
    let (mut worker, socket) = spawn_worker(dir.path(), "vm", &broker_socket, Some(&config));
    let recordings: Vec<_> = HEARD
        .iter()
        .map(|(bus, _, sink)| {
            let path = dir.path().join(format!("{bus}.raw"));
            (pw.record_monitor(sink, &path), path)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));

    let wavs = [files.join("media.wav"), files.join("navigation.wav")];
    let spec = VmSpec {
        files: &wavs,
        out: None,
        cache: &cache,
        timeout: VM_TIMEOUT,
        tmp: dir.path(),
    };
    let mut vm = Vm::start(&socket, &spec, &guest_script());
    let deadline = vm.started + VM_TIMEOUT + Duration::from_secs(30);
    // While both play: each heard bus's node carries its bus's role.
    let roles: Vec<String> = if vm.wait_for("@@E2E play-start", deadline) {
        std::thread::sleep(Duration::from_millis(500));
        HEARD
            .iter()
            .map(|(_, node, _)| pw.node_info(node))
            .collect()
    } else {
        Vec::new()
    };
    let (status, _) = vm.finish(deadline);
    let lines = &vm.console;
    let console = vm.console_text();
    assert!(
        broker.is_running(),
        "the broker died during the guest's run"
    );
    assert!(
        status.success(),
        "the guest run failed ({status}):\n{console}"
    );

    let count = |name: &str| -> u32 {
        let line = marker(lines, name).unwrap_or_else(|| panic!("no {name} marker:\n{console}"));
        line.text.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert_eq!(count("playback-devices"), 8, "aplay -l:\n{console}");
    assert_eq!(count("capture-devices"), 1, "arecord -l:\n{console}");
    // A jack per bus, each following its bus's host end: all there (the heard buses' sinks
    // exist, the null backend is always there; tests/e2e/controls.rs unplugs one).
    assert_eq!(count("line-out-jacks-on"), 8, "jacks:\n{console}");
    let mic = marker(lines, "mic-jack").unwrap_or_else(|| panic!("no mic-jack:\n{console}"));
    assert!(mic.text.ends_with("values=on"), "{:?}", mic.text);

    assert_eq!(
        roles.len(),
        HEARD.len(),
        "the guest never started playing:\n{console}"
    );
    for ((_, node, _), info) in HEARD.iter().zip(&roles) {
        let role = if *node == "vsound-aaos-media" {
            "Music"
        } else {
            "Navigation"
        };
        assert!(
            info.contains(&format!("media.role = \"{role}\"")),
            "{node} does not carry media.role {role}:\n{info}"
        );
    }

    // Media at 264-frame periods is paced: its 3 s take 3 s, not less.
    assert_paced(
        "media at 264-frame periods",
        MEDIA_S,
        span(lines, "play-start", "media-end", &console),
    );
    std::thread::sleep(Duration::from_millis(300));
    for ((bus, ..), (recording, path)) in HEARD.iter().zip(recordings) {
        drop(recording);
        let data = if *bus == "media" { &media } else { &navigation };
        let recorded = std::fs::read(&path).unwrap();
        // The known start residual is let through (and reported) by assert_arrived.
        assert_arrived(bus, &recorded, data);
    }
    // The VM powered off: its worker leaves by itself.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while worker.is_running() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!worker.is_running(), "the worker outlived its VM");
}
