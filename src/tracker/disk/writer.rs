//! The disk thread: owns the open log segment, writes what the reactor sends it, and reports
//! back when it is durable. Group commit: it takes every message already queued, writes them
//! all, then does ONE `fdatasync` and reports one [`DiskEvent::Durable`] covering them, so
//! the number of fsyncs follows the disk's speed, not the number of appends.
//!
//! Snapshots are written by a second thread (the snapshot thread: temp file, fsync, rename,
//! directory fsync), so a large snapshot never holds appends up; the disk thread compacts the
//! log once it hears the snapshot is durable. The one exception is a snapshot past the last
//! appended seq (a state installed from elsewhere): the records that follow it are useless
//! without it, so the disk thread writes it itself before anything after it.
//!
//! Must not: report anything durable that was not fsync'd; go on after an IO error (it
//! reports [`DiskEvent::Failed`] and stops); rewrite a byte of a closed segment.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::{debug, info, warn};

use super::format::{self, MAX_PAYLOAD_LEN, MAX_RECORD_LEN, SEGMENT_HEADER_LEN};
use super::{io_err, segment_name, snapshot_name, sync_dir, DiskError, DiskOptions, LogRecord};

/// How many recent record boundaries the disk thread remembers to check that a truncation
/// falls between two records (truncations only ever reach back about one batch).
pub(crate) const TAIL_BOUNDS: usize = 65_536;
/// Bytes written in one group commit before the fsync, at most: under a flood, the batch is
/// cut here so the first writer in it does not wait for an unbounded amount of IO.
const MAX_BATCH_BYTES: usize = 32 << 20;
/// Buffered bytes are written to the file once they exceed this.
const WRITE_CHUNK: usize = 1 << 20;

/// What the reactor asks of the disk thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskMsg {
    /// Write this record now, fsync it with the rest of the batch. `first_seq` must be the
    /// last appended (or truncated-to, or jumped-to) seq + 1.
    Append(LogRecord),
    /// Every record written earlier whose `first_seq >= seq` is void. Written as a marker
    /// record, applied on recovery. `seq` must fall on a record boundary and above the newest
    /// snapshot.
    TruncateFrom(u64),
    /// Replaces the durable metadata blob (a record in the log; each new segment starts with
    /// the current one, so compaction never loses it).
    SetMeta(Vec<u8>),
    /// The state after entry `seq`: written as `snap-<seq>.snap`; once durable the log behind
    /// the previous snapshot is dropped (the two newest snapshots are kept, so a damaged
    /// newest one is survivable).
    Snapshot(u64, Vec<u8>),
    /// The state after entry `seq` was taken from another tracker: every record holding an
    /// entry past `seq` is void (a truncation marker), the snapshot is written (and fsync'd)
    /// before anything after it, and the log goes on from `seq + 1`. Durable, like an
    /// append, with the group commit that covers it. `seq` must not be below the newest
    /// snapshot, and the first void record must start above it.
    Install(u64, Vec<u8>),
}

/// Names a message sent to the disk thread; tickets grow by one per message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ticket(pub u64);

/// What the disk thread reports back.
#[derive(Debug)]
pub enum DiskEvent {
    /// Every `Append`, `TruncateFrom` and `SetMeta` with a ticket up to `ticket` is durable;
    /// the log ends at `seq` (the highest seq appended, after truncations).
    Durable { seq: u64, ticket: Ticket },
    /// The snapshot of `seq` is durable and the log behind the previous one is being dropped.
    Snapshotted { seq: u64 },
    /// The disk failed (ENOSPC, EIO...) or was misused: nothing more will be made durable.
    Failed(DiskError),
}

enum Inbox {
    Msg(Ticket, DiskMsg),
    SnapshotWritten {
        seq: u64,
        result: Result<(), DiskError>,
    },
    Close,
}

enum Job {
    Write { seq: u64, state: Vec<u8> },
    Delete(Vec<PathBuf>),
}

