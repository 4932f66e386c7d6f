//! The peer links' security: a Noise `IK` handshake (via `snow`) between the downloader and
//! the sharer, then a record layer of our framing around `ring`'s AES-128-GCM, keyed from the
//! handshake's split. Sans-IO: bytes in, bytes out, no sockets, clocks or threads, and no
//! cryptography of our own (the key exchange is `snow`'s, the AEAD is `ring`'s AES-128-GCM,
//! whose AES-NI/VAES assembly runs at full speed even in unoptimised builds, and whose output
//! the tests check against RustCrypto's `aes-gcm`; this module only frames and counts).
//!
//! Why AES-128-GCM rather than the handshake's ChaCha20-Poly1305 (version 1 of this layer):
//! on the x86-64 machines this runs on (AES-NI, VAES, VPCLMULQDQ) ring's AES-128-GCM seals
//! and opens about 8.7 GB/s per core against about 2.1-2.5 GB/s for ChaCha20-Poly1305
//! (`peer_aead_throughput`), and block data is the bulk of what a client does: the profile of
//! the transfer benchmark had the downloader spend a fifth of its CPU opening ChaCha20
//! records. The record key is the first 16 bytes of the 32-byte key the handshake's split
//! gives each direction (Noise itself truncates hash outputs to cipher keys the same way).
//!
//! ```text
//! downloader -> sharer : "P2PL" | u16 version (2)                  (clear; the prologue)
//!                        u16 len | IK message 1                     (e, es, s, ss; its payload,
//!                                                                    encrypted: the downloader's
//!                                                                    first frames, Ticket and
//!                                                                    Handshake)
//! sharer -> downloader : u16 len | IK message 2                     (e, ee, se; empty payload)
//! then, each way       : record*
//! record = u32 len | ciphertext of one frame (len bytes) | tag (16)
//!          (AAD = the 4 length bytes; the plaintext is one whole frame of the peer protocol,
//!          length prefix included)
//! block  = record of the Block frame's first 13 bytes (u32 length | 0x84 | u32 piece |
//!          u32 offset) | ciphertext of the block's data (length - 9 bytes) | tag (16)
//!          (the data is its own AEAD message: AAD = those 13 plaintext bytes)
//! ```
//!
//! Nonces are counters, one per direction, each direction with its own key: the Noise nonce
//! layout (4 zero bytes, then the counter as a little-endian u64), starting at 0 and taking
//! the next value for every AEAD message (a record, a block's data), never reused; a counter
//! at `u64::MAX` refuses to go on, and so does a key that protected [`MAX_KEY_BYTES`] (256
//! GiB; TLS 1.3 puts AES-GCM's limit at about that, so that the cipher stays
//! indistinguishable from random): the link closes and the downloader opens another, with
//! fresh keys. A record that fails its tag (tampered, reordered, replayed,
//! dropped: each shifts the counter) is a link error.
//!
//! The block's data is a separate AEAD message so that it can land in its final place (the
//! mapped `.part`) and be decrypted there in place: [`SealedSharerStream`] says "the next N
//! bytes are the ciphertext of piece p at offset o", then asks for the 16-byte tag into its own
//! buffer, then the caller lends it the piece's bytes to open ([`SealedSharerStream::open_block`]).
//! Data of a block the downloader does not keep is dropped without being opened
//! ([`SealedSharerStream::skip_block`]): nothing of it is used, and the counter moves on so the
//! next record still authenticates.
//!
//! Why `IK`: the downloader knows the sharer's static key before it dials (the tracker hands
//! it out with the address), so the sharer proves it at once (msg 1 is encrypted to it, and
//! msg 2 can only be made with its private key), and the downloader's own static key and its
//! first frames (the ticket, the handshake) travel encrypted in message 1: one round trip, as
//! the plain protocol took. What `IK` gives the sharer at message 1 is the downloader's static
//! key (checked against the ticket's client key) but not yet liveness: message 1 can be
//! replayed. A replayer gets nothing from that: message 2 and every record after it are
//! encrypted under keys that need the downloader's ephemeral and static private keys, and the
//! sharer sends blocks only in answer to requests, which arrive in records that a replayer
//! cannot make (a replayed record fails its tag under the fresh keys).

use std::fmt;

use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_128_GCM};

use crate::wire::peer_link::{Decoded, Next, SharerMsg, SharerStream, StreamError};

/// The clear preamble's magic: "P2PL" (as a plain frame's length prefix, about 1.3 GB, over
/// every peer link's limit, so a plain peer and a secure one can never mistake each other).
pub const PEER_LINK_MAGIC: [u8; 4] = *b"P2PL";
/// Version of this handshake and record layer, sent in the preamble (1: records in
/// ChaCha20-Poly1305; 2: AES-128-GCM).
pub const PEER_LINK_VERSION: u16 = 2;
/// Bytes of the preamble.
pub const PREAMBLE_LEN: usize = 6;
/// The peer links' Noise protocol.
pub const PEER_LINK_PATTERN: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
/// Most bytes (plaintext) one direction's key protects; past that the link must close.
pub const MAX_KEY_BYTES: u64 = 1 << 38;
/// Bytes of every tag.
pub const TAG_LEN: usize = 16;
/// Bytes of a record's length prefix.
pub const RECORD_HEAD_LEN: usize = 4;
/// Longest handshake message accepted (message 1 is 96 bytes plus its payload).
pub const MAX_HANDSHAKE_MSG: usize = 1024;
/// Longest payload of message 1 (the downloader's first frames).
pub const MAX_HANDSHAKE_PAYLOAD: usize = MAX_HANDSHAKE_MSG - 96;
/// Bytes of a Block frame's header record plaintext: `u32 length | u8 type | u32 piece | u32
/// offset`.
pub const BLOCK_HEAD_LEN: usize = 13;

