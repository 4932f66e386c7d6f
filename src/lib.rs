//! p2pshare: peer-to-peer file sharing for groups.
//!
//! Trackers keep the metadata (users, groups, who shares what, piece hashes); file data only
//! ever moves between peers. Two programs are built from this crate: `tracker_program` and
//! `client_program` (see `src/bin`). The README describes the commands and the wire format.
//!
//! # Codemap
//!
//! - [`wire`]: the binary wire format of every link: framing, validated ids, messages with
//!   `parse`/`emit`. No IO.
//! - [`net`]: mio plumbing shared by both programs: the slab connection table, buffered framed
//!   connections, stdin and signal wake-ups; `net::secure`, the sans-IO Noise handshake and
//!   record layer that tracker links run under.
//! - [`keys`]: the service key file and the keys derived from it (tracker-link PSK, Ed25519
//!   signing key).
//! - [`tracker`]: `state` (the deterministic [`tracker::state::TrackerState::apply`]), `core`
//!   (sans-IO request handling), `driver` (the mio reactor), `password` (Argon2id).
//! - [`tracker::disk`]: the tracker's data directory: CRC-checked log segments, snapshots,
//!   recovery, and the disk thread that fsyncs off the reactor (group commit).
//! - [`client`]: `command` (line parsing), `session` (sans-IO command-loop core), `driver`
//!   (the mio reactor), `shell` (line editing, history and completion at a terminal; batch
//!   input never goes through it), `state_dir` (where a client keeps what it remembers).
//! - [`hasher`]: the SHA1 worker pool. [`storage`]: memory-mapped files.
//! - [`cli`]: `tracker_info.txt`, common options, logging.
//!
//! # Architecture invariants
//!
//! - Architecture Invariant: the cores (`tracker::state`, `tracker::core`, `client::session`,
//!   `client::command`, `wire`, `net::secure`) do no IO: no `mio`, no sockets, no `Instant::now()`. Time is
//!   an argument. `tests/tidy.rs` checks this.
//! - Architecture Invariant: tracker state changes only through `TrackerState::apply(&Op)`,
//!   which is deterministic, so replicas applying the same ops in order hold equal states.
//! - Architecture Invariant: `parse` never panics on any input and never allocates from an
//!   unchecked count; a frame's length is checked against the link's maximum as soon as its
//!   four length bytes arrive.
//! - Architecture Invariant: `unsafe` appears only in `storage.rs`.
//! - Architecture Invariant: a tracker accepts the tracker hello only on a connection whose
//!   Noise handshake proved the peer holds the service's secret; no frame of a tracker link
//!   crosses the network in clear.
//! - Architecture Invariant: passwords exist in clear only in the request that carries them;
//!   the tracker stores and logs nothing but an Argon2id PHC string.

pub mod bitfield;
pub mod cli;
pub mod client;
pub mod hasher;
pub mod keys;
pub mod net;
pub mod rng;
pub mod storage;
pub mod tracker;
pub mod wire;
