//! The tracker's mio reactor: one thread, one `Poll`, a slab of connections (clients and the
//! other trackers).
//!
//! It accepts connections, dials the other trackers when the core asks, moves bytes between
//! sockets and [`TrackerCore`], and turns the core's outputs into writes and closes. It holds
//! no tracker logic. Links to and from other trackers run over the secure layer
//! ([`crate::net::secure`], keyed by the service key): dialed links always, accepted ones when
//! their first bytes are the tracker-link magic (a peek decides, before anything is read).
//! An accepted connection starting with the client-link magic is a client's secure link (the
//! tracker proves the service key with the certified static key derived from it); any other is
//! a plain client link, closed unread unless the tracker was started with
//! `--accept-plain-clients` (raw test tools and the load benchmarks speak it; client_program
//! never does). On both kinds of client link the core
//! refuses the tracker hello. Shutdown comes from the
//! stdin line `quit` (read on a helper thread that wakes the loop) or SIGINT/SIGTERM (a mio
//! source); end of stdin is not a shutdown, since trackers are often started with stdin closed.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Instant;

use log::{debug, error, info, warn};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};

pub use super::core::Quotas;
use super::core::{Output, TrackerCore};
use super::disk::{DataDir, DiskError, DiskEvent, DiskHandle};
use super::durable::{self, Restored};
use super::password::{self, PasswordJob, PasswordResult};
use super::replica::Timings;
use super::state::TrackerRef;
use super::tickets::TicketIssuer;
use crate::keys::ServiceKey;
use crate::net::conn::{connect_progress, ConnectProgress, MAX_PENDING_WRITE};
use crate::net::secure::{self, SecureLink};
use crate::net::wake::{self, StdinEvent};
use crate::net::{ConnId, ConnTable, ReadEnd};
use crate::wire::frame::MAX_HANDSHAKE_FRAME;

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const SIGNALS: Token = Token(2);

/// Frames handled from one connection before the loop turns to the others.
const FRAME_BUDGET: usize = 256;
/// Threads that hash and check passwords (Argon2id), off the reactor.
const PASSWORD_WORKERS: usize = 2;
/// Connections open at once (clients, tracker links, handshakes in progress); more are
/// accepted and closed at once, with a log line.
pub const MAX_CONNECTIONS: usize = 16_384;
/// A welcomed client silent this long is closed (clients ping every 600 ms when quiet).
pub const CLIENT_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Bytes all connections' receive and send buffers may hold together before client
/// connections stop being read (see [`Limits::memory_budget`]).
pub const MEMORY_BUDGET: usize = 1024 * 1024 * 1024;

/// What the tracker's connections may take together; each has a `tracker_program` option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once (`--max-connections`).
    pub max_connections: usize,
    /// A welcomed client silent this long is closed (`--idle-timeout`, seconds).
    pub idle_timeout: std::time::Duration,
    /// The bytes every connection's receive buffer and send buffer (their allocations) may
    /// hold together (`--memory-budget`). At the budget, client connections are not read
    /// (their requests wait in the kernel) until the total is back under three quarters of
    /// it; tracker links are still read, and output still drains.
    pub memory_budget: usize,
    /// Most bytes of items in one part of a listing (`--listing-part-bytes`).
    pub listing_part: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: MAX_CONNECTIONS,
            idle_timeout: CLIENT_IDLE_TIMEOUT,
            memory_budget: MEMORY_BUDGET,
            listing_part: crate::wire::tracker_link::MAX_PART_BYTES,
        }
    }
}

/// What a tracker needs to start.
pub struct TrackerConfig {
    pub trackers: Vec<SocketAddr>,
    /// 1-based index into `trackers`.
    pub tracker_no: u16,
    /// The service's key: tracker links are authenticated with the PSK derived from it.
    pub service_key: ServiceKey,
    /// Where the key was read from (printed at start).
    pub key_path: std::path::PathBuf,
    /// The opened data directory and the state recovered from it. Every change is written
    /// there and acknowledged only once durable.
    pub data: (DataDir, Restored),
    /// Accept clients' listen addresses on other IPs than their connections' (behind a
    /// proxy); `--allow-foreign-addresses`.
    pub allow_foreign_addresses: bool,
    /// Accept plain (unencrypted) client links, as raw test harnesses and the load benchmarks
    /// speak them; `--accept-plain-clients`. By default they are refused: closed unread.
    pub accept_plain_clients: bool,
    /// What one user may hold.
    pub quotas: Quotas,
    /// What all connections may take.
    pub limits: Limits,
}

