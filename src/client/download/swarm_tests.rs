//! A swarm simulator: the download engines and serving cores of N peers wired together on a
//! fake clock, with a rate per peer uplink and downlink and a one-way latency, no sockets.
//!
//! Time advances in steps of [`STEP`]. In each step every uplink's bytes are shared equally
//! among its links that have granted data waiting (as TCP shares a bottleneck), each capped by
//! the receiving peer's downlink share; a block whose last byte left arrives one latency later.
//! Messages (handshakes, requests, `have`s, the tracker's answers) take one latency. Pieces
//! verify at once. A leecher registers as a sharer one round trip after its first verified
//! piece, as the real client does. The finish times are checked against the bound
//! `max(size / seed uplink, leechers * size / total uplink, size / downlink)`.
//!
//! Not modelled: socket buffers and bytes in flight per link (a granted block is committed
//! to its link and sent at the link's share of the uplink; a cancel withdraws only requests
//! still held), TCP slow start and loss, hashing and disk time, latency differences between
//! links. The request pipelining depth is the engine's own (sized by measured rate).
//!
//! For investigation: `SWARM_TRACE=1` prints, every 0.5 s, the uplink use per uplink rate,
//! the seed's line and held requests, and why idle leechers idle (no piece, nobody asks, or
//! asked but waiting); `SIM_ROTATE_MS`, `SIM_REST_MS`, `SIM_LINE`, `SIM_SLOTS`,
//! `SIM_DISCOVER_MIN_MS`, `SIM_DISCOVER_MAX_MS`, `SIM_MAX_LINKS`, `SIM_QUEUE_MS` (the
//! engine's queue time) and `SIM_MIN_DEPTH` override the policy's knobs, and
//! `SIM_ORDER_SEED` the order of the first pieces.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use super::engine::{Action, Download, Limits};
use super::picker::PeerId;
use crate::bitfield::Bitfield;
use crate::client::slots::{Grant, SlotLimits, UploadSlots};
use crate::client::uploader::{Offer, Refusal, RefuseCode, Step, Uploader};
use crate::wire::peer_link::{BlockRef, DownloaderMsg, SharerMsg};
use crate::wire::tracker_link::FileMeta;
use crate::wire::{FileName, GroupId, Sha1Digest};

const MIB: u64 = 1024 * 1024;
/// 100 Mbit/s in bytes per second.
const MBIT100: f64 = 12_500_000.0;
const STEP: Duration = Duration::from_millis(5);
/// How often `SWARM_TRACE` prints a line.
const TRACE_WINDOW: Duration = Duration::from_millis(500);

type LinkId = u64;

#[derive(Debug, Clone)]
struct PeerSpec {
    up: f64,
    down: f64,
    /// When it starts its download (leechers).
    join: Duration,
}

#[derive(Debug, Clone)]
struct Scenario {
    size: u64,
    seed_up: f64,
    leechers: Vec<PeerSpec>,
    latency: Duration,
    /// The seed goes offline once every piece has left it at least once.
    seed_leaves: bool,
    /// The uplinks of more seeds, online from the start (after the leechers among the peers).
    more_seeds: Vec<f64>,
    /// Give up (and fail the test) after this much simulated time.
    limit: Duration,
}

impl Scenario {
    fn crowd(n: usize, size: u64) -> Scenario {
        Scenario {
            size,
            seed_up: MBIT100,
            leechers: vec![
                PeerSpec {
                    up: MBIT100,
                    down: 10.0 * MBIT100,
                    join: Duration::ZERO,
                };
                n
            ],
            latency: Duration::from_millis(1),
            seed_leaves: false,
            more_seeds: Vec::new(),
            limit: Duration::from_secs(120),
        }
    }

    /// One leecher and `n` seeds, all with uplinks of `up`; the leecher's downlink is their
    /// sum (the loopback case: no link is the bottleneck alone).
    fn seeds(n: usize, size: u64, up: f64) -> Scenario {
        Scenario {
            size,
            seed_up: up,
            leechers: vec![PeerSpec {
                up,
                down: up * n as f64,
                join: Duration::ZERO,
            }],
            latency: Duration::from_millis(1),
            seed_leaves: false,
            more_seeds: vec![up; n.saturating_sub(1)],
            limit: Duration::from_secs(120),
        }
    }

