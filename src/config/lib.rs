//! The device's TOML configuration: jacks, streams, channel maps and limits.
//!
//! The same file is read by the worker (what the guest sees) and the broker (which backend serves
//! each stream). Everything is validated at load time so that the running device can trust it.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use virtio_snd::control::{DeviceLayout, PcmCaps};
use virtio_snd::ctl::{self, ControlSpec};
use virtio_snd::protocol::{self, chmap, format};

/// Upper bounds that keep every table and allocation small, whatever the config says.
pub const MAX_STREAMS: usize = 32;
pub const MAX_JACKS: usize = 32;
/// Enough for every stream on a device of its own with every standard layout (mono to 7.1),
/// so the generated maps always fit.
pub const MAX_CHMAPS: usize = MAX_STREAMS * STANDARD_LAYOUTS.len();
pub const MAX_NAME_LEN: usize = 64;
/// Longest VM name (`--vm`, `[vms.NAME]`).
pub const MAX_VM_NAME_LEN: usize = 32;
/// Longest `gst_pipeline` description, in bytes.
pub const MAX_GST_PIPELINE_LEN: usize = 4096;
/// The `gst_pipeline` a stream gets when it gives none.
pub const DEFAULT_GST_PLAYBACK: &str = "autoaudiosink";
pub const DEFAULT_GST_CAPTURE: &str = "autoaudiosrc";
/// Placeholders a `wav_path` may hold, in its file name only.
pub const WAV_PLACEHOLDERS: [&str; 2] = ["{vm}", "{client}"];

/// What a VM name may be, for error messages.
pub const VM_NAME_RULE: &str =
    "1 to 32 characters of A-Z, a-z, 0-9, '_' and '-', starting with a letter or digit";

/// A VM's name: `--vm` of its worker, sent in its Hello, the key of its `[vms.NAME]` table,
/// part of its PipeWire node names and WAV file names. The charset keeps it a single path
/// component (no '/', no '.', so never `..`) and a plain token in node names and logs; a worker
/// can send any bytes, so the broker builds one only through [`VmName::new`]. `Copy` (inline
/// bytes) so that it travels with each stream's spec.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VmName {
    len: u8,
    bytes: [u8; MAX_VM_NAME_LEN],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid VM name {shown}: a VM name is {VM_NAME_RULE}")]
pub struct VmNameError {
    /// The name as given, escaped and clipped (it may come from an untrusted worker).
    shown: String,
}

impl VmName {
    pub fn new(name: &str) -> Result<VmName, VmNameError> {
        let ok_char = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'-';
        let raw = name.as_bytes();
        let valid = !raw.is_empty()
            && raw.len() <= MAX_VM_NAME_LEN
            && raw[0].is_ascii_alphanumeric()
            && raw.iter().all(|&c| ok_char(c));
        if !valid {
            let mut shown = format!("{name:?}");
            if shown.len() > 2 * MAX_VM_NAME_LEN {
                let mut end = 2 * MAX_VM_NAME_LEN;
                while !shown.is_char_boundary(end) {
                    end -= 1;
                }
                shown.truncate(end);
                shown.push_str("...");
            }
            return Err(VmNameError { shown });
        }
        let mut bytes = [0u8; MAX_VM_NAME_LEN];
        bytes[..raw.len()].copy_from_slice(raw);
        Ok(VmName {
            len: raw.len() as u8,
            bytes,
        })
    }

    pub fn as_str(&self) -> &str {
        // ASCII by construction, so this never fails.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl std::str::FromStr for VmName {
    type Err = VmNameError;
    fn from_str(s: &str) -> Result<VmName, VmNameError> {
        VmName::new(s)
    }
}

impl std::fmt::Display for VmName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for VmName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VmName({:?})", self.as_str())
    }
}

/// Why a config cannot be used. Shown as `FILE:LINE: FIELD: PROBLEM`, with the bad value and
/// the valid ones: `vsound.toml:3: streams[0].rates: 12345 is not a supported rate (supported:
/// 5512, 8000, ...)`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// Not TOML, or not this schema (an unknown field, a value of the wrong type).
    #[error("{}{message}", place(.file, .line))]
    Parse {
        file: Option<PathBuf>,
        line: Option<usize>,
        message: String,
    },
    /// A value the device cannot use, at `field` (a path such as `streams[0].rates`).
    #[error("{}{field}: {problem}", place(.file, .line))]
    Invalid {
        file: Option<PathBuf>,
        line: Option<usize>,
        field: String,
        problem: String,
    },
}

impl ConfigError {
    fn invalid(field: &str, problem: impl ToString) -> ConfigError {
        ConfigError::Invalid {
            file: None,
            line: None,
            field: field.to_string(),
            problem: problem.to_string(),
        }
    }

    /// The same error, found in `path`.
    fn in_file(mut self, path: &Path) -> ConfigError {
        if let ConfigError::Parse { file, .. } | ConfigError::Invalid { file, .. } = &mut self {
            *file = Some(path.to_owned());
        }
        self
    }

    /// The same error with the line of its field in `text`, where it can be found.
    fn with_line(mut self, text: &str) -> ConfigError {
        if let ConfigError::Invalid { line, field, .. } = &mut self {
            *line = field_line(text, field);
        }
        self
    }
}

