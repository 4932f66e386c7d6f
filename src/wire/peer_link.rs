//! Messages of the peer-to-peer link, over which file data moves.
//!
//! The downloader connects to a sharer and opens with [`DownloaderMsg::Handshake`], naming the
//! file by group, name and whole-file SHA1 (the content id, so a file renamed or replaced under
//! the same name is never mixed up). The sharer answers [`SharerMsg::Accept`] with the
//! [`Bitfield`] of the pieces it holds verified, or [`SharerMsg::Refuse`] and then closes the
//! connection. After an `Accept` the downloader pipelines [`DownloaderMsg::Request`]s, several
//! in flight at once; the sharer answers each with [`SharerMsg::Block`] carrying the data or
//! [`SharerMsg::Rejected`] if it will not send that block, in any order. [`SharerMsg::Have`]
//! announces a piece the sharer verified after its `Accept`. [`DownloaderMsg::Cancel`]
//! withdraws a request (end game); the sharer may still send the block, so a downloader must
//! accept a block it no longer wants and drop it.
//!
//! Frames are `u32 length | u8 type | body` as on every link; strings are `u16 length | UTF-8`.
//! Layouts are in the doc comments of the variants. A frame that does not parse
//! ([`DecodeError`]) closes the connection; a handshake the sharer will not serve gets `Refuse`.
//!
//! Frame limits: the sharer receives only small frames (the handshake is the largest, at most
//! [`MAX_DOWNLOADER_FRAME`] bytes); the downloader receives frames of up to [`MAX_PEER_FRAME`]
//! bytes, the size of a `Block` of [`MAX_BLOCK_LEN`] bytes. An `Accept` fits that limit for
//! files of up to [`MAX_ACCEPT_PIECES`] pieces (about 4 TiB of 512 KiB pieces); a sharer must
//! not offer a larger file.
//!
//! Block data is meant to move without a copy: a downloader follows the sharer's bytes with a
//! [`SharerStream`], which reads a `Block`'s length prefix, type byte and
//! [`BLOCK_HEADER_LEN`]-byte header on their own, checks them, and then names the piece and
//! offset the data belongs to, so that the caller reads it straight into the file's memory
//! map; a sharer may write [`emit_block_header`] and then send the data straight from
//! its map. The bytes are the same as those of [`SharerMsg::emit`].
//!
//! As everywhere in `wire`: `parse` never panics on any input, `emit` never panics, and no
//! count read off the wire is used to allocate before it is checked against the bytes that
//! remain. Nothing here does IO.

use std::fmt;

use crate::bitfield::Bitfield;

use super::codec::*;
use super::frame;
use super::ids::{FileName, GroupId, Sha1Digest, MAX_FILE_NAME_LEN, MAX_ID_LEN};
use super::ticket::Ticket;
use super::{PROTOCOL_MAGIC, PROTOCOL_VERSION};

/// Largest block a downloader may request and a sharer may send: 1 MiB.
pub const MAX_BLOCK_LEN: u32 = 1 << 20;
/// The type byte of a `Block` frame, for readers that take its header on its own.
pub const BLOCK_TYPE: u8 = ty::BLOCK;
/// Bytes of a `Block` frame between the type byte and the data: `u32 piece | u32 offset`.
pub const BLOCK_HEADER_LEN: usize = 8;
/// Largest frame (type byte + body) on a peer link: a `Block` of [`MAX_BLOCK_LEN`] bytes.
pub const MAX_PEER_FRAME: usize = 1 + BLOCK_HEADER_LEN + MAX_BLOCK_LEN as usize;
/// Largest frame a downloader sends: a `Handshake` with the longest group id and file name.
/// A sharer can hold the link to this limit for its whole life.
pub const MAX_DOWNLOADER_FRAME: usize = 1 + 4 + 2 + (2 + MAX_ID_LEN) + (2 + MAX_FILE_NAME_LEN) + 20;
/// Bytes of an `Accept` frame before its bitfield: type, magic, version and piece count.
const ACCEPT_OVERHEAD: usize = 1 + 4 + 2 + 4;
/// Most pieces whose `Accept` fits in [`MAX_PEER_FRAME`]: 8 * (MAX_PEER_FRAME - 11), a little
/// under 2^23, which at 512 KiB a piece is a file of about 4 TiB.
pub const MAX_ACCEPT_PIECES: usize = 8 * (MAX_PEER_FRAME - ACCEPT_OVERHEAD);
/// Longest human-readable reason in a `Refuse`.
pub const MAX_REFUSE_LEN: usize = 1024;

