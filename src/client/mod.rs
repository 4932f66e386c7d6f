//! The client: the command loop ([`command`] parsing, [`session`] core) and the mio reactor
//! that runs it ([`driver`]), with the peer links ([`transfers`]), the download engine
//! ([`download`]) and the progress line on a terminal ([`progress`]).

pub mod command;
pub mod download;
pub mod driver;
pub mod progress;
pub mod session;
pub mod transfers;
pub mod uplink;
pub mod uploader;
