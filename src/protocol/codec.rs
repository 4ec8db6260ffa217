//! Pure encoding and decoding for the parts of the protocol postgres-protocol lacks:
//! message framing over a read buffer, the CopyBoth sub-messages of streaming replication
//! (XLogData 'w', primary keepalive 'k', standby status update 'r'), and the quoting of
//! replication commands. No I/O here, and no panics on any input.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::message::backend::Header;

use crate::lsn::{Lsn, PgTimestamp};

/// Largest backend message accepted: PostgreSQL caps a field at 1 GiB; a little room on top
/// for the message's own header fields.
pub const MAX_MESSAGE_LEN: usize = (1 << 30) + (1 << 20);

/// Most room [`split_frame`] reserves ahead of bytes that have not arrived: a header is only
/// a claim, so a large message grows the buffer as its bytes come in (the buffer doubles as
/// it fills), never all at once on the word of a length field.
pub const MAX_RESERVE_AHEAD: usize = 1 << 20;

/// Takes one complete backend message (tag, length and body) off the front of `buf`.
///
/// `Ok(None)` means more bytes are needed; `Err` means the stream is corrupt.
pub fn split_frame(buf: &mut BytesMut) -> Result<Option<BytesMut>, String> {
    let header = match Header::parse(buf) {
        Ok(Some(h)) => h,
        Ok(None) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    // Header::parse rejected lengths below 4, so this is non-negative.
    let len = usize::try_from(header.len()).map_err(|_| "negative message length".to_string())?;
    if len > MAX_MESSAGE_LEN {
        return Err(format!(
            "message of type {:?} claims {len} bytes, more than the protocol allows",
            char::from(header.tag())
        ));
    }
    // The tag byte is not counted in the length; MAX_MESSAGE_LEN keeps this far from usize::MAX.
    let total = len
        .checked_add(1)
        .ok_or_else(|| "message length overflows".to_string())?;
    if buf.len() < total {
        buf.reserve((total - buf.len()).min(MAX_RESERVE_AHEAD));
        return Ok(None);
    }
    Ok(Some(buf.split_to(total)))
}

/// Takes one backend message off the front of `buf` and parses it with postgres-protocol.
///
/// Unlike `Message::parse` on the whole buffer, this never reserves the length a header
/// claims before the bytes arrive (see [`split_frame`]).
pub fn next_message(
    buf: &mut BytesMut,
) -> Result<Option<postgres_protocol::message::backend::Message>, String> {
    let Some(mut frame) = split_frame(buf)? else {
        return Ok(None);
    };
    match postgres_protocol::message::backend::Message::parse(&mut frame) {
        Ok(Some(m)) => Ok(Some(m)),
        Ok(None) => Err("incomplete message".into()),
        Err(e) => Err(format!("malformed message from the server: {e}")),
    }
}

/// A sub-message of a replication CopyData message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CopyMessage {
    /// WAL data: for logical replication, one output-plugin message.
    XLogData {
        /// WAL position the message belongs to.
        wal_start: Lsn,
        /// Server's WAL end at the time of sending.
        wal_end: Lsn,
        /// Server clock when sent.
        send_time: PgTimestamp,
        /// The output plugin's bytes.
        data: Bytes,
    },
    /// The server is alive, and has sent everything up to `wal_end`.
    Keepalive {
        /// Server's WAL end.
        wal_end: Lsn,
        /// Server clock when sent.
        send_time: PgTimestamp,
        /// The server wants a status update now (or it may time us out).
        reply_requested: bool,
    },
}

fn take_u64(b: &mut Bytes, what: &str) -> Result<u64, String> {
    if b.remaining() < 8 {
        return Err(format!("{what} is truncated"));
    }
    Ok(b.get_u64())
}

/// Decodes the payload of a CopyData message received during `START_REPLICATION`.
pub fn parse_copy_data(mut payload: Bytes) -> Result<CopyMessage, String> {
    if payload.is_empty() {
        return Err("empty CopyData message in replication stream".into());
    }
    match payload.get_u8() {
        b'w' => {
            let wal_start = Lsn(take_u64(&mut payload, "XLogData")?);
            let wal_end = Lsn(take_u64(&mut payload, "XLogData")?);
            let send_time = PgTimestamp(take_u64(&mut payload, "XLogData")? as i64);
            Ok(CopyMessage::XLogData {
                wal_start,
                wal_end,
                send_time,
                data: payload,
            })
        }
        b'k' => {
            let wal_end = Lsn(take_u64(&mut payload, "primary keepalive")?);
            let send_time = PgTimestamp(take_u64(&mut payload, "primary keepalive")? as i64);
            if payload.remaining() < 1 {
                return Err("primary keepalive is truncated".into());
            }
            let reply_requested = payload.get_u8() != 0;
            Ok(CopyMessage::Keepalive {
                wal_end,
                send_time,
                reply_requested,
            })
        }
        other => Err(format!(
            "unknown replication message type {:?} (byte {other})",
            char::from(other)
        )),
    }
}

