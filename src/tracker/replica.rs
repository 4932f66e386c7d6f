//! Replication of the tracker state across the trackers of the file: a sans-IO core.
//!
//! [`Replica`] owns the [`TrackerState`] of one tracker and keeps it equal to the others'. It
//! sees tracker links as ids with messages in and out ([`ReplicaOut`]), and time as an
//! argument; the tracker core feeds it and performs what it asks.
//!
//! # Protocol
//!
//! - **Links.** Every tracker dials every other when it starts (and after a stall), and
//!   accepts links at any time. Links are kept for life: of each pair the lower-numbered
//!   tracker redials a lost link (50 ms, doubling to 1 s), and the higher one redials only a
//!   tracker that may be up but does not answer (`unsure`, every second). Each side announces
//!   its [`ReplStatus`] first and whenever it changes; quiet links carry a heartbeat every
//!   [`HEARTBEAT_EVERY`], and a link silent for [`PEER_TIMEOUT`] (or closed: a killed
//!   process's sockets close at once) is lost. Two links between the same pair (both dialed
//!   at once) are cut to the one dialed by the lower number, and each side then repeats what
//!   the dropped link may have lost (`resync`: every message is safe to repeat).
//! - **Order.** One tracker, the primary, orders every change. The others (backups) forward
//!   their clients' changes to it. The primary applies changes in batches: it applies a batch,
//!   writes it, sends it to every member (the backups that hold the state), and once every
//!   member has acknowledged it and its own write of it is durable the batch is committed:
//!   the primary tells the members, and each tracker answers its clients whose changes were
//!   in it. Batches are pipelined: the primary starts the next batch once its own write of
//!   the one before is durable, without waiting for the members' acknowledgements, up to
//!   [`MAX_IN_FLIGHT`] batches (and [`MAX_IN_FLIGHT_BYTES`]) in flight; batches commit in
//!   order, and a member's acknowledgement of a batch covers every batch before it. So every
//!   member is at most [`MAX_IN_FLIGHT`] batches behind the primary; changes that arrive
//!   while the primary's disk is busy form the next batch, so the batch grows with the load
//!   (group commit), and a member's disk covers the batches that reached it meanwhile with
//!   one fsync.
//! - **Joining.** A starting tracker dials the others. If one of them is a serving primary, it
//!   asks it for the state, saying where its own stands ([`JoinPosition`]: the entries it
//!   applied and the claim under which it last accepted entries or a state). Once no batch is
//!   in flight (it starts no new batch while a joiner waits, so the pipeline drains; it then
//!   sends committed changes only) the primary sends either the entries after
//!   that position, when its [`Ring`] of recent batches holds the joiner's last entry as
//!   applied under the same claim (suffix parts, then `Suffix`) and those entries are
//!   smaller than the state by the estimates of both ([`CatchUp`]), or else a snapshot; it counts
//!   the joiner as a member from then on. The joiner serves clients once it has applied the
//!   suffix (written as log records, acknowledged once durable like a batch) or installed the
//!   snapshot. An empty joiner, or one whose history is unknown, always gets a snapshot.
//! - **Histories.** Entries applied under a claim (as its primary, or as a backup following
//!   it) are a prefix of the sequence that claim's primary ordered, which only grows while the
//!   claim lasts. So two trackers that each hold entry `n` as applied under the same claim
//!   hold the same first `n` entries, and the entries after `n` on one are exactly what the
//!   other lacks. Each tracker records that claim with its state (`accepted_view` and
//!   `accepted_by`, in the metadata too), sets it to unknown before it writes entries or a
//!   state of another claim's history, and tags the batches of its ring with it. A tracker
//!   that was away holding a batch that was never committed (an abandoned view) names that
//!   view's claim, which the primary does not hold at that position: it gets a snapshot.
//! - **Starting the service.** When no tracker serves, the starting tracker whose state is
//!   furthest on starts it: states are ordered by the view in which they last accepted entries
//!   (a later view's state holds every change committed before it), then by entries applied,
//!   then by the lower number; a starting tracker's status carries that position. It waits
//!   for every tracker that may be up and has not said where it stands (a lost link, an
//!   accepted but unanswered dial: a frozen process may hold the newest state); only a
//!   refused dial shows a tracker down.
//! - **Takeover.** When the primary dies, the lowest-numbered serving tracker takes over a
//!   new view: it asks every linked tracker where it stands, adopts the most advanced state
//!   among them (at most [`MAX_IN_FLIGHT`] batches ahead: the entries it lacks, taken from
//!   the answering tracker's [`Ring`], come back with the answer as one batch, or the whole
//!   state when they do not fit one), brings every member up to it with the entries after
//!   the position that member answered (members stand up to [`MAX_IN_FLIGHT`] batches apart;
//!   a member its ring does not reach back to is sent a batch past its point and asks for
//!   the state), then serves as primary. The state, when it comes whole, is sent as snapshot
//!   parts just before the answer, with no closing `Snapshot` (a taker handling that as a
//!   joiner's state would drop the parts before the answer that says what they are). The
//!   takeover's first commit (the answering members' acknowledgements, this tracker's write of
//!   what it took durable) releases the answers to the changes it took over: a state taken
//!   whole holds entries no primary committed, durable maybe nowhere yet, so unlike a
//!   joiner's it does not count as committed when installed. A catch-up that cannot be
//!   applied (a snapshot that does not decode, an answer from further on with nothing to
//!   catch up from: a peer's bug or corruption) leaves the taker at its own position, and a
//!   member that answered from further on is then not led: it is told to ask for the state
//!   (a batch past its point), and gets the taker's, as a joiner does. Batches sent after
//!   the taker's point would otherwise be taken by such a member as the ones it holds: two
//!   histories under one view (Invariant 1). What it loses was never committed (a batch
//!   commits only once every member, the taker among them, acknowledged it), and its own
//!   changes in it are ordered again (`uncommitted`). Starting the takeover over in a new
//!   view instead would meet the same answer each time (the same state encoded the same way,
//!   the same bug), and the service would never serve again. Backups re-forward the changes they forwarded and
//!   have not seen committed; a client retrying a change through another tracker carries the
//!   same request id, so nothing is applied twice (see `TrackerState::apply_entry`). Claims of
//!   primaryship are ordered by view, then by lower tracker number; a tracker follows the
//!   highest claim it has seen and ignores messages of lower ones (but for a claim that is
//!   void: its tracker is gone, or it came from an old disk naming a view above the live
//!   service's; the live claim is then followed though lower).
//! - **Views never repeat.** Each tracker keeps the highest view it ever claimed, followed
//!   or heard a linked tracker claim (in a serving tracker's status or a takeover) or name as
//!   the view its state was accepted in (a starting tracker's status), in its metadata as
//!   well (`Meta::highest_view`); it never goes down, though the claim followed may. Other
//!   messages name a view only within a claim already followed, or are ignored, and raise
//!   nothing. A view heard is written at once (the metadata last written, with only the
//!   highest view changed). A claim this tracker makes is the view after it, with checked
//!   arithmetic. A message naming a view more than [`VIEW_JUMP`] (2^41) above both this
//!   tracker's highest view and `VIEW_JUMP` itself, or above [`MAX_VIEW`], closes its link
//!   and raises nothing: every honest view is under 2^41 (a service's first claim is under
//!   2^40, and each takeover adds one), and heeding such a view (a peer's bug, a corrupt
//!   disk's status) would bring the next claim to `MAX_VIEW`, after which no tracker could
//!   take over again. Metadata naming a view above [`MAX_STORED_VIEW`] (2^42) is refused as
//!   corrupt when the tracker starts. So no tracker claims a view its own disk ever named
//!   (across restarts), nor one a tracker linked to it named. An old disk that joins the live
//!   service in a lower view (a void claim, above) tells the view its state was accepted in
//!   while it starts, so the takeovers of the trackers that heard it go above that view, and
//!   its own above every view its disk named: the live service does not re-use that history's
//!   claims, under which other disks of it may hold entries. What this does not reach: a view
//!   named only by disks that are down and never heard (nobody up knows it), a tracker that
//!   links after the old disk joined (statuses of serving trackers name the live view only),
//!   a view heard by a tracker killed before that write was durable, and a claim made just
//!   before a kill: the metadata naming it is written after the claim goes out (in the
//!   `Takeover` messages; the first batches and catch-ups of the new view do not wait for it
//!   either), as it always was, so a tracker restarted without that write claims the view
//!   again unless a tracker it hears names it. (Members that logged entries under that claim
//!   then hold them under a claim made twice; with the other disks intact the restarted
//!   tracker waits for them, so this needs a lost disk as well.)
//! - **Stalls (fencing).** Every handler first passes the time to [`Replica::observe`]. A
//!   gap of [`STALL_LIMIT`] between two turns of the loop (which wakes at least every
//!   [`HEARTBEAT_EVERY`]) means this tracker was frozen or starved: the others may have
//!   declared it dead and moved on. Before it handles anything that arrived meanwhile it stops
//!   serving, closes its tracker links and its clients' connections (they reconnect and
//!   re-send what they had in flight), drops the client requests it held, becomes a new run
//!   of itself (so its clients' sessions get the grace period to move) and starts over as a
//!   starting tracker that keeps its state. It serves again only after it has linked again and
//!   learned the current view (joining the primary), or, if nobody serves, after the rule
//!   above makes it the one to start.
//! - **Durability.** Every entry a tracker applies is written to its data directory
//!   ([`ReplicaOut::Persist`], in order) before it counts: a backup acknowledges a batch only
//!   once its write (and the metadata before it) is durable ([`Replica::handle_durable`]), and
//!   the primary commits a batch only once every member acknowledged it and its own write is
//!   durable. The metadata ([`Meta`]) holds the claim, the highest view (never lowered), the
//!   view of the state,
//!   and the trackers this one last served with (a primary's members and the trackers it is
//!   giving the state to, written before they get it; a backup's primary). A state taken
//!   from another tracker is written as a snapshot that voids the log past it.
//! - **Restarts from disk.** A tracker starts from its snapshot and log, as a starting
//!   tracker. It does not start the service with its state while any tracker that may hold
//!   changes acknowledged after it stopped is not up and heard from: the trackers its disk
//!   says it last served with, any tracker that said it was further on or served in a later
//!   view, and whoever a starting tracker says it waits for (the `waiting` set of its status,
//!   so the wait is transitive). A stalled tracker waits the same way for those it served
//!   with. A tracker with an empty disk starts the service only if it founded it (the first
//!   tracker to start with this service key, named in a marker file beside the key): any
//!   other waits to join, since the trackers holding the service's state may all be down.
//!   Except when every tracker of the file is up and says it holds no state and is not the
//!   founder (statuses say both): then no state exists anywhere, and tracker 1 starts the
//!   service empty (every data directory was removed while the key and its marker stayed).
//! - **Sessions of dead trackers.** The primary gives the sessions held by a tracker run that
//!   is not live (dead, an earlier run of a restarted tracker, or a tracker's run before its
//!   stall) a grace period to move elsewhere (clients resume with their token); then it ends
//!   them, and their shares go offline.
//! - **A client's links are ordered.** A client that lost its link after sending a login or
//!   resume sends it again (same request id) through another tracker, and the two copies may
//!   be ordered either way. Logins and resumes carry the client's number for the link they
//!   came through (growing with each new link of the process), and so does the `ClientGone`
//!   a tracker submits when that link closes; the session keeps the number of the link that
//!   holds it, and an op naming an older link of the same client neither moves the session
//!   nor ends it (`TrackerState::left_link`), so a late copy from a link the client left
//!   cannot take the session from the link it uses.
//!
//! # Invariants
//!
//! 1. Every live tracker's state is a prefix of the primary's sequence of entries, applied in
//!    order; members are at most [`MAX_IN_FLIGHT`] batches behind the primary (the batches in
//!    flight), and a batch commits only after every batch before it. A joiner is given a
//!    state only when no batch is in flight, so it holds committed entries only. A joiner
//!    keeps its own entries only when the primary proves they are its own (same position
//!    under the same claim); otherwise its state is replaced whole.
//! 2. A change is answered only after every live member holds it durably (fsync'd), so an
//!    acknowledged change survives any crash that leaves one tracker up, and a crash of every
//!    tracker at once: the service restarts from the most advanced durable state of the
//!    trackers that come up, never from an older one while a tracker that may hold a newer
//!    one is missing (such a tracker is waited for, however long).
//! 3. A change is applied at most once per client request id: answers are remembered in the
//!    replicated state (the last [`super::state::MAX_ANSWERS_PER_CLIENT`] per client), and a
//!    request older than all of them is not applied. A tracker's own changes are named the
//!    same way ([`Replica::internal_origin`]).
//! 4. At most one running tracker acts as primary: a tracker that was frozen finds out before
//!    it handles anything, and answers from a replaced state are never sent (the tracker core
//!    drops them when the state is replaced).
//! 5. No older state is made current: the service is started only by the starting tracker
//!    furthest on, and only once every tracker that may be up has told its position.
//!
//! # Faults covered and not
//!
//! Covered (pinned by the simulated cluster in `replica_tests.rs`, randomized with all of
//! these at once): process crashes (kill -9), hangs (heartbeat timeout), freezes of 0.5-3 s
//! and their thaw (SIGSTOP/SIGCONT: frames wait, timers fire late, the others have moved on),
//! restarts, several trackers dying one after the other; with disks, also every tracker
//! killed at once (a random prefix of the writes in flight reaching the disk) and restarted
//! from its disk in any order. Not covered: network partitions that last (two halves would each keep a primary: the
//! side that did not stall has no way to tell a dead peer from a cut one), and a stall
//! shorter than [`STALL_LIMIT`] that the others nevertheless took for a death (a message
//! delay of more than ~100 ms on top of it). Availability is traded for that: if a tracker
//! that may hold the newest state never comes back (its disk is lost), the others wait for it
//! for ever (the operator must bring it back, or remove the data directories and start
//! again). A disk that lies about fsync is not covered.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};

use super::durable::{Meta, Persist, Restored};
use super::ring::{Claim, Ring, RING_MAX_BATCHES, RING_MAX_BYTES};
use super::state::{Answer, Entry, Op, Origin, TrackerRef, TrackerState};
use crate::net::ConnId;
use crate::wire::replication::{
    Batch, Catchup, JoinPosition, ReplMsg, ReplStatus, MAX_SNAPSHOT_LEN, SNAPSHOT_PART_LEN,
};
use crate::wire::PROTOCOL_VERSION;

