//! Control queue requests: parsing, validation, the PCM state machine and the responses.
//!
//! Pure logic over bytes: the data path is reached through the [`PcmHost`] trait, so every
//! request can be unit-tested (and fuzzed) without a broker or guest memory.

use zerocopy::IntoBytes;

use crate::ctl::{self, ControlSpec, CtlKind, Gain};
use crate::protocol::{self as p, Status};

/// Largest `size` a driver may ask per item of an INFO query; bounds the response allocation.
pub const MAX_INFO_ITEM_SIZE: u32 = 1024;

/// What the device offers for one PCM stream (config intersected with the broker's backend).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PcmCaps {
    pub direction: u8,
    pub hda_fn_nid: u32,
    pub features: u32,
    pub formats: u64,
    pub rates: u64,
    pub channels_min: u8,
    pub channels_max: u8,
}

/// Parameters the driver set for a stream, already validated against its caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PcmParams {
    pub buffer_bytes: u32,
    pub period_bytes: u32,
    pub features: u32,
    pub channels: u8,
    pub format: u8,
    pub rate: u8,
}

impl PcmParams {
    /// Bytes per frame; validated params always have a linear format.
    pub fn frame_bytes(&self) -> u32 {
        p::sample_bytes(self.format).unwrap_or(1) * u32::from(self.channels)
    }

    pub fn rate_hz(&self) -> u32 {
        p::rate_hz(self.rate).unwrap_or(48000)
    }

    pub fn period_frames(&self) -> u32 {
        self.period_bytes / self.frame_bytes()
    }

    /// Checks params against caps and limits; the error is the status to answer with.
    pub fn validate(&self, caps: &PcmCaps, max_buffer_bytes: u32) -> Result<(), Status> {
        let sample_bytes = p::sample_bytes(self.format);
        if self.format > p::format::MAX || self.rate > p::rate::MAX || self.channels == 0 {
            return Err(Status::BadMsg);
        }
        if caps.formats & (1u64 << self.format) == 0
            || caps.rates & (1u64 << self.rate) == 0
            || sample_bytes.is_none()
        {
            return Err(Status::NotSupp);
        }
        if self.channels < caps.channels_min || self.channels > caps.channels_max {
            return Err(Status::NotSupp);
        }
        // Shared-memory transports are placeholders in the spec; anything not offered is refused.
        if self.features & !caps.features != 0 {
            return Err(Status::NotSupp);
        }
        if self.period_bytes == 0
            || self.buffer_bytes == 0
            || self.period_bytes > self.buffer_bytes
            || !self.buffer_bytes.is_multiple_of(self.period_bytes)
            || !self.period_bytes.is_multiple_of(self.frame_bytes())
        {
            return Err(Status::BadMsg);
        }
        if self.buffer_bytes > max_buffer_bytes {
            return Err(Status::NotSupp);
        }
        Ok(())
    }
}

/// PCM stream states of the spec's command lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PcmState {
    /// No parameters set yet.
    Initial,
    ParamsSet,
    Prepared,
    Running,
    Stopped,
    Released,
}

impl PcmState {
    /// Whether `request` is allowed from this state (VIRTIO sound, PCM command lifecycle).
    pub fn allows(self, request: u32) -> bool {
        use PcmState::*;
        match request {
            p::R_PCM_SET_PARAMS => matches!(self, Initial | ParamsSet | Prepared | Released),
            p::R_PCM_PREPARE => matches!(self, ParamsSet | Prepared | Released),
            p::R_PCM_START => matches!(self, Prepared | Stopped),
            p::R_PCM_STOP => matches!(self, Running),
            p::R_PCM_RELEASE => matches!(self, Prepared | Stopped),
            _ => false,
        }
    }

    /// Whether tx/rx buffers are accepted (queued) in this state.
    pub fn accepts_io(self) -> bool {
        matches!(
            self,
            PcmState::Prepared | PcmState::Running | PcmState::Stopped
        )
    }
}

/// The data path behind PCM control requests (the worker's streams and broker link in
/// production). Each call gets the stream it is about, `S`: the caller's one struct per stream,
/// which holds the stream's [`PcmStream`] next to its data path.
pub trait PcmHost<S> {
    /// Sets up (or re-sets up) the stream's transport with these params. Pending buffers of the
    /// stream are completed first.
    fn prepare(&mut self, stream_id: u32, stream: &mut S, params: &PcmParams)
        -> Result<(), Status>;
    fn start(&mut self, stream_id: u32, stream: &mut S) -> Result<(), Status>;
    fn stop(&mut self, stream_id: u32, stream: &mut S) -> Result<(), Status>;
    /// Frees the transport; must complete every pending buffer of the stream before returning.
    fn release(&mut self, stream_id: u32, stream: &mut S) -> Result<(), Status>;
    /// Applies a stream's new volume and mute (a CTL_WRITE); the stream keeps the new value
    /// only if this succeeds. A host with nothing to apply them to accepts them.
    fn set_gain(&mut self, stream_id: u32, stream: &mut S, gain: Gain) -> Result<(), Status> {
        let _ = (stream_id, stream, gain);
        Ok(())
    }
}

/// One PCM stream as the spec's command lifecycle sees it: what the device offers, where the
/// stream is in the lifecycle, and the params the driver set. Changed only by
/// [`ControlState::handle`] (and [`PcmStream::reset`]), so no transition the spec forbids.
#[derive(Debug, Clone)]
pub struct PcmStream {
    caps: PcmCaps,
    state: PcmState,
    params: Option<PcmParams>,
    /// What its control elements hold (unity when it has none).
    gain: Gain,
}

impl PcmStream {
    pub fn new(caps: PcmCaps) -> PcmStream {
        PcmStream {
            caps,
            state: PcmState::Initial,
            params: None,
            gain: Gain::UNITY,
        }
    }

    /// The stream's volume and mute, as its controls read.
    pub fn gain(&self) -> Gain {
        self.gain
    }

    /// A change made on the host's side (the broker's news); a CTL_WRITE goes through
    /// [`ControlState::handle`].
    pub fn set_gain(&mut self, gain: Gain) {
        self.gain = gain;
    }

    pub fn caps(&self) -> &PcmCaps {
        &self.caps
    }

    pub fn state(&self) -> PcmState {
        self.state
    }

    /// The params of the last successful SET_PARAMS.
    pub fn params(&self) -> Option<PcmParams> {
        self.params
    }

    pub fn is_output(&self) -> bool {
        self.caps.direction == p::D_OUTPUT
    }

    /// Forgets the stream's state, as after a device reset (its gain stays: it is the host's
    /// setting as much as the guest's). The caller frees its transport.
    pub fn reset(&mut self) {
        self.state = PcmState::Initial;
        self.params = None;
    }
}

impl AsRef<PcmStream> for PcmStream {
    fn as_ref(&self) -> &PcmStream {
        self
    }
}

impl AsMut<PcmStream> for PcmStream {
    fn as_mut(&mut self) -> &mut PcmStream {
        self
    }
}

#[derive(Debug, Clone)]
struct JackState {
    info: p::JackInfo,
    remap: bool,
}