/// Appends a CopyData message holding a standby status update ('r').
pub fn standby_status_update(
    write: Lsn,
    flush: Lsn,
    apply: Lsn,
    now: PgTimestamp,
    reply_requested: bool,
    buf: &mut BytesMut,
) {
    const BODY: i32 = 1 + 8 + 8 + 8 + 8 + 1;
    buf.put_u8(b'd');
    buf.put_i32(4 + BODY);
    buf.put_u8(b'r');
    buf.put_u64(write.0);
    buf.put_u64(flush.0);
    buf.put_u64(apply.0);
    buf.put_i64(now.0);
    buf.put_u8(u8::from(reply_requested));
}

/// Quotes an identifier for a replication command (`"name"`, inner quotes doubled).
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes a string literal for a replication command (`'value'`, inner quotes doubled; the
/// replication grammar has no backslash escapes).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// What `CREATE_REPLICATION_SLOT` does with the snapshot at the slot's consistent point.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SnapshotAction {
    /// Export it (`EXPORT_SNAPSHOT`): usable with `SET TRANSACTION SNAPSHOT` by other
    /// sessions until this connection runs another command.
    Export,
    /// Do not create one (`NOEXPORT_SNAPSHOT`).
    #[default]
    NoExport,
    /// Use it in the current transaction (`USE_SNAPSHOT`); the connection must be inside a
    /// `REPEATABLE READ` transaction that has not run a query yet.
    Use,
}

/// `CREATE_REPLICATION_SLOT "name" [TEMPORARY] LOGICAL plugin <snapshot action>`, in the
/// syntax every PostgreSQL from 10 on accepts.
pub fn create_logical_slot_command(
    name: &str,
    plugin: &str,
    temporary: bool,
    snapshot: SnapshotAction,
) -> String {
    let action = match snapshot {
        SnapshotAction::Export => "EXPORT_SNAPSHOT",
        SnapshotAction::NoExport => "NOEXPORT_SNAPSHOT",
        SnapshotAction::Use => "USE_SNAPSHOT",
    };
    format!(
        "CREATE_REPLICATION_SLOT {}{} LOGICAL {} {action}",
        quote_ident(name),
        if temporary { " TEMPORARY" } else { "" },
        quote_ident(plugin),
    )
}

/// `DROP_REPLICATION_SLOT "name" [WAIT]`.
pub fn drop_slot_command(name: &str, wait: bool) -> String {
    format!(
        "DROP_REPLICATION_SLOT {}{}",
        quote_ident(name),
        if wait { " WAIT" } else { "" }
    )
}