    /// The lower bound on the last finish time of a flash crowd.
    fn bound(&self) -> f64 {
        let size = self.size as f64;
        let seeds_up = self.seed_up + self.more_seeds.iter().sum::<f64>();
        let total_up = seeds_up + self.leechers.iter().map(|l| l.up).sum::<f64>();
        let by_seed = size / seeds_up;
        let by_total = self.leechers.len() as f64 * size / total_up;
        let by_down = self
            .leechers
            .iter()
            .map(|l| l.join.as_secs_f64() + size / l.down)
            .fold(0.0, f64::max);
        // Late joiners: those joining at or after a time need at least their share of the
        // total upload after it.
        let by_late = self
            .leechers
            .iter()
            .map(|l| {
                let later = self.leechers.iter().filter(|o| o.join >= l.join).count();
                l.join.as_secs_f64() + later as f64 * size / total_up
            })
            .fold(0.0, f64::max);
        by_seed.max(by_total).max(by_down).max(by_late)
    }
}

struct Peer {
    addr: SocketAddr,
    up: f64,
    down: f64,
    join: Duration,
    download: Option<Download>,
    /// Verified pieces (all of them for the seed).
    have: Vec<bool>,
    registered: bool,
    online: bool,
    /// The downloader's peer ids and their links.
    fetch: BTreeMap<PeerId, LinkId>,
    slots: UploadSlots<LinkId>,
    finished: Option<Duration>,
    failed: Option<String>,
}

struct Link {
    downloader: usize,
    sharer: usize,
    peer: PeerId,
    core: Uploader,
    serving: bool,
    /// Granted blocks being sent: the block and the bytes still to send.
    queue: VecDeque<(BlockRef, f64)>,
}

enum Event {
    ToSharer(LinkId, DownloaderMsg),
    ToDownloader(LinkId, SharerMsg),
    BlockArrives(LinkId, BlockRef),
    Connected(LinkId),
    ConnectFailed(usize, PeerId),
    Sharers(usize),
    Registered(usize),
    Checked(usize, u32),
    Join(usize),
}

struct Sim {
    base: Instant,
    now: Duration,
    scenario: Scenario,
    meta: FileMeta,
    group: GroupId,
    limits: Limits,
    peers: Vec<Peer>,
    links: BTreeMap<LinkId, Link>,
    next_link: LinkId,
    events: BTreeMap<(Duration, u64), Event>,
    next_event: u64,
    /// Links with granted data waiting, per sharer.
    busy: BTreeSet<(usize, LinkId)>,
    /// How many times each piece left the seed (for `seed_leaves`).
    seed_sent: Vec<u64>,
    /// Bytes each peer uploaded.
    uploaded: Vec<u64>,
    /// `SWARM_TRACE` set: per-window utilisation lines on stderr, and the bytes uploaded at
    /// the last window's start.
    trace: bool,
    traced_at: Duration,
    traced_up: Vec<u64>,
}

fn meta(size: u64) -> FileMeta {
    let piece_len = 512 * 1024;
    let n = FileMeta::n_pieces_for(size, piece_len);
    FileMeta {
        name: FileName::new("crowd.bin").unwrap(),
        size,
        piece_len,
        file_sha1: Sha1Digest([0xcd; 20]),
        piece_hashes: (0..n).map(|i| Sha1Digest([i as u8; 20])).collect(),
    }
}

impl Sim {
    fn new(scenario: Scenario, limits: Limits, slots: SlotLimits) -> Sim {
        let meta = meta(scenario.size);
        let n_pieces = meta.piece_hashes.len();
        let addr = |i: usize| SocketAddr::from((Ipv4Addr::new(127, 0, 0, 1), 10_000 + i as u16));
        let mut peers = vec![Peer {
            addr: addr(0),
            up: scenario.seed_up,
            down: MBIT100 * 10.0,
            join: Duration::ZERO,
            download: None,
            have: vec![true; n_pieces],
            registered: true,
            online: true,
            fetch: BTreeMap::new(),
            slots: UploadSlots::new(slots.clone()),
            finished: Some(Duration::ZERO),
            failed: None,
        }];
        for (i, spec) in scenario.leechers.iter().enumerate() {
            peers.push(Peer {
                addr: addr(i + 1),
                up: spec.up,
                down: spec.down,
                join: spec.join,
                download: None,
                have: vec![false; n_pieces],
                registered: false,
                online: true,
                fetch: BTreeMap::new(),
                slots: UploadSlots::new(slots.clone()),
                finished: None,
                failed: None,
            });
        }
        for (i, &up) in scenario.more_seeds.iter().enumerate() {
            peers.push(Peer {
                addr: addr(scenario.leechers.len() + 1 + i),
                up,
                down: MBIT100 * 10.0,
                join: Duration::ZERO,
                download: None,
                have: vec![true; n_pieces],
                registered: true,
                online: true,
                fetch: BTreeMap::new(),
                slots: UploadSlots::new(slots.clone()),
                finished: Some(Duration::ZERO),
                failed: None,
            });
        }
        let n_peers = peers.len();
        let mut sim = Sim {
            base: Instant::now(),
            now: Duration::ZERO,
            scenario,
            meta,
            group: GroupId::new("crowd").unwrap(),
            limits,
            peers,
            links: BTreeMap::new(),
            next_link: 0,
            events: BTreeMap::new(),
            next_event: 0,
            busy: BTreeSet::new(),
            seed_sent: vec![0; n_pieces],
            uploaded: vec![0; n_peers],
            trace: std::env::var_os("SWARM_TRACE").is_some(),
            traced_at: Duration::ZERO,
            traced_up: vec![0; n_peers],
        };
        // The leechers join (the seeds after them do not download).
        for i in 1..=sim.scenario.leechers.len() {
            let join = sim.peers[i].join;
            sim.at(join, Event::Join(i));
        }
        sim
    }

