//! The tracker's sans-IO request handling: frames in, messages and closes out.
//!
//! [`TrackerCore`] owns the [`Replica`] (which owns the replicated [`TrackerState`]) and knows
//! which connection is a client or another tracker, and which client holds which session.
//! Queries are answered from the local state at once. A change becomes an [`Entry`] (the op
//! and the client's id and request id) that the replica orders across the trackers; the
//! client is answered when the entry is committed (held by every live tracker), and its later
//! requests wait until then, so answers keep their order. Clients are welcomed only once this
//! tracker serves (holds a state caught up with the others).
//! The driver feeds it `handle_open`, `handle_frame`, `handle_close` and `handle_timeout(now)`
//! and drains [`Output`]s with `poll_output`. No sockets, clocks or threads live here: time is
//! an argument, so the whole request path is tested without a network.
//!
//! Requests of one connection are answered in order. Password work (Argon2id) is slow, so the
//! core hands it to the driver as [`Output::Password`] and parks the connection: its later
//! requests wait in a bounded queue until [`TrackerCore::handle_password_done`] brings the
//! answer. Other connections are served meanwhile.
//!
//! Errors split by what happens next: a frame that does not parse, a request before the
//! handshake or a wrong protocol version closes that connection; a well-formed request that is
//! refused is answered with `Refused` and the connection lives on.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use super::password::{PasswordJob, PasswordResult};
use super::replica::{Replica, ReplicaOut, Timings};
use super::state::{
    Answer, Entry, Op, Origin, Outcome, Reject, SessionId, TrackerRef, TrackerState,
};
use super::tickets::TicketIssuer;
use crate::net::ConnId;
use crate::wire::frame::MAX_CLIENT_TRACKER_FRAME;
use crate::wire::replication::{ReplMsg, MAX_REPLICATION_FRAME};
use crate::wire::tracker_link::{
    ClientMsg, RejectCode, Reply, ReplyBody, Request, RequestBody, Role, TrackerMsg,
};
use crate::wire::{UserId, PROTOCOL_VERSION};

/// A connection must complete its handshake within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests a connection may pipeline behind one waiting for password work; more closes it.
pub const MAX_QUEUED_REQUESTS: usize = 4096;

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
    /// The client asked for a change (so its answers are remembered until it leaves).
    changed: bool,
    /// The request waiting for password work, if any.
    waiting: Option<Waiting>,
    /// Requests that arrived while `waiting` was set, oldest first.
    queued: VecDeque<Request>,
    /// The connection ran the service's handshake (`handle_secure`): its frames come
    /// from a holder of the service's secret.
    secure: bool,
}

