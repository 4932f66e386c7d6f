//! The client's state file: what a client remembers of its users between runs, so that a
//! client started again at the same address serves their shares again and continues their
//! downloads (SPEC, client_program). It lives in the [state directory](super::state_dir) as
//! `state`, beside the `lock` that keeps a second client off the same directory.
//!
//! [`ClientState`] holds, per user who logged in on this client, the files shared (path, group,
//! content, size and modification time when shared) and the downloads running (group, file,
//! target). [`encode`]/[`decode`] are pure; [`save`] writes the file atomically (a temporary
//! file, fsync, rename, fsync of the directory), so a crash at any instant leaves the old or the
//! new state; [`load`] reads it back and reports a damaged file as [`LoadError::Corrupt`] (the
//! driver warns, moves it aside and starts without it). [`StateLock`] is the directory's
//! exclusive `flock`, held for the client's whole run.
//!
//! Layout (big-endian): `magic "P2PCLST1" | u32 body_len | body | u32 crc32c(body)`, where
//! body is `u32 n_users | user*`, a user is `str user | u32 n_shares | share* | u32
//! n_downloads | download*`, a share is `str group | bytes path | u8 has_stamp | [u64 size |
//! u64 mtime_secs (two's complement) | u32 mtime_nanos] | file_meta` (the tracker link's
//! layout), a download is `str group | str name | bytes target`. It holds no IO policy beyond
//! that: what to do with the state is the session core's business.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::wire::codec::{put_bytes16, put_str16, put_u32, put_u64, put_u8, DecodeError, Reader};
use crate::wire::tracker_link::{file_name, group_id, user_id, FileMeta};
use crate::wire::{FileName, GroupId, UserId};

/// The state file's name in the state directory.
pub const STATE_FILE: &str = "state";
/// The lock file's name in the state directory.
pub const LOCK_FILE: &str = "lock";
/// Where a damaged state file is moved (the last one only).
pub const BAD_STATE_FILE: &str = "state.bad";

const MAGIC: &[u8; 8] = b"P2PCLST1";
/// Largest state file read (a share of a 4 GiB file takes 160 KiB of piece hashes).
pub const MAX_STATE_LEN: u64 = 256 * 1024 * 1024;
/// Users remembered per client; shares and downloads remembered per user.
pub const MAX_USERS: usize = 1024;
pub const MAX_SHARES_PER_USER: usize = 65_536;
pub const MAX_DOWNLOADS_PER_USER: usize = 4096;
/// Longest path kept (bytes).
pub const MAX_PATH_LEN: usize = 4096;

/// Size and modification time of a file when it was shared: the cheap check that it is still
/// the file that was hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    pub size: u64,
    pub mtime_secs: i64,
    pub mtime_nanos: u32,
}

impl FileStamp {
    /// The stamp of a file's metadata.
    pub fn of(meta: &fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            size: meta.len(),
            mtime_secs: meta.mtime(),
            mtime_nanos: u32::try_from(meta.mtime_nsec()).unwrap_or(0),
        }
    }

    /// The stamp of the file at `path` (following symlinks).
    pub fn read(path: &Path) -> io::Result<FileStamp> {
        fs::metadata(path).map(|m| FileStamp::of(&m))
    }
}

/// A remembered share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedShare {
    pub group: GroupId,
    pub path: PathBuf,
    /// `None`: not known (the file is verified again before it is served).
    pub stamp: Option<FileStamp>,
    pub meta: FileMeta,
}

/// A remembered running download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedDownload {
    pub group: GroupId,
    pub name: FileName,
    pub target: PathBuf,
}

/// What one user left on this client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserState {
    pub shares: Vec<SavedShare>,
    pub downloads: Vec<SavedDownload>,
}

/// Everything the state file holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientState {
    pub users: BTreeMap<UserId, UserState>,
}

