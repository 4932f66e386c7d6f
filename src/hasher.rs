//! The SHA1 worker pool: hashes files and downloaded pieces off the reactor thread.
//!
//! A file job maps the file, then splits into one task for the whole-file digest (inherently
//! sequential) and tasks of a few pieces each, which the workers take from one queue, so a
//! large file is hashed on every core at once. A piece job checks one downloaded piece, read
//! through its [`HashTicket`], against its expected digest; the verdict consumes the ticket
//! and goes back to the download. Every
//! result goes to the results channel and the owner's `mio::Waker` is woken; the reactor never
//! blocks on hashing. The workers that check downloaded pieces run at a lower CPU priority
//! ([`WORKER_NICE`]) so that hashing never keeps the reactor from the data it moves; files
//! being shared are hashed by workers of their own at the reactor's priority, since the user
//! waits for `upload_file` (the two groups have a queue each).
//!
//! # A download's whole-file digest
//!
//! A download's whole-file SHA1 is a [`FileStream`], owned by the pool's workers: the worker
//! that verifies the piece the digest needs next feeds it that piece at once, while the piece
//! is still in its cache, and then the following pieces already verified (by the other
//! workers, which meanwhile go on verifying), [`FEED_PIECES`] at a time with the rest queued
//! behind the other tasks. Nothing waits for the digest, and each piece is read from memory
//! about once although it is hashed twice. The worker that feeds the last piece sends the
//! digest.
//!
//! # Feeding a digest
//!
//! [`update_reading_ahead`] feeds bytes to a digest in steps of 4 KiB and, before hashing a step, reads
//! one byte of every cache line of the next step. The SHA-NI compression is latency-bound and
//! does not keep enough loads in flight to hide the memory latency by itself: on the
//! development VM, hashing a 1 GiB buffer ran at 1.20 GB/s plain and 1.67 GB/s with the
//! look-ahead reads, against 1.90 GB/s for data already in the cache.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;

use mio::Waker;
use sha1::{Digest, Sha1};

use crate::storage::{HashTicket, PartReader, SourceMap, Verdict};
use crate::wire::Sha1Digest;

/// Pieces per task: big enough to amortise the queue, small enough to balance the workers.
const PIECES_PER_TASK: usize = 16;
/// Most pieces one task feeds a whole-file digest (16 MiB, about 10 ms) before the rest is
/// queued behind the other tasks, so that a digest catching up on a long stretch (the first
/// piece verified last, say) does not hold a worker while pieces of other downloads wait.
const FEED_PIECES: u32 = 32;
/// Bytes fed to a digest at a time by [`update_reading_ahead`].
const STEP: usize = 4096;
/// Distance between the look-ahead reads: a cache line.
const CACHE_LINE: usize = 64;

/// Names a hashing job, so that its results find their way back: an upload's hashing, or the
/// piece checks and whole-file digest of a download (see `DownloadId::job`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobId(pub u64);

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "job {}", self.0)
    }
}

/// The digests of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileHashes {
    pub size: u64,
    pub file_sha1: Sha1Digest,
    pub piece_hashes: Vec<Sha1Digest>,
}

/// Why a file could not be hashed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashError {
    /// The file could not be opened or mapped.
    Read { path: PathBuf, reason: String },
}

impl std::fmt::Display for HashError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HashError::Read { path, reason } => {
                write!(f, "cannot read {}: {reason}", path.display())
            }
        }
    }
}

/// A finished job.
#[derive(Debug)]
pub struct HashDone {
    pub job: JobId,
    pub result: Result<FileHashes, HashError>,
}

/// A checked piece: its ticket was consumed by the verdict, which goes back to the writer.
pub struct PieceChecked {
    pub job: JobId,
    pub verdict: Verdict,
}

impl std::fmt::Debug for PieceChecked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PieceChecked(job {}, piece {}, ok {})",
            self.job,
            self.verdict.piece(),
            self.verdict.ok()
        )
    }
}

