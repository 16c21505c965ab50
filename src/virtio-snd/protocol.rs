//! Wire format of the VIRTIO sound device (device ID 25), byte-exact to the spec.
//!
//! Every struct is `#[repr(C, packed)]`-equivalent through zerocopy's unaligned little-endian
//! types, so parsing guest bytes is a bounds-checked copy with no `unsafe` and no alignment
//! assumptions. Parsing helpers are pure functions over byte slices (fuzzable).

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

pub const VIRTIO_ID_SOUND: u32 = 25;

/// Queue indexes.
pub const CONTROL_QUEUE: u16 = 0;
pub const EVENT_QUEUE: u16 = 1;
pub const TX_QUEUE: u16 = 2;
pub const RX_QUEUE: u16 = 3;
pub const NUM_QUEUES: usize = 4;

// Request codes.
pub const R_JACK_INFO: u32 = 1;
pub const R_JACK_REMAP: u32 = 2;
pub const R_PCM_INFO: u32 = 0x0100;
pub const R_PCM_SET_PARAMS: u32 = 0x0101;
pub const R_PCM_PREPARE: u32 = 0x0102;
pub const R_PCM_RELEASE: u32 = 0x0103;
pub const R_PCM_START: u32 = 0x0104;
pub const R_PCM_STOP: u32 = 0x0105;
pub const R_CHMAP_INFO: u32 = 0x0200;
/// Control element requests (VIRTIO 1.3, only with [`F_CTLS`]).
pub const R_CTL_INFO: u32 = 0x0300;
pub const R_CTL_ENUM_ITEMS: u32 = 0x0301;
pub const R_CTL_READ: u32 = 0x0302;
pub const R_CTL_WRITE: u32 = 0x0303;
pub const R_CTL_TLV_READ: u32 = 0x0304;
pub const R_CTL_TLV_WRITE: u32 = 0x0305;
pub const R_CTL_TLV_COMMAND: u32 = 0x0306;

// Event codes.
pub const EVT_JACK_CONNECTED: u32 = 0x1000;
pub const EVT_JACK_DISCONNECTED: u32 = 0x1001;
pub const EVT_PCM_PERIOD_ELAPSED: u32 = 0x1100;
pub const EVT_PCM_XRUN: u32 = 0x1101;
pub const EVT_CTL_NOTIFY: u32 = 0x1200;

/// Device feature bit: control elements (adds `controls` to the configuration space).
pub const F_CTLS: u32 = 0;

/// Status codes written back to the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Status {
    Ok = 0x8000,
    BadMsg = 0x8001,
    NotSupp = 0x8002,
    IoErr = 0x8003,
}

impl Status {
    pub fn code(self) -> u32 {
        self as u32
    }
}

// Directions.
pub const D_OUTPUT: u8 = 0;
pub const D_INPUT: u8 = 1;

// Jack feature bits.
pub const JACK_F_REMAP: u32 = 0;

// PCM feature bits (virtio_snd_pcm_info.features / set_params.features).
pub const PCM_F_SHMEM_HOST: u32 = 0;
pub const PCM_F_SHMEM_GUEST: u32 = 1;
pub const PCM_F_MSG_POLLING: u32 = 2;
pub const PCM_F_EVT_SHMEM_PERIODS: u32 = 3;
pub const PCM_F_EVT_XRUNS: u32 = 4;

