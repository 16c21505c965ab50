//! Audio backends of the broker, behind one trait.
//!
//! A backend opens a [`BackendStream`] at every PREPARE and is handed the broker's end of the
//! stream's ring ([`RingPort`]). Whatever clock drives the backend moves frames through the ring
//! and wakes the worker (a [`WakeSender`], which never blocks). `null` and `wav` are driven by
//! the broker's own timer ([`clocked`]); real audio backends are driven by their device's clock
//! (ALSA's is polled by a timer too). Timer-driven streams run on the broker's timer thread while
//! they play ([`clocked::TimerThread`]).

use std::collections::HashMap;
use std::io;
use std::os::fd::BorrowedFd;

use std::sync::Arc;

use virtio_snd::control::{PcmCaps, PcmParams};
use vsound_config::{BackendKind, Config, StreamConfig, VmName};
use vsound_shared::ring::{Consumer, Producer, RingError, SharedRing, WakeSender};

pub mod alsa;
pub mod clocked;
pub mod gain;
pub mod gstreamer;
pub mod host_nodes;
pub mod null;
pub mod pipewire;
pub mod wav;

/// What the broker tells a backend about a stream it opens.
#[derive(Debug, Clone, Copy)]
pub struct StreamSpec {
    pub client_id: u32,
    /// The VM's name (checked at Hello): node names and WAV file names are made from it.
    pub vm: VmName,
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

/// The broker's end of a stream's ring.
pub enum StreamRing {
    /// Playback: the worker produces, the backend consumes.
    Playback(Consumer),
    /// Capture: the backend produces, the worker consumes.
    Capture(Producer),
}

impl StreamRing {
    pub fn shared(&self) -> &SharedRing {
        match self {
            StreamRing::Playback(c) => c.ring(),
            StreamRing::Capture(p) => p.ring(),
        }
    }
}

/// Everything a backend stream needs to move frames: the ring, the worker's wake-up, and the
/// stream's volume and mute (which the broker may change while it plays).
pub struct RingPort {
    pub ring: StreamRing,
    notify: WakeSender,
    pub gain: Arc<gain::GainCell>,
    /// The worker's last wake-up request that was answered (see [`RingPort::moved`]).
    woken_for: Option<u64>,
}

impl RingPort {
    pub fn new(ring: StreamRing, notify: WakeSender) -> RingPort {
        RingPort {
            ring,
            notify,
            gain: Arc::default(),
            woken_for: None,
        }
    }

    /// The gain the broker keeps for the stream (unity otherwise).
    pub fn with_gain(self, gain: Arc<gain::GainCell>) -> RingPort {
        RingPort { gain, ..self }
    }

    /// The backend moved the ring: wakes the worker if its position reached the one the
    /// worker asked for ([`SharedRing::wake_at`]), once per request, so a worker is woken when
    /// a buffer of its completes, not on every cycle. Never blocks whatever the worker did to
    /// its end or its request, and makes no allocation, so it is safe on a real-time thread.
    pub fn moved(&mut self) {
        let position = match &self.ring {
            StreamRing::Playback(consumer) => consumer.read_pos(),
            StreamRing::Capture(producer) => producer.write_pos(),
        };
        let wanted = self.ring.shared().wake_at();
        if position >= wanted && self.woken_for != Some(wanted) {
            self.woken_for = Some(wanted);
            self.notify.wake();
        }
    }
}

/// What a wake-up produced, for the broker to pass on to the worker.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Wake {
    /// An under- or overrun began.
    pub xrun: bool,
    /// The host changed the stream's volume or mute (PipeWire's node props).
    pub gain: Option<virtio_snd::ctl::Gain>,
}

/// What a backend with a thread of its own (PipeWire, GStreamer) reported through its eventfd
/// `wake`: clears it, fails on a ring violation, and tells whether xruns were counted since
/// `seen` (which it updates).
fn take_thread_report(
    wake: &std::os::fd::OwnedFd,
    violation: &std::sync::atomic::AtomicBool,
    xruns: &std::sync::atomic::AtomicU64,
    seen: &mut u64,
) -> Result<bool, RingError> {
    use std::sync::atomic::Ordering;
    let mut counter = [0u8; 8];
    let _ = rustix::io::read(wake, &mut counter);
    if violation.load(Ordering::Acquire) {
        return Err(RingError::Access(
            "the worker broke the ring protocol".into(),
        ));
    }
    let now = xruns.load(Ordering::Acquire);
    let xrun = now != *seen;
    *seen = now;
    Ok(xrun)
}