/// A downloaded file's whole-file digest, complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamDone {
    pub job: JobId,
    pub digest: Sha1Digest,
    /// Pieces fed to the digest by the worker that had just verified them.
    pub fed_hot: u32,
}

/// A download's whole-file digest, fed in order by the workers as they verify pieces (see the
/// module doc). The download's owner keeps an `Arc` to hand to [`HashPool::verify_piece`] and
/// calls [`FileStream::cancel`] when the download ends early.
pub struct FileStream {
    job: JobId,
    reader: PartReader,
    n_pieces: u32,
    cancelled: AtomicBool,
    inner: Mutex<StreamInner>,
}

struct StreamInner {
    /// Pieces `[0, next)` are in the digest.
    next: u32,
    /// `None` while a worker feeds the digest, and after it is finished.
    digest: Option<Box<Sha1>>,
    fed_hot: u32,
}

impl FileStream {
    /// The digest of download `job`, whose `n_pieces` pieces are read through `reader`.
    pub fn new(job: JobId, reader: PartReader, n_pieces: u32) -> Arc<Self> {
        Arc::new(FileStream {
            job,
            reader,
            n_pieces,
            cancelled: AtomicBool::new(false),
            inner: Mutex::new(StreamInner {
                next: 0,
                digest: Some(Box::new(Sha1::new())),
                fed_hot: 0,
            }),
        })
    }

    /// Stops feeding the digest; a worker feeding it stops after the piece at hand.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    /// Feeds the digest the verified pieces from where it stands, at most [`FEED_PIECES`] of
    /// them, unless another worker is feeding it (that worker looks again before it stops, so
    /// no verified piece is left behind). `hot` is the piece the caller just verified.
    fn advance(&self, hot: u32) -> Fed {
        let Ok(mut inner) = self.inner.lock() else {
            return Fed::Nothing;
        };
        let mut budget = FEED_PIECES;
        loop {
            if inner.next >= self.n_pieces {
                let Some(digest) = inner.digest.take() else {
                    return Fed::Nothing;
                };
                return Fed::Done(StreamDone {
                    job: self.job,
                    digest: Sha1Digest(digest.finalize().into()),
                    fed_hot: inner.fed_hot,
                });
            }
            if !self.reader.is_verified(inner.next) || self.cancelled.load(Ordering::Relaxed) {
                return Fed::Nothing;
            }
            if budget == 0 {
                return Fed::More;
            }
            let Some(mut digest) = inner.digest.take() else {
                return Fed::Nothing;
            };
            let mut next = inner.next;
            drop(inner);
            let mut fed_hot = 0;
            while next < self.n_pieces && budget > 0 && !self.cancelled.load(Ordering::Relaxed) {
                let Some(bytes) = self.reader.piece_bytes(next) else {
                    break;
                };
                update_reading_ahead(&mut digest, bytes);
                fed_hot += u32::from(next == hot);
                next += 1;
                budget -= 1;
            }
            inner = match self.inner.lock() {
                Ok(inner) => inner,
                Err(_) => return Fed::Nothing,
            };
            inner.next = next;
            inner.digest = Some(digest);
            inner.fed_hot += fed_hot;
        }
    }
}

/// What one [`FileStream::advance`] did.
#[derive(Debug)]
enum Fed {
    /// Nothing more to feed now (or another worker feeds).
    Nothing,
    /// Its share fed, verified pieces wait: the rest is queued behind the other tasks.
    More,
    /// The last piece is in.
    Done(StreamDone),
}

/// What the pool sends back.
#[derive(Debug)]
pub enum HashResult {
    File(HashDone),
    Piece(PieceChecked),
    Stream(StreamDone),
}

enum Task {
    Verify {
        job: JobId,
        ticket: HashTicket,
        expected: Sha1Digest,
        stream: Option<Arc<FileStream>>,
    },
    Open {
        job: JobId,
        path: PathBuf,
        piece_len: u32,
    },
    /// Go on feeding a whole-file digest.
    Feed(Arc<FileStream>),
    Whole(Arc<JobState>),
    Pieces(Arc<JobState>, usize, usize),
}

