//! The client: the command loop ([`command`] parsing, [`session`] core, [`disk`] facts it
//! asks for), the link to the trackers ([`uplink`] core), the peer links ([`transfers`]) with
//! the download engine ([`download`]) and what they report of a download ([`outcome`]), the serving core ([`uploader`]), the upload slots
//! ([`slots`]) and each serve socket's unsent limit ([`unsent`]), the mio reactor
//! that runs them all ([`driver`]), and the progress line on a terminal ([`progress`]). At a
//! terminal the [`shell`] reads the commands (line editing, [`history`], [`complete`],
//! [`help`], [`listing`]); the [`state_dir`] holds what a client remembers between runs: the
//! [`state_file`] (shares and downloads per user), the shell's history, and the trackers' keys
//! trusted on first use ([`known_trackers`]); a download's `.part` carries its [`part_record`]
//! so that it can resume.

pub mod command;
pub mod complete;
pub mod disk;
pub mod download;
pub mod driver;
pub mod help;
pub mod history;
pub mod identity;
pub mod known_trackers;
pub mod listing;
pub mod outcome;
pub mod part_record;
pub mod progress;
pub mod session;
pub mod shell;
pub mod slots;
pub mod state_dir;
pub mod state_file;
pub mod transfers;
pub mod unsent;
pub mod uplink;
pub mod uploader;