    fn instant(&self) -> Instant {
        self.base + self.now
    }

    fn at(&mut self, when: Duration, event: Event) {
        self.next_event += 1;
        self.events.insert((when, self.next_event), event);
    }

    fn later(&mut self, event: Event) {
        let when = self.now + self.scenario.latency;
        self.at(when, event);
    }

    fn sharers(&self, except: usize) -> Vec<SocketAddr> {
        self.peers
            .iter()
            .enumerate()
            .filter(|(i, p)| *i != except && p.online && p.registered)
            .map(|(_, p)| p.addr)
            .collect()
    }

    /// Runs until every leecher finished or failed; returns the finish times.
    fn run(&mut self) -> Vec<Duration> {
        let n = self.peers.len();
        while self.now <= self.scenario.limit {
            self.handle_events();
            for i in 1..n {
                let now = self.instant();
                if let Some(d) = self.peers[i].download.as_mut() {
                    if d.next_deadline().is_some_and(|t| t <= now) {
                        d.on_tick(now);
                    }
                }
                self.run_actions(i);
            }
            if self.peers[1..]
                .iter()
                .all(|p| p.finished.is_some() || p.failed.is_some())
            {
                break;
            }
            self.transmit();
            self.maybe_trace();
            self.maybe_seed_leaves();
            self.now += STEP;
        }
        for p in &self.peers[1..] {
            assert!(p.failed.is_none(), "a download failed: {:?}", p.failed);
        }
        self.peers[1..=self.scenario.leechers.len()]
            .iter()
            .map(|p| p.finished.expect("every leecher finishes in time"))
            .collect()
    }

    /// The leechers' waste together: bytes discarded, second requests (end-game, relief).
    fn waste(&self) -> (u64, u64, u64) {
        self.peers[1..=self.scenario.leechers.len()]
            .iter()
            .filter_map(|p| p.download.as_ref())
            .map(|d| d.waste())
            .fold((0, 0, 0), |(b, e, r), w| {
                (
                    b + w.discarded_bytes,
                    e + w.seconds.endgame,
                    r + w.seconds.relief,
                )
            })
    }

    fn handle_events(&mut self) {
        while let Some(entry) = self.events.first_entry() {
            if entry.key().0 > self.now {
                break;
            }
            let event = entry.remove();
            self.handle(event);
        }
    }

    fn handle(&mut self, event: Event) {
        let now = self.instant();
        match event {
            Event::Join(i) => {
                let addrs = self.sharers(i);
                let limits = Limits {
                    piece_order_seed: self.limits.piece_order_seed.wrapping_mul(1000) + i as u64,
                    ..self.limits.clone()
                };
                let mut d = Download::new(self.group.clone(), self.meta.clone(), limits);
                d.start(&addrs, now);
                self.peers[i].download = Some(d);
            }
            Event::Connected(link) => {
                let Some(l) = self.links.get(&link) else {
                    return;
                };
                if !self.peers[l.sharer].online {
                    let (d, peer) = (l.downloader, l.peer);
                    self.close_link(link);
                    if let Some(dl) = self.peers[d].download.as_mut() {
                        dl.on_link_lost(peer, "refused", now);
                    }
                }
            }
            Event::ConnectFailed(i, peer) => {
                if let Some(d) = self.peers[i].download.as_mut() {
                    d.on_link_lost(peer, "cannot connect", now);
                }
            }
            Event::Sharers(i) => {
                let addrs = self.sharers(i);
                if let Some(d) = self.peers[i].download.as_mut() {
                    d.on_sharers(&addrs, now);
                }
            }
            Event::Registered(i) => self.peers[i].registered = true,
            Event::Checked(i, piece) => {
                if let Some(d) = self.peers[i].download.as_mut() {
                    d.on_piece_checked(piece, true, now);
                }
            }
            Event::ToSharer(link, msg) => self.at_sharer(link, msg),
            Event::ToDownloader(link, msg) => self.at_downloader(link, msg),
            Event::BlockArrives(link, b) => {
                let Some(l) = self.links.get(&link) else {
                    return;
                };
                let (i, peer) = (l.downloader, l.peer);
                if let Some(d) = self.peers[i].download.as_mut() {
                    let verdict = d.on_block_header(peer, b.piece, b.offset, b.len, now);
                    if verdict == super::picker::Verdict::Write {
                        d.on_block_written(peer, b.piece, b.offset, b.len);
                    }
                }
            }
        }
    }