struct JobState {
    job: JobId,
    map: SourceMap,
    piece_len: usize,
    parts: Mutex<Assembly>,
}

struct Assembly {
    file_sha1: Option<Sha1Digest>,
    piece_hashes: Vec<Sha1Digest>,
    tasks_left: usize,
}

pub fn sha1_of(bytes: &[u8]) -> Sha1Digest {
    let mut digest = Sha1::new();
    update_reading_ahead(&mut digest, bytes);
    Sha1Digest(digest.finalize().into())
}

/// Feeds `bytes` to `digest` a [`STEP`] at a time, reading ahead into the next step so that its
/// loads overlap the hashing of this one (see the module doc).
fn update_reading_ahead(digest: &mut Sha1, bytes: &[u8]) {
    let mut steps = bytes.chunks(STEP).peekable();
    while let Some(step) = steps.next() {
        if let Some(next) = steps.peek() {
            std::hint::black_box(touch_lines(next));
        }
        digest.update(step);
    }
}

/// Reads one byte of every cache line of `bytes`.
fn touch_lines(bytes: &[u8]) -> u8 {
    bytes.iter().step_by(CACHE_LINE).fold(0, |acc, b| acc ^ b)
}

/// How much less CPU priority (nice) the workers take than the thread that starts the pool.
///
/// Why: the reactor thread moves the data (sockets, `recv` into the map, opening records) and
/// every byte waits for it, while hashing may lag behind the data and catch up whenever a core
/// is free. On two cores shared by the reactor, two workers and (in the loopback benchmark)
/// the sharer's reactor, equal priority let the workers take the core a reactor was waiting
/// for, and the transfer went at the pace of the two reactors taking turns: 1 GiB from one
/// sharer went about 10% faster with the workers at +10, the CPU per GiB unchanged (README,
/// Download throughput). +5 did not help, +19 no more than +10. At +10 a worker still gets
/// about a tenth of a contended core (nice weights 110 against 1,024) and all of an idle one,
/// so hashing keeps its speed whenever the reactor does not need the core.
pub const WORKER_NICE: i32 = 10;

/// Lowers the calling thread's priority by [`WORKER_NICE`] (on Linux `setpriority` on the
/// calling thread applies to that thread alone). Best effort: a worker that cannot lower it
/// hashes at the reactor's priority, as before.
fn lower_priority() {
    if let Err(e) = rustix::process::nice(WORKER_NICE) {
        log::debug!("hasher: priority not lowered: {e}");
    }
}

/// A fixed set of hashing threads: one group for downloaded pieces (and a download's
/// whole-file digest), one for files being shared.
pub struct HashPool {
    tasks: Sender<Task>,
    file_tasks: Sender<Task>,
}

/// Starts `n` workers named `<name>-<i>` on a queue of their own (a task they split or feed
/// further goes back on it); `lower` puts them at [`WORKER_NICE`].
fn spawn_workers(
    name: &str,
    n: usize,
    lower: bool,
    done_tx: &Sender<HashResult>,
    waker: &Arc<Waker>,
) -> std::io::Result<Sender<Task>> {
    let (task_tx, task_rx) = mpsc::channel::<Task>();
    let task_rx = Arc::new(Mutex::new(task_rx));
    for i in 0..n.max(1) {
        let task_rx = Arc::clone(&task_rx);
        let task_tx = task_tx.clone();
        let done_tx = done_tx.clone();
        let waker = Arc::clone(waker);
        thread::Builder::new()
            .name(format!("{name}-{i}"))
            .spawn(move || {
                if lower {
                    lower_priority();
                }
                worker(&task_rx, &task_tx, &done_tx, &waker)
            })?;
    }
    Ok(task_tx)
}

