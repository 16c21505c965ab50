//! The deployment examples in `examples/`: the libvirt domain validates against libvirt's own
//! schema and names what the shipped units and the worker need (the socket of
//! `vsound-worker@vm1.socket`, shared memfd memory, the device with controls).

use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn libvirt_example() -> (PathBuf, String) {
    let path = repo().join("examples/libvirt-domain.xml");
    let text = std::fs::read_to_string(&path).expect("examples/libvirt-domain.xml");
    (path, text)
}

/// libvirt-clients' `virt-xml-validate` (xmllint against the RNG schema of the installed
/// libvirt; scripts/setup.sh installs both); skipped, saying so, where it is not installed.
#[test]
fn the_libvirt_example_validates_against_libvirts_schema() {
    let (path, _) = libvirt_example();
    let out = match Command::new("virt-xml-validate").arg(&path).output() {
        Ok(out) => out,
        Err(e) => {
            println!(
                "SKIPPED: virt-xml-validate cannot run ({e}): apt-get install libvirt-clients \
                 libxml2-utils"
            );
            return;
        }
    };
    assert!(
        out.status.success(),
        "{} does not validate against libvirt's schema ({}):\n{}{}",
        path.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of every `<qemu:arg value='...'/>`, in order.
fn qemu_args(xml: &str) -> Vec<&str> {
    xml.split("<qemu:arg value='")
        .skip(1)
        .map(|rest| &rest[..rest.find("'/>").expect("a closed qemu:arg")])
        .collect()
}

#[test]
fn the_libvirt_example_attaches_the_worker_socket_with_shared_memory_and_controls() {
    let (_, xml) = libvirt_example();
    for needed in [
        "<source type='memfd'/>",
        "<access mode='shared'/>",
        "xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'",
    ] {
        assert!(xml.contains(needed), "the libvirt example lacks {needed}");
    }

    let unit = std::fs::read_to_string(repo().join("systemd/vsound-worker@.socket")).unwrap();
    let listen = unit
        .lines()
        .find_map(|l| l.strip_prefix("ListenStream="))
        .expect("vsound-worker@.socket has a ListenStream=");
    let socket = listen.replace("%i", "vm1");

    let args = qemu_args(&xml);
    let chardev = args
        .windows(2)
        .find(|w| w[0] == "-chardev")
        .map(|w| w[1])
        .expect("a -chardev argument");
    let options: Vec<&str> = chardev.split(',').collect();
    assert_eq!(options[0], "socket", "-chardev {chardev}");
    assert!(
        options.contains(&format!("path={socket}").as_str()),
        "-chardev {chardev} is not vsound-worker@vm1.socket's {socket}"
    );
    assert!(
        !options.iter().any(|o| o.starts_with("reconnect")),
        "-chardev {chardev}: QEMU 10 cannot reconnect a vhost-user-snd backend"
    );
    let id = options
        .iter()
        .find_map(|o| o.strip_prefix("id="))
        .expect("a chardev id");

    let device = args
        .windows(2)
        .find(|w| w[0] == "-device")
        .map(|w| w[1])
        .expect("a -device argument");
    // JSON, so that QEMU creates it after libvirt's own (JSON) devices.
    let device: serde_json::Value = serde_json::from_str(device)
        .unwrap_or_else(|e| panic!("-device {device} is not QEMU's JSON syntax: {e}"));
    assert_eq!(device["driver"], "vhost-user-snd-pci", "-device {device}");
    assert_eq!(device["chardev"], id, "-device {device}");
    assert_eq!(device["controls"], true, "-device {device}");
}
