//! The client's link to its tracker service, as a sans-IO core: which tracker of the file to
//! try next, connect and silence timeouts, pings on a quiet link, the backoff between rounds
//! of attempts, and when the session is given up.
//!
//! The driver owns the one socket and feeds this core what happened to it
//! ([`handle_connected`](Uplink::handle_connected), [`handle_frame`](Uplink::handle_frame),
//! [`handle_closed`](Uplink::handle_closed), [`handle_timeout`](Uplink::handle_timeout)); the
//! core answers with [`UplinkEvent`]s (open a connection to this address, close it, the link is
//! up, give up) and with the frames to send ([`poll_transmit`](Uplink::poll_transmit)). It
//! never touches a socket or a clock: `now` is an argument, so every failover path is tested
//! in microseconds on a fake clock (`uplink_tests.rs`). It must not know the session: what to
//! re-send on a new link (the resume and the requests in flight) comes from the session core,
//! handed over by the driver on [`UplinkEvent::Connected`].
//!
//! Failover: when a link breaks (closed, a protocol error, or 1.8 s of silence although pings
//! go out every 600 ms; twice that on the next link after each link left for silence without
//! a reply in between, up to 14.4 s, since a tracker slow with password hashing is silent
//! too), the next tracker of the file is tried at once, then the others in
//! turn, each attempt given [`CONNECT_TIMEOUT`] to connect, then the silence timeout for its
//! secure handshake ([`Uplink::handle_transport_up`]). A round in which none connected is
//! followed by the next after a backoff that doubles from nothing (the first retry goes at once) to
//! [`BACKOFF_MAX`], so a client never spins on trackers that refuse at once, and never waits
//! much more than a second for one that came back. After [`RECONNECT_FOR`] without a tracker,
//! or when links keep breaking before the tracker's welcome, the session is given up.
//!
//! Silence is the tracker's only while this process runs: like a tracker's stall fencing, a
//! call of [`handle_timeout`](Uplink::handle_timeout) much later than asked ([`AWAY_AFTER`])
//! means the client itself was stopped or starved, and its link pings the tracker rather than
//! leaving it. A key mismatch ([`handle_refused`](Uplink::handle_refused)) fails a first
//! connection at once instead of moving on to a tracker that might be trusted on first use.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use crate::wire::tracker_link::{ClientMsg, Reply, ReplyBody, Request, RequestBody, TrackerMsg};
use crate::wire::PROTOCOL_VERSION;

/// How long connecting to one tracker may take before the next one is tried.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// After losing its tracker, how long the client keeps trying the others before it gives up
/// its session. Long enough to outlast a restart of every tracker: the service keeps the
/// session on disk, and once it serves again it gives the sessions of trackers that are gone
/// 10 s to move; a client that reconnects within a second of that keeps its session.
pub const RECONNECT_FOR: Duration = Duration::from_secs(120);
/// The pause before the second retry round; it doubles with every round after.
pub const BACKOFF_FIRST: Duration = Duration::from_millis(50);
/// The longest pause between two rounds of attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// A tracker link quiet this long gets a ping (a live tracker answers it, or a request).
pub const PING_AFTER: Duration = Duration::from_millis(600);
/// A tracker silent this long, pings included, is taken for hung: the client moves on (a
/// request retried elsewhere is not applied twice, so a false alarm costs nothing).
pub const TRACKER_SILENCE: Duration = Duration::from_millis(1800);
/// A turn of the client's loop this much later than its link asked to be woken means the
/// process was away (stopped or starved): that time is not the tracker's silence. Well above
/// a loaded machine's scheduling delays, well below [`TRACKER_SILENCE`].
pub const AWAY_AFTER: Duration = Duration::from_millis(900);
/// Most doublings of the silence allowed after links left for silence in a row (to 14.4 s).
const MAX_SILENCE_DOUBLINGS: u32 = 3;
/// Ping ids count down from the top of the id space, far from the session's, which count up
/// from 1; replies in this range are the link's own.
const PING_IDS: u64 = 1 << 32;

/// What the driver must do for the link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UplinkEvent {
    /// Close the current socket, if any, and start a non-blocking connection to this address;
    /// report its outcome with `handle_connected` or `handle_connect_failed`.
    Connect(SocketAddr),
    /// Close the current socket.
    Close,
    /// The connection is up and the hello queued: hand the session's resume and requests in
    /// flight to [`Uplink::send`].
    Connected,
    /// No tracker of the file could be reached for a request made while there was no link,
    /// or a whole round of failover attempts failed (the link keeps trying): the command in
    /// flight fails.
    Unreachable,
    /// No tracker answered in time after losing one: the session is lost.
    SessionLost,
}

