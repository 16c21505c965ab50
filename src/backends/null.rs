//! The `null` backend: discards playback and captures silence, paced by the broker's clock.

use std::io;

use super::clocked::{ClockedIo, ClockedStream};
use super::{Backend, BackendError, BackendStream, RingPort, StreamSpec};
use crate::control::PcmCaps;

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
            silence: silence_sample(spec.params.format),
        });
        Ok(Box::new(ClockedStream::new(spec, port, io)?))
    }
}

/// One sample of silence, little-endian: unsigned formats are centred, not zero.
pub fn silence_sample(format: u8) -> Vec<u8> {
    use crate::protocol::format::*;
    let width = crate::protocol::sample_bytes(format).unwrap_or(1) as usize;
    let mut sample = vec![0u8; width];
    let centre_bit = match format {
        U8 => 7,
        U16 => 15,
        U18_3 => 17,
        U20_3 | U20 => 19,
        U24_3 | U24 => 23,
        U32 => 31,
        _ => return sample,
    };
    sample[centre_bit / 8] = 1 << (centre_bit % 8);
    sample
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::format;

    #[test]
    fn silence_is_the_centre_value() {
        assert_eq!(silence_sample(format::S16), vec![0, 0]);
        assert_eq!(silence_sample(format::U8), vec![0x80]);
        assert_eq!(silence_sample(format::U16), vec![0, 0x80]);
        assert_eq!(silence_sample(format::U24_3), vec![0, 0, 0x80]);
        assert_eq!(silence_sample(format::U32), vec![0, 0, 0, 0x80]);
        assert_eq!(silence_sample(format::FLOAT), vec![0; 4]);
    }
}
