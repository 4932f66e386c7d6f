//! The client's link to its tracker service, as a sans-IO core: which trackers of the file to
//! race for a new link, connect and silence timeouts, pings on a quiet link, the backoff
//! between rounds of attempts, and when the session is given up.
//!
//! The driver owns the sockets (at most [`MAX_RACE`] at once, each named by the [`LinkId`]
//! the core gave it) and feeds this core what happened to each
//! ([`handle_transport_up`](Uplink::handle_transport_up),
//! [`handle_connected`](Uplink::handle_connected), [`handle_frame`](Uplink::handle_frame),
//! [`handle_closed`](Uplink::handle_closed), [`handle_timeout`](Uplink::handle_timeout)); the
//! core answers with [`UplinkEvent`]s (open a connection to this address, close that one, the
//! link is up, give up) and with the frames to send on which socket
//! ([`poll_transmit`](Uplink::poll_transmit)). It never touches a socket or a clock: `now` is
//! an argument, so every failover path is tested in microseconds on a fake clock
//! (`uplink_tests.rs`). It must not know the session: what to re-send on a new link (the
//! resume and the requests in flight) comes from the session core, handed over by the driver
//! on [`UplinkEvent::Connected`], which is emitted once per link.
//!
//! Racing: a new link (a first connection, or a failover after the link was closed, broke or
//! went silent: 1.5 s without a frame although pings go out every 300 ms) is a round of
//! attempts at the trackers of the file, starting after the one lost (or at the last one used).
//! The first attempt starts at once and each next one [`RACE_STAGGER`] later while none has
//! won, or at once when an attempt fails; at most [`MAX_RACE`] are in flight. An attempt gets
//! [`CONNECT_TIMEOUT`] to connect, then the silence timeout for its secure handshake
//! ([`Uplink::handle_transport_up`]; a hung tracker's kernel still accepts connections) and,
//! once the handshake is done and the hello sent, for the tracker's welcome. The first attempt
//! welcomed becomes the link: the others are closed, and their later frames are ignored, so the
//! session's resume and requests go out once, on the winner. A round in which none was welcomed
//! is followed by the next after a backoff that doubles from nothing (the first retry goes at
//! once) to [`BACKOFF_MAX`], so a client never spins on trackers that refuse at once, and never
//! waits much more than a second for one that came back. After [`RECONNECT_FOR`] without a
//! tracker, or when links keep breaking between handshake and welcome, the session is given up.
//!
//! Silence: 1.5 s less the 300 ms ping interval is the tracker's own stall limit (1.2 s, after
//! which it fences itself), so a tracker is left only when it stalled at least as long as it
//! would have fenced itself. After each link left for silence without a reply in between, the
//! next link gets twice as long, up to 12 s. Silence is the tracker's only while this process
//! runs: like a tracker's stall fencing, a call of [`handle_timeout`](Uplink::handle_timeout)
//! much later than asked ([`AWAY_AFTER`]) means the client itself was stopped or starved, and
//! its link pings the tracker rather than leaving it. A key mismatch
//! ([`handle_refused`](Uplink::handle_refused)) on any attempt fails a first connection at once
//! (every attempt of the round closed) instead of going on with a tracker that might be trusted
//! on first use.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use crate::wire::tracker_link::{ClientMsg, Reply, ReplyBody, Request, RequestBody, TrackerMsg};
use crate::wire::PROTOCOL_VERSION;

/// How long connecting to one tracker may take before that attempt is given up.
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
/// A tracker link quiet this long gets a ping (a live tracker answers it at once, even while
/// its requests wait for password hashing, which runs on other threads).
pub const PING_AFTER: Duration = Duration::from_millis(300);
/// A tracker silent this long, pings included, is taken for hung: the client moves on (a
/// request retried elsewhere is not applied twice, so a false alarm costs a reconnect). Less
/// the ping interval it is the tracker's own stall limit (`replica::STALL_LIMIT`, 1.2 s): a
/// tracker stalled less than that, whenever its stall began, answers a ping in time.
pub const TRACKER_SILENCE: Duration = Duration::from_millis(1500);
/// A turn of the client's loop this much later than its link asked to be woken means the
/// process was away (stopped or starved): that time is not the tracker's silence. Well above
/// a loaded machine's scheduling delays, well below [`TRACKER_SILENCE`].
pub const AWAY_AFTER: Duration = Duration::from_millis(900);
/// Most attempts of a round in flight at once (the driver holds that many sockets at most).
pub const MAX_RACE: usize = 3;
/// While no attempt of a round has won, the next tracker is tried this long after the last
/// attempt started: a live tracker nearby completes its handshake and welcome well within it,
/// so a failover usually opens one connection, and a hung next tracker costs this, not a
/// whole silence timeout.
pub const RACE_STAGGER: Duration = Duration::from_millis(150);
/// Most doublings of the silence allowed after links left for silence in a row (to 12 s).
const MAX_SILENCE_DOUBLINGS: u32 = 3;
/// Ping ids count down from the top of the id space, far from the session's, which count up
/// from 1; replies in this range are the link's own.
const PING_IDS: u64 = 1 << 32;