/// Why a link broke, as the driver or the core saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkError {
    /// The tracker speaks another protocol version.
    Version(u16),
    /// A frame that does not parse, or a message out of place.
    Protocol(String),
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkError::Version(v) => write!(f, "tracker speaks version {v}"),
            LinkError::Protocol(reason) => f.write_str(reason),
        }
    }
}

/// A run of attempts, one per tracker of the file at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Round {
    /// When the session is given up; `None` for a first connection (no failover: a round
    /// without success fails the command instead).
    give_up: Option<Instant>,
    /// Attempts made in this round.
    tried: usize,
    /// Rounds before this one.
    n_rounds: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No link, and none wanted until the next request.
    Idle,
    /// Connecting to `trackers[index]`.
    Connecting {
        index: usize,
        deadline: Instant,
        round: Round,
    },
    /// Waiting before the next round of attempts.
    Waiting { until: Instant, round: Round },
    /// Connected to `trackers[index]`.
    Open {
        index: usize,
        welcomed: bool,
        last_heard: Instant,
        last_ping: Instant,
    },
}

/// The client's tracker link core (see the module doc).
#[derive(Debug)]
pub struct Uplink {
    trackers: Vec<SocketAddr>,
    client_id: u64,
    state: State,
    /// Index of the tracker last connected to: the first tried for a new link, and the one a
    /// failover starts after.
    index: usize,
    /// Whether a tracker was ever connected (for the log: "connected" or "moved").
    failing_over: bool,
    /// While failing over, a whole round of attempts failed: commands fail at once
    /// ([`UplinkEvent::Unreachable`]) instead of waiting, while the rounds go on (the session
    /// is kept until [`RECONNECT_FOR`]).
    unreachable: bool,
    /// Links in a row that broke before the tracker's welcome.
    failed_links: usize,
    /// Links in a row left for their silence without a reply in between. A tracker that is
    /// slow rather than hung (its answers queued behind a burst of password hashing, which
    /// also holds the pongs) gets twice the time on the next link, so that the client's retry
    /// does not add to the work that made it slow.
    silent_links: u32,
    /// Connections made so far: the number of the current link (1 for the first), which
    /// every login and resume sent on it carries (`RequestBody::Login::link`). The trackers
    /// order the client's links by it, so that a copy of a request sent on a link the client
    /// has left neither moves its session there nor, when that link's close is seen, ends it.
    n_links: u64,
    n_pings: u64,
    /// When the last [`handle_timeout`](Uplink::handle_timeout) asked to be called next (its
    /// [`poll_timeout`](Uplink::poll_timeout)): a call more than [`AWAY_AFTER`] later means
    /// this process itself was away (stopped, swapped out, starved), and that time is not
    /// counted against the tracker.
    next_turn: Option<Instant>,
    events: VecDeque<UplinkEvent>,
    transmit: VecDeque<ClientMsg>,
}

impl Uplink {
    /// A link to the trackers of the file, in its order; `client_id` goes in every hello.
    pub fn new(trackers: Vec<SocketAddr>, client_id: u64) -> Self {
        Uplink {
            trackers,
            client_id,
            state: State::Idle,
            index: 0,
            failing_over: false,
            unreachable: false,
            failed_links: 0,
            silent_links: 0,
            n_links: 0,
            n_pings: 0,
            next_turn: None,
            events: VecDeque::new(),
            transmit: VecDeque::new(),
        }
    }

    /// The tracker the link is connected (or connecting) to.
    pub fn tracker(&self) -> Option<SocketAddr> {
        match self.state {
            State::Open { index, .. } | State::Connecting { index, .. } => {
                self.trackers.get(index).copied()
            }
            _ => None,
        }
    }

