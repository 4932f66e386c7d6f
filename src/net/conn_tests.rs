//! Tests of the connection's buffered and mapped sends.
//!
//! Each test drives a real `Conn` over loopback: the mio side sends, the accepted std socket
//! (non-blocking, read in the same thread) receives, and the received stream must equal the
//! queued interleaving of `out()` bytes and mapped slices, byte for byte. After every flush the
//! connection's internal state is checked (counters, segment order, the unsent bytes it would
//! still send, `WRITABLE` interest).

use super::*;

use std::io::ErrorKind;
use std::net::{Shutdown, TcpListener};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Poll};

const TOKEN: Token = Token(FIRST_CONN_TOKEN + 3);
/// Every test must end well before this; a hang fails instead of blocking the test run.
const DEADLINE: Duration = Duration::from_secs(20);
const MIB: usize = 1024 * 1024;

/// A "mapped" slice: a range of shared bytes, kept alive by the `Arc` until sent.
struct TestSlice {
    data: Arc<Vec<u8>>,
    range: Range<usize>,
}

impl MappedSlice for TestSlice {
    fn bytes(&self) -> &[u8] {
        &self.data[self.range.clone()]
    }
}

/// splitmix64: a small deterministic PRNG, so every run sends the same bytes.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform-ish in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Uniform-ish in `lo..=hi`.
    fn between(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    fn fill(&mut self, out: &mut Vec<u8>, len: usize) {
        out.reserve(len);
        let mut left = len;
        while left > 0 {
            let word = self.next().to_le_bytes();
            let take = left.min(8);
            out.extend_from_slice(&word[..take]);
            left -= take;
        }
    }
}

/// Pseudo-random bytes, so a misplaced or repeated range shows up as a mismatch.
fn random_bytes(seed: u64, len: usize) -> Arc<Vec<u8>> {
    let mut rng = SplitMix64(seed);
    let mut v = Vec::with_capacity(len);
    rng.fill(&mut v, len);
    Arc::new(v)
}

/// Panics with the first differing offset if `got` is not `want`.
fn assert_same(got: &[u8], want: &[u8], offset: usize, what: &str) {
    if got != want {
        let i = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        panic!(
            "{what}: stream differs at byte {} (got {:?}, want {:?}; lengths {} and {})",
            offset + i,
            got.get(i),
            want.get(i),
            got.len(),
            want.len()
        );
    }
}

/// A connection under test, its peer, and what the peer must receive.
struct Harness {
    poll: Poll,
    events: Events,
    conn: Conn<()>,
    peer: std::net::TcpStream,
    /// Everything queued so far, in the order it must arrive.
    expected: Vec<u8>,
    /// How many bytes of `expected` the peer has read (each checked as it arrives).
    received: usize,
    /// Filler for `out()` bytes.
    rng: SplitMix64,
    deadline: Instant,
    /// Flushes that returned with bytes still pending (the socket said `WouldBlock`).
    blocked_flushes: usize,
    /// Flushes that compacted `wbuf` while mapped segments were still queued.
    compactions: usize,
    /// Flushes that compacted while a segment sat strictly after `wpos` (so `at` moved to a
    /// non-zero offset).
    compactions_past_wpos: usize,
}

impl Harness {
    fn new(seed: u64) -> Harness {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = TcpStream::connect(addr).unwrap();
        // On loopback the handshake is done once `accept` returns.
        let (peer, _) = listener.accept().unwrap();
        peer.set_nonblocking(true).unwrap();
        let poll = Poll::new().unwrap();
        let id = ConnId {
            key: 3,
            generation: 1,
        };
        let conn = Conn::new(poll.registry(), stream, TOKEN, id, 1 << 20, ()).unwrap();
        Harness {
            poll,
            events: Events::with_capacity(16),
            conn,
            peer,
            expected: Vec::new(),
            received: 0,
            rng: SplitMix64(seed ^ 0x5EED),
            deadline: Instant::now() + DEADLINE,
            blocked_flushes: 0,
            compactions: 0,
            compactions_past_wpos: 0,
        }
    }