#[derive(Default)]
struct ConnData {
    /// A link we are dialing to this tracker number, until connected.
    dialing: Option<u16>,
    /// Queued in `dirty` for a flush.
    dirty: bool,
    /// The peer closed its sending side; close once our answers are written.
    read_closed: bool,
    /// Queued in `ready` for another turn (at most once).
    in_ready: bool,
    /// Accepted, and its first bytes not seen yet: a tracker link (secure) or a client's?
    sniffing: bool,
    /// A tracker link queued in `dirty_links`.
    link_dirty: bool,
    /// Not read while the core holds too many of its requests (`TrackerCore::wants_input`).
    core_paused: bool,
    /// A client link over the secure layer (not a tracker link).
    secure_client: bool,
    /// Bytes of its buffers counted in `Driver::held` (as of the last `account`).
    held: usize,
    /// Waiting in `Driver::budget_waiting` for the memory budget to free up.
    budget_paused: bool,
}

struct Driver {
    poll: Poll,
    listener: TcpListener,
    conns: ConnTable<ConnData>,
    /// Every tracker's address, in file order.
    trackers: Vec<SocketAddr>,
    core: TrackerCore,
    /// Connections with output to flush after this round.
    dirty: Vec<ConnId>,
    /// Tracker links with output to flush at the end of this turn of the loop.
    dirty_links: Vec<ConnId>,
    /// Connections that used their frame budget and may hold more input.
    ready: VecDeque<ConnId>,
    password_jobs: PasswordJobs,
    password_done: PasswordResults,
    /// Handshake parameters of tracker links (the service's PSK).
    link_params: secure::Params,
    /// The disk thread, which makes the replica's writes durable.
    disk: DiskHandle,
    /// Set once the disk failed: the tracker stops (nothing more can be made durable).
    disk_failed: Option<DiskError>,
    /// The connection cap was hit and logged; logged again once below it.
    at_cap: bool,
    /// Handshake parameters of secure client links (the service's certified static key).
    client_params: secure::Params,
    /// Plain client links are served (`--accept-plain-clients`), else refused.
    accept_plain_clients: bool,
    limits: Limits,
    /// The bytes all connections' buffers hold (the sum of their `ConnData::held`).
    held: usize,
    /// `held` reached the memory budget: client connections are not read.
    over_budget: bool,
    /// Client connections not read because of the budget, to read again once under it.
    budget_waiting: Vec<ConnId>,
}

type PasswordJobs = Sender<(ConnId, PasswordJob)>;
type PasswordResults = Receiver<(ConnId, PasswordResult)>;

/// Starts the password workers; each result is followed by a wake of the reactor.
fn start_password_workers(waker: &Arc<Waker>) -> io::Result<(PasswordJobs, PasswordResults)> {
    let (job_tx, job_rx) = mpsc::channel::<(ConnId, PasswordJob)>();
    let (done_tx, done_rx) = mpsc::channel();
    let job_rx = Arc::new(Mutex::new(job_rx));
    for i in 0..PASSWORD_WORKERS {
        let job_rx = Arc::clone(&job_rx);
        let done_tx = done_tx.clone();
        let waker = Arc::clone(waker);
        thread::Builder::new()
            .name(format!("password-{i}"))
            .spawn(move || loop {
                let job = match job_rx.lock() {
                    Ok(rx) => rx.recv(),
                    Err(_) => return,
                };
                let Ok((conn, job)) = job else {
                    return;
                };
                if done_tx.send((conn, password::run(&job))).is_err() {
                    return;
                }
                let _ = waker.wake();
            })?;
    }
    Ok((job_tx, done_rx))
}

