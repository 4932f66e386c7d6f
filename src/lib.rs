//! p2pshare: peer-to-peer file sharing for groups.
//!
//! Trackers keep the metadata (users, groups, who shares what, piece hashes); file data only
//! ever moves between peers. Two programs are built from this crate: `tracker_program` and
//! `client_program` (see `src/bin`). The README describes the commands and the wire format.
//!
//! # Codemap
//!
//! Words: a *tracker link* joins a client to a tracker (`wire::tracker_link`); trackers talk
//! to each other over *replication links* (`wire::replication`, `tracker::replica`); a
//! *peer* is always a client, and clients talk to each other over *peer links*
//! (`wire::peer_link`, `client::transfers`): a downloader's *fetch link* is a sharer's *serve
//! link*.
//!
//! - [`wire`]: the binary wire format of every link. `codec` (field readers and writers,
//!   `DecodeError`), `frame` (length prefixes, `FrameBuffer`), `ids` (validated ids),
//!   `tracker_link` (client to tracker), `replication` (tracker to tracker), `ops` (the
//!   replicated changes `Op`/`Entry` and their ids), `peer_link` (client to client, with the
//!   streaming `SharerStream` decoder), `ticket` (the encoding of the service's signed
//!   permission to download; signing and checking are `keys`'). Architecture Invariant: no
//!   IO, `parse` never panics, and `wire` depends on nothing but itself and [`bitfield`].
//! - [`bitfield`]: which pieces a peer holds. Plain data.
//! - [`net`]: mio plumbing shared by both programs: the slab `ConnTable`, buffered framed
//!   connections (`conn`), stdin and signal wake-ups (`wake`), and `secure`, the sans-IO
//!   Noise handshake and record layer that replication links and clients' tracker links run
//!   under, and `peer_secure`, the peer links' Noise `IK` handshake and record layer (a
//!   block's data decrypted in place where it lands). Architecture
//!   Invariant: knows frames, not messages; no policy.
//! - [`keys`]: the service key file and the keys derived from it (the replication-link PSK,
//!   the Ed25519 signing key whose public half is the service's public key, the client links'
//!   static key and its certificate).
//! - [`tracker`]: `state` (the deterministic [`tracker::state::TrackerState::apply`]; its
//!   child `snapshot` encodes the whole state), `core` (sans-IO request handling per
//!   connection), `replica` (sans-IO replication: primary, backups, takeover; data that
//!   only one role means lives in that `Role` variant), `ring` (the recent batches a tracker
//!   keeps, by claim, to send a joiner only the entries it lacks), `durable` (what the replica asks to write, as
//!   `Persist` values, and the state restored from disk), `tickets` (the tickets issued
//!   with a file's sharers), `password` (Argon2id on helper threads) with `password_queue`
//!   (sans-IO, fair and bounded: which password job runs next), `disk` (the data directory:
//!   `format` of the CRC-checked log segments and snapshots, `recover`, and the `writer`,
//!   the disk thread that fsyncs off the reactor), `driver` (the mio reactor). Architecture
//!   Invariant: state changes only through `apply`; everything a tracker answers derives
//!   from the state; a tracker that was stalled serves nothing until it has learned the
//!   current view; an entry counts (acknowledged, committed) only once its write is durable.
//! - [`client`]: `command` (line parsing), `session` (sans-IO command-loop core), `uplink`
//!   (sans-IO tracker link: which tracker, timeouts, pings, backoff), `download` (`picker`
//!   and the sans-IO `engine` of one download), `outcome` (what a download reports to the
//!   command loop: `Started`, `Completed`, `SharersError`, printed through `Display`),
//!   `uploader` (sans-IO serving core: accept or refuse, block or reject), `slots` (sans-IO upload slots: which serve links send now,
//!   which piece first), `unsent` (sans-IO: how much a serve socket may hold unsent, from the
//!   link's rate), `transfers` (the peer links' IO: `downloads`, `fetch`, `serve`),
//!   `disk` (the file-system facts the session core asks for), `progress` (the progress line),
//!   `shell` (line editing, `history`, `complete`, `help` and `listing` at a terminal; batch
//!   input never goes through it), `state_dir` (where a client keeps what it remembers),
//!   `state_file` (its users' shares and downloads, written atomically, and the directory's
//!   lock), `part_record` (the resume record beside a `.part`), `known_trackers` (the service
//!   key each tracker must present; first-use trust), `identity` (the client's X25519
//!   identity key, which its peer links prove), `driver` (the mio reactor).
//!   Architecture Invariant: the reactor never blocks: sockets are non-blocking (tracker
//!   connects included), hashing runs on the pool, stdin on its thread (`tests/uplink.rs`
//!   shows a download going on while the client fails over toward a tracker that accepts
//!   no connection).
//! - [`hasher`]: the SHA1 worker pool (files to share, downloaded pieces, a download's
//!   whole-file digest). [`storage`]: memory-mapped files and the piece-ownership rule.
//!   Architecture Invariant: a piece leaves `Hashing` only through its ticket's verdict, and
//!   `ReadOnly` is final.
//! - [`cli`]: `tracker_info.txt`, common options, logging. [`rng`]: a seeded generator for
//!   tests and tie-breaking, never for secrets. `testing` (tests only): the helpers the unit
//!   tests share.
//!
//! # Architecture invariants
//!
//! - Architecture Invariant: the cores (`tracker::state` with `snapshot`, `tracker::core`,
//!   `tracker::replica`, `tracker::password_queue`, `client::session`, `client::command`,
//!   `client::uplink`, `client::uploader`, `client::slots`, `client::unsent`, `client::download::{picker,
//!   engine}`, `wire`, `net::secure`) do no IO: no `mio`, no sockets, no files, no
//!   `Instant::now()`. Time is an argument. They use ordered maps. `tests/tidy.rs` checks
//!   this, and that the crate doc names every module.
//! - Architecture Invariant: tracker state changes only through `TrackerState::apply(&Op)`,
//!   which is deterministic, so replicas applying the same ops in order hold equal states.
//! - Architecture Invariant: `parse` never panics on any input and never allocates from an
//!   unchecked count; a frame's length is checked against the link's maximum as soon as its
//!   four length bytes arrive.
//! - Architecture Invariant: `wire` depends on nothing but itself and `bitfield`; the tracker
//!   and the client depend on `wire`, never the other way round. `tests/tidy.rs` checks it.
//! - Architecture Invariant: `unsafe` appears only in `storage.rs`.
//! - Architecture Invariant: a tracker accepts the tracker hello only on a connection whose
//!   Noise handshake proved the peer holds the service's secret; no frame of a tracker link
//!   crosses the network in clear.
//! - Architecture Invariant: no file data crosses a peer link in clear: peer links run the
//!   `IK` handshake to the identity key the tracker named, and a sharer serves only a ticket
//!   naming the key the downloader proved (the plain protocol exists only behind the
//!   benchmark's environment switch).
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
#[cfg(test)]
mod testing;
pub mod tracker;
pub mod wire;
