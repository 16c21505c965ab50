//! `control`: [`ControlState::handle`] over a sequence of control requests, on a device whose
//! streams, jacks and channel maps come from the input, with a [`PcmHost`] that fails when the
//! input says so. A model of the device (each stream's state and params, each jack's
//! defconf) predicts every answer, so the fuzzer checks the spec's rules, not only the absence
//! of panics.
//!
//! Input: the device ([`Device::read`]), then requests, each `[resp_capacity: u16]
//! [len: u8][len bytes]`, until the input ends or [`MAX_REQUESTS`].

use virtio_snd::control::{
    ControlState, DeviceLayout, PcmCaps, PcmHost, PcmParams, PcmState, PcmStream,
    MAX_INFO_ITEM_SIZE,
};
use virtio_snd::protocol::{self as p, Status};
use zerocopy::{FromBytes, IntoBytes};

use crate::input::{Input, Output};
use crate::Lazy;

/// Requests per input: enough for any lifecycle, short enough to keep runs fast.
pub const MAX_REQUESTS: usize = 64;

/// What the device is made of: as many streams, jacks and chmaps as a config may give.
#[derive(Debug, Clone, Default)]
pub struct Device {
    pub caps: Vec<PcmCaps>,
    pub layout: DeviceLayout,
    /// Bit `n % 64` set: the host's `n`th call fails.
    pub host_failures: u64,
}

impl Device {
    pub fn read(input: &mut Input<'_>) -> Device {
        let streams = usize::from(input.u8()) % (vsound_config::MAX_STREAMS + 1);
        let caps = (0..streams)
            .map(|_| PcmCaps {
                direction: input.u8(),
                hda_fn_nid: input.u32(),
                features: input.u32(),
                formats: input.u64(),
                rates: input.u64(),
                channels_min: input.u8(),
                channels_max: input.u8(),
            })
            .collect();
        let jacks = usize::from(input.u8()) % (vsound_config::MAX_JACKS + 1);
        let jacks = (0..jacks)
            .map(|_| p::JackInfo::read_from_bytes(&pad::<24>(input)).unwrap())
            .collect();
        let chmaps = usize::from(input.u8()) % (vsound_config::MAX_CHMAPS + 1);
        let chmaps = (0..chmaps)
            .map(|_| p::ChmapInfo::read_from_bytes(&pad::<24>(input)).unwrap())
            .collect();
        Device {
            caps,
            layout: DeviceLayout {
                jacks,
                chmaps,
                max_buffer_bytes: input.u32(),
            },
            host_failures: input.u64(),
        }
    }

    pub fn write(&self, out: &mut Output) {
        out.u8(self.caps.len() as u8);
        for c in &self.caps {
            out.u8(c.direction)
                .u32(c.hda_fn_nid)
                .u32(c.features)
                .u64(c.formats)
                .u64(c.rates)
                .u8(c.channels_min)
                .u8(c.channels_max);
        }
        out.u8(self.layout.jacks.len() as u8);
        for j in &self.layout.jacks {
            out.raw(j.as_bytes());
        }
        out.u8(self.layout.chmaps.len() as u8);
        for c in &self.layout.chmaps {
            out.raw(c.as_bytes());
        }
        out.u32(self.layout.max_buffer_bytes)
            .u64(self.host_failures);
    }
}

fn pad<const N: usize>(input: &mut Input<'_>) -> [u8; N] {
    let mut out = [0u8; N];
    let got = input.bytes(N);
    out[..got.len()].copy_from_slice(got);
    out
}

/// A seed input: a device and its requests with their response capacities.
pub fn seed(device: &Device, requests: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut out = Output::default();
    device.write(&mut out);
    for (capacity, req) in requests {
        assert!(
            req.len() <= 255,
            "a request of the control input is at most 255 bytes"
        );
        out.u16(*capacity).u8(req.len() as u8).raw(req);
    }
    out.bytes
}

/// One call the host got.
#[derive(Debug, Clone, Copy)]
struct Call {
    code: u32,
    stream_id: u32,
    result: Result<(), Status>,
}

/// Checks every call against the lifecycle, then succeeds or fails as the input says.
struct Host {
    caps: Vec<PcmCaps>,
    failures: u64,
    count: u32,
    calls: Vec<Call>,
}