/// Why a secure peer link failed: it must close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerSecureError {
    /// The preamble has another magic (a plain peer, or not a peer at all).
    BadMagic([u8; 4]),
    /// The preamble names a version this program does not speak.
    BadVersion(u16),
    /// A handshake message longer than [`MAX_HANDSHAKE_MSG`].
    HandshakeTooLong(usize),
    /// The handshake failed: the other side does not hold the key it must (the sharer's key
    /// the tracker named), or sent garbage.
    Handshake(String),
    /// A payload for message 1 longer than [`MAX_HANDSHAKE_PAYLOAD`].
    PayloadTooLong(usize),
    /// A record longer than the link allows.
    RecordTooLong { len: usize, max: usize },
    /// A record that does not hold exactly one frame (or a block's header).
    RecordShape(&'static str),
    /// A record or a block's data failed authentication: tampered, reordered, replayed.
    BadRecord,
    /// The frame inside a record broke the peer protocol.
    Stream(StreamError),
    /// A direction's nonce counter ran out (never in practice: 2^64 messages), or its key
    /// protected [`MAX_KEY_BYTES`].
    NonceExhausted,
    /// Used out of turn (a record before the handshake, say).
    OutOfTurn(&'static str),
    /// The bytes to seal could not be read (a shared file that shrank).
    Source(String),
}

impl fmt::Display for PeerSecureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerSecureError::BadMagic(m) => {
                write!(
                    f,
                    "peer link: bad preamble magic {m:02x?} (not a secure peer link)"
                )
            }
            PeerSecureError::BadVersion(v) => {
                write!(f, "peer link: secure version {v} not spoken here")
            }
            PeerSecureError::HandshakeTooLong(n) => write!(
                f,
                "peer link: handshake message too long ({n} > {MAX_HANDSHAKE_MSG})"
            ),
            PeerSecureError::Handshake(e) => write!(
                f,
                "peer link: handshake failed ({e}): the peer does not hold the key it must"
            ),
            PeerSecureError::PayloadTooLong(n) => write!(
                f,
                "peer link: first frames too long for the handshake ({n} > \
                 {MAX_HANDSHAKE_PAYLOAD})"
            ),
            PeerSecureError::RecordTooLong { len, max } => {
                write!(f, "peer link: record too long ({len} > {max})")
            }
            PeerSecureError::RecordShape(what) => write!(f, "peer link: {what}"),
            PeerSecureError::BadRecord => {
                write!(f, "peer link: a record failed authentication")
            }
            PeerSecureError::Stream(e) => write!(f, "peer link: {e}"),
            PeerSecureError::NonceExhausted => write!(
                f,
                "peer link: its keys are used up (at most {} GiB each way): open another",
                MAX_KEY_BYTES >> 30
            ),
            PeerSecureError::OutOfTurn(what) => write!(f, "peer link: {what}"),
            PeerSecureError::Source(e) => write!(f, "peer link: cannot read a block: {e}"),
        }
    }
}

impl std::error::Error for PeerSecureError {}

impl From<StreamError> for PeerSecureError {
    fn from(e: StreamError) -> Self {
        PeerSecureError::Stream(e)
    }
}

fn snow_err(e: snow::Error) -> PeerSecureError {
    PeerSecureError::Handshake(e.to_string())
}

/// The nonce bytes of message number `counter`: 4 zero bytes, then the counter as a
/// little-endian u64 (the layout of Noise's ChaChaPoly, kept from version 1).
fn nonce_bytes(counter: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    n
}

fn cipher_of(key: &[u8; 32]) -> Box<LessSafeKey> {
    // Boxed: ring's key schedule (round keys and GHASH table) is large, and links are many.
    Box::new(LessSafeKey::new(
        UnboundKey::new(&AES_128_GCM, &key[..16])
            .unwrap_or_else(|_| unreachable!("16 bytes are an AES-128 key")),
    ))
}

/// The sending half of a link's record layer.
pub struct Sealer {
    cipher: Box<LessSafeKey>,
    next: u64,
    /// Plaintext bytes sealed so far (see [`MAX_KEY_BYTES`]).
    used: u64,
}

/// The receiving half of a link's record layer.
pub struct Opener {
    cipher: Box<LessSafeKey>,
    next: u64,
    /// Plaintext bytes opened or skipped so far (see [`MAX_KEY_BYTES`]).
    used: u64,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sealer(next {})", self.next)
    }
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Opener(next {})", self.next)
    }
}