/// Names one connection the core asked for (every attempt gets a new one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LinkId(pub u64);

/// What the driver must do for the link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UplinkEvent {
    /// Start a non-blocking connection to this address, named `LinkId`; report what happens
    /// to it with the `handle_*` calls under that id.
    Connect(LinkId, SocketAddr),
    /// Close that connection (if it is still open; its later events are ignored anyway).
    Close(LinkId),
    /// A tracker welcomed this client and is its link now: hand the session's resume and
    /// requests in flight to [`Uplink::send`]. Once per link.
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
    /// Index of the round's first tracker; attempt `k` goes to `first + k` (modulo the file).
    first: usize,
    /// Attempts started in this round.
    started: usize,
    /// Rounds before this one.
    n_rounds: u32,
}

/// How far an attempt got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// The TCP connection is being made.
    Connecting,
    /// Connected; the secure handshake runs.
    Securing,
    /// The handshake is done and the hello sent: waiting for the welcome.
    Hello,
}

/// One connection of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Attempt {
    id: LinkId,
    index: usize,
    stage: Stage,
    deadline: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No link, and none wanted until the next request.
    Idle,
    /// A round of attempts is in flight (`Uplink::attempts`); the next tracker of the round
    /// is tried at `next_start` if none has won by then.
    Racing { round: Round, next_start: Instant },
    /// Waiting before the next round of attempts.
    Waiting { until: Instant, round: Round },
    /// Linked to `trackers[index]`, which welcomed this client.
    Open {
        id: LinkId,
        index: usize,
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
    /// The attempts of the round in flight, in the order started; at most [`MAX_RACE`], and
    /// none unless racing.
    attempts: Vec<Attempt>,
    /// Index of the tracker last linked to: the first tried for a new link, and the one a
    /// failover starts after.
    index: usize,
    /// Whether a tracker was ever linked to (for the log: "connected" or "moved").
    failing_over: bool,
    /// While failing over, a whole round of attempts failed: commands fail at once
    /// ([`UplinkEvent::Unreachable`]) instead of waiting, while the rounds go on (the session
    /// is kept until [`RECONNECT_FOR`]).
    unreachable: bool,
    /// Attempts in a row that broke after their handshake, before the tracker's welcome.
    failed_links: usize,
    /// Links in a row left for their silence without a reply in between. A tracker that is
    /// slow rather than hung (its loop starved by other work on its machine) gets twice the
    /// time on the next link, so that the client's retry does not add to the work that made it
    /// slow.
    silent_links: u32,
    /// Links made so far: the number of the current link (1 for the first), which every
    /// login and resume sent on it carries (`RequestBody::Login::link`). The trackers order
    /// the client's links by it, so that a copy of a request sent on a link the client has
    /// left neither moves its session there nor, when that link's close is seen, ends it. Only
    /// a welcomed attempt becomes a link (losers never carry a request).
    n_links: u64,
    /// Connections asked for so far (the last [`LinkId`]).
    n_opened: u64,
    n_pings: u64,
    /// When the last [`handle_timeout`](Uplink::handle_timeout) asked to be called next (its
    /// [`poll_timeout`](Uplink::poll_timeout)): a call more than [`AWAY_AFTER`] later means
    /// this process itself was away (stopped, swapped out, starved), and that time is not
    /// counted against the tracker.
    next_turn: Option<Instant>,
    events: VecDeque<UplinkEvent>,
    transmit: VecDeque<(LinkId, ClientMsg)>,
}