impl Host {
    fn call(
        &mut self,
        code: u32,
        stream_id: u32,
        stream: &PcmStream,
        params: Option<&PcmParams>,
    ) -> Result<(), Status> {
        let caps = self.caps.get(stream_id as usize);
        assert!(
            caps.is_some(),
            "host called for stream {stream_id}, which does not exist"
        );
        assert_eq!(
            caps,
            Some(stream.caps()),
            "host called with another stream than {stream_id}"
        );
        assert!(
            spec_allows(stream.state(), code),
            "host called for {code:#x} in {:?}",
            stream.state()
        );
        if let Some(params) = params {
            assert_eq!(
                Some(*params),
                stream.params(),
                "PREPARE with other params than the stream's"
            );
        }
        let fails = self.failures >> (self.count % 64) & 1 == 1;
        let result = if fails {
            // Every error a host may answer with; which one rotates with the call count.
            Err([Status::BadMsg, Status::NotSupp, Status::IoErr][self.count as usize % 3])
        } else {
            Ok(())
        };
        self.count += 1;
        self.calls.push(Call {
            code,
            stream_id,
            result,
        });
        result
    }
}

impl PcmHost<PcmStream> for Host {
    fn prepare(&mut self, id: u32, s: &mut PcmStream, params: &PcmParams) -> Result<(), Status> {
        self.call(p::R_PCM_PREPARE, id, s, Some(params))
    }
    fn start(&mut self, id: u32, s: &mut PcmStream) -> Result<(), Status> {
        self.call(p::R_PCM_START, id, s, None)
    }
    fn stop(&mut self, id: u32, s: &mut PcmStream) -> Result<(), Status> {
        self.call(p::R_PCM_STOP, id, s, None)
    }
    fn release(&mut self, id: u32, s: &mut PcmStream) -> Result<(), Status> {
        self.call(p::R_PCM_RELEASE, id, s, None)
    }
}

/// Whether the spec's PCM command lifecycle (VIRTIO 1.2, 5.14.6.6.1) allows `code` in `state`,
/// written out independently of `PcmState::allows`, which must agree with it.
fn spec_allows(state: PcmState, code: u32) -> bool {
    use PcmState::*;
    let from: &[PcmState] = match code {
        p::R_PCM_SET_PARAMS => &[Initial, ParamsSet, Prepared, Released],
        p::R_PCM_PREPARE => &[ParamsSet, Prepared, Released],
        p::R_PCM_START => &[Prepared, Stopped],
        p::R_PCM_STOP => &[Running],
        p::R_PCM_RELEASE => &[Prepared, Stopped],
        _ => &[],
    };
    from.contains(&state)
}

/// The state a successful request of the lifecycle leads to (VIRTIO sound, PCM command
/// lifecycle).
fn next_state(code: u32) -> Option<PcmState> {
    Some(match code {
        p::R_PCM_SET_PARAMS => PcmState::ParamsSet,
        p::R_PCM_PREPARE => PcmState::Prepared,
        p::R_PCM_START => PcmState::Running,
        p::R_PCM_STOP => PcmState::Stopped,
        p::R_PCM_RELEASE => PcmState::Released,
        _ => return None,
    })
}

/// The fuzz target.
pub fn control(data: &[u8]) {
    let mut input = Input::new(data);
    let device = Device::read(&mut input);
    let mut model = Model {
        jacks: device.layout.jacks.clone(),
        chmaps: device.layout.chmaps.clone(),
        max_buffer_bytes: device.layout.max_buffer_bytes,
    };
    let mut control = ControlState::new(device.layout.clone());
    let mut streams: Vec<PcmStream> = device.caps.iter().copied().map(PcmStream::new).collect();
    let mut host = Host {
        caps: device.caps.clone(),
        failures: device.host_failures,
        count: 0,
        calls: Vec::new(),
    };
    let config = control.config_space(streams.len());
    assert_eq!(config.streams.get() as usize, streams.len());
    assert_eq!(config.jacks.get() as usize, model.jacks.len());
    assert_eq!(config.chmaps.get() as usize, model.chmaps.len());
    for _ in 0..MAX_REQUESTS {
        if input.is_empty() {
            break;
        }
        let capacity = usize::from(input.u16());
        let len = usize::from(input.u8());
        let req = input.bytes(len);
        model.check(&mut control, &mut streams, &mut host, req, capacity);
    }
}