pub(crate) struct Segment {
    pub no: u64,
    pub path: PathBuf,
    /// The highest `last_seq` of an entries record in it (0 if none): once a snapshot covers
    /// it, the segment is not needed.
    pub max_seq: u64,
}

/// The log as recovery leaves it and the disk thread keeps it.
pub(crate) struct LogState {
    pub dir: PathBuf,
    pub options: DiskOptions,
    /// Oldest first; the last one is open for appending.
    pub segments: Vec<Segment>,
    pub file: File,
    pub seg_len: u64,
    pub last_seq: u64,
    pub meta: Option<Vec<u8>>,
    /// Seqs of the snapshot files believed valid, ascending.
    pub snapshots: Vec<u64>,
    /// Snapshot files that failed their checks at recovery (deleted once superseded).
    pub bad_snapshots: Vec<(u64, PathBuf)>,
    /// (first_seq, last_seq) of the most recent records, oldest first.
    pub tail_bounds: VecDeque<(u64, u64)>,
    /// Whether records older than those in `tail_bounds` exist after the newest snapshot.
    pub bounds_dropped: bool,
}

/// Creates segment `no` atomically (written as a `.tmp`, fsync'd, renamed, directory
/// fsync'd), starting with its header and the current meta record; returns it open for
/// appending with its length.
pub(crate) fn create_segment(
    dir: &Path,
    no: u64,
    meta: Option<&[u8]>,
) -> Result<(Segment, File, u64), DiskError> {
    let path = dir.join(segment_name(no));
    let tmp = dir.join(format!("{}.tmp", segment_name(no)));
    let mut bytes = Vec::new();
    format::emit_segment_header(no, &mut bytes);
    if let Some(m) = meta {
        format::emit_meta(m, &mut bytes);
    }
    let mut file = File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp, "create a log segment"))?;
    file.write_all(&bytes)
        .and_then(|()| file.sync_all())
        .map_err(io_err(&tmp, "write a log segment header"))?;
    fs::rename(&tmp, &path).map_err(io_err(&path, "rename a new log segment into place"))?;
    sync_dir(dir)?;
    debug!("data dir: started segment {}", path.display());
    Ok((
        Segment {
            no,
            path,
            max_seq: 0,
        },
        file,
        bytes.len() as u64,
    ))
}

/// Writes `snap-<seq>.snap` atomically: temp file, fsync, rename, directory fsync.
pub(crate) fn write_snapshot(dir: &Path, seq: u64, state: &[u8]) -> Result<(), DiskError> {
    let path = dir.join(snapshot_name(seq));
    let tmp = dir.join(format!("{}.tmp", snapshot_name(seq)));
    let header = format::snapshot_header(seq, state.len());
    let trailer = format::snapshot_trailer(&header, state);
    let mut file = File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp, "create a snapshot"))?;
    file.write_all(&header)
        .and_then(|()| file.write_all(state))
        .and_then(|()| file.write_all(&trailer))
        .and_then(|()| file.sync_all())
        .map_err(io_err(&tmp, "write a snapshot"))?;
    drop(file);
    fs::rename(&tmp, &path).map_err(io_err(&path, "rename a snapshot into place"))?;
    sync_dir(dir)?;
    info!(
        "data dir: wrote snapshot {} ({} bytes)",
        path.display(),
        state.len()
    );
    Ok(())
}

