//! The client: the command loop ([`command`] parsing, [`session`] core) and the mio reactor
//! that runs it ([`driver`]), with the peer links ([`transfers`]), the download engine
//! ([`download`]) and the progress line on a terminal ([`progress`]). At a terminal the
//! [`shell`] reads the commands (line editing, [`history`], [`complete`], [`help`]); the
//! [`state_dir`] holds what a client remembers between runs.

pub mod command;
pub mod complete;
pub mod download;
pub mod driver;
pub mod help;
pub mod history;
pub mod listing;
pub mod progress;
pub mod session;
pub mod shell;
pub mod state_dir;
pub mod transfers;
