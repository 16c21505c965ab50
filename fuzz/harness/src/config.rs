//! `config`: `Config::parse` on arbitrary text (UTF-8, lossily). An accepted config must keep
//! the limits the device relies on, and what the worker derives from it (`pcm_caps`,
//! `device_layout`) must agree with it and be served by `ControlState` as a driver asks.
//!
//! Input: the config file's bytes.

use virtio_snd::control::{ControlState, PcmHost, PcmParams, PcmStream};
use virtio_snd::protocol::{self as p, chmap, Status};
use vsound_config::{Config, MAX_CHMAPS, MAX_JACKS, MAX_NAME_LEN, MAX_STREAMS};

use crate::control::seeds::{query, set_params};

/// A host that accepts everything: only the control plane is under test here.
struct Accepting;

impl PcmHost<PcmStream> for Accepting {
    fn prepare(&mut self, _: u32, _: &mut PcmStream, _: &PcmParams) -> Result<(), Status> {
        Ok(())
    }
    fn start(&mut self, _: u32, _: &mut PcmStream) -> Result<(), Status> {
        Ok(())
    }
    fn stop(&mut self, _: u32, _: &mut PcmStream) -> Result<(), Status> {
        Ok(())
    }
    fn release(&mut self, _: u32, _: &mut PcmStream) -> Result<(), Status> {
        Ok(())
    }
}

/// The fuzz target.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let Ok(config) = Config::parse(&text) else {
        return;
    };
    assert!(
        config.validate().is_ok(),
        "parse accepted what validate refuses"
    );
    assert!((1..=MAX_STREAMS).contains(&config.streams.len()));
    assert!(config.jacks.len() <= MAX_JACKS);
    assert!(config.chmaps.len() <= MAX_CHMAPS);
    for j in &config.jacks {
        assert!(
            j.name.len() <= MAX_NAME_LEN,
            "jack name of {} bytes",
            j.name.len()
        );
    }
    for s in &config.streams {
        assert!(
            (1..=MAX_NAME_LEN).contains(&s.name.len()),
            "stream name of {} bytes",
            s.name.len()
        );
        assert!(1 <= s.channels_min && s.channels_min <= s.channels_max);
        assert!(usize::from(s.channels_max) <= chmap::MAX_SIZE);
        assert!(!s.formats.is_empty() && !s.rates.is_empty());
    }
    assert!((2..=16).contains(&config.limits.lookahead_periods));
    assert!((1..=16 << 20).contains(&config.limits.max_buffer_bytes));

    let caps = config.pcm_caps();
    assert_eq!(caps.len(), config.streams.len());
    for (c, s) in caps.iter().zip(&config.streams) {
        assert_eq!(c.direction, s.direction.wire());
        assert_eq!(
            (c.channels_min, c.channels_max),
            (s.channels_min, s.channels_max)
        );
        assert_eq!(c.hda_fn_nid, s.hda_fn_nid);
        // Only linear formats with a sample size, only defined rates, at least one of each.
        assert_ne!(c.formats, 0, "stream {} offers no format", s.name);
        assert_ne!(c.rates, 0, "stream {} offers no rate", s.name);
        for f in 0..64u8 {
            if c.formats & (1 << f) != 0 {
                assert!(
                    f <= p::format::MAX && p::sample_bytes(f).is_some(),
                    "format {f}"
                );
            }
        }
        assert!(c.rates >> (p::rate::MAX + 1) == 0, "rates {:#x}", c.rates);
    }
    let layout = config.device_layout();
    assert_eq!(layout.jacks.len(), config.jacks.len());
    assert_eq!(layout.chmaps.len(), config.chmaps.len());
    assert_eq!(layout.max_buffer_bytes, config.limits.max_buffer_bytes);
    for (m, c) in layout.chmaps.iter().zip(&config.chmaps) {
        let n = usize::from(m.channels);
        assert!((1..=chmap::MAX_SIZE).contains(&n), "chmap of {n} channels");
        assert_eq!(n, c.positions.len());
        assert!(m.positions[..n].iter().all(|&v| v <= chmap::MAX));
        assert!(
            m.positions[n..].iter().all(|&v| v == 0),
            "positions past the channels"
        );
        assert_eq!(m.direction, c.direction.wire());
    }
    for (j, c) in layout.jacks.iter().zip(&config.jacks) {
        assert_eq!(j.hda_reg_defconf.get(), c.hda_reg_defconf);
        assert_eq!(j.connected, u8::from(c.connected));
        assert_eq!(j.features.get() & (1 << p::JACK_F_REMAP) != 0, c.remap);
    }

    // The device built from it answers what the Linux driver asks first, and each stream
    // accepts the smallest params its caps allow.
    let mut control = ControlState::new(layout.clone());
    let mut streams: Vec<PcmStream> = caps.iter().copied().map(PcmStream::new).collect();
    for (code, count, size) in [
        (p::R_JACK_INFO, layout.jacks.len(), p::JackInfo::SIZE),
        (p::R_PCM_INFO, caps.len(), p::PcmInfo::SIZE),
        (p::R_CHMAP_INFO, layout.chmaps.len(), p::ChmapInfo::SIZE),
    ] {
        let capacity = 4 + count * size as usize;
        let req = query(code, 0, count as u32, size as u32);
        let resp = control.handle(&req, capacity, &mut streams, &mut Accepting);
        assert_eq!(
            resp[..4],
            p::status_bytes(Status::Ok),
            "query {code:#x} refused"
        );
        assert_eq!(resp.len(), capacity);
    }
    for (id, c) in caps.iter().enumerate() {
        let format = c.formats.trailing_zeros() as u8;
        let rate = c.rates.trailing_zeros() as u8;
        let frame = p::sample_bytes(format).unwrap() * u32::from(c.channels_min);
        let req = set_params(id as u32, frame, frame, c.channels_min, format, rate);
        let resp = control.handle(&req, 4, &mut streams, &mut Accepting);
        let want = if frame <= layout.max_buffer_bytes {
            Status::Ok
        } else {
            Status::NotSupp
        };
        assert_eq!(
            resp,
            p::status_bytes(want),
            "stream {id}: one frame of {frame} bytes"
        );
    }
}