    fn check_deadline(&self, what: &str) {
        assert!(
            Instant::now() < self.deadline,
            "{what}: timed out with {} of {} bytes received, {} pending",
            self.received,
            self.expected.len(),
            self.conn.pending_write()
        );
    }

    /// Appends `len` fresh bytes to the send buffer, as an encoder would.
    fn bytes(&mut self, len: usize) {
        let before = self.conn.pending_write();
        let start = self.expected.len();
        self.rng.fill(&mut self.expected, len);
        self.conn
            .out()
            .extend_from_slice(&self.expected[start..start + len]);
        assert_eq!(self.conn.pending_write(), before + len);
    }

    /// Queues `data[range]` as a mapped slice.
    fn mapped(&mut self, data: &Arc<Vec<u8>>, range: Range<usize>) {
        let before = self.conn.pending_write();
        let segs = self.conn.mapped.len();
        let len = range.len();
        self.expected.extend_from_slice(&data[range.clone()]);
        self.conn.queue_mapped(Box::new(TestSlice {
            data: Arc::clone(data),
            range,
        }));
        assert_eq!(self.conn.pending_write(), before + len);
        // An empty slice is dropped, not queued.
        assert_eq!(self.conn.mapped.len(), segs + usize::from(len > 0));
    }

    /// Bytes the connection has handed to the socket.
    fn written(&self) -> usize {
        self.expected.len() - self.conn.pending_write()
    }

    fn flush(&mut self) {
        let wbuf_before = self.conn.wbuf.len();
        self.conn.flush(self.poll.registry()).unwrap();
        let c = &self.conn;
        if !c.mapped.is_empty() && c.wbuf.len() < wbuf_before {
            self.compactions += 1;
            if c.mapped.iter().any(|s| s.at > 0) {
                self.compactions_past_wpos += 1;
            }
        }
        if c.pending_write() > 0 {
            self.blocked_flushes += 1;
        }
        assert_eq!(
            c.writable_registered,
            c.pending_write() > 0,
            "WRITABLE interest must be held exactly while bytes are pending"
        );
        if c.pending_write() == 0 {
            assert!(c.mapped.is_empty() && c.wbuf.is_empty() && c.wpos == 0);
        }
        self.check_state();
    }

    /// The connection's bookkeeping agrees with itself and with what was queued.
    fn check_state(&self) {
        let c = &self.conn;
        assert!(c.wpos <= c.wbuf.len());
        let mut prev = c.wpos;
        let mut seg_pending = 0;
        for (i, seg) in c.mapped.iter().enumerate() {
            let len = seg.data.bytes().len();
            assert!(
                seg.at >= prev && seg.at <= c.wbuf.len(),
                "segment {i} at {} out of order (wpos {}, previous {prev}, wbuf {})",
                seg.at,
                c.wpos,
                c.wbuf.len()
            );
            assert!(seg.sent < len, "a finished segment stays queued");
            if seg.sent > 0 {
                assert!(
                    i == 0 && seg.at == c.wpos,
                    "only the front can be partly sent"
                );
            }
            seg_pending += len - seg.sent;
            prev = seg.at;
        }
        assert_eq!(c.mapped_pending, seg_pending);
        assert_eq!(c.pending_write(), c.wbuf.len() - c.wpos + seg_pending);
        let written = self.written();
        assert!(
            self.received <= written,
            "the peer got {} bytes but only {written} were written",
            self.received
        );
        // The bytes still queued, in the order the connection will send them, are exactly
        // the rest of the expected stream (checked in full while small, else a prefix).
        let limit = 256 * 1024;
        let mut unsent = Vec::new();
        let mut pos = c.wpos;
        for seg in &c.mapped {
            if unsent.len() >= limit {
                break;
            }
            unsent.extend_from_slice(&c.wbuf[pos..seg.at]);
            unsent.extend_from_slice(&seg.data.bytes()[seg.sent..]);
            pos = seg.at;
        }
        unsent.extend_from_slice(&c.wbuf[pos..]);
        let n = unsent.len().min(limit);
        assert_same(
            &unsent[..n],
            &self.expected[written..written + n],
            written,
            "queued bytes",
        );
    }