/// The nonce of the next message, of `len` bytes: unique, and within the key's limit.
fn take_nonce(next: &mut u64, used: &mut u64, len: usize) -> Result<Nonce, PeerSecureError> {
    let total = used.saturating_add(len as u64);
    if *next == u64::MAX || total > MAX_KEY_BYTES {
        return Err(PeerSecureError::NonceExhausted);
    }
    *used = total;
    // Each counter value is taken once: the nonce is unique for the key.
    let n = Nonce::assume_unique_for_key(nonce_bytes(*next));
    *next += 1;
    Ok(n)
}

impl Sealer {
    /// A sealer with `key` (tests and the handshake's split).
    pub fn new(key: [u8; 32]) -> Self {
        Sealer {
            cipher: cipher_of(&key),
            next: 0,
            used: 0,
        }
    }

    /// Appends one record holding the frame `emit` writes (its whole frame, length prefix
    /// included), encrypted in place in `out`.
    pub fn seal_frame(
        &mut self,
        out: &mut Vec<u8>,
        emit: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(), PeerSecureError> {
        let at = out.len();
        out.extend_from_slice(&[0; RECORD_HEAD_LEN]);
        emit(out);
        let len = out.len() - at - RECORD_HEAD_LEN;
        let Ok(len32) = u32::try_from(len) else {
            out.truncate(at);
            return Err(PeerSecureError::RecordTooLong {
                len,
                max: u32::MAX as usize,
            });
        };
        out[at..at + RECORD_HEAD_LEN].copy_from_slice(&len32.to_be_bytes());
        let nonce = match take_nonce(&mut self.next, &mut self.used, len) {
            Ok(n) => n,
            Err(e) => {
                out.truncate(at);
                return Err(e);
            }
        };
        let (head, body) = out[at..].split_at_mut(RECORD_HEAD_LEN);
        let tag = self
            .cipher
            .seal_in_place_separate_tag(nonce, Aad::from(&*head), body)
            .map_err(|_| PeerSecureError::RecordShape("cannot encrypt"))?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Appends `data` encrypted under the next nonce, with `aad` authenticated too, then its
    /// tag: a block's data after its header record (`aad` = the header's 13 plaintext bytes).
    /// The data is copied once, into `out`, and encrypted there.
    pub fn seal_data(
        &mut self,
        out: &mut Vec<u8>,
        aad: &[u8],
        data: &[u8],
    ) -> Result<(), PeerSecureError> {
        let nonce = take_nonce(&mut self.next, &mut self.used, data.len())?;
        let at = out.len();
        out.extend_from_slice(data);
        let tag = self
            .cipher
            .seal_in_place_separate_tag(nonce, Aad::from(aad), &mut out[at..])
            .map_err(|_| PeerSecureError::RecordShape("cannot encrypt"))?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Appends a Block frame for `data` of `piece` at `offset`: its header record, then the
    /// data sealed on its own.
    pub fn seal_block(
        &mut self,
        out: &mut Vec<u8>,
        piece: u32,
        offset: u32,
        data: &[u8],
    ) -> Result<(), PeerSecureError> {
        self.seal_block_with(out, piece, offset, data.len(), |buf| {
            buf.copy_from_slice(data);
            Ok(())
        })
    }

    /// Like [`seal_block`](Self::seal_block) for `len` bytes that `fill` writes into their
    /// place in `out` (read from a file, say), where they are then encrypted. If `fill` fails
    /// nothing is appended, but a nonce was used: the link must close.
    pub fn seal_block_with(
        &mut self,
        out: &mut Vec<u8>,
        piece: u32,
        offset: u32,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), String>,
    ) -> Result<(), PeerSecureError> {
        let at = out.len();
        self.seal_frame(out, |o| {
            crate::wire::peer_link::emit_block_header(o, piece, offset, len)
        })?;
        // The AAD is the header's plaintext; rebuilt here rather than kept from before its
        // encryption (13 bytes on the stack, no allocation).
        let mut aad = [0u8; BLOCK_HEAD_LEN];
        let frame_len = u32::try_from(1 + 8 + len).unwrap_or(u32::MAX);
        aad[..4].copy_from_slice(&frame_len.to_be_bytes());
        aad[4] = crate::wire::peer_link::BLOCK_TYPE;
        aad[5..9].copy_from_slice(&piece.to_be_bytes());
        aad[9..13].copy_from_slice(&offset.to_be_bytes());
        let nonce = take_nonce(&mut self.next, &mut self.used, len)?;
        let data_at = out.len();
        out.resize(data_at + len, 0);
        if let Err(e) = fill(&mut out[data_at..]) {
            out.truncate(at);
            return Err(PeerSecureError::Source(e));
        }
        let tag = self
            .cipher
            .seal_in_place_separate_tag(nonce, Aad::from(&aad[..]), &mut out[data_at..])
            .map_err(|_| PeerSecureError::RecordShape("cannot encrypt"))?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }
}

impl Opener {
    /// An opener with `key` (tests and the handshake's split).
    pub fn new(key: [u8; 32]) -> Self {
        Opener {
            cipher: cipher_of(&key),
            next: 0,
            used: 0,
        }
    }

    /// Decrypts `buf` in place under the next nonce, checking `tag` over it and `aad`.
    pub fn open(
        &mut self,
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), PeerSecureError> {
        let nonce = take_nonce(&mut self.next, &mut self.used, buf.len())?;
        self.cipher
            .open_in_place_separate_tag(nonce, Aad::from(aad), Tag::from(*tag), buf, 0..)
            .map(|_| ())
            .map_err(|_| PeerSecureError::BadRecord)
    }

    /// Passes over one message of `len` bytes without opening it (data that is dropped
    /// unread): its nonce is used up, so the next message still lines up.
    pub fn skip(&mut self, len: usize) -> Result<(), PeerSecureError> {
        take_nonce(&mut self.next, &mut self.used, len).map(|_| ())
    }
}

/// The clear preamble.
pub fn preamble() -> [u8; PREAMBLE_LEN] {
    let mut p = [0u8; PREAMBLE_LEN];
    p[..4].copy_from_slice(&PEER_LINK_MAGIC);
    p[4..].copy_from_slice(&PEER_LINK_VERSION.to_be_bytes());
    p
}

fn builder<'a>(
    local_private: &'a [u8; 32],
    preamble: &'a [u8],
) -> Result<snow::Builder<'a>, PeerSecureError> {
    let params: snow::params::NoiseParams = PEER_LINK_PATTERN.parse().map_err(snow_err)?;
    snow::Builder::new(params)
        .prologue(preamble)
        .map_err(snow_err)?
        .local_private_key(local_private)
        .map_err(snow_err)
}

