//! The `gstreamer` backend: one GStreamer pipeline per virtio stream, built from the stream's
//! `gst_pipeline` description (gst-launch syntax, host configuration only; the guest never
//! reaches the parser, its PCM reaches the pipeline only as raw audio of the caps the broker
//! set from its PcmParams):
//!
//! - playback: `appsrc ! audioconvert ! audioresample ! DESCRIPTION`
//! - capture: `DESCRIPTION ! audioconvert ! audioresample ! appsink`
//!
//! audioconvert and audioresample are always there but pass the guest's format, rate and
//! channels through untouched (`GstBaseTransform` prefers passthrough) whenever the
//! description accepts them, as PipeWire does; they convert only what it does not.
//!
//! Pacing is the pipeline's clock (the audio sink's or source's device clock where one provides
//! it, else the system clock). Each stream has a pacer thread of its own that wakes a few times
//! a period and reads the pipeline's running time:
//!
//! - playback pushes into the appsrc what the running time says is due, plus a lead of two
//!   ticks ([`Timing::lead_frames`]), each buffer timestamped with its place on the stream's
//!   timeline: the ring's consumer (what the guest counts as played) runs ahead of the clock
//!   by that lead only, whatever the sink (a syncing audio sink, or `filesink` that writes what
//!   it gets); a ring that runs short leaves a gap in the timestamps (no silence is
//!   inserted, so file sinks get exactly the guest's bytes; audio sinks fill gaps themselves).
//!   The delay published for `latency_bytes` is what was pushed and not yet played: the frames
//!   ahead of the running time plus the pipeline's configured latency (its LATENCY query: the
//!   sink's buffer).
//! - capture pulls the appsink's buffers and hands the ring no more than the running time
//!   says has been captured, so a file source (`filesrc ! wavparse`) is captured at the
//!   real-time pace and a live source at its own.
//!
//! A pipeline that fails (an error on its bus, a state change refused) or whose clock stops
//! (no running time progress for as long as the guest waits for a completion, less a
//! margin: the PipeWire backend's `stall_limit`) never hangs the guest: the stream goes on in
//! silence at the real-time pace of the monotonic clock (playback is consumed and dropped,
//! capture gets silence), with an xrun and a rate-limited log naming the stream and the
//! GStreamer error. A clock that runs again takes over; a failed pipeline stays failed until
//! the guest prepares the stream again. A description that does not parse, names a missing
//! element, takes no raw audio, or whose elements refuse to start fails the PREPARE (IO_ERR).
//!
//! What allocates: GStreamer's own objects (samples, events, messages). Playback buffers come
//! from a `GstBufferPool` of period-sized buffers that the pipeline hands back when it is done
//! with them, so a steady stream reuses the same memory; the pacer's own scratch is allocated
//! once. The pacer takes no lock of ours; GStreamer's are held briefly by its threads.
//!
//! GStreamer is initialised once, in the broker, before the sandbox ([`init_before_sandbox`]):
//! the plugin registry is loaded (and rebuilt if stale, which may run `gst-plugin-scanner`)
//! while execve and the cache directory are still allowed, and every configured description is
//! parsed once, so that its plugins are loaded, its mistakes logged at start-up, and the files
//! its elements name (`location`) given to Landlock. The worker never links GStreamer.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gst::prelude::*;
use gstreamer as gst;
use gstreamer_app as gst_app;
use gstreamer_audio as gst_audio;
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use rustix::event::{eventfd, EventfdFlags};

use super::{
    gain, Backend, BackendError, BackendStream, RingPort, StreamRing, StreamSpec, Wake, XrunEdge,
};
use gst_audio::AudioChannelPosition as Position;
use virtio_snd::control::{PcmCaps, PcmParams};
use virtio_snd::protocol::{chmap, format, D_OUTPUT};
use vsound_config::{BackendKind, Config};
use vsound_shared::ratelimit::LogLimiter;
use vsound_shared::ring::RingError;

/// The virtio format's GStreamer raw audio format, for those GStreamer carries.
fn gst_format(fmt: u8) -> Option<gst_audio::AudioFormat> {
    use gst_audio::AudioFormat as F;
    Some(match fmt {
        format::S8 => F::S8,
        format::U8 => F::U8,
        format::S16 => F::S16le,
        format::U16 => F::U16le,
        format::S18_3 => F::S18le,
        format::U18_3 => F::U18le,
        format::S20_3 => F::S20le,
        format::U20_3 => F::U20le,
        format::S24_3 => F::S24le,
        format::U24_3 => F::U24le,
        format::S24 => F::S2432le,
        format::U24 => F::U2432le,
        format::S32 => F::S32le,
        format::U32 => F::U32le,
        format::FLOAT => F::F32le,
        format::FLOAT64 => F::F64le,
        _ => return None,
    })
}

/// The GStreamer channel position of a virtio one (`None` for those GStreamer has no name
/// for: a layout with one of them is sent unpositioned).
fn gst_position(position: u8) -> Option<Position> {
    Some(match position {
        chmap::MONO => Position::Mono,
        chmap::FL => Position::FrontLeft,
        chmap::FR => Position::FrontRight,
        chmap::RL => Position::RearLeft,
        chmap::RR => Position::RearRight,
        chmap::FC => Position::FrontCenter,
        chmap::LFE => Position::Lfe1,
        chmap::SL => Position::SideLeft,
        chmap::SR => Position::SideRight,
        chmap::RC => Position::RearCenter,
        chmap::FLC => Position::FrontLeftOfCenter,
        chmap::FRC => Position::FrontRightOfCenter,
        chmap::FLW => Position::WideLeft,
        chmap::FRW => Position::WideRight,
        chmap::FLH | chmap::TFL => Position::TopFrontLeft,
        chmap::FCH | chmap::TFC => Position::TopFrontCenter,
        chmap::FRH | chmap::TFR => Position::TopFrontRight,
        chmap::TC => Position::TopCenter,
        chmap::TRL => Position::TopRearLeft,
        chmap::TRR => Position::TopRearRight,
        chmap::TRC => Position::TopRearCenter,
        chmap::TSL => Position::TopSideLeft,
        chmap::TSR => Position::TopSideRight,
        chmap::LLFE => Position::Lfe1,
        chmap::RLFE => Position::Lfe2,
        chmap::BC => Position::BottomFrontCenter,
        chmap::BLC => Position::BottomFrontLeft,
        chmap::BRC => Position::BottomFrontRight,
        _ => return None,
    })
}

/// How a stream's channels are described to GStreamer: its caps carry a channel mask, which
/// implies GStreamer's canonical order, so a guest layout in another order (ALSA's 5.1 is
/// FL FR RL RR FC LFE, GStreamer's FL FR FC LFE RL RR) is reordered on the way.
#[derive(Debug, Clone, PartialEq)]
struct Channels {
    /// Positions in GStreamer's order, for the caps (`None`: unpositioned).
    canonical: Option<Vec<Position>>,
    /// The guest's order, when it differs from `canonical`.
    guest_order: Option<Vec<Position>>,
}

