//! The transaction frame, made in one place: the decoders' events in, framed events out.
//!
//! Both plugins announce a transaction that arrived by replication with an Origin message
//! right after its Begin. The framer holds each Begin until the next event shows whether
//! one follows, folds it into [`Begin::origin`], and, when asked to drop echo, leaves such a
//! transaction out whole (Begin through Commit), reporting only that it did:
//!
//! ```text
//!   Begin ─ Origin ─ Relation ─ Insert ─ Commit      drop_echo: Relation, Echo(commit)
//!                                                    else:      Begin{origin} Relation Insert Commit
//!   Begin ─ Relation ─ Insert ─ Commit               Begin{origin: None} Relation Insert Commit
//! ```
//!
//! Relation and Type events of a dropped transaction still pass: they describe tables for
//! the rest of the session, not the transaction. Nothing after the framer (apply, `tail`)
//! sees an [`Event::Origin`] or decides about echo.
//!
//! While a Begin is held, [`Framer::settled`] is false: a keepalive then must not be taken
//! as "everything before its position was delivered", since the held transaction was not.
//!
//! A streamed in-progress transaction (pgoutput protocol 2) announces its origin with an
//! Origin message right after the Stream Start of its first block: the framer folds it into
//! [`StreamStart::origin`] the same way and, dropping echo, leaves out every block of that
//! transaction and reports its Stream Commit as [`Framed::Echo`] (its Stream Abort as
//! nothing):
//!
//! ```text
//!   StreamStart(x, first) ─ Origin ─ Insert ─ StreamStop ... StreamCommit(x)
//!                                                    drop_echo: Echo(commit)
//! ```

use std::collections::HashSet;

use crate::event::{Begin, Commit, Event, StreamStart};
use crate::lsn::Lsn;

/// One framed item.
#[derive(Clone, Debug, PartialEq)]
pub enum Framed {
    /// An event, with the WAL position of the message it came from.
    Event(Event, Lsn),
    /// A transaction with an origin was left out (echo); its commit.
    Echo(Commit),
}

/// Folds Origin into Begin and drops echo; see the module docs.
#[derive(Debug, Default)]
pub struct Framer {
    drop_echo: bool,
    /// A Begin waiting for the next event, with its WAL position.
    held: Option<(Begin, Lsn)>,
    /// Inside a transaction with an origin that is being dropped.
    echo: bool,
    /// A Stream Start of a transaction's first block, waiting for the next event.
    held_stream: Option<(StreamStart, Lsn)>,
    /// Streamed transactions with an origin, being dropped (their blocks and their end).
    echo_streams: HashSet<u32>,
    /// Inside a streamed block of a dropped transaction.
    echo_block: bool,
}

impl Framer {
    /// A framer; `drop_echo` leaves out every transaction that carries an origin.
    pub fn new(drop_echo: bool) -> Self {
        Framer {
            drop_echo,
            ..Framer::default()
        }
    }

    /// Inside a transaction being dropped as echo: its change messages need not even be
    /// decoded (they would be dropped here).
    pub fn dropping(&self) -> bool {
        self.echo || self.echo_block
    }

    /// Nothing is held back: every transaction begun so far has been passed on (or dropped).
    pub fn settled(&self) -> bool {
        self.held.is_none() && self.held_stream.is_none()
    }