/// Turns "the ring ran short this tick" into xrun reports: one per episode, on its first tick.
#[derive(Debug, Clone, Copy)]
pub struct XrunEdge {
    flowing: bool,
}

impl Default for XrunEdge {
    fn default() -> Self {
        XrunEdge { flowing: true }
    }
}

impl XrunEdge {
    /// Whether an xrun begins with this tick.
    pub fn update(&mut self, short: bool) -> bool {
        let begins = short && self.flowing;
        self.flowing = !short;
        begins
    }
}

/// A configured backend for one stream slot. Shared with the threads that open its streams
/// (`crate::opener`).
pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;
    /// Narrows the config's offer to what this backend really accepts.
    fn caps(&self, offered: &PcmCaps) -> PcmCaps;
    /// The smallest ring a stream of `params` needs, in bytes, beyond the broker's own
    /// lookahead (a backend whose device takes more than a few periods at once says so).
    fn ring_bytes(&self, params: &PcmParams) -> u64 {
        let _ = params;
        0
    }
    fn open(
        &self,
        spec: &StreamSpec,
        port: RingPort,
    ) -> Result<Box<dyn BackendStream>, BackendError>;
    /// Whether a stream of `direction` has a host end to play to or record from (the jacks
    /// that follow the stream show it). Cheap: the broker's loop asks on every change.
    fn host_present(&self, direction: u8) -> bool {
        let _ = direction;
        true
    }
}

/// The offer narrowed to the sample formats a backend carries (`supports` per virtio format).
fn caps_with_formats(offered: &PcmCaps, supports: impl Fn(u8) -> bool) -> PcmCaps {
    let formats = (0..=virtio_snd::protocol::format::MAX)
        .filter(|&f| supports(f))
        .fold(0u64, |m, f| m | (1 << f));
    PcmCaps {
        formats: offered.formats & formats,
        ..*offered
    }
}

/// One open stream.
pub trait BackendStream: Send {
    fn start(&mut self) -> io::Result<()>;
    fn stop(&mut self) -> io::Result<()>;
    /// The fd the broker watches for this stream; when readable it calls [`on_wake`].
    ///
    /// [`on_wake`]: BackendStream::on_wake
    fn wake_fd(&self) -> BorrowedFd<'_>;
    /// Whether the stream is paced by its `wake_fd` timer (null, wav, ALSA): then it runs on
    /// the broker's timer thread ([`clocked::TimerThread`]) while it plays, and `on_wake` must
    /// allocate nothing and wait on nothing. Otherwise (PipeWire) `on_wake` runs on the broker's
    /// loop and only reports what the backend's own thread did.
    fn timer_driven(&self) -> bool {
        false
    }
    /// Does the work that is due. A ring error means the worker broke the ring protocol.
    fn on_wake(&mut self) -> Result<Wake, RingError>;
    /// The stream's gain cell changed: a backend with a mixer of its own (PipeWire) applies it
    /// there; the others read the cell as they move frames, so they need not be told.
    fn gain_changed(&mut self) {}
}

/// The backends of one layout, one per stream slot.
pub type Backends = Vec<Arc<dyn Backend>>;

/// The backends of every layout of the config.
pub struct LayoutBackends {
    /// The default (top-level) layout's.
    pub default: Backends,
    /// Those of each VM whose `[vms.NAME]` table has streams or channel maps of its own (the
    /// others share the default's).
    pub vms: HashMap<String, Backends>,
    /// PipeWire's nodes, whose changes change the PipeWire streams' host presence.
    pub host_nodes: Option<Arc<host_nodes::HostNodes>>,
}

