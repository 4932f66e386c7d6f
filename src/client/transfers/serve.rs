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
use super::super::uploader::{self, Offer, Refusal, RefuseCode, ServeError, Uploader};
use super::downloads::Active;
use super::{PeerConn, Transfers, FRAME_BUDGET};
use crate::bitfield::Bitfield;
use crate::keys::{self, PublicKey};
use crate::net::conn::MappedSlice;
use crate::net::{ConnId, ReadEnd};
use crate::storage::{PartReader, SourceMap};
use crate::wire::peer_link::{emit_block_header, DownloaderMsg, SharerMsg};
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

/// What a serve link sends back.
pub(super) enum Answer {
    Msg(SharerMsg),
    Block(MappedBlock),
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
            self.conns.remove(registry, id);
        }
    }

    /// Reads a downloader's handshake and requests and answers them.
    pub(super) fn serve_readable(&mut self, registry: &Registry, id: ConnId, shares: &ClientCore) {
        let now = Instant::now();
        let unix = self.unix_at(now);
        let service_key = self.service_key;
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
        if !msgs.is_empty() {
            link.last_heard = now;
        }
        let mut close = None;
        let mut answers: Vec<Answer> = Vec::new();
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
        link.block_bytes += answers
            .iter()
            .map(|a| match a {
                Answer::Block(b) => u64::from(b.len),
                Answer::Msg(_) => 0,
            })
            .sum::<u64>();
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
