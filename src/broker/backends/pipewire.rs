//! The PipeWire backend: one PipeWire stream per virtio stream, driven by the PipeWire graph's
//! clock. Formats pass through unconverted (PipeWire converts and resamples where needed).
//!
//! PipeWire's main loop runs on one thread of its own, owned by the broker; the broker talks to
//! it through a PipeWire channel. Each stream's real-time process callback only moves frames
//! between its ring and PipeWire's buffer: it never blocks and never allocates, and reports
//! xruns and ring violations through atomics and an eventfd the broker watches.
//!
//! What the callback has taken from the ring the guest counts as played (the worker completes
//! a buffer once its last byte is taken), but PipeWire may still hold it: when a stream's first
//! buffer is sized for a quantum the graph has not switched to yet (node.latency raises it),
//! the stream's converter carries the rest of every buffer into the next cycle, up to a quantum
//! that `pw_stream_get_time` does not report. Deactivating or destroying the stream drops that.
//! So at STOP a playback stream stays active, playing silence, until the callback has handed
//! PipeWire [`TAIL_QUANTA`] buffers and [`TAIL_MIN`] of silence after its last frames (or [`TAIL_TIMEOUT`]
//! passed), and only then goes inactive; at RELEASE (or a new PREPARE, or the worker leaving)
//! it leaves the broker's table at once and is destroyed the same way, so a new stream of the
//! same slot can open meanwhile. The broker's answers never wait for this.
//!
//! A running stream whose node PipeWire does not schedule (not linked yet, no session manager,
//! unlinked, target gone, the daemon away) would never complete a guest buffer, and the guest's
//! ALSA gives up with EIO once no period completes for max(100 ms, 1.1 x its buffer). So a watchdog on the PipeWire
//! thread watches each running stream's cycle counter (atomics the callback bumps) and, once
//! no cycle ran for [`stall_limit`] (from START or the last cycle), logs why (the stream's state
//! as PipeWire reports it), reports an xrun and plays the stream into silence at its real-time
//! pace; the first cycle PipeWire runs again takes over. The silence continues the stream's own
//! clock from the last cycle (or START), so no frame is consumed twice or before it is due.
//!
//! If the daemon goes away, the thread drops the dead streams (the watchdog keeps them in
//! silence), tries to reconnect once a second, and recreates the streams when it is back.
//!
//! A stream's volume and mute (the guest's controls, or a host command) are its node's
//! `channelVolumes` (every channel the same linear factor, 10^(dB/20): PipeWire's volumes are
//! linear, the cubic curve is only how pavucontrol and wpctl display them) and `mute` props,
//! set through a proxy of the stream's own node as `wpctl set-volume` sets them; the master
//! `volume` prop is set to 1 alongside. The same proxy follows the node's props, so a change
//! made on PipeWire's side (wpctl, pw-cli, a session manager) reaches the broker and the guest.
//!
//! Rings are sized for the graph's quantum, which the host may pin above the guest's period
//! (`clock.force-quantum`, `clock.min-quantum` in the daemon's `settings` metadata, which the
//! thread follows): a cycle takes a whole quantum at once, so the ring holds a quantum and a
//! period more.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use pipewire as pw;
use pw::spa;
use pw::spa::param::audio::{AudioFormat, AudioInfoRaw};
use rustix::event::{eventfd, EventfdFlags};

use super::gain::GainCell;
use super::host_nodes::{HostNode, HostNodes};
use super::{
    Backend, BackendError, BackendStream, RingPort, StreamRing, StreamSpec, Wake, XrunEdge,
};
use virtio_snd::control::{PcmCaps, PcmParams};
use virtio_snd::ctl::Gain;
use virtio_snd::protocol::{chmap, format, D_OUTPUT};
use vsound_config::VmName;
use vsound_shared::ratelimit::LogLimiter;
use vsound_shared::ring::RingError;

/// How long the broker waits for its PipeWire thread to connect at start-up.
const START_TIMEOUT: Duration = Duration::from_secs(3);

/// Per-stream PipeWire properties from the config.
#[derive(Debug, Clone, Default)]
pub struct NodeProps {
    pub node_name: Option<String>,
    pub description: Option<String>,
    pub media_role: Option<String>,
    pub target: Option<String>,
    pub capture_sink: bool,
    /// The channel positions of each of the stream's channel maps (one per channel count).
    pub layouts: Vec<Vec<u8>>,
    pub stream_name: String,
}

/// What a PipeWire client reads once the broker is confined: its plugins and modules (loaded
/// as streams are created) and its configuration.
/// The daemon socket libpipewire connects to, as it finds it (`$PIPEWIRE_REMOTE`, default
/// `pipewire-0`, in `$PIPEWIRE_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR`), for the error that says
/// what was tried.
pub fn socket_tried() -> String {
    let remote = std::env::var("PIPEWIRE_REMOTE").unwrap_or_else(|_| "pipewire-0".into());
    if remote.starts_with('/') {
        return remote;
    }
    match ["PIPEWIRE_RUNTIME_DIR", "XDG_RUNTIME_DIR"]
        .iter()
        .find_map(|var| std::env::var(var).ok().filter(|dir| !dir.is_empty()))
    {
        Some(dir) => format!("{dir}/{remote} (is a daemon running for this user?)"),
        None => format!(
            "{remote} (neither PIPEWIRE_RUNTIME_DIR nor XDG_RUNTIME_DIR is set: set one to the \
             daemon's directory)"
        ),
    }
}

pub fn sandbox_read_paths() -> Vec<std::path::PathBuf> {
    let mut paths: Vec<std::path::PathBuf> = Vec::new();
    for var in [
        "SPA_PLUGIN_DIR",
        "PIPEWIRE_MODULE_DIR",
        "PIPEWIRE_CONFIG_DIR",
    ] {
        if let Some(dir) = std::env::var_os(var) {
            paths.push(dir.into());
        }
    }
    // Plugins are loaded with dlopen, which also resolves their own library dependencies.
    for lib in [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib64",
    ] {
        paths.push(lib.into());
    }
    paths.push("/etc/ld.so.cache".into());
    paths.extend(["/usr/share/pipewire", "/etc/pipewire", "/usr/share/spa-0.2"].map(Into::into));
    paths.retain(|p| p.exists());
    paths
}

/// The virtio format's SPA equivalent, for the formats PipeWire carries unconverted.
fn spa_format(fmt: u8) -> Option<AudioFormat> {
    Some(match fmt {
        format::MU_LAW => AudioFormat::ULAW,
        format::A_LAW => AudioFormat::ALAW,
        format::S8 => AudioFormat::S8,
        format::U8 => AudioFormat::U8,
        format::S16 => AudioFormat::S16LE,
        format::U16 => AudioFormat::U16LE,
        format::S24_3 => AudioFormat::S24LE,
        format::U24_3 => AudioFormat::U24LE,
        format::S24 => AudioFormat::S24_32LE,
        format::U24 => AudioFormat::U24_32LE,
        format::S32 => AudioFormat::S32LE,
        format::U32 => AudioFormat::U32LE,
        format::FLOAT => AudioFormat::F32LE,
        format::FLOAT64 => AudioFormat::F64LE,
        _ => return None,
    })
}

/// The SPA channel position of a virtio one.
fn spa_position(position: u8) -> u32 {
    use spa::sys::*;
    match position {
        chmap::MONO => SPA_AUDIO_CHANNEL_MONO,
        chmap::FL => SPA_AUDIO_CHANNEL_FL,
        chmap::FR => SPA_AUDIO_CHANNEL_FR,
        chmap::RL => SPA_AUDIO_CHANNEL_RL,
        chmap::RR => SPA_AUDIO_CHANNEL_RR,
        chmap::FC => SPA_AUDIO_CHANNEL_FC,
        chmap::LFE => SPA_AUDIO_CHANNEL_LFE,
        chmap::SL => SPA_AUDIO_CHANNEL_SL,
        chmap::SR => SPA_AUDIO_CHANNEL_SR,
        chmap::RC => SPA_AUDIO_CHANNEL_RC,
        chmap::FLC => SPA_AUDIO_CHANNEL_FLC,
        chmap::FRC => SPA_AUDIO_CHANNEL_FRC,
        chmap::RLC => SPA_AUDIO_CHANNEL_RLC,
        chmap::RRC => SPA_AUDIO_CHANNEL_RRC,
        chmap::FLW => SPA_AUDIO_CHANNEL_FLW,
        chmap::FRW => SPA_AUDIO_CHANNEL_FRW,
        chmap::FLH => SPA_AUDIO_CHANNEL_FLH,
        chmap::FCH => SPA_AUDIO_CHANNEL_FCH,
        chmap::FRH => SPA_AUDIO_CHANNEL_FRH,
        chmap::TC => SPA_AUDIO_CHANNEL_TC,
        chmap::TFL => SPA_AUDIO_CHANNEL_TFL,
        chmap::TFR => SPA_AUDIO_CHANNEL_TFR,
        chmap::TFC => SPA_AUDIO_CHANNEL_TFC,
        chmap::TRL => SPA_AUDIO_CHANNEL_TRL,
        chmap::TRR => SPA_AUDIO_CHANNEL_TRR,
        chmap::TRC => SPA_AUDIO_CHANNEL_TRC,
        chmap::TSL => SPA_AUDIO_CHANNEL_TSL,
        chmap::TSR => SPA_AUDIO_CHANNEL_TSR,
        chmap::LLFE => SPA_AUDIO_CHANNEL_LLFE,
        chmap::RLFE => SPA_AUDIO_CHANNEL_RLFE,
        chmap::BC => SPA_AUDIO_CHANNEL_BC,
        chmap::BLC => SPA_AUDIO_CHANNEL_BLC,
        chmap::BRC => SPA_AUDIO_CHANNEL_BRC,
        _ => SPA_AUDIO_CHANNEL_UNKNOWN,
    }
}