/// A block of a piece: `u32 piece | u32 offset | u32 len`, with `len` in `1..=MAX_BLOCK_LEN`.
/// Whether the block lies inside the piece is for the sharer to check against the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockRef {
    pub piece: u32,
    pub offset: u32,
    pub len: u32,
}

impl BlockRef {
    fn parse(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let piece = r.u32()?;
        let offset = r.u32()?;
        let len = r.u32()?;
        if len == 0 || len > MAX_BLOCK_LEN {
            return Err(DecodeError::BadValue("block length"));
        }
        Ok(BlockRef { piece, offset, len })
    }

    fn emit(&self, out: &mut Vec<u8>) {
        put_u32(out, self.piece);
        put_u32(out, self.offset);
        put_u32(out, self.len);
    }
}

/// Downloader to sharer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DownloaderMsg {
    /// `0x01`: `u32 magic | u16 version | str group | str name | sha1 file_sha1`.
    Handshake {
        version: u16,
        group: GroupId,
        name: FileName,
        file_sha1: Sha1Digest,
    },
    /// `0x10`: `block_ref`. Asks for one block.
    Request(BlockRef),
    /// `0x11`: `block_ref`. Withdraws an earlier request.
    Cancel(BlockRef),
    /// `0x12`: `ticket` (see [`crate::wire::ticket`]): the service's permission for this
    /// download, sent before the handshake and again whenever it is renewed.
    Ticket(Box<Ticket>),
}

/// Sharer to downloader.
#[derive(Clone, PartialEq, Eq)]
pub enum SharerMsg {
    /// `0x81`: `u32 magic | u16 version | u32 n_pieces | ceil(n_pieces / 8) bytes`, the
    /// bitfield's length implied by `n_pieces`, its spare bits clear.
    Accept { version: u16, bitfield: Bitfield },
    /// `0x82`: `u16 code | str message` (at most [`MAX_REFUSE_LEN`] bytes; `emit` cuts a longer
    /// one at a character boundary). The sharer closes the connection after it.
    Refuse { code: u16, message: String },
    /// `0x83`: `u32 piece`. The sharer now holds that piece verified.
    Have { piece: u32 },
    /// `0x84`: `u32 piece | u32 offset | data`, the data running to the end of the frame,
    /// 1 to [`MAX_BLOCK_LEN`] bytes.
    Block {
        piece: u32,
        offset: u32,
        data: Vec<u8>,
    },
    /// `0x85`: `block_ref`. The sharer will not send that block.
    Rejected(BlockRef),
}

impl fmt::Debug for SharerMsg {
    /// As derived, except that a `Block` shows its data's length rather than up to a mebibyte
    /// of bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SharerMsg::Accept { version, bitfield } => f
                .debug_struct("Accept")
                .field("version", version)
                .field("bitfield", bitfield)
                .finish(),
            SharerMsg::Refuse { code, message } => f
                .debug_struct("Refuse")
                .field("code", code)
                .field("message", message)
                .finish(),
            SharerMsg::Have { piece } => f.debug_struct("Have").field("piece", piece).finish(),
            SharerMsg::Block {
                piece,
                offset,
                data,
            } => f
                .debug_struct("Block")
                .field("piece", piece)
                .field("offset", offset)
                .field("data_len", &data.len())
                .finish(),
            SharerMsg::Rejected(block) => f.debug_tuple("Rejected").field(block).finish(),
        }
    }
}

mod ty {
    pub const HANDSHAKE: u8 = 0x01;
    pub const REQUEST: u8 = 0x10;
    pub const CANCEL: u8 = 0x11;
    pub const TICKET: u8 = 0x12;

    pub const ACCEPT: u8 = 0x81;
    pub const REFUSE: u8 = 0x82;
    pub const HAVE: u8 = 0x83;
    pub const BLOCK: u8 = 0x84;
    pub const REJECTED: u8 = 0x85;
}

fn group_id(r: &mut Reader<'_>) -> Result<GroupId, DecodeError> {
    Ok(GroupId::new(r.str16(MAX_ID_LEN)?)?)
}

