//! The tracker's sans-IO request handling: frames in, messages and closes out.
//!
//! [`TrackerCore`] owns the [`Replica`] (which owns the replicated [`TrackerState`]) and knows
//! which connection is a client or another tracker, and which client holds which session.
//! A change becomes an [`Entry`] (the op and the client's id and request id) that the replica
//! orders across the trackers; the client is answered when the entry is committed (held by
//! every live tracker), and its later requests wait until then, so answers keep their order.
//! Clients are welcomed only once this tracker serves (holds a state caught up with the
//! others).
//!
//! **No dirty reads.** Every other answer made from the state (queries, and refusals such as
//! `not logged in` or a quota) is made at once from the applied state, but that state may hold
//! entries not committed yet (the primary applies a batch when it sends it, a backup when it
//! receives it), which a crash of every tracker or a takeover may still lose. So such an
//! answer is sent only once `committed` reaches the entry the state stood at when it was made
//! (`applied` then): it waits as a change's answer does (`Waiting::Read`, the connection's
//! later requests queued behind it), and goes out at the commit. When nothing is in flight
//! (`committed == applied`) it goes out at once. If the state is replaced meanwhile, a held
//! request is handled again with the new state (a refusal made after password work or at a
//! commit, whose request is not kept, becomes `Unavailable`: ask again): nothing is sent from
//! a state that may be gone.
//! The driver feeds it `handle_open`, `handle_frame`, `handle_close` and `handle_timeout(now)`
//! and drains [`Output`]s with `poll_output`. No sockets, clocks or threads live here: time is
//! an argument, so the whole request path is tested without a network.
//!
//! Requests of one connection are answered in order (a `Ping` excepted: it is answered at
//! once, so a client whose request waits for password work or a commit hears from its tracker
//! and does not take it for hung). Password work (Argon2id) is slow, so the core parks the
//! connection and queues the job in its [`PasswordQueue`] (fair and bounded: see that module),
//! which hands it to the driver as [`Output::Password`] once a password thread is free and the
//! job's turn has come; the connection's later requests wait in a bounded queue until
//! [`TrackerCore::handle_password_done`] brings the answer. Other connections are served
//! meanwhile.
//!
//! Errors split by what happens next: a frame that does not parse, a request before the
//! handshake or a wrong protocol version closes that connection; a well-formed request that is
//! refused is answered with `Refused` and the connection lives on.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use super::durable::{Persist, Restored};
use super::password::{PasswordJob, PasswordResult};
use super::password_queue::{JobOwner, PasswordQueue, Pushed};
use super::replica::{Replica, ReplicaOut, Timings};
use super::state::{
    Adds, Answer, Entry, LinkNo, Op, OpQuotas, Origin, Outcome, Reject, SessionId, TrackerRef,
    TrackerState,
};
use super::tickets::TicketIssuer;
use crate::net::ConnId;
use crate::wire::frame::MAX_CLIENT_TRACKER_FRAME;
use crate::wire::replication::{ReplMsg, MAX_REPLICATION_FRAME};
use crate::wire::tracker_link::{
    ClientMsg, RejectCode, Reply, ReplyBody, Request, RequestBody, Role, TrackerMsg,
};
use crate::wire::tracker_link::{Listing, MAX_PART_BYTES};
use crate::wire::{FileName, GroupId, UserId, PROTOCOL_VERSION};

/// A connection must complete its handshake within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests a connection may pipeline behind one waiting for password work; more closes it.
pub const MAX_QUEUED_REQUESTS: usize = 4096;
/// A connection with this many requests (or [`PAUSE_QUEUED_BYTES`] of them) waiting behind
/// a parked one is not read until they are answered ([`TrackerCore::wants_input`]): the
/// driver's backpressure, so that releasing them answers at most this many at once.
pub const PAUSE_QUEUED_REQUESTS: usize = 16;
/// See [`PAUSE_QUEUED_REQUESTS`].
pub const PAUSE_QUEUED_BYTES: usize = 1024 * 1024;
/// How often silent client connections are looked for (when an idle timeout is set).
pub const IDLE_SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Password threads assumed unless [`TrackerCore::with_password_workers`] says otherwise.
pub const DEFAULT_PASSWORD_WORKERS: usize = 2;

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Send(ConnId, TrackerMsg),
    /// A message on a tracker-to-tracker link.
    SendReplica(ConnId, ReplMsg),
    /// Open a link to tracker `no` of the file; report `handle_dialed` or
    /// `handle_dial_failed`.
    Dial(u16),
    /// The handshake is done: accept frames up to this size from now on.
    SetMaxFrame(ConnId, usize),
    Close(ConnId),
    /// Run this password job off the reactor and call `handle_password_done(conn, result)`.
    Password(ConnId, PasswordJob),
    /// Write this to the data directory (in order) and call `handle_durable` once it is
    /// durable.
    Persist(Persist),
}

/// Who is at the other end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// No handshake yet.
    Unknown,
    /// A client (its id from the handshake); `welcomed` once this tracker serves.
    Client { client: u64, welcomed: bool },
    /// Another tracker: frames go to the replica.
    Tracker,
}

#[derive(Debug)]
struct Link {
    kind: Kind,
    /// When the connection opened, as a count of connections opened before it.
    opened: u64,
    session: Option<SessionId>,
    /// The client's number for this link, as its last login or resume on it said (0: none
    /// yet, or an earlier build's client): its `ClientGone` names it, so that the close of a
    /// link the client has left never ends the session it holds through a newer one.
    client_link: LinkNo,
    /// The client asked for a change (so its answers are remembered until it leaves).
    changed: bool,
    /// The request waiting for password work, if any.
    waiting: Option<Waiting>,
    /// Requests that arrived while `waiting` was set, oldest first, with their frame sizes.
    queued: VecDeque<(Request, usize)>,
    /// The sum of those frame sizes.
    queued_bytes: usize,
    /// When a frame last arrived on the connection.
    last_heard: Instant,
    /// The connection ran the service's handshake (`handle_secure`): its frames come
    /// from a holder of the service's secret.
    secure: bool,
    /// The address the connection comes from, if the driver said (`handle_peer_addr`).
    ip: Option<IpAddr>,
}

impl Link {
    fn new(kind: Kind, opened: u64, now: Instant) -> Self {
        Link {
            queued_bytes: 0,
            last_heard: now,
            kind,
            opened,
            secure: false,
            ip: None,
            session: None,
            client_link: 0,
            changed: false,
            waiting: None,
            queued: VecDeque::new(),
        }
    }

    fn handshaken(&self) -> bool {
        !matches!(
            self.kind,
            Kind::Unknown
                | Kind::Client {
                    welcomed: false,
                    ..
                }
        )
    }

    fn client(&self) -> Option<u64> {
        match self.kind {
            Kind::Client { client, .. } => Some(client),
            _ => None,
        }
    }
}

/// What a committed answer means for the connection's session.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SessionEffect {
    None,
    /// Login or resume: the answer opens the session, if it is the one this proof is for
    /// (a remembered answer to a retry names a session: it must be the prover's).
    Open(Proof),
    /// Logout: the answer ends it.
    Close,
}

/// What a login or resume proved: the password of this user, or this session token.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Proof {
    Password(UserId),
    Token([u8; 16]),
}

/// A request parked until its password job is done or its change is committed.
#[derive(Debug)]
enum Waiting {
    CreateUser {
        req_id: u64,
        user: UserId,
    },
    /// A `create_user` whose (client id, request id) has a remembered answer: it is that
    /// answer only if the password is the user's (client ids travel in clear).
    CreateUserRetry {
        req_id: u64,
        user: UserId,
    },
    Login {
        req_id: u64,
        user: UserId,
        peer_addr: SocketAddr,
        shares: Vec<(GroupId, FileName)>,
        client_key: [u8; 32],
        link: LinkNo,
    },
    /// The change is being replicated.
    Commit {
        req_id: u64,
        origin: Origin,
        effect: SessionEffect,
    },
    /// An answer made from a state that held entries not yet committed: sent once
    /// `committed` reaches `at` (see the module doc: no dirty reads).
    Read {
        req_id: u64,
        /// The entry the state stood at when the answer was made.
        at: u64,
        body: Result<ReplyBody, Reject>,
        /// The request and its frame size, to handle it again if the state is replaced
        /// meanwhile (`None`: a refusal made after password work or at a change's commit,
        /// which becomes `Unavailable` then, so the client asks again).
        request: Option<(RequestBody, usize)>,
    },
}

