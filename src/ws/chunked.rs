//! A message's payload as it arrives: buffers of at most [`CHUNK`] bytes, each
//! allocated once at the size it will have, so that a message grows without copying
//! what it already holds, and its echo is written from the same buffers.
//!
//! A `Vec` grows by moving everything into a larger buffer, and the allocator keeps the
//! old one resident until it purges it: 20 clients growing 16 MiB messages at once held
//! up to 170 MiB more than their messages (`benches/attacks.py hold`). Here each byte
//! is written once, and a message that arrives in one go is a single `Vec`.

use std::borrow::Cow;

use super::outbox::Payload;

/// The most bytes one buffer of a message holds: 16 MiB take 16 (and a few smaller ones
/// while the message's budget grows), a `writev` or two.
pub(crate) const CHUNK: usize = 1024 * 1024;

/// A last chunk smaller than this grows by moving, rather than being followed by another:
/// the copy is small, and every full chunk is then too large for jemalloc's thread
/// caches (32 KiB), which an idle thread never flushes. With chunks of any size, 40
/// clients sending compressed 16 MiB messages left 9.3 MiB of the heap resident after
/// they left (3.4 MiB with one growing `Vec`; `benches/attacks.py inflate`).
const MOVE_BELOW: usize = 64 * 1024;

/// A payload in buffers: every one but the last is full (its length is its capacity).
#[derive(Debug, Default)]
pub(crate) struct Chunked {
    /// Full chunks, in order; `None` while there are none (most messages), and boxed,
    /// so that the receiver of every idle connection carries 8 bytes for them, not 24.
    full: Option<Box<Full>>,
    /// The chunk being filled (the whole payload while it is under [`CHUNK`]).
    last: Vec<u8>,
}

/// The chunks a payload has filled.
#[derive(Debug, Default)]
struct Full {
    chunks: Vec<Vec<u8>>,
    /// Their bytes, in all.
    len: usize,
}

impl Chunked {
    /// Bytes in all.
    pub(crate) fn len(&self) -> usize {
        self.full_len() + self.last.len()
    }

    /// Bytes allocated, in all.
    pub(crate) fn capacity(&self) -> usize {
        self.full_len() + self.last.capacity()
    }

    /// Bytes in the full chunks.
    fn full_len(&self) -> usize {
        self.full.as_ref().map_or(0, |full| full.len)
    }

    /// Bytes the last chunk can still take without allocating.
    pub(crate) fn spare(&self) -> usize {
        self.last.capacity() - self.last.len()
    }

    /// The payload to send: one buffer as it is, or the chunks, either to be taken.
    pub(crate) fn as_payload(&mut self) -> Payload<'_> {
        if self.is_single() {
            Payload::Owned(&mut self.last)
        } else {
            Payload::Chunks(self)
        }
    }

    /// Whether the payload is one buffer.
    pub(crate) fn is_single(&self) -> bool {
        self.full.is_none()
    }

    /// Makes room for `want` more bytes (up to a chunk's end) when the last chunk has
    /// none: a last chunk under [`MOVE_BELOW`] grows (is moved), a larger one is left
    /// as it is and a new chunk takes up to [`CHUNK`]. While the last chunk has spare
    /// capacity, that is the room. Returns the bytes allocated.
    pub(crate) fn reserve(&mut self, want: usize) -> usize {
        if self.spare() > 0 || want == 0 {
            return 0;
        }
        let before = self.last.capacity();
        if before > 0 && before < MOVE_BELOW {
            self.last.reserve_exact(want.min(CHUNK - self.last.len()));
            return self.last.capacity() - before;
        }
        if before > 0 {
            let last = std::mem::take(&mut self.last);
            let full = self.full.get_or_insert_default();
            full.len += last.len();
            full.chunks.push(last);
        }
        let want = want.min(CHUNK);
        self.last.reserve_exact(want);
        self.last.capacity()
    }

    /// The chunk being filled, to append to within its spare capacity
    /// ([`Chunked::reserve`] first).
    pub(crate) fn last_mut(&mut self) -> &mut Vec<u8> {
        &mut self.last
    }

    /// Appends as much of `bytes` as the spare capacity takes; returns how much.
    pub(crate) fn append(&mut self, bytes: &[u8]) -> usize {
        let taken = self.spare().min(bytes.len());
        self.last.extend_from_slice(&bytes[..taken]);
        taken
    }

    /// The bytes from position `start` to the end, in pieces.
    pub(crate) fn since(&self, start: usize) -> impl Iterator<Item = &[u8]> {
        self.pieces()
            .scan(0, move |at, piece| {
                let from = start.saturating_sub(*at).min(piece.len());
                *at += piece.len();
                Some(&piece[from..])
            })
            .filter(|piece| !piece.is_empty())
    }

    /// Every chunk, in order.
    pub(crate) fn pieces(&self) -> impl Iterator<Item = &[u8]> {
        self.full
            .iter()
            .flat_map(|full| full.chunks.iter())
            .chain(std::iter::once(&self.last))
            .map(Vec::as_slice)
    }

    /// Takes the chunks out, in order, leaving the payload empty.
    pub(crate) fn take_chunks(&mut self) -> impl Iterator<Item = Vec<u8>> {
        let mut all = self.full.take().map_or_else(Vec::new, |full| full.chunks);
        all.push(std::mem::take(&mut self.last));
        all.into_iter()
    }

    /// The bytes as one slice: borrowed when they are in one chunk, copied otherwise.
    pub(crate) fn to_contiguous(&self) -> Cow<'_, [u8]> {
        if self.is_single() {
            Cow::Borrowed(&self.last)
        } else {
            Cow::Owned(self.pieces().collect::<Vec<_>>().concat())
        }
    }

    /// The bytes as one buffer, taken out: moved when they are in one chunk, copied
    /// otherwise.
    pub(crate) fn take_contiguous(&mut self) -> Vec<u8> {
        if self.is_single() {
            std::mem::take(&mut self.last)
        } else {
            let all = self.to_contiguous().into_owned();
            *self = Self::default();
            all
        }
    }
}

