//! Control elements (VIRTIO 1.3, `VIRTIO_SND_F_CTLS`): the device's volume and switch per
//! stream, the requests that read and write them, and the volume scale both processes share.
//!
//! Every stream with controls gets two elements, named as ALSA names a mixer's:
//! "<Bus> Playback Volume" and "<Bus> Playback Switch" for an output, "<Bus> Capture ..."
//! for an input. The volume is an INTEGER from [`VOLUME_MIN`] to [`VOLUME_MAX`] in steps of
//! [`DB_STEP_CENTI`] hundredths of a dB (0 dB at the top), with a DB_SCALE TLV whose lowest
//! value is silence, so `amixer` and `alsamixer` show dB. The switch is a BOOLEAN: 1 plays,
//! 0 mutes (ALSA's convention for a "Switch").

use zerocopy::IntoBytes;

use crate::protocol::{self as p, ctl, Status};

/// The volume's range in control steps; the top is 0 dB, each step [`DB_STEP_CENTI`].
pub const VOLUME_MIN: u32 = 0;
pub const VOLUME_MAX: u32 = 100;
/// 0.5 dB per step: the scale spans 50 dB, 0 mutes (the TLV's MUTE flag).
pub const DB_STEP_CENTI: i32 = 50;
/// The dB of [`VOLUME_MIN`] as the TLV states it (the value itself is silence).
pub const DB_MIN_CENTI: i32 = -(VOLUME_MAX as i32) * DB_STEP_CENTI;

/// What a stream's two controls hold: its volume (control steps) and whether it is muted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Gain {
    pub volume: u32,
    pub mute: bool,
}

impl Default for Gain {
    fn default() -> Self {
        Gain::UNITY
    }
}

impl Gain {
    /// 0 dB, not muted: samples pass untouched.
    pub const UNITY: Gain = Gain {
        volume: VOLUME_MAX,
        mute: false,
    };

    /// Whether the volume is on the scale (a worker or broker may send anything).
    pub fn is_valid(&self) -> bool {
        self.volume <= VOLUME_MAX
    }

    /// Whether samples pass bit-exact.
    pub fn is_unity(&self) -> bool {
        *self == Gain::UNITY
    }

    /// Whether the output is silence (muted, or the volume at its lowest).
    pub fn is_silent(&self) -> bool {
        self.mute || self.volume == VOLUME_MIN
    }

    /// The volume in hundredths of a dB, `None` at the lowest step (silence).
    pub fn db_centi(&self) -> Option<i32> {
        (self.volume > VOLUME_MIN && self.is_valid())
            .then(|| DB_MIN_CENTI + self.volume as i32 * DB_STEP_CENTI)
    }

    /// The linear amplitude factor of the volume alone (mute not applied): 10^(dB/20), 0 at
    /// the lowest step. This is what PipeWire's `channelVolumes` hold.
    pub fn volume_amplitude(&self) -> f32 {
        match self.db_centi() {
            Some(centi) => 10f32.powf(centi as f32 / 2000.0),
            None => 0.0,
        }
    }

    /// The factor a sample is multiplied by: 0 when silent, 1 at unity.
    pub fn amplitude(&self) -> f32 {
        if self.mute {
            0.0
        } else {
            self.volume_amplitude()
        }
    }

    /// The step nearest to a linear amplitude (PipeWire's channel volume), clamped to the
    /// scale: an amplitude below the lowest audible step's half-way point is the lowest step.
    pub fn from_amplitude(amplitude: f32, mute: bool) -> Gain {
        let volume = if !amplitude.is_finite() || amplitude <= 0.0 {
            VOLUME_MIN
        } else {
            let centi = 2000.0 * amplitude.log10();
            let steps = ((centi - DB_MIN_CENTI as f32) / DB_STEP_CENTI as f32).round();
            steps.clamp(VOLUME_MIN as f32, VOLUME_MAX as f32) as u32
        };
        Gain { volume, mute }
    }
}

/// Which of a stream's two controls an element is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtlKind {
    Volume,
    Switch,
}

/// One control element as the device describes it (CTL_INFO).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlSpec {
    pub stream_id: u32,
    pub kind: CtlKind,
    pub info: p::CtlInfo,
}

/// Most bytes of a control's name: the wire's field less its NUL.
pub const MAX_NAME_BYTES: usize = ctl::NAME_SIZE - 1;

/// ALSA's name of a stream's control: "<Bus> Playback Volume", "<Bus> Capture Switch", ...
/// `bus` is cut (at a character boundary) so that the name fits the wire's field.
pub fn control_name(bus: &str, output: bool, kind: CtlKind) -> String {
    let suffix = match (output, kind) {
        (true, CtlKind::Volume) => " Playback Volume",
        (true, CtlKind::Switch) => " Playback Switch",
        (false, CtlKind::Volume) => " Capture Volume",
        (false, CtlKind::Switch) => " Capture Switch",
    };
    let mut end = bus.len().min(MAX_NAME_BYTES - suffix.len());
    while !bus.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{suffix}", &bus[..end])
}