/// What handling a request led to.
enum Handled {
    Reply(ReplyBody),
    /// Parked until a password job is done.
    Waiting(Waiting, PasswordJob),
    /// A change to replicate, and what its answer does to the session.
    Change(Op, SessionEffect),
}

pub struct TrackerCore {
    replica: Replica,
    links: BTreeMap<ConnId, Link>,
    /// Connections waiting for the commit of a change, by the change's origin.
    awaiting: BTreeMap<Origin, ConnId>,
    /// Answers to those changes, applied and not yet committed, in order.
    answers: VecDeque<(u64, Origin, Answer)>,
    /// Connections whose answer waits for a commit (`Waiting::Read`), by the entry it waits
    /// for: at most one per connection.
    reads: BTreeSet<(u64, ConnId)>,
    /// Connections still owing a handshake, with their deadlines, oldest first.
    handshake_deadlines: VecDeque<(Instant, ConnId)>,
    out: VecDeque<Output>,
    /// A `SetMaxFrame` was queued since the driver last asked (see
    /// [`take_frame_limit_changed`](Self::take_frame_limit_changed)).
    frame_limit_changed: bool,
    /// Connections opened so far (orders them: a restarted tracker's links are newer than the
    /// links of its previous run).
    n_opened: u64,
    /// Secret key of the session-token generator (keyed BLAKE2b over a counter).
    token_key: [u8; 32],
    tokens_issued: u64,
    /// Tracker hellos are accepted only on links marked by `handle_secure`.
    require_secure_tracker_links: bool,
    /// Password jobs waiting for a thread, fairly ordered.
    passwords: PasswordQueue,
    /// Welcomed client connections silent this long are closed (`None`: never).
    idle_timeout: Option<Duration>,
    /// When silent connections are next looked for.
    next_idle_sweep: Option<Instant>,
    /// Bytes (an upper bound) of the replies queued since the driver last asked.
    reply_bytes: usize,
    /// The size of the frame being handled.
    frame_len: usize,
    /// A connection's parked requests reached the pause limit since the driver last asked.
    pause_requested: bool,
    /// A login may claim a listen address on another IP than its connection's.
    allow_foreign_addresses: bool,
    /// Largest answer sent; a bigger one is refused instead (the client's frame limit).
    max_reply: usize,
    /// Most bytes of items in one part of a listing (`ListPart`).
    max_part: usize,
    /// What one user may hold.
    quotas: Quotas,
    /// Signs the tickets that go with a file's sharers (none without it: tests).
    tickets: Option<TicketIssuer>,
    /// Clients this tracker sent elsewhere when it stopped serving, with when their session
    /// ends if they have not moved it (oldest first): see `drop_clients`.
    sent_away: VecDeque<(Instant, u64, LinkNo)>,
    /// `drop_clients` is closing connections (their sessions get the grace period).
    sending_away: bool,
}

/// At most this many clients sent away wait for their grace period; past it a client's
/// session ends at once, as when its connection closes (bounds `sent_away`, which a tracker
/// that keeps losing its primaryship could otherwise grow by its connection count each time).
const MAX_SENT_AWAY: usize = 65_536;

/// What one user, and everyone, may make the service hold. The quotas are checked twice: early by
/// the tracker that receives the request (which saves a replicated change when the state it
/// holds already shows the user at a limit), and then with authority by the replicated apply,
/// which every tracker runs in the same order: the op carries these limits
/// ([`Quotas::in_op`]) so that every tracker applies it alike (see `tracker::state`). The
/// state quota is checked the same way for groups, join requests and files; for new accounts
/// (whose op carries no quotas) only by the receiving tracker. Each has a `tracker_program`
/// option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    /// Groups a user owns (`--max-groups-per-user`).
    pub groups_per_user: usize,
    /// Join requests of a user pending at once (`--max-requests-per-user`).
    pub requests_per_user: usize,
    /// Files a user shares (`--max-files-per-user`).
    pub files_per_user: usize,
    /// Bytes of metadata (piece hashes, name) of the files a user shares
    /// (`--max-metadata-per-user`).
    pub metadata_per_user: usize,
    /// Bytes the whole state may take, by [`TrackerState::approx_bytes`]
    /// (`--max-state-bytes`): past it, nothing that adds to the state is accepted.
    pub state_bytes: usize,
}

impl Quotas {
    /// The limits as a change carries them to the replicated apply.
    pub fn in_op(&self) -> OpQuotas {
        let n = |v: usize| u64::try_from(v).unwrap_or(u64::MAX);
        OpQuotas {
            groups_owned: n(self.groups_per_user),
            requests: n(self.requests_per_user),
            files: n(self.files_per_user),
            metadata: n(self.metadata_per_user),
            state_bytes: n(self.state_bytes),
        }
    }
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            groups_per_user: 1000,
            requests_per_user: 1000,
            files_per_user: 10_000,
            metadata_per_user: 256 * 1024 * 1024,
            state_bytes: 2 * 1024 * 1024 * 1024,
        }
    }
}

impl TrackerCore {
    /// Tracker `me` of a file of `n_trackers`; `seed` keys session tokens unless
    /// [`with_token_key`](Self::with_token_key) gives a key.
    pub fn new(me: TrackerRef, n_trackers: u16, seed: u64, timings: Timings, now: Instant) -> Self {
        Self::with_replica(Replica::new(me, n_trackers, timings, now), seed)
    }

    /// A tracker that keeps its state on disk, started from what its disk held (see
    /// [`Replica::new_durable`]).
    pub fn new_durable(
        me: TrackerRef,
        n_trackers: u16,
        seed: u64,
        timings: Timings,
        now: Instant,
        restored: Restored,
    ) -> Self {
        Self::with_replica(
            Replica::new_durable(me, n_trackers, timings, now, restored),
            seed,
        )
    }

    fn with_replica(replica: Replica, seed: u64) -> Self {
        let mut core = TrackerCore {
            replica,
            links: BTreeMap::new(),
            awaiting: BTreeMap::new(),
            answers: VecDeque::new(),
            reads: BTreeSet::new(),
            handshake_deadlines: VecDeque::new(),
            out: VecDeque::new(),
            frame_limit_changed: false,
            n_opened: 0,
            token_key: {
                let mut key = [0u8; 32];
                for (i, chunk) in key.chunks_mut(8).enumerate() {
                    chunk.copy_from_slice(&(seed ^ (i as u64).wrapping_mul(0x9E37)).to_be_bytes());
                }
                key
            },
            tokens_issued: 0,
            require_secure_tracker_links: false,
            passwords: PasswordQueue::new(DEFAULT_PASSWORD_WORKERS),
            idle_timeout: None,
            next_idle_sweep: None,
            reply_bytes: 0,
            frame_len: 0,
            pause_requested: false,
            allow_foreign_addresses: false,
            max_reply: MAX_CLIENT_TRACKER_FRAME,
            max_part: MAX_PART_BYTES,
            quotas: Quotas::default(),
            tickets: None,
            sent_away: VecDeque::new(),
            sending_away: false,
        };
        core.pump_replica();
        core
    }

    /// Draws session tokens with this secret key (the driver passes 32 bytes from the OS;
    /// without it the key derives from the seed, which suits tests only).
    pub fn with_token_key(mut self, key: [u8; 32]) -> Self {
        self.token_key = key;
        self
    }

    /// Accepts the tracker hello only on connections opened with
    /// [`handle_secure`](Self::handle_secure); on any other it is refused (the
    /// connection closed, nothing sent). The driver always sets it. Without it (the default,
    /// for the simulated clusters of the replica's tests, whose links are all the service's
    /// own) every connection may say it is a tracker.
    pub fn with_secure_tracker_links(mut self) -> Self {
        self.require_secure_tracker_links = true;
        self
    }

    /// Hands out at most `n` password jobs at once (the driver's number of password threads).
    pub fn with_password_workers(mut self, n: usize) -> Self {
        self.passwords = PasswordQueue::new(n);
        self
    }

