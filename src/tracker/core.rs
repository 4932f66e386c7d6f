//! The tracker's sans-IO request handling: frames in, messages and closes out.
//!
//! [`TrackerCore`] owns the [`TrackerState`] and knows which connection holds which session.
//! The driver feeds it `handle_open`, `handle_frame`, `handle_close` and `handle_timeout(now)`
//! and drains [`Output`]s with `poll_output`. No sockets, clocks or threads live here: time is
//! an argument, so the whole request path is tested without a network.
//!
//! Errors split by what happens next: a frame that does not parse, a request before the
//! handshake or a wrong protocol version closes that connection; a well-formed request that is
//! refused is answered with `Refused` and the connection lives on.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use super::password;
use super::state::{Op, Outcome, Reject, SessionId, TrackerState};
use crate::net::ConnId;
use crate::wire::frame::MAX_CLIENT_TRACKER_FRAME;
use crate::wire::tracker_link::{
    ClientMsg, RejectCode, Reply, ReplyBody, Request, RequestBody, TrackerMsg,
};
use crate::wire::PROTOCOL_VERSION;

/// A connection must complete its handshake within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Send(ConnId, TrackerMsg),
    /// The handshake is done: accept frames up to this size from now on.
    SetMaxFrame(ConnId, usize),
    Close(ConnId),
}

#[derive(Debug, Default)]
struct Link {
    handshaken: bool,
    session: Option<SessionId>,
}

/// Small deterministic generator for session tokens (seeded by the driver from the OS).
#[derive(Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
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
            ClientMsg::Request(Request { req_id, body }) => {
                let body = match self.handle_request(conn, body) {
                    Ok(body) => body,
                    Err(reject) => {
                        debug!("conn {conn}: request {req_id} refused: {reject}");
                        ReplyBody::Refused {
                            code: reject.code,
                            message: reject.message,
                        }
                    }
                };
                self.out.push_back(Output::Send(
                    conn,
                    TrackerMsg::Reply(Reply { req_id, body }),
                ));
            }
        }
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

    fn handle_request(&mut self, conn: ConnId, body: RequestBody) -> Result<ReplyBody, Reject> {
        let op = match body {
            RequestBody::Ping => return Ok(ReplyBody::Pong),
            RequestBody::CreateUser { user, password } => {
                if self.state.password_hash(&user).is_some() {
                    // Refuse before paying for a hash.
                    return self
                        .commit(&Op::CreateUser {
                            user,
                            pw_hash: String::new(),
                        })
                        .map(|_| ReplyBody::Done);
                }
                let pw_hash = password::hash(&password).ok_or_else(|| {
                    Reject::new(RejectCode::Internal, "could not hash the password")
                })?;
                info!("user {user} created");
                Op::CreateUser { user, pw_hash }
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
                if !password::verify(&password, phc) {
                    return Err(Reject::new(RejectCode::WrongPassword, "wrong password"));
                }
                let mut token = [0u8; 16];
                token[..8].copy_from_slice(&self.rng.next().to_be_bytes());
                token[8..].copy_from_slice(&self.rng.next().to_be_bytes());
                let outcome = self.commit(&Op::OpenSession {
                    user: user.clone(),
                    peer_addr,
                    tracker_no: self.tracker_no,
                    token,
                })?;
                if let (Outcome::SessionOpened(id), Some(link)) =
                    (outcome, self.links.get_mut(&conn))
                {
                    link.session = Some(id);
                }
                info!("user {user} logged in from {peer_addr}");
                return Ok(ReplyBody::LoggedIn { token });
            }
            RequestBody::Logout => {
                let session = self.session_of(conn)?;
                self.commit(&Op::CloseSession { session })?;
                if let Some(link) = self.links.get_mut(&conn) {
                    link.session = None;
                }
                return Ok(ReplyBody::Done);
            }
            RequestBody::ListGroups => {
                return self
                    .state
                    .list_groups(self.session_of(conn)?)
                    .map(ReplyBody::Groups)
            }
            RequestBody::ListRequests { group } => {
                return self
                    .state
                    .list_requests(self.session_of(conn)?, &group)
                    .map(ReplyBody::Users)
            }
            RequestBody::ListFiles { group } => {
                return self
                    .state
                    .list_files(self.session_of(conn)?, &group)
                    .map(ReplyBody::Files)
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
        Ok(match self.commit(&op)? {
            Outcome::Shared { new_file } => ReplyBody::Shared { new_file },
            Outcome::Done | Outcome::SessionOpened(_) => ReplyBody::Done,
        })
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