    /// Frames one decoded event, appending what it yields to `out`.
    pub fn push(&mut self, event: Event, wal_start: Lsn, out: &mut Vec<Framed>) {
        if let Some((mut start, at)) = self.held_stream.take() {
            if let Event::Origin(origin) = event {
                start.origin = Some(origin);
                if self.drop_echo {
                    self.echo_streams.insert(start.xid);
                    self.echo_block = true;
                } else {
                    out.push(Framed::Event(Event::StreamStart(start), at));
                }
                return;
            }
            out.push(Framed::Event(Event::StreamStart(start), at));
        }
        match event {
            Event::StreamStart(start) => {
                self.release(out);
                if self.echo_streams.contains(&start.xid) {
                    self.echo_block = true;
                } else if start.first_segment {
                    self.held_stream = Some((start, wal_start));
                } else {
                    out.push(Framed::Event(Event::StreamStart(start), wal_start));
                }
            }
            Event::StreamStop => {
                if !std::mem::take(&mut self.echo_block) {
                    out.push(Framed::Event(event, wal_start));
                }
            }
            Event::StreamCommit(c) => {
                if self.echo_streams.remove(&c.xid) {
                    out.push(Framed::Echo(c.commit));
                } else {
                    out.push(Framed::Event(Event::StreamCommit(c), wal_start));
                }
            }
            Event::StreamAbort { xid, subxid } => {
                if self.echo_streams.contains(&xid) {
                    if xid == subxid {
                        self.echo_streams.remove(&xid);
                    }
                } else {
                    out.push(Framed::Event(event, wal_start));
                }
            }
            Event::Subtransaction(_) => {
                if !self.echo_block {
                    out.push(Framed::Event(event, wal_start));
                }
            }
            Event::Begin(begin) => {
                // A Begin with no Commit before it: the stream restarted inside a
                // transaction; the new one stands alone.
                self.release(out);
                self.echo = false;
                self.held = Some((begin, wal_start));
            }
            // Only ever right after a Begin; elsewhere it frames nothing.
            Event::Origin(origin) => {
                if let Some((mut begin, at)) = self.held.take() {
                    begin.origin = Some(origin);
                    if self.drop_echo {
                        self.echo = true;
                    } else {
                        out.push(Framed::Event(Event::Begin(begin), at));
                    }
                }
            }
            Event::Relation(_) | Event::Type(_) => {
                self.release(out);
                out.push(Framed::Event(event, wal_start));
            }
            Event::Commit(commit) => {
                self.release(out);
                if std::mem::take(&mut self.echo) {
                    out.push(Framed::Echo(commit));
                } else {
                    out.push(Framed::Event(Event::Commit(commit), wal_start));
                }
            }
            Event::Change(_) | Event::Truncate(_) | Event::Message(_) => {
                self.release(out);
                if !self.echo && !self.echo_block {
                    out.push(Framed::Event(event, wal_start));
                }
            }
        }
    }