    /// Whether a connection is up (welcomed or not).
    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Open { .. })
    }

    /// Whether the link is between trackers (connecting or waiting to).
    pub fn is_reconnecting(&self) -> bool {
        matches!(self.state, State::Connecting { .. } | State::Waiting { .. })
    }

    pub fn poll_event(&mut self) -> Option<UplinkEvent> {
        self.events.pop_front()
    }

    /// The next frame to write on the connection.
    pub fn poll_transmit(&mut self) -> Option<ClientMsg> {
        self.transmit.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) next has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Idle => None,
            State::Connecting { deadline, .. } => Some(deadline),
            State::Waiting { until, .. } => Some(until),
            State::Open {
                last_heard,
                last_ping,
                ..
            } => Some((last_heard.max(last_ping) + PING_AFTER).min(last_heard + self.silence())),
        }
    }

    /// A request from the session. On an open link it goes out now; while the link is
    /// between trackers it is dropped here, because the session hands every request in flight
    /// over again once a new link is up ([`UplinkEvent::Connected`]); with no link at all, a
    /// first connection starts (and that request goes out with the others once it is up).
    pub fn send(&mut self, mut request: Request, now: Instant) {
        match self.state {
            State::Open { .. } => {
                if let RequestBody::Login { link, .. } | RequestBody::Resume { link, .. } =
                    &mut request.body
                {
                    // A retry carries the number of the link it goes on, not the first one's.
                    *link = self.n_links;
                }
                self.transmit.push_back(ClientMsg::Request(request));
            }
            State::Connecting { .. } | State::Waiting { .. } if self.unreachable => {
                // No tracker answered a whole round: the command fails now rather than
                // after its timeout (the link keeps trying; a later command may find one).
                self.events.push_back(UplinkEvent::Unreachable);
            }
            State::Connecting { .. } | State::Waiting { .. } => {}
            State::Idle => {
                let round = Round {
                    give_up: None,
                    tried: 0,
                    n_rounds: 0,
                };
                self.attempt(self.index, round, now);
            }
        }
    }

    /// The connection the last [`UplinkEvent::Connect`] asked for is up.
    pub fn handle_connected(&mut self, now: Instant) {
        let State::Connecting { index, .. } = self.state else {
            return;
        };
        let addr = self.trackers.get(index).copied();
        if let Some(addr) = addr {
            if self.failing_over {
                info!("moved to tracker {addr}");
            } else {
                info!("connected to tracker {addr}");
            }
        }
        self.failing_over = false;
        self.unreachable = false;
        self.index = index;
        self.n_links = self.n_links.saturating_add(1);
        self.state = State::Open {
            index,
            welcomed: false,
            last_heard: now,
            last_ping: now,
        };
        self.transmit.clear();
        self.transmit.push_back(ClientMsg::hello(self.client_id));
        self.events.push_back(UplinkEvent::Connected);
    }

    /// The socket the last [`UplinkEvent::Connect`] asked for is connected and now runs the
    /// link's secure handshake (the driver's): the attempt gets as long as a quiet open link
    /// may stay silent to complete it, since it needs the tracker's loop to answer (a busy
    /// tracker is slow, not gone), where the connect itself needed only its kernel.
    pub fn handle_transport_up(&mut self, now: Instant) {
        if let State::Connecting { index, round, .. } = self.state {
            self.state = State::Connecting {
                index,
                deadline: now + self.silence(),
                round,
            };
        }
    }

    /// The connection the last [`UplinkEvent::Connect`] asked for failed (refused, or the
    /// socket could not even be made).
    pub fn handle_connect_failed(&mut self, reason: &str, now: Instant) {
        let State::Connecting { index, round, .. } = self.state else {
            return;
        };
        if let Some(addr) = self.trackers.get(index) {
            debug!("tracker {addr}: {reason}");
        }
        self.next_attempt(index, round, now);
    }

    /// The tracker the last [`UplinkEvent::Connect`] asked for proved another service key than
    /// the one expected (the driver checks it). For a first connection the command fails at
    /// once ([`UplinkEvent::Unreachable`]; the driver names the tracker and both keys) rather
    /// than trying the file's other trackers: they are the same service and present the same
    /// key, so the mismatch is the user's to look at. While failing over with a session the
    /// others are still tried (each must present the expected key too).
    pub fn handle_refused(&mut self, reason: &str, now: Instant) {
        let State::Connecting { index, round, .. } = self.state else {
            return;
        };
        if round.give_up.is_some() {
            return self.next_attempt(index, round, now);
        }
        debug!("{reason}");
        self.state = State::Idle;
        self.events.push_back(UplinkEvent::Unreachable);
    }

    /// A whole frame from the tracker. A reply for the session comes back; a malformed or
    /// misplaced frame breaks the link (and the next tracker is tried).
    pub fn handle_frame(&mut self, payload: &[u8], now: Instant) -> Option<Reply> {
        let State::Open {
            ref mut welcomed,
            ref mut last_heard,
            ..
        } = self.state
        else {
            return None;
        };
        *last_heard = now;
        let error = match TrackerMsg::parse(payload) {
            Ok(TrackerMsg::Welcome { version, .. }) if !*welcomed => {
                if version == PROTOCOL_VERSION {
                    *welcomed = true;
                    return None;
                }
                LinkError::Version(version)
            }
            Ok(TrackerMsg::Reply(reply)) if *welcomed => {
                // The tracker answers: it was slow at worst, not hung.
                self.silent_links = 0;
                let own_ping =
                    reply.req_id > u64::MAX - PING_IDS && matches!(reply.body, ReplyBody::Pong);
                return (!own_ping).then_some(reply);
            }
            Ok(other) => LinkError::Protocol(format!("unexpected message {other:?}")),
            Err(e) => LinkError::Protocol(e.to_string()),
        };
        self.handle_closed(&error.to_string(), now);
        None
    }

    /// The connection broke (closed by the tracker, a read or write error, a protocol error):
    /// move to another tracker at once, keeping the session.
    pub fn handle_closed(&mut self, reason: &str, now: Instant) {
        match self.state {
            State::Open {
                index, welcomed, ..
            } => {
                if let Some(addr) = self.trackers.get(index) {
                    warn!("tracker {addr}: {reason}");
                }
                self.lose(index, welcomed, now);
            }
            // A connection that breaks before it is up is a failed attempt.
            State::Connecting { .. } => self.handle_connect_failed(reason, now),
            State::Idle | State::Waiting { .. } => {}
        }
    }

    /// Timers: a connection attempt that takes too long, the pause between rounds, pings on a
    /// quiet link and leaving a silent tracker (a hung process keeps its sockets open, so only
    /// silence tells). A call much later than asked ([`AWAY_AFTER`]) means this process was
    /// away: that time is not counted as the tracker's silence (see `came_back`).
    pub fn handle_timeout(&mut self, now: Instant) {
        // The loop may wait as long as the later of what the last call asked and what the
        // core asks now (a link that came up since has later timers).
        let asked = self.poll_timeout();
        let away = self
            .next_turn
            .map(|t| now.saturating_duration_since(t.max(asked.unwrap_or(t))))
            .filter(|late| *late >= AWAY_AFTER);
        match away {
            Some(gap) => self.came_back(gap, now),
            None => self.on_timers(now),
        }
        self.next_turn = self.poll_timeout();
    }

    fn on_timers(&mut self, now: Instant) {
        match self.state {
            State::Idle => {}
            State::Connecting {
                index,
                deadline,
                round,
            } => {
                if now >= deadline {
                    self.events.push_back(UplinkEvent::Close);
                    if let Some(addr) = self.trackers.get(index) {
                        debug!("tracker {addr}: no connection in {CONNECT_TIMEOUT:?}");
                    }
                    self.next_attempt(index, round, now);
                }
            }
            State::Waiting { until, round } => {
                if now >= until {
                    self.attempt(self.index + 1, round, now);
                }
            }
            State::Open {
                index,
                welcomed,
                last_heard,
                last_ping,
            } => {
                let silence = self.silence();
                if now.saturating_duration_since(last_heard) >= silence {
                    if let Some(addr) = self.trackers.get(index) {
                        warn!("tracker {addr}: silent for {silence:?}; moving to another");
                    }
                    self.silent_links = self.silent_links.saturating_add(1);
                    self.events.push_back(UplinkEvent::Close);
                    self.lose(index, welcomed, now);
                } else if now.saturating_duration_since(last_heard.max(last_ping)) >= PING_AFTER {
                    self.state = State::Open {
                        index,
                        welcomed,
                        last_heard,
                        last_ping: now,
                    };
                    self.n_pings += 1;
                    self.transmit.push_back(ClientMsg::Request(Request {
                        req_id: u64::MAX - (self.n_pings % PING_IDS),
                        body: RequestBody::Ping,
                    }));
                }
            }
        }
    }

    /// This process was away for `gap` (its loop did not turn: stopped, or starved on a loaded
    /// machine), longer than a tracker may stay silent. The time away is not the tracker's
    /// silence: the link's clocks move on by `gap` and an open link is pinged at once, so a
    /// live tracker is kept (leaving it would race the resume through another tracker against
    /// this link's close) and a hung one is still left after its silence.
    fn came_back(&mut self, gap: Duration, now: Instant) {
        match self.state {
            State::Open {
                index,
                welcomed,
                last_heard,
                ..
            } => {
                if let Some(addr) = self.trackers.get(index) {
                    info!("this client was away for {gap:?}: checking tracker {addr} again");
                }
                // The ping gets at least its interval to be answered, whenever the stop
                // came.
                let floor = (now + PING_AFTER)
                    .checked_sub(self.silence())
                    .unwrap_or(now);
                self.state = State::Open {
                    index,
                    welcomed,
                    last_heard: (last_heard + gap).max(floor).min(now),
                    last_ping: now,
                };
                self.n_pings += 1;
                self.transmit.push_back(ClientMsg::Request(Request {
                    req_id: u64::MAX - (self.n_pings % PING_IDS),
                    body: RequestBody::Ping,
                }));
            }
            State::Connecting {
                index,
                deadline,
                round,
            } => {
                self.state = State::Connecting {
                    index,
                    deadline: (deadline + gap).max(now + CONNECT_TIMEOUT),
                    round,
                };
            }
            // A pause between rounds may end late: nothing is blamed for it.
            State::Waiting { .. } | State::Idle => self.on_timers(now),
        }
    }

    /// The open link to `trackers[index]` is gone: start failing over, or give the session
    /// up when links keep breaking before the welcome.
    fn lose(&mut self, index: usize, welcomed: bool, now: Instant) {
        self.transmit.clear();
        if welcomed {
            self.failed_links = 0;
        } else {
            self.failed_links += 1;
        }
        if self.failed_links >= 2 * self.trackers.len() {
            // Every tracker of the file was tried twice and none spoke the protocol.
            warn!("no tracker completes the handshake: the session is lost");
            self.failed_links = 0;
            self.events.push_back(UplinkEvent::Close);
            return self.give_up();
        }
        self.failing_over = true;
        let round = Round {
            give_up: Some(now + RECONNECT_FOR),
            tried: 0,
            n_rounds: 0,
        };
        self.attempt(index + 1, round, now);
    }

    /// The attempt at `trackers[index]` failed: the next tracker of the round, or the end of
    /// the round.
    fn next_attempt(&mut self, index: usize, mut round: Round, now: Instant) {
        round.tried += 1;
        if round.tried < self.trackers.len() {
            return self.attempt(index + 1, round, now);
        }
        match round.give_up {
            None => {
                warn!("no tracker is reachable");
                self.state = State::Idle;
                self.events.push_back(UplinkEvent::Unreachable);
            }
            Some(give_up) if now >= give_up => {
                warn!("no tracker is reachable for {RECONNECT_FOR:?}: the session is lost");
                self.give_up();
            }
            Some(give_up) => {
                if !std::mem::replace(&mut self.unreachable, true) {
                    // The commands in flight fail; the session stays while the rounds go on.
                    self.events.push_back(UplinkEvent::Unreachable);
                }
                let pause = backoff(round.n_rounds);
                let next = Round {
                    give_up: Some(give_up),
                    tried: 0,
                    n_rounds: round.n_rounds + 1,
                };
                debug!("no tracker is reachable; trying again in {pause:?}");
                if pause.is_zero() {
                    self.attempt(self.index + 1, next, now);
                } else {
                    self.state = State::Waiting {
                        until: now + pause,
                        round: next,
                    };
                }
            }
        }
    }

    /// Starts connecting to `trackers[index % n]`.
    fn attempt(&mut self, index: usize, round: Round, now: Instant) {
        let n = self.trackers.len();
        let Some(&addr) = self.trackers.get(index.checked_rem(n).unwrap_or(0)) else {
            // An empty tracker file (the command line refuses it): nothing to try.
            self.state = State::Idle;
            self.events.push_back(match round.give_up {
                None => UplinkEvent::Unreachable,
                Some(_) => UplinkEvent::SessionLost,
            });
            return;
        };
        self.transmit.clear();
        self.state = State::Connecting {
            index: index % n,
            deadline: now + CONNECT_TIMEOUT,
            round,
        };
        self.events.push_back(UplinkEvent::Connect(addr));
    }

    /// How long the current link may stay silent: [`TRACKER_SILENCE`], doubled for each link
    /// left for silence in a row (see `silent_links`).
    fn silence(&self) -> Duration {
        TRACKER_SILENCE * (1u32 << self.silent_links.min(MAX_SILENCE_DOUBLINGS))
    }

    fn give_up(&mut self) {
        self.failing_over = false;
        self.unreachable = false;
        self.state = State::Idle;
        self.transmit.clear();
        self.events.push_back(UplinkEvent::SessionLost);
    }
}

/// The pause before retry round `n_rounds + 1`: nothing before the first retry, then
/// [`BACKOFF_FIRST`] doubling up to [`BACKOFF_MAX`].
pub fn backoff(n_rounds: u32) -> Duration {
    match n_rounds {
        0 => Duration::ZERO,
        n => BACKOFF_FIRST
            .saturating_mul(1u32.checked_shl(n - 1).unwrap_or(u32::MAX))
            .min(BACKOFF_MAX),
    }
}

#[cfg(test)]
#[path = "uplink_tests.rs"]
mod tests;