/// What the device answers, as the spec says it must.
struct Model {
    jacks: Vec<p::JackInfo>,
    chmaps: Vec<p::ChmapInfo>,
    max_buffer_bytes: u32,
}

impl Model {
    fn check(
        &mut self,
        control: &mut ControlState,
        streams: &mut [PcmStream],
        host: &mut Host,
        req: &[u8],
        capacity: usize,
    ) {
        let before: Vec<(PcmState, Option<PcmParams>)> =
            streams.iter().map(|s| (s.state(), s.params())).collect();
        host.calls.clear();
        let resp = control.handle(req, capacity, streams, host);
        let after: Vec<(PcmState, Option<PcmParams>)> =
            streams.iter().map(|s| (s.state(), s.params())).collect();
        let calls = std::mem::take(&mut host.calls);
        let ctx = Lazy(|| {
            let shown = &resp[..resp.len().min(64)];
            format!("request {req:02x?}, capacity {capacity}, response {shown:02x?}")
        });

        assert!(
            resp.len() <= capacity,
            "response longer than the capacity: {ctx}"
        );
        if capacity < 4 {
            assert!(
                resp.is_empty(),
                "a response without room for a status: {ctx}"
            );
            assert!(
                calls.is_empty(),
                "host called without room for a status: {ctx}"
            );
            assert_eq!(
                before, after,
                "state changed without room for a status: {ctx}"
            );
            return;
        }
        assert!(resp.len() >= 4, "no status although it fits: {ctx}");
        let status = u32::from_le_bytes(resp[..4].try_into().unwrap());
        assert!(
            (0x8000..=0x8003).contains(&status),
            "not a status: {status:#x}: {ctx}"
        );
        let ok = status == Status::Ok.code();
        if !ok || !is_info(p::request_code(req)) {
            assert_eq!(resp.len(), 4, "more than a status: {ctx}");
        }

        // What the request should have done: `Some(expected status)` for requests about a
        // stream, with the stream and the host call it implies.
        let code = p::request_code(req);
        if let Some(code) = code {
            for (state, _) in &before {
                assert_eq!(
                    state.allows(code),
                    spec_allows(*state, code),
                    "PcmState::allows({state:?}, {code:#x}) is not the spec's"
                );
            }
        }
        let mut target: Option<usize> = None;
        match code {
            Some(code @ (p::R_JACK_INFO | p::R_PCM_INFO | p::R_CHMAP_INFO)) => {
                let items = self.items(code, streams);
                let item_len = match code {
                    p::R_JACK_INFO => p::JackInfo::SIZE,
                    p::R_PCM_INFO => p::PcmInfo::SIZE,
                    _ => p::ChmapInfo::SIZE,
                } as usize;
                self.check_info(req, capacity, &resp, &items, item_len, &ctx);
            }
            Some(p::R_JACK_REMAP) => self.check_remap(req, status, &ctx),
            Some(p::R_PCM_SET_PARAMS) => {
                let msg = p::read_prefix::<p::PcmSetParams>(req);
                let id = msg.map(|m| m.hdr.stream_id.get() as usize);
                let prior = id.and_then(|id| before.get(id).map(|b| (id, b.0)));
                let expected = match (msg, prior) {
                    (Some(msg), Some((id, state))) if spec_allows(state, p::R_PCM_SET_PARAMS) => {
                        let params = PcmParams {
                            buffer_bytes: msg.buffer_bytes.get(),
                            period_bytes: msg.period_bytes.get(),
                            features: msg.features.get(),
                            channels: msg.channels,
                            format: msg.format,
                            rate: msg.rate,
                        };
                        let valid = params.validate(streams[id].caps(), self.max_buffer_bytes);
                        if valid.is_ok() {
                            assert_eq!(
                                after[id].1,
                                Some(params),
                                "SET_PARAMS accepted but not kept: {ctx}"
                            );
                        }
                        valid.err().unwrap_or(Status::Ok)
                    }
                    // Short, for no stream, or not allowed in the stream's state.
                    _ => Status::BadMsg,
                };
                assert_eq!(
                    status,
                    expected.code(),
                    "SET_PARAMS answered wrongly: {ctx}"
                );
                assert!(calls.is_empty(), "host called for SET_PARAMS: {ctx}");
                target = id;
            }
            Some(code @ (p::R_PCM_PREPARE | p::R_PCM_START | p::R_PCM_STOP | p::R_PCM_RELEASE)) => {
                let id = p::read_prefix::<p::PcmHdr>(req).map(|h| h.stream_id.get());
                let prior = id.and_then(|id| before.get(id as usize));
                match prior {
                    Some((state, params)) if spec_allows(*state, code) => {
                        // Every state that allows PREPARE is reached through SET_PARAMS.
                        assert!(
                            code != p::R_PCM_PREPARE || params.is_some(),
                            "PREPARE allowed without params: {ctx}"
                        );
                        assert_eq!(calls.len(), 1, "one host call per command: {ctx}");
                        let call = calls[0];
                        assert_eq!(call.code, code, "host called for another command: {ctx}");
                        assert_eq!(
                            Some(call.stream_id),
                            id,
                            "host called for another stream: {ctx}"
                        );
                        let expected = call.result.err().unwrap_or(Status::Ok);
                        assert_eq!(
                            status,
                            expected.code(),
                            "host's answer not passed on: {ctx}"
                        );
                    }
                    _ => {
                        assert!(calls.is_empty(), "host called for a refused command: {ctx}");
                        assert_eq!(status, Status::BadMsg.code(), "{ctx}");
                    }
                }
                target = id.map(|id| id as usize);
            }
            _ => assert_eq!(
                status,
                Status::BadMsg.code(),
                "unknown request accepted: {ctx}"
            ),
        }
        if !matches!(
            code,
            Some(p::R_PCM_PREPARE | p::R_PCM_START | p::R_PCM_STOP | p::R_PCM_RELEASE)
        ) {
            assert!(calls.is_empty(), "host called for a non-PCM command: {ctx}");
        }

        // Only the request's stream may change, only on success, only as the lifecycle says.
        for (id, (was, now)) in before.iter().zip(&after).enumerate() {
            if ok && target == Some(id) {
                let code = code.unwrap();
                assert!(
                    spec_allows(was.0, code),
                    "{:?} does not allow {code:#x}: {ctx}",
                    was.0
                );
                assert_eq!(Some(now.0), next_state(code), "wrong next state: {ctx}");
                if code != p::R_PCM_SET_PARAMS {
                    assert_eq!(was.1, now.1, "params changed by {code:#x}: {ctx}");
                }
                if let Some(params) = now.1 {
                    let caps = streams[id].caps();
                    assert_eq!(
                        params.validate(caps, self.max_buffer_bytes),
                        Ok(()),
                        "stream {id} holds invalid params: {ctx}"
                    );
                }
            } else {
                assert_eq!(was, now, "stream {id} changed: {ctx}");
            }
        }
    }