    /// The most bytes the first `MAX_IOVECS` buffers of the unsent stream hold: the bound on
    /// one `write_some`.
    fn iovec_limit(&self) -> usize {
        let c = &self.conn;
        let mut bufs = Vec::new();
        let mut pos = c.wpos;
        for seg in &c.mapped {
            bufs.push(seg.at - pos);
            bufs.push(seg.data.bytes().len() - seg.sent);
            pos = seg.at;
        }
        bufs.push(c.wbuf.len() - pos);
        bufs.into_iter()
            .filter(|&len| len > 0)
            .take(MAX_IOVECS)
            .sum()
    }

    /// Reads at most `max` bytes that have arrived, without waiting; returns how many.
    fn read(&mut self, max: usize) -> usize {
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0;
        while total < max {
            let want = (max - total).min(buf.len());
            match self.peer.read(&mut buf[..want]) {
                Ok(0) => panic!("unexpected EOF after {} bytes", self.received),
                Ok(n) => {
                    let at = self.received;
                    assert!(
                        at + n <= self.written(),
                        "received {} bytes, more than the {} written",
                        at + n,
                        self.written()
                    );
                    assert_same(&buf[..n], &self.expected[at..at + n], at, "received bytes");
                    self.received += n;
                    total += n;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => panic!("read failed: {e}"),
            }
        }
        total
    }

    /// Waits up to `timeout` for events; true if the connection became writable.
    fn poll_writable(&mut self, timeout: Duration) -> bool {
        self.poll.poll(&mut self.events, Some(timeout)).unwrap();
        self.events
            .iter()
            .any(|e| e.token() == TOKEN && e.is_writable())
    }

    /// Sends and receives everything queued, then checks that nothing more arrives.
    fn finish(&mut self, chunk: usize) {
        self.drain(chunk);
        self.expect_eof();
    }

    /// Sends and receives everything queued, flushing only on `WRITABLE` events after the
    /// first flush (as a reactor would), reading at most `chunk` bytes between polls.
    fn drain(&mut self, chunk: usize) {
        self.flush();
        while self.received < self.expected.len() || self.conn.pending_write() > 0 {
            self.check_deadline("finish");
            // Wait for the socket only when the peer has nothing more to read right now.
            let wait = if self.read(chunk) == chunk { 0 } else { 5 };
            if self.poll_writable(Duration::from_millis(wait)) {
                self.flush();
            }
        }
        assert_eq!(self.received, self.expected.len());
    }

    /// Closes the sending side and checks that the peer sees the end right after the
    /// expected bytes, with nothing extra.
    fn expect_eof(&mut self) {
        assert_eq!(self.conn.pending_write(), 0);
        self.conn.stream.shutdown(Shutdown::Write).unwrap();
        self.peer.set_nonblocking(false).unwrap();
        self.peer
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 16];
        match self.peer.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!("{n} unexpected bytes after the expected stream"),
            Err(e) => panic!("no EOF after the expected stream: {e}"),
        }
    }

    /// Queues `data[range]` in slices of `piece` bytes until a flush leaves bytes pending,
    /// so the socket's buffers are known to be full whatever their size.
    fn fill_until_blocked(&mut self, data: &Arc<Vec<u8>>, piece: usize) {
        let mut queued = 0;
        loop {
            self.check_deadline("fill_until_blocked");
            let start = self.rng.below(data.len() - piece);
            self.bytes(13);
            self.mapped(data, start..start + piece);
            queued += piece;
            self.flush();
            if self.conn.pending_write() > 0 {
                return;
            }
            assert!(queued < 256 * MIB, "the socket never filled up");
        }
    }
}

#[test]
fn only_buffered_bytes() {
    let mut h = Harness::new(1);
    for len in [1, 4, 100, 0, 5000, 13] {
        h.bytes(len);
    }
    h.flush();
    assert!(h.conn.mapped.is_empty());
    h.bytes(70_000);
    h.bytes(3);
    h.finish(usize::MAX);
}