/// `FILE:LINE: `, or as much of it as is known.
fn place(file: &Option<PathBuf>, line: &Option<usize>) -> String {
    match (file, line) {
        (Some(file), Some(line)) => format!("{}:{line}: ", file.display()),
        (Some(file), None) => format!("{}: ", file.display()),
        (None, Some(line)) => format!("line {line}: "),
        (None, None) => String::new(),
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The line of `field` (`vms.navi.streams[0].rates`) in `text`: its key's, or its nearest
/// ancestor's that the text spells out (a value the defaults filled in has none of its own).
fn field_line(text: &str, field: &str) -> Option<usize> {
    use toml_edit::{Item, TableLike, Value};
    let document = toml_edit::ImDocument::parse(text).ok()?;
    let mut table: &dyn TableLike = document.as_table();
    let mut found = None;
    for segment in field.split('.') {
        let (name, index) = match segment.split_once('[') {
            Some((name, rest)) => (name, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (segment, None),
        };
        let Some((key, item)) = table.get_key_value(name) else {
            break;
        };
        found = key.span().or(found);
        let item = match (item, index) {
            (Item::ArrayOfTables(tables), Some(i)) => match tables.get(i) {
                Some(entry) => {
                    found = entry.span().or(found);
                    table = entry;
                    continue;
                }
                None => break,
            },
            (Item::Value(Value::Array(values)), Some(i)) => match values.get(i) {
                Some(value) => {
                    found = value.span().or(found);
                    match value.as_inline_table() {
                        Some(entry) => {
                            table = entry;
                            continue;
                        }
                        None => break,
                    }
                }
                None => break,
            },
            (item, None) => item,
            _ => break,
        };
        match item.as_table_like() {
            Some(next) => table = next,
            None => break,
        }
    }
    found.map(|span| line_of(text, span.start))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Output,
    Input,
}

impl Direction {
    pub fn wire(self) -> u8 {
        match self {
            Direction::Output => protocol::D_OUTPUT,
            Direction::Input => protocol::D_INPUT,
        }
    }
}

impl BackendKind {
    /// Its name in the config and on command lines.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Auto => "auto",
            BackendKind::Pipewire => "pipewire",
            BackendKind::Alsa => "alsa",
            BackendKind::Null => "null",
            BackendKind::Wav => "wav",
            BackendKind::Gstreamer => "gstreamer",
        }
    }
}

/// `--backend NAME`: the names the config takes, and its list of them in the error.
impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(name: &str) -> Result<BackendKind, String> {
        use serde::de::IntoDeserializer;
        let name: serde::de::value::StrDeserializer<serde::de::value::Error> =
            name.into_deserializer();
        BackendKind::deserialize(name).map_err(|e| e.to_string())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// PipeWire if a daemon answers, otherwise ALSA's default PCM if it opens, otherwise `null`.
    Auto,
    /// A PipeWire stream per virtio stream.
    Pipewire,
    /// An ALSA PCM per virtio stream (`alsa_device`, default `default`).
    Alsa,
    /// Consumes playback and produces silent capture at the stream's real-time rate.
    Null,
    /// Writes playback to a WAV file and reads capture from one, at the real-time rate.
    Wav,
    /// A GStreamer pipeline per virtio stream (`gst_pipeline`, default `autoaudiosink` for
    /// output and `autoaudiosrc` for input), fed by an appsrc or drained by an appsink,
    /// paced by the pipeline's clock. In the broker only.
    Gstreamer,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JackConfig {
    pub name: String,
    #[serde(default)]
    pub hda_fn_nid: u32,
    /// HDA pin default configuration register.
    #[serde(default)]
    pub hda_reg_defconf: u32,
    /// HDA pin capabilities register.
    #[serde(default)]
    pub hda_reg_caps: u32,
    #[serde(default = "yes")]
    pub connected: bool,
    /// Whether the guest may remap the jack (VIRTIO_SND_JACK_F_REMAP).
    #[serde(default)]
    pub remap: bool,
    /// The stream (by name) whose host end the jack follows: connected while the stream's
    /// backend has somewhere to play or record (its PipeWire target node exists, or any sink or
    /// source when it names none; its ALSA device opens), with JACK_CONNECTED/DISCONNECTED
    /// events on changes (and `connected` is not used). Without it the jack stays
    /// `connected`.
    #[serde(default)]
    pub follows: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    pub name: String,
    pub direction: Direction,
    /// Streams with the same value become substreams of one guest PCM device.
    #[serde(default)]
    pub hda_fn_nid: u32,
    #[serde(default = "default_formats")]
    pub formats: Vec<String>,
    #[serde(default = "default_rates")]
    pub rates: Vec<u32>,
    #[serde(default = "one")]
    pub channels_min: u8,
    #[serde(default = "eight")]
    pub channels_max: u8,
    #[serde(default = "default_backend")]
    pub backend: BackendKind,
    /// For the `wav` backend: the file to write (output) or read (input). In its file name,
    /// `{vm}` is replaced by the VM's name (stable across worker restarts) and `{client}` by the
    /// broker's number for the connection (a new one at every worker restart).
    #[serde(default)]
    pub wav_path: Option<PathBuf>,
    /// PipeWire: node.name (default `vsound.VM.NAME`); `{vm}` is replaced by the VM's name.
    #[serde(default)]
    pub node_name: Option<String>,
    /// PipeWire: node.description (default `vsound VM NAME`); `{vm}` as in `node_name`.
    #[serde(default)]
    pub node_description: Option<String>,
    /// PipeWire: media.role, for the host's routing policy (e.g. Music, Navigation, Phone).
    #[serde(default)]
    pub media_role: Option<String>,
    /// PipeWire: target.object, the node to link to (default: the session manager's choice).
    #[serde(default)]
    pub target_object: Option<String>,
    /// PipeWire: for an input stream whose target is a sink, capture that sink's monitor.
    #[serde(default)]
    pub capture_sink: bool,
    /// ALSA: the PCM name (default `default`).
    #[serde(default)]
    pub alsa_device: Option<String>,
    /// GStreamer: the pipeline description (gst-launch syntax) the stream's audio goes to
    /// (output: it gets an unlinked sink pad, fed raw audio in the guest's format) or comes
    /// from (input: an unlinked src pad of raw audio); default `autoaudiosink` /
    /// `autoaudiosrc`. The broker converts format, rate and channels only where the
    /// description does not take the guest's (audioconvert and audioresample pass through).
    #[serde(default)]
    pub gst_pipeline: Option<String>,
    /// Whether the guest gets this stream's volume and switch controls (VIRTIO_SND_F_CTLS).
    #[serde(default = "yes")]
    pub controls: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChmapConfig {
    pub direction: Direction,
    #[serde(default)]
    pub hda_fn_nid: u32,
    /// Channel positions by name, e.g. ["FL", "FR"].
    pub positions: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest buffer_bytes a guest may configure.
    #[serde(default = "default_max_buffer_bytes")]
    pub max_buffer_bytes: u32,
    /// How many periods of playback the worker copies ahead of the backend's position.
    #[serde(default = "default_lookahead_periods")]
    pub lookahead_periods: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_buffer_bytes: default_max_buffer_bytes(),
            lookahead_periods: default_lookahead_periods(),
        }
    }
}

/// One VM's table, `[vms.NAME]`: who may claim the name, and the VM's own layout. Each of
/// `jacks`, `streams` and `chmaps` it gives replaces the top level's (the default layout) for
/// this VM only; what it leaves out is the top level's. `[limits]` are the broker's and the
/// same for every VM.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The only uid (besides root) whose worker may claim this name (SO_PEERCRED).
    #[serde(default)]
    pub uid: Option<u32>,
    /// The same by user name, resolved by the broker at its start.
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub jacks: Option<Vec<JackConfig>>,
    #[serde(default)]
    pub streams: Option<Vec<StreamConfig>>,
    #[serde(default)]
    pub chmaps: Option<Vec<ChmapConfig>>,
}

impl VmConfig {
    /// Whether it changes what the broker's backends are built from (streams, or the channel
    /// maps PipeWire nodes carry).
    pub fn has_own_backends(&self) -> bool {
        self.streams.is_some() || self.chmaps.is_some()
    }