    /// The items of an INFO query, as the driver must see them.
    fn items(&self, code: u32, streams: &[PcmStream]) -> Vec<Vec<u8>> {
        match code {
            p::R_JACK_INFO => self.jacks.iter().map(|j| j.as_bytes().to_vec()).collect(),
            p::R_CHMAP_INFO => self.chmaps.iter().map(|c| c.as_bytes().to_vec()).collect(),
            _ => streams
                .iter()
                .map(|s| {
                    let c = s.caps();
                    p::PcmInfo {
                        hdr: p::Info {
                            hda_fn_nid: c.hda_fn_nid.into(),
                        },
                        features: c.features.into(),
                        formats: c.formats.into(),
                        rates: c.rates.into(),
                        direction: c.direction,
                        channels_min: c.channels_min,
                        channels_max: c.channels_max,
                        padding: [0; 5],
                    }
                    .as_bytes()
                    .to_vec()
                })
                .collect(),
        }
    }

    fn check_info(
        &self,
        req: &[u8],
        capacity: usize,
        resp: &[u8],
        items: &[Vec<u8>],
        item_len: usize,
        ctx: &dyn std::fmt::Display,
    ) {
        let status = u32::from_le_bytes(resp[..4].try_into().unwrap());
        let Some(q) = p::read_prefix::<p::QueryInfo>(req) else {
            assert_eq!(status, Status::BadMsg.code(), "short query accepted: {ctx}");
            return;
        };
        let (start, count, size) = (
            u64::from(q.start_id.get()),
            u64::from(q.count.get()),
            u64::from(q.size.get()),
        );
        // With no items there is no item size to fall short of.
        let min_size = if items.is_empty() { 0 } else { item_len as u64 };
        let total = 4 + count * size;
        let answerable = start + count <= items.len() as u64
            && size >= min_size
            && size <= u64::from(MAX_INFO_ITEM_SIZE)
            && total <= capacity as u64;
        let expected = if answerable {
            Status::Ok
        } else {
            Status::BadMsg
        };
        assert_eq!(status, expected.code(), "query answered wrongly: {ctx}");
        if !answerable {
            return;
        }
        assert_eq!(
            resp.len() as u64,
            total,
            "OK INFO of the wrong length: {ctx}"
        );
        let size = size as usize;
        for (i, chunk) in resp[4..]
            .chunks(size.max(1))
            .enumerate()
            .take(count as usize)
        {
            let item = &items[start as usize + i];
            assert_eq!(&chunk[..item.len()], &item[..], "item {i} wrong: {ctx}");
            assert!(
                chunk[item.len()..].iter().all(|&b| b == 0),
                "item {i} not zero-padded: {ctx}"
            );
        }
    }