/// The reactor's end of the disk thread.
pub struct DiskHandle {
    tx: Sender<Inbox>,
    events: Receiver<DiskEvent>,
    next_ticket: u64,
    queued: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl DiskHandle {
    /// Queues a message for the disk thread; never blocks. The answer comes as events.
    pub fn send(&mut self, msg: DiskMsg) -> Result<Ticket, DiskError> {
        let size = match &msg {
            DiskMsg::Append(r) => r.payload.len(),
            DiskMsg::SetMeta(m) => m.len(),
            DiskMsg::Snapshot(_, s) | DiskMsg::Install(_, s) => s.len(),
            DiskMsg::TruncateFrom(_) => 0,
        } as u64;
        let ticket = Ticket(self.next_ticket);
        self.queued.fetch_add(size, Ordering::Relaxed);
        self.tx
            .send(Inbox::Msg(ticket, msg))
            .map_err(|_| DiskError::Stopped)?;
        self.next_ticket += 1;
        Ok(ticket)
    }

    /// The next event, if one is waiting (call after every wake until `None`).
    pub fn try_event(&self) -> Option<DiskEvent> {
        self.events.try_recv().ok()
    }

    /// Waits up to `timeout` for the next event (for tests and benchmarks, not the reactor).
    pub fn wait_event(&self, timeout: Duration) -> Option<DiskEvent> {
        self.events.recv_timeout(timeout).ok()
    }

    /// Payload bytes sent and not yet written: the caller's measure for back-pressure (the
    /// queue itself is unbounded, so the caller bounds what it keeps in flight).
    pub fn queued_bytes(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }

    /// Makes everything sent so far durable, stops both threads and releases the lock.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let _ = self.tx.send(Inbox::Close);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for DiskHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

pub(crate) fn start(
    dir: PathBuf,
    lock: File,
    log: LogState,
    wake: Box<dyn Fn() + Send>,
) -> Result<DiskHandle, DiskError> {
    let (tx, rx) = mpsc::channel();
    let (event_tx, events) = mpsc::channel();
    let queued = Arc::new(AtomicU64::new(0));
    let self_tx = tx.clone();
    let q = queued.clone();
    let thread = thread::Builder::new()
        .name("disk".into())
        .spawn(move || {
            disk_thread(log, rx, self_tx, event_tx, wake, q);
            // Held until both threads are done with the directory.
            drop(lock);
        })
        .map_err(io_err(&dir, "start the disk thread"))?;
    Ok(DiskHandle {
        tx,
        events,
        next_ticket: 1,
        queued,
        thread: Some(thread),
    })
}

fn disk_thread(
    log: LogState,
    rx: Receiver<Inbox>,
    self_tx: Sender<Inbox>,
    events: Sender<DiskEvent>,
    wake: Box<dyn Fn() + Send>,
    queued: Arc<AtomicU64>,
) {
    let (job_tx, job_rx) = mpsc::channel();
    let dir = log.dir.clone();
    let worker = thread::Builder::new()
        .name("snapshot".into())
        .spawn(move || snapshot_thread(&dir, job_rx, self_tx));
    let worker = match worker {
        Ok(w) => w,
        Err(e) => {
            let _ = events.send(DiskEvent::Failed(io_err(
                &log.dir,
                "start the snapshot thread",
            )(e)));
            wake();
            return;
        }
    };
    let bounds_dropped = log.bounds_dropped;
    let mut writer = Writer {
        log,
        buf: Vec::new(),
        dirty: false,
        batch_bytes: 0,
        jobs: job_tx,
        in_flight: None,
        queued_snapshot: None,
        snapshots_done: Vec::new(),
        queued,
        bounds_dropped,
    };
    if let Err(e) = writer.serve(&rx, &events, &*wake) {
        warn!("data dir: disk thread stopped: {e}");
        let _ = events.send(DiskEvent::Failed(e));
        wake();
    }
    drop(writer);
    let _ = worker.join();
}

fn snapshot_thread(dir: &Path, jobs: Receiver<Job>, disk: Sender<Inbox>) {
    for job in jobs {
        match job {
            Job::Write { seq, state } => {
                let result = write_snapshot(dir, seq, &state);
                if disk.send(Inbox::SnapshotWritten { seq, result }).is_err() {
                    return;
                }
            }
            Job::Delete(paths) => {
                // Oldest first, the directory fsync'd after each, so that a crash in the
                // middle leaves a prefix removed, never a hole in the segment numbers.
                for path in paths {
                    let removed = fs::remove_file(&path).map_err(io_err(&path, "remove"));
                    if let Err(e) = removed.and_then(|()| sync_dir(dir)) {
                        warn!("data dir: compaction stopped: {e}");
                        break;
                    }
                    debug!("data dir: removed {}", path.display());
                }
            }
        }
    }
}

struct Writer {
    log: LogState,
    /// Encoded records not yet written to the file.
    buf: Vec<u8>,
    /// Written since the last fsync.
    dirty: bool,
    batch_bytes: usize,
    jobs: Sender<Job>,
    /// The snapshot the snapshot thread is writing.
    in_flight: Option<u64>,
    /// The next snapshot to write once it is done (a newer one replaces it).
    queued_snapshot: Option<(u64, Vec<u8>)>,
    snapshots_done: Vec<u64>,
    queued: Arc<AtomicU64>,
    /// Whether older boundaries than `tail_bounds` holds were forgotten.
    bounds_dropped: bool,
}

impl Writer {
    fn serve(
        &mut self,
        rx: &Receiver<Inbox>,
        events: &Sender<DiskEvent>,
        wake: &dyn Fn(),
    ) -> Result<(), DiskError> {
        loop {
            let Ok(first) = rx.recv() else {
                return self.sync();
            };
            let mut closing = false;
            let mut covered = None;
            let mut next = Some(first);
            self.batch_bytes = 0;
            while let Some(item) = next.take() {
                match item {
                    Inbox::Msg(ticket, msg) => {
                        self.handle(msg)?;
                        covered = Some(ticket);
                    }
                    Inbox::SnapshotWritten { seq, result } => {
                        result?;
                        self.snapshots_done.push(seq);
                    }
                    Inbox::Close => closing = true,
                }
                if !closing && self.batch_bytes < MAX_BATCH_BYTES {
                    next = rx.try_recv().ok();
                }
            }
            // One fsync for everything taken above: the group commit.
            self.sync()?;
            let mut told = false;
            if let Some(ticket) = covered {
                let _ = events.send(DiskEvent::Durable {
                    seq: self.log.last_seq,
                    ticket,
                });
                told = true;
            }
            for seq in std::mem::take(&mut self.snapshots_done) {
                self.compact(seq);
                let _ = events.send(DiskEvent::Snapshotted { seq });
                told = true;
            }
            self.start_queued_snapshot();
            if told {
                wake();
            }
            if closing {
                // A snapshot still waiting for its turn is written now rather than lost.
                if let Some((seq, state)) = self.queued_snapshot.take() {
                    write_snapshot(&self.log.dir, seq, &state)?;
                }
                return Ok(());
            }
        }
    }

    fn handle(&mut self, msg: DiskMsg) -> Result<(), DiskError> {
        match msg {
            DiskMsg::Append(rec) => {
                self.queued
                    .fetch_sub(rec.payload.len() as u64, Ordering::Relaxed);
                if rec.first_seq != self.log.last_seq + 1 || rec.last_seq < rec.first_seq {
                    return Err(DiskError::Misuse(format!(
                        "append of seqs {}..={} after seq {}",
                        rec.first_seq, rec.last_seq, self.log.last_seq
                    )));
                }
                if rec.payload.len() > MAX_PAYLOAD_LEN {
                    return Err(DiskError::Misuse(format!(
                        "record of {} bytes (at most {MAX_PAYLOAD_LEN})",
                        rec.payload.len()
                    )));
                }
                let len = format::entries_record_len(rec.payload.len());
                self.make_room(len)?;
                format::emit_entries(rec.first_seq, rec.last_seq, &rec.payload, &mut self.buf);
                self.wrote(len)?;
                if let Some(seg) = self.log.segments.last_mut() {
                    seg.max_seq = seg.max_seq.max(rec.last_seq);
                }
                self.log.last_seq = rec.last_seq;
                if self.log.tail_bounds.len() == TAIL_BOUNDS {
                    self.log.tail_bounds.pop_front();
                    self.bounds_dropped = true;
                }
                self.log
                    .tail_bounds
                    .push_back((rec.first_seq, rec.last_seq));
            }
            DiskMsg::TruncateFrom(seq) => {
                let floor = self.newest_snapshot();
                if seq == 0 || seq <= floor {
                    return Err(DiskError::Misuse(format!(
                        "truncation from seq {seq}, at or below the snapshot of seq {floor}"
                    )));
                }
                if seq > self.log.last_seq {
                    return Ok(());
                }
                while self.log.tail_bounds.back().is_some_and(|b| b.0 >= seq) {
                    self.log.tail_bounds.pop_back();
                }
                let splits = self.log.tail_bounds.back().is_some_and(|b| b.1 >= seq);
                if splits || (self.log.tail_bounds.is_empty() && self.bounds_dropped) {
                    return Err(DiskError::Misuse(format!(
                        "truncation from seq {seq} does not fall between two records"
                    )));
                }
                let mut rec = Vec::new();
                format::emit_truncate(seq, &mut rec);
                self.make_room(rec.len())?;
                self.buf.extend_from_slice(&rec);
                self.wrote(rec.len())?;
                self.log.last_seq = seq - 1;
            }
            DiskMsg::SetMeta(blob) => {
                self.queued.fetch_sub(blob.len() as u64, Ordering::Relaxed);
                if blob.len() >= MAX_RECORD_LEN {
                    return Err(DiskError::Misuse(format!("meta of {} bytes", blob.len())));
                }
                let before = self.buf.len();
                format::emit_meta(&blob, &mut self.buf);
                let len = self.buf.len() - before;
                // Rolling writes the meta at the new segment's start: take the record out of
                // the buffer first, roll, then put it back.
                let rec = self.buf.split_off(before);
                self.make_room(len)?;
                self.buf.extend_from_slice(&rec);
                self.wrote(len)?;
                self.log.meta = Some(blob);
            }
            DiskMsg::Snapshot(seq, state) => {
                self.queued.fetch_sub(state.len() as u64, Ordering::Relaxed);
                if seq <= self.newest_snapshot() {
                    debug!("data dir: snapshot of seq {seq} is not newer; ignored");
                    return Ok(());
                }
                if seq > self.log.last_seq {
                    // A state installed from elsewhere: it must be durable before the records
                    // that follow it are written, or a crash would leave a hole in the log.
                    self.sync()?;
                    write_snapshot(&self.log.dir, seq, &state)?;
                    self.log.last_seq = seq;
                    self.log.tail_bounds.clear();
                    self.bounds_dropped = false;
                    self.queued_snapshot = None;
                    self.snapshots_done.push(seq);
                } else if self.in_flight.is_some() {
                    self.queued_snapshot = Some((seq, state));
                } else {
                    self.send_job(seq, state);
                }
            }
            DiskMsg::Install(seq, state) => {
                self.queued.fetch_sub(state.len() as u64, Ordering::Relaxed);
                let newest = self.newest_snapshot();
                if seq < newest {
                    return Err(DiskError::Misuse(format!(
                        "install of the state after seq {seq}, below the snapshot of seq {newest}"
                    )));
                }
                if self.log.last_seq > seq {
                    // Records past `seq` belong to a history the service did not keep.
                    let from = self
                        .log
                        .tail_bounds
                        .iter()
                        .find(|b| b.1 > seq)
                        .map(|b| b.0)
                        .ok_or_else(|| {
                            DiskError::Misuse(format!(
                                "install after seq {seq}: the records past it are not known"
                            ))
                        })?;
                    self.handle(DiskMsg::TruncateFrom(from))?;
                }
                if seq > newest {
                    self.sync()?;
                    write_snapshot(&self.log.dir, seq, &state)?;
                    if self.queued_snapshot.as_ref().is_some_and(|q| q.0 <= seq) {
                        self.queued_snapshot = None;
                    }
                    self.snapshots_done.push(seq);
                }
                self.log.last_seq = seq;
                self.log.tail_bounds.clear();
                self.bounds_dropped = false;
            }
        }
        Ok(())
    }

    fn newest_snapshot(&self) -> u64 {
        let durable = self.log.snapshots.last().copied().unwrap_or(0);
        let pending = self.snapshots_done.iter().copied().max().unwrap_or(0);
        let queued = self.queued_snapshot.as_ref().map_or(0, |q| q.0);
        durable
            .max(pending)
            .max(queued)
            .max(self.in_flight.unwrap_or(0))
    }

    fn send_job(&mut self, seq: u64, state: Vec<u8>) {
        self.in_flight = Some(seq);
        // The snapshot thread only stops when this sender is dropped.
        let _ = self.jobs.send(Job::Write { seq, state });
    }

    fn start_queued_snapshot(&mut self) {
        if self.in_flight.is_none() {
            if let Some((seq, state)) = self.queued_snapshot.take() {
                self.send_job(seq, state);
            }
        }
    }

    /// Accounts for `len` bytes just added to `buf`, writing it out once it is large.
    fn wrote(&mut self, len: usize) -> Result<(), DiskError> {
        self.log.seg_len += len as u64;
        self.batch_bytes += len;
        if self.buf.len() >= WRITE_CHUNK {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        if !self.buf.is_empty() {
            let path = self.open_path();
            self.log
                .file
                .write_all(&self.buf)
                .map_err(io_err(&path, "append to the log"))?;
            self.buf.clear();
            self.dirty = true;
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<(), DiskError> {
        self.flush()?;
        if self.dirty {
            let path = self.open_path();
            self.log
                .file
                .sync_data()
                .map_err(io_err(&path, "fsync the log"))?;
            self.dirty = false;
        }
        Ok(())
    }

    fn open_path(&self) -> PathBuf {
        self.log
            .segments
            .last()
            .map_or_else(|| self.log.dir.clone(), |s| s.path.clone())
    }

    /// Starts a new segment if a record of `len` bytes would take the open one past the
    /// segment size (unless the open one holds nothing yet but its header: a record larger
    /// than a segment gets one of its own).
    fn make_room(&mut self, len: usize) -> Result<(), DiskError> {
        let used = self.log.seg_len;
        let fresh = used <= SEGMENT_HEADER_LEN as u64 + self.meta_record_len();
        if fresh || used + len as u64 <= self.log.options.segment_size {
            return Ok(());
        }
        // The closed segment must be complete on disk before the next one exists: recovery
        // treats damage in any segment but the last as corruption.
        self.sync()?;
        let no = self.log.segments.last().map_or(1, |s| s.no + 1);
        let (segment, file, seg_len) = create_segment(&self.log.dir, no, self.log.meta.as_deref())?;
        self.log.segments.push(segment);
        self.log.file = file;
        self.log.seg_len = seg_len;
        Ok(())
    }

    fn meta_record_len(&self) -> u64 {
        self.log
            .meta
            .as_ref()
            .map_or(0, |m| (format::RECORD_HEADER_LEN + 1 + m.len()) as u64)
    }

    /// The snapshot of `seq` is durable: keep it and the one before it, and drop the
    /// segments and snapshots that only the ones before those would need.
    fn compact(&mut self, seq: u64) {
        if self.in_flight == Some(seq) {
            self.in_flight = None;
        }
        let snaps = &mut self.log.snapshots;
        if let Err(at) = snaps.binary_search(&seq) {
            snaps.insert(at, seq);
        }
        if snaps.len() < 2 {
            return;
        }
        // Recovery may have to fall back to the second newest snapshot (if the newest were
        // damaged), so the log is kept from there on.
        let bound = snaps[snaps.len() - 2];
        let newest = snaps[snaps.len() - 1];
        let mut doomed = Vec::new();
        while self.log.segments.len() > 1 && self.log.segments[0].max_seq <= bound {
            doomed.push(self.log.segments.remove(0).path);
        }
        let dir = self.log.dir.clone();
        snaps.retain(|&s| {
            if s < bound {
                doomed.push(dir.join(snapshot_name(s)));
            }
            s >= bound
        });
        self.log.bad_snapshots.retain(|(s, path)| {
            if *s < newest {
                doomed.push(path.clone());
            }
            *s >= newest
        });
        if !doomed.is_empty() {
            let _ = self.jobs.send(Job::Delete(doomed));
        }
    }
}