    /// Closes welcomed client connections on which nothing arrived for `timeout` (clients
    /// ping every 600 ms when they have nothing else to say). Without it (the default, for
    /// the simulated clusters of the replica's tests, whose clients never ping) none is.
    pub fn with_idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = Some(timeout);
        self
    }

    /// Whether the driver should read more requests from `conn`: not while
    /// [`PAUSE_QUEUED_REQUESTS`] or [`PAUSE_QUEUED_BYTES`] wait behind a parked one. The
    /// driver asks again when it next sends `conn` something.
    pub fn wants_input(&self, conn: ConnId) -> bool {
        self.links.get(&conn).is_none_or(|l| {
            l.queued.len() < PAUSE_QUEUED_REQUESTS && l.queued_bytes < PAUSE_QUEUED_BYTES
        })
    }

    /// Whether some connection's parked requests reached the pause limit since the last
    /// call (cheaper than [`wants_input`](Self::wants_input) after every frame).
    pub fn take_pause_requested(&mut self) -> bool {
        std::mem::take(&mut self.pause_requested)
    }

    /// An upper bound of the bytes of the replies queued since the last call (the driver
    /// stops reading a connection whose output would pass its cap).
    pub fn take_reply_bytes(&mut self) -> usize {
        std::mem::take(&mut self.reply_bytes)
    }

    /// Accepts a login's listen address on any IP (a tracker behind a proxy or NAT, which
    /// sees every client from the proxy's address). Without it, a login whose listen address
    /// is not on the IP its connection comes from (when the driver said it) is refused.
    pub fn with_foreign_addresses(mut self, allow: bool) -> Self {
        self.allow_foreign_addresses = allow;
        self
    }

    /// Puts at most `bytes` of items in one part of a listing (default [`MAX_PART_BYTES`]).
    pub fn with_max_part(mut self, bytes: usize) -> Self {
        self.max_part = bytes.clamp(1, MAX_PART_BYTES);
        self
    }

    /// Applies these quotas instead of the defaults.
    pub fn with_quotas(mut self, quotas: Quotas) -> Self {
        self.quotas = quotas;
        self
    }

    /// Refuses answers over `max` bytes (tests; the default is the client's frame limit).
    pub fn with_max_reply(mut self, max: usize) -> Self {
        self.max_reply = max;
        self
    }

    /// Replaces the password queue (tests: a smaller waiting room).
    pub fn with_password_queue(mut self, queue: PasswordQueue) -> Self {
        self.passwords = queue;
        self
    }

    pub fn passwords(&self) -> &PasswordQueue {
        &self.passwords
    }

    /// Issues a ticket with every answer of a file's sharers.
    pub fn with_tickets(mut self, issuer: TicketIssuer) -> Self {
        self.tickets = Some(issuer);
        self
    }

    /// The wall-clock time tickets are issued at (seconds since the Unix epoch).
    pub fn set_unix_time(&mut self, secs: u64) {
        if let Some(issuer) = &mut self.tickets {
            issuer.set_unix_time(secs);
        }
    }

    pub fn state(&self) -> &TrackerState {
        self.replica.state()
    }

    /// A fresh session token: unpredictable without the key, even from other tokens.
    fn next_token(&mut self) -> [u8; 16] {
        use blake2::Digest;
        self.tokens_issued += 1;
        let mut h = blake2::Blake2b128::new();
        h.update(self.token_key);
        h.update(self.tokens_issued.to_be_bytes());
        h.finalize().into()
    }

    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    /// The replica, for scenarios of the simulated clusters (to hand it changes straight, or
    /// to set what it keeps: its ring's bounds).
    #[cfg(test)]
    pub(crate) fn replica_mut(&mut self) -> &mut Replica {
        &mut self.replica
    }

    pub fn handle_open(&mut self, conn: ConnId, now: Instant) {
        self.n_opened += 1;
        self.links
            .insert(conn, Link::new(Kind::Unknown, self.n_opened, now));
        self.handshake_deadlines
            .push_back((now + HANDSHAKE_TIMEOUT, conn));
    }

    /// Where the accepted connection `conn` comes from (the driver says so right after
    /// `handle_open`): password failures are counted per address too.
    pub fn handle_peer_addr(&mut self, conn: ConnId, addr: SocketAddr) {
        if let Some(link) = self.links.get_mut(&conn) {
            link.ip = Some(addr.ip());
        }
    }

    /// The accepted connection `conn` turned out to run the service's handshake (its bytes
    /// reach the core only once that handshake succeeded, so only a holder of the service's
    /// secret can send frames on it): the one kind of connection on which a tracker hello is
    /// accepted when [`with_secure_tracker_links`](Self::with_secure_tracker_links) is set,
    /// and on which a client hello is refused.
    pub fn handle_secure(&mut self, conn: ConnId) {
        if let Some(link) = self.links.get_mut(&conn) {
            link.secure = true;
        }
    }

    /// A link to tracker `no` that we dialed is connected.
    pub fn handle_dialed(&mut self, conn: ConnId, no: u16, now: Instant) {
        self.n_opened += 1;
        self.links
            .insert(conn, Link::new(Kind::Tracker, self.n_opened, now));
        self.set_max_frame(conn, MAX_REPLICATION_FRAME);
        self.replica.handle_dialed(conn, no, self.n_opened, now);
        self.pump_replica();
    }

    /// Dialing tracker `no` failed.
    pub fn handle_dial_failed(&mut self, no: u16, now: Instant) {
        self.replica.handle_dial_failed(no, now);
        self.pump_replica();
    }

    /// A tracker link failed the service's handshake: whoever is at the other end does not
    /// hold this service's key. If we dialed it, that tracker number is not (yet) one of
    /// ours: the replica treats it as down rather than as a tracker that may hold the state.
    pub fn handle_handshake_failed(&mut self, conn: ConnId, now: Instant) {
        if self
            .links
            .get(&conn)
            .is_some_and(|l| l.kind == Kind::Tracker)
        {
            self.links.remove(&conn);
            self.replica.handle_foreign(conn, now);
            self.pump_replica();
        }
    }

    /// The connection is gone (closed by the peer, by an error, or by us).
    pub fn handle_close(&mut self, conn: ConnId, now: Instant) {
        if self.replica.observe(now) {
            self.pump_replica();
        }
        let Some(link) = self.links.remove(&conn) else {
            return;
        };
        self.passwords.forget_conn(conn);
        match link.waiting {
            // A retry of the same request on a newer link of the client may be waiting now.
            Some(Waiting::Commit { origin, .. }) if self.awaiting.get(&origin) == Some(&conn) => {
                self.awaiting.remove(&origin);
            }
            Some(Waiting::Read { at, .. }) => {
                self.reads.remove(&(at, conn));
            }
            _ => {}
        }
        match link.kind {
            Kind::Tracker => {
                self.replica.handle_closed(conn, now);
                self.pump_replica();
            }
            Kind::Client { client, .. } if link.session.is_some() || link.changed => {
                // The client came back on another link before this one's close was seen: its
                // session (same tracker, same client) is that link's now, and ends with it.
                if let Some(newer) = self.links.values_mut().find(|l| l.client() == Some(client)) {
                    newer.changed = true;
                    return;
                }
                if self.sending_away && self.sent_away.len() < MAX_SENT_AWAY {
                    // Sent elsewhere by this tracker, not gone: the client resumes its
                    // session through another tracker, and ending it here first would race
                    // that resume. It ends after the grace period unless it moved.
                    let grace = self.replica.session_grace();
                    self.sent_away
                        .push_back((now + grace, client, link.client_link));
                    return;
                }
                self.client_gone(client, link.client_link);
            }
            _ => {}
        }
    }

    /// Ends `client`'s session if this tracker (this run of it) still holds it through its
    /// link `link` or a later one.
    fn client_gone(&mut self, client: u64, link: LinkNo) {
        let tracker = self.replica.me();
        let origin = self.replica.internal_origin();
        self.submit(Entry {
            origin: Some(origin),
            op: Op::ClientGone {
                client,
                tracker,
                link,
            },
        });
    }

    /// Ends the sessions of the clients sent away whose grace period is over and that have
    /// neither moved their session (then `ClientGone` changes nothing) nor come back here.
    fn end_sent_away(&mut self, now: Instant) {
        while self.sent_away.front().is_some_and(|(end, ..)| *end <= now) {
            let Some((_, client, link)) = self.sent_away.pop_front() else {
                break;
            };
            if !self.links.values().any(|l| l.client() == Some(client)) {
                self.client_gone(client, link);
            }
        }
    }

    /// One whole frame payload from `conn`, received at `now`.
    pub fn handle_frame(&mut self, conn: ConnId, payload: &[u8], now: Instant) {
        let Some(link) = self.links.get_mut(&conn) else {
            // Closed by the core (a duplicate tracker link, say) while frames of the same
            // read were still being handed up.
            return;
        };
        link.last_heard = now;
        self.frame_len = payload.len();
        if self
            .links
            .get(&conn)
            .is_some_and(|l| l.kind == Kind::Tracker)
        {
            match ReplMsg::parse(payload) {
                Ok(msg) => {
                    self.replica.handle_msg(conn, msg, now);
                    self.pump_replica();
                }
                Err(e) => {
                    warn!("tracker link {conn}: malformed frame: {e}");
                    self.close(conn, now);
                }
            }
            return;
        }
        // A client's frame may be the first thing handled after a stall: the replica must
        // see the time first, so that a stale state answers nothing.
        if self.replica.observe(now) {
            self.pump_replica();
            if !self.links.contains_key(&conn) {
                return;
            }
        }
        match ClientMsg::parse(payload) {
            Ok(msg) => self.handle_msg(conn, msg, now),
            Err(e) => {
                warn!("conn {conn}: malformed frame: {e}");
                self.close(conn, now);
            }
        }
    }

    /// Every write up to number `upto` (see [`Output::Persist`]) is durable.
    pub fn handle_durable(&mut self, upto: u64) {
        self.replica.handle_durable(upto);
        self.pump_replica();
    }

    /// Closes connections whose handshake is overdue; the replica's timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&(deadline, conn)) = self.handshake_deadlines.front() {
            if deadline > now {
                break;
            }
            self.handshake_deadlines.pop_front();
            if self
                .links
                .get(&conn)
                .is_some_and(|l| l.kind == Kind::Unknown)
            {
                warn!("conn {conn}: no handshake within {HANDSHAKE_TIMEOUT:?}");
                self.close(conn, now);
            }
        }
        self.replica.handle_timeout(now);
        self.pump_replica();
        self.dispatch_passwords(now);
        self.close_idle(now);
        self.end_sent_away(now);
    }

    /// Closes the welcomed client connections silent for the idle timeout (looked for once
    /// every [`IDLE_SWEEP_EVERY`]).
    fn close_idle(&mut self, now: Instant) {
        let Some(timeout) = self.idle_timeout else {
            return;
        };
        if self.next_idle_sweep.is_some_and(|t| t > now) {
            return;
        }
        self.next_idle_sweep = Some(now + IDLE_SWEEP_EVERY);
        let silent: Vec<ConnId> = self
            .links
            .iter()
            .filter(|(_, l)| {
                matches!(l.kind, Kind::Client { welcomed: true, .. })
                    && now.saturating_duration_since(l.last_heard) >= timeout
            })
            .map(|(c, _)| *c)
            .collect();
        for conn in silent {
            info!("conn {conn}: client silent for {timeout:?}; closing");
            self.close(conn, now);
        }
    }

    /// When `handle_timeout` next has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.handshake_deadlines.front().map(|(d, _)| *d),
            self.replica.poll_timeout(),
            self.passwords.poll_timeout(),
            self.idle_timeout.and(self.next_idle_sweep),
            self.sent_away.front().map(|(end, ..)| *end),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Hands out the password jobs whose turn has come, while threads are free.
    fn dispatch_passwords(&mut self, now: Instant) {
        while let Some((conn, job)) = self.passwords.next_job(now) {
            self.out.push_back(Output::Password(conn, job));
        }
    }

    fn set_max_frame(&mut self, conn: ConnId, max: usize) {
        self.frame_limit_changed = true;
        self.out.push_back(Output::SetMaxFrame(conn, max));
    }

    /// Whether a frame limit changed since the last call: the driver then applies it before
    /// it parses the next frame of that connection.
    pub fn take_frame_limit_changed(&mut self) -> bool {
        std::mem::take(&mut self.frame_limit_changed)
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    fn close(&mut self, conn: ConnId, now: Instant) {
        self.handle_close(conn, now);
        self.out.push_back(Output::Close(conn));
    }

    /// Carries out what the replica asked for.
    fn pump_replica(&mut self) {
        while let Some(o) = self.replica.poll_output() {
            match o {
                ReplicaOut::Dial(no) => self.out.push_back(Output::Dial(no)),
                ReplicaOut::Send(conn, msg) => self.out.push_back(Output::SendReplica(conn, msg)),
                ReplicaOut::Close(conn) => {
                    self.links.remove(&conn);
                    self.out.push_back(Output::Close(conn));
                }
                ReplicaOut::Applied {
                    seq,
                    origin: Some(origin),
                    answer,
                } if self.awaiting.contains_key(&origin) => {
                    self.answers.push_back((seq, origin, answer));
                }
                ReplicaOut::Applied { .. } => {}
                ReplicaOut::Committed(seq) => {
                    self.release_answers(seq);
                    self.release_reads(seq);
                }
                ReplicaOut::StateReplaced(seq) => {
                    // Answers queued so far came from the replaced state, which may hold
                    // changes the new one lacks (a primary that stalled and was replaced):
                    // none of them may be sent. Answers to waiting changes the new state holds
                    // come from its memory; the others are ordered again by the replica.
                    self.answers.clear();
                    let mut found: Vec<(Origin, Answer)> = self
                        .awaiting
                        .keys()
                        .filter_map(|o| self.replica.state().remembered(*o).map(|a| (*o, a)))
                        .collect();
                    found.sort_by_key(|(o, _)| *o);
                    for (origin, answer) in found {
                        self.answers.push_back((seq, origin, answer));
                    }
                    if self.replica.committed() >= seq {
                        self.release_answers(seq);
                    }
                    self.answer_reads_again();
                }
                ReplicaOut::Persist(p) => self.out.push_back(Output::Persist(p)),
                ReplicaOut::Serving(true) => self.welcome_waiting(),
                ReplicaOut::Serving(false) => self.drop_clients(),
            }
        }
    }

    /// Sends the answers committed up to `seq`, and lets their connections go on.
    fn release_answers(&mut self, seq: u64) {
        while self.answers.front().is_some_and(|(s, _, _)| *s <= seq) {
            let Some((_, origin, answer)) = self.answers.pop_front() else {
                break;
            };
            let Some(conn) = self.awaiting.remove(&origin) else {
                continue;
            };
            self.deliver(conn, origin, answer);
        }
    }

    /// Sends the answers held until entry `seq` is committed (`Waiting::Read`), and lets
    /// their connections go on. `seq` is the commit reported, not the replica's `committed`
    /// now: that may already be a replaced state's, which says nothing of entries of the
    /// state these answers were made from.
    fn release_reads(&mut self, seq: u64) {
        while let Some(&(at, conn)) = self.reads.first() {
            if at > seq {
                break;
            }
            self.reads.pop_first();
            let Some(link) = self.links.get_mut(&conn) else {
                continue;
            };
            if !matches!(link.waiting, Some(Waiting::Read { at: a, .. }) if a == at) {
                continue;
            }
            let Some(Waiting::Read { req_id, body, .. }) = link.waiting.take() else {
                continue;
            };
            self.send_reply(conn, req_id, body);
            self.run_queued(conn);
        }
    }

    /// The state was replaced: the answers held for a commit were made from the state before,
    /// which may hold entries the new one lacks, so none of them is sent. A held request goes
    /// back to the front of its connection's queue, to be handled again with the new state
    /// (a query answered, a change refused before maybe made now); a refusal made after
    /// password work or at a commit (its request not kept) is refused `Unavailable` instead,
    /// so the client asks again.
    fn answer_reads_again(&mut self) {
        let held = std::mem::take(&mut self.reads);
        for (_, conn) in held {
            let Some(link) = self.links.get_mut(&conn) else {
                continue;
            };
            let Some(Waiting::Read {
                req_id, request, ..
            }) = link.waiting.take()
            else {
                continue;
            };
            match request {
                Some((body, len)) => {
                    link.queued_bytes += len;
                    link.queued.push_front((Request { req_id, body }, len));
                }
                None => self.send_reply(
                    conn,
                    req_id,
                    Err(Reject::new(
                        RejectCode::Unavailable,
                        "the tracker's state changed before this answer was sure; ask again",
                    )),
                ),
            }
            self.run_queued(conn);
        }
    }

    /// Answers the change `origin` of `conn`, then the requests queued behind it.
    fn deliver(&mut self, conn: ConnId, origin: Origin, answer: Answer) {
        let Some(link) = self.links.get(&conn) else {
            return;
        };
        let effect = match &link.waiting {
            Some(Waiting::Commit {
                origin: o, effect, ..
            }) if *o == origin => effect.clone(),
            _ => return,
        };
        // A login or resume answered late on an older link of the same client (one it lost,
        // whose close this tracker has not seen yet) must not take the session from the newer
        // link the client uses now.
        let (my_client, my_opened) = (link.client(), link.opened);
        let newer_holds = match (&effect, &answer) {
            (SessionEffect::Open(_), Ok(Outcome::SessionOpened(id))) => {
                my_client.is_some()
                    && self.links.iter().any(|(c, l)| {
                        *c != conn
                            && l.session == Some(*id)
                            && l.client() == my_client
                            && l.opened > my_opened
                    })
            }
            _ => false,
        };
        let Some(link) = self.links.get_mut(&conn) else {
            return;
        };
        link.waiting = None;
        let mut detach = None;
        // The answer is the committed entry's, but for the two refusals below, which the
        // state as it stands now makes (it may hold entries not yet committed).
        let mut from_state = false;
        let body = match (effect, answer) {
            (SessionEffect::Open(proof), Ok(Outcome::SessionOpened(id))) => {
                match self.replica.state().session(id) {
                    Some(s) if proves(&proof, s) => {
                        let token = s.token;
                        if newer_holds {
                            info!("conn {conn}: an older link of the session's client; the newer keeps it");
                        } else {
                            info!("user {} has a session through conn {conn}", s.user);
                            link.session = Some(id);
                            detach = Some(id);
                        }
                        Ok(ReplyBody::LoggedIn { token })
                    }
                    Some(_) => {
                        // A remembered answer for the same (client id, request id), about a
                        // session this connection proved nothing for: a copied client id.
                        warn!("conn {conn}: a retry naming another's session; refused");
                        from_state = true;
                        Err(Reject::new(
                            RejectCode::NotLoggedIn,
                            "this request id was used for another session",
                        ))
                    }
                    None => {
                        from_state = true;
                        Err(Reject::new(
                            RejectCode::NotLoggedIn,
                            "the session has ended",
                        ))
                    }
                }
            }
            (SessionEffect::Close, Ok(_)) => {
                link.session = None;
                Ok(ReplyBody::Done)
            }
            (_, Ok(Outcome::Shared { new_file })) => Ok(ReplyBody::Shared { new_file }),
            (_, Ok(_)) => Ok(ReplyBody::Done),
            (_, Err(reject)) => Err(reject),
        };
        if let Some(id) = detach {
            // The session moved here: other links of this tracker that held it (a client's
            // older link, or whoever had the token before) act on it no more.
            for (other, l) in self.links.iter_mut() {
                if *other != conn && l.session == Some(id) {
                    info!("conn {other}: its session moved to conn {conn}; detached");
                    l.session = None;
                }
            }
        }
        if from_state {
            self.reply(conn, origin.req_id, body);
        } else {
            self.send_reply(conn, origin.req_id, body);
        }
        self.run_queued(conn);
    }

    /// This tracker stopped serving (it stalled, or found a primary ahead of it): what it
    /// holds may be stale, so its clients go elsewhere. Each reconnects at once, resumes its
    /// session and re-sends what it had in flight with the same ids, so nothing is lost or
    /// applied twice; connections still waiting for a welcome keep waiting. Their sessions
    /// are not ended with the connections (the client's resume elsewhere could come after
    /// that end): they get the grace period, then end if the client neither moved them nor
    /// came back (`end_sent_away`).
    fn drop_clients(&mut self) {
        let welcomed: Vec<ConnId> = self
            .links
            .iter()
            .filter(|(_, l)| matches!(l.kind, Kind::Client { welcomed: true, .. }))
            .map(|(c, _)| *c)
            .collect();
        if !welcomed.is_empty() {
            info!(
                "closing {} client connections: this tracker no longer serves",
                welcomed.len()
            );
        }
        let now = self.replica.now();
        self.sending_away = true;
        for conn in welcomed {
            self.close(conn, now);
        }
        self.sending_away = false;
    }

    /// Welcomes the clients that said hello before this tracker served.
    fn welcome_waiting(&mut self) {
        let waiting: Vec<ConnId> = self
            .links
            .iter()
            .filter(|(_, l)| {
                matches!(
                    l.kind,
                    Kind::Client {
                        welcomed: false,
                        ..
                    }
                )
            })
            .map(|(c, _)| *c)
            .collect();
        for conn in waiting {
            self.welcome(conn);
        }
    }

    fn welcome(&mut self, conn: ConnId) {
        let Some(link) = self.links.get_mut(&conn) else {
            return;
        };
        if let Kind::Client { client, .. } = link.kind {
            link.kind = Kind::Client {
                client,
                welcomed: true,
            };
        }
        debug!("conn {conn}: client handshake done");
        self.out.push_back(Output::Send(
            conn,
            TrackerMsg::Welcome {
                version: PROTOCOL_VERSION,
                tracker_no: self.replica.me().no,
            },
        ));
        // Requests sent right behind the hello waited for the welcome.
        self.run_queued(conn);
    }

    /// Hands a change to the replica.
    fn submit(&mut self, entry: Entry) {
        self.replica.submit(entry);
        self.pump_replica();
    }

    fn handle_msg(&mut self, conn: ConnId, msg: ClientMsg, now: Instant) {
        let Some(link) = self.links.get_mut(&conn) else {
            return;
        };
        match msg {
            ClientMsg::Hello { version, role } => {
                if link.kind != Kind::Unknown {
                    warn!("conn {conn}: second handshake");
                    self.close(conn, now);
                } else if version != PROTOCOL_VERSION {
                    warn!("conn {conn}: protocol version {version} not spoken here");
                    self.close(conn, now);
                } else {
                    match role {
                        Role::Client { .. } if link.secure => {
                            warn!("conn {conn}: client hello on a tracker link; closing");
                            self.close(conn, now);
                        }
                        Role::Tracker { no, .. }
                            if self.require_secure_tracker_links && !link.secure =>
                        {
                            // Anyone can reach the port; only a holder of the service's
                            // secret, through the secure handshake, may join as a tracker.
                            warn!(
                                "conn {conn}: tracker hello (as tracker {no}) without the \
                                 service's handshake: not a tracker of this service; closing"
                            );
                            self.close(conn, now);
                        }
                        Role::Client { client } => {
                            link.kind = Kind::Client {
                                client,
                                welcomed: false,
                            };
                            self.set_max_frame(conn, MAX_CLIENT_TRACKER_FRAME);
                            if self.replica.is_serving() {
                                self.welcome(conn);
                            } else {
                                debug!("conn {conn}: client waits until this tracker serves");
                            }
                        }
                        Role::Tracker { no, incarnation } => {
                            link.kind = Kind::Tracker;
                            let opened = link.opened;
                            self.set_max_frame(conn, MAX_REPLICATION_FRAME);
                            self.replica.handle_accepted(
                                conn,
                                TrackerRef { no, incarnation },
                                opened,
                                now,
                            );
                            self.pump_replica();
                        }
                    }
                }
            }
            ClientMsg::Request(request)
                if matches!(
                    link.kind,
                    Kind::Client {
                        welcomed: false,
                        ..
                    }
                ) =>
            {
                if link.queued.len() < MAX_QUEUED_REQUESTS {
                    link.queued_bytes += self.frame_len;
                    link.queued.push_back((request, self.frame_len));
                    self.pause_requested |= link.queued.len() >= PAUSE_QUEUED_REQUESTS
                        || link.queued_bytes >= PAUSE_QUEUED_BYTES;
                } else {
                    warn!("conn {conn}: more than {MAX_QUEUED_REQUESTS} requests queued");
                    self.close(conn, now);
                }
            }
            ClientMsg::Request(_) if !link.handshaken() => {
                warn!("conn {conn}: request before the handshake");
                self.close(conn, now);
            }
            ClientMsg::Request(Request {
                req_id,
                body: RequestBody::Ping,
            }) => {
                // At once, even behind a parked request: it changes nothing, and a client
                // that hears nothing for a while takes its tracker for hung.
                self.send_reply(conn, req_id, Ok(ReplyBody::Pong));
            }
            ClientMsg::Request(request) => {
                if link.waiting.is_none() && link.queued.is_empty() {
                    self.handle_request(conn, request);
                } else if link.queued.len() < MAX_QUEUED_REQUESTS {
                    link.queued_bytes += self.frame_len;
                    link.queued.push_back((request, self.frame_len));
                    self.pause_requested |= link.queued.len() >= PAUSE_QUEUED_REQUESTS
                        || link.queued_bytes >= PAUSE_QUEUED_BYTES;
                    self.run_queued(conn);
                } else {
                    warn!("conn {conn}: more than {MAX_QUEUED_REQUESTS} requests queued");
                    self.close(conn, now);
                }
            }
        }
    }

    /// A password job of `conn` is done: make its change, or answer its parked request and
    /// go on with the ones queued behind it.
    pub fn handle_password_done(&mut self, conn: ConnId, result: PasswordResult) {
        let now = self.replica.now();
        self.handle_password_done_at(conn, result, now);
    }

    /// [`handle_password_done`](Self::handle_password_done) at `now`.
    pub fn handle_password_done_at(&mut self, conn: ConnId, result: PasswordResult, now: Instant) {
        self.passwords.job_done();
        self.password_done(conn, result, now);
        self.dispatch_passwords(now);
    }

    fn password_done(&mut self, conn: ConnId, result: PasswordResult, now: Instant) {
        let Some(link) = self.links.get_mut(&conn) else {
            // The connection closed meanwhile.
            return;
        };
        if matches!(
            link.waiting,
            Some(Waiting::Commit { .. } | Waiting::Read { .. }) | None
        ) {
            return;
        }
        let Some(waiting) = link.waiting.take() else {
            return;
        };
        let ip = link.ip;
        if let (
            Waiting::Login { user, .. } | Waiting::CreateUserRetry { user, .. },
            PasswordResult::Verified(ok),
        ) = (&waiting, &result)
        {
            let owner = JobOwner {
                conn,
                user: Some(user.clone()),
                ip,
            };
            if *ok {
                self.passwords.record_success(&owner);
            } else {
                let (by_conn, by_user) = self.passwords.record_failure(&owner, now);
                if by_conn.max(by_user).is_power_of_two() {
                    let from = ip.map_or_else(|| "?".to_owned(), |ip| ip.to_string());
                    warn!(
                        "conn {conn} (from {from}): wrong password for user '{user}': {by_conn} \
                         recent failures on this connection, {by_user} for this user; their \
                         next checks wait {:?} behind fresh ones",
                        super::password_queue::delay(by_conn.max(by_user))
                    );
                }
            }
        }
        let (req_id, reject) = match (waiting, result) {
            (Waiting::CreateUser { req_id, user }, PasswordResult::Hashed(Some(pw_hash))) => {
                return self.propose(
                    conn,
                    req_id,
                    Op::CreateUser { user, pw_hash },
                    SessionEffect::None,
                );
            }
            (
                login @ Waiting::Login {
                    req_id, peer_addr, ..
                },
                PasswordResult::Verified(true),
            ) => {
                // The password first: a wrong one is reported as such, whatever the address.
                match self.foreign_listen_address(peer_addr, ip) {
                    Some(reject) => (req_id, reject),
                    None => return self.open_session(conn, login),
                }
            }
            (Waiting::Login { req_id, .. }, PasswordResult::Verified(false)) => (
                req_id,
                Reject::new(RejectCode::WrongPassword, "wrong password"),
            ),
            (Waiting::CreateUserRetry { req_id, user }, PasswordResult::Verified(true)) => {
                // The user exists with this password: the creation this retry asks for,
                // applied here but maybe not committed (nor durable anywhere: a crash of every
                // tracker could still lose it). So the retry is ordered again, with its request
                // id: it gets the remembered answer (nothing is applied twice), at a commit
                // after the creation's, as every other retry does.
                match self.replica.state().password_hash(&user).map(str::to_owned) {
                    Some(pw_hash) => {
                        return self.propose(
                            conn,
                            req_id,
                            Op::CreateUser { user, pw_hash },
                            SessionEffect::None,
                        );
                    }
                    // The state was replaced meanwhile by one without the user.
                    None => (
                        req_id,
                        Reject::new(RejectCode::Unavailable, "the user changed; ask again"),
                    ),
                }
            }
            (Waiting::CreateUserRetry { req_id, user }, PasswordResult::Verified(false)) => (
                req_id,
                Reject::new(
                    RejectCode::UserExists,
                    format!("user '{user}' already exists"),
                ),
            ),
            (
                Waiting::CreateUser { req_id, .. }
                | Waiting::CreateUserRetry { req_id, .. }
                | Waiting::Login { req_id, .. }
                | Waiting::Commit { req_id, .. }
                | Waiting::Read { req_id, .. },
                _,
            ) => (
                req_id,
                Reject::new(RejectCode::Internal, "password check failed"),
            ),
        };
        self.reply(conn, req_id, Err(reject));
        self.run_queued(conn);
    }

    /// The refusal of a login whose listen address is not on the IP its connection comes
    /// from (`from`): downloaders would be sent to someone else. `None` when it is, when the
    /// connection's address is unknown, or when the tracker was told to accept that.
    fn foreign_listen_address(
        &self,
        peer_addr: SocketAddr,
        from: Option<IpAddr>,
    ) -> Option<Reject> {
        let from = from.filter(|_| !self.allow_foreign_addresses)?;
        (peer_addr.ip().to_canonical() != from.to_canonical()).then(|| {
            Reject::new(
                RejectCode::BadRequest,
                format!(
                    "listen address {peer_addr} is not on this connection's address {from}: \
                     downloaders would be sent elsewhere (a tracker started with \
                     --allow-foreign-addresses accepts it)"
                ),
            )
        })
    }

    /// Handles the requests queued on `conn` until one has to wait.
    fn run_queued(&mut self, conn: ConnId) {
        while let Some(link) = self.links.get_mut(&conn) {
            if link.waiting.is_some() {
                break;
            }
            let Some((next, len)) = link.queued.pop_front() else {
                break;
            };
            link.queued_bytes -= len;
            self.handle_request(conn, next);
        }
    }

    /// Answers `req_id` with `body`, made from the state as it stands now: at once if every
    /// entry applied is committed, else once they are (`Waiting::Read`). The connection must
    /// not be waiting for anything else (its requests are handled one at a time).
    fn reply(&mut self, conn: ConnId, req_id: u64, body: Result<ReplyBody, Reject>) {
        self.reply_query(conn, req_id, body, None);
    }

    /// [`reply`](Self::reply), keeping the request (and its frame size) that made `body`, to
    /// handle it again should the state be replaced before the commit.
    fn reply_query(
        &mut self,
        conn: ConnId,
        req_id: u64,
        body: Result<ReplyBody, Reject>,
        query: Option<(RequestBody, usize)>,
    ) {
        let at = self.replica.applied();
        if at <= self.replica.committed() {
            return self.send_reply(conn, req_id, body);
        }
        let Some(link) = self.links.get_mut(&conn) else {
            return;
        };
        if link.waiting.is_some() {
            // Not reached (callers hold nothing else for the connection); should it be, the
            // answer waiting goes first and this one is sent as it always was.
            warn!("conn {conn}: an answer made while another waits; sent at once");
            return self.send_reply(conn, req_id, body);
        }
        link.waiting = Some(Waiting::Read {
            req_id,
            at,
            body,
            request: query,
        });
        self.reads.insert((at, conn));
    }

    /// Queues the answer to `req_id` for sending now.
    fn send_reply(&mut self, conn: ConnId, req_id: u64, body: Result<ReplyBody, Reject>) {
        let body = body.unwrap_or_else(|reject| {
            debug!("conn {conn}: request {req_id} refused: {reject}");
            ReplyBody::Refused {
                code: reject.code,
                message: reject.message,
            }
        });
        let mut reply = Reply { req_id, body };
        let size = reply.size_bound();
        if size > self.max_reply {
            // The client would drop the link (and its session with it) on a frame over its
            // limit: the request is refused instead, and the session lives on.
            warn!("conn {conn}: an answer of {size} bytes to request {req_id}; refused instead");
            reply.body = ReplyBody::Refused {
                code: RejectCode::BadRequest,
                message: format!(
                    "the answer would take {size} bytes, more than the {} a message may hold",
                    self.max_reply
                ),
            };
        }
        self.reply_bytes += if size > self.max_reply {
            reply.size_bound()
        } else {
            size
        };
        self.out
            .push_back(Output::Send(conn, TrackerMsg::Reply(reply)));
    }

    /// Answers a request, or parks it behind a password job or a change being replicated.
    fn handle_request(&mut self, conn: ConnId, request: Request) {
        let Request { req_id, body } = request;
        // An answer made now may have to wait for a commit, and the request be handled again
        // if the state is replaced meanwhile: it is kept while entries are in flight (a copy
        // dropped at once when the request is a change the replica takes).
        let query = (self.replica.committed() < self.replica.applied())
            .then(|| (body.clone(), self.frame_len));
        match self.answer(conn, req_id, body) {
            Ok(Handled::Reply(body)) => self.reply_query(conn, req_id, Ok(body), query),
            Ok(Handled::Waiting(waiting, job)) => self.queue_password(conn, req_id, waiting, job),
            Ok(Handled::Change(op, effect)) => self.propose(conn, req_id, op, effect),
            Err(reject) => self.reply_query(conn, req_id, Err(reject), query),
        }
    }

    /// Parks `conn` behind its password job, in the fair queue; a full queue refuses it.
    fn queue_password(&mut self, conn: ConnId, req_id: u64, waiting: Waiting, job: PasswordJob) {
        let now = self.replica.now();
        let Some(link) = self.links.get_mut(&conn) else {
            return;
        };
        let user = match &waiting {
            Waiting::Login { user, .. } | Waiting::CreateUserRetry { user, .. } => {
                Some(user.clone())
            }
            _ => None,
        };
        let owner = JobOwner {
            conn,
            user,
            ip: link.ip,
        };
        match self.passwords.push(owner, job, now) {
            Pushed::Queued => link.waiting = Some(waiting),
            Pushed::QueuedInstead(other) => {
                link.waiting = Some(waiting);
                self.refuse_busy(other);
            }
            // Made from nothing in the replicated state: sent at once.
            Pushed::Full => self.send_reply(conn, req_id, Err(busy())),
        }
        self.dispatch_passwords(now);
    }

    /// The password job of `conn` was pushed out of the full queue: its request is refused.
    fn refuse_busy(&mut self, conn: ConnId) {
        let Some(link) = self.links.get_mut(&conn) else {
            return;
        };
        let req_id = match link.waiting.take() {
            Some(
                Waiting::Login { req_id, .. }
                | Waiting::CreateUser { req_id, .. }
                | Waiting::CreateUserRetry { req_id, .. },
            ) => req_id,
            other => {
                link.waiting = other;
                return;
            }
        };
        self.send_reply(conn, req_id, Err(busy()));
        self.run_queued(conn);
    }

    /// Opens a session for `conn` once the password of its `Waiting::Login` has been checked.
    fn open_session(&mut self, conn: ConnId, login: Waiting) {
        let Waiting::Login {
            req_id,
            user,
            peer_addr,
            shares,
            client_key,
            link,
        } = login
        else {
            return;
        };
        let Some(client) = self.links.get(&conn).and_then(Link::client) else {
            return;
        };
        let token = self.next_token();
        info!("user {user} logs in from {peer_addr}");
        let proof = Proof::Password(user.clone());
        let op = Op::OpenSession {
            user,
            peer_addr,
            tracker: self.replica.me(),
            client,
            token,
            shares: Some(shares),
            client_key,
            link,
        };
        self.propose(conn, req_id, op, SessionEffect::Open(proof));
    }

    /// Makes `op` a change of `conn`'s request `req_id`: parks the connection until the
    /// change is committed.
    fn propose(&mut self, conn: ConnId, req_id: u64, op: Op, effect: SessionEffect) {
        let Some(link) = self.links.get_mut(&conn) else {
            return;
        };
        let Some(client) = link.client() else {
            return;
        };
        let origin = Origin { client, req_id };
        link.changed = true;
        if let Op::OpenSession { link: no, .. } | Op::ResumeSession { link: no, .. } = &op {
            link.client_link = *no;
        }
        link.waiting = Some(Waiting::Commit {
            req_id,
            origin,
            effect,
        });
        let opened = link.opened;
        // The same request may wait on two links of the client here (its old link broke
        // before this tracker saw it close): the answer goes to the newer one, the one the
        // client uses.
        let newer_waits = self
            .awaiting
            .get(&origin)
            .and_then(|c| self.links.get(c))
            .is_some_and(|l| l.opened > opened);
        if !newer_waits {
            self.awaiting.insert(origin, conn);
        }
        self.submit(Entry {
            origin: Some(origin),
            op,
        });
    }

    /// The session of `conn`, or `NotLoggedIn`. A session the state ended meanwhile (another
    /// tracker's op ended it) does not count, so the client may log in again on this link.
    ///
    /// The session must still be held through this tracker by this connection's client: one
    /// that a `Resume` moved to another link (here or through another tracker) is not this
    /// connection's any more.
    fn session_of(&self, conn: ConnId) -> Result<SessionId, Reject> {
        let link = self.links.get(&conn);
        let client = link.and_then(Link::client);
        let me = self.replica.me();
        link.and_then(|l| l.session)
            .filter(|id| {
                self.replica
                    .state()
                    .session(*id)
                    .is_some_and(|s| s.tracker == me && Some(s.client) == client)
            })
            .ok_or_else(|| Reject::new(RejectCode::NotLoggedIn, "not logged in"))
    }

    fn answer(&mut self, conn: ConnId, req_id: u64, body: RequestBody) -> Result<Handled, Reject> {
        let state = self.replica.state();
        let client = self.links.get(&conn).and_then(Link::client).unwrap_or(0);
        // Already applied through another tracker (a retry after a failover).
        let is_retry = state.remembered(Origin { client, req_id }).is_some();
        let op = match body {
            RequestBody::Ping => return Ok(Handled::Reply(ReplyBody::Pong)),
            RequestBody::CreateUser { user, password } if is_retry => {
                // A remembered answer for this (client id, request id), which anyone can
                // copy: the retry of a creation applied through another tracker is answered
                // only once its password is checked against the user's (and a wrong one
                // counts as a failure, as at login). A wrong one replicates and remembers
                // nothing; a right one has the retry ordered again (`password_done`), so that
                // it is answered at a commit, not from a creation applied and maybe not durable.
                let Some(phc) = state.password_hash(&user) else {
                    // No such user, so the remembered answer is not a creation of it.
                    return Err(Reject::new(
                        RejectCode::BadRequest,
                        "this request id was used for another request",
                    ));
                };
                return Ok(Handled::Waiting(
                    Waiting::CreateUserRetry { req_id, user },
                    PasswordJob::Verify {
                        password,
                        phc: phc.to_owned(),
                    },
                ));
            }
            RequestBody::CreateUser { user, password } => {
                if state.password_hash(&user).is_some() {
                    // Refuse before paying for a hash.
                    return Err(Reject::new(
                        RejectCode::UserExists,
                        format!("user '{user}' already exists"),
                    ));
                }
                self.check_state_room(RECORD_BYTES + user.as_str().len() + PHC_BYTES)?;
                return Ok(Handled::Waiting(
                    Waiting::CreateUser { req_id, user },
                    PasswordJob::Hash { password },
                ));
            }
            RequestBody::Login {
                user,
                password,
                peer_addr,
                shares,
                client_key,
                link,
            } => {
                if self.session_of(conn).is_ok() {
                    return Err(Reject::new(
                        RejectCode::SessionAlreadyOpen,
                        "a session is already open on this connection",
                    ));
                }
                let phc = state.password_hash(&user).ok_or_else(|| {
                    Reject::new(RejectCode::UnknownUser, format!("no such user '{user}'"))
                })?;
                // The listen address is checked against the connection's once the password is
                // (`password_done`): a wrong password is reported as such, whatever the
                // address.
                let other_users = state
                    .session_of_client(client)
                    .and_then(|id| state.session(id))
                    .is_some_and(|s| s.user != user);
                if !is_retry && other_users {
                    // A client process holds one session, and resumes it rather than logging
                    // in again as someone else: this is a copy of another's client id, which
                    // must not end that session. (The same user logging in again, once the
                    // password is checked, replaces it: a client whose session moved away
                    // under a late retry of its login, and was told it is not logged in.)
                    return Err(Reject::new(
                        RejectCode::SessionAlreadyOpen,
                        "a session is already open for this client id",
                    ));
                }
                // A retry too pays for the password check: it is the proof that the
                // remembered session is the asker's.
                return Ok(Handled::Waiting(
                    Waiting::Login {
                        req_id,
                        user,
                        peer_addr,
                        shares,
                        client_key,
                        link,
                    },
                    PasswordJob::Verify {
                        password,
                        phc: phc.to_owned(),
                    },
                ));
            }
            RequestBody::Resume { token, link } => {
                if self.session_of(conn).is_ok() {
                    return Err(Reject::new(
                        RejectCode::SessionAlreadyOpen,
                        "a session is already open on this connection",
                    ));
                }
                if state.session_with_token(&token).is_none() {
                    // Checked here, so that guessing costs no replicated change and no
                    // remembered answer.
                    return Err(Reject::new(
                        RejectCode::NotLoggedIn,
                        "the session has ended",
                    ));
                }
                return Ok(Handled::Change(
                    Op::ResumeSession {
                        token,
                        tracker: self.replica.me(),
                        client,
                        link,
                    },
                    SessionEffect::Open(Proof::Token(token)),
                ));
            }
            RequestBody::Logout => {
                let session = self.session_of(conn)?;
                return Ok(Handled::Change(
                    Op::CloseSession {
                        session,
                        tracker: self.replica.me(),
                    },
                    SessionEffect::Close,
                ));
            }
            RequestBody::ListGroups => {
                return state
                    .list_groups(self.session_of(conn)?)
                    .map(|g| Handled::Reply(ReplyBody::Groups(g)))
            }
            RequestBody::ListRequests { group } => {
                return state
                    .list_requests(self.session_of(conn)?, &group)
                    .map(|u| Handled::Reply(ReplyBody::Users(u)))
            }
            RequestBody::ListFiles { group } => {
                return state
                    .list_files(self.session_of(conn)?, &group)
                    .map(|f| Handled::Reply(ReplyBody::Files(f)))
            }
            RequestBody::ListPart { listing, from } => {
                let session = self.session_of(conn)?;
                let from = from as usize;
                let (items, next) = match &listing {
                    Listing::Groups => {
                        let (groups, next) =
                            take_part(state.groups_of(session)?, from, self.max_part, |g| {
                                2 + g.group.as_str().len() + 2 + g.owner.as_str().len() + 4 + 1
                            });
                        (ReplyBody::Groups(groups), next)
                    }
                    Listing::Requests(group) => {
                        let users = state.list_requests(session, group)?;
                        let (users, next) =
                            take_part(users.into_iter(), from, self.max_part, |u| {
                                2 + u.as_str().len()
                            });
                        (ReplyBody::Users(users), next)
                    }
                    Listing::Files(group) => {
                        let files = state.list_files(session, group)?;
                        let (files, next) =
                            take_part(files.into_iter(), from, self.max_part, |f| {
                                2 + f.name.as_str().len() + 8 + 4 + 4 + 20
                            });
                        (ReplyBody::Files(files), next)
                    }
                };
                return Ok(Handled::Reply(ReplyBody::Part {
                    next,
                    items: Box::new(items),
                }));
            }
            RequestBody::FileSharers { group, name } => {
                let session = self.session_of(conn)?;
                let (meta, sharers) = state.file_sharers_with_keys(session, &group, &name)?;
                let ticket = match (&self.tickets, state.session(session)) {
                    (Some(issuer), Some(asker)) => Some(Box::new(issuer.issue(
                        &group,
                        meta.file_sha1,
                        &asker.user,
                        asker.client_key,
                    ))),
                    _ => None,
                };
                let (peers, peer_keys) = sharers.into_iter().unzip();
                return Ok(Handled::Reply(ReplyBody::Sharers {
                    meta,
                    peers,
                    ticket,
                    peer_keys,
                }));
            }
            RequestBody::CreateGroup { group } => {
                let session = self.session_of(conn)?;
                self.check_state_room(3 * RECORD_BYTES + group.as_str().len() + 2 * MAX_ID)?;
                self.check_quota(session, Adds::Group)?;
                Op::CreateGroup {
                    session,
                    group,
                    quotas: Some(self.quotas.in_op()),
                }
            }
            RequestBody::JoinGroup { group } => {
                let session = self.session_of(conn)?;
                self.check_state_room(RECORD_BYTES + MAX_ID)?;
                self.check_quota(session, Adds::Request)?;
                Op::JoinGroup {
                    session,
                    group,
                    quotas: Some(self.quotas.in_op()),
                }
            }
            RequestBody::LeaveGroup { group } => Op::LeaveGroup {
                session: self.session_of(conn)?,
                group,
            },
            RequestBody::AcceptRequest { group, user } => Op::AcceptRequest {
                session: self.session_of(conn)?,
                group,
                user,
            },
            RequestBody::RejectRequest { group, user } => Op::RejectRequest {
                session: self.session_of(conn)?,
                group,
                user,
            },
            RequestBody::UploadFile { group, meta } => {
                let session = self.session_of(conn)?;
                let adds = 3 * RECORD_BYTES + super::state::meta_bytes(&meta) + MAX_ID;
                self.check_state_room(adds)?;
                self.check_quota(session, Adds::File(&group, &meta))?;
                Op::ShareFile {
                    session,
                    group,
                    meta,
                    quotas: Some(self.quotas.in_op()),
                }
            }
            RequestBody::StopShare { group, name } => Op::StopShare {
                session: self.session_of(conn)?,
                group,
                name,
            },
        };
        Ok(Handled::Change(op, SessionEffect::None))
    }
}

