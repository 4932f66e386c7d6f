//! The client's peer links: the IO shell around the download engines and the serving of files.
//!
//! [`Transfers`] owns every peer connection of the client (one [`ConnTable`] on the client's
//! one mio reactor) and every running download. Two kinds of link share the table:
//!
//! - **Fetch links**, which this client opened to a sharer for one of its downloads. What the
//!   sharer sends is followed by a [`SharerStream`] decoder: the length prefix, type byte and
//!   block header of a `Block` frame are read on their own, the [`Download`] engine decides
//!   whether the block is wanted, and its data is then read from the socket straight into the
//!   piece's bytes in the memory-mapped `<target>.part` ([`PartFile::write_with`]); unwanted
//!   data goes to a small scratch buffer. No block is ever copied through an intermediate buffer.
//! - **Serve links**, which another client opened to fetch a file this client shares. After a
//!   handshake naming a file the logged-in user shares, each request is answered with a block
//!   header in the send buffer followed by the data sent straight from the file's read-only map
//!   (or from the verified pieces of a `.part` still downloading), without a copy
//!   ([`Conn::queue_mapped`]).
//!
//! Completed pieces go to the hasher pool through their [`HashTicket`](crate::storage); the
//! pool's workers also compute each download's whole-file SHA1 ([`FileStream`]) in order as
//! pieces verify, so that the check at the end costs no extra wait. A download whose pieces are
//! all verified and whose whole-file digest matches is hard-linked to its target (which never
//! overwrites) and its `.part` removed.
//!
//! What needs the tracker or the command loop comes out as [`TransferEvent`]s.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use mio::net::TcpStream;
use mio::{Registry, Token};

use super::download::engine::{bitfield_of, Action, Download, Limits, Progress};
use super::download::picker::{PeerId, Verdict};
use super::session::ClientCore;
use super::uploader::{self, Offer, Refusal, RefuseCode, ServeError, Uploader};
use crate::bitfield::Bitfield;
use crate::hasher::{sha1_of, FileStream, HashPool, PieceChecked, StreamDone};
use crate::net::conn::MappedSlice;
use crate::net::{ConnId, ConnTable, ReadEnd};
use crate::storage::{PartFile, PartReader, SourceMap};
use crate::wire::peer_link::{
    emit_block_header, Decoded, DownloaderMsg, Next, SharerMsg, SharerStream, MAX_DOWNLOADER_FRAME,
    MAX_PEER_FRAME,
};
use crate::wire::tracker_link::FileMeta;
use crate::wire::{DecodeError, FileName, GroupId, Sha1Digest, PROTOCOL_VERSION};

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
    FirstPiece { download: u64 },
    /// The download needs the sharers online again.
    QuerySharers { download: u64 },
    /// The download ended: `Ok` with the line to print, or `Err` with the reason.
    Finished {
        download: u64,
        result: Result<String, String>,
    },
}

/// Bytes to serve: a shared file's map, or the verified pieces of a download in progress.
#[derive(Clone)]
enum Source {
    File(Arc<SourceMap>),
    Part(PartReader),
}

impl Source {
    fn is_verified(&self, piece: u32) -> bool {
        match self {
            Source::File(_) => true,
            Source::Part(r) => r.is_verified(piece),
        }
    }
}

/// One block queued for sending straight from its map.
struct MappedBlock {
    source: Source,
    piece: u32,
    offset: u32,
    /// Where the block starts in the file (for `Source::File`).
    start: usize,
    len: u32,
}

impl MappedSlice for MappedBlock {
    fn bytes(&self) -> &[u8] {
        match &self.source {
            Source::File(map) => map
                .bytes()
                .get(self.start..self.start + self.len as usize)
                .unwrap_or(&[]),
            Source::Part(reader) => reader
                .read(self.piece, self.offset, self.len)
                .unwrap_or(&[]),
        }
    }
}

/// What a serve link sends back.
enum Answer {
    Msg(SharerMsg),
    Block(MappedBlock),
}

struct FetchLink {
    download: u64,
    peer: PeerId,
    addr: SocketAddr,
    connected: bool,
    /// Where the sharer's next bytes go.
    decoder: SharerStream,
    /// Whether the block being read goes into the file (the engine wanted it).
    writing: bool,
}

