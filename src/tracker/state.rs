//! The tracker's replicated state and the one function that changes it.
//!
//! [`TrackerState`] holds users (with password hashes only), groups with their members, pending
//! join requests and shared files, and the open sessions. It changes only through
//! [`TrackerState::apply`], which is deterministic: no clock, no randomness, no IO, ordered maps
//! only. Two replicas that apply the same [`Op`]s in the same order hold equal states, which is
//! what replication builds on; a snapshot is simply the state.
//!
//! Replication applies [`Entry`]s (an op plus the client request it came from) through
//! [`TrackerState::apply_entry`], which remembers the last answers of each client: a request
//! retried after a failover, with the same client and request id, gets the remembered answer
//! instead of being applied twice. That memory is part of the state, so every replica holds it.
//! A remembered login or resume moves the session to the tracker the copy came through, unless
//! the copy names an older link of the client than the one holding the session (each client
//! numbers its tracker links, [`LinkNo`]): then the client has already moved on, and the copy
//! must neither move the session nor let that link's `ClientGone` end it.
//!
//! The quotas are enforced here, where changes are ordered: `CreateGroup`, `JoinGroup` and
//! `ShareFile` carry the limits of the tracker that received the request ([`OpQuotas`]), and
//! `apply` refuses the op if it would take the acting user, or the whole state's size, past
//! one, against the state at that point of the order. Every tracker applies the same entries in the
//! same order with the same limits, so all reach the same answer and the same state, whichever
//! tracker a client used and however many of its changes race through different trackers.
//! The limits are in the op rather than read from this tracker's options (which could differ
//! between trackers and would make `apply` answer differently on each), and they are chosen
//! by the receiving tracker rather than stamped by the primary, because a backup recognises
//! its forwarded entries coming back applied by equality: an entry the primary rewrote would
//! not be recognised. What each user holds is kept in an index ([`Holdings`]) updated by every
//! apply, so a check is a lookup, and so is the state's size ([`TrackerState::size`]); both
//! are derived data, not in the snapshot, and rebuilt when a snapshot is read. Builds with
//! debug assertions (and every test build) check both against a walk of the state after
//! each op while the state has at most [`HOLDINGS_CHECK_GROUPS`] groups. `CreateUser` carries
//! no quotas: the state quota holds new accounts only at the receiving tracker.
//!
//! Architecture invariant: everything a tracker answers is derived from this state; nothing
//! else in the tracker holds users, groups, files or sessions.

use std::collections::{btree_map, BTreeMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;

use crate::wire::tracker_link::{FileInfo, FileMeta, GroupInfo, RejectCode, Relation};
use crate::wire::{FileName, GroupId, UserId};

// The replicated changes are defined next to their encoding in `wire`, which must not depend
// on the tracker; they are the tracker state's vocabulary, so they are named from here too.
pub use crate::wire::ops::{Entry, LinkNo, Op, OpQuotas, Origin, SessionId, TrackerRef};

/// A logged-in user on one client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub user: UserId,
    /// Where the user's client listens for peers.
    pub peer_addr: SocketAddr,
    /// The tracker holding the client's connection.
    pub tracker: TrackerRef,
    /// The client process (its random id from the handshake).
    pub client: u64,
    /// Secret the client may present to resume the session on another tracker.
    pub token: [u8; 16],
    /// The client's identity key (X25519 public): downloaders get it with `peer_addr`, and
    /// tickets name it.
    pub client_key: [u8; 32],
    /// The client's number for the tracker link that holds the session ([`LinkNo`]; 0: not
    /// numbered). An op naming an older link of the same client neither moves the session
    /// nor ends it ([`TrackerState::left_link`]).
    pub link: LinkNo,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// A PHC string (salted, slow hash); the clear password is never stored.
    pub pw_hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub owner: UserId,
    /// Members in the order they joined; the owner is always among them.
    pub members: Vec<UserId>,
    /// Pending join requests, oldest first.
    pub requests: Vec<UserId>,
    pub files: BTreeMap<FileName, SharedFile>,
}

/// One file in a group, with everyone who shares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedFile {
    pub meta: FileMeta,
    pub sharers: Vec<Sharer>,
}

/// A user sharing a file from the client listening at `peer_addr`. The share is online while
/// that user has a session on that same client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sharer {
    pub user: UserId,
    pub peer_addr: SocketAddr,
}

/// An online sharer's peer address and the identity key its client registered at login.
pub type KeyedSharer = (SocketAddr, [u8; 32]);

/// What applying an op answered.
pub type Answer = Result<Outcome, Reject>;

/// Answers remembered per client, newest last.
pub const MAX_ANSWERS_PER_CLIENT: usize = 16;
/// Clients whose answers are remembered; the least recently active is forgotten first.
pub const MAX_REMEMBERED_CLIENTS: usize = 16_384;

/// The recent answers to one client's changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientAnswers {
    /// Value of the state's op counter when this client last made a change.
    pub last_used: u64,
    pub answers: VecDeque<(u64, Answer)>,
}

/// The bytes a file's metadata takes, as counted against the metadata quota.
pub fn meta_bytes(meta: &FileMeta) -> usize {
    meta.name.as_str().len() + 8 + 4 + 20 + 20 * meta.piece_hashes.len()
}

/// What one user holds, counted for the quotas: groups owned, join requests pending, files
/// shared (a file counts once however many of the user's clients share it) and the
/// [`meta_bytes`] of those files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Holdings {
    pub groups_owned: usize,
    pub requests: usize,
    pub files: usize,
    pub metadata: usize,
}