    fn check_remap(&mut self, req: &[u8], status: u32, ctx: &dyn std::fmt::Display) {
        let remap = p::read_prefix::<p::JackRemap>(req);
        let jack = remap.and_then(|r| self.jacks.get_mut(r.hdr.jack_id.get() as usize));
        let expected = match (remap, jack) {
            (Some(remap), Some(jack)) => {
                let (association, sequence) = (remap.association.get(), remap.sequence.get());
                if jack.features.get() & (1 << p::JACK_F_REMAP) == 0 {
                    Status::NotSupp
                } else if association > 0xF || sequence > 0xF {
                    Status::BadMsg
                } else {
                    // HDA default configuration: association bits 4..8, sequence bits 0..4.
                    let defconf = jack.hda_reg_defconf.get() & !0xFF;
                    jack.hda_reg_defconf = (defconf | association << 4 | sequence).into();
                    Status::Ok
                }
            }
            _ => Status::BadMsg,
        };
        assert_eq!(
            status,
            expected.code(),
            "JACK_REMAP answered wrongly: {ctx}"
        );
    }
}

fn is_info(code: Option<u32>) -> bool {
    matches!(code, Some(p::R_JACK_INFO | p::R_PCM_INFO | p::R_CHMAP_INFO))
}

/// Builders of well-formed requests for the seed corpus.
pub mod seeds {
    use super::*;

    pub fn query(code: u32, start: u32, count: u32, size: u32) -> Vec<u8> {
        p::QueryInfo {
            hdr: p::Hdr { code: code.into() },
            start_id: start.into(),
            count: count.into(),
            size: size.into(),
        }
        .as_bytes()
        .to_vec()
    }

    pub fn pcm(code: u32, stream_id: u32) -> Vec<u8> {
        p::PcmHdr {
            hdr: p::Hdr { code: code.into() },
            stream_id: stream_id.into(),
        }
        .as_bytes()
        .to_vec()
    }

    pub fn set_params(
        stream_id: u32,
        buffer_bytes: u32,
        period_bytes: u32,
        channels: u8,
        format: u8,
        rate: u8,
    ) -> Vec<u8> {
        p::PcmSetParams {
            hdr: p::PcmHdr {
                hdr: p::Hdr {
                    code: p::R_PCM_SET_PARAMS.into(),
                },
                stream_id: stream_id.into(),
            },
            buffer_bytes: buffer_bytes.into(),
            period_bytes: period_bytes.into(),
            features: 0.into(),
            channels,
            format,
            rate,
            padding: 0,
        }
        .as_bytes()
        .to_vec()
    }

    pub fn jack_remap(jack_id: u32, association: u32, sequence: u32) -> Vec<u8> {
        p::JackRemap {
            hdr: p::JackHdr {
                hdr: p::Hdr {
                    code: p::R_JACK_REMAP.into(),
                },
                jack_id: jack_id.into(),
            },
            association: association.into(),
            sequence: sequence.into(),
        }
        .as_bytes()
        .to_vec()
    }

    /// The device of a config: its streams' caps and its layout.
    pub fn device_of(config: &vsound_config::Config, host_failures: u64) -> Device {
        Device {
            caps: config.pcm_caps(),
            layout: config.device_layout(),
            host_failures,
        }
    }
}
