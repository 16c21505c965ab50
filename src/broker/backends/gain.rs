//! A stream's volume and mute as the broker applies them to samples (the backends without a
//! mixer of their own: null, wav, ALSA), and the cell through which the broker's loop hands a
//! new value to a stream that plays on another thread.
//!
//! Unity (0 dB, not muted) leaves the bytes untouched, so it is bit-exact; muted (or the
//! lowest step) writes the format's silence; anything else scales each sample by the linear
//! factor of its dB value, rounded to the nearest code. Nothing here allocates, locks or logs:
//! it runs on the timer thread.

use std::sync::atomic::{AtomicU32, Ordering};

use virtio_snd::ctl::Gain;
use virtio_snd::protocol::{format, sample_bytes, silence_pattern};

/// A stream's current gain, shared by the broker's loop (which sets it) and whichever thread
/// moves the stream's frames (which reads it once per tick). One atomic word: bit 31 is mute,
/// the rest the volume.
#[derive(Debug)]
pub struct GainCell(AtomicU32);

const MUTE_BIT: u32 = 1 << 31;

impl Default for GainCell {
    fn default() -> Self {
        GainCell::new(Gain::UNITY)
    }
}

impl GainCell {
    pub fn new(gain: Gain) -> GainCell {
        GainCell(AtomicU32::new(pack(gain)))
    }

    pub fn load(&self) -> Gain {
        let word = self.0.load(Ordering::Acquire);
        Gain {
            volume: word & !MUTE_BIT,
            mute: word & MUTE_BIT != 0,
        }
    }

    pub fn store(&self, gain: Gain) {
        self.0.store(pack(gain), Ordering::Release);
    }
}

fn pack(gain: Gain) -> u32 {
    (gain.volume & !MUTE_BIT) | if gain.mute { MUTE_BIT } else { 0 }
}

/// Applies `gain` to `buf`, samples of `fmt` (little-endian, as on the wire). A trailing
/// partial sample is left alone (the callers move whole frames).
pub fn apply(fmt: u8, gain: Gain, buf: &mut [u8]) {
    if gain.is_unity() {
        return;
    }
    let Some(width) = sample_bytes(fmt).map(|w| w as usize) else {
        return;
    };
    let usable = buf.len() / width * width;
    let buf = &mut buf[..usable];
    if gain.is_silent() {
        let (pattern, width) = silence_pattern(fmt);
        for sample in buf.chunks_exact_mut(width) {
            sample.copy_from_slice(&pattern[..width]);
        }
        return;
    }
    let factor = f64::from(gain.amplitude());
    use format::*;
    match fmt {
        MU_LAW => buf
            .iter_mut()
            .for_each(|b| *b = ulaw_encode(scale_int(i64::from(ulaw_decode(*b)), 16, factor))),
        A_LAW => buf
            .iter_mut()
            .for_each(|b| *b = alaw_encode(scale_int(i64::from(alaw_decode(*b)), 16, factor))),
        FLOAT => {
            for sample in buf.chunks_exact_mut(4) {
                let v = f32::from_le_bytes([sample[0], sample[1], sample[2], sample[3]]);
                sample.copy_from_slice(&((f64::from(v) * factor) as f32).to_le_bytes());
            }
        }
        FLOAT64 => {
            for sample in buf.chunks_exact_mut(8) {
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(sample);
                sample.copy_from_slice(&(f64::from_le_bytes(bytes) * factor).to_le_bytes());
            }
        }
        _ => {
            let Some((bits, signed)) = integer_layout(fmt) else {
                return;
            };
            for sample in buf.chunks_exact_mut(width) {
                scale_integer_sample(sample, bits, signed, factor);
            }
        }
    }
}

/// Significant bits and signedness of the integer formats (LSB-justified in their container,
/// as ALSA lays S20, S24 and the 3-byte formats out).
fn integer_layout(fmt: u8) -> Option<(u32, bool)> {
    use format::*;
    Some(match fmt {
        S8 => (8, true),
        U8 => (8, false),
        S16 => (16, true),
        U16 => (16, false),
        S18_3 => (18, true),
        U18_3 => (18, false),
        S20_3 | S20 => (20, true),
        U20_3 | U20 => (20, false),
        S24_3 | S24 => (24, true),
        U24_3 | U24 => (24, false),
        S32 => (32, true),
        U32 => (32, false),
        _ => return None,
    })
}

