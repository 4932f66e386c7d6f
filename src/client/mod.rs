//! The client: the command loop ([`command`] parsing, [`session`] core, [`disk`] facts it
//! asks for), the link to the trackers ([`uplink`] core), the peer links ([`transfers`]) with
//! the download engine ([`download`]) and the serving core ([`uploader`]), the mio reactor
//! that runs them all ([`driver`]), and the progress line on a terminal ([`progress`]).

pub mod command;
pub mod disk;
pub mod download;
pub mod driver;
pub mod progress;
pub mod session;
pub mod transfers;
pub mod uplink;
pub mod uploader;
