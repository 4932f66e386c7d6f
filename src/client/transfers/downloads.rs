//! Running downloads: the [`Download`] engine of each, its memory-mapped `.part` and
//! whole-file digest, and performing what the engine asks for (links to open, messages to send,
//! pieces to verify, the end of the download: the hard link to the target, or the failure).
//! A download resumes when its target's `.part` was left by an interrupted download of the
//! same content (see `part_record`): the pieces its record lists are verified again on the
//! pool and only the others are fetched; the record is kept up to date as pieces verify.
//! Must not parse bytes off a socket (`fetch` and `serve` do) or decide what a download does
//! next (the engine does).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use log::{debug, info, warn};
use mio::Registry;

use super::super::download::engine::{Action, Download};
use super::super::download::picker::PeerId;
use super::super::outcome::{Completed, Resumed, SharersError, Started};
use super::super::part_record::{self, Found, PartRecord, RECORD_INTERVAL};
use super::super::session::{DownloadError, DownloadId, StartError};
use super::{TransferEvent, Transfers};
use crate::hasher::{sha1_of, FileStream, HashPool, PieceChecked, StreamDone};
use crate::net::ConnId;
use crate::storage::{PartFile, PartReader};
use crate::wire::tracker_link::FileMeta;
use crate::wire::{GroupId, Sha1Digest};

/// A running download.
pub(super) struct Active {
    pub(super) engine: Download,
    pub(super) part: PartFile,
    pub(super) reader: PartReader,
    pub(super) target: PathBuf,
    pub(super) part_path: PathBuf,
    pub(super) links: BTreeMap<PeerId, ConnId>,
    pub(super) started: Instant,
    pub(super) first_piece: bool,
    /// A block was written (logged once: the benchmark times a resume's first new block).
    pub(super) first_block: bool,
    /// The whole-file digest, fed by the hasher pool.
    pub(super) stream: Arc<FileStream>,
    /// The whole-file digest once every piece is in it.
    pub(super) file_digest: Option<Sha1Digest>,
    pub(super) all_verified: bool,
    /// The resume record beside the `.part`, as it should be on disk.
    pub(super) record: PartRecord,
    /// `record` changed since it was last written, at `record_written`.
    pub(super) record_dirty: bool,
    pub(super) record_written: Instant,
}

impl Drop for Active {
    fn drop(&mut self) {
        // A download that ends early needs no more of its digest.
        self.stream.cancel();
    }
}