impl From<Vec<u8>> for Chunked {
    /// One buffer, as it is.
    fn from(last: Vec<u8>) -> Self {
        Self { full: None, last }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Appends `bytes` in pieces of `step`, each new chunk as large as what is held
    /// (at least 64 KiB), as the receiver grows a message; the address of every chunk
    /// after each piece.
    fn fill(chunked: &mut Chunked, bytes: &[u8], step: usize) -> Vec<Vec<*const u8>> {
        let mut addresses = Vec::new();
        for piece in bytes.chunks(step) {
            let mut piece = piece;
            while !piece.is_empty() {
                chunked.reserve(chunked.len().max(64 * 1024));
                piece = &piece[chunked.append(piece)..];
            }
            addresses.push(chunked.pieces().map(<[u8]>::as_ptr).collect());
        }
        addresses
    }

    #[test]
    fn a_large_payload_grows_in_chunks_that_never_move() {
        let bytes: Vec<u8> = (0..3 * CHUNK + 5).map(|i| (i % 251) as u8).collect();
        let mut chunked = Chunked::default();
        let addresses = fill(&mut chunked, &bytes, 100_000);
        for pair in addresses.windows(2) {
            assert!(pair[1].starts_with(&pair[0][..pair[0].len() - 1]), "moved");
        }
        assert_eq!(chunked.len(), bytes.len());
        assert_eq!(chunked.capacity() - chunked.len(), chunked.spare());
        let sizes: Vec<usize> = chunked.pieces().map(<[u8]>::len).collect();
        // 64 KiB, then as much as is held, up to a chunk.
        assert_eq!(sizes[..5], [1 << 16, 1 << 16, 1 << 17, 1 << 18, 1 << 19]);
        assert!(sizes[5..sizes.len() - 1].iter().all(|&size| size == CHUNK));
        assert_eq!(chunked.to_contiguous(), &bytes[..]);
        let tail: Vec<u8> = chunked.since(CHUNK - 2).collect::<Vec<_>>().concat();
        assert_eq!(tail, &bytes[CHUNK - 2..]);
        let taken: Vec<u8> = chunked.take_chunks().collect::<Vec<_>>().concat();
        assert_eq!(taken, bytes);
        assert_eq!((chunked.len(), chunked.capacity()), (0, 0));
    }

    #[test]
    fn a_payload_in_one_buffer_is_moved_out_whole() {
        let mut chunked = Chunked::default();
        fill(&mut chunked, b"hello", 2);
        assert!(chunked.is_single());
        assert_eq!(chunked.since(3).collect::<Vec<_>>(), [b"lo"]);
        assert!(matches!(chunked.to_contiguous(), Cow::Borrowed(b"hello")));
        let pointer = chunked.pieces().next().map(<[u8]>::as_ptr);
        let taken = chunked.take_contiguous();
        assert_eq!(
            (taken.as_slice(), Some(taken.as_ptr())),
            (&b"hello"[..], pointer)
        );
    }

    #[test]
    fn a_chunk_is_allocated_only_when_the_last_is_full_and_at_most_a_chunk_long() {
        let mut chunked = Chunked::default();
        assert_eq!(chunked.reserve(CHUNK + 10), CHUNK);
        assert_eq!(chunked.reserve(10), 0, "spare capacity is the room");
        chunked.last_mut().resize(CHUNK, 0);
        assert_eq!(chunked.reserve(10), 10);
        assert_eq!(chunked.capacity(), CHUNK + 10);
        assert!(!chunked.is_single());
    }

    #[test]
    fn a_small_chunk_grows_where_it_is_up_to_the_move_limit() {
        let mut small = Chunked::default();
        for size in [4096, 8192, MOVE_BELOW - 4096 - 8192] {
            assert_eq!(small.reserve(size), size);
            let len = small.last_mut().len();
            small.last_mut().resize(len + size, 7);
        }
        assert!(small.is_single());
        assert_eq!(small.capacity(), MOVE_BELOW);
        assert_eq!(small.reserve(100), 100);
        assert!(!small.is_single(), "a full chunk of the move limit stays");
        assert_eq!(
            small.pieces().map(<[u8]>::len).collect::<Vec<_>>(),
            [MOVE_BELOW, 0]
        );
    }
}