    fn at_sharer(&mut self, link: LinkId, msg: DownloaderMsg) {
        let Some(l) = self.links.get_mut(&link) else {
            return;
        };
        let j = l.sharer;
        if let DownloaderMsg::Cancel(b) = &msg {
            self.peers[j].slots.cancel(link, *b);
            return;
        }
        let have = &self.peers[j].have;
        let step = l
            .core
            .handle_msg(msg, |p| have.get(p as usize).copied().unwrap_or(false));
        match step {
            Ok(Step::LookUp { .. }) => {
                let p = &self.peers[j];
                let offer = if p.online && p.registered {
                    let mut bits = Bitfield::new(p.have.len());
                    for (i, _) in p.have.iter().enumerate().filter(|(_, h)| **h) {
                        bits.set(i);
                    }
                    Ok(Offer {
                        size: self.meta.size,
                        piece_len: self.meta.piece_len,
                        bitfield: bits,
                    })
                } else {
                    Err(Refusal {
                        code: RefuseCode::NotShared,
                        message: "not shared".into(),
                    })
                };
                let answer = l.core.handle_offer(offer);
                if matches!(answer, SharerMsg::Accept { .. }) {
                    l.serving = true;
                    let seed = self.peers[j].have.iter().all(|&h| h);
                    let n = self.peers[j].have.len() as u32;
                    self.peers[j]
                        .slots
                        .add_link(link, self.meta.file_sha1, n, seed);
                }
                self.later(Event::ToDownloader(link, answer));
            }
            Ok(Step::Send(msg)) => self.later(Event::ToDownloader(link, msg)),
            Ok(Step::Block { block, start }) => {
                self.peers[j].slots.request(link, block, start);
                self.take_grants(j);
            }
            Ok(Step::Nothing) => {}
            Err(e) => panic!("serve error {e}"),
        }
    }

    fn take_grants(&mut self, j: usize) {
        while let Some(g) = self.peers[j].slots.poll_grant() {
            match g {
                Grant::Send { link, block, .. } => {
                    if let Some(l) = self.links.get_mut(&link) {
                        l.queue.push_back((block, f64::from(block.len)));
                        self.busy.insert((j, link));
                    }
                }
                Grant::Reject { link, block } => {
                    self.later(Event::ToDownloader(link, SharerMsg::Rejected(block)))
                }
            }
        }
    }

    fn at_downloader(&mut self, link: LinkId, msg: SharerMsg) {
        let now = self.instant();
        let Some(l) = self.links.get(&link) else {
            return;
        };
        let (i, peer) = (l.downloader, l.peer);
        let Some(d) = self.peers[i].download.as_mut() else {
            return;
        };
        match msg {
            SharerMsg::Accept { bitfield, .. } => d.on_accept(peer, &bitfield, now),
            SharerMsg::Refuse { message, .. } => {
                d.on_refused(peer, &message, now);
                self.close_link(link);
            }
            SharerMsg::Have { piece } => d.on_have(peer, piece, now),
            SharerMsg::Rejected(b) => d.on_rejected(peer, b, now),
            SharerMsg::Block { .. } => unreachable!("blocks travel as BlockArrives"),
        }
    }

    fn close_link(&mut self, link: LinkId) {
        if let Some(l) = self.links.remove(&link) {
            self.busy.remove(&(l.sharer, link));
            self.peers[l.sharer].slots.remove_link(link);
            self.peers[l.downloader].fetch.remove(&l.peer);
            self.take_grants(l.sharer);
        }
    }

