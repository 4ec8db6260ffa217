//! A pipelined extended-query session: the apply path's connection to a target.
//!
//! tokio-postgres pipelines requests too, but gives no control over where `Sync` goes, and the
//! apply path depends on exactly that: every source transaction is one *Sync group* (an
//! implicit transaction that commits at `Sync`), many groups are in flight at once, and when
//! a statement fails the server skips the rest of its group and rolls it back.
//!
//! ```text
//!   apply ──Bytes──▶ writer half ──▶ server ──▶ reader half ──Response──▶ apply
//!                   (bounded channel)            (never blocks on apply)
//! ```
//!
//! The socket is split and each half runs in the driver future, so a long run of statements
//! never deadlocks against the server's replies: the reader keeps draining replies into an
//! unbounded channel, which stays small because the caller bounds what it has in flight.

use bytes::{Bytes, BytesMut};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use postgres_protocol::IsNull;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::codec::next_message;
use super::error::{ErrorKind, ProtocolError, ServerError};

/// One reply from the server, reduced to what the apply path needs.
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    /// `ParseComplete`, `BindComplete`, `NoData`, `RowDescription`, `ParameterDescription`,
    /// `CloseComplete`: acknowledgements with nothing to read.
    Ack,
    /// A result row, columns in text format (`None` = NULL).
    Row(Vec<Option<Bytes>>),
    /// A statement finished (`CommandComplete` with its tag, or `EmptyQueryResponse`).
    Complete(String),
    /// The statement failed; the server skips everything up to the next `Sync`.
    Error(ServerError),
    /// `ReadyForQuery` after a `Sync`, with the transaction status byte (`I`, `T`, `E`).
    Ready(u8),
    /// `CopyInResponse`: the server waits for COPY data.
    CopyIn,
    /// A `NOTIFY` arrived (channel, payload).
    Notification(String, String),
}

/// Encodes frontend messages; the caller sends the buffer with [`Pipeline::send`].
#[derive(Debug, Default)]
pub struct Encoder {
    buf: BytesMut,
}

/// Placeholder for frontend encoding failures (only oversize messages can fail).
fn encode_err(e: std::io::Error) -> ProtocolError {
    ProtocolError::new(
        "apply session",
        ErrorKind::Protocol(format!("encoding a message: {e}")),
    )
}

impl Encoder {
    /// Bytes waiting to be sent.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Nothing waiting.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Takes what is encoded so far.
    pub fn take(&mut self) -> Bytes {
        self.buf.split().freeze()
    }

    /// `Parse`: prepares `sql` under `name` (parameter types left to the server).
    pub fn parse(&mut self, name: &str, sql: &str) -> Result<(), ProtocolError> {
        frontend::parse(name, sql, std::iter::empty(), &mut self.buf).map_err(encode_err)
    }

    /// `Bind` + `Execute` of a prepared statement with text-format parameters (`None` = NULL).
    pub fn execute<'a, I>(&mut self, statement: &str, params: I) -> Result<(), ProtocolError>
    where
        I: IntoIterator<Item = Option<&'a [u8]>>,
    {
        frontend::bind(
            "",
            statement,
            std::iter::empty::<i16>(),
            params,
            |value, buf| match value {
                Some(bytes) => {
                    buf.extend_from_slice(bytes);
                    Ok(IsNull::No)
                }
                None => Ok(IsNull::Yes),
            },
            std::iter::empty::<i16>(),
            &mut self.buf,
        )
        .map_err(|e| match e {
            frontend::BindError::Conversion(e) => encode_err(std::io::Error::other(e.to_string())),
            frontend::BindError::Serialization(e) => encode_err(e),
        })?;
        frontend::execute("", 0, &mut self.buf).map_err(encode_err)
    }

    /// `Close` of a prepared statement (closing one that does not exist is not an error).
    pub fn close_statement(&mut self, name: &str) {
        // Encoding fails only for names with NUL bytes; walbridge's names have none.
        let _ = frontend::close(b'S', name, &mut self.buf);
    }

