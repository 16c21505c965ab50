//! The `null` backend: discards playback and captures silence, paced by the broker's clock.

use std::io;

use super::clocked::{ClockedIo, ClockedStream};
use super::{Backend, BackendError, BackendStream, RingPort, StreamSpec};
use virtio_snd::control::PcmCaps;

pub struct NullBackend;

impl Backend for NullBackend {
    fn name(&self) -> &'static str {
        "null"
    }

    fn caps(&self, offered: &PcmCaps) -> PcmCaps {
        *offered
    }

    fn open(
        &self,
        spec: &StreamSpec,
        port: RingPort,
    ) -> Result<Box<dyn BackendStream>, BackendError> {
        let io = Box::new(NullIo {
            silence: virtio_snd::protocol::silence_sample(spec.params.format),
        });
        Ok(Box::new(ClockedStream::new(spec, port, io)?))
    }
}

struct NullIo {
    silence: Vec<u8>,
}

impl ClockedIo for NullIo {
    fn play(&mut self, _frames: &[u8]) -> io::Result<()> {
        Ok(())
    }

    fn capture(&mut self, out: &mut [u8]) -> io::Result<()> {
        for sample in out.chunks_mut(self.silence.len()) {
            sample.copy_from_slice(&self.silence[..sample.len()]);
        }
        Ok(())
    }
}
