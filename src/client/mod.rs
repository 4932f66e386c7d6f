//! The client: the command loop ([`command`] parsing, [`session`] core) and the mio reactor
//! that runs it ([`driver`]).

pub mod command;
pub mod download;
pub mod driver;
pub mod session;
pub mod transfers;
