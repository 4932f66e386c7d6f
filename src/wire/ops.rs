//! The changes replicated among trackers ([`Op`], in an [`Entry`] with the client request it
//! came from) and the ids they carry. They are the vocabulary of `tracker::state` (which
//! applies them) and are encoded by [`replication`](super::replication); they live here, in
//! `wire`, so that the wire format depends on nothing outside `wire` (and `bitfield`), and the
//! tracker depends on the wire format, never the other way round. Plain data: no logic, no
//! IO.

use std::net::SocketAddr;

use super::tracker_link::FileMeta;
use super::{FileName, GroupId, UserId};

/// Names an open session. Allocated by `apply` in order, so every replica agrees on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionId(pub u64);

/// A client process's number for one of its tracker links: 1 for its first link, one more
/// for every link after (`client::uplink` counts them), carried by its logins and resumes.
/// Two copies of one request can come through two links of the client (it lost the first
/// after sending, and sent the request again through another tracker) and be ordered either
/// way; the number tells which link the client left, so that a copy from that one neither
/// moves the session nor, with its `ClientGone`, ends it. 0: not numbered (an earlier
/// build's client or logged op), which compares as before numbers existed: never older.
pub type LinkNo = u64;

/// One run of one tracker: its number in the tracker file and a random id drawn at start, so
/// that sessions held by a tracker that died are told apart from those of its restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrackerRef {
    pub no: u16,
    pub incarnation: u64,
}

/// A change to the state. Ops name the acting session; `apply` resolves it to a user and checks
/// every permission itself, so an op can be replayed on any replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    CreateUser {
        user: UserId,
        pw_hash: String,
    },
    /// Opens a session; the password was checked before the op was made. With `shares`
    /// (every login of this build), the user's shares at `peer_addr` not in it end in the
    /// same change: the client holds only these. `None` is an entry logged by an earlier
    /// build, which reconciled in a separate `SyncShares`.
    OpenSession {
        user: UserId,
        peer_addr: SocketAddr,
        tracker: TrackerRef,
        client: u64,
        token: [u8; 16],
        shares: Option<Vec<(GroupId, FileName)>>,
        /// The client's identity key (X25519 public), handed to downloaders with its address.
        client_key: [u8; 32],
        /// The client's number for the tracker link the login came through ([`LinkNo`]).
        link: LinkNo,
    },
    /// Moves the session holding `token` to `tracker` and `client` (a failover).
    ResumeSession {
        token: [u8; 16],
        tracker: TrackerRef,
        client: u64,
        /// The client's number for the tracker link the resume came through.
        link: LinkNo,
    },
    /// Logout: closes `session` if `tracker` still holds it.
    CloseSession {
        session: SessionId,
        tracker: TrackerRef,
    },
    /// `client`'s connection to `tracker` closed: its session there ends. Its remembered
    /// answers stay (bounded by the state's `MAX_REMEMBERED_CLIENTS`): a link that broke while the
    /// tracker lives looks the same as a client that left, and the client may be retrying its
    /// last change through another tracker.
    ClientGone {
        client: u64,
        tracker: TrackerRef,
        /// The client's number for the link that closed (the one its login or resume on it
        /// named): a `ClientGone` for a link older than the session's changes nothing.
        link: LinkNo,
    },
    /// `tracker` died and the grace period for its clients to move is over: the sessions it
    /// still holds end (their shares go offline).
    ExpireSessions {
        tracker: TrackerRef,
    },
    /// `quotas`: see [`OpQuotas`] (`None`: an entry logged by an earlier build).
    CreateGroup {
        session: SessionId,
        group: GroupId,
        quotas: Option<OpQuotas>,
    },
    JoinGroup {
        session: SessionId,
        group: GroupId,
        quotas: Option<OpQuotas>,
    },
    LeaveGroup {
        session: SessionId,
        group: GroupId,
    },
    AcceptRequest {
        session: SessionId,
        group: GroupId,
        user: UserId,
    },
    RejectRequest {
        session: SessionId,
        group: GroupId,
        user: UserId,
    },
    ShareFile {
        session: SessionId,
        group: GroupId,
        meta: FileMeta,
        quotas: Option<OpQuotas>,
    },
    StopShare {
        session: SessionId,
        group: GroupId,
        name: FileName,
    },
    /// Login reconciliation: the session's user stops sharing, from the session's client
    /// address, every file not in `keep` (the client started again and holds only these).
    /// Made by earlier builds only (a login now carries its shares); still applied when a
    /// data directory written by one is read.
    SyncShares {
        session: SessionId,
        keep: Vec<(GroupId, FileName)>,
    },
}

/// The quotas a change that adds to a user's holdings is held to where changes are ordered
/// (the user's, and the whole state's size): `apply` refuses the op if it would take the
/// acting user or the state past one, against the state as it stands at that point of the
/// order, so every tracker reaches the same answer.
/// The limits travel in the op (the options of the tracker that received the request)
/// because they are per-tracker options: an `apply` that read them from its own tracker could
/// answer differently on trackers started with different options. `None`: an op logged by an
/// earlier build, which checked its quotas before the op was made; applied without a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpQuotas {
    /// Groups the user owns.
    pub groups_owned: u64,
    /// Join requests of the user pending at once.
    pub requests: u64,
    /// Files the user shares.
    pub files: u64,
    /// Bytes of metadata (name, piece hashes) of the files the user shares.
    pub metadata: u64,
    /// Bytes the whole state may take (`TrackerState::approx_bytes`), over every user.
    pub state_bytes: u64,
}

/// The client request an op was made for: a retry with the same pair is answered from memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Origin {
    pub client: u64,
    pub req_id: u64,
}

/// One change in the replicated order: the op and, if a client asked for it, who asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub origin: Option<Origin>,
    pub op: Op,
}
