//! `chain`: descriptor chains as the worker takes them off a queue: virtio-queue's [`Queue`]
//! over guest memory of one or two regions (with a gap, or adjacent), a descriptor table,
//! indirect tables and an avail ring written from the input; every chain goes through
//! [`Chain::from_descriptors`] and [`Xfer::parse`] (both directions), then the input reads and
//! writes its buffers. A shadow copy of guest memory predicts every access: what a read
//! returns, and that a write changes only the bytes its descriptors cover.
//!
//! Input: `[region0 pages][region1 pages, 0: none][gap pages][queue size log2][memory seed]`,
//! the descriptor table (`queue size` descriptors, [`DescSeed`]'s encoding), memory patches
//! ([`Patch`]: indirect tables, linked runs, raw bytes), the avail ring (`[idx: u8, 0xff: u16
//! follows]` then a u16 head per published slot), then buffer accesses ([`Access`]).

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_snd::guest::{Chain, ChainError, GuestBuffer, MAX_SEGMENTS};
use virtio_snd::xfer::{Xfer, XferError};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, VolatileSlice};

use crate::input::{Input, Output};
use crate::Lazy;

pub const PAGE: u64 = 4096;
/// Where the queue's rings are (in region 0, which always exists).
pub const DESC_TABLE: u64 = 0;
pub const AVAIL_RING: u64 = 0x400;
pub const USED_RING: u64 = 0x600;
/// Largest queue: its rings fit below a page.
pub const MAX_QUEUE_LOG2: u8 = 6;
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;
/// Most accesses per input.
const MAX_ACCESSES: usize = 32;

/// One descriptor as the input encodes it: a mode byte, then the address, length and next
/// fields in the widths the mode says. Mode bits 0-1: address (0: u16, 1: 0x10000 + u16,
/// 2-3: u64); bits 2-3: length (0: u8, 1: u16, 2: u32, 3: u16 * 16); bits 4-6: flags NEXT,
/// WRITE, INDIRECT; bit 7: next is a u16 (else a u8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DescSeed {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl DescSeed {
    pub fn new(addr: u64, len: u32, flags: u16, next: u16) -> DescSeed {
        DescSeed {
            addr,
            len,
            flags,
            next,
        }
    }

    fn read(input: &mut Input<'_>) -> DescSeed {
        let mode = input.u8();
        let addr = match mode & 3 {
            0 => u64::from(input.u16()),
            1 => 0x10000 + u64::from(input.u16()),
            _ => input.u64(),
        };
        let len = match (mode >> 2) & 3 {
            0 => u32::from(input.u8()),
            1 => u32::from(input.u16()),
            2 => input.u32(),
            _ => u32::from(input.u16()) * 16,
        };
        let flags = u16::from(mode >> 4) & 7;
        let next = if mode & 0x80 != 0 {
            input.u16()
        } else {
            u16::from(input.u8())
        };
        DescSeed {
            addr,
            len,
            flags,
            next,
        }
    }

    fn write(&self, out: &mut Output) {
        assert!(
            self.flags <= 7,
            "only NEXT, WRITE and INDIRECT can be encoded"
        );
        let addr_mode: u8 = match self.addr {
            0..=0xffff => 0,
            0x10000..=0x1ffff => 1,
            _ => 2,
        };
        let len_mode: u8 = match self.len {
            0..=0xff => 0,
            0x100..=0xffff => 1,
            _ => 2,
        };
        let next_wide = self.next > 0xff;
        out.u8(addr_mode | len_mode << 2 | (self.flags as u8) << 4 | u8::from(next_wide) << 7);
        match addr_mode {
            0 => out.u16(self.addr as u16),
            1 => out.u16((self.addr - 0x10000) as u16),
            _ => out.u64(self.addr),
        };
        match len_mode {
            0 => out.u8(self.len as u8),
            1 => out.u16(self.len as u16),
            _ => out.u32(self.len),
        };
        if next_wide {
            out.u16(self.next);
        } else {
            out.u8(self.next as u8);
        }
    }

    /// The descriptor's 16 bytes in guest memory (VIRTIO split virtqueue layout).
    fn wire(&self) -> [u8; 16] {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&self.addr.to_le_bytes());
        raw[8..12].copy_from_slice(&self.len.to_le_bytes());
        raw[12..14].copy_from_slice(&self.flags.to_le_bytes());
        raw[14..].copy_from_slice(&self.next.to_le_bytes());
        raw
    }
}