/// What an accepted serve link serves.
struct Serving {
    group: GroupId,
    name: FileName,
    file_sha1: Sha1Digest,
    source: Source,
    /// The download whose `.part` is served, while it runs.
    download: Option<u64>,
}

struct ServeLink {
    addr: SocketAddr,
    /// What to answer (the serving core).
    core: Uploader,
    /// Set once the handshake is accepted.
    serving: Option<Serving>,
}

enum PeerConn {
    Fetch(FetchLink),
    Serve(ServeLink),
}

/// A running download.
struct Active {
    engine: Download,
    part: PartFile,
    reader: PartReader,
    target: PathBuf,
    part_path: PathBuf,
    links: BTreeMap<PeerId, ConnId>,
    started: Instant,
    first_piece: bool,
    /// The whole-file digest, fed by the hasher pool.
    stream: Arc<FileStream>,
    /// The whole-file digest once every piece is in it.
    file_digest: Option<Sha1Digest>,
    all_verified: bool,
}

impl Drop for Active {
    fn drop(&mut self) {
        // A download that ends early needs no more of its digest.
        self.stream.cancel();
    }
}

pub struct Transfers {
    conns: ConnTable<PeerConn>,
    downloads: BTreeMap<u64, Active>,
    events: VecDeque<TransferEvent>,
    ready: VecDeque<ConnId>,
    handshake_deadlines: VecDeque<(Instant, ConnId)>,
    scratch: Vec<u8>,
    limits: Limits,
    /// Downloads whose engines have actions waiting (queued where no hasher was at hand).
    pending_actions: Vec<u64>,
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
    pub fn progress(&self, download: u64) -> Option<(Progress, Duration)> {
        self.downloads
            .get(&download)
            .map(|a| (a.engine.progress(), a.started.elapsed()))
    }

    // -----------------------------------------------------------------------------------------
    // Downloads
    // -----------------------------------------------------------------------------------------

    /// Starts download `id`: creates `<target>.part` at full size, maps it and opens links to
    /// `peers`. `Ok` carries the line to print.
    #[allow(clippy::too_many_arguments)]
    pub fn start_download(
        &mut self,
        registry: &Registry,
        hasher: &HashPool,
        id: u64,
        group: GroupId,
        meta: FileMeta,
        peers: &[SocketAddr],
        target: PathBuf,
        now: Instant,
    ) -> Result<String, String> {
        if target.symlink_metadata().is_ok() {
            return Err(format!("{} already exists", target.display()));
        }
        let mut part_name = target.as_os_str().to_owned();
        part_name.push(".part");
        let part_path = PathBuf::from(part_name);
        if part_path.symlink_metadata().is_ok() {
            // A `.part` no running download uses is left over from an interrupted one.
            warn!("removing the stale {}", part_path.display());
            let _ = std::fs::remove_file(&part_path);
        }
        let part = PartFile::create(&part_path, meta.size, meta.piece_len)
            .map_err(|e| format!("cannot create {}: {e}", part_path.display()))?;
        let line = format!(
            "download of {} from group {group} started: {} ({} bytes, {} sharers online)",
            meta.name,
            target.display(),
            meta.size,
            peers.len()
        );
        let mut engine = Download::new(group, meta, self.limits.clone());
        engine.start(peers, now);
        let reader = part.reader();
        let n_pieces = engine.picker().n_pieces();
        let stream = FileStream::new(id, reader.clone(), n_pieces);
        let file_digest = (n_pieces == 0).then(|| sha1_of(&[]));
        self.downloads.insert(
            id,
            Active {
                engine,
                part,
                reader,
                target,
                part_path,
                links: BTreeMap::new(),
                started: now,
                first_piece: false,
                stream,
                file_digest,
                all_verified: false,
            },
        );
        self.run_actions(registry, hasher, id, now);
        Ok(line)
    }

    /// The tracker's answer to a `QuerySharers` event.
    pub fn on_sharers(
        &mut self,
        registry: &Registry,
        hasher: &HashPool,
        download: u64,
        result: Result<Vec<SocketAddr>, String>,
        now: Instant,
    ) {
        let Some(active) = self.downloads.get_mut(&download) else {
            return;
        };
        match result {
            Ok(addrs) => active.engine.on_sharers(&addrs, now),
            Err(reason) => {
                debug!("sharers of download {download}: {reason}");
                active.engine.on_sharers_failed(now);
            }
        }
        self.run_actions(registry, hasher, download, now);
    }