/// How many buffers of silence a stopped stream hands PipeWire after its last frames before it
/// goes inactive or is destroyed. One pushes a carried remainder through the converter (the
/// measured need); the others are margin for a resampler's history and a quantum change.
const TAIL_QUANTA: u64 = 3;
/// And at least this long of silence: with small buffers (256 frames for 10 ms periods) three
/// of them did not always carry the last frames through the graph to the sink (its last 256
/// frames went missing in about one run of three).
const TAIL_MIN: Duration = Duration::from_millis(50);
/// The longest a stopped or released stream lingers for its tail (a graph that stopped
/// running, or a stream never linked, plays nothing out).
const TAIL_TIMEOUT: Duration = Duration::from_millis(500);
/// The most released streams of one worker that may linger at once: a guest that cycles
/// PREPARE, START and RELEASE gets no pile of PipeWire nodes (its oldest tail goes first).
const MAX_LINGERING_PER_CLIENT: usize = 4;
/// How often the PipeWire thread looks whether lingering streams have played out their tails.
const TAIL_POLL: Duration = Duration::from_millis(5);

/// State shared between the broker's handle and the real-time callback.
struct Shared {
    running: AtomicBool,
    /// When the stream last STARTed (monotonic ns).
    started_ns: AtomicU64,
    /// Cycles PipeWire ran the stream's callback while it was running, and when the last one
    /// ran (monotonic ns; 0: none since START): the watchdog's evidence of scheduling.
    cycles: AtomicU64,
    last_cycle_ns: AtomicU64,
    /// The most frames PipeWire asked for in one cycle (the quantum it really runs).
    largest_request: AtomicU64,
    /// Buffers and frames of silence the callback has handed PipeWire since it last played
    /// frames, and the frames a tail needs (`TAIL_MIN` at the stream's rate).
    silent_quanta: AtomicU64,
    silent_frames: AtomicU64,
    tail_frames: u64,
    xruns: AtomicU64,
    violation: AtomicBool,
    /// Signalled by the real-time callback on an xrun or a violation, and by the PipeWire
    /// thread when the node's volume changed on PipeWire's side.
    wake: OwnedFd,
    /// The stream's volume and mute: the broker's (the same cell as its `RingPort`'s), or
    /// PipeWire's after a change on PipeWire's side.
    gain: Arc<GainCell>,
    channels: u32,
    /// A SetGain command is on its way to the PipeWire thread (a burst of changes costs one).
    gain_pending: AtomicBool,
    /// The node's props have shown the gain last set: until then they are not news (they
    /// may still be the ones from before).
    gain_synced: AtomicBool,
    /// PipeWire's side changed the gain; the broker's loop has not passed it on yet.
    host_gain_changed: AtomicBool,
}

impl Shared {
    fn signal(&self) {
        let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
    }
}

/// Monotonic nanoseconds: libc's clock_gettime (the vDSO: no syscall, no lock, so safe on the
/// real-time thread; rustix's would read the auxv with a prctl the sandbox forbids).
fn monotonic_ns() -> u64 {
    use nix::time::{clock_gettime, ClockId};
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map(|now| {
            (now.tv_sec() as u64)
                .saturating_mul(1_000_000_000)
                .saturating_add(now.tv_nsec() as u64)
        })
        .unwrap_or(0)
}

/// A running stream's own clock: the frames its cycles and the silence have accounted for
/// since START, and where the silence would continue from.
#[derive(Debug, Default, Clone, Copy)]
struct StreamClock {
    /// The START this clock counts from (`Shared::started_ns`).
    start_ns: u64,
    frames: u64,
    /// The last cycle's time and the frames before it: that cycle covered the frames up to
    /// `frames`, so silence continues at the real-time pace from `anchor_frames` at `anchor_ns`.
    anchor_ns: u64,
    anchor_frames: u64,
}

/// Everything the real-time callback touches.
struct RtState {
    port: RingPort,
    shared: Arc<Shared>,
    frame_bytes: usize,
    rate: u32,
    xrun: XrunEdge,
    clock: StreamClock,
}

impl RtState {
    /// Restarts the clock if the stream STARTed since it last ran.
    fn sync_start(&mut self) {
        let started = self.shared.started_ns.load(Ordering::Acquire);
        if started != self.clock.start_ns {
            self.clock = StreamClock {
                start_ns: started,
                frames: 0,
                anchor_ns: started,
                anchor_frames: 0,
            };
        }
    }

    /// A cycle of PipeWire's that accounts for `frames` of the stream.
    fn count_cycle(&mut self, frames: u64) {
        if self.clock.frames == 0 {
            crate::realtime::record_data_thread();
        }
        self.sync_start();
        let now = monotonic_ns();
        self.clock.anchor_ns = now;
        self.clock.anchor_frames = self.clock.frames;
        self.clock.frames = self.clock.frames.saturating_add(frames);
        self.shared.last_cycle_ns.store(now, Ordering::Release);
        self.shared.cycles.fetch_add(1, Ordering::AcqRel);
        self.shared
            .largest_request
            .fetch_max(frames, Ordering::AcqRel);
    }

    /// The silence clock, for while PipeWire runs no cycle: moves the frames due at the
    /// real-time pace since the last cycle (or START) that no cycle has accounted for.
    fn silence_tick(&mut self, now_ns: u64) {
        self.sync_start();
        let elapsed = u128::from(now_ns.saturating_sub(self.clock.anchor_ns));
        let due = elapsed * u128::from(self.rate) / 1_000_000_000;
        let due = self
            .clock
            .anchor_frames
            .saturating_add(u64::try_from(due).unwrap_or(u64::MAX));
        if due > self.clock.frames {
            let frames = due - self.clock.frames;
            self.clock.frames = due;
            self.move_silence(frames);
        }
    }

    fn violated(&mut self, e: RingError) {
        if !self.shared.violation.swap(true, Ordering::AcqRel) {
            self.shared.signal();
        }
        // Nothing more moves through this ring.
        self.shared.running.store(false, Ordering::Release);
        let _ = e;
    }

    fn xrun_edge(&mut self, short: bool) {
        if self.xrun.update(short) {
            self.shared.xruns.fetch_add(1, Ordering::AcqRel);
            self.shared.signal();
        }
    }

    fn publish_delay(&self, stream: &pw::stream::Stream) {
        if let Ok(time) = stream.time() {
            let rate = time.rate();
            let delay = time.delay().max(0) as u64;
            // `delay` counts graph ticks of `rate`; convert to our frames.
            // In u128 and clamped: the daemon's numbers must not overflow on this thread.
            let frames = if rate.denom > 0 {
                let frames = u128::from(delay) * u128::from(rate.num) * u128::from(self.rate)
                    / u128::from(rate.denom);
                u64::try_from(frames).unwrap_or(u64::MAX)
            } else {
                0
            };
            self.port.ring.shared().set_backend_delay(frames);
        }
    }

    /// Moves `frames` of silence: playback frames are dropped, capture gets zeros.
    fn move_silence(&mut self, frames: u64) {
        const ZEROS: [u8; 4096] = [0; 4096];
        let stride = self.frame_bytes as u64;
        let want = frames.saturating_mul(stride);
        let result = match &mut self.port.ring {
            StreamRing::Playback(consumer) => consumer.available().and_then(|available| {
                let take = want.min(available / stride * stride);
                consumer.skip(take).map(|_| take < want)
            }),
            StreamRing::Capture(producer) => producer.free().and_then(|free| {
                let mut left = want.min(free / stride * stride);
                let short = left < want;
                while left > 0 {
                    let n = left.min(ZEROS.len() as u64 / stride * stride);
                    producer.push(&ZEROS[..n as usize])?;
                    left -= n;
                }
                Ok(short)
            }),
        };
        match result {
            Ok(short) => self.xrun_edge(short),
            Err(e) => self.violated(e),
        }
        self.port.moved();
    }