/// The two directions' keys once a handshake is done: `(initiator to responder, responder
/// to initiator)`.
fn split(hs: &mut snow::HandshakeState) -> ([u8; 32], [u8; 32]) {
    hs.dangerously_get_raw_split()
}

fn push_message(out: &mut Vec<u8>, msg: &[u8]) {
    // Callers never pass more than MAX_HANDSHAKE_MSG bytes.
    out.extend_from_slice(&u16::try_from(msg.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(msg);
}

/// The downloader's opening: appends the preamble and message 1 (carrying `payload`,
/// encrypted to the sharer's static key `sharer_public`) to `out`, and returns the handshake
/// state that reads the sharer's answer.
pub fn initiate(
    local_private: &[u8; 32],
    sharer_public: &[u8; 32],
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<Box<snow::HandshakeState>, PeerSecureError> {
    if payload.len() > MAX_HANDSHAKE_PAYLOAD {
        return Err(PeerSecureError::PayloadTooLong(payload.len()));
    }
    let pre = preamble();
    let mut hs = builder(local_private, &pre)?
        .remote_public_key(sharer_public)
        .map_err(snow_err)?
        .build_initiator()
        .map_err(snow_err)?;
    let mut msg = [0u8; MAX_HANDSHAKE_MSG];
    let n = hs.write_message(payload, &mut msg).map_err(snow_err)?;
    out.extend_from_slice(&pre);
    push_message(out, &msg[..n]);
    Ok(Box::new(hs))
}

/// The downloader reads message 2: the keys, `(sealer, opener)`.
fn finish_initiator(
    hs: &mut snow::HandshakeState,
    msg: &[u8],
) -> Result<(Sealer, Opener), PeerSecureError> {
    let mut payload = [0u8; MAX_HANDSHAKE_MSG];
    hs.read_message(msg, &mut payload).map_err(snow_err)?;
    if !hs.is_handshake_finished() {
        return Err(PeerSecureError::Handshake(
            "not finished after message 2".into(),
        ));
    }
    let (to_responder, to_initiator) = split(hs);
    Ok((Sealer::new(to_responder), Opener::new(to_initiator)))
}

/// What a sharer learns from a downloader's message 1.
pub struct Hello {
    /// The downloader's static key (what the ticket's client key must be).
    pub remote_static: [u8; 32],
    /// The downloader's first frames (decrypted).
    pub payload: Vec<u8>,
    /// The keys of the link: `sealer` for what the sharer sends.
    pub sealer: Sealer,
    /// Message 2, to send before any record.
    pub reply: Vec<u8>,
}

impl fmt::Debug for Hello {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hello")
            .field("payload_len", &self.payload.len())
            .finish_non_exhaustive()
    }
}

/// What [`SealedDownloaderStream::next_event`] found.
#[derive(Debug)]
pub enum ServeEvent<'a> {
    /// The handshake's message 1 arrived and was answered ([`Hello::reply`] must go out
    /// first).
    Hello(Hello),
    /// One frame's payload (type byte and body, without the length prefix).
    Frame(&'a [u8]),
}

enum ServeState {
    Preamble,
    Handshake(Box<snow::HandshakeState>),
    Open(Opener),
    Failed,
}

/// The sharer's side of a secure peer link, reading what the downloader sends: the preamble,
/// message 1, then records of small frames. Bounded: its buffer holds at most one handshake
/// message or one record (`max_frame` + 20 bytes).
pub struct SealedDownloaderStream {
    state: ServeState,
    local_private: [u8; 32],
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max_frame: usize,
}

impl fmt::Debug for SealedDownloaderStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedDownloaderStream")
            .field("buffered", &(self.end - self.start))
            .finish_non_exhaustive()
    }
}

