//! The ALSA backend: a named PCM per stream, hw params from the guest's params, non-blocking.
//!
//! The broker wakes it four times a period (a timerfd); how many frames move is what the device
//! says it has room for or has captured (`snd_pcm_avail`), so the device's clock paces the
//! stream. The device buffer is kept to two periods, so a buffer completed to the guest is at
//! most two periods (plus the PCM's own latency) ahead of what is heard; that delay, as the PCM
//! reports it, is published as the backend delay.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use alsa::pcm::{Access, Format, HwParams, PCM};
use alsa::{Direction, ValueOr};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

use super::{
    gain, Backend, BackendError, BackendStream, RingPort, StreamRing, StreamSpec, Wake, XrunEdge,
};
use virtio_snd::control::PcmCaps;
use virtio_snd::protocol::{format, D_OUTPUT};
use vsound_shared::ring::RingError;

/// Periods in the device buffer.
const DEVICE_PERIODS: i64 = 2;

fn alsa_format(fmt: u8) -> Option<Format> {
    Some(match fmt {
        format::MU_LAW => Format::MuLaw,
        format::A_LAW => Format::ALaw,
        format::S8 => Format::S8,
        format::U8 => Format::U8,
        format::S16 => Format::S16LE,
        format::U16 => Format::U16LE,
        format::S24_3 => Format::S243LE,
        format::U24_3 => Format::U243LE,
        format::S24 => Format::S24LE,
        format::U24 => Format::U24LE,
        format::S32 => Format::S32LE,
        format::U32 => Format::U32LE,
        format::FLOAT => Format::FloatLE,
        format::FLOAT64 => Format::Float64LE,
        _ => return None,
    })
}

/// What ALSA reads once the broker is confined (configuration; devices are read-write).
pub fn sandbox_read_paths() -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = ["/usr/share/alsa", "/etc/alsa", "/etc/asound.conf"]
        .map(PathBuf::from)
        .to_vec();
    if let Some(path) = std::env::var_os("ALSA_CONFIG_PATH") {
        paths.push(path.into());
    }
    if let Some(home) = std::env::var_os("HOME") {
        paths.push(PathBuf::from(home).join(".asoundrc"));
    }
    for lib in [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib64",
    ] {
        paths.push(lib.into());
    }
    paths.push("/etc/ld.so.cache".into());
    // A desktop's default PCM routes through the PipeWire plugin, which reads PipeWire's config.
    paths.extend(super::pipewire::sandbox_read_paths());
    paths.retain(|p| p.exists());
    paths.sort();
    paths.dedup();
    paths
}

/// Sound devices the broker may open.
pub fn sandbox_device_paths() -> Vec<PathBuf> {
    let mut paths = vec![PathBuf::from("/dev/snd")];
    paths.retain(|p| p.exists());
    paths
}

/// Whether an ALSA PCM of this name opens for playback.
pub fn probe(device: &str) -> bool {
    PCM::new(device, Direction::Playback, true).is_ok()
}

pub struct AlsaBackend {
    pub device: String,
    /// Whether the device opened (or was only busy) at start-up and at the last open: the
    /// host end of its streams, for the jacks that follow them.
    present: AtomicBool,
    /// What the device's hw params allow, probed once at start-up (a busy or absent device
    /// leaves the config's offer, narrowed to the formats ALSA has, and fails at open).
    limits: Option<DeviceLimits>,
}

/// The formats, rates and channel counts a device's hw params allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DeviceLimits {
    formats: u64,
    rates: u64,
    channels_min: u8,
    channels_max: u8,
}

impl AlsaBackend {
    /// A backend for `device`, its limits probed for `direction` (VIRTIO_SND_D_*).
    pub fn new(device: String, direction: u8) -> AlsaBackend {
        let limits = probe_limits(&device, direction);
        match &limits {
            Some(l) => log::info!(
                "alsa: {device} takes {} channels, formats {:#x}, rates {:#x} (virtio masks)",
                if l.channels_min == l.channels_max {
                    l.channels_min.to_string()
                } else {
                    format!("{}-{}", l.channels_min, l.channels_max)
                },
                l.formats,
                l.rates
            ),
            None => log::info!("alsa: {device} cannot be probed now; offering the config's"),
        }
        let present = AtomicBool::new(
            limits.is_some()
                || open_status(PCM::new(&device, alsa_direction(direction), true).map(drop)),
        );
        AlsaBackend {
            device,
            limits,
            present,
        }
    }
}

fn alsa_direction(direction: u8) -> Direction {
    if direction == D_OUTPUT {
        Direction::Playback
    } else {
        Direction::Capture
    }
}