    fn run_actions(&mut self, i: usize) {
        loop {
            let now = self.instant();
            let Some(action) = self.peers[i]
                .download
                .as_mut()
                .and_then(|d| d.poll_action())
            else {
                return;
            };
            match action {
                Action::Connect { peer, addr } => {
                    match self.peers.iter().position(|p| p.addr == addr && p.online) {
                        Some(j) => {
                            self.next_link += 1;
                            let link = self.next_link;
                            self.links.insert(
                                link,
                                Link {
                                    downloader: i,
                                    sharer: j,
                                    peer,
                                    core: Uploader::new(),
                                    serving: false,
                                    queue: VecDeque::new(),
                                },
                            );
                            self.peers[i].fetch.insert(peer, link);
                            self.later(Event::Connected(link));
                        }
                        None => self.later(Event::ConnectFailed(i, peer)),
                    }
                }
                Action::Send { peer, msg } => {
                    if let Some(&link) = self.peers[i].fetch.get(&peer) {
                        self.later(Event::ToSharer(link, msg));
                    }
                }
                Action::Close { peer } => {
                    if let Some(&link) = self.peers[i].fetch.get(&peer) {
                        self.close_link(link);
                    }
                }
                Action::Verify { piece } => {
                    let when = self.now + STEP;
                    self.at(when, Event::Checked(i, piece));
                }
                Action::Verified { piece } => {
                    self.peers[i].have[piece as usize] = true;
                    if !self.peers[i].registered {
                        let when = self.now + 2 * self.scenario.latency;
                        self.at(when, Event::Registered(i));
                    }
                    let serving: Vec<LinkId> = self
                        .links
                        .iter()
                        .filter(|(_, l)| l.sharer == i && l.serving)
                        .map(|(&id, _)| id)
                        .collect();
                    for link in serving {
                        self.later(Event::ToDownloader(link, SharerMsg::Have { piece }));
                    }
                }
                Action::QuerySharers => {
                    let when = self.now + 2 * self.scenario.latency;
                    self.at(when, Event::Sharers(i));
                }
                Action::Finished(Ok(())) => {
                    self.peers[i].finished = Some(self.now);
                    let links: Vec<LinkId> = self.peers[i].fetch.values().copied().collect();
                    for link in links {
                        self.close_link(link);
                    }
                    let _ = now;
                }
                Action::Finished(Err(e)) => self.peers[i].failed = Some(e.to_string()),
            }
        }
    }

    /// One step of data: every uplink shared among its busy links, each capped by its
    /// receiver's downlink share.
    fn transmit(&mut self) {
        let dt = STEP.as_secs_f64();
        let mut n_out: BTreeMap<usize, usize> = BTreeMap::new();
        let mut n_in: BTreeMap<usize, usize> = BTreeMap::new();
        for &(j, link) in &self.busy {
            *n_out.entry(j).or_default() += 1;
            if let Some(l) = self.links.get(&link) {
                *n_in.entry(l.downloader).or_default() += 1;
            }
        }
        let busy: Vec<(usize, LinkId)> = self.busy.iter().copied().collect();
        let mut drained = Vec::new();
        for (j, link) in busy {
            let Some(l) = self.links.get_mut(&link) else {
                continue;
            };
            let up = self.peers[j].up / n_out[&j] as f64;
            let down = self.peers[l.downloader].down / n_in[&l.downloader] as f64;
            let mut budget = up.min(down) * dt;
            while budget > 0.0 {
                let Some((block, left)) = l.queue.front_mut() else {
                    break;
                };
                let sent = left.min(budget);
                *left -= sent;
                budget -= sent;
                self.uploaded[j] += sent as u64;
                if *left <= 0.5 {
                    let block = *block;
                    l.queue.pop_front();
                    if j == 0 {
                        self.seed_sent[block.piece as usize] += u64::from(block.len);
                    }
                    let when = self.now + STEP + self.scenario.latency;
                    self.next_event += 1;
                    self.events
                        .insert((when, self.next_event), Event::BlockArrives(link, block));
                }
            }
            if l.queue.is_empty() {
                drained.push((j, link));
            }
        }
        for (j, link) in drained {
            self.busy.remove(&(j, link));
            self.peers[j].slots.drained(link);
            self.take_grants(j);
        }
    }