/// What the device answers about itself besides its streams: its jacks (JACK_INFO), its
/// channel maps (CHMAP_INFO), and the largest PCM buffer it accepts.
#[derive(Debug, Clone, Default)]
pub struct DeviceLayout {
    pub jacks: Vec<p::JackInfo>,
    pub chmaps: Vec<p::ChmapInfo>,
    pub max_buffer_bytes: u32,
}

/// Control-plane state of the device besides its streams (each stream's is its
/// [`PcmStream`], kept by the caller with the rest of that stream).
#[derive(Debug, Clone)]
pub struct ControlState {
    jacks: Vec<JackState>,
    chmaps: Vec<p::ChmapInfo>,
    max_buffer_bytes: u32,
    controls: Vec<ControlSpec>,
    /// Whether the driver acknowledged VIRTIO_SND_F_CTLS: only then are CTL requests served.
    controls_negotiated: bool,
}

impl ControlState {
    pub fn new(layout: DeviceLayout) -> ControlState {
        let jacks = layout
            .jacks
            .into_iter()
            .map(|info| JackState {
                remap: info.features.get() & (1 << p::JACK_F_REMAP) != 0,
                info,
            })
            .collect();
        ControlState {
            jacks,
            chmaps: layout.chmaps,
            max_buffer_bytes: layout.max_buffer_bytes,
            controls: Vec::new(),
            controls_negotiated: false,
        }
    }

    /// The control elements it offers with VIRTIO_SND_F_CTLS (none: the feature is not
    /// offered).
    pub fn with_controls(mut self, controls: Vec<ControlSpec>) -> ControlState {
        // Event ids are 16 bits: the config never makes more (two per stream).
        self.controls = controls.into_iter().take(usize::from(u16::MAX)).collect();
        self
    }

    /// Whether the device offers VIRTIO_SND_F_CTLS: it has controls to offer.
    pub fn offers_controls(&self) -> bool {
        !self.controls.is_empty()
    }

    /// The driver's features were acknowledged: CTL requests are served only with F_CTLS.
    pub fn set_features(&mut self, features: u64) {
        self.controls_negotiated = self.offers_controls() && features & (1u64 << p::F_CTLS) != 0;
    }

    pub fn controls_negotiated(&self) -> bool {
        self.controls_negotiated
    }

    /// Whether `stream_id` has control elements (a host-side gain change is only news for a
    /// stream that has).
    pub fn stream_has_controls(&self, stream_id: u32) -> bool {
        self.controls.iter().any(|c| c.stream_id == stream_id)
    }

    /// The host end a jack follows appeared or went (`connected`): JACK_INFO reports it from
    /// now on, and the event that tells the driver, if it changed (none for no such jack).
    pub fn set_jack_connected(&mut self, jack_id: u32, connected: bool) -> Option<p::Event> {
        let jack = self.jacks.get_mut(jack_id as usize)?;
        if (jack.info.connected != 0) == connected {
            return None;
        }
        jack.info.connected = u8::from(connected);
        let code = if connected {
            p::EVT_JACK_CONNECTED
        } else {
            p::EVT_JACK_DISCONNECTED
        };
        Some(p::Event {
            hdr: p::Hdr { code: code.into() },
            data: jack_id.into(),
        })
    }

    /// The CTL_NOTIFY events for a host-side change of a stream's gain from `old` to `new`:
    /// one per control whose value changed, none without F_CTLS.
    pub fn gain_events(&self, stream_id: u32, old: Gain, new: Gain) -> Vec<p::Event> {
        if !self.controls_negotiated {
            return Vec::new();
        }
        self.controls
            .iter()
            .enumerate()
            .filter(|(_, c)| {
                c.stream_id == stream_id
                    && ctl::read_member(c.kind, &old) != ctl::read_member(c.kind, &new)
            })
            .map(|(id, _)| ctl::value_changed_event(id as u16))
            .collect()
    }

    /// The device's configuration space for a device with `streams` streams: 16 bytes, whose
    /// `controls` is non-zero only once F_CTLS is negotiated (12 bytes are the whole space
    /// without it).
    pub fn config_space(&self, streams: usize) -> p::VirtioSndConfigCtls {
        let controls = if self.controls_negotiated {
            self.controls.len() as u32
        } else {
            0
        };
        p::VirtioSndConfigCtls {
            jacks: (self.jacks.len() as u32).into(),
            streams: (streams as u32).into(),
            chmaps: (self.chmaps.len() as u32).into(),
            controls: controls.into(),
        }
    }

    /// Handles one control request. `resp_capacity` is the size of the device-writable part of
    /// the chain; the returned bytes never exceed it (empty if not even a status fits).
    pub fn handle<S: AsRef<PcmStream> + AsMut<PcmStream>>(
        &mut self,
        req: &[u8],
        resp_capacity: usize,
        streams: &mut [S],
        host: &mut dyn PcmHost<S>,
    ) -> Vec<u8> {
        if resp_capacity < 4 {
            log::warn!("control request without room for a status ({resp_capacity} bytes)");
            return Vec::new();
        }
        let Some(code) = p::request_code(req) else {
            return p::status_bytes(Status::BadMsg).to_vec();
        };
        let response = match code {
            // Without the feature these codes are as unknown as before it existed.
            p::R_CTL_INFO..=p::R_CTL_TLV_COMMAND if !self.controls_negotiated => {
                log::debug!("control element request {code:#x} without VIRTIO_SND_F_CTLS");
                p::status_bytes(Status::BadMsg).to_vec()
            }
            p::R_JACK_INFO | p::R_PCM_INFO | p::R_CHMAP_INFO | p::R_CTL_INFO => {
                self.query_info(code, req, resp_capacity, streams)
            }
            p::R_CTL_ENUM_ITEMS => self.ctl_enum_items(req).to_vec(),
            p::R_CTL_READ => self.ctl_read(req, resp_capacity, streams),
            p::R_CTL_WRITE => self.ctl_write(req, streams, host).to_vec(),
            p::R_CTL_TLV_READ => self.ctl_tlv_read(req, resp_capacity),
            p::R_CTL_TLV_WRITE | p::R_CTL_TLV_COMMAND => self.ctl_tlv_other(req).to_vec(),
            p::R_JACK_REMAP => self.jack_remap(req).to_vec(),
            p::R_PCM_SET_PARAMS => self.set_params(req, streams).to_vec(),
            p::R_PCM_PREPARE | p::R_PCM_START | p::R_PCM_STOP | p::R_PCM_RELEASE => {
                pcm_command(code, req, streams, host).to_vec()
            }
            other => {
                log::debug!("unknown control request {other:#x}");
                p::status_bytes(Status::BadMsg).to_vec()
            }
        };
        debug_assert!(response.len() <= resp_capacity);
        response
    }