    /// The hasher checked a piece.
    pub fn on_piece_checked(
        &mut self,
        registry: &Registry,
        hasher: &HashPool,
        checked: PieceChecked,
        now: Instant,
    ) {
        let PieceChecked { job, verdict } = checked;
        let Some(active) = self.downloads.get_mut(&job) else {
            return;
        };
        let (piece, ok) = (verdict.piece(), verdict.ok());
        active.part.finish(verdict);
        active.engine.on_piece_checked(piece, ok, now);
        self.run_actions(registry, hasher, job, now);
    }

    /// The hasher pool finished a download's whole-file digest.
    pub fn on_stream(&mut self, registry: &Registry, done: StreamDone) {
        let StreamDone {
            job,
            digest,
            fed_hot,
        } = done;
        let Some(active) = self.downloads.get_mut(&job) else {
            return;
        };
        info!(
            "whole-file digest of {}: {fed_hot} of {} pieces fed by the worker that verified them",
            active.engine.meta.name,
            active.engine.picker().n_pieces()
        );
        active.file_digest = Some(digest);
        self.maybe_complete(registry, job);
    }

    /// Performs what download `id`'s engine asks for.
    fn run_actions(&mut self, registry: &Registry, hasher: &HashPool, id: u64, now: Instant) {
        let mut dirty: Vec<ConnId> = Vec::new();
        loop {
            let Some(active) = self.downloads.get_mut(&id) else {
                return;
            };
            let Some(action) = active.engine.poll_action() else {
                break;
            };
            match action {
                Action::Connect { peer, addr } => {
                    if let Err(e) = self.connect(registry, id, peer, addr) {
                        if let Some(active) = self.downloads.get_mut(&id) {
                            active
                                .engine
                                .on_link_lost(peer, &format!("cannot connect: {e}"), now);
                        }
                    }
                }
                Action::Send { peer, msg } => {
                    if let Some(&conn_id) = active.links.get(&peer) {
                        if let Some(conn) = self.conns.get_mut(conn_id) {
                            msg.emit(conn.out());
                            dirty.push(conn_id);
                        }
                    }
                }
                Action::Close { peer } => {
                    if let Some(conn_id) = active.links.remove(&peer) {
                        self.conns.remove(registry, conn_id);
                    }
                }
                Action::Verify { piece } => {
                    let expected = active.engine.meta.piece_hashes.get(piece as usize).copied();
                    match (active.part.seal(piece), expected) {
                        (Some(ticket), Some(expected)) => hasher.verify_piece(
                            id,
                            ticket,
                            expected,
                            Some(Arc::clone(&active.stream)),
                        ),
                        _ => {
                            warn!("piece {piece} could not be sealed for verification");
                            active.engine.on_piece_checked(piece, false, now);
                        }
                    }
                }
                Action::Verified { piece } => {
                    if !active.first_piece {
                        active.first_piece = true;
                        self.events
                            .push_back(TransferEvent::FirstPiece { download: id });
                    }
                    self.announce(registry, id, piece);
                }
                Action::QuerySharers => self
                    .events
                    .push_back(TransferEvent::QuerySharers { download: id }),
                Action::Finished(Ok(())) => {
                    active.all_verified = true;
                    self.maybe_complete(registry, id);
                }
                Action::Finished(Err(reason)) => {
                    self.fail_download(registry, id, reason);
                    return;
                }
            }
        }
        dirty.sort_unstable();
        dirty.dedup();
        for conn_id in dirty {
            self.flush_conn(registry, conn_id);
        }
    }

    /// Opens a fetch link; the handshake is queued by the engine's next action and sent once
    /// the connection is up.
    fn connect(
        &mut self,
        registry: &Registry,
        download: u64,
        peer: PeerId,
        addr: SocketAddr,
    ) -> io::Result<()> {
        if self.conns.len() >= MAX_PEER_LINKS {
            return Err(io::Error::other("too many peer links"));
        }
        let stream = TcpStream::connect(addr)?;
        let _ = stream.set_nodelay(true);
        let conn_id = self.conns.insert(
            registry,
            stream,
            MAX_PEER_FRAME,
            PeerConn::Fetch(FetchLink {
                download,
                peer,
                addr,
                connected: false,
                decoder: SharerStream::new(),
                writing: false,
            }),
        )?;
        if let Some(conn) = self.conns.get_mut(conn_id) {
            conn.await_connect(registry)?;
        }
        if let Some(active) = self.downloads.get_mut(&download) {
            active.links.insert(peer, conn_id);
        }
        Ok(())
    }