fn file_name(r: &mut Reader<'_>) -> Result<FileName, DecodeError> {
    Ok(FileName::new(r.str16(MAX_FILE_NAME_LEN)?)?)
}

fn magic(r: &mut Reader<'_>) -> Result<(), DecodeError> {
    match r.u32()? {
        PROTOCOL_MAGIC => Ok(()),
        other => Err(DecodeError::BadMagic(other)),
    }
}

/// Checks the data length of a `Block`.
fn check_block_data_len(data_len: usize) -> Result<usize, DecodeError> {
    if data_len == 0 || data_len > MAX_BLOCK_LEN as usize {
        return Err(DecodeError::BadValue("block length"));
    }
    Ok(data_len)
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn cut_at_char_boundary(s: &str, max: usize) -> &str {
    let mut cut = s.len().min(max);
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s.get(..cut).unwrap_or("")
}

impl DownloaderMsg {
    /// Parses a frame payload (type byte + body).
    pub fn parse(payload: &[u8]) -> Result<Self, DecodeError> {
        let (frame_type, body) = frame::split(payload)?;
        let mut r = Reader::new(body);
        let msg = match frame_type {
            ty::HANDSHAKE => {
                magic(&mut r)?;
                DownloaderMsg::Handshake {
                    version: r.u16()?,
                    group: group_id(&mut r)?,
                    name: file_name(&mut r)?,
                    file_sha1: r.sha1()?,
                }
            }
            ty::REQUEST => DownloaderMsg::Request(BlockRef::parse(&mut r)?),
            ty::CANCEL => DownloaderMsg::Cancel(BlockRef::parse(&mut r)?),
            ty::TICKET => DownloaderMsg::Ticket(Box::new(Ticket::read(&mut r)?)),
            other => return Err(DecodeError::UnknownType(other)),
        };
        r.finish()?;
        Ok(msg)
    }

    /// Appends the whole frame (length prefix included) to `out`.
    pub fn emit(&self, out: &mut Vec<u8>) {
        match self {
            DownloaderMsg::Handshake {
                version,
                group,
                name,
                file_sha1,
            } => {
                let start = frame::begin(out, ty::HANDSHAKE);
                put_u32(out, PROTOCOL_MAGIC);
                put_u16(out, *version);
                put_str16(out, group.as_str());
                put_str16(out, name.as_str());
                put_sha1(out, file_sha1);
                frame::end(out, start);
            }
            DownloaderMsg::Request(block) => {
                let start = frame::begin(out, ty::REQUEST);
                block.emit(out);
                frame::end(out, start);
            }
            DownloaderMsg::Cancel(block) => {
                let start = frame::begin(out, ty::CANCEL);
                block.emit(out);
                frame::end(out, start);
            }
            DownloaderMsg::Ticket(ticket) => {
                let start = frame::begin(out, ty::TICKET);
                ticket.emit(out);
                frame::end(out, start);
            }
        }
    }

    /// The handshake this build sends for a file.
    pub fn handshake(group: GroupId, name: FileName, file_sha1: Sha1Digest) -> Self {
        DownloaderMsg::Handshake {
            version: PROTOCOL_VERSION,
            group,
            name,
            file_sha1,
        }
    }
}

impl SharerMsg {
    /// Parses a frame payload (type byte + body).
    pub fn parse(payload: &[u8]) -> Result<Self, DecodeError> {
        let (frame_type, body) = frame::split(payload)?;
        let mut r = Reader::new(body);
        let msg = match frame_type {
            ty::ACCEPT => {
                magic(&mut r)?;
                let version = r.u16()?;
                let n_pieces = usize::try_from(r.u32()?).map_err(|_| DecodeError::Truncated)?;
                // `bytes` checks the implied length against what remains, so a forged count
                // fails here, before `from_bytes` allocates.
                let bits = r.bytes(n_pieces.div_ceil(8))?;
                let bitfield = Bitfield::from_bytes(bits, n_pieces)
                    .ok_or(DecodeError::BadValue("bitfield spare bits"))?;
                SharerMsg::Accept { version, bitfield }
            }
            ty::REFUSE => SharerMsg::Refuse {
                code: r.u16()?,
                message: r.str16(MAX_REFUSE_LEN)?.to_owned(),
            },
            ty::HAVE => SharerMsg::Have { piece: r.u32()? },
            ty::BLOCK => {
                let piece = r.u32()?;
                let offset = r.u32()?;
                let data = r.bytes(r.remaining())?;
                check_block_data_len(data.len())?;
                SharerMsg::Block {
                    piece,
                    offset,
                    data: data.to_vec(),
                }
            }
            ty::REJECTED => SharerMsg::Rejected(BlockRef::parse(&mut r)?),
            other => return Err(DecodeError::UnknownType(other)),
        };
        r.finish()?;
        Ok(msg)
    }

    /// Appends the whole frame (length prefix included) to `out`. Fields are written as they
    /// are: a `Block` whose data is empty or longer than [`MAX_BLOCK_LEN`], or an `Accept` of
    /// more than [`MAX_ACCEPT_PIECES`] pieces, makes a frame the other side refuses.
    pub fn emit(&self, out: &mut Vec<u8>) {
        match self {
            SharerMsg::Accept { version, bitfield } => {
                let start = frame::begin(out, ty::ACCEPT);
                put_u32(out, PROTOCOL_MAGIC);
                put_u16(out, *version);
                put_count(out, bitfield.len());
                out.extend_from_slice(bitfield.as_bytes());
                frame::end(out, start);
            }
            SharerMsg::Refuse { code, message } => {
                let start = frame::begin(out, ty::REFUSE);
                put_u16(out, *code);
                // Cut an over-long reason at a character boundary so it always parses.
                put_str16(out, cut_at_char_boundary(message, MAX_REFUSE_LEN));
                frame::end(out, start);
            }
            SharerMsg::Have { piece } => {
                let start = frame::begin(out, ty::HAVE);
                put_u32(out, *piece);
                frame::end(out, start);
            }
            SharerMsg::Block {
                piece,
                offset,
                data,
            } => {
                let start = frame::begin(out, ty::BLOCK);
                put_u32(out, *piece);
                put_u32(out, *offset);
                out.extend_from_slice(data);
                frame::end(out, start);
            }
            SharerMsg::Rejected(block) => {
                let start = frame::begin(out, ty::REJECTED);
                block.emit(out);
                frame::end(out, start);
            }
        }
    }

    /// The answer this build sends to a handshake it serves.
    pub fn accept(bitfield: Bitfield) -> Self {
        SharerMsg::Accept {
            version: PROTOCOL_VERSION,
            bitfield,
        }
    }
}

/// Appends the length prefix, type byte and header of a `Block` frame whose `data_len` bytes of
/// data the caller sends separately: followed by those bytes, the result is exactly what
/// [`SharerMsg::emit`] writes for the same block.
pub fn emit_block_header(out: &mut Vec<u8>, piece: u32, offset: u32, data_len: usize) {
    let frame_len = (1 + BLOCK_HEADER_LEN).saturating_add(data_len);
    put_u32(out, u32::try_from(frame_len).unwrap_or(u32::MAX));
    put_u8(out, ty::BLOCK);
    put_u32(out, piece);
    put_u32(out, offset);
}

/// Reads `(piece, offset)` from the first [`BLOCK_HEADER_LEN`] bytes of a `Block` frame after
/// its type byte; whatever follows them (the start of the data) is ignored.
pub fn parse_block_header(after_type: &[u8]) -> Result<(u32, u32), DecodeError> {
    let mut r = Reader::new(after_type);
    Ok((r.u32()?, r.u32()?))
}

/// The number of data bytes in a `Block` frame whose length prefix is `frame_len` (type byte
/// and body, as on the wire), or the error [`SharerMsg::parse`] would give for that length.
pub fn block_data_len(frame_len: usize) -> Result<usize, DecodeError> {
    let data_len = frame_len
        .checked_sub(1 + BLOCK_HEADER_LEN)
        .ok_or(DecodeError::Truncated)?;
    check_block_data_len(data_len)
}

/// Largest frame other than a `Block` that a downloader takes once the sharer's `Accept` is in
/// (a `Have`, a `Rejected` or a `Refuse` with its longest message fit with room to spare).
pub const MAX_SMALL_FRAME: usize = 2048;

/// Why a sharer's byte stream cannot be followed: the link must close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamError {
    /// A frame that does not parse, or whose length is not allowed.
    Decode(DecodeError),
    /// A `Block`, `Have` or `Rejected` before the handshake's answer.
    BeforeAnswer,
    /// A second `Accept` or `Refuse`.
    SecondAnswer,
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamError::Decode(e) => e.fmt(f),
            StreamError::BeforeAnswer => f.write_str("a message before the handshake's answer"),
            StreamError::SecondAnswer => f.write_str("a second answer to the handshake"),
        }
    }
}