impl HashPool {
    /// Starts `n_workers` threads for downloaded pieces (at [`WORKER_NICE`]) and as many for
    /// files (at the caller's priority: `upload_file` waits for them, and a busy machine must
    /// not slow it fivefold); results arrive on the returned channel, each followed by a wake
    /// of `waker`.
    pub fn start(
        n_workers: usize,
        waker: Arc<Waker>,
    ) -> std::io::Result<(Self, Receiver<HashResult>)> {
        let (done_tx, done_rx) = mpsc::channel();
        let tasks = spawn_workers("hasher", n_workers, true, &done_tx, &waker)?;
        let file_tasks = spawn_workers("filehash", n_workers, false, &done_tx, &waker)?;
        Ok((HashPool { tasks, file_tasks }, done_rx))
    }

    /// Queues the check of a complete downloaded piece against `expected`. A piece that
    /// matches is marked verified at once and, if `stream` is given, fed to that whole-file
    /// digest when it is the piece the digest needs next.
    pub fn verify_piece(
        &self,
        job: JobId,
        ticket: HashTicket,
        expected: Sha1Digest,
        stream: Option<Arc<FileStream>>,
    ) {
        let _ = self.tasks.send(Task::Verify {
            job,
            ticket,
            expected,
            stream,
        });
    }

    /// Queues the hashing of the file at `path` in pieces of `piece_len` bytes.
    pub fn hash_file(&self, job: JobId, path: PathBuf, piece_len: u32) {
        let _ = self.file_tasks.send(Task::Open {
            job,
            path,
            piece_len,
        });
    }
}

fn worker(
    tasks: &Mutex<Receiver<Task>>,
    requeue: &Sender<Task>,
    done: &Sender<HashResult>,
    waker: &Waker,
) {
    loop {
        let task = match tasks.lock() {
            Ok(rx) => match rx.recv() {
                Ok(t) => t,
                Err(_) => return,
            },
            Err(_) => return,
        };
        let send = |result: HashResult| {
            let sent = done.send(result).is_ok();
            let _ = waker.wake();
            sent
        };
        let finished = match task {
            Task::Verify {
                job,
                ticket,
                expected,
                stream,
            } => {
                let ok = sha1_of(ticket.bytes()) == expected;
                let piece = ticket.piece();
                let verdict = ticket.verdict(ok);
                let ok = verdict.ok();
                // The verdict goes out first: the digest can wait, the download cannot.
                if !send(HashResult::Piece(PieceChecked { job, verdict })) {
                    return;
                }
                match stream {
                    Some(stream) if ok => fed(stream.advance(piece), stream, requeue),
                    _ => None,
                }
            }
            Task::Feed(stream) => fed(stream.advance(u32::MAX), stream, requeue),
            Task::Open {
                job,
                path,
                piece_len,
            } => open(job, &path, piece_len, requeue).map(HashResult::File),
            Task::Whole(state) => {
                let digest = sha1_of(state.map.bytes());
                state
                    .finish_task(|a| a.file_sha1 = Some(digest))
                    .map(HashResult::File)
            }
            Task::Pieces(state, first, last) => {
                let bytes = state.map.bytes();
                let digests: Vec<Sha1Digest> = (first..last)
                    .map(|i| {
                        let start = i * state.piece_len;
                        let end = (start + state.piece_len).min(bytes.len());
                        sha1_of(bytes.get(start..end).unwrap_or(&[]))
                    })
                    .collect();
                state
                    .finish_task(|a| {
                        for (slot, d) in a.piece_hashes[first..last].iter_mut().zip(digests) {
                            *slot = d;
                        }
                    })
                    .map(HashResult::File)
            }
        };
        if let Some(result) = finished {
            if !send(result) {
                return;
            }
        }
    }
}

/// What to send after feeding a digest: the digest when done; the rest queued when more waits.
fn fed(fed: Fed, stream: Arc<FileStream>, requeue: &Sender<Task>) -> Option<HashResult> {
    match fed {
        Fed::Nothing => None,
        Fed::More => {
            let _ = requeue.send(Task::Feed(stream));
            None
        }
        Fed::Done(done) => Some(HashResult::Stream(done)),
    }
}

