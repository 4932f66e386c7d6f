//! The client's peer links: the IO shell around the download engines and the serving core.
//!
//! [`Transfers`] owns every peer connection of the client (one [`ConnTable`] on the client's
//! one mio reactor) and every running download; this module holds the table, dispatches mio
//! events, keeps the links' timers and moves bytes, and its children hold the rest:
//!
//! - `downloads`: each running download's engine, `.part` map and whole-file digest, and
//!   what the engine asks for (links, messages, pieces to verify, the end).
//! - `fetch`: the links this client opened to sharers; the sharer's bytes go where the
//!   link's `SharerStream` decoder says, block data straight into the `.part` map.
//! - `serve`: the links other clients opened to fetch what this client shares; the
//!   [`Uploader`] core decides, blocks go out straight from the source's map.
//!
//! Caps, so that links others open can never take what this client's own downloads need:
//! served links and this client's own (fetch) links have separate limits
//! ([`PeerCaps`]), served links are limited per remote address too, a served link must send its
//! handshake within [`SERVE_HANDSHAKE_TIMEOUT`] (3 s) and is closed after [`SERVE_IDLE_TIMEOUT`] without a frame from its
//! downloader (while nothing is queued for it). A connection over a cap takes the place of
//! the quietest served link not yet accepted (no valid handshake yet), or is closed at once
//! when every served link under that cap is accepted.
//!
//! Tickets: a download holds the tracker's ticket for its file and sends it on each fetch link
//! before the handshake, and again on every open link when it is renewed (asked for when less
//! than half of its life is left). A served link is accepted only with a ticket that the
//! service key (the one this client's tracker proved) signed for that group and content and
//! that has not expired, and it is closed when its ticket expires without a renewal.
//!
//! Nothing here decides what a download or a serve link does next: the `Download` engine and
//! the `Uploader` core do. What needs the tracker or the command loop comes out as
//! [`TransferEvent`]s.

mod downloads;
mod fetch;
mod serve;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::net::peer_secure::{CipherPrefs, SealedDownloaderStream};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use log::{debug, warn};
use mio::net::TcpStream;
use mio::{Registry, Token};

use super::download::engine::{Limits, Progress};
use super::identity::ClientIdentity;
use super::outcome::Completed;
use super::session::{ClientCore, DownloadError, DownloadId};
use super::slots::{SlotLimits, UploadSlots};
use super::unsent::{UnsentLimit, MIN_UNSENT};
use super::uploader::Uploader;
use crate::hasher::HashPool;
use crate::keys::PublicKey;
use crate::net::{ConnId, ConnTable};
use crate::wire::peer_link::DownloaderMsg;
use crate::wire::peer_link::MAX_DOWNLOADER_FRAME;
use crate::wire::ticket::Ticket;
use downloads::Active;
use fetch::FetchLink;
use serve::ServeLink;

/// Bytes read from one fetch link before the others get a turn.
const READ_BUDGET: usize = 8 * 1024 * 1024;
/// Frames read from one serve link before the others get a turn.
const FRAME_BUDGET: usize = 256;
/// How long a serve link may take to send its handshake (its ticket and handshake ride in the
/// downloader's first message, so an honest downloader needs one round trip; a connection
/// that stays silent only holds a place under the caps, and is evicted sooner when a new
/// connection needs that place, see [`Transfers::accept`]).
pub const SERVE_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Most links this client opens for its own downloads.
pub const MAX_FETCH_LINKS: usize = 4096;
/// Most served links at once (links other clients opened to fetch from this one).
pub const MAX_SERVE_LINKS: usize = 1024;
/// Most served links from one remote IP address.
pub const MAX_SERVE_LINKS_PER_ADDR: usize = 64;
/// A served link whose downloader sent nothing for this long, while nothing is queued for it,
/// is closed (a downloader with work in flight sends requests far more often).
pub const SERVE_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often served links are looked at for idleness.
const IDLE_CHECK_EVERY: Duration = Duration::from_secs(1);
/// Scratch space for data that is read and dropped.
const SCRATCH_LEN: usize = 64 * 1024;
/// Bytes a serve link's socket may hold not yet sent (`TCP_NOTSENT_LOWAT`) when it opens; past
/// it the socket takes no more and the blocks wait in the link's own queue. Why: with the
/// kernel's defaults each serve socket held 0.6-1.4 MiB unsent on a shaped 100 Mbit/s uplink
/// (up to 0.6 s of it over all links), so the upload slots decided only what was queued, not
/// what went on the wire: every link in the socket buffers shared the uplink, a seed's last
/// unique pieces waited behind second copies queued earlier, and a turn "drained" long
/// before its bytes left. 128 KiB is about 10 ms at 100 Mbit/s (see the README's swarm
/// benchmark for the figures). From then on the limit follows the link's rate
/// (`client::unsent`: 10 ms of it, up to 4 MiB on a fast link).
pub const SERVE_NOTSENT_LOWAT: u32 = MIN_UNSENT;