    /// Whether it changes what the guest sees.
    pub fn has_own_layout(&self) -> bool {
        self.jacks.is_some() || self.has_own_backends()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_jacks")]
    pub jacks: Vec<JackConfig>,
    #[serde(default = "default_streams")]
    pub streams: Vec<StreamConfig>,
    /// Channel maps. Every guest PCM device (hda_fn_nid) and direction with streams but no map
    /// here gets the standard layouts for the channel counts its streams offer
    /// ([`Config::complete_chmaps`]), so each device has a "Channel Map" control in the guest.
    #[serde(default)]
    pub chmaps: Vec<ChmapConfig>,
    #[serde(default)]
    pub limits: Limits,
    /// Per-VM tables by VM name; a VM without one gets the default (top-level) layout.
    #[serde(default)]
    pub vms: BTreeMap<String, VmConfig>,
    /// Whether the device offers control elements (VIRTIO_SND_F_CTLS). Off by default: QEMU
    /// passes the feature to the guest whatever its `controls` property says but sizes the
    /// config space for it only with `controls=on`, and a guest that negotiated it then fails
    /// to probe the card (measured: error -12, no sound at all).
    #[serde(default)]
    pub controls: bool,
}

impl Default for Config {
    fn default() -> Self {
        let mut config = Config {
            jacks: default_jacks(),
            streams: default_streams(),
            chmaps: Vec::new(),
            limits: Limits::default(),
            vms: BTreeMap::new(),
            controls: false,
        };
        config.complete_chmaps();
        config
    }
}

fn yes() -> bool {
    true
}
fn one() -> u8 {
    1
}
/// Up to 7.1: what the default channel maps describe. Each backend narrows it.
fn eight() -> u8 {
    8
}
/// Every PCM format with a fixed sample size: each backend narrows the offer to what it
/// carries (PipeWire, ALSA: their own lists; wav: what a WAV file holds; null: all).
fn default_formats() -> Vec<String> {
    [
        "MU_LAW", "A_LAW", "S8", "U8", "S16", "U16", "S18_3", "U18_3", "S20_3", "U20_3", "S24_3",
        "U24_3", "S20", "U20", "S24", "U24", "S32", "U32", "FLOAT", "FLOAT64",
    ]
    .map(String::from)
    .to_vec()
}
/// Every rate the Linux driver maps (5512 to 384000 Hz; not the two added after VIRTIO 1.3's
/// first draft, which it does not know). ALSA narrows it to the device's.
fn default_rates() -> Vec<u32> {
    (protocol::rate::R5512..=protocol::rate::R384000)
        .filter_map(protocol::rate_hz)
        .collect()
}
fn default_backend() -> BackendKind {
    BackendKind::Auto
}
/// The Linux driver lets a guest choose buffers up to 160 ms of the largest rate, channel count
/// and sample the device offers: 384 kHz x 8 channels x FLOAT64 is 3.75 MiB. A smaller limit
/// would refuse a buffer the driver offers.
fn default_max_buffer_bytes() -> u32 {
    4 << 20
}
fn default_lookahead_periods() -> u32 {
    3
}
fn default_jacks() -> Vec<JackConfig> {
    vec![JackConfig {
        name: "Line Out".into(),
        hda_fn_nid: 0,
        // Line out, rear, green, 1/8" jack, association 1 sequence 0.
        hda_reg_defconf: 0x0101_4010,
        hda_reg_caps: 0,
        connected: true,
        remap: true,
        follows: None,
    }]
}
fn default_streams() -> Vec<StreamConfig> {
    let stream = |name: &str, direction| StreamConfig {
        name: name.into(),
        direction,
        hda_fn_nid: 0,
        formats: default_formats(),
        rates: default_rates(),
        channels_min: 1,
        channels_max: eight(),
        backend: BackendKind::Auto,
        wav_path: None,
        node_name: None,
        node_description: None,
        media_role: None,
        target_object: None,
        capture_sink: false,
        alsa_device: None,
        gst_pipeline: None,
        controls: true,
    };
    vec![
        stream("playback", Direction::Output),
        stream("capture", Direction::Input),
    ]
}
/// Mono, stereo, 2.1, quad, 5.1 and 7.1, in ALSA's channel order, for each direction.
/// The standard layouts, mono to 7.1, in ALSA's order of positions.
const STANDARD_LAYOUTS: [&[&str]; 6] = [
    &["MONO"],
    &["FL", "FR"],
    &["FL", "FR", "LFE"],
    &["FL", "FR", "RL", "RR"],
    &["FL", "FR", "RL", "RR", "FC", "LFE"],
    &["FL", "FR", "RL", "RR", "FC", "LFE", "SL", "SR"],
];

/// A stream's name as its controls show it: ALSA's mixer names start with a capital.
/// The stream of `streams` (a layout's) that `bus` names: by its configured name or its
/// controls' bus name ("media" or "Media").
pub fn stream_by_bus(streams: &[StreamConfig], bus: &str) -> Option<usize> {
    streams
        .iter()
        .position(|s| s.name == bus || bus_name(&s.name) == bus)
}

pub fn bus_name(stream_name: &str) -> String {
    let mut chars = stream_name.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// Format names as in the spec, without the VIRTIO_SND_PCM_FMT_ prefix, by wire value.
pub const FORMAT_NAMES: [&str; 25] = [
    "IMA_ADPCM",
    "MU_LAW",
    "A_LAW",
    "S8",
    "U8",
    "S16",
    "U16",
    "S18_3",
    "U18_3",
    "S20_3",
    "U20_3",
    "S24_3",
    "U24_3",
    "S20",
    "U20",
    "S24",
    "U24",
    "S32",
    "U32",
    "FLOAT",
    "FLOAT64",
    "DSD_U8",
    "DSD_U16",
    "DSD_U32",
    "IEC958_SUBFRAME",
];

/// Channel position names as in the spec, without the VIRTIO_SND_CHMAP_ prefix, by wire value.
pub const POSITION_NAMES: [&str; 37] = [
    "NONE", "NA", "MONO", "FL", "FR", "RL", "RR", "FC", "LFE", "SL", "SR", "RC", "FLC", "FRC",
    "RLC", "RRC", "FLW", "FRW", "FLH", "FCH", "FRH", "TC", "TFL", "TFR", "TFC", "TRL", "TRR",
    "TRC", "TFLC", "TFRC", "TSL", "TSR", "LLFE", "RLFE", "BC", "BLC", "BRC",
];

/// Format name (any case) to its wire value.
pub fn format_by_name(name: &str) -> Option<u8> {
    FORMAT_NAMES
        .iter()
        .position(|n| n.eq_ignore_ascii_case(name))
        .map(|i| i as u8)
}

/// A format's name, `S16` for example (`format N` for a value the spec does not name).
pub fn format_name(value: u8) -> String {
    FORMAT_NAMES
        .get(usize::from(value))
        .map_or_else(|| format!("format {value}"), |n| n.to_string())
}

/// The formats a stream may offer: the linear PCM ones (those with a sample size).
pub fn linear_format_names() -> impl Iterator<Item = &'static str> {
    FORMAT_NAMES
        .iter()
        .enumerate()
        .filter(|(i, _)| protocol::sample_bytes(*i as u8).is_some())
        .map(|(_, name)| *name)
}

/// Channel position name (any case) to its wire value.
pub fn position_by_name(name: &str) -> Option<u8> {
    POSITION_NAMES
        .iter()
        .position(|n| n.eq_ignore_ascii_case(name))
        .map(|i| i as u8)
}

impl StreamConfig {
    /// The GStreamer pipeline description of a `gstreamer` stream: the configured one, else
    /// the default for its direction.
    pub fn gst_pipeline_or_default(&self) -> &str {
        match (&self.gst_pipeline, self.direction) {
            (Some(description), _) => description,
            (None, Direction::Output) => DEFAULT_GST_PLAYBACK,
            (None, Direction::Input) => DEFAULT_GST_CAPTURE,
        }
    }

    /// Bitmask of configured formats (validated at load).
    pub fn format_mask(&self) -> u64 {
        self.formats
            .iter()
            .filter_map(|f| format_by_name(f))
            .fold(0, |m, f| m | (1u64 << f))
    }

