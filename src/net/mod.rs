//! mio plumbing shared by both programs: the connection table, buffered framed connections,
//! and the helpers that wake a reactor (stdin lines, signals).
//!
//! This is the thin, IO-doing shell around the sans-IO cores. It knows frames, not messages:
//! it hands whole frame payloads up and takes encoded bytes down. Reads and writes follow the
//! edge-triggered discipline of mio's `tcp_server` example: read or write until `WouldBlock`,
//! retry `Interrupted`, treat `Ok(0)` as the peer closing (after handling the frames before it),
//! and ask for `WRITABLE` only while bytes are pending.

pub mod conn;
pub mod peer_secure;
pub mod secure;
pub mod wake;

pub use conn::{Conn, ConnError, ConnTable, ReadEnd};

/// Names a connection across events. Slab keys are reused, so anything that outlives one event
/// (a pending reply, a hash result) carries the generation too, and a stale id finds nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    pub key: usize,
    pub generation: u64,
}

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.key, self.generation)
    }
}
