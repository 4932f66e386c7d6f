//! The serving core: what a client answers on a link another client opened to fetch a file,
//! as a sans-IO state machine per link.
//!
//! A link starts waiting for the downloader's handshake. A handshake in another protocol
//! version is refused at once ([`RefuseCode::Version`]); otherwise the core asks its driver to
//! look up what this client can offer for that file ([`Step::LookUp`]: the logged-in user's
//! share, a running download's verified pieces, or nothing) and turns the answer into an
//! `Accept` with the bitfield, or a `Refuse` with a typed [`RefuseCode`] after which the link
//! closes. Once serving, each request is answered with the block (where it lies in the file,
//! for the driver to send straight from the map) when it lies inside one piece the offer
//! holds verified, and with `Rejected` otherwise; a `Cancel` changes nothing (the block may be
//! queued already, and the downloader drops a late copy). A second handshake, or a request
//! before the first, breaks the link ([`ServeError`]).
//!
//! Per-link limits: a link with [`MAX_QUEUED_BYTES`] or more waiting to be sent is not read
//! ([`Uploader::may_read`]), so a downloader that requests faster than it reads holds at most
//! that much of this client's memory and no more requests.
//!
//! Nothing here touches a socket, a file or a clock: the driver (`transfers`) reads frames,
//! looks shares up, opens maps and writes the answers.

use std::fmt;

use crate::bitfield::Bitfield;
use crate::wire::peer_link::{BlockRef, DownloaderMsg, SharerMsg, MAX_ACCEPT_PIECES};
use crate::wire::{DecodeError, FileName, GroupId, Sha1Digest, PROTOCOL_VERSION};

/// A serve link with this many bytes queued for sending is not read until it catches up.
pub const MAX_QUEUED_BYTES: usize = 32 * 1024 * 1024;

/// Why a handshake is refused, as its code travels in a `Refuse`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RefuseCode {
    /// The logged-in user does not share that file (with that content) in that group here.
    NotShared,
    /// The downloader speaks another protocol version.
    Version,
    /// This client will not serve that file now (it has too many pieces to offer).
    Busy,
    /// The downloader has no valid ticket for the file (none, forged, expired or foreign).
    Ticket,
}

impl RefuseCode {
    /// The code on the wire.
    pub fn to_wire(self) -> u16 {
        match self {
            RefuseCode::NotShared => 1,
            RefuseCode::Version => 2,
            RefuseCode::Busy => 3,
            RefuseCode::Ticket => 4,
        }
    }

    /// The code a `Refuse` carries, if this build knows it.
    pub fn from_wire(code: u16) -> Option<Self> {
        match code {
            1 => Some(RefuseCode::NotShared),
            2 => Some(RefuseCode::Version),
            3 => Some(RefuseCode::Busy),
            4 => Some(RefuseCode::Ticket),
            _ => None,
        }
    }
}

impl fmt::Display for RefuseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RefuseCode::NotShared => "not shared",
            RefuseCode::Version => "another protocol version",
            RefuseCode::Busy => "busy",
            RefuseCode::Ticket => "no valid ticket",
        })
    }
}

/// A refusal of a handshake: the code and a message for the downloader's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: RefuseCode,
    pub message: String,
}

/// What the driver found it can offer for a handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    pub size: u64,
    pub piece_len: u32,
    /// The pieces held verified now.
    pub bitfield: Bitfield,
}

/// Why a serve link must close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServeError {
    /// A frame that does not parse.
    Decode(DecodeError),
    SecondHandshake,
    RequestBeforeHandshake,
}

impl fmt::Display for ServeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServeError::Decode(e) => write!(f, "bad frame: {e}"),
            ServeError::SecondHandshake => f.write_str("a second handshake"),
            ServeError::RequestBeforeHandshake => f.write_str("a request before the handshake"),
        }
    }
}

impl From<DecodeError> for ServeError {
    fn from(e: DecodeError) -> Self {
        ServeError::Decode(e)
    }
}

/// What the driver does for one message of the downloader.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Look up what this client offers for this file, and hand it to
    /// [`Uploader::handle_offer`].
    LookUp {
        group: GroupId,
        name: FileName,
        file_sha1: Sha1Digest,
    },
    /// Send this message. After a `Refuse`, close the link once it is out.
    Send(SharerMsg),
    /// Send this block, whose first byte is at `start` in the file, straight from the map.
    Block { block: BlockRef, start: u64 },
    /// Nothing to send.
    Nothing,
}

/// The file a link serves: its geometry, to check requests against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Served {
    size: u64,
    piece_len: u32,
    n_pieces: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for the handshake.
    Handshake,
    /// The handshake is being looked up.
    LookingUp,
    Serving(Served),
    /// Refused: nothing more is read.
    Refused,
}

/// One serve link's core (see the module doc).
#[derive(Debug)]
pub struct Uploader {
    state: State,
}

