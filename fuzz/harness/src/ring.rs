//! `ring`: a [`SharedRing`] of a small capacity with its [`Producer`] and [`Consumer`] on two
//! mappings of one sealed memfd, and a hostile peer on a third mapping that overwrites the
//! published positions, the data and the backend delay between operations.
//!
//! A model predicts every operation: both sides' positions and what each last accepted of the
//! other's, the header as it must be, and the ring's bytes, so a position check that accepts
//! what it should refuse (or the reverse), a count out of `0..=capacity` or a byte out of
//! place fails. While the peer stays honest, the bytes must come out exactly as they went in
//! (a `VecDeque` of what is queued).
//!
//! Input: `[capacity - 1: u8]`, then operations ([`Op`]) until the input ends or [`MAX_OPS`].

use std::collections::VecDeque;
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, VolatileMemory};
use vsound_shared::ring::{Consumer, Producer, RingError, SharedRing, HEADER_BYTES};

use crate::input::{Input, Output};
use crate::Lazy;

/// Where ring.rs keeps the two positions and the backend delay in the header page (one
/// 64-byte line each).
pub const OFF_WRITE_POS: usize = 64;
pub const OFF_READ_POS: usize = 128;
pub const OFF_BACKEND_DELAY: usize = 192;
const MAX_OPS: usize = 256;

/// A value the hostile peer writes: a delta from what is there, or anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forged {
    Delta(i8),
    Raw(u64),
}

/// One operation: `[op: u8 % 11]` and its fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// 0: `[len: u8]`, bytes of a running counter.
    Push(u8),
    /// 1: `[len: u8][fail: u8 % 3]`: the fill refuses its first (1) or second (2) piece.
    PushWith(u8, u8),
    /// 2: `[n: u8]`.
    Pop(u8),
    /// 3: `[n: u16]`.
    Skip(u16),
    /// 4.
    Queued,
    /// 5.
    Free,
    /// 6.
    Available,
    /// 7: the producer's published position, as a hostile producer would.
    ForgeWritePos(Forged),
    /// 8: the consumer's published position, as a hostile consumer would.
    ForgeReadPos(Forged),
    /// 9: `[index: u8][value: u8]`: a data byte.
    ForgeData(u8, u8),
    /// 10: `[frames: u64]`.
    BackendDelay(u64),
}

fn read_forged(input: &mut Input<'_>) -> Forged {
    if input.u8() & 1 == 0 {
        Forged::Delta(input.u8() as i8)
    } else {
        Forged::Raw(input.u64())
    }
}

fn write_forged(out: &mut Output, f: Forged) {
    match f {
        Forged::Delta(d) => out.u8(0).u8(d as u8),
        Forged::Raw(v) => out.u8(1).u64(v),
    };
}

impl Op {
    fn read(input: &mut Input<'_>) -> Op {
        match input.u8() % 11 {
            0 => Op::Push(input.u8()),
            1 => Op::PushWith(input.u8(), input.u8() % 3),
            2 => Op::Pop(input.u8()),
            3 => Op::Skip(input.u16()),
            4 => Op::Queued,
            5 => Op::Free,
            6 => Op::Available,
            7 => Op::ForgeWritePos(read_forged(input)),
            8 => Op::ForgeReadPos(read_forged(input)),
            9 => Op::ForgeData(input.u8(), input.u8()),
            _ => Op::BackendDelay(input.u64()),
        }
    }

    fn write(&self, out: &mut Output) {
        match *self {
            Op::Push(n) => out.u8(0).u8(n),
            Op::PushWith(n, fail) => out.u8(1).u8(n).u8(fail),
            Op::Pop(n) => out.u8(2).u8(n),
            Op::Skip(n) => out.u8(3).u16(n),
            Op::Queued => out.u8(4),
            Op::Free => out.u8(5),
            Op::Available => out.u8(6),
            Op::ForgeWritePos(f) => {
                out.u8(7);
                write_forged(out, f);
                out
            }
            Op::ForgeReadPos(f) => {
                out.u8(8);
                write_forged(out, f);
                out
            }
            Op::ForgeData(i, v) => out.u8(9).u8(i).u8(v),
            Op::BackendDelay(v) => out.u8(10).u64(v),
        };
    }
}