/// What [`TrackerState::approx_bytes`] counts per record, and the longest id.
const RECORD_BYTES: usize = 16;
const MAX_ID: usize = 64;
/// An Argon2id PHC string's length, about.
const PHC_BYTES: usize = 100;

impl TrackerCore {
    /// Refuses early a change that would add `adds` bytes (an upper bound) to a state at its
    /// size quota, by the size the state this tracker holds keeps ([`TrackerState::size`]).
    /// The replicated apply checks again, with authority, the changes that carry the quotas.
    fn check_state_room(&self, adds: usize) -> Result<(), Reject> {
        let state = self.replica.state();
        let limit = self.quotas.in_op().state_bytes;
        state.check_room(adds, limit).inspect_err(|_| {
            debug!(
                "the state takes about {} bytes, its quota {limit}: a change refused",
                state.size()
            );
        })
    }

    /// Refuses early a change that would take the session's user past a quota, by the state
    /// this tracker holds (the replicated apply checks again, with authority: changes of the
    /// same user through other trackers may be ordered before this one).
    fn check_quota(&self, session: SessionId, adds: Adds<'_>) -> Result<(), Reject> {
        let state = self.replica.state();
        let Some(user) = state.session(session).map(|s| &s.user) else {
            return Ok(());
        };
        state.check_quota(user, adds, &self.quotas.in_op())
    }
}

/// The items of a listing from index `from` on that fit in `max` bytes (at least one,
/// whatever its size), and the index of the item after them (0 when none is left).
fn take_part<T>(
    items: impl Iterator<Item = T>,
    from: usize,
    max: usize,
    bytes: impl Fn(&T) -> usize,
) -> (Vec<T>, u32) {
    let mut part = Vec::new();
    let mut used = 4;
    let mut items = items.skip(from).peekable();
    while let Some(item) = items.peek() {
        let size = bytes(item);
        if !part.is_empty() && used + size > max {
            break;
        }
        used += size;
        part.extend(items.next());
    }
    let next = match items.peek() {
        Some(_) => u32::try_from(from + part.len()).unwrap_or(u32::MAX),
        None => 0,
    };
    (part, next)
}

/// Whether `session` is the one `proof` was made for.
fn proves(proof: &Proof, session: &super::state::Session) -> bool {
    match proof {
        Proof::Password(user) => session.user == *user,
        Proof::Token(token) => session.token == *token,
    }
}

/// The refusal of a password job when too many wait.
fn busy() -> Reject {
    Reject::new(
        RejectCode::Unavailable,
        "the tracker has too many password checks waiting; try again later",
    )
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
