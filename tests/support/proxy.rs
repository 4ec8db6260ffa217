//! A TCP fault proxy placed between walbridge and a node (tokio, in-process, no daemon).
//!
//! ```text
//!   walbridge ──▶ 127.0.0.1:<proxy port> ──▶ FaultProxy ──▶ 127.0.0.1:<node port>
//!                                            │ cut (RST)          black hole (freeze)
//!                                            │ latency + jitter   bandwidth limit
//!                                            └ close inside a server→client CopyData ('d')
//! ```
//!
//! Every accepted connection gets its own upstream connection and two one-way pipes. A pipe
//! reads chunks, stamps each with a delivery time (latency plus jitter, never reordering) and
//! a writer sends them on, paced by the bandwidth limit. Faults act on the open connections
//! and on those accepted later:
//!
//! - [`FaultProxy::cut`]: both sockets get `SO_LINGER 0` and are closed, so both peers see a
//!   reset at once;
//! - [`FaultProxy::black_hole`]: nothing is read or written any more, the sockets stay open
//!   (a half-open link: no FIN, no RST), until lifted, when forwarding resumes intact;
//! - [`FaultProxy::cut_in_copy_data`]: the server→client direction is parsed as PostgreSQL
//!   messages (after the one-byte answer to an `SSLRequest`; a TLS session is not parsed) and
//!   the next `CopyData` longer than `n` bytes is cut after `n` of its bytes.
//!
//! The proxy runs on its own runtime thread, so the synchronous tests drive it directly.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// The faults in force (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// Stop forwarding in both directions without closing anything.
    pub black_hole: bool,
    /// Delay added to every chunk, each way.
    pub latency: Duration,
    /// Extra random delay in `0..=jitter` per chunk (order is kept).
    pub jitter: Duration,
    /// Bytes per second, each way, per connection.
    pub bandwidth: Option<u64>,
    /// One-shot: cut the connection after this many bytes of the next server→client CopyData
    /// message that is longer than that.
    pub cut_copy_data_after: Option<usize>,
    /// CopyData messages long enough for the armed cut that pass whole before it.
    pub cut_copy_data_skip: u64,
}

struct Shared {
    faults: Mutex<Faults>,
    /// Bumped on every change, so waiting pipes look again.
    changed: watch::Sender<u64>,
    /// Bumped by [`FaultProxy::cut`]; connections opened before it close with a reset.
    cut_epoch: watch::Sender<u64>,
    accepted: AtomicU64,
    open: AtomicUsize,
    copy_data_cuts: AtomicU64,
}

impl Shared {
    fn faults(&self) -> Faults {
        self.faults.lock().map(|f| f.clone()).unwrap_or_default()
    }

    fn update(&self, f: impl FnOnce(&mut Faults)) {
        if let Ok(mut g) = self.faults.lock() {
            f(&mut g);
        }
        self.changed.send_modify(|v| *v += 1);
    }

    /// Takes the one-shot CopyData cut, if armed and `len` is long enough for it.
    fn take_copy_data_cut(&self, len: usize) -> Option<usize> {
        let mut g = self.faults.lock().ok()?;
        match g.cut_copy_data_after {
            Some(n) if len > n && g.cut_copy_data_skip > 0 => {
                g.cut_copy_data_skip -= 1;
                None
            }
            Some(n) if len > n => {
                g.cut_copy_data_after = None;
                Some(n)
            }
            _ => None,
        }
    }
}

