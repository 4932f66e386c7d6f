//! One download's state machine: its peer links, its picker, its timers and its ending.
//!
//! A [`Download`] knows the file (from the tracker's metadata) and the sharers' addresses. It
//! opens a link to each sharer, sends the handshake, takes each sharer's bitfield and `have`s
//! into its [`Picker`], keeps every link's request pipeline full, turns finished blocks into
//! cancels (end-game losers) and hash jobs (complete pieces), bans peers whose pieces fail
//! verification, and decides when the download is complete or has failed.
//!
//! # Request depth
//!
//! Each link's pipeline is sized to what the link delivers: the engine measures every active
//! link's rate (bytes of block data per second, averaged over windows of [`RATE_WINDOW`]
//! while requests are outstanding) and keeps about [`Limits::queue_time`] worth of it in
//! flight, in `[Limits::min_depth, Limits::max_depth]` blocks; [`Limits::depth`] applies
//! until the first window closes. A fast link thus gets a deep pipeline (enough to cover its
//! round trip: a link held back by a short pipeline delivers `depth` blocks per round trip,
//! and as the queue time is much longer than a round trip the next depth is larger), while a
//! slow link holds only about a queue time's worth of blocks, which would otherwise wait behind
//! it while faster links run dry at the end.
//!
//! # Waste
//!
//! [`Download::waste`] counts what the sharers sent for nothing: block bytes received and
//! discarded (a copy that lost an end-game or relief race, a block not or no longer asked
//! for), the second requests behind them and the cancels sent. The driver logs it at `info`
//! when the download ends; tests and the swarm simulation read it.
//!
//! It does no IO and reads no clock. The driver calls the `on_*` methods with what happened
//! (and `now`) and performs the [`Action`]s that [`Download::poll_action`] hands out: open a
//! connection, send a message, close a link, verify a piece, announce a verified piece, ask the
//! tracker again for sharers, finish.
//!
//! # Swarms
//!
//! While it runs, the download asks the tracker for sharers again (live discovery:
//! [`Limits::discover_min`] after the start, doubling while nobody new appears, at most
//! [`Limits::discover_max`] apart), so downloaders that became sharers are linked within about
//! a second. It links at most [`Limits::max_links`] sharers, in an order drawn per download,
//! and every [`Limits::rotate_interval`] replaces the slowest active link (by measured rate,
//! never the only holder of a missing piece) with a sharer waiting. A sharer that refused
//! rests ([`Limits::refused_backoff`], doubling) and is dropped after
//! [`Limits::max_refusals`]; one that rejects a block of a piece it offered is asked for that
//! piece again after [`Limits::reject_rest`] (a seed sending each piece once first, or a
//! sharer whose line is full), and the piece meanwhile counts as held by it. After a
//! rejection the link itself makes no new request for a while ([`Limits::reject_rest`] if
//! it had delivered nothing for [`CHOKED_SILENCE`], [`BUSY_REST`] otherwise), and a link
//! with room in its pipeline requests a second copy of blocks waiting at a much slower or
//! silent link, or a resting one with a measured rate, but only of the blocks it could
//! deliver first ([`Picker::relieve`]). A resting link with no rate measured yet is
//! relieved only once it has been silent for [`SLOW_SILENCE`]: its queue may still come.
//!
//! # Failure
//!
//! A link that cannot connect, refuses, breaks or stalls costs only time: the picker gives its
//! work to the others. When some missing piece is held by no connected, trusted peer (the
//! picker is *stuck*), the download asks the tracker for the sharers online again (new sharers,
//! or a sharer that came back) and retries the addresses it has not banned. It fails only when
//! it has stayed stuck for [`Limits::stuck_grace`] after asking [`Limits::max_requeries`] times,
//! or, when some sharer dropped a link before answering its handshake (a sharer at its link
//! cap is not untrusted), after asking on, further apart, for [`Limits::retry_dropped_for`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::picker::{Block, PeerId, Picker, SecondRequests, Verdict, Written};
use crate::bitfield::Bitfield;
use crate::rng::SplitMix64;
use crate::wire::peer_link::{BlockRef, DownloaderMsg};
use crate::wire::tracker_link::FileMeta;
use crate::wire::GroupId;

