//! One authenticated session: socket (TCP, Unix or TLS), startup, authentication, message
//! reading and the simple-query protocol.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication;
use postgres_protocol::authentication::sasl::{
    ChannelBinding, ScramSha256, SCRAM_SHA_256, SCRAM_SHA_256_PLUS,
};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::client::TlsStream;

use super::codec::split_frame;
use super::error::{ErrorKind, ProtocolError, ServerError};
use super::ConnectOptions;
use super::SESSION_PARAMS;
use crate::dsn::{
    AuthMethod, AuthRefused, ChannelBinding as BindingPolicy, Dsn, Host, ServerState, SslMode,
    TargetSessionAttrs,
};

/// The byte stream under a session.
pub(crate) enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_flush(cx),
            Socket::Unix(s) => Pin::new(s).poll_flush(cx),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The result of one simple query (the last statement's, for multi-statement strings).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueryResult {
    /// Column names of the last row-returning statement.
    pub columns: Vec<String>,
    /// Rows in text format; `None` is SQL NULL. Rows of every statement, in order.
    pub rows: Vec<Vec<Option<String>>>,
    /// The last command tag (`SELECT 1`, `CREATE_REPLICATION_SLOT`, ...).
    pub tag: String,
}

impl QueryResult {
    /// The value at `row`, `col`, `None` when absent or NULL.
    pub fn get(&self, row: usize, col: usize) -> Option<&str> {
        self.rows.get(row)?.get(col)?.as_deref()
    }

    /// The value at `row` in the column called `name`.
    pub fn get_by_name(&self, row: usize, name: &str) -> Option<&str> {
        let col = self.columns.iter().position(|c| c == name)?;
        self.get(row, col)
    }
}

/// An authenticated session, ready for queries (or replication commands).
pub struct RawConnection {
    pub(crate) socket: Socket,
    pub(crate) read_buf: BytesMut,
    pub(crate) write_buf: BytesMut,
    pub(crate) address: String,
    parameters: HashMap<String, String>,
    backend_key: Option<(i32, i32)>,
    tls: bool,
    /// `tls-server-end-point` data of the server's certificate, when TLS is in use.
    end_point: Option<Vec<u8>>,
    /// SCRAM bound the session to the TLS certificate (SCRAM-SHA-256-PLUS).
    channel_bound: bool,
}

impl std::fmt::Debug for RawConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawConnection")
            .field("address", &self.address)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// How a single attempt negotiates TLS.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TlsAttempt {
    /// No SSLRequest.
    Plain,
    /// SSLRequest; plain if the server declines.
    IfOffered,
    /// SSLRequest; fail if the server declines.
    Required,
}

/// Connects to the first host of the DSN that accepts us (see [`super::connect`]).
pub(crate) async fn connect(
    dsn: &Dsn,
    options: &ConnectOptions,
) -> Result<RawConnection, ProtocolError> {
    let tls_config = crate::tls::client_config(dsn)
        .map_err(|e| ProtocolError::new(dsn.describe(), ErrorKind::TlsConfig(Arc::new(e))))?;
    let mut last = None;
    let mut any_transient = false;
    for &wanted in dsn.target_session_attrs.passes() {
        for (i, (host, port)) in dsn.addresses().into_iter().enumerate() {
            let address = dsn.describe_host(i);
            let attempt = async {
                let conn =
                    connect_host(dsn, options, &host, port, &address, tls_config.clone()).await?;
                check_state(conn, wanted).await
            };
            let result = match dsn.connect_timeout {
                Some(t) => match tokio::time::timeout(t, attempt).await {
                    Ok(r) => r,
                    Err(_) => Err(ProtocolError::new(
                        address.clone(),
                        ErrorKind::Timeout {
                            what: "connect_timeout",
                            after: t,
                        },
                    )),
                },
                None => attempt.await,
            };
            match result {
                Ok(c) => return Ok(c),
                Err(e) => {
                    tracing::debug!(node = %address, error = %e, "connection attempt failed");
                    any_transient |= e.is_transient();
                    last = Some(e);
                }
            }
        }
    }
    let err = last.unwrap_or_else(|| {
        ProtocolError::protocol(&dsn.describe(), "the connection string names no host")
    });
    // With several hosts, one that is merely down makes the node worth retrying.
    if dsn.hosts.len() > 1 && any_transient && !err.is_transient() {
        return Err(ProtocolError::new(
            err.address().to_string(),
            ErrorKind::Io(Arc::new(io::Error::other(format!(
                "{} (and other hosts were unreachable)",
                err.kind()
            )))),
        ));
    }
    Err(err)
}

