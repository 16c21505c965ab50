//! `ipc_worker_msg` and `ipc_broker_msg`: `ipc::decode` of one packet from an untrusted peer.
//! Whatever decodes must re-encode, within the packet's size, to bytes that decode to the same
//! message and re-encode to themselves; and what the receiving side checks on a decoded
//! message that is callable on its own (`PcmParams::validate` of a PREPARE, `ipc::reason` on
//! the texts) must hold its promises.
//!
//! The broker's own checks of a worker's messages (Hello first, the protocol version, at most
//! `MAX_STREAMS` streams, stream ids within what Hello granted) are inline in
//! `Broker::handle_message`, which needs a live broker, and the worker's of a Welcome are
//! private to its broker link: neither is reached here.
//!
//! Input: the packet's bytes.

use serde::{de::DeserializeOwned, Serialize};
use virtio_snd::control::{PcmCaps, PcmParams};
use virtio_snd::protocol as p;
use vsound_shared::ipc::{self, BrokerMsg, WorkerMsg, MAX_FDS, MAX_REASON_LEN};

/// Decodes a packet; a message must survive re-encoding unchanged.
fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(
    data: &[u8],
) -> Option<T> {
    let msg = ipc::decode::<T>(data).ok()?;
    let bytes =
        ipc::encode(&msg).unwrap_or_else(|e| panic!("{msg:?} decodes but does not encode: {e}"));
    // The encoding is the shortest form: a packet that decoded was at least as long.
    assert!(
        bytes.len() <= data.len(),
        "{msg:?} re-encodes longer than its packet"
    );
    let again = ipc::decode::<T>(&bytes)
        .unwrap_or_else(|e| panic!("{msg:?} re-encoded does not decode: {e}"));
    assert_eq!(again, msg, "re-encoded message differs");
    assert_eq!(
        ipc::encode(&again).unwrap(),
        bytes,
        "encoding is not deterministic"
    );
    Some(msg)
}

/// The fuzz target for what a worker sends the broker.
pub fn worker_msg(data: &[u8]) {
    let Some(msg) = round_trip::<WorkerMsg>(data) else {
        return;
    };
    match msg {
        WorkerMsg::Prepare { params, .. } => {
            // The broker checks a PREPARE's params against the caps it granted: at most the
            // widest caps, or what a default config offers.
            let widest = PcmCaps {
                direction: p::D_OUTPUT,
                hda_fn_nid: 0,
                features: u32::MAX,
                formats: u64::MAX,
                rates: u64::MAX,
                channels_min: 1,
                channels_max: u8::MAX,
            };
            check_validate(&params, &widest, u32::MAX);
            for caps in vsound_config::Config::default().pcm_caps() {
                check_validate(&params, &caps, 4 << 20);
            }
        }
        WorkerMsg::Hello { streams, .. } => {
            for caps in &streams {
                let params = PcmParams {
                    buffer_bytes: 4096,
                    period_bytes: 1024,
                    features: 0,
                    channels: caps.channels_min,
                    format: caps.formats.trailing_zeros().min(255) as u8,
                    rate: caps.rates.trailing_zeros().min(255) as u8,
                };
                check_validate(&params, caps, 1 << 20);
            }
        }
        WorkerMsg::SetGain { gain, .. } => {
            // The broker accepts exactly the gains the control elements can express; a valid
            // one is silent exactly when muted or at the lowest step, and unity only at 0 dB.
            let expressible = gain.volume <= virtio_snd::ctl::VOLUME_MAX;
            assert_eq!(gain.is_valid(), expressible, "{gain:?}");
            if gain.is_valid() {
                assert_eq!(gain.is_silent(), gain.mute || gain.volume == 0, "{gain:?}");
                assert!(!gain.is_unity() || (!gain.mute && gain.db_centi() == Some(0)));
            }
        }
        WorkerMsg::Start { .. } | WorkerMsg::Stop { .. } | WorkerMsg::Release { .. } => {}
    }
}

/// `validate` accepts exactly the params that the spec and the caps allow.
fn check_validate(params: &PcmParams, caps: &PcmCaps, max_buffer_bytes: u32) {
    let result = params.validate(caps, max_buffer_bytes);
    let sample = p::sample_bytes(params.format);
    let offered = |mask: u64, bit: u8| bit < 64 && mask & (1u64 << bit) != 0;
    let frame = sample.map(|s| s * u32::from(params.channels));
    let allowed = params.format <= p::format::MAX
        && params.rate <= p::rate::MAX
        && sample.is_some()
        && offered(caps.formats, params.format)
        && offered(caps.rates, params.rate)
        && params.channels >= 1
        && params.channels >= caps.channels_min
        && params.channels <= caps.channels_max
        && params.features & !caps.features == 0
        && params.period_bytes > 0
        && params.buffer_bytes >= params.period_bytes
        && params.buffer_bytes.is_multiple_of(params.period_bytes)
        && frame.is_some_and(|f| params.period_bytes.is_multiple_of(f))
        && params.buffer_bytes <= max_buffer_bytes;
    assert_eq!(
        result.is_ok(),
        allowed,
        "validate({params:?}, {caps:?}, {max_buffer_bytes}) = {result:?}"
    );
    if allowed {
        // What the broker and the worker derive from valid params.
        assert!(params.frame_bytes() > 0 && params.period_frames() > 0);
        assert_eq!(Some(params.rate_hz()), p::rate_hz(params.rate));
    }
}

/// The fuzz target for what the broker sends a worker.
pub fn broker_msg(data: &[u8]) {
    let Some(msg) = round_trip::<BrokerMsg>(data) else {
        return;
    };
    let fds = msg.fd_count();
    assert!(
        fds <= MAX_FDS,
        "{msg:?} needs {fds} fds, more than a packet carries"
    );
    assert_eq!(
        fds == 2,
        matches!(msg, BrokerMsg::Prepared { .. }),
        "{msg:?}"
    );
    if let BrokerMsg::Refused { reason } | BrokerMsg::Failed { reason, .. } = &msg {
        let clipped = ipc::reason(reason.clone());
        assert!(clipped.len() <= MAX_REASON_LEN);
        assert!(reason.starts_with(&clipped), "clipping is not a prefix");
        if reason.len() <= MAX_REASON_LEN {
            assert_eq!(&clipped, reason, "a short reason was clipped");
        } else {
            // Clipped at the last char boundary: less than one char short of the limit.
            assert!(
                clipped.len() + 4 > MAX_REASON_LEN,
                "clipped too much: {}",
                clipped.len()
            );
        }
        // A clipped reason always fits a packet, whatever else the message holds.
        let resent = BrokerMsg::Failed {
            stream_id: u32::MAX,
            reason: clipped,
        };
        assert!(ipc::encode(&resent).is_ok());
    }
}