/// Sizes and timers of a download.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Bytes per block request.
    pub block_len: u32,
    /// Blocks in flight per peer until its rate is known.
    pub depth: usize,
    /// Fewest and most blocks in flight per peer.
    pub min_depth: usize,
    pub max_depth: usize,
    /// How much of a link's measured rate is kept in flight.
    pub queue_time: Duration,
    /// How long connecting and the handshake may take.
    pub connect_timeout: Duration,
    /// How long a link with requests outstanding may go without delivering a byte.
    pub stall_timeout: Duration,
    /// How long to wait between asking the tracker for sharers while stuck.
    pub requery_interval: Duration,
    /// How many times to ask before giving up.
    pub max_requeries: u32,
    /// How long the download may stay stuck after the last answer before it fails.
    pub stuck_grace: Duration,
    /// Live discovery: while the download runs, the tracker is asked for sharers again
    /// `discover_min` after the start, then at an interval that doubles while the answers
    /// bring nobody new, up to `discover_max` (back to `discover_min` when one does).
    /// `discover_max` zero turns it off (the tracker is then asked only when stuck).
    pub discover_min: Duration,
    pub discover_max: Duration,
    /// Most links open (or opening) at once; other sharers wait as candidates.
    pub max_links: usize,
    /// With `max_links` open and a candidate waiting, the slowest link (by measured rate) is
    /// replaced by the candidate at most this often.
    pub rotate_interval: Duration,
    /// A sharer that refused is not tried again for this long, doubling per refusal, and
    /// never again after `max_refusals` refusals.
    pub refused_backoff: Duration,
    pub max_refusals: u32,
    /// A sharer that dropped a link before answering its handshake (a sharer at its link
    /// cap, restarting, or flooded) is not untrusted: while some did, a stuck download keeps
    /// asking the tracker and linking again after its `max_requeries` questions (2 s, then
    /// every 4 s, with the default interval of 1 s) while another question fits in this long
    /// after it got stuck; it gives up `stuck_grace` after the last.
    pub retry_dropped_for: Duration,
    /// A sharer that rejects a block of a piece it offered is asked for that piece again
    /// after this long ([`Picker::block_deferred`]: a seed sending each piece once first);
    /// zero takes a rejection as "does not hold it" ([`Picker::block_rejected`]).
    pub reject_rest: Duration,
    /// Seed of the order of pieces of equal rarity (0: by index; see
    /// [`Picker::shuffle_ties`]).
    pub piece_order_seed: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            block_len: 128 * 1024,
            depth: 16,
            min_depth: 2,
            // 4 MiB in flight per link: 40 MiB/s per link at a 100 ms round trip. Deeper
            // pipelines cost on loopback, where the data in flight outgrows the CPU caches
            // before it is hashed (1 GiB, `cargo bench --bench transfer`, two runs each: at
            // most 16 blocks 794-836 MiB/s, 32 blocks 754-788, 64 blocks 747-798, 128 blocks
            // 651-769).
            max_depth: 32,
            queue_time: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(15),
            requery_interval: Duration::from_secs(1),
            max_requeries: 3,
            stuck_grace: Duration::from_secs(2),
            discover_min: Duration::from_millis(250),
            discover_max: Duration::from_secs(1),
            // 64 links and a rotation every 250 ms (48 and 1 s before): in a crowd of 128 a
            // leecher that registers late is linked by the others only through rotations,
            // so their pace sets how soon its uplink is used. Simulated crowd of 128
            // (2026-12-04, with 2 upload slots): 1 s 1.60x the bound, 250 ms 1.49x, 250 ms
            // and 64 links 1.47x, 100 ms 1.46x (more handshakes for little more).
            max_links: 64,
            rotate_interval: Duration::from_millis(250),
            refused_backoff: Duration::from_secs(2),
            max_refusals: 3,
            retry_dropped_for: Duration::from_secs(20),
            reject_rest: Duration::from_millis(500),
            piece_order_seed: 0,
        }
    }
}

impl Limits {
    /// The limits of the engine before live discovery and bounded links (asks the tracker
    /// only when stuck, links every sharer, retries a refusing one at each answer): for
    /// tests that pin that behaviour and for measurements against it.
    pub fn without_discovery(self) -> Self {
        Limits {
            discover_max: Duration::ZERO,
            max_links: usize::MAX,
            refused_backoff: Duration::ZERO,
            max_refusals: u32::MAX,
            retry_dropped_for: Duration::ZERO,
            reject_rest: Duration::ZERO,
            ..self
        }
    }
}

/// What the driver must do for a download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Open a connection to `addr` for `peer` and send it the queued messages.
    Connect { peer: PeerId, addr: SocketAddr },
    /// Send `msg` on `peer`'s link.
    Send { peer: PeerId, msg: DownloaderMsg },
    /// Close `peer`'s link (it is already forgotten here).
    Close { peer: PeerId },
    /// Piece `piece` is complete in the file: seal it and hand it to the hasher.
    Verify { piece: u32 },
    /// Piece `piece` verified: serve it and announce it (the first one also registers this
    /// client as a sharer with the tracker).
    Verified { piece: u32 },
    /// Ask the tracker for the sharers online and call [`Download::on_sharers`].
    QuerySharers,
    /// The download is over: every piece verified (`Ok`), or it cannot finish (`Err` with the
    /// reason). No action follows.
    Finished(Result<(), GiveUp>),
}

/// Why a download engine gave up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GiveUp {
    /// No peer that is still trusted holds a missing piece, after asking the tracker again.
    NoTrustedPeer {
        piece: u32,
        n_have: u32,
        n_pieces: u32,
    },
    /// Stopped from outside, for this reason.
    Aborted(String),
}

impl std::fmt::Display for GiveUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GiveUp::NoTrustedPeer {
                piece,
                n_have,
                n_pieces,
            } => write!(
                f,
                "no trusted peer can supply piece {piece} ({n_have} of {n_pieces} pieces verified)"
            ),
            GiveUp::Aborted(reason) => f.write_str(reason),
        }
    }
}

/// Where a link stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkState {
    /// Connecting and waiting for the sharer's answer to the handshake.
    Opening { since: Instant },
    /// Accepted: requests flow.
    Active { last_data: Instant },
}

/// Over how long a link's rate is averaged at a time.
pub const RATE_WINDOW: Duration = Duration::from_millis(250);

#[derive(Debug)]
struct Link {
    addr: SocketAddr,
    state: LinkState,
    /// Blocks to keep in flight.
    depth: usize,
    rate: RateMeter,
    /// The sharer rejected a request (it is choking us, or declined a piece it sent
    /// already): no new requests to it before this time.
    rest_until: Option<Instant>,
    /// When the link was opened.
    since: Instant,
}

/// A link's delivery rate: bytes counted over windows of [`RATE_WINDOW`], each window's rate
/// averaged with the previous estimate.
#[derive(Debug, Clone, Copy)]
struct RateMeter {
    since: Instant,
    bytes: u64,
    /// Bytes per second, once a window has closed.
    rate: Option<f64>,
}

impl RateMeter {
    fn new(now: Instant) -> Self {
        RateMeter {
            since: now,
            bytes: 0,
            rate: None,
        }
    }

    /// Starts a new window (the link was idle until now: idle time is not counted).
    fn restart(&mut self, now: Instant) {
        self.since = now;
        self.bytes = 0;
    }

