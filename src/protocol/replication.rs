//! Replication commands and the CopyBoth stream of `START_REPLICATION ... LOGICAL`.
//!
//! The stream is split three ways so that the caller decides where things run:
//!
//! ```text
//!   socket ◀──▶ driver future ──(bounded channel + byte budget)──▶ ReplicationStream::recv
//!                    ▲
//!                    └── Feedback (confirm / request_now) ◀── consumer, after committing
//! ```
//!
//! The driver owns the socket. When the channel is full or the byte budget is spent it stops
//! reading the socket (TCP flow control then slows the walsender down), but keeps sending
//! standby status updates on its timer, so `wal_sender_timeout` never fires however slow
//! the consumer is. The flush position reported to the server only ever moves forward and
//! only covers what the consumer confirmed, so the slot never advances past data that was
//! not applied.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::codec::{self, CopyMessage, SnapshotAction};
use super::conn::{frame_body, parse_message, QueryResult, RawConnection};
use super::error::{ErrorKind, ProtocolError};
use crate::lsn::{Lsn, PgTimestamp};

/// What `IDENTIFY_SYSTEM` reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SystemIdentity {
    /// The cluster's unique system identifier.
    pub systemid: String,
    /// Current timeline.
    pub timeline: u32,
    /// Current WAL flush position.
    pub xlogpos: Lsn,
    /// Database of the session (`None` for physical replication connections).
    pub dbname: Option<String>,
}

/// What `CREATE_REPLICATION_SLOT ... LOGICAL` returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreatedSlot {
    /// The slot's name.
    pub slot_name: String,
    /// Where decoding of the slot starts: changes committed after this point are streamed.
    pub consistent_point: Lsn,
    /// The exported snapshot, with [`SnapshotAction::Export`].
    pub snapshot_name: Option<String>,
    /// The output plugin.
    pub plugin: String,
}

/// Settings for one replication stream.
#[derive(Clone, Debug)]
pub struct StreamConfig {
    /// How often a standby status update is sent (also while the consumer is stalled).
    /// Keep it below half of the server's `wal_sender_timeout`.
    pub status_interval: Duration,
    /// Messages the channel holds before the driver stops reading the socket.
    pub channel_capacity: usize,
    /// Bytes of XLogData payload in flight (read but not yet dropped by the consumer)
    /// before the driver stops reading the socket.
    pub max_buffered_bytes: usize,
    /// Cancelling ends the stream cleanly: final status update, CopyDone, drain, close.
    pub cancel: CancellationToken,
    /// How long a clean shutdown may take before the socket is simply closed.
    pub shutdown_timeout: Duration,
    /// Declare the link dead when the server sent nothing at all for this long although the
    /// driver was reading and asking for replies (`None`: wait forever). Once a third of it
    /// has passed in silence, every status update asks the walsender to answer at once.
    pub receive_timeout: Option<Duration>,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            status_interval: Duration::from_secs(1),
            channel_capacity: 1024,
            max_buffered_bytes: 64 * 1024 * 1024,
            cancel: CancellationToken::new(),
            shutdown_timeout: Duration::from_secs(10),
            receive_timeout: None,
        }
    }
}

/// One WAL message of the stream: for logical replication, one output-plugin message.
///
/// Holds a share of the stream's byte budget (its payload size) until dropped. A consumer
/// that keeps `data` (a cheap `Bytes` clone) beyond the `XLogData` takes that memory
/// outside the budget, so decode and drop rather than hoard.
#[derive(Debug)]
pub struct XLogData {
    /// WAL position the message belongs to.
    pub wal_start: Lsn,
    /// Server's WAL end when sent.
    pub wal_end: Lsn,
    /// Server clock when sent.
    pub send_time: PgTimestamp,
    /// The output plugin's bytes.
    pub data: Bytes,
    budget: Option<OwnedSemaphorePermit>,
}

impl XLogData {
    /// A message not read from the socket (a spilled transaction read back from disk), at
    /// WAL position `wal_start`; it holds none of the stream's byte budget.
    pub fn replayed(wal_start: Lsn, data: Bytes) -> Self {
        XLogData {
            wal_start,
            wal_end: wal_start,
            send_time: PgTimestamp(0),
            data,
            budget: None,
        }
    }
}