    /// Sends `have` for a newly verified piece to every link serving this download's `.part`.
    fn announce(&mut self, registry: &Registry, download: u64, piece: u32) {
        let mut dirty = Vec::new();
        for conn in self.conns.iter_mut() {
            if let PeerConn::Serve(ServeLink {
                serving: Some(Serving {
                    download: Some(d), ..
                }),
                ..
            }) = &conn.data
            {
                if *d == download {
                    SharerMsg::Have { piece }.emit(conn.out());
                    dirty.push(conn.id);
                }
            }
        }
        for id in dirty {
            self.flush_conn(registry, id);
        }
    }

    /// Finishes a download whose pieces are all verified once its whole-file digest is done.
    fn maybe_complete(&mut self, registry: &Registry, id: u64) {
        let Some(active) = self.downloads.get_mut(&id) else {
            return;
        };
        let Some(digest) = active.file_digest.filter(|_| active.all_verified) else {
            return;
        };
        if digest != active.engine.meta.file_sha1 {
            let reason = format!(
                "the whole file's SHA1 is {digest}, the tracker says {}",
                active.engine.meta.file_sha1
            );
            return self.fail_download(registry, id, reason);
        }
        // A hard link never replaces an existing file, unlike a rename.
        if let Err(e) = std::fs::hard_link(&active.part_path, &active.target) {
            let reason = format!(
                "cannot create {}: {e} (the data is in {})",
                active.target.display(),
                active.part_path.display()
            );
            let Some(active) = self.downloads.remove(&id) else {
                return;
            };
            self.close_links(registry, &active);
            self.events.push_back(TransferEvent::Finished {
                download: id,
                result: Err(reason),
            });
            return;
        }
        let _ = std::fs::remove_file(&active.part_path);
        let Some(active) = self.downloads.remove(&id) else {
            return;
        };
        self.close_links(registry, &active);
        self.detach_serving(id);
        let secs = active.started.elapsed().as_secs_f64().max(1e-6);
        let size = active.engine.meta.size;
        let line = format!(
            "downloaded {} from group {} to {} ({size} bytes in {secs:.3} s, {:.1} MiB/s)",
            active.engine.meta.name,
            active.engine.group,
            active.target.display(),
            size as f64 / (1024.0 * 1024.0) / secs
        );
        info!("{line}");
        self.events.push_back(TransferEvent::Finished {
            download: id,
            result: Ok(line),
        });
    }

    fn fail_download(&mut self, registry: &Registry, id: u64, reason: String) {
        let Some(active) = self.downloads.remove(&id) else {
            return;
        };
        warn!("download of {} failed: {reason}", active.engine.meta.name);
        self.close_links(registry, &active);
        self.close_serving(registry, id);
        let _ = std::fs::remove_file(&active.part_path);
        self.events.push_back(TransferEvent::Finished {
            download: id,
            result: Err(reason),
        });
    }

    fn close_links(&mut self, registry: &Registry, active: &Active) {
        for &conn_id in active.links.values() {
            self.conns.remove(registry, conn_id);
        }
    }

    /// Links serving a finished download's `.part` go on serving it (every piece is
    /// verified and the map stays valid), as an ordinary file.
    fn detach_serving(&mut self, download: u64) {
        for conn in self.conns.iter_mut() {
            if let PeerConn::Serve(ServeLink {
                serving: Some(Serving { download: d, .. }),
                ..
            }) = &mut conn.data
            {
                if *d == Some(download) {
                    *d = None;
                }
            }
        }
    }