    /// Counts `bytes` arriving at `now`; returns the new estimate when a window closes.
    fn add(&mut self, bytes: u64, now: Instant) -> Option<f64> {
        self.bytes = self.bytes.saturating_add(bytes);
        let elapsed = now.checked_duration_since(self.since)?;
        if elapsed < RATE_WINDOW {
            return None;
        }
        let window = self.bytes as f64 / elapsed.as_secs_f64();
        let rate = self.rate.map_or(window, |old| (old + window) / 2.0);
        self.rate = Some(rate);
        self.restart(now);
        Some(rate)
    }
}

/// Why an address is not tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AddrState {
    /// A link is open (or opening) to it.
    Linked,
    /// Not linked (never yet, or the link ended); it may be linked from `retry_at` on while
    /// the tracker lists it.
    Idle { retry_at: Instant },
    /// It sent a bad piece, or refused `max_refusals` times: never again in this download.
    Banned,
}

/// Most addresses a download remembers; a tracker answer beyond it adds no new ones.
pub const MAX_KNOWN_ADDRS: usize = 4096;
/// Links opened past [`Limits::max_links`] while some missing piece has no linked holder.
pub const STUCK_EXTRA_LINKS: usize = 8;
/// A link that delivered no data for this long when a request is rejected is taken as
/// choked: it rests ([`Limits::reject_rest`]).
pub const CHOKED_SILENCE: Duration = Duration::from_millis(100);
/// How long a link that is still delivering pauses its new requests after a rejection.
pub const BUSY_REST: Duration = Duration::from_millis(50);
/// A link whose rate is not known yet and that has delivered nothing for this long may be
/// relieved by a faster one ([`Picker::relieve`]).
pub const SLOW_SILENCE: Duration = Duration::from_secs(1);
/// Most deferred pieces remembered; past it the oldest is asked for again at once.
pub const MAX_DEFERRED: usize = 4096;

/// Progress figures for `show_downloads` and the end line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub bytes_verified: u64,
    pub size: u64,
    pub pieces_verified: u32,
    pub n_pieces: u32,
    pub active_peers: usize,
}

/// What a download received and did not keep, and the second requests behind it: the
/// sharers' upload that was wasted (see [`Download::waste`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Waste {
    /// The file's size, for the fraction.
    pub size: u64,
    /// Block bytes whose header arrived, kept or not.
    pub received_bytes: u64,
    /// Blocks (and their bytes) read and thrown away: a copy that lost the end-game race, a
    /// block not (or no longer) asked for. Counted when the header arrives (the driver reads
    /// the data into a scratch buffer).
    pub discarded_blocks: u64,
    pub discarded_bytes: u64,
    /// Blocks requested a second time, in the end-game and by relief.
    pub seconds: SecondRequests,
    /// Cancels sent for the losers' requests.
    pub cancels: u64,
}

impl Waste {
    /// Discarded bytes per byte of the file (0 for an empty file).
    pub fn fraction(&self) -> f64 {
        if self.size == 0 {
            0.0
        } else {
            self.discarded_bytes as f64 / self.size as f64
        }
    }
}

impl std::fmt::Display for Waste {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "received {} block bytes, discarded {} in {} blocks ({:.1}% of the file); second requests: {} end-game, {} relief; {} cancels",
            self.received_bytes,
            self.discarded_bytes,
            self.discarded_blocks,
            self.fraction() * 100.0,
            self.seconds.endgame,
            self.seconds.relief,
            self.cancels
        )
    }
}

/// Bytes in a MiB, for rates shown to the user.
const MIB: f64 = 1024.0 * 1024.0;

impl Progress {
    /// How much is verified, in percent (an empty file is complete).
    pub fn percent(&self) -> f64 {
        if self.size == 0 {
            100.0
        } else {
            self.bytes_verified as f64 * 100.0 / self.size as f64
        }
    }

    /// MiB verified per second over `elapsed`, the time since the download started.
    pub fn average_mib_s(&self, elapsed: Duration) -> f64 {
        self.bytes_verified as f64 / MIB / elapsed.as_secs_f64().max(1e-3)
    }
}

pub struct Download {
    pub group: GroupId,
    pub meta: FileMeta,
    limits: Limits,
    picker: Picker,
    links: BTreeMap<PeerId, Link>,
    addrs: BTreeMap<SocketAddr, AddrState>,
    /// The address of every peer ever linked: a verdict may blame a peer whose link is gone.
    peer_addrs: BTreeMap<PeerId, SocketAddr>,
    next_peer: u64,
    actions: VecDeque<Action>,
    /// Since when the picker has been stuck (no trusted peer for some missing piece).
    stuck_since: Option<Instant>,
    /// When the tracker was last asked for sharers, and how often while stuck.
    last_query: Option<Instant>,
    n_queries: u32,
    /// Set when a link was dropped before its handshake was answered (cleared with the
    /// stuck clock): the download then retries for [`Limits::retry_dropped_for`].
    dropped: bool,
    query_outstanding: bool,
    /// Live discovery: when the tracker was last asked, and the interval now.
    last_discovery: Option<Instant>,
    discover_every: Duration,
    /// The addresses of the tracker's last answer (only these are linked).
    listed: Vec<SocketAddr>,
    /// How often each address refused.
    refusals: BTreeMap<SocketAddr, u32>,
    /// When the slowest link was last replaced.
    last_rotation: Option<Instant>,
    /// Draws the order in which listed sharers are linked.
    rng: SplitMix64,
    /// Pieces a peer declined for now, and when to ask again (in time order).
    deferred: VecDeque<(Instant, PeerId, u32)>,
    bytes_verified: u64,
    /// For [`Download::waste`].
    received_bytes: u64,
    discarded_blocks: u64,
    discarded_bytes: u64,
    cancels: u64,
    finished: bool,
    /// The latest time a caller passed in (for the few calls without one).
    last_now: Option<Instant>,
}