/// Why the state file could not be read.
#[derive(Debug)]
pub enum LoadError {
    /// It could not be read at all.
    Io { path: PathBuf, error: io::Error },
    /// Its contents are damaged (torn, truncated, overwritten, or not ours).
    Corrupt { path: PathBuf, reason: String },
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Io { path, error } => write!(f, "cannot read {}: {error}", path.display()),
            LoadError::Corrupt { path, reason } => {
                write!(f, "state file {} is corrupt ({reason})", path.display())
            }
        }
    }
}

impl std::error::Error for LoadError {}

/// The bytes of the state file for `state`.
pub fn encode(state: &ClientState) -> Vec<u8> {
    let mut body = Vec::new();
    put_u32(&mut body, state.users.len() as u32);
    for (user, u) in &state.users {
        put_str16(&mut body, user.as_str());
        put_u32(&mut body, u.shares.len() as u32);
        for s in &u.shares {
            put_str16(&mut body, s.group.as_str());
            put_bytes16(&mut body, s.path.as_os_str().as_bytes());
            match s.stamp {
                Some(st) => {
                    put_u8(&mut body, 1);
                    put_u64(&mut body, st.size);
                    put_u64(&mut body, st.mtime_secs as u64);
                    put_u32(&mut body, st.mtime_nanos);
                }
                None => put_u8(&mut body, 0),
            }
            s.meta.emit(&mut body);
        }
        put_u32(&mut body, u.downloads.len() as u32);
        for d in &u.downloads {
            put_str16(&mut body, d.group.as_str());
            put_str16(&mut body, d.name.as_str());
            put_bytes16(&mut body, d.target.as_os_str().as_bytes());
        }
    }
    let mut out = Vec::with_capacity(body.len() + 16);
    out.extend_from_slice(MAGIC);
    put_u32(&mut out, body.len() as u32);
    out.extend_from_slice(&body);
    put_u32(&mut out, crc32c::crc32c(&body));
    out
}

/// Reads the state file's bytes; any damage is an error, never a panic.
pub fn decode(bytes: &[u8]) -> Result<ClientState, String> {
    let mut r = Reader::new(bytes);
    let magic: [u8; 8] = r.array().map_err(|e| e.to_string())?;
    if &magic != MAGIC {
        return Err("not a p2pshare client state file".into());
    }
    let body_len = r.u32().map_err(|e| e.to_string())? as usize;
    let body = r.bytes(body_len).map_err(|_| "truncated".to_string())?;
    let crc = r.u32().map_err(|_| "truncated".to_string())?;
    r.finish().map_err(|e| e.to_string())?;
    if crc32c::crc32c(body) != crc {
        return Err("checksum mismatch".into());
    }
    decode_body(body).map_err(|e| e.to_string())
}

fn decode_body(body: &[u8]) -> Result<ClientState, DecodeError> {
    let mut r = Reader::new(body);
    let mut state = ClientState::default();
    let n_users = r.count(2 + 4 + 4)?;
    if n_users > MAX_USERS {
        return Err(DecodeError::BadValue("too many users"));
    }
    for _ in 0..n_users {
        let user = user_id(&mut r)?;
        let mut u = UserState::default();
        let n_shares = r.count(2 + 2 + 1)?;
        if n_shares > MAX_SHARES_PER_USER {
            return Err(DecodeError::BadValue("too many shares"));
        }
        for _ in 0..n_shares {
            let group = group_id(&mut r)?;
            let path = path(&mut r)?;
            let stamp = match r.u8()? {
                0 => None,
                1 => Some(FileStamp {
                    size: r.u64()?,
                    mtime_secs: r.u64()? as i64,
                    mtime_nanos: r.u32()?,
                }),
                _ => return Err(DecodeError::BadValue("stamp flag")),
            };
            let meta = FileMeta::parse(&mut r)?;
            u.shares.push(SavedShare {
                group,
                path,
                stamp,
                meta,
            });
        }
        let n_downloads = r.count(2 + 2 + 2)?;
        if n_downloads > MAX_DOWNLOADS_PER_USER {
            return Err(DecodeError::BadValue("too many downloads"));
        }
        for _ in 0..n_downloads {
            u.downloads.push(SavedDownload {
                group: group_id(&mut r)?,
                name: file_name(&mut r)?,
                target: path(&mut r)?,
            });
        }
        if state.users.insert(user, u).is_some() {
            return Err(DecodeError::BadValue("a user twice"));
        }
    }
    r.finish()?;
    Ok(state)
}