    fn close_serving(&mut self, registry: &Registry, download: u64) {
        let ids: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|c| {
                matches!(&c.data, PeerConn::Serve(ServeLink { serving: Some(Serving { download: Some(d), .. }), .. }) if *d == download)
            })
            .map(|c| c.id)
            .collect();
        for id in ids {
            self.conns.remove(registry, id);
        }
    }

    /// Ends every running download (the client is exiting); their `.part` files are removed.
    pub fn abort_all(&mut self, registry: &Registry) {
        let ids: Vec<u64> = self.downloads.keys().copied().collect();
        for id in ids {
            self.fail_download(registry, id, "the client is exiting".into());
        }
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
        let ids: Vec<u64> = self
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
                self.conns.remove(registry, id);
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
        if let Err(e) = result {
            self.lose(registry, id, &format!("write failed: {e}"));
        } else if done_closing {
            self.conns.remove(registry, id);
        }
    }

    /// Drops a link after an error or a close; a fetch link's download learns of it.
    fn lose(&mut self, registry: &Registry, id: ConnId, reason: &str) {
        let Some(conn) = self.conns.remove(registry, id) else {
            return;
        };
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

    // -----------------------------------------------------------------------------------------
    // Fetch links
    // -----------------------------------------------------------------------------------------

    fn fetch_writable(&mut self, registry: &Registry, hasher: &HashPool, id: ConnId, now: Instant) {
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        let PeerConn::Fetch(link) = &mut conn.data else {
            return;
        };
        if !link.connected {
            match conn.stream.take_error() {
                Ok(Some(e)) | Err(e) => {
                    self.lose(registry, id, &format!("cannot connect: {e}"));
                    return self.settle(registry, hasher, now);
                }
                Ok(None) => {}
            }
            match conn.stream.peer_addr() {
                Ok(_) => link.connected = true,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                Err(e) => {
                    self.lose(registry, id, &format!("cannot connect: {e}"));
                    return self.settle(registry, hasher, now);
                }
            }
            debug!("connected to sharer {}", link.addr);
        }
        self.flush_conn(registry, id);
        self.settle(registry, hasher, now);
    }

    /// Reads what a sharer sent: small frames are parsed, block data goes into the file.
    fn fetch_readable(&mut self, registry: &Registry, hasher: &HashPool, id: ConnId, now: Instant) {
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        let PeerConn::Fetch(link) = &mut conn.data else {
            return;
        };
        if !link.connected {
            // Readiness before the connect completed: the writable path decides.
            return;
        }
        let download = link.download;
        let peer = link.peer;
        let Some(active) = self.downloads.get_mut(&download) else {
            self.conns.remove(registry, id);
            return;
        };
        let mut messages = Vec::new();
        let outcome = read_sharer(
            &mut conn.stream,
            link,
            active,
            &mut self.scratch,
            &mut messages,
            now,
        );
        for msg in messages {
            match msg {
                SharerMsg::Accept { version, bitfield } => {
                    if version != PROTOCOL_VERSION {
                        active.engine.on_refused(
                            peer,
                            &format!("it speaks version {version}"),
                            now,
                        );
                    } else {
                        active.engine.on_accept(peer, &bitfield, now);
                    }
                }
                SharerMsg::Refuse { message, .. } => {
                    active
                        .engine
                        .on_refused(peer, &format!("refused: {message}"), now)
                }
                SharerMsg::Have { piece } => active.engine.on_have(peer, piece, now),
                SharerMsg::Rejected(block) => active.engine.on_rejected(peer, block, now),
                SharerMsg::Block { .. } => {}
            }
        }
        match outcome {
            Ok(ReadEnd::WouldBlock) | Ok(ReadEnd::Stopped) => {}
            Ok(ReadEnd::Budget) => self.ready.push_back(id),
            Ok(ReadEnd::Eof) => self.lose(registry, id, "closed by the sharer"),
            Err(reason) => self.lose(registry, id, &reason),
        }
        self.run_actions(registry, hasher, download, now);
        self.settle(registry, hasher, now);
    }

    // -----------------------------------------------------------------------------------------
    // Serve links
    // -----------------------------------------------------------------------------------------

    /// Reads a downloader's handshake and requests and answers them.
    fn serve_readable(&mut self, registry: &Registry, id: ConnId, shares: &ClientCore) {
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        let PeerConn::Serve(link) = &conn.data else {
            return;
        };
        if !link.core.may_read(conn.pending_write()) {
            conn.read_paused = !link.core.is_refused();
            return;
        }
        conn.read_paused = false;
        let mut msgs: Vec<Result<DownloaderMsg, DecodeError>> = Vec::new();
        let result = conn.read_frames(FRAME_BUDGET, |payload| {
            let msg = DownloaderMsg::parse(payload);
            let stop = msg.is_err();
            msgs.push(msg);
            !stop
        });
        let PeerConn::Serve(link) = &mut conn.data else {
            return;
        };
        let mut close = None;
        let mut answers: Vec<Answer> = Vec::new();
        for msg in msgs {
            if link.core.is_refused() {
                break;
            }
            let serving = &link.serving;
            let step = msg.map_err(ServeError::from).and_then(|msg| {
                link.core.handle_msg(msg, |piece| {
                    serving
                        .as_ref()
                        .is_some_and(|s| s.source.is_verified(piece))
                })
            });
            match step {
                Err(e) => {
                    close = Some(e);
                    break;
                }
                Ok(uploader::Step::Nothing) => {}
                Ok(uploader::Step::Send(msg)) => {
                    if let SharerMsg::Refuse { message, .. } = &msg {
                        debug!("refusing {}: {message}", link.addr);
                    }
                    answers.push(Answer::Msg(msg));
                }
                Ok(uploader::Step::Block { block, start }) => {
                    match (&link.serving, usize::try_from(start)) {
                        (Some(s), Ok(start)) => answers.push(Answer::Block(MappedBlock {
                            source: s.source.clone(),
                            piece: block.piece,
                            offset: block.offset,
                            start,
                            len: block.len,
                        })),
                        _ => answers.push(Answer::Msg(SharerMsg::Rejected(block))),
                    }
                }
                Ok(uploader::Step::LookUp {
                    group,
                    name,
                    file_sha1,
                }) => {
                    let (offer, serving) =
                        match open_source(&self.downloads, shares, &group, &name, &file_sha1) {
                            Ok((source, download, offer)) => (Ok(offer), Some((source, download))),
                            Err(refusal) => (Err(refusal), None),
                        };
                    let answer = link.core.handle_offer(offer);
                    match (&answer, serving) {
                        (SharerMsg::Accept { .. }, Some((source, download))) => {
                            debug!("serving {name} of group {group} to {}", link.addr);
                            link.serving = Some(Serving {
                                group,
                                name,
                                file_sha1,
                                source,
                                download,
                            });
                        }
                        (SharerMsg::Refuse { message, .. }, _) => {
                            debug!(
                                "refusing {name} of group {group} to {}: {message}",
                                link.addr
                            );
                        }
                        _ => {}
                    }
                    answers.push(Answer::Msg(answer));
                }
            }
        }
        for answer in answers {
            match answer {
                Answer::Msg(msg) => msg.emit(conn.out()),
                Answer::Block(block) => {
                    emit_block_header(conn.out(), block.piece, block.offset, block.len as usize);
                    conn.queue_mapped(Box::new(block));
                }
            }
        }
        if let Some(reason) = close {
            debug!("peer link {id}: {reason}");
            self.conns.remove(registry, id);
            return;
        }
        match result {
            Ok(ReadEnd::Budget) => self.ready.push_back(id),
            Ok(ReadEnd::Eof) => {
                self.conns.remove(registry, id);
                return;
            }
            Err(e) => {
                debug!("peer link {id}: {e}");
                self.conns.remove(registry, id);
                return;
            }
            Ok(_) => {}
        }
        self.flush_conn(registry, id);
    }

    /// The logged-in user's shares changed: serve links whose file is no longer shared by
    /// the logged-in user close at once.
    pub fn revalidate(&mut self, registry: &Registry, shares: &ClientCore) {
        let stale: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|c| match &c.data {
                PeerConn::Serve(ServeLink {
                    serving:
                        Some(Serving {
                            group,
                            name,
                            file_sha1,
                            ..
                        }),
                    ..
                }) => shares.serving(group, name, file_sha1).is_none(),
                _ => false,
            })
            .map(|c| c.id)
            .collect();
        for id in stale {
            debug!("peer link {id}: the file is no longer shared; closed");
            self.conns.remove(registry, id);
        }
    }
}