/// Keeps `conn` when the server's state is what `target_session_attrs` asks for. Servers from
/// 14 on report `in_hot_standby` and `default_transaction_read_only` at startup (and a
/// walsender does too); an older one is asked.
async fn check_state(
    mut conn: RawConnection,
    wanted: TargetSessionAttrs,
) -> Result<RawConnection, ProtocolError> {
    if wanted == TargetSessionAttrs::Any {
        return Ok(conn);
    }
    let reported = |c: &RawConnection, name: &str| c.parameter(name).map(|v| v == "on");
    let state = match (
        reported(&conn, "in_hot_standby"),
        reported(&conn, "default_transaction_read_only"),
    ) {
        (Some(in_hot_standby), Some(default_read_only)) => ServerState {
            in_hot_standby,
            default_read_only,
        },
        _ => {
            let r = conn
                .simple_query(
                    "SELECT pg_catalog.pg_is_in_recovery()::text, \
                            pg_catalog.current_setting('default_transaction_read_only')",
                )
                .await?;
            ServerState {
                in_hot_standby: r.get(0, 0) == Some("true"),
                default_read_only: r.get(0, 1) == Some("on"),
            }
        }
    };
    if wanted.accepts(state) {
        return Ok(conn);
    }
    let address = conn.address().to_string();
    let _ = conn.close().await;
    Err(ProtocolError::new(
        address,
        ErrorKind::SessionAttrs(wanted.refusal(state)),
    ))
}

async fn connect_host(
    dsn: &Dsn,
    options: &ConnectOptions,
    host: &Host,
    port: u16,
    address: &str,
    tls_config: Option<Arc<rustls::ClientConfig>>,
) -> Result<RawConnection, ProtocolError> {
    // libpq never uses TLS over Unix sockets, whatever sslmode says.
    let tls_config = match host {
        Host::Unix(_) => None,
        Host::Tcp(_) => tls_config,
    };
    let Some(tls_config) = tls_config else {
        return attempt(dsn, options, host, port, address, TlsAttempt::Plain, None).await;
    };
    match dsn.sslmode {
        SslMode::Disable => {
            attempt(dsn, options, host, port, address, TlsAttempt::Plain, None).await
        }
        SslMode::Allow => {
            match attempt(dsn, options, host, port, address, TlsAttempt::Plain, None).await {
                // Refused in plain text (for example hostssl-only pg_hba): retry with TLS,
                // as libpq does.
                Err(e) if e.server_error().is_some() => {
                    let tls = Some(tls_config);
                    attempt(dsn, options, host, port, address, TlsAttempt::Required, tls).await
                }
                other => other,
            }
        }
        SslMode::Prefer => {
            let tls = Some(tls_config);
            attempt(
                dsn,
                options,
                host,
                port,
                address,
                TlsAttempt::IfOffered,
                tls,
            )
            .await
        }
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
            let tls = Some(tls_config);
            attempt(dsn, options, host, port, address, TlsAttempt::Required, tls).await
        }
    }
}

