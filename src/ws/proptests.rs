//! Property tests of the sans-IO core: any sequence of valid messages, fragmented
//! anywhere, compressed or not, with control frames between fragments, and cut into
//! reads at arbitrary points, comes out of the [`Receiver`] as the same messages in the
//! same order, and the [`Sender`]'s frames parse back to them. Unlike the integration
//! properties (`tests/integration/properties.rs`), no socket or runtime is involved, so
//! thousands of cases run in seconds.

use proptest::prelude::*;

use super::{
    connection::{Kind, Limits, Receiver, Sender},
    deflate::{self, Params},
    frame::{self, OpCode, client_frame},
    fuzzing::{Record, Seen},
    outbox::{Outbox, Payload},
};

const MASK: [u8; 4] = [0x5A, 0x01, 0xC3, 0x99];

fn params() -> Params {
    Params {
        server_window_bits: 15,
        client_window_bits: 15,
        client_no_context_takeover: true,
        level: 1,
        threshold: 0,
    }
}

/// One message as a client sends it: kind, payload, how many fragments, compressed,
/// and a Ping to slip in after its first fragment.
fn message() -> impl Strategy<Value = (bool, Vec<u8>, usize, bool, Option<Vec<u8>>)> {
    (
        any::<bool>(),
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..200),
            "[a-zé€𝄞 ]{0,300}".prop_map(String::into_bytes),
        ],
        1usize..5,
        any::<bool>(),
        prop::option::of(prop::collection::vec(any::<u8>(), 0..125)),
    )
}

/// The client frames of one message, and whether its Ping comes before the message
/// ends (it follows the first fragment, which may be the last).
fn encode(
    (text, payload, fragments, compressed, ping): &(bool, Vec<u8>, usize, bool, Option<Vec<u8>>),
) -> (Vec<u8>, bool) {
    let mut data = payload.clone();
    if *compressed {
        data.clear();
        deflate::deflate_message(payload, &params(), &mut data);
    }
    let size = data.len().div_ceil(*fragments).max(1);
    let pieces: Vec<&[u8]> = if data.is_empty() {
        vec![&[]]
    } else {
        data.chunks(size).collect()
    };
    let mut bytes = Vec::new();
    for (i, piece) in pieces.iter().enumerate() {
        let fin = if i + 1 == pieces.len() { 0x80 } else { 0 };
        let first = match i {
            0 => fin | if *compressed { 0x40 } else { 0 } | if *text { 1 } else { 2 },
            _ => fin,
        };
        bytes.extend(client_frame(first, piece, MASK));
        if i == 0 {
            if let Some(ping) = ping {
                bytes.extend(client_frame(0x89, ping, MASK));
            }
        }
    }
    (bytes, pieces.len() > 1)
}

proptest! {
    #[test]
    fn valid_messages_come_out_whole_wherever_reads_cut_them(
        messages in prop::collection::vec(message(), 1..8),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        // Text that is not UTF-8 is a different property; keep only valid text.
        let messages: Vec<_> = messages
            .into_iter()
            .filter(|(text, payload, ..)| !text || std::str::from_utf8(payload).is_ok())
            .collect();
        let mut bytes = Vec::new();
        let mut expected = Vec::new();
        for message in &messages {
            let (frames, ping_first) = encode(message);
            bytes.extend(frames);
            let (text, payload, _, _, ping) = message;
            let kind = if *text { Kind::Text } else { Kind::Binary };
            let ping = ping.clone().map(Seen::Ping);
            let message = Seen::Message(kind, payload.clone());
            if ping_first {
                expected.extend(ping.into_iter().chain([message]));
            } else {
                expected.extend([message].into_iter().chain(ping));
            }
        }
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        points.sort_unstable();
        let limits = Limits { max_frame: 1 << 20, max_message: 1 << 20 };
        let mut receiver = Receiver::new(limits, Some(params()));
        let mut record = Record::default();
        let mut start = 0;
        for end in points.into_iter().chain([bytes.len()]) {
            receiver.receive(&mut bytes[start..end].to_vec(), &mut record);
            start = end;
        }
        prop_assert_eq!(record.0, expected);
        prop_assert_eq!(receiver.buffered(), 0);
    }

    #[test]
    fn what_the_sender_encodes_parses_back(
        text in any::<bool>(),
        payload in prop::collection::vec(any::<u8>(), 0..5000),
        max_frame in 1usize..3000,
        compressed in any::<bool>(),
    ) {
        let kind = if text { Kind::Text } else { Kind::Binary };
        let mut sender = Sender::new(compressed.then(params));
        let mut outbox = Outbox::default();
        sender.fragmented(kind, Payload::Slice(&payload), max_frame, &mut outbox);
        // Parse the server frames back (mask them as a client would, so `parse` takes
        // them) and join the fragments.
        let mut wire = outbox.contents();
        let mut joined = Vec::new();
        let mut rsv1_seen = false;
        let mut opcodes = Vec::new();
        while !wire.is_empty() {
            let (header_len, len) = match wire[1] & 0x7F {
                126 => (4, u16::from_be_bytes([wire[2], wire[3]]) as usize),
                127 => (10, u64::from_be_bytes(wire[2..10].try_into().unwrap()) as usize),
                n => (2, n as usize),
            };
            let masked = client_frame(wire[0], &wire[header_len..header_len + len], MASK);
            let (header, _) = frame::parse(&masked, true).unwrap().unwrap();
            prop_assert!(!header.rsv1 || opcodes.is_empty(), "RSV1 only on the first frame");
            rsv1_seen |= header.rsv1;
            opcodes.push(header.opcode);
            joined.extend_from_slice(&wire[header_len..header_len + len]);
            let last = header.fin;
            wire.drain(..header_len + len);
            prop_assert_eq!(last, wire.is_empty());
        }
        prop_assert_eq!(opcodes[0], kind.opcode());
        prop_assert!(opcodes[1..].iter().all(|&op| op == OpCode::Continuation));
        if rsv1_seen {
            let mut inflater = deflate::Inflater::new(&params());
            let mut out = crate::ws::chunked::Chunked::default();
            inflater.inflate(&joined, &mut out, usize::MAX - 1, &mut { usize::MAX }).unwrap();
            inflater.finish(&mut out, usize::MAX - 1).unwrap();
            joined = out.take_contiguous();
        } else {
            prop_assert!(opcodes.len() == payload.len().div_ceil(max_frame).max(1));
        }
        prop_assert_eq!(joined, payload);
    }
}
