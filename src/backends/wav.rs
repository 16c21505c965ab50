//! The `wav` backend: playback is appended to a WAV file, capture is read from one (silence
//! after its end), both at the real-time rate of the broker's clock. Tests compare its bytes.

use std::fs::File;
use std::io::{self, BufReader, BufWriter};
use std::path::PathBuf;

use hound::{SampleFormat, WavReader, WavSpec, WavWriter};

use super::clocked::{ClockedIo, ClockedStream};
use super::{Backend, BackendError, BackendStream, RingPort, StreamSpec};
use crate::control::PcmCaps;
use crate::protocol::{format, D_OUTPUT};

/// Formats a WAV file holds without conversion.
const WAV_FORMATS: u64 = (1 << format::S16) | (1 << format::S32) | (1 << format::FLOAT);

pub struct WavBackend {
    /// May contain `{client}`, replaced by the broker's client number.
    pub path_template: PathBuf,
}

impl WavBackend {
    fn path_for(&self, client_id: u32) -> PathBuf {
        let text = self.path_template.to_string_lossy();
        PathBuf::from(text.replace("{client}", &client_id.to_string()))
    }
}

fn wav_spec(spec: &StreamSpec) -> Result<WavSpec, BackendError> {
    let params = &spec.params;
    let (bits_per_sample, sample_format) = match params.format {
        format::S16 => (16, SampleFormat::Int),
        format::S32 => (32, SampleFormat::Int),
        format::FLOAT => (32, SampleFormat::Float),
        other => {
            return Err(BackendError::Unsupported(format!(
                "wav backend: format {other}"
            )))
        }
    };
    Ok(WavSpec {
        channels: u16::from(params.channels),
        sample_rate: params.rate_hz(),
        bits_per_sample,
        sample_format,
    })
}

impl Backend for WavBackend {
    fn name(&self) -> &'static str {
        "wav"
    }

    fn caps(&self, offered: &PcmCaps) -> PcmCaps {
        PcmCaps {
            formats: offered.formats & WAV_FORMATS,
            ..*offered
        }
    }

    fn open(
        &self,
        spec: &StreamSpec,
        port: RingPort,
    ) -> Result<Box<dyn BackendStream>, BackendError> {
        let io = self.open_io(spec)?;
        Ok(Box::new(ClockedStream::new(spec, port, io)?))
    }
}

impl WavBackend {
    fn open_io(&self, spec: &StreamSpec) -> Result<Box<dyn ClockedIo>, BackendError> {
        let wav = wav_spec(spec)?;
        let path = self.path_for(spec.client_id);
        if spec.direction == D_OUTPUT {
            let writer = WavWriter::create(&path, wav).map_err(to_io)?;
            log::info!("wav: writing playback to {}", path.display());
            Ok(Box::new(WavPlayback {
                writer,
                format: spec.params.format,
            }))
        } else {
            let reader = WavReader::open(&path).map_err(to_io)?;
            if reader.spec() != wav {
                return Err(BackendError::Unsupported(format!(
                    "{} is {:?}, the guest asked for {:?}",
                    path.display(),
                    reader.spec(),
                    wav
                )));
            }
            log::info!("wav: capturing from {}", path.display());
            Ok(Box::new(WavCapture {
                reader,
                format: spec.params.format,
            }))
        }
    }
}

fn to_io(e: hound::Error) -> io::Error {
    match e {
        hound::Error::IoError(e) => e,
        other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
    }
}

struct WavPlayback {
    writer: WavWriter<BufWriter<File>>,
    format: u8,
}

impl ClockedIo for WavPlayback {
    fn play(&mut self, frames: &[u8]) -> io::Result<()> {
        match self.format {
            format::S16 => {
                for s in frames.chunks_exact(2) {
                    self.writer
                        .write_sample(i16::from_le_bytes([s[0], s[1]]))
                        .map_err(to_io)?;
                }
            }
            format::S32 => {
                for s in frames.chunks_exact(4) {
                    self.writer
                        .write_sample(i32::from_le_bytes([s[0], s[1], s[2], s[3]]))
                        .map_err(to_io)?;
                }
            }
            _ => {
                for s in frames.chunks_exact(4) {
                    self.writer
                        .write_sample(f32::from_le_bytes([s[0], s[1], s[2], s[3]]))
                        .map_err(to_io)?;
                }
            }
        }
        Ok(())
    }