/// A quiet link gets a heartbeat this often.
pub const HEARTBEAT_EVERY: Duration = Duration::from_millis(200);
/// A link silent this long is considered dead.
pub const PEER_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long a starting tracker waits for linked trackers to tell their status.
pub const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a backup waits for the expected new primary before taking over itself.
pub const TAKEOVER_WAIT: Duration = Duration::from_secs(3);
/// How long sessions held by a dead tracker may take to move before they end.
pub const SESSION_GRACE: Duration = Duration::from_secs(10);
/// A gap this long between two turns of this tracker's loop means it was stalled (frozen,
/// starved of CPU): the others hear from it at least every [`HEARTBEAT_EVERY`], so they may
/// have declared it dead once a gap nears [`PEER_TIMEOUT`] less one heartbeat.
pub const STALL_LIMIT: Duration = Duration::from_millis(1200);
/// The first retry of a failed or lost tracker link; later retries double it up to
/// [`REDIAL_MAX`]. Trackers keep dialing each other for their whole life.
pub const REDIAL_FIRST: Duration = Duration::from_millis(50);
pub const REDIAL_MAX: Duration = Duration::from_secs(1);
/// Most entries in one batch.
const MAX_BATCH_ENTRIES: usize = 4096;
/// Roughly the most bytes of entries in one batch (at least one entry goes in any batch).
const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;
/// Most batches a primary has in flight (sent and not yet committed): members are at most
/// this many batches behind it. More than one lets a batch be written and acknowledged while
/// the next is already on its way (pipelining); the disks' group commit then covers several
/// batches with one fsync.
pub const MAX_IN_FLIGHT: usize = 4;
/// Roughly the most bytes of entries in flight: a new batch is not started past it.
const MAX_IN_FLIGHT_BYTES: usize = 2 * MAX_BATCH_BYTES;
/// Most entries a tracker answering a takeover sends as one catch-up batch (the entries of
/// every batch in flight); past this, or past [`MAX_BATCH_BYTES`], it sends its state.
const MAX_CATCHUP_ENTRIES: usize = MAX_IN_FLIGHT * MAX_BATCH_ENTRIES;
/// A durable tracker snapshots its state (to compact its log) once this many entries, or
/// roughly this many bytes of entries, were logged since the last snapshot.
pub const COMPACT_ENTRIES: u64 = 100_000;
pub const COMPACT_BYTES: usize = 64 << 20;

/// What the tracker must do for the replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaOut {
    /// Open a link to tracker `no`; report `handle_dialed` or `handle_dial_failed`.
    Dial(u16),
    Send(ConnId, ReplMsg),
    Close(ConnId),
    /// Entry `seq` was applied with this answer (answer the client once `seq` is committed).
    Applied {
        seq: u64,
        origin: Option<Origin>,
        answer: Answer,
    },
    /// Every entry up to `seq` is held by every live tracker.
    Committed(u64),
    /// The state was replaced by a snapshot taken after entry `seq`: answers to waiting
    /// requests are in its memory.
    StateReplaced(u64),
    /// The tracker started (true) or stopped (false) holding a state it may serve from.
    Serving(bool),
    /// Write this to the data directory, after every write asked for before it; report
    /// with [`Replica::handle_durable`] once it is durable (the n-th write is number n).
    Persist(Persist),
}

/// How a primary catches up a joiner whose own entries its ring proves (the same position
/// under the same claim).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatchUp {
    /// Only the entries it lacks when they are smaller than the state, by the estimates both
    /// keep (the ring's bytes of those batches, the state's [`TrackerState::size`]), else the
    /// whole state. A joiner applies and logs every entry it is sent (some microseconds each,
    /// 256 estimated bytes), where a snapshot is decoded and written in one piece: measured
    /// (`cargo bench --bench recovery`, a 356 KB state), 100,000 entries took 30-60 times as
    /// long as the state, and the estimates put the crossing near where the two cost the
    /// same.
    BySize,
    /// The entries it lacks whenever the ring holds them (scenarios that test that path with
    /// states too small for it to win).
    SuffixWhenProven,
}

/// Timings, shortened by tests.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    pub heartbeat_every: Duration,
    pub peer_timeout: Duration,
    pub discovery_timeout: Duration,
    pub takeover_wait: Duration,
    pub session_grace: Duration,
    pub stall_limit: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            heartbeat_every: HEARTBEAT_EVERY,
            peer_timeout: PEER_TIMEOUT,
            discovery_timeout: DISCOVERY_TIMEOUT,
            takeover_wait: TAKEOVER_WAIT,
            session_grace: SESSION_GRACE,
            stall_limit: STALL_LIMIT,
        }
    }
}

/// One tracker link.
#[derive(Debug)]
struct Link {
    /// The tracker at the other end, once its hello arrived.
    peer: Option<TrackerRef>,
    /// Tracker number we dialed (None: it dialed us).
    dialed: Option<u16>,
    /// When the driver opened the link, in the order of the driver's connections: the links
    /// of a restarted tracker are newer than those of its earlier run, whatever order their
    /// hellos arrive in.
    opened: u64,
    status: Option<ReplStatus>,
    /// The status this side sent with its hello: what the peer knows of us until its hello
    /// links it and `broadcast_status` reaches it.
    hello_status: ReplStatus,
    last_heard: Instant,
    last_sent: Instant,
    /// Snapshot parts received so far.
    snapshot: Vec<u8>,
    /// Suffix parts received so far: the first seq, the entries, their estimated bytes.
    suffix: Option<(u64, Vec<Entry>, usize)>,
}

/// Where this tracker stands, with the data that only means something in that role: a
/// primary's members, joiners, waiting changes and batches in flight ([`Lead`]), a backup's
/// changes forwarded to its primary ([`Forwarded`]), a takeover's answers still awaited and
/// best offer. Leaving a role drops or hands on its data in one place (`stop_serving`,
/// `on_takeover`, `take_over`, `finish_takeover`).
#[derive(Debug)]
enum Role {
    /// Finding out who else is up.
    Starting {
        waits: Waits,
    },
    /// Asked `primary` for the state.
    Joining {
        primary: u16,
        waits: Waits,
    },
    /// Holds the state; follows the primary of the current claim.
    Backup {
        forwarded: Forwarded,
    },
    /// Taking over as primary: waiting for these trackers' answers. What it forwarded as a
    /// backup is ordered here once the takeover completes.
    Taking {
        waiting: BTreeSet<u16>,
        lead: Lead,
        /// The best state offered so far.
        offer: Option<Offer>,
        forwarded: Forwarded,
        /// The entries each member that answered has applied: with batches pipelined,
        /// members stand at different points, up to [`MAX_IN_FLIGHT`] batches apart.
        positions: BTreeMap<u16, u64>,
    },
    Primary {
        lead: Lead,
    },
}

impl Role {
    fn starting() -> Role {
        Role::Starting {
            waits: Waits::default(),
        }
    }

    fn backup() -> Role {
        Role::Backup {
            forwarded: Forwarded::default(),
        }
    }

    fn primary() -> Role {
        Role::Primary {
            lead: Lead::default(),
        }
    }

    fn is_primary(&self) -> bool {
        matches!(self, Role::Primary { .. })
    }

    fn is_backup(&self) -> bool {
        matches!(self, Role::Backup { .. })
    }

    /// A primary, or a tracker taking over: it orders changes (or will).
    fn leads(&self) -> bool {
        matches!(self, Role::Primary { .. } | Role::Taking { .. })
    }

    fn is_starting(&self) -> bool {
        matches!(self, Role::Starting { .. })
    }

    /// What a tracker that does not serve waits for; none for one that serves.
    fn waits(&self) -> Option<&Waits> {
        match self {
            Role::Starting { waits } | Role::Joining { waits, .. } => Some(waits),
            _ => None,
        }
    }

    fn waits_mut(&mut self) -> Option<&mut Waits> {
        match self {
            Role::Starting { waits } | Role::Joining { waits, .. } => Some(waits),
            _ => None,
        }
    }

    /// Takes what a starting or joining tracker waits for, to carry it to its next role.
    fn take_waits(&mut self) -> Waits {
        self.waits_mut().map(std::mem::take).unwrap_or_default()
    }
}

/// What a tracker that does not serve (starting, or joining a primary) must hear before it
/// may start the service with its own state. Dropped once it serves.
#[derive(Debug, Default)]
struct Waits {
    /// Trackers that may hold changes acknowledged after this tracker's state: those it last
    /// served with (from its disk, or at a stall), and those others said were further on or
    /// waited for. It does not start the service with its own state before each is linked
    /// and has told where it stands (see `decide`).
    must_hear: BTreeSet<u16>,
    /// Whether the wait (for `must_hear`, or for a tracker of the service to join) was logged.
    told: bool,
}

/// What a primary, or a tracker taking over, holds besides the state. All of it is empty in
/// the other roles.
#[derive(Debug, Default)]
struct Lead {
    /// The backups that hold the state and acknowledge batches.
    members: BTreeSet<u16>,
    /// Trackers that asked for the state, with the position they said their own state has:
    /// they get it (the entries they lack, or a snapshot) between two batches.
    joiners: BTreeMap<u16, Option<JoinPosition>>,
    /// Changes waiting to be ordered.
    next: VecDeque<Queued>,
    /// The batches sent and not yet committed, oldest first (a primary's only; at most
    /// [`MAX_IN_FLIGHT`], and [`MAX_IN_FLIGHT_BYTES`] of entries).
    in_flight: VecDeque<InFlight>,
    /// Trackers that answered this tracker's takeover from further on than the state it took
    /// over with (its catch-up could not be applied), with the position they answered: not
    /// members, told to ask for the state (see `finish_takeover`); kept until they do, to
    /// tell them again should that message be lost with a dropped duplicate link.
    rejoining: BTreeMap<u16, u64>,
}

impl Lead {
    /// Estimated bytes of the entries in flight.
    fn in_flight_bytes(&self) -> usize {
        self.in_flight.iter().map(|f| f.bytes).sum()
    }
}

/// A backup's changes sent to the primary and not yet seen applied (a tracker taking over
/// keeps them until it orders them itself).
#[derive(Debug, Default)]
struct Forwarded {
    entries: VecDeque<Entry>,
    /// How many of `entries` carry each origin.
    origins: BTreeMap<Origin, u32>,
}

impl Forwarded {
    /// Keeps `entry`, sent after the others.
    fn push_back(&mut self, entry: Entry) {
        self.count(&entry);
        self.entries.push_back(entry);
    }

    /// Keeps `entry` ahead of the others (it was to be ordered before them).
    fn push_front(&mut self, entry: Entry) {
        self.count(&entry);
        self.entries.push_front(entry);
    }

    fn count(&mut self, e: &Entry) {
        if let Some(o) = e.origin {
            *self.origins.entry(o).or_insert(0) += 1;
        }
    }

    /// `entry` was applied: it is no longer waiting to be. Returns the copy kept here (equal
    /// to `entry`), if it was here, so that the caller keeps it without another copy.
    fn remove(&mut self, entry: &Entry) -> Option<Entry> {
        let pos = if self.entries.front() == Some(entry) {
            Some(0)
        } else if entry.origin.is_some_and(|o| self.origins.contains_key(&o)) {
            self.entries.iter().position(|f| f == entry)
        } else {
            None
        };
        let e = pos.and_then(|p| self.entries.remove(p))?;
        if let Some(o) = e.origin {
            if let Some(n) = self.origins.get_mut(&o) {
                *n -= 1;
                if *n == 0 {
                    self.origins.remove(&o);
                }
            }
        }
        Some(e)
    }
}

/// A change waiting to be ordered by the primary, and whether it came from this tracker's own
/// clients. A backup keeps what it forwarded until it sees it applied (and orders it again
/// through the next primary otherwise), so a primary that steps down hands on only its own
/// changes: handing on a backup's too could order one twice, after its answer has left the
/// state's memory.
#[derive(Debug)]
struct Queued {
    own: bool,
    entry: Entry,
}

/// A batch sent to the members and not yet committed.
#[derive(Debug)]
struct InFlight {
    last_seq: u64,
    /// The members that have not acknowledged it (acknowledgements are cumulative: one for
    /// a later batch covers this one).
    waiting: BTreeSet<u16>,
    /// The primary's own write of the batch (and of the metadata before it): the batch is
    /// committed only once this write is durable too.
    write: u64,
    /// Estimated bytes of its entries.
    bytes: usize,
}

/// The best state offered during a takeover.
#[derive(Debug)]
struct Offer {
    applied: u64,
    from: u16,
    catchup: Catchup,
    /// The state, when the catch-up is a snapshot.
    snapshot: Vec<u8>,
}

pub struct Replica {
    me: TrackerRef,
    n_trackers: u16,
    t: Timings,
    state: TrackerState,
    role: Role,
    /// The claim of primaryship followed or made: (view, primary number). It may go down:
    /// a tracker whose disk named a view above the live service's follows the live primary.
    claim: (u64, u16),
    /// The highest view this tracker ever claimed, followed or heard a linked tracker name
    /// (in its metadata too, so across restarts): never lowered, and every claim this tracker
    /// makes goes above it, so it never claims a view it once named under another history.
    highest_view: u64,
    /// Sequence number of the last applied entry.
    applied: u64,
    /// The view in which this tracker last accepted entries or a state: with `applied`, the
    /// position of its state. A later view's state holds every change committed before it.
    accepted_view: u64,
    /// The primary of the claim (`accepted_view`, `accepted_by`) under which this tracker
    /// last accepted entries or a state: its entries are a prefix of the sequence that claim
    /// ordered, so a primary that holds one of them as applied under the same claim may send
    /// it only what it lacks (see [`Ring`]). 0 while not known (the state is being replaced,
    /// or the disk was written by an earlier build).
    accepted_by: u16,
    /// The most recent batches applied, tagged with the claim they were applied under.
    ring: Ring,
    /// How a joiner whose position the ring proves is caught up ([`CatchUp`]).
    catch_up: CatchUp,
    /// Trackers that may be up but have not said where they stand: their link was lost (it
    /// went silent, or was closed: a closed link proves nothing, a stalled tracker closes
    /// its links too), or our dial was accepted and never answered. They may hold the newest
    /// state, so a starting tracker does not start the service without them. Cleared by
    /// their hello, or by a refused dial (they are down).
    unsure: BTreeSet<u16>,
    committed: u64,
    links: BTreeMap<ConnId, Link>,
    /// The link in use to each tracker.
    peer_link: BTreeMap<u16, ConnId>,
    /// Trackers dialed whose dial has not resolved.
    dialing: BTreeSet<u16>,
    /// Trackers whose link in use was dropped for a duplicate one: what went out on it may be
    /// lost, so once the other link says hello the exchange with them is resumed
    /// ([`resync`](Self::resync)).
    resync_pending: BTreeSet<u16>,
    /// Requests this tracker made itself so far (see [`Replica::internal_origin`]).
    internal_req: u64,
    /// The runs of this process (its incarnation, and one more after each stall): the
    /// client ids of the changes it makes itself.
    own_runs: BTreeSet<u64>,
    /// Trackers with no link: when to dial them next.
    redial_at: BTreeMap<u16, Instant>,
    /// The last wait before dialing each tracker again (reset once it links).
    backoff: BTreeMap<u16, Duration>,
    started: Instant,
    /// When a backup waiting for another tracker's takeover gives up waiting. (Outside
    /// [`Role::Backup`]: a deadline set by a backup that then stopped serving still wakes the
    /// loop, and is dropped when it comes.)
    takeover_deadline: Option<Instant>,
    /// This tracker's own changes in its batches as primary that were not known committed
    /// when it last ordered a batch, with their sequence numbers. (Outside [`Lead`]: after a
    /// step-down they stay until the next batch this tracker orders drops those committed,
    /// and a later `stop_serving` as primary still hands on those not committed.)
    own_in_flight: Vec<(u64, Entry)>,
    /// Sessions of trackers that are not live end at these times (a primary's; outside
    /// [`Lead`] because a tracker that is primary again keeps the deadlines it set).
    grace: BTreeMap<TrackerRef, Instant>,
    /// Forwarded entries seen applied and not yet known committed, with their sequence
    /// numbers (and, on a primary that stopped serving, its batches in flight): if the state is
    /// then replaced by one that lacks them, they are ordered again.
    uncommitted: VecDeque<(u64, Entry)>,
    /// Submitted while no primary is known.
    held: VecDeque<Entry>,
    out: VecDeque<ReplicaOut>,
    /// The latest time a handler was given (for work started by `submit`).
    now: Instant,
    // Durability.
    /// Writes go to a data directory (`ReplicaOut::Persist`). Without one (tests of other
    /// parts), every write counts as durable at once.
    persistent: bool,
    /// Writes asked for so far; the n-th is number n.
    written: u64,
    /// Writes known durable (a prefix).
    durable: u64,
    /// Entry writes (and installs) not yet durable: (write number, last seq they hold).
    unsynced: VecDeque<(u64, u64)>,
    /// The highest seq whose write is durable: what a backup may acknowledge.
    durable_seq: u64,
    /// The metadata last written, and the number of that write.
    meta: Meta,
    meta_write: u64,
    /// With no state of its own, this tracker may start the service (it founds it). A
    /// tracker with an empty disk that did not found the service never starts it: the
    /// trackers holding the service's state may all be down, and an empty service started
    /// meanwhile would be taken for the newest.
    founder: bool,
    /// The last acknowledgement sent: (claim, seq).
    last_ack: Option<((u64, u16), u64)>,
    /// The primary asked for an acknowledgement that waits for the disk.
    ack_owed: bool,
    /// The status last broadcast.
    last_status: Option<ReplStatus>,
    /// Entries and bytes of entries logged since the last snapshot.
    since_snapshot: (u64, usize),
    /// When the log is compacted: [`COMPACT_ENTRIES`] and [`COMPACT_BYTES`] (scenarios use
    /// less).
    compact_at: (u64, usize),
}

