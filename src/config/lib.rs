//! The device's TOML configuration: jacks, streams, channel maps and limits.
//!
//! The same file is read by the worker (what the guest sees) and the broker (which backend serves
//! each stream). Everything is validated at load time so that the running device can trust it.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use virtio_snd::control::{DeviceLayout, PcmCaps};
use virtio_snd::ctl::{self, ControlSpec};
use virtio_snd::protocol::{self, chmap, format};

/// Upper bounds that keep every table and allocation small, whatever the config says.
pub const MAX_STREAMS: usize = 32;
pub const MAX_JACKS: usize = 32;
pub const MAX_CHMAPS: usize = 32;
pub const MAX_NAME_LEN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("cannot parse config: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("invalid config: {0}")]
    Invalid(String),
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
    /// For the `wav` backend: the file to write (output) or read (input). `{client}` is replaced
    /// by the broker's number for the connected worker, so several VMs do not share a file.
    #[serde(default)]
    pub wav_path: Option<PathBuf>,
    /// PipeWire: node.name (default `vsound.vmN.NAME`).
    #[serde(default)]
    pub node_name: Option<String>,
    /// PipeWire: node.description.
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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_jacks")]
    pub jacks: Vec<JackConfig>,
    #[serde(default = "default_streams")]
    pub streams: Vec<StreamConfig>,
    #[serde(default = "default_chmaps")]
    pub chmaps: Vec<ChmapConfig>,
    #[serde(default)]
    pub limits: Limits,
    /// Whether the device offers control elements at all (`false`: no VIRTIO_SND_F_CTLS).
    #[serde(default = "yes")]
    pub controls: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            jacks: default_jacks(),
            streams: default_streams(),
            chmaps: default_chmaps(),
            limits: Limits::default(),
            controls: true,
        }
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
        controls: true,
    };
    vec![
        stream("playback", Direction::Output),
        stream("capture", Direction::Input),
    ]
}
/// Mono, stereo, 2.1, quad, 5.1 and 7.1, in ALSA's channel order, for each direction.
fn default_chmaps() -> Vec<ChmapConfig> {
    const LAYOUTS: [&[&str]; 6] = [
        &["MONO"],
        &["FL", "FR"],
        &["FL", "FR", "LFE"],
        &["FL", "FR", "RL", "RR"],
        &["FL", "FR", "RL", "RR", "FC", "LFE"],
        &["FL", "FR", "RL", "RR", "FC", "LFE", "SL", "SR"],
    ];
    [Direction::Output, Direction::Input]
        .into_iter()
        .flat_map(|direction| {
            LAYOUTS.iter().map(move |layout| ChmapConfig {
                direction,
                hda_fn_nid: 0,
                positions: layout.iter().map(|p| p.to_string()).collect(),
            })
        })
        .collect()
}