    /// `Sync`: ends the current group (commits its implicit transaction).
    pub fn sync(&mut self) {
        frontend::sync(&mut self.buf);
    }

    /// A simple `Query` (several statements allowed, no parameters).
    pub fn simple_query(&mut self, sql: &str) -> Result<(), ProtocolError> {
        frontend::query(sql, &mut self.buf).map_err(encode_err)
    }

    /// `CopyData`.
    pub fn copy_data(&mut self, data: &[u8]) -> Result<(), ProtocolError> {
        let len = i32::try_from(data.len() + 4)
            .map_err(|_| encode_err(std::io::Error::other("COPY data chunk larger than 2 GiB")))?;
        self.buf.extend_from_slice(b"d");
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.buf.extend_from_slice(data);
        Ok(())
    }

    /// `CopyDone`.
    pub fn copy_done(&mut self) {
        frontend::copy_done(&mut self.buf);
    }
}

/// Result rows of a statement, columns in text format (`None` = NULL).
pub type Rows = Vec<Vec<Option<Bytes>>>;

/// The caller's side of a pipelined session.
pub struct Pipeline {
    writes: mpsc::Sender<Bytes>,
    replies: mpsc::UnboundedReceiver<Result<Response, ProtocolError>>,
    address: String,
}

impl Pipeline {
    /// Splits an authenticated, idle connection into the caller's side and the driver future
    /// (which the caller spawns; it ends when the `Pipeline` is dropped or the socket fails).
    /// `leftover` holds bytes already read past the last `ReadyForQuery`.
    pub fn new<S>(
        stream: S,
        leftover: BytesMut,
        address: String,
    ) -> (
        Self,
        impl std::future::Future<Output = Result<(), ProtocolError>> + Send,
    )
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (write_tx, write_rx) = mpsc::channel::<Bytes>(64);
        let (reply_tx, reply_rx) = mpsc::unbounded_channel();
        let driver = drive(stream, leftover, write_rx, reply_tx, address.clone());
        (
            Pipeline {
                writes: write_tx,
                replies: reply_rx,
                address,
            },
            driver,
        )
    }

    /// Turns an authenticated, idle session into a pipeline and its driver future.
    pub fn from_raw(
        conn: super::RawConnection,
    ) -> (
        Self,
        impl std::future::Future<Output = Result<(), ProtocolError>> + Send,
    ) {
        let address = conn.address.clone();
        Self::new(conn.socket, conn.read_buf, address)
    }

    fn closed(&self) -> ProtocolError {
        ProtocolError::new(self.address.clone(), ErrorKind::Closed)
    }

    /// Queues encoded messages for the socket; waits only when the writer is far behind.
    pub async fn send(&self, bytes: Bytes) -> Result<(), ProtocolError> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.writes.send(bytes).await.map_err(|_| self.closed())
    }

    /// The next reply, in order.
    pub async fn recv(&mut self) -> Result<Response, ProtocolError> {
        match self.replies.recv().await {
            Some(r) => r,
            None => Err(self.closed()),
        }
    }

    /// A reply that already arrived, if any (never waits).
    pub fn try_recv(&mut self) -> Option<Result<Response, ProtocolError>> {
        self.replies.try_recv().ok()
    }

    /// The node address for errors.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Reads replies up to the next `ReadyForQuery`: the rows, and the error if the group
    /// failed (the server skipped the rest of it).
    pub async fn finish_group(&mut self) -> Result<(Rows, Option<ServerError>), ProtocolError> {
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.recv().await? {
                Response::Row(r) => rows.push(r),
                Response::Error(e) => error = Some(e),
                Response::Ready(_) => return Ok((rows, error)),
                _ => {}
            }
        }
    }

    /// Runs one simple query to completion and returns its rows (text) or the server error.
    pub async fn simple(
        &mut self,
        sql: &str,
    ) -> Result<Result<Vec<Vec<Option<Bytes>>>, ServerError>, ProtocolError> {
        let mut enc = Encoder::default();
        enc.simple_query(sql)?;
        self.send(enc.take()).await?;
        let (rows, error) = self.finish_group().await?;
        Ok(match error {
            Some(e) => Err(e),
            None => Ok(rows),
        })
    }
}