/// Something written into guest memory after the descriptor table (at `addr`, a u32 of which
/// the low 17 bits count), as `[kind][addr: u32]` and then the kind's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Patch {
    /// Kind 0: `[n: u8]` descriptors one after the other: an indirect table.
    Descriptors { addr: u64, descs: Vec<DescSeed> },
    /// Kind 1: `[count: u16 % 2049]` copies of a descriptor, each linked to the next (NEXT
    /// set, `next` = its index + 1) but the last: a long chain for little input.
    LinkedRun {
        addr: u64,
        count: u16,
        template: DescSeed,
    },
    /// Kind 2: `[n: u8]` raw bytes.
    Bytes { addr: u64, bytes: Vec<u8> },
}

const ADDR_MASK: u32 = 0x1ffff;

impl Patch {
    fn read(input: &mut Input<'_>) -> Patch {
        let kind = input.u8() % 3;
        let addr = u64::from(input.u32() & ADDR_MASK);
        match kind {
            0 => {
                let n = input.u8();
                Patch::Descriptors {
                    addr,
                    descs: (0..n).map(|_| DescSeed::read(input)).collect(),
                }
            }
            1 => Patch::LinkedRun {
                addr,
                count: input.u16() % 2049,
                template: DescSeed::read(input),
            },
            _ => {
                let n = usize::from(input.u8());
                Patch::Bytes {
                    addr,
                    bytes: input.bytes(n).to_vec(),
                }
            }
        }
    }

    fn write(&self, out: &mut Output) {
        let addr = |a: u64| {
            assert!(
                a <= u64::from(ADDR_MASK),
                "patch address out of the encodable range"
            );
            a as u32
        };
        match self {
            Patch::Descriptors { addr: a, descs } => {
                out.u8(0).u32(addr(*a)).u8(descs.len() as u8);
                for d in descs {
                    d.write(out);
                }
            }
            Patch::LinkedRun {
                addr: a,
                count,
                template,
            } => {
                out.u8(1).u32(addr(*a)).u16(*count);
                template.write(out);
            }
            Patch::Bytes { addr: a, bytes } => {
                out.u8(2).u32(addr(*a)).u8(bytes.len() as u8).raw(bytes);
            }
        }
    }

    fn bytes(&self) -> (u64, Vec<u8>) {
        match self {
            Patch::Descriptors { addr, descs } => {
                (*addr, descs.iter().flat_map(|d| d.wire()).collect())
            }
            Patch::LinkedRun {
                addr,
                count,
                template,
            } => {
                let bytes = (0..*count)
                    .flat_map(|i| {
                        let last = i + 1 == *count;
                        let flags = if last {
                            template.flags & !F_NEXT
                        } else {
                            template.flags | F_NEXT
                        };
                        DescSeed {
                            flags,
                            next: i + 1,
                            ..*template
                        }
                        .wire()
                    })
                    .collect();
                (*addr, bytes)
            }
            Patch::Bytes { addr, bytes } => (*addr, bytes.clone()),
        }
    }
}

/// Which part of a chain an access is on, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessKind {
    ReadReadable,
    ReadWritable,
    WriteWritable,
    /// The device never writes its readable part, but a `GuestBuffer` must stay in bounds
    /// whichever it is.
    WriteReadable,
    ReadIntoReadable,
    ReadIntoWritable,
}

/// One access: `[op: kind = op % 6, bit 7: offset is a u64 (else a u16)][chain: u8]
/// [offset][len: u16 & 0x1fff]`. Written data is a running counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    pub kind: AccessKind,
    pub chain: u8,
    pub offset: u64,
    pub len: u16,
}

const KINDS: [AccessKind; 6] = [
    AccessKind::ReadReadable,
    AccessKind::ReadWritable,
    AccessKind::WriteWritable,
    AccessKind::WriteReadable,
    AccessKind::ReadIntoReadable,
    AccessKind::ReadIntoWritable,
];