    /// With `SWARM_TRACE` set, every [`TRACE_WINDOW`]: the seed's and the leechers' uplink
    /// use, who idles and why (nobody linked asks, or it holds nothing others lack), and where
    /// requests wait.
    fn maybe_trace(&mut self) {
        if !self.trace || self.now < self.traced_at + TRACE_WINDOW {
            return;
        }
        let dt = (self.now - self.traced_at).as_secs_f64();
        let util = |i: usize, s: &Sim| {
            (s.uploaded[i] - s.traced_up[i]) as f64 / (s.peers[i].up * dt) * 100.0
        };
        let seed_util = util(0, self);
        let running: Vec<usize> = (1..self.peers.len())
            .filter(|&i| self.peers[i].download.is_some() && self.peers[i].finished.is_none())
            .collect();
        let mut sum = 0.0;
        let mut idle_nobody_asks = 0;
        let mut idle_waits = 0;
        let mut idle_no_pieces = 0;
        for i in 1..self.peers.len() {
            if self.peers[i].download.is_none() {
                continue;
            }
            let u = util(i, self);
            sum += u;
            if u < 20.0 {
                let n_have = self.peers[i].have.iter().filter(|&&h| h).count();
                let asked = self
                    .links
                    .iter()
                    .any(|(&id, l)| l.sharer == i && self.peers[i].slots.n_held(id) > 0);
                if n_have == 0 {
                    idle_no_pieces += 1;
                } else if asked {
                    idle_waits += 1;
                } else {
                    idle_nobody_asks += 1;
                }
            }
        }
        let n = self.peers.len() - 1;
        let held_at_seed: usize = self
            .links
            .iter()
            .filter(|(_, l)| l.sharer == 0)
            .map(|(&id, _)| self.peers[0].slots.n_held(id))
            .sum();
        let held_at_leechers: usize = self
            .links
            .iter()
            .filter(|(_, l)| l.sharer != 0)
            .map(|(&id, l)| self.peers[l.sharer].slots.n_held(id))
            .sum();
        let waiting_links: usize = (1..self.peers.len())
            .map(|i| self.peers[i].slots.n_waiting())
            .sum();
        let mean_have: f64 = (1..self.peers.len())
            .map(|i| self.peers[i].have.iter().filter(|&&h| h).count() as f64)
            .sum::<f64>()
            / n as f64;
        let in_swarm = (0..self.seed_sent.len())
            .filter(|&p| self.peers[1..].iter().any(|l| l.have[p]))
            .count();
        // Uplink use per uplink rate (uneven uplinks), in Mbit/s: percent.
        let mut by_rate: BTreeMap<u64, (f64, usize)> = BTreeMap::new();
        for i in 1..self.peers.len() {
            let e = by_rate
                .entry((self.peers[i].up * 8.0 / 1e6) as u64)
                .or_default();
            e.0 += util(i, self);
            e.1 += 1;
        }
        let classes: Vec<String> = by_rate
            .iter()
            .map(|(r, (u, n))| format!("{r}:{:.0}%", u / *n as f64))
            .collect();
        eprintln!(
            "t={:5.2} [{}] seed {:3.0}% (waiting {:3}, held {:4}) | leechers {:3.0}% running {:3}; idle: no piece {:3}, nobody asks {:3}, asked {:3}; held {:5}, links waiting {:4} | pieces: mean {:5.1}, in swarm {:4}, seed sent {:.2}x",
            self.now.as_secs_f64(),
            classes.join(" "),
            seed_util,
            self.peers[0].slots.n_waiting(),
            held_at_seed,
            sum / n as f64,
            running.len(),
            idle_no_pieces,
            idle_nobody_asks,
            idle_waits,
            held_at_leechers,
            waiting_links,
            mean_have,
            in_swarm,
            self.uploaded[0] as f64 / self.scenario.size as f64,
        );
        self.traced_at = self.now;
        self.traced_up = self.uploaded.clone();
    }

    fn maybe_seed_leaves(&mut self) {
        if !self.scenario.seed_leaves || !self.peers[0].online {
            return;
        }
        // Out = verified by some leecher.
        let all_out = (0..self.seed_sent.len()).all(|p| self.peers[1..].iter().any(|l| l.have[p]));
        if all_out {
            self.peers[0].online = false;
            let links: Vec<LinkId> = self
                .links
                .iter()
                .filter(|(_, l)| l.sharer == 0)
                .map(|(&id, _)| id)
                .collect();
            let now = self.instant();
            for link in links {
                let l = &self.links[&link];
                let (i, peer) = (l.downloader, l.peer);
                self.close_link(link);
                if let Some(d) = self.peers[i].download.as_mut() {
                    d.on_link_lost(peer, "the seed left", now);
                }
            }
        }
    }

