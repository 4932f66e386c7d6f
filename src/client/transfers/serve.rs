//! Serve links: the connections other clients opened to fetch what this client shares. Frames
//! go to each link's [`Uploader`] core, which decides; this module looks shares up, opens the
//! maps and writes the answers, blocks straight from the source's map without a copy
//! ([`Conn::queue_mapped`](crate::net::Conn::queue_mapped)). Must not decide what to serve
//! (the core does), except that a handshake is refused without a valid ticket, which this
//! module checks (offline, with the service key and the clock, which the core does not hold).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use log::{debug, info, warn};
use mio::Registry;

use super::super::download::engine::bitfield_of;
use super::super::session::{ClientCore, DownloadId};
use super::super::slots::Grant;
use super::super::uploader::{self, Offer, Refusal, RefuseCode, ServeError, Uploader};
use super::downloads::Active;
use super::{PeerConn, Transfers, FRAME_BUDGET};
use crate::bitfield::Bitfield;
use crate::keys::{self, PublicKey};
use crate::net::conn::MappedSlice;
use crate::net::{ConnId, ReadEnd};
use crate::storage::{PartReader, SourceMap};
use crate::wire::peer_link::{emit_block_header, BlockRef, DownloaderMsg, SharerMsg};
use crate::wire::ticket::Ticket;
use crate::wire::{DecodeError, FileName, GroupId, Sha1Digest};

/// Bytes to serve: a shared file's map, or the verified pieces of a download in progress.
#[derive(Clone)]
pub(super) enum Source {
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
pub(super) struct MappedBlock {
    pub(super) source: Source,
    pub(super) piece: u32,
    pub(super) offset: u32,
    /// Where the block starts in the file (for `Source::File`).
    pub(super) start: usize,
    pub(super) len: u32,
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
                    SharerMsg::Have { piece }.emit(conn.out());
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
                ..
            }) = &mut conn.data
            else {
                continue;
            };
            match start.map(usize::try_from) {
                Some(Ok(start)) => {
                    *block_bytes += u64::from(block.len);
                    let mapped = MappedBlock {
                        source: serving.source.clone(),
                        piece: block.piece,
                        offset: block.offset,
                        start,
                        len: block.len,
                    };
                    emit_block_header(conn.out(), block.piece, block.offset, block.len as usize);
                    conn.queue_mapped(Box::new(mapped));
                }
                _ => SharerMsg::Rejected(block).emit(conn.out()),
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
        if !link.core.may_read(conn.pending_write()) || !held_room {
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
        if !msgs.is_empty() {
            link.last_heard = now;
        }
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
                        match check_ticket(service_key, Some(ticket), &s.group, &s.file_sha1, unix)
                        {
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
                            let seed = matches!(source, Source::File(_));
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
            msg.emit(conn.out());
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
                SharerMsg::Rejected(block).emit(conn.out());
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

/// Checks a downloader's ticket for `group` and `file_sha1` at Unix time `unix`; returns its
/// expiry, or why it is refused.
fn check_ticket(
    service_key: Option<PublicKey>,
    ticket: Option<&Ticket>,
    group: &GroupId,
    file_sha1: &Sha1Digest,
    unix: u64,
) -> Result<u64, String> {
    let Some(key) = service_key else {
        return Err("this sharer has not learned its service's key yet".into());
    };
    let Some(ticket) = ticket else {
        return Err("no ticket".into());
    };
    keys::verify_ticket(&key, ticket, group, file_sha1, unix).map_err(|e| e.to_string())?;
    Ok(ticket.body.expires)
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
        Source::File(Arc::new(map)),
        None,
        offer(Bitfield::full(meta.piece_hashes.len())),
    ))
}
