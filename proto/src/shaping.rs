//! Link emulation, a testing aid: a one-way delay and a bandwidth cap per direction on every
//! client connection this process opens, and byte counters on all of them, shaped or not.
//!
//! Volunteers are tens of milliseconds apart on 10-100 Mbit/s links; loopback is neither. Each
//! direction of a shaped connection is a timed queue, so pipelined traffic stays pipelined: a
//! chunk read from the sender gets a departure time from the bandwidth cap, serialised behind
//! the chunks before it, and an arrival time one delay later, at which it is written to the
//! receiver. Many chunks are in flight at once; a sleep per message would instead turn N
//! messages into N delays. At most [`MAX_IN_FLIGHT`] bytes per direction wait in the queue;
//! beyond that the sender waits, as it would on a full socket buffer, so memory stays bounded.
//!
//! The settings are fixed once per process ([`configure`], from `--link-delay-ms` and
//! `--link-mbit`) and applied by the connector of [`crate::transport`] to every client
//! connection, in both directions (requests on the way out, responses on the way in). Since
//! every connection has exactly one client, every link is shaped exactly once per direction,
//! whichever side opened it. Off unless configured.

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;

/// Longest one-way delay accepted, in milliseconds.
pub const MAX_DELAY_MS: u64 = 60_000;
/// Lowest bandwidth cap accepted, in Mbit/s (1 kbit/s), so a chunk's transmission time stays finite.
pub const MIN_MBIT: f64 = 0.001;
/// Bytes one direction of a shaped connection may hold in its queue before the sender waits:
/// far above the bandwidth-delay product of the links emulated (100 Mbit/s x 25 ms = 312 KiB),
/// and low enough that a 10 Mbit/s link queues a few seconds at most.
pub const MAX_IN_FLIGHT: usize = 4 << 20;
/// Largest chunk read at once; the granularity of the timed queue.
const CHUNK: usize = 16 * 1024;
/// Most chunks queued per direction (each holds at least one byte of the budget as well).
const QUEUE_CHUNKS: usize = 1024;
/// Buffer between the client and the shaper's queues, per direction.
const PIPE_BYTES: usize = 64 * 1024;

/// What a link looks like: one-way delay and bandwidth cap, the same in both directions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkShape {
    delay: Duration,
    /// Mbit/s per direction; None = unlimited.
    mbit: Option<f64>,
}

/// A link setting that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ShapeError {
    /// The delay is over [`MAX_DELAY_MS`].
    #[error("link delay of {0} ms is over the limit of {MAX_DELAY_MS} ms")]
    DelayTooLong(u64),
    /// The bandwidth is negative, not finite, or below [`MIN_MBIT`].
    #[error("link bandwidth must be 0 (unlimited) or a finite number of Mbit/s >= {MIN_MBIT}, not {0}")]
    BadRate(f64),
    /// This process already runs with other settings.
    #[error("link emulation is already set to {current} in this process; it cannot change to {wanted}")]
    AlreadySet {
        /// What is in force.
        current: String,
        /// What was asked for.
        wanted: String,
    },
}

impl LinkShape {
    /// The shape for `--link-delay-ms` and `--link-mbit` (0 = unlimited); None when both are 0.
    pub fn from_flags(delay_ms: u64, mbit: f64) -> Result<Option<LinkShape>, ShapeError> {
        if delay_ms > MAX_DELAY_MS {
            return Err(ShapeError::DelayTooLong(delay_ms));
        }
        if !mbit.is_finite() || mbit < 0.0 || (mbit > 0.0 && mbit < MIN_MBIT) {
            return Err(ShapeError::BadRate(mbit));
        }
        let mbit = (mbit > 0.0).then_some(mbit);
        Ok((delay_ms > 0 || mbit.is_some()).then_some(LinkShape { delay: Duration::from_millis(delay_ms), mbit }))
    }

    /// One-way delay.
    pub fn delay(&self) -> Duration {
        self.delay
    }

    /// Bandwidth cap per direction in Mbit/s; None = unlimited.
    pub fn mbit(&self) -> Option<f64> {
        self.mbit
    }

    /// The flags that give another process (a child `pnode`) the same shape.
    pub fn flags(&self) -> Vec<String> {
        vec![
            "--link-delay-ms".into(),
            self.delay.as_millis().to_string(),
            "--link-mbit".into(),
            self.mbit.unwrap_or(0.0).to_string(),
        ]
    }

    /// How long `n` bytes occupy the link.
    fn transmit_time(&self, n: usize) -> Duration {
        match self.mbit {
            // n <= CHUNK and mbit >= MIN_MBIT, so this is at most a few minutes.
            Some(m) => Duration::try_from_secs_f64(n as f64 * 8.0 / (m * 1e6)).unwrap_or(Duration::from_secs(3600)),
            None => Duration::ZERO,
        }
    }
}

