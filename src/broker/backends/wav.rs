//! The `wav` backend: playback is appended to a WAV file, capture is read from one (silence
//! after its end), both at the real-time rate of the broker's clock. Tests compare its bytes.

use std::fs::File;
use std::io::{self, BufReader, BufWriter};
use std::path::{Component, Path, PathBuf};

use hound::{SampleFormat, WavReader, WavSpec, WavWriter};

use super::clocked::{ClockedIo, ClockedStream};
use super::{Backend, BackendError, BackendStream, RingPort, StreamSpec};
use virtio_snd::control::PcmCaps;
use virtio_snd::protocol::{format, D_OUTPUT};

/// How a virtio format is kept in a WAV file: PCM integers of 8 (unsigned there), 16, 24 or 32
/// bits, or 32-bit floats. Every conversion is lossless both ways.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codec {
    U8,
    S8,
    S16,
    /// S24_3: three bytes a sample.
    S24Packed,
    /// S24: 24 bits in the low three bytes of four.
    S24,
    S32,
    Float,
}

impl Codec {
    fn of(fmt: u8) -> Option<Codec> {
        Some(match fmt {
            format::U8 => Codec::U8,
            format::S8 => Codec::S8,
            format::S16 => Codec::S16,
            format::S24_3 => Codec::S24Packed,
            format::S24 => Codec::S24,
            format::S32 => Codec::S32,
            format::FLOAT => Codec::Float,
            _ => return None,
        })
    }

    fn wav(self) -> (u16, SampleFormat) {
        match self {
            Codec::U8 | Codec::S8 => (8, SampleFormat::Int),
            Codec::S16 => (16, SampleFormat::Int),
            Codec::S24Packed | Codec::S24 => (24, SampleFormat::Int),
            Codec::S32 => (32, SampleFormat::Int),
            Codec::Float => (32, SampleFormat::Float),
        }
    }

    /// Bytes of one sample in the guest's format.
    fn width(self) -> usize {
        match self {
            Codec::U8 | Codec::S8 => 1,
            Codec::S16 => 2,
            Codec::S24Packed => 3,
            Codec::S24 | Codec::S32 | Codec::Float => 4,
        }
    }

    fn write<W: io::Write + io::Seek>(
        self,
        writer: &mut WavWriter<W>,
        s: &[u8],
    ) -> hound::Result<()> {
        let s24 = |b: &[u8]| i32::from_le_bytes([0, b[0], b[1], b[2]]) >> 8;
        match self {
            // hound stores an i8 as the unsigned byte WAV wants (plus 128).
            Codec::U8 => writer.write_sample((s[0] ^ 0x80) as i8),
            Codec::S8 => writer.write_sample(s[0] as i8),
            Codec::S16 => writer.write_sample(i16::from_le_bytes([s[0], s[1]])),
            Codec::S24Packed | Codec::S24 => writer.write_sample(s24(s)),
            Codec::S32 => writer.write_sample(i32::from_le_bytes([s[0], s[1], s[2], s[3]])),
            Codec::Float => writer.write_sample(f32::from_le_bytes([s[0], s[1], s[2], s[3]])),
        }
    }

    /// Reads the next sample into `slot`; false past the end of the file.
    fn read<R: io::Read>(self, reader: &mut WavReader<R>, slot: &mut [u8]) -> hound::Result<bool> {
        fn next<S: hound::Sample, R: io::Read>(
            reader: &mut WavReader<R>,
        ) -> hound::Result<Option<S>> {
            reader.samples::<S>().next().transpose()
        }
        match self {
            Codec::U8 | Codec::S8 => {
                let Some(v) = next::<i8, R>(reader)? else {
                    return Ok(false);
                };
                slot[0] = if self == Codec::U8 {
                    v as u8 ^ 0x80
                } else {
                    v as u8
                };
            }
            Codec::S16 => {
                let Some(v) = next::<i16, R>(reader)? else {
                    return Ok(false);
                };
                slot.copy_from_slice(&v.to_le_bytes());
            }
            Codec::S24Packed | Codec::S24 | Codec::S32 => {
                let Some(v) = next::<i32, R>(reader)? else {
                    return Ok(false);
                };
                let n = slot.len();
                slot.copy_from_slice(&v.to_le_bytes()[..n]);
            }
            Codec::Float => {
                let Some(v) = next::<f32, R>(reader)? else {
                    return Ok(false);
                };
                slot.copy_from_slice(&v.to_le_bytes());
            }
        }
        Ok(true)
    }
}

/// Formats a WAV file holds.
const WAV_FORMATS: u64 = (1 << format::U8)
    | (1 << format::S8)
    | (1 << format::S16)
    | (1 << format::S24_3)
    | (1 << format::S24)
    | (1 << format::S32)
    | (1 << format::FLOAT);

pub struct WavBackend {
    /// Its file name may contain `{vm}` (the VM's name) and `{client}` (the broker's number for
    /// the connection), replaced at each open.
    pub path_template: PathBuf,
}

impl WavBackend {
    fn path_for(&self, spec: &StreamSpec) -> Result<PathBuf, BackendError> {
        expand(&self.path_template, spec.vm.as_str(), spec.client_id)
    }
}