impl Drop for SealedDownloaderStream {
    fn drop(&mut self) {
        self.local_private = [0; 32];
        std::hint::black_box(&self.local_private);
    }
}

impl SealedDownloaderStream {
    /// The sharer holding `local_private` (its identity key); frames of at most `max_frame`
    /// bytes are accepted.
    pub fn new(local_private: [u8; 32], max_frame: usize) -> Self {
        SealedDownloaderStream {
            state: ServeState::Preamble,
            local_private,
            buf: Vec::new(),
            start: 0,
            end: 0,
            max_frame,
        }
    }

    /// The handshake is done.
    pub fn is_open(&self) -> bool {
        matches!(self.state, ServeState::Open(_))
    }

    fn capacity(&self) -> usize {
        (2 + MAX_HANDSHAKE_MSG).max(RECORD_HEAD_LEN + 4 + self.max_frame + TAG_LEN)
    }

    /// Room to read received bytes into (empty when the buffer is full: call
    /// [`next_event`](Self::next_event) first).
    pub fn spare(&mut self) -> &mut [u8] {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let cap = self.capacity();
        if self.buf.len() < cap {
            self.buf.resize(cap, 0);
        }
        &mut self.buf[self.end..cap]
    }

    /// `n` bytes were written into [`spare`](Self::spare).
    pub fn commit(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// The next event in the buffered bytes, if a whole one is in. Errors are final.
    pub fn next_event(&mut self) -> Result<Option<ServeEvent<'_>>, PeerSecureError> {
        let result = self.step();
        if result.is_err() {
            self.state = ServeState::Failed;
        }
        // Re-borrow for the frame's bytes: `step` leaves their range in `start`/`end`.
        match result {
            Ok(Some(Stepped::Hello(hello))) => Ok(Some(ServeEvent::Hello(hello))),
            Ok(Some(Stepped::Frame(from, to))) => Ok(Some(ServeEvent::Frame(&self.buf[from..to]))),
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn step(&mut self) -> Result<Option<Stepped>, PeerSecureError> {
        loop {
            let have = &self.buf[self.start..self.end];
            match &mut self.state {
                ServeState::Failed => return Err(PeerSecureError::OutOfTurn("failed earlier")),
                ServeState::Preamble => {
                    if have.len() < PREAMBLE_LEN {
                        if have.len() >= 4 && have[..4] != PEER_LINK_MAGIC {
                            return Err(PeerSecureError::BadMagic([
                                have[0], have[1], have[2], have[3],
                            ]));
                        }
                        return Ok(None);
                    }
                    if have[..4] != PEER_LINK_MAGIC {
                        return Err(PeerSecureError::BadMagic([
                            have[0], have[1], have[2], have[3],
                        ]));
                    }
                    let version = u16::from_be_bytes([have[4], have[5]]);
                    if version != PEER_LINK_VERSION {
                        return Err(PeerSecureError::BadVersion(version));
                    }
                    self.start += PREAMBLE_LEN;
                    let pre = preamble();
                    let hs = builder(&self.local_private, &pre)?
                        .build_responder()
                        .map_err(snow_err)?;
                    self.state = ServeState::Handshake(Box::new(hs));
                }
                ServeState::Handshake(hs) => {
                    if have.len() < 2 {
                        return Ok(None);
                    }
                    let len = usize::from(u16::from_be_bytes([have[0], have[1]]));
                    if len > MAX_HANDSHAKE_MSG {
                        return Err(PeerSecureError::HandshakeTooLong(len));
                    }
                    if have.len() < 2 + len {
                        return Ok(None);
                    }
                    let mut payload = vec![0u8; MAX_HANDSHAKE_MSG];
                    let n = hs
                        .read_message(&have[2..2 + len], &mut payload)
                        .map_err(snow_err)?;
                    payload.truncate(n);
                    self.start += 2 + len;
                    let remote_static: [u8; 32] = hs
                        .get_remote_static()
                        .and_then(|k| k.try_into().ok())
                        .ok_or_else(|| PeerSecureError::Handshake("no static key".into()))?;
                    let mut msg = [0u8; MAX_HANDSHAKE_MSG];
                    let m = hs.write_message(&[], &mut msg).map_err(snow_err)?;
                    if !hs.is_handshake_finished() {
                        return Err(PeerSecureError::Handshake(
                            "not finished after message 2".into(),
                        ));
                    }
                    let mut reply = Vec::with_capacity(2 + m);
                    push_message(&mut reply, &msg[..m]);
                    let (to_responder, to_initiator) = split(hs);
                    self.state = ServeState::Open(Opener::new(to_responder));
                    return Ok(Some(Stepped::Hello(Hello {
                        remote_static,
                        payload,
                        sealer: Sealer::new(to_initiator),
                        reply,
                    })));
                }
                ServeState::Open(opener) => {
                    if have.len() < RECORD_HEAD_LEN {
                        return Ok(None);
                    }
                    let len = u32::from_be_bytes([have[0], have[1], have[2], have[3]]) as usize;
                    let max = 4 + self.max_frame;
                    if len > max {
                        return Err(PeerSecureError::RecordTooLong { len, max });
                    }
                    if len < 5 {
                        return Err(PeerSecureError::RecordShape(
                            "a record shorter than a frame",
                        ));
                    }
                    if have.len() < RECORD_HEAD_LEN + len + TAG_LEN {
                        return Ok(None);
                    }
                    let at = self.start;
                    let (head, rest) = self.buf[at..].split_at_mut(RECORD_HEAD_LEN);
                    let (body, tail) = rest.split_at_mut(len);
                    let mut tag = [0u8; TAG_LEN];
                    tag.copy_from_slice(&tail[..TAG_LEN]);
                    opener.open(head, body, &tag)?;
                    let frame_len = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                    if frame_len as usize != len - 4 {
                        return Err(PeerSecureError::RecordShape(
                            "a record that does not hold exactly one frame",
                        ));
                    }
                    self.start += RECORD_HEAD_LEN + len + TAG_LEN;
                    let from = at + RECORD_HEAD_LEN + 4;
                    return Ok(Some(Stepped::Frame(from, at + RECORD_HEAD_LEN + len)));
                }
            }
        }
    }
}

enum Stepped {
    Hello(Hello),
    Frame(usize, usize),
}

/// Splits a handshake payload into its frames' payloads (type and body); `None` for bytes
/// that are not whole frames.
pub fn payload_frames(payload: &[u8]) -> Option<Vec<&[u8]>> {
    let mut frames = Vec::new();
    let mut rest = payload;
    while !rest.is_empty() {
        if rest.len() < 4 {
            return None;
        }
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len == 0 || rest.len() < 4 + len {
            return None;
        }
        frames.push(&rest[4..4 + len]);
        rest = &rest[4 + len..];
    }
    Some(frames)
}

/// Where the bytes a [`SealedSharerStream`] wants next go.
#[derive(Debug, PartialEq, Eq)]
pub enum SealedNext<'a> {
    /// Into this buffer: read what fits, then report the count with
    /// [`SealedSharerStream::filled`].
    Buffer(&'a mut [u8]),
    /// The next `len` bytes are the ciphertext of piece `piece`'s data from `offset` on: read
    /// them into that place (or drop them), then report the count.
    BlockData { piece: u32, offset: u32, len: u32 },
}

/// What a [`SealedSharerStream`] found.
#[derive(Debug)]
pub enum SealedDecoded {
    /// The handshake is done: the sealer for what the downloader sends from now on.
    Established(Sealer),
    /// A whole frame other than a `Block`.
    Msg(SharerMsg),
    /// A `Block`'s header: its data's ciphertext comes next ([`SealedNext::BlockData`]).
    BlockStart { piece: u32, offset: u32, len: u32 },
    /// The block's ciphertext and tag are in: call [`SealedSharerStream::open_block`] with
    /// the bytes it was read into (or [`SealedSharerStream::skip_block`] if it was dropped).
    BlockSealed { piece: u32, offset: u32, len: u32 },
}

#[derive(Debug, Clone, Copy)]
enum SharerState {
    /// Reading message 2: its length prefix, then its body, into `small`.
    HsHead,
    HsBody {
        len: usize,
    },
    /// Reading a record's length into `small`.
    RecHead,
    /// Reading a record's ciphertext and tag into `rec`.
    RecBody {
        len: usize,
    },
    /// Reading a block's ciphertext (`done` bytes of it are in).
    Data {
        piece: u32,
        offset: u32,
        len: u32,
        done: u32,
    },
    /// Reading the block's tag into `tag`.
    Tag {
        piece: u32,
        offset: u32,
        len: u32,
    },
    /// The block waits to be opened or skipped.
    Sealed {
        piece: u32,
        offset: u32,
        len: u32,
    },
    Failed,
}

/// The downloader's side of a secure peer link, reading what the sharer sends. Like
/// [`SharerStream`] (which it feeds with the decrypted frames, and which checks the peer
/// protocol's order and limits), it says where the next bytes go, so that a block's data
/// lands where the caller keeps it and is decrypted there. Its own buffers are bounded: the
/// handshake's message 2, one record (a frame of at most the peer link's largest, an
/// `Accept`), a tag.
pub struct SealedSharerStream {
    inner: SharerStream,
    handshake: Option<Box<snow::HandshakeState>>,
    opener: Option<Opener>,
    small: [u8; 2 + MAX_HANDSHAKE_MSG],
    have: usize,
    rec: Vec<u8>,
    tag: [u8; TAG_LEN],
    aad: [u8; BLOCK_HEAD_LEN],
    state: SharerState,
}

impl fmt::Debug for SealedSharerStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedSharerStream")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Default for SealedSharerStream {
    fn default() -> Self {
        Self::new()
    }
}

impl SealedSharerStream {
    pub fn new() -> Self {
        SealedSharerStream {
            inner: SharerStream::new(),
            handshake: None,
            opener: None,
            small: [0; 2 + MAX_HANDSHAKE_MSG],
            have: 0,
            rec: Vec::new(),
            tag: [0; TAG_LEN],
            aad: [0; BLOCK_HEAD_LEN],
            state: SharerState::HsHead,
        }
    }

