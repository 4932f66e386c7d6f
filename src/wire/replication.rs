//! Messages of the replication link: trackers talking to trackers. (Clients talk to clients
//! over peer links, `wire::peer_link`; a client talks to a tracker over the tracker link,
//! `wire::tracker_link`.)
//!
//! A tracker dials every other tracker of the file when it starts and accepts links from them
//! at any time, on the same port clients use. The dialing side opens with the client-link
//! handshake frame in its tracker form (`ClientMsg::Hello` with `Role::Tracker`); the accepting
//! side answers with [`ReplMsg::Hello`], which has the same layout. After that both sides send
//! [`ReplMsg`]s, the first of them a [`ReplMsg::Status`]. Frames are at most
//! [`MAX_REPLICATION_FRAME`] bytes; the replication protocol that uses them is described in
//! `tracker::replica`.
//!
//! Same contract as the rest of `wire`: `parse` never panics and is a [`DecodeError`] on any
//! malformed frame (including bytes left over after the last field), `emit` never panics, and
//! every count is checked against the bytes that remain before anything is allocated. The
//! encoding is canonical: a frame that parses emits back to exactly the same bytes.
//!
//! Field types, big-endian:
//! - `str`: `u16 len | UTF-8 bytes`; user and group ids (1 to 64 bytes), file names (1 to 255)
//!   and password hashes (at most [`MAX_PW_HASH_LEN`] bytes, may be empty)
//! - `addr`: `u8 family (4|6) | 4 or 16 address bytes | u16 port`
//! - `file_meta`: `str name | u64 size | u32 piece_len | sha1 file_sha1 | u32 n | sha1 * n`
//!   (as on the client link: `piece_len` in 1..=16 MiB, `n` matches the size)
//! - `tracker_ref`: `u16 no | u64 incarnation`
//! - `token`: 16 bytes
//! - `entry`: `u8 has_origin (0|1) | (u64 client | u64 req_id)? | op`
//! - `op`: `u8 kind | fields` (the kinds and their fields are listed at [`encode_op`])
//! - `batch`: `u64 view | u64 first_seq | u32 n | entry * n`
//!
//! Frames (after `u32 length | u8 type`):
//! - `0x01` Hello: `u32 magic | u16 version | u8 role (2) | tracker_ref`
//! - `0x40` Status: `u8 kind | u64 view | (u16 primary if serving, else u64 applied | u64
//!   waiting)`; kind 0 starting, 1 serving, 2 starting and the founder of the service
//! - `0x41` Heartbeat: no fields
//! - `0x42` Forward: `u32 n | entry * n`
//! - `0x43` Batch: `batch`
//! - `0x44` Ack: `u64 view | u64 seq`
//! - `0x45` Commit: `u64 view | u64 seq`
//! - `0x46` Takeover: `u64 view | u64 applied`
//! - `0x47` TakeoverAck: `u64 view | u8 serving (0|1) | u64 applied | u8 kind | batch?`, kind
//!   0 none, 1 batch (followed by the `batch`), 2 snapshot
//! - `0x48` JoinRequest: nothing, or `u64 applied | u64 view | u16 primary` (the joiner's
//!   position: see [`JoinPosition`]; the empty form is an earlier build's, or a tracker with
//!   no state to offer, and always gets a snapshot)
//! - `0x49` SnapshotPart: `u32 len | bytes` (`len` at most [`SNAPSHOT_PART_LEN`])
//! - `0x4a` Snapshot: `u64 view | u64 seq | u64 len` (`len` at most [`MAX_SNAPSHOT_LEN`])
//! - `0x4b` SuffixPart: `batch`: the next entries a joiner lacks (sent instead of a snapshot)
//! - `0x4c` Suffix: `u64 view | u64 seq`: the suffix parts are complete; with them the joiner
//!   holds the primary's entries up to `seq`
//!
//! Compatibility: a build of this protocol version before `0x4b`/`0x4c` sends the empty
//! `JoinRequest`, which is still read (and answered with a snapshot); it cannot read the form
//! with a position, so mixing such builds in one service needs the earlier build as primary
//! or a restart of the joiners on the new build. Nor can an earlier build read a `Status` of
//! kind 2 (a starting founder) or the ops of kinds 16-18 (changes carrying quotas) and 19-21
//! (session changes naming the client's link): every tracker of one service should run the
//! same build.