impl From<DecodeError> for StreamError {
    fn from(e: DecodeError) -> Self {
        StreamError::Decode(e)
    }
}

/// Where the bytes a [`SharerStream`] wants next go.
#[derive(Debug, PartialEq, Eq)]
pub enum Next<'a> {
    /// Into this buffer (a length prefix, a block header, a small frame's body): read what
    /// fits, then report the count with [`SharerStream::filled`].
    Buffer(&'a mut [u8]),
    /// The next `len` bytes on the link are the data of piece `piece` from `offset` on: read
    /// them wherever the caller keeps that piece (or drop them), as many as come, then report
    /// the count with [`SharerStream::filled`].
    BlockData { piece: u32, offset: u32, len: u32 },
}

/// What a [`SharerStream`] found in the bytes it was given.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A whole frame other than a `Block`.
    Msg(SharerMsg),
    /// A `Block` frame's header: its `len` bytes of data come next ([`Next::BlockData`]).
    BlockStart { piece: u32, offset: u32, len: u32 },
    /// The last data byte of that block was read.
    BlockEnd { piece: u32, offset: u32, len: u32 },
}

/// Where a [`SharerStream`] stands in the byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamState {
    /// Reading a frame's length prefix and type byte into `head`.
    Prefix,
    /// Reading a `Block` frame's header into `head`.
    BlockHead { frame_len: usize },
    /// Reading a block's data; `done` bytes of it are in.
    Data {
        piece: u32,
        offset: u32,
        len: u32,
        done: u32,
    },
    /// Reading the rest of another frame into `body`.
    Body { frame_len: usize },
}