/// PCM sample formats (bit positions in `formats`).
pub mod format {
    pub const IMA_ADPCM: u8 = 0;
    pub const MU_LAW: u8 = 1;
    pub const A_LAW: u8 = 2;
    pub const S8: u8 = 3;
    pub const U8: u8 = 4;
    pub const S16: u8 = 5;
    pub const U16: u8 = 6;
    pub const S18_3: u8 = 7;
    pub const U18_3: u8 = 8;
    pub const S20_3: u8 = 9;
    pub const U20_3: u8 = 10;
    pub const S24_3: u8 = 11;
    pub const U24_3: u8 = 12;
    pub const S20: u8 = 13;
    pub const U20: u8 = 14;
    pub const S24: u8 = 15;
    pub const U24: u8 = 16;
    pub const S32: u8 = 17;
    pub const U32: u8 = 18;
    pub const FLOAT: u8 = 19;
    pub const FLOAT64: u8 = 20;
    pub const DSD_U8: u8 = 21;
    pub const DSD_U16: u8 = 22;
    pub const DSD_U32: u8 = 23;
    pub const IEC958_SUBFRAME: u8 = 24;
    /// Highest defined format value.
    pub const MAX: u8 = IEC958_SUBFRAME;
}

/// PCM frame rates (bit positions in `rates`).
pub mod rate {
    pub const R5512: u8 = 0;
    pub const R8000: u8 = 1;
    pub const R11025: u8 = 2;
    pub const R16000: u8 = 3;
    pub const R22050: u8 = 4;
    pub const R32000: u8 = 5;
    pub const R44100: u8 = 6;
    pub const R48000: u8 = 7;
    pub const R64000: u8 = 8;
    pub const R88200: u8 = 9;
    pub const R96000: u8 = 10;
    pub const R176400: u8 = 11;
    pub const R192000: u8 = 12;
    pub const R384000: u8 = 13;
    /// Added after VIRTIO 1.3 working draft 01; Linux drivers do not know these two.
    pub const R12000: u8 = 14;
    pub const R24000: u8 = 15;
    pub const MAX: u8 = R24000;
}

/// Channel map positions.
pub mod chmap {
    pub const NONE: u8 = 0;
    pub const NA: u8 = 1;
    pub const MONO: u8 = 2;
    pub const FL: u8 = 3;
    pub const FR: u8 = 4;
    pub const RL: u8 = 5;
    pub const RR: u8 = 6;
    pub const FC: u8 = 7;
    pub const LFE: u8 = 8;
    pub const SL: u8 = 9;
    pub const SR: u8 = 10;
    pub const RC: u8 = 11;
    pub const FLC: u8 = 12;
    pub const FRC: u8 = 13;
    pub const RLC: u8 = 14;
    pub const RRC: u8 = 15;
    pub const FLW: u8 = 16;
    pub const FRW: u8 = 17;
    pub const FLH: u8 = 18;
    pub const FCH: u8 = 19;
    pub const FRH: u8 = 20;
    pub const TC: u8 = 21;
    pub const TFL: u8 = 22;
    pub const TFR: u8 = 23;
    pub const TFC: u8 = 24;
    pub const TRL: u8 = 25;
    pub const TRR: u8 = 26;
    pub const TRC: u8 = 27;
    pub const TFLC: u8 = 28;
    pub const TFRC: u8 = 29;
    pub const TSL: u8 = 30;
    pub const TSR: u8 = 31;
    pub const LLFE: u8 = 32;
    pub const RLFE: u8 = 33;
    pub const BC: u8 = 34;
    pub const BLC: u8 = 35;
    pub const BRC: u8 = 36;
    pub const MAX: u8 = BRC;
    pub const MAX_SIZE: usize = 18;
}

/// Control element roles, value types, access bits and event mask bits (VIRTIO 1.3 5.14.6.10,
/// `include/uapi/linux/virtio_snd.h`).
pub mod ctl {
    pub const ROLE_UNDEFINED: u32 = 0;
    pub const ROLE_VOLUME: u32 = 1;
    pub const ROLE_MUTE: u32 = 2;
    pub const ROLE_GAIN: u32 = 3;

    pub const TYPE_BOOLEAN: u32 = 0;
    pub const TYPE_INTEGER: u32 = 1;
    pub const TYPE_INTEGER64: u32 = 2;
    pub const TYPE_ENUMERATED: u32 = 3;
    pub const TYPE_BYTES: u32 = 4;
    pub const TYPE_IEC958: u32 = 5;

