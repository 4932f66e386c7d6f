//! Which service key a client expects of each tracker: the key written on the tracker file's
//! lines, else the one the client saw the first time it reached that tracker (trust on first
//! use, remembered in `known_trackers` in its state directory, as SSH's `known_hosts`), else
//! the one remembered for another tracker of the file (all trackers of a file are one service
//! with one key: a tracker refused for a mismatch must not be followed by trusting the next
//! on first use). Only a state directory that remembers none of the file's trackers trusts on
//! first use.
//!
//! [`TrackerKeys::expected`] is pure; only [`KnownTrackers::load`] and
//! [`KnownTrackers::remember`] touch the disk (the file is replaced atomically: temporary
//! file, fsync, rename; mode 0600). A known-trackers file that is corrupt, too large or
//! accessible to group or others is an error naming the file: ignoring it would silently
//! trust whoever answers next. The file holds at most [`MAX_ENTRIES`] entries.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::cli::TrackerLine;
use crate::keys::PublicKey;

/// The file's name inside the state directory.
pub const FILE_NAME: &str = "known_trackers";
/// Most trackers remembered; a file with more is refused as corrupt.
pub const MAX_ENTRIES: usize = 4096;
/// Longest file read (an entry is about 100 bytes).
const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Why the known-trackers file cannot be used.
#[derive(Debug)]
pub enum KnownError {
    Io {
        path: PathBuf,
        err: io::Error,
    },
    Corrupt {
        path: PathBuf,
        line: usize,
        why: String,
    },
    Permissions {
        path: PathBuf,
        mode: u32,
    },
}

impl fmt::Display for KnownError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KnownError::Io { path, err } => write!(f, "known trackers {}: {err}", path.display()),
            KnownError::Corrupt { path, line, why } => write!(
                f,
                "known trackers {} line {line}: {why} (fix or remove the line)",
                path.display()
            ),
            KnownError::Permissions { path, mode } => write!(
                f,
                "known trackers {} is accessible to group or others (mode {:04o}): chmod 600 {}",
                path.display(),
                mode & 0o7777,
                path.display()
            ),
        }
    }
}

impl std::error::Error for KnownError {}

/// The trackers this client has trusted on first use.
#[derive(Debug, Default)]
pub struct KnownTrackers {
    /// Where they are kept; `None` when the client has no state directory (nothing is then
    /// remembered across runs).
    path: Option<PathBuf>,
    entries: BTreeMap<SocketAddr, PublicKey>,
}

impl KnownTrackers {
    /// Nothing known and nowhere to keep it.
    pub fn in_memory() -> Self {
        KnownTrackers::default()
    }

    /// Reads `state_dir/known_trackers` (a missing file or directory is an empty list).
    pub fn load(state_dir: &Path) -> Result<Self, KnownError> {
        let path = state_dir.join(FILE_NAME);
        let io_err = |err| KnownError::Io {
            path: path.clone(),
            err,
        };
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(KnownTrackers {
                    path: Some(path),
                    entries: BTreeMap::new(),
                })
            }
            Err(e) => return Err(io_err(e)),
        };
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = file.metadata().map_err(io_err)?.permissions().mode();
            if mode & 0o077 != 0 {
                return Err(KnownError::Permissions { path, mode });
            }
        }
        let mut bytes = Vec::new();
        file.take(MAX_FILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(io_err)?;
        let corrupt = |line: usize, why: String| KnownError::Corrupt {
            path: path.clone(),
            line,
            why,
        };
        if bytes.len() as u64 > MAX_FILE_BYTES {
            return Err(corrupt(0, format!("larger than {MAX_FILE_BYTES} bytes")));
        }
        let text = String::from_utf8(bytes).map_err(|_| corrupt(0, "not UTF-8".into()))?;
        let entries = parse(&text).map_err(|(line, why)| corrupt(line, why))?;
        Ok(KnownTrackers {
            path: Some(path),
            entries,
        })
    }

    /// The key remembered for `addr`.
    pub fn get(&self, addr: SocketAddr) -> Option<PublicKey> {
        self.entries.get(&addr).copied()
    }

    /// Where the list is kept, if anywhere.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Remembers `key` for `addr` and writes the file (creating the state directory, 0700).
    /// In memory it is remembered even if writing fails.
    pub fn remember(&mut self, addr: SocketAddr, key: PublicKey) -> Result<(), KnownError> {
        if self.entries.get(&addr) == Some(&key) {
            return Ok(());
        }
        if self.entries.len() >= MAX_ENTRIES && !self.entries.contains_key(&addr) {
            // Keep the bound: forget the lowest address (trackers are few; this never
            // happens in practice).
            self.entries.pop_first();
        }
        self.entries.insert(addr, key);
        let Some(path) = self.path.clone() else {
            return Ok(());
        };
        let io_err = |err| KnownError::Io {
            path: path.clone(),
            err,
        };
        if let Some(dir) = path.parent() {
            super::state_dir::ensure(dir).map_err(io_err)?;
        }
        let tmp = path.with_extension("tmp");
        let mut options = File::options();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&tmp).map_err(io_err)?;
        file.write_all(encode(&self.entries).as_bytes())
            .map_err(io_err)?;
        file.sync_all().map_err(io_err)?;
        drop(file);
        std::fs::rename(&tmp, &path).map_err(io_err)
    }
}

