//! The snapshot of a [`TrackerState`]: every field, in one self-contained byte string that a
//! tracker copies to another (in `ReplMsg::SnapshotPart`s) when that one joins or falls behind.
//!
//! The index maps (`session_of_user`, `session_of_client`, `answers_by_use`) are not written:
//! decoding rebuilds them from the primary data, after checking that the data can back them: no
//! duplicate keys, session ids in `1..=next_session`, no session of an unknown user, at most one
//! session per user and per client, distinct answer stamps in `1..=n_applied`, at most
//! `MAX_ANSWERS_PER_CLIENT` answers per client and `MAX_REMEMBERED_CLIENTS` clients. A snapshot
//! that decodes is therefore a state whose indexes agree with its data, and whose groups keep
//! the invariants `apply` keeps (the owner is the longest-standing member, members and
//! requesters are distinct existing users, every file has distinct sharers, all of them
//! members); anything else is [`DecodeError::BadValue`]. Like the wire parsers, decoding never
//! panics and checks every count against the bytes that remain before allocating; the encoding
//! is canonical (maps in ascending key order, which decoding enforces), so a snapshot of the
//! current version that decodes re-encodes to the same bytes.
//!
//! Layout, big-endian, with the field types of `wire::replication`:
//!
//! ```text
//! u32 version (3; version 2, without `link`, and 1, without `client_key` either, are still
//!               read)
//! u64 next_session | u64 n_applied
//! u32 n | (str user | str pw_hash) * n                                       users
//! u32 n | group * n                                                          groups
//!     group:  str group | str owner | u32 n | str member * n | u32 n | str requester * n
//!             | u32 n | file * n
//!     file:   file_meta | u32 n | (str user | addr peer_addr) * n             sharers
//! u32 n | (u64 id | str user | addr peer_addr | tracker_ref | u64 client | token
//!          | [32] client_key | u64 link) * n
//!                                                                            sessions
//! u32 n | (u64 client | u64 last_used | u32 n | (u64 req_id | answer) * n) * n
//!                                                                            answers
//!     answer: u8 kind | fields: 0 done; 1 session opened: u64 session;
//!             2 shared: u8 new_file (0|1); 3 refused: u16 code | str message
//! ```
//!
//! Users, groups, files (by name), sessions (by id) and remembered clients are in ascending key
//! order; members, requesters, sharers and answers in the state's own order. A refusal message
//! is at most 65 535 bytes (a longer one is cut at a character boundary; `apply` writes short
//! sentences).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;

use super::{
    Answer, ClientAnswers, Group, Outcome, Reject, Session, SessionId, SharedFile, Sharer,
    TrackerState, User, MAX_ANSWERS_PER_CLIENT, MAX_REMEMBERED_CLIENTS,
};
use crate::wire::codec::*;
use crate::wire::replication::{group_id, put_tracker_ref, pw_hash, tracker_ref, user_id};
use crate::wire::tracker_link::{FileMeta, RejectCode};
use crate::wire::UserId;

/// The snapshot format this build writes and reads.
const SNAPSHOT_VERSION: u32 = 3;

/// Longest refusal message a snapshot carries.
const MAX_SNAPSHOT_MESSAGE_LEN: usize = u16::MAX as usize;