/// What the stream yields.
#[derive(Debug)]
pub enum StreamItem {
    /// A WAL message.
    XLogData(XLogData),
    /// The server has sent everything up to `wal_end`. A consumer with nothing in flight
    /// may confirm this position so the slot does not hold WAL for other databases' traffic.
    /// Dropped rather than queued when the channel is full.
    Keepalive {
        /// Server's WAL end.
        wal_end: Lsn,
    },
}

/// The consumer side of a replication stream.
#[derive(Debug)]
pub struct ReplicationStream {
    rx: mpsc::Receiver<Result<StreamItem, ProtocolError>>,
    budget: Arc<Semaphore>,
    budget_total: usize,
}

impl ReplicationStream {
    /// The next item; `None` after the driver ended (cleanly or after yielding its error).
    pub async fn recv(&mut self) -> Option<Result<StreamItem, ProtocolError>> {
        self.rx.recv().await
    }

    /// The next item if one is already waiting (never waits).
    pub fn try_recv(&mut self) -> Option<Result<StreamItem, ProtocolError>> {
        self.rx.try_recv().ok()
    }

    /// Bytes of the budget not claimed right now (for metrics and tests); a message waiting
    /// for room claims freed bytes as they come, so this can read 0 before it is sent.
    pub fn available_budget(&self) -> usize {
        self.budget.available_permits()
    }

    /// Items waiting in the channel (for metrics and tests).
    pub fn queued(&self) -> usize {
        self.rx.len()
    }

    /// The whole byte budget.
    pub fn budget(&self) -> usize {
        self.budget_total
    }
}

#[derive(Debug, Default)]
struct FeedbackInner {
    confirmed: AtomicU64,
    received: AtomicU64,
    wake: Notify,
}

/// Progress shared between the consumer and the driver.
#[derive(Clone, Debug, Default)]
pub struct Feedback {
    inner: Arc<FeedbackInner>,
}

impl Feedback {
    /// Records that everything up to `lsn` is safely applied; reported as flush/apply in the
    /// next status update. Never moves backwards.
    pub fn confirm(&self, lsn: Lsn) {
        self.inner.confirmed.fetch_max(lsn.0, Ordering::AcqRel);
    }

    /// Asks the driver to send a status update now rather than at the next tick.
    pub fn request_now(&self) {
        self.inner.wake.notify_one();
    }

    /// The highest position confirmed so far.
    pub fn confirmed(&self) -> Lsn {
        Lsn(self.inner.confirmed.load(Ordering::Acquire))
    }

    /// The highest WAL position the driver has received from the server.
    pub fn last_received(&self) -> Lsn {
        Lsn(self.inner.received.load(Ordering::Acquire))
    }

    fn received(&self, lsn: Lsn) {
        self.inner.received.fetch_max(lsn.0, Ordering::AcqRel);
    }
}

/// The future that runs a replication stream; the caller spawns it. It resolves when the
/// stream is cancelled (`Ok`), the consumer drops the [`ReplicationStream`] (`Ok`), or the
/// connection fails or the server ends the stream (`Err`, also delivered through `recv`).
pub type DriverFuture = Pin<Box<dyn Future<Output = Result<(), ProtocolError>> + Send>>;

/// A session opened with `replication=database`, for replication commands.
#[derive(Debug)]
pub struct ReplicationClient {
    conn: RawConnection,
}

fn required<'a>(
    r: &'a QueryResult,
    col: usize,
    what: &str,
    address: &str,
) -> Result<&'a str, ProtocolError> {
    r.get(0, col).ok_or_else(|| {
        ProtocolError::protocol(
            address,
            format!("{what} is missing from the server's answer"),
        )
    })
}

fn parse_lsn(s: &str, what: &str, address: &str) -> Result<Lsn, ProtocolError> {
    s.parse()
        .map_err(|_| ProtocolError::protocol(address, format!("{what} {s:?} is not an LSN")))
}

impl ReplicationClient {
    /// Wraps a connection opened with `replication: true`.
    pub fn new(conn: RawConnection) -> Self {
        ReplicationClient { conn }
    }