    /// Bitmask of configured rates (validated at load).
    pub fn rate_mask(&self) -> u64 {
        self.rates
            .iter()
            .filter_map(|&r| protocol::rate_index(r))
            .fold(0, |m, r| m | (1u64 << r))
    }
}

impl ChmapConfig {
    pub fn position_values(&self) -> Vec<u8> {
        self.positions
            .iter()
            .filter_map(|p| position_by_name(p))
            .collect()
    }
}

impl Config {
    /// What the device offers for each stream, as the worker asks the broker for it (the broker
    /// narrows it to what its backend can do).
    pub fn pcm_caps(&self) -> Vec<PcmCaps> {
        self.streams
            .iter()
            .map(|s| PcmCaps {
                direction: s.direction.wire(),
                hda_fn_nid: s.hda_fn_nid,
                features: 1 << protocol::PCM_F_EVT_XRUNS,
                formats: s.format_mask(),
                rates: s.rate_mask(),
                channels_min: s.channels_min,
                channels_max: s.channels_max,
            })
            .collect()
    }

    /// The jacks and channel maps the device reports, and its buffer limit.
    pub fn device_layout(&self) -> DeviceLayout {
        let jacks = self
            .jacks
            .iter()
            .map(|j| protocol::JackInfo {
                hdr: protocol::Info {
                    hda_fn_nid: j.hda_fn_nid.into(),
                },
                features: (if j.remap {
                    1u32 << protocol::JACK_F_REMAP
                } else {
                    0
                })
                .into(),
                hda_reg_defconf: j.hda_reg_defconf.into(),
                hda_reg_caps: j.hda_reg_caps.into(),
                // A jack that follows a stream starts as the worker assumes its host end:
                // there, until the broker says otherwise.
                connected: u8::from(j.connected || j.follows.is_some()),
                padding: [0; 7],
            })
            .collect();
        let chmaps = self
            .chmaps
            .iter()
            .map(|c| {
                let values = c.position_values();
                let mut positions = [0u8; chmap::MAX_SIZE];
                positions[..values.len()].copy_from_slice(&values);
                protocol::ChmapInfo {
                    hdr: protocol::Info {
                        hda_fn_nid: c.hda_fn_nid.into(),
                    },
                    direction: c.direction.wire(),
                    channels: values.len() as u8,
                    positions,
                }
            })
            .collect();
        DeviceLayout {
            jacks,
            chmaps,
            max_buffer_bytes: self.limits.max_buffer_bytes,
        }
    }

    /// Whether stream `stream_id` has volume and switch controls.
    pub fn stream_has_controls(&self, stream_id: usize) -> bool {
        self.controls && self.streams.get(stream_id).is_some_and(|s| s.controls)
    }

    /// The control elements (`ControlState::with_controls`): a volume and a switch per stream
    /// that has controls, named after
    /// the stream as ALSA names a mixer's ("media" -> "Media Playback Volume").
    pub fn control_specs(&self) -> Vec<ControlSpec> {
        let buses: Vec<(u32, String, bool, u32)> = self
            .streams
            .iter()
            .enumerate()
            .filter(|(i, _)| self.stream_has_controls(*i))
            .map(|(i, s)| {
                (
                    i as u32,
                    bus_name(&s.name),
                    s.direction == Direction::Output,
                    s.hda_fn_nid,
                )
            })
            .collect();
        ctl::build_controls(&buses)
    }