    fn query_info<S: AsRef<PcmStream>>(
        &self,
        code: u32,
        req: &[u8],
        resp_capacity: usize,
        streams: &[S],
    ) -> Vec<u8> {
        let bad = || p::status_bytes(Status::BadMsg).to_vec();
        let Some(query) = p::read_prefix::<p::QueryInfo>(req) else {
            return bad();
        };
        let (start, count, size) = (query.start_id.get(), query.count.get(), query.size.get());
        let items: Vec<&[u8]> = match code {
            p::R_JACK_INFO => self.jacks.iter().map(|j| j.info.as_bytes()).collect(),
            p::R_PCM_INFO => return pcm_info(streams, start, count, size, resp_capacity),
            p::R_CTL_INFO => self.controls.iter().map(|c| c.info.as_bytes()).collect(),
            _ => self.chmaps.iter().map(|c| c.as_bytes()).collect(),
        };
        encode_items(&items, start, count, size, resp_capacity).unwrap_or_else(bad)
    }

    /// The control a CTL request names, `None` for a short request or an unknown id.
    fn control_of(&self, req: &[u8]) -> Option<(u32, &ControlSpec)> {
        let hdr = p::read_prefix::<p::CtlHdr>(req)?;
        let id = hdr.control_id.get();
        self.controls.get(id as usize).map(|c| (id, c))
    }

    /// None of ours is ENUMERATED: every id, known or not, is a bad request.
    fn ctl_enum_items(&self, req: &[u8]) -> [u8; 4] {
        if let Some((id, _)) = self.control_of(req) {
            log::debug!("CTL_ENUM_ITEMS for control {id}, which is not ENUMERATED");
        }
        p::status_bytes(Status::BadMsg)
    }

    /// Status and the whole `virtio_snd_ctl_value`, the control's members first.
    fn ctl_read<S: AsRef<PcmStream>>(
        &self,
        req: &[u8],
        resp_capacity: usize,
        streams: &[S],
    ) -> Vec<u8> {
        let bad = || p::status_bytes(Status::BadMsg).to_vec();
        let Some((_, spec)) = self.control_of(req) else {
            return bad();
        };
        let Some(stream) = streams.get(spec.stream_id as usize) else {
            return bad();
        };
        let total = p::Hdr::SIZE as usize + p::ctl::VALUE_SIZE;
        if resp_capacity < total {
            return bad();
        }
        let mut out = vec![0u8; total];
        out[..4].copy_from_slice(&p::status_bytes(Status::Ok));
        let member = ctl::read_member(spec.kind, &stream.as_ref().gain);
        out[4..8].copy_from_slice(&member.to_le_bytes());
        out
    }

    /// Validates the value, has the host apply it, and keeps it.
    fn ctl_write<S: AsMut<PcmStream>>(
        &self,
        req: &[u8],
        streams: &mut [S],
        host: &mut dyn PcmHost<S>,
    ) -> [u8; 4] {
        let Some((id, spec)) = self.control_of(req) else {
            return p::status_bytes(Status::BadMsg);
        };
        let Some(value) = req.get(p::CtlHdr::SIZE as usize..) else {
            return p::status_bytes(Status::BadMsg);
        };
        let stream_id = spec.stream_id;
        let Some(stream) = streams.get_mut(stream_id as usize) else {
            return p::status_bytes(Status::BadMsg);
        };
        let current = stream.as_mut().gain;
        let gain = match ctl::written_gain(spec, value, current) {
            Ok(gain) => gain,
            Err(status) => {
                log::debug!("CTL_WRITE of control {id}: value refused");
                return p::status_bytes(status);
            }
        };
        if gain != current {
            if let Err(status) = host.set_gain(stream_id, stream, gain) {
                return p::status_bytes(status);
            }
            stream.as_mut().gain = gain;
        }
        p::status_bytes(Status::Ok)
    }

    /// Status and the volume's DB_SCALE TLV; a control without TLV_READ access has none.
    fn ctl_tlv_read(&self, req: &[u8], resp_capacity: usize) -> Vec<u8> {
        let bad = || p::status_bytes(Status::BadMsg).to_vec();
        let Some((_, spec)) = self.control_of(req) else {
            return bad();
        };
        let tlv = ctl::volume_tlv();
        if spec.kind != CtlKind::Volume || resp_capacity < 4 + tlv.len() {
            return bad();
        }
        let mut out = p::status_bytes(Status::Ok).to_vec();
        out.extend_from_slice(&tlv);
        out
    }

    /// TLV_WRITE and TLV_COMMAND: our TLVs are read-only.
    fn ctl_tlv_other(&self, req: &[u8]) -> [u8; 4] {
        match self.control_of(req) {
            Some(_) => p::status_bytes(Status::NotSupp),
            None => p::status_bytes(Status::BadMsg),
        }
    }

    fn jack_remap(&mut self, req: &[u8]) -> [u8; 4] {
        let Some(remap) = p::read_prefix::<p::JackRemap>(req) else {
            return p::status_bytes(Status::BadMsg);
        };
        let Some(jack) = self.jacks.get_mut(remap.hdr.jack_id.get() as usize) else {
            return p::status_bytes(Status::BadMsg);
        };
        if !jack.remap {
            return p::status_bytes(Status::NotSupp);
        }
        let (association, sequence) = (remap.association.get(), remap.sequence.get());
        // HDA default configuration: association in bits 4..8, sequence in bits 0..4.
        if association > 0xF || sequence > 0xF {
            return p::status_bytes(Status::BadMsg);
        }
        let defconf = jack.info.hda_reg_defconf.get();
        jack.info.hda_reg_defconf = ((defconf & !0xFF) | (association << 4) | sequence).into();
        p::status_bytes(Status::Ok)
    }

    fn set_params<S: AsMut<PcmStream>>(&self, req: &[u8], streams: &mut [S]) -> [u8; 4] {
        let Some(msg) = p::read_prefix::<p::PcmSetParams>(req) else {
            return p::status_bytes(Status::BadMsg);
        };
        let max_buffer_bytes = self.max_buffer_bytes;
        let Some(stream) = streams.get_mut(msg.hdr.stream_id.get() as usize) else {
            return p::status_bytes(Status::BadMsg);
        };
        let stream = stream.as_mut();
        if !stream.state.allows(p::R_PCM_SET_PARAMS) {
            return p::status_bytes(Status::BadMsg);
        }
        let params = PcmParams {
            buffer_bytes: msg.buffer_bytes.get(),
            period_bytes: msg.period_bytes.get(),
            features: msg.features.get(),
            channels: msg.channels,
            format: msg.format,
            rate: msg.rate,
        };
        if let Err(status) = params.validate(&stream.caps, max_buffer_bytes) {
            return p::status_bytes(status);
        }
        stream.params = Some(params);
        stream.state = PcmState::ParamsSet;
        p::status_bytes(Status::Ok)
    }
}

fn pcm_info<S: AsRef<PcmStream>>(
    streams: &[S],
    start: u32,
    count: u32,
    size: u32,
    resp_capacity: usize,
) -> Vec<u8> {
    let infos: Vec<p::PcmInfo> = streams
        .iter()
        .map(|s| s.as_ref())
        .map(|s| p::PcmInfo {
            hdr: p::Info {
                hda_fn_nid: s.caps.hda_fn_nid.into(),
            },
            features: s.caps.features.into(),
            formats: s.caps.formats.into(),
            rates: s.caps.rates.into(),
            direction: s.caps.direction,
            channels_min: s.caps.channels_min,
            channels_max: s.caps.channels_max,
            padding: [0; 5],
        })
        .collect();
    let items: Vec<&[u8]> = infos.iter().map(|i| i.as_bytes()).collect();
    encode_items(&items, start, count, size, resp_capacity)
        .unwrap_or_else(|| p::status_bytes(Status::BadMsg).to_vec())
}