/// Maps the file and queues its tasks; returns a result at once for errors and empty files.
fn open(
    job: JobId,
    path: &std::path::Path,
    piece_len: u32,
    requeue: &Sender<Task>,
) -> Option<HashDone> {
    let map = match SourceMap::open(path) {
        Ok(m) => m,
        Err(e) => {
            return Some(HashDone {
                job,
                result: Err(HashError::Read {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                }),
            })
        }
    };
    let piece_len = piece_len.max(1) as usize;
    let n_pieces = map.bytes().len().div_ceil(piece_len);
    if n_pieces == 0 {
        return Some(HashDone {
            job,
            result: Ok(FileHashes {
                size: 0,
                file_sha1: sha1_of(&[]),
                piece_hashes: Vec::new(),
            }),
        });
    }
    let n_piece_tasks = n_pieces.div_ceil(PIECES_PER_TASK);
    let state = Arc::new(JobState {
        job,
        map,
        piece_len,
        parts: Mutex::new(Assembly {
            file_sha1: None,
            piece_hashes: vec![Sha1Digest::default(); n_pieces],
            tasks_left: 1 + n_piece_tasks,
        }),
    });
    // The long whole-file task goes first so it overlaps with all the piece tasks.
    let _ = requeue.send(Task::Whole(Arc::clone(&state)));
    for t in 0..n_piece_tasks {
        let first = t * PIECES_PER_TASK;
        let last = (first + PIECES_PER_TASK).min(n_pieces);
        let _ = requeue.send(Task::Pieces(Arc::clone(&state), first, last));
    }
    None
}

