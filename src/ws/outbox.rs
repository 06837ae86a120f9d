//! The frames a connection has encoded and not yet written. Small frames go into one
//! contiguous buffer (one slice to write); a large payload handed over with its buffer
//! stays there and is written with `writev` next to its header, never copied.
//!
//! The contiguous buffer is given back to its thread once everything is written and
//! taken again for the next echo, so that a busy connection does not allocate per echo
//! and an idle one holds nothing.

use std::{borrow::Cow, cell::Cell, collections::VecDeque, io::IoSlice};

use super::{
    chunked::Chunked,
    deflate::{self, Params},
    frame::{self, OpCode},
};

/// From this size a payload handed over with its buffer is written from that buffer,
/// not copied: below it, the copy costs less than a segment of its own.
const OWN_SEGMENT_FROM: usize = 4 * 1024;

/// Most segments handed to one `writev`.
pub(crate) const MAX_IO_SLICES: usize = 16;

/// The capacity a fresh buffer starts with: a pipelined wake-up's echoes fit without
/// growing it.
const FRESH_CAPACITY: usize = 2 * 1024;

/// Buffers larger than this are freed when written out, not kept for the next echo.
const SPARE_MAX: usize = 64 * 1024;

thread_local! {
    /// One written-out buffer per thread, kept for the next connection that echoes.
    static SPARE: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// A payload to send.
#[derive(Debug)]
pub(crate) enum Payload<'a> {
    /// Bytes that stay where they are: the outbox copies them.
    Slice(&'a [u8]),
    /// A buffer the outbox may take (leaving it empty) instead of copying it.
    Owned(&'a mut Vec<u8>),
    /// Bytes still masked with this key (RFC 6455 §5.3): the outbox unmasks them as it
    /// copies them, one pass instead of two.
    Masked(&'a [u8], [u8; 4]),
    /// A large received message in its chunks, which the outbox takes (leaving it
    /// empty): each is written from where it was received.
    Chunks(&'a mut Chunked),
}

impl Payload<'_> {
    /// The payload's length.
    pub(crate) fn len(&self) -> usize {
        match self {
            Self::Slice(bytes) | Self::Masked(bytes, _) => bytes.len(),
            Self::Owned(buffer) => buffer.len(),
            Self::Chunks(chunked) => chunked.len(),
        }
    }

    /// The bytes, unmasked, in one slice (a copy for [`Payload::Masked`] and for
    /// [`Payload::Chunks`]).
    pub(crate) fn to_plain(&self) -> Cow<'_, [u8]> {
        match self {
            Self::Slice(bytes) => (*bytes).into(),
            Self::Owned(buffer) => buffer.as_slice().into(),
            Self::Masked(bytes, mask) => {
                let mut plain = bytes.to_vec();
                frame::unmask(&mut plain, *mask, 0);
                plain.into()
            }
            Self::Chunks(chunked) => chunked.to_contiguous(),
        }
    }

    /// Up to the first `max` bytes, unmasked (for a log line).
    pub(crate) fn head(&self, max: usize) -> Cow<'_, [u8]> {
        match self {
            Self::Chunks(chunked) => match chunked.pieces().next() {
                Some(first) => Cow::Borrowed(&first[..first.len().min(max)]),
                None => Cow::Borrowed(&[]),
            },
            Self::Masked(bytes, mask) => {
                let mut plain = bytes[..bytes.len().min(max)].to_vec();
                frame::unmask(&mut plain, *mask, 0);
                plain.into()
            }
            Self::Slice(bytes) => Cow::Borrowed(&bytes[..bytes.len().min(max)]),
            Self::Owned(buffer) => Cow::Borrowed(&buffer[..buffer.len().min(max)]),
        }
    }

    /// Compresses the payload as one message (§7.2.1) into `out`.
    pub(crate) fn deflate(&self, params: &Params, out: &mut Vec<u8>) {
        match self {
            Self::Chunks(chunked) => {
                deflate::deflate_pieces(chunked.pieces(), chunked.len(), params, out);
            }
            other => deflate::deflate_message(&other.to_plain(), params, out),
        }
    }
}

/// Encoded frames waiting to be written, in order.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    /// Small frames and the headers of large ones; `buf[written..]` is unwritten.
    buf: Vec<u8>,
    /// Bytes of `buf` already written.
    written: usize,
    /// Large payloads, each with the position in `buf` it is written at (after the
    /// bytes before it), in order.
    large: VecDeque<(usize, Vec<u8>)>,
    /// Bytes of the first large payload already written.
    large_written: usize,
    /// Bytes not yet written, in all.
    len: usize,
}