use super::codec::*;
use super::frame;
use super::ops::{Entry, Op, OpQuotas, Origin, SessionId, TrackerRef};
use super::tracker_link::{put_share_list, share_list, FileMeta};
use super::PROTOCOL_MAGIC;

/// Largest frame on a tracker-to-tracker link: one forwarded `upload_file` entry can be as large
/// as a client frame (16 MiB), plus room for the batch around it.
pub const MAX_REPLICATION_FRAME: usize = 32 * 1024 * 1024;
/// Bytes of snapshot carried per [`ReplMsg::SnapshotPart`].
pub const SNAPSHOT_PART_LEN: usize = 4 * 1024 * 1024;
/// Largest snapshot a tracker accepts (sum of its parts).
pub const MAX_SNAPSHOT_LEN: u64 = 4 * 1024 * 1024 * 1024;
/// Longest password hash (a PHC string) an op may carry, in bytes.
pub const MAX_PW_HASH_LEN: usize = 512;

/// What a tracker says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplStatus {
    /// Not serving clients: starting, or copying the state. `view` and `applied` place the
    /// state it holds: the view in which it last accepted entries (or a state), and how many
    /// entries it has applied. Among trackers that find nobody serving, the one whose state is
    /// furthest on starts the service.
    ///
    /// `waiting` names (bit `no - 1` for tracker `no`, trackers 1 to 64) the trackers it waits
    /// for before it may start the service: they may hold a state further on than its own.
    /// Whoever counts on this tracker's position waits for them too.
    ///
    /// `founder`: this tracker founded the service (its founder marker names its data
    /// directory), so it may start the service with no state.
    Starting {
        view: u64,
        applied: u64,
        waiting: u64,
        founder: bool,
    },
    /// Serving clients in `view`, whose primary is tracker `primary`.
    Serving { view: u64, primary: u16 },
}

/// Consecutive entries in the primary's order, starting at sequence number `first_seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub view: u64,
    pub first_seq: u64,
    pub entries: Vec<Entry>,
}

/// Where a joining tracker's state stands: it applied `applied` entries, and they are a prefix
/// of the sequence ordered under the claim (`view`, `primary`): the claim under which it last
/// accepted entries or a state. `primary` 0 means that history is unknown (the metadata of an
/// earlier build, or an install whose metadata did not reach the disk): such a joiner gets a
/// snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JoinPosition {
    pub applied: u64,
    pub view: u64,
    pub primary: u16,
}

/// What a tracker hands a new primary along with its takeover acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Catchup {
    /// Nothing: the new primary is as far as this tracker.
    None,
    /// The last batch this tracker applied (the new primary lacks it).
    Batch(Batch),
    /// The whole state, sent just before as `SnapshotPart`s.
    Snapshot,
}

/// Tracker to tracker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplMsg {
    /// `0x01`: `u32 magic | u16 version | u8 role (2) | u16 tracker_no | u64 incarnation`: the
    /// accepting side's answer to a tracker's handshake.
    Hello { version: u16, tracker: TrackerRef },
    /// `0x40`: `u8 serving | u64 view | (u16 primary | u64 applied u64 waiting)`: the sender's status,
    /// sent first and whenever it changes.
    Status(ReplStatus),
    /// `0x41`: no fields; sent when a link has been quiet for a while.
    Heartbeat,
    /// `0x42`: `u32 n | entry * n`: changes a backup's clients asked for, for the primary to
    /// order.
    Forward { entries: Vec<Entry> },
    /// `0x43`: `batch`: primary to backup; apply and acknowledge.
    Batch(Batch),
    /// `0x44`: `u64 view | u64 seq`: backup to primary; everything up to `seq` is applied.
    Ack { view: u64, seq: u64 },
    /// `0x45`: `u64 view | u64 seq`: primary to backup; everything up to `seq` is on every
    /// live tracker, so answers waiting for it may go out.
    Commit { view: u64, seq: u64 },
    /// `0x46`: `u64 view | u64 applied`: the sender takes over as primary of `view`; it has
    /// applied up to `applied`.
    Takeover { view: u64, applied: u64 },
    /// `0x47`: `u64 view | u8 serving | u64 applied | u8 kind | batch?`: answer to `Takeover`
    /// (kind 0 none, 1 batch, 2 snapshot).
    TakeoverAck {
        view: u64,
        serving: bool,
        applied: u64,
        catchup: Catchup,
    },
    /// `0x48`: `(u64 applied | u64 view | u16 primary)?`: a starting tracker asks the
    /// primary for the state, saying where its own stands (`None`: it offers none).
    JoinRequest(Option<JoinPosition>),
    /// `0x49`: `u32 len | bytes`: the next piece of a snapshot (at most `SNAPSHOT_PART_LEN`).
    SnapshotPart { data: Vec<u8> },
    /// `0x4a`: `u64 view | u64 seq | u64 len`: the snapshot sent in parts is complete; it is
    /// the state after entry `seq`, `len` bytes long.
    Snapshot { view: u64, seq: u64, len: u64 },
    /// `0x4b`: `batch`: the next entries of the suffix a joiner lacks.
    SuffixPart(Batch),
    /// `0x4c`: `u64 view | u64 seq`: the suffix sent in parts is complete: it ends at entry
    /// `seq` (no part at all: the joiner was not behind).
    Suffix { view: u64, seq: u64 },
}

