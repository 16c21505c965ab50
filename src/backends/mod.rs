//! Audio backends of the broker, behind one trait.
//!
//! `null` and `wav` are clocked by the broker (a timer moves frames at the stream's real-time
//! rate); real audio backends plug in behind the same traits.

use std::io;

use crate::config::{BackendKind, StreamConfig};
use crate::control::{PcmCaps, PcmParams};

pub mod null;
pub mod wav;

/// What the broker tells a backend about a stream it opens.
#[derive(Debug, Clone, Copy)]
pub struct StreamSpec {
    pub client_id: u32,
    pub stream_id: u32,
    /// VIRTIO_SND_D_OUTPUT or VIRTIO_SND_D_INPUT.
    pub direction: u8,
    pub params: PcmParams,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("unsupported: {0}")]
    Unsupported(String),
}

/// A configured backend for one stream slot; opens a [`BackendStream`] at every PREPARE.
pub trait Backend: Send {
    fn name(&self) -> &'static str;
    /// Narrows the config's offer to what this backend really accepts.
    fn caps(&self, offered: &PcmCaps) -> PcmCaps;
    fn open(&self, spec: &StreamSpec) -> Result<Box<dyn BackendStream>, BackendError>;
}

/// One open stream. Frames passed are whole frames in the stream's format.
pub trait BackendStream: Send {
    /// Playback: the frames the clock says are being played now.
    fn play(&mut self, frames: &[u8]) -> io::Result<()>;
    /// Capture: fills `out` with the frames captured now.
    fn capture(&mut self, out: &mut [u8]) -> io::Result<()>;
    fn start(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn stop(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// Frames buffered inside the backend (after the ring for playback, before it for capture).
    fn delay_frames(&self) -> u64 {
        0
    }
}

/// Builds the backend a stream's config asks for.
pub fn for_stream(config: &StreamConfig) -> Box<dyn Backend> {
    match config.backend {
        BackendKind::Null => Box::new(null::NullBackend),
        BackendKind::Wav => Box::new(wav::WavBackend {
            path_template: config.wav_path.clone().unwrap_or_default(),
        }),
    }
}
