//! Fetch links: the connections this client opened to sharers for its downloads. Bytes move
//! from the socket to where the link's [`SharerStream`] says: small frames to the engine, block
//! data straight into the `.part` map. Must not decide anything about the download (the
//! [`Download`](super::super::download::engine::Download) engine does) nor parse frames by hand
//! (`wire::peer_link` does).
//!
//! Links are secure (`net::peer_secure`): the link opens with the Noise `IK` handshake to the
//! sharer's identity key as the tracker named it, the ticket and the handshake frame riding
//! in its first message; a [`SealedSharerStream`] then says where the sharer's bytes go, and a
//! block's ciphertext is read into its place in the `.part` map and opened there, in place.
//! A block whose tag fails is a link error and is never counted. (The plain protocol is kept
//! for the benchmark's comparison only: `Transfers::with_plaintext_peer_links`.)

use std::io::{self, Read};
use std::net::SocketAddr;
use std::time::Instant;

use log::{debug, warn};
use mio::net::TcpStream;
use mio::Registry;

use super::super::download::picker::{PeerId, Verdict};
use super::super::session::DownloadId;
use super::downloads::Active;
use super::{PeerConn, Transfers, READ_BUDGET};
use crate::hasher::HashPool;
use crate::net::conn::{connect_progress, ConnectProgress};
use crate::net::peer_secure::{
    payload_frames, PeerSecureError, SealedDecoded, SealedNext, SealedSharerStream, Sealer,
};
use crate::net::{Conn, ConnId, ReadEnd};
use crate::wire::peer_link::{
    Decoded, DownloaderMsg, Next, SharerMsg, SharerStream, StreamError, MAX_PEER_FRAME,
};
use crate::wire::PROTOCOL_VERSION;

pub(super) struct FetchLink {
    pub(super) download: DownloadId,
    pub(super) peer: PeerId,
    pub(super) addr: SocketAddr,
    pub(super) connected: bool,
    /// Where the sharer's next bytes go.
    pub(super) decoder: SharerStream,
    /// Whether the block being read goes into the file (the engine wanted it).
    pub(super) writing: bool,
    /// The link's security (`None` only for the benchmark's plain comparison).
    pub(super) secure: Option<Box<FetchSecure>>,
}

/// Most plaintext frames queued on a fetch link before its handshake is done (the ticket and
/// the handshake, and a ticket renewal at most).
const MAX_PENDING_PLAIN: usize = 4096;

/// A secure fetch link's state.
pub(super) struct FetchSecure {
    pub(super) stream: SealedSharerStream,
    /// Seals what this side sends, once the handshake is done.
    pub(super) sealer: Option<Sealer>,
    /// Frames queued before that: the first go in the handshake's first message, later ones
    /// are sealed when it is done.
    pub(super) pending: Vec<u8>,
    /// The handshake's first message is out.
    pub(super) started: bool,
    /// This client's identity key and the sharer's, as the tracker named it.
    pub(super) local_private: [u8; 32],
    pub(super) sharer_public: [u8; 32],
}

impl Drop for FetchSecure {
    fn drop(&mut self) {
        self.local_private = [0; 32];
        std::hint::black_box(&self.local_private);
    }
}

/// Queues `msg` on a fetch link: sealed once its handshake is done, kept for the handshake
/// before (plain links: as it is).
pub(super) fn send_on_fetch(
    conn: &mut Conn<PeerConn>,
    msg: &DownloaderMsg,
) -> Result<(), PeerSecureError> {
    let (_, data, out) = conn.parts();
    let PeerConn::Fetch(link) = data else {
        return Ok(());
    };
    match link.secure.as_deref_mut() {
        None => msg.emit(out),
        Some(FetchSecure {
            sealer: Some(sealer),
            ..
        }) => sealer.seal_frame(out, |o| msg.emit(o))?,
        Some(sec) => {
            if sec.pending.len() > MAX_PENDING_PLAIN {
                return Err(PeerSecureError::OutOfTurn(
                    "too many frames waiting for the handshake",
                ));
            }
            msg.emit(&mut sec.pending);
        }
    }
    Ok(())
}

