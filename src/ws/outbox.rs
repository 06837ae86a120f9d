//! The frames a connection has encoded and not yet written: small frames share one
//! buffer, and a large payload stays in the buffer it was received in, so the driver
//! writes it with `writev` next to its header instead of copying it.

use std::{collections::VecDeque, io::IoSlice};

use super::frame::{self, OpCode};

/// From this size a payload handed over with its buffer is written from that buffer,
/// not copied: below it, the copy costs less than a segment of its own.
const OWN_SEGMENT_FROM: usize = 4 * 1024;

/// Most segments handed to one `writev`.
pub(crate) const MAX_IO_SLICES: usize = 16;

/// A payload to send: borrowed (copied into the outbox) or in a buffer the outbox may
/// take over.
#[derive(Debug)]
pub(crate) enum Payload<'a> {
    /// Bytes that stay where they are: the outbox copies them.
    Slice(&'a [u8]),
    /// A buffer the outbox may take (leaving it empty) instead of copying it.
    Owned(&'a mut Vec<u8>),
}

impl Payload<'_> {
    /// The bytes.
    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            Self::Slice(bytes) => bytes,
            Self::Owned(buffer) => buffer,
        }
    }
}

/// Encoded frames waiting to be written, in order.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    /// Byte runs in write order; the first may be partly written already.
    segments: VecDeque<Vec<u8>>,
    /// Bytes of the first segment already written.
    written: usize,
    /// Bytes not yet written, in all.
    len: usize,
    /// Whether the last segment takes more small frames (a taken payload does not).
    tail_open: bool,
}

impl Outbox {
    /// Bytes waiting to be written.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether everything was written.
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends one frame.
    pub(crate) fn push_frame(
        &mut self,
        fin: bool,
        rsv1: bool,
        opcode: OpCode,
        payload: Payload<'_>,
    ) {
        let len = payload.as_slice().len();
        let tail = self.open_tail(frame::MAX_SERVER_HEADER_LEN);
        let before = tail.len();
        frame::encode_header(tail, fin, rsv1, opcode, len);
        let header_len = tail.len() - before;
        match payload {
            Payload::Owned(buffer) if len >= OWN_SEGMENT_FROM => {
                if buffer.capacity() > len + len / 2 {
                    // A buffer grown by doubling, or reserved for a worst case (a
                    // compressed echo), may wait long for a slow reader: keep only what
                    // is sent.
                    buffer.shrink_to_fit();
                }
                self.segments.push_back(std::mem::take(buffer));
                self.tail_open = false;
            }
            payload => {
                let tail = self.open_tail(len);
                tail.extend_from_slice(payload.as_slice());
            }
        }
        self.len += header_len + len;
    }

    /// The last segment, with room for `additional` more bytes.
    fn open_tail(&mut self, additional: usize) -> &mut Vec<u8> {
        if !self.tail_open || self.segments.is_empty() {
            self.segments
                .push_back(Vec::with_capacity(additional.max(256)));
            self.tail_open = true;
        }
        let tail = self
            .segments
            .back_mut()
            .expect("invariant: a segment was pushed above if there was none");
        tail.reserve(additional);
        tail
    }

    /// Fills `slices` with the unwritten bytes, in order; returns how many it filled.
    pub(crate) fn io_slices<'a>(&'a self, slices: &mut [IoSlice<'a>; MAX_IO_SLICES]) -> usize {
        let mut count = 0;
        for (index, segment) in self.segments.iter().take(MAX_IO_SLICES).enumerate() {
            let skip = if index == 0 { self.written } else { 0 };
            slices[count] = IoSlice::new(&segment[skip..]);
            count += 1;
        }
        count
    }

    /// Notes that `n` more bytes were written; buffers fully written are freed, so
    /// that an idle connection holds none.
    pub(crate) fn advance(&mut self, mut n: usize) {
        self.len -= n;
        while n > 0 {
            let front = self
                .segments
                .front()
                .expect("invariant: `n` is at most the unwritten length");
            let left = front.len() - self.written;
            if n < left {
                self.written += n;
                return;
            }
            n -= left;
            self.written = 0;
            self.segments.pop_front();
        }
        if self.segments.is_empty() {
            self.segments = VecDeque::new();
        }
    }

    /// The unwritten bytes as one buffer, for tests.
    #[cfg(test)]
    pub(crate) fn contents(&self) -> Vec<u8> {
        let mut all: Vec<u8> = Vec::new();
        for (index, segment) in self.segments.iter().enumerate() {
            let skip = if index == 0 { self.written } else { 0 };
            all.extend_from_slice(&segment[skip..]);
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_frames_share_a_segment_and_large_payloads_are_not_copied() {
        let mut outbox = Outbox::default();
        outbox.push_frame(true, false, OpCode::Text, Payload::Slice(b"hi"));
        let mut big = vec![9; OWN_SEGMENT_FROM];
        let big_ptr = big.as_ptr();
        outbox.push_frame(true, false, OpCode::Binary, Payload::Owned(&mut big));
        assert!(big.is_empty());
        outbox.push_frame(true, false, OpCode::Text, Payload::Slice(b"yo"));
        let mut slices = [IoSlice::new(&[]); MAX_IO_SLICES];
        assert_eq!(outbox.io_slices(&mut slices), 3);
        assert_eq!(slices[1].as_ptr(), big_ptr);
        assert_eq!(outbox.len(), 4 + 4 + OWN_SEGMENT_FROM + 4);
    }

    #[test]
    fn partial_writes_resume_where_they_stopped() {
        let mut outbox = Outbox::default();
        outbox.push_frame(true, false, OpCode::Text, Payload::Slice(b"hello"));
        outbox.push_frame(
            true,
            false,
            OpCode::Binary,
            Payload::Owned(&mut vec![1; 5000]),
        );
        let all = outbox.contents();
        outbox.advance(3);
        assert_eq!(outbox.contents(), all[3..]);
        outbox.advance(10);
        assert_eq!(outbox.contents(), all[13..]);
        outbox.advance(all.len() - 13);
        assert!(outbox.is_empty());
        assert_eq!(outbox.segments.capacity(), 0);
    }
}