    /// Bit positions in `CtlInfo::access`.
    pub const ACCESS_READ: u32 = 0;
    pub const ACCESS_WRITE: u32 = 1;
    pub const ACCESS_VOLATILE: u32 = 2;
    pub const ACCESS_INACTIVE: u32 = 3;
    pub const ACCESS_TLV_READ: u32 = 4;
    pub const ACCESS_TLV_WRITE: u32 = 5;
    pub const ACCESS_TLV_COMMAND: u32 = 6;

    /// Bit positions in `CtlEvent::mask`.
    pub const EVT_MASK_VALUE: u16 = 0;
    pub const EVT_MASK_INFO: u16 = 1;
    pub const EVT_MASK_TLV: u16 = 2;

    /// Bytes of `virtio_snd_ctl_info::name`, its NUL included.
    pub const NAME_SIZE: usize = 44;
    /// Bytes of `struct virtio_snd_ctl_value` (a union of 128 le32, 64 le64, 512 bytes, IEC958).
    pub const VALUE_SIZE: usize = 512;
    /// Members of `virtio_snd_ctl_value::integer`.
    pub const MAX_INTEGER_MEMBERS: usize = VALUE_SIZE / 4;

    /// ALSA's TLV type of a dB scale (`SNDRV_CTL_TLVT_DB_SCALE`, `sound/tlv.h`): the words are
    /// {type, 8, min in 0.01 dB, step in 0.01 dB | MUTE}; the driver hands them to ALSA as read.
    pub const TLVT_DB_SCALE: u32 = 1;
    /// In a DB_SCALE's last word: the lowest value is silence (`TLV_DB_SCALE_MUTE`).
    pub const TLV_DB_SCALE_MUTE: u32 = 0x10000;
}

/// Bytes of one sample of `format`, for the formats this device can stream as linear PCM.
/// `None` for compressed/DSD formats whose frame size is not a sample multiple we support.
pub fn sample_bytes(fmt: u8) -> Option<u32> {
    use format::*;
    Some(match fmt {
        MU_LAW | A_LAW | S8 | U8 => 1,
        S16 | U16 => 2,
        S18_3 | U18_3 | S20_3 | U20_3 | S24_3 | U24_3 => 3,
        S20 | U20 | S24 | U24 | S32 | U32 | FLOAT => 4,
        FLOAT64 => 8,
        _ => return None,
    })
}

/// One sample of silence, little-endian: unsigned formats are centred, companded ones are
/// their code for zero, not zero.
pub fn silence_sample(fmt: u8) -> Vec<u8> {
    let (pattern, width) = silence_pattern(fmt);
    pattern[..width].to_vec()
}

/// [`silence_sample`] without an allocation (for real-time paths): the sample's bytes in the
/// first `width` bytes of the array.
pub fn silence_pattern(fmt: u8) -> ([u8; 8], usize) {
    use format::*;
    // Companded zero: G.711's codes for the smallest positive level.
    match fmt {
        MU_LAW => return ([0xff, 0, 0, 0, 0, 0, 0, 0], 1),
        A_LAW => return ([0xd5, 0, 0, 0, 0, 0, 0, 0], 1),
        _ => {}
    }
    let width = sample_bytes(fmt).unwrap_or(1) as usize;
    let mut sample = [0u8; 8];
    let centre_bit = match fmt {
        U8 => 7,
        U16 => 15,
        U18_3 => 17,
        U20_3 | U20 => 19,
        U24_3 | U24 => 23,
        U32 => 31,
        _ => return (sample, width),
    };
    sample[centre_bit / 8] = 1 << (centre_bit % 8);
    (sample, width)
}

/// Frames per second of a rate index, `None` if out of range.
pub fn rate_hz(rate_index: u8) -> Option<u32> {
    const HZ: [u32; 16] = [
        5512, 8000, 11025, 16000, 22050, 32000, 44100, 48000, 64000, 88200, 96000, 176400, 192000,
        384000, 12000, 24000,
    ];
    HZ.get(rate_index as usize).copied()
}