impl Holdings {
    fn add(&mut self, other: &Holdings) {
        self.groups_owned += other.groups_owned;
        self.requests += other.requests;
        self.files += other.files;
        self.metadata += other.metadata;
    }

    fn sub(&mut self, other: &Holdings) {
        self.groups_owned = self.groups_owned.saturating_sub(other.groups_owned);
        self.requests = self.requests.saturating_sub(other.requests);
        self.files = self.files.saturating_sub(other.files);
        self.metadata = self.metadata.saturating_sub(other.metadata);
    }

    fn owned(n: usize) -> Holdings {
        Holdings {
            groups_owned: n,
            ..Holdings::default()
        }
    }

    fn request(n: usize) -> Holdings {
        Holdings {
            requests: n,
            ..Holdings::default()
        }
    }

    fn file(meta: &FileMeta) -> Holdings {
        Holdings {
            files: 1,
            metadata: meta_bytes(meta),
            ..Holdings::default()
        }
    }
}

/// What a change would add to the acting user's holdings, for [`TrackerState::check_quota`].
#[derive(Debug, Clone, Copy)]
pub enum Adds<'a> {
    Group,
    Request,
    File(&'a GroupId, &'a FileMeta),
}

/// The holdings index is checked against a walk of the state after every op (builds with
/// debug assertions and tests) only while the state has at most this many groups: beyond
/// that the check alone would make a long run quadratic.
pub const HOLDINGS_CHECK_GROUPS: usize = 2048;

/// What a successful op did, when there is more to say than "done".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    SessionOpened(SessionId),
    Shared { new_file: bool },
}

/// A refused op or query: a code for programs and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub code: RejectCode,
    pub message: String,
}

