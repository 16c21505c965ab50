//! The layout of a PCM I/O request (VIRTIO sound, "PCM I/O messages"): a device-readable
//! header naming the stream, the frames (device-readable after the header for tx,
//! device-writable for rx), and last a device-writable status.

use vm_memory::GuestMemory;

use crate::guest::Chain;
use crate::protocol as p;

/// Why a chain is not a PCM I/O request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum XferError {
    /// The writable part cannot hold the status: the chain goes back with nothing written.
    #[error("no room for a status")]
    NoRoomForStatus,
    /// No readable 4-byte header: answered BAD_MSG, the status written at `status_at`.
    #[error("short header")]
    ShortHeader { status_at: u64 },
}

/// Where a PCM I/O request's parts are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Xfer {
    pub stream_id: u32,
    /// Frame bytes: after the header in the readable part (tx), or before the status in the
    /// writable part (rx).
    pub payload_len: u64,
    /// Offset of the status in the writable part: first for tx, after the frames for rx.
    pub status_at: u64,
}

impl Xfer {
    /// Parses the request in `chain`: a tx request if `output`, else an rx request.
    pub fn parse<M: GuestMemory>(mem: &M, chain: &Chain, output: bool) -> Result<Xfer, XferError> {
        let status_len = p::PcmStatus::SIZE;
        let Some(frames_writable) = chain.writable.len().checked_sub(status_len) else {
            return Err(XferError::NoRoomForStatus);
        };
        let (payload_len, status_at) = if output {
            (chain.readable.len().saturating_sub(p::PcmXfer::SIZE), 0)
        } else {
            (frames_writable, frames_writable)
        };
        let mut header = [0u8; p::PcmXfer::SIZE as usize];
        if chain.readable.len() < p::PcmXfer::SIZE
            || chain.readable.read(mem, 0, &mut header).is_err()
        {
            return Err(XferError::ShortHeader { status_at });
        }
        Ok(Xfer {
            stream_id: u32::from_le_bytes(header),
            payload_len,
            status_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::GuestBuffer;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    fn chain(readable: &[(u64, u32)], writable: &[(u64, u32)]) -> Chain {
        Chain {
            head: 0,
            readable: GuestBuffer::from_segments(readable),
            writable: GuestBuffer::from_segments(writable),
        }
    }

    #[test]
    fn tx_and_rx_layouts() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        mem.write_slice(&7u32.to_le_bytes(), GuestAddress(0x100))
            .unwrap();
        // tx: header + 96 frame bytes readable (in two pieces), 8 status bytes writable.
        let tx = chain(&[(0x100, 20), (0x200, 80)], &[(0x400, 8)]);
        assert_eq!(
            Xfer::parse(&mem, &tx, true),
            Ok(Xfer {
                stream_id: 7,
                payload_len: 96,
                status_at: 0
            })
        );
        // rx: header readable, 64 frame bytes then the status writable.
        let rx = chain(&[(0x100, 4)], &[(0x400, 40), (0x500, 32)]);
        assert_eq!(
            Xfer::parse(&mem, &rx, false),
            Ok(Xfer {
                stream_id: 7,
                payload_len: 64,
                status_at: 64
            })
        );
    }

    #[test]
    fn malformed_requests() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let no_status = chain(&[(0x100, 8)], &[(0x400, 7)]);
        assert_eq!(
            Xfer::parse(&mem, &no_status, true),
            Err(XferError::NoRoomForStatus)
        );
        let short = chain(&[(0x100, 3)], &[(0x400, 16)]);
        assert_eq!(
            Xfer::parse(&mem, &short, false),
            Err(XferError::ShortHeader { status_at: 8 })
        );
        // A header outside guest memory is as good as none.
        let outside = chain(&[(0xfffe, 8)], &[(0x400, 8)]);
        assert_eq!(
            Xfer::parse(&mem, &outside, true),
            Err(XferError::ShortHeader { status_at: 0 })
        );
    }
}