/// Builds the backend each configured stream of every layout asks for. `auto` streams get
/// PipeWire when a daemon answers, otherwise ALSA's default PCM if it opens, otherwise `null`
/// (and the choice is logged); an explicit `pipewire` stream needs the daemon.
pub fn build(config: &Config) -> Result<LayoutBackends, String> {
    let wants = |kind| config.all_streams().any(|s| s.backend == kind);
    let mut no_pipewire = None;
    let pipewire_thread = if wants(BackendKind::Pipewire) || wants(BackendKind::Auto) {
        match pipewire::PipewireThread::start() {
            Ok(thread) => Some(thread),
            Err(e) if wants(BackendKind::Pipewire) => return Err(e),
            Err(e) => {
                no_pipewire = Some(e);
                None
            }
        }
    } else {
        None
    };
    let auto_alsa = pipewire_thread.is_none() && wants(BackendKind::Auto) && alsa::probe("default");
    if wants(BackendKind::Auto) {
        let why = no_pipewire.unwrap_or_default();
        match (pipewire_thread.is_some(), auto_alsa) {
            (true, _) => log::info!("backends: auto streams use PipeWire"),
            (false, true) => log::info!("backends: auto streams use ALSA's default PCM ({why})"),
            (false, false) => log::info!(
                "backends: auto streams use null ({why}; ALSA's default PCM does not open)"
            ),
        }
    }
    let layout = |config: &Config| -> Backends {
        config
            .streams
            .iter()
            .map(|stream| for_stream(config, stream, pipewire_thread.as_ref(), auto_alsa))
            .collect()
    };
    let mut vms = HashMap::new();
    for (name, vm) in &config.vms {
        if !vm.has_own_backends() {
            continue;
        }
        // Validated at load: every key is a VM name.
        if let Ok(vm_name) = VmName::new(name) {
            vms.insert(name.clone(), layout(&config.for_vm(&vm_name)));
        }
    }
    Ok(LayoutBackends {
        default: layout(config),
        vms,
        host_nodes: pipewire_thread.as_ref().map(|t| t.host_nodes.clone()),
    })
}

fn for_stream(
    config: &Config,
    stream: &StreamConfig,
    pipewire_thread: Option<&Arc<pipewire::PipewireThread>>,
    auto_alsa: bool,
) -> Arc<dyn Backend> {
    let kind = match stream.backend {
        BackendKind::Auto if pipewire_thread.is_some() => BackendKind::Pipewire,
        BackendKind::Auto if auto_alsa => BackendKind::Alsa,
        BackendKind::Auto => BackendKind::Null,
        kind => kind,
    };
    let layouts = || {
        config
            .chmaps
            .iter()
            .filter(|c| c.direction == stream.direction && c.hda_fn_nid == stream.hda_fn_nid)
            .map(|c| c.position_values())
            .collect()
    };
    match (kind, pipewire_thread) {
        (BackendKind::Gstreamer, _) => Arc::new(gstreamer::GstreamerBackend {
            description: stream.gst_pipeline_or_default().to_string(),
            stream_name: stream.name.clone(),
            layouts: layouts(),
        }),
        (BackendKind::Wav, _) => Arc::new(wav::WavBackend {
            path_template: stream.wav_path.clone().unwrap_or_default(),
        }),
        (BackendKind::Alsa, _) => Arc::new(alsa::AlsaBackend::new(
            stream
                .alsa_device
                .clone()
                .unwrap_or_else(|| "default".into()),
            stream.direction.wire(),
        )),
        (BackendKind::Pipewire, Some(thread)) => {
            let layouts = layouts();
            Arc::new(pipewire::PipewireBackend {
                thread: thread.clone(),
                props: pipewire::NodeProps {
                    node_name: stream.node_name.clone(),
                    description: stream.node_description.clone(),
                    media_role: stream.media_role.clone(),
                    target: stream.target_object.clone(),
                    capture_sink: stream.capture_sink,
                    layouts,
                    stream_name: stream.name.clone(),
                },
            })
        }
        _ => Arc::new(null::NullBackend),
    }
}

#[cfg(test)]
mod xrun_tests {
    use super::XrunEdge;