    /// A stream past its handshake, reading with `opener` (tests: fixed keys).
    #[cfg(test)]
    pub(crate) fn open_with(opener: Opener) -> Self {
        let mut s = Self::new();
        s.opener = Some(opener);
        s.state = SharerState::RecHead;
        s
    }

    /// Starts the handshake (see [`initiate`]): the preamble and message 1 go into `out`.
    pub fn start(
        &mut self,
        local_private: &[u8; 32],
        sharer_public: &[u8; 32],
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), PeerSecureError> {
        self.handshake = Some(initiate(local_private, sharer_public, payload, out)?);
        Ok(())
    }

    /// The handshake is done.
    pub fn is_open(&self) -> bool {
        self.opener.is_some()
    }

    /// Whether the sharer's `Accept` or `Refuse` is in.
    pub fn answered(&self) -> bool {
        self.inner.answered()
    }

    /// Where the next bytes of the link go.
    pub fn next_read(&mut self) -> SealedNext<'_> {
        match self.state {
            SharerState::HsHead => SealedNext::Buffer(&mut self.small[self.have.min(2)..2]),
            SharerState::HsBody { len } => {
                SealedNext::Buffer(&mut self.small[self.have.min(2 + len)..2 + len])
            }
            SharerState::RecHead => {
                SealedNext::Buffer(&mut self.small[self.have.min(RECORD_HEAD_LEN)..RECORD_HEAD_LEN])
            }
            SharerState::RecBody { len } => {
                let want = len + TAG_LEN;
                if self.rec.len() != want {
                    self.rec.resize(want, 0);
                }
                SealedNext::Buffer(&mut self.rec[self.have.min(want)..want])
            }
            SharerState::Data {
                piece,
                offset,
                len,
                done,
            } => SealedNext::BlockData {
                piece,
                offset: offset.saturating_add(done),
                len: len.saturating_sub(done),
            },
            SharerState::Tag { .. } => SealedNext::Buffer(&mut self.tag[self.have.min(TAG_LEN)..]),
            // Nothing is read until the block is opened or skipped.
            SharerState::Sealed { .. } | SharerState::Failed => SealedNext::Buffer(&mut []),
        }
    }