impl Uplink {
    /// A link to the trackers of the file, in its order; `client_id` goes in every hello.
    pub fn new(trackers: Vec<SocketAddr>, client_id: u64) -> Self {
        Uplink {
            trackers,
            client_id,
            state: State::Idle,
            attempts: Vec::with_capacity(MAX_RACE),
            index: 0,
            failing_over: false,
            unreachable: false,
            failed_links: 0,
            silent_links: 0,
            n_links: 0,
            n_opened: 0,
            n_pings: 0,
            next_turn: None,
            events: VecDeque::new(),
            transmit: VecDeque::new(),
        }
    }

    /// The tracker of the link, once one welcomed this client.
    pub fn tracker(&self) -> Option<SocketAddr> {
        match self.state {
            State::Open { index, .. } => self.trackers.get(index).copied(),
            _ => None,
        }
    }

    /// Whether a link is up (a tracker welcomed this client).
    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Open { .. })
    }

    /// Whether the link is between trackers (racing attempts or waiting to).
    pub fn is_reconnecting(&self) -> bool {
        matches!(self.state, State::Racing { .. } | State::Waiting { .. })
    }

    /// Whether frames read on connection `id` are still wanted: it is the link, or an
    /// attempt waiting for its welcome. The driver stops reading a connection once not.
    pub fn wants_frames(&self, id: LinkId) -> bool {
        match self.state {
            State::Open { id: open, .. } => open == id,
            _ => self
                .attempts
                .iter()
                .any(|a| a.id == id && a.stage == Stage::Hello),
        }
    }

    /// Attempts in flight (at most [`MAX_RACE`]).
    pub fn n_attempts(&self) -> usize {
        self.attempts.len()
    }

    pub fn poll_event(&mut self) -> Option<UplinkEvent> {
        self.events.pop_front()
    }

    /// The next frame to write, and on which connection.
    pub fn poll_transmit(&mut self) -> Option<(LinkId, ClientMsg)> {
        self.transmit.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) next has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Idle => None,
            State::Racing { next_start, .. } => {
                let start = self.can_start().then_some(next_start);
                self.attempts.iter().map(|a| a.deadline).chain(start).min()
            }
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
            State::Open { id, .. } => {
                if let RequestBody::Login { link, .. } | RequestBody::Resume { link, .. } =
                    &mut request.body
                {
                    // A retry carries the number of the link it goes on, not the first one's.
                    *link = self.n_links;
                }
                self.transmit.push_back((id, ClientMsg::Request(request)));
            }
            State::Racing { .. } | State::Waiting { .. } if self.unreachable => {
                // No tracker answered a whole round: the command fails now rather than
                // after its timeout (the link keeps trying; a later command may find one).
                self.events.push_back(UplinkEvent::Unreachable);
            }
            State::Racing { .. } | State::Waiting { .. } => {}
            State::Idle => {
                let round = Round {
                    give_up: None,
                    first: self.index,
                    started: 0,
                    n_rounds: 0,
                };
                self.start_round(round, now);
            }
        }
    }

    /// Connection `id` is connected and now runs the link's secure handshake (the driver's):
    /// the attempt gets as long as a quiet open link may stay silent to complete it, since it
    /// needs the tracker's loop to answer (a busy tracker is slow, not gone), where the
    /// connect itself needed only its kernel. The other trackers of the round are raced
    /// meanwhile, so a hung one costs no more than [`RACE_STAGGER`].
    pub fn handle_transport_up(&mut self, id: LinkId, now: Instant) {
        let silence = self.silence();
        if let Some(a) = self.attempt_mut(id) {
            if a.stage == Stage::Connecting {
                a.stage = Stage::Securing;
                a.deadline = now + silence;
            }
        }
    }

    /// Connection `id` completed its secure handshake and the tracker proved the expected
    /// key: the hello goes out on it, and the attempt waits for the welcome (which makes it
    /// the link, [`UplinkEvent::Connected`]).
    pub fn handle_connected(&mut self, id: LinkId, now: Instant) {
        let silence = self.silence();
        let client_id = self.client_id;
        let Some(a) = self.attempt_mut(id) else {
            return;
        };
        if a.stage == Stage::Hello {
            return;
        }
        a.stage = Stage::Hello;
        a.deadline = now + silence;
        let index = a.index;
        if let Some(addr) = self.trackers.get(index) {
            debug!("tracker {addr}: secure link up, hello sent");
        }
        self.transmit.push_back((id, ClientMsg::hello(client_id)));
    }

    /// Connection `id` failed before its handshake was done (refused, reset, the socket could
    /// not even be made, the handshake failed).
    pub fn handle_connect_failed(&mut self, id: LinkId, reason: &str, now: Instant) {
        let Some(pos) = self.position(id) else {
            return;
        };
        if let Some(addr) = self.trackers.get(self.attempts[pos].index) {
            debug!("tracker {addr}: {reason}");
        }
        let counted = self.attempts[pos].stage == Stage::Hello;
        self.fail_attempt(pos, counted, now);
    }

    /// The tracker of connection `id` proved another service key than the one expected (the
    /// driver checks it). For a first connection the command fails at once
    /// ([`UplinkEvent::Unreachable`]; the driver names the tracker and both keys) and every
    /// attempt of the round is closed, rather than going on with the file's other trackers:
    /// they are the same service and present the same key, so the mismatch is the user's to
    /// look at. While failing over with a session the others are still tried (each must
    /// present the expected key too).
    pub fn handle_refused(&mut self, id: LinkId, reason: &str, now: Instant) {
        let Some(pos) = self.position(id) else {
            return;
        };
        let State::Racing { round, .. } = self.state else {
            return;
        };
        if round.give_up.is_some() {
            return self.fail_attempt(pos, false, now);
        }
        debug!("{reason}");
        self.close_attempts();
        self.state = State::Idle;
        self.events.push_back(UplinkEvent::Unreachable);
    }

    /// A whole frame read on connection `id`. A reply for the session comes back; a
    /// malformed or misplaced frame breaks that connection (the link: the next trackers are
    /// raced; an attempt: it fails). The welcome of the first attempt to get one makes it the
    /// link; frames of connections the core has closed are ignored.
    pub fn handle_frame(&mut self, id: LinkId, payload: &[u8], now: Instant) -> Option<Reply> {
        if let State::Open {
            id: open,
            ref mut last_heard,
            ..
        } = self.state
        {
            if open != id {
                return None;
            }
            *last_heard = now;
            let error = match TrackerMsg::parse(payload) {
                Ok(TrackerMsg::Reply(reply)) => {
                    // The tracker answers: it was slow at worst, not hung.
                    self.silent_links = 0;
                    let own_ping =
                        reply.req_id > u64::MAX - PING_IDS && matches!(reply.body, ReplyBody::Pong);
                    return (!own_ping).then_some(reply);
                }
                Ok(other) => LinkError::Protocol(format!("unexpected message {other:?}")),
                Err(e) => LinkError::Protocol(e.to_string()),
            };
            self.handle_closed(id, &error.to_string(), now);
            return None;
        }
        let pos = self.position(id)?;
        if self.attempts[pos].stage != Stage::Hello {
            return None;
        }
        let error = match TrackerMsg::parse(payload) {
            Ok(TrackerMsg::Welcome { version, .. }) if version == PROTOCOL_VERSION => {
                self.win(pos, now);
                return None;
            }
            Ok(TrackerMsg::Welcome { version, .. }) => LinkError::Version(version),
            Ok(other) => LinkError::Protocol(format!("unexpected message {other:?}")),
            Err(e) => LinkError::Protocol(e.to_string()),
        };
        if let Some(addr) = self.trackers.get(self.attempts[pos].index) {
            warn!("tracker {addr}: {error}");
        }
        self.fail_attempt(pos, true, now);
        None
    }

    /// Connection `id` broke (closed by the tracker, a read or write error, a protocol
    /// error): the link moves to another tracker at once, keeping the session; an attempt
    /// fails.
    pub fn handle_closed(&mut self, id: LinkId, reason: &str, now: Instant) {
        match self.state {
            State::Open {
                id: open, index, ..
            } if open == id => {
                if let Some(addr) = self.trackers.get(index) {
                    warn!("tracker {addr}: {reason}");
                }
                self.events.push_back(UplinkEvent::Close(id));
                self.lose(index, now);
            }
            _ => self.handle_connect_failed(id, reason, now),
        }
    }

    /// Timers: an attempt that takes too long, the next attempt of a race, the pause between
    /// rounds, pings on a quiet link and leaving a silent tracker (a hung process keeps its
    /// sockets open, so only silence tells). A call much later than asked ([`AWAY_AFTER`])
    /// means this process was away: that time is not counted as the tracker's silence (see
    /// `came_back`).
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
            State::Racing { .. } => {
                // Each failure may start the next attempt, end the round or the session.
                while matches!(self.state, State::Racing { .. }) {
                    let Some(pos) = self.attempts.iter().position(|a| now >= a.deadline) else {
                        break;
                    };
                    let a = self.attempts[pos];
                    if let Some(addr) = self.trackers.get(a.index) {
                        let what = match a.stage {
                            Stage::Connecting => "no connection",
                            Stage::Securing => "no secure handshake",
                            Stage::Hello => "no welcome",
                        };
                        debug!("tracker {addr}: {what} in time");
                    }
                    // Not counted as a broken link, even after the hello: a tracker that
                    // holds its welcome is not serving yet (restarted and waiting for the
                    // others, copying the state), like a hung one, and the session waits
                    // for it until `RECONNECT_FOR`. Counted, three raced attempts a round
                    // gave the session up after two rounds (3.6 s).
                    self.fail_attempt(pos, false, now);
                }
                if let State::Racing { next_start, .. } = self.state {
                    if now >= next_start && self.can_start() {
                        self.start_next(now);
                    }
                }
            }
            State::Waiting { until, round } => {
                if now >= until {
                    self.start_round(round, now);
                }
            }
            State::Open {
                id,
                index,
                last_heard,
                last_ping,
            } => {
                let silence = self.silence();
                if now.saturating_duration_since(last_heard) >= silence {
                    if let Some(addr) = self.trackers.get(index) {
                        warn!("tracker {addr}: silent for {silence:?}; moving to another");
                    }
                    self.silent_links = self.silent_links.saturating_add(1);
                    self.events.push_back(UplinkEvent::Close(id));
                    self.lose(index, now);
                } else if now.saturating_duration_since(last_heard.max(last_ping)) >= PING_AFTER {
                    self.state = State::Open {
                        id,
                        index,
                        last_heard,
                        last_ping: now,
                    };
                    self.push_ping(id);
                }
            }
        }
    }

    fn push_ping(&mut self, id: LinkId) {
        self.n_pings += 1;
        self.transmit.push_back((
            id,
            ClientMsg::Request(Request {
                req_id: u64::MAX - (self.n_pings % PING_IDS),
                body: RequestBody::Ping,
            }),
        ));
    }

    /// This process was away for `gap` (its loop did not turn: stopped, or starved on a loaded
    /// machine), longer than a tracker may stay silent. The time away is not the tracker's
    /// silence: the link's clocks move on by `gap` and an open link is pinged at once, so a
    /// live tracker is kept (leaving it would race the resume through another tracker against
    /// this link's close) and a hung one is still left after its silence.
    fn came_back(&mut self, gap: Duration, now: Instant) {
        match self.state {
            State::Open {
                id,
                index,
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
                    id,
                    index,
                    last_heard: (last_heard + gap).max(floor).min(now),
                    last_ping: now,
                };
                self.push_ping(id);
            }
            State::Racing { round, next_start } => {
                // The attempts get their time back, and the race its stagger.
                for a in &mut self.attempts {
                    a.deadline = (a.deadline + gap).max(now + CONNECT_TIMEOUT);
                }
                self.state = State::Racing {
                    round,
                    next_start: (next_start + gap).max(now + RACE_STAGGER),
                };
            }
            // A pause between rounds may end late: nothing is blamed for it.
            State::Waiting { .. } | State::Idle => self.on_timers(now),
        }
    }

    /// The link to `trackers[index]` is gone (its close already asked for): race the
    /// others, keeping the session.
    fn lose(&mut self, index: usize, now: Instant) {
        self.transmit.clear();
        self.failing_over = true;
        let round = Round {
            give_up: Some(now + RECONNECT_FOR),
            first: index + 1,
            started: 0,
            n_rounds: 0,
        };
        self.start_round(round, now);
    }

    /// Attempt `attempts[pos]` failed (`counted`: it broke after its handshake, before the
    /// welcome; one that waited too long for the welcome is not counted): it is closed, and the
    /// next tracker of the round is tried at once, or, when none is left and no attempt is in
    /// flight, the round ends.
    fn fail_attempt(&mut self, pos: usize, counted: bool, now: Instant) {
        let a = self.attempts.remove(pos);
        self.drop_connection(a.id);
        let State::Racing { round, .. } = self.state else {
            return;
        };
        if counted {
            self.failed_links += 1;
            if round.give_up.is_some() && self.failed_links >= 2 * self.trackers.len() {
                // Every tracker of the file was tried twice and none spoke the protocol.
                warn!("no tracker completes the handshake: the session is lost");
                self.failed_links = 0;
                self.close_attempts();
                return self.give_up();
            }
        }
        if round.started < self.trackers.len() {
            self.start_next(now);
        } else if self.attempts.is_empty() {
            self.end_round(round, now);
        }
    }

    /// No attempt of `round` was welcomed: the command fails (a first connection), or the
    /// next round comes after its backoff, or the session is given up.
    fn end_round(&mut self, round: Round, now: Instant) {
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
                    first: self.index + 1,
                    started: 0,
                    n_rounds: round.n_rounds + 1,
                };
                debug!("no tracker is reachable; trying again in {pause:?}");
                if pause.is_zero() {
                    self.start_round(next, now);
                } else {
                    self.state = State::Waiting {
                        until: now + pause,
                        round: next,
                    };
                }
            }
        }
    }

    /// Starts `round` with its first attempt.
    fn start_round(&mut self, round: Round, now: Instant) {
        if self.trackers.is_empty() {
            // An empty tracker file (the command line refuses it): nothing to try.
            self.state = State::Idle;
            self.events.push_back(match round.give_up {
                None => UplinkEvent::Unreachable,
                Some(_) => UplinkEvent::SessionLost,
            });
            return;
        }
        self.transmit.clear();
        self.state = State::Racing {
            round,
            next_start: now,
        };
        self.start_next(now);
    }

    /// Whether the race may start its next attempt: trackers of the round are left and fewer
    /// than [`MAX_RACE`] attempts are in flight.
    fn can_start(&self) -> bool {
        match self.state {
            State::Racing { round, .. } => {
                round.started < self.trackers.len() && self.attempts.len() < MAX_RACE
            }
            _ => false,
        }
    }

    /// Starts connecting to the round's next tracker (if it may).
    fn start_next(&mut self, now: Instant) {
        if !self.can_start() {
            return;
        }
        let State::Racing { mut round, .. } = self.state else {
            return;
        };
        let index = (round.first + round.started) % self.trackers.len();
        round.started += 1;
        self.n_opened += 1;
        let id = LinkId(self.n_opened);
        self.attempts.push(Attempt {
            id,
            index,
            stage: Stage::Connecting,
            deadline: now + CONNECT_TIMEOUT,
        });
        self.state = State::Racing {
            round,
            next_start: now + RACE_STAGGER,
        };
        self.events
            .push_back(UplinkEvent::Connect(id, self.trackers[index]));
    }

    /// `attempts[pos]` was welcomed: it is the link now; every other attempt is closed (their
    /// welcomes, if any come, are ignored), and the session hands over its resume and
    /// requests, once ([`UplinkEvent::Connected`]).
    fn win(&mut self, pos: usize, now: Instant) {
        let a = self.attempts.remove(pos);
        self.close_attempts();
        if let Some(addr) = self.trackers.get(a.index) {
            if self.failing_over {
                info!("moved to tracker {addr}");
            } else {
                info!("connected to tracker {addr}");
            }
        }
        self.failing_over = false;
        self.unreachable = false;
        self.failed_links = 0;
        self.index = a.index;
        self.n_links = self.n_links.saturating_add(1);
        self.state = State::Open {
            id: a.id,
            index: a.index,
            last_heard: now,
            last_ping: now,
        };
        self.events.push_back(UplinkEvent::Connected);
    }

    /// Closes every attempt in flight.
    fn close_attempts(&mut self) {
        for a in std::mem::take(&mut self.attempts) {
            self.drop_connection(a.id);
        }
    }

    /// Asks the driver to close connection `id`, and forgets what was queued for it.
    fn drop_connection(&mut self, id: LinkId) {
        self.transmit.retain(|(to, _)| *to != id);
        self.events.push_back(UplinkEvent::Close(id));
    }

    fn position(&self, id: LinkId) -> Option<usize> {
        self.attempts.iter().position(|a| a.id == id)
    }

    fn attempt_mut(&mut self, id: LinkId) -> Option<&mut Attempt> {
        self.attempts.iter_mut().find(|a| a.id == id)
    }

    /// How long the current link may stay silent: [`TRACKER_SILENCE`], doubled for each link
    /// left for silence in a row (see `silent_links`).
    fn silence(&self) -> Duration {
        TRACKER_SILENCE * (1u32 << self.silent_links.min(MAX_SILENCE_DOUBLINGS))
    }

    fn give_up(&mut self) {
        self.close_attempts();
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