impl Channels {
    /// For each channel of GStreamer's order, the guest's channel it is (`None`: the same
    /// order).
    fn guest_to_gstreamer(&self) -> Option<Vec<usize>> {
        let (canonical, guest) = (self.canonical.as_ref()?, self.guest_order.as_ref()?);
        canonical
            .iter()
            .map(|p| guest.iter().position(|g| g == p))
            .collect()
    }

    /// For each channel of the guest's order, GStreamer's channel it is.
    fn gstreamer_to_guest(&self) -> Option<Vec<usize>> {
        let (canonical, guest) = (self.canonical.as_ref()?, self.guest_order.as_ref()?);
        guest
            .iter()
            .map(|p| canonical.iter().position(|c| c == p))
            .collect()
    }
}

/// Reorders the interleaved frames of `data` in place: channel `i` of each frame becomes its
/// channel `source[i]` (no allocation: a frame is at most 18 channels of 8 bytes). GStreamer's
/// own `gst_audio_reorder_channels` is not used: its Rust binding checks the length against the
/// sample width in bits, not bytes, and refuses most buffer sizes.
fn reorder_frames(data: &mut [u8], sample_bytes: usize, source: &[usize]) {
    const MAX_FRAME: usize = 18 * 8;
    let frame_bytes = sample_bytes * source.len();
    if frame_bytes == 0 || frame_bytes > MAX_FRAME {
        return;
    }
    let mut frame = [0u8; MAX_FRAME];
    for chunk in data.chunks_exact_mut(frame_bytes) {
        frame[..frame_bytes].copy_from_slice(chunk);
        for (i, &from) in source.iter().enumerate() {
            let (to, from) = (i * sample_bytes, from * sample_bytes);
            chunk[to..to + sample_bytes].copy_from_slice(&frame[from..from + sample_bytes]);
        }
    }
}

fn channels_for(count: u8, layouts: &[Vec<u8>]) -> Channels {
    let unpositioned = Channels {
        canonical: None,
        guest_order: None,
    };
    let standard: &[u8] = match count {
        1 => &[chmap::MONO],
        2 => &[chmap::FL, chmap::FR],
        _ => &[],
    };
    let layout = layouts
        .iter()
        .find(|l| l.len() == usize::from(count))
        .map(Vec::as_slice)
        .unwrap_or(standard);
    if layout.is_empty() {
        return unpositioned;
    }
    let Some(guest) = layout
        .iter()
        .map(|&p| gst_position(p))
        .collect::<Option<Vec<Position>>>()
    else {
        return unpositioned;
    };
    if !Position::check_valid_channel_positions(&guest, false) {
        return unpositioned;
    }
    let mut canonical = guest.clone();
    if Position::positions_to_valid_order(&mut canonical).is_err() {
        return unpositioned;
    }
    Channels {
        guest_order: (canonical != guest).then_some(guest),
        canonical: Some(canonical),
    }
}

/// The raw audio caps of a stream's PcmParams.
fn caps_for(params: &PcmParams, channels: &Channels) -> Result<gst::Caps, String> {
    let fmt = gst_format(params.format)
        .ok_or_else(|| format!("format {} has no GStreamer equivalent", params.format))?;
    let builder = gst_audio::AudioInfo::builder(fmt, params.rate_hz(), u32::from(params.channels));
    let info = match &channels.canonical {
        Some(positions) => builder.positions(positions).build(),
        None => builder
            .flags(gst_audio::AudioFlags::UNPOSITIONED)
            .positions(&vec![Position::None; usize::from(params.channels)])
            .build(),
    }
    .map_err(|e| format!("caps for {params:?}: {e}"))?;
    info.to_caps().map_err(|e| format!("caps: {e}"))
}

/// Timing of a stream's pacer, from its params.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Timing {
    /// How often the pacer wakes: half a period, within 2 and 10 ms.
    tick: Duration,
    /// How far ahead of the running time playback is pushed: two ticks, so that the next
    /// tick's frames are in the pipeline before a syncing sink needs them (and an audio sink
    /// whose clock waits for its first samples gets them).
    lead_frames: u64,
    /// Frames of one buffer pushed or captured at most.
    chunk_frames: u64,
}

impl Timing {
    fn of(params: &PcmParams) -> Timing {
        let rate = u64::from(params.rate_hz().max(1));
        let period_ns = u64::from(params.period_frames()) * 1_000_000_000 / rate;
        let tick = Duration::from_nanos(period_ns / 2)
            .clamp(Duration::from_millis(2), Duration::from_millis(10));
        Timing {
            tick,
            lead_frames: frames_in(2 * tick, rate),
            chunk_frames: u64::from(params.period_frames().max(1)),
        }
    }
}

fn frames_in(d: Duration, rate: u64) -> u64 {
    u64::try_from(d.as_nanos() * u128::from(rate) / 1_000_000_000).unwrap_or(u64::MAX)
}

/// After a STOP, how long a playback pipeline keeps playing (what it holds reaches the sink)
/// before it pauses: its latency, the lead, and this.
const TAIL_MIN: Duration = Duration::from_millis(50);
/// At RELEASE, how long a playback pipeline may take to play out and finish (EOS: `wavenc`
/// rewrites its header) before it is stopped anyway.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long PREPARE waits for a capture pipeline to preroll (a file source's header parsed),
/// within the broker's open deadline.
const PREROLL_WAIT: Duration = Duration::from_millis(250);
/// The appsink's queue: enough for a pacer tick's worth of any source's buffers; a full
/// queue holds a non-live source back.
const APPSINK_BUFFERS: u32 = 8;

/// Pipelines whose pacer threads are running (closing ones included), for the broker's exit.
static PIPELINES: AtomicUsize = AtomicUsize::new(0);

/// Waits (at most `timeout`) until every pipeline closed: the broker's exit lets released
/// playback finish (a `wavenc` header is written at its end of stream).
pub fn wait_for_pipelines(timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while PIPELINES.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let left = PIPELINES.load(Ordering::Acquire);
    if left > 0 {
        log::warn!("gstreamer: {left} pipelines still closing at exit");
    }
}

/// What a GStreamer client reads once the broker is confined: plugins (dlopen'ed as a
/// pipeline needs them, with their libraries) and what the audio elements read (ALSA's,
/// PipeWire's and PulseAudio's configuration for `autoaudiosink`'s choice).
pub fn sandbox_read_paths() -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = Vec::new();
    for var in [
        "GST_PLUGIN_PATH",
        "GST_PLUGIN_PATH_1_0",
        "GST_PLUGIN_SYSTEM_PATH",
        "GST_PLUGIN_SYSTEM_PATH_1_0",
    ] {
        if let Some(list) = std::env::var_os(var) {
            paths.extend(std::env::split_paths(&list));
        }
    }
    paths.extend(
        ["/usr/share/gstreamer-1.0", "/etc/pulse"]
            .into_iter()
            .map(PathBuf::from),
    );
    // The plugins' own directory is beneath these, and ALSA's and PipeWire's paths.
    paths.extend(super::alsa::sandbox_read_paths());
    paths.retain(|p| p.exists());
    paths.sort();
    paths.dedup();
    paths
}

/// What the pre-sandbox start-up found: the files the descriptions' elements name.
#[derive(Debug, Default)]
pub struct Prepared {
    /// Directories of the files source elements read (`filesrc location=`).
    pub read: Vec<PathBuf>,
    /// Directories of the files the other elements write (`filesink location=`).
    pub write: Vec<PathBuf>,
}