/// Scales one LSB-justified integer sample in place; a signed result is written
/// sign-extended through its container, an unsigned one with its container's upper bits clear.
fn scale_integer_sample(sample: &mut [u8], bits: u32, signed: bool, factor: f64) {
    let mut raw = 0u64;
    for (i, &b) in sample.iter().enumerate() {
        raw |= u64::from(b) << (8 * i);
    }
    let mask = if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    let field = raw & mask;
    let value = if signed {
        // Sign-extend from the top significant bit.
        ((field << (64 - bits)) as i64) >> (64 - bits)
    } else {
        field as i64 - (1i64 << (bits - 1))
    };
    let scaled = scale_int(value, bits, factor);
    let out = if signed {
        scaled as u64
    } else {
        (scaled + (1i64 << (bits - 1))) as u64 & mask
    };
    for (i, b) in sample.iter_mut().enumerate() {
        *b = (out >> (8 * i)) as u8;
    }
}

/// `value * factor` rounded to the nearest integer, clamped to a signed `bits`-bit range.
fn scale_int(value: i64, bits: u32, factor: f64) -> i64 {
    let max = (1i64 << (bits - 1)) - 1;
    let min = -(1i64 << (bits - 1));
    ((value as f64 * factor).round() as i64).clamp(min, max)
}

/// G.711 mu-law code to 16-bit linear (ITU-T G.711's decoder, scaled to 16 bits).
fn ulaw_decode(code: u8) -> i16 {
    let u = !code;
    let sign = u & 0x80;
    let exponent = (u >> 4) & 0x07;
    let mantissa = i32::from(u & 0x0f);
    let magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84;
    (if sign != 0 { -magnitude } else { magnitude }) as i16
}

/// 16-bit linear to G.711 mu-law.
fn ulaw_encode(sample: i64) -> u8 {
    const BIAS: i64 = 0x84;
    const CLIP: i64 = 32635;
    let sign = if sample < 0 { 0x80u8 } else { 0 };
    let magnitude = sample.unsigned_abs().min(CLIP as u64) as i64 + BIAS;
    let exponent = (63 - (magnitude as u64).leading_zeros() as i64 - 7).clamp(0, 7);
    let mantissa = (magnitude >> (exponent + 3)) & 0x0f;
    !(sign | ((exponent as u8) << 4) | mantissa as u8)
}

/// G.711 A-law code to 16-bit linear.
fn alaw_decode(code: u8) -> i16 {
    let a = code ^ 0x55;
    let sign = a & 0x80;
    let exponent = (a >> 4) & 0x07;
    let mantissa = i32::from(a & 0x0f);
    let magnitude = if exponent == 0 {
        (mantissa << 4) + 8
    } else {
        ((mantissa << 4) + 0x108) << (exponent - 1)
    };
    (if sign != 0 { magnitude } else { -magnitude }) as i16
}