    fn process_playback(&mut self, stream: &pw::stream::Stream) {
        let Some(mut buffer) = stream.dequeue_buffer() else {
            return;
        };
        let requested = buffer.requested() as usize;
        let stride = self.frame_bytes;
        let running = self.shared.running.load(Ordering::Acquire);
        let datas = buffer.datas_mut();
        let Some(data) = datas.first_mut() else {
            return;
        };
        let mut filled = 0;
        let mut frames = 0;
        if let Some(slice) = data.data() {
            let max_frames = slice.len() / stride;
            frames = if requested > 0 {
                requested.min(max_frames)
            } else {
                max_frames
            };
            let out = &mut slice[..frames * stride];
            if running {
                if let StreamRing::Playback(consumer) = &mut self.port.ring {
                    let result = consumer.available().and_then(|avail| {
                        let take = (avail as usize / stride * stride).min(out.len());
                        consumer.pop(&mut out[..take])
                    });
                    match result {
                        Ok(n) => filled = n,
                        Err(e) => self.violated(e),
                    }
                }
            }
            out[filled..].fill(0);
        }
        let chunk = data.chunk_mut();
        *chunk.offset_mut() = 0;
        *chunk.stride_mut() = stride as i32;
        *chunk.size_mut() = (frames * stride) as u32;
        drop(buffer);
        if !running {
            self.shared.silent_quanta.fetch_add(1, Ordering::AcqRel);
            self.shared
                .silent_frames
                .fetch_add(frames as u64, Ordering::AcqRel);
        } else {
            self.count_cycle(frames as u64);
            self.shared.silent_quanta.store(0, Ordering::Release);
            self.shared.silent_frames.store(0, Ordering::Release);
            self.xrun_edge(filled < frames * stride);
            self.publish_delay(stream);
            if filled > 0 {
                self.port.moved();
            }
        }
    }

    fn process_capture(&mut self, stream: &pw::stream::Stream) {
        let Some(mut buffer) = stream.dequeue_buffer() else {
            return;
        };
        let stride = self.frame_bytes;
        if !self.shared.running.load(Ordering::Acquire) {
            return;
        }
        let datas = buffer.datas_mut();
        let Some(data) = datas.first_mut() else {
            return;
        };
        let (offset, size) = (data.chunk().offset() as usize, data.chunk().size() as usize);
        let mut short = false;
        if let Some(slice) = data.data() {
            let end = offset.saturating_add(size).min(slice.len());
            let start = offset.min(end);
            let frames = &slice[start..end];
            let len = frames.len() / stride * stride;
            if let StreamRing::Capture(producer) = &mut self.port.ring {
                let result = producer.free().and_then(|free| {
                    let keep = (free as usize / stride * stride).min(len);
                    producer.push(&frames[..keep]).map(|_| keep)
                });
                match result {
                    Ok(kept) => short = kept < len,
                    Err(e) => self.violated(e),
                }
            }
        }
        drop(buffer);
        self.count_cycle((size / stride) as u64);
        self.xrun_edge(short);
        self.publish_delay(stream);
        self.port.moved();
    }
}

enum Command {
    Open(Box<OpenRequest>),
    /// Sets the node's props to the stream's gain cell.
    SetGain {
        key: u64,
    },
    Start {
        key: u64,
    },
    /// Goes inactive once the tail is played.
    Stop {
        key: u64,
    },
    /// Destroys the stream once the tail is played.
    Close {
        key: u64,
    },
}

struct OpenRequest {
    key: u64,
    props: NodeProps,
    spec: StreamSpec,
    rt: RtState,
    reply: mpsc::SyncSender<Result<(), String>>,
}

/// The broker's PipeWire thread.
pub struct PipewireThread {
    sender: pw::channel::Sender<Command>,
    connected: Arc<AtomicBool>,
    settings: Arc<GraphSettings>,
    /// The daemon's nodes, for the jacks that follow a stream's host end.
    pub host_nodes: Arc<HostNodes>,
    next_key: AtomicU64,
}

impl PipewireThread {
    /// Connects to the PipeWire daemon (from `PIPEWIRE_RUNTIME_DIR`/`XDG_RUNTIME_DIR`) on a new
    /// thread. Fails if no daemon answers.
    pub fn start() -> Result<Arc<PipewireThread>, String> {
        let (sender, receiver) = pw::channel::channel::<Command>();
        let connected = Arc::new(AtomicBool::new(false));
        let settings = Arc::new(GraphSettings::default());
        let host_nodes =
            Arc::new(HostNodes::new().map_err(|e| format!("cannot follow PipeWire's nodes: {e}"))?);
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), String>>(1);
        let flag = connected.clone();
        let graph = settings.clone();
        let nodes = host_nodes.clone();
        std::thread::Builder::new()
            .name("pipewire".into())
            .spawn(move || run_loop(receiver, flag, graph, nodes, ready_tx))
            .map_err(|e| format!("cannot start the PipeWire thread: {e}"))?;
        ready_rx
            .recv_timeout(START_TIMEOUT)
            .map_err(|_| "the PipeWire thread did not answer".to_string())??;
        Ok(Arc::new(PipewireThread {
            sender,
            connected,
            settings,
            host_nodes,
            next_key: AtomicU64::new(1),
        }))
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    fn send(&self, command: Command) -> Result<(), String> {
        self.sender
            .send(command)
            .map_err(|_| "the PipeWire thread is gone".to_string())
    }
}

/// How often, while PipeWire is away, the supervisor looks at the connection.
const SUPERVISOR_TICK: Duration = Duration::from_millis(10);
/// How often, while PipeWire is away, the thread tries to reconnect (in supervisor ticks).
const RECONNECT_TICKS: u32 = 100;
/// How often, while a stream runs, the watchdog looks at its progress (and, while PipeWire
/// runs none of its cycles, moves its silence).
const WATCH_TICK: Duration = Duration::from_millis(5);
/// The shortest wait the watchdog sets (a stream a hair short of its limit is looked at once
/// more, not spun on).
const WATCH_MIN_WAIT: Duration = Duration::from_millis(1);

/// How long a running stream may go without a cycle before it plays into silence: as long as
/// the guest can wait for a completion, less a margin. The guest's ALSA fails the stream (EIO)
/// once no period completes for max(100 ms, 1.1 x its buffer's time) (`wait_for_avail`); 30 ms
/// of that is left for the watchdog's tick and the completion's way to the guest. A cycle that
/// is merely late (a new node being linked, a quantum change: 20-100 ms seen here) is left
/// alone, so its audio is not dropped.
pub(super) fn stall_limit(params: &PcmParams) -> Duration {
    const GUEST_MIN_WAIT: Duration = Duration::from_millis(100);
    const MARGIN: Duration = Duration::from_millis(30);
    let buffer_frames = u64::from(params.buffer_bytes / params.frame_bytes().max(1));
    let buffer =
        Duration::from_nanos(buffer_frames * 1_100_000_000 / u64::from(params.rate_hz().max(1)));
    buffer.max(GUEST_MIN_WAIT).saturating_sub(MARGIN)
}

/// The graph clock's settings, from the daemon's `settings` metadata (0: not set or unknown).
#[derive(Default)]
struct GraphSettings {
    rate: AtomicU64,
    min_quantum: AtomicU64,
    max_quantum: AtomicU64,
    force_quantum: AtomicU64,
}

impl GraphSettings {
    fn update(&self, key: Option<&str>, value: Option<&str>) {
        let number = value
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let slot = match key {
            Some("clock.rate") => &self.rate,
            Some("clock.min-quantum") => &self.min_quantum,
            Some("clock.max-quantum") => &self.max_quantum,
            Some("clock.force-quantum") => &self.force_quantum,
            None => {
                for slot in [
                    &self.rate,
                    &self.min_quantum,
                    &self.max_quantum,
                    &self.force_quantum,
                ] {
                    slot.store(0, Ordering::Release);
                }
                return;
            }
            _ => return,
        };
        slot.store(number, Ordering::Release);
        log::debug!("pipewire: graph setting {key:?} = {value:?}");
    }

    /// The quantum the graph will run a stream of these params at, in the stream's frames:
    /// the pinned quantum if there is one, else the period it asks for (node.latency) within
    /// the graph's limits.
    fn quantum_frames(&self, params: &PcmParams) -> u64 {
        let rate = u64::from(params.rate_hz().max(1));
        let graph_rate = match self.rate.load(Ordering::Acquire) {
            0 => rate,
            r => r,
        };
        let asked = u64::from(params.period_frames()) * graph_rate / rate;
        let forced = self.force_quantum.load(Ordering::Acquire);
        let graph_frames = if forced > 0 {
            forced
        } else {
            let min = self.min_quantum.load(Ordering::Acquire);
            let max = match self.max_quantum.load(Ordering::Acquire) {
                0 => u64::MAX,
                m => m,
            };
            asked.max(min).min(max.max(min))
        };
        // In the stream's frames, rounded up.
        (graph_frames * rate).div_ceil(graph_rate)
    }
}

/// The ring a stream needs for a graph quantum of `quantum_frames`: a cycle takes a whole
/// quantum at once while the worker refills in whole periods, so a quantum and a period, in
/// whole periods.
fn ring_bytes_for(params: &PcmParams, quantum_frames: u64) -> u64 {
    let period = u64::from(params.period_frames().max(1));
    (quantum_frames.div_ceil(period) + 1) * u64::from(params.period_bytes)
}

/// A virtio stream as the PipeWire thread keeps it: enough to recreate its PipeWire stream
/// after the daemon comes back, and a silence clock for while it is away.
struct Entry {
    props: NodeProps,
    spec: StreamSpec,
    rt: Arc<Mutex<RtState>>,
    /// The callback's side of `rt`, read without taking its lock.
    shared: Arc<Shared>,
    active: bool,
    live: Option<LiveStream>,
    /// Since when a STOP waits for the tail before the stream goes inactive.
    stopping: Option<std::time::Instant>,
    /// See [`stall_limit`].
    stall_limit: Duration,
    /// The ring's size in frames, to tell when PipeWire asks for more in one cycle.
    ring_frames: u64,
    quantum_warned: bool,
    /// Set while the stream plays into silence because PipeWire runs none of its cycles.
    fallback: Option<Fallback>,
    /// The watchdog's lines: a guest cycling START on an unlinked node must not flood the log.
    log_limit: LogLimiter,
}