/// A running proxy; stops (closing every connection) when dropped.
pub struct FaultProxy {
    port: u16,
    upstream: u16,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `127.0.0.1:upstream`.
    pub fn start(upstream: u16) -> FaultProxy {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fault-proxy")
            .enable_all()
            .build()
            .expect("fault proxy runtime");
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind the fault proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let shared = Arc::new(Shared {
            faults: Mutex::new(Faults::default()),
            changed: watch::channel(0).0,
            cut_epoch: watch::channel(0).0,
            accepted: AtomicU64::new(0),
            open: AtomicUsize::new(0),
            copy_data_cuts: AtomicU64::new(0),
        });
        let target: SocketAddr = ([127, 0, 0, 1], upstream).into();
        runtime.spawn(accept_loop(listener, target, Arc::clone(&shared)));
        FaultProxy {
            port,
            upstream,
            shared,
            runtime: Some(runtime),
        }
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The node's own port.
    pub fn upstream(&self) -> u16 {
        self.upstream
    }

    /// Resets every open connection (both peers see `ECONNRESET`); new ones are accepted.
    pub fn cut(&self) {
        self.shared.cut_epoch.send_modify(|e| *e += 1);
    }

    /// Starts or ends a black hole: nothing is forwarded, nothing is closed.
    pub fn black_hole(&self, on: bool) {
        self.shared.update(|f| f.black_hole = on);
    }

    /// Adds `latency` plus a random `0..=jitter` to every chunk, each way.
    pub fn set_latency(&self, latency: Duration, jitter: Duration) {
        self.shared.update(|f| {
            f.latency = latency;
            f.jitter = jitter;
        });
    }

    /// Limits each direction of each connection to `bytes_per_second` (`None`: unlimited).
    pub fn set_bandwidth(&self, bytes_per_second: Option<u64>) {
        self.shared
            .update(|f| f.bandwidth = bytes_per_second.map(|b| b.max(1)));
    }

    /// Arms a one-shot cut after `after` bytes of the next server→client CopyData message
    /// longer than that (see [`FaultProxy::copy_data_cuts`] to know it happened).
    pub fn cut_in_copy_data(&self, after: usize) {
        self.cut_in_copy_data_message(0, after);
    }

    /// As [`FaultProxy::cut_in_copy_data`], letting `skip` such messages pass whole first:
    /// armed before a large transaction is sent, this cuts inside it at a known depth,
    /// however fast the stream runs.
    pub fn cut_in_copy_data_message(&self, skip: u64, after: usize) {
        self.shared.update(|f| {
            f.cut_copy_data_skip = skip;
            f.cut_copy_data_after = Some(after);
        });
    }

    /// Lifts every fault.
    pub fn heal(&self) {
        self.shared.update(|f| *f = Faults::default());
    }

    /// The faults in force.
    pub fn faults(&self) -> Faults {
        self.shared.faults()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Acquire)
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::Acquire)
    }

    /// How many armed CopyData cuts have fired.
    pub fn copy_data_cuts(&self) -> u64 {
        self.shared.copy_data_cuts.load(Ordering::Acquire)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::AcqRel);
        tokio::spawn(serve(client, target, Arc::clone(&shared)));
    }
}

