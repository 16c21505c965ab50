//! The host command's protocol (`vsound ctl`): one JSON request line to the broker's control
//! socket, one JSON reply line back, then the broker closes. The socket is the host's, not a
//! VM's: its file mode (0660, the admin group) decides who may connect; the broker serves one
//! request at a time, off its control loop, and bounds what it reads.

#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The longest request line the broker reads.
pub const MAX_REQUEST_BYTES: u64 = 4096;
/// The longest reply line a client reads (a list of every VM's streams).
pub const MAX_REPLY_BYTES: u64 = 4 << 20;
/// How long either side waits for the other's line.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Where the shipped units put the control socket.
pub const DEFAULT_SOCKET: &str = "/run/vsound-admin/control.sock";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Every connected VM with its streams.
    List,
    /// A bus's volume on the guest's control scale (0..=100, 0.5 dB steps from -50 dB).
    SetVolume {
        vm: String,
        bus: String,
        volume: u32,
    },
    SetMute {
        vm: String,
        bus: String,
        mute: bool,
    },
    /// Every output bus of the VM at once.
    MuteAll {
        vm: String,
        mute: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reply {
    Vms(Vec<VmStatus>),
    /// A change was made (and the guests that have controls were told).
    Done,
    Error(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmStatus {
    pub vm: String,
    /// The broker's number for the VM's worker connection.
    pub connection: u32,
    /// The worker's uid (SO_PEERCRED).
    pub uid: u32,
    pub streams: Vec<StreamStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamStatus {
    pub id: u32,
    pub name: String,
    /// "output" or "input".
    pub direction: String,
    pub backend: String,
    /// "released", "prepared" or "running".
    pub state: String,
    pub xruns: u64,
    /// Frames queued between the guest and the host's device (the ring plus the backend's
    /// delay), in microseconds; none while released.
    pub latency_us: Option<u64>,
    pub volume: u32,
    pub mute: bool,
    /// Whether the stream's host end (its PipeWire target, its ALSA device) is there.
    pub host_present: bool,
    /// Whether the guest has controls for it (and sees host changes).
    pub controls: bool,
}

/// Sends `request` to the control socket at `path` and returns the broker's reply.
pub fn request(path: &Path, request: &Request) -> Result<Reply, String> {
    let mut stream = UnixStream::connect(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            format!(
                "{}: {e}: the control socket is for root and the broker's admin group",
                path.display()
            )
        } else {
            format!(
                "{}: {e} (is the broker running with --control-socket?)",
                path.display()
            )
        }
    })?;
    let io = |e: std::io::Error| format!("{}: {e}", path.display());
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
    let mut line = serde_json::to_string(request).map_err(|e| e.to_string())?;
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    let mut reply = String::new();
    BufReader::new(stream.take(MAX_REPLY_BYTES))
        .read_line(&mut reply)
        .map_err(io)?;
    if reply.is_empty() {
        return Err(format!(
            "{}: the broker closed without a reply",
            path.display()
        ));
    }
    serde_json::from_str(&reply).map_err(|e| format!("the broker's reply: {e}"))
}

/// Parses a request line as the broker reads it.
pub fn parse_request(line: &str) -> Result<Request, String> {
    serde_json::from_str(line.trim_end()).map_err(|e| format!("bad request: {e}"))
}

/// A reply as the line the broker sends.
pub fn reply_line(reply: &Reply) -> String {
    let mut line = serde_json::to_string(reply)
        .unwrap_or_else(|e| format!(r#"{{"error":"cannot encode the reply: {e}"}}"#));
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_json_lines_and_bad_ones_are_refused() {
        let line = serde_json::to_string(&Request::SetVolume {
            vm: "ivi".into(),
            bus: "navigation".into(),
            volume: 80,
        })
        .unwrap();
        assert_eq!(
            line,
            r#"{"command":"set-volume","vm":"ivi","bus":"navigation","volume":80}"#
        );
        assert_eq!(
            parse_request(&format!("{line}\n")).unwrap(),
            Request::SetVolume {
                vm: "ivi".into(),
                bus: "navigation".into(),
                volume: 80
            }
        );
        assert_eq!(
            parse_request(r#"{"command":"list"}"#).unwrap(),
            Request::List
        );
        for bad in [
            "",
            "list",
            r#"{"command":"reboot"}"#,
            r#"{"command":"set-mute","vm":"ivi","bus":"media"}"#,
            r#"{"command":"set-volume","vm":"ivi","bus":"media","volume":-1}"#,
            r#"{"command":"mute-all","vm":"ivi","mute":true,"all":1}"#,
        ] {
            assert!(parse_request(bad).is_err(), "{bad}");
        }
        let reply = reply_line(&Reply::Error("no VM \"x\"".into()));
        assert_eq!(reply, "{\"error\":\"no VM \\\"x\\\"\"}\n");
    }
}