/// The file's text: a comment, then `address key` per line, sorted by address.
pub fn encode(entries: &BTreeMap<SocketAddr, PublicKey>) -> String {
    let mut text = String::from(
        "# Service keys of trackers this client trusted on first use (address key).\n\
         # A tracker presenting another key is refused; remove its line to trust it anew.\n",
    );
    for (addr, key) in entries {
        text.push_str(&format!("{addr} {key}\n"));
    }
    text
}

/// Parses the file's text; an error carries the 1-based line number.
pub fn parse(text: &str) -> Result<BTreeMap<SocketAddr, PublicKey>, (usize, String)> {
    let mut entries = BTreeMap::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let [addr, key] = words.as_slice() else {
            return Err((n + 1, "expected an address and a key".into()));
        };
        let addr: SocketAddr = addr
            .parse()
            .map_err(|_| (n + 1, format!("'{addr}' is not an address")))?;
        let key: PublicKey = key.parse().map_err(|e| (n + 1, e))?;
        if entries.len() >= MAX_ENTRIES {
            return Err((n + 1, format!("more than {MAX_ENTRIES} entries")));
        }
        entries.insert(addr, key);
    }
    Ok(entries)
}

/// Where an expected key comes from, for the refusal message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// Written on this tracker's line of the tracker file.
    OwnLine,
    /// Written on another tracker's line (every tracker of a file is one service).
    OtherLine(SocketAddr),
    /// Seen at this address before and remembered in this file.
    Remembered(Option<PathBuf>),
    /// Seen at another tracker of the file (this address) before, and remembered in this
    /// file: the same service.
    RememberedOther(SocketAddr, Option<PathBuf>),
}

/// The keys a client expects of its trackers.
#[derive(Debug)]
pub struct TrackerKeys {
    lines: Vec<TrackerLine>,
    pub known: KnownTrackers,
}

impl TrackerKeys {
    pub fn new(lines: Vec<TrackerLine>, known: KnownTrackers) -> Self {
        TrackerKeys { lines, known }
    }

    /// The key `addr` must present, and where that expectation comes from: its own line's
    /// key, else a key on another line of the file, else the key remembered for it. `None`:
    /// trust on first use.
    pub fn expected(&self, addr: SocketAddr) -> Option<(PublicKey, KeySource)> {
        if let Some(key) = self
            .lines
            .iter()
            .find(|l| l.addr == addr)
            .and_then(|l| l.key)
        {
            return Some((key, KeySource::OwnLine));
        }
        if let Some(line) = self.lines.iter().find(|l| l.key.is_some()) {
            return line.key.map(|k| (k, KeySource::OtherLine(line.addr)));
        }
        let path = || self.known.path().map(Path::to_path_buf);
        if let Some(key) = self.known.get(addr) {
            return Some((key, KeySource::Remembered(path())));
        }
        // Every tracker of a file presents the service's one key: a key remembered for
        // another of them binds this one too, so that a tracker refused for a mismatch is not
        // followed by trusting the next on first use.
        self.lines.iter().find_map(|line| {
            let key = self.known.get(line.addr)?;
            Some((key, KeySource::RememberedOther(line.addr, path())))
        })
    }

    /// The refusal of a tracker that presented `presented` instead of `expected`.
    pub fn refusal(
        addr: SocketAddr,
        presented: PublicKey,
        expected: PublicKey,
        source: &KeySource,
    ) -> String {
        let whence = match source {
            KeySource::OwnLine => "on its line of the tracker file".to_string(),
            KeySource::OtherLine(other) => {
                format!("on the tracker file's line of {other}, the same service")
            }
            KeySource::Remembered(Some(path)) => format!(
                "remembered in {} when first used; if the service's key was changed on \
                 purpose, remove that line",
                path.display()
            ),
            KeySource::Remembered(None) => "seen earlier in this run".to_string(),
            KeySource::RememberedOther(other, Some(path)) => format!(
                "remembered for {other}, a tracker of the same service, in {} when first \
                 used; if the service's key was changed on purpose, remove that line",
                path.display()
            ),
            KeySource::RememberedOther(other, None) => {
                format!("seen at {other}, a tracker of the same service, earlier in this run")
            }
        };
        format!(
            "tracker {addr} refused: it presents service key {presented}, but the expected \
             key is {expected} ({whence})"
        )
    }
}

#[cfg(test)]
#[path = "known_trackers_tests.rs"]
mod tests;