// The macro names itself and its helpers unqualified.
use nix::{getsockopt_impl, libc, setsockopt_impl, sockopt_impl};
sockopt_impl!(
    /// `TCP_NOTSENT_LOWAT` (nix has the macro but no such option).
    TcpNotSentLowat,
    Both,
    libc::IPPROTO_TCP,
    libc::TCP_NOTSENT_LOWAT,
    u32
);

/// Sets [`SERVE_NOTSENT_LOWAT`] on a serve link's socket.
fn limit_unsent(stream: &impl std::os::fd::AsFd) -> nix::Result<()> {
    set_unsent_limit(stream, SERVE_NOTSENT_LOWAT)
}

/// Sets a serve link's socket's unsent limit.
fn set_unsent_limit(stream: &impl std::os::fd::AsFd, bytes: u32) -> nix::Result<()> {
    nix::sys::socket::setsockopt(stream, TcpNotSentLowat, &bytes)
}

/// Something the command loop or the tracker must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferEvent {
    /// The download's first piece verified: register it as a share.
    FirstPiece { download: DownloadId },
    /// The download needs the sharers online again.
    QuerySharers { download: DownloadId },
    /// The download ended: `Ok` with what completed, or `Err` with the reason.
    Finished {
        download: DownloadId,
        result: Result<Completed, DownloadError>,
    },
}

enum PeerConn {
    Fetch(FetchLink),
    Serve(ServeLink),
}

pub struct Transfers {
    conns: ConnTable<PeerConn>,
    downloads: BTreeMap<DownloadId, Active>,
    events: VecDeque<TransferEvent>,
    ready: VecDeque<ConnId>,
    handshake_deadlines: VecDeque<(Instant, ConnId)>,
    scratch: Vec<u8>,
    limits: Limits,
    /// Downloads whose engines have actions waiting (queued where no hasher was at hand).
    pending_actions: Vec<DownloadId>,
    caps: PeerCaps,
    /// When served links are next looked at for idleness (while there are any).
    next_idle_check: Option<Instant>,
    /// Each download's current ticket (at most one per running download).
    tickets: BTreeMap<DownloadId, Ticket>,
    /// Downloads whose ticket renewal was asked for and has not come yet.
    renewing: BTreeSet<DownloadId>,
    /// Each running download's sharers' identity keys, as the tracker named them (at most
    /// [`MAX_PEER_KEYS`] per download; the newest answer replaces the last).
    peer_keys: BTreeMap<DownloadId, BTreeMap<SocketAddr, [u8; 32]>>,
    /// The service key tickets must be signed with: the one this client's tracker proved.
    service_key: Option<PublicKey>,
    /// This client's identity key, which its peer links prove.
    identity: Option<ClientIdentity>,
    /// Peer links in the plain protocol: only for the benchmark's comparison (see
    /// [`Transfers::with_plaintext_peer_links`]).
    plaintext: bool,
    /// The record ciphers this client offers on secure peer links, preferred first (what its
    /// CPU runs fast, unless forced: [`CIPHER_PREFS_ENV`]).
    cipher_prefs: CipherPrefs,
    /// An instant and the Unix time at it: tickets' expiries are Unix times, and `now` is an
    /// `Instant`, so that tests can move it.
    clock: (Instant, Duration),
    /// Which serve links may send now (the upload slot policy).
    slots: UploadSlots<ConnId>,
    /// Set while grants are being performed (a flush inside must not start another round).
    granting: bool,
}