/// Initialises GStreamer (once, before the sandbox; see the module's doc) if any stream of
/// any layout uses it, and parses every description once. A description that does not parse
/// is logged here and fails its stream's PREPARE; the broker starts anyway.
pub fn init_before_sandbox(config: &Config) -> Result<Prepared, String> {
    let mut prepared = Prepared::default();
    let streams: Vec<_> = config
        .all_streams()
        .filter(|s| s.backend == BackendKind::Gstreamer)
        .collect();
    if streams.is_empty() {
        return Ok(prepared);
    }
    let threads_before = thread_count();
    // ORC compiles audioconvert's and volume's kernels at run time into a file it maps
    // executable, or else into anonymous executable memory: the first is outside the broker's
    // Landlock rules, the second is what its seccomp policy kills. Its portable C fallbacks
    // need neither.
    std::env::set_var("ORC_CODE", "backup");
    gst::init().map_err(|e| format!("cannot initialise GStreamer: {e}"))?;
    log::info!("gstreamer: {} initialised", gst::version_string());
    for stream in streams {
        let description = stream.gst_pipeline_or_default();
        match gst::parse::bin_from_description(description, true) {
            Ok(bin) => {
                for element in bin.iterate_recurse().into_iter().flatten() {
                    let Some(dir) = location_dir(&element) else {
                        continue;
                    };
                    let source = element
                        .factory()
                        .and_then(|f| f.metadata(gst::ELEMENT_METADATA_KLASS).map(String::from))
                        .is_some_and(|klass| klass.contains("Source"));
                    if source {
                        prepared.read.push(dir);
                    } else {
                        prepared.write.push(dir);
                    }
                }
            }
            Err(e) => log::error!(
                "gstreamer: stream {}: gst_pipeline {description:?} does not parse ({e}): its \
                 PREPARE will fail",
                stream.name
            ),
        }
    }
    // Seccomp and Landlock confine the threads created after them: a thread GStreamer had
    // started already would run unconfined and spawn unconfined threads.
    let threads_after = thread_count();
    if threads_after > threads_before {
        return Err(format!(
            "GStreamer started {} threads before the sandbox",
            threads_after - threads_before
        ));
    }
    prepared.read.sort();
    prepared.read.dedup();
    prepared.write.sort();
    prepared.write.dedup();
    Ok(prepared)
}

/// What the broker's Landlock rules grant for an element's `location` file, if it names one:
/// its directory (a sink may create the file), or the file alone where the directory is one a
/// rule must never cover (`/`, `/dev`, `/proc`, `/sys`: `location=/dev/null` grants no other
/// device; `/dev/shm` is no device directory). A relative location is refused: it would be relative to whatever the working
/// directory is (`/` under systemd), so it gets no rule and its element cannot open it.
fn location_dir(element: &gst::Element) -> Option<PathBuf> {
    let property = element.find_property("location")?;
    if property.value_type() != String::static_type() {
        return None;
    }
    let location: Option<String> = element.property("location");
    let path = PathBuf::from(location?);
    if !path.is_absolute() {
        log::error!(
            "gstreamer: element {}: location {} is not an absolute path: the broker grants it no \
             access",
            element.name(),
            path.display()
        );
        return None;
    }
    let dir = path.parent()?;
    // Path::starts_with compares whole components; /dev/shm is shared memory, not devices.
    let never_whole = dir == std::path::Path::new("/")
        || (["/dev", "/proc", "/sys"]
            .iter()
            .any(|top| dir.starts_with(top))
            && !dir.starts_with("/dev/shm"));
    Some(if never_whole {
        path.clone()
    } else {
        dir.to_path_buf()
    })
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

/// The backend for one configured stream.
pub struct GstreamerBackend {
    pub description: String,
    pub stream_name: String,
    /// The channel positions of each of the stream's channel maps (one per channel count).
    pub layouts: Vec<Vec<u8>>,
}

impl Backend for GstreamerBackend {
    fn name(&self) -> &'static str {
        "gstreamer"
    }

    fn caps(&self, offered: &PcmCaps) -> PcmCaps {
        super::caps_with_formats(offered, |f| gst_format(f).is_some())
    }

    fn open(
        &self,
        spec: &StreamSpec,
        port: RingPort,
    ) -> Result<Box<dyn BackendStream>, BackendError> {
        let failed = |e: String| {
            BackendError::Io(io::Error::other(format!(
                "gstreamer stream {}: {e}",
                self.stream_name
            )))
        };
        if !gst::INITIALIZED.load(Ordering::Acquire) {
            // Initialising here would be after the sandbox (a registry rescan would fork).
            return Err(failed("GStreamer was not initialised at start-up".into()));
        }
        let label = format!("vm {} stream {}", spec.vm, self.stream_name);
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let built = Built::new(&self.description, spec, &self.layouts, &label).map_err(failed)?;
        built.prepare().map_err(|e| {
            let _ = built.pipeline.set_state(gst::State::Null);
            failed(e)
        })?;
        let wake =
            eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).map_err(io::Error::from)?;
        let kick =
            eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).map_err(io::Error::from)?;
        let shared = Arc::new(Shared {
            running: AtomicBool::new(false),
            starts: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            xruns: AtomicU64::new(0),
            violation: AtomicBool::new(false),
            wake,
            kick,
        });
        // From here on the pacer owns the pipeline: its drop stops it, wherever it happens.
        let pacer = Pacer::new(built, port, shared.clone(), spec, label, timer);
        PIPELINES.fetch_add(1, Ordering::AcqRel);
        let spawned = std::thread::Builder::new()
            .name("vsound-gst".into())
            .spawn(move || pacer.run());
        if let Err(e) = spawned {
            // The pacer (and its pipeline) went down with the closure.
            PIPELINES.fetch_sub(1, Ordering::AcqRel);
            return Err(BackendError::Io(e));
        }
        Ok(Box::new(GstreamerStream {
            shared,
            xruns_seen: 0,
        }))
    }
}

/// What the broker's handle and the pacer thread share.
struct Shared {
    /// Between the guest's START and STOP.
    running: AtomicBool,
    /// Bumped at every START.
    starts: AtomicU64,
    /// The handle was dropped (RELEASE, a new PREPARE, the worker gone): the pacer finishes the
    /// pipeline and ends.
    closing: AtomicBool,
    xruns: AtomicU64,
    violation: AtomicBool,
    /// Written by the pacer on an xrun or a violation; the broker's epoll watches it.
    wake: OwnedFd,
    /// Written by the handle on START, STOP and close; the pacer polls it with its timer.
    kick: OwnedFd,
}

fn signal(fd: &OwnedFd) {
    let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
}

/// The broker's handle on a stream.
struct GstreamerStream {
    shared: Arc<Shared>,
    xruns_seen: u64,
}

impl BackendStream for GstreamerStream {
    fn start(&mut self) -> io::Result<()> {
        if self.shared.violation.load(Ordering::Acquire) {
            return Err(io::Error::other("stream failed"));
        }
        self.shared.starts.fetch_add(1, Ordering::AcqRel);
        self.shared.running.store(true, Ordering::Release);
        signal(&self.shared.kick);
        Ok(())
    }