mod ty {
    pub const HELLO: u8 = 0x01;
    pub const STATUS: u8 = 0x40;
    pub const HEARTBEAT: u8 = 0x41;
    pub const FORWARD: u8 = 0x42;
    pub const BATCH: u8 = 0x43;
    pub const ACK: u8 = 0x44;
    pub const COMMIT: u8 = 0x45;
    pub const TAKEOVER: u8 = 0x46;
    pub const TAKEOVER_ACK: u8 = 0x47;
    pub const JOIN_REQUEST: u8 = 0x48;
    pub const SNAPSHOT_PART: u8 = 0x49;
    pub const SNAPSHOT: u8 = 0x4a;
    pub const SUFFIX_PART: u8 = 0x4b;
    pub const SUFFIX: u8 = 0x4c;
}

/// The `kind` byte of each [`Op`] (see [`encode_op`]).
mod kind {
    pub const CREATE_USER: u8 = 1;
    pub const OPEN_SESSION: u8 = 2;
    pub const RESUME_SESSION: u8 = 3;
    pub const CLOSE_SESSION: u8 = 4;
    pub const CLIENT_GONE: u8 = 5;
    pub const EXPIRE_SESSIONS: u8 = 6;
    pub const CREATE_GROUP: u8 = 7;
    pub const JOIN_GROUP: u8 = 8;
    pub const LEAVE_GROUP: u8 = 9;
    pub const ACCEPT_REQUEST: u8 = 10;
    pub const REJECT_REQUEST: u8 = 11;
    pub const SHARE_FILE: u8 = 12;
    pub const STOP_SHARE: u8 = 13;
    pub const SYNC_SHARES: u8 = 14;
    pub const OPEN_SESSION_V2: u8 = 15;
    pub const CREATE_GROUP_Q: u8 = 16;
    pub const JOIN_GROUP_Q: u8 = 17;
    pub const SHARE_FILE_Q: u8 = 18;
    pub const OPEN_SESSION_LINK: u8 = 19;
    pub const RESUME_SESSION_LINK: u8 = 20;
    pub const CLIENT_GONE_LINK: u8 = 21;
}

/// `Status` kinds.
const STATUS_STARTING: u8 = 0;
const STATUS_SERVING: u8 = 1;
const STATUS_STARTING_FOUNDER: u8 = 2;

/// `TakeoverAck` catchup kinds.
const CATCHUP_NONE: u8 = 0;
const CATCHUP_BATCH: u8 = 1;
const CATCHUP_SNAPSHOT: u8 = 2;

/// Fewest bytes an encoded op takes: `CreateUser` with a one-byte user id and an empty hash
/// (`u8 kind | u16 len | 1 byte | u16 len`).
const MIN_OP_LEN: usize = 1 + (2 + 1) + 2;
/// Fewest bytes an encoded entry takes: no origin and the smallest op.
pub(crate) const MIN_ENTRY_LEN: usize = 1 + MIN_OP_LEN;

pub(crate) use super::tracker_link::{file_name, group_id, user_id, ROLE_TRACKER};

/// A password hash: a `str` of at most [`MAX_PW_HASH_LEN`] bytes (its PHC syntax is not
/// checked here; the tracker that verifies a password does).
pub(crate) fn pw_hash(r: &mut Reader<'_>) -> Result<String, DecodeError> {
    Ok(r.str16(MAX_PW_HASH_LEN)?.to_owned())
}

/// `u16 no | u64 incarnation`.
pub(crate) fn tracker_ref(r: &mut Reader<'_>) -> Result<TrackerRef, DecodeError> {
    Ok(TrackerRef {
        no: r.u16()?,
        incarnation: r.u64()?,
    })
}