async fn attempt(
    dsn: &Dsn,
    options: &ConnectOptions,
    host: &Host,
    port: u16,
    address: &str,
    tls: TlsAttempt,
    tls_config: Option<Arc<rustls::ClientConfig>>,
) -> Result<RawConnection, ProtocolError> {
    let io = |e| ProtocolError::io(address, e);
    let (socket, is_tls) = match host {
        Host::Unix(dir) => {
            let path = dir.join(format!(".s.PGSQL.{port}"));
            (
                Socket::Unix(UnixStream::connect(&path).await.map_err(io)?),
                false,
            )
        }
        Host::Tcp(name) => {
            let mut tcp = TcpStream::connect((name.as_str(), port))
                .await
                .map_err(io)?;
            tcp.set_nodelay(true).map_err(io)?;
            dsn.tcp.apply(&tcp).map_err(io)?;
            match (tls, tls_config) {
                (TlsAttempt::Plain, _) | (_, None) => (Socket::Tcp(tcp), false),
                (mode, Some(config)) => {
                    let mut req = BytesMut::new();
                    frontend::ssl_request(&mut req);
                    tcp.write_all(&req).await.map_err(io)?;
                    // Exactly one byte: nothing the server sends before the handshake may be
                    // taken as part of the session (CVE-2021-23222).
                    let answer = tcp.read_u8().await.map_err(io)?;
                    match answer {
                        b'S' => {
                            let name = rustls::pki_types::ServerName::try_from(name.as_str())
                                .map_err(|e| {
                                    ProtocolError::protocol(
                                        address,
                                        format!("{name:?} is not a valid TLS server name: {e}"),
                                    )
                                })?
                                .to_owned();
                            let tls = tokio_rustls::TlsConnector::from(config)
                                .connect(name, tcp)
                                .await
                                .map_err(io)?;
                            (Socket::Tls(Box::new(tls)), true)
                        }
                        b'N' if mode == TlsAttempt::IfOffered => (Socket::Tcp(tcp), false),
                        b'N' => return Err(ProtocolError::new(address, ErrorKind::TlsUnsupported)),
                        b'E' => {
                            return Err(ProtocolError::protocol(
                                address,
                                "the server answered the TLS request with an error (a server \
                                 older than PostgreSQL 7.0, or not PostgreSQL)",
                            ))
                        }
                        other => {
                            return Err(ProtocolError::protocol(
                                address,
                                format!("invalid answer to the TLS request: byte {other}"),
                            ))
                        }
                    }
                }
            }
        }
    };
    let mut conn = RawConnection {
        socket,
        read_buf: BytesMut::with_capacity(64 * 1024),
        write_buf: BytesMut::with_capacity(1024),
        address: address.to_string(),
        parameters: HashMap::new(),
        backend_key: None,
        tls: is_tls,
        end_point: None,
        channel_bound: false,
    };
    if let Socket::Tls(tls) = &conn.socket {
        conn.end_point = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|cert| crate::tls::tls_server_end_point(cert));
    }
    conn.startup(dsn, options).await?;
    Ok(conn)
}

impl RawConnection {
    /// A session over an already connected socket, past startup (for tests with a scripted
    /// server on the other end).
    #[cfg(test)]
    pub(crate) fn for_test(socket: UnixStream) -> Self {
        RawConnection {
            socket: Socket::Unix(socket),
            read_buf: BytesMut::new(),
            write_buf: BytesMut::new(),
            address: "test@scripted:5432/db".into(),
            parameters: HashMap::new(),
            backend_key: None,
            tls: false,
            end_point: None,
            channel_bound: false,
        }
    }

    /// Sends the startup message, authenticates and waits for ReadyForQuery.
    async fn startup(&mut self, dsn: &Dsn, options: &ConnectOptions) -> Result<(), ProtocolError> {
        let app = dsn
            .application_name
            .as_deref()
            .unwrap_or(&options.application_name);
        let mut params: Vec<(&str, &str)> = vec![
            ("user", &dsn.user),
            ("database", &dsn.dbname),
            ("application_name", app),
            ("client_encoding", "UTF8"),
        ];
        if options.replication {
            params.push(("replication", "database"));
        }
        if let Some(o) = dsn.options.as_deref().filter(|o| !o.trim().is_empty()) {
            params.push(("options", o));
        }
        // Startup parameters are applied after `options`, so these win over the DSN's.
        params.extend(SESSION_PARAMS.iter().copied());
        for (k, v) in &options.params {
            params.push((k, v));
        }
        let mut buf = BytesMut::new();
        frontend::startup_message(params.iter().copied(), &mut buf)
            .map_err(|e| self.err(ErrorKind::Protocol(format!("cannot encode startup: {e}"))))?;
        self.send(&buf).await?;
        self.authenticate(dsn).await?;
        loop {
            match self.read_message().await? {
                Message::ParameterStatus(p) => {
                    if let (Ok(k), Ok(v)) = (p.name(), p.value()) {
                        self.parameters.insert(k.to_string(), v.to_string());
                    }
                }
                Message::BackendKeyData(k) => {
                    self.backend_key = Some((k.process_id(), k.secret_key()));
                }
                Message::NoticeResponse(n) => self.log_notice(n.fields()),
                Message::ReadyForQuery(_) => return Ok(()),
                Message::ErrorResponse(e) => return Err(self.server_error(e.fields())),
                _ => return Err(self.unexpected("while starting the session")),
            }
        }
    }

