//! Guest buffers of a descriptor chain, kept as (address, length) lists so that a tx/rx buffer
//! can be held across events (paced completion) and read or written later through whatever
//! memory map is current. Every access goes through vm-memory's checked translation.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions, VolatileSlice};

/// Most descriptors one chain may have; virtio-queue already bounds it by the queue size, this
/// also bounds indirect tables.
pub const MAX_SEGMENTS: usize = 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("the chain has more than {MAX_SEGMENTS} descriptors")]
    TooLong,
    #[error("guest memory access out of bounds")]
    Memory,
}

/// The device-readable or device-writable part of a chain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestBuffer {
    segments: Vec<(GuestAddress, u32)>,
    len: u64,
}

impl GuestBuffer {
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A buffer of these (address, length) segments, as a descriptor chain would give.
    pub fn from_segments(segments: &[(u64, u32)]) -> GuestBuffer {
        let mut buf = GuestBuffer::default();
        for &(addr, len) in segments {
            buf.push(GuestAddress(addr), len);
        }
        buf
    }

    fn push(&mut self, addr: GuestAddress, len: u32) {
        if len > 0 {
            self.segments.push((addr, len));
            self.len += u64::from(len);
        }
    }

    /// Calls `f(address, range in the flat buffer)` for each piece of `[offset, offset+len)`.
    fn for_each_piece(
        &self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), ChainError>,
    ) -> Result<(), ChainError> {
        let end = offset
            .checked_add(len as u64)
            .filter(|&e| e <= self.len)
            .ok_or(ChainError::Memory)?;
        let mut seg_start = 0u64;
        let mut done = 0usize;
        for &(addr, seg_len) in &self.segments {
            let seg_end = seg_start + u64::from(seg_len);
            if seg_end > offset && seg_start < end {
                let from = offset.max(seg_start);
                let to = end.min(seg_end);
                let n = (to - from) as usize;
                let gpa = addr
                    .checked_add(from - seg_start)
                    .ok_or(ChainError::Memory)?;
                f(gpa, done..done + n)?;
                done += n;
            }
            if seg_end >= end {
                break;
            }
            seg_start = seg_end;
        }
        Ok(())
    }

    /// Copies `out.len()` bytes starting at `offset` of this buffer out of guest memory.
    pub fn read<M: GuestMemory>(
        &self,
        mem: &M,
        offset: u64,
        out: &mut [u8],
    ) -> Result<(), ChainError> {
        self.for_each_piece(offset, out.len(), |gpa, range| {
            mem.read_slice(&mut out[range], gpa)
                .map_err(|_| ChainError::Memory)
        })
    }

    /// Copies `dst.len()` bytes from `offset` of this buffer straight into `dst` (memory shared
    /// with another process, written only through volatile accesses).
    pub fn read_into<M: GuestMemory>(
        &self,
        mem: &M,
        offset: u64,
        dst: &VolatileSlice<'_>,
    ) -> Result<(), ChainError> {
        self.for_each_piece(offset, dst.len(), |gpa, range| {
            let mut at = range.start;
            let slices = mem
                .get_slices(gpa, range.len(), Permissions::Read)
                .map_err(|_| ChainError::Memory)?;
            for src in slices {
                let src = src.map_err(|_| ChainError::Memory)?;
                let piece = dst
                    .subslice(at, src.len())
                    .map_err(|_| ChainError::Memory)?;
                src.copy_to_volatile_slice(piece);
                at += src.len();
            }
            Ok(())
        })
    }

    /// Copies `src` (shared memory: volatile) into guest memory at `offset` of this buffer,
    /// with no copy between the two.
    pub fn write_from<M: GuestMemory>(
        &self,
        mem: &M,
        offset: u64,
        src: &VolatileSlice<'_>,
    ) -> Result<(), ChainError> {
        self.for_each_piece(offset, src.len(), |gpa, range| {
            let mut at = range.start;
            let slices = mem
                .get_slices(gpa, range.len(), Permissions::Write)
                .map_err(|_| ChainError::Memory)?;
            for dst in slices {
                let dst = dst.map_err(|_| ChainError::Memory)?;
                let piece = src
                    .subslice(at, dst.len())
                    .map_err(|_| ChainError::Memory)?;
                let len = dst.len();
                piece.copy_to_volatile_slice(dst);
                at += len;
            }
            Ok(())
        })
    }

    /// Copies `data` into guest memory at `offset` of this buffer.
    pub fn write<M: GuestMemory>(
        &self,
        mem: &M,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ChainError> {
        self.for_each_piece(offset, data.len(), |gpa, range| {
            mem.write_slice(&data[range], gpa)
                .map_err(|_| ChainError::Memory)
        })
    }
}