pub(crate) fn put_tracker_ref(out: &mut Vec<u8>, t: &TrackerRef) {
    put_u16(out, t.no);
    put_u64(out, t.incarnation);
}

/// Appends an op: `u8 kind | fields`, where each kind has these fields (types as in the module
/// documentation):
///
/// - `1` CreateUser: `str user | str pw_hash` (at most [`MAX_PW_HASH_LEN`] bytes; a longer
///   hash would not parse)
/// - `2` OpenSession (logged by an earlier build: no shares, no client key): `str user | addr
///   peer_addr | tracker_ref | u64 client | token`
/// - `3` ResumeSession: `token | tracker_ref | u64 client`
/// - `4` CloseSession: `u64 session | tracker_ref`
/// - `5` ClientGone: `u64 client | tracker_ref`
/// - `6` ExpireSessions: `tracker_ref`
/// - `7` CreateGroup: `u64 session | str group`
/// - `8` JoinGroup: `u64 session | str group`
/// - `9` LeaveGroup: `u64 session | str group`
/// - `10` AcceptRequest: `u64 session | str group | str user`
/// - `11` RejectRequest: `u64 session | str group | str user`
/// - `12` ShareFile: `u64 session | str group | file_meta`
/// - `13` StopShare: `u64 session | str group | str name`
/// - `14` SyncShares (earlier builds): `u64 session | u32 n | (str group | str name) * n`
/// - `15` OpenSession: the fields of `2`, then `bool has_shares | (u32 n | (str group | str
///   name) * n)? | [32] client_key` (the shares the client holds, which the login
///   reconciles, and its X25519 identity key); an op that kind `2` can say (no shares, a
///   zero key) is written as kind `2`, and refused as kind `15`
/// - `16` CreateGroup, `17` JoinGroup, `18` ShareFile with the quotas the apply checks: the
///   fields of `7`, `8`, `12`, then `quotas` (`u64 groups_owned | u64 requests | u64 files |
///   u64 metadata | u64 state_bytes`); an op without quotas (an earlier build's) is written as
///   kind `7`, `8` or `12`
/// - `19` OpenSession, `20` ResumeSession, `21` ClientGone with the client's number for its
///   tracker link (`LinkNo`): the fields of `15`, `3`, `5`, then `u64 link` (not 0); an op
///   whose link is 0 (not numbered: an earlier build's client or entry) is written as kind
///   `2` or `15`, `3`, `5`, and refused as `19`-`21`
///
/// Any other kind is [`DecodeError::BadValue`].
pub fn encode_op(out: &mut Vec<u8>, op: &Op) {
    match op {
        Op::CreateUser { user, pw_hash } => {
            put_u8(out, kind::CREATE_USER);
            put_str16(out, user.as_str());
            put_str16(out, pw_hash);
        }
        Op::OpenSession {
            user,
            peer_addr,
            tracker,
            client,
            token,
            shares,
            client_key,
            link,
        } => {
            // An earlier build's entry (no shares, no key, no link) keeps its kind: read back
            // and written again, the bytes are the same.
            let kind_byte = if *link != 0 {
                kind::OPEN_SESSION_LINK
            } else if shares.is_none() && *client_key == [0; 32] {
                kind::OPEN_SESSION
            } else {
                kind::OPEN_SESSION_V2
            };
            put_u8(out, kind_byte);
            put_str16(out, user.as_str());
            put_socket_addr(out, peer_addr);
            put_tracker_ref(out, tracker);
            put_u64(out, *client);
            out.extend_from_slice(token);
            if kind_byte != kind::OPEN_SESSION {
                match shares {
                    Some(shares) => {
                        put_bool(out, true);
                        put_share_list(out, shares);
                    }
                    None => put_bool(out, false),
                }
                out.extend_from_slice(client_key);
            }
            if kind_byte == kind::OPEN_SESSION_LINK {
                put_u64(out, *link);
            }
        }
        Op::ResumeSession {
            token,
            tracker,
            client,
            link,
        } => {
            put_u8(
                out,
                if *link != 0 {
                    kind::RESUME_SESSION_LINK
                } else {
                    kind::RESUME_SESSION
                },
            );
            out.extend_from_slice(token);
            put_tracker_ref(out, tracker);
            put_u64(out, *client);
            if *link != 0 {
                put_u64(out, *link);
            }
        }
        Op::CloseSession { session, tracker } => {
            put_u8(out, kind::CLOSE_SESSION);
            put_u64(out, session.0);
            put_tracker_ref(out, tracker);
        }
        Op::ClientGone {
            client,
            tracker,
            link,
        } => {
            put_u8(
                out,
                if *link != 0 {
                    kind::CLIENT_GONE_LINK
                } else {
                    kind::CLIENT_GONE
                },
            );
            put_u64(out, *client);
            put_tracker_ref(out, tracker);
            if *link != 0 {
                put_u64(out, *link);
            }
        }
        Op::ExpireSessions { tracker } => {
            put_u8(out, kind::EXPIRE_SESSIONS);
            put_tracker_ref(out, tracker);
        }
        Op::CreateGroup {
            session,
            group,
            quotas,
        }
        | Op::JoinGroup {
            session,
            group,
            quotas,
        } => {
            let create = matches!(op, Op::CreateGroup { .. });
            put_u8(
                out,
                match (create, quotas.is_some()) {
                    (true, false) => kind::CREATE_GROUP,
                    (true, true) => kind::CREATE_GROUP_Q,
                    (false, false) => kind::JOIN_GROUP,
                    (false, true) => kind::JOIN_GROUP_Q,
                },
            );
            put_u64(out, session.0);
            put_str16(out, group.as_str());
            put_user_quotas(out, quotas);
        }
        Op::LeaveGroup { session, group } => {
            put_u8(out, kind::LEAVE_GROUP);
            put_u64(out, session.0);
            put_str16(out, group.as_str());
        }
        Op::AcceptRequest {
            session,
            group,
            user,
        }
        | Op::RejectRequest {
            session,
            group,
            user,
        } => {
            put_u8(
                out,
                match op {
                    Op::AcceptRequest { .. } => kind::ACCEPT_REQUEST,
                    _ => kind::REJECT_REQUEST,
                },
            );
            put_u64(out, session.0);
            put_str16(out, group.as_str());
            put_str16(out, user.as_str());
        }
        Op::ShareFile {
            session,
            group,
            meta,
            quotas,
        } => {
            put_u8(
                out,
                if quotas.is_some() {
                    kind::SHARE_FILE_Q
                } else {
                    kind::SHARE_FILE
                },
            );
            put_u64(out, session.0);
            put_str16(out, group.as_str());
            meta.emit(out);
            put_user_quotas(out, quotas);
        }
        Op::StopShare {
            session,
            group,
            name,
        } => {
            put_u8(out, kind::STOP_SHARE);
            put_u64(out, session.0);
            put_str16(out, group.as_str());
            put_str16(out, name.as_str());
        }
        Op::SyncShares { session, keep } => {
            put_u8(out, kind::SYNC_SHARES);
            put_u64(out, session.0);
            put_share_list(out, keep);
        }
    }
}