    /// `n` bytes went where [`next_read`](Self::next_read) said. Returns what they
    /// completed, if anything. Errors are final.
    pub fn filled(&mut self, n: usize) -> Result<Option<SealedDecoded>, PeerSecureError> {
        let result = self.filled_inner(n);
        if result.is_err() {
            self.state = SharerState::Failed;
        }
        result
    }

    fn filled_inner(&mut self, n: usize) -> Result<Option<SealedDecoded>, PeerSecureError> {
        if n == 0 {
            return Ok(None);
        }
        match self.state {
            SharerState::Failed => Err(PeerSecureError::OutOfTurn("failed earlier")),
            SharerState::Sealed { .. } => Err(PeerSecureError::OutOfTurn("a block waits")),
            SharerState::HsHead => {
                self.have = (self.have + n).min(2);
                if self.have < 2 {
                    return Ok(None);
                }
                let len = usize::from(u16::from_be_bytes([self.small[0], self.small[1]]));
                if len > MAX_HANDSHAKE_MSG {
                    return Err(PeerSecureError::HandshakeTooLong(len));
                }
                self.state = SharerState::HsBody { len };
                if len == 0 {
                    return self.finish_handshake(0);
                }
                Ok(None)
            }
            SharerState::HsBody { len } => {
                self.have = (self.have + n).min(2 + len);
                if self.have < 2 + len {
                    return Ok(None);
                }
                self.finish_handshake(len)
            }
            SharerState::RecHead => {
                self.have = (self.have + n).min(RECORD_HEAD_LEN);
                if self.have < RECORD_HEAD_LEN {
                    return Ok(None);
                }
                let len = u32::from_be_bytes([
                    self.small[0],
                    self.small[1],
                    self.small[2],
                    self.small[3],
                ]) as usize;
                // The largest frame a sharer sends in one record is an `Accept`.
                let max = 4 + crate::wire::peer_link::MAX_PEER_FRAME;
                if len > max {
                    return Err(PeerSecureError::RecordTooLong { len, max });
                }
                if len < 5 {
                    return Err(PeerSecureError::RecordShape(
                        "a record shorter than a frame",
                    ));
                }
                self.have = 0;
                self.state = SharerState::RecBody { len };
                Ok(None)
            }
            SharerState::RecBody { len } => {
                self.have = (self.have + n).min(len + TAG_LEN);
                if self.have < len + TAG_LEN {
                    return Ok(None);
                }
                self.record_done(len)
            }
            SharerState::Data {
                piece,
                offset,
                len,
                done,
            } => {
                let done = done
                    .saturating_add(u32::try_from(n).unwrap_or(u32::MAX))
                    .min(len);
                self.state = if done < len {
                    SharerState::Data {
                        piece,
                        offset,
                        len,
                        done,
                    }
                } else {
                    self.have = 0;
                    SharerState::Tag { piece, offset, len }
                };
                Ok(None)
            }
            SharerState::Tag { piece, offset, len } => {
                self.have = (self.have + n).min(TAG_LEN);
                if self.have < TAG_LEN {
                    return Ok(None);
                }
                self.state = SharerState::Sealed { piece, offset, len };
                Ok(Some(SealedDecoded::BlockSealed { piece, offset, len }))
            }
        }
    }