    fn release(&mut self, out: &mut Vec<Framed>) {
        if let Some((begin, at)) = self.held.take() {
            out.push(Framed::Event(Event::Begin(begin), at));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::event::{
        Change, ChangeOp, Column, LogicalMessage, Origin, Relation, ReplicaIdentity, Tuple, Value,
    };
    use crate::lsn::PgTimestamp;

    fn begin(xid: u32) -> Event {
        Event::Begin(Begin {
            xid,
            final_lsn: Lsn(0x100 * u64::from(xid)),
            commit_time: PgTimestamp(i64::from(xid)),
            origin: None,
        })
    }

    fn commit(xid: u32) -> Event {
        Event::Commit(Commit {
            commit_lsn: Lsn(0x100 * u64::from(xid)),
            end_lsn: Lsn(0x100 * u64::from(xid) + 0x30),
            commit_time: PgTimestamp(i64::from(xid)),
        })
    }

    fn origin() -> Event {
        Event::Origin(Origin {
            name: "walbridge_from_b".into(),
            lsn: Lsn(5),
        })
    }

    fn relation() -> Arc<Relation> {
        Arc::new(Relation {
            oid: 16384,
            schema: "public".into(),
            table: "t".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![Column {
                name: "id".into(),
                type_oid: 23,
                type_modifier: -1,
                is_key: true,
            }],
        })
    }

    fn insert(rel: &Arc<Relation>) -> Event {
        Event::Change(Change {
            op: ChangeOp::Insert,
            relation: rel.clone(),
            new: Some(Tuple(vec![Value::text("1")])),
            old: None,
            source_change_id: None,
        })
    }

    /// Frames `events` (each at WAL position `i`) and returns the items.
    fn frame(drop_echo: bool, events: Vec<Event>) -> Vec<Framed> {
        let mut f = Framer::new(drop_echo);
        let mut out = Vec::new();
        for (i, e) in events.into_iter().enumerate() {
            f.push(e, Lsn(i as u64), &mut out);
        }
        assert!(f.settled());
        out
    }

    fn events(framed: &[Framed]) -> Vec<&Event> {
        framed
            .iter()
            .filter_map(|f| match f {
                Framed::Event(e, _) => Some(e),
                Framed::Echo(_) => None,
            })
            .collect()
    }

    fn stream_start(xid: u32, first_segment: bool) -> Event {
        Event::StreamStart(StreamStart {
            xid,
            first_segment,
            origin: None,
        })
    }

    #[test]
    fn a_streamed_transaction_with_an_origin_is_dropped_whole() {
        let rel = relation();
        let c = match commit(1) {
            Event::Commit(c) => c,
            _ => unreachable!(),
        };
        let out = frame(
            true,
            vec![
                stream_start(1, true),
                origin(),
                insert(&rel),
                Event::StreamStop,
                // Another streamed transaction, local: passes.
                stream_start(2, true),
                insert(&rel),
                Event::StreamStop,
                stream_start(1, false),
                Event::Subtransaction(3),
                insert(&rel),
                Event::StreamStop,
                Event::StreamAbort { xid: 1, subxid: 3 },
                Event::StreamCommit(crate::event::StreamCommit {
                    xid: 1,
                    commit: c.clone(),
                }),
            ],
        );
        assert_eq!(
            events(&out),
            vec![&stream_start(2, true), &insert(&rel), &Event::StreamStop]
        );
        assert_eq!(out.last(), Some(&Framed::Echo(c)));
    }

    #[test]
    fn a_streamed_transaction_keeps_its_origin_when_echo_is_not_dropped() {
        let out = frame(
            false,
            vec![stream_start(1, true), origin(), Event::StreamStop],
        );
        match events(&out).as_slice() {
            [Event::StreamStart(s), Event::StreamStop] => {
                assert_eq!(
                    s.origin.as_ref().map(|o| o.name.as_str()),
                    Some("walbridge_from_b")
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn origin_is_folded_into_its_begin() {
        let rel = relation();
        let out = frame(
            false,
            vec![
                begin(1),
                origin(),
                Event::Relation(rel.clone()),
                insert(&rel),
                commit(1),
            ],
        );
        let Framed::Event(Event::Begin(b), at) = &out[0] else {
            panic!("{out:?}");
        };
        assert_eq!(
            b.origin.as_ref().map(|o| o.name.as_str()),
            Some("walbridge_from_b")
        );
        assert_eq!(*at, Lsn(0), "the Begin keeps its own position");
        assert_eq!(out.len(), 4);
        assert!(events(&out).iter().all(|e| !matches!(e, Event::Origin(_))));
    }

    #[test]
    fn a_local_transaction_passes_unchanged() {
        let rel = relation();
        let input = vec![
            begin(1),
            Event::Relation(rel.clone()),
            insert(&rel),
            commit(1),
        ];
        let out = frame(true, input.clone());
        assert_eq!(events(&out), input.iter().collect::<Vec<_>>());
    }

    #[test]
    fn echo_is_dropped_whole_but_relations_pass() {
        let rel = relation();
        let out = frame(
            true,
            vec![
                begin(1),
                origin(),
                Event::Relation(rel.clone()),
                insert(&rel),
                Event::Message(LogicalMessage {
                    transactional: true,
                    lsn: Lsn(9),
                    prefix: "p".into(),
                    content: bytes::Bytes::new(),
                }),
                commit(1),
                begin(2),
                insert(&rel),
                commit(2),
            ],
        );
        let Framed::Event(Event::Relation(_), _) = &out[0] else {
            panic!("{out:?}");
        };
        let Framed::Echo(c) = &out[1] else {
            panic!("{out:?}");
        };
        assert_eq!(c.end_lsn, Lsn(0x130));
        assert_eq!(
            events(&out[2..]),
            vec![&begin(2), &insert(&rel), &commit(2)]
        );
    }

    #[test]
    fn a_held_begin_is_not_settled() {
        let mut f = Framer::new(true);
        let mut out = Vec::new();
        f.push(begin(1), Lsn(1), &mut out);
        assert!(out.is_empty() && !f.settled() && !f.dropping());
        f.push(origin(), Lsn(2), &mut out);
        assert!(out.is_empty() && f.settled() && f.dropping());
        f.push(commit(1), Lsn(3), &mut out);
        assert!(!f.dropping());
        assert!(matches!(out.as_slice(), [Framed::Echo(_)]));
    }

    #[test]
    fn an_empty_transaction_is_framed() {
        assert_eq!(
            events(&frame(false, vec![begin(1), commit(1)])),
            vec![&begin(1), &commit(1)]
        );
    }
}