/// `u64 groups_owned | u64 requests | u64 files | u64 metadata | u64 state_bytes`, when there
/// are quotas.
fn put_user_quotas(out: &mut Vec<u8>, quotas: &Option<OpQuotas>) {
    if let Some(q) = quotas {
        put_u64(out, q.groups_owned);
        put_u64(out, q.requests);
        put_u64(out, q.files);
        put_u64(out, q.metadata);
        put_u64(out, q.state_bytes);
    }
}

/// The quotas of an op of a kind that carries them (`present`), else `None`.
fn user_quotas(r: &mut Reader<'_>, present: bool) -> Result<Option<OpQuotas>, DecodeError> {
    if !present {
        return Ok(None);
    }
    Ok(Some(OpQuotas {
        groups_owned: r.u64()?,
        requests: r.u64()?,
        files: r.u64()?,
        metadata: r.u64()?,
        state_bytes: r.u64()?,
    }))
}

/// The `u64 link` of kinds 19-21: never 0 there (an op without a link number has its own
/// kind, so each op has one encoding).
fn nonzero_link(r: &mut Reader<'_>) -> Result<u64, DecodeError> {
    match r.u64()? {
        0 => Err(DecodeError::BadValue(
            "link number 0 in an op of a numbered kind",
        )),
        link => Ok(link),
    }
}