impl Link {
    fn new(kind: Kind, opened: u64) -> Self {
        Link {
            kind,
            opened,
            secure: false,
            session: None,
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SessionEffect {
    None,
    /// Login or resume: the answer opens the session.
    Open,
    /// Logout: the answer ends it.
    Close,
}

/// A request parked until its password job is done or its change is committed.
#[derive(Debug)]
enum Waiting {
    CreateUser {
        req_id: u64,
        user: UserId,
    },
    Login {
        req_id: u64,
        user: UserId,
        peer_addr: SocketAddr,
    },
    /// The change is being replicated.
    Commit {
        req_id: u64,
        origin: Origin,
        effect: SessionEffect,
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
    /// Signs the tickets that go with a file's sharers (none without it: tests).
    tickets: Option<TicketIssuer>,
}

impl TrackerCore {
    /// Tracker `me` of a file of `n_trackers`; `seed` keys session tokens unless
    /// [`with_token_key`](Self::with_token_key) gives a key.
    pub fn new(me: TrackerRef, n_trackers: u16, seed: u64, timings: Timings, now: Instant) -> Self {
        let mut core = TrackerCore {
            replica: Replica::new(me, n_trackers, timings, now),
            links: BTreeMap::new(),
            awaiting: BTreeMap::new(),
            answers: VecDeque::new(),
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
            tickets: None,
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

    pub fn handle_open(&mut self, conn: ConnId, now: Instant) {
        self.n_opened += 1;
        self.links
            .insert(conn, Link::new(Kind::Unknown, self.n_opened));
        self.handshake_deadlines
            .push_back((now + HANDSHAKE_TIMEOUT, conn));
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
            .insert(conn, Link::new(Kind::Tracker, self.n_opened));
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
        if let Some(Waiting::Commit { origin, .. }) = link.waiting {
            // A retry of the same request on a newer link of the client may be waiting now.
            if self.awaiting.get(&origin) == Some(&conn) {
                self.awaiting.remove(&origin);
            }
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
                let tracker = self.replica.me();
                let origin = self.replica.internal_origin();
                self.submit(Entry {
                    origin: Some(origin),
                    op: Op::ClientGone { client, tracker },
                });
            }
            _ => {}
        }
    }

    /// One whole frame payload from `conn`, received at `now`.
    pub fn handle_frame(&mut self, conn: ConnId, payload: &[u8], now: Instant) {
        if !self.links.contains_key(&conn) {
            // Closed by the core (a duplicate tracker link, say) while frames of the same
            // read were still being handed up.
            return;
        }
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
    }

    /// When `handle_timeout` next has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let handshake = self.handshake_deadlines.front().map(|(d, _)| *d);
        match (handshake, self.replica.poll_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
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
                ReplicaOut::Committed(seq) => self.release_answers(seq),
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
                }
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

    /// Answers the change `origin` of `conn`, then the requests queued behind it.
    fn deliver(&mut self, conn: ConnId, origin: Origin, answer: Answer) {
        let Some(link) = self.links.get_mut(&conn) else {
            return;
        };
        let effect = match &link.waiting {
            Some(Waiting::Commit {
                origin: o, effect, ..
            }) if *o == origin => *effect,
            _ => return,
        };
        link.waiting = None;
        let body = match (effect, answer) {
            (SessionEffect::Open, Ok(Outcome::SessionOpened(id))) => {
                match self.replica.state().session(id) {
                    Some(s) => {
                        let token = s.token;
                        info!("user {} has a session through conn {conn}", s.user);
                        link.session = Some(id);
                        Ok(ReplyBody::LoggedIn { token })
                    }
                    None => Err(Reject::new(
                        RejectCode::NotLoggedIn,
                        "the session has ended",
                    )),
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
        self.reply(conn, origin.req_id, body);
        self.run_queued(conn);
    }

    /// This tracker stopped serving (it stalled, or found a primary ahead of it): what it
    /// holds may be stale, so its clients go elsewhere. Each reconnects at once, resumes its
    /// session and re-sends what it had in flight with the same ids, so nothing is lost or
    /// applied twice; connections still waiting for a welcome keep waiting.
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
        for conn in welcomed {
            self.close(conn, now);
        }
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
                    link.queued.push_back(request);
                } else {
                    warn!("conn {conn}: more than {MAX_QUEUED_REQUESTS} requests queued");
                    self.close(conn, now);
                }
            }
            ClientMsg::Request(_) if !link.handshaken() => {
                warn!("conn {conn}: request before the handshake");
                self.close(conn, now);
            }
            ClientMsg::Request(request) => {
                if link.waiting.is_none() {
                    self.handle_request(conn, request);
                } else if link.queued.len() < MAX_QUEUED_REQUESTS {
                    link.queued.push_back(request);
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
        let Some(link) = self.links.get_mut(&conn) else {
            // The connection closed meanwhile.
            return;
        };
        if matches!(link.waiting, Some(Waiting::Commit { .. }) | None) {
            return;
        }
        let Some(waiting) = link.waiting.take() else {
            return;
        };
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
                Waiting::Login {
                    req_id,
                    user,
                    peer_addr,
                },
                PasswordResult::Verified(true),
            ) => return self.open_session(conn, req_id, user, peer_addr),
            (Waiting::Login { req_id, .. }, PasswordResult::Verified(false)) => (
                req_id,
                Reject::new(RejectCode::WrongPassword, "wrong password"),
            ),
            (
                Waiting::CreateUser { req_id, .. }
                | Waiting::Login { req_id, .. }
                | Waiting::Commit { req_id, .. },
                _,
            ) => (
                req_id,
                Reject::new(RejectCode::Internal, "password check failed"),
            ),
        };
        self.reply(conn, req_id, Err(reject));
        self.run_queued(conn);
    }

    /// Handles the requests queued on `conn` until one has to wait.
    fn run_queued(&mut self, conn: ConnId) {
        while let Some(link) = self.links.get_mut(&conn) {
            if link.waiting.is_some() {
                break;
            }
            let Some(next) = link.queued.pop_front() else {
                break;
            };
            self.handle_request(conn, next);
        }
    }

    fn reply(&mut self, conn: ConnId, req_id: u64, body: Result<ReplyBody, Reject>) {
        let body = body.unwrap_or_else(|reject| {
            debug!("conn {conn}: request {req_id} refused: {reject}");
            ReplyBody::Refused {
                code: reject.code,
                message: reject.message,
            }
        });
        self.out.push_back(Output::Send(
            conn,
            TrackerMsg::Reply(Reply { req_id, body }),
        ));
    }

    /// Answers a request, or parks it behind a password job or a change being replicated.
    fn handle_request(&mut self, conn: ConnId, request: Request) {
        let Request { req_id, body } = request;
        match self.answer(conn, req_id, body) {
            Ok(Handled::Reply(body)) => self.reply(conn, req_id, Ok(body)),
            Ok(Handled::Waiting(waiting, job)) => {
                if let Some(link) = self.links.get_mut(&conn) {
                    link.waiting = Some(waiting);
                    self.out.push_back(Output::Password(conn, job));
                }
            }
            Ok(Handled::Change(op, effect)) => self.propose(conn, req_id, op, effect),
            Err(reject) => self.reply(conn, req_id, Err(reject)),
        }
    }

    /// Opens a session for `conn` once its password has been checked.
    fn open_session(&mut self, conn: ConnId, req_id: u64, user: UserId, peer_addr: SocketAddr) {
        let Some(client) = self.links.get(&conn).and_then(Link::client) else {
            return;
        };
        let token = self.next_token();
        info!("user {user} logs in from {peer_addr}");
        let op = Op::OpenSession {
            user,
            peer_addr,
            tracker: self.replica.me(),
            client,
            token,
        };
        self.propose(conn, req_id, op, SessionEffect::Open);
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
    fn session_of(&self, conn: ConnId) -> Result<SessionId, Reject> {
        self.links
            .get(&conn)
            .and_then(|l| l.session)
            .filter(|id| self.replica.state().session(*id).is_some())
            .ok_or_else(|| Reject::new(RejectCode::NotLoggedIn, "not logged in"))
    }

    fn answer(&mut self, conn: ConnId, req_id: u64, body: RequestBody) -> Result<Handled, Reject> {
        let state = self.replica.state();
        let client = self.links.get(&conn).and_then(Link::client).unwrap_or(0);
        // Already applied through another tracker (a retry after a failover).
        let is_retry = state.remembered(Origin { client, req_id }).is_some();
        let op = match body {
            RequestBody::Ping => return Ok(Handled::Reply(ReplyBody::Pong)),
            RequestBody::CreateUser { user, .. } if is_retry => {
                // Already applied through another tracker: the remembered answer comes back.
                Op::CreateUser {
                    user,
                    pw_hash: String::new(),
                }
            }
            RequestBody::Login {
                user, peer_addr, ..
            } if is_retry => {
                return Ok(Handled::Change(
                    Op::OpenSession {
                        user,
                        peer_addr,
                        tracker: self.replica.me(),
                        client,
                        token: [0; 16],
                    },
                    SessionEffect::Open,
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
                return Ok(Handled::Waiting(
                    Waiting::CreateUser { req_id, user },
                    PasswordJob::Hash { password },
                ));
            }
            RequestBody::Login {
                user,
                password,
                peer_addr,
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
                return Ok(Handled::Waiting(
                    Waiting::Login {
                        req_id,
                        user,
                        peer_addr,
                    },
                    PasswordJob::Verify {
                        password,
                        phc: phc.to_owned(),
                    },
                ));
            }
            RequestBody::Resume { token } => {
                if self.session_of(conn).is_ok() {
                    return Err(Reject::new(
                        RejectCode::SessionAlreadyOpen,
                        "a session is already open on this connection",
                    ));
                }
                return Ok(Handled::Change(
                    Op::ResumeSession {
                        token,
                        tracker: self.replica.me(),
                        client,
                    },
                    SessionEffect::Open,
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
            RequestBody::FileSharers { group, name } => {
                let session = self.session_of(conn)?;
                let (meta, peers) = state.file_sharers(session, &group, &name)?;
                let ticket = match &self.tickets {
                    Some(issuer) => Some(Box::new(issuer.issue(
                        &group,
                        meta.file_sha1,
                        state.user_of(session)?,
                    ))),
                    None => None,
                };
                return Ok(Handled::Reply(ReplyBody::Sharers {
                    meta,
                    peers,
                    ticket,
                }));
            }
            RequestBody::CreateGroup { group } => Op::CreateGroup {
                session: self.session_of(conn)?,
                group,
            },
            RequestBody::JoinGroup { group } => Op::JoinGroup {
                session: self.session_of(conn)?,
                group,
            },
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
            RequestBody::UploadFile { group, meta } => Op::ShareFile {
                session: self.session_of(conn)?,
                group,
                meta,
            },
            RequestBody::StopShare { group, name } => Op::StopShare {
                session: self.session_of(conn)?,
                group,
                name,
            },
        };
        Ok(Handled::Change(op, SessionEffect::None))
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