/// Whether claim `a` beats claim `b`: a higher view, or the same view by a lower number.
fn beats(a: (u64, u16), b: (u64, u16)) -> bool {
    a.0 > b.0 || (a.0 == b.0 && a.1 < b.1)
}

/// The view after `view`. Views only grow and never wrap: [`MAX_VIEW`] is never reached by
/// counting (2^63 takeovers), and a message naming a view far above what this tracker knows
/// is refused ([`Replica::impossible_view`]), so no message brings a tracker near it.
fn next_view(view: u64) -> Option<u64> {
    view.checked_add(1).filter(|v| *v <= MAX_VIEW)
}

/// The highest view a tracker ever claims.
pub const MAX_VIEW: u64 = 1 << 63;

/// How far above what a tracker knows an honest view can be. Every view of the service is
/// under it: a service's first claim is below 2^40 (a new life starts at a view drawn from
/// the founder's random incarnation below 2^40, see `decide`), and each takeover
/// adds one, so reaching 2^41 takes 2^40 takeovers. A linked tracker naming a view more than
/// this above `max(highest_view, VIEW_JUMP)` is not an honest tracker of this service (a bug,
/// or a corrupt disk's status), and a metadata file naming a view above `2 * VIEW_JUMP` is
/// corrupt: heeding either would bring the next claims to [`MAX_VIEW`], and then no
/// takeover could ever be made again.
pub const VIEW_JUMP: u64 = 1 << 41;

/// The highest view a tracker's metadata may name (see [`VIEW_JUMP`]).
pub const MAX_STORED_VIEW: u64 = 2 * VIEW_JUMP;

/// The views a tracker message names, if any: its own, and one nested in it (a joiner's
/// position, a takeover answer's catch-up batch). Every one is checked against
/// [`Replica::impossible_view`].
fn msg_views(msg: &ReplMsg) -> [Option<u64>; 2] {
    match msg {
        ReplMsg::Status(ReplStatus::Serving { view, .. } | ReplStatus::Starting { view, .. })
        | ReplMsg::Batch(Batch { view, .. })
        | ReplMsg::Ack { view, .. }
        | ReplMsg::Commit { view, .. }
        | ReplMsg::Takeover { view, .. }
        | ReplMsg::Snapshot { view, .. }
        | ReplMsg::SuffixPart(Batch { view, .. })
        | ReplMsg::Suffix { view, .. } => [Some(*view), None],
        ReplMsg::TakeoverAck { view, catchup, .. } => [
            Some(*view),
            match catchup {
                Catchup::Batch(b) => Some(b.view),
                _ => None,
            },
        ],
        ReplMsg::JoinRequest(Some(position)) => [Some(position.view), None],
        _ => [None, None],
    }
}

/// The view a message names that may become a claim this tracker follows or must stay
/// above: a status (a serving tracker's claim, or the view a starting tracker's state was
/// accepted in: it may join in a lower view, its disk having named this one) and a takeover.
/// Other messages name a view only within a claim already followed (raised by `set_claim`),
/// or are ignored: they raise nothing.
fn claim_view(msg: &ReplMsg) -> Option<u64> {
    match msg {
        ReplMsg::Status(ReplStatus::Serving { view, .. } | ReplStatus::Starting { view, .. })
        | ReplMsg::Takeover { view, .. } => Some(*view),
        _ => None,
    }
}

/// A rough size of an entry on the wire, to bound batches (and the ring of recent batches).
pub(crate) fn entry_size(e: &Entry) -> usize {
    match &e.op {
        Op::ShareFile { meta, .. } => 256 + 20 * meta.piece_hashes.len(),
        _ => 256,
    }
}

impl Replica {
    /// How long the sessions of a tracker run that is not live wait to move.
    pub fn session_grace(&self) -> Duration {
        self.t.session_grace
    }

    /// A tracker that just started, with `state` (empty unless a test gives one). It dials
    /// every other tracker; with no others it is primary at once.
    pub fn new(me: TrackerRef, n_trackers: u16, t: Timings, now: Instant) -> Self {
        Self::build(me, n_trackers, t, now, None)
    }

    /// A tracker that keeps its state on disk and starts from what its disk held: every
    /// change it applies is written (`ReplicaOut::Persist`) and acknowledged only once
    /// [`handle_durable`](Self::handle_durable) says so.
    pub fn new_durable(
        me: TrackerRef,
        n_trackers: u16,
        t: Timings,
        now: Instant,
        restored: Restored,
    ) -> Self {
        Self::build(me, n_trackers, t, now, Some(restored))
    }

    fn build(
        me: TrackerRef,
        n_trackers: u16,
        t: Timings,
        now: Instant,
        restored: Option<Restored>,
    ) -> Self {
        let mut r = Replica {
            me,
            n_trackers,
            t,
            state: TrackerState::new(),
            role: Role::starting(),
            claim: (0, u16::MAX),
            highest_view: 0,
            applied: 0,
            accepted_view: 0,
            accepted_by: 0,
            ring: Ring::new(RING_MAX_BATCHES, RING_MAX_BYTES, 0, None),
            catch_up: CatchUp::BySize,
            unsure: BTreeSet::new(),
            committed: 0,
            links: BTreeMap::new(),
            peer_link: BTreeMap::new(),
            dialing: BTreeSet::new(),
            redial_at: BTreeMap::new(),
            backoff: BTreeMap::new(),
            resync_pending: BTreeSet::new(),
            internal_req: 0,
            own_runs: [me.incarnation].into_iter().collect(),
            started: now,
            takeover_deadline: None,
            own_in_flight: Vec::new(),
            grace: BTreeMap::new(),
            uncommitted: VecDeque::new(),
            held: VecDeque::new(),
            out: VecDeque::new(),
            now,
            persistent: false,
            written: 0,
            durable: 0,
            unsynced: VecDeque::new(),
            durable_seq: 0,
            meta: Meta::default(),
            meta_write: 0,
            founder: true,
            last_ack: None,
            ack_owed: false,
            last_status: None,
            since_snapshot: (0, 0),
            compact_at: (COMPACT_ENTRIES, COMPACT_BYTES),
        };
        if let Some(restored) = restored {
            r.persistent = true;
            r.founder = restored.founder;
            r.state = restored.state;
            r.applied = restored.applied;
            r.committed = restored.committed;
            r.durable_seq = restored.applied;
            r.ring = restored.recent;
            // The log past the snapshot counts toward the next compaction, as it would have
            // had the tracker not restarted (at least 256 estimated bytes an entry: the ring
            // may not hold them all).
            let logged = restored.applied.saturating_sub(restored.committed);
            let bytes = usize::try_from(logged.saturating_mul(256)).unwrap_or(usize::MAX);
            r.since_snapshot = (logged, r.ring.bytes_after(restored.committed).max(bytes));
            if let Some(meta) = restored.meta {
                // The claim's view only: whoever made it, it may be gone, and views go on
                // above it.
                r.claim = (meta.claim.0, u16::MAX);
                // (`Meta::decode` refuses views above `MAX_STORED_VIEW` as corruption.)
                r.highest_view = meta
                    .highest_view
                    .max(meta.claim.0)
                    .max(meta.accepted_view)
                    .min(MAX_STORED_VIEW);
                r.accepted_view = meta.accepted_view;
                r.accepted_by = meta.accepted_by;
                r.role = Role::Starting {
                    waits: Waits {
                        must_hear: meta
                            .wait_for
                            .iter()
                            .copied()
                            .filter(|no| *no != me.no && *no <= n_trackers)
                            .collect(),
                        told: false,
                    },
                };
                r.meta = meta;
            }
            if r.applied > 0 || r.claim.0 > 0 {
                info!(
                    "recovered the state after entry {} (view {}); last served with trackers {:?}",
                    r.applied,
                    r.accepted_view,
                    r.role
                        .waits()
                        .map(|w| w.must_hear.clone())
                        .unwrap_or_default()
                );
            }
        }
        for no in 1..=n_trackers {
            if no != me.no {
                r.dial(no);
            }
        }
        r.decide(now);
        r
    }

    pub fn state(&self) -> &TrackerState {
        &self.state
    }

    pub fn me(&self) -> TrackerRef {
        self.me
    }

    /// Whether this tracker holds a state clients may be served from.
    pub fn is_serving(&self) -> bool {
        matches!(
            self.role,
            Role::Backup { .. } | Role::Taking { .. } | Role::Primary { .. }
        )
    }

    pub fn is_primary(&self) -> bool {
        self.role.is_primary()
    }

    /// A primary's or a takeover's data.
    fn lead(&self) -> Option<&Lead> {
        match &self.role {
            Role::Primary { lead } | Role::Taking { lead, .. } => Some(lead),
            _ => None,
        }
    }

    fn lead_mut(&mut self) -> Option<&mut Lead> {
        match &mut self.role {
            Role::Primary { lead } | Role::Taking { lead, .. } => Some(lead),
            _ => None,
        }
    }

    /// What a backup (or a tracker taking over) forwarded and has not seen applied.
    fn forwarded(&self) -> Option<&Forwarded> {
        match &self.role {
            Role::Backup { forwarded } | Role::Taking { forwarded, .. } => Some(forwarded),
            _ => None,
        }
    }

    fn forwarded_mut(&mut self) -> Option<&mut Forwarded> {
        match &mut self.role {
            Role::Backup { forwarded } | Role::Taking { forwarded, .. } => Some(forwarded),
            _ => None,
        }
    }

    /// The current view and its primary, if this tracker serves.
    pub fn view(&self) -> Option<(u64, u16)> {
        self.is_serving().then_some(self.claim)
    }

    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// The recent batches kept (for tests and logs).
    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// Batches a primary has in flight (sent, not yet committed).
    #[cfg(test)]
    pub(crate) fn in_flight_batches(&self) -> usize {
        self.lead().map_or(0, |lead| lead.in_flight.len())
    }

    /// Bounds the ring of recent batches anew (scenarios use small bounds).
    #[cfg(test)]
    pub(crate) fn bound_ring(&mut self, max_batches: usize, max_bytes: usize) {
        self.ring.set_bounds(max_batches, max_bytes);
    }

    /// Compacts the log after this many entries or bytes of entries (scenarios use few).
    #[cfg(test)]
    pub(crate) fn compact_after(&mut self, entries: u64, bytes: usize) {
        self.compact_at = (entries, bytes);
    }

    /// Chooses how joiners are caught up (scenarios force the suffix on small states).
    #[cfg(test)]
    pub(crate) fn set_catch_up(&mut self, rule: CatchUp) {
        self.catch_up = rule;
    }

    /// Names a change this tracker makes itself (a client gone, sessions expired) as a
    /// client's request is named: by this run (as the client id) and a counter. A copy
    /// forwarded twice (a resend over a replacing link, a re-forward to a new primary) is
    /// then recognised and applied once, as a client's retry is.
    pub fn internal_origin(&mut self) -> Origin {
        self.internal_req += 1;
        Origin {
            client: self.me.incarnation,
            req_id: self.internal_req,
        }
    }

    /// The latest time a handler was given.
    pub fn now(&self) -> Instant {
        self.now
    }

    pub fn committed(&self) -> u64 {
        self.committed
    }

    pub fn poll_output(&mut self) -> Option<ReplicaOut> {
        if self.out.is_empty() {
            // Whatever the handler changed of the view, the claim or the members is written
            // once it is done (the places that need it durable write it earlier).
            self.sync_meta();
            // A starting tracker tells the others whenever what it waits for changes.
            if !self.is_serving() && self.last_status != Some(self.status()) {
                self.broadcast_status();
            }
        }
        self.out.pop_front()
    }

    /// Every write up to number `upto` is durable.
    pub fn handle_durable(&mut self, upto: u64) {
        let upto = upto.min(self.written);
        if upto <= self.durable {
            return;
        }
        self.durable = upto;
        while let Some(&(w, seq)) = self.unsynced.front() {
            if w > upto {
                break;
            }
            self.durable_seq = seq;
            self.unsynced.pop_front();
        }
        self.send_ack(false);
        if self.role.is_primary() {
            self.try_commit();
            self.send_batch();
        }
    }

    /// Writes asked for so far and writes durable (for tests and logs).
    pub fn writes(&self) -> (u64, u64) {
        (self.written, self.durable)
    }

    /// Asks for a write; returns its number.
    fn write(&mut self, what: impl FnOnce() -> Persist) -> u64 {
        self.written += 1;
        if self.persistent {
            self.out.push_back(ReplicaOut::Persist(what()));
        } else {
            self.durable = self.written;
        }
        self.written
    }

    /// The trackers that may hold changes acknowledged after this one stops: a primary's
    /// members (and the trackers being given the state), a backup's primary. Kept as it was
    /// while this tracker finds out where the service stands.
    fn wait_set(&self) -> BTreeSet<u16> {
        match &self.role {
            Role::Primary { lead } => lead
                .members
                .iter()
                .chain(lead.joiners.keys())
                .copied()
                .collect(),
            Role::Backup { .. } => [self.claim.1].into_iter().collect(),
            _ => self.meta.wait_for.clone(),
        }
    }