/// Reads an op written by [`encode_op`].
pub fn decode_op(r: &mut Reader<'_>) -> Result<Op, DecodeError> {
    let op = match r.u8()? {
        kind::CREATE_USER => Op::CreateUser {
            user: user_id(r)?,
            pw_hash: pw_hash(r)?,
        },
        k @ (kind::OPEN_SESSION | kind::OPEN_SESSION_V2 | kind::OPEN_SESSION_LINK) => {
            let extended = k != kind::OPEN_SESSION;
            let op = Op::OpenSession {
                user: user_id(r)?,
                peer_addr: r.socket_addr()?,
                tracker: tracker_ref(r)?,
                client: r.u64()?,
                token: r.array()?,
                shares: if extended && r.bool()? {
                    Some(share_list(r)?)
                } else {
                    None
                },
                client_key: if extended { r.array()? } else { [0; 32] },
                link: if k == kind::OPEN_SESSION_LINK {
                    nonzero_link(r)?
                } else {
                    0
                },
            };
            // What kind 2 says is written as kind 2 (one encoding per op).
            if k == kind::OPEN_SESSION_V2
                && matches!(&op, Op::OpenSession { shares: None, client_key, .. } if *client_key == [0; 32])
            {
                return Err(DecodeError::BadValue("open session of an earlier kind"));
            }
            op
        }
        k @ (kind::RESUME_SESSION | kind::RESUME_SESSION_LINK) => Op::ResumeSession {
            token: r.array()?,
            tracker: tracker_ref(r)?,
            client: r.u64()?,
            link: if k == kind::RESUME_SESSION_LINK {
                nonzero_link(r)?
            } else {
                0
            },
        },
        kind::CLOSE_SESSION => Op::CloseSession {
            session: SessionId(r.u64()?),
            tracker: tracker_ref(r)?,
        },
        k @ (kind::CLIENT_GONE | kind::CLIENT_GONE_LINK) => Op::ClientGone {
            client: r.u64()?,
            tracker: tracker_ref(r)?,
            link: if k == kind::CLIENT_GONE_LINK {
                nonzero_link(r)?
            } else {
                0
            },
        },
        kind::EXPIRE_SESSIONS => Op::ExpireSessions {
            tracker: tracker_ref(r)?,
        },
        k @ (kind::CREATE_GROUP | kind::CREATE_GROUP_Q) => Op::CreateGroup {
            session: SessionId(r.u64()?),
            group: group_id(r)?,
            quotas: user_quotas(r, k == kind::CREATE_GROUP_Q)?,
        },
        k @ (kind::JOIN_GROUP | kind::JOIN_GROUP_Q) => Op::JoinGroup {
            session: SessionId(r.u64()?),
            group: group_id(r)?,
            quotas: user_quotas(r, k == kind::JOIN_GROUP_Q)?,
        },
        kind::LEAVE_GROUP => Op::LeaveGroup {
            session: SessionId(r.u64()?),
            group: group_id(r)?,
        },
        kind::ACCEPT_REQUEST => Op::AcceptRequest {
            session: SessionId(r.u64()?),
            group: group_id(r)?,
            user: user_id(r)?,
        },
        kind::REJECT_REQUEST => Op::RejectRequest {
            session: SessionId(r.u64()?),
            group: group_id(r)?,
            user: user_id(r)?,
        },
        k @ (kind::SHARE_FILE | kind::SHARE_FILE_Q) => Op::ShareFile {
            session: SessionId(r.u64()?),
            group: group_id(r)?,
            meta: FileMeta::parse(r)?,
            quotas: user_quotas(r, k == kind::SHARE_FILE_Q)?,
        },
        kind::STOP_SHARE => Op::StopShare {
            session: SessionId(r.u64()?),
            group: group_id(r)?,
            name: file_name(r)?,
        },
        kind::SYNC_SHARES => Op::SyncShares {
            session: SessionId(r.u64()?),
            keep: share_list(r)?,
        },
        _ => return Err(DecodeError::BadValue("op kind")),
    };
    Ok(op)
}

/// Appends an entry: `u8 has_origin | (u64 client | u64 req_id)? | op`.
pub fn encode_entry(out: &mut Vec<u8>, e: &Entry) {
    match e.origin {
        Some(origin) => {
            put_bool(out, true);
            put_u64(out, origin.client);
            put_u64(out, origin.req_id);
        }
        None => put_bool(out, false),
    }
    encode_op(out, &e.op);
}

/// Reads an entry written by [`encode_entry`].
pub fn decode_entry(r: &mut Reader<'_>) -> Result<Entry, DecodeError> {
    let origin = if r.bool()? {
        Some(Origin {
            client: r.u64()?,
            req_id: r.u64()?,
        })
    } else {
        None
    };
    Ok(Entry {
        origin,
        op: decode_op(r)?,
    })
}

