//! What the client needs to know about the local file system before a command can go on:
//! whether a file to upload is a regular file (and its absolute path), and where a download
//! would be saved. The session core asks ([`Inspect`]) and the driver answers with
//! [`inspect`], so that the core itself touches no file. This is IO: it must hold no policy
//! beyond the SPEC's path rules (the core decides what the answers mean).

use std::path::{Path, PathBuf};

use super::state_file::FileStamp;
use crate::wire::FileName;

/// A question about the file system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inspect {
    /// `upload_file`: the file to hash and share.
    Upload { path: PathBuf },
    /// `download_file`: where `name` would be saved given `destination`.
    DownloadTarget {
        destination: PathBuf,
        name: FileName,
    },
}

/// The answer to an [`Inspect`]: a path to go on with, or the reason for the command to fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inspected {
    /// The file's absolute path (so it is served from there, whatever the working directory
    /// becomes) and its size and modification time before it is hashed.
    Upload(Result<(PathBuf, FileStamp), PathError>),
    /// The download's target, absolute: it does not exist, and its directory does.
    DownloadTarget(Result<PathBuf, PathError>),
}

/// Why a path cannot be used for a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathError {
    /// The file to upload cannot be read (the OS error, as text).
    Unreadable { path: PathBuf, error: String },
    /// The file to upload is a directory, a device, ...
    NotRegularFile(PathBuf),
    /// The download's target exists already (nothing is overwritten).
    TargetExists(PathBuf),
    /// The download's target would be in a directory that does not exist.
    NoDirectory(PathBuf),
    /// A running download of this client writes that target already (the session decides).
    AlreadyDownloading(PathBuf),
}

impl std::fmt::Display for PathError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PathError::Unreadable { path, error } => {
                write!(f, "cannot read {}: {error}", path.display())
            }
            PathError::NotRegularFile(path) => {
                write!(f, "{} is not a regular file", path.display())
            }
            PathError::TargetExists(path) => write!(f, "{} already exists", path.display()),
            PathError::NoDirectory(dir) => {
                write!(f, "directory {} does not exist", dir.display())
            }
            PathError::AlreadyDownloading(path) => write!(
                f,
                "{} is already the target of a running download",
                path.display()
            ),
        }
    }
}

/// Answers `query` from the file system.
pub fn inspect(query: &Inspect) -> Inspected {
    match query {
        Inspect::Upload { path } => Inspected::Upload(upload_source(path)),
        Inspect::DownloadTarget { destination, name } => {
            Inspected::DownloadTarget(download_target(destination, name))
        }
    }
}

fn upload_source(path: &Path) -> Result<(PathBuf, FileStamp), PathError> {
    let meta = std::fs::metadata(path).map_err(|e| PathError::Unreadable {
        path: path.to_path_buf(),
        error: e.to_string(),
    })?;
    if !meta.is_file() {
        return Err(PathError::NotRegularFile(path.to_path_buf()));
    }
    let absolute = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    Ok((absolute, FileStamp::of(&meta)))
}

/// Where `download_file` saves `name` given `destination` (see SPEC): an existing directory or
/// a path ending in `/` means `destination/name`. The target must not exist, its directory
/// must.
fn download_target(destination: &Path, name: &FileName) -> Result<PathBuf, PathError> {
    let text = destination.as_os_str().as_encoded_bytes();
    let target = if text.ends_with(b"/") || destination.is_dir() {
        destination.join(name.as_str())
    } else {
        destination.to_path_buf()
    };
    if target.symlink_metadata().is_ok() {
        return Err(PathError::TargetExists(target));
    }
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(PathError::NoDirectory(dir));
    }
    Ok(match (std::fs::canonicalize(&dir), target.file_name()) {
        (Ok(dir), Some(file)) => dir.join(file),
        _ => target,
    })
}