/// Whether an open's outcome says the device is there: opened, or busy with another client.
fn open_status(outcome: alsa::Result<()>) -> bool {
    match outcome {
        Ok(()) => true,
        Err(e) => {
            e.errno() == nix::errno::Errno::EBUSY as i32
                || e.errno() == nix::errno::Errno::EAGAIN as i32
        }
    }
}

/// Opens `device` non-blocking and reads what its hw params allow, in virtio terms.
fn probe_limits(device: &str, direction: u8) -> Option<DeviceLimits> {
    let pcm = PCM::new(device, alsa_direction(direction), true).ok()?;
    let hw = HwParams::any(&pcm).ok()?;
    let formats = (0..=format::MAX)
        .filter(|&f| alsa_format(f).is_some_and(|af| hw.test_format(af).is_ok()))
        .fold(0u64, |m, f| m | (1 << f));
    let rates = (0..=virtio_snd::protocol::rate::MAX)
        .filter(|&r| virtio_snd::protocol::rate_hz(r).is_some_and(|hz| hw.test_rate(hz).is_ok()))
        .fold(0u64, |m, r| m | (1 << r));
    let clamp = |n: u32| n.clamp(1, u32::from(u8::MAX)) as u8;
    Some(DeviceLimits {
        formats,
        rates,
        channels_min: clamp(hw.get_channels_min().ok()?),
        channels_max: clamp(hw.get_channels_max().ok()?),
    })
}

impl Backend for AlsaBackend {
    fn name(&self) -> &'static str {
        "alsa"
    }

    fn caps(&self, offered: &PcmCaps) -> PcmCaps {
        let caps = super::caps_with_formats(offered, |f| alsa_format(f).is_some());
        let Some(limits) = self.limits else {
            return caps;
        };
        let narrowed = PcmCaps {
            formats: caps.formats & limits.formats,
            rates: caps.rates & limits.rates,
            channels_min: caps.channels_min.max(limits.channels_min),
            channels_max: caps.channels_max.min(limits.channels_max),
            ..caps
        };
        if narrowed.channels_min > narrowed.channels_max {
            // Nothing the config allows fits the device.
            return PcmCaps {
                formats: 0,
                rates: 0,
                ..caps
            };
        }
        narrowed
    }

    fn host_present(&self, _direction: u8) -> bool {
        self.present.load(Ordering::Acquire)
    }

    fn open(
        &self,
        spec: &StreamSpec,
        port: RingPort,
    ) -> Result<Box<dyn BackendStream>, BackendError> {
        let params = &spec.params;
        let direction = alsa_direction(spec.direction);
        let alsa_err = |what: &str, e: alsa::Error| {
            BackendError::Io(io::Error::other(format!(
                "alsa {}: {what}: {e}",
                self.device
            )))
        };
        let opened = PCM::new(&self.device, direction, true);
        self.present.store(
            open_status(opened.as_ref().map(|_| ()).map_err(|e| *e)),
            Ordering::Release,
        );
        let pcm = opened.map_err(|e| {
            alsa_err(
                "open (the stream's alsa_device; `aplay -L` lists this host's PCMs)",
                e,
            )
        })?;
        let period = i64::from(params.period_frames());
        {
            let hw = HwParams::any(&pcm).map_err(|e| alsa_err("hw params", e))?;
            hw.set_access(Access::RWInterleaved)
                .map_err(|e| alsa_err("access", e))?;
            let fmt = alsa_format(params.format).ok_or_else(|| {
                BackendError::Unsupported(format!(
                    "format {}",
                    vsound_config::format_name(params.format)
                ))
            })?;
            hw.set_format(fmt).map_err(|e| alsa_err("format", e))?;
            hw.set_channels(u32::from(params.channels))
                .map_err(|e| alsa_err("channels", e))?;
            hw.set_rate(params.rate_hz(), ValueOr::Nearest)
                .map_err(|e| alsa_err("rate", e))?;
            hw.set_period_size_near(period, ValueOr::Nearest)
                .map_err(|e| alsa_err("period", e))?;
            hw.set_buffer_size_near(period * DEVICE_PERIODS)
                .map_err(|e| alsa_err("buffer", e))?;
            pcm.hw_params(&hw)
                .map_err(|e| alsa_err("apply hw params", e))?;
        }
        {
            let sw = pcm
                .sw_params_current()
                .map_err(|e| alsa_err("sw params", e))?;
            sw.set_start_threshold(period)
                .map_err(|e| alsa_err("start threshold", e))?;
            sw.set_avail_min(period)
                .map_err(|e| alsa_err("avail min", e))?;
            pcm.sw_params(&sw)
                .map_err(|e| alsa_err("apply sw params", e))?;
        }
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let frame_bytes = params.frame_bytes() as usize;
        let period_ns =
            u64::from(params.period_frames()) * 1_000_000_000 / u64::from(params.rate_hz());
        log::info!(
            "alsa: {} opened for {:?}: period {} frames",
            self.device,
            direction,
            period
        );
        Ok(Box::new(AlsaStream {
            pcm,
            port,
            timer,
            frame_bytes,
            format: spec.params.format,
            // A quarter period: the device's avail, not the timer, decides what moves.
            interval: Duration::from_nanos((period_ns / 4).max(1_000_000)),
            running: false,
            xrun: XrunEdge::default(),
            scratch: vec![0; (period * DEVICE_PERIODS) as usize * frame_bytes],
        }))
    }
}

