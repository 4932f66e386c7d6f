//! The tracker's sans-IO request handling: frames in, messages and closes out.
//!
//! [`TrackerCore`] owns the [`TrackerState`] and knows which connection holds which session.
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

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use super::password::{PasswordJob, PasswordResult};
use super::state::{Op, Outcome, Reject, SessionId, TrackerState};
use crate::net::ConnId;
use crate::rng::SplitMix64;
use crate::wire::frame::MAX_CLIENT_TRACKER_FRAME;
use crate::wire::tracker_link::{
    ClientMsg, RejectCode, Reply, ReplyBody, Request, RequestBody, TrackerMsg,
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
    /// The handshake is done: accept frames up to this size from now on.
    SetMaxFrame(ConnId, usize),
    Close(ConnId),
    /// Run this password job off the reactor and call `handle_password_done(conn, result)`.
    Password(ConnId, PasswordJob),
}

#[derive(Debug, Default)]
struct Link {
    handshaken: bool,
    session: Option<SessionId>,
    /// The request waiting for password work, if any.
    waiting: Option<Waiting>,
    /// Requests that arrived while `waiting` was set, oldest first.
    queued: VecDeque<Request>,
}

/// A request parked until its password job is done.
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
}

/// What handling a request led to.
enum Handled {
    Reply(ReplyBody),
    /// Parked until a password job is done.
    Waiting(Waiting, PasswordJob),
}

pub struct TrackerCore {
    tracker_no: u16,
    state: TrackerState,
    links: HashMap<ConnId, Link>,
    /// Connections still owing a handshake, with their deadlines, oldest first.
    handshake_deadlines: VecDeque<(Instant, ConnId)>,
    out: VecDeque<Output>,
    rng: SplitMix64,
}

impl TrackerCore {
    pub fn new(tracker_no: u16, seed: u64) -> Self {
        TrackerCore {
            tracker_no,
            state: TrackerState::new(),
            links: HashMap::new(),
            handshake_deadlines: VecDeque::new(),
            out: VecDeque::new(),
            rng: SplitMix64(seed),
        }
    }

    pub fn state(&self) -> &TrackerState {
        &self.state
    }

    pub fn handle_open(&mut self, conn: ConnId, now: Instant) {
        self.links.insert(conn, Link::default());
        self.handshake_deadlines
            .push_back((now + HANDSHAKE_TIMEOUT, conn));
    }

    /// The connection is gone (closed by the peer, by an error, or by us).
    pub fn handle_close(&mut self, conn: ConnId) {
        if let Some(link) = self.links.remove(&conn) {
            if let Some(session) = link.session {
                if let Err(e) = self.commit(&Op::CloseSession { session }) {
                    warn!("conn {conn}: closing its session failed: {e}");
                }
            }
        }
    }

    /// One whole frame payload from `conn`.
    pub fn handle_frame(&mut self, conn: ConnId, payload: &[u8]) {
        match ClientMsg::parse(payload) {
            Ok(msg) => self.handle_msg(conn, msg),
            Err(e) => {
                warn!("conn {conn}: malformed frame: {e}");
                self.close(conn);
            }
        }
    }