    /// Refuses a method `require_auth` or `channel_binding` rules out, before any password
    /// is sent.
    fn check_method(&self, dsn: &Dsn, method: AuthMethod) -> Result<(), ProtocolError> {
        if let Some(policy) = &dsn.require_auth {
            if !policy.allows(method) {
                return Err(self.err(ErrorKind::AuthRefused(AuthRefused {
                    method,
                    setting: format!("require_auth={}", policy.as_str()),
                })));
            }
        }
        // SCRAM is checked where the mechanism is chosen.
        if dsn.channel_binding == BindingPolicy::Require && method != AuthMethod::ScramSha256 {
            return Err(self.err(ErrorKind::AuthRefused(AuthRefused {
                method,
                setting: "channel_binding=require".into(),
            })));
        }
        Ok(())
    }

    async fn authenticate(&mut self, dsn: &Dsn) -> Result<(), ProtocolError> {
        let user = dsn.user.clone();
        let address = self.address.clone();
        let password = || {
            dsn.password
                .as_ref()
                .map(|p| p.expose().as_bytes().to_vec())
                .ok_or_else(|| {
                    ProtocolError::new(address.clone(), ErrorKind::PasswordMissing(user.clone()))
                })
        };
        let mut buf = BytesMut::new();
        match self.read_message().await? {
            Message::AuthenticationOk => {
                self.check_method(dsn, AuthMethod::None)?;
                return Ok(());
            }
            Message::AuthenticationCleartextPassword => {
                self.check_method(dsn, AuthMethod::Password)?;
                let pw = password()?;
                frontend::password_message(&pw, &mut buf).map_err(|e| self.encode_err(e))?;
                self.send(&buf).await?;
            }
            Message::AuthenticationMd5Password(body) => {
                self.check_method(dsn, AuthMethod::Md5)?;
                let pw = password()?;
                let hash = authentication::md5_hash(user.as_bytes(), &pw, body.salt());
                frontend::password_message(hash.as_bytes(), &mut buf)
                    .map_err(|e| self.encode_err(e))?;
                self.send(&buf).await?;
            }
            Message::AuthenticationSasl(body) => {
                self.check_method(dsn, AuthMethod::ScramSha256)?;
                let (mut has_scram, mut has_plus) = (false, false);
                let mut mechanisms = body.mechanisms();
                while let Some(m) = mechanisms
                    .next()
                    .map_err(|e| self.err(ErrorKind::Protocol(e.to_string())))?
                {
                    has_scram |= m == SCRAM_SHA_256;
                    has_plus |= m == SCRAM_SHA_256_PLUS;
                }
                if !has_scram && !has_plus {
                    return Err(self.err(ErrorKind::UnsupportedAuth(
                        "a SASL mechanism other than SCRAM-SHA-256".into(),
                    )));
                }
                // libpq's rules: bind when TLS gives us the certificate hash and the server
                // offers SCRAM-SHA-256-PLUS; say "client supports binding, server did not
                // offer it" (`y`) when we could have bound, so a downgrade is detected.
                let end_point = self
                    .end_point
                    .clone()
                    .filter(|_| dsn.channel_binding != BindingPolicy::Disable);
                let (binding, mechanism) = match (end_point, has_plus) {
                    (Some(ep), true) => {
                        (ChannelBinding::tls_server_end_point(ep), SCRAM_SHA_256_PLUS)
                    }
                    (Some(_), false) => (ChannelBinding::unrequested(), SCRAM_SHA_256),
                    (None, _) => (ChannelBinding::unsupported(), SCRAM_SHA_256),
                };
                if mechanism != SCRAM_SHA_256_PLUS && dsn.channel_binding == BindingPolicy::Require
                {
                    return Err(self.err(ErrorKind::ChannelBindingUnavailable { tls: self.tls }));
                }
                let pw = password()?;
                let mut scram = ScramSha256::new(&pw, binding);
                frontend::sasl_initial_response(mechanism, scram.message(), &mut buf)
                    .map_err(|e| self.encode_err(e))?;
                self.send(&buf).await?;
                let body = match self.read_message().await? {
                    Message::AuthenticationSaslContinue(b) => b,
                    Message::ErrorResponse(e) => return Err(self.auth_error(&user, e.fields())),
                    _ => return Err(self.unexpected("during SCRAM authentication")),
                };
                scram
                    .update(body.data())
                    .map_err(|e| self.err(ErrorKind::Scram(e.to_string())))?;
                buf.clear();
                frontend::sasl_response(scram.message(), &mut buf)
                    .map_err(|e| self.encode_err(e))?;
                self.send(&buf).await?;
                let body = match self.read_message().await? {
                    Message::AuthenticationSaslFinal(b) => b,
                    Message::ErrorResponse(e) => return Err(self.auth_error(&user, e.fields())),
                    _ => return Err(self.unexpected("during SCRAM authentication")),
                };
                scram.finish(body.data()).map_err(|e| {
                    self.err(ErrorKind::Scram(format!(
                        "the server's proof is invalid: {e}"
                    )))
                })?;
                self.channel_bound = mechanism == SCRAM_SHA_256_PLUS;
            }
            Message::AuthenticationKerberosV5 => {
                return Err(self.err(ErrorKind::UnsupportedAuth("Kerberos V5".into())))
            }
            Message::AuthenticationScmCredential => {
                return Err(self.err(ErrorKind::UnsupportedAuth("SCM credential".into())))
            }
            Message::AuthenticationGss | Message::AuthenticationGssContinue(_) => {
                self.check_method(dsn, AuthMethod::Gss)?;
                return Err(self.err(ErrorKind::UnsupportedAuth("GSSAPI".into())));
            }
            Message::AuthenticationSspi => {
                self.check_method(dsn, AuthMethod::Sspi)?;
                return Err(self.err(ErrorKind::UnsupportedAuth("SSPI".into())));
            }
            Message::ErrorResponse(e) => return Err(self.auth_error(&user, e.fields())),
            _ => return Err(self.unexpected("before authentication")),
        }
        match self.read_message().await? {
            Message::AuthenticationOk => Ok(()),
            Message::ErrorResponse(e) => Err(self.auth_error(&user, e.fields())),
            _ => Err(self.unexpected("after authentication")),
        }
    }

