//! Serve links: the connections other clients opened to fetch what this client shares. Frames
//! go to each link's [`Uploader`] core, which decides; this module looks shares up, opens the
//! maps and writes the answers, blocks straight from the source's map without a copy
//! ([`Conn::queue_mapped`](crate::net::Conn::queue_mapped)). Must not decide what to serve
//! (the core does), except that a handshake is refused without a valid ticket, which this
//! module checks (offline, with the service key and the clock, which the core does not hold).
//!
//! Links are secure (`net::peer_secure`): the downloader's Noise `IK` message proves it holds
//! a static key, which must be the client key its ticket names (else the handshake is refused
//! with code 4, logged at `warn`); its first frames ride in that message, everything after in
//! records. Answers are sealed as they are queued; a granted block waits in the link's queue
//! and is encrypted from the map into the send buffer (reused, no allocation per block) only
//! when the buffer runs low, so a link holds at most [`SEAL_AHEAD`] of sealed bytes beyond
//! one block. (The plain protocol is kept for the benchmark's comparison only.)

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use log::{debug, info, warn};
use mio::Registry;

use super::super::download::engine::bitfield_of;
use super::super::session::{ClientCore, DownloadId};
use super::super::slots::Grant;
use super::super::unsent::UnsentLimit;
use super::super::uploader::{self, Offer, Refusal, RefuseCode, ServeError, Uploader};
use super::downloads::Active;
use super::{PeerConn, Transfers, FRAME_BUDGET};
use crate::bitfield::Bitfield;
use crate::keys::{self, PublicKey};
use crate::net::conn::MappedSlice;
use crate::net::peer_secure::{
    payload_frames, PeerSecureError, SealedDownloaderStream, Sealer, ServeEvent,
};
use crate::net::{Conn, ConnId, ReadEnd};
use crate::storage::{PartReader, SourceMap};
use crate::wire::peer_link::{emit_block_header, BlockRef, DownloaderMsg, SharerMsg};
use crate::wire::ticket::Ticket;
use crate::wire::{DecodeError, FileName, GroupId, Sha1Digest};

/// Bytes to serve: a shared file's map, or the verified pieces of a download in progress.
#[derive(Clone)]
pub(super) enum Source {
    /// The map, and the file opened for reading (secure links read blocks with `pread`).
    File(Arc<SourceMap>, Option<Arc<std::fs::File>>),
    Part(PartReader),
}

impl Source {
    fn is_verified(&self, piece: u32) -> bool {
        match self {
            Source::File(..) => true,
            Source::Part(r) => r.is_verified(piece),
        }
    }
}

/// One block queued for sending straight from its map.
pub(super) struct MappedBlock {
    pub(super) source: Source,
    /// The shared file, for secure links: their blocks are read from it with `pread` into the
    /// send buffer, where they are encrypted (a copy out of the map would raise SIGBUS on a
    /// file that another process truncated; `writev` from the map, on plain links, fails
    /// with an error instead).
    pub(super) file: Option<Arc<std::fs::File>>,
    pub(super) piece: u32,
    pub(super) offset: u32,
    /// Where the block starts in the file (for `Source::File`).
    pub(super) start: usize,
    pub(super) len: u32,
}

impl MappedSlice for MappedBlock {
    fn bytes(&self) -> &[u8] {
        match &self.source {
            Source::File(map, _) => map
                .bytes()
                .get(self.start..self.start + self.len as usize)
                .unwrap_or(&[]),
            Source::Part(reader) => reader
                .read(self.piece, self.offset, self.len)
                .unwrap_or(&[]),
        }
    }
}

/// What a serve link sends back at once (blocks go through the upload slots).
pub(super) enum Answer {
    Msg(SharerMsg),
}

/// What an accepted serve link serves.
pub(super) struct Serving {
    pub(super) group: GroupId,
    pub(super) name: FileName,
    pub(super) file_sha1: Sha1Digest,
    pub(super) source: Source,
    /// The download whose `.part` is served, while it runs.
    pub(super) download: Option<DownloadId>,
}