// Fewest bytes each repeated element takes, for `Reader::count`.
/// A `str` id: `u16 len | at least 1 byte`.
const MIN_ID_LEN: usize = 2 + 1;
/// `str user | str pw_hash` (the hash may be empty).
const MIN_USER_LEN: usize = MIN_ID_LEN + 2;
/// `str group | str owner | u32 n | u32 n | u32 n`.
const MIN_GROUP_LEN: usize = MIN_ID_LEN + MIN_ID_LEN + 4 + 4 + 4;
/// `file_meta` (`str name | u64 size | u32 piece_len | sha1 | u32 n`) and `u32 n`.
const MIN_FILE_LEN: usize = MIN_ID_LEN + 8 + 4 + 20 + 4 + 4;
/// `str user | addr` (an IPv4 address is `u8 | 4 bytes | u16`).
const MIN_SHARER_LEN: usize = MIN_ID_LEN + 7;
/// `u64 id | str user | addr | tracker_ref | u64 client | token | [32] client_key | u64 link`.
const MIN_SESSION_LEN: usize = 8 + MIN_ID_LEN + 7 + 10 + 8 + 16 + 32 + 8;
/// `u64 client | u64 last_used | u32 n`.
const MIN_CLIENT_ANSWERS_LEN: usize = 8 + 8 + 4;
/// `u64 req_id | u8 kind`.
const MIN_ANSWER_LEN: usize = 8 + 1;

/// Answer kinds.
const ANSWER_DONE: u8 = 0;
const ANSWER_SESSION_OPENED: u8 = 1;
const ANSWER_SHARED: u8 = 2;
const ANSWER_REFUSED: u8 = 3;

impl TrackerState {
    /// Appends the snapshot of the whole state to `out` (layout in the module documentation).
    pub fn encode_snapshot(&self, out: &mut Vec<u8>) {
        put_u32(out, SNAPSHOT_VERSION);
        put_u64(out, self.next_session);
        put_u64(out, self.n_applied);

        put_count(out, self.users.len());
        for (user, u) in &self.users {
            put_str16(out, user.as_str());
            put_str16(out, &u.pw_hash);
        }

        put_count(out, self.groups.len());
        for (id, g) in &self.groups {
            put_str16(out, id.as_str());
            put_str16(out, g.owner.as_str());
            put_users(out, &g.members);
            put_users(out, &g.requests);
            put_count(out, g.files.len());
            for f in g.files.values() {
                f.meta.emit(out);
                put_count(out, f.sharers.len());
                for s in &f.sharers {
                    put_str16(out, s.user.as_str());
                    put_socket_addr(out, &s.peer_addr);
                }
            }
        }

        put_count(out, self.sessions.len());
        for (id, s) in &self.sessions {
            put_u64(out, id.0);
            put_str16(out, s.user.as_str());
            put_socket_addr(out, &s.peer_addr);
            put_tracker_ref(out, &s.tracker);
            put_u64(out, s.client);
            out.extend_from_slice(&s.token);
            out.extend_from_slice(&s.client_key);
            put_u64(out, s.link);
        }

        put_count(out, self.answers.len());
        for (client, memory) in &self.answers {
            put_u64(out, *client);
            put_u64(out, memory.last_used);
            put_count(out, memory.answers.len());
            for (req_id, answer) in &memory.answers {
                put_u64(out, *req_id);
                put_answer(out, answer);
            }
        }
    }