    fn capture(&mut self, _out: &mut [u8]) -> io::Result<()> {
        Err(io::Error::other("playback stream"))
    }

    fn pause(&mut self) -> io::Result<()> {
        // Keep the header's sizes true whenever the stream pauses.
        self.writer.flush().map_err(to_io)
    }
}

impl Drop for WavPlayback {
    fn drop(&mut self) {
        if let Err(e) = self.writer.flush() {
            log::warn!("wav: cannot finish the file: {e}");
        }
    }
}

struct WavCapture {
    reader: WavReader<BufReader<File>>,
    format: u8,
}

impl ClockedIo for WavCapture {
    fn play(&mut self, _frames: &[u8]) -> io::Result<()> {
        Err(io::Error::other("capture stream"))
    }

    fn capture(&mut self, out: &mut [u8]) -> io::Result<()> {
        let width = if self.format == format::S16 { 2 } else { 4 };
        for slot in out.chunks_exact_mut(width) {
            let bytes = match self.format {
                format::S16 => self
                    .reader
                    .samples::<i16>()
                    .next()
                    .transpose()
                    .map_err(to_io)?
                    .map(|v| v.to_le_bytes().to_vec()),
                format::S32 => self
                    .reader
                    .samples::<i32>()
                    .next()
                    .transpose()
                    .map_err(to_io)?
                    .map(|v| v.to_le_bytes().to_vec()),
                _ => self
                    .reader
                    .samples::<f32>()
                    .next()
                    .transpose()
                    .map_err(to_io)?
                    .map(|v| v.to_le_bytes().to_vec()),
            };
            match bytes {
                Some(bytes) => slot.copy_from_slice(&bytes),
                None => slot.fill(0), // past the end of the file: silence
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::PcmParams;
    use crate::protocol::{rate, D_INPUT};

    fn spec(direction: u8, format: u8) -> StreamSpec {
        StreamSpec {
            client_id: 7,
            stream_id: 0,
            direction,
            params: PcmParams {
                buffer_bytes: 4096,
                period_bytes: 1024,
                features: 0,
                channels: 2,
                format,
                rate: rate::R48000,
            },
        }
    }

    #[test]
    fn playback_then_capture_round_trips_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let backend = WavBackend {
            path_template: dir.path().join("out-{client}.wav"),
        };
        for fmt in [format::S16, format::S32, format::FLOAT] {
            let data: Vec<u8> = (0..4000u32).map(|i| (i * 7 % 251) as u8).collect();
            let data = &data[..data.len() / 8 * 8];
            {
                let mut out = backend.open_io(&spec(D_OUTPUT, fmt)).unwrap();
                out.play(&data[..1000]).unwrap();
                out.play(&data[1000..]).unwrap();
            }
            let path = dir.path().join("out-7.wav");
            assert!(path.exists());
            let mut input = backend.open_io(&spec(D_INPUT, fmt)).unwrap();
            let mut got = vec![0u8; data.len() + 8];
            input.capture(&mut got).unwrap();
            assert_eq!(&got[..data.len()], data, "format {fmt}");
            assert_eq!(&got[data.len()..], &[0; 8], "silence after the end");
        }
    }

    #[test]
    fn mismatched_input_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let backend = WavBackend {
            path_template: dir.path().join("in.wav"),
        };
        drop(backend.open_io(&spec(D_OUTPUT, format::S16)).unwrap());
        assert!(backend.open_io(&spec(D_INPUT, format::S32)).is_err());
        let missing = WavBackend {
            path_template: dir.path().join("missing.wav"),
        };
        assert!(missing.open_io(&spec(D_INPUT, format::S16)).is_err());
        assert!(backend.open_io(&spec(D_OUTPUT, format::U8)).is_err());
    }
}
