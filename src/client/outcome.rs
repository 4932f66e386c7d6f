//! What the peer-link side tells the command loop about a download, as values: a download
//! that started ([`Started`]), one that completed ([`Completed`]), and why the sharers of a
//! running download could not be listed ([`SharersError`]).
//!
//! The session core prints these through their `Display`, which is where the user-visible
//! wording lives; nothing here does IO or reads a clock (the elapsed time comes in).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::wire::{FileName, GroupId};

/// A download that started (or resumed): the line `download_file` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    pub name: FileName,
    pub group: GroupId,
    pub target: PathBuf,
    pub size: u64,
    /// Sharers online when it started.
    pub n_sharers: usize,
    /// Resumed from an interrupted `.part`: how many of its pieces it verifies again, out of
    /// how many.
    pub resumed: Option<Resumed>,
}

/// How much of an interrupted download's `.part` is taken up again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resumed {
    pub to_verify: usize,
    pub n_pieces: usize,
}

impl fmt::Display for Started {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Started {
            name,
            group,
            target,
            size,
            n_sharers,
            resumed,
        } = self;
        match resumed {
            None => write!(
                f,
                "download of {name} from group {group} started: {} ({size} bytes, {n_sharers} sharers online)",
                target.display()
            ),
            Some(Resumed {
                to_verify,
                n_pieces,
            }) => write!(
                f,
                "download of {name} from group {group} resumed: {} ({size} bytes, {n_sharers} sharers online, \
                 {to_verify} of {n_pieces} pieces to verify again)",
                target.display()
            ),
        }
    }
}

/// A download that completed: its file is in place under `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completed {
    pub name: FileName,
    pub group: GroupId,
    pub target: PathBuf,
    pub size: u64,
    /// From the start of the download to its completion.
    pub elapsed: Duration,
}

impl fmt::Display for Completed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs_f64().max(1e-6);
        let size = self.size;
        write!(
            f,
            "downloaded {} from group {} to {} ({size} bytes in {secs:.3} s, {:.1} MiB/s)",
            self.name,
            self.group,
            self.target.display(),
            size as f64 / (1024.0 * 1024.0) / secs
        )
    }
}

/// Why the sharers of a running download could not be listed (the download asks again
/// later).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SharersError {
    /// No user is logged in on this client.
    NotLoggedIn,
    /// The tracker refused, with its message.
    Refused(String),
    /// The tracker answered with something else than a list of sharers.
    Unexpected(String),
    /// The link to the tracker was lost before the answer came.
    ConnectionLost,
}

impl fmt::Display for SharersError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SharersError::NotLoggedIn => f.write_str("not logged in"),
            SharersError::Refused(message) => f.write_str(message),
            SharersError::Unexpected(answer) => write!(f, "unexpected answer {answer}"),
            SharersError::ConnectionLost => f.write_str("lost the connection to the tracker"),
        }
    }
}

#[cfg(test)]
#[path = "outcome_tests.rs"]
mod tests;