/// Rate index of a frequency, the inverse of [`rate_hz`].
pub fn rate_index(hz: u32) -> Option<u8> {
    (0..=rate::MAX).find(|&i| rate_hz(i) == Some(hz))
}

/// Declares a wire struct of the spec: little-endian fields and no padding (`Unaligned`), and
/// any bytes are a valid value (`FromBytes`), so parsing guest bytes is a bounds-checked copy.
/// Each gets `SIZE`, its length on the wire.
macro_rules! wire {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$field_meta:meta])* pub $field:ident: $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq,
            FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
        )]
        #[repr(C)]
        pub struct $name {
            $($(#[$field_meta])* pub $field: $ty,)*
        }

        // All zeros (std derives Default only for arrays of up to 32 elements).
        impl Default for $name {
            fn default() -> Self {
                <$name as zerocopy::FromZeros>::new_zeroed()
            }
        }

        impl $name {
            pub const SIZE: u64 = ::core::mem::size_of::<$name>() as u64;
        }
    };
}

wire! {
    pub struct VirtioSndConfig {
        pub jacks: U32,
        pub streams: U32,
        pub chmaps: U32,
    }
}

wire! {
    /// The configuration space when [`F_CTLS`] is negotiated.
    pub struct VirtioSndConfigCtls {
        pub jacks: U32,
        pub streams: U32,
        pub chmaps: U32,
        pub controls: U32,
    }
}

wire! {
    pub struct Hdr {
        pub code: U32,
    }
}

wire! {
    pub struct Event {
        pub hdr: Hdr,
        pub data: U32,
    }
}

wire! {
    pub struct QueryInfo {
        pub hdr: Hdr,
        pub start_id: U32,
        pub count: U32,
        pub size: U32,
    }
}

wire! {
    pub struct Info {
        pub hda_fn_nid: U32,
    }
}

wire! {
    pub struct JackHdr {
        pub hdr: Hdr,
        pub jack_id: U32,
    }
}

wire! {
    pub struct JackInfo {
        pub hdr: Info,
        pub features: U32,
        pub hda_reg_defconf: U32,
        pub hda_reg_caps: U32,
        pub connected: u8,
        pub padding: [u8; 7],
    }
}

wire! {
    pub struct JackRemap {
        pub hdr: JackHdr,
        pub association: U32,
        pub sequence: U32,
    }
}

wire! {
    pub struct PcmHdr {
        pub hdr: Hdr,
        pub stream_id: U32,
    }
}

wire! {
    pub struct PcmInfo {
        pub hdr: Info,
        pub features: U32,
        pub formats: U64,
        pub rates: U64,
        pub direction: u8,
        pub channels_min: u8,
        pub channels_max: u8,
        pub padding: [u8; 5],
    }
}

wire! {
    pub struct PcmSetParams {
        pub hdr: PcmHdr,
        pub buffer_bytes: U32,
        pub period_bytes: U32,
        pub features: U32,
        pub channels: u8,
        pub format: u8,
        pub rate: u8,
        pub padding: u8,
    }
}

wire! {
    /// Header of every tx/rx message.
    pub struct PcmXfer {
        pub stream_id: U32,
    }
}

wire! {
    /// Trailer the device writes at the end of every tx/rx message.
    pub struct PcmStatus {
        pub status: U32,
        pub latency_bytes: U32,
    }
}

wire! {
    pub struct ChmapInfo {
        pub hdr: Info,
        pub direction: u8,
        pub channels: u8,
        pub positions: [u8; chmap::MAX_SIZE],
    }
}

wire! {
    /// Header of every control element request (CTL_READ, CTL_TLV_READ, ... take only this).
    pub struct CtlHdr {
        pub hdr: Hdr,
        pub control_id: U32,
    }
}