/// A seed input.
pub fn seed(capacity: u16, ops: &[Op]) -> Vec<u8> {
    assert!((1..=256).contains(&capacity));
    let mut out = Output::default();
    out.u8((capacity - 1) as u8);
    for op in ops {
        op.write(&mut out);
    }
    out.bytes
}

/// The hostile peer's mapping of the ring.
struct Peer {
    region: MmapRegion<()>,
}

impl Peer {
    fn counter(&self, offset: usize) -> &AtomicU64 {
        self.region.get_atomic_ref::<AtomicU64>(offset).unwrap()
    }
    fn load(&self, offset: usize) -> u64 {
        self.counter(offset).load(Ordering::Acquire)
    }
    fn store(&self, offset: usize, v: u64) {
        self.counter(offset).store(v, Ordering::Release)
    }
    fn data(&self, capacity: u64) -> Vec<u8> {
        let mut out = vec![0u8; capacity as usize];
        self.region
            .get_slice(HEADER_BYTES, capacity as usize)
            .unwrap()
            .copy_to(&mut out[..]);
        out
    }
}

/// What both sides must do.
struct Model {
    capacity: u64,
    write_pos: u64,
    read_pos: u64,
    /// The last position each side accepted from the other.
    seen_read_pos: u64,
    seen_write_pos: u64,
    /// The ring's data bytes.
    data: Vec<u8>,
    /// What is queued, while the peer is honest (`None` once it forged anything).
    honest: Option<VecDeque<u8>>,
}

impl Model {
    /// The producer's view of the consumer's published position `pos`.
    fn producer_sees(&mut self, pos: u64) -> Result<u64, (u64, u64, u64)> {
        if pos < self.seen_read_pos || pos > self.write_pos {
            return Err((pos, self.seen_read_pos, self.write_pos));
        }
        self.seen_read_pos = pos;
        Ok(self.write_pos - pos)
    }

    /// The consumer's view of the producer's published position `pos`.
    fn consumer_sees(&mut self, pos: u64) -> Result<u64, (u64, u64, u64)> {
        let min = self.seen_write_pos.max(self.read_pos);
        let max = self.read_pos + self.capacity;
        if pos < min || pos > max {
            return Err((pos, min, max));
        }
        self.seen_write_pos = pos;
        Ok(pos - self.read_pos)
    }

    fn put(&mut self, at: u64, bytes: &[u8]) {
        for (i, &b) in bytes.iter().enumerate() {
            let slot = ((at + i as u64) % self.capacity) as usize;
            self.data[slot] = b;
        }
    }

    fn get(&self, at: u64, n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| self.data[((at + i as u64) % self.capacity) as usize])
            .collect()
    }
}

/// An error must be the refusal the model predicts.
fn check_refusal(err: RingError, want: Result<u64, (u64, u64, u64)>, ctx: &dyn std::fmt::Display) {
    match (err, want) {
        (RingError::BadPeerPosition { pos, min, max }, Err(w)) => {
            assert_eq!((pos, min, max), w, "refused with other bounds: {ctx}")
        }
        (err, want) => panic!("{err} where {want:?} was due: {ctx}"),
    }
}