#[test]
fn only_mapped_slices() {
    let a = random_bytes(10, 300_000);
    let b = random_bytes(11, 1000);
    let mut h = Harness::new(2);
    h.mapped(&a, 0..100);
    h.mapped(&b, 0..1000);
    h.mapped(&a, 50..250_000); // overlaps the first slice of `a`
    h.mapped(&b, 999..1000);
    assert!(h.conn.wbuf.is_empty());
    assert_eq!(h.conn.mapped.len(), 4);
    h.drain(usize::MAX);
    // More after everything was sent and the buffers were reset.
    h.mapped(&a, 7..8);
    h.mapped(&a, 1000..2000);
    h.finish(usize::MAX);
}

#[test]
fn interleaved_frames_and_slices() {
    let a = random_bytes(20, 100_000);
    let b = random_bytes(21, 5000);
    let mut h = Harness::new(3);
    // A slice before any buffered byte, and an empty slice, which is ignored.
    h.mapped(&a, 0..0);
    h.mapped(&a, 10..20);
    h.bytes(9);
    h.mapped(&b, 0..4096);
    h.bytes(9);
    // Several slices in a row with no bytes between them, one of them empty.
    h.mapped(&a, 1000..1500);
    h.mapped(&b, 5..6);
    h.mapped(&b, 6..6);
    h.mapped(&a, 0..60_000);
    h.mapped(&a, 60_000..100_000);
    h.bytes(1);
    h.mapped(&b, 0..0);
    h.bytes(30);
    h.flush();
    // Queue more on top of whatever is still pending, ending with a slice.
    h.bytes(2);
    h.mapped(&b, 100..200);
    h.mapped(&b, 0..5000);
    h.drain(usize::MAX);
    // And ending with bytes after the last slice, starting with a slice on a fresh buffer.
    h.mapped(&b, 1..2);
    h.bytes(5);
    h.mapped(&b, 2..3);
    h.bytes(5);
    h.finish(usize::MAX);
}

/// Drives `write_some`/`advance` by hand until everything is written; returns the number of
/// `write` calls that took bytes.
fn write_by_hand(h: &mut Harness) -> usize {
    let mut rounds = 0;
    while h.conn.pending_write() > 0 {
        h.check_deadline("write_by_hand");
        let limit = h.iovec_limit();
        match h.conn.write_some() {
            Ok(n) => {
                assert!(
                    n > 0 && n <= limit,
                    "wrote {n} bytes, over {limit} in 64 buffers"
                );
                h.conn.advance(n);
                rounds += 1;
                h.check_state();
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                h.read(usize::MAX);
            }
            Err(e) => panic!("write failed: {e}"),
        }
        h.read(usize::MAX);
    }
    rounds
}