/// PREPARE, START, STOP or RELEASE: allowed by the lifecycle, done by the host, then the
/// stream's new state.
fn pcm_command<S: AsMut<PcmStream>>(
    code: u32,
    req: &[u8],
    streams: &mut [S],
    host: &mut dyn PcmHost<S>,
) -> [u8; 4] {
    let Some(hdr) = p::read_prefix::<p::PcmHdr>(req) else {
        return p::status_bytes(Status::BadMsg);
    };
    let stream_id = hdr.stream_id.get();
    let Some(stream) = streams.get_mut(stream_id as usize) else {
        return p::status_bytes(Status::BadMsg);
    };
    let state = stream.as_mut().state;
    if !state.allows(code) {
        log::debug!("stream {stream_id}: request {code:#x} not allowed in {state:?}");
        return p::status_bytes(Status::BadMsg);
    }
    let result = match code {
        p::R_PCM_PREPARE => match stream.as_mut().params {
            Some(params) => host
                .prepare(stream_id, stream, &params)
                .map(|()| PcmState::Prepared),
            None => Err(Status::BadMsg),
        },
        p::R_PCM_START => host.start(stream_id, stream).map(|()| PcmState::Running),
        p::R_PCM_STOP => host.stop(stream_id, stream).map(|()| PcmState::Stopped),
        _ => host.release(stream_id, stream).map(|()| PcmState::Released),
    };
    match result {
        Ok(next) => {
            stream.as_mut().state = next;
            p::status_bytes(Status::Ok)
        }
        Err(status) => p::status_bytes(status),
    }
}