    fn report(&self, name: &str, times: &[Duration]) -> f64 {
        let last = times
            .iter()
            .max()
            .copied()
            .unwrap_or_default()
            .as_secs_f64();
        let bound = self.scenario.bound();
        let seed_total: u64 = self.uploaded[0];
        // The leechers only (more seeds come after them).
        let leechers = 1..=self.scenario.leechers.len();
        let leech_up: u64 = self.uploaded[leechers.clone()].iter().sum();
        let leech_cap: f64 = self.peers[leechers].iter().map(|p| p.up).sum::<f64>() * last;
        eprintln!(
            "{name}: last {last:.2} s, bound {bound:.2} s ({:.2}x); first {:.2} s; seed sent {:.2}x the file; leechers used {:.0}% of their uplinks",
            last / bound,
            times.iter().min().copied().unwrap_or_default().as_secs_f64(),
            seed_total as f64 / self.scenario.size as f64,
            leech_up as f64 * 100.0 / leech_cap,
        );
        let n = self.scenario.leechers.len().max(1) as f64;
        let (discarded, endgame, relief) = self.waste();
        eprintln!(
            "{name}: per leecher: discarded {:.2}% of the file, second requests {:.1} end-game, {:.1} relief",
            discarded as f64 * 100.0 / n / self.scenario.size as f64,
            endgame as f64 / n,
            relief as f64 / n,
        );
        last / bound
    }
}

fn run(name: &str, scenario: Scenario, limits: Limits, slots: SlotLimits) -> f64 {
    run_sim(name, scenario, limits, slots).0
}

/// [`run`], also returning the simulator (to read the peers' counters).
fn run_sim(
    name: &str,
    scenario: Scenario,
    mut limits: Limits,
    mut slots: SlotLimits,
) -> (f64, Sim) {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    if let Some(ms) = env("SIM_ROTATE_MS") {
        limits.rotate_interval = Duration::from_millis(ms);
    }
    if let Some(ms) = env("SIM_REST_MS") {
        limits.reject_rest = Duration::from_millis(ms);
    }
    if let Some(ms) = env("SIM_DISCOVER_MIN_MS") {
        limits.discover_min = Duration::from_millis(ms);
    }
    if let Some(ms) = env("SIM_DISCOVER_MAX_MS") {
        limits.discover_max = Duration::from_millis(ms);
    }
    if let Some(ms) = env("SIM_QUEUE_MS") {
        limits.queue_time = Duration::from_millis(ms);
    }
    if let Some(n) = env("SIM_MIN_DEPTH") {
        limits.min_depth = n as usize;
    }
    if let Some(n) = env("SIM_MAX_LINKS") {
        limits.max_links = n as usize;
    }
    if let Some(n) = env("SIM_LINE") {
        slots.line = n as usize;
    }
    if let Some(n) = env("SIM_SLOTS") {
        slots.slots = n as usize;
    }
    let mut sim = Sim::new(scenario, limits, slots);
    let times = sim.run();
    let ratio = sim.report(name, &times);
    (ratio, sim)
}

/// Today's engine and serving (before this simulator): the crowd is served one seed-load
/// after another.
#[test]
fn before_live_discovery_a_crowd_of_8_takes_8_seed_loads() {
    let ratio = run(
        "before: crowd of 8",
        Scenario::crowd(8, 64 * MIB),
        Limits {
            piece_order_seed: 0,
            ..Limits::default().without_discovery()
        },
        SlotLimits::unlimited(),
    );
    assert!(ratio > 6.0, "{ratio:.2}x the bound");
}

/// The engine's limits for the scenarios; `SIM_ORDER_SEED` draws another order of the first
/// pieces (the simulator is deterministic but chaotic: a policy change should be judged over
/// several orders, not one).
fn limits() -> Limits {
    let seed = std::env::var("SIM_ORDER_SEED")
        .ok()
        .and_then(|v| v.parse().ok());
    Limits {
        piece_order_seed: seed.unwrap_or(1),
        ..Limits::default()
    }
}

#[test]
fn flash_crowd_of_8() {
    let ratio = run(
        "crowd of 8",
        Scenario::crowd(8, 64 * MIB),
        limits(),
        SlotLimits::default(),
    );
    // 1.11x (2026-12-04); 1.09x with the bounded end-game.
    assert!(ratio <= 1.2, "the last leecher took {ratio:.2}x the bound");
}

#[test]
fn flash_crowd_of_32() {
    let ratio = run(
        "crowd of 32",
        Scenario::crowd(32, 64 * MIB),
        limits(),
        SlotLimits::default(),
    );
    // 1.28x (2026-12-04).
    assert!(ratio <= 1.35, "the last leecher took {ratio:.2}x the bound");
}

/// At the aim (1.5x): 1.47x, 1.44x with the bounded end-game (2026-12-04; 1.62x before two upload slots, a rotation every
/// 250 ms and 64 links); the seed sends the file about 1.4 times and the leechers use about
/// 70% of their uplinks (their first second is spent getting a first piece and being found).
/// Run in release builds only (about 8 minutes in a debug build, seconds in release):
/// `cargo test --release --lib flash_crowd_of_128`, which `.ci/run` does.
#[test]
#[cfg_attr(debug_assertions, ignore = "slow in debug builds: run with --release")]
fn flash_crowd_of_128() {
    let ratio = run(
        "crowd of 128",
        Scenario::crowd(128, 64 * MIB),
        limits(),
        SlotLimits::default(),
    );
    assert!(ratio <= 1.5, "the last leecher took {ratio:.2}x the bound");
}