/// A stream the watchdog keeps in silence.
struct Fallback {
    since: std::time::Instant,
    /// `Shared::cycles` when it began: any cycle since means PipeWire runs the stream again.
    cycles: u64,
}

impl Entry {
    /// Whether the stream has a tail to play before it goes: playback has, capture has not.
    fn plays_out(&self) -> bool {
        self.spec.direction == D_OUTPUT
    }
}

/// A released stream that plays out its tail, goes inactive, and only then is destroyed.
struct Lingering {
    key: u64,
    client_id: u32,
    live: LiveStream,
    shared: Arc<Shared>,
    since: std::time::Instant,
    /// When it went inactive (its tail played or given up on).
    inactive_since: Option<std::time::Instant>,
    /// Keeps the ring and the callback's state alive until the stream is gone.
    _rt: Arc<Mutex<RtState>>,
}

impl Lingering {
    /// Deactivates the stream: destroying a stream that is still active costs a sibling
    /// stream of the same PipeWire client a graph quantum at the sink, and a quantum or two
    /// of its frames (another VM's audio; measured: 1 run in 4 with one VM's worker killed
    /// mid-play), where a stream that went inactive first leaves without a trace.
    fn deactivate(&mut self) {
        if self.inactive_since.is_none() {
            if let Err(e) = self.live.stream.set_active(false) {
                log::warn!("pipewire: set_active(false): {e}");
            }
            self.inactive_since = Some(std::time::Instant::now());
        }
    }
}

/// How long a released stream stays inactive before it is destroyed: PipeWire's server
/// takes the deactivation in its own time (a cycle or two).
const INACTIVE_BEFORE_DESTROY: Duration = Duration::from_millis(20);

/// Whether a stopped stream's last frames have reached the sink, or it has waited long enough.
fn tail_played(shared: &Shared, since: std::time::Instant) -> Option<bool> {
    if shared.silent_quanta.load(Ordering::Acquire) >= TAIL_QUANTA
        && shared.silent_frames.load(Ordering::Acquire) >= shared.tail_frames
    {
        Some(true)
    } else if since.elapsed() >= TAIL_TIMEOUT {
        Some(false)
    } else {
        None
    }
}

fn log_tail(key: u64, since: std::time::Instant, played: bool, what: &str) {
    let ms = since.elapsed().as_secs_f64() * 1000.0;
    if played {
        log::debug!("pipewire: stream {key} played its tail in {ms:.0} ms, then {what}");
    } else {
        log::info!("pipewire: stream {key} {what} after {ms:.0} ms without playing its tail");
    }
}

struct LiveStream {
    stream: pw::stream::StreamRc,
    _listener: pw::stream::StreamListener<Arc<Mutex<RtState>>>,
    /// The stream's state as PipeWire last reported it (the watchdog's reason).
    state: Arc<Mutex<String>>,
    /// A proxy of the stream's node, bound once PipeWire gave it an id: its props carry the
    /// volume.
    node: NodeSlot,
}

struct BoundNode {
    node: pw::node::Node,
    _listener: pw::node::NodeListener,
}

type NodeSlot = Rc<RefCell<Option<BoundNode>>>;

/// Binds our streams' nodes on the connection's registry. PipeWire refuses to bind a global
/// the client's registry has not announced yet (a stale id), and a stream learns its node's id
/// on its own: a node is bound when both happened, whichever came last.
#[derive(Default)]
struct NodeBinder {
    registry: Option<pw::registry::RegistryWeak>,
    /// Node globals the registry announced (and did not remove).
    seen: std::collections::HashSet<u32>,
    /// Streams whose node id is known but not announced yet.
    waiting: HashMap<u32, (NodeSlot, Arc<Shared>)>,
}

type Binder = Rc<RefCell<NodeBinder>>;

impl NodeBinder {
    /// A stream knows its node's id: bound now if announced, else once it is.
    fn request(&mut self, node_id: u32, slot: &NodeSlot, shared: &Arc<Shared>) {
        if !self.seen.contains(&node_id) {
            self.waiting.insert(node_id, (slot.clone(), shared.clone()));
            return;
        }
        if let Some(registry) = self.registry.as_ref().and_then(|r| r.upgrade()) {
            bind_node(&registry, node_id, slot, shared);
        }
    }

    /// The registry announced a node.
    fn announced(&mut self, registry: &pw::registry::RegistryRc, node_id: u32) {
        self.seen.insert(node_id);
        if let Some((slot, shared)) = self.waiting.remove(&node_id) {
            bind_node(registry, node_id, &slot, &shared);
        }
    }

    fn removed(&mut self, node_id: u32) {
        self.seen.remove(&node_id);
        self.waiting.remove(&node_id);
    }
}

/// Binds a proxy of our stream's node `node_id`, follows its props and sets them to the
/// stream's gain.
fn bind_node(
    registry: &pw::registry::RegistryRc,
    node_id: u32,
    slot: &NodeSlot,
    shared: &Arc<Shared>,
) {
    let global = pw::registry::GlobalObject {
        id: node_id,
        permissions: pw::permissions::PermissionFlags::empty(),
        type_: pw::types::ObjectType::Node,
        version: 0,
        props: None::<&spa::utils::dict::DictRef>,
    };
    let node: pw::node::Node = match registry.bind(&global) {
        Ok(node) => node,
        Err(e) => {
            log::warn!("pipewire: cannot bind node {node_id} for its volume: {e}");
            return;
        }
    };
    let follower = shared.clone();
    let listener = node
        .add_listener_local()
        .param(move |_seq, id, _index, _next, pod| {
            if id == spa::param::ParamType::Props {
                if let Some(gain) = pod.and_then(props_gain) {
                    node_props_changed(&follower, gain);
                }
            }
        })
        .register();
    node.subscribe_params(&[spa::param::ParamType::Props]);
    *slot.borrow_mut() = Some(BoundNode {
        node,
        _listener: listener,
    });
    // A new node is at 0 dB: one that stays there is left alone (setting its props, even to
    // the same values, changed the samples PipeWire played mid-stream in tests).
    if !shared.gain.load().is_unity() {
        set_node_gain(slot, shared);
    }
}

/// Sets the node's props to the stream's gain cell (nothing until its proxy is bound, which
/// sets them then).
fn set_node_gain(slot: &NodeSlot, shared: &Shared) {
    let slot = slot.borrow();
    let Some(bound) = slot.as_ref() else {
        return;
    };
    let gain = shared.gain.load();
    let pod = match gain_props_pod(gain, shared.channels) {
        Ok(pod) => pod,
        Err(e) => {
            log::warn!("pipewire: {e}");
            return;
        }
    };
    let Some(pod) = spa::pod::Pod::from_bytes(&pod) else {
        return;
    };
    shared.gain_synced.store(false, Ordering::Release);
    bound.node.set_param(spa::param::ParamType::Props, 0, pod);
}

/// The Props object for a gain: every channel's volume the gain's linear factor, the master
/// volume 1, and mute.
fn gain_props_pod(gain: Gain, channels: u32) -> Result<Vec<u8>, String> {
    use spa::pod::{Object, Property, PropertyFlags, Value, ValueArray};
    let property = |key: u32, value: Value| Property {
        key,
        flags: PropertyFlags::empty(),
        value,
    };
    let volumes = vec![gain.volume_amplitude(); channels.max(1) as usize];
    let object = Value::Object(Object {
        type_: spa::sys::SPA_TYPE_OBJECT_Props,
        id: spa::sys::SPA_PARAM_Props,
        properties: vec![
            property(
                spa::sys::SPA_PROP_channelVolumes,
                Value::ValueArray(ValueArray::Float(volumes)),
            ),
            property(spa::sys::SPA_PROP_volume, Value::Float(1.0)),
            property(spa::sys::SPA_PROP_mute, Value::Bool(gain.mute)),
        ],
    });
    Ok(
        spa::pod::serialize::PodSerializer::serialize(std::io::Cursor::new(Vec::new()), &object)
            .map_err(|e| format!("cannot build the volume props: {e:?}"))?
            .0
            .into_inner(),
    )
}

/// The gain a node's Props show: the loudest channel's volume times the master volume, and
/// mute; `None` if they show neither volume nor mute.
fn props_gain(pod: &spa::pod::Pod) -> Option<Gain> {
    use spa::pod::{Value, ValueArray};
    let (_, value) =
        spa::pod::deserialize::PodDeserializer::deserialize_any_from(pod.as_bytes()).ok()?;
    let Value::Object(object) = value else {
        return None;
    };
    let (mut channels, mut master, mut mute) = (None, None, None);
    for property in &object.properties {
        match (property.key, &property.value) {
            (spa::sys::SPA_PROP_channelVolumes, Value::ValueArray(ValueArray::Float(v))) => {
                channels = v.iter().copied().reduce(f32::max);
            }
            (spa::sys::SPA_PROP_volume, Value::Float(v)) => master = Some(*v),
            (spa::sys::SPA_PROP_mute, Value::Bool(m)) => mute = Some(*m),
            _ => {}
        }
    }
    if channels.is_none() && master.is_none() && mute.is_none() {
        return None;
    }
    let amplitude = channels.unwrap_or(1.0) * master.unwrap_or(1.0);
    Some(Gain::from_amplitude(amplitude, mute.unwrap_or(false)))
}