/// A streaming decoder of what a sharer sends to a downloader, for readers that move block
/// data without a copy. It says where the next bytes go ([`next_read`](Self::next_read)): into
/// its own small buffers for prefixes, headers and small frames, or, for a `Block`'s data,
/// "the next N bytes are data for piece p at offset o", which the caller reads straight into
/// the place it keeps that piece. The frame limits are checked the moment a length prefix is in: a `Block`
/// at most [`MAX_PEER_FRAME`], an `Accept` too (it may carry a large bitfield), any other frame
/// at most [`MAX_SMALL_FRAME`] once the answer is in; and the order: one `Accept` or `Refuse`
/// first, nothing else before it. Like every parser here it never panics on any input, and
/// it does no IO.
#[derive(Debug)]
pub struct SharerStream {
    head: [u8; 4 + 1 + BLOCK_HEADER_LEN],
    have: usize,
    body: Vec<u8>,
    state: StreamState,
    answered: bool,
}

impl Default for SharerStream {
    fn default() -> Self {
        Self::new()
    }
}

impl SharerStream {
    pub fn new() -> Self {
        SharerStream {
            head: [0; 4 + 1 + BLOCK_HEADER_LEN],
            have: 0,
            body: Vec::new(),
            state: StreamState::Prefix,
            answered: false,
        }
    }