    /// The stream whose control elements a host names it by: its configured name, or the bus
    /// name its controls show ("media" or "Media").
    /// Which jacks follow which stream's host end: (jack index, stream index) pairs.
    pub fn jack_followers(&self) -> Vec<(usize, usize)> {
        self.jacks
            .iter()
            .enumerate()
            .filter_map(|(jack, j)| {
                let name = j.follows.as_ref()?;
                Some((jack, self.streams.iter().position(|s| &s.name == name)?))
            })
            .collect()
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_owned(), e))?;
        Config::parse(&text).map_err(|e| e.in_file(path))
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: None,
            line: e.span().map(|span| line_of(text, span.start)),
            message: e.message().trim().to_string(),
        })?;
        config.complete_chmaps();
        config.validate().map_err(|e| e.with_line(text))?;
        Ok(config)
    }

    /// Every stream of every layout on `backend` (`--backend`); validated again, since a
    /// backend may need more (the wav backend a `wav_path`).
    pub fn with_backend(mut self, backend: BackendKind) -> Result<Config, ConfigError> {
        let vm_streams = self.vms.values_mut().filter_map(|v| v.streams.as_mut());
        for stream in self.streams.iter_mut().chain(vm_streams.flatten()) {
            stream.backend = backend;
        }
        self.validate()?;
        Ok(self)
    }

    /// Adds the standard layouts for every (hda_fn_nid, direction) that has streams but no
    /// channel map: those the streams' channel counts can use, output devices first, each in
    /// nid order. (The guest offers a device's channel maps only for that device: without
    /// them its "Channel Map" control cannot be read.)
    pub fn complete_chmaps(&mut self) {
        let mut devices: Vec<(Direction, u32)> = Vec::new();
        for direction in [Direction::Output, Direction::Input] {
            let mut nids: Vec<u32> = self
                .streams
                .iter()
                .filter(|s| s.direction == direction)
                .map(|s| s.hda_fn_nid)
                .collect();
            nids.sort_unstable();
            nids.dedup();
            devices.extend(nids.into_iter().map(|nid| (direction, nid)));
        }
        for (direction, nid) in devices {
            let mapped = self
                .chmaps
                .iter()
                .any(|c| c.direction == direction && c.hda_fn_nid == nid);
            if mapped {
                continue;
            }
            let streams = || {
                self.streams
                    .iter()
                    .filter(|s| s.direction == direction && s.hda_fn_nid == nid)
            };
            let min = streams().map(|s| s.channels_min).min().unwrap_or(1);
            let max = streams().map(|s| s.channels_max).max().unwrap_or(0);
            let layouts: Vec<ChmapConfig> = STANDARD_LAYOUTS
                .iter()
                .filter(|layout| (min..=max).contains(&(layout.len() as u8)))
                .map(|layout| ChmapConfig {
                    direction,
                    hda_fn_nid: nid,
                    positions: layout.iter().map(|p| p.to_string()).collect(),
                })
                .collect();
            self.chmaps.extend(layouts);
        }
    }

    /// The layout `vm` gets: its `[vms.NAME]` table's jacks, streams and channel maps where it
    /// gives them, the top level's otherwise; the limits are the top level's. What the worker
    /// shows its guest and the broker serves that VM (both read it from the same file).
    pub fn for_vm(&self, vm: &VmName) -> Config {
        fn pick<T: Clone>(own: Option<&Option<Vec<T>>>, default: &[T]) -> Vec<T> {
            own.and_then(Option::as_ref).map_or(default, |v| v).to_vec()
        }
        let own = self.vms.get(vm.as_str());
        // A VM with streams of its own and no maps gets the standard maps of its own devices,
        // not the default layout's.
        let own_streams = own.is_some_and(|v| v.streams.is_some());
        let default_chmaps: &[ChmapConfig] = if own_streams { &[] } else { &self.chmaps };
        let mut layout = Config {
            jacks: pick(own.map(|v| &v.jacks), &self.jacks),
            streams: pick(own.map(|v| &v.streams), &self.streams),
            chmaps: pick(own.map(|v| &v.chmaps), default_chmaps),
            limits: self.limits.clone(),
            vms: BTreeMap::new(),
            controls: self.controls,
        };
        layout.complete_chmaps();
        layout
    }

    /// Every stream of every layout (the default's and each VM table's own), for what the
    /// broker must be able to reach (backends, files).
    pub fn all_streams(&self) -> impl Iterator<Item = &StreamConfig> {
        self.streams.iter().chain(
            self.vms
                .values()
                .filter_map(|v| v.streams.as_ref())
                .flatten(),
        )
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let top = |table: &str| table.to_string();
        self.validate_layout(&top)?;
        let limits = &self.limits;
        if !(2..=16).contains(&limits.lookahead_periods) {
            return invalid(
                "limits.lookahead_periods",
                format!("{} is out of range (2 to 16)", limits.lookahead_periods),
            );
        }
        if limits.max_buffer_bytes == 0 || limits.max_buffer_bytes > 16 << 20 {
            return invalid(
                "limits.max_buffer_bytes",
                format!(
                    "{} is out of range (1 to 16 MiB, 16777216)",
                    limits.max_buffer_bytes
                ),
            );
        }
        for (name, vm) in &self.vms {
            // A key no worker could ever claim is a typo.
            let vm_name = VmName::new(name).map_err(|e| ConfigError::invalid("vms", e))?;
            let table = format!("vms.{name}");
            if vm.uid.is_some() && vm.user.is_some() {
                return invalid(&table, "give uid or user, not both");
            }
            if let Some(user) = &vm.user {
                if user.is_empty() || user.len() > MAX_NAME_LEN || user.contains(['\0', '/', ':']) {
                    return invalid(
                        &format!("{table}.user"),
                        format!("{user:?} is not a user name"),
                    );
                }
            }
            // What the VM gives is under its table; what it leaves out is the top level's.
            let own = |part: &str| match part {
                "jacks" => vm.jacks.is_some(),
                "streams" => vm.streams.is_some(),
                _ => vm.chmaps.is_some(),
            };
            let place = |part: &str| {
                if own(part) {
                    format!("{table}.{part}")
                } else {
                    part.to_string()
                }
            };
            self.for_vm(&vm_name).validate_layout(&place)?;
        }
        Ok(())
    }

    /// Streams, jacks and channel maps (of one layout); `place` names where a table of it is
    /// in the file (`streams` or `vms.NAME.streams`), for the errors' field paths.
    fn validate_layout(&self, place: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
        let (jacks, streams, chmaps) = (place("jacks"), place("streams"), place("chmaps"));
        if self.streams.is_empty() {
            return invalid(&streams, "at least one stream is required");
        }
        for (table, count, max) in [
            (&streams, self.streams.len(), MAX_STREAMS),
            (&jacks, self.jacks.len(), MAX_JACKS),
            (&chmaps, self.chmaps.len(), MAX_CHMAPS),
        ] {
            if count > max {
                return invalid(table, format!("{count} entries, at most {max}"));
            }
        }
        for (i, jack) in self.jacks.iter().enumerate() {
            if jack.name.is_empty() || jack.name.len() > MAX_NAME_LEN {
                return invalid(
                    &format!("{jacks}[{i}].name"),
                    format!("{:?} is not 1 to {MAX_NAME_LEN} bytes long", jack.name),
                );
            }
            if let Some(stream) = &jack.follows {
                if !self.streams.iter().any(|s| &s.name == stream) {
                    return invalid(
                        &format!("{jacks}[{i}].follows"),
                        format!(
                            "follows {stream:?}, which is no stream of this layout (streams: {})",
                            list(self.streams.iter().map(|s| format!("{:?}", s.name)))
                        ),
                    );
                }
            }
        }
        // Jacks (`follows`), host commands and buses name streams: each name means one.
        let repeats = [
            (
                "stream",
                &streams,
                first_repeat(self.streams.iter().map(|s| s.name.as_str())),
            ),
            (
                "jack",
                &jacks,
                first_repeat(self.jacks.iter().map(|j| j.name.as_str())),
            ),
        ];
        for (what, table, repeat) in repeats {
            if let Some((i, name)) = repeat {
                return invalid(
                    &format!("{table}[{i}].name"),
                    format!(
                        "{name:?} is already the name of another {what} (names must be unique)"
                    ),
                );
            }
        }
        for (i, s) in self.streams.iter().enumerate() {
            let field = |name: &str| format!("{streams}[{i}].{name}");
            if s.name.is_empty() || s.name.len() > MAX_NAME_LEN {
                return invalid(
                    &field("name"),
                    format!("{:?} is not 1 to {MAX_NAME_LEN} bytes long", s.name),
                );
            }
            if s.formats.is_empty() {
                return invalid(&field("formats"), "at least one format is required");
            }
            if s.rates.is_empty() {
                return invalid(&field("rates"), "at least one rate is required");
            }
            for f in &s.formats {
                let linear = format_by_name(f).is_some_and(|v| protocol::sample_bytes(v).is_some());
                if !linear {
                    let what = match format_by_name(f) {
                        Some(_) => "is not linear PCM",
                        None => "is not a format",
                    };
                    return invalid(
                        &field("formats"),
                        format!("{f:?} {what} (supported: {})", list(linear_format_names())),
                    );
                }
            }
            for &r in &s.rates {
                if protocol::rate_index(r).is_none() {
                    let mut rates: Vec<u32> = (0..=protocol::rate::MAX)
                        .filter_map(protocol::rate_hz)
                        .collect();
                    rates.sort_unstable();
                    return invalid(
                        &field("rates"),
                        format!("{r} is not a supported rate (supported: {})", list(rates)),
                    );
                }
            }
            if s.channels_min == 0 || s.channels_min > s.channels_max {
                return invalid(
                    &field("channels_min"),
                    format!(
                        "{} with channels_max {}: need 1 <= channels_min <= channels_max",
                        s.channels_min, s.channels_max
                    ),
                );
            }
            if s.channels_max as usize > chmap::MAX_SIZE {
                return invalid(
                    &field("channels_max"),
                    format!(
                        "{} is more than {} channels",
                        s.channels_max,
                        chmap::MAX_SIZE
                    ),
                );
            }
            if let Some(description) = &s.gst_pipeline {
                if let Err(why) = check_gst_pipeline(description) {
                    return invalid(&field("gst_pipeline"), why);
                }
            }
            if s.backend == BackendKind::Wav && s.wav_path.is_none() {
                return invalid(&field("wav_path"), "the wav backend needs a wav_path");
            }
            if let Some(path) = &s.wav_path {
                // Relative to the broker's working directory (`/` under systemd) it would name
                // a file nobody meant, and its directory would become a Landlock rule.
                if !path.is_absolute() {
                    return invalid(
                        &field("wav_path"),
                        format!("{path:?} is not an absolute path"),
                    );
                }
                // A placeholder in a directory would name a directory that does not exist (and
                // that the broker's Landlock rules, made from the directory, do not cover).
                let dir = path
                    .parent()
                    .map(|d| d.to_string_lossy())
                    .unwrap_or_default();
                if WAV_PLACEHOLDERS.iter().any(|p| dir.contains(p)) {
                    return invalid(
                        &field("wav_path"),
                        format!("{path:?}: {{vm}} and {{client}} may only appear in the file name"),
                    );
                }
            }
        }
        for (i, c) in self.chmaps.iter().enumerate() {
            let field = format!("{chmaps}[{i}].positions");
            if c.positions.is_empty() || c.positions.len() > chmap::MAX_SIZE {
                return invalid(
                    &field,
                    format!(
                        "{} positions, need 1 to {}",
                        c.positions.len(),
                        chmap::MAX_SIZE
                    ),
                );
            }
            for p in &c.positions {
                if position_by_name(p).is_none() {
                    return invalid(
                        &field,
                        format!(
                            "{p:?} is not a channel position (positions: {})",
                            list(POSITION_NAMES)
                        ),
                    );
                }
            }
        }
        Ok(())
    }
}