    /// The underlying session (for plain SQL on a `replication=database` connection).
    pub fn connection(&mut self) -> &mut RawConnection {
        &mut self.conn
    }

    /// Gives the session back.
    pub fn into_inner(self) -> RawConnection {
        self.conn
    }

    /// Runs a simple query (replication command or SQL).
    pub async fn simple_query(&mut self, sql: &str) -> Result<QueryResult, ProtocolError> {
        self.conn.simple_query(sql).await
    }

    /// `IDENTIFY_SYSTEM`.
    pub async fn identify_system(&mut self) -> Result<SystemIdentity, ProtocolError> {
        let r = self.conn.simple_query("IDENTIFY_SYSTEM").await?;
        let a = self.conn.address().to_string();
        let timeline = required(&r, 1, "timeline", &a)?;
        Ok(SystemIdentity {
            systemid: required(&r, 0, "systemid", &a)?.to_string(),
            timeline: timeline.parse().map_err(|_| {
                ProtocolError::protocol(&a, format!("timeline {timeline:?} is not a number"))
            })?,
            xlogpos: parse_lsn(required(&r, 2, "xlogpos", &a)?, "xlogpos", &a)?,
            dbname: r.get(0, 3).map(str::to_string),
        })
    }

    /// `CREATE_REPLICATION_SLOT "name" [TEMPORARY] LOGICAL plugin ...`.
    ///
    /// A temporary slot lives as long as this session. With [`SnapshotAction::Use`] the
    /// session must be in a `BEGIN ISOLATION LEVEL REPEATABLE READ` transaction that has run
    /// nothing else.
    pub async fn create_logical_slot(
        &mut self,
        name: &str,
        plugin: &str,
        temporary: bool,
        snapshot: SnapshotAction,
    ) -> Result<CreatedSlot, ProtocolError> {
        let cmd = codec::create_logical_slot_command(name, plugin, temporary, snapshot);
        let r = self.conn.simple_query(&cmd).await?;
        let a = self.conn.address().to_string();
        Ok(CreatedSlot {
            slot_name: required(&r, 0, "slot_name", &a)?.to_string(),
            consistent_point: parse_lsn(
                required(&r, 1, "consistent_point", &a)?,
                "consistent_point",
                &a,
            )?,
            snapshot_name: r.get(0, 2).map(str::to_string),
            plugin: r.get(0, 3).unwrap_or(plugin).to_string(),
        })
    }

    /// `DROP_REPLICATION_SLOT "name" [WAIT]`; with `wait`, waits for an active slot to be
    /// released instead of failing.
    pub async fn drop_slot(&mut self, name: &str, wait: bool) -> Result<(), ProtocolError> {
        self.conn
            .simple_query(&codec::drop_slot_command(name, wait))
            .await
            .map(|_| ())
    }

    /// `START_REPLICATION SLOT "slot" LOGICAL start (options)`, then hands the session to a
    /// driver future that the caller must spawn (or poll) for the stream to make progress.
    pub async fn start_logical(
        mut self,
        slot: &str,
        start: Lsn,
        plugin_options: &[(String, String)],
        config: StreamConfig,
    ) -> Result<(ReplicationStream, Feedback, DriverFuture), ProtocolError> {
        let cmd = codec::start_logical_command(slot, start, plugin_options);
        let mut buf = BytesMut::new();
        frontend::query(&cmd, &mut buf).map_err(|e| {
            ProtocolError::protocol(self.conn.address(), format!("cannot encode command: {e}"))
        })?;
        self.conn.send(&buf).await?;
        loop {
            let mut frame = self.conn.read_frame().await?;
            if frame.first() == Some(&b'W') {
                break;
            }
            match parse_message(self.conn.address(), &mut frame)? {
                Message::ErrorResponse(e) => {
                    let err = self.conn.server_error(e.fields());
                    // Wait for ReadyForQuery so the error is complete; ignore what follows.
                    let _ = self.wait_ready().await;
                    return Err(err);
                }
                Message::NoticeResponse(n) => self.conn.log_notice(n.fields()),
                Message::ParameterStatus(_) => {}
                _ => {
                    return Err(ProtocolError::protocol(
                        self.conn.address(),
                        "unexpected message in reply to START_REPLICATION",
                    ))
                }
            }
        }
        let capacity = config.channel_capacity.max(1);
        let budget_total = config.max_buffered_bytes.clamp(1, u32::MAX as usize);
        let budget = Arc::new(Semaphore::new(budget_total));
        let (tx, rx) = mpsc::channel(capacity);
        let feedback = Feedback::default();
        let driver = Driver {
            conn: self.conn,
            tx,
            feedback: feedback.clone(),
            budget: Arc::clone(&budget),
            budget_total,
            config,
            pending: None,
        };
        let stream = ReplicationStream {
            rx,
            budget,
            budget_total,
        };
        Ok((stream, feedback, Box::pin(driver.run())))
    }