fn path(r: &mut Reader<'_>) -> Result<PathBuf, DecodeError> {
    let bytes = r.bytes16(MAX_PATH_LEN)?;
    let path = PathBuf::from(std::ffi::OsStr::from_bytes(bytes));
    if !path.is_absolute() {
        return Err(DecodeError::BadValue("relative path"));
    }
    Ok(path)
}

/// Reads `dir/state`. No file is an empty state.
pub fn load(dir: &Path) -> Result<ClientState, LoadError> {
    let path = dir.join(STATE_FILE);
    let io_err = |error| LoadError::Io {
        path: path.clone(),
        error,
    };
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(ClientState::default()),
        Err(e) => return Err(io_err(e)),
    };
    let len = file.metadata().map_err(io_err)?.len();
    if len > MAX_STATE_LEN {
        return Err(LoadError::Corrupt {
            path,
            reason: format!("{len} bytes, more than {MAX_STATE_LEN}"),
        });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    io::Read::read_to_end(&mut io::Read::take(file, MAX_STATE_LEN + 1), &mut bytes)
        .map_err(io_err)?;
    decode(&bytes).map_err(|reason| LoadError::Corrupt { path, reason })
}

/// Moves a damaged state file aside (to `state.bad`), so that the next save does not destroy
/// what someone may want to look at.
pub fn set_aside(dir: &Path) -> io::Result<PathBuf> {
    let bad = dir.join(BAD_STATE_FILE);
    fs::rename(dir.join(STATE_FILE), &bad)?;
    Ok(bad)
}

/// Writes `state` to `dir/state` atomically: a temporary file written and fsync'd, renamed over
/// the old one, then the directory fsync'd so that the rename itself is durable.
pub fn save(dir: &Path, state: &ClientState) -> io::Result<()> {
    write_atomically(dir, STATE_FILE, &encode(state))
}

/// Replaces `dir/name` by `bytes` (temporary file, fsync, rename, fsync of `dir`; mode 0600).
pub fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    // A temporary file left by a crash may have another mode: start afresh.
    let _ = fs::remove_file(&tmp);
    let mut options = File::options();
    options.write(true).create_new(true);
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}

/// The state directory's exclusive lock, held while the client runs (released on drop, or by
/// the kernel when the process dies).
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

/// Why the state directory could not be locked.
#[derive(Debug)]
pub enum LockError {
    /// Another process holds it.
    Held { dir: PathBuf },
    /// The directory or its lock file could not be made.
    Io { path: PathBuf, error: io::Error },
}

impl fmt::Display for LockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockError::Held { dir } => write!(
                f,
                "state directory {} is held by another running client (choose another with --state-dir)",
                dir.display()
            ),
            LockError::Io { path, error } => {
                write!(f, "cannot lock {}: {error}", path.display())
            }
        }
    }
}

impl std::error::Error for LockError {}

impl StateLock {
    /// Creates `dir` if needed (0700) and takes its lock without waiting.
    pub fn acquire(dir: &Path) -> Result<StateLock, LockError> {
        super::state_dir::ensure(dir).map_err(|error| LockError::Io {
            path: dir.to_path_buf(),
            error,
        })?;
        let path = dir.join(LOCK_FILE);
        let io_err = |error| LockError::Io {
            path: path.clone(),
            error,
        };
        let mut options = File::options();
        options.read(true).write(true).create(true).truncate(false);
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&path).map_err(io_err)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(LockError::Held {
                    dir: dir.to_path_buf(),
                })
            }
            Err(fs::TryLockError::Error(e)) => return Err(io_err(e)),
        }
        // The holder's pid, for a person wondering who holds it; the lock is what counts.
        let _ = file
            .set_len(0)
            .and_then(|()| writeln!(file, "{}", std::process::id()));
        Ok(StateLock { _file: file })
    }
}

#[cfg(test)]
#[path = "state_file_tests.rs"]
mod tests;