/// What to offer for a handshake, if the logged-in user shares that file: a running
/// download's verified pieces, or the shared file's map (which must still have the size the
/// tracker knows). Comes with the download whose `.part` is served, if so.
fn open_source(
    downloads: &BTreeMap<u64, Active>,
    shares: &ClientCore,
    group: &GroupId,
    name: &FileName,
    file_sha1: &Sha1Digest,
) -> Result<(Source, Option<u64>, Offer), Refusal> {
    let not_shared = || Refusal {
        code: RefuseCode::NotShared,
        message: format!("{name} of group {group} is not shared here"),
    };
    let share = shares
        .serving(group, name, file_sha1)
        .ok_or_else(not_shared)?;
    let meta = &share.meta;
    let offer = |bitfield| Offer {
        size: meta.size,
        piece_len: meta.piece_len,
        bitfield,
    };
    if let Some((&id, active)) = downloads.iter().find(|(_, a)| a.target == share.path) {
        let bitfield = bitfield_of(active.engine.picker());
        return Ok((
            Source::Part(active.reader.clone()),
            Some(id),
            offer(bitfield),
        ));
    }
    let map = SourceMap::open(&share.path).map_err(|e| {
        warn!("cannot serve {}: {e}", share.path.display());
        not_shared()
    })?;
    if map.len() != meta.size {
        warn!(
            "cannot serve {}: its size changed since it was shared",
            share.path.display()
        );
        return Err(not_shared());
    }
    Ok((
        Source::File(Arc::new(map)),
        None,
        offer(Bitfield::full(meta.piece_hashes.len())),
    ))
}