/// Starts a secure fetch link's handshake once its connection is up: message 1 carries the
/// frames queued so far.
fn start_handshake(conn: &mut Conn<PeerConn>) -> Result<(), PeerSecureError> {
    let (_, data, out) = conn.parts();
    let PeerConn::Fetch(FetchLink {
        secure: Some(sec), ..
    }) = data
    else {
        return Ok(());
    };
    if sec.started {
        return Ok(());
    }
    sec.started = true;
    let first = std::mem::take(&mut sec.pending);
    sec.stream
        .start(&sec.local_private, &sec.sharer_public, &first, out)
}

/// The handshake is done: frames queued meanwhile are sealed.
fn established(
    sec: &mut FetchSecure,
    sealer: Sealer,
    out: &mut Vec<u8>,
) -> Result<(), PeerSecureError> {
    let pending = std::mem::take(&mut sec.pending);
    let mut sealer = sealer;
    let frames =
        payload_frames(&pending).ok_or(PeerSecureError::OutOfTurn("a queued frame is cut"))?;
    for frame in frames {
        let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
        sealer.seal_frame(out, |o| {
            o.extend_from_slice(&len.to_be_bytes());
            o.extend_from_slice(frame);
        })?;
    }
    sec.sealer = Some(sealer);
    Ok(())
}