/// The node's props changed: the echo of our own setting, or a change on PipeWire's side,
/// which becomes the stream's gain and is passed to the broker.
fn node_props_changed(shared: &Shared, gain: Gain) {
    let current = shared.gain.load();
    if !shared.gain_synced.load(Ordering::Acquire) {
        // Props from before our setting reached the node are not news.
        if gain == current {
            shared.gain_synced.store(true, Ordering::Release);
        }
        return;
    }
    if gain != current {
        shared.gain.store(gain);
        shared.host_gain_changed.store(true, Ordering::Release);
        shared.signal();
    }
}

/// The PipeWire thread's state: the connection (if any) and every open stream.
#[derive(Default)]
struct Session {
    core: Option<(pw::core::CoreRc, pw::core::Listener)>,
    entries: HashMap<u64, Entry>,
    /// Released streams still playing their tails.
    lingering: Vec<Lingering>,
    /// Set by the core's error callback (which never borrows the session, so it cannot clash
    /// with a borrow held around a PipeWire call); acted on from the supervisor timer.
    lost: Rc<std::cell::Cell<bool>>,
    ticks_since_attempt: u32,
    /// The graph clock's settings the rings are sized for, followed while connected.
    settings: Arc<GraphSettings>,
    /// The daemon's nodes, followed while connected (none while not).
    host_nodes: Option<Arc<HostNodes>>,
    registry: Option<(pw::registry::RegistryRc, pw::registry::Listener)>,
    settings_metadata: SettingsMetadata,
    /// Binds the streams' nodes (for their volume) through `control`.
    binder: Binder,
    control: Option<ControlConnection>,
}

type SettingsMetadata =
    Rc<RefCell<Option<(pw::metadata::Metadata, pw::metadata::MetadataListener)>>>;

/// Follows the daemon's `settings` metadata (the graph clock's rate and quantum limits) into
/// `settings`, binding it when the registry announces it, and its nodes into `host_nodes`.
fn follow_registry(
    core: &pw::core::CoreRc,
    settings: &Arc<GraphSettings>,
    host_nodes: Option<Arc<HostNodes>>,
    bound: &SettingsMetadata,
) -> Result<(pw::registry::RegistryRc, pw::registry::Listener), pw::Error> {
    let registry = core.get_registry_rc()?;
    let weak = registry.downgrade();
    let settings = settings.clone();
    let bound = bound.clone();
    let gone = host_nodes.clone();
    let listener = registry
        .add_listener_local()
        .global(move |global| {
            if global.type_ == pw::types::ObjectType::Node {
                if let Some(nodes) = &host_nodes {
                    let prop = |key: &str| global.props.and_then(|p| p.get(key)).map(String::from);
                    nodes.announced(
                        global.id,
                        HostNode {
                            name: prop("node.name"),
                            serial: prop("object.serial"),
                            class: prop("media.class"),
                        },
                    );
                }
                return;
            }
            let is_settings = global.type_ == pw::types::ObjectType::Metadata
                && global
                    .props
                    .and_then(|p| p.get("metadata.name"))
                    .is_some_and(|name| name == "settings");
            let Some(registry) = weak.upgrade().filter(|_| is_settings) else {
                return;
            };
            let metadata: pw::metadata::Metadata = match registry.bind(global) {
                Ok(m) => m,
                Err(e) => {
                    log::warn!("pipewire: cannot follow the graph's settings: {e}");
                    return;
                }
            };
            let settings = settings.clone();
            let listener = metadata
                .add_listener_local()
                .property(move |subject, key, _type, value| {
                    if subject == pw::core::PW_ID_CORE {
                        settings.update(key, value);
                    }
                    0
                })
                .register();
            *bound.borrow_mut() = Some((metadata, listener));
        })
        .global_remove(move |id| {
            if let Some(nodes) = &gone {
                nodes.removed(id);
            }
        })
        .register();
    Ok((registry, listener))
}

/// The connection that binds the streams' nodes for their volume: a client of its own, as
/// `wpctl` is (a proxy bound through the connection that exports the node makes the daemon
/// stop answering param requests), with a registry that announces the nodes to `binder`.
struct ControlConnection {
    _core: pw::core::CoreRc,
    _registry: pw::registry::RegistryRc,
    _listener: pw::registry::Listener,
}

fn control_connection(
    context: &pw::context::ContextRc,
    binder: &Binder,
) -> Result<ControlConnection, pw::Error> {
    let core = context.connect_rc(None)?;
    let registry = core.get_registry_rc()?;
    let weak = registry.downgrade();
    binder.borrow_mut().registry = Some(registry.downgrade());
    let (announced, removed) = (binder.clone(), binder.clone());
    let listener = registry
        .add_listener_local()
        .global(move |global| {
            if global.type_ != pw::types::ObjectType::Node {
                return;
            }
            if let (Some(registry), Ok(mut binder)) = (weak.upgrade(), announced.try_borrow_mut()) {
                binder.announced(&registry, global.id);
            }
        })
        .global_remove(move |id| {
            if let Ok(mut binder) = removed.try_borrow_mut() {
                binder.removed(id);
            }
        })
        .register();
    Ok(ControlConnection {
        _core: core,
        _registry: registry,
        _listener: listener,
    })
}

impl Session {
    fn connect(
        session: &Rc<RefCell<Session>>,
        context: &pw::context::ContextRc,
        supervisor: &Rc<RefCell<Option<pw::loop_::TimerSource<'static>>>>,
        connected: &Arc<AtomicBool>,
    ) -> Result<(), pw::Error> {
        let core = context.connect_rc(None)?;
        let lost = session.borrow().lost.clone();
        let timer = supervisor.clone();
        let listener = core
            .add_listener_local()
            .error(move |id, _seq, res, message| {
                if id != pw::core::PW_ID_CORE {
                    return;
                }
                log::error!("pipewire: connection lost ({res}: {message}); streams go silent");
                lost.set(true);
                // Tear down at once, from the timer (not from inside the core's own callback).
                if let Ok(timer) = timer.try_borrow() {
                    let Some(timer) = timer.as_ref() else {
                        return;
                    };
                    let _ =
                        timer.update_timer(Some(Duration::from_nanos(1)), Some(SUPERVISOR_TICK));
                }
            })
            .register();
        let mut this = session.borrow_mut();
        *this.binder.borrow_mut() = NodeBinder::default();
        match control_connection(context, &this.binder) {
            Ok(control) => this.control = Some(control),
            Err(e) => log::warn!("pipewire: no control connection, volumes stay as they are: {e}"),
        }
        let host_nodes = this.host_nodes.clone();
        match follow_registry(&core, &this.settings, host_nodes, &this.settings_metadata) {
            Ok(registry) => this.registry = Some(registry),
            Err(e) => log::warn!("pipewire: cannot follow the graph's settings: {e}"),
        }
        let binder = this.binder.clone();
        for (key, entry) in this.entries.iter_mut() {
            let opened = open_stream(
                &core,
                &binder,
                &entry.props,
                &entry.spec,
                entry.rt.clone(),
                &entry.shared,
            );
            match opened {
                Ok(live) => {
                    if entry.stopping.take().is_some() {
                        entry.active = false;
                    }
                    if entry.active {
                        let _ = live.stream.set_active(true);
                    }
                    entry.live = Some(live);
                }
                Err(e) => log::warn!("pipewire: stream {key} not recreated: {e}"),
            }
        }
        this.core = Some((core, listener));
        this.lost.set(false);
        connected.store(true, Ordering::Release);
        Ok(())
    }

    /// Drops the dead connection's streams and core; the entries stay for the reconnect.
    fn disconnect(&mut self, connected: &AtomicBool) {
        connected.store(false, Ordering::Release);
        // A dead daemon plays no tail.
        self.lingering.clear();
        for entry in self.entries.values_mut() {
            entry.live = None;
            if entry.stopping.take().is_some() {
                entry.active = false;
            }
            if let Ok(rt) = entry.rt.lock() {
                rt.port.ring.shared().set_backend_delay(0);
            }
        }
        *self.settings_metadata.borrow_mut() = None;
        if let Some(nodes) = &self.host_nodes {
            nodes.clear();
        }
        *self.binder.borrow_mut() = NodeBinder::default();
        self.control = None;
        self.registry = None;
        self.core = None;
    }
}