/// 16-bit linear to G.711 A-law.
fn alaw_encode(sample: i64) -> u8 {
    let (sign, magnitude) = if sample >= 0 {
        (0x80u8, sample.min(32767) as u64)
    } else {
        (0u8, (-sample - 1).min(32767) as u64)
    };
    let code = if magnitude < 256 {
        (magnitude >> 4) as u8
    } else {
        let exponent = (63 - magnitude.leading_zeros() as u64 - 7).min(7);
        ((exponent as u8) << 4) | ((magnitude >> (exponent + 3)) & 0x0f) as u8
    };
    (sign | code) ^ 0x55
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_snd::protocol::silence_sample;

    const ALL: [u8; 20] = {
        use format::*;
        [
            MU_LAW, A_LAW, S8, U8, S16, U16, S18_3, U18_3, S20_3, U20_3, S24_3, U24_3, S20, U20,
            S24, U24, S32, U32, FLOAT, FLOAT64,
        ]
    };

    fn noise(len: usize) -> Vec<u8> {
        let mut x = 0x1234_5678u32;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    #[test]
    fn the_cell_holds_what_was_stored() {
        let cell = GainCell::default();
        assert_eq!(cell.load(), Gain::UNITY);
        for gain in [
            Gain {
                volume: 0,
                mute: true,
            },
            Gain {
                volume: 57,
                mute: false,
            },
            Gain {
                volume: 100,
                mute: true,
            },
        ] {
            cell.store(gain);
            assert_eq!(cell.load(), gain);
        }
    }

    #[test]
    fn unity_is_bit_exact_for_every_format() {
        for fmt in ALL {
            let original = noise(4096);
            let mut buf = original.clone();
            apply(fmt, Gain::UNITY, &mut buf);
            assert_eq!(buf, original, "format {fmt}");
        }
    }

    #[test]
    fn mute_and_the_lowest_step_are_the_formats_silence() {
        for fmt in ALL {
            let width = sample_bytes(fmt).unwrap() as usize;
            let silence = silence_sample(fmt);
            for gain in [
                Gain {
                    volume: 80,
                    mute: true,
                },
                Gain {
                    volume: 0,
                    mute: false,
                },
            ] {
                let mut buf = noise(width * 100);
                apply(fmt, gain, &mut buf);
                for sample in buf.chunks_exact(width) {
                    assert_eq!(sample, &silence[..], "format {fmt} {gain:?}");
                }
            }
        }
    }

    #[test]
    fn minus_6_db_halves_every_format_within_a_code() {
        let gain = Gain {
            volume: 88,
            mute: false,
        };
        let factor = f64::from(gain.amplitude());
        assert!((factor - 0.501_187).abs() < 1e-6);
        // S16: each sample within rounding of x * 0.501.
        let mut buf = Vec::new();
        let values: Vec<i16> = (-32768..=32767).step_by(97).collect();
        for v in &values {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        apply(format::S16, gain, &mut buf);
        for (chunk, v) in buf.chunks_exact(2).zip(&values) {
            let got = i16::from_le_bytes([chunk[0], chunk[1]]);
            assert!(
                (f64::from(got) - f64::from(*v) * factor).abs() <= 0.5,
                "{v} -> {got}"
            );
        }
        // U8 around its centre, S24 in 4 bytes sign-extended, S24_3, U32, FLOAT.
        let mut u8s = [0x80u8 + 100, 0x80 - 100, 0x80];
        apply(format::U8, gain, &mut u8s);
        assert_eq!(u8s, [0x80 + 50, 0x80 - 50, 0x80]);
        let mut s24 = (-4_000_000i32).to_le_bytes();
        apply(format::S24, gain, &mut s24);
        assert_eq!(
            i32::from_le_bytes(s24),
            (-4_000_000f64 * factor).round() as i32
        );
        let mut s24_3 = [0x00, 0x00, 0x80]; // the most negative 24-bit value
        apply(format::S24_3, gain, &mut s24_3);
        let back = i32::from_le_bytes([s24_3[0], s24_3[1], s24_3[2], 0]) << 8 >> 8;
        assert_eq!(back, (-8_388_608f64 * factor).round() as i32);
        let mut u32s = u32::MAX.to_le_bytes();
        apply(format::U32, gain, &mut u32s);
        let centred = i64::from(u32::from_le_bytes(u32s)) - (1 << 31);
        assert!((centred as f64 - ((1i64 << 31) - 1) as f64 * factor).abs() <= 0.5);
        let mut float = 0.8f32.to_le_bytes();
        apply(format::FLOAT, gain, &mut float);
        assert!((f32::from_le_bytes(float) - 0.8 * factor as f32).abs() < 1e-6);
        // G.711: a loud code comes back about 6 dB down.
        let mut ulaw = [ulaw_encode(16000)];
        apply(format::MU_LAW, gain, &mut ulaw);
        let decoded = f64::from(ulaw_decode(ulaw[0]));
        assert!((decoded / 16000.0 - factor).abs() < 0.05, "{decoded}");
        let mut alaw = [alaw_encode(-16000)];
        apply(format::A_LAW, gain, &mut alaw);
        let decoded = f64::from(alaw_decode(alaw[0]));
        assert!((decoded / -16000.0 - factor).abs() < 0.05, "{decoded}");
    }

    #[test]
    fn g711_round_trips_its_codes() {
        for code in 0..=255u8 {
            assert_eq!(
                ulaw_encode(i64::from(ulaw_decode(code))),
                code | if code == 0x7f { 0x80 } else { 0 },
                "mu {code:#x}"
            );
            assert_eq!(
                alaw_encode(i64::from(alaw_decode(code))),
                code,
                "a {code:#x}"
            );
        }
        // The silence codes decode to (almost) nothing.
        assert!(ulaw_decode(0xff).abs() <= 8);
        assert!(alaw_decode(0xd5).abs() <= 8);
    }
}