/// Most sharer keys kept per download (a tracker answer lists at most this many sharers that
/// are kept; the download remembers as many addresses).
pub const MAX_PEER_KEYS: usize = 4096;

/// The environment variable that makes `client_program` speak the plain peer protocol (the
/// benchmark's comparison and tests only).
pub const PLAINTEXT_PEER_LINKS_ENV: &str = "P2PSHARE_BENCH_PLAINTEXT_PEER_LINKS";

/// The environment variable that forces `client_program`'s record cipher preference on peer
/// links: `aes` (AES-128-GCM first) or `chacha` (ChaCha20-Poly1305 first); without it the CPU
/// decides (tests and the benchmark only).
pub const CIPHER_PREFS_ENV: &str = "P2PSHARE_PEER_CIPHER_PREFS";

/// A download asks for a new ticket when less than this is left of its current one.
const TICKET_RENEW_MARGIN_SECS: u64 = crate::tracker::tickets::TICKET_LIFE_SECS / 2;

/// The caps on peer links (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCaps {
    pub max_fetch: usize,
    pub max_serve: usize,
    pub max_serve_per_addr: usize,
    pub serve_idle: Duration,
}

impl Default for PeerCaps {
    fn default() -> Self {
        PeerCaps {
            max_fetch: MAX_FETCH_LINKS,
            max_serve: MAX_SERVE_LINKS,
            max_serve_per_addr: MAX_SERVE_LINKS_PER_ADDR,
            serve_idle: SERVE_IDLE_TIMEOUT,
        }
    }
}

impl PeerCaps {
    /// The default caps, shrunk to fit `open_files` file descriptors: fetch and serve links
    /// together keep a quarter of them free for files, maps and the rest.
    pub fn for_open_files(open_files: u64) -> Self {
        let mut caps = PeerCaps::default();
        let room = usize::try_from(open_files.saturating_mul(3) / 4).unwrap_or(usize::MAX);
        if caps.max_fetch + caps.max_serve > room {
            caps.max_serve = (room / 3).max(1);
            caps.max_fetch = (room - room / 3).max(1);
            caps.max_serve_per_addr = caps.max_serve_per_addr.min(caps.max_serve);
        }
        caps
    }
}

impl Default for Transfers {
    fn default() -> Self {
        Self::new(Limits::default())
    }
}