/// Runs a tracker until it is told to stop.
pub fn run(config: TrackerConfig) -> io::Result<()> {
    let index = usize::from(config.tracker_no)
        .checked_sub(1)
        .filter(|i| *i < config.trackers.len())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "tracker number {} is not in the tracker file ({} trackers)",
                    config.tracker_no,
                    config.trackers.len()
                ),
            )
        })?;
    let addr = config.trackers[index];
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        warn!("could not raise the open file limit: {e}");
    }
    let poll = Poll::new()?;
    let mut listener = TcpListener::bind(addr)?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let _signals = wake::register_signals(poll.registry(), SIGNALS)?;
    // The loop keeps its own handle: a waker whose last handle drops closes its eventfd, and
    // the stdin thread drops its handle when input ends.
    let stdin = wake::spawn_stdin_reader(Arc::clone(&waker))?;
    let (password_jobs, password_done) = start_password_workers(&waker)?;

    let random = |what: &str| {
        getrandom::u64().map_err(|e| io::Error::other(format!("no random {what}: {e}")))
    };
    let me = TrackerRef {
        no: config.tracker_no,
        incarnation: random("incarnation id")?,
    };
    let n_trackers = u16::try_from(config.trackers.len()).unwrap_or(u16::MAX);
    let mut token_key = [0u8; 32];
    getrandom::fill(&mut token_key)
        .map_err(|e| io::Error::other(format!("no random token key: {e}")))?;
    let (data_dir, restored) = config.data;
    let disk_waker = Arc::clone(&waker);
    let disk = data_dir
        .start(Box::new(move || {
            let _ = disk_waker.wake();
        }))
        .map_err(|e| io::Error::other(e.to_string()))?;
    let core = TrackerCore::new_durable(
        me,
        n_trackers,
        random("seed")?,
        Timings::default(),
        Instant::now(),
        restored,
    )
    .with_token_key(token_key)
    .with_secure_tracker_links()
    .with_password_workers(PASSWORD_WORKERS)
    .with_idle_timeout(config.limits.idle_timeout)
    .with_max_part(config.limits.listing_part)
    .with_foreign_addresses(config.allow_foreign_addresses)
    .with_quotas(config.quotas)
    .with_tickets(TicketIssuer::new(config.service_key.clone()));
    let link_params = secure::Params::tracker_link(config.service_key.tracker_psk());
    let (static_private, _) = config.service_key.client_link_static();
    let client_params = secure::Params::client_link_responder(
        static_private,
        config.service_key.client_link_certificate(),
    );
    let mut driver = Driver {
        poll,
        listener,
        conns: ConnTable::new(),
        trackers: config.trackers.clone(),
        core,
        dirty: Vec::new(),
        dirty_links: Vec::new(),
        ready: VecDeque::new(),
        password_jobs,
        password_done,
        link_params,
        disk,
        disk_failed: None,
        at_cap: false,
        client_params,
        accept_plain_clients: config.accept_plain_clients,
        limits: config.limits,
        held: 0,
        over_budget: false,
        budget_waiting: Vec::new(),
    };
    info!("tracker {} listening on {addr}", config.tracker_no);
    // The first line on stdout: tests and scripts wait for it to know the tracker is up.
    println!("tracker {} listening on {addr}", config.tracker_no);
    // The second line: the key to write on tracker lines and to give clients.
    println!(
        "service key {} in {}",
        config.service_key.public_key(),
        config.key_path.display()
    );
    let _ = io::stdout().flush();
    let result = driver.run(&stdin);
    drop(waker);
    result
}