#[test]
fn more_segments_than_iovecs() {
    let a = random_bytes(30, 20_000);

    // 100 slices in a row, then bytes: at most 64 slices go per writev, and the buffered
    // tail must wait for the last slice.
    let mut h = Harness::new(4);
    for i in 0..100 {
        h.mapped(&a, i * 7..i * 7 + 5);
    }
    h.bytes(50);
    let rounds = write_by_hand(&mut h);
    assert!(rounds >= 2, "100 slices took {rounds} writev calls");
    h.finish(usize::MAX);

    // A slice first (one iovec), then (bytes, slice) pairs: the first writev is cut at 63
    // iovecs, where the rest of `wbuf` (bytes before later slices) must not be appended.
    let mut h = Harness::new(5);
    h.mapped(&a, 0..10);
    for i in 0..40 {
        h.bytes(3 + i % 4);
        h.mapped(&a, 100 + i * 11..100 + i * 11 + 1 + i % 9);
    }
    h.bytes(17);
    let rounds = write_by_hand(&mut h);
    assert!(rounds >= 2, "81 buffers took {rounds} writev calls");
    h.finish(usize::MAX);

    // Exactly 32 (bytes, slice) pairs fill 64 iovecs; the tail goes in a second write.
    let mut h = Harness::new(6);
    for i in 0..32 {
        h.bytes(2);
        h.mapped(&a, i * 3..i * 3 + 2);
    }
    h.bytes(8);
    let rounds = write_by_hand(&mut h);
    assert!(rounds >= 2, "65 buffers took {rounds} writev calls");
    h.finish(usize::MAX);

    // At most 32 segments: the tail fits and may go in the same writev.
    let mut h = Harness::new(7);
    for i in 0..31 {
        h.bytes(2);
        h.mapped(&a, i * 3..i * 3 + 2);
    }
    h.bytes(8);
    write_by_hand(&mut h);
    h.finish(usize::MAX);

    // Many mixed runs through `flush`: hundreds of segments, some in a row, some between
    // bytes, with empty slices sprinkled in.
    let mut h = Harness::new(8);
    let mut rng = SplitMix64(8);
    for _ in 0..500 {
        match rng.below(4) {
            0 => h.bytes(rng.between(1, 40)),
            1 => h.mapped(&a, 0..0),
            _ => {
                let start = rng.below(a.len() - 300);
                h.mapped(&a, start..start + rng.between(1, 300));
            }
        }
    }
    h.finish(usize::MAX);
}

#[test]
fn large_slices_with_a_slow_reader() {
    let big = random_bytes(40, 6 * MIB);
    let mut h = Harness::new(9);
    let mut rng = SplitMix64(9);

    // Frames of 64 KiB of bytes, a 1 MiB slice, then a small slice between small byte runs,
    // queued until the socket is full. The write that fills it stops (nearly always) in the
    // second half of the last frame, so that flush compacts `wbuf` under the queued slices,
    // moving the later one to a non-zero `at`. If it does not, drain and fill again.
    let mut fills = 0;
    while h.compactions_past_wpos == 0 {
        h.check_deadline("fill");
        h.bytes(64 * 1024);
        let start = rng.below(big.len() - MIB);
        h.mapped(&big, start..start + MIB);
        h.bytes(16);
        h.mapped(&big, 100..1124);
        h.bytes(16);
        h.flush();
        if h.conn.pending_write() > 0 && h.compactions_past_wpos == 0 {
            fills += 1;
            assert!(fills < 20, "no flush ever compacted wbuf under a slice");
            h.drain(usize::MAX);
        }
    }
    assert!(h.conn.pending_write() > 0);

    // Read a little at a time, queueing more between flushes: frames around multi-MiB
    // slices, so partial writes stop inside slices and `wbuf` is compacted under them.
    for round in 0..40 {
        h.check_deadline("slow reader");
        h.read(256 * 1024);
        if round % 2 == 0 {
            h.bytes(rng.between(20, 4000));
            let len = rng.between(1, 3 * MIB);
            let start = rng.below(big.len() - len);
            h.mapped(&big, start..start + len);
            h.bytes(rng.between(1, 200));
            h.mapped(&big, 0..rng.between(0, 1000));
        }
        h.flush();
        h.poll_writable(Duration::from_millis(1));
    }
    h.finish(64 * 1024);
    assert!(
        h.blocked_flushes > 5,
        "only {} flushes met a full socket",
        h.blocked_flushes
    );
}

