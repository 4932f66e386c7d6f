//! Fetch links: the connections this client opened to sharers for its downloads. Bytes move
//! from the socket to where the link's [`SharerStream`] says: small frames to the engine, block
//! data straight into the `.part` map. Must not decide anything about the download (the
//! [`Download`](super::super::download::engine::Download) engine does) nor parse frames by hand
//! (`wire::peer_link` does).

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
use crate::net::{ConnId, ReadEnd};
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
            // The ticket goes first: the sharer checks it when the handshake comes.
            if let Some(ticket) = self.tickets.get(&download) {
                DownloaderMsg::Ticket(Box::new(ticket.clone())).emit(conn.out());
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
            Err(error) => self.lose(registry, id, &error.to_string()),
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
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchError::Io(e) => e.fmt(f),
            FetchError::Stream(e) => e.fmt(f),
        }
    }
}

impl From<StreamError> for FetchError {
    fn from(e: StreamError) -> Self {
        FetchError::Stream(e)
    }
}
