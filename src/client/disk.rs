//! What the client needs to know about the local file system before a command can go on:
//! whether a file to upload is a regular file (and its absolute path), and where a download
//! would be saved. The session core asks ([`Inspect`]) and the driver answers with
//! [`inspect`], so that the core itself touches no file. This is IO: it must hold no policy
//! beyond the SPEC's path rules (the core decides what the answers mean).

use std::path::{Path, PathBuf};

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
    /// becomes).
    Upload(Result<PathBuf, String>),
    /// The download's target, absolute: it does not exist, and its directory does.
    DownloadTarget(Result<PathBuf, String>),
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

fn upload_source(path: &Path) -> Result<PathBuf, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    Ok(std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()))
}

/// Where `download_file` saves `name` given `destination` (see SPEC): an existing directory or
/// a path ending in `/` means `destination/name`. The target must not exist, its directory
/// must.
fn download_target(destination: &Path, name: &FileName) -> Result<PathBuf, String> {
    let text = destination.as_os_str().as_encoded_bytes();
    let target = if text.ends_with(b"/") || destination.is_dir() {
        destination.join(name.as_str())
    } else {
        destination.to_path_buf()
    };
    if target.symlink_metadata().is_ok() {
        return Err(format!("{} already exists", target.display()));
    }
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(format!("directory {} does not exist", dir.display()));
    }
    Ok(match (std::fs::canonicalize(&dir), target.file_name()) {
        (Ok(dir), Some(file)) => dir.join(file),
        _ => target,
    })
}