pub(super) struct ServeLink {
    pub(super) addr: SocketAddr,
    /// What to answer (the serving core).
    pub(super) core: Uploader,
    /// Set once the handshake is accepted.
    pub(super) serving: Option<Serving>,
    /// When the downloader last sent a frame (for the idle timeout).
    pub(super) last_heard: Instant,
    /// The ticket the downloader sent before its handshake (checked at the handshake).
    pub(super) ticket: Option<Box<Ticket>>,
    /// Once serving: when the accepted ticket expires (Unix seconds); the link closes then
    /// unless a renewed ticket came.
    pub(super) ticket_expires: Option<u64>,
    /// Bytes of block data queued on this link so far (logged when it closes).
    pub(super) block_bytes: u64,
    /// The link's security (`None` only for the benchmark's plain comparison).
    pub(super) secure: Option<Box<ServeSecure>>,
    /// How much its socket may hold unsent, from the rate it is written at.
    pub(super) unsent: UnsentLimit,
}

/// Sealed bytes a serve link keeps in its send buffer ahead of the socket: granted blocks
/// are encrypted into it only while it holds less.
pub const SEAL_AHEAD: usize = 256 * 1024;

/// A secure serve link's state.
pub(super) struct ServeSecure {
    pub(super) stream: SealedDownloaderStream,
    /// Seals what this side sends, once the downloader's first message is in.
    pub(super) sealer: Option<Sealer>,
    /// The static key the downloader proved (its ticket must name it).
    pub(super) peer_key: Option<[u8; 32]>,
    /// Granted blocks not yet sealed, in order.
    pub(super) blocks: VecDeque<MappedBlock>,
    /// Their bytes.
    pub(super) queued: usize,
}

impl ServeLink {
    /// Granted block bytes not yet sealed into the send buffer.
    pub(super) fn unsealed(&self) -> usize {
        self.secure.as_ref().map_or(0, |s| s.queued)
    }
}

/// Queues `msg` on a serve link, sealed if the link is secure.
pub(super) fn send_on_serve(
    conn: &mut Conn<PeerConn>,
    msg: &SharerMsg,
) -> Result<(), PeerSecureError> {
    let (_, data, out) = conn.parts();
    match data {
        PeerConn::Serve(ServeLink {
            secure: Some(sec), ..
        }) => match sec.sealer.as_mut() {
            Some(sealer) => sealer.seal_frame(out, |o| msg.emit(o)),
            None => Err(PeerSecureError::OutOfTurn("an answer before the handshake")),
        },
        _ => {
            msg.emit(out);
            Ok(())
        }
    }
}

/// Seals granted blocks of a secure serve link into its send buffer while it holds less than
/// [`SEAL_AHEAD`].
pub(super) fn seal_blocks(conn: &mut Conn<PeerConn>) -> Result<(), PeerSecureError> {
    let (_, data, out) = conn.parts();
    let PeerConn::Serve(ServeLink {
        secure: Some(sec), ..
    }) = data
    else {
        return Ok(());
    };
    let Some(sealer) = sec.sealer.as_mut() else {
        return Ok(());
    };
    while out.len() < SEAL_AHEAD {
        let Some(block) = sec.blocks.pop_front() else {
            break;
        };
        sec.queued = sec.queued.saturating_sub(block.len as usize);
        match &block.file {
            Some(file) => {
                use std::os::unix::fs::FileExt;
                let at = block.start as u64;
                sealer.seal_block_with(
                    out,
                    block.piece,
                    block.offset,
                    block.len as usize,
                    |buf| file.read_exact_at(buf, at).map_err(|e| e.to_string()),
                )?
            }
            None => sealer.seal_block(out, block.piece, block.offset, block.bytes())?,
        }
    }
    Ok(())
}