fn run_loop(
    receiver: pw::channel::Receiver<Command>,
    connected: Arc<AtomicBool>,
    settings: Arc<GraphSettings>,
    host_nodes: Arc<HostNodes>,
    ready: mpsc::SyncSender<Result<(), String>>,
) {
    pw::init();
    let setup = || -> Result<_, pw::Error> {
        let mainloop = pw::main_loop::MainLoopRc::new(None)?;
        let context = pw::context::ContextRc::new(&mainloop, None)?;
        Ok((mainloop, context))
    };
    let (mainloop, context) = match setup() {
        Ok(parts) => parts,
        Err(e) => {
            let _ = ready.send(Err(format!("cannot start PipeWire: {e}")));
            return;
        }
    };
    // This thread runs until the broker exits: its loop may live for 'static, so that the
    // supervisor timer can be shared with the callbacks that arm it.
    let mainloop: &'static pw::main_loop::MainLoopRc = Box::leak(Box::new(mainloop));
    let session = Rc::new(RefCell::new(Session {
        settings,
        host_nodes: Some(host_nodes),
        ..Session::default()
    }));
    let supervisor: Rc<RefCell<Option<pw::loop_::TimerSource<'static>>>> = Rc::default();
    if let Err(e) = Session::connect(&session, &context, &supervisor, &connected) {
        let _ = ready.send(Err(format!(
            "cannot connect to PipeWire at {}: {e}",
            socket_tried()
        )));
        return;
    }
    let timer = {
        let session = session.clone();
        let supervisor_ref = supervisor.clone();
        let connected = connected.clone();
        let context = context.clone();
        mainloop.loop_().add_timer(move |_expirations| {
            supervise(&session, &context, &supervisor_ref, &connected)
        })
    };
    *supervisor.borrow_mut() = Some(timer);
    let tail_timer: Rc<RefCell<Option<pw::loop_::TimerSource<'static>>>> = Rc::default();
    let timer = {
        let session = session.clone();
        let tail_timer = tail_timer.clone();
        mainloop.loop_().add_timer(move |_expirations| {
            if play_out_tails(&mut session.borrow_mut()) {
                if let Some(timer) = tail_timer.borrow().as_ref() {
                    let _ = timer.update_timer(None, None);
                }
            }
        })
    };
    *tail_timer.borrow_mut() = Some(timer);
    let arm_tails = move || {
        if let Some(timer) = tail_timer.borrow().as_ref() {
            let _ = timer.update_timer(Some(TAIL_POLL), Some(TAIL_POLL));
        }
    };
    let watch_timer: Rc<RefCell<Option<pw::loop_::TimerSource<'static>>>> = Rc::default();
    let timer = {
        let session = session.clone();
        let watch_timer = watch_timer.clone();
        mainloop.loop_().add_timer(move |_expirations| {
            let next = watch(&mut session.borrow_mut());
            if let Some(timer) = watch_timer.borrow().as_ref() {
                // One-shot: `watch` says when it must look again.
                let _ = timer.update_timer(next, None);
            }
        })
    };
    *watch_timer.borrow_mut() = Some(timer);
    let arm_watch = move || {
        if let Some(timer) = watch_timer.borrow().as_ref() {
            let _ = timer.update_timer(Some(WATCH_TICK), None);
        }
    };
    let table = session.clone();
    let _attached = receiver.attach(mainloop.loop_(), move |command| match command {
        Command::Open(request) => {
            let OpenRequest {
                key,
                props,
                spec,
                rt,
                reply,
            } = *request;
            let ring_frames = rt.port.ring.shared().capacity() / rt.frame_bytes.max(1) as u64;
            let shared = rt.shared.clone();
            let rt = Arc::new(Mutex::new(rt));
            let mut session = table.borrow_mut();
            let result = match &session.core {
                Some((core, _)) if !session.lost.get() => {
                    open_stream(core, &session.binder, &props, &spec, rt.clone(), &shared)
                }
                _ => Err("PipeWire is not connected".to_string()),
            };
            let _ = reply.send(result.as_ref().map(|_| ()).map_err(|e| e.clone()));
            if let Ok(live) = result {
                let entry = Entry {
                    stall_limit: stall_limit(&spec.params),
                    props,
                    spec,
                    rt,
                    shared,
                    active: false,
                    live: Some(live),
                    stopping: None,
                    ring_frames,
                    quantum_warned: false,
                    fallback: None,
                    log_limit: LogLimiter::new(4, Duration::from_secs(10)),
                };
                session.entries.insert(key, entry);
            }
        }
        Command::SetGain { key } => {
            let session = table.borrow();
            if let Some(entry) = session.entries.get(&key) {
                entry.shared.gain_pending.store(false, Ordering::Release);
                if let Some(live) = &entry.live {
                    set_node_gain(&live.node, &entry.shared);
                }
            }
        }
        Command::Start { key } => {
            if let Some(entry) = table.borrow_mut().entries.get_mut(&key) {
                // A stream still playing its tail is active already and just goes on.
                entry.stopping = None;
                entry.active = true;
                entry.fallback = None;
                if let Some(live) = &entry.live {
                    if let Err(e) = live.stream.set_active(true) {
                        log::warn!("pipewire: set_active(true): {e}");
                    }
                }
                arm_watch();
            }
        }
        Command::Stop { key } => {
            let mut session = table.borrow_mut();
            let Some(entry) = session.entries.get_mut(&key) else {
                return;
            };
            if !entry.active || entry.stopping.is_some() {
                return;
            }
            if entry.plays_out() {
                entry.stopping = Some(std::time::Instant::now());
                arm_tails();
                return;
            }
            entry.active = false;
            if let Some(live) = &entry.live {
                if let Err(e) = live.stream.set_active(false) {
                    log::warn!("pipewire: set_active(false): {e}");
                }
            }
        }
        Command::Close { key } => {
            let mut session = table.borrow_mut();
            let Some(entry) = session.entries.remove(&key) else {
                return;
            };
            let plays_out = entry.plays_out();
            let Some(live) = entry.live else {
                return;
            };
            if !entry.active {
                let _ = live.stream.disconnect();
                return;
            }
            let client_id = entry.spec.client_id;
            // Only tails count: an inactive stream is gone within INACTIVE_BEFORE_DESTROY.
            let in_tail = |l: &Lingering| l.client_id == client_id && l.inactive_since.is_none();
            if session.lingering.iter().filter(|l| in_tail(l)).count() >= MAX_LINGERING_PER_CLIENT {
                if let Some(oldest) = session.lingering.iter_mut().find(|l| in_tail(l)) {
                    oldest.deactivate();
                    log_tail(
                        oldest.key,
                        oldest.since,
                        false,
                        "went inactive to be destroyed (too many lingering)",
                    );
                }
            }
            let mut lingering = Lingering {
                key,
                client_id,
                live,
                shared: entry.shared,
                since: entry.stopping.unwrap_or_else(std::time::Instant::now),
                inactive_since: None,
                _rt: entry.rt,
            };
            // A capture stream has no tail to play.
            if !plays_out {
                lingering.deactivate();
            }
            session.lingering.push(lingering);
            arm_tails();
        }
    });
    let _ = ready.send(Ok(()));
    mainloop.run();
}

impl Entry {
    /// Why PipeWire runs none of the stream's cycles, as far as it tells us.
    fn unscheduled_reason(&self) -> String {
        let Some(live) = &self.live else {
            return "the daemon is away".into();
        };
        let state = live.state.lock().map(|s| s.clone()).unwrap_or_default();
        let node = live.stream.node_id();
        let hint = if state == "paused" {
            ": the node is not linked to a running driver (no session manager, its target \
             gone, unlinked, or the graph suspended)"
        } else {
            ""
        };
        format!("node {node} is {state}{hint}")
    }

    /// Warns once if PipeWire asks for more frames a cycle than the ring holds (a quantum
    /// pinned after the stream was prepared): the stream then underruns every cycle.
    fn check_quantum(&mut self, key: u64) {
        let asked = self.shared.largest_request.load(Ordering::Acquire);
        if !self.quantum_warned && asked > self.ring_frames {
            self.quantum_warned = true;
            log::warn!(
                "pipewire: stream {key}: the graph asks for {asked} frames a cycle, more than \
                 its ring's {} (prepared for a smaller quantum): it underruns until the guest \
                 prepares it again",
                self.ring_frames
            );
        }
    }
}

