//! The tracker's data directory: a durable log of the replicated entries plus snapshots of
//! the state, after etcd's WAL. This module opens and locks the directory and recovers what
//! it holds ([`DataDir::open`]); [`DataDir::start`] then hands the open log to a disk thread
//! ([`writer`]) that the reactor talks to by message, so no fsync ever runs on the reactor.
//!
//! It knows nothing of what the bytes mean: entries and snapshots are opaque to it; it only
//! keeps them in order, checks them, and says when they are durable. It must never report as
//! durable anything that is not fsync'd, and never recover silently to less than it reported
//! durable: damage other than a torn tail is a typed error naming the file and offset.
//!
//! Directory layout (the byte layouts are in [`format`]):
//!
//! - `LOCK`: held with an exclusive `flock` by the process using the directory.
//! - `wal-<segment_no, 16 hex digits>.log`: log segments, numbered consecutively. The last one
//!   is appended to; a new one starts (with the current meta record) past
//!   [`DiskOptions::segment_size`].
//! - `snap-<seq, 16 hex digits>.snap`: the state after entry `seq`, written to a `.tmp` file,
//!   fsync'd, renamed and the directory fsync'd.
//!
//! How the replication core is meant to use it (the wiring is not done yet; see `HAND-OFF`
//! in `src/bin/tracker_program.rs`):
//!
//! 1. At start-up, [`DataDir::open`]; rebuild the state from [`Recovered::snapshot`], then
//!    apply the entries of [`Recovered::records`] whose seq is above the snapshot's (the first
//!    record may straddle it), and read the view, members and commit point back from
//!    [`Recovered::meta`]. Then [`DataDir::start`] with a wake that calls `mio::Waker::wake`.
//! 2. For every batch a member applies: [`DiskMsg::Append`] with the batch's seqs and its
//!    encoded entries; acknowledge the batch (to the primary, or to the clients on the
//!    primary) only once a [`DiskEvent::Durable`] arrives whose ticket covers the append.
//! 3. [`DiskMsg::SetMeta`] whenever the view, the members or the commit point change; it is
//!    durable with the same fsync as the appends around it.
//! 4. [`DiskMsg::TruncateFrom`] when a new primary replaces an uncommitted suffix (always on a
//!    batch boundary, above the newest snapshot).
//! 5. [`DiskMsg::Snapshot`] of the committed state every so often (e.g. every 100,000
//!    entries or 64 MiB of log) so the log is compacted, and at once when a snapshot is
//!    installed from the primary (the disk thread writes that one before later appends).
//! 6. On [`DiskEvent::Failed`], stop the tracker: nothing after it is durable.

pub mod format;
mod recover;
pub mod writer;

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub use writer::{DiskEvent, DiskHandle, DiskMsg, Ticket};

/// A batch of entries in the log: the replication core's own encoding of the entries
/// `first_seq..=last_seq`, opaque here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    pub first_seq: u64,
    pub last_seq: u64,
    pub payload: Vec<u8>,
}

/// What a data directory held when it was opened.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// The last metadata blob made durable ([`DiskMsg::SetMeta`]).
    pub meta: Option<Vec<u8>>,
    /// The newest valid snapshot: (last seq it covers, state bytes).
    pub snapshot: Option<(u64, Vec<u8>)>,
    /// The records after the snapshot, in order, truncations applied. Contiguous: the first
    /// starts at or before the snapshot's seq + 1 (a record may straddle the snapshot: its
    /// entries up to the snapshot's seq are already in the snapshot), and each next one starts
    /// right after the one before.
    pub records: Vec<LogRecord>,
    /// The highest seq recovered: the last record's `last_seq`, else the snapshot's, else 0.
    pub last_seq: u64,
    /// A torn tail that was cut off the last segment (a crash in the middle of a write).
    pub torn_tail: Option<TornTail>,
}

/// Where a torn tail was cut, for the log and for tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    pub path: PathBuf,
    pub offset: u64,
    pub bytes_dropped: u64,
}

/// Tunables; the defaults are what `tracker_program` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskOptions {
    /// A segment is closed and a new one started once a record would take it past this size.
    /// A record larger than this gets a segment of its own.
    pub segment_size: u64,
}