    async fn wait_ready(&mut self) -> Result<(), ProtocolError> {
        loop {
            if let Message::ReadyForQuery(_) = self.conn.read_message().await? {
                return Ok(());
            }
        }
    }
}

/// An XLogData waiting for budget and channel room.
struct Pending {
    item: XLogData,
    /// Budget it needs (its size, capped at the whole budget).
    need: u32,
}

struct Driver {
    conn: RawConnection,
    tx: mpsc::Sender<Result<StreamItem, ProtocolError>>,
    feedback: Feedback,
    budget: Arc<Semaphore>,
    budget_total: usize,
    config: StreamConfig,
    pending: Option<Pending>,
}

impl Driver {
    async fn run(mut self) -> Result<(), ProtocolError> {
        match self.stream().await {
            Ok(()) => {
                let timeout = self.config.shutdown_timeout;
                match tokio::time::timeout(timeout, self.shutdown()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::debug!(node = %self.conn.address(), error = %e, "replication stream shutdown was not clean");
                    }
                    Err(_) => {
                        tracing::debug!(node = %self.conn.address(), "replication stream shutdown timed out; closing the socket");
                    }
                }
                Ok(())
            }
            Err(e) => {
                // Deliver the error to the consumer too, unless it is gone or cancelled.
                let cancel = self.config.cancel.clone();
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = self.tx.send(Err(e.clone())) => {}
                }
                Err(e)
            }
        }
    }

    /// The main loop, one arm per priority; returns `Ok` for a clean stop (cancelled, or
    /// the consumer went away).
    async fn stream(&mut self) -> Result<(), ProtocolError> {
        let mut status_timer = tokio::time::interval(self.config.status_interval);
        status_timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let cancel = self.config.cancel.clone();
        let feedback = self.feedback.clone();
        let budget = Arc::clone(&self.budget);
        let tx = self.tx.clone();
        // Budget already granted to the pending message.
        let mut granted: Option<OwnedSemaphorePermit> = None;
        // When the server last sent anything (or when we last stopped listening to it).
        let mut heard = tokio::time::Instant::now();
        loop {
            // Hand over whatever is already buffered, as far as budget and channel allow.
            if self.pending.is_none() {
                self.process_buffered().await?;
            }
            let need = self.pending.as_ref().map(|p| p.need);
            if need.is_some() {
                // Not reading (the consumer is behind): silence proves nothing.
                heard = tokio::time::Instant::now();
            }
            let wants_budget = need.is_some() && granted.is_none();
            let wants_slot = need.is_some() && granted.is_some();
            tokio::select! {
                biased;
                // 1. Shutdown requested.
                _ = cancel.cancelled() => return Ok(()),
                // 2. The consumer dropped its end: nobody will read, stop cleanly.
                _ = tx.closed() => return Ok(()),
                // 3. Status update on the timer: keeps the walsender content even while we
                //    are not reading because the consumer is slow.
                //    Also the dead-link check: a server silent although asked to answer.
                _ = status_timer.tick() => {
                    let silent = heard.elapsed();
                    let ask = match self.config.receive_timeout {
                        Some(limit) if silent >= limit => {
                            return Err(ProtocolError::new(
                                self.conn.address().to_string(),
                                ErrorKind::Timeout {
                                    what: "the walsender sent nothing although asked to answer",
                                    after: limit,
                                },
                            ));
                        }
                        Some(limit) => silent >= limit / 3,
                        None => false,
                    };
                    self.send_status_bounded(ask).await?
                }
                // 4. The consumer confirmed something and wants it reported now.
                _ = feedback.inner.wake.notified() => self.send_status_bounded(false).await?,
                // 5. Budget for the pending message (the consumer dropped earlier ones).
                permit = Arc::clone(&budget).acquire_many_owned(need.unwrap_or(0)), if wants_budget => {
                    granted = Some(permit.map_err(|_| {
                        ProtocolError::protocol(self.conn.address(), "stream budget closed")
                    })?);
                }
                // 6. A channel slot for the pending message, whose budget is granted.
                slot = tx.reserve(), if wants_slot => {
                    // A closed channel is handled by arm 2 on the next turn.
                    if let (Ok(slot), Some(mut p)) = (slot, self.pending.take()) {
                        p.item.budget = granted.take();
                        slot.send(Ok(StreamItem::XLogData(p.item)));
                    }
                }
                // 7. Read the socket, only when nothing is waiting for room.
                r = self.conn.fill(), if need.is_none() => {
                    r?;
                    heard = tokio::time::Instant::now();
                }
            }
        }
    }

    /// Parses complete frames from the read buffer until it is empty or a message has to
    /// wait for room.
    async fn process_buffered(&mut self) -> Result<(), ProtocolError> {
        while self.pending.is_none() {
            let Some(frame) = self.conn.next_frame()? else {
                return Ok(());
            };
            self.handle_frame(frame).await?;
        }
        Ok(())
    }

    async fn handle_frame(&mut self, mut frame: BytesMut) -> Result<(), ProtocolError> {
        match frame.first().copied() {
            Some(b'd') => {
                let msg = codec::parse_copy_data(frame_body(frame))
                    .map_err(|e| ProtocolError::protocol(self.conn.address(), e))?;
                match msg {
                    CopyMessage::XLogData {
                        wal_start,
                        wal_end,
                        send_time,
                        data,
                    } => {
                        self.feedback.received(wal_end.max(wal_start));
                        let need = data.len().min(self.budget_total) as u32;
                        let item = XLogData {
                            wal_start,
                            wal_end,
                            send_time,
                            data,
                            budget: None,
                        };
                        // Fast path: budget and slot both free.
                        if let Ok(permit) = Arc::clone(&self.budget).try_acquire_many_owned(need) {
                            match self.tx.try_reserve() {
                                Ok(slot) => {
                                    let mut item = item;
                                    item.budget = Some(permit);
                                    slot.send(Ok(StreamItem::XLogData(item)));
                                    return Ok(());
                                }
                                Err(mpsc::error::TrySendError::Closed(())) => return Ok(()),
                                Err(mpsc::error::TrySendError::Full(())) => {
                                    drop(permit);
                                }
                            }
                        }
                        self.pending = Some(Pending { item, need });
                        Ok(())
                    }
                    CopyMessage::Keepalive {
                        wal_end,
                        reply_requested,
                        ..
                    } => {
                        self.feedback.received(wal_end);
                        if reply_requested {
                            self.send_status_bounded(false).await?;
                        }
                        // Informational: dropped when the consumer is behind.
                        let _ = self.tx.try_send(Ok(StreamItem::Keepalive { wal_end }));
                        Ok(())
                    }
                }
            }
            Some(b'C') => {
                // CommandComplete without CopyDone: a walsender that is shutting down and
                // has sent everything says goodbye this way.
                Err(ProtocolError::new(
                    self.conn.address().to_string(),
                    ErrorKind::StreamEnded,
                ))
            }
            Some(b'c') => {
                // The server ends the stream (for example, it is shutting down).
                let mut buf = BytesMut::new();
                frontend::copy_done(&mut buf);
                let _ = self.conn.send(&buf).await;
                Err(self.drain_to_end().await.err().unwrap_or_else(|| {
                    ProtocolError::new(self.conn.address().to_string(), ErrorKind::StreamEnded)
                }))
            }
            tag => match parse_message(self.conn.address(), &mut frame)? {
                Message::ErrorResponse(e) => Err(self.conn.server_error(e.fields())),
                Message::NoticeResponse(n) => {
                    self.conn.log_notice(n.fields());
                    Ok(())
                }
                Message::ParameterStatus(_) | Message::NotificationResponse(_) => Ok(()),
                _ => Err(ProtocolError::protocol(
                    self.conn.address(),
                    format!(
                        "unexpected message {:?} during replication",
                        tag.map(char::from)
                    ),
                )),
            },
        }
    }

    /// Standby status update: write = last received, flush = apply = confirmed.
    async fn send_status(&mut self, reply_requested: bool) -> Result<(), ProtocolError> {
        let write = self.feedback.last_received();
        let confirmed = self.feedback.confirmed();
        codec::standby_status_update(
            write.max(confirmed),
            confirmed,
            confirmed,
            PgTimestamp::now(),
            reply_requested,
            &mut self.conn.write_buf,
        );
        self.conn.flush_write_buf().await
    }

    /// [`Driver::send_status`] within the receive timeout: a write that cannot drain (the
    /// peer stopped reading, or the link is black-holed) is a dead link too.
    async fn send_status_bounded(&mut self, reply_requested: bool) -> Result<(), ProtocolError> {
        let Some(limit) = self.config.receive_timeout else {
            return self.send_status(reply_requested).await;
        };
        match tokio::time::timeout(limit, self.send_status(reply_requested)).await {
            Ok(r) => r,
            Err(_) => Err(ProtocolError::new(
                self.conn.address().to_string(),
                ErrorKind::Timeout {
                    what: "sending a status update to the walsender",
                    after: limit,
                },
            )),
        }
    }

    /// Final status update, CopyDone, then read (and drop) until the server is done.
    async fn shutdown(&mut self) -> Result<(), ProtocolError> {
        self.pending = None;
        self.send_status(false).await?;
        frontend::copy_done(&mut self.conn.write_buf);
        self.conn.flush_write_buf().await?;
        self.drain_to_end().await?;
        frontend::terminate(&mut self.conn.write_buf);
        let _ = self.conn.flush_write_buf().await;
        Ok(())
    }

    /// Reads until ReadyForQuery, dropping data; returns the server's error if it sent one.
    async fn drain_to_end(&mut self) -> Result<(), ProtocolError> {
        let mut error = None;
        loop {
            let mut frame = self.conn.read_frame().await?;
            match frame.first().copied() {
                Some(b'd') | Some(b'c') => continue,
                _ => {}
            }
            match parse_message(self.conn.address(), &mut frame)? {
                Message::ReadyForQuery(_) => break,
                Message::ErrorResponse(e) => {
                    error.get_or_insert(self.conn.server_error(e.fields()));
                }
                _ => {}
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The driver against a scripted server on the other end of a socket pair: exact
    //! control over what the "server" sends and when, no timing assumptions.

    use super::*;
    use bytes::BufMut;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;

    const WAIT: Duration = Duration::from_secs(10);

    /// The server side: reads frontend messages, writes backend messages.
    struct Server {
        sock: UnixStream,
        buf: BytesMut,
    }

    impl Server {
        async fn send(&mut self, tag: u8, body: &[u8]) {
            let mut b = BytesMut::new();
            b.put_u8(tag);
            b.put_i32(4 + body.len() as i32);
            b.put_slice(body);
            self.sock.write_all(&b).await.unwrap();
        }

        async fn xlogdata(&mut self, lsn: u64, payload: &[u8]) {
            let mut b = BytesMut::new();
            b.put_u8(b'w');
            b.put_u64(lsn);
            b.put_u64(lsn);
            b.put_i64(0);
            b.put_slice(payload);
            self.send(b'd', &b).await;
        }

        async fn keepalive(&mut self, wal_end: u64, reply: bool) {
            let mut b = BytesMut::new();
            b.put_u8(b'k');
            b.put_u64(wal_end);
            b.put_i64(0);
            b.put_u8(u8::from(reply));
            self.send(b'd', &b).await;
        }

        /// The next frontend message: (tag, body).
        async fn recv(&mut self) -> (u8, Bytes) {
            loop {
                if let Some(f) = codec::split_frame(&mut self.buf).unwrap() {
                    let tag = f[0];
                    return (tag, frame_body(f));
                }
                let n = tokio::time::timeout(WAIT, self.sock.read_buf(&mut self.buf))
                    .await
                    .expect("client silent")
                    .unwrap();
                assert!(n > 0, "client closed");
            }
        }

        /// The next standby status update: (write, flush, apply, reply requested).
        async fn status(&mut self) -> (u64, u64, u64, u8) {
            let (tag, mut body) = self.recv().await;
            assert_eq!(tag, b'd');
            use bytes::Buf;
            assert_eq!(body.get_u8(), b'r');
            let (w, f, a) = (body.get_u64(), body.get_u64(), body.get_u64());
            let _clock = body.get_i64();
            (w, f, a, body.get_u8())
        }
    }

    /// A started stream with a scripted server.
    async fn start(config: StreamConfig) -> (Server, ReplicationStream, Feedback, DriverFuture) {
        let (client, server) = UnixStream::pair().unwrap();
        let mut server = Server {
            sock: server,
            buf: BytesMut::new(),
        };
        let rc = ReplicationClient::new(RawConnection::for_test(client));
        let opts = [("proto_version".to_string(), "1".to_string())];
        let script = async {
            let (tag, body) = server.recv().await;
            assert_eq!(tag, b'Q');
            assert_eq!(
                &body[..],
                b"START_REPLICATION SLOT \"s\" LOGICAL 0/10 (\"proto_version\" '1')\0"
            );
            server.send(b'W', &[0, 0, 0]).await;
        };
        let (started, ()) = tokio::join!(rc.start_logical("s", Lsn(0x10), &opts, config), script);
        let (stream, feedback, driver) = started.unwrap();
        (server, stream, feedback, driver)
    }

    fn quiet() -> StreamConfig {
        StreamConfig {
            // Only the immediate first tick; later updates must come from elsewhere.
            status_interval: Duration::from_secs(3600),
            ..StreamConfig::default()
        }
    }

    #[tokio::test]
    async fn keepalive_asking_for_a_reply_is_answered_at_once() {
        let (mut server, mut stream, _feedback, driver) = start(quiet()).await;
        let driver = tokio::spawn(driver);
        server.status().await; // the timer's first tick
        server.keepalive(0x500, true).await;
        let (write, flush, _, _) = server.status().await;
        assert_eq!((write, flush), (0x500, 0));
        match stream.recv().await {
            Some(Ok(StreamItem::Keepalive { wal_end })) => assert_eq!(wal_end, Lsn(0x500)),
            other => panic!("{other:?}"),
        }
        drop(stream);
        server.recv().await; // final status
        assert_eq!(server.recv().await.0, b'c');
        server.send(b'c', &[]).await;
        server.send(b'C', b"COPY 0\0").await;
        server.send(b'Z', b"I").await;
        assert_eq!(server.recv().await.0, b'X');
        driver.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn confirm_and_request_now_report_flush_and_never_go_back() {
        let (mut server, _stream, feedback, driver) = start(quiet()).await;
        let _driver = tokio::spawn(driver);
        server.status().await;
        feedback.confirm(Lsn(0x900));
        feedback.confirm(Lsn(0x800));
        feedback.request_now();
        let (write, flush, apply, reply) = server.status().await;
        assert_eq!((write, flush, apply, reply), (0x900, 0x900, 0x900, 0));
        assert_eq!(feedback.confirmed(), Lsn(0x900));
    }

    #[tokio::test]
    async fn backpressure_stops_reading_and_status_updates_continue() {
        let config = StreamConfig {
            status_interval: Duration::from_millis(20),
            channel_capacity: 8,
            max_buffered_bytes: 10,
            ..StreamConfig::default()
        };
        let (mut server, mut stream, feedback, driver) = start(config).await;
        let _driver = tokio::spawn(driver);
        for i in 0..4u64 {
            server.xlogdata(0x100 + i, b"12345678").await;
        }
        // One 8-byte message fits the 10-byte budget; the second waits for it.
        let deadline = tokio::time::Instant::now() + WAIT;
        while !(stream.queued() == 1 && feedback.last_received() >= Lsn(0x101)) {
            assert!(tokio::time::Instant::now() < deadline, "never saturated");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The waiting message has already claimed the 2 bytes left (tokio's semaphore hands
        // permits to a waiter as they free up).
        assert_eq!(stream.available_budget(), 0);
        // Stalled, yet status updates keep coming.
        for _ in 0..3 {
            server.status().await;
        }
        assert_eq!(stream.queued(), 1);
        // Consuming (and dropping) releases the budget for the next one, in order.
        for i in 0..4u64 {
            match stream.recv().await {
                Some(Ok(StreamItem::XLogData(x))) => {
                    assert_eq!(x.wal_start, Lsn(0x100 + i));
                    assert_eq!(&x.data[..], b"12345678");
                }
                other => panic!("{other:?}"),
            }
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        while stream.available_budget() != 10 {
            assert!(tokio::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_message_larger_than_the_budget_still_passes() {
        let config = StreamConfig {
            max_buffered_bytes: 4,
            ..quiet()
        };
        let (mut server, mut stream, _feedback, driver) = start(config).await;
        let _driver = tokio::spawn(driver);
        server.xlogdata(1, b"much more than four bytes").await;
        server.xlogdata(2, b"again").await;
        for lsn in [1, 2] {
            match stream.recv().await {
                Some(Ok(StreamItem::XLogData(x))) => assert_eq!(x.wal_start, Lsn(lsn)),
                other => panic!("{other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn malformed_input_is_an_error_not_a_panic() {
        for bad in [&b"w\0\0"[..], b"", b"z", b"k\0\0\0\0\0\0\0\0"] {
            let (mut server, mut stream, _feedback, driver) = start(quiet()).await;
            let driver = tokio::spawn(driver);
            server.send(b'd', bad).await;
            let err = match stream.recv().await {
                Some(Err(e)) => e,
                other => panic!("{bad:?}: {other:?}"),
            };
            assert!(matches!(err.kind(), ErrorKind::Protocol(_)), "{err}");
            assert!(!err.is_transient());
            assert!(driver.await.unwrap().is_err());
            assert!(stream.recv().await.is_none());
        }
        // A length below 4 in the frame header.
        let (mut server, mut stream, _feedback, driver) = start(quiet()).await;
        let _driver = tokio::spawn(driver);
        server.sock.write_all(b"d\0\0\0\x01").await.unwrap();
        assert!(matches!(stream.recv().await, Some(Err(_))));
    }

    #[tokio::test]
    async fn server_error_and_closed_socket_reach_the_consumer() {
        let (mut server, mut stream, _feedback, driver) = start(quiet()).await;
        let driver = tokio::spawn(driver);
        server
            .send(
                b'E',
                b"SFATAL\0VFATAL\0C57P01\0Mterminating connection due to administrator command\0\0",
            )
            .await;
        let err = match stream.recv().await {
            Some(Err(e)) => e,
            other => panic!("{other:?}"),
        };
        assert_eq!(err.code(), Some("57P01"));
        assert!(err.is_transient());
        assert!(driver.await.unwrap().is_err());

        let (server, mut stream, _feedback, driver) = start(quiet()).await;
        let driver = tokio::spawn(driver);
        drop(server);
        let err = match stream.recv().await {
            Some(Err(e)) => e,
            other => panic!("{other:?}"),
        };
        assert!(err.is_transient(), "{err}");
        assert!(driver.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn cancellation_sends_final_status_and_copy_done() {
        let config = quiet();
        let cancel = config.cancel.clone();
        let (mut server, _stream, feedback, driver) = start(config).await;
        let driver = tokio::spawn(driver);
        server.status().await;
        feedback.confirm(Lsn(0x42));
        cancel.cancel();
        let (_, flush, _, _) = server.status().await;
        assert_eq!(flush, 0x42);
        assert_eq!(server.recv().await.0, b'c');
        // Data still in flight before the server's CopyDone is dropped.
        server.xlogdata(0x50, b"late").await;
        server.send(b'c', &[]).await;
        server.send(b'C', b"COPY 0\0").await;
        server.send(b'Z', b"I").await;
        assert_eq!(server.recv().await.0, b'X');
        driver.await.unwrap().unwrap();
    }
}