impl Transfers {
    /// Starts download `id`: creates `<target>.part` at full size (or resumes the one an
    /// interrupted download of this content left, see `part_record`), maps it and opens links
    /// to `peers`. `Ok` says what started.
    #[allow(clippy::too_many_arguments)]
    pub fn start_download(
        &mut self,
        registry: &Registry,
        hasher: &HashPool,
        id: DownloadId,
        group: GroupId,
        meta: FileMeta,
        peers: &[SocketAddr],
        target: PathBuf,
        now: Instant,
    ) -> Result<Started, StartError> {
        if target.symlink_metadata().is_ok() {
            return Err(StartError::TargetExists(target));
        }
        let part_path = part_record::part_path(&target);
        let create_error = |e: std::io::Error| StartError::CreatePart {
            path: part_path.clone(),
            reason: e.to_string(),
        };
        let (part, record, resumed) = match part_record::inspect(&target, &meta) {
            Found::Foreign(reason) => {
                return Err(StartError::ForeignPart {
                    path: part_path,
                    reason,
                })
            }
            Found::Nothing => {
                let part = PartFile::create(&part_path, meta.size, meta.piece_len)
                    .map_err(create_error)?;
                // The record is on disk before any data, so a `.part` of ours always has one.
                let record = std::fs::metadata(&part_path)
                    .map(|m| PartRecord::new(&meta, &m))
                    .and_then(|r| part_record::write(&target, &r, true).map(|()| r));
                match record {
                    Ok(r) => (part, r, None),
                    Err(e) => {
                        drop(part);
                        let _ = std::fs::remove_file(&part_path);
                        return Err(create_error(e));
                    }
                }
            }
            Found::Resume { verified } => {
                let part = PartFile::open_existing(&part_path, meta.size, meta.piece_len)
                    .map_err(create_error)?;
                let mut record = std::fs::metadata(&part_path)
                    .map(|m| PartRecord::new(&meta, &m))
                    .map_err(create_error)?;
                record.verified = verified.clone();
                (part, record, Some(verified))
            }
        };
        let started = Started {
            name: meta.name.clone(),
            group: group.clone(),
            target: target.clone(),
            size: meta.size,
            n_sharers: peers.len(),
            resumed: resumed.as_ref().map(|verified| Resumed {
                to_verify: verified.count_ones(),
                n_pieces: verified.len(),
            }),
        };
        // Each download draws its own order of equally rare pieces and of sharers to link,
        // so that a crowd starting together asks the seed for different pieces.
        let mut limits = self.limits.clone();
        limits.piece_order_seed = getrandom::u64().unwrap_or(id.job().0) | 1;
        let mut engine = Download::new(group, meta, limits);
        if let Some(verified) = &resumed {
            info!(
                "{}: resuming {}, {} pieces to verify again",
                engine.meta.name,
                part_path.display(),
                verified.count_ones()
            );
            engine.resume(verified.iter_ones().filter_map(|i| u32::try_from(i).ok()));
        }
        engine.start(peers, now);
        let reader = part.reader();
        let n_pieces = engine.picker().n_pieces();
        let stream = FileStream::new(id.job(), reader.clone(), n_pieces);
        // The whole-file SHA1 is not computed again on download: every piece must match the
        // piece hash the tracker holds for this content (size, piece length, piece hashes and
        // file SHA1 are the content's identity there, checked together at upload), so a file
        // whose every piece verified is that content, and each byte is hashed once. An empty
        // file has no piece: its digest is computed (of nothing) and compared.
        let file_digest = Some(if n_pieces == 0 {
            sha1_of(&[])
        } else {
            engine.meta.file_sha1
        });
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
                first_block: false,
                stream,
                file_digest,
                all_verified: false,
                record,
                record_dirty: false,
                record_written: now,
            },
        );
        self.run_actions(registry, hasher, id, now);
        Ok(started)
    }

    /// The tracker's answer to a `QuerySharers` event.
    pub fn on_sharers(
        &mut self,
        registry: &Registry,
        hasher: &HashPool,
        download: DownloadId,
        result: Result<Vec<SocketAddr>, SharersError>,
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
        let id = DownloadId::of_job(job);
        let Some(active) = self.downloads.get_mut(&id) else {
            return;
        };
        let (piece, ok) = (verdict.piece(), verdict.ok());
        active.part.finish(verdict);
        if !ok && active.record.verified.get(piece as usize) {
            // A resumed piece that did not hold up: fetched again.
            active.record.verified.clear(piece as usize);
            active.record_dirty = true;
        }
        active.engine.on_piece_checked(piece, ok, now);
        self.run_actions(registry, hasher, id, now);
    }

    /// The hasher pool finished a download's whole-file digest.
    pub fn on_stream(&mut self, registry: &Registry, done: StreamDone) {
        let StreamDone {
            job,
            digest,
            fed_hot,
        } = done;
        let id = DownloadId::of_job(job);
        let Some(active) = self.downloads.get_mut(&id) else {
            return;
        };
        info!(
            "whole-file digest of {}: {fed_hot} of {} pieces fed by the worker that verified them",
            active.engine.meta.name,
            active.engine.picker().n_pieces()
        );
        active.file_digest = Some(digest);
        self.maybe_complete(registry, id);
    }

    /// Performs what download `id`'s engine asks for.
    pub(super) fn run_actions(
        &mut self,
        registry: &Registry,
        hasher: &HashPool,
        id: DownloadId,
        now: Instant,
    ) {
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
                            active.engine.on_connect_failed(
                                peer,
                                &format!("cannot connect: {e}"),
                                now,
                            );
                        }
                    }
                }
                Action::Send { peer, msg } => {
                    if let Some(&conn_id) = active.links.get(&peer) {
                        if let Some(conn) = self.conns.get_mut(conn_id) {
                            match super::fetch::send_on_fetch(conn, &msg) {
                                Ok(()) => dirty.push(conn_id),
                                Err(e) => {
                                    let reason = e.to_string();
                                    self.lose(registry, conn_id, &reason);
                                }
                            }
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
                        // No whole-file digest is fed (see where the download starts).
                        (Some(ticket), Some(expected)) => {
                            hasher.verify_piece(id.job(), ticket, expected, None)
                        }
                        _ => {
                            warn!("piece {piece} could not be sealed for verification");
                            active.engine.on_piece_checked(piece, false, now);
                        }
                    }
                }
                Action::Verified { piece } => {
                    active.record.verified.set(piece as usize);
                    active.record_dirty = true;
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
                    self.fail_download(registry, id, DownloadError::Engine(reason));
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

    /// Finishes a download whose pieces are all verified once its whole-file digest is done.
    pub(super) fn maybe_complete(&mut self, registry: &Registry, id: DownloadId) {
        let Some(active) = self.downloads.get_mut(&id) else {
            return;
        };
        let Some(digest) = active.file_digest.filter(|_| active.all_verified) else {
            return;
        };
        if digest != active.engine.meta.file_sha1 {
            let error = DownloadError::FileDigest {
                got: digest,
                want: active.engine.meta.file_sha1,
            };
            return self.fail_download(registry, id, error);
        }
        // A hard link never replaces an existing file, unlike a rename.
        if let Err(e) = std::fs::hard_link(&active.part_path, &active.target) {
            let error = DownloadError::Link {
                target: active.target.clone(),
                part: active.part_path.clone(),
                reason: e.to_string(),
            };
            let Some(active) = self.downloads.remove(&id) else {
                return;
            };
            self.close_links(registry, &active);
            self.events.push_back(TransferEvent::Finished {
                download: id,
                result: Err(error),
            });
            return;
        }
        let _ = std::fs::remove_file(&active.part_path);
        part_record::remove(&active.target);
        let Some(active) = self.downloads.remove(&id) else {
            return;
        };
        self.close_links(registry, &active);
        self.detach_serving(id);
        let completed = Completed {
            name: active.engine.meta.name.clone(),
            group: active.engine.group.clone(),
            target: active.target.clone(),
            size: active.engine.meta.size,
            elapsed: active.started.elapsed(),
        };
        info!("{completed}");
        info!("{}: {}", completed.name, active.engine.waste());
        self.events.push_back(TransferEvent::Finished {
            download: id,
            result: Ok(completed),
        });
    }

    pub(super) fn fail_download(
        &mut self,
        registry: &Registry,
        id: DownloadId,
        error: DownloadError,
    ) {
        let Some(active) = self.downloads.remove(&id) else {
            return;
        };
        warn!("download of {} failed: {error}", active.engine.meta.name);
        info!("{}: {}", active.engine.meta.name, active.engine.waste());
        self.close_links(registry, &active);
        self.close_serving(registry, id);
        if matches!(error, DownloadError::Exiting) {
            // Interrupted: the `.part` and its record stay, to be resumed.
            if let Err(e) = part_record::write(&active.target, &active.record, true) {
                warn!(
                    "cannot write the resume record of {}: {e}",
                    active.part_path.display()
                );
            }
        } else {
            let _ = std::fs::remove_file(&active.part_path);
            part_record::remove(&active.target);
        }
        self.events.push_back(TransferEvent::Finished {
            download: id,
            result: Err(error),
        });
    }

    pub(super) fn close_links(&mut self, registry: &Registry, active: &Active) {
        for &conn_id in active.links.values() {
            self.conns.remove(registry, conn_id);
        }
    }

    /// Writes the resume records that changed, at most once per [`RECORD_INTERVAL`] each.
    pub(super) fn write_records(&mut self, now: Instant) {
        for active in self.downloads.values_mut() {
            if !active.record_dirty || now < active.record_written + RECORD_INTERVAL {
                continue;
            }
            active.record_dirty = false;
            active.record_written = now;
            if let Err(e) = part_record::write(&active.target, &active.record, false) {
                warn!(
                    "cannot write the resume record of {}: {e}",
                    active.part_path.display()
                );
            }
        }
    }

    /// Ends download `id` (if it runs) with `error`: its links close and its `.part` goes
    /// (kept, with its resume record, only for [`DownloadError::Exiting`]).
    pub fn stop_download(&mut self, registry: &Registry, id: DownloadId, error: DownloadError) {
        self.fail_download(registry, id, error);
    }

    /// Ends every running download (the client is exiting); their `.part` files stay, with
    /// their resume records, for the next run.
    pub fn abort_all(&mut self, registry: &Registry) {
        let ids: Vec<DownloadId> = self.downloads.keys().copied().collect();
        for id in ids {
            self.fail_download(registry, id, DownloadError::Exiting);
        }
    }
}