impl Default for DiskOptions {
    fn default() -> Self {
        DiskOptions {
            segment_size: 64 << 20,
        }
    }
}

/// Everything that can go wrong with the data directory. Any of these stops the tracker:
/// nothing is reported durable after one.
#[derive(Debug)]
pub enum DiskError {
    /// Another process (or another [`DataDir`] of this one) holds the directory's lock.
    Locked(PathBuf),
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    /// Bytes that fail their checksum or make no sense, somewhere a crash cannot explain.
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    /// The segments are not numbered consecutively: one in the middle is gone.
    MissingSegment { path: PathBuf, missing: u64 },
    /// The log does not continue where the state recovered so far ends: a snapshot it relied
    /// on is missing or failed its checksum (named when there is one).
    Gap {
        expected_seq: u64,
        path: PathBuf,
        offset: u64,
        found_seq: u64,
        bad_snapshots: Vec<(PathBuf, String)>,
    },
    /// A snapshot newer than everything else recovered failed its checksum: recovering
    /// without it would go back to an older state.
    BadNewestSnapshot {
        path: PathBuf,
        reason: String,
        recovered_seq: u64,
    },
    /// The caller broke the log's contract (out-of-order seqs, oversized record...).
    Misuse(String),
    /// The disk thread has stopped (after an error, or after [`DiskHandle::close`]).
    Stopped,
}

impl fmt::Display for DiskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiskError::Locked(path) => write!(
                f,
                "data directory {} is in use by another process (lock held on {})",
                path.parent().unwrap_or(path).display(),
                path.display()
            ),
            DiskError::Io { path, op, source } => {
                write!(f, "{}: cannot {op}: {source}", path.display())
            }
            DiskError::Corrupt {
                path,
                offset,
                reason,
            } => write!(
                f,
                "{} is damaged at offset {offset}: {reason}",
                path.display()
            ),
            DiskError::MissingSegment { path, missing } => write!(
                f,
                "log segment {missing:016x} is missing before {}",
                path.display()
            ),
            DiskError::Gap {
                expected_seq,
                path,
                offset,
                found_seq,
                bad_snapshots,
            } => {
                write!(
                    f,
                    "the log does not hold seq {expected_seq}: the first record after it, at {} \
                     offset {offset}, starts at seq {found_seq}",
                    path.display()
                )?;
                if bad_snapshots.is_empty() {
                    f.write_str(" (the snapshot that covered it is missing)")
                } else {
                    for (p, why) in bad_snapshots {
                        write!(f, "; {} is unusable: {why}", p.display())?;
                    }
                    Ok(())
                }
            }
            DiskError::BadNewestSnapshot {
                path,
                reason,
                recovered_seq,
            } => write!(
                f,
                "{} is unusable ({reason}) and the log reaches only seq {recovered_seq}",
                path.display()
            ),
            DiskError::Misuse(what) => write!(f, "data directory misuse: {what}"),
            DiskError::Stopped => f.write_str("the disk thread has stopped"),
        }
    }
}

impl std::error::Error for DiskError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DiskError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