/// Reads a secure serve link: the downloader's first message (answered at once, its frames
/// handed on) and records, each frame's parse result into `msgs`, at most `budget` frames.
fn read_sealed(
    conn: &mut Conn<PeerConn>,
    budget: usize,
    msgs: &mut Vec<Result<DownloaderMsg, DecodeError>>,
) -> Result<ReadEnd, String> {
    use std::io::Read;
    let (stream, data, out) = conn.parts();
    let PeerConn::Serve(ServeLink {
        secure: Some(sec), ..
    }) = data
    else {
        return Ok(ReadEnd::Stopped);
    };
    let mut handled = 0;
    loop {
        while let Some(event) = sec.stream.next_event().map_err(|e| e.to_string())? {
            match event {
                ServeEvent::Hello(hello) => {
                    debug!("a downloader's records in {}", hello.sealer.cipher().name());
                    out.extend_from_slice(&hello.reply);
                    sec.sealer = Some(hello.sealer);
                    sec.peer_key = Some(hello.remote_static);
                    let frames =
                        payload_frames(&hello.payload).ok_or("the handshake's frames are cut")?;
                    for frame in frames {
                        msgs.push(DownloaderMsg::parse(frame));
                        handled += 1;
                    }
                }
                ServeEvent::Frame(frame) => {
                    let msg = DownloaderMsg::parse(frame);
                    let stop = msg.is_err();
                    msgs.push(msg);
                    handled += 1;
                    if stop {
                        return Ok(ReadEnd::Stopped);
                    }
                }
            }
            if handled >= budget {
                return Ok(ReadEnd::Budget);
            }
        }
        match stream.read(sec.stream.spare()) {
            Ok(0) => return Ok(ReadEnd::Eof),
            Ok(n) => sec.stream.commit(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(ReadEnd::WouldBlock),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("io error: {e}")),
        }
    }
}

impl Drop for ServeLink {
    fn drop(&mut self) {
        if let Some(s) = &self.serving {
            info!(
                "peer link to {} closed: {} bytes of blocks of {} served",
                self.addr, self.block_bytes, s.name
            );
        }
    }
}