    fn err(&self, kind: ErrorKind) -> ProtocolError {
        ProtocolError::new(self.address.clone(), kind)
    }

    fn encode_err(&self, e: io::Error) -> ProtocolError {
        self.err(ErrorKind::Protocol(format!("cannot encode message: {e}")))
    }

    fn unexpected(&self, when: &str) -> ProtocolError {
        self.err(ErrorKind::Protocol(format!(
            "unexpected message from the server {when}"
        )))
    }

    pub(crate) fn server_error(
        &self,
        fields: postgres_protocol::message::backend::ErrorFields<'_>,
    ) -> ProtocolError {
        match ServerError::from_fields(fields) {
            Ok(s) => self.err(ErrorKind::Server(s)),
            Err(e) => self.err(ErrorKind::Protocol(format!("malformed error message: {e}"))),
        }
    }

    /// An error during login: authentication failures (class 28) become
    /// [`ErrorKind::Auth`], naming the user; everything else stays a server error.
    fn auth_error(
        &self,
        user: &str,
        fields: postgres_protocol::message::backend::ErrorFields<'_>,
    ) -> ProtocolError {
        let e = self.server_error(fields);
        match e.kind() {
            ErrorKind::Server(s) if s.code.starts_with("28") => self.err(ErrorKind::Auth {
                user: user.to_string(),
                server: s.clone(),
            }),
            _ => e,
        }
    }