wire! {
    /// `struct virtio_snd_ctl_info`. Its value union is 8-aligned in C (it holds le64s), so 4
    /// bytes of padding follow `name`; the union is laid out as its integer member, then the
    /// rest of the integer64 member's room.
    pub struct CtlInfo {
        pub hdr: Info,
        pub role: U32,
        pub r#type: U32,
        /// 1 << ctl::ACCESS_*.
        pub access: U32,
        pub count: U32,
        /// Tells apart elements of the same name.
        pub index: U32,
        /// NUL-terminated.
        pub name: [u8; ctl::NAME_SIZE],
        pub padding: [u8; 4],
        pub min: U32,
        pub max: U32,
        pub step: U32,
        pub value_padding: [u8; 12],
    }
}

wire! {
    /// `struct virtio_snd_ctl_event`: the same 8 bytes as [`Event`], with a 16-bit control id
    /// and reason mask where `Event::data` is.
    pub struct CtlEvent {
        pub hdr: Hdr,
        pub control_id: U16,
        /// 1 << ctl::EVT_MASK_*.
        pub mask: U16,
    }
}

/// Reads a `T` from the start of `bytes`; `None` if there are too few bytes.
/// Extra trailing bytes are ignored, as the spec allows drivers to send larger requests.
pub fn read_prefix<T: FromBytes + KnownLayout + Immutable>(bytes: &[u8]) -> Option<T> {
    T::read_from_prefix(bytes).ok().map(|(value, _rest)| value)
}

/// The request code of a control message, `None` if the header is short.
pub fn request_code(bytes: &[u8]) -> Option<u32> {
    read_prefix::<Hdr>(bytes).map(|h| h.code.get())
}

/// A request code by name (`PCM_SET_PARAMS`, ...), for logs.
pub fn request_name(code: u32) -> &'static str {
    match code {
        R_JACK_INFO => "JACK_INFO",
        R_JACK_REMAP => "JACK_REMAP",
        R_PCM_INFO => "PCM_INFO",
        R_PCM_SET_PARAMS => "PCM_SET_PARAMS",
        R_PCM_PREPARE => "PCM_PREPARE",
        R_PCM_RELEASE => "PCM_RELEASE",
        R_PCM_START => "PCM_START",
        R_PCM_STOP => "PCM_STOP",
        R_CHMAP_INFO => "CHMAP_INFO",
        R_CTL_INFO => "CTL_INFO",
        R_CTL_ENUM_ITEMS => "CTL_ENUM_ITEMS",
        R_CTL_READ => "CTL_READ",
        R_CTL_WRITE => "CTL_WRITE",
        R_CTL_TLV_READ => "CTL_TLV_READ",
        R_CTL_TLV_WRITE => "CTL_TLV_WRITE",
        R_CTL_TLV_COMMAND => "CTL_TLV_COMMAND",
        _ => "unknown request",
    }
}

/// The status a response starts with, by name (`OK`, `BAD_MSG`, ...), for logs.
pub fn status_name(response: &[u8]) -> &'static str {
    match request_code(response) {
        Some(0x8000) => "OK",
        Some(0x8001) => "BAD_MSG",
        Some(0x8002) => "NOT_SUPP",
        Some(0x8003) => "IO_ERR",
        Some(_) => "unknown status",
        None => "no status",
    }
}