    fn stop(&mut self) -> io::Result<()> {
        self.shared.running.store(false, Ordering::Release);
        signal(&self.shared.kick);
        Ok(())
    }

    fn wake_fd(&self) -> BorrowedFd<'_> {
        self.shared.wake.as_fd()
    }

    fn on_wake(&mut self) -> Result<Wake, RingError> {
        let xrun = super::take_thread_report(
            &self.shared.wake,
            &self.shared.violation,
            &self.shared.xruns,
            &mut self.xruns_seen,
        )?;
        Ok(Wake { xrun, gain: None })
    }
}

impl Drop for GstreamerStream {
    fn drop(&mut self) {
        // The pacer tears the pipeline down on its own thread: a state change to NULL joins
        // GStreamer's threads, and a playback pipeline first plays out to its end of stream.
        self.shared.running.store(false, Ordering::Release);
        self.shared.closing.store(true, Ordering::Release);
        signal(&self.shared.kick);
    }
}

/// The element at the broker's end of the pipeline.
enum Io {
    Playback {
        appsrc: gst_app::AppSrc,
        pool: gst::BufferPool,
    },
    Capture {
        appsink: gst_app::AppSink,
    },
}

/// A stream's pipeline, built and linked.
struct Built {
    pipeline: gst::Pipeline,
    io: Io,
    channels: Channels,
}

impl Built {
    fn new(
        description: &str,
        spec: &StreamSpec,
        layouts: &[Vec<u8>],
        label: &str,
    ) -> Result<Built, String> {
        let params = &spec.params;
        let channels = channels_for(params.channels, layouts);
        // Refuses a format GStreamer has no raw equivalent of.
        let caps = caps_for(params, &channels)?;
        let bin = gst::parse::bin_from_description(description, true)
            .map_err(|e| format!("gst_pipeline {description:?}: {e}"))?;
        let pipeline = gst::Pipeline::with_name(&format!("vsound {label}"));
        let make = |factory: &str| {
            gst::ElementFactory::make(factory)
                .name(format!("vsound-{factory}"))
                .build()
                .map_err(|e| {
                    format!("no {factory} element ({e}): is gstreamer1.0-plugins-base installed?")
                })
        };
        let convert = make("audioconvert")?;
        let resample = make("audioresample")?;
        let output = spec.direction == D_OUTPUT;
        let (io, ends) = if output {
            let rate = u64::from(params.rate_hz().max(1));
            let queue_frames = frames_in(Duration::from_millis(200), rate)
                .max(4 * u64::from(params.period_frames()));
            let appsrc = gst_app::AppSrc::builder()
                .name("vsound-src")
                .caps(&caps)
                .format(gst::Format::Time)
                .is_live(true)
                .do_timestamp(false)
                // The pacer pushes only what is due and never waits on the queue.
                .block(false)
                .max_bytes(queue_frames * u64::from(params.frame_bytes()))
                .stream_type(gst_app::AppStreamType::Stream)
                .build();
            let pool = gst::BufferPool::new();
            let mut config = pool.config();
            let chunk_bytes = params.period_bytes.max(params.frame_bytes());
            config.set_params(Some(&caps), chunk_bytes, 4, 0);
            pool.set_config(config)
                .map_err(|e| format!("buffer pool: {e}"))?;
            let first = appsrc.clone().upcast::<gst::Element>();
            (
                Io::Playback { appsrc, pool },
                [first, convert, resample, bin.upcast()],
            )
        } else {
            let appsink = gst_app::AppSink::builder()
                .name("vsound-sink")
                .caps(&caps)
                // The pacer releases captured frames on the pipeline's clock; a full queue
                // holds a non-live source back.
                .sync(false)
                .max_buffers(APPSINK_BUFFERS)
                .drop(false)
                .enable_last_sample(false)
                .build();
            let last = appsink.clone().upcast::<gst::Element>();
            (
                Io::Capture { appsink },
                [bin.upcast(), convert, resample, last],
            )
        };
        pipeline
            .add_many(&ends)
            .map_err(|e| format!("cannot assemble the pipeline: {e}"))?;
        gst::Element::link_many(&ends).map_err(|_| {
            if output {
                format!(
                    "gst_pipeline {description:?} has no unlinked sink pad that takes raw audio"
                )
            } else {
                format!("gst_pipeline {description:?} has no unlinked src pad that gives raw audio")
            }
        })?;
        Ok(Built {
            pipeline,
            io,
            channels,
        })
    }

    /// Brings the pipeline to PAUSED, so that whatever cannot work fails the PREPARE: its
    /// elements open their devices and files, a capture source prerolls, and playback's
    /// description must take some raw audio.
    fn prepare(&self) -> Result<(), String> {
        if let Io::Playback { pool, .. } = &self.io {
            pool.set_active(true)
                .map_err(|e| format!("buffer pool: {e}"))?;
        }
        let changed = self.pipeline.set_state(gst::State::Paused);
        if changed.is_err() {
            return Err(self.failure("the pipeline does not start"));
        }
        if changed == Ok(gst::StateChangeSuccess::Async) {
            let (result, _, _) = self
                .pipeline
                .state(gst::ClockTime::from_nseconds(PREROLL_WAIT.as_nanos() as u64));
            if result.is_err() {
                return Err(self.failure("the pipeline does not preroll"));
            }
        }
        if let Some(error) = self.bus_error() {
            return Err(error);
        }
        if matches!(self.io, Io::Playback { .. }) {
            // What the description's first element takes: audioconvert and audioresample
            // convert any raw audio, not another media type.
            let accepted = self
                .pipeline
                .by_name("vsound-audioresample")
                .and_then(|resample| resample.static_pad("src"))
                .map(|pad| pad.peer_query_caps(None));
            if let Some(accepted) = accepted {
                if !accepted.can_intersect(&gst::Caps::new_empty_simple("audio/x-raw")) {
                    return Err(format!(
                        "the pipeline takes no raw audio (it takes {accepted})"
                    ));
                }
            }
        }
        Ok(())
    }

    /// `what`, with the error GStreamer posted on the bus (if any).
    fn failure(&self, what: &str) -> String {
        match self.bus_error() {
            Some(error) => format!("{what}: {error}"),
            None => what.to_string(),
        }
    }

    /// The first error on the bus, as text.
    fn bus_error(&self) -> Option<String> {
        bus_error(&self.pipeline)
    }
}

/// The first error on a pipeline's bus, as text.
fn bus_error(pipeline: &gst::Pipeline) -> Option<String> {
    let bus = pipeline.bus()?;
    while let Some(message) = bus.pop_filtered(&[gst::MessageType::Error]) {
        if let gst::MessageView::Error(e) = message.view() {
            return Some(error_text(e));
        }
    }
    None
}

/// A GStreamer error message as a log line: the error, who posted it, and its details.
fn error_text(e: &gst::message::Error) -> String {
    let source = e
        .src()
        .map(|s| s.path_string().to_string())
        .unwrap_or_default();
    match e.debug() {
        Some(debug) => format!("{} (from {source}: {debug})", e.error()),
        None => format!("{} (from {source})", e.error()),
    }
}