    #[test]
    fn an_xrun_is_reported_once_per_episode() {
        let mut edge = XrunEdge::default();
        let ticks = [false, true, true, false, true, false, false];
        let reported: Vec<bool> = ticks.iter().map(|&short| edge.update(short)).collect();
        assert_eq!(reported, [false, true, false, false, true, false, false]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::{AsFd, OwnedFd};
    use vsound_shared::ring::take_wakeup;

    /// Whether a wake-up waits on the worker's end; reads it if so.
    fn woken(worker_end: &OwnedFd) -> bool {
        let mut fds = [PollFd::new(worker_end.as_fd(), PollFlags::POLLIN)];
        let ready = poll(&mut fds, PollTimeout::ZERO).unwrap() > 0;
        take_wakeup(worker_end.as_fd());
        ready
    }

    fn rings(capacity: u64) -> (SharedRing, SharedRing) {
        let (ring, fd) = SharedRing::create(capacity).unwrap();
        (ring, SharedRing::open(fd, capacity).unwrap())
    }

    #[test]
    fn a_playback_worker_is_woken_once_when_its_buffer_is_consumed() {
        let (broker_ring, worker_ring) = rings(64);
        let mut worker = Producer::new(worker_ring);
        let (sender, worker_end) = WakeSender::pair().unwrap();
        let mut port = RingPort::new(StreamRing::Playback(Consumer::new(broker_ring)), sender);
        let consume = |port: &mut RingPort, n: usize| {
            let StreamRing::Playback(consumer) = &mut port.ring else {
                unreachable!()
            };
            assert_eq!(consumer.pop(&mut vec![0; n]).unwrap(), n);
            port.moved();
        };
        assert!(worker.push(&[1; 48]).unwrap());
        worker.ring().set_wake_at(16);
        consume(&mut port, 8);
        assert!(!woken(&worker_end), "woken before its buffer was consumed");
        consume(&mut port, 8);
        assert!(woken(&worker_end), "not woken when its buffer was consumed");
        consume(&mut port, 8);
        assert!(!woken(&worker_end), "woken twice for one request");
        worker.ring().set_wake_at(40);
        consume(&mut port, 8);
        assert!(!woken(&worker_end));
        // Past the request in one move.
        consume(&mut port, 16);
        assert!(woken(&worker_end));
        // A worker that holds nothing asks for nothing.
        worker.ring().set_wake_at(u64::MAX);
        assert!(worker.push(&[1; 16]).unwrap());
        consume(&mut port, 8);
        assert!(!woken(&worker_end));
    }

    #[test]
    fn a_capture_worker_is_woken_once_its_buffer_can_be_filled() {
        let (broker_ring, worker_ring) = rings(64);
        let worker = Consumer::new(worker_ring);
        let (sender, worker_end) = WakeSender::pair().unwrap();
        let mut port = RingPort::new(StreamRing::Capture(Producer::new(broker_ring)), sender);
        let produce = |port: &mut RingPort, n: usize| {
            let StreamRing::Capture(producer) = &mut port.ring else {
                unreachable!()
            };
            assert!(producer.push(&vec![2; n]).unwrap());
            port.moved();
        };
        worker.ring().set_wake_at(24);
        produce(&mut port, 16);
        assert!(
            !woken(&worker_end),
            "woken before its buffer could be filled"
        );
        produce(&mut port, 8);
        assert!(woken(&worker_end));
        produce(&mut port, 8);
        assert!(!woken(&worker_end), "woken twice for one request");
    }

    #[test]
    fn a_fresh_ring_wakes_its_worker_on_the_first_move() {
        // Before a worker asked for anything (a ring handed over after a broker restart, say),
        // its first move wakes it, so that it can ask.
        let (broker_ring, worker_ring) = rings(64);
        let mut worker = Producer::new(worker_ring);
        let (sender, worker_end) = WakeSender::pair().unwrap();
        let mut port = RingPort::new(StreamRing::Playback(Consumer::new(broker_ring)), sender);
        assert!(worker.push(&[1; 8]).unwrap());
        let StreamRing::Playback(consumer) = &mut port.ring else {
            unreachable!()
        };
        consumer.pop(&mut [0; 8]).unwrap();
        port.moved();
        assert!(woken(&worker_end));
    }
}