/// An [`ConfigError::Invalid`] at `field`.
fn invalid<T>(field: &str, problem: impl ToString) -> Result<T, ConfigError> {
    Err(ConfigError::invalid(field, problem))
}

/// "a, b, c", for the valid values an error lists.
fn list<T: std::fmt::Display>(values: impl IntoIterator<Item = T>) -> String {
    values
        .into_iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// What `--check-config` prints for a valid file: each layout's streams (direction and
/// backend) and jacks, the default one first.
pub fn summary(path: &Path, config: &Config) -> String {
    let mut lines = vec![
        format!("{}: valid", path.display()),
        format!("  default layout: {}", config.describe()),
    ];
    for name in config.vms.keys() {
        if let Ok(vm) = VmName::new(name) {
            lines.push(format!("  vm {name}: {}", config.for_vm(&vm).describe()));
        }
    }
    lines.join("\n")
}

impl Config {
    /// One layout in a line: `streams media (output, auto), mic (input, auto); jacks Line Out`.
    pub fn describe(&self) -> String {
        let streams = list(self.streams.iter().map(|s| {
            let direction = format!("{:?}", s.direction).to_lowercase();
            format!("{} ({direction}, {})", s.name, s.backend.name())
        }));
        match self.jacks.len() {
            0 => format!("streams {streams}; no jacks"),
            _ => format!(
                "streams {streams}; jacks {}",
                list(self.jacks.iter().map(|j| &j.name))
            ),
        }
    }
}

/// What can be checked of a GStreamer pipeline description without GStreamer (the worker
/// reads this file too and links no audio library): the broker parses it at start-up and at
/// every PREPARE.
fn check_gst_pipeline(description: &str) -> Result<(), String> {
    if description.trim().is_empty() {
        return Err("an empty pipeline description (leave it out for the default)".into());
    }
    if description.len() > MAX_GST_PIPELINE_LEN {
        return Err(format!(
            "{} bytes, longer than {MAX_GST_PIPELINE_LEN}",
            description.len()
        ));
    }
    if let Some(c) = description
        .chars()
        .find(|c| c.is_control() && !c.is_whitespace())
    {
        return Err(format!("control character {c:?} in the description"));
    }
    Ok(())
}

/// The first name that repeats an earlier one, with its index.
fn first_repeat<'a>(names: impl Iterator<Item = &'a str>) -> Option<(usize, &'a str)> {
    let mut seen = std::collections::HashSet::new();
    names.enumerate().find(|(_, name)| !seen.insert(*name))
}