    pub(crate) fn log_notice(&self, fields: postgres_protocol::message::backend::ErrorFields<'_>) {
        if let Ok(n) = ServerError::from_fields(fields) {
            tracing::info!(node = %self.address, severity = %n.severity, code = %n.code, "server notice: {}", n.message);
        }
    }

    /// Writes and flushes `bytes`.
    pub(crate) async fn send(&mut self, bytes: &[u8]) -> Result<(), ProtocolError> {
        self.socket
            .write_all(bytes)
            .await
            .map_err(|e| ProtocolError::io(&self.address, e))?;
        self.socket
            .flush()
            .await
            .map_err(|e| ProtocolError::io(&self.address, e))
    }

    /// Writes and flushes the pending `write_buf`.
    pub(crate) async fn flush_write_buf(&mut self) -> Result<(), ProtocolError> {
        let buf = self.write_buf.split();
        let r = self.send(&buf).await;
        // Reuse the allocation.
        self.write_buf.unsplit(buf);
        self.write_buf.clear();
        r
    }

    /// Reads more bytes into the read buffer; an end of stream is [`ErrorKind::Closed`].
    /// Cancellation-safe: either bytes were appended or nothing happened.
    pub(crate) async fn fill(&mut self) -> Result<(), ProtocolError> {
        if self.read_buf.capacity() - self.read_buf.len() < 8 * 1024 {
            self.read_buf.reserve(64 * 1024);
        }
        let n = self
            .socket
            .read_buf(&mut self.read_buf)
            .await
            .map_err(|e| ProtocolError::io(&self.address, e))?;
        if n == 0 {
            return Err(self.err(ErrorKind::Closed));
        }
        Ok(())
    }

    /// The next complete frame already in the buffer, if any.
    pub(crate) fn next_frame(&mut self) -> Result<Option<BytesMut>, ProtocolError> {
        split_frame(&mut self.read_buf).map_err(|e| self.err(ErrorKind::Protocol(e)))
    }

    /// Reads one complete frame (tag, length, body).
    pub(crate) async fn read_frame(&mut self) -> Result<BytesMut, ProtocolError> {
        loop {
            if let Some(f) = self.next_frame()? {
                return Ok(f);
            }
            self.fill().await?;
        }
    }

    /// Reads one message of a kind postgres-protocol knows (not CopyBothResponse).
    pub(crate) async fn read_message(&mut self) -> Result<Message, ProtocolError> {
        let mut frame = self.read_frame().await?;
        parse_message(&self.address, &mut frame)
    }