/// The two controls of each stream in `buses` (stream id, bus name, output, hda_fn_nid),
/// volume then switch, with ids in that order. Names that repeat (two buses cut to the same
/// name) get increasing indexes, as ALSA needs each (name, index) once.
pub fn build_controls(buses: &[(u32, String, bool, u32)]) -> Vec<ControlSpec> {
    let mut out: Vec<ControlSpec> = Vec::new();
    for (stream_id, bus, output, hda_fn_nid) in buses {
        for kind in [CtlKind::Volume, CtlKind::Switch] {
            let name = control_name(bus, *output, kind);
            let index = out
                .iter()
                .filter(|c| name_of(&c.info) == name.as_bytes())
                .count() as u32;
            let mut name_field = [0u8; ctl::NAME_SIZE];
            name_field[..name.len()].copy_from_slice(name.as_bytes());
            let rw = (1 << ctl::ACCESS_READ) | (1 << ctl::ACCESS_WRITE);
            let (role, r#type, access, min, max) = match kind {
                CtlKind::Volume => (
                    ctl::ROLE_VOLUME,
                    ctl::TYPE_INTEGER,
                    rw | (1 << ctl::ACCESS_TLV_READ),
                    VOLUME_MIN,
                    VOLUME_MAX,
                ),
                CtlKind::Switch => (ctl::ROLE_MUTE, ctl::TYPE_BOOLEAN, rw, 0, 1),
            };
            out.push(ControlSpec {
                stream_id: *stream_id,
                kind,
                info: p::CtlInfo {
                    hdr: p::Info {
                        hda_fn_nid: (*hda_fn_nid).into(),
                    },
                    role: role.into(),
                    r#type: r#type.into(),
                    access: access.into(),
                    count: 1.into(),
                    index: index.into(),
                    name: name_field,
                    min: min.into(),
                    max: max.into(),
                    step: 1.into(),
                    ..Default::default()
                },
            });
        }
    }
    out
}

/// A control's name without its NUL padding.
pub fn name_of(info: &p::CtlInfo) -> &[u8] {
    let len = info
        .name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(info.name.len());
    &info.name[..len]
}

/// The DB_SCALE TLV of every volume control: four native-endian words as ALSA reads them
/// (the guests this serves are little-endian, as the rest of the wire).
pub fn volume_tlv() -> [u8; 16] {
    let words = [
        ctl::TLVT_DB_SCALE,
        8,
        DB_MIN_CENTI as u32,
        DB_STEP_CENTI as u32 | ctl::TLV_DB_SCALE_MUTE,
    ];
    let mut out = [0u8; 16];
    for (chunk, word) in out.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    out
}

/// The CTL_NOTIFY event telling the driver that `control_id`'s value changed.
pub fn value_changed_event(control_id: u16) -> p::Event {
    let event = p::CtlEvent {
        hdr: p::Hdr {
            code: p::EVT_CTL_NOTIFY.into(),
        },
        control_id: control_id.into(),
        mask: (1u16 << ctl::EVT_MASK_VALUE).into(),
    };
    // The same 8 bytes: the event queue carries `Event`s.
    p::read_prefix(event.as_bytes()).unwrap_or_default()
}

/// The value of a control in its stream's gain, as its members read.
pub fn read_member(kind: CtlKind, gain: &Gain) -> u32 {
    match kind {
        CtlKind::Volume => gain.volume,
        CtlKind::Switch => u32::from(!gain.mute),
    }
}