async fn drive<S>(
    stream: S,
    mut leftover: BytesMut,
    mut writes: mpsc::Receiver<Bytes>,
    replies: mpsc::UnboundedSender<Result<Response, ProtocolError>>,
    address: String,
) -> Result<(), ProtocolError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let io = |e: std::io::Error| {
        ProtocolError::new(address.clone(), ErrorKind::Io(std::sync::Arc::new(e)))
    };
    let writer = async {
        while let Some(bytes) = writes.recv().await {
            wr.write_all(&bytes).await.map_err(io)?;
            // Coalesce whatever else is already queued before flushing.
            while let Ok(more) = writes.try_recv() {
                wr.write_all(&more).await.map_err(io)?;
            }
            wr.flush().await.map_err(io)?;
        }
        // The caller is gone: say goodbye so the server ends the session cleanly.
        let mut buf = BytesMut::new();
        frontend::terminate(&mut buf);
        let _ = wr.write_all(&buf).await;
        let _ = wr.shutdown().await;
        Ok::<(), ProtocolError>(())
    };
    let reader = async {
        loop {
            // Never `Message::parse` on the raw buffer: it reserves whatever a header claims.
            let parsed = next_message(&mut leftover)
                .map_err(|e| ProtocolError::new(address.clone(), ErrorKind::Protocol(e)))?;
            let Some(message) = parsed else {
                leftover.reserve(64 * 1024);
                let n = rd.read_buf(&mut leftover).await.map_err(io)?;
                if n == 0 {
                    return Err(ProtocolError::new(address.clone(), ErrorKind::Closed));
                }
                continue;
            };
            let reply = match message {
                Message::DataRow(body) => {
                    let mut cols = Vec::new();
                    let mut ranges = body.ranges();
                    let buffer = body.buffer();
                    use fallible_iterator::FallibleIterator;
                    while let Some(r) = ranges.next().map_err(|e| {
                        ProtocolError::new(address.clone(), ErrorKind::Protocol(e.to_string()))
                    })? {
                        cols.push(r.map(|r| Bytes::copy_from_slice(&buffer[r])));
                    }
                    Response::Row(cols)
                }
                Message::CommandComplete(body) => {
                    Response::Complete(body.tag().map(|t| t.to_string()).unwrap_or_default())
                }
                Message::EmptyQueryResponse => Response::Complete(String::new()),
                Message::ErrorResponse(body) => {
                    let e = ServerError::from_fields(body.fields()).map_err(|e| {
                        ProtocolError::new(address.clone(), ErrorKind::Protocol(e.to_string()))
                    })?;
                    if e.severity == "FATAL" || e.severity == "PANIC" {
                        // The server is ending the session (shutdown, terminate): transient.
                        return Err(ProtocolError::new(address.clone(), ErrorKind::Server(e)));
                    }
                    Response::Error(e)
                }
                Message::ReadyForQuery(body) => Response::Ready(body.status()),
                Message::CopyInResponse(_) => Response::CopyIn,
                Message::NotificationResponse(body) => Response::Notification(
                    body.channel().map(|s| s.to_string()).unwrap_or_default(),
                    body.message().map(|s| s.to_string()).unwrap_or_default(),
                ),
                Message::NoticeResponse(_) | Message::ParameterStatus(_) => continue,
                _ => Response::Ack,
            };
            if replies.send(Ok(reply)).is_err() {
                return Ok(());
            }
        }
    };
    let result = tokio::select! {
        r = writer => r,
        r = reader => r,
    };
    if let Err(e) = &result {
        let _ = replies.send(Err(e.clone()));
    }
    result
}