/// The watchdog timer: runs while a stream runs. Puts a running stream PipeWire runs no cycle
/// of into silence (see [`stall_limit`]), moves that silence, and hands the stream back once
/// PipeWire runs it again. Returns when it must look again: at the earliest moment a stream
/// that PipeWire runs could reach its stall limit, or in a [`WATCH_TICK`] while one plays
/// into silence; `None` once no stream runs (then the timer disarms). So while PipeWire runs
/// every stream, the watchdog wakes the thread about once per stall limit, not every tick.
fn watch(session: &mut Session) -> Option<Duration> {
    crate::realtime::take_data_thread_report();
    let now_ns = monotonic_ns();
    let now = std::time::Instant::now();
    let mut any_running = false;
    let mut next = Duration::MAX;
    for (&key, entry) in session.entries.iter_mut() {
        let shared = entry.shared.clone();
        if !shared.running.load(Ordering::Acquire) {
            entry.fallback = None;
            continue;
        }
        any_running = true;
        entry.check_quantum(key);
        match &entry.fallback {
            Some(fallback) if shared.cycles.load(Ordering::Acquire) != fallback.cycles => {
                let ms = fallback.since.elapsed().as_secs_f64() * 1000.0;
                if entry.log_limit.admit(now) {
                    log::info!(
                        "pipewire: stream {key} scheduled again after {ms:.0} ms in silence"
                    );
                }
                entry.fallback = None;
                // Looked at again within a tick, from its new last cycle.
                next = next.min(WATCH_TICK);
                continue;
            }
            Some(_) => {}
            None => {
                let last = shared
                    .last_cycle_ns
                    .load(Ordering::Acquire)
                    .max(shared.started_ns.load(Ordering::Acquire));
                let stalled = Duration::from_nanos(now_ns.saturating_sub(last));
                if stalled < entry.stall_limit {
                    next = next.min(entry.stall_limit - stalled);
                    continue;
                }
                if entry.log_limit.admit(now) {
                    let since = if shared.last_cycle_ns.load(Ordering::Acquire)
                        < shared.started_ns.load(Ordering::Acquire)
                    {
                        "START"
                    } else {
                        "its last cycle"
                    };
                    log::warn!(
                        "pipewire: stream {key} not scheduled by PipeWire for {:.0} ms since \
                         {since} (PipeWire says: {}); playing it into silence at the real-time \
                         pace until PipeWire runs it again",
                        stalled.as_secs_f64() * 1000.0,
                        entry.unscheduled_reason()
                    );
                }
                entry.fallback = Some(Fallback {
                    since: now,
                    cycles: shared.cycles.load(Ordering::Acquire),
                });
                shared.xruns.fetch_add(1, Ordering::AcqRel);
                shared.signal();
            }
        }
        // Taken only while no cycle runs (but for the instant PipeWire comes back, when that
        // cycle skips): the callback never waits for it.
        if let Ok(mut rt) = entry.rt.lock() {
            rt.silence_tick(now_ns);
        }
        next = next.min(WATCH_TICK);
    }
    for entry in session.entries.values_mut() {
        entry.log_limit.report_if_due(now);
    }
    any_running.then(|| next.max(WATCH_MIN_WAIT))
}

/// The tail timer: runs only while a stream plays out its tail. Deactivates stopped streams
/// and destroys released ones whose tails are played. Returns whether none is left (then the
/// timer disarms).
fn play_out_tails(session: &mut Session) -> bool {
    for (key, entry) in session.entries.iter_mut() {
        let Some(since) = entry.stopping else {
            continue;
        };
        let Some(played) = tail_played(&entry.shared, since) else {
            continue;
        };
        entry.stopping = None;
        entry.active = false;
        if let Some(live) = &entry.live {
            if let Err(e) = live.stream.set_active(false) {
                log::warn!("pipewire: set_active(false): {e}");
            }
        }
        log_tail(*key, since, played, "went inactive");
    }
    session.lingering.retain_mut(|lingering| {
        if let Some(inactive_since) = lingering.inactive_since {
            if inactive_since.elapsed() < INACTIVE_BEFORE_DESTROY {
                return true;
            }
            let _ = lingering.live.stream.disconnect();
            return false;
        }
        let Some(played) = tail_played(&lingering.shared, lingering.since) else {
            return true;
        };
        lingering.deactivate();
        log_tail(
            lingering.key,
            lingering.since,
            played,
            "went inactive to be destroyed",
        );
        true
    });
    session.lingering.is_empty() && session.entries.values().all(|e| e.stopping.is_none())
}

/// The supervisor timer: runs only while PipeWire is away (armed by the core's error callback).
/// Tears the dead connection down and reconnects when the daemon is back (meanwhile the
/// watchdog keeps running streams in silence).
fn supervise(
    session: &Rc<RefCell<Session>>,
    context: &pw::context::ContextRc,
    supervisor: &Rc<RefCell<Option<pw::loop_::TimerSource<'static>>>>,
    connected: &Arc<AtomicBool>,
) {
    {
        let mut this = session.borrow_mut();
        if this.lost.get() && this.core.is_some() {
            this.disconnect(connected);
            this.ticks_since_attempt = 0;
        }
        this.ticks_since_attempt += 1;
        if this.ticks_since_attempt < RECONNECT_TICKS {
            return;
        }
        this.ticks_since_attempt = 0;
    }
    match Session::connect(session, context, supervisor, connected) {
        Ok(()) => {
            log::info!("pipewire: reconnected; streams restored");
            if let Some(timer) = supervisor.borrow().as_ref() {
                let _ = timer.update_timer(None, None);
            }
        }
        Err(e) => log::debug!("pipewire: still away ({e})"),
    }
}

/// A node's name and description: the config's (with `{vm}` replaced), else
/// `vsound.VM.STREAM` and `vsound VM STREAM`. Named after the VM, not the broker's connection
/// number, so that they survive worker restarts (a session manager's routing rules match them).
fn node_names(props: &NodeProps, vm: VmName) -> (String, String) {
    let fill = |text: &Option<String>| text.as_ref().map(|t| t.replace("{vm}", vm.as_str()));
    (
        fill(&props.node_name).unwrap_or_else(|| format!("vsound.{vm}.{}", props.stream_name)),
        fill(&props.description).unwrap_or_else(|| format!("vsound {vm} {}", props.stream_name)),
    )
}

fn open_stream(
    core: &pw::core::CoreRc,
    binder: &Binder,
    props: &NodeProps,
    spec: &StreamSpec,
    rt: Arc<Mutex<RtState>>,
    shared: &Arc<Shared>,
) -> Result<LiveStream, String> {
    let params = &spec.params;
    let output = spec.direction == D_OUTPUT;
    let (node_name, description) = node_names(props, spec.vm);
    let mut properties = pw::properties::properties! {
        *pw::keys::MEDIA_TYPE => "Audio",
        *pw::keys::MEDIA_CATEGORY => if output { "Playback" } else { "Capture" },
        *pw::keys::NODE_NAME => node_name.as_str(),
        *pw::keys::NODE_DESCRIPTION => description.as_str(),
        *pw::keys::APP_NAME => "vsound",
        // For the session manager's rules: which VM, whatever the node is called.
        "vsound.vm" => spec.vm.as_str(),
        "vsound.stream" => props.stream_name.as_str(),
        // The graph's quantum follows the guest's period.
        *pw::keys::NODE_LATENCY => format!("{}/{}", params.period_frames(), params.rate_hz()).as_str(),
    };
    if let Some(role) = &props.media_role {
        properties.insert(*pw::keys::MEDIA_ROLE, role.as_str());
    }
    // The volume is the guest's controls and the host's changes to this node: a session
    // manager's restored one would be a single saved value for every vsound node (its key is
    // the application name, the same for every VM and bus), and it would save each guest's.
    properties.insert("state.restore-props", "false");
    if let Some(target) = &props.target {
        properties.insert(*pw::keys::TARGET_OBJECT, target.as_str());
    }
    if props.capture_sink && !output {
        properties.insert("stream.capture.sink", "true");
    }
    let stream = pw::stream::StreamRc::new(core.clone(), &node_name, properties)
        .map_err(|e| format!("cannot create a PipeWire stream: {e}"))?;
    let state = Arc::new(Mutex::new(String::from("connecting")));
    let state_seen = state.clone();
    let name = node_name.clone();
    let node: NodeSlot = Rc::default();
    let node_slot = node.clone();
    let binder = binder.clone();
    let shared = shared.clone();
    let listener = stream
        .add_local_listener_with_user_data(rt)
        .state_changed(move |stream, _rt, old, new| {
            // The node has its id once the stream is paused: its proxy carries the volume.
            let bound = node_slot.borrow().is_some();
            let paused = matches!(
                new,
                pw::stream::StreamState::Paused | pw::stream::StreamState::Streaming
            );
            if !bound && paused && stream.node_id() != spa::sys::SPA_ID_INVALID {
                if let Ok(mut binder) = binder.try_borrow_mut() {
                    binder.request(stream.node_id(), &node_slot, &shared);
                }
            }
            // Emitted on the PipeWire thread's loop, never in the real-time callback.
            let new = match new {
                pw::stream::StreamState::Error(message) => format!("in error ({message})"),
                pw::stream::StreamState::Unconnected => "unconnected".into(),
                pw::stream::StreamState::Connecting => "connecting".into(),
                pw::stream::StreamState::Paused => "paused".into(),
                pw::stream::StreamState::Streaming => "streaming".into(),
            };
            log::debug!("pipewire: node {name:?} went from {old:?} to {new}");
            if let Ok(mut state) = state_seen.lock() {
                *state = new;
            }
        })
        .process(move |stream, rt| {
            // Uncontended but for the instant the stream is torn down: never waits.
            let Ok(mut rt) = rt.try_lock() else {
                return;
            };
            if output {
                rt.process_playback(stream)
            } else {
                rt.process_capture(stream)
            }
        })
        .register()
        .map_err(|e| format!("cannot listen to the PipeWire stream: {e}"))?;
    let pod = format_pod(params, &props.layouts)?;
    let mut pods = [spa::pod::Pod::from_bytes(&pod).ok_or("bad format pod")?];
    stream
        .connect(
            if output {
                spa::utils::Direction::Output
            } else {
                spa::utils::Direction::Input
            },
            None,
            pw::stream::StreamFlags::AUTOCONNECT
                | pw::stream::StreamFlags::MAP_BUFFERS
                | pw::stream::StreamFlags::RT_PROCESS
                | pw::stream::StreamFlags::INACTIVE,
            &mut pods,
        )
        .map_err(|e| format!("cannot connect the PipeWire stream: {e}"))?;
    Ok(LiveStream {
        stream,
        _listener: listener,
        state,
        node,
    })
}