#[test]
fn pending_write_counts_down_to_zero_as_bytes_arrive() {
    let big = random_bytes(50, 4 * MIB);
    let mut h = Harness::new(10);
    assert_eq!(h.conn.pending_write(), 0);
    h.bytes(100);
    assert_eq!(h.conn.pending_write(), 100);
    h.mapped(&big, 0..MIB);
    assert_eq!(h.conn.pending_write(), 100 + MIB);
    h.mapped(&big, 5..5);
    assert_eq!(h.conn.pending_write(), 100 + MIB);
    h.bytes(7);
    h.mapped(&big, MIB..4 * MIB);
    h.bytes(1);
    let total = 108 + 4 * MIB;
    assert_eq!(h.conn.pending_write(), total);
    assert_eq!(h.expected.len(), total);
    h.fill_until_blocked(&big, MIB);
    let total = h.expected.len();

    // Drain slowly. The count only falls, never below what the peer has, and it reaches 0
    // no later than the last byte arrives.
    let mut last = h.conn.pending_write();
    assert!(last > 0);
    let mut zero_at = None;
    while h.received < total {
        h.check_deadline("drain");
        h.read(32 * 1024);
        if h.conn.pending_write() > 0 && h.poll_writable(Duration::from_millis(2)) {
            h.flush();
        }
        let now = h.conn.pending_write();
        assert!(now <= last, "pending_write grew from {last} to {now}");
        assert!(total - now >= h.received);
        if h.received == total {
            assert_eq!(now, 0, "all bytes arrived but {now} are still counted");
        }
        if now == 0 && zero_at.is_none() {
            zero_at = Some(h.received);
            assert!(!h.conn.writable_registered);
        }
        last = now;
    }
    // Once the count is 0 the rest arrives without another flush, and nothing more.
    assert!(zero_at.is_some());
    assert_eq!(h.received, total);
    assert_eq!(h.conn.pending_write(), 0);
    h.flush();
    assert_eq!(h.conn.pending_write(), 0);
    h.expect_eof();
}

#[test]
fn pending_write_with_buffered_bytes_only() {
    let mut h = Harness::new(11);
    h.bytes(3000);
    h.flush();
    assert_eq!(h.conn.pending_write(), 0);
    h.read(usize::MAX);
    h.bytes(10);
    h.bytes(0);
    assert_eq!(h.conn.pending_write(), 10);
    h.finish(usize::MAX);
    assert_eq!(h.conn.pending_write(), 0);
}

/// One random run: appends, mapped slices (single and in runs), flushes and small reads.
fn random_run(seed: u64) -> (usize, usize) {
    let mut rng = SplitMix64(seed);
    let shared = random_bytes(seed.wrapping_mul(31), 2 * MIB);
    let mut h = Harness::new(seed);
    for _ in 0..600 {
        h.check_deadline("random run");
        match rng.below(100) {
            0..=29 => {
                let len = match rng.below(20) {
                    0 => 0,
                    1 => rng.between(4096, 64 * 1024),
                    2..=5 => rng.between(64, 4096),
                    _ => rng.between(1, 64),
                };
                h.bytes(len);
            }
            30..=59 => {
                let len = match rng.below(20) {
                    0 => 0,
                    1 => rng.between(64 * 1024, MIB),
                    2..=7 => rng.between(1024, 64 * 1024),
                    _ => rng.between(1, 1024),
                };
                let start = rng.below(shared.len() - len + 1);
                h.mapped(&shared, start..start + len);
            }
            60..=64 => {
                // A run of slices, in a row or with tiny frames between them.
                let gaps = rng.below(2) == 0;
                for _ in 0..rng.between(2, 100) {
                    if gaps && rng.below(2) == 0 {
                        h.bytes(rng.between(1, 5));
                    }
                    let len = rng.between(0, 200);
                    let start = rng.below(shared.len() - len + 1);
                    h.mapped(&shared, start..start + len);
                }
            }
            65..=84 => h.flush(),
            85..=94 => {
                let max = rng.between(1, 32 * 1024);
                h.read(max);
            }
            _ => {
                if h.poll_writable(Duration::from_millis(0)) {
                    h.flush();
                }
            }
        }
    }
    h.finish(rng.between(1024, 256 * 1024));
    (h.blocked_flushes, h.compactions)
}

#[test]
fn random_interleavings() {
    let mut blocked = 0;
    let mut compactions = 0;
    for seed in [1, 2, 3, 0xDEAD_BEEF, 0x1234_5678_9ABC, 42] {
        let (b, c) = random_run(seed);
        blocked += b;
        compactions += c;
    }
    assert!(blocked > 0, "no random run filled the socket");
    assert!(
        compactions > 0,
        "no random run compacted wbuf under a slice"
    );
}