    /// Writes the metadata if it changed.
    fn sync_meta(&mut self) {
        if !self.persistent {
            return;
        }
        let meta = Meta {
            claim: self.claim,
            accepted_view: self.accepted_view,
            accepted_by: self.accepted_by,
            highest_view: self.highest_view,
            wait_for: self.wait_set(),
        };
        if meta != self.meta {
            self.meta = meta.clone();
            self.meta_write = self.write(|| Persist::Meta(meta));
        }
    }

    /// Logs entries just applied at `first_seq..`, after the metadata; returns the number of
    /// the last write.
    fn log_entries(&mut self, first_seq: u64, entries: Arc<[Entry]>) -> u64 {
        self.sync_meta();
        if entries.is_empty() {
            return self.written;
        }
        let n = entries.len();
        let last = first_seq + n as u64 - 1;
        // Every path that applies entries logs them here, under the claim followed or led.
        // The ring and the write share the entries: no copy of the batch for either.
        let bytes = entries.iter().map(entry_size).sum();
        self.ring
            .push_shared(self.claim, first_seq, entries.clone(), bytes);
        let w = self.write(|| Persist::Entries { first_seq, entries });
        self.note_write(w, last);
        if self.persistent {
            self.since_snapshot.0 += n as u64;
            self.since_snapshot.1 += bytes;
        }
        w
    }

    /// Write `w` holds the entries up to `last`: durable now without a disk, else once the
    /// disk says so.
    fn note_write(&mut self, w: u64, last: u64) {
        if self.persistent {
            self.unsynced.push_back((w, last));
        } else {
            self.durable_seq = last;
        }
    }

    /// Logs the state installed after entry `seq` (encoded as `bytes`).
    fn log_install(&mut self, seq: u64, bytes: Vec<u8>) {
        self.since_snapshot = (0, 0);
        let w = self.write(|| Persist::Install { seq, state: bytes });
        self.note_write(w, seq);
    }

    /// A backup acknowledges to its primary what it holds durably (with the metadata that
    /// places it in the view), once: again only if `force` (the primary asked again).
    fn send_ack(&mut self, force: bool) {
        if !self.role.is_backup() {
            return;
        }
        if self.durable < self.meta_write {
            // Owed once the disk catches up.
            self.ack_owed |= force;
            return;
        }
        let seq = self.durable_seq.min(self.applied);
        let key = (self.claim, seq);
        if !force && !self.ack_owed && self.last_ack == Some(key) {
            return;
        }
        self.ack_owed = false;
        self.last_ack = Some(key);
        self.send_to(
            self.claim.1,
            ReplMsg::Ack {
                view: self.claim.0,
                seq,
            },
        );
    }

    /// Time has come to `now`. Every handler calls this first (the tracker core too, before
    /// it handles a client's frame). A gap of [`Timings::stall_limit`] since the last call
    /// means this tracker was stalled: the others may have declared it dead and moved on, so
    /// before it handles anything that arrived meanwhile it stops serving, drops its tracker
    /// links and finds out again who serves (see `on_stall`). Returns
    /// whether it was stalled.
    pub fn observe(&mut self, now: Instant) -> bool {
        let gap = now.saturating_duration_since(self.now);
        self.now = self.now.max(now);
        if self.n_trackers > 1 && gap >= self.t.stall_limit {
            self.on_stall(gap, now);
            return true;
        }
        false
    }

    /// This tracker's loop was away for `gap`. Whatever it was (primary, backup, joining), the
    /// others may have taken over without it, and what it holds may be behind the service or
    /// ahead of it with changes nobody acknowledged. So it serves nothing until it has linked
    /// again and learned the current view: it closes every tracker link (the far ends have
    /// closed theirs, or will see it gone and stop counting on it), forgets its members, and
    /// starts over as a starting tracker that keeps its state and its claim. Its clients'
    /// requests go with their links (the clients send them again); its own changes (a client
    /// gone) are ordered through whichever primary it then follows.
    fn on_stall(&mut self, gap: Duration, now: Instant) {
        warn!(
            "this tracker's loop was away for {gap:?} (stalled): re-linking and learning the current view before serving again"
        );
        // From here on this is a new run of the tracker, as if it had restarted with its
        // state: its links say so in their hello, and the sessions of its clients (which it
        // now drops) belong to the earlier run, so the primary gives them the grace period
        // to move (a client that comes back here resumes with its token) instead of ending
        // them at once.
        self.me.incarnation = self.me.incarnation.wrapping_add(1);
        self.own_runs.insert(self.me.incarnation);
        // As after a restart from disk: the trackers it served with may have gone on without
        // it and died since, holding the newest state; it must hear from them before it may
        // start the service with its own.
        let served_with = self.wait_set();
        let mut waits = self.role.take_waits();
        waits
            .must_hear
            .extend(served_with.into_iter().filter(|no| *no != self.me.no));
        waits.told = false;
        if self.is_serving() || matches!(self.role, Role::Joining { .. }) {
            self.stop_serving();
        }
        self.role = Role::Starting { waits };
        self.takeover_deadline = None;
        self.grace.clear();
        // The clients' requests it holds go: it drops their links, and each client sends its
        // requests in flight again wherever it reconnects. Handing them on late as well
        // could replay a login after the client logged in through another tracker (taking
        // its session back to this tracker's earlier run, where it then ends). Changes of
        // its own (a client gone) stay.
        let own = self.own_runs.clone();
        let internal = |e: &Entry| e.origin.is_none_or(|o| own.contains(&o.client));
        // (`stop_serving` moved what was forwarded into `held`; a starting tracker forwards
        // nothing.)
        self.held.retain(|e| internal(e));
        self.uncommitted.retain(|(_, e)| internal(e));
        let links: Vec<ConnId> = self.links.keys().copied().collect();
        for link in links {
            self.out.push_back(ReplicaOut::Close(link));
        }
        self.links.clear();
        self.peer_link.clear();
        self.dialing.clear();
        self.redial_at.clear();
        self.backoff.clear();
        self.started = now;
        for no in 1..=self.n_trackers {
            if no != self.me.no {
                self.unsure.insert(no);
                self.dial(no);
            }
        }
    }

    /// Dials tracker `no` now.
    fn dial(&mut self, no: u16) {
        if self.dialing.insert(no) {
            self.out.push_back(ReplicaOut::Dial(no));
        }
    }

    /// Tracker `no` has no link: dial it again after a backoff (doubling from
    /// [`REDIAL_FIRST`] to [`REDIAL_MAX`] while attempts fail). Of a pair, the lower-numbered
    /// tracker redials the higher one (which is dialed by every lower one when that starts,
    /// and redialed by it for life), so the two rarely open two links at once; the higher one
    /// redials a lower one only while that one accepts links without answering (a hung
    /// process, to learn when it answers or dies). Two links at once still happen (both
    /// dial when starting); one is then dropped, see `handle_hello` and `resync`.
    fn schedule_redial(&mut self, no: u16, now: Instant) {
        if (no < self.me.no && !self.unsure.contains(&no))
            || self.peer_link.contains_key(&no)
            || self.dialing.contains(&no)
            || self.redial_at.contains_key(&no)
        {
            return;
        }
        let wait = match self.backoff.get(&no) {
            _ if no < self.me.no => REDIAL_MAX,
            Some(last) => (*last * 2).min(REDIAL_MAX),
            None => REDIAL_FIRST,
        };
        self.backoff.insert(no, wait);
        self.redial_at.insert(no, now + wait);
    }

    /// A change a client of this tracker asked for (or one the tracker makes itself).
    pub fn submit(&mut self, entry: Entry) {
        match &mut self.role {
            Role::Primary { lead } => {
                lead.next.push_back(Queued { own: true, entry });
                self.send_batch();
            }
            Role::Backup { .. } => self.forward(entry),
            _ => self.held.push_back(entry),
        }
    }

    /// The driver connected a link to tracker `no` that we dialed (`opened`: see
    /// [`handle_accepted`](Self::handle_accepted)).
    pub fn handle_dialed(&mut self, link: ConnId, no: u16, opened: u64, now: Instant) {
        if self.observe(now) {
            // The dial was made before the stall: drop it and dial again.
            self.out.push_back(ReplicaOut::Close(link));
            return;
        }
        self.open_link(link, Some(no), opened, now);
        self.touch(link, now);
    }

    /// Dialing tracker `no` failed (it is not up).
    pub fn handle_dial_failed(&mut self, no: u16, now: Instant) {
        if self.observe(now) {
            return;
        }
        if self.dialing.remove(&no) {
            debug!("tracker {no} is not up");
        }
        self.unsure.remove(&no);
        self.schedule_redial(no, now);
        self.decide(now);
    }

    /// A link we dialed failed the service's handshake: the process there is not a tracker
    /// of this service. Like a refused dial, it holds nothing the service waits for; it is
    /// dialed again later (its key may be fixed).
    pub fn handle_foreign(&mut self, link: ConnId, now: Instant) {
        if self.observe(now) {
            return;
        }
        let Some(gone) = self.links.remove(&link) else {
            return;
        };
        if let Some(no) = gone.dialed {
            warn!("tracker {no}: does not hold this service's key; not linking");
            self.dialing.remove(&no);
            self.unsure.remove(&no);
            self.schedule_redial(no, now);
        }
        self.decide(now);
    }

    /// A link we accepted opened with a tracker's hello; `opened` orders the driver's
    /// connections by when they opened (a counter shared with `handle_dialed`).
    pub fn handle_accepted(&mut self, link: ConnId, peer: TrackerRef, opened: u64, now: Instant) {
        self.observe(now);
        self.open_link(link, None, opened, now);
        self.handle_hello(link, peer, now);
    }

    /// Records a new link (dialed to `dialed`, or accepted) and sends our hello and status.
    fn open_link(&mut self, link: ConnId, dialed: Option<u16>, opened: u64, now: Instant) {
        self.links.insert(
            link,
            Link {
                peer: None,
                dialed,
                opened,
                status: None,
                hello_status: self.status(),
                last_heard: now,
                last_sent: now,
                snapshot: Vec::new(),
                suffix: None,
            },
        );
        self.send(
            link,
            ReplMsg::Hello {
                version: PROTOCOL_VERSION,
                tracker: self.me,
            },
        );
        let status = self.status();
        self.send(link, ReplMsg::Status(status));
    }

    /// A tracker link is gone.
    pub fn handle_closed(&mut self, link: ConnId, now: Instant) {
        if self.observe(now) {
            return;
        }
        let Some(gone) = self.links.remove(&link) else {
            return;
        };
        // Whoever was at the other end may still be up, holding a state: find out (see
        // `unsure`).
        if let Some(no) = gone.peer.map(|p| p.no).or(gone.dialed) {
            // (A link of an earlier run, or a duplicate, says nothing of the one in use.)
            if self.peer_link.get(&no).is_none_or(|l| *l == link) {
                self.unsure.insert(no);
            }
        }
        if let Some(no) = gone.dialed {
            self.dialing.remove(&no);
            self.schedule_redial(no, now);
        }
        let Some(peer) = gone.peer else {
            if let Some(no) = gone.dialed.filter(|no| self.resync_pending.remove(no)) {
                // The link that was to replace a dropped duplicate closed too.
                info!("tracker {no}: link lost");
                self.peer_lost(no, now);
            }
            self.decide(now);
            return;
        };
        if self.peer_link.get(&peer.no) != Some(&link) {
            return;
        }
        self.peer_link.remove(&peer.no);
        let other = self
            .links
            .iter()
            .find(|(_, l)| l.peer == Some(peer) || (l.peer.is_none() && l.dialed == Some(peer.no)));
        if let Some((&other, l)) = other {
            // The far end dropped this link for another one between us (both dialed at
            // once): the tracker lives. Carry on over the other link once it said hello.
            debug!("tracker {}: link {link} dropped for {other}", peer.no);
            if l.peer == Some(peer) {
                self.unsure.remove(&peer.no);
                self.peer_link.insert(peer.no, other);
                self.resync(peer.no, now);
            } else {
                self.resync_pending.insert(peer.no);
            }
            return;
        }
        info!("tracker {}: link lost", peer.no);
        self.schedule_redial(peer.no, now);
        self.peer_lost(peer.no, now);
    }

    pub fn handle_msg(&mut self, link: ConnId, msg: ReplMsg, now: Instant) {
        if self.observe(now) {
            return;
        }
        let Some(l) = self.links.get_mut(&link) else {
            return;
        };
        l.last_heard = now;
        let from = l.peer;
        let Some(from) = from else {
            match msg {
                ReplMsg::Hello { version, tracker } if version == PROTOCOL_VERSION => {
                    self.handle_hello(link, tracker, now)
                }
                other => {
                    warn!("tracker link {link}: {other:?} before the hello");
                    self.close(link, now);
                }
            }
            return;
        };
        if self.peer_link.get(&from.no) != Some(&link) {
            // A duplicate link being closed.
            return;
        }
        let from = from.no;
        if let Some(view) = msg_views(&msg)
            .into_iter()
            .flatten()
            .find(|v| self.impossible_view(*v))
        {
            warn!(
                "tracker {from}: a message naming view {view}, far above any this tracker knows ({}); closing the link",
                self.highest_view
            );
            return self.close(link, now);
        }
        if let Some(view) = claim_view(&msg).filter(|v| *v > self.highest_view) {
            // A view a linked tracker claims or its state was accepted in may be one this
            // tracker never saw (claimed while it was away, or named by an old disk that
            // joins in a lower view): the next claim goes above it, after a restart too.
            self.raise_highest_view(view);
        }
        match msg {
            ReplMsg::Hello { .. } => {
                warn!("tracker {from}: second hello");
                self.close(link, now);
            }
            ReplMsg::Heartbeat => {}
            ReplMsg::Status(status) => self.on_status(link, from, status, now),
            ReplMsg::Forward { entries } => self.on_forward(entries),
            ReplMsg::Batch(batch) => self.on_batch(link, from, batch, now),
            ReplMsg::Ack { view, seq } => self.on_ack(from, view, seq),
            ReplMsg::Commit { view, seq } => {
                if view == self.claim.0 && from == self.claim.1 && seq > self.committed {
                    self.set_committed(seq.min(self.applied));
                }
            }
            ReplMsg::Takeover { view, applied } => self.on_takeover(link, from, view, applied, now),
            ReplMsg::TakeoverAck {
                view,
                serving,
                applied,
                catchup,
            } => self.on_takeover_ack(link, from, view, serving, applied, catchup, now),
            ReplMsg::JoinRequest(position) => self.on_join_request(from, position),
            ReplMsg::SnapshotPart { data } => {
                if let Some(l) = self.links.get_mut(&link) {
                    if (l.snapshot.len() + data.len()) as u64 > MAX_SNAPSHOT_LEN {
                        warn!("tracker {from}: snapshot too large");
                        self.close(link, now);
                    } else {
                        l.snapshot.extend_from_slice(&data);
                    }
                }
            }
            ReplMsg::Snapshot { view, seq, len } => {
                self.on_snapshot(link, from, view, seq, len, now)
            }
            ReplMsg::SuffixPart(part) => self.on_suffix_part(link, from, part, now),
            ReplMsg::Suffix { view, seq } => self.on_suffix(link, from, view, seq, now),
        }
    }