/// `template` with its file name's placeholders replaced, in the template's directory: only the
/// file name changes, and the result must still be one plain file name there. A VM name
/// cannot contain '/' or '.' (`VmName`), so this never refuses one; it is checked anyway,
/// because a wrong file here would be written with the broker's rights.
fn expand(template: &Path, vm: &str, client: u32) -> Result<PathBuf, BackendError> {
    let name = template
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default()
        .replace("{vm}", vm)
        .replace("{client}", &client.to_string());
    let plain = matches!(
        Path::new(&name).components().collect::<Vec<_>>()[..],
        [Component::Normal(_)]
    ) && !name.contains('/');
    if !plain {
        return Err(BackendError::Unsupported(format!(
            "wav backend: {name:?} is not a file name in {}",
            template.parent().unwrap_or(Path::new("")).display()
        )));
    }
    Ok(template.with_file_name(name))
}

fn wav_spec(spec: &StreamSpec) -> Result<(WavSpec, Codec), BackendError> {
    let params = &spec.params;
    let codec = Codec::of(params.format).ok_or_else(|| {
        BackendError::Unsupported(format!(
            "wav backend: format {}",
            vsound_config::format_name(params.format)
        ))
    })?;
    let (bits_per_sample, sample_format) = codec.wav();
    let wav = WavSpec {
        channels: u16::from(params.channels),
        sample_rate: params.rate_hz(),
        bits_per_sample,
        sample_format,
    };
    Ok((wav, codec))
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
        let (wav, codec) = wav_spec(spec)?;
        let path = self.path_for(spec)?;
        if spec.direction == D_OUTPUT {
            let writer = WavWriter::create(&path, wav).map_err(to_io)?;
            log::info!("wav: writing playback to {}", path.display());
            Ok(Box::new(WavPlayback { writer, codec }))
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
            Ok(Box::new(WavCapture { reader, codec }))
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
    codec: Codec,
}

impl ClockedIo for WavPlayback {
    fn play(&mut self, frames: &[u8]) -> io::Result<()> {
        for sample in frames.chunks_exact(self.codec.width()) {
            self.codec.write(&mut self.writer, sample).map_err(to_io)?;
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
    codec: Codec,
}

impl ClockedIo for WavCapture {
    fn play(&mut self, _frames: &[u8]) -> io::Result<()> {
        Err(io::Error::other("capture stream"))
    }

    fn capture(&mut self, out: &mut [u8]) -> io::Result<()> {
        for slot in out.chunks_exact_mut(self.codec.width()) {
            if !self.codec.read(&mut self.reader, slot).map_err(to_io)? {
                // Past the end of the file: silence (unsigned 8-bit is centred on 0x80).
                slot.fill(if self.codec == Codec::U8 { 0x80 } else { 0 });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_snd::control::PcmParams;
    use virtio_snd::protocol::{rate, D_INPUT};

    fn spec(direction: u8, format: u8) -> StreamSpec {
        StreamSpec {
            client_id: 7,
            vm: vsound_config::VmName::new("navi").unwrap(),
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
        let formats = [
            format::U8,
            format::S8,
            format::S16,
            format::S24_3,
            format::S24,
            format::S32,
            format::FLOAT,
        ];
        for fmt in formats {
            let width = Codec::of(fmt).unwrap().width();
            let mut data: Vec<u8> = (0..4800u32).map(|i| (i * 7 % 251) as u8).collect();
            data.truncate(data.len() / (2 * width) * 2 * width);
            if fmt == format::S24 {
                // The container's top byte is the sign of the 24 bits.
                for s in data.chunks_exact_mut(4) {
                    s[3] = if s[2] & 0x80 != 0 { 0xff } else { 0 };
                }
            }
            let data = &data[..];
            {
                let mut out = backend.open_io(&spec(D_OUTPUT, fmt)).unwrap();
                // In two parts of whole frames, as the clock hands them over.
                let half = data.len() / 2 / (2 * width) * (2 * width);
                out.play(&data[..half]).unwrap();
                out.play(&data[half..]).unwrap();
            }
            let path = dir.path().join("out-7.wav");
            assert!(path.exists());
            let mut input = backend.open_io(&spec(D_INPUT, fmt)).unwrap();
            let mut got = vec![0u8; data.len() + 8];
            input.capture(&mut got).unwrap();
            assert_eq!(&got[..data.len()], data, "format {fmt}");
            let silence = if fmt == format::U8 { 0x80 } else { 0 };
            assert!(
                got[data.len()..].iter().all(|&b| b == silence),
                "silence after the end"
            );
        }
    }

    #[test]
    fn placeholders_fill_the_file_name_only() {
        let template = Path::new("/var/lib/vsound/{vm}-{client}.wav");
        let backend = WavBackend {
            path_template: template.to_path_buf(),
        };
        assert_eq!(
            backend.path_for(&spec(D_OUTPUT, format::S16)).unwrap(),
            PathBuf::from("/var/lib/vsound/navi-7.wav")
        );
        assert_eq!(
            expand(Path::new("out.wav"), "navi", 1).unwrap(),
            PathBuf::from("out.wav")
        );
        // Every name a VM may have stays a file name in the template's directory.
        for vm in ["a", "A-_9", "0", "z".repeat(32).as_str()] {
            vsound_config::VmName::new(vm).unwrap();
            let path = expand(Path::new("/srv/{vm}"), vm, 1).unwrap();
            assert_eq!(path.parent(), Some(Path::new("/srv")));
            assert_eq!(path.file_name().unwrap(), vm);
        }
        // Were a name ever a path, it would be refused, not followed.
        for vm in ["..", ".", "", "a/b", "/etc/passwd"] {
            assert!(vsound_config::VmName::new(vm).is_err(), "{vm:?}");
            assert!(expand(Path::new("/srv/{vm}"), vm, 1).is_err(), "{vm:?}");
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
        assert!(backend.open_io(&spec(D_OUTPUT, format::U16)).is_err());
    }
}