/// Sanity: the format names table matches the protocol constants.
const _: () = assert!(format::IEC958_SUBFRAME == 24 && chmap::BRC == 36);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_or_jack_name_used_twice_is_refused_with_its_place() {
        let text = "[[streams]]\nname = \"media\"\ndirection = \"output\"\n\
                    [[streams]]\nname = \"media\"\ndirection = \"input\"\n";
        let e = toml::from_str::<Config>(text)
            .unwrap()
            .validate()
            .unwrap_err();
        let shown = e.to_string();
        assert!(
            shown.contains("streams[1].name") && shown.contains("\"media\""),
            "{shown}"
        );
        let text = "[[streams]]\nname = \"media\"\ndirection = \"output\"\n\
                    [[jacks]]\nname = \"Line Out\"\n[[jacks]]\nname = \"Line Out\"\n";
        let e = toml::from_str::<Config>(text)
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("jacks[1].name"), "{e}");
    }

    #[test]
    fn default_config_is_valid_and_has_output_and_input() {
        let c = Config::default();
        c.validate().unwrap();
        assert!(c.streams.iter().any(|s| s.direction == Direction::Output));
        assert!(c.streams.iter().any(|s| s.direction == Direction::Input));
        let s = &c.streams[0];
        // Every format with a sample size, every rate the Linux driver maps, up to 8 channels.
        let sized = (0..=format::MAX)
            .filter(|&f| protocol::sample_bytes(f).is_some())
            .fold(0u64, |m, f| m | (1 << f));
        assert_eq!(s.format_mask(), sized);
        assert_eq!(s.rate_mask(), (1 << (protocol::rate::R384000 + 1)) - 1);
        assert_eq!((s.channels_min, s.channels_max), (1, 8));
        // A channel map per channel count up to 7.1 in each direction.
        for direction in [Direction::Output, Direction::Input] {
            let sizes: Vec<usize> = c
                .chmaps
                .iter()
                .filter(|m| m.direction == direction)
                .map(|m| m.position_values().len())
                .collect();
            assert_eq!(sizes, [1, 2, 3, 4, 6, 8]);
        }
    }

    #[test]
    fn every_device_gets_channel_maps_for_the_counts_it_offers() {
        let stream = |name: &str, direction: &str, nid: u32, channels: &str| {
            format!(
                "[[streams]]\nname = '{name}'\ndirection = '{direction}'\nhda_fn_nid = {nid}\n{channels}\n"
            )
        };
        let text = [
            stream("media", "output", 0, "channels_max = 2"),
            stream(
                "navigation",
                "output",
                1,
                "channels_min = 1\nchannels_max = 1",
            ),
            stream(
                "surround",
                "output",
                2,
                "channels_min = 6\nchannels_max = 8",
            ),
            stream("mic", "input", 3, "channels_max = 2"),
        ]
        .concat();
        let c = Config::parse(&text).unwrap();
        let maps = |direction, nid| -> Vec<usize> {
            c.chmaps
                .iter()
                .filter(|m| m.direction == direction && m.hda_fn_nid == nid)
                .map(|m| m.position_values().len())
                .collect()
        };
        assert_eq!(maps(Direction::Output, 0), [1, 2]);
        assert_eq!(maps(Direction::Output, 1), [1]);
        assert_eq!(maps(Direction::Output, 2), [6, 8]);
        assert_eq!(maps(Direction::Input, 3), [1, 2]);
        assert_eq!(maps(Direction::Input, 0), [] as [usize; 0]);
        // A device the config maps itself keeps exactly its maps.
        let own = format!(
            "{}[[chmaps]]\ndirection = 'output'\nhda_fn_nid = 0\npositions = ['FR', 'FL']\n",
            stream("media", "output", 0, "channels_max = 2")
        );
        let c = Config::parse(&own).unwrap();
        assert_eq!(c.chmaps.len(), 1);
        assert_eq!(c.chmaps[0].positions, ["FR", "FL"]);
    }

    #[test]
    fn the_aaos_example_has_eight_buses_and_a_mic_each_with_its_maps() {
        let c = Config::parse(include_str!("../../examples/aaos.toml")).unwrap();
        let outputs: Vec<u32> = c
            .streams
            .iter()
            .filter(|s| s.direction == Direction::Output)
            .map(|s| s.hda_fn_nid)
            .collect();
        assert_eq!(outputs, (0..8).collect::<Vec<_>>());
        assert!(c.streams.iter().all(|s| s.media_role.is_some()));
        for nid in 0..9 {
            let sizes: Vec<usize> = c
                .chmaps
                .iter()
                .filter(|m| m.hda_fn_nid == nid)
                .map(|m| m.position_values().len())
                .collect();
            assert_eq!(sizes, [1, 2], "device {nid}");
        }
    }

    #[test]
    fn empty_file_gives_the_default() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.streams.len(), 2);
        assert_eq!(c.chmaps.len(), 12);
    }

    #[test]
    fn names_map_to_spec_values() {
        assert_eq!(format_by_name("s16"), Some(format::S16));
        assert_eq!(format_by_name("FLOAT"), Some(format::FLOAT));
        assert_eq!(format_by_name("nope"), None);
        assert_eq!(position_by_name("TSL"), Some(chmap::TSL));
        assert_eq!(position_by_name("BRC"), Some(chmap::BRC));
        assert_eq!(position_by_name("RLFE"), Some(chmap::RLFE));
    }

    #[test]
    fn invalid_configs_are_rejected() {
        for text in [
            "[[streams]]\nname='a'\ndirection='output'\nformats=['DSD_U8']",
            "[[streams]]\nname='a'\ndirection='output'\nrates=[12345]",
            "[[streams]]\nname='a'\ndirection='output'\nchannels_min=3\nchannels_max=2",
            "[[streams]]\nname='a'\ndirection='output'\nchannels_max=19",
            "[[streams]]\nname='a'\ndirection='output'\nbackend='wav'",
            "[[chmaps]]\ndirection='output'\npositions=['XX']",
            "[limits]\nlookahead_periods=1",
            "unknown_key=1",
        ] {
            assert!(Config::parse(text).is_err(), "accepted: {text}");
        }
    }

    #[test]
    fn controls_follow_the_streams_and_can_be_turned_off() {
        let text = r#"
            controls = true
            [[streams]]
            name = "media"
            direction = "output"
            hda_fn_nid = 2
            [[streams]]
            name = "navigation"
            direction = "output"
            controls = false
            [[streams]]
            name = "mic"
            direction = "input"
        "#;
        let c = Config::parse(text).unwrap();
        let names: Vec<(u32, String)> = c
            .control_specs()
            .iter()
            .map(|s| {
                let name = String::from_utf8(ctl::name_of(&s.info).to_vec()).unwrap();
                (s.stream_id, name)
            })
            .collect();
        assert_eq!(
            names,
            [
                (0, "Media Playback Volume".to_string()),
                (0, "Media Playback Switch".to_string()),
                (2, "Mic Capture Volume".to_string()),
                (2, "Mic Capture Switch".to_string()),
            ]
        );
        assert_eq!(c.control_specs()[0].info.hdr.hda_fn_nid.get(), 2);
        assert!(!c.stream_has_controls(1));
        assert_eq!(stream_by_bus(&c.streams, "Mic"), Some(2));
        assert_eq!(stream_by_bus(&c.streams, "navigation"), Some(1));
        assert_eq!(stream_by_bus(&c.streams, "radio"), None);
        let off = Config::parse(&text.replace("controls = true", "controls = false")).unwrap();
        assert!(off.control_specs().is_empty());
        // The default: none (the VMM must be told, QEMU's controls=on); on, both default
        // streams have them.
        assert!(Config::default().control_specs().is_empty());
        let on = Config::parse("controls = true").unwrap();
        assert_eq!(on.control_specs().len(), 4);
    }

    #[test]
    fn several_output_buses() {
        let text = r#"
            [[streams]]
            name = "media"
            direction = "output"
            hda_fn_nid = 0
            [[streams]]
            name = "navigation"
            direction = "output"
            hda_fn_nid = 1
            rates = [48000, 24000]
        "#;
        let c = Config::parse(text).unwrap();
        assert_eq!(c.streams[1].hda_fn_nid, 1);
        assert_eq!(
            c.streams[1].rate_mask(),
            (1 << protocol::rate::R48000) | (1 << protocol::rate::R24000)
        );
    }

    #[test]
    fn vm_names_are_single_plain_tokens() {
        for good in [
            "vm",
            "vm1",
            "navi",
            "A",
            "0",
            "rear_seat-2",
            "x".repeat(32).as_str(),
        ] {
            assert_eq!(VmName::new(good).unwrap().as_str(), good);
        }
        for bad in [
            "",
            "..",
            ".",
            "a/b",
            "/",
            "-vm",
            "_vm",
            "vm.1",
            "vm 1",
            "vm\n",
            "ví",
            "x".repeat(33).as_str(),
        ] {
            let e = VmName::new(bad).unwrap_err().to_string();
            assert!(e.contains("1 to 32 characters"), "{bad:?}: {e}");
        }
        // A hostile name is shown escaped and clipped.
        let e = VmName::new(&"\u{1b}[2J".repeat(100))
            .unwrap_err()
            .to_string();
        assert!(!e.contains('\u{1b}') && e.len() < 200, "{e}");
    }

    const PER_VM: &str = r#"
        [[streams]]
        name = "media"
        direction = "output"
        [[streams]]
        name = "mic"
        direction = "input"

        [vms.navi]
        uid = 1234
        [[vms.navi.streams]]
        name = "navigation"
        direction = "output"
        [[vms.navi.chmaps]]
        direction = "output"
        positions = ["MONO"]

        [vms.cluster]
        user = "vsound-vm-cluster"
        [[vms.cluster.jacks]]
        name = "Chime"

        [vms.unused]
        [[vms.unused.streams]]
        name = "spare"
        direction = "input"
    "#;

    #[test]
    fn a_vm_table_overrides_the_default_layout_part_by_part() {
        let c = Config::parse(PER_VM).unwrap();
        let name = |n: &str| VmName::new(n).unwrap();
        let navi = c.for_vm(&name("navi"));
        assert_eq!(navi.streams.len(), 1);
        assert_eq!(navi.streams[0].name, "navigation");
        assert_eq!(navi.chmaps.len(), 1);
        assert_eq!(navi.jacks.len(), 1, "the default jack");
        assert_eq!(navi.jacks[0].name, "Line Out");
        // Only the jacks are the cluster's own.
        let cluster = c.for_vm(&name("cluster"));
        assert_eq!(cluster.jacks[0].name, "Chime");
        assert_eq!(cluster.streams.len(), 2);
        assert_eq!(cluster.chmaps.len(), 12);
        // A VM without a table gets the top level.
        let other = c.for_vm(&name("other"));
        assert_eq!(other.streams.len(), 2);
        assert_eq!(other.streams[1].name, "mic");
        assert!(other.vms.is_empty());
        assert_eq!(c.vms["navi"].uid, Some(1234));
        assert_eq!(c.vms["cluster"].user.as_deref(), Some("vsound-vm-cluster"));
        assert!(c.vms["navi"].has_own_backends() && !c.vms["cluster"].has_own_backends());
        assert!(c.vms["cluster"].has_own_layout());
        // Every layout's streams, each once.
        let names: Vec<&str> = c.all_streams().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["media", "mic", "navigation", "spare"]);
    }

    #[test]
    fn each_vm_layout_is_validated_like_the_top_level() {
        let vm = |body: &str| format!("[vms.navi]\n{body}");
        for (text, why) in [
            (
                vm("streams = []"),
                "line 2: vms.navi.streams: at least one stream",
            ),
            (
                vm("[[vms.navi.streams]]\nname='a'\ndirection='output'\nrates=[12345]"),
                "line 5: vms.navi.streams[0].rates: 12345 is not a supported rate",
            ),
            (
                vm("[[vms.navi.chmaps]]\ndirection='output'\npositions=['XX']"),
                "line 4: vms.navi.chmaps[0].positions: \"XX\" is not a channel position",
            ),
            (vm("uid = 1\nuser = 'x'"), "uid or user, not both"),
            (vm("user = 'a/b'"), "not a user name"),
            (vm("limits = {}"), "unknown field"),
            (vm("volume = 3"), "unknown field"),
            ("[vms.'a/b']".to_string(), "invalid VM name"),
            ("[vms.'-x']".to_string(), "invalid VM name"),
        ] {
            let e = Config::parse(&text).unwrap_err().to_string();
            assert!(e.contains(why), "{text}: {e}");
        }
        // Today's files stay valid, and an unknown VM's table is no error.
        Config::parse("[vms.someday]\nuid = 5").unwrap();
    }

    #[test]
    fn an_error_names_the_file_line_and_field_with_the_bad_and_the_valid_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsound.toml");
        let load = |text: &str| {
            std::fs::write(&path, text).unwrap();
            Config::load(&path).unwrap_err().to_string()
        };
        let shown = path.display().to_string();
        let streams = "[[streams]]\nname = \"media\"\ndirection = \"output\"\n";
        let e = load(&format!("{streams}rates = [48000, 12345]\n"));
        assert_eq!(
            e,
            format!(
                "{shown}:4: streams[0].rates: 12345 is not a supported rate (supported: 5512, \
                 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, \
                 96000, 176400, 192000, 384000)"
            )
        );
        let e = load(&format!("{streams}\n[[streams]]\nname = \"mic\"\ndirection = \"input\"\nformats = [\"S16\", \"IMA_ADPCM\"]\n"));
        assert!(
            e.starts_with(&format!(
                "{shown}:8: streams[1].formats: \"IMA_ADPCM\" is not linear PCM (supported: MU_LAW, A_LAW, S8,"
            )),
            "{e}"
        );
        // Parse errors (syntax, unknown fields, wrong types) have their line too.
        let e = load(&format!("{streams}rate = 48000\n"));
        assert!(
            e.starts_with(&format!("{shown}:4: unknown field `rate`, expected one of")),
            "{e}"
        );
        let e = load(&format!("{streams}backend = \"gst\"\n"));
        assert!(
            e.starts_with(&format!(
                "{shown}:4: unknown variant `gst`, expected one of `auto`"
            )),
            "{e}"
        );
        let e = load("[limits]\nlookahead_periods = 40\n");
        assert_eq!(
            e,
            format!("{shown}:2: limits.lookahead_periods: 40 is out of range (2 to 16)")
        );
        // A field the text leaves out points at its table.
        let e = load(&format!("{streams}backend = \"wav\"\n"));
        assert_eq!(
            e,
            format!("{shown}:1: streams[0].wav_path: the wav backend needs a wav_path")
        );
    }

    #[test]
    fn a_backend_override_applies_to_every_layout_and_is_validated() {
        let config = Config::parse(PER_VM).unwrap();
        let all_null = config.clone().with_backend(BackendKind::Null).unwrap();
        assert!(all_null
            .all_streams()
            .all(|s| s.backend == BackendKind::Null));
        assert_eq!(all_null.all_streams().count(), 4);
        let e = config
            .with_backend(BackendKind::Wav)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("streams[0].wav_path: the wav backend needs"),
            "{e}"
        );
        assert_eq!("alsa".parse::<BackendKind>(), Ok(BackendKind::Alsa));
        let e = "jack".parse::<BackendKind>().unwrap_err();
        assert!(e.contains("`pipewire`") && e.contains("`null`"), "{e}");
    }

    #[test]
    fn a_relative_wav_path_is_refused() {
        let text = "[[streams]]\nname='a'\ndirection='output'\nbackend='wav'\nwav_path='out.wav'";
        let e = Config::parse(text).unwrap_err().to_string();
        assert!(
            e.contains("streams[0].wav_path: \"out.wav\" is not an absolute path"),
            "{e}"
        );
    }

    #[test]
    fn wav_placeholders_only_in_the_file_name() {
        let stream = |path: &str| {
            format!("[[streams]]\nname='a'\ndirection='output'\nbackend='wav'\nwav_path='{path}'")
        };
        Config::parse(&stream("/var/lib/vsound/{vm}-{client}.wav")).unwrap();
        for path in ["/var/lib/{vm}/a.wav", "/var/{client}/x/a.wav"] {
            let e = Config::parse(&stream(path)).unwrap_err().to_string();
            assert!(e.contains("file name"), "{path}: {e}");
        }
    }

    #[test]
    fn gstreamer_streams_take_a_bounded_pipeline_description() {
        let text = r#"
[[streams]]
name = "media"
direction = "output"
backend = "gstreamer"
gst_pipeline = "wavenc ! filesink location=/tmp/out.wav"
[[streams]]
name = "mic"
direction = "input"
backend = "gstreamer"
"#;
        let c = Config::parse(text).unwrap();
        assert_eq!(c.streams[0].backend, BackendKind::Gstreamer);
        assert_eq!(
            c.streams[0].gst_pipeline_or_default(),
            "wavenc ! filesink location=/tmp/out.wav"
        );
        assert_eq!(c.streams[1].gst_pipeline_or_default(), "autoaudiosrc");
        let output = Config::parse(&text.replace(
            "gst_pipeline = \"wavenc ! filesink location=/tmp/out.wav\"\n",
            "",
        ))
        .unwrap();
        assert_eq!(output.streams[0].gst_pipeline_or_default(), "autoaudiosink");
        let with = |description: &str| {
            format!(
                "[[streams]]\nname='a'\ndirection='output'\n[[streams]]\nname='b'\n\
                 direction='output'\nbackend='gstreamer'\ngst_pipeline={}\n",
                toml::Value::String(description.to_string())
            )
        };
        for (description, why) in [
            ("", "empty"),
            ("  ", "empty"),
            ("fakesink\u{1}", "control character"),
            (&"x".repeat(MAX_GST_PIPELINE_LEN + 1), "longer than 4096"),
        ] {
            let e = Config::parse(&with(description)).unwrap_err().to_string();
            assert!(
                e.contains("streams[1].gst_pipeline") && e.contains(why),
                "{description:?}: {e}"
            );
        }
        // Line breaks and tabs are whitespace to gst-launch syntax.
        Config::parse(&with("wavenc !\n\tfakesink")).unwrap();
    }

    #[test]
    fn a_jack_follows_a_stream_of_its_own_layout() {
        let text = r#"
[[streams]]
name = "media"
direction = "output"
[[streams]]
name = "navigation"
direction = "output"
[[jacks]]
name = "Media Out"
[[jacks]]
name = "Navigation Out"
follows = "navigation"
"#;
        let config = Config::parse(text).unwrap();
        assert_eq!(config.jack_followers(), [(1, 1)]);
        let e = Config::parse(&text.replace("follows = \"navigation\"", "follows = \"nav\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("follows \"nav\", which is no stream"), "{e}");
    }
}