/// Reads from a fetch link until the socket is drained or the budget is spent, putting the
/// bytes where the link's [`SharerStream`] says: small frames are parsed into `messages`;
/// block data goes straight into the download's `.part` map (or the scratch buffer, when the
/// engine does not want it). `Err` carries a protocol error.
fn read_sharer(
    stream: &mut TcpStream,
    link: &mut FetchLink,
    active: &mut Active,
    scratch: &mut [u8],
    messages: &mut Vec<SharerMsg>,
    now: Instant,
) -> Result<ReadEnd, String> {
    let peer = link.peer;
    let mut budget = READ_BUDGET;
    while budget > 0 {
        let (r, is_data) = match link.decoder.next_read() {
            Next::Buffer(buf) => (stream.read(buf), false),
            Next::BlockData { piece, offset, len } => {
                let written = if link.writing {
                    active
                        .part
                        .write_with(piece, offset, len, |buf| stream.read(buf))
                } else {
                    None
                };
                match written {
                    Some(r) => (r, true),
                    None => {
                        if link.writing {
                            // The engine accepted a block the file will not take: a bug, but
                            // the stream stays in step if the data is dropped.
                            warn!("piece {piece} refused a block the engine accepted");
                            link.writing = false;
                        }
                        let cap = scratch.len().min(len as usize);
                        (stream.read(&mut scratch[..cap]), true)
                    }
                }
            }
        };
        let n = match io_step(r)? {
            Step::Read(n) => n,
            Step::End(end) => return Ok(end),
        };
        if is_data {
            // Bytes are flowing: a slow link in the middle of a long block is not stalled.
            active.engine.on_data(peer, now);
        }
        match link.decoder.filled(n).map_err(|e| e.to_string())? {
            None => {}
            Some(Decoded::Msg(msg)) => messages.push(msg),
            Some(Decoded::BlockStart { piece, offset, len }) => {
                link.writing =
                    active.engine.on_block_header(peer, piece, offset, len, now) == Verdict::Write;
            }
            Some(Decoded::BlockEnd { piece, offset, len }) => {
                if link.writing {
                    active.engine.on_block_written(peer, piece, offset, len);
                }
                link.writing = false;
            }
        }
        budget = budget.saturating_sub(n);
    }
    Ok(ReadEnd::Budget)
}

enum Step {
    Read(usize),
    End(ReadEnd),
}

/// Sorts a read's outcome: bytes, the end of what is there (`WouldBlock`), the peer closing,
/// or an error.
fn io_step(r: io::Result<usize>) -> Result<Step, String> {
    match r {
        Ok(0) => Ok(Step::End(ReadEnd::Eof)),
        Ok(n) => Ok(Step::Read(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Step::End(ReadEnd::WouldBlock)),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Step::Read(0)),
        Err(e) => Err(e.to_string()),
    }
}