/// Where a stream in silence stands: it moves the frames the monotonic clock says are due
/// since `at`.
#[derive(Debug, Clone, Copy)]
struct Silence {
    at: Instant,
    moved: u64,
}

/// The stream's pacer, on a thread of its own.
struct Pacer {
    label: String,
    pipeline: gst::Pipeline,
    io: Io,
    port: RingPort,
    shared: Arc<Shared>,
    params: PcmParams,
    rate: u64,
    frame_bytes: u64,
    sample_bytes: usize,
    /// Channel `i` of what goes to the ring or the pipeline is channel `reorder[i]` of what
    /// came (see [`Channels`]); `None`: the same order.
    reorder: Option<Vec<usize>>,
    timing: Timing,
    stall_limit: Duration,
    timer: TimerFd,
    /// The pipeline's latency (its LATENCY query), in frames.
    latency_frames: u64,
    /// Playback: the timeline position (frames) of the next buffer pushed. Capture: the
    /// frames handed to the ring since the pipeline first played.
    position: u64,
    /// Capture: frames of running time the ring has been ahead since silence stood in for a
    /// stalled source (its release limit is the running time plus this).
    capture_offset: u64,
    /// Capture: the buffer being handed to the ring, and how far.
    pending: Option<(gst::MappedBuffer<gst::buffer::Readable>, usize)>,
    /// The next buffer pushed starts a discontinuity (a gap, a resumption).
    discont: bool,
    starts_seen: u64,
    /// The pacer's view of the guest's START..STOP.
    running: bool,
    /// Playback after a STOP: when the pipeline pauses (its tail is played).
    pause_at: Option<Instant>,
    /// Since when the pipeline showed progress (running time moved, a buffer captured).
    last_progress: Instant,
    last_running_time: Option<u64>,
    silence: Option<Silence>,
    /// Why the pipeline no longer plays (then the stream stays in silence).
    failed: Option<String>,
    /// Capture: the source ended; silence follows.
    ended: bool,
    xrun: XrunEdge,
    log_limit: LogLimiter,
    /// One chunk, for capture's reordering and gain and for capture's silence.
    scratch: Vec<u8>,
    /// The pipeline's latency was queried since it last started playing.
    latency_known: bool,
}

