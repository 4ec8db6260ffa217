//! Streamed transactions kept on disk until they commit (spilled), then replayed whole.
//!
//! A streamed in-progress transaction is normally applied into an open target transaction
//! as its blocks arrive (see `apply::stream`). When other transactions interleave with it
//! (an ordinary transaction that commits first, or a second streamed one), the applier
//! cannot keep it open on its one session: it rolls it back, the stream is restarted from
//! the target's progress, and the source is told to *spill* that xid. Its blocks then go to
//! an anonymous temporary file (in `$TMPDIR`, removed by the OS when walbridge exits,
//! however it exits) instead of onward, and at its Stream Commit the file is replayed as
//! one ordinary transaction (`Begin`, its messages, `Commit`), through the same decoder and
//! framer as everything else. So memory stays bounded (a write buffer) whatever its size.
//!
//! ```text
//!   StreamStart(x) ─ I ─ I ─ StreamStop ─ B..C(other) ─ StreamStart(x) ─ I ─ StreamStop ─ StreamCommit(x)
//!        │          └─┴──────▶ file(x)       └─▶ on, as usual       └──────▶ file(x)          │
//!        │                                                                                      ▼
//!        └──────────────────────────────────────── replay: B(x) ─ I ─ I ─ I ─ C(x) ──▶ decoder ─▶ on
//! ```
//!
//! The file holds the raw pgoutput messages with the streamed block's xid prefix removed
//! (so they decode as in an ordinary transaction), each preceded by its length. A
//! subtransaction's first message is remembered by offset: its abort cuts the file there,
//! as PostgreSQL's own apply worker does with its stream files (a subtransaction's changes
//! and its children's are contiguous from its first change to its abort).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};

use bytes::{BufMut, Bytes, BytesMut};

use crate::event::{Commit, Event};

/// One spilled transaction's file.
struct SpillFile {
    writer: BufWriter<File>,
    /// Bytes written so far.
    len: u64,
    /// First offset of each subtransaction, in order of appearance.
    subxacts: Vec<(u32, u64)>,
}

/// A spilled transaction being read back.
pub(super) struct Replay {
    reader: BufReader<File>,
    /// Synthesized Begin still to give, then the file's records, then the Commit.
    begin: Option<Bytes>,
    commit: Option<Bytes>,
    left: u64,
}

/// What to do with one message, given its decoded events.
pub(super) enum Routed {
    /// Pass these events on.
    Pass(Vec<Event>),
    /// Kept in a spill file (or a spill control message): nothing passes.
    Kept,
    /// A spilled transaction committed: replay it.
    Replay(Replay),
}

/// The spill files of one replication session.
#[derive(Default)]
pub(super) struct Spill {
    /// Xids to spill.
    xids: HashSet<u32>,
    files: HashMap<u32, SpillFile>,
    /// Inside a streamed block of a spilled transaction.
    block: Option<u32>,
}

/// Whether a pgoutput message inside a streamed block carries the xid prefix.
fn prefixed(tag: u8) -> bool {
    matches!(tag, b'R' | b'Y' | b'I' | b'U' | b'D' | b'T' | b'M')
}

impl Spill {
    pub(super) fn new(xids: impl IntoIterator<Item = u32>) -> Self {
        Spill {
            xids: xids.into_iter().collect(),
            ..Spill::default()
        }
    }

    /// Whether this session spills anything at all.
    pub(super) fn is_empty(&self) -> bool {
        self.xids.is_empty()
    }

    /// Routes one raw message `data` whose decoded events are `events`.
    pub(super) fn route(&mut self, data: &[u8], events: Vec<Event>) -> io::Result<Routed> {
        if let Some(xid) = self.block {
            // Inside a spilled block: everything but the stop goes to the file. Relation and
            // Type messages also pass (they describe tables for the rest of the session).
            if matches!(events.first(), Some(Event::StreamStop)) {
                self.block = None;
                return Ok(Routed::Kept);
            }
            let Some(file) = self.files.get_mut(&xid) else {
                return Ok(Routed::Kept);
            };
            for e in &events {
                if let Event::Subtransaction(sub) = e {
                    if *sub != xid && !file.subxacts.iter().any(|(s, _)| s == sub) {
                        file.subxacts.push((*sub, file.len));
                    }
                }
            }
            let Some(&tag) = data.first() else {
                return Ok(Routed::Kept);
            };
            let body: &[u8] = if prefixed(tag) && data.len() >= 5 {
                &data[5..]
            } else {
                &data[1..]
            };
            let len = u32::try_from(body.len() + 1).map_err(io::Error::other)?;
            file.writer.write_all(&len.to_be_bytes())?;
            file.writer.write_all(&[tag])?;
            file.writer.write_all(body)?;
            file.len += 4 + u64::from(len);
            let described: Vec<Event> = events
                .into_iter()
                .filter(|e| matches!(e, Event::Relation(_) | Event::Type(_)))
                .collect();
            return Ok(if described.is_empty() {
                Routed::Kept
            } else {
                Routed::Pass(described)
            });
        }
        match events.first() {
            Some(Event::StreamStart(s)) if self.xids.contains(&s.xid) => {
                if s.first_segment || !self.files.contains_key(&s.xid) {
                    let file = tempfile::tempfile()?;
                    self.files.insert(
                        s.xid,
                        SpillFile {
                            writer: BufWriter::with_capacity(64 * 1024, file),
                            len: 0,
                            subxacts: Vec::new(),
                        },
                    );
                }
                self.block = Some(s.xid);
                Ok(Routed::Kept)
            }
            Some(Event::StreamAbort { xid, subxid }) if self.files.contains_key(xid) => {
                if xid == subxid {
                    self.files.remove(xid);
                    self.xids.remove(xid);
                } else if let Some(file) = self.files.get_mut(xid) {
                    if let Some(i) = file.subxacts.iter().position(|(s, _)| s == subxid) {
                        let at = file.subxacts[i].1;
                        file.subxacts.truncate(i);
                        file.writer.flush()?;
                        let f = file.writer.get_mut();
                        f.set_len(at)?;
                        f.seek(SeekFrom::Start(at))?;
                        file.len = at;
                    }
                }
                Ok(Routed::Kept)
            }
            Some(Event::StreamCommit(c)) if self.files.contains_key(&c.xid) => {
                let xid = c.xid;
                let commit = c.commit.clone();
                self.xids.remove(&xid);
                let Some(file) = self.files.remove(&xid) else {
                    return Ok(Routed::Kept);
                };
                let left = file.len;
                let mut f = file.writer.into_inner().map_err(|e| e.into_error())?;
                f.seek(SeekFrom::Start(0))?;
                Ok(Routed::Replay(Replay {
                    reader: BufReader::with_capacity(64 * 1024, f),
                    begin: Some(begin_message(xid, &commit)),
                    commit: Some(commit_message(&commit)),
                    left,
                }))
            }
            _ => Ok(Routed::Pass(events)),
        }
    }
}