struct AlsaStream {
    pcm: PCM,
    port: RingPort,
    timer: TimerFd,
    frame_bytes: usize,
    /// The virtio format of the samples, for the gain.
    format: u8,
    interval: Duration,
    running: bool,
    xrun: XrunEdge,
    scratch: Vec<u8>,
}

impl AlsaStream {
    /// Moves what the device has room for (playback) or has captured; returns whether the ring
    /// ran short (underrun) or full (overrun).
    fn transfer(&mut self) -> Result<bool, RingError> {
        let avail = match self.pcm.avail_update() {
            Ok(frames) => frames.max(0) as usize,
            Err(e) => {
                log::debug!("alsa: xrun ({e}); recovering");
                let _ = self.pcm.try_recover(e, true);
                if self.port_is_capture() {
                    let _ = self.pcm.start();
                }
                return Ok(true);
            }
        };
        let bytes = (avail * self.frame_bytes).min(self.scratch.len());
        let bytes = bytes / self.frame_bytes * self.frame_bytes;
        let mut short = false;
        match &mut self.port.ring {
            StreamRing::Playback(consumer) => {
                // Frames leave the ring as the device takes them: the device's bounded buffer,
                // published as the backend delay, is what separates a completion from the ear.
                let have = consumer.available()? as usize / self.frame_bytes * self.frame_bytes;
                let n = have.min(bytes);
                let got = consumer.pop(&mut self.scratch[..n])?;
                gain::apply(self.format, self.port.gain.load(), &mut self.scratch[..got]);
                if got > 0 {
                    match self.pcm.io_bytes().writei(&self.scratch[..got]) {
                        Ok(frames) if frames * self.frame_bytes < got => {
                            log::debug!("alsa: short write, {frames} frames taken");
                            short = true;
                        }
                        Ok(_) => {}
                        Err(e) => {
                            log::debug!("alsa: write failed ({e}); recovering");
                            let _ = self.pcm.try_recover(e, true);
                            short = true;
                        }
                    }
                }
                // The device wanted more than the guest had queued.
                short |= n < bytes && avail > 0;
            }
            StreamRing::Capture(producer) => {
                if bytes > 0 {
                    match self.pcm.io_bytes().readi(&mut self.scratch[..bytes]) {
                        Ok(frames) => {
                            let got = frames * self.frame_bytes;
                            let free =
                                producer.free()? as usize / self.frame_bytes * self.frame_bytes;
                            let keep = got.min(free);
                            let gain = self.port.gain.load();
                            gain::apply(self.format, gain, &mut self.scratch[..keep]);
                            producer.push(&self.scratch[..keep])?;
                            short = keep < got;
                        }
                        Err(e) => {
                            let _ = self.pcm.try_recover(e, true);
                            let _ = self.pcm.start();
                        }
                    }
                }
            }
        }
        if let Ok(delay) = self.pcm.delay() {
            self.port
                .ring
                .shared()
                .set_backend_delay(delay.max(0) as u64);
        }
        Ok(short)
    }

    fn port_is_capture(&self) -> bool {
        matches!(self.port.ring, StreamRing::Capture(_))
    }
}

impl BackendStream for AlsaStream {
    fn start(&mut self) -> io::Result<()> {
        self.pcm.prepare().map_err(io::Error::other)?;
        if self.port_is_capture() {
            self.pcm.start().map_err(io::Error::other)?;
        }
        self.timer.set(
            Expiration::Interval(TimeSpec::from_duration(self.interval)),
            TimerSetTimeFlags::empty(),
        )?;
        self.running = true;
        self.xrun = XrunEdge::default();
        Ok(())
    }

    fn stop(&mut self) -> io::Result<()> {
        self.running = false;
        self.timer.unset()?;
        self.pcm.drop().map_err(io::Error::other)
    }

    fn wake_fd(&self) -> BorrowedFd<'_> {
        self.timer.as_fd()
    }

    fn timer_driven(&self) -> bool {
        true
    }

    fn on_wake(&mut self) -> Result<Wake, RingError> {
        super::clocked::drain_timer(&self.timer);
        if !self.running {
            return Ok(Wake::default());
        }
        let short = self.transfer()?;
        let xrun = self.xrun.update(short);
        self.port.moved();
        Ok(Wake { xrun, gain: None })
    }
}