#[test]
fn late_joiners() {
    let mut scenario = Scenario::crowd(16, 64 * MIB);
    for (i, l) in scenario.leechers.iter_mut().enumerate().skip(8) {
        l.join = Duration::from_millis(1000 + 250 * i as u64);
    }
    let ratio = run("late joiners", scenario, limits(), SlotLimits::default());
    // 1.40x (2026-12-04); 1.38x with the bounded end-game.
    assert!(ratio <= 1.45, "the last leecher took {ratio:.2}x the bound");
}

#[test]
fn the_seed_leaves_once_every_piece_is_out() {
    let mut scenario = Scenario::crowd(16, 64 * MIB);
    scenario.seed_leaves = true;
    let ratio = run("seed leaves", scenario, limits(), SlotLimits::default());
    // 1.20x (2026-12-04).
    assert!(ratio <= 1.3, "the last leecher took {ratio:.2}x the bound");
}

#[test]
fn uneven_uplinks() {
    let mut scenario = Scenario::crowd(16, 64 * MIB);
    for (i, l) in scenario.leechers.iter_mut().enumerate() {
        l.up = match i % 4 {
            0 => MBIT100 / 10.0,
            1 => MBIT100 / 4.0,
            2 => MBIT100,
            _ => MBIT100 * 2.0,
        };
    }
    // Not at the aim yet (1.5x): 1.59x (1.76x before two upload slots); the fast uplinks
    // get pieces no sooner than the slow ones and idle. Guards against losing what is
    // reached.
    let ratio = run("uneven uplinks", scenario, limits(), SlotLimits::default());
    assert!(ratio <= 1.65, "the last leecher took {ratio:.2}x the bound");
}

/// One downloader and several seeds (the loopback case of the black-box sweep, where 8 MiB
/// from 4 sharers arrived 40-55% more than once). Returns the bytes the seeds sent beyond the
/// file, per byte of the file (discarded copies, and the blocks cut off when the finished
/// download closes its links), the second requests and the time per bound.
fn seeds_case(n_seeds: usize, mib: u64) -> (f64, u64, f64) {
    let size = mib * MIB;
    let name = format!("{mib} MiB from {n_seeds} seeds");
    let (ratio, sim) = run_sim(
        &name,
        Scenario::seeds(n_seeds, size, MBIT100),
        limits(),
        SlotLimits::default(),
    );
    let (discarded, endgame, relief) = sim.waste();
    let sent: u64 = sim.uploaded.iter().sum();
    let over = sent.saturating_sub(size) as f64 / size as f64;
    eprintln!(
        "{name}: sent {:.1}% more than the file, discarded {:.1}%; second requests: {endgame} end-game, {relief} relief",
        over * 100.0,
        discarded as f64 * 100.0 / size as f64,
    );
    (over, endgame + relief, ratio)
}

/// The end-game asks for few second copies, so little is sent twice, and the download still
/// ends near the bound. (The sharers here hold requests and grant them a turn at a time, so
/// a cancel usually withdraws the loser's request: the waste is smaller than on loopback,
/// where requests are granted at once; the second requests are what the policy decides.)
#[test]
fn several_seeds_send_little_twice() {
    // SIM_ORDER_SEED 1, 2, 3 (2026-12-04), before the end-game was bounded -> after: 4 seeds,
    // 8 MiB: 47-51 second requests, 7.3% sent beyond the file -> 4-6, 6.0% (the rest is
    // blocks cut off at the end); 2 seeds, 8 MiB: 24-31, 4.3% -> 2, 3.0%; 4 seeds, 64 MiB:
    // 125, 1.0% -> 4-6, 0.7%. Times unchanged (1.16x, 1.09x, 1.02x the bound).
    for (n_seeds, mib, most_over, most_seconds) in [
        (4, 8, 0.1, 8),
        (2, 8, 0.1, 4),
        (4, 64, 0.02, 8),
        (1, 8, 0.0, 0),
    ] {
        let (over, seconds, ratio) = seeds_case(n_seeds, mib);
        assert!(
            over <= most_over,
            "{n_seeds} seeds: {over:.3} of the file sent again"
        );
        assert!(
            seconds <= most_seconds,
            "{n_seeds} seeds: {seconds} second requests"
        );
        assert!(ratio <= 1.2, "{n_seeds} seeds: {ratio:.2}x the bound");
    }
}