impl fmt::Display for LinkShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ms one way, ", self.delay.as_millis())?;
        match self.mbit {
            Some(m) => write!(f, "{m} Mbit/s per direction"),
            None => write!(f, "unlimited bandwidth"),
        }
    }
}

static SHAPE: OnceLock<Option<LinkShape>> = OnceLock::new();

/// Fixes this process's link emulation (None: off). Setting the same value again is fine; a
/// different one is refused, since connections already open keep the first.
pub fn configure(shape: Option<LinkShape>) -> Result<(), ShapeError> {
    let current = *SHAPE.get_or_init(|| shape);
    if current == shape {
        return Ok(());
    }
    let show = |s: Option<LinkShape>| s.map_or_else(|| "off".to_string(), |s| s.to_string());
    Err(ShapeError::AlreadySet { current: show(current), wanted: show(shape) })
}

/// This process's link emulation, if it is on.
pub fn configured() -> Option<LinkShape> {
    SHAPE.get().copied().flatten()
}

/// Byte counters of a set of connections, per direction as the client sees it.
#[derive(Debug, Default)]
pub struct LinkCounters {
    sent: AtomicU64,
    received: AtomicU64,
}

impl LinkCounters {
    /// Zeroed counters.
    pub const fn new() -> LinkCounters {
        LinkCounters { sent: AtomicU64::new(0), received: AtomicU64::new(0) }
    }

    /// What has been counted so far.
    pub fn get(&self) -> LinkBytes {
        LinkBytes { sent: self.sent.load(Ordering::Relaxed), received: self.received.load(Ordering::Relaxed) }
    }
}

/// Bytes through a set of connections so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkBytes {
    /// Written by this process's clients.
    pub sent: u64,
    /// Read by this process's clients.
    pub received: u64,
}

impl LinkBytes {
    /// Both directions together.
    pub fn total(&self) -> u64 {
        self.sent.saturating_add(self.received)
    }
}

/// Every client connection of this process.
pub static LINK_BYTES: LinkCounters = LinkCounters::new();

/// Bytes through every client connection of this process so far.
pub fn link_bytes() -> LinkBytes {
    LINK_BYTES.get()
}

/// An IO stream that adds what passes through it to a set of counters.
#[derive(Debug)]
pub struct Counted<T> {
    inner: T,
    counters: &'static LinkCounters,
}

impl<T> Counted<T> {
    /// Counts `inner`'s traffic into `counters`.
    pub fn new(inner: T, counters: &'static LinkCounters) -> Counted<T> {
        Counted { inner, counters }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let n = buf.filled().len().saturating_sub(before);
            this.counters.received.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.counters.sent.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            this.counters.sent.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Any bidirectional byte stream a connection can run on.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A client connection as this process's clients use it: counted, and shaped if configured.
pub type ClientStream = Counted<Box<dyn Io>>;

/// Wraps a freshly opened client connection: shaped when link emulation is on, counted always.
/// Must be called within a tokio runtime (shaping runs on tasks of its own).
pub fn client_stream<S: Io + 'static>(io: S) -> ClientStream {
    let inner: Box<dyn Io> = match configured() {
        Some(s) => Box::new(shape(io, s, MAX_IN_FLIGHT)),
        None => Box::new(io),
    };
    Counted::new(inner, &LINK_BYTES)
}

/// Puts `io` behind a shaped link: what is written to the returned stream reaches `io` as
/// `shape` says, and what `io` yields reaches the returned stream the same way. At most
/// `max_in_flight` bytes (at least one chunk) are queued per direction. The shaping tasks end
/// when both sides have closed or one fails. Must be called within a tokio runtime.
pub fn shape<S: AsyncRead + AsyncWrite + Send + 'static>(
    io: S,
    shape: LinkShape,
    max_in_flight: usize,
) -> DuplexStream {
    let (near, far) = tokio::io::duplex(PIPE_BYTES);
    let (io_read, io_write) = tokio::io::split(io);
    let (far_read, far_write) = tokio::io::split(far);
    let budget = max_in_flight.max(CHUNK);
    tokio::spawn(direction(far_read, io_write, shape, budget));
    tokio::spawn(direction(io_read, far_write, shape, budget));
    near
}

/// One chunk in a timed queue.
struct Chunk {
    /// When its last byte reaches the receiver.
    arrival: Instant,
    bytes: Vec<u8>,
    /// Its share of the in-flight budget, returned once it is delivered.
    _budget: OwnedSemaphorePermit,
}