    /// Reads a snapshot written by [`encode_snapshot`](Self::encode_snapshot): the whole of
    /// `bytes`, nothing more. The indexes are rebuilt; data that could not back them, or that
    /// breaks the state's invariants, is [`DecodeError::BadValue`].
    pub fn decode_snapshot(bytes: &[u8]) -> Result<TrackerState, DecodeError> {
        let mut r = Reader::new(bytes);
        // Version 1 (earlier builds, in their data directories) has no client keys: read
        // with zero keys (such a session's sharer key is unknown until its client logs in
        // again), and written back as the current version. Versions 1 and 2 have no link
        // numbers: read as 0 (not numbered, so every op of the client acts as it did).
        let version = r.u32()?;
        if !(1..=SNAPSHOT_VERSION).contains(&version) {
            return Err(DecodeError::BadValue("snapshot version"));
        }
        let mut st = TrackerState::new();
        st.next_session = r.u64()?;
        st.n_applied = r.u64()?;

        let n = r.count(MIN_USER_LEN)?;
        for _ in 0..n {
            let user = user_id(&mut r)?;
            let pw_hash = pw_hash(&mut r)?;
            insert_ascending(&mut st.users, user, User { pw_hash }, "users out of order")?;
        }

        let n = r.count(MIN_GROUP_LEN)?;
        for _ in 0..n {
            let id = group_id(&mut r)?;
            let group = decode_group(&mut r, &st)?;
            insert_ascending(&mut st.groups, id, group, "groups out of order")?;
        }

        let missing = match version {
            1 => 32 + 8,
            2 => 8,
            _ => 0,
        };
        let n = r.count(MIN_SESSION_LEN - missing)?;
        for _ in 0..n {
            let id = SessionId(r.u64()?);
            let session = Session {
                user: user_id(&mut r)?,
                peer_addr: r.socket_addr()?,
                tracker: tracker_ref(&mut r)?,
                client: r.u64()?,
                token: r.array()?,
                client_key: if version == 1 { [0; 32] } else { r.array()? },
                link: if version < 3 { 0 } else { r.u64()? },
            };
            if id.0 == 0 || id.0 > st.next_session {
                return Err(DecodeError::BadValue("session id out of range"));
            }
            if !st.users.contains_key(&session.user) {
                return Err(DecodeError::BadValue("session of an unknown user"));
            }
            if st
                .session_of_user
                .insert(session.user.clone(), id)
                .is_some()
            {
                return Err(DecodeError::BadValue("user with two sessions"));
            }
            if st.session_of_client.insert(session.client, id).is_some() {
                return Err(DecodeError::BadValue("client with two sessions"));
            }
            insert_ascending(&mut st.sessions, id, session, "sessions out of order")?;
        }

        let n = r.count(MIN_CLIENT_ANSWERS_LEN)?;
        if n > MAX_REMEMBERED_CLIENTS {
            return Err(DecodeError::BadValue("too many remembered clients"));
        }
        for _ in 0..n {
            let client = r.u64()?;
            let last_used = r.u64()?;
            // Stamps are entry counts, from 1 on: `remember` takes 0 for "no stamp yet".
            if last_used == 0 || last_used > st.n_applied {
                return Err(DecodeError::BadValue("answer stamp out of range"));
            }
            let k = r.count(MIN_ANSWER_LEN)?;
            if k > MAX_ANSWERS_PER_CLIENT {
                return Err(DecodeError::BadValue("too many remembered answers"));
            }
            let mut answers = VecDeque::with_capacity(k);
            for _ in 0..k {
                let req_id = r.u64()?;
                answers.push_back((req_id, decode_answer(&mut r)?));
            }
            if st.answers_by_use.insert(last_used, client).is_some() {
                return Err(DecodeError::BadValue(
                    "two clients with the same answer stamp",
                ));
            }
            let memory = ClientAnswers { last_used, answers };
            insert_ascending(&mut st.answers, client, memory, "clients out of order")?;
        }

        r.finish()?;
        // Derived data, not in the snapshot.
        st.rebuild_derived();
        Ok(st)
    }
}

fn put_users(out: &mut Vec<u8>, users: &[UserId]) {
    put_count(out, users.len());
    for u in users {
        put_str16(out, u.as_str());
    }
}

fn put_answer(out: &mut Vec<u8>, answer: &Answer) {
    match answer {
        Ok(Outcome::Done) => put_u8(out, ANSWER_DONE),
        Ok(Outcome::SessionOpened(id)) => {
            put_u8(out, ANSWER_SESSION_OPENED);
            put_u64(out, id.0);
        }
        Ok(Outcome::Shared { new_file }) => {
            put_u8(out, ANSWER_SHARED);
            put_bool(out, *new_file);
        }
        Err(reject) => {
            put_u8(out, ANSWER_REFUSED);
            put_u16(out, reject.code.to_u16());
            let message = &reject.message;
            let mut cut = message.len().min(MAX_SNAPSHOT_MESSAGE_LEN);
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            put_str16(out, message.get(..cut).unwrap_or(""));
        }
    }
}