/// Counts an open connection for as long as it lives.
struct OpenGuard(Arc<Shared>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a pipe stopped.
enum PipeEnd {
    /// The reading side closed (or failed): pass the end on.
    Eof,
    /// An armed CopyData cut fired.
    Cut,
}

async fn serve(client: TcpStream, target: SocketAddr, shared: Arc<Shared>) {
    let mut cut = shared.cut_epoch.subscribe();
    cut.borrow_and_update();
    let Ok(server) = TcpStream::connect(target).await else {
        reset(&client);
        return;
    };
    shared.open.fetch_add(1, Ordering::AcqRel);
    let _guard = OpenGuard(Arc::clone(&shared));
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let client = Arc::new(client);
    let server = Arc::new(server);
    let mut up = tokio::spawn(pipe(
        Arc::clone(&client),
        Arc::clone(&server),
        Arc::clone(&shared),
        false,
    ));
    let mut down = tokio::spawn(pipe(
        Arc::clone(&server),
        Arc::clone(&client),
        Arc::clone(&shared),
        true,
    ));
    let (mut up_done, mut down_done) = (false, false);
    let reset_now = loop {
        tokio::select! {
            _ = cut.changed() => break true,
            r = &mut up, if !up_done => {
                up_done = true;
                if matches!(r, Ok(PipeEnd::Cut)) { break true; }
            }
            r = &mut down, if !down_done => {
                down_done = true;
                if matches!(r, Ok(PipeEnd::Cut)) { break true; }
            }
        }
        if up_done && down_done {
            break false;
        }
    };
    if reset_now {
        reset(&client);
        reset(&server);
        up.abort();
        down.abort();
        // Once the pipes have let go of the sockets, the last close below sends the RST.
        if !up_done {
            let _ = up.await;
        }
        if !down_done {
            let _ = down.await;
        }
    }
}

/// Makes the coming close a reset rather than a FIN (`SO_LINGER 0`).
fn reset(s: &TcpStream) {
    // With linger 0, closing the socket (dropping its last reference) sends RST, not FIN.
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

/// Waits while the proxy black-holes traffic.
async fn while_black_holed(shared: &Shared) {
    let mut changed = shared.changed.subscribe();
    loop {
        changed.borrow_and_update();
        if !shared.faults().black_hole {
            return;
        }
        if changed.changed().await.is_err() {
            return;
        }
    }
}

async fn read_some(s: &TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        s.readable().await?;
        match s.try_read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

async fn write_all(s: &TcpStream, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        s.writable().await?;
        match s.try_write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One direction: a reader stamping chunks with their delivery time, a writer sending them.
async fn pipe(
    from: Arc<TcpStream>,
    to: Arc<TcpStream>,
    shared: Arc<Shared>,
    server_to_client: bool,
) -> PipeEnd {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>, bool)>(256);
    let reader_shared = Arc::clone(&shared);
    let reader = async move {
        let mut framing = server_to_client.then(Framing::default);
        let mut last_due = Instant::now();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            while_black_holed(&reader_shared).await;
            let n = match read_some(&from, &mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            // The read may have waited through the start of a black hole: hold the bytes.
            while_black_holed(&reader_shared).await;
            let (keep, cut) = match framing.as_mut() {
                Some(f) => f.feed(&buf[..n], &reader_shared),
                None => (n, false),
            };
            let faults = reader_shared.faults();
            let jitter = if faults.jitter.is_zero() {
                Duration::ZERO
            } else {
                faults.jitter.mul_f64(rand::random::<f64>().clamp(0.0, 1.0))
            };
            let due = (Instant::now() + faults.latency + jitter).max(last_due);
            last_due = due;
            if tx.send((due, buf[..keep].to_vec(), cut)).await.is_err() || cut {
                return;
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk, cut)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            for part in chunk.chunks(4096) {
                while_black_holed(&shared).await;
                if write_all(&to, part).await.is_err() {
                    return PipeEnd::Eof;
                }
                if let Some(bw) = shared.faults().bandwidth {
                    let secs = part.len() as f64 / bw as f64;
                    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
                }
            }
            if cut {
                shared.copy_data_cuts.fetch_add(1, Ordering::AcqRel);
                return PipeEnd::Cut;
            }
        }
        // The reader is done: pass the end of stream on.
        let _ = socket2::SockRef::from(&*to).shutdown(std::net::Shutdown::Write);
        PipeEnd::Eof
    };
    let (_, end) = tokio::join!(reader, writer);
    end
}

/// Tracks PostgreSQL message boundaries on the server→client stream.
#[derive(Default)]
struct Framing {
    /// Bytes seen so far (the first decides whether the stream is parsed at all).
    seen: u64,
    /// The stream is TLS (answer `S` to an SSLRequest): not parsed.
    opaque: bool,
    /// Header bytes of the current message collected so far (tag + length).
    header: Vec<u8>,
    /// Body bytes of the current message still to come.
    remaining: usize,
    /// Body bytes of the current CopyData message forwarded so far, and where to cut it.
    copy_data: Option<(usize, Option<usize>)>,
}

impl Framing {
    /// Feeds a chunk; returns how many of its bytes to forward and whether to cut after them.
    fn feed(&mut self, chunk: &[u8], shared: &Shared) -> (usize, bool) {
        let mut i = 0;
        if self.seen == 0 {
            if let Some(&first) = chunk.first() {
                match first {
                    b'S' => self.opaque = true,
                    // The refusal of an SSLRequest is one byte; messages follow it.
                    b'N' => i = 1,
                    _ => {}
                }
            }
        }
        self.seen += chunk.len() as u64;
        if self.opaque {
            return (chunk.len(), false);
        }
        while i < chunk.len() {
            if self.remaining == 0 && self.header.len() < 5 {
                self.header.push(chunk[i]);
                i += 1;
                if self.header.len() == 5 {
                    let len = u32::from_be_bytes([
                        self.header[1],
                        self.header[2],
                        self.header[3],
                        self.header[4],
                    ]) as usize;
                    self.remaining = len.saturating_sub(4);
                    self.copy_data = (self.header[0] == b'd')
                        .then(|| (0, shared.take_copy_data_cut(self.remaining)));
                    if self.remaining == 0 {
                        self.header.clear();
                    }
                }
                continue;
            }
            let take = self.remaining.min(chunk.len() - i);
            if let Some((done, Some(at))) = self.copy_data {
                if done + take >= at {
                    return (i + (at - done), true);
                }
            }
            if let Some((done, _)) = &mut self.copy_data {
                *done += take;
            }
            self.remaining -= take;
            i += take;
            if self.remaining == 0 {
                self.header.clear();
                self.copy_data = None;
            }
        }
        (chunk.len(), false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream as StdStream;

    /// An echo server on a free port (its own thread per connection).
    fn echo_server() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        port
    }

    fn connect(p: &FaultProxy) -> StdStream {
        let s = StdStream::connect(("127.0.0.1", p.port())).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s
    }

    fn round_trip(s: &mut StdStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        s.write_all(msg)?;
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got)?;
        Ok(got)
    }

    #[test]
    fn proxy_forwards_and_cut_resets_both_sides() {
        let p = FaultProxy::start(echo_server());
        let mut s = connect(&p);
        assert_eq!(round_trip(&mut s, b"hello").expect("echo"), b"hello");
        p.cut();
        let mut buf = [0u8; 8];
        let err = s.read(&mut buf).expect_err("a reset, not EOF or data");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
        // New connections still work.
        let mut s2 = connect(&p);
        assert_eq!(round_trip(&mut s2, b"again").expect("echo"), b"again");
        assert_eq!(p.accepted(), 2);
    }

    #[test]
    fn proxy_black_hole_holds_the_link_open_and_resumes_intact() {
        let p = FaultProxy::start(echo_server());
        let mut s = connect(&p);
        assert_eq!(round_trip(&mut s, b"one").expect("echo"), b"one");
        p.black_hole(true);
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        s.write_all(b"two").expect("the write is accepted");
        let mut buf = [0u8; 3];
        let err = s.read(&mut buf).expect_err("nothing comes back");
        assert!(
            matches!(
                err.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{err}"
        );
        assert_eq!(p.open_connections(), 1, "the link stays open");
        p.black_hole(false);
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.read_exact(&mut buf).expect("held bytes arrive");
        assert_eq!(&buf, b"two");
    }

    #[test]
    fn proxy_latency_and_bandwidth_slow_the_link() {
        let p = FaultProxy::start(echo_server());
        let mut s = connect(&p);
        p.set_latency(Duration::from_millis(100), Duration::from_millis(20));
        let t = std::time::Instant::now();
        round_trip(&mut s, b"x").expect("echo");
        let rtt = t.elapsed();
        assert!(rtt >= Duration::from_millis(200), "{rtt:?}");
        p.set_latency(Duration::ZERO, Duration::ZERO);
        p.set_bandwidth(Some(100_000));
        let t = std::time::Instant::now();
        let data = vec![7u8; 50_000];
        assert_eq!(round_trip(&mut s, &data).expect("echo"), data);
        // 50 kB at 100 kB/s (the echo overlaps the two directions).
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(450), "{took:?}");
    }

    #[test]
    fn proxy_cuts_inside_a_copy_data_message() {
        // A fake server: sends an AuthenticationOk, then a 1000-byte CopyData.
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let mut msg = vec![b'R', 0, 0, 0, 8, 0, 0, 0, 0];
                msg.push(b'd');
                msg.extend_from_slice(&1004u32.to_be_bytes());
                msg.extend(std::iter::repeat_n(b'w', 1000));
                let _ = s.write_all(&msg);
                let mut buf = [0u8; 16];
                let _ = s.read(&mut buf);
            }
        });
        let p = FaultProxy::start(port);
        p.cut_in_copy_data(300);
        let mut s = connect(&p);
        let mut got = Vec::new();
        let err = s.read_to_end(&mut got);
        assert_eq!(got.len(), 9 + 5 + 300, "{err:?}");
        assert_eq!(p.copy_data_cuts(), 1);
        assert_eq!(p.faults().cut_copy_data_after, None, "one-shot");
    }
}
