//! Starts the real broker and worker binaries for integration tests, and speaks the guest
//! driver's side of the virtio-sound protocol through the in-process frontend.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use virtio_snd::protocol as p;
use zerocopy::IntoBytes;

use super::frontend::{FrontendOptions, GuestVm, UsedBuf};

pub const WAIT: Duration = Duration::from_secs(10);

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// Waits for the process to exit; `None` if it still runs after `timeout`.
pub fn wait_exit(proc: &mut Proc, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = proc.child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn wait_for_path(path: &Path, proc: &mut Proc) {
    let deadline = Instant::now() + WAIT;
    while !path.exists() {
        assert!(
            proc.is_running(),
            "process exited before creating {}",
            path.display()
        );
        assert!(
            Instant::now() < deadline,
            "{} did not appear",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn log_level() -> String {
    std::env::var("VSOUND_TEST_LOG").unwrap_or_else(|_| "warn".into())
}

pub fn spawn_broker(dir: &Path, config: Option<&Path>) -> (Proc, PathBuf) {
    spawn_broker_with_env(dir, config, &[])
}

pub fn spawn_broker_with_env(
    dir: &Path,
    config: Option<&Path>,
    env: &[(&str, PathBuf)],
) -> (Proc, PathBuf) {
    spawn_broker_logging(dir, config, env, None)
}

/// A broker whose stderr goes to `log` (if given).
pub fn spawn_broker_logging(
    dir: &Path,
    config: Option<&Path>,
    env: &[(&str, PathBuf)],
    log: Option<&Path>,
) -> (Proc, PathBuf) {
    spawn_broker_with_args(dir, config, env, log, &[])
}

/// A broker that also serves the host command's control socket `DIR/control.sock`.
pub fn spawn_broker_with_control(dir: &Path, config: Option<&Path>) -> (Proc, PathBuf, PathBuf) {
    let control = dir.join("control.sock");
    let control_arg = control.to_string_lossy().into_owned();
    let (proc, socket) =
        spawn_broker_with_args(dir, config, &[], None, &["--control-socket", &control_arg]);
    (proc, socket, control)
}

/// A broker with `extra` arguments.
pub fn spawn_broker_with_args(
    dir: &Path,
    config: Option<&Path>,
    env: &[(&str, PathBuf)],
    log: Option<&Path>,
    extra: &[&str],
) -> (Proc, PathBuf) {
    let socket = dir.join("broker.sock");
    // A dead broker's socket file would satisfy the wait below before the new one binds.
    let _ = std::fs::remove_file(&socket);
    let mut cmd = super::realtime::command(super::bins::broker());
    cmd.arg("--socket")
        .arg(&socket)
        .env("RUST_LOG", log_level())
        // Only the PipeWire tests' private daemon, never a developer's session.
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("PIPEWIRE_RUNTIME_DIR")
        .envs(env.iter().map(|(k, v)| (*k, v)));
    if let Some(config) = config {
        cmd.arg("--config").arg(config);
    }
    cmd.args(extra);
    if let Some(log) = log {
        cmd.stderr(std::fs::File::create(log).unwrap());
    }
    let mut proc = Proc {
        child: cmd.stdin(Stdio::null()).spawn().expect("start broker"),
    };
    wait_for_path(&socket, &mut proc);
    allow_unprivileged_workers(dir, &socket);
    (proc, socket)
}

/// As root the tests' workers run as `nobody`; like the shipped units (which give the worker
/// the broker socket's group), let them reach the broker's socket again after a restart.
fn allow_unprivileged_workers(dir: &Path, socket: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if nix::unistd::Uid::effective().is_root() {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    }
}

/// A worker for the VM `name` (its `--vm`), listening on `DIR/NAME.sock`.
pub fn spawn_worker(
    dir: &Path,
    name: &str,
    broker: &Path,
    config: Option<&Path>,
) -> (Proc, PathBuf) {
    let socket = dir.join(format!("{name}.sock"));
    // The worker is on the audio path too (it refills the ring and completes buffers).
    let mut cmd = super::realtime::command(super::bins::worker());
    cmd.arg("--socket")
        .arg(&socket)
        .arg("--broker")
        .arg(broker)
        .arg("--vm")
        .arg(name)
        .env("RUST_LOG", log_level());
    if nix::unistd::Uid::effective().is_root() {
        cmd.args(["--user", "nobody", "--group", "nogroup"]);
    }
    if let Some(config) = config {
        cmd.arg("--config").arg(config);
    }
    let mut proc = Proc {
        child: cmd.stdin(Stdio::null()).spawn().expect("start worker"),
    };
    wait_for_path(&socket, &mut proc);
    (proc, socket)
}

/// `vsound run` with its stderr in `log` and its stdout in `out`.
pub struct Launcher {
    pub proc: Proc,
    pub socket: PathBuf,
    pub broker_socket: PathBuf,
    pub log: PathBuf,
    pub out: PathBuf,
}

/// Stops the launcher with SIGTERM, which stops its children: a SIGKILL (`Proc`'s drop) would
/// leave its broker and worker running, orphaned.
impl Drop for Launcher {
    fn drop(&mut self) {
        // Not once reaped: its pid may be another process's by now.
        if !self.proc.is_running() {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(self.proc.pid() as i32);
        if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).is_ok() {
            // The launcher gives each child 3 s before it kills it.
            let _ = wait_exit(&mut self.proc, Duration::from_secs(8));
        }
    }
}

impl Launcher {
    pub fn start(dir: &Path) -> Launcher {
        let socket = dir.join("vm.sock");
        let broker_socket = dir.join("broker.sock");
        let log = dir.join("launcher.log");
        let out = dir.join("launcher.out");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vsound"));
        cmd.arg("run")
            .arg("--socket")
            .arg(&socket)
            .arg("--broker-socket")
            .arg(&broker_socket)
            .env("RUST_LOG", "info")
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("PIPEWIRE_RUNTIME_DIR")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&log).unwrap());
        let mut proc = Proc {
            child: cmd.spawn().expect("start the launcher"),
        };
        wait_for_path(&socket, &mut proc);
        wait_for_path(&broker_socket, &mut proc);
        Launcher {
            proc,
            socket,
            broker_socket,
            log,
            out,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// What the launcher printed on stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// The pid of the launcher's running child `name` (waits for it to appear).
    pub fn child(&self, name: &str) -> u32 {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(&pid) = children_named(self.proc.pid(), name).first() {
                return pid;
            }
            assert!(Instant::now() < deadline, "no {name} child");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Pids of the live (not zombie) children of `parent` whose command name is `name`.
pub fn children_named(parent: u32, name: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let mut rest = stat[close + 2..].split_whitespace();
        let state = rest.next();
        let ppid = rest.next().and_then(|p| p.parse::<u32>().ok());
        if comm == name && ppid == Some(parent) && state != Some("Z") {
            found.push(pid);
        }
    }
    found
}

/// Asks a vhost-user backend for its features (VHOST_USER_GET_FEATURES): an answer proves a
/// worker served the connection; a refused, reset or closed one is an error.
pub fn vhost_get_features(socket: &Path) -> io::Result<u64> {
    const GET_FEATURES: u32 = 1;
    const VERSION_1: u32 = 0x1;
    const REPLY: u32 = 0x4;
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(WAIT))?;
    let mut request = Vec::new();
    for word in [GET_FEATURES, VERSION_1, 0] {
        request.extend(word.to_le_bytes());
    }
    stream.write_all(&request)?;
    let mut reply = [0u8; 20];
    stream.read_exact(&mut reply)?;
    let word = |i: usize| u32::from_le_bytes(reply[i * 4..i * 4 + 4].try_into().unwrap());
    if word(0) != GET_FEATURES || word(1) & REPLY == 0 || word(2) != 8 {
        return Err(io::Error::other(format!(
            "not a GET_FEATURES reply: {reply:?}"
        )));
    }
    Ok(u64::from_le_bytes(reply[12..20].try_into().unwrap()))
}

/// A broker, one worker and a connected guest.
pub struct Rig {
    pub dir: tempfile::TempDir,
    pub broker: Proc,
    pub broker_socket: PathBuf,
    pub worker: Proc,
    pub vm: GuestVm,
}

impl Rig {
    pub fn start(config_text: Option<&str>, opts: FrontendOptions) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let config = config_text.map(|text| {
            let path = dir.path().join("vsound.toml");
            std::fs::write(&path, text.replace("$DIR", &dir.path().to_string_lossy())).unwrap();
            path
        });
        let (broker, broker_socket) = spawn_broker(dir.path(), config.as_deref());
        let (worker, socket) = spawn_worker(dir.path(), "vm", &broker_socket, config.as_deref());
        let vm = GuestVm::connect(&socket, opts).expect("connect to the worker");
        Rig {
            dir,
            broker,
            broker_socket,
            worker,
            vm,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

pub fn status_of(resp: &[u8]) -> u32 {
    assert!(resp.len() >= 4, "response too short: {resp:?}");
    u32::from_le_bytes(resp[..4].try_into().unwrap())
}

pub fn query(code: u32, start: u32, count: u32, size: u32) -> Vec<u8> {
    p::QueryInfo {
        hdr: p::Hdr { code: code.into() },
        start_id: start.into(),
        count: count.into(),
        size: size.into(),
    }
    .as_bytes()
    .to_vec()
}

pub fn pcm(code: u32, stream: u32) -> Vec<u8> {
    p::PcmHdr {
        hdr: p::Hdr { code: code.into() },
        stream_id: stream.into(),
    }
    .as_bytes()
    .to_vec()
}

#[derive(Clone, Copy, Debug)]
pub struct Params {
    pub stream: u32,
    pub channels: u8,
    pub format: u8,
    pub rate: u8,
    pub period_bytes: u32,
    pub periods: u32,
    pub features: u32,
}

impl Params {
    /// 48 kHz stereo S16 with 10 ms periods.
    pub fn s16_48k(stream: u32) -> Params {
        Params {
            stream,
            channels: 2,
            format: p::format::S16,
            rate: p::rate::R48000,
            period_bytes: 1920,
            periods: 4,
            features: 0,
        }
    }

    pub fn request(&self) -> Vec<u8> {
        p::PcmSetParams {
            hdr: p::PcmHdr {
                hdr: p::Hdr {
                    code: p::R_PCM_SET_PARAMS.into(),
                },
                stream_id: self.stream.into(),
            },
            buffer_bytes: (self.period_bytes * self.periods).into(),
            period_bytes: self.period_bytes.into(),
            features: self.features.into(),
            channels: self.channels,
            format: self.format,
            rate: self.rate,
            padding: 0,
        }
        .as_bytes()
        .to_vec()
    }

    pub fn period(&self) -> Duration {
        let frame =
            virtio_snd::protocol::sample_bytes(self.format).unwrap() * u32::from(self.channels);
        let frames = u64::from(self.period_bytes / frame);
        let hz = u64::from(virtio_snd::protocol::rate_hz(self.rate).unwrap());
        Duration::from_nanos(frames * 1_000_000_000 / hz)
    }
}

/// Sends a control request and returns its status.
/// [`GuestVm::wait_used`] for a guest whose worker is about to be killed (`killed` is set just
/// before): a worker killed between publishing a used buffer and signalling it leaves that
/// buffer without its interrupt, which then ends the wait like silence. Before `killed` is
/// set, a missing interrupt fails as anywhere else.
pub fn wait_used_or_killed(
    vm: &mut GuestVm,
    queue: u16,
    timeout: Duration,
    killed: &AtomicBool,
) -> Option<UsedBuf> {
    match vm.try_wait_used(queue, timeout) {
        Ok(used) => used,
        Err(e) if killed.load(Ordering::Acquire) => {
            eprintln!("{e} (its worker was killed)");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

/// Each of the first `count` jacks' `connected` as JACK_INFO reports it.
pub fn jacks_connected(vm: &mut GuestVm, count: u32) -> Vec<u8> {
    let resp = vm.request(
        p::CONTROL_QUEUE,
        &query(p::R_JACK_INFO, 0, count, 24),
        4 + 24 * count,
    );
    assert_eq!(status_of(&resp), 0x8000);
    resp[4..]
        .chunks(24)
        .map(|info| p::read_prefix::<p::JackInfo>(info).unwrap().connected)
        .collect()
}

pub fn control(vm: &mut GuestVm, req: &[u8]) -> u32 {
    status_of(&vm.request(p::CONTROL_QUEUE, req, 4))
}

pub fn prepare(vm: &mut GuestVm, params: &Params) {
    assert_eq!(control(vm, &params.request()), 0x8000, "SET_PARAMS");
    assert_eq!(
        control(vm, &pcm(p::R_PCM_PREPARE, params.stream)),
        0x8000,
        "PREPARE"
    );
}

/// The parts of a completed tx/rx buffer.
#[derive(Debug)]
pub struct Completion {
    pub head: u16,
    pub at: Instant,
    pub status: u32,
    pub latency_bytes: u32,
    pub data: Vec<u8>,
}

pub fn split_status(used: &UsedBuf, payload_len: usize) -> Completion {
    let written = &used.written;
    let status_at = if written.len() >= payload_len + 8 {
        payload_len
    } else {
        written.len().saturating_sub(8)
    };
    assert!(written.len() >= 8, "completion without a status: {used:?}");
    Completion {
        head: used.head,
        at: Instant::now(),
        status: u32::from_le_bytes(written[status_at..status_at + 4].try_into().unwrap()),
        latency_bytes: u32::from_le_bytes(
            written[status_at + 4..status_at + 8].try_into().unwrap(),
        ),
        data: written[..status_at].to_vec(),
    }
}

/// How the driver lays out a tx/rx buffer in the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// A chain of ring descriptors.
    Chain,
    /// One ring descriptor pointing at an indirect table (needs
    /// `FrontendOptions::indirect_desc`).
    Indirect,
}

/// Submits one chain laid out as `layout`, and kicks.
pub fn submit_as(
    vm: &mut GuestVm,
    layout: Layout,
    queue: u16,
    readable: &[&[u8]],
    writable_lens: &[u32],
) -> u16 {
    match layout {
        Layout::Chain => vm.submit(queue, readable, writable_lens),
        Layout::Indirect => vm.submit_indirect(queue, readable, writable_lens),
    }
}

pub fn tx_submit(vm: &mut GuestVm, stream: u32, data: &[u8]) -> u16 {
    tx_submit_as(vm, Layout::Chain, stream, data)
}

pub fn tx_submit_as(vm: &mut GuestVm, layout: Layout, stream: u32, data: &[u8]) -> u16 {
    submit_as(
        vm,
        layout,
        p::TX_QUEUE,
        &[&stream.to_le_bytes(), data],
        &[8],
    )
}

pub fn rx_submit(vm: &mut GuestVm, stream: u32, len: u32) -> u16 {
    rx_submit_as(vm, Layout::Chain, stream, len)
}

pub fn rx_submit_as(vm: &mut GuestVm, layout: Layout, stream: u32, len: u32) -> u16 {
    submit_as(vm, layout, p::RX_QUEUE, &[&stream.to_le_bytes()], &[len, 8])
}

/// Plays `data` in periods the way the guest driver does: `periods` buffers in flight, START
/// after the first ones are queued, a new buffer whenever one completes. Returns each
/// completion with its time and the START instant.
pub fn play(vm: &mut GuestVm, params: &Params, data: &[u8]) -> (Instant, Vec<Completion>) {
    play_as(vm, params, data, Layout::Chain)
}

/// [`play`] with every tx buffer laid out as `layout`.
pub fn play_as(
    vm: &mut GuestVm,
    params: &Params,
    data: &[u8],
    layout: Layout,
) -> (Instant, Vec<Completion>) {
    let period = params.period_bytes as usize;
    let mut chunks = data.chunks(period);
    let mut in_flight = 0;
    for chunk in chunks.by_ref().take(params.periods as usize) {
        tx_submit_as(vm, layout, params.stream, chunk);
        in_flight += 1;
    }
    let started = Instant::now();
    assert_eq!(
        control(vm, &pcm(p::R_PCM_START, params.stream)),
        0x8000,
        "START"
    );
    let mut done = Vec::new();
    while in_flight > 0 {
        let used = vm
            .wait_used(p::TX_QUEUE, WAIT)
            .expect("tx completion within the timeout");
        done.push(split_status(&used, 0));
        in_flight -= 1;
        if let Some(chunk) = chunks.next() {
            tx_submit_as(vm, layout, params.stream, chunk);
            in_flight += 1;
        }
    }
    (started, done)
}

/// Records `count` periods: `periods` rx buffers in flight, re-queued as they complete.
pub fn record(vm: &mut GuestVm, params: &Params, count: usize) -> (Instant, Vec<Completion>) {
    record_as(vm, params, count, Layout::Chain)
}

/// [`record`] with every rx buffer laid out as `layout`.
pub fn record_as(
    vm: &mut GuestVm,
    params: &Params,
    count: usize,
    layout: Layout,
) -> (Instant, Vec<Completion>) {
    let period = params.period_bytes;
    let mut submitted = 0;
    while submitted < count.min(params.periods as usize) {
        rx_submit_as(vm, layout, params.stream, period);
        submitted += 1;
    }
    let started = Instant::now();
    assert_eq!(
        control(vm, &pcm(p::R_PCM_START, params.stream)),
        0x8000,
        "START"
    );
    let mut done = Vec::new();
    while done.len() < count {
        let used = vm
            .wait_used(p::RX_QUEUE, WAIT)
            .expect("rx completion within the timeout");
        done.push(split_status(&used, period as usize));
        if submitted < count {
            rx_submit_as(vm, layout, params.stream, period);
            submitted += 1;
        }
    }
    (started, done)
}

/// A deterministic, non-repeating test signal.
pub fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

/// Reads a WAV file's sample bytes (S16 little-endian).
/// A known S16 signal with no zero samples, so that silence never matches it.
pub fn known_signal(bytes: usize, seed: u32) -> Vec<u8> {
    pattern(bytes, seed)
        .chunks(2)
        .flat_map(|s| (i16::from_le_bytes([s[0], s[1]]) | 1).to_le_bytes())
        .collect()
}

pub fn wav_s16_bytes(path: &Path) -> Vec<u8> {
    let mut reader = hound::WavReader::open(path).expect("open wav");
    reader
        .samples::<i16>()
        .flat_map(|s| s.unwrap().to_le_bytes())
        .collect()
}

pub fn write_wav_s16(path: &Path, channels: u16, rate: u32, bytes: &[u8]) {
    let spec = hound::WavSpec {
        channels,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut writer = hound::WavWriter::create(path, spec).unwrap();
    for s in bytes.chunks_exact(2) {
        writer
            .write_sample(i16::from_le_bytes([s[0], s[1]]))
            .unwrap();
    }
    writer.finalize().unwrap();
}

/// The context switches (voluntary and involuntary) a thread's /proc/.../status text counts:
/// each voluntary one is a sleep, so a wake-up.
pub fn switches_in_status(status: &str) -> u64 {
    status
        .lines()
        .filter(|l| l.contains("ctxt_switches"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// Context switches of every thread of a process.
pub fn context_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("status")).ok())
        .map(|status| switches_in_status(&status))
        .sum()
}

/// Time all threads of a process have run on a CPU, to the nanosecond, from each thread's
/// /proc/PID/task/TID/schedstat (what /proc/PID/stat rounds to clock ticks of 10 ms).
pub fn cpu_time_precise(pid: u32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Duration::ZERO;
    };
    let ns: u64 = tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|line| line.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(ns)
}

/// CPU time (user + system) a process has used, from /proc/PID/stat.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line (11 and 12 after the name).
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}