/// A descriptor chain taken off a queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub head: u16,
    pub readable: GuestBuffer,
    pub writable: GuestBuffer,
}

impl Chain {
    /// Splits a chain into its readable and writable parts. The spec requires every readable
    /// descriptor to come before every writable one.
    pub fn from_descriptors<M>(chain: DescriptorChain<M>) -> Result<Chain, ChainError>
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        let head = chain.head_index();
        let mut readable = GuestBuffer::default();
        let mut writable = GuestBuffer::default();
        for (count, desc) in chain.enumerate() {
            if count >= MAX_SEGMENTS {
                return Err(ChainError::TooLong);
            }
            if desc.is_write_only() {
                writable.push(desc.addr(), desc.len());
            } else if !writable.is_empty() {
                return Err(ChainError::ReadableAfterWritable);
            } else {
                readable.push(desc.addr(), desc.len());
            }
        }
        Ok(Chain {
            head,
            readable,
            writable,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    #[test]
    fn reads_and_writes_span_segments() {
        let mem = mem();
        let mut buf = GuestBuffer::default();
        buf.push(GuestAddress(0x100), 3);
        buf.push(GuestAddress(0x200), 0);
        buf.push(GuestAddress(0x300), 5);
        assert_eq!(buf.len(), 8);
        buf.write(&mem, 1, &[1, 2, 3, 4, 5]).unwrap();
        let mut out = [0u8; 8];
        buf.read(&mem, 0, &mut out).unwrap();
        assert_eq!(out, [0, 1, 2, 3, 4, 5, 0, 0]);
        let mut b = [0u8; 2];
        mem.read_slice(&mut b, GuestAddress(0x301)).unwrap();
        assert_eq!(b, [4, 5]);
    }

    #[test]
    fn read_into_copies_every_segment_into_volatile_memory() {
        let mem = mem();
        let mut buf = GuestBuffer::default();
        buf.push(GuestAddress(0x100), 3);
        buf.push(GuestAddress(0x300), 5);
        buf.write(&mem, 0, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        let mut out = [0u8; 6];
        let dst = VolatileSlice::from(&mut out[..]);
        buf.read_into(&mem, 1, &dst).unwrap();
        assert_eq!(out, [2, 3, 4, 5, 6, 7]);
        let mut past = [0u8; 8];
        let dst = VolatileSlice::from(&mut past[..]);
        assert_eq!(buf.read_into(&mem, 1, &dst), Err(ChainError::Memory));
    }

    #[test]
    fn out_of_range_access_is_an_error() {
        let mem = mem();
        let mut buf = GuestBuffer::default();
        buf.push(GuestAddress(0x100), 4);
        assert_eq!(buf.write(&mem, 2, &[0; 3]), Err(ChainError::Memory));
        assert_eq!(
            buf.read(&mem, u64::MAX, &mut [0; 1]),
            Err(ChainError::Memory)
        );
        // A descriptor pointing outside guest memory.
        let mut outside = GuestBuffer::default();
        outside.push(GuestAddress(0xfffe), 16);
        assert_eq!(outside.write(&mem, 0, &[0; 16]), Err(ChainError::Memory));
        let mut wrapping = GuestBuffer::default();
        wrapping.push(GuestAddress(u64::MAX - 1), 16);
        assert_eq!(wrapping.read(&mem, 4, &mut [0; 4]), Err(ChainError::Memory));
    }
}