/// The fuzz target.
pub fn ring(data: &[u8]) {
    let mut input = Input::new(data);
    let capacity = u64::from(input.u8()) + 1;
    let (ring, fd) = SharedRing::create(capacity).unwrap();
    let consumer_fd = fd.try_clone().unwrap();
    let mut producer = Producer::new(ring);
    let mut consumer = Consumer::new(SharedRing::open(consumer_fd, capacity).unwrap());
    let len = HEADER_BYTES + capacity as usize;
    let peer = Peer {
        region: MmapRegion::from_file(FileOffset::new(File::from(fd), 0), len).unwrap(),
    };
    let mut m = Model {
        capacity,
        write_pos: 0,
        read_pos: 0,
        seen_read_pos: 0,
        seen_write_pos: 0,
        data: vec![0; capacity as usize],
        honest: Some(VecDeque::new()),
    };
    let mut counter = 0u8;
    let mut next_bytes = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                counter = counter.wrapping_add(1);
                counter
            })
            .collect()
    };

    for step in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        let op = Op::read(&mut input);
        let ctx = Lazy(|| format!("step {step}: {op:?}, capacity {capacity}"));
        // What each side will read of the other's position during this operation.
        let published_read = peer.load(OFF_READ_POS);
        let published_write = peer.load(OFF_WRITE_POS);
        // Whether the operation must have published its side's position.
        let (mut wrote_write, mut wrote_read) = (false, false);
        match op {
            Op::Push(n) => {
                let bytes = next_bytes(usize::from(n));
                let want = m.producer_sees(published_read);
                match producer.push(&bytes) {
                    Ok(pushed) => {
                        let queued = want.expect("accepted a bad read position");
                        assert_eq!(pushed, u64::from(n) <= capacity - queued, "{ctx}");
                        if pushed {
                            wrote_write = true;
                            m.put(m.write_pos, &bytes);
                            m.write_pos += u64::from(n);
                            if let Some(q) = &mut m.honest {
                                q.extend(&bytes);
                            }
                        }
                    }
                    Err(e) => check_refusal(e, want, &ctx),
                }
            }
            Op::PushWith(n, fail) => {
                let bytes = next_bytes(usize::from(n));
                let want = m.producer_sees(published_read);
                let mut pieces = Vec::new();
                let result = producer.push_with(u64::from(n), |offset, slice| {
                    let from = offset as usize;
                    assert!(
                        from + slice.len() <= bytes.len(),
                        "piece past the push: {ctx}"
                    );
                    slice.copy_from(&bytes[from..from + slice.len()]);
                    pieces.push((offset, slice.len()));
                    pieces.len() != usize::from(fail)
                });
                match result {
                    Ok(pushed) => {
                        let queued = want.expect("accepted a bad read position");
                        let fits = u64::from(n) <= capacity - queued;
                        // Pieces in order, at most two, covering the push exactly when it fits.
                        let mut done = 0;
                        for &(offset, len) in &pieces {
                            assert_eq!(offset, done, "pieces out of order: {ctx}");
                            assert!(len > 0, "an empty piece: {ctx}");
                            done += len as u64;
                        }
                        assert!(pieces.len() <= 2, "{} pieces: {ctx}", pieces.len());
                        let refused = fail > 0 && pieces.len() == usize::from(fail);
                        assert_eq!(pushed, fits && !refused, "{ctx}");
                        if fits && !refused {
                            assert_eq!(done, u64::from(n), "pieces do not cover the push: {ctx}");
                        }
                        // What the fills wrote is in the ring, published or not.
                        m.put(m.write_pos, &bytes[..done as usize]);
                        if pushed {
                            wrote_write = true;
                            m.write_pos += u64::from(n);
                            if let Some(q) = &mut m.honest {
                                q.extend(&bytes);
                            }
                        }
                    }
                    Err(e) => {
                        assert!(pieces.is_empty(), "filled, then refused: {ctx}");
                        check_refusal(e, want, &ctx)
                    }
                }
            }
            Op::Queued | Op::Free => {
                let want = m.producer_sees(published_read);
                let got = if op == Op::Queued {
                    producer.queued()
                } else {
                    producer.free()
                };
                match got {
                    Ok(v) => {
                        let queued = want.expect("accepted a bad read position");
                        assert!(queued <= capacity, "{ctx}");
                        let expected = if op == Op::Queued {
                            queued
                        } else {
                            capacity - queued
                        };
                        assert_eq!(v, expected, "{ctx}");
                    }
                    Err(e) => check_refusal(e, want, &ctx),
                }
            }
            Op::Pop(n) => {
                let want = m.consumer_sees(published_write);
                let mut out = vec![0u8; usize::from(n)];
                match consumer.pop(&mut out) {
                    Ok(got) => {
                        let available = want.expect("accepted a bad write position");
                        assert!(available <= capacity, "{ctx}");
                        assert!(got <= usize::from(n), "popped more than asked: {ctx}");
                        assert_eq!(got as u64, available.min(u64::from(n)), "{ctx}");
                        assert_eq!(out[..got], m.get(m.read_pos, got)[..], "ring bytes: {ctx}");
                        wrote_read = true;
                        if let Some(q) = &mut m.honest {
                            assert!(got <= q.len(), "popped more than was pushed: {ctx}");
                            let pushed: Vec<u8> = q.drain(..got).collect();
                            assert_eq!(out[..got], pushed[..], "not what was pushed: {ctx}");
                        }
                        m.read_pos += got as u64;
                    }
                    Err(e) => check_refusal(e, want, &ctx),
                }
            }
            Op::Skip(n) => {
                let want = m.consumer_sees(published_write);
                match consumer.skip(u64::from(n)) {
                    Ok(()) => {
                        let available = want.expect("accepted a bad write position");
                        let skipped = available.min(u64::from(n));
                        wrote_read = true;
                        if let Some(q) = &mut m.honest {
                            assert!(
                                skipped <= q.len() as u64,
                                "skipped more than was pushed: {ctx}"
                            );
                            q.drain(..skipped as usize);
                        }
                        m.read_pos += skipped;
                    }
                    Err(e) => check_refusal(e, want, &ctx),
                }
            }
            Op::Available => {
                let want = m.consumer_sees(published_write);
                match consumer.available() {
                    Ok(v) => {
                        assert!(v <= capacity, "{ctx}");
                        assert_eq!(Ok(v), want, "{ctx}");
                    }
                    Err(e) => check_refusal(e, want, &ctx),
                }
            }
            Op::ForgeWritePos(f) | Op::ForgeReadPos(f) => {
                let offset = if matches!(op, Op::ForgeWritePos(_)) {
                    OFF_WRITE_POS
                } else {
                    OFF_READ_POS
                };
                let old = peer.load(offset);
                let new = match f {
                    Forged::Delta(d) => old.wrapping_add_signed(i64::from(d)),
                    Forged::Raw(v) => v,
                };
                if new != old {
                    m.honest = None;
                }
                peer.store(offset, new);
            }
            Op::ForgeData(i, v) => {
                let slot = usize::from(i) % capacity as usize;
                peer.region
                    .get_slice(HEADER_BYTES + slot, 1)
                    .unwrap()
                    .copy_from(&[v]);
                if m.data[slot] != v {
                    m.honest = None;
                }
                m.data[slot] = v;
            }
            Op::BackendDelay(v) => {
                consumer.ring().set_backend_delay(v);
                assert_eq!(producer.ring().backend_delay(), v, "{ctx}");
                assert_eq!(peer.load(OFF_BACKEND_DELAY), v, "{ctx}");
            }
        }

        // Each side's own position is its own, whatever the peer did; the header holds what
        // each side last published, unless the peer overwrote it since.
        let ctx = Lazy(|| format!("after step {step}: {op:?}, capacity {capacity}"));
        assert_eq!(producer.write_pos(), m.write_pos, "{ctx}");
        assert_eq!(consumer.read_pos(), m.read_pos, "{ctx}");
        assert!(m.write_pos - m.seen_read_pos <= capacity, "{ctx}");
        let forged = matches!(op, Op::ForgeWritePos(_) | Op::ForgeReadPos(_));
        if wrote_write {
            assert_eq!(
                peer.load(OFF_WRITE_POS),
                m.write_pos,
                "write position not published: {ctx}"
            );
        } else if !forged {
            assert_eq!(
                peer.load(OFF_WRITE_POS),
                published_write,
                "write position moved: {ctx}"
            );
        }
        if wrote_read {
            assert_eq!(
                peer.load(OFF_READ_POS),
                m.read_pos,
                "read position not published: {ctx}"
            );
        } else if !forged {
            assert_eq!(
                peer.load(OFF_READ_POS),
                published_read,
                "read position moved: {ctx}"
            );
        }
        assert_eq!(peer.data(capacity), m.data, "ring bytes: {ctx}");
        if let Some(q) = &m.honest {
            assert_eq!(q.len() as u64, m.write_pos - m.read_pos, "{ctx}");
        }
    }
}