/// Seconds since the Unix epoch (what tickets' expiry is written in).
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Driver {
    fn run(&mut self, stdin: &Receiver<StdinEvent>) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        let mut stdin_open = true;
        self.drain_outputs(); // The replica's first dials, before the first wait.
        loop {
            if let Some(e) = self.disk_failed.take() {
                // Nothing more can be made durable, so nothing more may be acknowledged.
                return Err(io::Error::other(format!("data directory failed: {e}")));
            }
            let timeout = if self.ready.is_empty() && self.dirty_links.is_empty() {
                self.core
                    .poll_timeout()
                    .map(|t| t.saturating_duration_since(Instant::now()))
            } else {
                Some(std::time::Duration::ZERO)
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            // The clock tickets are issued by, read once per turn.
            self.core.set_unix_time(unix_now());
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_all(),
                    WAKER => {
                        while let Ok((conn, result)) = self.password_done.try_recv() {
                            self.core
                                .handle_password_done_at(conn, result, Instant::now());
                        }
                        while let Some(event) = self.disk.try_event() {
                            match event {
                                DiskEvent::Durable { ticket, .. } => {
                                    self.core.handle_durable(ticket.0)
                                }
                                DiskEvent::Snapshotted { seq } => {
                                    debug!("the snapshot of entry {seq} is durable")
                                }
                                DiskEvent::Failed(e) => self.disk_failed = Some(e),
                            }
                        }
                        while stdin_open {
                            match stdin.try_recv() {
                                Ok(StdinEvent::Line(line)) if line.trim() == "quit" => {
                                    info!("quit read on stdin: shutting down");
                                    return Ok(());
                                }
                                Ok(StdinEvent::Line(line)) => {
                                    if !line.trim().is_empty() {
                                        warn!("stdin: unknown command '{}'", line.trim());
                                    }
                                }
                                Ok(StdinEvent::TooLong) => warn!("stdin: line too long"),
                                Ok(StdinEvent::Eof) | Err(TryRecvError::Disconnected) => {
                                    debug!("stdin closed; still running");
                                    stdin_open = false;
                                }
                                Err(TryRecvError::Empty) => break,
                            }
                        }
                    }
                    SIGNALS => {
                        info!("signal received: shutting down");
                        return Ok(());
                    }
                    token => {
                        let Some(conn) = self.conns.by_token(token) else {
                            continue;
                        };
                        let id = conn.id;
                        if event.is_read_closed() || event.is_error() {
                            // The end of input (or the error) came with this event and will
                            // raise no other: from now on the reads go on until they see it.
                            conn.set_short_reads_end(false);
                        }
                        if conn.data.sniffing && !self.sniff(id) {
                            continue;
                        }
                        let Some(conn) = self.conns.get_mut(id) else {
                            continue;
                        };
                        if let Some(no) = conn.data.dialing {
                            self.dial_progress(id, no);
                            if self.conns.get(id).is_some_and(|c| c.data.dialing.is_some()) {
                                continue;
                            }
                        }
                        if event.is_writable() {
                            self.flush(id);
                        }
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.service(id);
                        }
                    }
                }
            }
            // Connections that stopped at their budget get another turn, in order.
            for _ in 0..self.ready.len() {
                if let Some(id) = self.ready.pop_front() {
                    if let Some(conn) = self.conns.get_mut(id) {
                        conn.data.in_ready = false;
                    }
                    self.service(id);
                }
            }
            self.core.handle_timeout(Instant::now());
            self.drain_outputs();
            self.flush_links();
        }
    }

    /// Writes what the turn queued on tracker links. Deferred to the end of the turn so that
    /// the messages of one turn (say, the changes of many clients a backup forwards) travel in
    /// one record and one write, not one each.
    fn flush_links(&mut self) {
        // A flush may close a link, whose close may queue more output: a few rounds, and what
        // is left goes at the next turn (which then does not wait).
        for _ in 0..4 {
            if self.dirty_links.is_empty() {
                return;
            }
            for id in std::mem::take(&mut self.dirty_links) {
                if let Some(conn) = self.conns.get_mut(id) {
                    conn.data.link_dirty = false;
                }
                self.flush(id);
            }
            self.drain_outputs();
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, peer)) => {
                    let cap = self.limits.max_connections;
                    if self.conns.len() >= cap {
                        if !self.at_cap {
                            warn!(
                                "{cap} connections open: the connection cap; \
                                 closing new connections until some close"
                            );
                            self.at_cap = true;
                        }
                        drop(stream);
                        continue;
                    }
                    if self.at_cap && self.conns.len() < cap - cap / 16 {
                        info!("below the connection cap again ({} open)", self.conns.len());
                        self.at_cap = false;
                    }
                    let _ = stream.set_nodelay(true);
                    match self.conns.insert(
                        self.poll.registry(),
                        stream,
                        MAX_HANDSHAKE_FRAME,
                        ConnData {
                            sniffing: true,
                            ..ConnData::default()
                        },
                    ) {
                        Ok(id) => {
                            debug!("conn {id}: accepted from {peer}");
                            self.short_reads_end(id);
                            self.core.handle_open(id, Instant::now());
                            self.core.handle_peer_addr(id, peer);
                        }
                        Err(e) => warn!("could not register a connection from {peer}: {e}"),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Typically EMFILE: leave the backlog for later rather than spin.
                    error!("accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// Reads and handles what `id` sent, within its budget, then flushes the answers.
    fn service(&mut self, id: ConnId) {
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        if conn.pending_write() >= MAX_PENDING_WRITE {
            conn.read_paused = true;
            return;
        }
        let tracker_link = conn.is_secure() && !conn.data.secure_client;
        if self.over_budget && !tracker_link {
            // Read again once the buffers drain under the budget (`account`).
            if !conn.data.budget_paused {
                conn.data.budget_paused = true;
                self.budget_waiting.push(id);
            }
            return;
        }
        let core = &mut self.core;
        if !core.wants_input(id) {
            // Resumed when the core next sends it something (`drain_outputs`).
            conn.data.core_paused = true;
            return;
        }
        let now = Instant::now();
        // Output cap: a client's answers (counted by an upper bound as they are made) stop
        // the reading once they would pass MAX_PENDING_WRITE; `flush` resumes it.
        let budget = if conn.is_secure() {
            usize::MAX
        } else {
            MAX_PENDING_WRITE.saturating_sub(conn.pending_write())
        };
        core.take_reply_bytes();
        core.take_pause_requested();
        let mut spent = 0usize;
        let result = conn.read_frames(FRAME_BUDGET, |payload| {
            core.handle_frame(id, payload, now);
            spent = spent.saturating_add(core.take_reply_bytes());
            // A handshake that changes the frame limit: stop, so that the frames read with
            // it (a client's requests right behind its hello) are checked against the new
            // limit, which `drain_outputs` applies before this connection is read again.
            let limit_changed = core.take_frame_limit_changed();
            let paused = core.take_pause_requested() && !core.wants_input(id);
            !limit_changed && !paused && spent < budget
        });
        match result {
            Ok(ReadEnd::WouldBlock) => {}
            Ok(ReadEnd::Budget) | Ok(ReadEnd::Stopped) => self.make_ready(id),
            Ok(ReadEnd::Eof) => {
                if conn.data.secure_client {
                    if conn.secure().is_some_and(|s| !s.is_established()) {
                        debug!("conn {id}: client closed its link during the handshake");
                    }
                } else if conn.secure().is_some_and(|s| !s.is_established()) {
                    warn!(
                        "conn {id}: tracker link closed by the peer during the handshake \
                         (does it hold this service's key?)"
                    );
                    // Not a tracker of this service (or not yet one): it holds no state the
                    // service needs, so the replica must not wait for it.
                    core.handle_handshake_failed(id, now);
                }
                debug!("conn {id}: closed by peer");
                conn.data.read_closed = true;
                // Answers to the frames before the close are still delivered (`flush` closes
                // the connection once they are written).
                self.dirty.push(id);
            }
            Err(e) => {
                warn!("conn {id}: {e}; closing");
                if !conn.data.secure_client && conn.secure().is_some_and(|s| !s.is_established()) {
                    core.handle_handshake_failed(id, now);
                }
                self.drain_outputs();
                self.close(id);
            }
        }
        // The secure layer may have handshake bytes to send, or plaintext it could not seal
        // until the handshake finished.
        if let Some(conn) = self.conns.get_mut(id) {
            if conn.is_secure() && conn.pending_write() > 0 && !conn.data.dirty {
                conn.data.dirty = true;
                self.dirty.push(id);
            }
        }
        self.drain_outputs();
        self.account(id);
    }

    /// Counts what `id`'s buffers hold now in the tracker-wide total, and stops or resumes
    /// the reading of client connections at the memory budget.
    fn account(&mut self, id: ConnId) {
        let now = self.conns.get(id).map_or(0, |c| c.held());
        let before = match self.conns.get_mut(id) {
            Some(conn) => std::mem::replace(&mut conn.data.held, now),
            None => 0,
        };
        self.held = self.held.saturating_sub(before).saturating_add(now);
        self.check_budget();
    }

    fn check_budget(&mut self) {
        let budget = self.limits.memory_budget;
        if !self.over_budget && self.held >= budget {
            self.over_budget = true;
            warn!(
                "connection buffers hold {} bytes, the memory budget ({budget}): client \
                 connections are not read until they drain",
                self.held
            );
        } else if self.over_budget && self.held < budget - budget / 4 {
            self.over_budget = false;
            info!(
                "connection buffers hold {} bytes, under the memory budget again: reading \
                 {} client connections",
                self.held,
                self.budget_waiting.len()
            );
            for id in std::mem::take(&mut self.budget_waiting) {
                if let Some(conn) = self.conns.get_mut(id) {
                    conn.data.budget_paused = false;
                }
                self.make_ready(id);
            }
        }
    }

    /// Removes `id` from the table and its buffers from the total.
    fn remove(&mut self, id: ConnId) -> bool {
        match self.conns.remove(self.poll.registry(), id) {
            Some(conn) => {
                self.held = self.held.saturating_sub(conn.data.held);
                self.check_budget();
                true
            }
            None => false,
        }
    }

    /// Looks at an accepted connection's first bytes without reading them: the tracker-link
    /// magic starts the secure handshake (a tracker of this service, or someone who must
    /// prove it), the client-link magic a client's secure link, anything else is a plain
    /// client link, refused unless `accept_plain_clients`. Returns `false` while undecided
    /// (or closed).
    fn sniff(&mut self, id: ConnId) -> bool {
        let Some(conn) = self.conns.get_mut(id) else {
            return false;
        };
        let magic = secure::TRACKER_LINK_MAGIC;
        let client_magic = secure::CLIENT_LINK_MAGIC;
        let mut head = [0u8; 4];
        let n = match conn.stream.peek(&mut head) {
            Ok(n) => n,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                return false
            }
            Err(e) => {
                debug!("conn {id}: {e}; closing");
                self.close(id);
                return false;
            }
        };
        if n > 0 && n < magic.len() && (head[..n] == magic[..n] || head[..n] == client_magic[..n]) {
            // A prefix of a magic: wait for the rest (the handshake deadline still runs).
            return false;
        }
        conn.data.sniffing = false;
        if n == client_magic.len() && head == client_magic {
            match SecureLink::responder(&self.client_params) {
                Ok(link) => {
                    conn.set_secure(link);
                    conn.data.secure_client = true;
                    debug!("conn {id}: client link handshake");
                }
                Err(e) => {
                    error!("conn {id}: {e}; closing");
                    self.close(id);
                    return false;
                }
            }
            return true;
        }
        if n == magic.len() && head == magic {
            match SecureLink::responder(&self.link_params) {
                Ok(link) => {
                    conn.set_secure(link);
                    debug!("conn {id}: tracker link handshake");
                    self.core.handle_secure(id);
                }
                Err(e) => {
                    error!("conn {id}: {e}; closing");
                    self.close(id);
                    return false;
                }
            }
            return true;
        }
        if n > 0 && !self.accept_plain_clients {
            // Nothing of a plain link is read or answered: its frames (a password in a
            // login) would cross the network in clear.
            let from = conn
                .stream
                .peer_addr()
                .map_or_else(|_| "?".to_string(), |a| a.to_string());
            warn!(
                "conn {id} from {from}: plain (unencrypted) client link refused: clients \
                 must open the secure link (tracker option --accept-plain-clients allows \
                 plain ones, for raw test tools)"
            );
            self.close(id);
            return false;
        }
        // A plain link (accepted by option), or an end of input: the usual reading handles
        // both.
        true
    }

    fn drain_outputs(&mut self) {
        while let Some(output) = self.core.poll_output() {
            match output {
                Output::Send(id, msg) => {
                    if let Some(conn) = self.conns.get_mut(id) {
                        msg.emit(conn.out());
                        if !conn.data.dirty {
                            conn.data.dirty = true;
                            self.dirty.push(id);
                        }
                        if conn.data.core_paused && self.core.wants_input(id) {
                            conn.data.core_paused = false;
                            self.make_ready(id);
                        }
                        self.account(id);
                    }
                }
                Output::SendReplica(id, msg) => {
                    if let Some(conn) = self.conns.get_mut(id) {
                        msg.emit(conn.out());
                        if !conn.data.dirty {
                            conn.data.dirty = true;
                            self.dirty.push(id);
                        }
                    }
                }
                Output::Dial(no) => self.dial(no),
                Output::SetMaxFrame(id, max) => {
                    if let Some(conn) = self.conns.get_mut(id) {
                        conn.set_max_frame(max);
                    }
                }
                Output::Password(id, job) => {
                    let _ = self.password_jobs.send((id, job));
                }
                Output::Persist(p) => {
                    if let Err(e) = self.disk.send(durable::to_disk_msg(p)) {
                        self.disk_failed.get_or_insert(e);
                    }
                }
                Output::Close(id) => {
                    if let Some(conn) = self.conns.get_mut(id) {
                        // Best effort: let the peer see what was queued before the close.
                        let _ = conn.flush(self.poll.registry());
                    }
                    self.remove(id);
                }
            }
        }
        for id in std::mem::take(&mut self.dirty) {
            if let Some(conn) = self.conns.get_mut(id) {
                conn.data.dirty = false;
                if conn.is_secure() {
                    // Secure links (tracker links, and clients' secure links) are written once
                    // at the end of the turn (`flush_links`): what a turn queued goes as one
                    // record.
                    if !conn.data.link_dirty {
                        conn.data.link_dirty = true;
                        self.dirty_links.push(id);
                    }
                    continue;
                }
            }
            self.flush(id);
        }
    }

    /// Starts a non-blocking connect to tracker `no`.
    fn dial(&mut self, no: u16) {
        let Some(addr) = usize::from(no)
            .checked_sub(1)
            .and_then(|i| self.trackers.get(i))
            .copied()
        else {
            return self.core.handle_dial_failed(no, Instant::now());
        };
        let link = match SecureLink::initiator(&self.link_params) {
            Ok(link) => link,
            Err(e) => {
                error!("tracker {no}: {e}");
                return self.core.handle_dial_failed(no, Instant::now());
            }
        };
        let inserted = mio::net::TcpStream::connect(addr).and_then(|stream| {
            let _ = stream.set_nodelay(true);
            let data = ConnData {
                dialing: Some(no),
                ..ConnData::default()
            };
            let id = self
                .conns
                .insert(self.poll.registry(), stream, MAX_HANDSHAKE_FRAME, data)?;
            if let Some(conn) = self.conns.get_mut(id) {
                conn.set_short_reads_end(true);
                // Every tracker link runs the service's handshake before any frame.
                conn.set_secure(link);
                conn.await_connect(self.poll.registry())?;
            }
            Ok(id)
        });
        match inserted {
            Ok(id) => debug!("conn {id}: dialing tracker {no} at {addr}"),
            Err(e) => {
                debug!("tracker {no} at {addr}: {e}");
                self.core.handle_dial_failed(no, Instant::now());
            }
        }
    }

    /// A dialing link became ready: connected, or failed.
    fn dial_progress(&mut self, id: ConnId, no: u16) {
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        let failed = match connect_progress(&conn.stream) {
            ConnectProgress::Connected => None,
            ConnectProgress::Pending => return,
            ConnectProgress::Failed(e) => Some(e),
        };
        match failed {
            Some(e) => {
                debug!("tracker {no}: cannot connect: {e}");
                self.remove(id);
                self.core.handle_dial_failed(no, Instant::now());
            }
            None => {
                conn.data.dialing = None;
                // The handshake's first message goes out now, whatever the core sends.
                if !conn.data.dirty {
                    conn.data.dirty = true;
                    self.dirty.push(id);
                }
                debug!("conn {id}: connected to tracker {no}");
                self.core.handle_dialed(id, no, Instant::now());
                self.drain_outputs();
            }
        }
    }

    fn flush(&mut self, id: ConnId) {
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        if let Err(e) = conn.flush(self.poll.registry()) {
            debug!("conn {id}: write failed: {e}; closing");
            self.close(id);
            return;
        }
        if conn.data.read_closed && conn.pending_write() == 0 {
            self.close(id);
            return;
        }
        if conn.read_paused && conn.pending_write() < MAX_PENDING_WRITE / 2 {
            conn.read_paused = false;
            self.make_ready(id);
        }
        self.account(id);
    }

    /// A read that returns less than it had room for ends the connection's reading: a new
    /// event comes when more arrives (see `Conn::set_short_reads_end`). Every path that stops
    /// reading for the tracker's own reasons (the frame budget, a pause) already gives the
    /// connection another turn without an event (`make_ready`), and an event that reports the
    /// peer's close turns the rule off for that connection.
    fn short_reads_end(&mut self, id: ConnId) {
        if let Some(conn) = self.conns.get_mut(id) {
            conn.set_short_reads_end(true);
        }
    }

    /// Gives `id` another turn after the current round (once, however often it is asked).
    fn make_ready(&mut self, id: ConnId) {
        if let Some(conn) = self.conns.get_mut(id) {
            if !conn.data.in_ready {
                conn.data.in_ready = true;
                self.ready.push_back(id);
            }
        }
    }

    fn close(&mut self, id: ConnId) {
        if self.remove(id) {
            self.core.handle_close(id, Instant::now());
        }
    }
}