impl Access {
    fn read(input: &mut Input<'_>) -> Access {
        let op = input.u8();
        let chain = input.u8();
        let offset = if op & 0x80 != 0 {
            input.u64()
        } else {
            u64::from(input.u16())
        };
        Access {
            kind: KINDS[usize::from(op & 0x7f) % KINDS.len()],
            chain,
            offset,
            len: input.u16() & 0x1fff,
        }
    }

    fn write(&self, out: &mut Output) {
        let kind = KINDS.iter().position(|&k| k == self.kind).unwrap() as u8;
        let wide = self.offset > 0xffff;
        out.u8(kind | u8::from(wide) << 7).u8(self.chain);
        if wide {
            out.u64(self.offset);
        } else {
            out.u16(self.offset as u16);
        }
        out.u16(self.len);
    }
}

/// A whole input, for seeds.
#[derive(Debug, Clone)]
pub struct Seed {
    pub region0_pages: u8,
    pub region1_pages: u8,
    pub gap_pages: u8,
    pub queue_log2: u8,
    pub memory_seed: u8,
    pub table: Vec<DescSeed>,
    pub patches: Vec<Patch>,
    pub heads: Vec<u16>,
    pub accesses: Vec<Access>,
}

impl Seed {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Output::default();
        out.u8(self.region0_pages - 1)
            .u8(self.region1_pages)
            .u8(self.gap_pages)
            .u8(self.queue_log2)
            .u8(self.memory_seed);
        let size = 1usize << self.queue_log2;
        assert!(
            self.table.len() <= size,
            "more descriptors than the queue has"
        );
        for i in 0..size {
            let d = self.table.get(i).copied();
            d.unwrap_or(DescSeed::new(0, 0, 0, 0)).write(&mut out);
        }
        out.u8(self.patches.len() as u8);
        for p in &self.patches {
            p.write(&mut out);
        }
        if self.heads.len() < 0xff {
            out.u8(self.heads.len() as u8);
        } else {
            out.u8(0xff).u16(self.heads.len() as u16);
        }
        for &h in self.heads.iter().take(size) {
            out.u16(h);
        }
        for a in &self.accesses {
            a.write(&mut out);
        }
        out.bytes
    }
}

/// Guest memory as it should be: each region's base and bytes.
struct Shadow {
    regions: Vec<(u64, Vec<u8>)>,
}

impl Shadow {
    fn of(mem: &GuestMemoryMmap<()>, layout: &[(u64, usize)]) -> Shadow {
        Shadow {
            regions: layout
                .iter()
                .map(|&(base, len)| {
                    let mut bytes = vec![0u8; len];
                    mem.read_slice(&mut bytes, GuestAddress(base)).unwrap();
                    (base, bytes)
                })
                .collect(),
        }
    }

    /// The parts of `[addr, addr + len)` in each region: (region, offset in it, length), in
    /// address order (the regions are).
    fn spans(&self, addr: u64, len: usize) -> Vec<(usize, usize, usize)> {
        let end = addr.saturating_add(len as u64);
        let mut spans = Vec::new();
        for (r, (base, bytes)) in self.regions.iter().enumerate() {
            let from = addr.max(*base);
            let to = end.min(base + bytes.len() as u64);
            if from < to {
                spans.push((r, (from - base) as usize, (to - from) as usize));
            }
        }
        spans
    }

    /// The bytes at `[addr, addr + len)`, if every one is in guest memory.
    fn read(&self, addr: u64, len: usize) -> Option<Vec<u8>> {
        let spans = self.spans(addr, len);
        if spans.iter().map(|s| s.2).sum::<usize>() != len {
            return None;
        }
        let mut out = Vec::with_capacity(len);
        for (r, at, n) in spans {
            out.extend_from_slice(&self.regions[r].1[at..at + n]);
        }
        Some(out)
    }