/// `u32 n | entry * n`.
pub fn decode_entries(r: &mut Reader<'_>) -> Result<Vec<Entry>, DecodeError> {
    let n = r.count(MIN_ENTRY_LEN)?;
    let mut entries = Vec::with_capacity(n);
    for _ in 0..n {
        entries.push(decode_entry(r)?);
    }
    Ok(entries)
}

pub fn encode_entries(out: &mut Vec<u8>, entries: &[Entry]) {
    put_count(out, entries.len());
    for e in entries {
        encode_entry(out, e);
    }
}

impl Batch {
    /// `u64 view | u64 first_seq | u32 n | entry * n`.
    fn parse(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Batch {
            view: r.u64()?,
            first_seq: r.u64()?,
            entries: decode_entries(r)?,
        })
    }

    fn emit(&self, out: &mut Vec<u8>) {
        put_u64(out, self.view);
        put_u64(out, self.first_seq);
        encode_entries(out, &self.entries);
    }
}

impl ReplMsg {
    /// Parses a frame payload (type byte + body).
    pub fn parse(payload: &[u8]) -> Result<Self, DecodeError> {
        let (frame_type, body) = frame::split(payload)?;
        let mut r = Reader::new(body);
        let msg = match frame_type {
            ty::HELLO => {
                let magic = r.u32()?;
                if magic != PROTOCOL_MAGIC {
                    return Err(DecodeError::BadMagic(magic));
                }
                let version = r.u16()?;
                if r.u8()? != ROLE_TRACKER {
                    return Err(DecodeError::BadValue("role"));
                }
                ReplMsg::Hello {
                    version,
                    tracker: tracker_ref(&mut r)?,
                }
            }
            ty::STATUS => ReplMsg::Status(match r.u8()? {
                STATUS_SERVING => ReplStatus::Serving {
                    view: r.u64()?,
                    primary: r.u16()?,
                },
                kind @ (STATUS_STARTING | STATUS_STARTING_FOUNDER) => ReplStatus::Starting {
                    view: r.u64()?,
                    applied: r.u64()?,
                    waiting: r.u64()?,
                    founder: kind == STATUS_STARTING_FOUNDER,
                },
                _ => return Err(DecodeError::BadValue("status kind")),
            }),
            ty::HEARTBEAT => ReplMsg::Heartbeat,
            ty::FORWARD => ReplMsg::Forward {
                entries: decode_entries(&mut r)?,
            },
            ty::BATCH => ReplMsg::Batch(Batch::parse(&mut r)?),
            ty::ACK => ReplMsg::Ack {
                view: r.u64()?,
                seq: r.u64()?,
            },
            ty::COMMIT => ReplMsg::Commit {
                view: r.u64()?,
                seq: r.u64()?,
            },
            ty::TAKEOVER => ReplMsg::Takeover {
                view: r.u64()?,
                applied: r.u64()?,
            },
            ty::TAKEOVER_ACK => {
                let view = r.u64()?;
                let serving = r.bool()?;
                let applied = r.u64()?;
                let catchup = match r.u8()? {
                    CATCHUP_NONE => Catchup::None,
                    CATCHUP_BATCH => Catchup::Batch(Batch::parse(&mut r)?),
                    CATCHUP_SNAPSHOT => Catchup::Snapshot,
                    _ => return Err(DecodeError::BadValue("catchup kind")),
                };
                ReplMsg::TakeoverAck {
                    view,
                    serving,
                    applied,
                    catchup,
                }
            }
            ty::JOIN_REQUEST => ReplMsg::JoinRequest(if r.remaining() == 0 {
                None
            } else {
                Some(JoinPosition {
                    applied: r.u64()?,
                    view: r.u64()?,
                    primary: r.u16()?,
                })
            }),
            ty::SNAPSHOT_PART => {
                let len = usize::try_from(r.u32()?).map_err(|_| DecodeError::Truncated)?;
                if len > SNAPSHOT_PART_LEN {
                    return Err(DecodeError::BadValue("snapshot part too long"));
                }
                ReplMsg::SnapshotPart {
                    data: r.bytes(len)?.to_vec(),
                }
            }
            ty::SNAPSHOT => {
                let view = r.u64()?;
                let seq = r.u64()?;
                let len = r.u64()?;
                if len > MAX_SNAPSHOT_LEN {
                    return Err(DecodeError::BadValue("snapshot too long"));
                }
                ReplMsg::Snapshot { view, seq, len }
            }
            ty::SUFFIX_PART => ReplMsg::SuffixPart(Batch::parse(&mut r)?),
            ty::SUFFIX => ReplMsg::Suffix {
                view: r.u64()?,
                seq: r.u64()?,
            },
            other => return Err(DecodeError::UnknownType(other)),
        };
        r.finish()?;
        Ok(msg)
    }