impl Transfers {
    /// Opens a fetch link; the handshake is queued by the engine's next action and sent once
    /// the connection is up.
    pub(super) fn connect(
        &mut self,
        registry: &Registry,
        download: DownloadId,
        peer: PeerId,
        addr: SocketAddr,
    ) -> io::Result<()> {
        let (fetching, _, _) = self.count_links(None);
        if fetching >= self.caps.max_fetch {
            return Err(io::Error::other(format!(
                "too many links to sharers ({fetching})"
            )));
        }
        let secure = if self.plaintext {
            None
        } else {
            let Some(identity) = &self.identity else {
                return Err(io::Error::other("this client has no identity key"));
            };
            let Some(&sharer_public) = self.peer_keys.get(&download).and_then(|k| k.get(&addr))
            else {
                return Err(io::Error::other(format!(
                    "the tracker named no identity key for sharer {addr}"
                )));
            };
            Some(Box::new(FetchSecure {
                stream: SealedSharerStream::new().with_prefs(self.cipher_prefs),
                sealer: None,
                pending: Vec::new(),
                started: false,
                local_private: identity.private(),
                sharer_public,
            }))
        };
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
                secure,
            }),
        )?;
        if let Some(conn) = self.conns.get_mut(conn_id) {
            // The ticket goes first: the sharer checks it when the handshake comes.
            if let Some(ticket) = self.tickets.get(&download) {
                send_on_fetch(conn, &DownloaderMsg::Ticket(Box::new(ticket.clone())))
                    .map_err(io::Error::other)?;
            }
            conn.await_connect(registry)?;
        }
        if let Some(active) = self.downloads.get_mut(&download) {
            active.links.insert(peer, conn_id);
        }
        Ok(())
    }

    pub(super) fn fetch_writable(
        &mut self,
        registry: &Registry,
        hasher: &HashPool,
        id: ConnId,
        now: Instant,
    ) {
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        let PeerConn::Fetch(link) = &mut conn.data else {
            return;
        };
        if !link.connected {
            match connect_progress(&conn.stream) {
                ConnectProgress::Connected => link.connected = true,
                ConnectProgress::Pending => return,
                ConnectProgress::Failed(e) => {
                    self.lose(registry, id, &format!("cannot connect: {e}"));
                    return self.settle(registry, hasher, now);
                }
            }
            debug!("connected to sharer {}", link.addr);
            if let Err(e) = start_handshake(conn) {
                self.lose(registry, id, &e.to_string());
                return self.settle(registry, hasher, now);
            }
        }
        self.flush_conn(registry, id);
        self.settle(registry, hasher, now);
    }

    /// Reads what a sharer sent: small frames are parsed, block data goes into the file.
    pub(super) fn fetch_readable(
        &mut self,
        registry: &Registry,
        hasher: &HashPool,
        id: ConnId,
        now: Instant,
    ) {
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
        let (stream, data, out) = conn.parts();
        let PeerConn::Fetch(link) = data else {
            return;
        };
        let handshaking = link.secure.as_ref().is_some_and(|s| s.sealer.is_none());
        let outcome = if link.secure.is_some() {
            read_sealed_sharer(
                stream,
                link,
                active,
                &mut self.scratch,
                &mut messages,
                out,
                now,
            )
        } else {
            read_sharer(stream, link, active, &mut self.scratch, &mut messages, now)
        };
        let sealed_out =
            link.secure.as_ref().is_some_and(|s| s.sealer.is_some()) && !out.is_empty();
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
        let still_handshaking = self
            .conns
            .get(id)
            .is_some_and(|c| matches!(&c.data, PeerConn::Fetch(l) if l.secure.as_ref().is_some_and(|s| s.sealer.is_none())));
        match outcome {
            Ok(ReadEnd::WouldBlock) | Ok(ReadEnd::Stopped) => {}
            Ok(ReadEnd::Budget) => self.ready.push_back(id),
            Ok(ReadEnd::Eof) if handshaking && still_handshaking => {
                let addr = self.conns.get(id).map(|c| match &c.data {
                    PeerConn::Fetch(l) => l.addr.to_string(),
                    PeerConn::Serve(l) => l.addr.to_string(),
                });
                warn!(
                    "sharer {}: closed during the secure handshake: it does not hold the \
                     identity key the tracker named",
                    addr.unwrap_or_default()
                );
                self.lose(
                    registry,
                    id,
                    "closed during the secure handshake (the sharer does not hold the key \
                     the tracker named)",
                )
            }
            Ok(ReadEnd::Eof) => self.lose(registry, id, "closed by the sharer"),
            Err(error) => {
                if matches!(error, FetchError::Secure(_)) {
                    warn!("peer link {id}: {error}");
                }
                self.lose(registry, id, &error.to_string())
            }
        }
        if sealed_out {
            // The handshake completed: the frames queued meanwhile go out.
            self.flush_conn(registry, id);
        }
        self.run_actions(registry, hasher, download, now);
        self.settle(registry, hasher, now);
    }
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
) -> Result<ReadEnd, FetchError> {
    let peer = link.peer;
    let mut budget = READ_BUDGET;
    while budget > 0 {
        let (r, is_data) = match link.decoder.next_read() {
            Next::Buffer(buf) => (stream.read(buf), false),
            Next::BlockData { piece, offset, len } => (
                read_block_data(
                    stream,
                    &mut link.writing,
                    active,
                    scratch,
                    piece,
                    offset,
                    len,
                ),
                true,
            ),
        };
        let n = match io_step(r)? {
            Step::Read(n) => n,
            Step::End(end) => return Ok(end),
        };
        if is_data {
            // Bytes are flowing: a slow link in the middle of a long block is not stalled.
            active.engine.on_data(peer, now);
        }
        match link.decoder.filled(n)? {
            None => {}
            Some(Decoded::Msg(msg)) => messages.push(msg),
            Some(Decoded::BlockStart { piece, offset, len }) => {
                link.writing =
                    active.engine.on_block_header(peer, piece, offset, len, now) == Verdict::Write;
            }
            Some(Decoded::BlockEnd { piece, offset, len }) => {
                if link.writing {
                    active.engine.on_block_written(peer, piece, offset, len);
                    if !active.first_block {
                        active.first_block = true;
                        log::info!(
                            "{}: first block {:.3} s after the download started",
                            active.engine.meta.name,
                            active.started.elapsed().as_secs_f64()
                        );
                    }
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

/// Reads block data of `piece` at `offset` (at most `len` bytes) from `stream` straight into
/// its place in the `.part` map; when the link is not `writing` (the engine does not want the
/// block) or the file will not take it, into `scratch`, dropped, which keeps the stream in step.
fn read_block_data(
    stream: &mut TcpStream,
    writing: &mut bool,
    active: &mut Active,
    scratch: &mut [u8],
    piece: u32,
    offset: u32,
    len: u32,
) -> io::Result<usize> {
    if *writing {
        if let Some(r) = active
            .part
            .write_with(piece, offset, len, |buf| stream.read(buf))
        {
            return r;
        }
        // The engine accepted a block the file will not take: a bug, but the stream stays
        // in step if the data is dropped.
        warn!("piece {piece} refused a block the engine accepted");
        *writing = false;
    }
    let cap = scratch.len().min(len as usize);
    stream.read(&mut scratch[..cap])
}

/// Sorts a read's outcome: bytes, the end of what is there (`WouldBlock`), the peer closing,
/// or an error.
fn io_step(r: io::Result<usize>) -> Result<Step, FetchError> {
    match r {
        Ok(0) => Ok(Step::End(ReadEnd::Eof)),
        Ok(n) => Ok(Step::Read(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Step::End(ReadEnd::WouldBlock)),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Step::Read(0)),
        Err(e) => Err(FetchError::Io(e)),
    }
}

/// Why a fetch link must close while reading.
#[derive(Debug)]
pub(super) enum FetchError {
    /// The socket failed.
    Io(io::Error),
    /// The sharer's bytes broke the peer-link format.
    Stream(StreamError),
    /// The secure layer refused them: a failed handshake (not the sharer the tracker named),
    /// or a record or block that did not authenticate.
    Secure(PeerSecureError),
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchError::Io(e) => e.fmt(f),
            FetchError::Stream(e) => e.fmt(f),
            FetchError::Secure(e) => e.fmt(f),
        }
    }
}

impl From<PeerSecureError> for FetchError {
    fn from(e: PeerSecureError) -> Self {
        FetchError::Secure(e)
    }
}

/// Like [`read_sharer`] on a secure link: the sharer's records are opened by the link's
/// [`SealedSharerStream`]; a block's ciphertext is read into its place in the `.part` map,
/// then opened there in place once its tag is in. A block that fails is an error (the link
/// closes) and is not counted.
fn read_sealed_sharer(
    stream: &mut TcpStream,
    link: &mut FetchLink,
    active: &mut Active,
    scratch: &mut [u8],
    messages: &mut Vec<SharerMsg>,
    out: &mut Vec<u8>,
    now: Instant,
) -> Result<ReadEnd, FetchError> {
    let peer = link.peer;
    let mut budget = READ_BUDGET;
    let Some(sec) = link.secure.as_deref_mut() else {
        return Ok(ReadEnd::Stopped);
    };
    while budget > 0 {
        // A dropped block's data goes into the stream's own buffer, but it is data all the
        // same (the link is not stalled).
        let dropped_data = sec.stream.in_block_data();
        let (r, is_data) = match sec.stream.next_read() {
            // Bytes read ahead complete a record or a tag: no read.
            SealedNext::Ready => (None, false),
            SealedNext::Buffer(buf) => (Some(stream.read(buf)), dropped_data),
            SealedNext::BlockData { piece, offset, len } => (
                Some(read_block_data(
                    stream,
                    &mut link.writing,
                    active,
                    scratch,
                    piece,
                    offset,
                    len,
                )),
                true,
            ),
        };
        let n = match r.map(io_step).transpose()? {
            None => 0,
            Some(Step::Read(n)) => n,
            Some(Step::End(end)) => return Ok(end),
        };
        if is_data {
            active.engine.on_data(peer, now);
        }
        match sec.stream.filled(n)? {
            None => {}
            Some(SealedDecoded::Established(sealer)) => {
                debug!(
                    "sharer {}: records in {}",
                    link.addr,
                    sealer.cipher().name()
                );
                established(sec, sealer, out)?
            }
            Some(SealedDecoded::Msg(msg)) => messages.push(msg),
            Some(SealedDecoded::BlockStart { piece, offset, len }) => {
                link.writing =
                    active.engine.on_block_header(peer, piece, offset, len, now) == Verdict::Write;
                if !link.writing {
                    // Not kept, but still authenticated: the stream reads it into its own
                    // buffer and checks its tag at the end.
                    sec.stream.drop_block()?;
                }
            }
            Some(SealedDecoded::BlockSealed { piece, offset, len }) => {
                let opened = if link.writing {
                    // Decrypted where it landed, in the piece's bytes (still `Writable`).
                    active
                        .part
                        .write_with(piece, offset, len, |buf| sec.stream.open_block(buf))
                } else {
                    None
                };
                match opened {
                    Some(result) => {
                        result?;
                        active.engine.on_block_written(peer, piece, offset, len);
                        if !active.first_block {
                            active.first_block = true;
                            log::info!(
                                "{}: first block {:.3} s after the download started",
                                active.engine.meta.name,
                                active.started.elapsed().as_secs_f64()
                            );
                        }
                    }
                    // Dropped at its start: opened in the stream's buffer, its tag checked
                    // (an error closes the link). A block the file stopped taking midway
                    // (a bug) cannot be checked and fails the same way.
                    None => {
                        sec.stream.skip_block()?;
                    }
                }
                link.writing = false;
            }
        }
        budget = budget.saturating_sub(n);
    }
    Ok(ReadEnd::Budget)
}

impl From<StreamError> for FetchError {
    fn from(e: StreamError) -> Self {
        FetchError::Stream(e)
    }
}
