//! Data directory benchmark (`cargo bench --bench wal`): the disk thread's group commit and
//! recovery time, on the disk the temporary directory lives on (`WAL_BENCH_DIR`, default the
//! target directory's tmp, which is on the real disk rather than a tmpfs).
//!
//! - `commit`: one producer appends ~4 KiB records as fast as the disk lets it, keeping at
//!   most `WAL_BENCH_WINDOW` records (default 128, like 128 connections with one change in
//!   flight each) sent but not yet reported durable; prints fsyncs/s (one `Durable` report
//!   per fsync), records per fsync, MiB/s and the latency from send to durable report.
//!   `WAL_BENCH_WINDOW=1` gives the cost of one write + fsync.
//! - `recovery`: writes `WAL_BENCH_RECORDS` small records (default 1,000,000, 64-byte
//!   payloads) and times `DataDir::open` reading them back.
//!
//! Pick parts by name: `cargo bench --bench wal -- commit`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use p2pshare::tracker::disk::{DataDir, DiskEvent, DiskHandle, DiskMsg, LogRecord, Ticket};

const WAIT: Duration = Duration::from_secs(120);

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn bench_dir() -> tempfile::TempDir {
    let base = std::env::var_os("WAL_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    std::fs::create_dir_all(&base).expect("create bench dir");
    tempfile::tempdir_in(base).expect("tempdir")
}

fn next_durable(disk: &DiskHandle) -> (u64, Ticket) {
    match disk.wait_event(WAIT) {
        Some(DiskEvent::Durable { seq, ticket }) => (seq, ticket),
        Some(DiskEvent::Failed(e)) => panic!("disk failed: {e}"),
        Some(other) => panic!("unexpected {other:?}"),
        None => panic!("no durability report within {WAIT:?}"),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn commit() {
    let window = knob("WAL_BENCH_WINDOW", 128).max(1);
    let secs = knob("WAL_BENCH_SECS", 5);
    let record_len = knob("WAL_BENCH_RECORD", 4096) as usize;
    let tmp = bench_dir();
    let (data, _) = DataDir::open(&tmp.path().join("data")).expect("open");
    let mut disk = data.start(Box::new(|| {})).expect("start");
    let payload = vec![0x5a; record_len];
    // Send times of the records not yet durable, oldest first (ticket = seq here).
    let mut in_flight = std::collections::VecDeque::new();
    let mut latencies = Vec::new();
    let mut seq = 0u64;
    let mut fsyncs = 0u64;
    let mut durable_records = 0u64;
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    while Instant::now() < end {
        while (in_flight.len() as u64) < window {
            seq += 1;
            disk.send(DiskMsg::Append(LogRecord {
                first_seq: seq,
                last_seq: seq,
                payload: payload.clone(),
            }))
            .expect("send");
            in_flight.push_back(Instant::now());
        }
        let (_, ticket) = next_durable(&disk);
        fsyncs += 1;
        let now = Instant::now();
        let covered = ticket.0 - durable_records;
        for _ in 0..covered {
            let sent = in_flight.pop_front().expect("durable beyond what was sent");
            latencies.push(now - sent);
        }
        durable_records = ticket.0;
    }
    let elapsed = start.elapsed().as_secs_f64();
    disk.close();
    latencies.sort_unstable();
    println!(
        "commit: {record_len}-byte records, window {window}: {:.0} fsyncs/s, {:.1} records per \
         fsync, {:.0} records/s, {:.1} MiB/s; latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        fsyncs as f64 / elapsed,
        durable_records as f64 / fsyncs.max(1) as f64,
        durable_records as f64 / elapsed,
        durable_records as f64 * record_len as f64 / elapsed / (1 << 20) as f64,
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
}

fn recovery() {
    let n = knob("WAL_BENCH_RECORDS", 1_000_000);
    let tmp = bench_dir();
    let dir = tmp.path().join("data");
    let (data, _) = DataDir::open(&dir).expect("open");
    let mut disk = data.start(Box::new(|| {})).expect("start");
    let payload = vec![0x33; 64];
    let t = Instant::now();
    let mut last = Ticket(0);
    let mut durable = Ticket(0);
    for seq in 1..=n {
        last = disk
            .send(DiskMsg::Append(LogRecord {
                first_seq: seq,
                last_seq: seq,
                payload: payload.clone(),
            }))
            .expect("send");
        // Keep the queue (and memory) bounded while writing.
        if seq % 100_000 == 0 {
            while durable < last {
                durable = next_durable(&disk).1;
            }
        }
    }
    while durable < last {
        durable = next_durable(&disk).1;
    }
    disk.close();
    let written = t.elapsed();
    let bytes: u64 = std::fs::read_dir(&dir)
        .expect("list")
        .map(|e| e.expect("entry").metadata().expect("metadata").len())
        .sum();
    // Twice: the first read may come from the disk, the second from the page cache.
    for round in 1..=2 {
        let t = Instant::now();
        let (data, recovered) = DataDir::open(&dir).expect("reopen");
        let took = t.elapsed();
        assert_eq!(recovered.records.len() as u64, n);
        assert_eq!(recovered.last_seq, n);
        println!(
            "recovery (open {round}): {n} records, {:.1} MiB in {} segments: {:.3} s \
             ({:.2} M records/s; written in {:.2} s)",
            bytes as f64 / (1 << 20) as f64,
            std::fs::read_dir(&dir).expect("list").count() - 1,
            took.as_secs_f64(),
            n as f64 / took.as_secs_f64() / 1e6,
            written.as_secs_f64(),
        );
        drop(recovered);
        drop(data);
    }
}

fn main() {
    // `cargo bench` passes `--bench`; other free arguments pick the parts.
    let picked: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wants = |name: &str| picked.is_empty() || picked.iter().any(|p| p == name);
    if wants("commit") {
        commit();
    }
    if wants("recovery") {
        recovery();
    }
}