impl Download {
    /// A download of `meta` from the sharers at `addrs`. Nothing happens before
    /// [`start`](Self::start).
    pub fn new(group: GroupId, meta: FileMeta, limits: Limits) -> Self {
        let mut picker = Picker::new(meta.size, meta.piece_len, limits.block_len);
        picker.shuffle_ties(limits.piece_order_seed);
        let discover_every = limits.discover_min;
        let rng = SplitMix64::new(limits.piece_order_seed ^ 0x5eed);
        Download {
            group,
            meta,
            limits,
            picker,
            links: BTreeMap::new(),
            addrs: BTreeMap::new(),
            peer_addrs: BTreeMap::new(),
            next_peer: 0,
            actions: VecDeque::new(),
            stuck_since: None,
            last_query: None,
            n_queries: 0,
            dropped: false,
            query_outstanding: false,
            last_discovery: None,
            discover_every,
            listed: Vec::new(),
            refusals: BTreeMap::new(),
            last_rotation: None,
            deferred: VecDeque::new(),
            rng,
            bytes_verified: 0,
            received_bytes: 0,
            discarded_blocks: 0,
            discarded_bytes: 0,
            cancels: 0,
            finished: false,
            last_now: None,
        }
    }

    /// Before [`start`](Self::start), for a resumed `.part`: `pieces` may already be in the
    /// file. Each is handed to the hasher ([`Action::Verify`]) instead of being fetched; one
    /// that fails is fetched as usual, and no peer is blamed for it.
    pub fn resume(&mut self, pieces: impl IntoIterator<Item = u32>) {
        for piece in pieces {
            if self.picker.resume_piece(piece) {
                self.actions.push_back(Action::Verify { piece });
            }
        }
    }

