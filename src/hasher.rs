//! The SHA1 worker pool: hashes files and downloaded pieces off the reactor thread.
//!
//! A file job maps the file, then splits into one task for the whole-file digest (inherently
//! sequential) and tasks of a few pieces each, which the workers take from one queue, so a
//! large file is hashed on every core at once. A piece job checks one downloaded piece, read
//! through its [`HashTicket`], against its expected digest and hands the ticket back. Every
//! result goes to the results channel and the owner's `mio::Waker` is woken; the reactor never
//! blocks on hashing.

use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;

use mio::Waker;
use sha1::{Digest, Sha1};

use crate::storage::{HashTicket, PartReader, SourceMap};
use crate::wire::Sha1Digest;

/// Pieces per task: big enough to amortise the queue, small enough to balance the workers.
const PIECES_PER_TASK: usize = 16;

/// The digests of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileHashes {
    pub size: u64,
    pub file_sha1: Sha1Digest,
    pub piece_hashes: Vec<Sha1Digest>,
}

/// A finished job.
#[derive(Debug)]
pub struct HashDone {
    pub job: u64,
    pub result: Result<FileHashes, String>,
}

/// A checked piece: the ticket comes back with the verdict.
pub struct PieceChecked {
    pub job: u64,
    pub ticket: HashTicket,
    pub ok: bool,
}

impl std::fmt::Debug for PieceChecked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PieceChecked(job {}, piece {}, ok {})",
            self.job,
            self.ticket.piece(),
            self.ok
        )
    }
}

/// A stretch of a downloaded file's whole-file digest: pieces `[.., next)` are in `state`,
/// or `ok` is false because a piece of the stretch was not verified.
pub struct StreamDone {
    pub job: u64,
    pub state: Box<Sha1>,
    pub next: u32,
    pub ok: bool,
}

impl std::fmt::Debug for StreamDone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "StreamDone(job {}, next {}, ok {})",
            self.job, self.next, self.ok
        )
    }
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
        job: u64,
        ticket: HashTicket,
        expected: Sha1Digest,
    },
    Open {
        job: u64,
        path: PathBuf,
        piece_len: u32,
    },
    Stream {
        job: u64,
        reader: PartReader,
        state: Box<Sha1>,
        from: u32,
        to: u32,
    },
    Whole(Arc<JobState>),
    Pieces(Arc<JobState>, usize, usize),
}

struct JobState {
    job: u64,
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
    Sha1Digest(Sha1::digest(bytes).into())
}

/// A fixed set of hashing threads.
pub struct HashPool {
    tasks: Sender<Task>,
}

impl HashPool {
    /// Starts `n_workers` threads; results arrive on the returned channel, each followed by a
    /// wake of `waker`.
    pub fn start(
        n_workers: usize,
        waker: Arc<Waker>,
    ) -> std::io::Result<(Self, Receiver<HashResult>)> {
        let (task_tx, task_rx) = mpsc::channel::<Task>();
        let (done_tx, done_rx) = mpsc::channel();
        let task_rx = Arc::new(Mutex::new(task_rx));
        for i in 0..n_workers.max(1) {
            let task_rx = Arc::clone(&task_rx);
            let task_tx = task_tx.clone();
            let done_tx = done_tx.clone();
            let waker = Arc::clone(&waker);
            thread::Builder::new()
                .name(format!("hasher-{i}"))
                .spawn(move || worker(&task_rx, &task_tx, &done_tx, &waker))?;
        }
        Ok((HashPool { tasks: task_tx }, done_rx))
    }

    /// Queues the check of a complete downloaded piece against `expected`.
    pub fn verify_piece(&self, job: u64, ticket: HashTicket, expected: Sha1Digest) {
        let _ = self.tasks.send(Task::Verify {
            job,
            ticket,
            expected,
        });
    }

    /// Queues the next stretch of a downloaded file's whole-file digest: feeds the verified
    /// pieces `[from, to)` to `state`, in order.
    pub fn stream_pieces(
        &self,
        job: u64,
        reader: PartReader,
        state: Box<Sha1>,
        from: u32,
        to: u32,
    ) {
        let _ = self.tasks.send(Task::Stream {
            job,
            reader,
            state,
            from,
            to,
        });
    }

    /// Queues the hashing of the file at `path` in pieces of `piece_len` bytes.
    pub fn hash_file(&self, job: u64, path: PathBuf, piece_len: u32) {
        let _ = self.tasks.send(Task::Open {
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
        let finished = match task {
            Task::Verify {
                job,
                ticket,
                expected,
            } => {
                let ok = sha1_of(ticket.bytes()) == expected;
                Some(HashResult::Piece(PieceChecked { job, ticket, ok }))
            }
            Task::Stream {
                job,
                reader,
                mut state,
                from,
                to,
            } => {
                let mut ok = true;
                for piece in from..to {
                    match reader.piece_bytes(piece) {
                        Some(bytes) => state.update(bytes),
                        None => {
                            ok = false;
                            break;
                        }
                    }
                }
                Some(HashResult::Stream(StreamDone {
                    job,
                    state,
                    next: to,
                    ok,
                }))
            }
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
            if done.send(result).is_err() {
                return;
            }
            let _ = waker.wake();
        }
    }
}

/// Maps the file and queues its tasks; returns a result at once for errors and empty files.
fn open(
    job: u64,
    path: &std::path::Path,
    piece_len: u32,
    requeue: &Sender<Task>,
) -> Option<HashDone> {
    let map = match SourceMap::open(path) {
        Ok(m) => m,
        Err(e) => {
            return Some(HashDone {
                job,
                result: Err(format!("cannot read {}: {e}", path.display())),
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
        pool.hash_file(7, path, piece_len);
        let Ok(HashResult::File(result)) = done.recv_timeout(Duration::from_secs(60)) else {
            panic!("expected a file result");
        };
        assert_eq!(result.job, 7);
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

    #[test]
    fn missing_file_is_an_error() {
        let poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), Token(0)).unwrap());
        let (pool, done) = HashPool::start(1, waker).unwrap();
        pool.hash_file(1, PathBuf::from("/nonexistent/file"), 1024);
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
        pool.verify_piece(1, part.seal(0).unwrap(), sha1_of(b"good"));
        pool.verify_piece(2, part.seal(1).unwrap(), sha1_of(b"nice"));
        let mut verdicts = Vec::new();
        for _ in 0..2 {
            let Ok(HashResult::Piece(p)) = done.recv_timeout(Duration::from_secs(10)) else {
                panic!("expected a piece result");
            };
            verdicts.push((p.job, p.ok));
            part.finish(p.ticket, p.ok);
        }
        verdicts.sort();
        assert_eq!(verdicts, [(1, true), (2, false)]);
        assert!(part.reader().is_verified(0));
        assert!(!part.reader().is_verified(1));
    }
}