fn format_pod(params: &PcmParams, layouts: &[Vec<u8>]) -> Result<Vec<u8>, String> {
    let mut info = AudioInfoRaw::new();
    info.set_format(spa_format(params.format).ok_or("format not supported by PipeWire")?);
    info.set_rate(params.rate_hz());
    info.set_channels(u32::from(params.channels));
    let mut position = [0u32; spa::param::audio::MAX_CHANNELS];
    let channels = usize::from(params.channels);
    let chosen: Vec<u8> = if let Some(layout) = layouts.iter().find(|l| l.len() == channels) {
        layout.clone()
    } else if channels == 1 {
        vec![chmap::MONO]
    } else if channels == 2 {
        vec![chmap::FL, chmap::FR]
    } else {
        Vec::new()
    };
    for (slot, &p) in position.iter_mut().zip(&chosen) {
        *slot = spa_position(p);
    }
    if !chosen.is_empty() {
        info.set_position(position);
    }
    let bytes = spa::pod::serialize::PodSerializer::serialize(
        std::io::Cursor::new(Vec::new()),
        &spa::pod::Value::Object(spa::pod::Object {
            type_: spa::sys::SPA_TYPE_OBJECT_Format,
            id: spa::sys::SPA_PARAM_EnumFormat,
            properties: info.into(),
        }),
    )
    .map_err(|e| format!("cannot build the format: {e:?}"))?
    .0
    .into_inner();
    Ok(bytes)
}

/// The backend for one configured stream.
pub struct PipewireBackend {
    pub thread: Arc<PipewireThread>,
    pub props: NodeProps,
}

impl Backend for PipewireBackend {
    fn name(&self) -> &'static str {
        "pipewire"
    }

    fn caps(&self, offered: &PcmCaps) -> PcmCaps {
        super::caps_with_formats(offered, |f| spa_format(f).is_some())
    }

    fn ring_bytes(&self, params: &PcmParams) -> u64 {
        ring_bytes_for(params, self.thread.settings.quantum_frames(params))
    }

    fn host_present(&self, direction: u8) -> bool {
        let to_sink = direction == D_OUTPUT || self.props.capture_sink;
        self.thread.is_connected()
            && self
                .thread
                .host_nodes
                .has_end(self.props.target.as_deref(), to_sink)
    }

    fn open(
        &self,
        spec: &StreamSpec,
        port: RingPort,
    ) -> Result<Box<dyn BackendStream>, BackendError> {
        if !self.thread.is_connected() {
            return Err(BackendError::Io(io::Error::other(
                "PipeWire is not connected",
            )));
        }
        let wake =
            eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).map_err(io::Error::from)?;
        let shared = Arc::new(Shared {
            running: AtomicBool::new(false),
            started_ns: AtomicU64::new(0),
            cycles: AtomicU64::new(0),
            last_cycle_ns: AtomicU64::new(0),
            largest_request: AtomicU64::new(0),
            silent_quanta: AtomicU64::new(0),
            silent_frames: AtomicU64::new(0),
            tail_frames: u64::from(spec.params.rate_hz()) * TAIL_MIN.as_millis() as u64 / 1000,
            xruns: AtomicU64::new(0),
            violation: AtomicBool::new(false),
            wake,
            gain: port.gain.clone(),
            channels: u32::from(spec.params.channels),
            gain_pending: AtomicBool::new(false),
            gain_synced: AtomicBool::new(false),
            host_gain_changed: AtomicBool::new(false),
        });
        let key = self.thread.next_key.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = mpsc::sync_channel(1);
        let rt = RtState {
            port,
            shared: shared.clone(),
            frame_bytes: spec.params.frame_bytes() as usize,
            rate: spec.params.rate_hz(),
            xrun: XrunEdge::default(),
            clock: StreamClock::default(),
        };
        self.thread
            .send(Command::Open(Box::new(OpenRequest {
                key,
                props: self.props.clone(),
                spec: *spec,
                rt,
                reply,
            })))
            .map_err(io::Error::other)?;
        // On an opener thread (`crate::opener`): no longer than the broker waits for it.
        answer
            .recv_timeout(crate::opener::OPEN_DEADLINE)
            .map_err(|_| io::Error::other("PipeWire did not create the stream in time"))?
            .map_err(io::Error::other)?;
        Ok(Box::new(PipewireStream {
            thread: self.thread.clone(),
            key,
            shared,
            xruns_seen: 0,
        }))
    }
}

/// The broker's handle on a PipeWire stream.
struct PipewireStream {
    thread: Arc<PipewireThread>,
    key: u64,
    shared: Arc<Shared>,
    xruns_seen: u64,
}

impl BackendStream for PipewireStream {
    fn start(&mut self) -> io::Result<()> {
        if self.shared.violation.load(Ordering::Acquire) {
            return Err(io::Error::other("stream failed"));
        }
        self.shared.silent_quanta.store(0, Ordering::Release);
        self.shared.silent_frames.store(0, Ordering::Release);
        // Before `running`: a cycle that sees the stream running sees its START.
        self.shared
            .started_ns
            .store(monotonic_ns(), Ordering::Release);
        self.shared.running.store(true, Ordering::Release);
        self.thread
            .send(Command::Start { key: self.key })
            .map_err(io::Error::other)
    }

    fn stop(&mut self) -> io::Result<()> {
        self.shared.running.store(false, Ordering::Release);
        self.thread
            .send(Command::Stop { key: self.key })
            .map_err(io::Error::other)
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
        let gain = self
            .shared
            .host_gain_changed
            .swap(false, Ordering::AcqRel)
            .then(|| self.shared.gain.load());
        Ok(Wake { xrun, gain })
    }

    fn gain_changed(&mut self) {
        // The broker stored the new gain in the cell; the PipeWire thread sets the node's
        // props from it (once for a burst).
        if !self.shared.gain_pending.swap(true, Ordering::AcqRel) {
            let _ = self.thread.send(Command::SetGain { key: self.key });
        }
    }
}

impl Drop for PipewireStream {
    fn drop(&mut self) {
        self.shared.running.store(false, Ordering::Release);
        let _ = self.thread.send(Command::Close { key: self.key });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_snd::protocol::rate;

    /// 48 kHz stereo S16 with `period` frames, `periods` of them.
    fn params(period: u32, periods: u32) -> PcmParams {
        PcmParams {
            buffer_bytes: period * 4 * periods,
            period_bytes: period * 4,
            features: 0,
            channels: 2,
            format: format::S16,
            rate: rate::R48000,
        }
    }

    #[test]
    fn node_names_come_from_the_vm_name() {
        let vm = VmName::new("navi").unwrap();
        let mut props = NodeProps {
            stream_name: "media".into(),
            ..NodeProps::default()
        };
        assert_eq!(
            node_names(&props, vm),
            (
                "vsound.navi.media".to_string(),
                "vsound navi media".to_string()
            )
        );
        props.node_name = Some("{vm}-bus0".into());
        props.description = Some("Media of {vm}".into());
        assert_eq!(
            node_names(&props, vm),
            ("navi-bus0".to_string(), "Media of navi".to_string())
        );
        props.node_name = Some("fixed".into());
        assert_eq!(node_names(&props, vm).0, "fixed");
    }

    #[test]
    fn a_pinned_quantum_sizes_the_ring_for_a_quantum_and_a_period() {
        let settings = GraphSettings::default();
        let p = params(264, 8);
        // Unpinned: the graph follows the period, and the broker's lookahead is enough.
        assert_eq!(settings.quantum_frames(&p), 264);
        assert!(ring_bytes_for(&p, 264) <= 3 * 264 * 4);
        settings.update(Some("clock.force-quantum"), Some("1024"));
        assert_eq!(settings.quantum_frames(&p), 1024);
        // ceil(1024 / 264) = 4 periods, and one more.
        assert_eq!(ring_bytes_for(&p, 1024), 5 * 264 * 4);
        settings.update(Some("clock.force-quantum"), Some("0"));
        settings.update(Some("clock.min-quantum"), Some("512"));
        assert_eq!(settings.quantum_frames(&p), 512);
        // A 96 kHz graph runs a 1024 quantum in 512 of a 48 kHz stream's frames.
        settings.update(Some("clock.rate"), Some("96000"));
        settings.update(Some("clock.force-quantum"), Some("1024"));
        assert_eq!(settings.quantum_frames(&p), 512);
        settings.update(None, None);
        assert_eq!(settings.quantum_frames(&p), 264);
    }

    #[test]
    fn the_stall_limit_leaves_a_late_cycle_alone_but_never_the_guests_patience() {
        let ms = |d: Duration| d.as_millis();
        // Small buffers: the guest waits 100 ms for a completion.
        assert_eq!(ms(stall_limit(&params(480, 4))), 70);
        assert_eq!(ms(stall_limit(&params(264, 4))), 70);
        // A 320 ms buffer: 1.1 x 320 ms.
        assert_eq!(ms(stall_limit(&params(7680, 2))), 322);
    }
}