pub(crate) fn io_err(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> DiskError {
    let path = path.to_path_buf();
    move |source| DiskError::Io { path, op, source }
}

/// The default data directory of the tracker listening on `addr`:
/// `$XDG_STATE_HOME/p2pshare/tracker-<ip>-<port>`, or `$HOME/.local/state/...` when
/// `XDG_STATE_HOME` is unset, empty or relative (the XDG base directory rules). One per
/// address, so two trackers on one machine never share one. Pure: the caller passes the two
/// variables (`std::env::var_os`).
pub fn default_data_dir(
    xdg_state_home: Option<OsString>,
    home: Option<OsString>,
    addr: SocketAddr,
) -> Result<PathBuf, String> {
    let base =
        match xdg_state_home.map(PathBuf::from) {
            Some(p) if p.is_absolute() => p,
            _ => match home.map(PathBuf::from) {
                Some(h) if h.is_absolute() => h.join(".local").join("state"),
                _ => return Err(
                    "neither XDG_STATE_HOME nor HOME is set to an absolute path; use --data-dir"
                        .into(),
                ),
            },
        };
    // IPv6 addresses hold colons: spell them with dashes too, so the name is portable.
    let ip = addr.ip().to_string().replace(':', "-");
    Ok(base
        .join("p2pshare")
        .join(format!("tracker-{ip}-{}", addr.port())))
}

/// An opened, locked data directory whose contents have been recovered. [`DataDir::start`]
/// turns it into a running disk thread; dropping it releases the lock.
pub struct DataDir {
    path: PathBuf,
    lock: File,
    log: writer::LogState,
}

impl DataDir {
    /// Creates the directory (mode 0700) if needed, takes its lock, and recovers its contents
    /// (cutting a torn tail off the last segment). A second opener gets
    /// [`DiskError::Locked`].
    pub fn open(path: &Path) -> Result<(DataDir, Recovered), DiskError> {
        Self::open_with(path, DiskOptions::default())
    }

    pub fn open_with(path: &Path, options: DiskOptions) -> Result<(DataDir, Recovered), DiskError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(io_err(path, "create the data directory"))?;
        let lock_path = path.join("LOCK");
        let mut lock = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err(&lock_path, "open the lock file"))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(DiskError::Locked(lock_path)),
            Err(fs::TryLockError::Error(e)) => {
                return Err(io_err(&lock_path, "lock the data directory")(e))
            }
        }
        // The holder's pid, for a person wondering who holds it; the lock is what counts.
        let _ = lock
            .set_len(0)
            .and_then(|()| writeln!(lock, "{}", std::process::id()));
        let (recovered, log) = recover::recover(path, options)?;
        Ok((
            DataDir {
                path: path.to_path_buf(),
                lock,
                log,
            },
            recovered,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts the disk thread (and the snapshot thread behind it) on the open log. `wake` is
    /// called after every event is queued (typically `mio::Waker::wake`).
    pub fn start(self, wake: Box<dyn Fn() + Send>) -> Result<DiskHandle, DiskError> {
        writer::start(self.path, self.lock, self.log, wake)
    }
}

/// Whether the tracker of data directory `data_dir` founds the service: the tracker that
/// creates `marker` (a file beside the service key file, created exclusively, naming its data
/// directory, fsync'd), that is the first tracker ever started with this key; and that same
/// tracker started again on the data directory it had (`existed`: the directory was there
/// before this start), which may be empty if it died before anything was durable. Only a
/// founder may start the service with no state; any other tracker without state (a new
/// member, or one whose data directory was removed, the founder's included) waits to join a
/// serving tracker (see `Replica`).
pub fn found_service(marker: &Path, data_dir: &Path, existed: bool) -> Result<bool, DiskError> {
    let me = data_dir.to_string_lossy().into_owned();
    match fs::read(marker) {
        Ok(named) => return Ok(existed && named.strip_suffix(b"\n") == Some(me.as_bytes())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(marker, "read the service's founder marker")(e)),
    }
    // Written whole under a temporary name, then linked into place: a marker is never seen
    // half written, and only one tracker's link succeeds.
    let tmp = marker.with_extension(format!("founder.{}.tmp", std::process::id()));
    let mut file = File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp, "create the service's founder marker"))?;
    writeln!(file, "{me}")
        .and_then(|()| file.sync_all())
        .map_err(io_err(&tmp, "write the service's founder marker"))?;
    drop(file);
    let linked = fs::hard_link(&tmp, marker);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {}
        // Another tracker got there first.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(io_err(marker, "create the service's founder marker")(e)),
    }
    if let Some(dir) = marker.parent() {
        sync_dir(dir)?;
    }
    Ok(true)
}

/// Fsyncs a directory, so that the names created, renamed or removed in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), DiskError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir, "fsync the directory"))
}

pub(crate) fn segment_name(no: u64) -> String {
    format!("wal-{no:016x}.log")
}

pub(crate) fn snapshot_name(seq: u64) -> String {
    format!("snap-{seq:016x}.snap")
}

#[cfg(test)]
#[path = "disk_tests.rs"]
mod tests;
