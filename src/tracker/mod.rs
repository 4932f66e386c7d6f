//! The tracker: a deterministic state ([`state`]), the sans-IO request handling around it
//! ([`core`]) and the mio reactor that feeds it ([`driver`]).

pub mod core;
pub mod disk;
pub mod driver;
pub mod durable;
pub mod password;
pub mod password_queue;
pub mod replica;
pub mod ring;
pub mod state;
pub mod tickets;