    /// Appends the whole frame (length prefix included) to `out`.
    ///
    /// A `SnapshotPart` longer than [`SNAPSHOT_PART_LEN`] is cut at that length (so the frame
    /// still parses; the receiver sees the loss when the total does not match
    /// `Snapshot::len`): senders split the snapshot into parts of at most that size.
    pub fn emit(&self, out: &mut Vec<u8>) {
        let frame_type = match self {
            ReplMsg::Hello { .. } => ty::HELLO,
            ReplMsg::Status(_) => ty::STATUS,
            ReplMsg::Heartbeat => ty::HEARTBEAT,
            ReplMsg::Forward { .. } => ty::FORWARD,
            ReplMsg::Batch(_) => ty::BATCH,
            ReplMsg::Ack { .. } => ty::ACK,
            ReplMsg::Commit { .. } => ty::COMMIT,
            ReplMsg::Takeover { .. } => ty::TAKEOVER,
            ReplMsg::TakeoverAck { .. } => ty::TAKEOVER_ACK,
            ReplMsg::JoinRequest(_) => ty::JOIN_REQUEST,
            ReplMsg::SnapshotPart { .. } => ty::SNAPSHOT_PART,
            ReplMsg::Snapshot { .. } => ty::SNAPSHOT,
            ReplMsg::SuffixPart(_) => ty::SUFFIX_PART,
            ReplMsg::Suffix { .. } => ty::SUFFIX,
        };
        let start = frame::begin(out, frame_type);
        match self {
            ReplMsg::Hello { version, tracker } => {
                put_u32(out, PROTOCOL_MAGIC);
                put_u16(out, *version);
                put_u8(out, ROLE_TRACKER);
                put_tracker_ref(out, tracker);
            }
            ReplMsg::Status(ReplStatus::Starting {
                view,
                applied,
                waiting,
                founder,
            }) => {
                put_u8(
                    out,
                    if *founder {
                        STATUS_STARTING_FOUNDER
                    } else {
                        STATUS_STARTING
                    },
                );
                put_u64(out, *view);
                put_u64(out, *applied);
                put_u64(out, *waiting);
            }
            ReplMsg::Status(ReplStatus::Serving { view, primary }) => {
                put_u8(out, STATUS_SERVING);
                put_u64(out, *view);
                put_u16(out, *primary);
            }
            ReplMsg::Heartbeat | ReplMsg::JoinRequest(None) => {}
            ReplMsg::JoinRequest(Some(p)) => {
                put_u64(out, p.applied);
                put_u64(out, p.view);
                put_u16(out, p.primary);
            }
            ReplMsg::Forward { entries } => encode_entries(out, entries),
            ReplMsg::Batch(batch) | ReplMsg::SuffixPart(batch) => batch.emit(out),
            ReplMsg::Ack { view, seq }
            | ReplMsg::Commit { view, seq }
            | ReplMsg::Suffix { view, seq } => {
                put_u64(out, *view);
                put_u64(out, *seq);
            }
            ReplMsg::Takeover { view, applied } => {
                put_u64(out, *view);
                put_u64(out, *applied);
            }
            ReplMsg::TakeoverAck {
                view,
                serving,
                applied,
                catchup,
            } => {
                put_u64(out, *view);
                put_bool(out, *serving);
                put_u64(out, *applied);
                match catchup {
                    Catchup::None => put_u8(out, CATCHUP_NONE),
                    Catchup::Batch(batch) => {
                        put_u8(out, CATCHUP_BATCH);
                        batch.emit(out);
                    }
                    Catchup::Snapshot => put_u8(out, CATCHUP_SNAPSHOT),
                }
            }
            ReplMsg::SnapshotPart { data } => {
                let data = data.get(..SNAPSHOT_PART_LEN).unwrap_or(data);
                put_count(out, data.len());
                out.extend_from_slice(data);
            }
            ReplMsg::Snapshot { view, seq, len } => {
                put_u64(out, *view);
                put_u64(out, *seq);
                put_u64(out, *len);
            }
        }
        frame::end(out, start);
    }
}

#[cfg(test)]
#[path = "replication_tests.rs"]
mod tests;