impl Replay {
    /// The next message of the replayed transaction; `None` once its Commit was given.
    pub(super) fn next(&mut self) -> io::Result<Option<Bytes>> {
        if let Some(b) = self.begin.take() {
            return Ok(Some(b));
        }
        if self.left >= 4 {
            let mut len = [0u8; 4];
            self.reader.read_exact(&mut len)?;
            let len = u32::from_be_bytes(len) as usize;
            let mut buf = vec![0u8; len];
            self.reader.read_exact(&mut buf)?;
            self.left = self.left.saturating_sub(4 + len as u64);
            return Ok(Some(Bytes::from(buf)));
        }
        Ok(self.commit.take())
    }
}

/// A pgoutput Begin for a replayed transaction.
fn begin_message(xid: u32, commit: &Commit) -> Bytes {
    let mut b = BytesMut::with_capacity(21);
    b.put_u8(b'B');
    b.put_u64(commit.commit_lsn.0);
    b.put_i64(commit.commit_time.0);
    b.put_u32(xid);
    b.freeze()
}

/// A pgoutput Commit for a replayed transaction.
fn commit_message(commit: &Commit) -> Bytes {
    let mut b = BytesMut::with_capacity(26);
    b.put_u8(b'C');
    b.put_u8(0);
    b.put_u64(commit.commit_lsn.0);
    b.put_u64(commit.end_lsn.0);
    b.put_i64(commit.commit_time.0);
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{StreamCommit, StreamStart};
    use crate::lsn::{Lsn, PgTimestamp};

    fn start(xid: u32, first_segment: bool) -> Vec<Event> {
        vec![Event::StreamStart(StreamStart {
            xid,
            first_segment,
            origin: None,
        })]
    }

    /// An insert-like message of `xid` with payload `p`, as sent inside a streamed block.
    fn raw(xid: u32, p: u8) -> Vec<u8> {
        let mut v = vec![b'I'];
        v.extend_from_slice(&xid.to_be_bytes());
        v.push(p);
        v
    }

    fn replayed(r: &mut Replay) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(m) = r.next().unwrap() {
            out.push(m.to_vec());
        }
        out
    }

    #[test]
    fn a_spilled_transaction_replays_without_its_aborted_subtransaction() {
        let mut s = Spill::new([7]);
        assert!(matches!(
            s.route(b"S", start(7, true)).unwrap(),
            Routed::Kept
        ));
        s.route(&raw(7, 1), vec![]).unwrap();
        s.route(&raw(8, 2), vec![Event::Subtransaction(8)]).unwrap();
        s.route(&raw(8, 3), vec![]).unwrap();
        s.route(b"E", vec![Event::StreamStop]).unwrap();
        // Other transactions pass meanwhile.
        assert!(matches!(
            s.route(b"S", start(9, true)).unwrap(),
            Routed::Pass(_)
        ));
        s.route(b"A", vec![Event::StreamAbort { xid: 7, subxid: 8 }])
            .unwrap();
        s.route(b"S", start(7, false)).unwrap();
        s.route(&raw(7, 4), vec![Event::Subtransaction(7)]).unwrap();
        s.route(b"E", vec![Event::StreamStop]).unwrap();
        let commit = Commit {
            commit_lsn: Lsn(0x100),
            end_lsn: Lsn(0x130),
            commit_time: PgTimestamp(5),
        };
        let Routed::Replay(mut r) = s
            .route(
                b"c",
                vec![Event::StreamCommit(StreamCommit { xid: 7, commit })],
            )
            .unwrap()
        else {
            panic!("no replay");
        };
        let got = replayed(&mut r);
        assert_eq!(got.len(), 4);
        assert_eq!(got[0][0], b'B');
        assert_eq!(got[1], vec![b'I', 1]);
        assert_eq!(got[2], vec![b'I', 4]);
        assert_eq!(got[3][0], b'C');
        assert!(s.files.is_empty());
    }

    #[test]
    fn a_spilled_transaction_that_aborts_leaves_nothing() {
        let mut s = Spill::new([7]);
        s.route(b"S", start(7, true)).unwrap();
        s.route(&raw(7, 1), vec![]).unwrap();
        s.route(b"E", vec![Event::StreamStop]).unwrap();
        s.route(b"A", vec![Event::StreamAbort { xid: 7, subxid: 7 }])
            .unwrap();
        assert!(s.files.is_empty());
        assert!(s.is_empty());
    }
}