    /// Heartbeats, dead links, waits that ran out, sessions whose grace ended.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.observe(now) {
            return;
        }
        let due: Vec<u16> = self
            .redial_at
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(no, _)| *no)
            .collect();
        for no in due {
            self.redial_at.remove(&no);
            if !self.peer_link.contains_key(&no) {
                self.dial(no);
            }
        }
        let mut dead = Vec::new();
        let mut quiet = Vec::new();
        for (id, l) in &self.links {
            if now.saturating_duration_since(l.last_heard) >= self.t.peer_timeout {
                dead.push(*id);
            } else if now.saturating_duration_since(l.last_sent) >= self.t.heartbeat_every
                && l.peer.is_some()
            {
                quiet.push(*id);
            }
        }
        for id in dead {
            warn!(
                "tracker link {id}: silent for {:?}; closing",
                self.t.peer_timeout
            );
            self.close(id, now);
        }
        for id in quiet {
            self.send(id, ReplMsg::Heartbeat);
            self.touch(id, now);
        }
        if self.role.is_starting()
            && now.saturating_duration_since(self.started) >= self.t.discovery_timeout
        {
            // Dials still unresolved no longer hold a tracker that never held a state; one
            // that did waits for them (see `decide`).
            self.decide(now);
        }
        if self.takeover_deadline.is_some_and(|d| d <= now) {
            self.takeover_deadline = None;
            if self.role.is_backup() && !self.primary_linked() {
                warn!(
                    "no takeover came from tracker {}; taking over",
                    self.claim.1
                );
                self.take_over(now);
            }
        }
        if self.role.is_primary() {
            let expired: Vec<TrackerRef> = self
                .grace
                .iter()
                .filter(|(_, end)| **end <= now)
                .map(|(t, _)| *t)
                .collect();
            for tracker in expired {
                self.grace.remove(&tracker);
                info!(
                    "sessions of tracker {} (run {:x}) did not move in time; ending them",
                    tracker.no, tracker.incarnation
                );
                let origin = self.internal_origin();
                self.submit(Entry {
                    origin: Some(origin),
                    op: Op::ExpireSessions { tracker },
                });
            }
        }
    }

    /// When `handle_timeout` next has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut at = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        if self.n_trackers > 1 {
            // A steady tick, so that a long gap between two turns means a stall, never an
            // idle loop (see `observe`).
            at(self.now + self.t.heartbeat_every);
        }
        for at_time in self.redial_at.values() {
            at(*at_time);
        }
        for l in self.links.values() {
            at(l.last_heard + self.t.peer_timeout);
            if l.peer.is_some() {
                at(l.last_sent + self.t.heartbeat_every);
            }
        }
        // (Past the discovery time, a starting tracker that still waits for others decides
        // again on the tick.)
        let discovery_end = self.started + self.t.discovery_timeout;
        if self.role.is_starting() && discovery_end > self.now {
            at(discovery_end);
        }
        if let Some(d) = self.takeover_deadline {
            at(d);
        }
        if self.role.is_primary() {
            for end in self.grace.values() {
                at(*end);
            }
        }
        next
    }

    // ---- links ----

    fn send(&mut self, link: ConnId, msg: ReplMsg) {
        self.out.push_back(ReplicaOut::Send(link, msg));
    }

    fn touch(&mut self, link: ConnId, now: Instant) {
        if let Some(l) = self.links.get_mut(&link) {
            l.last_sent = now;
        }
    }

    fn send_to(&mut self, no: u16, msg: ReplMsg) {
        if let Some(link) = self.peer_link.get(&no).copied() {
            self.send(link, msg);
        }
    }

    /// Whether the tracker of the current claim is linked and has not restarted since (a
    /// restarted primary links again at once, but as a starting tracker).
    fn primary_linked(&self) -> bool {
        // (A primary whose link is being replaced by a duplicate one is still there.)
        self.resync_pending.contains(&self.claim.1)
            || self
                .peer_link
                .get(&self.claim.1)
                .and_then(|link| self.links.get(link))
                // (A link that said hello and not yet its status: the status follows at
                // once; until it comes, the primary there is taken as still serving.)
                .is_some_and(|l| matches!(l.status, None | Some(ReplStatus::Serving { .. })))
    }

    /// Whether a peer's message names a view no honest tracker of this service can have
    /// reached: above [`MAX_VIEW`], or more than [`VIEW_JUMP`] above both the highest view
    /// this tracker knows and `VIEW_JUMP` itself (every honest view is under it).
    fn impossible_view(&self, view: u64) -> bool {
        view > MAX_VIEW || view.saturating_sub(self.highest_view.max(VIEW_JUMP)) > VIEW_JUMP
    }

    /// Raises the highest view to `view`, heard from a linked tracker, and writes it at once:
    /// the metadata last written with only the highest view changed, so the claim and the
    /// accepted view on disk keep their own order of writes (the claim before the entries
    /// accepted under it), and a restart right after still claims above what it heard.
    fn raise_highest_view(&mut self, view: u64) {
        self.highest_view = view;
        if self.persistent && self.meta.highest_view < view {
            let meta = Meta {
                highest_view: view,
                ..self.meta.clone()
            };
            self.meta = meta.clone();
            self.meta_write = self.write(|| Persist::Meta(meta));
        }
    }

    /// Follows or makes `claim`. The highest view stays the highest ever named here, though
    /// the claim may go down (a void claim from an old disk, left for the live service's).
    fn set_claim(&mut self, claim: (u64, u16)) {
        self.highest_view = self.highest_view.max(claim.0);
        self.claim = claim;
    }

    /// Whether the tracker of the claim this tracker follows still stands for it: linked and
    /// saying it is primary of that view (or this tracker's own claim).
    fn claimant_live(&self) -> bool {
        let (view, primary) = self.claim;
        (primary == self.me.no && self.role.leads())
            || self.resync_pending.contains(&primary)
            || self
                .peer_link
                .get(&primary)
                .and_then(|link| self.links.get(link))
                .is_some_and(|l| l.status == Some(ReplStatus::Serving { view, primary }))
    }

    fn broadcast_status(&mut self) {
        let status = self.status();
        self.last_status = Some(status);
        let links: Vec<ConnId> = self.peer_link.values().copied().collect();
        for link in links {
            self.send(link, ReplMsg::Status(status));
        }
    }

    fn status(&self) -> ReplStatus {
        if self.is_serving() {
            ReplStatus::Serving {
                view: self.claim.0,
                primary: self.claim.1,
            }
        } else {
            ReplStatus::Starting {
                view: self.accepted_view,
                applied: self.applied,
                waiting: self
                    .role
                    .waits()
                    .into_iter()
                    .flat_map(|w| &w.must_hear)
                    .filter(|no| (1..=64).contains(*no))
                    .fold(0, |bits, no| bits | 1 << (no - 1)),
                founder: self.persistent && self.founder,
            }
        }
    }

    /// Closes a link as if it had failed.
    fn close(&mut self, link: ConnId, now: Instant) {
        self.out.push_back(ReplicaOut::Close(link));
        self.handle_closed(link, now);
    }

    fn handle_hello(&mut self, link: ConnId, peer: TrackerRef, now: Instant) {
        self.link_hello(link, peer, now);
        // A dial this tracker waited for may have resolved.
        self.decide(now);
    }

    fn link_hello(&mut self, link: ConnId, peer: TrackerRef, now: Instant) {
        let dialed = self.links.get(&link).and_then(|l| l.dialed);
        if peer.no == self.me.no || peer.no == 0 || peer.no > self.n_trackers {
            warn!(
                "tracker link {link}: hello from tracker {}, not a peer",
                peer.no
            );
            return self.close(link, now);
        }
        if dialed.is_some_and(|no| no != peer.no) {
            warn!("dialed tracker {dialed:?} but tracker {} answered", peer.no);
            return self.close(link, now);
        }
        if let Some(l) = self.links.get_mut(&link) {
            l.peer = Some(peer);
        }
        self.unsure.remove(&peer.no);
        if let Some(no) = dialed {
            self.dialing.remove(&no);
        }
        if let Some(old) = self.peer_link.get(&peer.no).copied() {
            let old_peer = self.links.get(&old).and_then(|l| l.peer);
            if old_peer.is_some_and(|p| p.incarnation == peer.incarnation) {
                // Both sides dialed: keep the link dialed by the lower-numbered tracker.
                let old_dialer = if self.links.get(&old).and_then(|l| l.dialed).is_some() {
                    self.me.no
                } else {
                    peer.no
                };
                let new_dialer = if dialed.is_some() {
                    self.me.no
                } else {
                    peer.no
                };
                let (keep, drop) = if new_dialer < old_dialer {
                    (link, old)
                } else {
                    (old, link)
                };
                debug!("tracker {}: two links; keeping {keep}", peer.no);
                self.peer_link.insert(peer.no, keep);
                self.links.remove(&drop);
                self.out.push_back(ReplicaOut::Close(drop));
                // What went out on the dropped link may be lost.
                self.resync(peer.no, now);
                return;
            }
            let old_opened = self.links.get(&old).map_or(0, |l| l.opened);
            let opened = self.links.get(&link).map_or(0, |l| l.opened);
            if opened < old_opened {
                // A late hello of an earlier run, on a link opened before the current one:
                // that run is gone.
                info!(
                    "tracker {}: hello of an earlier run; closing its link",
                    peer.no
                );
                self.links.remove(&link);
                self.out.push_back(ReplicaOut::Close(link));
                return;
            }
            // The tracker restarted: its old link is stale.
            info!("tracker {} restarted", peer.no);
            self.peer_link.remove(&peer.no);
            self.links.remove(&old);
            self.out.push_back(ReplicaOut::Close(old));
            self.peer_link.insert(peer.no, link);
            self.peer_lost(peer.no, now);
            return;
        }
        info!("tracker {} linked", peer.no);
        self.peer_link.insert(peer.no, link);
        // The status sent with this side's hello may be stale: it changed while the peer had
        // not answered (a frozen peer's link is open long before its hello), and
        // `broadcast_status` goes to linked peers only. Without it a peer may never learn a
        // higher claim (it took over the same view meanwhile and waits for an answer).
        let status = self.status();
        if self
            .links
            .get(&link)
            .is_some_and(|l| l.hello_status != status)
        {
            self.send(link, ReplMsg::Status(status));
        }
        if self.resync_pending.remove(&peer.no) {
            self.resync(peer.no, now);
        }
        self.backoff.remove(&peer.no);
        self.redial_at.remove(&peer.no);
    }

    /// The exchange with tracker `no` moved to another link (two were open; one was dropped)
    /// and what went out on the dropped one may be lost. Every message of the protocol is
    /// safe to repeat, so each side repeats what the other may still be waiting for: its
    /// status, a request for the state, the batches in flight (and the last commit), the
    /// takeover in progress, the changes forwarded and the acknowledgement of what it applied.
    fn resync(&mut self, no: u16, now: Instant) {
        self.resync_pending.remove(&no);
        let Some(link) = self.peer_link.get(&no).copied() else {
            return;
        };
        let status = self.status();
        self.send(link, ReplMsg::Status(status));
        match &self.role {
            Role::Joining { primary, .. } if *primary == no => {
                let position = self.position();
                self.send(link, ReplMsg::JoinRequest(position))
            }
            Role::Primary { lead } if lead.rejoining.contains_key(&no) => {
                let after = lead.rejoining.get(&no).copied().unwrap_or(0);
                self.send_rejoin(no, after);
            }
            Role::Primary { lead } if lead.members.contains(&no) => {
                // The batches in flight, and the commit that may have been lost (the
                // member's clients wait for it).
                if !lead.in_flight.is_empty() {
                    let committed = self.committed;
                    self.send_entries_after(no, committed);
                }
                self.send(
                    link,
                    ReplMsg::Commit {
                        view: self.claim.0,
                        seq: self.committed,
                    },
                );
            }
            Role::Taking { waiting, .. } if waiting.contains(&no) => self.send(
                link,
                ReplMsg::Takeover {
                    view: self.claim.0,
                    applied: self.applied,
                },
            ),
            Role::Backup { .. } if self.claim.1 == no => {
                self.send_ack(true);
                self.reforward();
            }
            _ => {}
        }
        self.touch(link, now);
    }

    /// Tracker `no` is gone (dead, or restarted and about to rejoin).
    fn peer_lost(&mut self, no: u16, now: Instant) {
        if let Some(lead) = self.lead_mut() {
            lead.joiners.remove(&no);
            lead.rejoining.remove(&no);
            if lead.members.remove(&no) {
                info!("tracker {no} left the members");
            }
            for f in &mut lead.in_flight {
                f.waiting.remove(&no);
            }
        }
        match &mut self.role {
            Role::Primary { .. } => {
                self.try_commit();
                // The batches in flight may have waited only for `no`: the next ones go now.
                self.send_batch();
                self.scan_grace(now);
            }
            Role::Taking { waiting, .. } => {
                // An offer from `no` stays usable: its catch-up arrived with it.
                waiting.remove(&no);
                self.finish_takeover(now);
            }
            Role::Backup { .. } if no == self.claim.1 => {
                info!("primary (tracker {no}) lost");
                self.elect(now);
            }
            Role::Backup { .. } => {
                // The tracker this backup waits for as the next primary may be the one lost.
                if !self.primary_linked() {
                    self.elect(now);
                }
            }
            Role::Joining { primary, waits } if *primary == no => {
                let waits = std::mem::take(waits);
                self.role = Role::Starting { waits };
                // Find out again who is up: the trackers that held the service's state may
                // not have said so yet (see `decide`).
                self.started = now;
                self.decide(now);
            }
            Role::Joining { .. } | Role::Starting { .. } => self.decide(now),
        }
    }

    fn on_status(&mut self, link: ConnId, from: u16, status: ReplStatus, now: Instant) {
        if let Some(l) = self.links.get_mut(&link) {
            l.status = Some(status);
        }
        // Who may hold a state further on than this one's, and must be heard before this
        // tracker starts the service with its own: a tracker further on (if it dies before
        // it starts the service, its changes may still have been acknowledged), one serving
        // in a later view than this tracker's state, and whoever a starting tracker says it
        // waits for (it knows of a tracker further on than itself, maybe than this one too).
        // The set only grows until this tracker serves; `decide` waits while a tracker of it
        // is not linked and heard from.
        let mine = (self.accepted_view, self.applied);
        let (n, me) = (self.n_trackers.min(64), self.me.no);
        if let Some(waits) = self.role.waits_mut().filter(|_| self.persistent) {
            match status {
                ReplStatus::Starting {
                    view,
                    applied,
                    waiting,
                    ..
                } => {
                    if (view, applied) > mine {
                        waits.must_hear.insert(from);
                    }
                    for no in (1..=n).filter(|no| waiting & (1 << (no - 1)) != 0) {
                        if no != me {
                            waits.must_hear.insert(no);
                        }
                    }
                }
                ReplStatus::Serving { view, .. } => {
                    if view > mine.0 {
                        waits.must_hear.insert(from);
                    }
                }
            }
        }
        if let ReplStatus::Serving { view, primary } = status {
            if primary == from && beats((view, primary), self.claim) {
                // A primary whose takeover did not include this tracker: its state may be
                // ahead of ours, so take its state.
                info!("tracker {from} is primary of view {view}; taking its state");
                if self.is_serving() {
                    self.stop_serving();
                }
                self.set_claim((view, primary));
                self.join(primary);
                return;
            }
        }
        if matches!(
            (&self.role, status),
            (Role::Joining { primary, .. }, ReplStatus::Starting { .. }) if *primary == from
        ) {
            // The primary this tracker asked for the state stalled and starts over (it will
            // not answer a join request): waiting for it would wait for ever when it waits in
            // turn for this tracker to start the service (as far on, a lower number; seed
            // 35001715). This tracker decides again, as a starting tracker.
            info!("tracker {from}, whose state this tracker asked for, is starting over");
            let waits = self.role.take_waits();
            self.role = Role::Starting { waits };
        }
        match self.role {
            Role::Starting { .. } => self.decide(now),
            Role::Backup { .. } if !self.primary_linked() => self.elect(now),
            _ => {}
        }
    }

    // ---- starting and joining ----

    /// A starting tracker decides, once it knows who is up, whether to join a primary, wait,
    /// or become primary itself.
    fn decide(&mut self, now: Instant) {
        if !self.role.is_starting() {
            return;
        }
        if !self.persistent {
            // Without disks a tracker that is down holds nothing: nobody is waited for.
            if let Some(waits) = self.role.waits_mut() {
                waits.must_hear.clear();
            }
        }
        let mut unknown = false;
        let mut primaries = Vec::new();
        let mut serving = false;
        let mut ahead_starting = false;
        let mut any_starting = false;
        let mine = (self.accepted_view, self.applied);
        // Among trackers with no state, only the founder may start the service: the others
        // wait for it, whatever their numbers.
        let founding = self.persistent && self.founder && mine == (0, 0);
        for (no, link) in &self.peer_link {
            match self.links.get(link).and_then(|l| l.status) {
                None => unknown = true,
                Some(ReplStatus::Serving { view, primary }) => {
                    serving = true;
                    if primary == *no {
                        primaries.push((view, primary));
                    }
                }
                Some(ReplStatus::Starting { view, applied, .. }) => {
                    any_starting = true;
                    let theirs = (view, applied);
                    ahead_starting |=
                        theirs > mine || (theirs == mine && *no < self.me.no && !founding);
                }
            }
        }
        let discovering = now.saturating_duration_since(self.started) < self.t.discovery_timeout;
        if discovering && (unknown || !self.dialing.is_empty()) {
            return;
        }
        if let Some(best) = primaries
            .into_iter()
            .reduce(|a, b| if beats(b, a) { b } else { a })
        {
            // A claim whose tracker no longer stands for it (it died or restarted during its
            // takeover) is void, even against a lower claim of the same view.
            if beats(best, self.claim) || !self.claimant_live() {
                self.set_claim(best);
            }
            if best == self.claim {
                self.join(best.1);
            }
            return;
        }
        if serving || ahead_starting {
            // A takeover is under way, or a starting tracker whose state is further on (or as
            // far, with a lower number) will start the service.
            return;
        }
        let holds_history = self.claim.0 > 0 || self.applied > 0;
        if unknown || !self.unsure.is_empty() || (holds_history && !self.dialing.is_empty()) {
            // A tracker that accepts links but has not said where it stands (a hung or frozen
            // process) may hold changes the service acknowledged after this tracker last saw
            // it: starting the service without it could make an older state current (an
            // empty one, for a tracker that never held one). Wait for it to answer, or to be
            // gone (a refused dial), however long that takes.
            debug!(
                "not starting the service: waiting for trackers {:?} to answer",
                self.unsure.iter().chain(&self.dialing).collect::<Vec<_>>()
            );
            return;
        }
        let unheard: Vec<u16> = self
            .role
            .waits()
            .into_iter()
            .flat_map(|w| w.must_hear.iter().copied())
            .filter(|no| {
                self.peer_link
                    .get(no)
                    .and_then(|link| self.links.get(link))
                    .is_none_or(|l| l.status.is_none())
            })
            .collect();
        if !unheard.is_empty() {
            // These may have acknowledged changes after this tracker's state (its disk says
            // it last served with them, or a tracker said it was further on or waits for
            // them): starting with its state could lose those. It waits for them to be up
            // and say where they stand, however long that takes.
            if !self
                .role
                .waits_mut()
                .is_some_and(|w| std::mem::replace(&mut w.told, true))
            {
                warn!(
                    "not starting the service with this tracker's state (entry {}) until trackers {unheard:?}, which may hold newer changes, are up",
                    self.applied
                );
            }
            return;
        }
        // (A claim seen is no state: a tracker that saw the founder serve but never took
        // its state holds nothing the service acknowledged.)
        let holds_state = self.accepted_view > 0 || self.applied > 0;
        let may_start_empty = self.founder || (self.me.no == 1 && self.all_others_empty());
        if !holds_state && !may_start_empty {
            if !self
                .role
                .waits_mut()
                .is_some_and(|w| std::mem::replace(&mut w.told, true))
            {
                warn!(
                    "this tracker holds no state and did not found the service: waiting for a tracker of the service to serve, to join it"
                );
            }
            return;
        }
        if discovering && any_starting && self.claim.0 > 0 {
            // A service ran (this tracker was joining it) and its primary is gone: a tracker
            // said to be starting may in fact hold the state by now (its status is on the
            // way), so starting a service with ours could lose the service's changes. Wait
            // for the others until the discovery time is over.
            return;
        }
        let Some(mut view) = next_view(self.highest_view) else {
            error!("view numbers are exhausted; this tracker cannot start the service");
            return;
        };
        if !holds_state && !self.founder {
            // A new life of the service (every tracker empty, none its founder): disks of its
            // earlier life may come back, holding entries under that life's claims, which
            // began at view 1 too. A joiner is sent only a suffix when its last entry was
            // applied under the primary's claim, so this life's claims must not repeat
            // those: it starts at a view drawn from this run's random incarnation (below
            // 2^40, far under `MAX_VIEW`), not at 1.
            view = view.max(1 + self.me.incarnation % (1 << 40));
        }
        info!(
            "no other tracker serves: starting the service as primary of view {view} with the state held ({} entries)",
            self.applied
        );
        self.set_claim((view, self.me.no));
        self.become_primary(now);
    }

    /// Every other tracker of the file is up and has said it holds no state and is not the
    /// founder (a single tracker has no others). Then, if this one holds none either, no
    /// tracker anywhere holds a state of the service, so none can be lost by starting an
    /// empty one, and tracker 1 does. This is how a service whose every data directory was
    /// removed (or given anew with `--data-dir`) starts again, though the founder marker
    /// beside the service key names a data directory that is gone. The statuses read here
    /// cannot be stale in a way that matters: a tracker without state that is not the
    /// founder gains one only by joining a serving tracker, and with no founder up only
    /// tracker 1 can start one. While any tracker is down, holds a state or is the founder,
    /// only the founder may start an empty service.
    fn all_others_empty(&self) -> bool {
        if !self.persistent {
            return false;
        }
        (2..=self.n_trackers).all(|no| {
            self.peer_link
                .get(&no)
                .and_then(|link| self.links.get(link))
                .and_then(|l| l.status)
                .is_some_and(|status| {
                    matches!(
                        status,
                        ReplStatus::Starting {
                            view: 0,
                            applied: 0,
                            founder: false,
                            ..
                        }
                    )
                })
        })
    }

    fn join(&mut self, primary: u16) {
        let waits = self.role.take_waits();
        if !self.peer_link.contains_key(&primary) {
            self.role = Role::Starting { waits };
            return;
        }
        // Asked again even when already joining it: the first request may have reached it
        // before it served (it ignores requests then), and asking twice is harmless (a
        // second state is ignored).
        info!("asking tracker {primary} for the state");
        self.role = Role::Joining { primary, waits };
        if let Some(link) = self.peer_link.get(&primary).copied() {
            if let Some(l) = self.links.get_mut(&link) {
                l.snapshot.clear();
                l.suffix = None;
            }
        }
        let position = self.position();
        self.send_to(primary, ReplMsg::JoinRequest(position));
    }

    /// Where this tracker's state stands, for a primary that may send it only the entries it
    /// lacks: none for an empty state (a snapshot is the compact form of a whole history) or
    /// one whose history is not known.
    fn position(&self) -> Option<JoinPosition> {
        (self.applied > 0 && self.accepted_by != 0).then_some(JoinPosition {
            applied: self.applied,
            view: self.accepted_view,
            primary: self.accepted_by,
        })
    }

    fn stop_serving(&mut self) {
        // The role's data goes with it: the members, joiners, batches in flight and offer are
        // dropped, the changes waiting or forwarded are held for the next primary.
        let (lead, forwarded) = match std::mem::replace(&mut self.role, Role::starting()) {
            Role::Primary { lead } => (Some(lead), None),
            Role::Taking {
                lead, forwarded, ..
            } => (Some(lead), Some(forwarded)),
            Role::Backup { forwarded } => (None, Some(forwarded)),
            Role::Starting { .. } | Role::Joining { .. } => (None, None),
        };
        if let Some(mut lead) = lead {
            // The batches in flight were never committed: a state this tracker takes from the
            // next primary may lack them, and then its own changes must be ordered again.
            let committed = self.committed;
            let lost = std::mem::take(&mut self.own_in_flight)
                .into_iter()
                .filter(|(seq, _)| *seq > committed);
            self.uncommitted.extend(lost);
            // Our unordered changes go to the new primary once we follow it.
            while let Some(q) = lead.next.pop_back() {
                if q.own {
                    self.held.push_front(q.entry);
                }
            }
        }
        if let Some(mut forwarded) = forwarded.map(|f| f.entries) {
            while let Some(e) = forwarded.pop_back() {
                self.held.push_front(e);
            }
        }
        self.out.push_back(ReplicaOut::Serving(false));
    }

    fn on_join_request(&mut self, from: u16, position: Option<JoinPosition>) {
        let Some(lead) = self.lead_mut() else {
            debug!("tracker {from} asked for the state, but this tracker is not primary");
            return;
        };
        lead.members.remove(&from);
        lead.rejoining.remove(&from);
        for f in &mut lead.in_flight {
            f.waiting.remove(&from);
        }
        lead.joiners.insert(from, position);
        if self.role.is_primary() {
            self.try_commit();
            self.send_batch();
        }
    }

    /// Sends a joiner what it lacks: the entries after its position when this tracker holds
    /// them and can prove the joiner's entries are its own (the joiner's last entry was
    /// applied here under the claim the joiner names: both are prefixes of that claim's
    /// sequence), and they are smaller than the state ([`CatchUp`]), else the whole state.
    /// Never a suffix over entries of another history, such as a batch the joiner applied
    /// in an older view that was never committed.
    fn send_state(&mut self, to: u16, position: Option<JoinPosition>) {
        let proven = position.filter(|p| {
            p.applied <= self.applied
                && self.ring.last_seq() == self.applied
                && self.ring.proves(p.applied, (p.view, p.primary))
        });
        // The state is sent instead when it is the smaller of the two (see `CatchUp`).
        let larger = proven.filter(|p| {
            let suffix = self.ring.bytes_after(p.applied);
            self.catch_up == CatchUp::BySize && suffix > 0 && suffix >= self.state.size()
        });
        if let Some(p) = larger {
            info!(
                "tracker {to} lacks entries {}..={} (about {} bytes), no fewer than the \
                 state's (about {} bytes): sending the state",
                p.applied + 1,
                self.applied,
                self.ring.bytes_after(p.applied),
                self.state.size()
            );
            return self.send_snapshot(to);
        }
        let parts = proven.and_then(|p| {
            Some((
                p,
                self.ring
                    .suffix(p.applied, MAX_BATCH_ENTRIES, MAX_BATCH_BYTES)?,
            ))
        });
        let Some((p, parts)) = parts else {
            if let Some(p) = position {
                debug!(
                    "tracker {to} is at entry {} of view {} (tracker {}): not in the recent batches; sending the state",
                    p.applied, p.view, p.primary
                );
            }
            return self.send_snapshot(to);
        };
        let view = self.claim.0;
        let n_parts = parts.len();
        for (first_seq, entries) in parts {
            self.send_to(
                to,
                ReplMsg::SuffixPart(Batch {
                    view,
                    first_seq,
                    entries,
                }),
            );
        }
        info!(
            "sent tracker {to} the entries after {} up to {} ({n_parts} parts, about {} bytes) \
             instead of the state (about {} bytes)",
            p.applied,
            self.applied,
            self.ring.bytes_after(p.applied),
            self.state.size()
        );
        self.send_to(
            to,
            ReplMsg::Suffix {
                view,
                seq: self.applied,
            },
        );
    }

    /// Sends the state to one tracker, as snapshot parts and a closing message.
    fn send_snapshot(&mut self, to: u16) {
        let len = self.send_snapshot_parts(to);
        info!(
            "sent the state after entry {} ({len} bytes) to tracker {to}",
            self.applied
        );
        self.send_to(
            to,
            ReplMsg::Snapshot {
                view: self.claim.0,
                seq: self.applied,
                len,
            },
        );
    }

    /// Sends the state to one tracker as snapshot parts only; returns its length. A tracker
    /// answering a takeover sends these before its `TakeoverAck` (which says what they are):
    /// a closing `Snapshot` would make the taker consume the parts as a joiner's state
    /// (`on_snapshot`), and ignore them, before the answer that needs them arrives.
    fn send_snapshot_parts(&mut self, to: u16) -> u64 {
        let mut bytes = Vec::new();
        self.state.encode_snapshot(&mut bytes);
        for part in bytes.chunks(SNAPSHOT_PART_LEN) {
            self.send_to(
                to,
                ReplMsg::SnapshotPart {
                    data: part.to_vec(),
                },
            );
        }
        bytes.len() as u64
    }

    fn on_snapshot(
        &mut self,
        link: ConnId,
        from: u16,
        view: u64,
        seq: u64,
        len: u64,
        now: Instant,
    ) {
        let bytes = match self.links.get_mut(&link) {
            Some(l) => std::mem::take(&mut l.snapshot),
            None => return,
        };
        if !matches!(self.role, Role::Joining { primary, .. } if primary == from)
            || view < self.claim.0
        {
            debug!("ignoring a snapshot from tracker {from}");
            return;
        }
        if bytes.len() as u64 != len {
            warn!(
                "tracker {from}: snapshot of {} bytes, announced {len}",
                bytes.len()
            );
            return self.close(link, now);
        }
        let state = match TrackerState::decode_snapshot(&bytes) {
            Ok(s) => s,
            Err(e) => {
                error!("tracker {from}: bad snapshot: {e}");
                return self.close(link, now);
            }
        };
        // The metadata naming the primary is written before the state: a restart that finds
        // the new state on disk must also find whom to wait for (the primary, which may go on
        // acknowledging changes). The state's view is written after the state, so a restart
        // that finds only the metadata does not take its old state for the new one.
        self.set_claim((view, from));
        self.role = Role::backup();
        self.accepted_by = 0;
        self.sync_meta();
        self.install(state, seq, bytes, (view, from));
        self.accepted_view = view;
        self.accepted_by = from;
        info!("caught up from tracker {from} at entry {seq} ({len} bytes); serving in view {view}");
        self.out.push_back(ReplicaOut::Serving(true));
        self.sync_meta();
        self.send_ack(true);
        self.broadcast_status();
        self.release_held();
    }

    /// Replaces the state by `state`, after entry `seq`, taken from the primary of `claim`.
    fn on_suffix_part(&mut self, link: ConnId, from: u16, part: Batch, now: Instant) {
        let Some(l) = self.links.get_mut(&link) else {
            return;
        };
        let bytes: usize = part.entries.iter().map(entry_size).sum();
        let fits = match &mut l.suffix {
            None => {
                l.suffix = Some((part.first_seq, part.entries, bytes));
                true
            }
            Some((first, entries, held)) => {
                // Parts are consecutive, and no more than a ring holds (the sender's bound).
                let ok = *first + entries.len() as u64 == part.first_seq
                    && *held + bytes <= RING_MAX_BYTES;
                if ok {
                    entries.extend(part.entries);
                    *held += bytes;
                }
                ok
            }
        };
        if !fits {
            warn!("tracker {from}: suffix parts out of order or too large");
            self.close(link, now);
        }
    }

    /// The suffix is complete: if it continues this tracker's state, it is applied and
    /// written like a batch, and this tracker serves as a backup of `from`.
    fn on_suffix(&mut self, link: ConnId, from: u16, view: u64, seq: u64, now: Instant) {
        let (first_seq, entries) = match self.links.get_mut(&link) {
            Some(l) => match l.suffix.take() {
                Some((first, entries, _)) => (first, entries),
                None => (seq + 1, Vec::new()),
            },
            None => return,
        };
        if !matches!(self.role, Role::Joining { primary, .. } if primary == from)
            || view < self.claim.0
        {
            debug!("ignoring a suffix from tracker {from}");
            return;
        }
        if first_seq != self.applied + 1 || first_seq + entries.len() as u64 != seq + 1 {
            // Sent for another position than this tracker's (it cannot have changed while
            // joining, so this is a peer's bug): ask again.
            warn!(
                "tracker {from}: a suffix of entries {first_seq}..={seq}, but this tracker has applied up to {}; asking again",
                self.applied
            );
            return self.join(from);
        }
        // As for a snapshot, the metadata naming the primary goes first; the claim the state
        // was accepted under is unknown on disk until the entries are written (the entries
        // after the old position are of the new claim's history, not the old one's).
        self.set_claim((view, from));
        self.role = Role::backup();
        self.accepted_by = 0;
        self.sync_meta();
        for e in &entries {
            self.apply(e);
        }
        let n_entries = entries.len();
        self.log_entries(first_seq, entries.into());
        // The primary sends what it holds between two batches: committed, as a snapshot is.
        if seq > self.committed {
            self.set_committed(seq);
        }
        self.accepted_view = view;
        self.accepted_by = from;
        info!(
            "caught up from tracker {from} with {n_entries} entries up to {seq}; serving in view {view}"
        );
        self.out.push_back(ReplicaOut::Serving(true));
        self.sync_meta();
        self.send_ack(true);
        self.broadcast_status();
        self.release_held();
        self.touch(link, now);
    }

    fn install(&mut self, state: TrackerState, seq: u64, bytes: Vec<u8>, claim: Claim) {
        // Until the caller records the claim the new state was accepted under, the disk must
        // not say that the old claim's history holds it.
        self.accepted_by = 0;
        self.sync_meta();
        self.log_install(seq, bytes);
        self.ring.reset(seq, Some(claim));
        self.state = state;
        self.applied = seq;
        self.committed = seq;
        // Changes applied here without a commit may be missing from the new state: those it
        // does not remember are held to be ordered again (a change with a client id is never
        // applied twice; one without is taken as included when the state reaches past it).
        let uncommitted = std::mem::take(&mut self.uncommitted);
        let mut again: Vec<Entry> = uncommitted
            .into_iter()
            .filter(|(s, e)| match e.origin {
                Some(origin) => self.state.remembered(origin).is_none(),
                None => *s > seq,
            })
            .map(|(_, e)| e)
            .collect();
        if !again.is_empty() {
            info!(
                "{} changes applied before are not in the state taken; ordering them again",
                again.len()
            );
        }
        while let Some(e) = again.pop() {
            self.held.push_front(e);
        }
        self.out.push_back(ReplicaOut::StateReplaced(seq));
    }

    /// Sends what was held while no primary was known.
    fn release_held(&mut self) {
        while let Some(e) = self.held.pop_front() {
            match &mut self.role {
                Role::Primary { lead } => lead.next.push_back(Queued {
                    own: true,
                    entry: e,
                }),
                Role::Backup { .. } => self.forward(e),
                _ => {
                    self.held.push_front(e);
                    return;
                }
            }
        }
        if self.role.is_primary() {
            self.send_batch();
        }
    }

    /// A backup sends `entry` to its primary and keeps it until it sees it applied.
    fn forward(&mut self, entry: Entry) {
        self.send_to(
            self.claim.1,
            ReplMsg::Forward {
                entries: vec![entry.clone()],
            },
        );
        if let Some(forwarded) = self.forwarded_mut() {
            forwarded.push_back(entry);
        }
    }

    /// `entry` was applied: it is no longer waiting to be. Returns the forwarded copy, if it
    /// was forwarded.
    fn unforward(&mut self, entry: &Entry) -> Option<Entry> {
        self.forwarded_mut().and_then(|f| f.remove(entry))
    }

    /// Forwards again everything not seen applied (to a new primary).
    fn reforward(&mut self) {
        let Some(forwarded) = self.forwarded().filter(|f| !f.entries.is_empty()) else {
            return;
        };
        let entries: Vec<Entry> = forwarded.entries.iter().cloned().collect();
        debug!("forwarding {} changes again", entries.len());
        self.send_to(self.claim.1, ReplMsg::Forward { entries });
    }

    // ---- ordering ----

    fn on_forward(&mut self, entries: Vec<Entry>) {
        match self.lead_mut() {
            Some(lead) => {
                lead.next.extend(
                    entries
                        .into_iter()
                        .map(|entry| Queued { own: false, entry }),
                );
                self.send_batch();
            }
            None => {
                // Not (or no longer) the primary. The sender keeps what it forwarded until it
                // sees it applied and sends it again to the primary it finds next: keeping a
                // copy here too would have it ordered twice (changes without a client id,
                // such as `ClientGone`, are not recognised as repeats).
                debug!(
                    "dropping {} changes forwarded to a tracker that is not primary",
                    entries.len()
                );
            }
        }
    }

    /// Every entry up to `seq` is held by every live member.
    fn set_committed(&mut self, seq: u64) {
        self.committed = seq;
        while self.uncommitted.front().is_some_and(|(s, _)| *s <= seq) {
            self.uncommitted.pop_front();
        }
        self.out.push_back(ReplicaOut::Committed(seq));
        if self.applied == seq && self.compaction_due() {
            // The log since the last snapshot is long: a snapshot of the state (which holds
            // only committed entries here) lets the disk thread drop it.
            self.since_snapshot = (0, 0);
            let mut bytes = Vec::new();
            self.state.encode_snapshot(&mut bytes);
            debug!(
                "snapshot of the state after entry {seq} ({} bytes)",
                bytes.len()
            );
            self.write(|| Persist::Compact { seq, state: bytes });
        }
    }

    /// Whether the log since the last snapshot is long enough to compact. A snapshot holds
    /// committed entries only, so it is taken when every entry applied is committed: a
    /// primary with batches in flight starts no new one meanwhile (see `send_batch`).
    fn compaction_due(&self) -> bool {
        self.persistent
            && (self.since_snapshot.0 >= self.compact_at.0
                || self.since_snapshot.1 >= self.compact_at.1)
    }

    /// Applies one entry at the next sequence number.
    fn apply(&mut self, entry: &Entry) {
        let answer = self.state.apply_entry(entry);
        self.applied += 1;
        // The copy kept while it was forwarded is the one kept until it commits (no other).
        if let Some(own) = self.unforward(entry) {
            self.uncommitted.push_back((self.applied, own));
        }
        self.out.push_back(ReplicaOut::Applied {
            seq: self.applied,
            origin: entry.origin,
            answer,
        });
    }

    /// Whether the primary may start another batch now: fewer than [`MAX_IN_FLIGHT`] are in
    /// flight and [`MAX_IN_FLIGHT_BYTES`] not reached; its own write of the newest batch is
    /// durable (so a batch holds every change that came while the disk was busy with the one
    /// before, one batch per fsync); no joiner is waiting (joiners are given the state between
    /// committed batches: the pipeline drains for them); and no compaction waits for the
    /// batches in flight to commit.
    fn may_start_batch(&self) -> bool {
        let Some(lead) = self.lead() else {
            return false;
        };
        let Some(newest) = lead.in_flight.back() else {
            return lead.joiners.is_empty();
        };
        lead.in_flight.len() < MAX_IN_FLIGHT
            && lead.in_flight_bytes() < MAX_IN_FLIGHT_BYTES
            && self.durable >= newest.write
            && lead.joiners.is_empty()
            && !self.compaction_due()
    }

    /// Primary: gives waiting joiners the state once no batch is in flight, and orders the
    /// waiting changes into batches while [`may_start_batch`](Self::may_start_batch).
    fn send_batch(&mut self) {
        let now = self.now;
        if !self.role.is_primary() {
            return;
        }
        loop {
            if self
                .lead()
                .is_some_and(|lead| lead.in_flight.is_empty() && !lead.joiners.is_empty())
            {
                // A joiner may hold acknowledged changes no other tracker holds once it
                // serves (if this one then dies): this tracker's disk must name it before it
                // gets the state, so that this tracker, restarted, waits for it.
                self.sync_meta();
                if self.durable >= self.meta_write {
                    let joiners = self
                        .lead_mut()
                        .map(|lead| std::mem::take(&mut lead.joiners))
                        .unwrap_or_default();
                    for (j, position) in joiners {
                        if self.peer_link.contains_key(&j) {
                            self.send_state(j, position);
                            if let Some(lead) = self.lead_mut() {
                                lead.members.insert(j);
                            }
                        }
                    }
                }
            }
            if !self.may_start_batch() {
                return;
            }
            let first_seq = self.applied + 1;
            let Some(lead) = self.lead_mut().filter(|lead| !lead.next.is_empty()) else {
                return;
            };
            let mut entries = Vec::new();
            let mut own = Vec::new();
            let mut bytes = 0;
            while let Some(q) = lead.next.front() {
                let size = entry_size(&q.entry);
                if !entries.is_empty()
                    && (entries.len() >= MAX_BATCH_ENTRIES || bytes + size > MAX_BATCH_BYTES)
                {
                    break;
                }
                bytes += size;
                if let Some(q) = lead.next.pop_front() {
                    if q.own {
                        own.push((first_seq + entries.len() as u64, q.entry.clone()));
                    }
                    entries.push(q.entry);
                }
            }
            // Own changes of batches committed since are no longer at risk.
            let committed = self.committed;
            self.own_in_flight.retain(|(seq, _)| *seq > committed);
            self.own_in_flight.extend(own);
            let mut moved_sessions = false;
            for e in &entries {
                self.apply(e);
                moved_sessions |= matches!(
                    e.op,
                    Op::OpenSession { tracker, .. } | Op::ResumeSession { tracker, .. }
                        if tracker != self.me
                );
            }
            if moved_sessions {
                // A session arrived from a tracker that may have died since.
                self.scan_grace(now);
            }
            let entries: Arc<[Entry]> = entries.into();
            let write = self.log_entries(first_seq, entries.clone());
            let members = self.members();
            for m in &members {
                let batch = Batch {
                    view: self.claim.0,
                    first_seq,
                    entries: entries.to_vec(),
                };
                self.send_to(*m, ReplMsg::Batch(batch));
            }
            let last_seq = self.applied;
            if let Some(lead) = self.lead_mut() {
                lead.in_flight.push_back(InFlight {
                    last_seq,
                    waiting: members.into_iter().collect(),
                    write,
                    bytes,
                });
            }
            self.try_commit();
        }
    }

    /// A primary's (or a takeover's) members, in order; none in other roles.
    fn members(&self) -> Vec<u16> {
        self.lead()
            .map(|lead| lead.members.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Primary: commits the batches in flight, in order, that every member acknowledged and
    /// whose own write is durable.
    fn try_commit(&mut self) {
        let durable = self.durable;
        let Some(lead) = self.lead_mut() else {
            return;
        };
        let mut seq = None;
        while let Some(f) = lead.in_flight.front() {
            if !f.waiting.is_empty() || durable < f.write {
                break;
            }
            seq = Some(f.last_seq);
            lead.in_flight.pop_front();
        }
        let Some(seq) = seq else {
            return;
        };
        if seq > self.committed {
            self.set_committed(seq);
            for m in self.members() {
                self.send_to(
                    m,
                    ReplMsg::Commit {
                        view: self.claim.0,
                        seq,
                    },
                );
            }
        }
    }

    fn on_ack(&mut self, from: u16, view: u64, seq: u64) {
        if view != self.claim.0 || !self.role.is_primary() {
            return;
        }
        if let Some(lead) = self.lead_mut() {
            // (Acknowledgements are cumulative.)
            for f in lead.in_flight.iter_mut().take_while(|f| f.last_seq <= seq) {
                f.waiting.remove(&from);
            }
        }
        self.try_commit();
        self.send_batch();
    }

    fn on_batch(&mut self, link: ConnId, from: u16, batch: Batch, now: Instant) {
        if (batch.view, from) != self.claim || !self.role.is_backup() {
            debug!(
                "ignoring a batch of view {} from tracker {from}",
                batch.view
            );
            return;
        }
        if batch.first_seq > self.applied + 1 {
            error!(
                "tracker {from} sent entries from {} but this tracker has applied up to {}; asking for the state",
                batch.first_seq, self.applied
            );
            self.stop_serving();
            self.join(from);
            return;
        }
        let skip = ((self.applied + 1 - batch.first_seq) as usize).min(batch.entries.len());
        for e in batch.entries.iter().skip(skip) {
            self.apply(e);
        }
        // As a backup of this claim the state is a prefix of its primary's sequence: so it
        // is, with the batch, whether or not the batch's write reaches the disk.
        self.accepted_view = batch.view;
        self.accepted_by = from;
        let first_new = batch.first_seq + skip as u64;
        let mut entries = batch.entries;
        entries.drain(..skip);
        let new = entries.len();
        self.log_entries(first_new, entries.into());
        // Acknowledged once durable: now, or when the disk says so. A batch that brought
        // nothing new (sent again, or an empty one naming a new view) is answered at once
        // with what is durable: the primary may have lost the earlier acknowledgement.
        self.send_ack(new == 0);
        self.touch(link, now);
    }

    // ---- takeover ----

    /// The primary is gone: the lowest-numbered serving tracker takes over.
    fn elect(&mut self, now: Instant) {
        if !self.role.is_backup() {
            return;
        }
        let mut lowest = self.me.no;
        for (no, link) in &self.peer_link {
            let serving = matches!(
                self.links.get(link).and_then(|l| l.status),
                Some(ReplStatus::Serving { .. })
            );
            if serving && *no < lowest {
                lowest = *no;
            }
        }
        if lowest == self.me.no {
            self.take_over(now);
        } else {
            info!("waiting for tracker {lowest} to take over");
            self.takeover_deadline = Some(now + self.t.takeover_wait);
        }
    }

    fn take_over(&mut self, now: Instant) {
        let Some(view) = next_view(self.highest_view) else {
            error!("view numbers are exhausted; this tracker cannot take over");
            return;
        };
        self.set_claim((view, self.me.no));
        self.takeover_deadline = None;
        let waiting: BTreeSet<u16> = self.peer_link.keys().copied().collect();
        info!(
            "taking over as primary of view {view} at entry {}; asking {waiting:?}",
            self.applied
        );
        for no in &waiting {
            self.send_to(
                *no,
                ReplMsg::Takeover {
                    view,
                    applied: self.applied,
                },
            );
        }
        // What this tracker forwarded as a backup is ordered by itself once it leads.
        let forwarded = match std::mem::replace(&mut self.role, Role::starting()) {
            Role::Backup { forwarded } | Role::Taking { forwarded, .. } => forwarded,
            _ => Forwarded::default(),
        };
        self.role = Role::Taking {
            waiting,
            lead: Lead::default(),
            offer: None,
            forwarded,
            positions: BTreeMap::new(),
        };
        self.finish_takeover(now);
    }

    fn on_takeover(&mut self, link: ConnId, from: u16, view: u64, applied: u64, now: Instant) {
        // The same takeover again (its first answer may have been lost with a dropped
        // duplicate link): answer it again.
        // A tracker that learned the claim from a status first answers it too.
        let repeated = (view, from) == self.claim;
        // The claim this tracker follows may be void (its tracker is gone): then a lower
        // claim of a live tracker is followed.
        let void = !self.role.leads() && !self.claimant_live();
        if !beats((view, from), self.claim) && !repeated && !void {
            debug!("ignoring the takeover of view {view} by tracker {from}");
            return;
        }
        self.set_claim((view, from));
        self.takeover_deadline = None;
        if view > self.accepted_view {
            // It may go on to acknowledge changes in that view (see `on_status`); a tracker
            // that serves waits for nobody.
            if let Some(waits) = self.role.waits_mut() {
                waits.must_hear.insert(from);
            }
        }
        if !self.is_serving() {
            self.send(
                link,
                ReplMsg::TakeoverAck {
                    view,
                    serving: false,
                    applied: 0,
                    catchup: Catchup::None,
                },
            );
            let waits = self.role.take_waits();
            self.role = Role::Starting { waits };
            self.join(from);
            return;
        }
        let forwarded = match std::mem::replace(&mut self.role, Role::starting()) {
            Role::Backup { forwarded } => forwarded,
            Role::Primary { lead } => self.step_down(from, view, lead, Forwarded::default()),
            Role::Taking {
                lead, forwarded, ..
            } => self.step_down(from, view, lead, forwarded),
            // (Not serving: answered above.)
            Role::Starting { .. } | Role::Joining { .. } => Forwarded::default(),
        };
        self.role = Role::Backup { forwarded };
        // The entries the new primary lacks: the batches in flight this tracker applied and
        // it did not (at most [`MAX_IN_FLIGHT`]), as one batch from the ring of recent
        // batches; the whole state when the ring does not reach back that far or they are too
        // many for one message.
        let catchup = if self.applied <= applied {
            Catchup::None
        } else {
            let one = (self.ring.last_seq() == self.applied)
                .then(|| {
                    self.ring
                        .suffix(applied, MAX_CATCHUP_ENTRIES, MAX_BATCH_BYTES)
                })
                .flatten()
                .filter(|parts| parts.len() == 1);
            match one.and_then(|mut parts| parts.pop()) {
                Some((first_seq, entries)) => Catchup::Batch(Batch {
                    view: self.accepted_view,
                    first_seq,
                    entries,
                }),
                None => {
                    let len = self.send_snapshot_parts(from);
                    info!(
                        "sent the state after entry {} ({len} bytes) to tracker {from}, taking over",
                        self.applied
                    );
                    Catchup::Snapshot
                }
            }
        };
        self.send(
            link,
            ReplMsg::TakeoverAck {
                view,
                serving: true,
                applied: self.applied,
                catchup,
            },
        );
        self.touch(link, now);
        self.reforward();
        // Changes submitted while this tracker was taking over go to the new primary.
        self.release_held();
        self.broadcast_status();
    }

    /// A primary (or a tracker taking over) follows tracker `from`'s takeover of `view`: its
    /// members, joiners, batches in flight and offer are dropped; its own changes not yet
    /// ordered go to the new primary (the backups that forwarded the others send them again
    /// themselves), ahead of what it had forwarded. Returns what it now has forwarded.
    fn step_down(&self, from: u16, view: u64, lead: Lead, mut forwarded: Forwarded) -> Forwarded {
        info!("tracker {from} takes over view {view}; stepping down");
        let mut mine = lead.next;
        while let Some(q) = mine.pop_back() {
            if q.own {
                forwarded.push_front(q.entry);
            }
        }
        forwarded
    }

    #[allow(clippy::too_many_arguments)]
    fn on_takeover_ack(
        &mut self,
        link: ConnId,
        from: u16,
        view: u64,
        serving: bool,
        applied: u64,
        catchup: Catchup,
        now: Instant,
    ) {
        // The parts the peer sent just before this answer are this answer's, whatever
        // becomes of it: taken off the link now, so that an answer ignored here (a takeover
        // given up for a higher claim, a stale view) does not leave a whole state buffered
        // to spoil the next one this peer sends (review: a bad snapshot, a member dropped).
        let snapshot = match (&catchup, self.links.get_mut(&link)) {
            (Catchup::Snapshot, Some(l)) => std::mem::take(&mut l.snapshot),
            _ => Vec::new(),
        };
        let claim_view = self.claim.0;
        let Role::Taking { waiting, .. } = &mut self.role else {
            return;
        };
        if view != claim_view || !waiting.remove(&from) {
            return;
        }
        if serving {
            let applied_here = self.applied;
            if let Role::Taking {
                lead,
                offer,
                positions,
                ..
            } = &mut self.role
            {
                lead.members.insert(from);
                positions.insert(from, applied);
                let best = offer.as_ref().map_or(applied_here, |o| o.applied);
                if applied > best {
                    *offer = Some(Offer {
                        applied,
                        from,
                        catchup,
                        snapshot,
                    });
                }
            }
        }
        self.finish_takeover(now);
    }

    /// Completes a takeover once every linked tracker has answered.
    fn finish_takeover(&mut self, now: Instant) {
        let offer = match &mut self.role {
            Role::Taking { waiting, offer, .. } if waiting.is_empty() => offer.take(),
            _ => return,
        };
        if let Some(offer) = offer {
            match offer.catchup {
                Catchup::Batch(b) if b.first_seq <= self.applied + 1 => {
                    // The batch may come from another claim's history than the one the disk
                    // names: unknown until this tracker leads (below).
                    self.accepted_by = 0;
                    let skip = (self.applied + 1 - b.first_seq) as usize;
                    for e in b.entries.iter().skip(skip) {
                        self.apply(e);
                    }
                    let mut entries = b.entries;
                    entries.drain(..skip);
                    self.log_entries(b.first_seq + skip as u64, entries.into());
                }
                Catchup::Snapshot => match TrackerState::decode_snapshot(&offer.snapshot) {
                    Ok(state) => {
                        // Unlike a joiner's, this state holds entries nobody committed (the
                        // batches in flight when the primary died), durable maybe nowhere
                        // yet: the answers it remembers wait for the takeover's first commit
                        // (below: this tracker's write of it durable, every member's
                        // acknowledgement), not for the install.
                        let committed = self.committed;
                        self.install(state, offer.applied, offer.snapshot, self.claim);
                        self.committed = committed;
                    }
                    Err(e) => error!("tracker {}: bad snapshot: {e}", offer.from),
                },
                _ => error!(
                    "tracker {} is at entry {} but sent nothing to catch up from {}",
                    offer.from, offer.applied, self.applied
                ),
            }
        }
        // Changes forwarded to the old primary are ordered here now, but for those the
        // catch-up just applied.
        let (mut lead, forwarded, positions) =
            match std::mem::replace(&mut self.role, Role::starting()) {
                Role::Taking {
                    lead,
                    forwarded,
                    positions,
                    ..
                } => (lead, forwarded, positions),
                other => {
                    self.role = other;
                    return;
                }
            };
        let mut forwarded = forwarded.entries;
        while let Some(entry) = forwarded.pop_back() {
            lead.next.push_front(Queued { own: true, entry });
        }
        // A member that answered from further on than this tracker now stands (its catch-up
        // could not be applied: a snapshot that does not decode, an answer with nothing to
        // catch up from) holds entries this tracker lacks: batches sent after its point
        // would be taken as ones it holds, on top of another history. It is not led: it is
        // told to ask for the state, and gets this tracker's (see the module doc, Takeover).
        for (&m, &after) in positions.iter().filter(|(_, at)| **at > self.applied) {
            if lead.members.remove(&m) {
                warn!(
                    "tracker {m} answered from entry {after}, past this tracker's {}: it is \
                     sent the state instead of being led from there",
                    self.applied
                );
                lead.rejoining.insert(m, after);
            }
        }
        let rejoining: Vec<(u16, u64)> = lead.rejoining.iter().map(|(m, a)| (*m, *a)).collect();
        info!(
            "primary of view {} at entry {}; members {:?}",
            self.claim.0, self.applied, lead.members
        );
        self.role = Role::Primary { lead };
        self.accepted_view = self.claim.0;
        self.accepted_by = self.me.no;
        self.sync_meta();
        for (m, after) in rejoining {
            self.send_rejoin(m, after);
        }
        // Bring lagging members up: each answered with its position (members stand up to
        // [`MAX_IN_FLIGHT`] batches apart), and gets the entries after it, from the ring.
        let members = self.members();
        let mut waiting = BTreeSet::new();
        for m in members {
            let after = positions.get(&m).copied().unwrap_or(0);
            self.send_entries_after(m, after);
            waiting.insert(m);
        }
        let (last_seq, write) = (self.applied, self.written);
        if let Some(lead) = self.lead_mut() {
            lead.in_flight.push_back(InFlight {
                last_seq,
                waiting,
                write,
                bytes: 0,
            });
        }
        self.broadcast_status();
        self.out.push_back(ReplicaOut::Serving(true));
        self.try_commit();
        self.release_held();
        self.send_batch();
        self.scan_grace(now);
    }

    /// Sends member `m`, which has applied the entries up to `after`, the entries after it as
    /// batches of the current view (an empty batch when it lacks none: it acknowledges the
    /// view). Members are at most [`MAX_IN_FLIGHT`] batches behind, which the ring of recent
    /// batches holds; should it not reach back to `after` (a ring bounded small), the member
    /// gets an empty batch past its point, and asks for the state (see `on_batch`).
    fn send_entries_after(&mut self, m: u16, after: u64) {
        let parts = (after < self.applied && self.ring.last_seq() == self.applied)
            .then(|| self.ring.suffix(after, MAX_BATCH_ENTRIES, MAX_BATCH_BYTES))
            .flatten()
            .filter(|parts| !parts.is_empty());
        let Some(parts) = parts else {
            return self.send_empty_batch(m);
        };
        let view = self.claim.0;
        for (first_seq, entries) in parts {
            self.send_to(
                m,
                ReplMsg::Batch(Batch {
                    view,
                    first_seq,
                    entries,
                }),
            );
        }
    }

    /// Tells tracker `m`, a backup of this claim that has applied the entries up to `after`
    /// (past this tracker's), to ask for the state: an empty batch past its point, which it
    /// answers as a member whose primary is ahead of it, with a join request (see
    /// `on_batch`). Only its position decides: the batch holds no entry.
    fn send_rejoin(&mut self, m: u16, after: u64) {
        self.send_to(
            m,
            ReplMsg::Batch(Batch {
                view: self.claim.0,
                first_seq: after.saturating_add(2),
                entries: Vec::new(),
            }),
        );
    }

    /// An empty batch at this tracker's point: a member there acknowledges the view with it,
    /// a member behind asks for the state.
    fn send_empty_batch(&mut self, m: u16) {
        self.send_to(
            m,
            ReplMsg::Batch(Batch {
                view: self.claim.0,
                first_seq: self.applied + 1,
                entries: Vec::new(),
            }),
        );
    }

    fn become_primary(&mut self, now: Instant) {
        self.role = Role::primary();
        self.accepted_view = self.claim.0;
        self.accepted_by = self.me.no;
        self.sync_meta();
        if self.applied > self.committed {
            // A state from disk holds entries after the last commit it knew of. They are the
            // service's now (the furthest state starts it), and count as committed once the
            // metadata naming this claim is durable, as a takeover's first commit does:
            // answers made from the state wait for a commit (the core's read rule), and an
            // idle service would otherwise hold them until its next change.
            let (last_seq, write) = (self.applied, self.written);
            if let Some(lead) = self.lead_mut() {
                lead.in_flight.push_back(InFlight {
                    last_seq,
                    waiting: BTreeSet::new(),
                    write,
                    bytes: 0,
                });
            }
        }
        self.out.push_back(ReplicaOut::Serving(true));
        self.broadcast_status();
        self.try_commit();
        self.release_held();
        self.scan_grace(now);
    }

    // ---- sessions of dead trackers ----

    /// Primary: starts the grace period of every tracker run holding sessions that is not live.
    fn scan_grace(&mut self, now: Instant) {
        let mut live: BTreeSet<TrackerRef> = BTreeSet::new();
        live.insert(self.me);
        for link in self.peer_link.values() {
            if let Some(p) = self.links.get(link).and_then(|l| l.peer) {
                live.insert(p);
            }
        }
        let holders: BTreeSet<TrackerRef> = self
            .state
            .sessions()
            .map(|(_, s)| s.tracker)
            .filter(|t| !live.contains(t))
            .collect();
        self.grace.retain(|t, _| holders.contains(t));
        for t in holders {
            self.grace.entry(t).or_insert_with(|| {
                info!(
                    "tracker {} (run {:x}) is not live: its sessions end in {:?} unless they move",
                    t.no, t.incarnation, self.t.session_grace
                );
                now + self.t.session_grace
            });
        }
    }
}

#[cfg(test)]
#[path = "replica_tests.rs"]
mod tests;