    fn finish_handshake(&mut self, len: usize) -> Result<Option<SealedDecoded>, PeerSecureError> {
        let Some(mut hs) = self.handshake.take() else {
            return Err(PeerSecureError::OutOfTurn(
                "bytes before the handshake started",
            ));
        };
        let (sealer, opener) = finish_initiator(&mut hs, &self.small[2..2 + len])?;
        self.opener = Some(opener);
        self.have = 0;
        self.state = SharerState::RecHead;
        Ok(Some(SealedDecoded::Established(sealer)))
    }

    /// A whole record is in `rec`: open it and hand its frame to the inner decoder.
    fn record_done(&mut self, len: usize) -> Result<Option<SealedDecoded>, PeerSecureError> {
        let Some(opener) = self.opener.as_mut() else {
            return Err(PeerSecureError::OutOfTurn("a record before the handshake"));
        };
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&self.rec[len..len + TAG_LEN]);
        let head = (len as u32).to_be_bytes();
        opener.open(&head, &mut self.rec[..len], &tag)?;
        let mut pos = 0;
        let mut found = None;
        while pos < len {
            match self.inner.next_read() {
                Next::Buffer(buf) => {
                    let k = buf.len().min(len - pos);
                    if k == 0 {
                        return Err(PeerSecureError::RecordShape(
                            "a record the frame cannot take",
                        ));
                    }
                    buf[..k].copy_from_slice(&self.rec[pos..pos + k]);
                    pos += k;
                    if let Some(d) = self.inner.filled(k)? {
                        if found.is_some() {
                            return Err(PeerSecureError::RecordShape("two frames in one record"));
                        }
                        found = Some(d);
                    }
                }
                Next::BlockData { .. } => break,
            }
        }
        if pos != len {
            return Err(PeerSecureError::RecordShape(
                "a record holding more than a block's header",
            ));
        }
        // A large `Accept` does not keep its buffer for the small records after it.
        if self.rec.capacity() > 4 * 4096 {
            self.rec = Vec::new();
        }
        self.have = 0;
        match found {
            Some(Decoded::Msg(msg)) => {
                self.state = SharerState::RecHead;
                Ok(Some(SealedDecoded::Msg(msg)))
            }
            Some(Decoded::BlockStart { piece, offset, len }) => {
                if pos != BLOCK_HEAD_LEN {
                    return Err(PeerSecureError::RecordShape(
                        "a block header of another size",
                    ));
                }
                self.aad.copy_from_slice(&self.rec[..BLOCK_HEAD_LEN]);
                self.state = SharerState::Data {
                    piece,
                    offset,
                    len,
                    done: 0,
                };
                Ok(Some(SealedDecoded::BlockStart { piece, offset, len }))
            }
            Some(Decoded::BlockEnd { .. }) | None => Err(PeerSecureError::RecordShape(
                "a record that does not hold exactly one frame",
            )),
        }
    }

    /// Opens the sealed block in place: `data` holds its ciphertext (exactly the block's
    /// bytes, wherever they landed) and holds the plaintext afterwards. Returns the block.
    pub fn open_block(&mut self, data: &mut [u8]) -> Result<(u32, u32, u32), PeerSecureError> {
        let result = self.end_block(Some(data));
        if result.is_err() {
            self.state = SharerState::Failed;
        }
        result
    }

    /// The sealed block's data was dropped: it is not opened, and the stream moves on.
    pub fn skip_block(&mut self) -> Result<(u32, u32, u32), PeerSecureError> {
        let result = self.end_block(None);
        if result.is_err() {
            self.state = SharerState::Failed;
        }
        result
    }

    fn end_block(&mut self, data: Option<&mut [u8]>) -> Result<(u32, u32, u32), PeerSecureError> {
        let SharerState::Sealed { piece, offset, len } = self.state else {
            return Err(PeerSecureError::OutOfTurn("no block to open"));
        };
        let Some(opener) = self.opener.as_mut() else {
            return Err(PeerSecureError::OutOfTurn("no keys"));
        };
        match data {
            Some(data) => {
                if data.len() != len as usize {
                    return Err(PeerSecureError::OutOfTurn("a block of another length"));
                }
                let tag = self.tag;
                opener.open(&self.aad, data, &tag)?;
            }
            None => opener.skip(len as usize)?,
        }
        // The inner decoder learns that the data went by.
        match self.inner.filled(len as usize)? {
            Some(Decoded::BlockEnd { .. }) => {}
            _ => return Err(PeerSecureError::OutOfTurn("the block did not end")),
        }
        self.have = 0;
        self.state = SharerState::RecHead;
        Ok((piece, offset, len))
    }
}

#[cfg(test)]
#[path = "peer_secure_tests.rs"]
mod tests;