/// The stream gain a CTL_WRITE of `value` (the request's value bytes) makes, or BAD_MSG: one
/// member within the control's range and on its step (a switch: 0 or 1), and every member past
/// the control's count zero (a driver sends zeros there; anything else is a count it got
/// wrong).
pub fn written_gain(spec: &ControlSpec, value: &[u8], current: Gain) -> Result<Gain, Status> {
    if value.len() < ctl::VALUE_SIZE {
        return Err(Status::BadMsg);
    }
    let count = (spec.info.count.get() as usize).clamp(1, ctl::MAX_INTEGER_MEMBERS);
    let member = |i: usize| {
        u32::from_le_bytes([
            value[4 * i],
            value[4 * i + 1],
            value[4 * i + 2],
            value[4 * i + 3],
        ])
    };
    if value[4 * count..ctl::VALUE_SIZE].iter().any(|&b| b != 0) {
        return Err(Status::BadMsg);
    }
    let (min, max, step) = (
        spec.info.min.get(),
        spec.info.max.get(),
        spec.info.step.get().max(1),
    );
    let v = member(0);
    // Integers are signed on the wire (le32 of ALSA's long): compare as signed, so that -1 is
    // below the minimum rather than far above it.
    let signed = v as i32;
    if signed < min as i32 || signed > max as i32 || (v - min) % step != 0 {
        return Err(Status::BadMsg);
    }
    Ok(match spec.kind {
        CtlKind::Volume => Gain {
            volume: v,
            ..current
        },
        CtlKind::Switch => Gain {
            mute: v == 0,
            ..current
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scale_is_db_linear_from_minus_50_db_to_0_db() {
        assert_eq!(Gain::UNITY.db_centi(), Some(0));
        assert_eq!(Gain::UNITY.amplitude(), 1.0);
        assert!(Gain::UNITY.is_unity());
        let half = Gain {
            volume: 88,
            mute: false,
        };
        assert_eq!(half.db_centi(), Some(-600));
        assert!((half.amplitude() - 0.501_187).abs() < 1e-5);
        assert_eq!(
            Gain {
                volume: 1,
                mute: false
            }
            .db_centi(),
            Some(-4950)
        );
        assert_eq!(
            Gain {
                volume: 0,
                mute: false
            }
            .amplitude(),
            0.0
        );
        assert!(Gain {
            volume: 0,
            mute: false
        }
        .is_silent());
        assert_eq!(
            Gain {
                volume: 100,
                mute: true
            }
            .amplitude(),
            0.0
        );
        assert_eq!(
            Gain {
                volume: 100,
                mute: true
            }
            .volume_amplitude(),
            1.0
        );
        assert!(!Gain {
            volume: 101,
            mute: false
        }
        .is_valid());
        assert_eq!(
            Gain {
                volume: 101,
                mute: false
            }
            .db_centi(),
            None
        );
    }

    #[test]
    fn amplitudes_map_back_to_their_step() {
        for volume in VOLUME_MIN..=VOLUME_MAX {
            let gain = Gain {
                volume,
                mute: false,
            };
            assert_eq!(Gain::from_amplitude(gain.volume_amplitude(), false), gain);
        }
        assert_eq!(
            Gain::from_amplitude(2.0, true),
            Gain {
                volume: 100,
                mute: true
            }
        );
        assert_eq!(Gain::from_amplitude(1e-9, false).volume, 0);
        assert_eq!(Gain::from_amplitude(f32::NAN, false).volume, 0);
        assert_eq!(Gain::from_amplitude(-1.0, false).volume, 0);
        // PipeWire's cubic 50 % (0.125 linear) is -18 dB: step 64.
        assert_eq!(Gain::from_amplitude(0.125, false).volume, 64);
    }

    #[test]
    fn names_fit_the_wire_and_repeat_with_an_index() {
        assert_eq!(
            control_name("Media", true, CtlKind::Volume),
            "Media Playback Volume"
        );
        assert_eq!(
            control_name("Mic", false, CtlKind::Switch),
            "Mic Capture Switch"
        );
        let long = "N".repeat(64);
        let cut = control_name(&long, true, CtlKind::Volume);
        assert_eq!(cut.len(), MAX_NAME_BYTES);
        assert!(cut.ends_with(" Playback Volume"));
        // Cut at a character boundary.
        let accents = "é".repeat(30);
        assert!(control_name(&accents, false, CtlKind::Volume).len() <= MAX_NAME_BYTES);
        let specs = build_controls(&[(0, long.clone(), true, 0), (1, long + "x", true, 1)]);
        let indexes: Vec<u32> = specs.iter().map(|s| s.info.index.get()).collect();
        assert_eq!(indexes, [0, 0, 1, 1]);
        assert_eq!(specs[2].info.hdr.hda_fn_nid.get(), 1);
        assert!(specs.iter().all(|s| s.info.name[ctl::NAME_SIZE - 1] == 0));
    }

    #[test]
    fn written_values_are_checked_against_the_control() {
        let specs = build_controls(&[(0, "Media".into(), true, 0)]);
        let value = |v: u32| {
            let mut bytes = vec![0u8; ctl::VALUE_SIZE];
            bytes[..4].copy_from_slice(&v.to_le_bytes());
            bytes
        };
        let unity = Gain::UNITY;
        assert_eq!(
            written_gain(&specs[0], &value(0), unity),
            Ok(Gain {
                volume: 0,
                mute: false
            })
        );
        assert_eq!(
            written_gain(&specs[0], &value(101), unity),
            Err(Status::BadMsg)
        );
        assert_eq!(
            written_gain(&specs[1], &value(0), unity),
            Ok(Gain {
                volume: 100,
                mute: true
            })
        );
        assert_eq!(
            written_gain(
                &specs[1],
                &value(1),
                Gain {
                    volume: 3,
                    mute: true
                }
            ),
            Ok(Gain {
                volume: 3,
                mute: false
            })
        );
        assert_eq!(
            written_gain(&specs[1], &value(2), unity),
            Err(Status::BadMsg)
        );
        assert_eq!(
            written_gain(&specs[0], &value(5)[..511], unity),
            Err(Status::BadMsg)
        );
        // A step of 2 refuses odd values.
        let mut stepped = specs[0].clone();
        stepped.info.step = 2.into();
        assert_eq!(
            written_gain(&stepped, &value(51), unity),
            Err(Status::BadMsg)
        );
        assert!(written_gain(&stepped, &value(50), unity).is_ok());
    }
}
