//! Feeds arbitrary bytes through a pgoutput decoder that already knows one relation, so
//! change messages get past the relation lookup and into tuple decoding.
//!
//! The input is read as a stream of messages, each prefixed by a one-byte length, and
//! decoded in order by one decoder: that reaches the stateful paths (a Relation replacing the
//! known one, Stream Start switching on the xid prefix) as well as single-message parsing.
//! The only property checked is the decoder's promise: it returns, it never panics.

#![no_main]

use bytes::{BufMut, Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use walbridge::decode::pgoutput::PgOutputDecoder;
use walbridge::lsn::Lsn;

/// OID of the relation the decoder learns before the fuzz input.
const OID: u32 = 16384;

/// A Relation message for `public.accounts (id int8 key, owner text, balance numeric, note text)`.
fn relation_message() -> Bytes {
    let mut m = BytesMut::new();
    m.put_u8(b'R');
    m.put_u32(OID);
    m.put_slice(b"public\0accounts\0");
    m.put_u8(b'd');
    m.put_u16(4);
    for (key, name, type_oid) in [
        (1, &b"id\0"[..], 20),
        (0, b"owner\0", 25),
        (0, b"balance\0", 1700),
        (0, b"note\0", 25),
    ] {
        m.put_u8(key);
        m.put_slice(name);
        m.put_u32(type_oid);
        m.put_i32(-1);
    }
    m.freeze()
}

fuzz_target!(|data: &[u8]| {
    let mut decoder = PgOutputDecoder::new();
    decoder
        .decode(Lsn(1), &relation_message())
        .expect("the fixed Relation message decodes");

    // The whole input as one message.
    let _ = decoder.decode(Lsn(2), &Bytes::copy_from_slice(data));

    // The input as a sequence of length-prefixed messages, once through `decode` and once
    // through `decode_streaming` (protocol version 2 streamed blocks as events).
    let mut streaming = PgOutputDecoder::new();
    let _ = streaming.decode(Lsn(1), &relation_message());
    let mut events = Vec::new();
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len).min(tail.len());
        let (message, tail) = tail.split_at(len);
        let message = Bytes::copy_from_slice(message);
        let _ = decoder.decode(Lsn(3), &message);
        events.clear();
        let _ = streaming.decode_streaming(Lsn(3), &message, &mut events);
        rest = tail;
    }
});