/// `START_REPLICATION SLOT "name" LOGICAL X/Y ("opt" 'value', ...)`.
pub fn start_logical_command(slot: &str, start: Lsn, options: &[(String, String)]) -> String {
    let mut cmd = format!(
        "START_REPLICATION SLOT {} LOGICAL {start}",
        quote_ident(slot)
    );
    if !options.is_empty() {
        let opts: Vec<String> = options
            .iter()
            .map(|(k, v)| format!("{} {}", quote_ident(k), quote_literal(v)))
            .collect();
        cmd.push_str(" (");
        cmd.push_str(&opts.join(", "));
        cmd.push(')');
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_at_message_boundaries() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(b"Z\0\0\0\x05I");
        buf.extend_from_slice(b"C\0\0\0\x0bSEL");
        let first = split_frame(&mut buf).unwrap().unwrap();
        assert_eq!(&first[..], b"Z\0\0\0\x05I");
        // Incomplete second message: wait for more.
        assert_eq!(split_frame(&mut buf).unwrap(), None);
        buf.extend_from_slice(b"ECT\0");
        let second = split_frame(&mut buf).unwrap().unwrap();
        assert_eq!(&second[..], b"C\0\0\0\x0bSELECT\0");
        assert!(buf.is_empty());
        assert_eq!(split_frame(&mut buf).unwrap(), None);
    }

    #[test]
    fn a_length_claim_reserves_no_memory_ahead_of_its_bytes() {
        // A header claiming 1 GiB: accepted as a length, but the buffer grows only by the
        // bounded look-ahead, not by the claim.
        let mut buf = BytesMut::new();
        buf.put_u8(b'd');
        buf.put_i32(1 << 30);
        buf.put_slice(b"abc");
        assert_eq!(split_frame(&mut buf).unwrap(), None);
        assert!(
            buf.capacity() <= MAX_RESERVE_AHEAD + 64,
            "reserved {} bytes for a message whose bytes have not arrived",
            buf.capacity()
        );
        // A header claiming 2 GiB (i32::MAX): refused outright.
        let mut buf = BytesMut::new();
        buf.put_u8(b'd');
        buf.put_i32(i32::MAX);
        assert!(split_frame(&mut buf).unwrap_err().contains("claims"));
        assert!(buf.capacity() <= MAX_RESERVE_AHEAD + 64);
        // The same through the message parser the apply pipeline uses.
        let mut buf = BytesMut::new();
        buf.put_u8(b'D');
        buf.put_i32(0x4000_0000);
        assert!(matches!(next_message(&mut buf), Ok(None)));
        assert!(buf.capacity() <= MAX_RESERVE_AHEAD + 64);
        // Negative lengths are corrupt.
        let mut buf = BytesMut::new();
        buf.put_u8(b'd');
        buf.put_i32(i32::MIN);
        assert!(split_frame(&mut buf).is_err());
    }

    #[test]
    fn corrupt_lengths_are_errors() {
        let mut buf = BytesMut::from(&b"d\0\0\0\x02"[..]);
        assert!(split_frame(&mut buf).is_err());
        let mut buf = BytesMut::from(&b"d\x7f\xff\xff\xff"[..]);
        assert!(split_frame(&mut buf).is_err());
        let mut buf = BytesMut::from(&b"d\xff\xff\xff\xff"[..]);
        assert!(split_frame(&mut buf).is_err());
    }

    #[test]
    fn xlogdata_round_trip() {
        let mut b = BytesMut::new();
        b.put_u8(b'w');
        b.put_u64(0x16_B374_D848);
        b.put_u64(0x16_B374_D900);
        b.put_i64(12345);
        b.put_slice(b"payload");
        assert_eq!(
            parse_copy_data(b.freeze()).unwrap(),
            CopyMessage::XLogData {
                wal_start: Lsn(0x16_B374_D848),
                wal_end: Lsn(0x16_B374_D900),
                send_time: PgTimestamp(12345),
                data: Bytes::from_static(b"payload"),
            }
        );
    }

    #[test]
    fn keepalive_round_trip() {
        let mut b = BytesMut::new();
        b.put_u8(b'k');
        b.put_u64(42);
        b.put_i64(-1);
        b.put_u8(1);
        assert_eq!(
            parse_copy_data(b.freeze()).unwrap(),
            CopyMessage::Keepalive {
                wal_end: Lsn(42),
                send_time: PgTimestamp(-1),
                reply_requested: true,
            }
        );
    }

    #[test]
    fn truncated_and_unknown_messages_are_errors() {
        for bad in [
            &b""[..],
            b"w",
            b"w\0\0\0\0\0\0\0\x01",
            b"k\0\0\0\0\0\0\0\x01\0\0\0\0\0\0\0\x02",
            b"x123",
        ] {
            assert!(
                parse_copy_data(Bytes::copy_from_slice(bad)).is_err(),
                "{bad:?}"
            );
        }
        // Every prefix of a valid message either parses or errors, never panics.
        let mut b = BytesMut::new();
        b.put_u8(b'w');
        b.put_bytes(7, 24);
        let full = b.freeze();
        for n in 0..full.len() {
            let _ = parse_copy_data(full.slice(..n));
        }
    }

    #[test]
    fn status_update_layout() {
        let mut buf = BytesMut::new();
        standby_status_update(Lsn(1), Lsn(2), Lsn(3), PgTimestamp(4), false, &mut buf);
        assert_eq!(buf.len(), 1 + 4 + 34);
        assert_eq!(&buf[..6], b"d\0\0\0\x26r");
        assert_eq!(&buf[6..14], &1u64.to_be_bytes());
        assert_eq!(&buf[14..22], &2u64.to_be_bytes());
        assert_eq!(&buf[22..30], &3u64.to_be_bytes());
        assert_eq!(&buf[30..38], &4i64.to_be_bytes());
        assert_eq!(buf[38], 0);
    }

    #[test]
    fn commands_are_quoted() {
        assert_eq!(
            start_logical_command(
                "s\"1",
                Lsn(0x1_0000_0010),
                &[
                    ("proto_version".into(), "1".into()),
                    ("publication_names".into(), "it's".into())
                ]
            ),
            "START_REPLICATION SLOT \"s\"\"1\" LOGICAL 1/10 (\"proto_version\" '1', \
             \"publication_names\" 'it''s')"
        );
        assert_eq!(
            start_logical_command("s", Lsn::ZERO, &[]),
            "START_REPLICATION SLOT \"s\" LOGICAL 0/0"
        );
        assert_eq!(
            create_logical_slot_command("s", "pgoutput", true, SnapshotAction::Export),
            "CREATE_REPLICATION_SLOT \"s\" TEMPORARY LOGICAL \"pgoutput\" EXPORT_SNAPSHOT"
        );
        assert_eq!(
            drop_slot_command("s", true),
            "DROP_REPLICATION_SLOT \"s\" WAIT"
        );
    }
}