impl Reject {
    pub fn new(code: RejectCode, message: impl Into<String>) -> Self {
        Reject {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

fn not_logged_in() -> Reject {
    Reject::new(RejectCode::NotLoggedIn, "not logged in")
}

fn no_such_group(group: &GroupId) -> Reject {
    Reject::new(RejectCode::NoSuchGroup, format!("no such group '{group}'"))
}

fn not_member(group: &GroupId) -> Reject {
    Reject::new(
        RejectCode::NotMember,
        format!("you are not a member of group '{group}'"),
    )
}

fn not_owner(group: &GroupId) -> Reject {
    Reject::new(
        RejectCode::NotOwner,
        format!("only the owner of group '{group}' can do that"),
    )
}

impl Group {
    fn is_member(&self, user: &UserId) -> bool {
        self.members.contains(user)
    }
}

/// Users, groups, files and sessions of the whole service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrackerState {
    users: BTreeMap<UserId, User>,
    groups: BTreeMap<GroupId, Group>,
    sessions: BTreeMap<SessionId, Session>,
    /// Index: the open session of each logged-in user (a user has at most one).
    session_of_user: BTreeMap<UserId, SessionId>,
    /// Index: the session each client process holds.
    session_of_client: BTreeMap<u64, SessionId>,
    next_session: u64,
    /// Entries applied so far; stamps the answer memory.
    n_applied: u64,
    /// Recent answers per client (see [`TrackerState::apply_entry`]).
    answers: BTreeMap<u64, ClientAnswers>,
    /// Index: clients by `last_used`, to forget the least recently active first.
    answers_by_use: BTreeMap<u64, u64>,
    /// Index: what each user holds, for the quotas (users holding nothing are absent). Kept
    /// by every apply; not in the snapshot (rebuilt from the groups when one is read).
    holdings: BTreeMap<UserId, Holdings>,
    /// [`approx_bytes`](Self::approx_bytes), kept by every apply (for the state quota);
    /// not in the snapshot (rebuilt by a walk when one is read).
    size: usize,
}

/// What [`TrackerState::approx_bytes`] counts for each record besides its ids and data.
const RECORD: usize = 16;
const SHARER: usize = RECORD + 2 + 16 + 2;
const SESSION: usize = RECORD + 2 + 16 + 2 + 8 + 8 + 16;

fn id_bytes(user: &UserId) -> usize {
    RECORD + user.as_str().len()
}

fn sharer_bytes(sharer: &Sharer) -> usize {
    SHARER + sharer.user.as_str().len()
}

fn file_bytes(file: &SharedFile) -> usize {
    RECORD + meta_bytes(&file.meta) + file.sharers.iter().map(sharer_bytes).sum::<usize>()
}

fn group_bytes(id: &GroupId, g: &Group) -> usize {
    RECORD
        + id.as_str().len()
        + g.owner.as_str().len()
        + g.members.iter().map(id_bytes).sum::<usize>()
        + g.requests.iter().map(id_bytes).sum::<usize>()
        + g.files.values().map(file_bytes).sum::<usize>()
}

/// Whether an op naming the client's link `link` comes from a link older than `current`, the
/// one holding the client's session: a client numbers its links in the order it opens them.
/// A link not numbered (0: an earlier build's client or logged op) is never older, and
/// nothing is older than an unnumbered session's link, so such ops act as they always did.
pub fn older_link(link: LinkNo, current: LinkNo) -> bool {
    link != 0 && link < current
}

fn session_bytes(s: &Session) -> usize {
    SESSION + s.user.as_str().len()
}

/// Adds to what `user` holds. A function of the index alone, so that an apply can call it
/// while it borrows the user's id from the sessions.
fn hold_add(holdings: &mut BTreeMap<UserId, Holdings>, user: &UserId, adds: &Holdings) {
    holdings.entry(user.clone()).or_default().add(adds);
}

/// Takes from what `user` holds; a user left holding nothing leaves the index.
fn hold_sub(holdings: &mut BTreeMap<UserId, Holdings>, user: &UserId, lost: &Holdings) {
    if let Some(held) = holdings.get_mut(user) {
        held.sub(lost);
        if *held == Holdings::default() {
            holdings.remove(user);
        }
    }
}

impl TrackerState {
    pub fn new() -> Self {
        TrackerState::default()
    }

    /// Applies one op. On `Err` the state is unchanged.
    pub fn apply(&mut self, op: &Op) -> Result<Outcome, Reject> {
        let answer = self.apply_op(op);
        #[cfg(any(test, debug_assertions))]
        if self.groups.len() <= HOLDINGS_CHECK_GROUPS {
            assert_eq!(
                self.holdings,
                self.holdings_walk(),
                "the holdings index agrees with a walk of the state after {op:?}"
            );
            assert_eq!(
                self.size,
                self.approx_bytes(),
                "the kept size agrees with a walk of the state after {op:?}"
            );
        }
        answer
    }

    fn apply_op(&mut self, op: &Op) -> Result<Outcome, Reject> {
        match op {
            Op::CreateUser { user, pw_hash } => {
                if let Some(existing) = self.users.get(user) {
                    if existing.pw_hash == *pw_hash {
                        // This very creation, ordered again: a PHC string holds a random
                        // salt, so an identical one comes only from the same hashing of the
                        // same request. A retried create_user is re-proposed after its
                        // password check, and its remembered answer may have been dropped
                        // before the copy applies (older than the answers kept); the client
                        // is then told its own creation succeeded, not that the user exists.
                        return Ok(Outcome::Done);
                    }
                    return Err(Reject::new(
                        RejectCode::UserExists,
                        format!("user '{user}' already exists"),
                    ));
                }
                self.users.insert(
                    user.clone(),
                    User {
                        pw_hash: pw_hash.clone(),
                    },
                );
                self.size += id_bytes(user) + pw_hash.len();
                Ok(Outcome::Done)
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
                if self.left_link(*client, *link) {
                    // A login from a link the client has left, ordered after its session
                    // moved to a newer link: opening it would end that session, and nobody
                    // waits for this answer.
                    return Err(Reject::new(
                        RejectCode::SessionAlreadyOpen,
                        "a newer link of this client holds its session",
                    ));
                }
                // The same client process logging the same user in again replaces its own
                // session (closed just below): it was told it is not logged in (its session
                // had ended meanwhile, or moved under a copy of its login).
                let own = self
                    .session_of_user
                    .get(user)
                    .and_then(|id| self.sessions.get(id))
                    .is_some_and(|s| s.client == *client);
                if !own {
                    self.check_can_log_in(user)?;
                }
                self.next_session = self.next_session.saturating_add(1);
                let id = SessionId(self.next_session);
                self.close_client_session(*client);
                let session = Session {
                    user: user.clone(),
                    peer_addr: *peer_addr,
                    tracker: *tracker,
                    client: *client,
                    token: *token,
                    client_key: *client_key,
                    link: *link,
                };
                self.size += session_bytes(&session);
                self.sessions.insert(id, session);
                self.session_of_user.insert(user.clone(), id);
                self.session_of_client.insert(*client, id);
                if let Some(keep) = shares {
                    self.end_shares_not_in(user, *peer_addr, keep);
                }
                Ok(Outcome::SessionOpened(id))
            }
            Op::ResumeSession {
                token,
                tracker,
                client,
                link,
            } => {
                let id = self
                    .session_with_token(token)
                    .ok_or_else(|| Reject::new(RejectCode::NotLoggedIn, "the session has ended"))?;
                // A resume from a link the client has left (ordered after the client moved
                // the session to a newer one) leaves the session where the client is.
                let left = self
                    .sessions
                    .get(&id)
                    .is_some_and(|s| s.client == *client && older_link(*link, s.link));
                if !left {
                    self.move_session(id, *tracker, *client, *link);
                }
                Ok(Outcome::SessionOpened(id))
            }
            Op::CloseSession { session, tracker } => {
                match self.sessions.get(session) {
                    Some(s) if s.tracker == *tracker => {}
                    _ => return Err(not_logged_in()),
                }
                self.close_session(*session);
                Ok(Outcome::Done)
            }
            Op::ClientGone {
                client,
                tracker,
                link,
            } => {
                // The session ends only if it is still held through that tracker, by that
                // link or a later one of the client: a copy of its login or resume may have
                // been ordered on this tracker after the client moved on, and that link's close
                // must not end the session the client holds through its newer link.
                if let Some(id) = self.session_of_client.get(client).copied() {
                    if self
                        .sessions
                        .get(&id)
                        .is_some_and(|s| s.tracker == *tracker && !older_link(*link, s.link))
                    {
                        self.close_session(id);
                    }
                }
                Ok(Outcome::Done)
            }
            Op::ExpireSessions { tracker } => {
                let expired: Vec<SessionId> = self
                    .sessions
                    .iter()
                    .filter(|(_, s)| s.tracker == *tracker)
                    .map(|(id, _)| *id)
                    .collect();
                for id in expired {
                    if let Some(client) = self.sessions.get(&id).map(|s| s.client) {
                        self.forget_client(client);
                    }
                    self.close_session(id);
                }
                Ok(Outcome::Done)
            }
            Op::CreateGroup {
                session,
                group,
                quotas,
            } => {
                // Borrowed from the session, beside the maps it goes into (every change
                // of the replication bench passes here or in `LeaveGroup`: no copy of the
                // id but those the group keeps, and one search of the groups).
                let user = &self.sessions.get(session).ok_or_else(not_logged_in)?.user;
                if let Some(q) = quotas {
                    self.check_quota(user, Adds::Group, q)?;
                    // The group record with its id, its owner and its one member.
                    let adds = RECORD + group.as_str().len() + user.as_str().len() + id_bytes(user);
                    self.check_room(adds, q.state_bytes)?;
                }
                let btree_map::Entry::Vacant(slot) = self.groups.entry(group.clone()) else {
                    return Err(Reject::new(
                        RejectCode::GroupExists,
                        format!("group '{group}' already exists"),
                    ));
                };
                let new_group = Group {
                    owner: user.clone(),
                    members: vec![user.clone()],
                    requests: Vec::new(),
                    files: BTreeMap::new(),
                };
                self.size += group_bytes(group, &new_group);
                slot.insert(new_group);
                hold_add(&mut self.holdings, user, &Holdings::owned(1));
                Ok(Outcome::Done)
            }
            Op::JoinGroup {
                session,
                group,
                quotas,
            } => {
                if let Some(q) = quotas {
                    let user = self.user_of(*session)?.clone();
                    self.check_quota(&user, Adds::Request, q)?;
                    self.check_room(id_bytes(&user), q.state_bytes)?;
                }
                let (user, g) = self.acting_in(*session, group)?;
                if g.is_member(&user) {
                    return Err(Reject::new(
                        RejectCode::AlreadyMember,
                        format!("you are already a member of group '{group}'"),
                    ));
                }
                if g.requests.contains(&user) {
                    return Err(Reject::new(
                        RejectCode::AlreadyRequested,
                        format!("a request to join group '{group}' is already pending"),
                    ));
                }
                g.requests.push(user.clone());
                self.size += id_bytes(&user);
                self.hold_add(&user, &Holdings::request(1));
                Ok(Outcome::Done)
            }
            Op::LeaveGroup { session, group } => {
                // As `acting_in`, with the user borrowed from the session, not copied, and
                // the group held by its map entry: the last member's leaving removes it
                // without a second search (a copy of its id costs less than the search).
                let user = &self.sessions.get(session).ok_or_else(not_logged_in)?.user;
                let btree_map::Entry::Occupied(mut slot) = self.groups.entry(group.clone()) else {
                    return Err(no_such_group(group));
                };
                let g = slot.get_mut();
                if !g.is_member(user) {
                    return Err(not_member(group));
                }
                let bytes_before = group_bytes(group, g);
                let mut bytes_after = 0;
                g.members.retain(|m| m != user);
                let mut lost = Holdings::default();
                for file in g.files.values_mut() {
                    let before = file.sharers.len();
                    file.sharers.retain(|s| s.user != *user);
                    if file.sharers.len() < before {
                        lost.add(&Holdings::file(&file.meta));
                    }
                }
                g.files.retain(|_, f| !f.sharers.is_empty());
                // Requests that end with the group, and the ownership that passes on.
                let mut dropped_requests = Vec::new();
                let mut new_owner = None;
                match g.members.first() {
                    None => {
                        // The owner is always a member: the last member was the owner.
                        lost.add(&Holdings::owned(1));
                        dropped_requests = std::mem::take(&mut g.requests);
                        slot.remove();
                    }
                    Some(longest_standing) => {
                        if g.owner == *user {
                            g.owner = longest_standing.clone();
                            lost.add(&Holdings::owned(1));
                            new_owner = Some(longest_standing.clone());
                        }
                        bytes_after = group_bytes(group, g);
                    }
                }
                self.size = self.size.saturating_sub(bytes_before) + bytes_after;
                hold_sub(&mut self.holdings, user, &lost);
                for requester in &dropped_requests {
                    hold_sub(&mut self.holdings, requester, &Holdings::request(1));
                }
                if let Some(owner) = new_owner {
                    // Ownership passes on whatever the new owner's quota: refusing the
                    // departure would keep a user in a group against their will.
                    hold_add(&mut self.holdings, &owner, &Holdings::owned(1));
                }
                Ok(Outcome::Done)
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
                let (acting, g) = self.acting_in(*session, group)?;
                if g.owner != acting {
                    return Err(not_owner(group));
                }
                let pos = g.requests.iter().position(|r| r == user).ok_or_else(|| {
                    Reject::new(
                        RejectCode::NoSuchRequest,
                        format!("no pending request from '{user}' to join group '{group}'"),
                    )
                })?;
                g.requests.remove(pos);
                if matches!(op, Op::AcceptRequest { .. }) {
                    // A request becomes a member: the same bytes.
                    g.members.push(user.clone());
                } else {
                    self.size = self.size.saturating_sub(id_bytes(user));
                }
                self.hold_sub(user, &Holdings::request(1));
                Ok(Outcome::Done)
            }
            Op::ShareFile {
                session,
                group,
                meta,
                quotas,
            } => {
                let s = self.sessions.get(session).ok_or_else(not_logged_in)?;
                let sharer = Sharer {
                    user: s.user.clone(),
                    peer_addr: s.peer_addr,
                };
                if let Some(q) = quotas {
                    self.check_quota(&sharer.user, Adds::File(group, meta), q)?;
                    let file = self.groups.get(group).and_then(|g| g.files.get(&meta.name));
                    let adds = match file {
                        Some(f) if f.sharers.contains(&sharer) => 0,
                        Some(_) => sharer_bytes(&sharer),
                        None => RECORD + meta_bytes(meta) + sharer_bytes(&sharer),
                    };
                    self.check_room(adds, q.state_bytes)?;
                }
                let g = self
                    .groups
                    .get_mut(group)
                    .ok_or_else(|| no_such_group(group))?;
                if !g.is_member(&sharer.user) {
                    return Err(not_member(group));
                }
                match g.files.get_mut(&meta.name) {
                    Some(file) => {
                        if !file.meta.same_content(meta) {
                            return Err(Reject::new(
                                RejectCode::ContentMismatch,
                                format!(
                                    "a different file named '{}' is already shared in group '{group}'",
                                    meta.name
                                ),
                            ));
                        }
                        let held = file.sharers.iter().any(|s| s.user == sharer.user);
                        let adds = Holdings::file(&file.meta);
                        let user = sharer.user.clone();
                        if !file.sharers.contains(&sharer) {
                            self.size += sharer_bytes(&sharer);
                            file.sharers.push(sharer);
                        }
                        if !held {
                            self.hold_add(&user, &adds);
                        }
                        Ok(Outcome::Shared { new_file: false })
                    }
                    None => {
                        let user = sharer.user.clone();
                        let file = SharedFile {
                            meta: meta.clone(),
                            sharers: vec![sharer],
                        };
                        self.size += file_bytes(&file);
                        g.files.insert(meta.name.clone(), file);
                        self.hold_add(&user, &Holdings::file(meta));
                        Ok(Outcome::Shared { new_file: true })
                    }
                }
            }
            Op::StopShare {
                session,
                group,
                name,
            } => {
                let (user, g) = self.acting_in(*session, group)?;
                if !g.is_member(&user) {
                    return Err(not_member(group));
                }
                let file = g.files.get_mut(name).ok_or_else(|| {
                    Reject::new(
                        RejectCode::NoSuchFile,
                        format!("no file '{name}' in group '{group}'"),
                    )
                })?;
                let before = file.sharers.len();
                // The user stops sharing the file, from whichever clients they shared it.
                file.sharers.retain(|s| s.user != user);
                if file.sharers.len() == before {
                    return Err(Reject::new(
                        RejectCode::NotSharer,
                        format!("you do not share '{name}' in group '{group}'"),
                    ));
                }
                let lost = Holdings::file(&file.meta);
                let mut freed = (before - file.sharers.len()) * (SHARER + user.as_str().len());
                if file.sharers.is_empty() {
                    freed += RECORD + meta_bytes(&file.meta);
                    g.files.remove(name);
                }
                self.size = self.size.saturating_sub(freed);
                self.hold_sub(&user, &lost);
                Ok(Outcome::Done)
            }
            Op::SyncShares { session, keep } => {
                let s = self.sessions.get(session).ok_or_else(not_logged_in)?;
                let (user, addr) = (s.user.clone(), s.peer_addr);
                self.end_shares_not_in(&user, addr, keep);
                Ok(Outcome::Done)
            }
        }
    }

    /// Login reconciliation: `user` stops sharing, from `addr`, every file not in `keep` (the
    /// client there started again and holds only these); files left with no sharer go.
    fn end_shares_not_in(&mut self, user: &UserId, addr: SocketAddr, keep: &[(GroupId, FileName)]) {
        let keep: std::collections::BTreeSet<(&GroupId, &FileName)> =
            keep.iter().map(|(g, n)| (g, n)).collect();
        let mut lost = Holdings::default();
        let mut freed = 0;
        for (group, g) in self.groups.iter_mut() {
            g.files.retain(|name, file| {
                if !keep.contains(&(group, name)) {
                    let held = file.sharers.iter().any(|sh| sh.user == *user);
                    let before = file.sharers.len();
                    file.sharers
                        .retain(|sh| !(sh.user == *user && sh.peer_addr == addr));
                    freed += (before - file.sharers.len()) * (SHARER + user.as_str().len());
                    if file.sharers.is_empty() {
                        freed += RECORD + meta_bytes(&file.meta);
                    }
                    // Still shared from another of the user's clients: still held.
                    if held && !file.sharers.iter().any(|sh| sh.user == *user) {
                        lost.add(&Holdings::file(&file.meta));
                    }
                }
                !file.sharers.is_empty()
            });
        }
        self.size = self.size.saturating_sub(freed);
        self.hold_sub(user, &lost);
    }

    fn hold_add(&mut self, user: &UserId, adds: &Holdings) {
        hold_add(&mut self.holdings, user, adds);
    }

    fn hold_sub(&mut self, user: &UserId, lost: &Holdings) {
        hold_sub(&mut self.holdings, user, lost);
    }

    /// Builds the holdings index and the kept size by walks (after a snapshot is read).
    pub(crate) fn rebuild_derived(&mut self) {
        self.holdings = self.holdings_walk();
        self.size = self.approx_bytes();
    }

    /// [`approx_bytes`](Self::approx_bytes) as kept by every apply: no walk.
    pub fn size(&self) -> usize {
        self.size
    }

    /// What every user holds, by a walk over every group (the index's definition).
    pub fn holdings_walk(&self) -> BTreeMap<UserId, Holdings> {
        let mut all: BTreeMap<UserId, Holdings> = BTreeMap::new();
        for group in self.groups.values() {
            all.entry(group.owner.clone())
                .or_default()
                .add(&Holdings::owned(1));
            for requester in &group.requests {
                all.entry(requester.clone())
                    .or_default()
                    .add(&Holdings::request(1));
            }
            for file in group.files.values() {
                let mut users: Vec<&UserId> = file.sharers.iter().map(|s| &s.user).collect();
                users.sort_unstable();
                users.dedup();
                for user in users {
                    all.entry(user.clone())
                        .or_default()
                        .add(&Holdings::file(&file.meta));
                }
            }
        }
        all.retain(|_, held| *held != Holdings::default());
        all
    }

    /// Refuses a change that would add `adds` bytes (as [`approx_bytes`](Self::approx_bytes)
    /// counts them) to a state that would then take more than `limit`: `QuotaExceeded` with
    /// `quota: the service's state is full ...`. A change that adds nothing always passes.
    pub fn check_room(&self, adds: usize, limit: u64) -> Result<(), Reject> {
        let after = u64::try_from(self.size.saturating_add(adds)).unwrap_or(u64::MAX);
        if adds == 0 || after <= limit {
            return Ok(());
        }
        Err(Reject::new(
            RejectCode::QuotaExceeded,
            format!(
                "quota: the service's state is full (about {} of its {limit} bytes); \
                 nothing more can be added until something is removed",
                self.size
            ),
        ))
    }

    /// Refuses a change that would add `adds` to what `user` holds past one of `quotas`:
    /// `QuotaExceeded` with `quota: at most N ... per user`. Sharing again a file the user
    /// already shares adds nothing.
    pub fn check_quota(
        &self,
        user: &UserId,
        adds: Adds<'_>,
        quotas: &OpQuotas,
    ) -> Result<(), Reject> {
        let over = |what: &str, limit: u64| {
            Err(Reject::new(
                RejectCode::QuotaExceeded,
                format!("quota: at most {limit} {what} per user"),
            ))
        };
        let held = self.holdings(user);
        let n = |count: usize| u64::try_from(count).unwrap_or(u64::MAX);
        match adds {
            Adds::Group if n(held.groups_owned) >= quotas.groups_owned => {
                over("groups owned", quotas.groups_owned)
            }
            Adds::Request if n(held.requests) >= quotas.requests => {
                over("pending join requests", quotas.requests)
            }
            Adds::File(group, meta) => {
                if self.shares(user, group, &meta.name) {
                    return Ok(());
                }
                if n(held.files) >= quotas.files {
                    return over("shared files", quotas.files);
                }
                if n(held.metadata).saturating_add(n(meta_bytes(meta))) > quotas.metadata {
                    return over("bytes of file metadata", quotas.metadata);
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Applies a replicated entry. A change a client asked for is remembered with its answer;
    /// the same client and request id again (a retry after a failover) gets that answer
    /// without applying the op twice. A remembered login or resume also moves the session to
    /// the tracker the retry came through, unless the client already took the session with a
    /// later request: a login or resume the client sent on a link it then lost (the tracker
    /// there handles it late) must not take the session back from the link it uses now.
    pub fn apply_entry(&mut self, entry: &Entry) -> Answer {
        self.n_applied = self.n_applied.saturating_add(1);
        let Some(origin) = entry.origin else {
            return self.apply(&entry.op);
        };
        if let Some(answer) = self.remembered(origin) {
            if let (
                Ok(Outcome::SessionOpened(id)),
                Op::OpenSession {
                    tracker,
                    client,
                    link,
                    ..
                }
                | Op::ResumeSession {
                    tracker,
                    client,
                    link,
                    ..
                },
            ) = (&answer, &entry.op)
            {
                // Only for the session's owner: a retry with a copied client id and request id
                // that proved another user's password, or no token, moves nothing. Nor does a
                // copy from a link the client has left (it sent the request again through a
                // newer link, whose copy was ordered first): the session stays with the newer
                // link, and the left link's `ClientGone` will not end it.
                let owner = self.sessions.get(id).is_some_and(|s| match &entry.op {
                    Op::OpenSession { user, .. } => s.user == *user,
                    Op::ResumeSession { token, .. } => s.token == *token,
                    _ => false,
                });
                if owner && !self.taken_since(origin, *id) && !self.left_link(*client, *link) {
                    self.move_session(*id, *tracker, *client, *link);
                }
            }
            return answer;
        }
        if self.superseded(origin) {
            // Older than every answer kept for this client, which has sent
            // `MAX_ANSWERS_PER_CLIENT` requests since: a copy of a request that was applied
            // (or given up) long ago, handed on late by a tracker that stalled. Applying it
            // now could undo the client's later changes; nobody waits for this answer.
            return Err(Reject::new(
                RejectCode::Unavailable,
                "a request older than the client's recent ones; not applied",
            ));
        }
        if let Op::ResumeSession { token, .. } = &entry.op {
            let id = self.session_with_token(token);
            if let Some(id) = id.filter(|id| self.taken_since(origin, *id)) {
                let answer = Ok(Outcome::SessionOpened(id));
                self.remember(origin, answer.clone());
                return answer;
            }
        }
        let answer = self.apply(&entry.op);
        self.remember(origin, answer.clone());
        answer
    }

    /// The open session holding `token`.
    pub fn session_with_token(&self, token: &[u8; 16]) -> Option<SessionId> {
        self.sessions
            .iter()
            .find(|(_, s)| s.token == *token)
            .map(|(id, _)| *id)
    }

    /// Whether `origin`'s client opened or resumed session `id` with a later request.
    fn taken_since(&self, origin: Origin, id: SessionId) -> bool {
        self.answers.get(&origin.client).is_some_and(|memory| {
            memory
                .answers
                .iter()
                .any(|(req_id, a)| *req_id > origin.req_id && *a == Ok(Outcome::SessionOpened(id)))
        })
    }

    /// Whether `origin` is older than every answer remembered for its client, whose memory
    /// is full (request ids of one client only grow).
    fn superseded(&self, origin: Origin) -> bool {
        self.answers.get(&origin.client).is_some_and(|memory| {
            memory.answers.len() >= MAX_ANSWERS_PER_CLIENT
                && memory.answers.iter().all(|(id, _)| *id > origin.req_id)
        })
    }

    /// The answer remembered for `origin`, if any.
    pub fn remembered(&self, origin: Origin) -> Option<Answer> {
        self.answers
            .get(&origin.client)?
            .answers
            .iter()
            .find(|(id, _)| *id == origin.req_id)
            .map(|(_, a)| a.clone())
    }

    fn remember(&mut self, origin: Origin, answer: Answer) {
        let stamp = self.n_applied;
        let memory = self.answers.entry(origin.client).or_default();
        let old_stamp = std::mem::replace(&mut memory.last_used, stamp);
        if memory.answers.len() >= MAX_ANSWERS_PER_CLIENT {
            memory.answers.pop_front();
        }
        memory.answers.push_back((origin.req_id, answer));
        if old_stamp != 0 {
            self.answers_by_use.remove(&old_stamp);
        }
        self.answers_by_use.insert(stamp, origin.client);
        while self.answers.len() > MAX_REMEMBERED_CLIENTS {
            let Some((_, oldest)) = self.answers_by_use.pop_first() else {
                break;
            };
            self.answers.remove(&oldest);
        }
    }

    fn forget_client(&mut self, client: u64) {
        if let Some(memory) = self.answers.remove(&client) {
            self.answers_by_use.remove(&memory.last_used);
        }
    }

    /// Ends a session and drops it from the indexes.
    fn close_session(&mut self, id: SessionId) {
        if let Some(closed) = self.sessions.remove(&id) {
            self.size = self.size.saturating_sub(session_bytes(&closed));
            self.session_of_user.remove(&closed.user);
            if self.session_of_client.get(&closed.client) == Some(&id) {
                self.session_of_client.remove(&closed.client);
            }
        }
    }

    /// A client process holds at most one session: a new login on it ends the old one.
    fn close_client_session(&mut self, client: u64) {
        if let Some(id) = self.session_of_client.get(&client).copied() {
            self.close_session(id);
        }
    }

    /// Whether `link` is a link `client` has left: its session is held through a newer link
    /// of the same process ([`older_link`]).
    pub fn left_link(&self, client: u64, link: LinkNo) -> bool {
        self.session_of_client
            .get(&client)
            .and_then(|id| self.sessions.get(id))
            .is_some_and(|s| s.client == client && older_link(link, s.link))
    }

    /// Hands session `id` to `client` connected through `tracker` by its link `link`.
    fn move_session(&mut self, id: SessionId, tracker: TrackerRef, client: u64, link: LinkNo) {
        let Some(old_client) = self.sessions.get(&id).map(|s| s.client) else {
            return;
        };
        if old_client != client {
            if self.session_of_client.get(&old_client) == Some(&id) {
                self.session_of_client.remove(&old_client);
            }
            self.close_client_session(client);
        }
        if let Some(s) = self.sessions.get_mut(&id) {
            s.tracker = tracker;
            s.client = client;
            s.link = link;
        }
        self.session_of_client.insert(client, id);
    }

    /// How many entries have been applied (every replica agrees at the same point).
    pub fn n_applied(&self) -> u64 {
        self.n_applied
    }

    /// The user of `session` and the group it acts on.
    fn acting_in(
        &mut self,
        session: SessionId,
        group: &GroupId,
    ) -> Result<(UserId, &mut Group), Reject> {
        let user = self.user_of(session)?.clone();
        let g = self
            .groups
            .get_mut(group)
            .ok_or_else(|| no_such_group(group))?;
        Ok((user, g))
    }

    /// The user of an open session.
    pub fn user_of(&self, session: SessionId) -> Result<&UserId, Reject> {
        self.sessions
            .get(&session)
            .map(|s| &s.user)
            .ok_or_else(not_logged_in)
    }

    pub fn session(&self, session: SessionId) -> Option<&Session> {
        self.sessions.get(&session)
    }

    /// About how many bytes the state takes (what its snapshot would): ids, password hashes,
    /// members, requests, file metadata, sharers and sessions, plus a fixed cost per record
    /// for what surrounds them. A walk over everything: the state keeps the same figure
    /// through every apply (rebuilt by this walk when a snapshot is read), and test and debug
    /// builds check the two agree.
    pub fn approx_bytes(&self) -> usize {
        let users: usize = self
            .users
            .iter()
            .map(|(id, u)| id_bytes(id) + u.pw_hash.len())
            .sum();
        let groups: usize = self.groups.iter().map(|(id, g)| group_bytes(id, g)).sum();
        let sessions: usize = self.sessions.values().map(session_bytes).sum();
        users + groups + sessions
    }

    /// What `user` holds, for the quotas: a lookup in the index every apply keeps.
    pub fn holdings(&self, user: &UserId) -> Holdings {
        self.holdings.get(user).copied().unwrap_or_default()
    }

    /// Whether `user` shares the file `name` of `group`.
    pub fn shares(&self, user: &UserId, group: &GroupId, name: &FileName) -> bool {
        self.groups
            .get(group)
            .and_then(|g| g.files.get(name))
            .is_some_and(|f| f.sharers.iter().any(|s| s.user == *user))
    }

    /// The open session of client process `client`, if any.
    pub fn session_of_client(&self, client: u64) -> Option<SessionId> {
        self.session_of_client.get(&client).copied()
    }

    pub fn sessions(&self) -> impl Iterator<Item = (&SessionId, &Session)> {
        self.sessions.iter()
    }

    /// The stored password hash of `user`, if the account exists.
    pub fn password_hash(&self, user: &UserId) -> Option<&str> {
        self.users.get(user).map(|u| u.pw_hash.as_str())
    }

    /// Whether `user` may open a session now: the account exists and has no open session.
    pub fn check_can_log_in(&self, user: &UserId) -> Result<(), Reject> {
        if !self.users.contains_key(user) {
            return Err(Reject::new(
                RejectCode::UnknownUser,
                format!("no such user '{user}'"),
            ));
        }
        if self.session_of_user.contains_key(user) {
            return Err(Reject::new(
                RejectCode::UserLoggedInElsewhere,
                format!("user '{user}' is already logged in on another client"),
            ));
        }
        Ok(())
    }

    /// Every group, sorted by id, with the asking user's relation to it.
    pub fn list_groups(&self, session: SessionId) -> Result<Vec<GroupInfo>, Reject> {
        Ok(self.groups_of(session)?.collect())
    }

    /// [`list_groups`](Self::list_groups) one at a time (a listing in parts skips to its
    /// part without building the rest).
    pub fn groups_of(
        &self,
        session: SessionId,
    ) -> Result<impl Iterator<Item = GroupInfo> + '_, Reject> {
        let user = self.user_of(session)?;
        Ok(self.groups.iter().map(move |(id, g)| GroupInfo {
            group: id.clone(),
            owner: g.owner.clone(),
            n_members: u32::try_from(g.members.len()).unwrap_or(u32::MAX),
            relation: if g.owner == *user {
                Relation::Owner
            } else if g.is_member(user) {
                Relation::Member
            } else if g.requests.contains(user) {
                Relation::Requested
            } else {
                Relation::None
            },
        }))
    }

    /// Pending join requests of a group, oldest first; for its owner only.
    pub fn list_requests(
        &self,
        session: SessionId,
        group: &GroupId,
    ) -> Result<Vec<UserId>, Reject> {
        let user = self.user_of(session)?;
        let g = self.groups.get(group).ok_or_else(|| no_such_group(group))?;
        if g.owner != *user {
            return Err(not_owner(group));
        }
        Ok(g.requests.clone())
    }

    /// The files of a group, sorted by name; for members only.
    pub fn list_files(&self, session: SessionId, group: &GroupId) -> Result<Vec<FileInfo>, Reject> {
        let user = self.user_of(session)?;
        let g = self.groups.get(group).ok_or_else(|| no_such_group(group))?;
        if !g.is_member(user) {
            return Err(not_member(group));
        }
        Ok(g.files
            .values()
            .map(|f| FileInfo {
                name: f.meta.name.clone(),
                size: f.meta.size,
                n_online: count_u32(f.sharers.iter().filter(|s| self.is_online(s)).count()),
                n_sharers: count_u32(f.sharers.len()),
                file_sha1: f.meta.file_sha1,
            })
            .collect())
    }

    /// A file's metadata and the peer addresses of its online sharers; for members only.
    pub fn file_sharers(
        &self,
        session: SessionId,
        group: &GroupId,
        name: &FileName,
    ) -> Result<(FileMeta, Vec<SocketAddr>), Reject> {
        let (meta, peers) = self.file_sharers_with_keys(session, group, name)?;
        Ok((meta, peers.into_iter().map(|(addr, _)| addr).collect()))
    }

    /// [`file_sharers`](Self::file_sharers) with each sharer's identity key (the one its
    /// client registered at login), in address order.
    pub fn file_sharers_with_keys(
        &self,
        session: SessionId,
        group: &GroupId,
        name: &FileName,
    ) -> Result<(FileMeta, Vec<KeyedSharer>), Reject> {
        let user = self.user_of(session)?;
        let g = self.groups.get(group).ok_or_else(|| no_such_group(group))?;
        if !g.is_member(user) {
            return Err(not_member(group));
        }
        let file = g.files.get(name).ok_or_else(|| {
            Reject::new(
                RejectCode::NoSuchFile,
                format!("no file '{name}' in group '{group}'"),
            )
        })?;
        let mut peers: Vec<KeyedSharer> = file
            .sharers
            .iter()
            .filter_map(|s| {
                let session = self
                    .session_of_user
                    .get(&s.user)
                    .and_then(|id| self.sessions.get(id))
                    .filter(|session| session.peer_addr == s.peer_addr)?;
                Some((s.peer_addr, session.client_key))
            })
            .collect();
        peers.sort_unstable();
        peers.dedup_by_key(|(addr, _)| *addr);
        Ok((file.meta.clone(), peers))
    }

    /// A share is online while its user has a session on the client that holds the file.
    pub fn is_online(&self, sharer: &Sharer) -> bool {
        self.session_of_user
            .get(&sharer.user)
            .and_then(|id| self.sessions.get(id))
            .is_some_and(|s| s.peer_addr == sharer.peer_addr)
    }

    pub fn group(&self, group: &GroupId) -> Option<&Group> {
        self.groups.get(group)
    }
}

fn count_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;

mod snapshot;