    /// Writes `data` at `addr`, which must be in guest memory.
    fn write(&mut self, addr: u64, data: &[u8]) {
        let mut done = 0;
        for (r, at, n) in self.spans(addr, data.len()) {
            self.regions[r].1[at..at + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        assert_eq!(done, data.len());
    }
}

/// The pieces of guest memory that `[offset, offset + len)` of a buffer made of these
/// descriptors covers, in order: (address, length), the address `None` where the piece's end
/// would overflow. `None` if the range is past the buffer's end.
fn pieces(segments: &[(u64, u32)], offset: u64, len: usize) -> Option<Vec<(Option<u64>, usize)>> {
    let total: u64 = segments.iter().map(|&(_, l)| u64::from(l)).sum();
    let end = offset.checked_add(len as u64).filter(|&e| e <= total)?;
    let mut pieces = Vec::new();
    let mut seg_start = 0u64;
    for &(addr, seg_len) in segments {
        let seg_end = seg_start + u64::from(seg_len);
        let from = offset.max(seg_start);
        let to = end.min(seg_end);
        if from < to {
            let n = to - from;
            let at = addr
                .checked_add(from - seg_start)
                .filter(|a| a.checked_add(n - 1).is_some());
            pieces.push((at, n as usize));
        }
        seg_start = seg_end;
    }
    assert_eq!(pieces.iter().map(|p| p.1).sum::<usize>(), len);
    Some(pieces)
}

/// What a read of `len` bytes at `offset` must give: `Some(bytes)` if every byte is in the
/// buffer and in guest memory.
fn expected_read(
    shadow: &Shadow,
    segments: &[(u64, u32)],
    offset: u64,
    len: usize,
) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(len);
    for (addr, n) in pieces(segments, offset, len)? {
        out.extend(shadow.read(addr?, n)?);
    }
    Some(out)
}

/// A chain taken off the queue, with the descriptors virtio-queue walked for it.
struct Taken {
    chain: Chain,
    readable: Vec<(u64, u32)>,
    writable: Vec<(u64, u32)>,
}

/// The fuzz target.
pub fn chain(data: &[u8]) {
    let mut input = Input::new(data);
    let r0 = (u64::from(input.u8() % 8) + 1) * PAGE;
    let r1 = u64::from(input.u8() % 9) * PAGE;
    let gap = u64::from(input.u8() % 4) * PAGE;
    let size = 1u16 << (input.u8() % (MAX_QUEUE_LOG2 + 1));
    let seed = input.u8();
    let mut layout = vec![(0u64, r0 as usize)];
    if r1 > 0 {
        layout.push((r0 + gap, r1 as usize));
    }
    let ranges: Vec<(GuestAddress, usize)> =
        layout.iter().map(|&(b, l)| (GuestAddress(b), l)).collect();
    let mem = GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap();
    for (r, &(base, len)) in layout.iter().enumerate() {
        // A pattern of 256 bytes repeated: a misplaced read reads other bytes.
        let pattern: Vec<u8> = (0..=255u8)
            .map(|i| i.wrapping_mul(31).wrapping_add(seed).wrapping_add(r as u8))
            .collect();
        let fill = pattern.repeat(len / pattern.len());
        mem.write_slice(&fill, GuestAddress(base)).unwrap();
    }

    // The queue: descriptor table, patches (indirect tables and whatever else), avail ring.
    for i in 0..u64::from(size) {
        let raw = DescSeed::read(&mut input).wire();
        mem.write_slice(&raw, GuestAddress(DESC_TABLE + 16 * i))
            .unwrap();
    }
    for _ in 0..input.u8() % 17 {
        let (addr, bytes) = Patch::read(&mut input).bytes();
        // Whatever part lies in guest memory (the rest is the gap or past the end).
        let _ = mem.write(&bytes, GuestAddress(addr));
    }
    let idx = match input.u8() {
        0xff => input.u16(),
        n => u16::from(n),
    };
    mem.write_obj(0u16, GuestAddress(AVAIL_RING)).unwrap();
    mem.write_obj(idx, GuestAddress(AVAIL_RING + 2)).unwrap();
    for slot in 0..u64::from(idx.min(size)) {
        mem.write_obj(input.u16(), GuestAddress(AVAIL_RING + 4 + 2 * slot))
            .unwrap();
    }
    let mut queue = Queue::new(size).unwrap();
    queue
        .try_set_desc_table_address(GuestAddress(DESC_TABLE))
        .unwrap();
    queue
        .try_set_avail_ring_address(GuestAddress(AVAIL_RING))
        .unwrap();
    queue
        .try_set_used_ring_address(GuestAddress(USED_RING))
        .unwrap();
    queue.set_ready(true);

    let mut shadow = Shadow::of(&mem, &layout);

    // As the worker does: every available chain is parsed before any is served.
    let taken: Vec<Taken> = match queue.iter(&mem) {
        Err(_) => {
            // The one way the avail ring itself is wrong: more heads than the queue has.
            assert!(idx > size, "avail idx {idx} refused in a queue of {size}");
            return;
        }
        Ok(iter) => {
            assert!(idx <= size, "avail idx {idx} accepted in a queue of {size}");
            let mut taken = Vec::new();
            for desc_chain in iter {
                let head = desc_chain.head_index();
                let descs: Vec<Descriptor> = desc_chain.clone().collect();
                let parsed = Chain::from_descriptors(desc_chain);
                if let Some(t) = check_parse(head, &descs, parsed) {
                    taken.push(t);
                }
            }
            taken
        }
    };
    for t in &taken {
        check_xfer(&mem, &shadow, t);
    }

    let mut counter = 0u8;
    for _ in 0..MAX_ACCESSES {
        if input.is_empty() || taken.is_empty() {
            break;
        }
        let access = Access::read(&mut input);
        let t = &taken[usize::from(access.chain) % taken.len()];
        check_access(&mem, &layout, &mut shadow, t, access, &mut counter);
    }
}

/// `from_descriptors` against the descriptors it was given: the same split, the same lengths,
/// the spec's order, at most `MAX_SEGMENTS`.
fn check_parse(
    head: u16,
    descs: &[Descriptor],
    parsed: Result<Chain, ChainError>,
) -> Option<Taken> {
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    let mut expected = Ok(());
    for (i, d) in descs.iter().enumerate() {
        assert!(
            !d.refers_to_indirect_table(),
            "an indirect descriptor came out of the chain"
        );
        if i >= MAX_SEGMENTS {
            expected = Err(ChainError::TooLong);
            break;
        }
        // Zero-length descriptors carry nothing; a buffer keeps only the others.
        let seg = (d.addr().0, d.len());
        if d.is_write_only() {
            if d.len() > 0 {
                writable.push(seg);
            }
        } else if !writable.is_empty() {
            expected = Err(ChainError::ReadableAfterWritable);
            break;
        } else if d.len() > 0 {
            readable.push(seg);
        }
    }
    let ctx = Lazy(|| format!("chain {head}: {} descriptors {descs:x?}", descs.len()));
    match (parsed, expected) {
        (Ok(chain), Ok(())) => {
            assert!(descs.len() <= MAX_SEGMENTS, "{ctx}");
            assert_eq!(chain.head, head, "{ctx}");
            let sum = |s: &[(u64, u32)]| s.iter().map(|&(_, l)| u64::from(l)).sum::<u64>();
            assert_eq!(
                chain.readable.len(),
                sum(&readable),
                "readable length: {ctx}"
            );
            assert_eq!(
                chain.writable.len(),
                sum(&writable),
                "writable length: {ctx}"
            );
            assert_eq!(
                chain.readable,
                GuestBuffer::from_segments(&readable),
                "{ctx}"
            );
            assert_eq!(
                chain.writable,
                GuestBuffer::from_segments(&writable),
                "{ctx}"
            );
            Some(Taken {
                chain,
                readable,
                writable,
            })
        }
        (Err(got), Err(want)) => {
            assert_eq!(got, want, "{ctx}");
            None
        }
        (got, want) => panic!("from_descriptors gave {got:?}, expected {want:?}: {ctx}"),
    }
}

/// `Xfer::parse` in both directions against the chain's part lengths and its header bytes.
fn check_xfer(mem: &GuestMemoryMmap<()>, shadow: &Shadow, t: &Taken) {
    let readable = t.chain.readable.len();
    let writable = t.chain.writable.len();
    let header = expected_read(shadow, &t.readable, 0, 4);
    for output in [true, false] {
        let parsed = Xfer::parse(mem, &t.chain, output);
        let ctx = Lazy(|| format!("{:?} output={output}: {parsed:?}", t.chain));
        if writable < 8 {
            assert_eq!(parsed, Err(XferError::NoRoomForStatus), "{ctx}");
            continue;
        }
        let status_at = if output { 0 } else { writable - 8 };
        match parsed {
            Ok(x) => {
                let header = header.as_ref().expect("a header that cannot be read");
                assert_eq!(
                    x.stream_id,
                    u32::from_le_bytes(header[..].try_into().unwrap()),
                    "{ctx}"
                );
                assert_eq!(x.status_at, status_at, "{ctx}");
                assert!(x.status_at + 8 <= writable, "{ctx}");
                let payload = if output { readable - 4 } else { writable - 8 };
                assert_eq!(x.payload_len, payload, "{ctx}");
            }
            Err(XferError::ShortHeader { status_at: at }) => {
                assert!(header.is_none(), "a readable header refused: {ctx}");
                assert_eq!(at, status_at, "{ctx}");
                assert!(at + 8 <= writable, "{ctx}");
            }
            Err(XferError::NoRoomForStatus) => panic!("room for a status refused: {ctx}"),
        }
    }
}

fn check_access(
    mem: &GuestMemoryMmap<()>,
    layout: &[(u64, usize)],
    shadow: &mut Shadow,
    t: &Taken,
    access: Access,
    counter: &mut u8,
) {
    let len = usize::from(access.len);
    let (buf, segments) = match access.kind {
        AccessKind::ReadReadable | AccessKind::WriteReadable | AccessKind::ReadIntoReadable => {
            (&t.chain.readable, &t.readable)
        }
        _ => (&t.chain.writable, &t.writable),
    };
    let ctx = Lazy(|| format!("{access:?} on {segments:x?}"));
    let expected = expected_read(shadow, segments, access.offset, len);
    // A zero-length access touches no memory: inside the buffer, whether it fails where its
    // (empty) piece would lie outside guest memory is vm-memory's choice; past the buffer's
    // end it must fail.
    let in_range = pieces(segments, access.offset, len).is_some();
    let check_outcome = |ok: bool| {
        if len == 0 {
            assert!(
                !ok || in_range,
                "out-of-range empty access succeeded: {ctx}"
            );
        } else {
            assert_eq!(ok, expected.is_some(), "access outcome: {ctx}");
        }
    };
    match access.kind {
        AccessKind::ReadReadable | AccessKind::ReadWritable => {
            let mut out = vec![0u8; len];
            let ok = buf.read(mem, access.offset, &mut out).is_ok();
            check_outcome(ok);
            if ok && len > 0 {
                assert_eq!(Some(&out), expected.as_ref(), "read the wrong bytes: {ctx}");
            }
        }
        AccessKind::ReadIntoReadable | AccessKind::ReadIntoWritable => {
            let mut out = vec![0u8; len];
            let ok = buf
                .read_into(mem, access.offset, &VolatileSlice::from(&mut out[..]))
                .is_ok();
            check_outcome(ok);
            if ok && len > 0 {
                assert_eq!(
                    Some(&out),
                    expected.as_ref(),
                    "read_into the wrong bytes: {ctx}"
                );
            }
        }
        AccessKind::WriteWritable | AccessKind::WriteReadable => {
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    *counter = counter.wrapping_add(1);
                    *counter
                })
                .collect();
            let ok = buf.write(mem, access.offset, &data).is_ok();
            check_outcome(ok);
            let pieces = pieces(segments, access.offset, len).unwrap_or_default();
            let actual = Shadow::of(mem, layout);
            // Which bytes the write may change: all of its range if it succeeded (then exactly
            // as the shadow says), else what of its range lies in memory (a failed write may
            // have written a prefix).
            let mut covered: Vec<Vec<bool>> = shadow
                .regions
                .iter()
                .map(|(_, b)| vec![false; b.len()])
                .collect();
            let mut done = 0;
            for &(addr, n) in &pieces {
                if let Some(addr) = addr {
                    if ok {
                        // In order: a later descriptor aliasing an earlier one wins, as in memory.
                        shadow.write(addr, &data[done..done + n]);
                    } else {
                        for (r, at, n) in shadow.spans(addr, n) {
                            covered[r][at..at + n].fill(true);
                        }
                    }
                }
                done += n;
            }
            for (r, ((base, want), (_, got))) in
                shadow.regions.iter().zip(&actual.regions).enumerate()
            {
                if want == got {
                    continue;
                }
                for (i, (w, g)) in want.iter().zip(got).enumerate() {
                    assert!(
                        w == g || covered[r][i],
                        "byte {:#x} changed from {w:#x} to {g:#x}: {ctx}",
                        base + i as u64
                    );
                }
            }
            *shadow = actual;
        }
    }
}