    /// Opens links to `addrs` (an empty file finishes at once).
    pub fn start(&mut self, addrs: &[SocketAddr], now: Instant) {
        if self.picker.is_complete() {
            self.finish(Ok(()));
            return;
        }
        self.last_discovery = Some(now);
        self.last_rotation = Some(now);
        self.on_sharers(addrs, now);
        self.discover_every = self.limits.discover_min;
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    pub fn progress(&self) -> Progress {
        Progress {
            bytes_verified: self.bytes_verified,
            size: self.meta.size,
            pieces_verified: self.picker.n_have(),
            n_pieces: self.picker.n_pieces(),
            active_peers: self
                .links
                .values()
                .filter(|l| matches!(l.state, LinkState::Active { .. }))
                .count(),
        }
    }

    /// What this download received and threw away so far (logged when it ends).
    pub fn waste(&self) -> Waste {
        Waste {
            size: self.meta.size,
            received_bytes: self.received_bytes,
            discarded_blocks: self.discarded_blocks,
            discarded_bytes: self.discarded_bytes,
            seconds: self.picker.second_requests(),
            cancels: self.cancels,
        }
    }

    /// Whether `piece` is verified.
    pub fn has_piece(&self, piece: u32) -> bool {
        self.picker.have(piece)
    }

    /// How many blocks `peer`'s link keeps in flight.
    pub fn link_depth(&self, peer: PeerId) -> Option<usize> {
        self.links.get(&peer).map(|l| l.depth)
    }

    /// The picker's geometry, for the driver's bounds checks.
    pub fn picker(&self) -> &Picker {
        &self.picker
    }

    /// The tracker's list of sharers online: links open to the addresses not already linked,
    /// banned or resting after a refusal, up to [`Limits::max_links`].
    pub fn on_sharers(&mut self, addrs: &[SocketAddr], now: Instant) {
        self.query_outstanding = false;
        if self.finished {
            return;
        }
        let mut news = false;
        for &addr in addrs {
            if !self.addrs.contains_key(&addr) && self.addrs.len() < MAX_KNOWN_ADDRS {
                self.addrs.insert(addr, AddrState::Idle { retry_at: now });
                news = true;
            }
        }
        self.discover_every = if news {
            self.limits.discover_min
        } else {
            (self.discover_every * 2).min(self.limits.discover_max)
        };
        self.listed = addrs
            .iter()
            .copied()
            .filter(|a| self.addrs.contains_key(a))
            .collect();
        // Links go to the listed sharers in an order of this download's own (the seed of
        // its piece order), so that a crowd of downloaders bounded to `max_links` links each
        // does not link to the same first sharers of the tracker's list.
        if self.limits.piece_order_seed != 0 {
            self.rng.shuffle(&mut self.listed);
        }
        self.open_links(now);
        self.check_stuck(now);
    }

    /// Opens links to listed addresses that may be tried now, while there is room (and a
    /// few more while some missing piece has no linked holder: one of them may hold it).
    fn open_links(&mut self, now: Instant) {
        let listed = std::mem::take(&mut self.listed);
        let room = if self.is_stuck() && !self.links.is_empty() {
            self.limits.max_links.saturating_add(STUCK_EXTRA_LINKS)
        } else {
            self.limits.max_links
        };
        for &addr in &listed {
            if self.links.len() >= room {
                break;
            }
            if matches!(self.addrs.get(&addr), Some(AddrState::Idle { retry_at }) if *retry_at <= now)
            {
                self.link_to(addr, now);
            }
        }
        self.listed = listed;
    }

    /// Whether the tracker lists a sharer that is not linked and not banned.
    fn has_waiting_sharer(&self) -> bool {
        self.listed
            .iter()
            .any(|a| matches!(self.addrs.get(a), Some(AddrState::Idle { .. })))
    }

    /// A listed address that may be linked now, if any.
    fn candidate(&self, now: Instant) -> Option<SocketAddr> {
        self.listed.iter().copied().find(
            |a| matches!(self.addrs.get(a), Some(AddrState::Idle { retry_at }) if *retry_at <= now),
        )
    }

    fn link_to(&mut self, addr: SocketAddr, now: Instant) {
        self.next_peer += 1;
        let peer = PeerId(self.next_peer);
        self.addrs.insert(addr, AddrState::Linked);
        self.peer_addrs.insert(peer, addr);
        self.links.insert(
            peer,
            Link {
                addr,
                state: LinkState::Opening { since: now },
                depth: self.limits.depth,
                rate: RateMeter::new(now),
                rest_until: None,
                since: now,
            },
        );
        self.actions.push_back(Action::Connect { peer, addr });
        self.actions.push_back(Action::Send {
            peer,
            msg: DownloaderMsg::handshake(
                self.group.clone(),
                self.meta.name.clone(),
                self.meta.file_sha1,
            ),
        });
    }

    /// With every link slot taken and a candidate waiting, replaces the slowest active link
    /// (by measured rate; links whose rate is not known yet are kept) with the candidate.
    fn rotate(&mut self, now: Instant) {
        if self.links.len() < self.limits.max_links
            || self
                .last_rotation
                .is_some_and(|t| now < t + self.limits.rotate_interval)
        {
            return;
        }
        if !self.has_waiting_sharer() {
            return;
        }
        // Counted even when nothing is replaced, so that the timer moves on.
        self.last_rotation = Some(now);
        let Some(addr) = self.candidate(now) else {
            return;
        };
        let slowest = self
            .links
            .iter()
            .filter_map(|(&p, l)| match (l.state, l.rate.rate) {
                (LinkState::Active { .. }, Some(rate)) => Some((p, rate)),
                // Linked for a rotation or longer and never delivered a whole window: a
                // sharer busy with others (choking us) or holding nothing we lack.
                (LinkState::Active { .. }, None)
                    if now >= l.since + self.limits.rotate_interval =>
                {
                    Some((p, 0.0))
                }
                _ => None,
            })
            .filter(|&(p, _)| !self.picker.is_sole_holder(p))
            .min_by(|a, b| a.1.total_cmp(&b.1));
        let Some((peer, _)) = slowest else {
            return;
        };
        // The dropped sharer rests for a few rotations before it can come back.
        let rest = self.limits.rotate_interval * 4;
        let dropped = self.links.get(&peer).map(|l| l.addr);
        self.drop_link(peer, "replaced by another sharer (slowest link)", now);
        if let Some(AddrState::Idle { retry_at }) = dropped.and_then(|a| self.addrs.get_mut(&a)) {
            *retry_at = now + rest;
        }
        if self.links.len() < self.limits.max_links {
            self.link_to(addr, now);
        }
    }

    /// Whether live discovery asks the tracker now or at some later time.
    fn discovery_due(&self) -> Option<Instant> {
        if self.limits.discover_max.is_zero()
            || self.query_outstanding
            || self.stuck_since.is_some()
            || self.finished
        {
            return None;
        }
        Some(self.last_discovery? + self.discover_every)
    }

    /// The tracker could not be asked (no tracker, or it refused).
    pub fn on_sharers_failed(&mut self, now: Instant) {
        self.query_outstanding = false;
        self.check_stuck(now);
    }

    /// The sharer accepted the handshake with the pieces it holds.
    pub fn on_accept(&mut self, peer: PeerId, bitfield: &Bitfield, now: Instant) {
        let Some(link) = self.links.get_mut(&peer) else {
            return;
        };
        if bitfield.len() != self.picker.n_pieces() as usize {
            let reason = format!(
                "its bitfield has {} pieces, the file {}",
                bitfield.len(),
                self.picker.n_pieces()
            );
            return self.drop_link(peer, &reason, now);
        }
        link.state = LinkState::Active { last_data: now };
        let pieces: Vec<bool> = (0..bitfield.len()).map(|i| bitfield.get(i)).collect();
        self.picker.add_peer(peer, &pieces);
        self.check_stuck(now);
        self.fill(peer, Some(now));
    }

    /// The sharer refused the handshake (or said something out of turn): the link ends, and
    /// the address rests ([`Limits::refused_backoff`], doubling per refusal; after
    /// [`Limits::max_refusals`] it is not tried again).
    pub fn on_refused(&mut self, peer: PeerId, reason: &str, now: Instant) {
        let Some(addr) = self.links.get(&peer).map(|l| l.addr) else {
            return;
        };
        self.drop_link(peer, reason, now);
        let n = self.refusals.entry(addr).or_insert(0);
        *n = n.saturating_add(1);
        let n = *n;
        if let Some(state) = self.addrs.get_mut(&addr) {
            if *state != AddrState::Banned {
                *state = if n >= self.limits.max_refusals {
                    AddrState::Banned
                } else {
                    let backoff = self
                        .limits
                        .refused_backoff
                        .saturating_mul(1 << (n - 1).min(16));
                    AddrState::Idle {
                        retry_at: now + backoff,
                    }
                };
            }
        }
    }

    /// The sharer announced a piece.
    pub fn on_have(&mut self, peer: PeerId, piece: u32, now: Instant) {
        if !self.is_active(peer) {
            return;
        }
        self.picker.peer_has(peer, piece);
        self.check_stuck(now);
        self.fill(peer, Some(now));
    }

    /// A block's header arrived: write its data into the file or discard it.
    pub fn on_block_header(
        &mut self,
        peer: PeerId,
        piece: u32,
        offset: u32,
        len: u32,
        now: Instant,
    ) -> Verdict {
        let verdict = self.block_verdict(peer, Block { piece, offset, len }, now);
        self.received_bytes = self.received_bytes.saturating_add(u64::from(len));
        if verdict == Verdict::Discard {
            self.discarded_blocks += 1;
            self.discarded_bytes = self.discarded_bytes.saturating_add(u64::from(len));
        }
        verdict
    }

    fn block_verdict(&mut self, peer: PeerId, block: Block, now: Instant) -> Verdict {
        let Some(link) = self.links.get_mut(&peer) else {
            return Verdict::Discard;
        };
        if let LinkState::Active { last_data } = &mut link.state {
            *last_data = now;
        } else {
            return Verdict::Discard;
        }
        if let Some(rate) = link.rate.add(u64::from(block.len), now) {
            link.depth = depth_for(rate, &self.limits);
        }
        self.picker.block_arrived(peer, block)
    }

    /// Data keeps arriving on the link (a long block): it is not stalled.
    pub fn on_data(&mut self, peer: PeerId, now: Instant) {
        if let Some(Link {
            state: LinkState::Active { last_data },
            ..
        }) = self.links.get_mut(&peer)
        {
            *last_data = now;
        }
    }

    /// The data of a block with a [`Verdict::Write`] is in the file.
    pub fn on_block_written(&mut self, peer: PeerId, piece: u32, offset: u32, len: u32) {
        let block = Block { piece, offset, len };
        let Written {
            piece_complete,
            cancels,
        } = self.picker.block_written(peer, block);
        for (other, b) in cancels {
            self.cancels += 1;
            self.actions.push_back(Action::Send {
                peer: other,
                msg: DownloaderMsg::Cancel(block_ref(b)),
            });
            self.fill(other, None);
        }
        if let Some(piece) = piece_complete {
            self.actions.push_back(Action::Verify { piece });
        }
        self.fill(peer, None);
    }

    /// The sharer will not send a block.
    pub fn on_rejected(&mut self, peer: PeerId, block: BlockRef, now: Instant) {
        let b = Block {
            piece: block.piece,
            offset: block.offset,
            len: block.len,
        };
        if self.limits.reject_rest.is_zero() {
            self.picker.block_rejected(peer, b);
        } else {
            self.picker.block_deferred(peer, b);
            if self.deferred.len() >= MAX_DEFERRED {
                if let Some((_, p, piece)) = self.deferred.pop_front() {
                    self.picker.undefer(p, piece);
                }
            }
            self.deferred
                .push_back((now + self.limits.reject_rest, peer, block.piece));
            // A sharer that rejects while it sends us nothing is choking us (its line is
            // full): the link rests instead of asking it for one piece after another, each
            // rejected in turn. One that is sending declined only these pieces (a seed
            // sending each piece once first): the link pauses only briefly (long enough to
            // gather the other rejections of the same burst) and then asks for other pieces.
            if let Some(link) = self.links.get_mut(&peer) {
                let silent = match link.state {
                    LinkState::Active { last_data } => now >= last_data + CHOKED_SILENCE,
                    LinkState::Opening { .. } => true,
                };
                let rest = if silent {
                    self.limits.reject_rest
                } else {
                    self.limits.reject_rest.min(BUSY_REST)
                };
                let until = now + rest;
                link.rest_until = Some(link.rest_until.map_or(until, |t| t.max(until)));
            }
        }
        self.check_stuck(now);
        if self
            .links
            .get(&peer)
            .is_some_and(|l| l.rest_until.is_some())
            && self.picker.availability(block.piece) <= 1
        {
            // Resting, and nobody else holds the piece: no link has new work (a choking
            // seed rejects a whole pipeline, and refilling every link per block would cost
            // links x blocks for nothing).
            return;
        }
        self.fill_all(now);
    }

    /// The link broke (closed, reset, protocol error) after its connection was made.
    pub fn on_link_lost(&mut self, peer: PeerId, reason: &str, now: Instant) {
        self.link_gone(peer, reason, true, now);
    }

    /// The connection to the peer could not be made (refused, unreachable): nobody is
    /// there, which is not a sharer at its link cap dropping the link, so it does not make
    /// the download retry for [`Limits::retry_dropped_for`].
    pub fn on_connect_failed(&mut self, peer: PeerId, reason: &str, now: Instant) {
        self.link_gone(peer, reason, false, now);
    }

    fn link_gone(&mut self, peer: PeerId, reason: &str, connected: bool, now: Instant) {
        if let Some(link) = self.links.get(&peer) {
            log::info!("{}: peer link {} lost: {reason}", self.meta.name, peer.0);
            if connected && matches!(link.state, LinkState::Opening { .. }) {
                self.dropped = true;
            }
            self.forget(peer, AddrState::Idle { retry_at: now });
            self.check_stuck(now);
            self.fill_all(now);
        }
    }

    /// The hasher's verdict on a piece.
    pub fn on_piece_checked(&mut self, piece: u32, ok: bool, now: Instant) {
        // A verdict arriving after the end (a hash job still running at an abort) must not
        // queue a Verified or Close after Finished.
        if self.finished {
            return;
        }
        // A repeated verdict (the piece is already Have) is not announced or counted again.
        let was_have = self.picker.have(piece);
        let banned = self.picker.piece_verified(piece, ok);
        if ok && !was_have && self.picker.have(piece) {
            let len = self.picker.piece_size(piece).unwrap_or(0);
            self.bytes_verified += u64::from(len);
            self.actions.push_back(Action::Verified { piece });
        } else if !ok {
            log::warn!("{}: piece {piece} failed verification", self.meta.name);
        }
        for peer in banned {
            // The ban is on the address, found from the peer id even if that link has ended
            // meanwhile, and it closes every link to that address. (Looking only at the open
            // links left the address of a peer lost before the verdict Idle, so the next
            // tracker answer linked the corrupt sharer again under a new, unbanned peer id.)
            let Some(&addr) = self.peer_addrs.get(&peer) else {
                continue;
            };
            log::warn!(
                "{}: peer {addr} sent a bad piece; not used again",
                self.meta.name
            );
            self.addrs.insert(addr, AddrState::Banned);
            let linked: Vec<PeerId> = self
                .links
                .iter()
                .filter(|(_, l)| l.addr == addr)
                .map(|(&p, _)| p)
                .collect();
            for p in linked {
                self.forget(p, AddrState::Banned);
                self.actions.push_back(Action::Close { peer: p });
            }
        }
        if self.picker.is_complete() {
            self.finish(Ok(()));
            return;
        }
        self.check_stuck(now);
        self.fill_all(now);
    }

    /// Timers: links that take too long to open or stall, and a stuck download.
    pub fn on_tick(&mut self, now: Instant) {
        if self.finished {
            return;
        }
        let mut expired = Vec::new();
        for (&peer, link) in &self.links {
            match link.state {
                LinkState::Opening { since } if now >= since + self.limits.connect_timeout => {
                    expired.push((peer, "no answer to the handshake"))
                }
                LinkState::Active { last_data }
                    if self.picker.outstanding(peer) > 0
                        && now >= last_data + self.limits.stall_timeout =>
                {
                    expired.push((peer, "stalled"))
                }
                _ => {}
            }
        }
        for (peer, reason) in expired {
            // `drop_link` queues the Close (a second one here closed the link twice).
            self.drop_link(peer, reason, now);
        }
        self.check_stuck(now);
        if self.finished {
            return;
        }
        // A piece deferred at a peer, or a resting link, gives work back to that link only.
        let mut undeferred = BTreeSet::new();
        while let Some(&(t, peer, piece)) = self.deferred.front() {
            if t > now {
                break;
            }
            self.deferred.pop_front();
            self.picker.undefer(peer, piece);
            undeferred.insert(peer);
        }
        for (&peer, link) in self.links.iter_mut() {
            if link.rest_until.is_some_and(|t| t <= now) {
                link.rest_until = None;
                undeferred.insert(peer);
            }
        }
        self.last_now = Some(now);
        for peer in undeferred {
            self.fill(peer, Some(now));
        }
        if self.discovery_due().is_some_and(|t| now >= t) {
            self.last_discovery = Some(now);
            self.query_outstanding = true;
            self.actions.push_back(Action::QuerySharers);
        }
        self.rotate(now);
    }

    /// When [`on_tick`](Self::on_tick) next has work.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.finished {
            return None;
        }
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        for (&peer, link) in &self.links {
            match link.state {
                LinkState::Opening { since } => consider(since + self.limits.connect_timeout),
                // Only a link with requests outstanding can stall (as in `on_tick`); an idle
                // link's deadline would stay in the past and make the driver tick in a loop.
                LinkState::Active { last_data } if self.picker.outstanding(peer) > 0 => {
                    consider(last_data + self.limits.stall_timeout)
                }
                LinkState::Active { .. } => {}
            }
        }
        if let Some(t) = self.discovery_due() {
            consider(t);
        }
        if let Some(&(t, _, _)) = self.deferred.front() {
            consider(t);
        }
        for t in self.links.values().filter_map(|l| l.rest_until) {
            consider(t);
        }
        // A listed sharer waits for a link slot: the slowest link may be replaced. (Sharers
        // resting after a refusal or a lost link have no timer: they are tried again at the
        // first tracker answer after their rest.)
        if self.links.len() >= self.limits.max_links && self.has_waiting_sharer() {
            if let Some(t) = self.last_rotation {
                consider(t + self.limits.rotate_interval);
            }
        }
        if let Some(since) = self.stuck_since {
            if !self.query_outstanding && self.is_stuck() {
                let last = self.last_query.unwrap_or(since);
                let next_query = last + self.requery_after();
                if self.n_queries < self.limits.max_requeries
                    || (self.dropped && next_query < since + self.limits.retry_dropped_for)
                {
                    consider(next_query);
                } else {
                    consider(last + self.limits.stuck_grace);
                }
            }
        }
        next
    }

    /// Gives up at once (the user logged out of a client that shut down, say).
    pub fn abort(&mut self, reason: &str) {
        self.finish(Err(GiveUp::Aborted(reason.to_owned())));
    }

    fn is_active(&self, peer: PeerId) -> bool {
        matches!(
            self.links.get(&peer),
            Some(Link {
                state: LinkState::Active { .. },
                ..
            })
        )
    }

    fn drop_link(&mut self, peer: PeerId, reason: &str, now: Instant) {
        if let Some(link) = self.links.get(&peer) {
            log::info!("{}: peer {}: {reason}", self.meta.name, link.addr);
            self.forget(peer, AddrState::Idle { retry_at: now });
            self.actions.push_back(Action::Close { peer });
            self.check_stuck(now);
            self.fill_all(now);
        }
    }

    /// Removes the link and gives its work back; the address's state becomes `addr_state`
    /// (a banned address stays banned).
    fn forget(&mut self, peer: PeerId, addr_state: AddrState) {
        if let Some(link) = self.links.remove(&peer) {
            let entry = self.addrs.entry(link.addr).or_insert(addr_state);
            if *entry != AddrState::Banned {
                *entry = addr_state;
            }
        }
        self.picker.remove_peer(peer);
    }

    /// Tops `peer`'s pipeline up. `now` is `None` only where the peer had a request
    /// outstanding until just now (its stall clock is running already).
    fn fill(&mut self, peer: PeerId, now: Option<Instant>) {
        if self.finished || !self.is_active(peer) {
            return;
        }
        if self
            .links
            .get(&peer)
            .is_some_and(|l| l.rest_until.is_some())
        {
            return;
        }
        let idle = self.picker.outstanding(peer) == 0;
        let depth = self.links.get(&peer).map_or(0, |l| l.depth);
        let mut blocks = self.picker.next_requests(peer, depth);
        if self.picker.outstanding(peer) < depth {
            let slower = self.slower_than(peer, now);
            if !slower.is_empty() {
                blocks.extend(self.picker.relieve(peer, depth, &slower));
            }
        }
        // The stall clock runs only while requests are outstanding, so it starts when an idle
        // link is given work. (Without this, a link that had been idle for longer than the
        // stall timeout, say until a `have` or another peer's departure gave it work, was
        // dropped as stalled at the next tick, right after its first requests.)
        if idle && !blocks.is_empty() {
            if let (
                Some(now),
                Some(Link {
                    state: LinkState::Active { last_data },
                    rate,
                    ..
                }),
            ) = (now, self.links.get_mut(&peer))
            {
                *last_data = (*last_data).max(now);
                rate.restart(now);
            }
        }
        for b in blocks {
            self.actions.push_back(Action::Send {
                peer,
                msg: DownloaderMsg::Request(block_ref(b)),
            });
        }
    }

    /// The links that `peer`'s link may relieve ([`Picker::relieve`]), with their rate
    /// as a fraction of its own: those delivering less than half its measured rate, those
    /// resting after a rejection whose rate is measured (at that rate: only the blocks they
    /// would deliver after `peer` could are copied), and those that have delivered nothing
    /// for [`SLOW_SILENCE`] while it did, resting or not (as stalled, 0). A link merely
    /// resting, with no rate measured and not yet silent that long, is left alone: its queue
    /// may still come, and copying all of it at once lost most races in a crowd. Empty while
    /// `peer`'s rate is unknown.
    fn slower_than(&self, peer: PeerId, now: Option<Instant>) -> BTreeMap<PeerId, f64> {
        let Some(rate) = self.links.get(&peer).and_then(|l| l.rate.rate) else {
            return BTreeMap::new();
        };
        let now = now.or(self.last_now);
        self.links
            .iter()
            .filter(|&(&p, _)| p != peer)
            .filter_map(|(&p, l)| {
                let speed = |r: f64| if rate > 0.0 { r / rate } else { 0.0 };
                let speed = match (l.state, l.rate.rate) {
                    (LinkState::Active { .. }, Some(r)) if l.rest_until.is_some() => speed(r),
                    (LinkState::Active { .. }, Some(r)) if r < rate / 2.0 => speed(r),
                    (LinkState::Active { last_data }, None)
                        if now.is_some_and(|n| n >= last_data + SLOW_SILENCE) =>
                    {
                        0.0
                    }
                    _ => return None,
                };
                Some((p, speed))
            })
            .collect()
    }

    fn fill_all(&mut self, now: Instant) {
        self.last_now = Some(now);
        let peers: Vec<PeerId> = self.links.keys().copied().collect();
        for peer in peers {
            self.fill(peer, Some(now));
        }
    }

    /// Whether some missing piece has no trusted, connected holder, counting links still
    /// opening as hope.
    fn is_stuck(&self) -> bool {
        let opening = self
            .links
            .values()
            .any(|l| matches!(l.state, LinkState::Opening { .. }));
        !self.picker.is_complete() && !opening && (self.picker.stuck() || self.links.is_empty())
    }

    /// How long after the last question to the tracker the next is asked while stuck: the
    /// requery interval for the first `max_requeries`, then doubling up to 4 times it (only
    /// while retrying sharers that dropped links).
    fn requery_after(&self) -> Duration {
        if self.n_queries < self.limits.max_requeries {
            return self.limits.requery_interval;
        }
        let beyond = self.n_queries - self.limits.max_requeries;
        self.limits
            .requery_interval
            .saturating_mul(1 << (beyond + 1).min(2))
    }

    fn check_stuck(&mut self, now: Instant) {
        if self.finished {
            return;
        }
        if !self.is_stuck() {
            // Links still opening are hope, not progress: the stuck clock and the count of
            // questions to the tracker only reset once an accepted link can supply every
            // missing piece. (Resetting on hope alone made a sharer that the tracker lists but
            // that refuses every handshake cause a tight loop of questions and connections.)
            let progress = !self.picker.stuck()
                && self
                    .links
                    .values()
                    .any(|l| matches!(l.state, LinkState::Active { .. }));
            if progress {
                self.stuck_since = None;
                self.n_queries = 0;
                self.dropped = false;
            }
            return;
        }
        let since = *self.stuck_since.get_or_insert(now);
        if self.query_outstanding {
            return;
        }
        let last = self.last_query.unwrap_or(since);
        // Retrying while another question fits in the window (as `next_deadline` tells).
        let retrying =
            self.dropped && last + self.requery_after() < since + self.limits.retry_dropped_for;
        if self.n_queries == 0
            || ((self.n_queries < self.limits.max_requeries || retrying)
                && now >= last + self.requery_after())
        {
            self.n_queries += 1;
            self.last_query = Some(now);
            self.last_discovery = Some(now);
            self.query_outstanding = true;
            self.actions.push_back(Action::QuerySharers);
        } else if self.n_queries >= self.limits.max_requeries
            && !retrying
            && now >= last + self.limits.stuck_grace
        {
            let missing = (0..self.picker.n_pieces())
                .find(|&p| !self.picker.have(p))
                .unwrap_or(0);
            self.finish(Err(GiveUp::NoTrustedPeer {
                piece: missing,
                n_have: self.picker.n_have(),
                n_pieces: self.picker.n_pieces(),
            }));
        }
    }

    fn finish(&mut self, result: Result<(), GiveUp>) {
        if self.finished {
            return;
        }
        self.finished = true;
        for (&peer, _) in std::mem::take(&mut self.links).iter() {
            self.picker.remove_peer(peer);
            self.actions.push_back(Action::Close { peer });
        }
        self.actions.push_back(Action::Finished(result));
    }
}

/// Blocks to keep in flight on a link delivering `rate` bytes per second.
fn depth_for(rate: f64, limits: &Limits) -> usize {
    let blocks = rate * limits.queue_time.as_secs_f64() / f64::from(limits.block_len.max(1));
    // `as` saturates (and maps NaN to 0); the clamp keeps the bounds (put in order first, as
    // `clamp` panics on a minimum above the maximum).
    let least = limits.min_depth.max(1);
    (blocks.ceil() as usize).clamp(least, limits.max_depth.max(least))
}

fn block_ref(b: Block) -> BlockRef {
    BlockRef {
        piece: b.piece,
        offset: b.offset,
        len: b.len,
    }
}

/// The pieces verified so far, as the bitfield a sharer offers.
pub fn bitfield_of(picker: &Picker) -> Bitfield {
    let n = picker.n_pieces() as usize;
    let mut bits = Bitfield::new(n);
    for piece in 0..picker.n_pieces() {
        if picker.have(piece) {
            bits.set(piece as usize);
        }
    }
    bits
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