impl JobState {
    /// Records a task's output; the task that finishes the job returns its result.
    fn finish_task(&self, record: impl FnOnce(&mut Assembly)) -> Option<HashDone> {
        let mut parts = self.parts.lock().ok()?;
        record(&mut parts);
        parts.tasks_left -= 1;
        if parts.tasks_left > 0 {
            return None;
        }
        Some(HashDone {
            job: self.job,
            result: Ok(FileHashes {
                size: self.map.len(),
                file_sha1: parts.file_sha1.unwrap_or_default(),
                piece_hashes: std::mem::take(&mut parts.piece_hashes),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::{Poll, Token};
    use std::io::Write;
    use std::time::Duration;

    fn hash_with_pool(contents: &[u8], piece_len: u32) -> FileHashes {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::File::create(&path)
            .unwrap()
            .write_all(contents)
            .unwrap();
        let poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), Token(0)).unwrap());
        let (pool, done) = HashPool::start(3, waker).unwrap();
        pool.hash_file(JobId(7), path, piece_len);
        let Ok(HashResult::File(result)) = done.recv_timeout(Duration::from_secs(60)) else {
            panic!("expected a file result");
        };
        assert_eq!(result.job, JobId(7));
        result.result.unwrap()
    }

    #[test]
    fn pieces_and_whole_file_match_a_sequential_hash() {
        let data: Vec<u8> = (0..(100 * 1000 + 17))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let got = hash_with_pool(&data, 1000);
        assert_eq!(got.size, data.len() as u64);
        assert_eq!(got.file_sha1, sha1_of(&data));
        assert_eq!(got.piece_hashes.len(), 101);
        for (i, chunk) in data.chunks(1000).enumerate() {
            assert_eq!(got.piece_hashes[i], sha1_of(chunk), "piece {i}");
        }
    }

    #[test]
    fn empty_file_has_no_pieces() {
        let got = hash_with_pool(b"", 512 * 1024);
        assert_eq!(got.size, 0);
        assert!(got.piece_hashes.is_empty());
        assert_eq!(
            got.file_sha1.to_string(),
            "da39a3ee5e6b4b0d3255bfef95601890afd80709"
        );
    }

    /// The nice value in a thread's `stat` file (its field 19).
    fn nice_at(stat: &std::path::Path) -> Option<i32> {
        let stat = std::fs::read_to_string(stat).ok()?;
        let rest = &stat[stat.rfind(')')? + 2..];
        rest.split_whitespace().nth(16)?.parse().ok()
    }

    /// The workers run at [`WORKER_NICE`] below the thread that started the pool (so the
    /// reactor is never kept waiting by hashing). Other tests start pools too, and a worker
    /// lowers its own priority as it starts: the check waits until every worker has.
    #[test]
    fn workers_run_at_a_lower_priority() {
        let me = nice_at(std::path::Path::new("/proc/thread-self/stat")).unwrap();
        let poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), Token(0)).unwrap());
        let (pool, done) = HashPool::start(2, waker).unwrap();
        // A job round trip: at least one worker is running.
        pool.hash_file(JobId(1), PathBuf::from("/nonexistent/file"), 1024);
        assert!(done.recv_timeout(Duration::from_secs(10)).is_ok());
        let want = (me + WORKER_NICE).min(19);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut workers = Vec::new();
            let mut file_workers = Vec::new();
            for entry in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
                let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
                if comm.starts_with("hasher-") {
                    workers.push(nice_at(&entry.path().join("stat")));
                } else if comm.starts_with("filehash-") {
                    file_workers.push(nice_at(&entry.path().join("stat")));
                }
            }
            assert!(workers.len() >= 2, "the pool's workers are not found");
            // Files (what `upload_file` waits for) are hashed at the caller's priority.
            assert!(file_workers.len() >= 2, "the file workers are not found");
            assert!(
                file_workers.iter().all(|n| *n == Some(me) || n.is_none()),
                "file workers at nice {file_workers:?}, want {me}"
            );
            if workers.iter().all(|n| *n == Some(want) || n.is_none()) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "workers at nice {workers:?}, want {want} (this thread {me})"
            );
            std::thread::yield_now();
        }
        // `nice` lowers the calling thread alone (Linux, NPTL): the thread that started the
        // pool, the reactor in the programs, keeps its priority.
        let after = nice_at(std::path::Path::new("/proc/thread-self/stat")).unwrap();
        assert_eq!(
            after, me,
            "the starting thread's nice changed with its workers'"
        );
        drop(pool);
    }

    #[test]
    fn missing_file_is_an_error() {
        let poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), Token(0)).unwrap());
        let (pool, done) = HashPool::start(1, waker).unwrap();
        pool.hash_file(JobId(1), PathBuf::from("/nonexistent/file"), 1024);
        let Ok(HashResult::File(r)) = done.recv_timeout(Duration::from_secs(10)) else {
            panic!("expected a file result");
        };
        assert!(r.result.is_err());
    }

    #[test]
    fn downloaded_pieces_are_checked_and_tickets_come_back() {
        use crate::storage::PartFile;
        let dir = tempfile::tempdir().unwrap();
        let mut part = PartFile::create(&dir.path().join("f.part"), 8, 4).unwrap();
        part.write_with(0, 0, 4, |b| b.copy_from_slice(b"good"))
            .unwrap();
        part.write_with(1, 0, 4, |b| b.copy_from_slice(b"evil"))
            .unwrap();
        let poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), Token(0)).unwrap());
        let (pool, done) = HashPool::start(2, waker).unwrap();
        pool.verify_piece(JobId(1), part.seal(0).unwrap(), sha1_of(b"good"), None);
        pool.verify_piece(JobId(2), part.seal(1).unwrap(), sha1_of(b"nice"), None);
        let mut verdicts = Vec::new();
        for _ in 0..2 {
            let Ok(HashResult::Piece(p)) = done.recv_timeout(Duration::from_secs(10)) else {
                panic!("expected a piece result");
            };
            verdicts.push((p.job.0, p.verdict.ok()));
            part.finish(p.verdict);
        }
        verdicts.sort();
        assert_eq!(verdicts, [(1, true), (2, false)]);
        assert!(part.reader().is_verified(0));
        assert!(!part.reader().is_verified(1));
    }

    #[test]
    fn reading_ahead_matches_a_plain_digest_at_every_length() {
        let data: Vec<u8> = (0..3 * STEP + 100).map(|i| (i * 13 % 251) as u8).collect();
        for len in [
            0,
            1,
            63,
            64,
            STEP - 1,
            STEP,
            STEP + 1,
            2 * STEP + 7,
            data.len(),
        ] {
            let mut digest = Sha1::new();
            update_reading_ahead(&mut digest, &data[..len]);
            assert_eq!(digest.finalize(), Sha1::digest(&data[..len]), "len {len}");
        }
    }

    /// Verifies the pieces of `data` in the order `order` on a pool of `workers`, with the
    /// whole-file digest; returns the verdicts, the digest result and the part file.
    fn verify_with_stream(
        data: &[u8],
        piece_len: u32,
        order: &[u32],
        corrupt: Option<u32>,
        workers: usize,
    ) -> (
        Vec<(u32, bool)>,
        Option<StreamDone>,
        crate::storage::PartFile,
    ) {
        use crate::storage::PartFile;
        let dir = tempfile::tempdir().unwrap();
        let mut part =
            PartFile::create(&dir.path().join("f.part"), data.len() as u64, piece_len).unwrap();
        let n = part.n_pieces() as u32;
        let pieces: Vec<&[u8]> = data.chunks(piece_len as usize).collect();
        for (i, chunk) in pieces.iter().enumerate() {
            let mut chunk = chunk.to_vec();
            if corrupt == Some(i as u32) {
                chunk[0] ^= 1;
            }
            part.write_with(i as u32, 0, chunk.len() as u32, |b| {
                b.copy_from_slice(&chunk)
            })
            .unwrap();
        }
        let poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), Token(0)).unwrap());
        let (pool, done) = HashPool::start(workers, waker).unwrap();
        let stream = FileStream::new(JobId(9), part.reader(), n);
        for &p in order {
            let ticket = part.seal(p).unwrap();
            pool.verify_piece(
                JobId(9),
                ticket,
                sha1_of(pieces[p as usize]),
                Some(stream.clone()),
            );
        }
        let mut verdicts = Vec::new();
        let mut digest = None;
        while verdicts.len() < order.len() || (digest.is_none() && corrupt.is_none()) {
            match done
                .recv_timeout(Duration::from_secs(30))
                .expect("a result")
            {
                HashResult::Piece(p) => {
                    verdicts.push((p.verdict.piece(), p.verdict.ok()));
                    part.finish(p.verdict);
                }
                HashResult::Stream(d) => {
                    assert!(digest.is_none(), "one digest per download");
                    digest = Some(d);
                }
                HashResult::File(_) => panic!("no file job"),
            }
        }
        // Nothing more arrives.
        if let Ok(HashResult::Stream(d)) = done.recv_timeout(Duration::from_millis(200)) {
            assert!(digest.is_none(), "a second digest");
            digest = Some(d);
        }
        verdicts.sort();
        (verdicts, digest, part)
    }

    #[test]
    fn the_whole_file_digest_follows_pieces_verified_in_any_order() {
        let data: Vec<u8> = (0..(40 * 1000 + 123))
            .map(|i| (i * 7 % 253) as u8)
            .collect();
        let in_order: Vec<u32> = (0..41).collect();
        let mut shuffled = in_order.clone();
        crate::rng::SplitMix64::new(5).shuffle(&mut shuffled);
        let reversed: Vec<u32> = in_order.iter().rev().copied().collect();
        for order in [&in_order, &shuffled, &reversed] {
            for workers in [1, 2, 4] {
                let (verdicts, digest, part) =
                    verify_with_stream(&data, 1000, order, None, workers);
                assert!(verdicts.iter().all(|&(_, ok)| ok));
                assert!(part.is_complete());
                let digest = digest.expect("the digest");
                assert_eq!(digest.job, JobId(9));
                assert_eq!(
                    digest.digest,
                    sha1_of(&data),
                    "order {order:?}, {workers} workers"
                );
                assert!(digest.fed_hot <= 41);
            }
        }
        // In order on one worker, every piece is fed right after its check.
        let (_, digest, _) = verify_with_stream(&data, 1000, &in_order, None, 1);
        assert_eq!(digest.unwrap().fed_hot, 41);
    }

    #[test]
    fn a_bad_piece_holds_the_whole_file_digest_back() {
        let data: Vec<u8> = (0..10_000).map(|i| (i % 249) as u8).collect();
        let order: Vec<u32> = (0..10).collect();
        let (verdicts, digest, part) = verify_with_stream(&data, 1000, &order, Some(4), 2);
        assert_eq!(verdicts.iter().filter(|&&(_, ok)| !ok).count(), 1);
        assert_eq!(verdicts[4], (4, false));
        assert!(digest.is_none(), "piece 4 is missing from the digest");
        assert!(!part.is_complete());
    }

    #[test]
    fn a_cancelled_digest_is_never_finished() {
        use crate::storage::PartFile;
        let dir = tempfile::tempdir().unwrap();
        let mut part = PartFile::create(&dir.path().join("f.part"), 8, 4).unwrap();
        part.write_with(0, 0, 4, |b| b.copy_from_slice(b"abcd"))
            .unwrap();
        part.write_with(1, 0, 4, |b| b.copy_from_slice(b"efgh"))
            .unwrap();
        let stream = FileStream::new(JobId(3), part.reader(), 2);
        stream.cancel();
        for (p, bytes) in [(0u32, b"abcd"), (1, b"efgh")] {
            let ticket = part.seal(p).unwrap();
            assert_eq!(sha1_of(ticket.bytes()), sha1_of(bytes));
            let verdict = ticket.verified();
            assert!(matches!(stream.advance(p), Fed::Nothing));
            part.finish(verdict);
        }
    }

    #[test]
    fn a_long_stretch_is_fed_a_share_at_a_time() {
        use crate::storage::PartFile;
        let n = 2 * FEED_PIECES + 5;
        let data: Vec<u8> = (0..n * 10).map(|i| (i % 241) as u8).collect();
        let dir = tempfile::tempdir().unwrap();
        let mut part = PartFile::create(&dir.path().join("f.part"), data.len() as u64, 10).unwrap();
        for (i, chunk) in data.chunks(10).enumerate() {
            part.write_with(i as u32, 0, 10, |b| b.copy_from_slice(chunk))
                .unwrap();
        }
        let stream = FileStream::new(JobId(4), part.reader(), n);
        // Every piece but the first verified: nothing to feed yet.
        for p in (1..n).rev() {
            let ticket = part.seal(p).unwrap();
            let verdict = ticket.verified();
            assert!(matches!(stream.advance(p), Fed::Nothing));
            part.finish(verdict);
        }
        // The first one verifies: the digest takes its share, then says more waits.
        let verdict = part.seal(0).unwrap().verified();
        assert!(matches!(stream.advance(0), Fed::More));
        assert_eq!(stream.inner.lock().unwrap().next, FEED_PIECES);
        assert!(matches!(stream.advance(u32::MAX), Fed::More));
        assert_eq!(stream.inner.lock().unwrap().next, 2 * FEED_PIECES);
        let Fed::Done(done) = stream.advance(u32::MAX) else {
            panic!("the digest is complete");
        };
        assert_eq!(done.digest, sha1_of(&data));
        assert_eq!(
            done.fed_hot, 1,
            "only piece 0 was fed by the worker that verified it"
        );
        assert!(
            matches!(stream.advance(u32::MAX), Fed::Nothing),
            "finished once"
        );
        part.finish(verdict);
        // Through the pool, in reverse order: the queued rest finishes the digest.
        let (_, digest, _) =
            verify_with_stream(&data, 10, &(0..n).rev().collect::<Vec<_>>(), None, 1);
        assert_eq!(digest.unwrap().digest, sha1_of(&data));
    }
}
