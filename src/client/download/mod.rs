//! The downloads core: the sans-IO bookkeeping of one download.
//!
//! [`picker::Picker`] decides which blocks to ask which peer for (rarest first, partial pieces
//! first, pipelining, end-game) and tracks every block from request to verification, which is
//! where the piece-ownership rule is enforced: a piece's bytes may be written only while it is
//! downloading, by the one peer whose copy of the block was accepted, never while the hasher
//! verifies it, and never after.
//!
//! Nothing here does IO: no sockets, clocks, threads, files or OS randomness. The driver feeds
//! events in (a peer's piece set, a block header, a finished write, a hash result) and performs
//! what comes out (requests, cancels, hash jobs, closing banned peers).

pub mod engine;
pub mod picker;

#[cfg(test)]
#[path = "swarm_tests.rs"]
mod swarm_tests;
