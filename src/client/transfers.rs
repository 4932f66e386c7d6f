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
//! Nothing here decides what a download or a serve link does next: the `Download` engine and
//! the `Uploader` core do. What needs the tracker or the command loop comes out as
//! [`TransferEvent`]s.

mod downloads;
mod fetch;
mod serve;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::{debug, warn};
use mio::net::TcpStream;
use mio::{Registry, Token};

use super::download::engine::{Limits, Progress};
use super::session::{ClientCore, DownloadError, DownloadId};
use super::slots::{SlotLimits, UploadSlots};
use super::uploader::Uploader;
use crate::hasher::HashPool;
use crate::net::{ConnId, ConnTable};
use crate::wire::peer_link::MAX_DOWNLOADER_FRAME;
use downloads::Active;
use fetch::FetchLink;
use serve::ServeLink;

/// Bytes read from one fetch link before the others get a turn.
const READ_BUDGET: usize = 8 * 1024 * 1024;
/// Frames read from one serve link before the others get a turn.
const FRAME_BUDGET: usize = 256;
/// How long a serve link may take to send its handshake.
const SERVE_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most peer links at once; connections past it are closed at once.
const MAX_PEER_LINKS: usize = 4096;
/// Scratch space for data that is read and dropped.
const SCRATCH_LEN: usize = 64 * 1024;

/// Something the command loop or the tracker must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferEvent {
    /// The download's first piece verified: register it as a share.
    FirstPiece { download: DownloadId },
    /// The download needs the sharers online again.
    QuerySharers { download: DownloadId },
    /// The download ended: `Ok` with the line to print, or `Err` with the reason.
    Finished {
        download: DownloadId,
        result: Result<String, DownloadError>,
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
    /// Which serve links may send now (the upload slot policy).
    slots: UploadSlots<ConnId>,
    /// Set while grants are being performed (a flush inside must not start another round).
    granting: bool,
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
            slots: UploadSlots::new(SlotLimits::default()),
            granting: false,
        }
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
        let handshakes = self.handshake_deadlines.front().map(|(t, _)| *t);
        downloads.chain(handshakes).min()
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
        while let Some(&(deadline, id)) = self.handshake_deadlines.front() {
            if deadline > now {
                break;
            }
            self.handshake_deadlines.pop_front();
            let silent = matches!(
                self.conns.get(id).map(|c| &c.data),
                Some(PeerConn::Serve(link)) if link.core.awaits_handshake()
            );
            if silent {
                debug!("peer link {id}: no handshake in time; closed");
                self.remove_conn(registry, id);
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Sockets
    // -----------------------------------------------------------------------------------------

    /// A peer connected to this client's listening socket.
    pub fn accept(&mut self, registry: &Registry, stream: TcpStream, addr: SocketAddr) {
        if self.conns.len() >= MAX_PEER_LINKS {
            debug!("peer {addr}: too many links; closed");
            return;
        }
        let _ = stream.set_nodelay(true);
        let now = Instant::now();
        match self.conns.insert(
            registry,
            stream,
            MAX_DOWNLOADER_FRAME,
            PeerConn::Serve(ServeLink {
                addr,
                core: Uploader::new(),
                serving: None,
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
        let result = conn.flush(registry);
        let done_closing = matches!(&conn.data, PeerConn::Serve(s) if s.core.is_refused())
            && conn.pending_write() == 0;
        let drained = matches!(&conn.data, PeerConn::Serve(s) if s.core.is_serving())
            && conn.pending_write() == 0;
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
                    active
                        .engine
                        .on_link_lost(link.peer, reason, Instant::now());
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