impl Default for Uploader {
    fn default() -> Self {
        Self::new()
    }
}

impl Uploader {
    pub fn new() -> Self {
        Uploader {
            state: State::Handshake,
        }
    }

    /// Whether the link has not sent its handshake yet (it has a deadline for that).
    pub fn awaits_handshake(&self) -> bool {
        self.state == State::Handshake
    }

    /// Whether the link serves a file (accepted).
    pub fn is_serving(&self) -> bool {
        matches!(self.state, State::Serving(_))
    }

    /// Whether the link was refused (it closes once the refusal is out).
    pub fn is_refused(&self) -> bool {
        self.state == State::Refused
    }

    /// Whether the link may be read, with `queued` bytes waiting to be sent on it.
    pub fn may_read(&self, queued: usize) -> bool {
        queued < MAX_QUEUED_BYTES && self.state != State::Refused
    }

    /// One frame from the downloader; `is_verified` tells whether the offered source holds a
    /// piece verified now (a running download's pieces verify one by one).
    pub fn handle_frame(
        &mut self,
        payload: &[u8],
        is_verified: impl Fn(u32) -> bool,
    ) -> Result<Step, ServeError> {
        self.handle_msg(DownloaderMsg::parse(payload)?, is_verified)
    }

    /// One message from the downloader (see [`handle_frame`](Self::handle_frame)).
    pub fn handle_msg(
        &mut self,
        msg: DownloaderMsg,
        is_verified: impl Fn(u32) -> bool,
    ) -> Result<Step, ServeError> {
        if self.state == State::Refused {
            return Ok(Step::Nothing);
        }
        match msg {
            DownloaderMsg::Handshake {
                version,
                group,
                name,
                file_sha1,
            } => {
                if self.state != State::Handshake {
                    return Err(ServeError::SecondHandshake);
                }
                if version != PROTOCOL_VERSION {
                    self.state = State::Refused;
                    return Ok(Step::Send(refuse(Refusal {
                        code: RefuseCode::Version,
                        message: format!("this sharer speaks version {PROTOCOL_VERSION}"),
                    })));
                }
                self.state = State::LookingUp;
                Ok(Step::LookUp {
                    group,
                    name,
                    file_sha1,
                })
            }
            DownloaderMsg::Request(block) => {
                let State::Serving(served) = self.state else {
                    return Err(ServeError::RequestBeforeHandshake);
                };
                Ok(match block_start(block, served) {
                    Some(start) if is_verified(block.piece) => Step::Block { block, start },
                    _ => Step::Send(SharerMsg::Rejected(block)),
                })
            }
            // The block is queued already, if it was answered (the downloader drops a late
            // copy).
            DownloaderMsg::Cancel(_) => Ok(Step::Nothing),
            // Tickets are checked by the driver (`transfers::serve`), which holds the
            // service key and the clock.
            DownloaderMsg::Ticket(_) => Ok(Step::Nothing),
        }
    }

    /// The driver's answer to [`Step::LookUp`]: the `Accept` or `Refuse` to send.
    pub fn handle_offer(&mut self, offer: Result<Offer, Refusal>) -> SharerMsg {
        if self.state != State::LookingUp {
            // Only a looked-up handshake gets an answer; anything else is a driver bug, and
            // refusing keeps the link from serving what nobody checked.
            self.state = State::Refused;
            return refuse(Refusal {
                code: RefuseCode::Busy,
                message: "no handshake to answer".into(),
            });
        }
        let offer = offer.and_then(|offer| {
            if offer.bitfield.len() > MAX_ACCEPT_PIECES {
                return Err(Refusal {
                    code: RefuseCode::Busy,
                    message: "the file has too many pieces to offer".into(),
                });
            }
            Ok(offer)
        });
        match offer {
            Ok(offer) => {
                self.state = State::Serving(Served {
                    size: offer.size,
                    piece_len: offer.piece_len,
                    n_pieces: u32::try_from(offer.bitfield.len()).unwrap_or(0),
                });
                SharerMsg::accept(offer.bitfield)
            }
            Err(refusal) => {
                self.state = State::Refused;
                refuse(refusal)
            }
        }
    }
}

fn refuse(refusal: Refusal) -> SharerMsg {
    SharerMsg::Refuse {
        code: refusal.code.to_wire(),
        message: refusal.message,
    }
}

/// Where a requested block starts in the file, if it lies inside one piece of it.
fn block_start(block: BlockRef, served: Served) -> Option<u64> {
    if block.piece >= served.n_pieces || block.len == 0 {
        return None;
    }
    let piece_start = u64::from(block.piece) * u64::from(served.piece_len);
    let piece_end = (piece_start + u64::from(served.piece_len)).min(served.size);
    let start = piece_start.checked_add(u64::from(block.offset))?;
    let end = start.checked_add(u64::from(block.len))?;
    (end <= piece_end).then_some(start)
}

#[cfg(test)]
#[path = "uploader_tests.rs"]
mod tests;