/// One direction of a shaped link: reads `from`, delivers to `to` at each chunk's arrival time.
async fn direction<R, W>(mut from: R, mut to: W, shape: LinkShape, budget: usize)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let in_flight = Arc::new(Semaphore::new(budget));
    let (tx, mut rx) = mpsc::channel::<Chunk>(QUEUE_CHUNKS);
    let enqueue = async move {
        let mut free_at = Instant::now();
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            // n <= CHUNK <= budget, so the permits always exist.
            let Ok(permit) = in_flight.clone().acquire_many_owned(n as u32).await else { break };
            let start = free_at.max(Instant::now());
            free_at = start.checked_add(shape.transmit_time(n)).unwrap_or(start);
            let arrival = free_at.checked_add(shape.delay).unwrap_or(free_at);
            let bytes = buf.get(..n).map(<[u8]>::to_vec).unwrap_or_default();
            if tx.send(Chunk { arrival, bytes, _budget: permit }).await.is_err() {
                break;
            }
        }
        // Dropping the sender lets the queue drain, then closes the receiving side.
    };
    let deliver = async move {
        while let Some(chunk) = rx.recv().await {
            tokio::time::sleep_until(chunk.arrival).await;
            if to.write_all(&chunk.bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(enqueue, deliver);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    fn link(delay_ms: u64, mbit: f64) -> LinkShape {
        LinkShape::from_flags(delay_ms, mbit).unwrap().unwrap()
    }

    /// Reads exactly `n` bytes from `r`.
    async fn read_n<R: AsyncRead + Unpin>(r: &mut R, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        r.read_exact(&mut v).await.unwrap();
        v
    }

    fn pattern(n: usize, salt: u8) -> Vec<u8> {
        (0..n).map(|i| (i % 251) as u8 ^ salt).collect()
    }

    #[test]
    fn flags_parse_and_round_trip() {
        assert_eq!(LinkShape::from_flags(0, 0.0), Ok(None));
        let s = link(25, 100.0);
        assert_eq!(s.delay(), Duration::from_millis(25));
        assert_eq!(s.mbit(), Some(100.0));
        assert_eq!(s.flags(), ["--link-delay-ms", "25", "--link-mbit", "100"]);
        assert_eq!(link(25, 0.0).mbit(), None);
        assert!(matches!(LinkShape::from_flags(0, -1.0), Err(ShapeError::BadRate(_))));
        assert!(matches!(LinkShape::from_flags(0, f64::NAN), Err(ShapeError::BadRate(_))));
        assert!(matches!(LinkShape::from_flags(0, 1e-9), Err(ShapeError::BadRate(_))));
        assert!(matches!(LinkShape::from_flags(MAX_DELAY_MS + 1, 0.0), Err(ShapeError::DelayTooLong(_))));
        assert_eq!(link(5, 2.5).to_string(), "5 ms one way, 2.5 Mbit/s per direction");
    }

    #[tokio::test(start_paused = true)]
    async fn one_message_arrives_after_the_delay_not_before() {
        let (client, mut server) = duplex(1 << 20);
        let mut shaped = shape(client, link(25, 0.0), MAX_IN_FLIGHT);
        let t0 = Instant::now();
        shaped.write_all(b"hello").await.unwrap();
        // Nothing is there before the delay has passed.
        let mut early = [0u8; 5];
        let r = tokio::time::timeout(Duration::from_millis(24), server.read_exact(&mut early)).await;
        assert!(r.is_err(), "arrived before the delay");
        assert_eq!(read_n(&mut server, 5).await, b"hello");
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(25) && took <= Duration::from_millis(27), "took {took:?}");
        // The answer takes the same delay on the way back.
        let t1 = Instant::now();
        server.write_all(b"world").await.unwrap();
        assert_eq!(read_n(&mut shaped, 5).await, b"world");
        let took = t1.elapsed();
        assert!(took >= Duration::from_millis(25) && took <= Duration::from_millis(27), "took {took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn back_to_back_messages_are_pipelined_not_delayed_one_by_one() {
        let (client, mut server) = duplex(1 << 20);
        // 10 Mbit/s = 1.25 MB/s: 100 messages of 10 kB take 0.8 s on the wire, plus one delay.
        let mut shaped = shape(client, link(25, 10.0), MAX_IN_FLIGHT);
        let (n, size) = (100usize, 10_000usize);
        let t0 = Instant::now();
        let writer = tokio::spawn(async move {
            for i in 0..n {
                shaped.write_all(&pattern(size, i as u8)).await.unwrap();
            }
            shaped
        });
        for i in 0..n {
            assert_eq!(read_n(&mut server, size).await, pattern(size, i as u8), "message {i}");
        }
        let took = t0.elapsed().as_secs_f64();
        let expected = 0.025 + (n * size) as f64 / 1.25e6;
        assert!((took - expected).abs() < 0.02, "took {took:.3} s, expected {expected:.3} s");
        assert!(took < n as f64 * 0.025, "messages were delayed one by one");
        drop(writer.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn the_bandwidth_cap_holds_in_each_direction_independently() {
        let (client, mut server) = duplex(1 << 20);
        let shaped = shape(client, link(10, 8.0), MAX_IN_FLIGHT);
        let (mut up_read, mut up_write) = tokio::io::split(shaped);
        let bytes = 500_000usize; // 0.5 s at 8 Mbit/s
        let t0 = Instant::now();
        let up = tokio::spawn(async move {
            up_write.write_all(&pattern(bytes, 1)).await.unwrap();
            up_write
        });
        let (mut server_read, mut server_write) = tokio::io::split(&mut server);
        let down = async {
            server_write.write_all(&pattern(bytes, 2)).await.unwrap();
        };
        // The receiver of each direction samples how much has arrived over time.
        let watch_up = async {
            let mut got = 0usize;
            let mut buf = vec![0u8; 4096];
            while got < bytes {
                let n = server_read.read(&mut buf).await.unwrap();
                got += n;
                let t = t0.elapsed().as_secs_f64();
                assert!(got as f64 <= (t - 0.010).max(0.0) * 1e6 + CHUNK as f64, "{got} bytes up by {t:.3} s");
            }
            t0.elapsed()
        };
        let watch_down = async {
            let mut got = Vec::with_capacity(bytes);
            let mut buf = vec![0u8; 4096];
            while got.len() < bytes {
                let n = up_read.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
                let t = t0.elapsed().as_secs_f64();
                assert!(
                    got.len() as f64 <= (t - 0.010).max(0.0) * 1e6 + CHUNK as f64,
                    "{} down by {t:.3} s",
                    got.len()
                );
            }
            assert_eq!(got, pattern(bytes, 2));
            t0.elapsed()
        };
        let ((), t_up, t_down) = tokio::join!(down, watch_up, watch_down);
        // Both directions finish in the time of one: they do not share the cap.
        for t in [t_up, t_down] {
            let t = t.as_secs_f64();
            assert!((0.50..0.54).contains(&t), "a direction took {t:.3} s");
        }
        drop(up.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_arrive_intact_and_in_order_and_closing_propagates() {
        let (client, mut server) = duplex(1 << 16);
        let mut shaped = shape(client, link(3, 50.0), 64 * 1024);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            // Uneven writes, so chunk boundaries fall everywhere.
            for piece in sent.chunks(7_919) {
                shaped.write_all(piece).await.unwrap();
            }
            shaped.shutdown().await.unwrap();
            shaped
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got == data, "bytes changed or reordered");
        drop(writer.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_in_flight_bytes_apply_backpressure() {
        let budget = 64 * 1024;
        let (client, mut server) = duplex(1024);
        let shaped = shape(client, link(100, 0.0), budget);
        let (_, mut w) = tokio::io::split(shaped);
        // The receiver reads nothing: the writer must stall once the queue and the buffers are full.
        let mut accepted = 0usize;
        let block = vec![7u8; 4096];
        loop {
            match tokio::time::timeout(Duration::from_secs(5), w.write_all(&block)).await {
                Ok(r) => {
                    r.unwrap();
                    accepted += block.len();
                }
                Err(_) => break,
            }
            assert!(accepted <= 4 << 20, "the writer was never held back");
        }
        let bound = budget + PIPE_BYTES + CHUNK + 1024 + block.len();
        assert!(accepted <= bound, "accepted {accepted} bytes with nobody reading; bound {bound}");
        // Once the receiver reads, everything flows again.
        let mut sink = vec![0u8; accepted];
        server.read_exact(&mut sink).await.unwrap();
        assert!(sink.iter().all(|&b| b == 7));

        // With a delay and no cap, the budget alone limits throughput: one budget per delay.
        let (client, mut server) = duplex(1 << 20);
        let mut shaped = shape(client, link(100, 0.0), budget);
        let total = 16 * budget;
        let t0 = Instant::now();
        let writer = tokio::spawn(async move {
            shaped.write_all(&vec![1u8; total]).await.unwrap();
            shaped
        });
        read_n(&mut server, total).await;
        let took = t0.elapsed().as_secs_f64();
        assert!(took >= 1.5, "16 budgets over a 100 ms link took only {took:.3} s");
        drop(writer.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn counted_streams_count_both_directions() {
        static COUNTERS: LinkCounters = LinkCounters::new();
        let (client, mut server) = duplex(1 << 16);
        let mut c = Counted::new(client, &COUNTERS);
        c.write_all(&[0u8; 1000]).await.unwrap();
        read_n(&mut server, 1000).await;
        server.write_all(&[0u8; 300]).await.unwrap();
        read_n(&mut c, 300).await;
        assert_eq!(COUNTERS.get(), LinkBytes { sent: 1000, received: 300 });
        assert_eq!(COUNTERS.get().total(), 1300);
    }
}