impl Transfers {
    pub fn new(limits: Limits) -> Self {
        Transfers {
            conns: ConnTable::new(),
            downloads: BTreeMap::new(),
            events: VecDeque::new(),
            ready: VecDeque::new(),
            handshake_deadlines: VecDeque::new(),
            scratch: vec![0; SCRATCH_LEN],
            limits,
            pending_actions: Vec::new(),
            caps: PeerCaps::default(),
            next_idle_check: None,
            tickets: BTreeMap::new(),
            renewing: BTreeSet::new(),
            peer_keys: BTreeMap::new(),
            service_key: None,
            identity: None,
            plaintext: false,
            cipher_prefs: CipherPrefs::detect(),
            clock: (
                Instant::now(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default(),
            ),
            slots: UploadSlots::new(SlotLimits::default()),
            granting: false,
        }
    }

    /// Tickets are checked with this key (the service key the tracker proved).
    pub fn set_service_key(&mut self, key: PublicKey) {
        self.service_key = Some(key);
    }

    /// The Unix time (whole seconds) at `now`.
    fn unix_at(&self, now: Instant) -> u64 {
        let (base, unix) = self.clock;
        (unix + now.saturating_duration_since(base)).as_secs()
    }

    /// The instant at Unix time `secs` (the base instant for earlier times).
    fn instant_at(&self, secs: u64) -> Instant {
        let (base, unix) = self.clock;
        base + Duration::from_secs(secs).saturating_sub(unix)
    }

    /// A new ticket for `download`: kept for its new links and sent on its open ones now;
    /// with the identity keys of the sharers the tracker named with it.
    pub fn set_ticket(
        &mut self,
        registry: &Registry,
        download: DownloadId,
        ticket: Ticket,
        peer_keys: Vec<(SocketAddr, [u8; 32])>,
    ) {
        self.renewing.remove(&download);
        let keys: BTreeMap<SocketAddr, [u8; 32]> =
            peer_keys.into_iter().take(MAX_PEER_KEYS).collect();
        self.peer_keys.insert(download, keys);
        let msg = DownloaderMsg::Ticket(Box::new(ticket.clone()));
        let mut links = Vec::new();
        let mut broken = Vec::new();
        for conn in self.conns.iter_mut() {
            if matches!(&conn.data, PeerConn::Fetch(link) if link.download == download) {
                match fetch::send_on_fetch(conn, &msg) {
                    Ok(()) => links.push(conn.id),
                    Err(e) => broken.push((conn.id, e.to_string())),
                }
            }
        }
        self.tickets.insert(download, ticket);
        for (id, reason) in broken {
            self.lose(registry, id, &reason);
        }
        for id in links {
            self.flush_conn(registry, id);
        }
    }

    /// When the first ticket renewal is due.
    fn next_renewal(&self) -> Option<Instant> {
        self.tickets
            .iter()
            .filter(|(id, _)| !self.renewing.contains(id))
            .map(|(_, t)| self.instant_at(t.body.expires.saturating_sub(TICKET_RENEW_MARGIN_SECS)))
            .min()
    }

    /// Asks for the tickets of running downloads that are due for renewal, and forgets the
    /// tickets of downloads that ended.
    fn renew_tickets(&mut self, now: Instant) {
        let downloads = &self.downloads;
        self.tickets.retain(|id, _| downloads.contains_key(id));
        self.peer_keys.retain(|id, _| downloads.contains_key(id));
        self.renewing.retain(|id| downloads.contains_key(id));
        let unix = self.unix_at(now);
        let due: Vec<DownloadId> = self
            .tickets
            .iter()
            .filter(|(id, t)| {
                !self.renewing.contains(id)
                    && unix.saturating_add(TICKET_RENEW_MARGIN_SECS) >= t.body.expires
            })
            .map(|(&id, _)| id)
            .collect();
        for download in due {
            debug!("download {download}: renewing its ticket");
            self.renewing.insert(download);
            self.events
                .push_back(TransferEvent::QuerySharers { download });
        }
    }

    /// Peer links prove this identity (the key registered with the tracker at login).
    pub fn with_identity(mut self, identity: ClientIdentity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// Peer links in the plain, unencrypted protocol, as before they were secured: for the
    /// throughput benchmark's comparison and the tests that play a peer in the plain
    /// protocol, never a user option (`client_program` takes it only from the environment
    /// variable [`PLAINTEXT_PEER_LINKS_ENV`], and says so at `warn`). A plain client and a
    /// secure one cannot link: the secure preamble is no plain frame, and a plain frame no
    /// preamble.
    pub fn with_plaintext_peer_links(mut self) -> Self {
        self.plaintext = true;
        self
    }

    /// Offers `prefs` on secure peer links instead of what this CPU prefers (see
    /// [`CIPHER_PREFS_ENV`]).
    pub fn with_cipher_prefs(mut self, prefs: CipherPrefs) -> Self {
        self.cipher_prefs = prefs;
        self
    }

    /// Uses these caps from now on.
    pub fn with_caps(mut self, caps: PeerCaps) -> Self {
        self.caps = caps;
        self
    }

    /// Open links: `(fetch, served, served from ip)`.
    fn count_links(&self, ip: Option<IpAddr>) -> (usize, usize, usize) {
        let (mut fetch, mut serve, mut from_ip) = (0, 0, 0);
        for conn in self.conns.iter() {
            match &conn.data {
                PeerConn::Fetch(_) => fetch += 1,
                PeerConn::Serve(link) => {
                    serve += 1;
                    if Some(link.addr.ip()) == ip {
                        from_ip += 1;
                    }
                }
            }
        }
        (fetch, serve, from_ip)
    }

    /// The served link (from `ip`, if given) that has not been accepted (no handshake with a
    /// valid ticket yet) and whose downloader was heard from longest ago.
    fn evictable_serve_link(&self, ip: Option<IpAddr>) -> Option<(ConnId, SocketAddr)> {
        self.conns
            .iter()
            .filter_map(|c| match &c.data {
                PeerConn::Serve(link)
                    if link.serving.is_none() && ip.is_none_or(|ip| link.addr.ip() == ip) =>
                {
                    Some((link.last_heard, c.id, link.addr))
                }
                _ => None,
            })
            .min_by_key(|&(heard, id, _)| (heard, id.generation))
            .map(|(_, id, addr)| (id, addr))
    }

    pub fn poll_event(&mut self) -> Option<TransferEvent> {
        self.events.pop_front()
    }

    /// Links with more to read than their last turn allowed.
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Progress of a running download.
    pub fn progress(&self, download: DownloadId) -> Option<(Progress, Duration)> {
        self.downloads
            .get(&download)
            .map(|a| (a.engine.progress(), a.started.elapsed()))
    }

    // -----------------------------------------------------------------------------------------
    // Timers
    // -----------------------------------------------------------------------------------------

    pub fn next_deadline(&self) -> Option<Instant> {
        let downloads = self
            .downloads
            .values()
            .filter_map(|a| a.engine.next_deadline());
        let records = self
            .downloads
            .values()
            .filter(|a| a.record_dirty)
            .map(|a| a.record_written + super::part_record::RECORD_INTERVAL);
        let downloads = downloads.chain(records);
        let handshakes = self.handshake_deadlines.front().map(|(t, _)| *t);
        downloads
            .chain(handshakes)
            .chain(self.next_idle_check)
            .chain(self.next_renewal())
            .min()
    }

    pub fn on_tick(&mut self, registry: &Registry, hasher: &HashPool, now: Instant) {
        let ids: Vec<DownloadId> = self
            .downloads
            .iter()
            .filter(|(_, a)| a.engine.next_deadline().is_some_and(|t| t <= now))
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            if let Some(active) = self.downloads.get_mut(&id) {
                active.engine.on_tick(now);
            }
            self.run_actions(registry, hasher, id, now);
        }
        self.write_records(now);
        while let Some(&(deadline, id)) = self.handshake_deadlines.front() {
            if deadline > now {
                break;
            }
            self.handshake_deadlines.pop_front();
            let silent = matches!(
                self.conns.get(id).map(|c| &c.data),
                Some(PeerConn::Serve(link)) if link.serving.is_none()
            );
            if silent {
                debug!("peer link {id}: no handshake in time; closed");
                self.remove_conn(registry, id);
            }
        }
        if self.next_idle_check.is_some_and(|t| t <= now) {
            self.close_idle(registry, now);
        }
        if self.next_renewal().is_some_and(|t| t <= now)
            || self.tickets.len() > self.downloads.len()
        {
            self.renew_tickets(now);
        }
    }

    /// Closes served links whose downloader has been silent for the idle timeout while
    /// nothing was queued for it, and those whose ticket expired without a renewal.
    fn close_idle(&mut self, registry: &Registry, now: Instant) {
        let idle = self.caps.serve_idle;
        let unix = self.unix_at(now);
        let stale: Vec<(ConnId, SocketAddr, bool)> = self
            .conns
            .iter()
            .filter_map(|c| match &c.data {
                PeerConn::Serve(link) => {
                    let expired = link.ticket_expires.is_some_and(|t| unix >= t);
                    let silent = c.pending_write() + link.unsealed() == 0
                        && now.saturating_duration_since(link.last_heard) >= idle;
                    (expired || silent).then_some((c.id, link.addr, expired))
                }
                _ => None,
            })
            .collect();
        for (id, addr, expired) in stale {
            if expired {
                warn!("serving {addr}: its ticket expired without a renewal; closed");
            } else {
                debug!("serving {addr}: idle for {idle:?}; closed");
            }
            self.conns.remove(registry, id);
        }
        let any_served = self
            .conns
            .iter()
            .any(|c| matches!(c.data, PeerConn::Serve(_)));
        self.next_idle_check = any_served.then(|| now + IDLE_CHECK_EVERY.min(idle));
    }

    // -----------------------------------------------------------------------------------------
    // Sockets
    // -----------------------------------------------------------------------------------------

    /// A peer connected to this client's listening socket.
    pub fn accept(&mut self, registry: &Registry, stream: TcpStream, addr: SocketAddr) {
        let (_, served, from_ip) = self.count_links(Some(addr.ip()));
        let over_addr = from_ip >= self.caps.max_serve_per_addr;
        if over_addr || served >= self.caps.max_serve {
            // A cap is reached: the new connection takes the place of the quietest link that
            // has not been accepted yet (from this address when its own cap is the one
            // reached), so that idle connections cannot lock honest downloaders out; links
            // serving with a valid ticket are never evicted for a newcomer.
            match self.evictable_serve_link(over_addr.then_some(addr.ip())) {
                Some((victim, victim_addr)) => {
                    debug!("peer {addr}: caps reached; evicted {victim_addr}, not yet accepted");
                    self.remove_conn(registry, victim);
                }
                None => {
                    debug!(
                        "peer {addr}: {served} served links, {from_ip} from {}, all accepted; closed",
                        addr.ip()
                    );
                    return;
                }
            }
        }
        let secure = if self.plaintext {
            None
        } else {
            let Some(identity) = &self.identity else {
                warn!("peer {addr}: this client has no identity key to serve with; closed");
                return;
            };
            Some(Box::new(serve::ServeSecure {
                stream: SealedDownloaderStream::new(identity.private(), MAX_DOWNLOADER_FRAME)
                    .with_prefs(self.cipher_prefs),
                sealer: None,
                peer_key: None,
                blocks: VecDeque::new(),
                queued: 0,
            }))
        };
        let _ = stream.set_nodelay(true);
        // Best effort: without it the link works as before, only with deeper socket buffers.
        if let Err(e) = limit_unsent(&stream) {
            debug!("peer {addr}: TCP_NOTSENT_LOWAT not set: {e}");
        }
        let now = Instant::now();
        if self.next_idle_check.is_none() {
            self.next_idle_check = Some(now + IDLE_CHECK_EVERY.min(self.caps.serve_idle));
        }
        match self.conns.insert(
            registry,
            stream,
            MAX_DOWNLOADER_FRAME,
            PeerConn::Serve(ServeLink {
                addr,
                core: Uploader::new(),
                serving: None,
                block_bytes: 0,
                last_heard: now,
                ticket: None,
                ticket_expires: None,
                secure,
                unsent: UnsentLimit::new(),
            }),
        ) {
            Ok(id) => self
                .handshake_deadlines
                .push_back((now + SERVE_HANDSHAKE_TIMEOUT, id)),
            Err(e) => warn!("peer {addr}: {e}"),
        }
    }

    /// A mio event for a peer link. `shares` tells what the logged-in user shares.
    #[allow(clippy::too_many_arguments)]
    pub fn on_event(
        &mut self,
        registry: &Registry,
        hasher: &HashPool,
        token: Token,
        readable: bool,
        writable: bool,
        shares: &ClientCore,
        now: Instant,
    ) {
        let Some(conn) = self.conns.by_token(token) else {
            return;
        };
        let id = conn.id;
        match &conn.data {
            PeerConn::Fetch(_) => {
                if writable {
                    self.fetch_writable(registry, hasher, id, now);
                }
                if readable {
                    self.fetch_readable(registry, hasher, id, now);
                }
            }
            PeerConn::Serve(_) => {
                if writable {
                    self.flush_conn(registry, id);
                }
                if readable || writable {
                    self.serve_readable(registry, id, shares);
                }
            }
        }
    }

    /// Gives links that used up their budget another turn.
    pub fn run_ready(
        &mut self,
        registry: &Registry,
        hasher: &HashPool,
        shares: &ClientCore,
        now: Instant,
    ) {
        for _ in 0..self.ready.len() {
            let Some(id) = self.ready.pop_front() else {
                break;
            };
            match self.conns.get(id).map(|c| &c.data) {
                Some(PeerConn::Fetch(_)) => self.fetch_readable(registry, hasher, id, now),
                Some(PeerConn::Serve(_)) => self.serve_readable(registry, id, shares),
                None => {}
            }
        }
    }

    /// Writes what is queued; a link whose socket fails is dropped.
    fn flush_conn(&mut self, registry: &Registry, id: ConnId) {
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        if let PeerConn::Fetch(link) = &conn.data {
            if !link.connected {
                return;
            }
        }
        let mut written = 0;
        let result = loop {
            // Granted blocks are sealed into the send buffer as it drains (secure links).
            if let Err(e) = serve::seal_blocks(conn) {
                break Err(std::io::Error::other(e.to_string()));
            }
            let before = conn.pending_write();
            if let Err(e) = conn.flush(registry) {
                break Err(e);
            }
            written += before.saturating_sub(conn.pending_write());
            let more = matches!(&conn.data, PeerConn::Serve(s) if s.unsealed() > 0);
            // The socket took everything sealed: seal more. Otherwise it is full (it will
            // say when it is writable again) or nothing is left.
            if !(more && conn.pending_write() == 0) {
                break Ok(());
            }
        };
        // A serve socket's unsent limit follows the link's rate (`client::unsent`).
        let (stream, data, _) = conn.parts();
        if let (PeerConn::Serve(s), true) = (data, written > 0) {
            if let Some(limit) = s.unsent.on_written(written, Instant::now()) {
                debug!("peer link {id}: unsent limit {limit} bytes");
                if let Err(e) = set_unsent_limit(stream, limit) {
                    debug!("peer link {id}: TCP_NOTSENT_LOWAT not set: {e}");
                }
            }
        }
        let unsealed = match &conn.data {
            PeerConn::Serve(s) => s.unsealed(),
            PeerConn::Fetch(_) => 0,
        };
        let done_closing = matches!(&conn.data, PeerConn::Serve(s) if s.core.is_refused())
            && conn.pending_write() == 0;
        let drained = matches!(&conn.data, PeerConn::Serve(s) if s.core.is_serving())
            && conn.pending_write() + unsealed == 0;
        if let Err(e) = result {
            self.lose(registry, id, &format!("write failed: {e}"));
        } else if done_closing {
            self.remove_conn(registry, id);
        } else if drained {
            self.slots.drained(id);
            self.run_grants(registry);
        }
    }

    /// Closes a peer link (a serve link's upload slot passes on).
    fn remove_conn(&mut self, registry: &Registry, id: ConnId) {
        self.conns.remove(registry, id);
        self.slots.remove_link(id);
        self.run_grants(registry);
    }

    /// Drops a link after an error or a close; a fetch link's download learns of it.
    fn lose(&mut self, registry: &Registry, id: ConnId, reason: &str) {
        let Some(conn) = self.conns.remove(registry, id) else {
            return;
        };
        self.slots.remove_link(id);
        self.run_grants(registry);
        match conn.data {
            PeerConn::Fetch(link) => {
                if let Some(active) = self.downloads.get_mut(&link.download) {
                    active.links.remove(&link.peer);
                    let now = Instant::now();
                    if link.connected {
                        active.engine.on_link_lost(link.peer, reason, now);
                    } else {
                        active.engine.on_connect_failed(link.peer, reason, now);
                    }
                    self.pending_actions.push(link.download);
                }
            }
            PeerConn::Serve(link) => debug!("serving {}: {reason}", link.addr),
        }
    }

    /// Runs the actions of downloads that learned something outside `run_actions`.
    fn settle(&mut self, registry: &Registry, hasher: &HashPool, now: Instant) {
        while let Some(id) = self.pending_actions.pop() {
            self.run_actions(registry, hasher, id, now);
        }
    }
}

#[cfg(test)]
#[path = "transfers_tests.rs"]
mod tests;