    /// Closes connections whose handshake is overdue.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&(deadline, conn)) = self.handshake_deadlines.front() {
            if deadline > now {
                break;
            }
            self.handshake_deadlines.pop_front();
            if self.links.get(&conn).is_some_and(|l| !l.handshaken) {
                warn!("conn {conn}: no handshake within {HANDSHAKE_TIMEOUT:?}");
                self.close(conn);
            }
        }
    }

    /// When `handle_timeout` next has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.handshake_deadlines.front().map(|(d, _)| *d)
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    fn close(&mut self, conn: ConnId) {
        self.handle_close(conn);
        self.out.push_back(Output::Close(conn));
    }

    fn handle_msg(&mut self, conn: ConnId, msg: ClientMsg) {
        let Some(link) = self.links.get_mut(&conn) else {
            return;
        };
        match msg {
            ClientMsg::Hello { version, .. } => {
                if link.handshaken {
                    warn!("conn {conn}: second handshake");
                    self.close(conn);
                } else if version != PROTOCOL_VERSION {
                    warn!("conn {conn}: protocol version {version} not spoken here");
                    self.close(conn);
                } else {
                    link.handshaken = true;
                    debug!("conn {conn}: client handshake done");
                    self.out
                        .push_back(Output::SetMaxFrame(conn, MAX_CLIENT_TRACKER_FRAME));
                    self.out.push_back(Output::Send(
                        conn,
                        TrackerMsg::Welcome {
                            version: PROTOCOL_VERSION,
                            tracker_no: self.tracker_no,
                        },
                    ));
                }
            }
            ClientMsg::Request(_) if !link.handshaken => {
                warn!("conn {conn}: request before the handshake");
                self.close(conn);
            }
            ClientMsg::Request(request) => {
                if link.waiting.is_none() {
                    self.handle_request(conn, request);
                } else if link.queued.len() < MAX_QUEUED_REQUESTS {
                    link.queued.push_back(request);
                } else {
                    warn!("conn {conn}: more than {MAX_QUEUED_REQUESTS} requests queued");
                    self.close(conn);
                }
            }
        }
    }

    /// A password job of `conn` is done: answer its parked request, then the ones queued
    /// behind it, until one parks again.
    pub fn handle_password_done(&mut self, conn: ConnId, result: PasswordResult) {
        let Some(waiting) = self.links.get_mut(&conn).and_then(|l| l.waiting.take()) else {
            // The connection closed meanwhile.
            return;
        };
        let (req_id, body) = match (waiting, result) {
            (Waiting::CreateUser { req_id, user }, PasswordResult::Hashed(Some(pw_hash))) => {
                let body = self
                    .commit(&Op::CreateUser {
                        user: user.clone(),
                        pw_hash,
                    })
                    .map(|_| {
                        info!("user {user} created");
                        ReplyBody::Done
                    });
                (req_id, body)
            }
            (
                Waiting::Login {
                    req_id,
                    user,
                    peer_addr,
                },
                PasswordResult::Verified(true),
            ) => (req_id, self.open_session(conn, user, peer_addr)),
            (Waiting::Login { req_id, .. }, PasswordResult::Verified(false)) => (
                req_id,
                Err(Reject::new(RejectCode::WrongPassword, "wrong password")),
            ),
            (Waiting::CreateUser { req_id, .. } | Waiting::Login { req_id, .. }, _) => (
                req_id,
                Err(Reject::new(RejectCode::Internal, "password check failed")),
            ),
        };
        self.reply(conn, req_id, body);
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

    /// Answers a request, or parks it behind a password job.
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
            Err(reject) => self.reply(conn, req_id, Err(reject)),
        }
    }

    /// Opens a session for `conn` once its password has been checked.
    fn open_session(
        &mut self,
        conn: ConnId,
        user: UserId,
        peer_addr: SocketAddr,
    ) -> Result<ReplyBody, Reject> {
        let mut token = [0u8; 16];
        token[..8].copy_from_slice(&self.rng.next_u64().to_be_bytes());
        token[8..].copy_from_slice(&self.rng.next_u64().to_be_bytes());
        let outcome = self.commit(&Op::OpenSession {
            user: user.clone(),
            peer_addr,
            tracker_no: self.tracker_no,
            token,
        })?;
        if let (Outcome::SessionOpened(id), Some(link)) = (outcome, self.links.get_mut(&conn)) {
            link.session = Some(id);
        }
        info!("user {user} logged in from {peer_addr}");
        Ok(ReplyBody::LoggedIn { token })
    }

    /// The session of `conn`, or `NotLoggedIn`.
    fn session_of(&self, conn: ConnId) -> Result<SessionId, Reject> {
        self.links
            .get(&conn)
            .and_then(|l| l.session)
            .ok_or_else(|| Reject::new(RejectCode::NotLoggedIn, "not logged in"))
    }

    /// Applies a change. This is the seam where replication orders ops across trackers.
    fn commit(&mut self, op: &Op) -> Result<Outcome, Reject> {
        self.state.apply(op)
    }

    fn answer(&mut self, conn: ConnId, req_id: u64, body: RequestBody) -> Result<Handled, Reject> {
        let op = match body {
            RequestBody::Ping => return Ok(Handled::Reply(ReplyBody::Pong)),
            RequestBody::CreateUser { user, password } => {
                if self.state.password_hash(&user).is_some() {
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
                let phc = self.state.password_hash(&user).ok_or_else(|| {
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
            RequestBody::Logout => {
                let session = self.session_of(conn)?;
                self.commit(&Op::CloseSession { session })?;
                if let Some(link) = self.links.get_mut(&conn) {
                    link.session = None;
                }
                return Ok(Handled::Reply(ReplyBody::Done));
            }
            RequestBody::ListGroups => {
                return self
                    .state
                    .list_groups(self.session_of(conn)?)
                    .map(|g| Handled::Reply(ReplyBody::Groups(g)))
            }
            RequestBody::ListRequests { group } => {
                return self
                    .state
                    .list_requests(self.session_of(conn)?, &group)
                    .map(|u| Handled::Reply(ReplyBody::Users(u)))
            }
            RequestBody::ListFiles { group } => {
                return self
                    .state
                    .list_files(self.session_of(conn)?, &group)
                    .map(|f| Handled::Reply(ReplyBody::Files(f)))
            }
            RequestBody::FileSharers { group, name } => {
                return self
                    .state
                    .file_sharers(self.session_of(conn)?, &group, &name)
                    .map(|(meta, peers)| Handled::Reply(ReplyBody::Sharers { meta, peers }))
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
        Ok(Handled::Reply(match self.commit(&op)? {
            Outcome::Shared { new_file } => ReplyBody::Shared { new_file },
            Outcome::Done | Outcome::SessionOpened(_) => ReplyBody::Done,
        }))
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