/// A status-only response.
pub fn status_bytes(status: Status) -> [u8; 4] {
    status.code().to_le_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn struct_sizes_match_the_spec() {
        assert_eq!(size_of::<VirtioSndConfig>(), 12);
        assert_eq!(size_of::<Hdr>(), 4);
        assert_eq!(size_of::<Event>(), 8);
        assert_eq!(size_of::<QueryInfo>(), 16);
        assert_eq!(size_of::<Info>(), 4);
        assert_eq!(size_of::<JackHdr>(), 8);
        assert_eq!(size_of::<JackInfo>(), 24);
        assert_eq!(size_of::<JackRemap>(), 16);
        assert_eq!(size_of::<PcmHdr>(), 8);
        assert_eq!(size_of::<PcmInfo>(), 32);
        assert_eq!(size_of::<PcmSetParams>(), 24);
        assert_eq!(size_of::<PcmXfer>(), 4);
        assert_eq!(size_of::<PcmStatus>(), 8);
        assert_eq!(size_of::<ChmapInfo>(), 24);
        assert_eq!(size_of::<VirtioSndConfigCtls>(), 16);
        assert_eq!(size_of::<CtlHdr>(), 8);
        // Linux's struct virtio_snd_ctl_info: 68 bytes of fields, padding to the 8-aligned
        // union, a 24-byte union.
        assert_eq!(size_of::<CtlInfo>(), 96);
        assert_eq!(size_of::<CtlEvent>(), 8);
        assert_eq!(size_of::<CtlEvent>(), size_of::<Event>());
    }

    #[test]
    fn control_offsets_match_linux() {
        assert_eq!(offset_of!(VirtioSndConfigCtls, controls), 12);
        assert_eq!(offset_of!(CtlHdr, control_id), 4);
        assert_eq!(offset_of!(CtlInfo, role), 4);
        assert_eq!(offset_of!(CtlInfo, r#type), 8);
        assert_eq!(offset_of!(CtlInfo, access), 12);
        assert_eq!(offset_of!(CtlInfo, count), 16);
        assert_eq!(offset_of!(CtlInfo, index), 20);
        assert_eq!(offset_of!(CtlInfo, name), 24);
        assert_eq!(offset_of!(CtlInfo, min), 72);
        assert_eq!(offset_of!(CtlInfo, max), 76);
        assert_eq!(offset_of!(CtlInfo, step), 80);
        assert_eq!(offset_of!(CtlEvent, control_id), 4);
        assert_eq!(offset_of!(CtlEvent, mask), 6);
        assert_eq!(R_CTL_INFO, 0x300);
        assert_eq!(R_CTL_TLV_COMMAND, 0x306);
        assert_eq!(EVT_CTL_NOTIFY, 0x1200);
        assert_eq!(ctl::TYPE_IEC958, 5);
        assert_eq!(ctl::ACCESS_TLV_COMMAND, 6);
        assert_eq!(ctl::ROLE_GAIN, 3);
    }

    #[test]
    fn field_offsets_match_the_spec() {
        assert_eq!(offset_of!(VirtioSndConfig, streams), 4);
        assert_eq!(offset_of!(VirtioSndConfig, chmaps), 8);
        assert_eq!(offset_of!(Event, data), 4);
        assert_eq!(offset_of!(QueryInfo, start_id), 4);
        assert_eq!(offset_of!(QueryInfo, count), 8);
        assert_eq!(offset_of!(QueryInfo, size), 12);
        assert_eq!(offset_of!(JackHdr, jack_id), 4);
        assert_eq!(offset_of!(JackInfo, features), 4);
        assert_eq!(offset_of!(JackInfo, hda_reg_defconf), 8);
        assert_eq!(offset_of!(JackInfo, hda_reg_caps), 12);
        assert_eq!(offset_of!(JackInfo, connected), 16);
        assert_eq!(offset_of!(JackInfo, padding), 17);
        assert_eq!(offset_of!(JackRemap, association), 8);
        assert_eq!(offset_of!(JackRemap, sequence), 12);
        assert_eq!(offset_of!(PcmHdr, stream_id), 4);
        assert_eq!(offset_of!(PcmInfo, features), 4);
        assert_eq!(offset_of!(PcmInfo, formats), 8);
        assert_eq!(offset_of!(PcmInfo, rates), 16);
        assert_eq!(offset_of!(PcmInfo, direction), 24);
        assert_eq!(offset_of!(PcmInfo, channels_min), 25);
        assert_eq!(offset_of!(PcmInfo, channels_max), 26);
        assert_eq!(offset_of!(PcmInfo, padding), 27);
        assert_eq!(offset_of!(PcmSetParams, buffer_bytes), 8);
        assert_eq!(offset_of!(PcmSetParams, period_bytes), 12);
        assert_eq!(offset_of!(PcmSetParams, features), 16);
        assert_eq!(offset_of!(PcmSetParams, channels), 20);
        assert_eq!(offset_of!(PcmSetParams, format), 21);
        assert_eq!(offset_of!(PcmSetParams, rate), 22);
        assert_eq!(offset_of!(PcmSetParams, padding), 23);
        assert_eq!(offset_of!(PcmStatus, latency_bytes), 4);
        assert_eq!(offset_of!(ChmapInfo, direction), 4);
        assert_eq!(offset_of!(ChmapInfo, channels), 5);
        assert_eq!(offset_of!(ChmapInfo, positions), 6);
    }

    #[test]
    fn codes_match_the_spec() {
        assert_eq!(Status::Ok.code(), 0x8000);
        assert_eq!(Status::BadMsg.code(), 0x8001);
        assert_eq!(Status::NotSupp.code(), 0x8002);
        assert_eq!(Status::IoErr.code(), 0x8003);
        assert_eq!(format::S16, 5);
        assert_eq!(format::S32, 17);
        assert_eq!(format::FLOAT, 19);
        assert_eq!(format::IEC958_SUBFRAME, 24);
        assert_eq!(rate::R44100, 6);
        assert_eq!(rate::R48000, 7);
        assert_eq!(rate::R384000, 13);
        assert_eq!(chmap::TSL, 30);
        assert_eq!(chmap::TSR, 31);
        assert_eq!(chmap::LLFE, 32);
        assert_eq!(chmap::RLFE, 33);
        assert_eq!(chmap::BC, 34);
        assert_eq!(chmap::BLC, 35);
        assert_eq!(chmap::BRC, 36);
    }

    #[test]
    fn rates_round_trip() {
        assert_eq!(rate_hz(rate::R48000), Some(48000));
        assert_eq!(rate_hz(rate::R12000), Some(12000));
        assert_eq!(rate_hz(16), None);
        for i in 0..=rate::MAX {
            assert_eq!(rate_index(rate_hz(i).unwrap()), Some(i));
        }
    }

    #[test]
    fn little_endian_encoding() {
        let p = PcmSetParams {
            hdr: PcmHdr {
                hdr: Hdr {
                    code: R_PCM_SET_PARAMS.into(),
                },
                stream_id: 2.into(),
            },
            buffer_bytes: 0x01020304.into(),
            ..Default::default()
        };
        let b = p.as_bytes();
        assert_eq!(&b[0..4], &[0x01, 0x01, 0, 0]);
        assert_eq!(&b[4..8], &[2, 0, 0, 0]);
        assert_eq!(&b[8..12], &[4, 3, 2, 1]);
    }

    #[test]
    fn short_input_is_rejected() {
        assert_eq!(request_code(&[1, 0, 0]), None);
        assert!(read_prefix::<PcmSetParams>(&[0u8; 23]).is_none());
        assert!(read_prefix::<PcmSetParams>(&[0u8; 30]).is_some());
    }

    #[test]
    fn silence_is_the_centre_value() {
        assert_eq!(silence_sample(format::S16), vec![0, 0]);
        assert_eq!(silence_sample(format::U8), vec![0x80]);
        assert_eq!(silence_sample(format::U16), vec![0, 0x80]);
        assert_eq!(silence_sample(format::U24_3), vec![0, 0, 0x80]);
        assert_eq!(silence_sample(format::U32), vec![0, 0, 0, 0x80]);
        assert_eq!(silence_sample(format::FLOAT), vec![0; 4]);
        assert_eq!(silence_sample(format::MU_LAW), vec![0xff]);
        assert_eq!(silence_sample(format::A_LAW), vec![0xd5]);
    }
}