impl Drop for Pacer {
    fn drop(&mut self) {
        // After `close` a no-op; otherwise (a pacer that never ran) its elements stop here.
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

impl Pacer {
    fn new(
        built: Built,
        port: RingPort,
        shared: Arc<Shared>,
        spec: &StreamSpec,
        label: String,
        timer: TimerFd,
    ) -> Pacer {
        let params = spec.params;
        let timing = Timing::of(&params);
        let frame_bytes = u64::from(params.frame_bytes().max(1));
        Pacer {
            label,
            pipeline: built.pipeline,
            io: built.io,
            port,
            shared,
            params,
            rate: u64::from(params.rate_hz().max(1)),
            frame_bytes,
            sample_bytes: virtio_snd::protocol::sample_bytes(params.format).unwrap_or(1) as usize,
            reorder: if spec.direction == D_OUTPUT {
                built.channels.guest_to_gstreamer()
            } else {
                built.channels.gstreamer_to_guest()
            },
            timing,
            // As long as the guest waits for a completion, less a margin (as PipeWire's).
            stall_limit: super::pipewire::stall_limit(&params),
            timer,
            latency_frames: 0,
            position: 0,
            capture_offset: 0,
            pending: None,
            discont: true,
            starts_seen: 0,
            running: false,
            pause_at: None,
            last_progress: Instant::now(),
            last_running_time: None,
            silence: None,
            failed: None,
            ended: false,
            xrun: XrunEdge::default(),
            log_limit: LogLimiter::named("gstreamer", 4, Duration::from_secs(10)),
            scratch: vec![0; (timing.chunk_frames * frame_bytes) as usize],
            latency_known: false,
        }
    }

    fn playback(&self) -> bool {
        matches!(self.io, Io::Playback { .. })
    }

    fn run(mut self) {
        loop {
            self.wait();
            if self.shared.closing.load(Ordering::Acquire) {
                break;
            }
            self.follow_commands();
            self.read_bus();
            self.tick();
            self.log_limit.report_if_due(Instant::now());
        }
        self.close();
        PIPELINES.fetch_sub(1, Ordering::AcqRel);
    }

    /// Sleeps until the next tick or a command.
    fn wait(&self) {
        use rustix::event::{poll, PollFd, PollFlags};
        let mut fds = [
            PollFd::new(&self.timer, PollFlags::IN),
            PollFd::new(&self.shared.kick, PollFlags::IN),
        ];
        let _ = poll(&mut fds, None);
        let mut counter = [0u8; 8];
        if fds[0].revents().contains(PollFlags::IN) {
            let _ = rustix::io::read(&self.timer, &mut counter);
        }
        if fds[1].revents().contains(PollFlags::IN) {
            let _ = rustix::io::read(&self.shared.kick, &mut counter);
        }
    }

    fn follow_commands(&mut self) {
        let starts = self.shared.starts.load(Ordering::Acquire);
        let running = self.shared.running.load(Ordering::Acquire);
        if starts != self.starts_seen {
            self.starts_seen = starts;
            self.running = false;
            self.on_start();
        }
        if running != self.running {
            if running {
                self.running = true;
            } else {
                self.running = false;
                self.on_stop();
            }
        }
    }

    fn on_start(&mut self) {
        self.running = true;
        self.latency_known = false;
        self.arm_ticks();
        self.pause_at = None;
        self.last_progress = Instant::now();
        self.last_running_time = None;
        self.xrun = XrunEdge::default();
        self.discont = true;
        if self.failed.is_some() {
            self.silence = Some(Silence {
                at: Instant::now(),
                moved: 0,
            });
            return;
        }
        self.silence = None;
        if self.pipeline.set_state(gst::State::Playing).is_err() {
            let error = self.bus_error().unwrap_or_default();
            self.fail(format!("the pipeline does not play: {error}"));
        }
    }

    fn on_stop(&mut self) {
        self.silence = None;
        self.port.ring.shared().set_backend_delay(0);
        if self.failed.is_some() {
            let _ = self.timer.unset();
            return;
        }
        if self.playback() {
            // What the pipeline holds still plays; then it pauses (and the running time with
            // it, so the timeline goes on where it stopped).
            let tail = Duration::from_nanos(
                (self.latency_frames + self.timing.lead_frames) * 1_000_000_000 / self.rate,
            ) + TAIL_MIN;
            self.pause_at = Some(Instant::now() + tail.min(Duration::from_secs(1)));
        } else {
            self.pause();
        }
    }

    fn pause(&mut self) {
        self.pause_at = None;
        // Nothing to do until the next START (or the close): no ticks meanwhile.
        let _ = self.timer.unset();
        if self.pipeline.set_state(gst::State::Paused).is_err() {
            let error = self.bus_error().unwrap_or_default();
            self.fail(format!("the pipeline does not pause: {error}"));
        }
    }

    /// Ticks from now on, while the stream runs and a playback tail plays.
    fn arm_ticks(&mut self) {
        let interval = TimeSpec::from_duration(self.timing.tick);
        if let Err(e) = self
            .timer
            .set(Expiration::Interval(interval), TimerSetTimeFlags::empty())
        {
            self.fail(format!("pacer timer: {e}"));
        }
    }

    fn bus_error(&self) -> Option<String> {
        bus_error(&self.pipeline)
    }

    /// The pipeline failed: the stream goes on in silence at the real-time pace.
    fn fail(&mut self, why: String) {
        if self.failed.is_some() {
            return;
        }
        if self.log_limit.admit(Instant::now()) {
            log::warn!(
                "gstreamer: {}: {why}; the stream goes on in silence at the real-time pace \
                 until the guest prepares it again",
                self.label
            );
        }
        self.failed = Some(why);
        self.port.ring.shared().set_backend_delay(0);
        if self.running {
            self.report_xrun();
            self.silence.get_or_insert(Silence {
                at: Instant::now(),
                moved: 0,
            });
        }
    }

    fn report_xrun(&self) {
        self.shared.xruns.fetch_add(1, Ordering::AcqRel);
        signal(&self.shared.wake);
    }

    fn read_bus(&mut self) {
        let Some(bus) = self.pipeline.bus() else {
            return;
        };
        while let Some(message) = bus.pop() {
            match message.view() {
                gst::MessageView::Error(e) => {
                    self.fail(format!("pipeline error: {}", error_text(e)))
                }
                gst::MessageView::Warning(w) => self.warned(w),
                gst::MessageView::Eos(_) if self.playback() => {
                    self.fail("the pipeline ended (end of stream)".into())
                }
                gst::MessageView::Eos(_) => self.source_ended(),
                gst::MessageView::Latency(_) => {
                    let _ = self.pipeline.recalculate_latency();
                    self.query_latency();
                }
                gst::MessageView::AsyncDone(_) => self.query_latency(),
                _ => {}
            }
        }
    }

    fn warned(&mut self, w: &gst::message::Warning) {
        if !self.log_limit.admit(Instant::now()) {
            return;
        }
        let source = w
            .src()
            .map(|s| s.path_string().to_string())
            .unwrap_or_default();
        log::warn!(
            "gstreamer: {}: {} (from {source}: {})",
            self.label,
            w.error(),
            w.debug().unwrap_or_default()
        );
    }

    /// Capture: the source's end of stream; silence follows at the real-time pace.
    fn source_ended(&mut self) {
        if self.ended {
            return;
        }
        log::info!(
            "gstreamer: {}: the source ended; capture goes on in silence",
            self.label
        );
        // Silence follows once what it gave before is released (`tick`).
        self.ended = true;
    }

    fn query_latency(&mut self) {
        let mut query = gst::query::Latency::new();
        if self.pipeline.query(&mut query) {
            let (live, min, _max) = query.result();
            self.latency_frames = if live {
                frames_in(Duration::from_nanos(min.nseconds()), self.rate)
            } else {
                0
            };
        }
    }

    /// The pipeline's running time in frames, while it plays. Also while its change to
    /// PLAYING is still under way: a live pipeline's sink completes it only once its first
    /// buffer arrived, and the pipeline has set its clock and base time before its elements
    /// change.
    fn running_frames(&self) -> Option<u64> {
        let playing = self.pipeline.current_state() == gst::State::Playing
            || self.pipeline.pending_state() == gst::State::Playing;
        if !playing {
            return None;
        }
        let ns = self.pipeline.current_running_time()?.nseconds();
        u64::try_from(u128::from(ns) * u128::from(self.rate) / 1_000_000_000).ok()
    }

    fn tick(&mut self) {
        let now = Instant::now();
        if let Some(at) = self.pause_at {
            if now >= at && !self.running {
                self.pause();
            }
        }
        if !self.running {
            return;
        }
        let running_frames = if self.failed.is_some() {
            None
        } else {
            self.running_frames()
        };
        let progressed = match (running_frames, self.last_running_time) {
            (Some(now_frames), Some(before)) => now_frames > before,
            (Some(_), None) => true,
            _ => false,
        };
        if running_frames.is_some() {
            self.last_running_time = running_frames;
            if !self.latency_known {
                // Configured by the time it plays (a LATENCY message updates it later).
                self.latency_known = true;
                self.query_latency();
            }
        }
        let result = if self.playback() {
            if progressed {
                self.last_progress = now;
                self.leave_silence(running_frames);
            }
            self.watch(now);
            match (self.silence, running_frames) {
                (Some(_), _) => self.silence_tick(now),
                (None, Some(frames)) => self.push_due(frames),
                (None, None) => Ok(()),
            }
        } else {
            let has_data = self.failed.is_none() && self.source_has_data();
            if self.ended && !has_data && self.silence.is_none() {
                // What the source gave before its end is in the ring: silence follows.
                self.silence = Some(Silence { at: now, moved: 0 });
            }
            let result = match (self.silence, running_frames) {
                // A source that stalled: its data, when it comes again, takes over.
                (Some(_), Some(frames)) if has_data => {
                    self.leave_silence(Some(frames));
                    self.release_captured(frames)
                }
                (Some(_), _) => self.silence_tick(now),
                (None, Some(frames)) => self.release_captured(frames),
                (None, None) => Ok(()),
            };
            self.watch(now);
            result
        };
        match result {
            Ok(()) => self.port.moved(),
            Err(e) => self.violated(e),
        }
    }

    /// Puts a running stream whose pipeline showed no progress for the stall limit into
    /// silence.
    fn watch(&mut self, now: Instant) {
        if self.silence.is_some() || self.failed.is_some() {
            return;
        }
        let stalled = now.saturating_duration_since(self.last_progress);
        if stalled < self.stall_limit {
            return;
        }
        if self.log_limit.admit(now) {
            let state = self.pipeline.current_state();
            log::warn!(
                "gstreamer: {}: no progress for {:.0} ms (pipeline {state:?}, its clock or source \
                 stalled); the stream goes on in silence at the real-time pace until it moves",
                self.label,
                stalled.as_secs_f64() * 1000.0
            );
        }
        self.report_xrun();
        self.port.ring.shared().set_backend_delay(0);
        self.silence = Some(Silence { at: now, moved: 0 });
    }

    fn leave_silence(&mut self, running_frames: Option<u64>) {
        if self.failed.is_some() || self.silence.take().is_none() {
            return;
        }
        if self.log_limit.admit(Instant::now()) {
            log::info!("gstreamer: {}: the pipeline moves again", self.label);
        }
        self.discont = true;
        if let Some(frames) = running_frames {
            if !self.playback() {
                // The ring had silence for the stall: the release limit starts from here.
                self.capture_offset = self.position.saturating_sub(frames);
            }
        }
    }

    /// Moves the frames due since the silence began: playback drops them from the ring,
    /// capture gets silence.
    fn silence_tick(&mut self, now: Instant) -> Result<(), RingError> {
        let Some(silence) = self.silence.as_mut() else {
            return Ok(());
        };
        let due = frames_in(now.saturating_duration_since(silence.at), self.rate);
        let frames = due.saturating_sub(silence.moved);
        silence.moved = due;
        let want = frames * self.frame_bytes;
        let short = match &mut self.port.ring {
            StreamRing::Playback(consumer) => {
                let available = consumer.available()? / self.frame_bytes * self.frame_bytes;
                let take = want.min(available);
                consumer.skip(take)?;
                take < want
            }
            StreamRing::Capture(producer) => {
                let (pattern, width) = virtio_snd::protocol::silence_pattern(self.params.format);
                for (i, b) in self.scratch.iter_mut().enumerate() {
                    *b = pattern[i % width.max(1)];
                }
                let free = producer.free()? / self.frame_bytes * self.frame_bytes;
                let mut left = want.min(free);
                let short = left < want;
                while left > 0 {
                    let n = left.min(self.scratch.len() as u64);
                    producer.push(&self.scratch[..n as usize])?;
                    left -= n;
                }
                self.position += frames;
                short
            }
        };
        if self.xrun.update(short) {
            self.report_xrun();
        }
        Ok(())
    }

    /// Playback: pushes what the running time says is due, up to the lead.
    fn push_due(&mut self, running_frames: u64) -> Result<(), RingError> {
        let Io::Playback { appsrc, pool } = &self.io else {
            return Ok(());
        };
        if self.position < running_frames {
            // Behind the clock (a START after a pause, a late tick): what is past is a gap.
            self.position = running_frames;
            self.discont = true;
        }
        let target = running_frames + self.timing.lead_frames;
        let StreamRing::Playback(consumer) = &mut self.port.ring else {
            return Ok(());
        };
        let gain = self.port.gain.load();
        let mut short = false;
        let queue_full = appsrc.current_level_bytes() > appsrc.max_bytes();
        while self.position < target {
            let frames = (target - self.position).min(self.timing.chunk_frames);
            let available = consumer.available()? / self.frame_bytes;
            let take = frames.min(available);
            if take < frames {
                short = true;
            }
            if take > 0 {
                let bytes = (take * self.frame_bytes) as usize;
                if queue_full {
                    // The pipeline takes nothing (a sink that blocks): the stream's audio is
                    // dropped at the clock's pace rather than piled up.
                    consumer.skip(bytes as u64)?;
                } else if let Some(mut buffer) = buffer_from_ring(pool, consumer, bytes, |data| {
                    gain::apply(self.params.format, gain, data);
                    if let Some(source) = &self.reorder {
                        reorder_frames(data, self.sample_bytes, source);
                    }
                })? {
                    if let Some(b) = buffer.get_mut() {
                        b.set_pts(gst::ClockTime::from_nseconds(ns_of(
                            self.position,
                            self.rate,
                        )));
                        b.set_duration(gst::ClockTime::from_nseconds(ns_of(take, self.rate)));
                        if std::mem::take(&mut self.discont) {
                            b.set_flags(gst::BufferFlags::DISCONT);
                        }
                    }
                    // Refused only while flushing or after its end: the bus says why.
                    let _ = appsrc.push_buffer(buffer);
                }
            }
            if take < frames {
                // A gap: the rest of what is due has no frames.
                self.position = target;
                self.discont = true;
                break;
            }
            self.position += take;
        }
        if queue_full && self.log_limit.admit(Instant::now()) {
            log::warn!(
                "gstreamer: {}: the pipeline takes no more audio ({} bytes queued); the \
                 stream's audio is dropped at the clock's pace",
                self.label,
                appsrc.current_level_bytes()
            );
        }
        if self.xrun.update(short) {
            self.report_xrun();
        }
        // Pushed and not yet played: ahead of the running time, and the pipeline's latency.
        let played = running_frames.saturating_sub(self.latency_frames);
        self.port
            .ring
            .shared()
            .set_backend_delay(self.position.saturating_sub(played));
        Ok(())
    }

    /// Capture: whether the source gave a buffer not yet handed to the ring (pulled now if
    /// one waits).
    fn source_has_data(&mut self) -> bool {
        if self.pending.is_none() {
            self.pull();
        }
        self.pending.is_some()
    }

    /// Capture: takes the appsink's next buffer, if one waits, as the pending one.
    fn pull(&mut self) {
        let Io::Capture { appsink } = &self.io else {
            return;
        };
        let Some(sample) = appsink.try_pull_sample(gst::ClockTime::ZERO) else {
            return;
        };
        self.last_progress = Instant::now();
        if let Some(buffer) = sample.buffer_owned() {
            if let Ok(map) = buffer.into_mapped_buffer_readable() {
                self.pending = Some((map, 0));
            }
        }
    }

    /// Capture: hands the ring what the pipeline captured, no further than the running time.
    fn release_captured(&mut self, running_frames: u64) -> Result<(), RingError> {
        let limit = running_frames + self.capture_offset;
        let mut budget = limit.saturating_sub(self.position);
        let gain = self.port.gain.load();
        let mut short = false;
        while budget > 0 {
            if self.pending.is_none() {
                self.pull();
                if self.pending.is_none() {
                    break;
                }
            }
            let Some((map, offset)) = self.pending.as_mut() else {
                break;
            };
            let left = (map.len() - *offset) as u64 / self.frame_bytes;
            if left == 0 {
                self.pending = None;
                continue;
            }
            let frames = left
                .min(budget)
                .min(self.scratch.len() as u64 / self.frame_bytes);
            let bytes = (frames * self.frame_bytes) as usize;
            let chunk = &mut self.scratch[..bytes];
            chunk.copy_from_slice(&map[*offset..*offset + bytes]);
            *offset += bytes;
            if let Some(source) = &self.reorder {
                reorder_frames(chunk, self.sample_bytes, source);
            }
            gain::apply(self.params.format, gain, chunk);
            let StreamRing::Capture(producer) = &mut self.port.ring else {
                return Ok(());
            };
            let free = producer.free()? / self.frame_bytes * self.frame_bytes;
            let keep = (bytes as u64).min(free) as usize;
            if keep > 0 {
                producer.push(&chunk[..keep])?;
            }
            // Frames that do not fit are lost (an overrun), as on real hardware.
            short |= keep < bytes;
            self.position += frames;
            budget -= frames;
            // A large buffer is released over several ticks: that is progress too.
            self.last_progress = Instant::now();
        }
        if self.xrun.update(short) {
            self.report_xrun();
        }
        self.port
            .ring
            .shared()
            .set_backend_delay(self.latency_frames);
        Ok(())
    }

    fn violated(&mut self, e: RingError) {
        log::warn!("gstreamer: {}: {e}", self.label);
        self.shared.running.store(false, Ordering::Release);
        self.running = false;
        if !self.shared.violation.swap(true, Ordering::AcqRel) {
            signal(&self.shared.wake);
        }
    }

    /// Finishes the pipeline: playback plays out to its end of stream (bounded), then every
    /// element stops.
    fn close(&mut self) {
        let _ = self.timer.unset();
        self.pending = None;
        if let (Io::Playback { appsrc, .. }, None) = (&self.io, &self.failed) {
            let playing = self.pipeline.current_state() == gst::State::Playing
                || self.pipeline.set_state(gst::State::Playing).is_ok();
            if playing && appsrc.end_of_stream().is_ok() {
                let deadline = Instant::now() + CLOSE_TIMEOUT;
                if let Some(bus) = self.pipeline.bus() {
                    loop {
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            log::info!(
                                "gstreamer: {}: no end of stream within {} ms; stopping it",
                                self.label,
                                CLOSE_TIMEOUT.as_millis()
                            );
                            break;
                        }
                        let wait = gst::ClockTime::from_nseconds(left.as_nanos() as u64);
                        match bus.timed_pop_filtered(
                            wait,
                            &[gst::MessageType::Eos, gst::MessageType::Error],
                        ) {
                            Some(m) => {
                                if let gst::MessageView::Error(e) = m.view() {
                                    log::warn!(
                                        "gstreamer: {}: while finishing: {}",
                                        self.label,
                                        error_text(e)
                                    );
                                }
                                break;
                            }
                            None => continue,
                        }
                    }
                }
            }
        }
        if self.pipeline.set_state(gst::State::Null).is_err() {
            log::warn!(
                "gstreamer: {}: the pipeline did not stop cleanly",
                self.label
            );
        }
        if let Io::Playback { pool, .. } = &self.io {
            let _ = pool.set_active(false);
        }
        log::debug!("gstreamer: {}: pipeline closed", self.label);
    }
}

/// `bytes` of the ring (then `process`ed) in a buffer of the pool (memory the pipeline handed back), or a new
/// one if the pool cannot give one; `None` (the bytes dropped) if no buffer can be had.
fn buffer_from_ring(
    pool: &gst::BufferPool,
    consumer: &mut vsound_shared::ring::Consumer,
    bytes: usize,
    process: impl FnOnce(&mut [u8]),
) -> Result<Option<gst::Buffer>, RingError> {
    let buffer = pool
        .acquire_buffer(None)
        .ok()
        .or_else(|| gst::Buffer::with_size(bytes).ok());
    let Some(mut buffer) = buffer else {
        consumer.skip(bytes as u64)?;
        return Ok(None);
    };
    let filled = match buffer.get_mut() {
        Some(b) if b.maxsize() >= bytes => {
            b.set_size(bytes);
            match b.map_writable() {
                Ok(mut map) => {
                    consumer.pop(&mut map[..bytes])?;
                    process(&mut map[..bytes]);
                    true
                }
                Err(_) => false,
            }
        }
        _ => false,
    };
    if !filled {
        consumer.skip(bytes as u64)?;
        return Ok(None);
    }
    Ok(Some(buffer))
}

fn ns_of(frames: u64, rate: u64) -> u64 {
    u64::try_from(u128::from(frames) * 1_000_000_000 / u128::from(rate.max(1))).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_snd::protocol::rate;

    /// ALSA's (and the default channel map's) 5.1.
    const ALSA_51: [u8; 6] = [
        chmap::FL,
        chmap::FR,
        chmap::RL,
        chmap::RR,
        chmap::FC,
        chmap::LFE,
    ];

    fn params(period: u32, periods: u32, channels: u8) -> PcmParams {
        let frame = 2 * u32::from(channels);
        PcmParams {
            buffer_bytes: period * frame * periods,
            period_bytes: period * frame,
            features: 0,
            channels,
            format: format::S16,
            rate: rate::R48000,
        }
    }

    #[test]
    fn the_pacer_wakes_twice_a_period_and_leads_by_two_ticks() {
        let t = Timing::of(&params(480, 4, 2));
        assert_eq!(t.tick, Duration::from_millis(5));
        assert_eq!(t.lead_frames, 480);
        // ARCVM's 5.5 ms periods: not rounded to whole milliseconds.
        let t = Timing::of(&params(264, 4, 2));
        assert_eq!(t.tick, Duration::from_micros(2750));
        assert_eq!(t.lead_frames, 264);
        // Long periods wake at most every 10 ms; tiny ones at most every 2 ms.
        assert_eq!(
            Timing::of(&params(4800, 2, 2)).tick,
            Duration::from_millis(10)
        );
        assert_eq!(
            Timing::of(&params(48, 16, 2)).tick,
            Duration::from_millis(2)
        );
    }

    #[test]
    fn guest_layouts_become_gstreamer_positions_in_canonical_order() {
        gst::init().unwrap();
        let stereo = channels_for(2, &[]);
        assert_eq!(
            stereo.canonical,
            Some(vec![Position::FrontLeft, Position::FrontRight])
        );
        assert_eq!(stereo.guest_order, None);
        // ALSA's 5.1 order is reordered to GStreamer's.
        let surround = channels_for(6, &[ALSA_51.to_vec()]);
        assert_eq!(
            surround.canonical,
            Some(vec![
                Position::FrontLeft,
                Position::FrontRight,
                Position::FrontCenter,
                Position::Lfe1,
                Position::RearLeft,
                Position::RearRight,
            ])
        );
        assert!(surround.guest_order.is_some());
        // No map for the count, or a position GStreamer has no name for: unpositioned.
        assert_eq!(channels_for(4, &[]).canonical, None);
        assert_eq!(
            channels_for(2, &[vec![chmap::RLC, chmap::RRC]]).canonical,
            None
        );
    }

    #[test]
    fn a_guest_layout_in_another_order_is_reordered_both_ways() {
        gst::init().unwrap();
        let channels = channels_for(6, &[ALSA_51.to_vec()]);
        let (Some(guest_to_gstreamer), Some(gstreamer_to_guest)) =
            (channels.guest_to_gstreamer(), channels.gstreamer_to_guest())
        else {
            panic!("not reordered: {channels:?}");
        };
        // Three frames (any length of whole frames), each sample its guest channel's index.
        let frames: Vec<u8> = (0..3)
            .flat_map(|_| (0..6i16).flat_map(|c| c.to_le_bytes()))
            .collect();
        let mut data = frames.clone();
        reorder_frames(&mut data, 2, &guest_to_gstreamer);
        let got: Vec<i16> = data
            .chunks_exact(2)
            .map(|s| i16::from_le_bytes([s[0], s[1]]))
            .collect();
        // GStreamer's order: FL FR FC LFE RL RR.
        assert_eq!(got[..6], [0, 1, 4, 5, 2, 3]);
        assert_eq!(got[6..12], got[..6]);
        reorder_frames(&mut data, 2, &gstreamer_to_guest);
        assert_eq!(data, frames);
        // The guest's order is GStreamer's: nothing to do.
        assert_eq!(channels_for(2, &[]).guest_to_gstreamer(), None);
    }

    #[test]
    fn every_carried_format_has_caps() {
        gst::init().unwrap();
        for fmt in 0..=format::MAX {
            let Some(gst_fmt) = gst_format(fmt) else {
                continue;
            };
            let p = PcmParams {
                format: fmt,
                ..params(480, 4, 2)
            };
            let caps = caps_for(&p, &channels_for(2, &[])).unwrap();
            let info = gst_audio::AudioInfo::from_caps(&caps).unwrap();
            assert_eq!(info.format(), gst_fmt);
            assert_eq!(
                info.bpf(),
                virtio_snd::protocol::sample_bytes(fmt).unwrap() * 2,
                "format {fmt}: the same frame size"
            );
        }
        let unpositioned = caps_for(&params(480, 4, 4), &channels_for(4, &[])).unwrap();
        assert_eq!(
            gst_audio::AudioInfo::from_caps(&unpositioned)
                .unwrap()
                .channels(),
            4
        );
    }
}