    /// Runs one simple query (`Q`) and collects its rows as text.
    ///
    /// Works on replication connections too (replication commands and, with
    /// `replication=database`, plain SQL). A server error is returned after the server is
    /// ready again, so the connection stays usable.
    pub async fn simple_query(&mut self, sql: &str) -> Result<QueryResult, ProtocolError> {
        let mut buf = BytesMut::new();
        frontend::query(sql, &mut buf).map_err(|e| self.encode_err(e))?;
        self.send(&buf).await?;
        let mut result = QueryResult::default();
        let mut error: Option<ProtocolError> = None;
        loop {
            match self.read_message().await? {
                Message::RowDescription(d) => {
                    let mut fields = d.fields();
                    result.columns.clear();
                    while let Some(f) = fields
                        .next()
                        .map_err(|e| self.err(ErrorKind::Protocol(e.to_string())))?
                    {
                        result.columns.push(f.name().to_string());
                    }
                }
                Message::DataRow(row) => {
                    let mut values = Vec::new();
                    let mut ranges = row.ranges();
                    while let Some(r) = ranges
                        .next()
                        .map_err(|e| self.err(ErrorKind::Protocol(e.to_string())))?
                    {
                        values.push(match r {
                            None => None,
                            Some(r) => {
                                let bytes = row.buffer().get(r).ok_or_else(|| {
                                    self.err(ErrorKind::Protocol(
                                        "data row value out of bounds".into(),
                                    ))
                                })?;
                                Some(String::from_utf8(bytes.to_vec()).map_err(|_| {
                                    self.err(ErrorKind::Protocol(
                                        "data row value is not UTF-8".into(),
                                    ))
                                })?)
                            }
                        });
                    }
                    result.rows.push(values);
                }
                Message::CommandComplete(c) => {
                    result.tag = c
                        .tag()
                        .map_err(|e| self.err(ErrorKind::Protocol(e.to_string())))?
                        .to_string();
                }
                Message::EmptyQueryResponse => {}
                Message::NoticeResponse(n) => self.log_notice(n.fields()),
                Message::ParameterStatus(p) => {
                    if let (Ok(k), Ok(v)) = (p.name(), p.value()) {
                        self.parameters.insert(k.to_string(), v.to_string());
                    }
                }
                Message::NotificationResponse(_) => {}
                Message::ErrorResponse(e) => {
                    if error.is_none() {
                        error = Some(self.server_error(e.fields()));
                    }
                }
                Message::CopyInResponse(_) => {
                    buf.clear();
                    frontend::copy_fail("simple_query does not send COPY data", &mut buf)
                        .map_err(|e| self.encode_err(e))?;
                    self.send(&buf).await?;
                }
                Message::CopyOutResponse(_) | Message::CopyData(_) | Message::CopyDone => {
                    // COPY TO STDOUT output is not collected.
                }
                Message::ReadyForQuery(_) => {
                    return match error {
                        Some(e) => Err(e),
                        None => Ok(result),
                    }
                }
                _ => return Err(self.unexpected("in reply to a simple query")),
            }
        }
    }

    /// A server parameter reported at startup or since (`server_version`, `TimeZone`, ...).
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters.get(name).map(String::as_str)
    }

    /// The server's version number (`150004` for 15.4), from `server_version`.
    pub fn server_version_num(&self) -> Option<u32> {
        let v = self.parameter("server_version")?;
        let mut parts = v
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty());
        let major: u32 = parts.next()?.parse().ok()?;
        let minor: u32 = parts.next().and_then(|m| m.parse().ok()).unwrap_or(0);
        Some(major * 10_000 + minor)
    }

    /// Process id and secret key for cancel requests.
    pub fn backend_key(&self) -> Option<(i32, i32)> {
        self.backend_key
    }

    /// Whether the session runs over TLS.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Whether SCRAM bound the session to the server's TLS certificate
    /// (SCRAM-SHA-256-PLUS with `tls-server-end-point`).
    pub fn is_channel_bound(&self) -> bool {
        self.channel_bound
    }

    /// The node, as `user@host:port/dbname`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Ends the session politely (Terminate, then close).
    pub async fn close(mut self) -> Result<(), ProtocolError> {
        let mut buf = BytesMut::new();
        frontend::terminate(&mut buf);
        self.send(&buf).await?;
        let _ = self.socket.shutdown().await;
        Ok(())
    }
}

/// Parses one frame with postgres-protocol; CopyBothResponse and unknown tags are errors.
pub(crate) fn parse_message(address: &str, frame: &mut BytesMut) -> Result<Message, ProtocolError> {
    match Message::parse(frame) {
        Ok(Some(m)) => Ok(m),
        Ok(None) => Err(ProtocolError::protocol(address, "incomplete message")),
        Err(e) => Err(ProtocolError::protocol(
            address,
            format!("malformed message from the server: {e}"),
        )),
    }
}

/// The body of a frame (after tag and length).
pub(crate) fn frame_body(frame: BytesMut) -> Bytes {
    let mut b = frame.freeze();
    if b.len() >= 5 {
        b = b.slice(5..);
    } else {
        b.clear();
    }
    b
}