impl Transfers {
    /// Sends `have` for a newly verified piece to every link serving this download's `.part`.
    pub(super) fn announce(&mut self, registry: &Registry, download: DownloadId, piece: u32) {
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
                    if let Err(e) = send_on_serve(conn, &SharerMsg::Have { piece }) {
                        debug!("peer link {}: {e}", conn.id);
                    }
                    dirty.push(conn.id);
                }
            }
        }
        for id in dirty {
            self.flush_conn(registry, id);
        }
    }

    /// Links serving a finished download's `.part` go on serving it (every piece is
    /// verified and the map stays valid), as an ordinary file.
    pub(super) fn detach_serving(&mut self, download: DownloadId) {
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

    pub(super) fn close_serving(&mut self, registry: &Registry, download: DownloadId) {
        let ids: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|c| {
                matches!(&c.data, PeerConn::Serve(ServeLink { serving: Some(Serving { download: Some(d), .. }), .. }) if *d == download)
            })
            .map(|c| c.id)
            .collect();
        for id in ids {
            self.remove_conn(registry, id);
        }
    }

    /// Performs the upload slots' grants: blocks queued on their links straight from the
    /// map, or `Rejected`. A flush that drains a link may grant more; those are taken in the
    /// same loop.
    pub(super) fn run_grants(&mut self, registry: &Registry) {
        if self.granting {
            return;
        }
        self.granting = true;
        let mut dirty: Vec<ConnId> = Vec::new();
        loop {
            let Some(grant) = self.slots.poll_grant() else {
                // Each link written once for all its grants; a link that drains may be
                // granted more, taken in the next round.
                if dirty.is_empty() {
                    break;
                }
                dirty.sort_unstable();
                dirty.dedup();
                for id in std::mem::take(&mut dirty) {
                    self.flush_conn(registry, id);
                }
                continue;
            };
            let (id, block, start) = match grant {
                Grant::Send { link, block, start } => (link, block, Some(start)),
                Grant::Reject { link, block } => (link, block, None),
            };
            let Some(conn) = self.conns.get_mut(id) else {
                continue;
            };
            let PeerConn::Serve(ServeLink {
                serving: Some(serving),
                block_bytes,
                secure,
                ..
            }) = &mut conn.data
            else {
                continue;
            };
            match start.map(usize::try_from) {
                Some(Ok(start)) => {
                    *block_bytes += u64::from(block.len);
                    let mapped = MappedBlock {
                        file: match &serving.source {
                            Source::File(_, file) => file.clone(),
                            Source::Part(_) => None,
                        },
                        source: serving.source.clone(),
                        piece: block.piece,
                        offset: block.offset,
                        start,
                        len: block.len,
                    };
                    match secure {
                        // Sealed from the map when the send buffer runs low.
                        Some(sec) => {
                            sec.queued += block.len as usize;
                            sec.blocks.push_back(mapped);
                        }
                        None => {
                            emit_block_header(
                                conn.out(),
                                block.piece,
                                block.offset,
                                block.len as usize,
                            );
                            conn.queue_mapped(Box::new(mapped));
                        }
                    }
                }
                _ => {
                    if let Err(e) = send_on_serve(conn, &SharerMsg::Rejected(block)) {
                        debug!("peer link {id}: {e}");
                    }
                }
            }
            if conn.read_paused {
                self.ready.push_back(id);
            }
            dirty.push(id);
        }
        self.granting = false;
    }

    /// Reads a downloader's handshake and requests and answers them.
    pub(super) fn serve_readable(&mut self, registry: &Registry, id: ConnId, shares: &ClientCore) {
        let now = Instant::now();
        let unix = self.unix_at(now);
        let service_key = self.service_key;
        let held_room = self.slots.may_read(id);
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        let PeerConn::Serve(link) = &conn.data else {
            return;
        };
        if !link.core.may_read(conn.pending_write() + link.unsealed()) || !held_room {
            conn.read_paused = !link.core.is_refused();
            return;
        }
        conn.read_paused = false;
        let mut msgs: Vec<Result<DownloaderMsg, DecodeError>> = Vec::new();
        let result = if link.secure.is_some() {
            read_sealed(conn, FRAME_BUDGET, &mut msgs).map_err(|e| {
                warn!("serving {}: {e}", link_addr(conn));
                e
            })
        } else {
            conn.read_frames(FRAME_BUDGET, |payload| {
                let msg = DownloaderMsg::parse(payload);
                let stop = msg.is_err();
                msgs.push(msg);
                !stop
            })
            .map_err(|e| e.to_string())
        };
        let PeerConn::Serve(link) = &mut conn.data else {
            return;
        };
        if !msgs.is_empty() {
            link.last_heard = now;
        }
        let peer_key = link.secure.as_ref().and_then(|s| s.peer_key);
        let mut close = None;
        let mut answers: Vec<Answer> = Vec::new();
        let mut asked: Vec<(BlockRef, u64)> = Vec::new();
        let mut cancels: Vec<BlockRef> = Vec::new();
        let mut accepted: Option<(Sha1Digest, u32, bool)> = None;
        for msg in msgs {
            if link.core.is_refused() {
                break;
            }
            if let Ok(DownloaderMsg::Ticket(ticket)) = &msg {
                match &link.serving {
                    // Checked at the handshake, with what it names.
                    None => link.ticket = Some(ticket.clone()),
                    Some(s) => {
                        match check_ticket(
                            service_key,
                            Some(ticket),
                            &s.group,
                            &s.file_sha1,
                            unix,
                            peer_key,
                        ) {
                            Ok(expires) => link.ticket_expires = Some(expires),
                            Err(reason) => {
                                warn!("serving {}: renewal refused: {reason}", link.addr);
                                close = Some(ServeError::from(DecodeError::BadValue("ticket")));
                                break;
                            }
                        }
                    }
                }
                continue;
            }
            if let Ok(DownloaderMsg::Cancel(block)) = &msg {
                cancels.push(*block);
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
                // The upload slots decide when (and whether) the block goes.
                Ok(uploader::Step::Block { block, start }) => asked.push((block, start)),
                Ok(uploader::Step::LookUp {
                    group,
                    name,
                    file_sha1,
                }) => {
                    let ticket = check_ticket(
                        service_key,
                        link.ticket.as_deref(),
                        &group,
                        &file_sha1,
                        unix,
                        peer_key,
                    );
                    let (offer, serving) = match ticket {
                        Err(reason) => {
                            warn!(
                                "refusing {name} of group {group} to {}: {reason}",
                                link.addr
                            );
                            let refusal = Refusal {
                                code: RefuseCode::Ticket,
                                message: reason,
                            };
                            (Err(refusal), None)
                        }
                        Ok(expires) => {
                            link.ticket_expires = Some(expires);
                            match open_source(&self.downloads, shares, &group, &name, &file_sha1) {
                                Ok((source, download, offer)) => {
                                    (Ok(offer), Some((source, download)))
                                }
                                Err(refusal) => (Err(refusal), None),
                            }
                        }
                    };
                    let answer = link.core.handle_offer(offer);
                    match (&answer, serving) {
                        (SharerMsg::Accept { bitfield, .. }, Some((source, download))) => {
                            debug!("serving {name} of group {group} to {}", link.addr);
                            let n_pieces = u32::try_from(bitfield.len()).unwrap_or(u32::MAX);
                            let seed = matches!(source, Source::File(..));
                            accepted = Some((file_sha1, n_pieces, seed));
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
            let Answer::Msg(msg) = answer;
            if let Err(e) = send_on_serve(conn, &msg) {
                close.get_or_insert(ServeError::from(DecodeError::BadValue("handshake")));
                debug!("peer link {id}: {e}");
            }
        }
        if let Some((file, n_pieces, seed)) = accepted {
            self.slots.add_link(id, file, n_pieces, seed);
        }
        for block in cancels {
            self.slots.cancel(id, block);
        }
        let mut over: Vec<BlockRef> = Vec::new();
        for (block, start) in asked {
            if !self.slots.request(id, block, start) {
                over.push(block);
            }
        }
        if let Some(conn) = self.conns.get_mut(id) {
            // Past the held-request bound (the reading stops there, so only a few).
            for block in over {
                let _ = send_on_serve(conn, &SharerMsg::Rejected(block));
            }
        }
        if let Some(reason) = close {
            debug!("peer link {id}: {reason}");
            self.remove_conn(registry, id);
            return;
        }
        match result {
            Ok(ReadEnd::Budget) => self.ready.push_back(id),
            Ok(ReadEnd::Eof) => {
                self.remove_conn(registry, id);
                return;
            }
            Err(e) => {
                debug!("peer link {id}: {e}");
                self.remove_conn(registry, id);
                return;
            }
            Ok(_) => {}
        }
        // The grants queue their blocks and write their links (this one included) once.
        self.run_grants(registry);
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
            self.remove_conn(registry, id);
        }
    }
}

/// Checks a downloader's ticket for `group` and `file_sha1` at Unix time `unix`, on a link
/// whose downloader proved `peer_key` (secure links); returns its expiry, or why it is
/// refused.
pub(super) fn check_ticket(
    service_key: Option<PublicKey>,
    ticket: Option<&Ticket>,
    group: &GroupId,
    file_sha1: &Sha1Digest,
    unix: u64,
    peer_key: Option<[u8; 32]>,
) -> Result<u64, String> {
    let Some(key) = service_key else {
        return Err("this sharer has not learned its service's key yet".into());
    };
    let Some(ticket) = ticket else {
        return Err("no ticket".into());
    };
    keys::verify_ticket(&key, ticket, group, file_sha1, unix).map_err(|e| e.to_string())?;
    if let Some(proved) = peer_key {
        if ticket.body.client_key != proved {
            return Err(format!(
                "the ticket is for client key {}, not for {}, which this downloader proved",
                crate::client::identity::key_text(&ticket.body.client_key),
                crate::client::identity::key_text(&proved)
            ));
        }
    }
    Ok(ticket.body.expires)
}

fn link_addr(conn: &Conn<PeerConn>) -> String {
    match &conn.data {
        PeerConn::Serve(l) => l.addr.to_string(),
        PeerConn::Fetch(l) => l.addr.to_string(),
    }
}

/// What to offer for a handshake, if the logged-in user shares that file: a running
/// download's verified pieces, or the shared file's map (which must still have the size the
/// tracker knows). Comes with the download whose `.part` is served, if so.
fn open_source(
    downloads: &BTreeMap<DownloadId, Active>,
    shares: &ClientCore,
    group: &GroupId,
    name: &FileName,
    file_sha1: &Sha1Digest,
) -> Result<(Source, Option<DownloadId>, Offer), Refusal> {
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
        Source::File(
            Arc::new(map),
            std::fs::File::open(&share.path).ok().map(Arc::new),
        ),
        None,
        offer(Bitfield::full(meta.piece_hashes.len())),
    ))
}