/// Encodes `count` items from `start`, each zero-padded to `size` bytes, after an OK status.
/// `None` (answer BAD_MSG) for out-of-range ids, a too-small `size` or a too-small buffer.
/// All arithmetic is checked: `start + count` and `size * count` come from the guest.
fn encode_items(
    items: &[&[u8]],
    start: u32,
    count: u32,
    size: u32,
    resp_capacity: usize,
) -> Option<Vec<u8>> {
    let item_len = items.first().map_or(0, |i| i.len());
    let end = start.checked_add(count)?;
    if end as usize > items.len() || size > MAX_INFO_ITEM_SIZE || (size as usize) < item_len {
        return None;
    }
    let total = (size as usize)
        .checked_mul(count as usize)?
        .checked_add(4)?;
    if total > resp_capacity {
        return None;
    }
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&p::status_bytes(Status::Ok));
    for item in &items[start as usize..end as usize] {
        out.extend_from_slice(item);
        out.resize(out.len() + size as usize - item.len(), 0);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host that records calls and can be told to fail.
    #[derive(Default)]
    struct RecordingHost {
        calls: Vec<(&'static str, u32)>,
        gains: Vec<Gain>,
        fail_with: Option<Status>,
    }

    impl RecordingHost {
        fn result(&mut self, name: &'static str, id: u32) -> Result<(), Status> {
            self.calls.push((name, id));
            self.fail_with.map_or(Ok(()), Err)
        }
    }

    impl PcmHost<PcmStream> for RecordingHost {
        fn prepare(&mut self, id: u32, _: &mut PcmStream, _: &PcmParams) -> Result<(), Status> {
            self.result("prepare", id)
        }
        fn start(&mut self, id: u32, _: &mut PcmStream) -> Result<(), Status> {
            self.result("start", id)
        }
        fn stop(&mut self, id: u32, _: &mut PcmStream) -> Result<(), Status> {
            self.result("stop", id)
        }
        fn release(&mut self, id: u32, _: &mut PcmStream) -> Result<(), Status> {
            self.result("release", id)
        }
        fn set_gain(&mut self, id: u32, _: &mut PcmStream, gain: Gain) -> Result<(), Status> {
            self.gains.push(gain);
            self.result("set_gain", id)
        }
    }

    /// An output and an input stream offering what the default config offers: 1-8 channels,
    /// every fixed-size format (not IMA_ADPCM) and every rate Linux knows (not 12 or 24 kHz).
    fn test_caps() -> Vec<PcmCaps> {
        [p::D_OUTPUT, p::D_INPUT]
            .map(|direction| PcmCaps {
                direction,
                hda_fn_nid: 0,
                features: 0,
                formats: (p::format::MU_LAW..=p::format::FLOAT64).fold(0, |m, f| m | 1 << f),
                rates: (p::rate::R5512..=p::rate::R384000).fold(0, |m, r| m | 1 << r),
                channels_min: 1,
                channels_max: 8,
            })
            .to_vec()
    }

    /// One remappable line-out jack; per direction six maps (mono to 7.1, the output's first).
    fn test_layout() -> DeviceLayout {
        use p::chmap::*;
        let maps: [&[u8]; 6] = [
            &[MONO],
            &[FL, FR],
            &[FL, FR, FC],
            &[FL, FR, RL, RR],
            &[FL, FR, FC, LFE, RL, RR],
            &[FL, FR, FC, LFE, RL, RR, SL, SR],
        ];
        let chmaps = [p::D_OUTPUT, p::D_INPUT]
            .iter()
            .flat_map(|&direction| {
                maps.iter().map(move |values| {
                    let mut positions = [0u8; MAX_SIZE];
                    positions[..values.len()].copy_from_slice(values);
                    p::ChmapInfo {
                        hdr: p::Info {
                            hda_fn_nid: 0.into(),
                        },
                        direction,
                        channels: values.len() as u8,
                        positions,
                    }
                })
            })
            .collect();
        DeviceLayout {
            jacks: vec![p::JackInfo {
                hdr: p::Info {
                    hda_fn_nid: 0.into(),
                },
                features: (1u32 << p::JACK_F_REMAP).into(),
                hda_reg_defconf: 0x0101_4010.into(),
                hda_reg_caps: 0.into(),
                connected: 1,
                padding: [0; 7],
            }],
            chmaps,
            max_buffer_bytes: 4 << 20,
        }
    }

    /// The control state with its streams, as the worker holds them.
    struct TestDevice {
        control: ControlState,
        streams: Vec<PcmStream>,
    }

    impl TestDevice {
        fn new(layout: DeviceLayout) -> TestDevice {
            TestDevice {
                control: ControlState::new(layout).with_controls(crate::ctl::build_controls(&[
                    (0, "Media".into(), true, 0),
                    (1, "Mic".into(), false, 0),
                ])),
                streams: test_caps().into_iter().map(PcmStream::new).collect(),
            }
        }

        fn handle(&mut self, req: &[u8], cap: usize, host: &mut RecordingHost) -> Vec<u8> {
            self.control.handle(req, cap, &mut self.streams, host)
        }

        fn stream_state(&self, id: u32) -> Option<PcmState> {
            self.streams.get(id as usize).map(PcmStream::state)
        }
    }

    fn device() -> TestDevice {
        TestDevice::new(test_layout())
    }

    fn status(resp: &[u8]) -> u32 {
        u32::from_le_bytes(resp[..4].try_into().unwrap())
    }

    fn query(code: u32, start: u32, count: u32, size: u32) -> Vec<u8> {
        p::QueryInfo {
            hdr: p::Hdr { code: code.into() },
            start_id: start.into(),
            count: count.into(),
            size: size.into(),
        }
        .as_bytes()
        .to_vec()
    }

    fn pcm(code: u32, id: u32) -> Vec<u8> {
        p::PcmHdr {
            hdr: p::Hdr { code: code.into() },
            stream_id: id.into(),
        }
        .as_bytes()
        .to_vec()
    }

    fn set_params(
        id: u32,
        buffer: u32,
        period: u32,
        channels: u8,
        format: u8,
        rate: u8,
    ) -> Vec<u8> {
        p::PcmSetParams {
            hdr: p::PcmHdr {
                hdr: p::Hdr {
                    code: p::R_PCM_SET_PARAMS.into(),
                },
                stream_id: id.into(),
            },
            buffer_bytes: buffer.into(),
            period_bytes: period.into(),
            features: 0.into(),
            channels,
            format,
            rate,
            padding: 0,
        }
        .as_bytes()
        .to_vec()
    }

    fn good_params(id: u32) -> Vec<u8> {
        set_params(id, 4 * 1920, 1920, 2, p::format::S16, p::rate::R48000)
    }

    #[test]
    fn pcm_info_lists_the_streams() {
        let mut dev = device();
        let mut host = RecordingHost::default();
        let resp = dev.handle(&query(p::R_PCM_INFO, 0, 2, 32), 4 + 64, &mut host);
        assert_eq!(status(&resp), 0x8000);
        assert_eq!(resp.len(), 68);
        let info: p::PcmInfo = p::read_prefix(&resp[4..]).unwrap();
        assert_eq!(info.direction, p::D_OUTPUT);
        assert_eq!(info.channels_max, 8);
        let info: p::PcmInfo = p::read_prefix(&resp[36..]).unwrap();
        assert_eq!(info.direction, p::D_INPUT);
    }

    #[test]
    fn query_with_larger_item_size_is_zero_padded() {
        let mut dev = device();
        let resp = dev.handle(
            // The input's stereo map: the output's six maps come first, then its mono one.
            &query(p::R_CHMAP_INFO, 7, 1, 40),
            100,
            &mut RecordingHost::default(),
        );
        assert_eq!(status(&resp), 0x8000);
        assert_eq!(resp.len(), 44);
        let info: p::ChmapInfo = p::read_prefix(&resp[4..]).unwrap();
        assert_eq!(info.direction, p::D_INPUT);
        assert_eq!(&info.positions[..2], &[p::chmap::FL, p::chmap::FR]);
        assert!(resp[28..].iter().all(|&b| b == 0));
    }

    #[test]
    fn bad_queries_get_bad_msg() {
        let mut dev = device();
        let mut host = RecordingHost::default();
        for (req, cap) in [
            (query(p::R_PCM_INFO, 0, 3, 32), 1000),        // past the end
            (query(p::R_PCM_INFO, 1, u32::MAX, 32), 1000), // start + count overflows
            (query(p::R_PCM_INFO, u32::MAX, 2, 32), 1000), // start + count overflows
            (query(p::R_PCM_INFO, 0, 2, 31), 1000),        // item smaller than the struct
            (query(p::R_PCM_INFO, 0, 2, u32::MAX), 1000),  // size * count would overflow
            (query(p::R_JACK_INFO, 0, 1, 24), 20),         // response does not fit
            (query(p::R_JACK_INFO, 1, 1, 24), 1000),       // no such jack
            (query(p::R_CHMAP_INFO, 0, 1, 24)[..12].to_vec(), 1000), // short request
        ] {
            let resp = dev.handle(&req, cap, &mut host);
            assert_eq!(resp, 0x8001u32.to_le_bytes(), "request {req:?}");
        }
        assert!(host.calls.is_empty());
    }

    #[test]
    fn unknown_and_short_requests() {
        let mut dev = device();
        let mut host = RecordingHost::default();
        assert_eq!(
            status(&dev.handle(&0xdeadu32.to_le_bytes(), 4, &mut host)),
            0x8001
        );
        assert_eq!(status(&dev.handle(&[1, 0], 4, &mut host)), 0x8001);
        assert_eq!(status(&dev.handle(&[], 4, &mut host)), 0x8001);
        // No room for a status at all: nothing is written.
        assert!(dev.handle(&good_params(0), 3, &mut host).is_empty());
        assert_eq!(dev.stream_state(0), Some(PcmState::Initial));
    }

    #[test]
    fn lifecycle_follows_the_spec() {
        let mut dev = device();
        let mut host = RecordingHost::default();
        let mut run = |dev: &mut TestDevice, req: Vec<u8>| status(&dev.handle(&req, 4, &mut host));
        // Nothing but SET_PARAMS before parameters exist.
        for code in [
            p::R_PCM_PREPARE,
            p::R_PCM_START,
            p::R_PCM_STOP,
            p::R_PCM_RELEASE,
        ] {
            assert_eq!(run(&mut dev, pcm(code, 0)), 0x8001);
        }
        assert_eq!(run(&mut dev, good_params(0)), 0x8000);
        assert_eq!(run(&mut dev, pcm(p::R_PCM_START, 0)), 0x8001);
        assert_eq!(run(&mut dev, pcm(p::R_PCM_PREPARE, 0)), 0x8000);
        assert_eq!(run(&mut dev, pcm(p::R_PCM_PREPARE, 0)), 0x8000); // re-prepare is legal
        assert_eq!(run(&mut dev, pcm(p::R_PCM_STOP, 0)), 0x8001);
        assert_eq!(run(&mut dev, pcm(p::R_PCM_START, 0)), 0x8000);
        assert_eq!(run(&mut dev, pcm(p::R_PCM_START, 0)), 0x8001); // repeated START
        assert_eq!(run(&mut dev, good_params(0)), 0x8001); // params while running
        assert_eq!(run(&mut dev, pcm(p::R_PCM_RELEASE, 0)), 0x8001);
        assert_eq!(run(&mut dev, pcm(p::R_PCM_STOP, 0)), 0x8000);
        assert_eq!(run(&mut dev, pcm(p::R_PCM_STOP, 0)), 0x8001); // repeated STOP
        assert_eq!(run(&mut dev, pcm(p::R_PCM_START, 0)), 0x8000); // resume
        assert_eq!(run(&mut dev, pcm(p::R_PCM_STOP, 0)), 0x8000);
        assert_eq!(run(&mut dev, pcm(p::R_PCM_RELEASE, 0)), 0x8000);
        assert_eq!(run(&mut dev, pcm(p::R_PCM_RELEASE, 0)), 0x8001);
        assert_eq!(run(&mut dev, pcm(p::R_PCM_PREPARE, 0)), 0x8000); // params survive release
        assert_eq!(dev.stream_state(0), Some(PcmState::Prepared));
        assert_eq!(
            host.calls,
            vec![
                ("prepare", 0),
                ("prepare", 0),
                ("start", 0),
                ("stop", 0),
                ("start", 0),
                ("stop", 0),
                ("release", 0),
                ("prepare", 0)
            ]
        );
    }

    #[test]
    fn host_errors_are_reported_and_state_kept() {
        let mut dev = device();
        let mut host = RecordingHost::default();
        assert_eq!(status(&dev.handle(&good_params(1), 4, &mut host)), 0x8000);
        host.fail_with = Some(Status::IoErr);
        let resp = dev.handle(&pcm(p::R_PCM_PREPARE, 1), 4, &mut host);
        assert_eq!(status(&resp), 0x8003);
        assert_eq!(dev.stream_state(1), Some(PcmState::ParamsSet));
    }

    #[test]
    fn bad_params_get_their_status() {
        let mut dev = device();
        let mut host = RecordingHost::default();
        let s16 = p::format::S16;
        let r48 = p::rate::R48000;
        for (req, want) in [
            (set_params(2, 7680, 1920, 2, s16, r48), 0x8001), // no such stream
            (set_params(u32::MAX, 7680, 1920, 2, s16, r48), 0x8001), // no such stream
            (set_params(0, 7680, 1920, 2, 200, r48), 0x8001), // format out of range
            (set_params(0, 7680, 1920, 2, s16, 99), 0x8001),  // rate out of range
            (set_params(0, 7680, 1920, 2, 0, r48), 0x8002),   // IMA_ADPCM: not offered
            (set_params(0, 7680, 1920, 2, s16, p::rate::R12000), 0x8002), // rate not offered
            (set_params(0, 7680, 1920, 9, s16, r48), 0x8002), // too many channels
            (set_params(0, 7680, 1920, 0, s16, r48), 0x8001), // zero channels
            (set_params(0, 7680, 0, 2, s16, r48), 0x8001),    // period 0
            (set_params(0, 0, 1920, 2, s16, r48), 0x8001),    // buffer 0
            (set_params(0, 1920, 3840, 2, s16, r48), 0x8001), // period > buffer
            (set_params(0, 5000, 1920, 2, s16, r48), 0x8001), // not a period multiple
            (set_params(0, 7682, 3841, 2, s16, r48), 0x8001), // period not frame aligned
            (set_params(0, u32::MAX - 3, 4, 1, s16, r48), 0x8002), // huge buffer
        ] {
            assert_eq!(status(&dev.handle(&req, 4, &mut host)), want, "{req:?}");
            assert_eq!(dev.stream_state(0), Some(PcmState::Initial));
        }
        // Selecting a feature that was not offered (SHMEM_HOST).
        let mut req = good_params(0);
        req[16] = 1 << p::PCM_F_SHMEM_HOST;
        assert_eq!(status(&dev.handle(&req, 4, &mut host)), 0x8002);
        // A short SET_PARAMS.
        assert_eq!(
            status(&dev.handle(&good_params(0)[..20], 4, &mut host)),
            0x8001
        );
        assert!(host.calls.is_empty());
    }

    #[test]
    fn jack_info_and_remap() {
        let mut dev = device();
        let mut host = RecordingHost::default();
        let resp = dev.handle(&query(p::R_JACK_INFO, 0, 1, 24), 28, &mut host);
        assert_eq!(status(&resp), 0x8000);
        let info: p::JackInfo = p::read_prefix(&resp[4..]).unwrap();
        assert_eq!(info.connected, 1);
        assert_eq!(info.features.get(), 1 << p::JACK_F_REMAP);

        let remap = |jack: u32, association: u32, sequence: u32| {
            p::JackRemap {
                hdr: p::JackHdr {
                    hdr: p::Hdr {
                        code: p::R_JACK_REMAP.into(),
                    },
                    jack_id: jack.into(),
                },
                association: association.into(),
                sequence: sequence.into(),
            }
            .as_bytes()
            .to_vec()
        };
        assert_eq!(status(&dev.handle(&remap(0, 2, 3), 4, &mut host)), 0x8000);
        let resp = dev.handle(&query(p::R_JACK_INFO, 0, 1, 24), 28, &mut host);
        let info: p::JackInfo = p::read_prefix(&resp[4..]).unwrap();
        assert_eq!(info.hda_reg_defconf.get() & 0xFF, 0x23);
        assert_eq!(status(&dev.handle(&remap(1, 2, 3), 4, &mut host)), 0x8001);
        assert_eq!(status(&dev.handle(&remap(0, 16, 0), 4, &mut host)), 0x8001);
        assert_eq!(
            status(&dev.handle(&remap(0, 1, 1)[..12], 4, &mut host)),
            0x8001
        );
    }

    #[test]
    fn a_jack_follows_its_host_end_with_one_event_per_change() {
        let mut dev = device();
        let mut host = RecordingHost::default();
        let connected = |dev: &mut TestDevice, host: &mut RecordingHost| {
            let resp = dev.handle(&query(p::R_JACK_INFO, 0, 1, 24), 28, host);
            p::read_prefix::<p::JackInfo>(&resp[4..]).unwrap().connected
        };
        assert_eq!(connected(&mut dev, &mut host), 1);
        let event = dev.control.set_jack_connected(0, false).expect("an event");
        assert_eq!(event.hdr.code.get(), p::EVT_JACK_DISCONNECTED);
        assert_eq!(event.data.get(), 0);
        assert_eq!(connected(&mut dev, &mut host), 0);
        assert!(
            dev.control.set_jack_connected(0, false).is_none(),
            "no change"
        );
        let event = dev.control.set_jack_connected(0, true).expect("an event");
        assert_eq!(event.hdr.code.get(), p::EVT_JACK_CONNECTED);
        assert_eq!(connected(&mut dev, &mut host), 1);
        assert!(
            dev.control.set_jack_connected(1, false).is_none(),
            "no such jack"
        );
    }

    #[test]
    fn remap_refused_without_the_feature() {
        let mut layout = test_layout();
        layout.jacks[0].features = 0.into();
        let mut dev = TestDevice::new(layout);
        let req = p::JackRemap {
            hdr: p::JackHdr {
                hdr: p::Hdr {
                    code: p::R_JACK_REMAP.into(),
                },
                jack_id: 0.into(),
            },
            association: 1.into(),
            sequence: 1.into(),
        };
        let resp = dev.handle(req.as_bytes(), 4, &mut RecordingHost::default());
        assert_eq!(status(&resp), 0x8002);
    }

    /// A device whose driver acknowledged VIRTIO_SND_F_CTLS.
    fn ctl_device() -> TestDevice {
        let mut dev = device();
        dev.control.set_features(1 << p::F_CTLS);
        dev
    }

    fn ctl(code: u32, id: u32) -> Vec<u8> {
        p::CtlHdr {
            hdr: p::Hdr { code: code.into() },
            control_id: id.into(),
        }
        .as_bytes()
        .to_vec()
    }

    /// A CTL_WRITE as Linux sends it: the header and the whole 512-byte value.
    fn ctl_write(id: u32, members: &[u32]) -> Vec<u8> {
        let mut req = ctl(p::R_CTL_WRITE, id);
        let mut value = [0u8; p::ctl::VALUE_SIZE];
        for (i, m) in members.iter().enumerate() {
            value[4 * i..4 * i + 4].copy_from_slice(&m.to_le_bytes());
        }
        req.extend_from_slice(&value);
        req
    }

    /// CTL_READ's first member.
    fn ctl_read(dev: &mut TestDevice, id: u32) -> u32 {
        let resp = dev.handle(
            &ctl(p::R_CTL_READ, id),
            4 + 512,
            &mut RecordingHost::default(),
        );
        assert_eq!(status(&resp), 0x8000);
        assert_eq!(resp.len(), 516);
        u32::from_le_bytes(resp[4..8].try_into().unwrap())
    }

    fn name(info: &p::CtlInfo) -> String {
        String::from_utf8(crate::ctl::name_of(info).to_vec()).unwrap()
    }

    #[test]
    fn controls_need_the_feature() {
        let mut dev = device();
        let mut host = RecordingHost::default();
        assert_eq!(dev.control.config_space(2).controls.get(), 0);
        for req in [
            query(p::R_CTL_INFO, 0, 4, 96),
            ctl(p::R_CTL_READ, 0),
            ctl_write(0, &[50]),
            ctl(p::R_CTL_TLV_READ, 0),
            ctl(p::R_CTL_ENUM_ITEMS, 0),
        ] {
            // As any code the device does not know.
            assert_eq!(dev.handle(&req, 1024, &mut host), 0x8001u32.to_le_bytes());
        }
        assert!(host.calls.is_empty());
        // A driver that did not acknowledge it, or a device without controls, gets none.
        dev.control.set_features(1 << 1);
        assert!(!dev.control.controls_negotiated());
        let mut bare = TestDevice {
            control: ControlState::new(test_layout()),
            streams: test_caps().into_iter().map(PcmStream::new).collect(),
        };
        bare.control.set_features(1 << p::F_CTLS);
        assert!(!bare.control.offers_controls());
        assert!(!bare.control.controls_negotiated());
        assert_eq!(
            bare.handle(&ctl(p::R_CTL_READ, 0), 516, &mut host),
            0x8001u32.to_le_bytes()
        );
    }

    #[test]
    fn ctl_info_lists_every_control_with_linux_s_layout() {
        let mut dev = ctl_device();
        assert_eq!(dev.control.config_space(2).controls.get(), 4);
        assert_eq!(dev.control.config_space(2).as_bytes().len(), 16);
        let resp = dev.handle(
            &query(p::R_CTL_INFO, 0, 4, 96),
            4 + 4 * 96,
            &mut Default::default(),
        );
        assert_eq!(status(&resp), 0x8000);
        assert_eq!(resp.len(), 4 + 4 * 96);
        let infos: Vec<p::CtlInfo> = (0..4)
            .map(|i| p::read_prefix(&resp[4 + 96 * i..]).unwrap())
            .collect();
        let names: Vec<String> = infos.iter().map(name).collect();
        assert_eq!(
            names,
            [
                "Media Playback Volume",
                "Media Playback Switch",
                "Mic Capture Volume",
                "Mic Capture Switch"
            ]
        );
        let volume = &infos[0];
        assert_eq!(volume.r#type.get(), p::ctl::TYPE_INTEGER);
        assert_eq!(volume.role.get(), p::ctl::ROLE_VOLUME);
        assert_eq!(volume.count.get(), 1);
        assert_eq!(
            (volume.min.get(), volume.max.get(), volume.step.get()),
            (0, 100, 1)
        );
        assert_eq!(volume.access.get(), 0b1_0011); // READ, WRITE, TLV_READ
        assert_eq!(volume.index.get(), 0);
        // The name is NUL-terminated within its field; the union's integer at offset 72.
        assert_eq!(resp[4 + 24 + 21], 0);
        assert_eq!(&resp[4 + 76..4 + 80], &100u32.to_le_bytes());
        let switch = &infos[1];
        assert_eq!(switch.r#type.get(), p::ctl::TYPE_BOOLEAN);
        assert_eq!(switch.role.get(), p::ctl::ROLE_MUTE);
        assert_eq!(switch.access.get(), 0b11);
        // What Linux 6.12's validation checks: a known type, a count within its value.
        for info in &infos {
            assert!(info.r#type.get() <= p::ctl::TYPE_IEC958);
            assert!((1..=128).contains(&info.count.get()));
        }
        // One at a time, from an offset, as any INFO query.
        let resp = dev.handle(
            &query(p::R_CTL_INFO, 3, 1, 96),
            100,
            &mut Default::default(),
        );
        assert_eq!(
            name(&p::read_prefix(&resp[4..]).unwrap()),
            "Mic Capture Switch"
        );
    }

    #[test]
    fn bad_ctl_info_queries_get_bad_msg() {
        let mut dev = ctl_device();
        for (req, cap) in [
            (query(p::R_CTL_INFO, 0, 5, 96), 4096), // past the last control
            (query(p::R_CTL_INFO, 4, 1, 96), 4096), // no such control
            (query(p::R_CTL_INFO, 1, u32::MAX, 96), 4096), // start + count overflows
            (query(p::R_CTL_INFO, 0, 1, 95), 4096), // item smaller than the struct
            (query(p::R_CTL_INFO, 0, 4, 96), 4 + 3 * 96), // response does not fit
            (query(p::R_CTL_INFO, 0, 1, 96)[..15].to_vec(), 4096), // short request
        ] {
            let resp = dev.handle(&req, cap, &mut RecordingHost::default());
            assert_eq!(resp, 0x8001u32.to_le_bytes(), "request {req:?}");
        }
    }

    #[test]
    fn read_write_and_read_back() {
        let mut dev = ctl_device();
        let mut host = RecordingHost::default();
        // Unity at first: full volume, switch on.
        assert_eq!(ctl_read(&mut dev, 0), 100);
        assert_eq!(ctl_read(&mut dev, 1), 1);
        assert_eq!(
            status(&dev.handle(&ctl_write(0, &[50]), 4, &mut host)),
            0x8000
        );
        assert_eq!(ctl_read(&mut dev, 0), 50);
        assert_eq!(
            status(&dev.handle(&ctl_write(1, &[0]), 4, &mut host)),
            0x8000
        );
        assert_eq!(ctl_read(&mut dev, 1), 0);
        // The other stream's controls are its own.
        assert_eq!(ctl_read(&mut dev, 2), 100);
        assert_eq!(
            status(&dev.handle(&ctl_write(2, &[0]), 4, &mut host)),
            0x8000
        );
        assert_eq!(ctl_read(&mut dev, 2), 0);
        assert_eq!(ctl_read(&mut dev, 3), 1);
        assert_eq!(
            host.calls,
            vec![("set_gain", 0), ("set_gain", 0), ("set_gain", 1)]
        );
        assert_eq!(
            host.gains,
            vec![
                Gain {
                    volume: 50,
                    mute: false
                },
                Gain {
                    volume: 50,
                    mute: true
                },
                Gain {
                    volume: 0,
                    mute: false
                },
            ]
        );
        assert_eq!(
            dev.streams[0].gain(),
            Gain {
                volume: 50,
                mute: true
            }
        );
        // Writing the value it has is OK and costs the host nothing.
        assert_eq!(
            status(&dev.handle(&ctl_write(0, &[50]), 4, &mut host)),
            0x8000
        );
        assert_eq!(host.calls.len(), 3);
    }

    #[test]
    fn bad_writes_get_bad_msg_and_change_nothing() {
        let mut dev = ctl_device();
        let mut host = RecordingHost::default();
        let mut member_past_count = ctl_write(0, &[50]);
        member_past_count[8 + 4] = 1;
        let mut stray_byte = ctl_write(1, &[0]);
        stray_byte[8 + 511] = 7;
        for req in [
            ctl_write(0, &[101]),      // above the maximum
            ctl_write(0, &[u32::MAX]), // -1: below the minimum
            ctl_write(0, &[0x8000_0000]),
            ctl_write(1, &[2]),        // a switch is 0 or 1
            ctl_write(4, &[1]),        // no such control
            ctl_write(u32::MAX, &[1]), // no such control
            ctl_write(0, &[50, 50]),   // two members for a one-member control
            member_past_count,
            stray_byte,
            ctl_write(0, &[50])[..8 + 511].to_vec(), // value cut short
            ctl_write(0, &[50])[..8].to_vec(),       // no value at all
            ctl_write(0, &[50])[..7].to_vec(),       // short header
        ] {
            assert_eq!(
                dev.handle(&req, 4, &mut host),
                0x8001u32.to_le_bytes(),
                "{:?}",
                &req[..8.min(req.len())]
            );
        }
        assert!(host.calls.is_empty());
        assert_eq!(dev.streams[0].gain(), Gain::UNITY);
        assert_eq!(ctl_read(&mut dev, 0), 100);
    }

    #[test]
    fn a_write_the_host_refuses_keeps_the_old_value() {
        let mut dev = ctl_device();
        let mut host = RecordingHost {
            fail_with: Some(Status::IoErr),
            ..Default::default()
        };
        assert_eq!(
            status(&dev.handle(&ctl_write(0, &[10]), 4, &mut host)),
            0x8003
        );
        assert_eq!(host.calls, vec![("set_gain", 0)]);
        assert_eq!(ctl_read(&mut dev, 0), 100);
    }

    #[test]
    fn bad_reads_get_bad_msg() {
        let mut dev = ctl_device();
        let mut host = RecordingHost::default();
        for (req, cap) in [
            (ctl(p::R_CTL_READ, 4), 516),               // no such control
            (ctl(p::R_CTL_READ, u32::MAX), 516),        // no such control
            (ctl(p::R_CTL_READ, 0)[..6].to_vec(), 516), // short request
            (ctl(p::R_CTL_READ, 0), 515),               // no room for the whole value
            (ctl(p::R_CTL_READ, 0), 8),
        ] {
            let resp = dev.handle(&req, cap, &mut host);
            assert_eq!(resp, 0x8001u32.to_le_bytes(), "{req:?} into {cap}");
        }
        // No room for a status: nothing written at all.
        assert!(dev.handle(&ctl(p::R_CTL_READ, 0), 3, &mut host).is_empty());
    }

    #[test]
    fn tlv_read_gives_a_db_scale_with_mute() {
        let mut dev = ctl_device();
        let mut host = RecordingHost::default();
        // What ALSA's dB helpers read: DB_SCALE (1), 8 bytes, -50.00 dB, 0.50 dB per step,
        // lowest step muted.
        let resp = dev.handle(&ctl(p::R_CTL_TLV_READ, 0), 4 + 1024, &mut host);
        assert_eq!(status(&resp), 0x8000);
        let words: Vec<u32> = resp[4..]
            .chunks_exact(4)
            .map(|w| u32::from_le_bytes(w.try_into().unwrap()))
            .collect();
        assert_eq!(words, [1, 8, (-5000i32) as u32, 0x1_0032]);
        assert_eq!(
            status(&dev.handle(&ctl(p::R_CTL_TLV_READ, 2), 20, &mut host)),
            0x8000
        );
        for (req, cap) in [
            (ctl(p::R_CTL_TLV_READ, 1), 1024), // a switch has no TLV
            (ctl(p::R_CTL_TLV_READ, 9), 1024), // no such control
            (ctl(p::R_CTL_TLV_READ, 0), 19),   // the TLV does not fit
            (ctl(p::R_CTL_TLV_READ, 0)[..4].to_vec(), 1024),
        ] {
            assert_eq!(dev.handle(&req, cap, &mut host), 0x8001u32.to_le_bytes());
        }
    }

    #[test]
    fn tlv_write_command_and_enum_items() {
        let mut dev = ctl_device();
        let mut host = RecordingHost::default();
        for code in [p::R_CTL_TLV_WRITE, p::R_CTL_TLV_COMMAND] {
            let mut req = ctl(code, 0);
            req.extend_from_slice(&crate::ctl::volume_tlv());
            assert_eq!(dev.handle(&req, 4, &mut host), 0x8002u32.to_le_bytes());
            assert_eq!(
                dev.handle(&ctl(code, 7), 4, &mut host),
                0x8001u32.to_le_bytes()
            );
            assert_eq!(
                dev.handle(&ctl(code, 0)[..5], 4, &mut host),
                0x8001u32.to_le_bytes()
            );
        }
        // None of ours is ENUMERATED.
        for id in [0, 1, 4, u32::MAX] {
            let resp = dev.handle(&ctl(p::R_CTL_ENUM_ITEMS, id), 4 + 64, &mut host);
            assert_eq!(resp, 0x8001u32.to_le_bytes());
        }
        assert_eq!(ctl_read(&mut dev, 0), 100);
    }

    #[test]
    fn host_changes_make_notify_events_for_the_controls_that_changed() {
        let mut dev = ctl_device();
        let old = Gain::UNITY;
        let events = dev.control.gain_events(
            1,
            old,
            Gain {
                volume: 40,
                mute: false,
            },
        );
        assert_eq!(events.len(), 1);
        let event: p::CtlEvent = p::read_prefix(events[0].as_bytes()).unwrap();
        assert_eq!(event.hdr.code.get(), p::EVT_CTL_NOTIFY);
        assert_eq!(event.control_id.get(), 2); // Mic Capture Volume
        assert_eq!(event.mask.get(), 1 << p::ctl::EVT_MASK_VALUE);
        let both = dev.control.gain_events(
            0,
            old,
            Gain {
                volume: 0,
                mute: true,
            },
        );
        let ids: Vec<u16> = both
            .iter()
            .map(|e| {
                p::read_prefix::<p::CtlEvent>(e.as_bytes())
                    .unwrap()
                    .control_id
                    .get()
            })
            .collect();
        assert_eq!(ids, [0, 1]);
        assert!(dev.control.gain_events(0, old, old).is_empty());
        assert!(dev.control.stream_has_controls(1));
        assert!(!dev.control.stream_has_controls(2));
        // The new value is what CTL_READ shows.
        dev.streams[1].set_gain(Gain {
            volume: 40,
            mute: false,
        });
        assert_eq!(ctl_read(&mut dev, 2), 40);
        // Without the feature there is nobody to tell.
        dev.control.set_features(0);
        assert!(dev
            .control
            .gain_events(
                0,
                old,
                Gain {
                    volume: 1,
                    mute: true
                }
            )
            .is_empty());
    }
}