impl Outbox {
    /// Bytes waiting to be written.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Bytes the outbox keeps allocated for what is unwritten: the unwritten bytes, and
    /// the written part of buffers that are not yet given back (a large payload is
    /// freed only once all of it is written). What the read budget is charged for.
    pub(crate) fn held(&self) -> usize {
        self.len + self.written + self.large_written
    }

    /// Whether everything was written.
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends one frame.
    #[inline]
    pub(crate) fn push_frame(
        &mut self,
        fin: bool,
        rsv1: bool,
        opcode: OpCode,
        payload: Payload<'_>,
    ) {
        let len = payload.len();
        if self.buf.capacity() == 0 {
            self.buf = SPARE.take();
            self.buf.reserve(FRESH_CAPACITY);
        }
        let before = self.buf.len();
        frame::encode_header(&mut self.buf, fin, rsv1, opcode, len);
        self.len += self.buf.len() - before + len;
        match payload {
            Payload::Owned(buffer) if len >= OWN_SEGMENT_FROM => {
                self.push_segment(std::mem::take(buffer));
            }
            Payload::Masked(bytes, mask) => {
                let start = self.buf.len();
                self.buf.extend_from_slice(bytes);
                frame::unmask(&mut self.buf[start..], mask, 0);
            }
            Payload::Slice(bytes) => self.buf.extend_from_slice(bytes),
            Payload::Owned(buffer) => self.buf.extend_from_slice(buffer),
            Payload::Chunks(chunked) => {
                // Each chunk (64 KiB to 1 MiB, but the last) goes out as it is.
                for chunk in chunked.take_chunks() {
                    if chunk.len() >= OWN_SEGMENT_FROM {
                        self.push_segment(chunk);
                    } else {
                        self.buf.extend_from_slice(&chunk);
                    }
                }
            }
        }
    }

    /// Queues a large payload's own buffer, written from where it is.
    fn push_segment(&mut self, mut buffer: Vec<u8>) {
        let len = buffer.len();
        if buffer.capacity() > len + len / 2 {
            // A buffer grown by doubling, or reserved for a worst case (a compressed
            // echo), may wait long for a slow reader: keep only what is sent.
            buffer.shrink_to_fit();
        }
        self.large.push_back((self.buf.len(), buffer));
    }

    /// Appends bytes that are already whole frames.
    pub(crate) fn push_raw(&mut self, frames: &[u8]) {
        if self.buf.capacity() == 0 {
            self.buf = SPARE.take();
        }
        self.buf.extend_from_slice(frames);
        self.len += frames.len();
    }

    /// The unwritten bytes when they are all in one buffer (no large payload waits):
    /// the common case, written without `writev`.
    #[inline]
    pub(crate) fn contiguous(&self) -> Option<&[u8]> {
        self.large.is_empty().then(|| &self.buf[self.written..])
    }

    /// Fills `slices` with the unwritten bytes, in order; returns how many it filled.
    pub(crate) fn io_slices<'a>(&'a self, slices: &mut [IoSlice<'a>; MAX_IO_SLICES]) -> usize {
        let mut count = 0;
        let mut at = self.written;
        for (index, (position, payload)) in self.large.iter().enumerate() {
            if count + 2 > MAX_IO_SLICES {
                return count;
            }
            if *position > at {
                slices[count] = IoSlice::new(&self.buf[at..*position]);
                count += 1;
            }
            let skip = if index == 0 { self.large_written } else { 0 };
            slices[count] = IoSlice::new(&payload[skip..]);
            count += 1;
            at = *position;
        }
        // The last large payload may have taken the last slot.
        if count < MAX_IO_SLICES && self.buf.len() > at {
            slices[count] = IoSlice::new(&self.buf[at..]);
            count += 1;
        }
        count
    }