    /// Where the next bytes of the link go.
    pub fn next_read(&mut self) -> Next<'_> {
        match self.state {
            StreamState::Prefix => Next::Buffer(&mut self.head[self.have..5]),
            StreamState::BlockHead { .. } => {
                Next::Buffer(&mut self.head[self.have..5 + BLOCK_HEADER_LEN])
            }
            StreamState::Data {
                piece,
                offset,
                len,
                done,
            } => Next::BlockData {
                piece,
                offset: offset.saturating_add(done),
                len: len.saturating_sub(done),
            },
            StreamState::Body { frame_len } => {
                // Grown to the frame's length, which was checked against the limit; `have`
                // bytes of it are in.
                self.body.resize(frame_len, 0);
                Next::Buffer(&mut self.body[self.have.min(frame_len)..])
            }
        }
    }

    /// `n` bytes went where [`next_read`](Self::next_read) said (at most as many as it
    /// offered). Returns what they completed, if anything.
    pub fn filled(&mut self, n: usize) -> Result<Option<Decoded>, StreamError> {
        if n == 0 {
            return Ok(None);
        }
        match self.state {
            StreamState::Prefix => {
                self.have = (self.have + n).min(5);
                if self.have < 5 {
                    return Ok(None);
                }
                self.prefix_done()
            }
            StreamState::BlockHead { frame_len } => {
                self.have = (self.have + n).min(5 + BLOCK_HEADER_LEN);
                if self.have < 5 + BLOCK_HEADER_LEN {
                    return Ok(None);
                }
                let data_len = block_data_len(frame_len)?;
                let (piece, offset) = parse_block_header(&self.head[5..])?;
                // `block_data_len` allows at most MAX_BLOCK_LEN, which fits a u32.
                let len = u32::try_from(data_len).map_err(|_| DecodeError::BadValue("block"))?;
                self.state = StreamState::Data {
                    piece,
                    offset,
                    len,
                    done: 0,
                };
                Ok(Some(Decoded::BlockStart { piece, offset, len }))
            }
            StreamState::Data {
                piece,
                offset,
                len,
                done,
            } => {
                let done = done
                    .saturating_add(u32::try_from(n).unwrap_or(u32::MAX))
                    .min(len);
                if done < len {
                    self.state = StreamState::Data {
                        piece,
                        offset,
                        len,
                        done,
                    };
                    return Ok(None);
                }
                self.restart();
                Ok(Some(Decoded::BlockEnd { piece, offset, len }))
            }
            StreamState::Body { frame_len } => {
                self.have = (self.have + n).min(frame_len);
                if self.have < frame_len {
                    return Ok(None);
                }
                self.body_done().map(Some)
            }
        }
    }

    /// Whether the sharer's `Accept` or `Refuse` is in.
    pub fn answered(&self) -> bool {
        self.answered
    }

    /// The length prefix and type byte are in: check the length, choose how to read the rest.
    fn prefix_done(&mut self) -> Result<Option<Decoded>, StreamError> {
        let frame_len =
            u32::from_be_bytes([self.head[0], self.head[1], self.head[2], self.head[3]]) as usize;
        let frame_type = self.head[4];
        if frame_len == 0 {
            return Err(DecodeError::EmptyFrame.into());
        }
        if frame_type == ty::BLOCK {
            if !self.answered {
                return Err(StreamError::BeforeAnswer);
            }
            if frame_len > MAX_PEER_FRAME {
                return Err(DecodeError::FrameTooLarge {
                    len: frame_len,
                    max: MAX_PEER_FRAME,
                }
                .into());
            }
            self.state = StreamState::BlockHead { frame_len };
            return Ok(None);
        }
        let max = if self.answered {
            MAX_SMALL_FRAME
        } else {
            MAX_PEER_FRAME
        };
        if frame_len > max {
            return Err(DecodeError::FrameTooLarge {
                len: frame_len,
                max,
            }
            .into());
        }
        self.body.clear();
        self.body.push(frame_type);
        self.have = 1;
        self.state = StreamState::Body { frame_len };
        if frame_len == 1 {
            return self.body_done().map(Some);
        }
        Ok(None)
    }

    /// A whole small frame is in `body`.
    fn body_done(&mut self) -> Result<Decoded, StreamError> {
        let msg = SharerMsg::parse(&self.body)?;
        match &msg {
            SharerMsg::Accept { .. } | SharerMsg::Refuse { .. } if self.answered => {
                return Err(StreamError::SecondAnswer)
            }
            SharerMsg::Accept { .. } | SharerMsg::Refuse { .. } => self.answered = true,
            SharerMsg::Have { .. } | SharerMsg::Rejected(_) | SharerMsg::Block { .. }
                if !self.answered =>
            {
                return Err(StreamError::BeforeAnswer)
            }
            _ => {}
        }
        // A large `Accept` does not keep its buffer for the small frames after it.
        if self.body.capacity() > MAX_SMALL_FRAME {
            self.body = Vec::new();
        }
        self.restart();
        Ok(Decoded::Msg(msg))
    }

    fn restart(&mut self) {
        self.body.clear();
        self.state = StreamState::Prefix;
        self.have = 0;
    }
}

#[cfg(test)]
#[path = "peer_link_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "peer_stream_tests.rs"]
mod stream_tests;