fn decode_answer(r: &mut Reader<'_>) -> Result<Answer, DecodeError> {
    Ok(match r.u8()? {
        ANSWER_DONE => Ok(Outcome::Done),
        ANSWER_SESSION_OPENED => Ok(Outcome::SessionOpened(SessionId(r.u64()?))),
        ANSWER_SHARED => Ok(Outcome::Shared {
            new_file: r.bool()?,
        }),
        ANSWER_REFUSED => Err(Reject {
            code: RejectCode::from_u16(r.u16()?),
            message: r.str16(MAX_SNAPSHOT_MESSAGE_LEN)?.to_owned(),
        }),
        _ => return Err(DecodeError::BadValue("answer kind")),
    })
}

/// Inserts `key`, which must come after every key already in `map` (so there are no
/// duplicates, and the encoding is canonical).
fn insert_ascending<K: Ord, V>(
    map: &mut BTreeMap<K, V>,
    key: K,
    value: V,
    what: &'static str,
) -> Result<(), DecodeError> {
    if map.last_key_value().is_some_and(|(last, _)| *last >= key) {
        return Err(DecodeError::BadValue(what));
    }
    map.insert(key, value);
    Ok(())
}

/// `u32 n | str user * n`: distinct users, all with accounts in `st`.
fn decode_users(
    r: &mut Reader<'_>,
    st: &TrackerState,
) -> Result<(Vec<UserId>, BTreeSet<UserId>), DecodeError> {
    let n = r.count(MIN_ID_LEN)?;
    let mut users = Vec::with_capacity(n);
    let mut seen = BTreeSet::new();
    for _ in 0..n {
        let user = user_id(r)?;
        if !st.users.contains_key(&user) {
            return Err(DecodeError::BadValue("group lists an unknown user"));
        }
        if !seen.insert(user.clone()) {
            return Err(DecodeError::BadValue("group lists a user twice"));
        }
        users.push(user);
    }
    Ok((users, seen))
}

/// A group after its id, checked against the users already decoded into `st`.
fn decode_group(r: &mut Reader<'_>, st: &TrackerState) -> Result<Group, DecodeError> {
    let owner = user_id(r)?;
    let (members, member_set) = decode_users(r, st)?;
    if members.first() != Some(&owner) {
        return Err(DecodeError::BadValue("group owner is not its first member"));
    }
    let (requests, _) = decode_users(r, st)?;
    if requests.iter().any(|u| member_set.contains(u)) {
        return Err(DecodeError::BadValue("group member with a pending request"));
    }
    let mut files = BTreeMap::new();
    let n = r.count(MIN_FILE_LEN)?;
    for _ in 0..n {
        let meta = FileMeta::parse(r)?;
        let n_sharers = r.count(MIN_SHARER_LEN)?;
        if n_sharers == 0 {
            return Err(DecodeError::BadValue("file without sharers"));
        }
        let mut sharers = Vec::with_capacity(n_sharers);
        let mut seen: BTreeSet<(UserId, SocketAddr)> = BTreeSet::new();
        for _ in 0..n_sharers {
            let sharer = Sharer {
                user: user_id(r)?,
                peer_addr: r.socket_addr()?,
            };
            if !member_set.contains(&sharer.user) {
                return Err(DecodeError::BadValue("file shared by a non-member"));
            }
            if !seen.insert((sharer.user.clone(), sharer.peer_addr)) {
                return Err(DecodeError::BadValue("file sharer listed twice"));
            }
            sharers.push(sharer);
        }
        let name = meta.name.clone();
        let file = SharedFile { meta, sharers };
        insert_ascending(&mut files, name, file, "files out of order")?;
    }
    Ok(Group {
        owner,
        members,
        requests,
        files,
    })
}

#[cfg(test)]
#[path = "snapshot_tests.rs"]
mod tests;