    /// Notes that `n` more bytes were written. Once everything is, the buffers go: the
    /// small one back to the thread for the next echo, so an idle connection holds none.
    pub(crate) fn advance(&mut self, mut n: usize) {
        self.len -= n;
        if self.large.is_empty() {
            self.written += n;
            n = 0;
        }
        while n > 0 {
            let until = self.large.front().map_or(self.buf.len(), |(at, _)| *at);
            let small = (until - self.written).min(n);
            self.written += small;
            n -= small;
            if n == 0 {
                break;
            }
            let (_, payload) = self
                .large
                .front()
                .expect("invariant: `n` is at most the unwritten length");
            let large = (payload.len() - self.large_written).min(n);
            self.large_written += large;
            n -= large;
            if self.large_written == payload.len() {
                self.large.pop_front();
                self.large_written = 0;
            }
        }
        if self.len == 0 {
            self.written = 0;
            self.large = VecDeque::new();
            let mut buf = std::mem::take(&mut self.buf);
            if buf.capacity() <= SPARE_MAX {
                buf.clear();
                SPARE.set(buf);
            }
        }
    }

    /// The unwritten bytes as one buffer, for tests.
    #[cfg(test)]
    pub(crate) fn contents(&self) -> Vec<u8> {
        let mut slices = [IoSlice::new(&[]); MAX_IO_SLICES];
        let count = self.io_slices(&mut slices);
        slices[..count]
            .iter()
            .flat_map(|s| s.iter().copied())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_frames_share_a_buffer_and_large_payloads_are_not_copied() {
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
        outbox.push_frame(true, false, OpCode::Text, Payload::Slice(b"after"));
        let all = outbox.contents();
        for step in [3, 10, 4990, 2] {
            let before = outbox.contents();
            outbox.advance(step);
            assert_eq!(outbox.contents(), before[step..]);
        }
        outbox.advance(outbox.len());
        assert!(outbox.is_empty());
        assert_eq!(all.len(), 7 + 4 + 5000 + 7);
        assert_eq!((outbox.buf.capacity(), outbox.large.capacity()), (0, 0));
    }

    /// More segments than one `writev` takes: the slices stop at the limit, whichever
    /// payload fills it, and the rest follows in order. (A large payload filling the
    /// last slot, then a small frame, once wrote past the array.)
    #[test]
    fn more_segments_than_one_writev_are_written_in_turns() {
        for large in [7, 8, 15, 16, 17] {
            let mut outbox = Outbox::default();
            let mut expected = Vec::new();
            for index in 0..large {
                let mut payload = vec![index as u8; OWN_SEGMENT_FROM];
                frame::encode_header(&mut expected, true, false, OpCode::Binary, payload.len());
                expected.extend_from_slice(&payload);
                outbox.push_frame(true, false, OpCode::Binary, Payload::Owned(&mut payload));
            }
            outbox.push_frame(true, false, OpCode::Pong, Payload::Slice(b"p"));
            expected.extend_from_slice(&[0x8A, 1, b'p']);
            let mut written = Vec::new();
            while !outbox.is_empty() {
                let mut slices = [IoSlice::new(&[]); MAX_IO_SLICES];
                let count = outbox.io_slices(&mut slices);
                assert!(count > 0 && count <= MAX_IO_SLICES);
                let n: usize = slices[..count].iter().map(|slice| slice.len()).sum();
                written.extend(
                    slices[..count]
                        .iter()
                        .flat_map(|slice| slice.iter().copied()),
                );
                outbox.advance(n);
            }
            assert!(written == expected, "{large} large payloads");
        }
    }

    #[test]
    fn masked_payloads_are_unmasked_as_they_are_copied() {
        let mut outbox = Outbox::default();
        let mask = [1, 2, 3, 4];
        let mut masked = b"hello, world".to_vec();
        frame::unmask(&mut masked, mask, 0);
        outbox.push_frame(true, false, OpCode::Binary, Payload::Masked(&masked, mask));
        assert_eq!(&outbox.contents()[2..], b"hello, world");
    }
}