/// A stream's name as its controls show it: ALSA's mixer names start with a capital.
pub fn bus_name(stream_name: &str) -> String {
    let mut chars = stream_name.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// Format name (as in the spec, without the VIRTIO_SND_PCM_FMT_ prefix) to its wire value.
pub fn format_by_name(name: &str) -> Option<u8> {
    const NAMES: [&str; 25] = [
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
    NAMES
        .iter()
        .position(|n| n.eq_ignore_ascii_case(name))
        .map(|i| i as u8)
}

/// Channel position name (spec name without the VIRTIO_SND_CHMAP_ prefix) to its wire value.
pub fn position_by_name(name: &str) -> Option<u8> {
    const NAMES: [&str; 37] = [
        "NONE", "NA", "MONO", "FL", "FR", "RL", "RR", "FC", "LFE", "SL", "SR", "RC", "FLC", "FRC",
        "RLC", "RRC", "FLW", "FRW", "FLH", "FCH", "FRH", "TC", "TFL", "TFR", "TFC", "TRL", "TRR",
        "TRC", "TFLC", "TFRC", "TSL", "TSR", "LLFE", "RLFE", "BC", "BLC", "BRC",
    ];
    NAMES
        .iter()
        .position(|n| n.eq_ignore_ascii_case(name))
        .map(|i| i as u8)
}

impl StreamConfig {
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
                connected: u8::from(j.connected),
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
    pub fn stream_by_bus(&self, bus: &str) -> Option<usize> {
        self.streams
            .iter()
            .position(|s| s.name == bus || bus_name(&s.name) == bus)
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_owned(), e))?;
        Config::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |msg: String| Err(ConfigError::Invalid(msg));
        if self.streams.is_empty() {
            return bad("at least one stream is required".into());
        }
        if self.streams.len() > MAX_STREAMS
            || self.jacks.len() > MAX_JACKS
            || self.chmaps.len() > MAX_CHMAPS
        {
            return bad(format!(
                "at most {MAX_STREAMS} streams, {MAX_JACKS} jacks and {MAX_CHMAPS} chmaps"
            ));
        }
        for jack in &self.jacks {
            if jack.name.len() > MAX_NAME_LEN {
                return bad(format!("jack name too long: {}", jack.name));
            }
        }
        for s in &self.streams {
            if s.name.is_empty() || s.name.len() > MAX_NAME_LEN {
                return bad(format!("stream name must be 1..={MAX_NAME_LEN} bytes"));
            }
            if s.formats.is_empty() || s.rates.is_empty() {
                return bad(format!("stream {}: needs formats and rates", s.name));
            }
            for f in &s.formats {
                match format_by_name(f) {
                    Some(v) if protocol::sample_bytes(v).is_some() => {}
                    Some(_) => {
                        return bad(format!("stream {}: format {f} is not linear PCM", s.name))
                    }
                    None => return bad(format!("stream {}: unknown format {f}", s.name)),
                }
            }
            for &r in &s.rates {
                if protocol::rate_index(r).is_none() {
                    return bad(format!("stream {}: unsupported rate {r}", s.name));
                }
            }
            if s.channels_min == 0 || s.channels_min > s.channels_max {
                return bad(format!(
                    "stream {}: need 1 <= channels_min <= channels_max",
                    s.name
                ));
            }
            if s.channels_max as usize > chmap::MAX_SIZE {
                return bad(format!(
                    "stream {}: at most {} channels",
                    s.name,
                    chmap::MAX_SIZE
                ));
            }
            if s.backend == BackendKind::Wav && s.wav_path.is_none() {
                return bad(format!("stream {}: the wav backend needs wav_path", s.name));
            }
        }
        for c in &self.chmaps {
            if c.positions.is_empty() || c.positions.len() > chmap::MAX_SIZE {
                return bad(format!("chmap needs 1..={} positions", chmap::MAX_SIZE));
            }
            for p in &c.positions {
                if position_by_name(p).is_none() {
                    return bad(format!("unknown channel position {p}"));
                }
            }
        }
        if self.limits.lookahead_periods < 2 || self.limits.lookahead_periods > 16 {
            return bad("limits.lookahead_periods must be 2..=16".into());
        }
        if self.limits.max_buffer_bytes == 0 || self.limits.max_buffer_bytes > 16 << 20 {
            return bad("limits.max_buffer_bytes must be 1..=16 MiB".into());
        }
        Ok(())
    }
}

/// Sanity: the format names table matches the protocol constants.
const _: () = assert!(format::IEC958_SUBFRAME == 24 && chmap::BRC == 36);

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(c.stream_by_bus("Mic"), Some(2));
        assert_eq!(c.stream_by_bus("navigation"), Some(1));
        assert_eq!(c.stream_by_bus("radio"), None);
        let off = Config::parse(&format!("controls = false\n{text}")).unwrap();
        assert!(off.control_specs().is_empty());
        // The default: both default streams have them.
        assert_eq!(Config::default().control_specs().len(), 4);
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
}
