//! The peer links' security: a Noise `IK` handshake (via `snow`) between the downloader and
//! the sharer, then a record layer of our framing around `ring`'s AES-128-GCM or
//! ChaCha20-Poly1305 (negotiated), keyed from the handshake's split. Sans-IO: bytes in, bytes
//! out, no sockets, clocks or threads, and no cryptography of our own (the key exchange is
//! `snow`'s, the AEADs are `ring`'s, whose assembly runs at full speed even in unoptimised
//! builds, and whose output the tests check against RustCrypto's `aes-gcm` and
//! `chacha20poly1305`; this module only frames, counts and picks).
//!
//! Why a choice of cipher: on x86-64 machines with AES-NI, VAES and VPCLMULQDQ ring's
//! AES-128-GCM seals and opens about 8.7 GB/s per core against about 2.1-2.5 GB/s for
//! ChaCha20-Poly1305 (`peer_aead_throughput`), and block data is the bulk of what a client
//! does (the transfer benchmark's downloader spent a fifth of its CPU opening ChaCha20
//! records); but without AES instructions ring's AES is a constant-time software fallback
//! several times slower than ChaCha20-Poly1305. So each side lists both, preferred first
//! ([`CipherPrefs::detect`]: AES first only with the instructions), and the link takes the one
//! both prefer ([`choose_cipher`]: ChaCha20-Poly1305 when they disagree). The downloader's
//! list is in the clear preamble, which is the handshake's prologue (rewritten on the way, the
//! handshake fails); the sharer's rides in message 2. The AES-128-GCM key is the first 16
//! bytes of the 32-byte key the handshake's split gives each direction (Noise itself
//! truncates hash outputs to cipher keys the same way); ChaCha20-Poly1305 takes all 32.
//!
//! ```text
//! downloader -> sharer : "P2PL" | u16 version (3) | u8 u8        (clear; the prologue; the
//!                                                                    two bytes: its record
//!                                                                    ciphers, preferred first)
//!                        u16 len | IK message 1                     (e, es, s, ss; its payload,
//!                                                                    encrypted: the downloader's
//!                                                                    first frames, Ticket and
//!                                                                    Handshake)
//! sharer -> downloader : u16 len | IK message 2                     (e, ee, se; payload,
//!                                                                    encrypted: the sharer's
//!                                                                    two cipher bytes)
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
//! Data of a block the downloader does not keep (an end-game duplicate, a block it did not
//! ask for) is read into the stream's own buffer instead ([`SealedSharerStream::drop_block`])
//! and opened there all the same ([`SealedSharerStream::skip_block`]): nothing of it is used,
//! but its tag is checked like every other record's, and a failure closes the link.
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

use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_128_GCM, CHACHA20_POLY1305};

use crate::wire::peer_link::{Decoded, Next, SharerMsg, SharerStream, StreamError};

/// The clear preamble's magic: "P2PL" (as a plain frame's length prefix, about 1.3 GB, over
/// every peer link's limit, so a plain peer and a secure one can never mistake each other).
pub const PEER_LINK_MAGIC: [u8; 4] = *b"P2PL";
/// Version of this handshake and record layer, sent in the preamble (1: records in
/// ChaCha20-Poly1305; 2: AES-128-GCM; 3: the record cipher negotiated, see [`PeerCipher`]).
pub const PEER_LINK_VERSION: u16 = 3;
/// Bytes of the preamble: the magic, the version, the downloader's two cipher preferences.
pub const PREAMBLE_LEN: usize = 8;
/// Bytes of message 2's payload: the sharer's two cipher preferences.
pub const CIPHER_PREFS_LEN: usize = 2;

/// The record layer's AEAD, negotiated per link (both are `ring`'s).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PeerCipher {
    /// AES-128-GCM: about 8.7 GB/s per core with AES-NI/VAES, far slower without them.
    Aes128Gcm,
    /// ChaCha20-Poly1305: about 2-3 GB/s per core on any CPU (no special instructions).
    ChaCha20Poly1305,
}

impl PeerCipher {
    /// Its number on the wire.
    pub fn id(self) -> u8 {
        match self {
            PeerCipher::Aes128Gcm => 1,
            PeerCipher::ChaCha20Poly1305 => 2,
        }
    }

    /// The cipher numbered `id`, if this program knows it.
    pub fn from_id(id: u8) -> Option<Self> {
        match id {
            1 => Some(PeerCipher::Aes128Gcm),
            2 => Some(PeerCipher::ChaCha20Poly1305),
            _ => None,
        }
    }

    /// Its name in logs and in the README.
    pub fn name(self) -> &'static str {
        match self {
            PeerCipher::Aes128Gcm => "AES-128-GCM",
            PeerCipher::ChaCha20Poly1305 => "ChaCha20-Poly1305",
        }
    }
}

/// One side's record ciphers, most preferred first, as sent on the wire: two cipher numbers
/// (0: none). A side lists what it supports; this program supports both and puts first the
/// one its CPU runs fast ([`CipherPrefs::detect`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CipherPrefs([u8; CIPHER_PREFS_LEN]);

impl CipherPrefs {
    /// AES-128-GCM first (CPUs with AES instructions).
    pub const AES_FIRST: CipherPrefs = CipherPrefs([1, 2]);
    /// ChaCha20-Poly1305 first (CPUs without them).
    pub const CHACHA_FIRST: CipherPrefs = CipherPrefs([2, 1]);

    /// What this CPU prefers: AES-128-GCM where it has AES and carry-less multiplication
    /// instructions (x86-64: AES-NI and PCLMULQDQ; AArch64: the AES extension, which brings
    /// PMULL), else ChaCha20-Poly1305 (AES in software is several times slower).
    pub fn detect() -> Self {
        if hardware_aes() {
            Self::AES_FIRST
        } else {
            Self::CHACHA_FIRST
        }
    }

    /// The wire bytes.
    pub fn to_wire(self) -> [u8; CIPHER_PREFS_LEN] {
        self.0
    }

    /// Read from the wire: any bytes are taken (unknown numbers are ignored when choosing,
    /// so that a later version may offer more).
    pub fn from_wire(bytes: [u8; CIPHER_PREFS_LEN]) -> Self {
        CipherPrefs(bytes)
    }

    /// Where `cipher` stands in this list (0: first), if listed.
    fn rank(self, cipher: PeerCipher) -> Option<usize> {
        self.0.iter().position(|&id| id == cipher.id())
    }
}

/// The record cipher of a link between a downloader preferring `downloader` and a sharer
/// preferring `sharer`: of the ciphers both list, the one whose worse rank of the two is
/// best, so a cipher both put first wins; when they disagree (one side lacks the AES
/// instructions), ChaCha20-Poly1305, which is fast on both. `None`: no cipher in common.
pub fn choose_cipher(downloader: CipherPrefs, sharer: CipherPrefs) -> Option<PeerCipher> {
    // Ties go to the first of this order.
    [PeerCipher::ChaCha20Poly1305, PeerCipher::Aes128Gcm]
        .into_iter()
        .filter_map(|c| Some((downloader.rank(c)?.max(sharer.rank(c)?), c)))
        .min_by_key(|&(worst, _)| worst)
        .map(|(_, c)| c)
}

/// Whether this CPU has the instructions that make AES-GCM fast.
fn hardware_aes() -> bool {
    #[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "x86", target_arch = "aarch64")))]
    {
        false
    }
}
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
    /// The two sides list no record cipher in common.
    NoCommonCipher {
        downloader: [u8; CIPHER_PREFS_LEN],
        sharer: [u8; CIPHER_PREFS_LEN],
    },
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
            PeerSecureError::NoCommonCipher { downloader, sharer } => write!(
                f,
                "peer link: no record cipher in common (downloader offers {downloader:?}, \
                 sharer {sharer:?})"
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

fn cipher_of(cipher: PeerCipher, key: &[u8; 32]) -> Box<LessSafeKey> {
    // AES-128 takes the first 16 bytes of the direction's key, ChaCha20 all 32.
    let unbound = match cipher {
        PeerCipher::Aes128Gcm => UnboundKey::new(&AES_128_GCM, &key[..16]),
        PeerCipher::ChaCha20Poly1305 => UnboundKey::new(&CHACHA20_POLY1305, &key[..]),
    };
    // Boxed: ring's key schedule (round keys and GHASH table) is large, and links are many.
    Box::new(LessSafeKey::new(unbound.unwrap_or_else(|_| {
        unreachable!("16 and 32 bytes are the ciphers' key lengths")
    })))
}

/// The sending half of a link's record layer.
pub struct Sealer {
    cipher: Box<LessSafeKey>,
    kind: PeerCipher,
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
    /// An AES-128-GCM sealer with `key` (tests).
    pub fn new(key: [u8; 32]) -> Self {
        Self::with_cipher(PeerCipher::Aes128Gcm, key)
    }

    /// A sealer of `cipher` with `key` (the handshake's split).
    pub fn with_cipher(cipher: PeerCipher, key: [u8; 32]) -> Self {
        Sealer {
            cipher: cipher_of(cipher, &key),
            kind: cipher,
            next: 0,
            used: 0,
        }
    }

    /// The record cipher.
    pub fn cipher(&self) -> PeerCipher {
        self.kind
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
    /// An AES-128-GCM opener with `key` (tests).
    pub fn new(key: [u8; 32]) -> Self {
        Self::with_cipher(PeerCipher::Aes128Gcm, key)
    }

    /// An opener of `cipher` with `key` (the handshake's split).
    pub fn with_cipher(cipher: PeerCipher, key: [u8; 32]) -> Self {
        Opener {
            cipher: cipher_of(cipher, &key),
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

/// The clear preamble of a downloader preferring `prefs`. It is the handshake's prologue:
/// changed on the way (a cipher list rewritten to force a weaker choice, say), the
/// handshake fails.
pub fn preamble(prefs: CipherPrefs) -> [u8; PREAMBLE_LEN] {
    let mut p = [0u8; PREAMBLE_LEN];
    p[..4].copy_from_slice(&PEER_LINK_MAGIC);
    p[4..6].copy_from_slice(&PEER_LINK_VERSION.to_be_bytes());
    p[6..].copy_from_slice(&prefs.to_wire());
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

/// The downloader's opening: appends the preamble (offering `prefs`) and message 1
/// (carrying `payload`, encrypted to the sharer's static key `sharer_public`) to `out`, and
/// returns the handshake state that reads the sharer's answer.
pub fn initiate(
    local_private: &[u8; 32],
    sharer_public: &[u8; 32],
    payload: &[u8],
    out: &mut Vec<u8>,
    prefs: CipherPrefs,
) -> Result<Box<snow::HandshakeState>, PeerSecureError> {
    if payload.len() > MAX_HANDSHAKE_PAYLOAD {
        return Err(PeerSecureError::PayloadTooLong(payload.len()));
    }
    let pre = preamble(prefs);
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

/// The downloader reads message 2 (its payload: the sharer's cipher preferences): the keys,
/// `(sealer, opener)`, of the cipher both prefer.
fn finish_initiator(
    hs: &mut snow::HandshakeState,
    msg: &[u8],
    prefs: CipherPrefs,
) -> Result<(Sealer, Opener), PeerSecureError> {
    let mut payload = [0u8; MAX_HANDSHAKE_MSG];
    let n = hs.read_message(msg, &mut payload).map_err(snow_err)?;
    if !hs.is_handshake_finished() {
        return Err(PeerSecureError::Handshake(
            "not finished after message 2".into(),
        ));
    }
    let Ok(theirs) = <[u8; CIPHER_PREFS_LEN]>::try_from(&payload[..n]) else {
        return Err(PeerSecureError::Handshake(format!(
            "message 2 carries {n} bytes, not the sharer's {CIPHER_PREFS_LEN} cipher preferences"
        )));
    };
    let sharer = CipherPrefs::from_wire(theirs);
    let cipher = choose_cipher(prefs, sharer).ok_or(PeerSecureError::NoCommonCipher {
        downloader: prefs.to_wire(),
        sharer: theirs,
    })?;
    let (to_responder, to_initiator) = split(hs);
    Ok((
        Sealer::with_cipher(cipher, to_responder),
        Opener::with_cipher(cipher, to_initiator),
    ))
}

/// What a sharer learns from a downloader's message 1.
pub struct Hello {
    /// The downloader's static key (what the ticket's client key must be).
    pub remote_static: [u8; 32],
    /// The downloader's first frames (decrypted).
    pub payload: Vec<u8>,
    /// The keys of the link: `sealer` for what the sharer sends (its cipher is the link's).
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
    /// This sharer's cipher preferences (sent in message 2).
    prefs: CipherPrefs,
    /// The downloader's, from its preamble.
    theirs: CipherPrefs,
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
            prefs: CipherPrefs::detect(),
            theirs: CipherPrefs::from_wire([0; CIPHER_PREFS_LEN]),
            buf: Vec::new(),
            start: 0,
            end: 0,
            max_frame,
        }
    }

    /// Offers `prefs` instead of what this CPU prefers (tests; the benchmark's switch).
    pub fn with_prefs(mut self, prefs: CipherPrefs) -> Self {
        self.prefs = prefs;
        self
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
                    // The magic and the version are checked as soon as they are in (an
                    // earlier version's preamble is shorter).
                    if have.len() >= 4 && have[..4] != PEER_LINK_MAGIC {
                        return Err(PeerSecureError::BadMagic([
                            have[0], have[1], have[2], have[3],
                        ]));
                    }
                    if have.len() >= 6 {
                        let version = u16::from_be_bytes([have[4], have[5]]);
                        if version != PEER_LINK_VERSION {
                            return Err(PeerSecureError::BadVersion(version));
                        }
                    }
                    if have.len() < PREAMBLE_LEN {
                        return Ok(None);
                    }
                    // The preamble as received is the prologue: the downloader's offer is
                    // authenticated by the handshake.
                    let mut pre = [0u8; PREAMBLE_LEN];
                    pre.copy_from_slice(&have[..PREAMBLE_LEN]);
                    self.theirs = CipherPrefs::from_wire([pre[6], pre[7]]);
                    self.start += PREAMBLE_LEN;
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
                    let cipher = choose_cipher(self.theirs, self.prefs).ok_or(
                        PeerSecureError::NoCommonCipher {
                            downloader: self.theirs.to_wire(),
                            sharer: self.prefs.to_wire(),
                        },
                    )?;
                    let mut msg = [0u8; MAX_HANDSHAKE_MSG];
                    let m = hs
                        .write_message(&self.prefs.to_wire(), &mut msg)
                        .map_err(snow_err)?;
                    if !hs.is_handshake_finished() {
                        return Err(PeerSecureError::Handshake(
                            "not finished after message 2".into(),
                        ));
                    }
                    let mut reply = Vec::with_capacity(2 + m);
                    push_message(&mut reply, &msg[..m]);
                    let (to_responder, to_initiator) = split(hs);
                    self.state = ServeState::Open(Opener::with_cipher(cipher, to_responder));
                    return Ok(Some(Stepped::Hello(Hello {
                        remote_static,
                        payload,
                        sealer: Sealer::with_cipher(cipher, to_initiator),
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
    /// Bytes read ahead already complete something: read nothing, call
    /// [`SealedSharerStream::filled`] with 0.
    Ready,
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

/// Bytes of a block's header record on the wire (length, header, tag): the most read ahead
/// past the end of a record or a tag, so that a read never takes bytes of block data (they
/// follow only such a record, and land in the `.part`).
const LOOKAHEAD: usize = RECORD_HEAD_LEN + BLOCK_HEAD_LEN + TAG_LEN;
/// Records up to this size on the wire (length and tag included) are read through the
/// read-ahead buffer; longer ones (an `Accept` with a large bitfield, a `Refuse` with a long
/// message) into their own buffer.
const SMALL_RECORD: usize = 64;
/// The read-ahead buffer: a small record and what may follow it.
const AHEAD_CAP: usize = SMALL_RECORD + LOOKAHEAD;
/// The buffer of dropped blocks is kept up to this size (a block of the downloaders' usual
/// 128 KiB); a larger one is given back once its block is checked.
const KEEP_DROP_BUFFER: usize = 128 * 1024;

#[derive(Debug, Clone, Copy)]
enum SharerState {
    /// Reading message 2: its length prefix, then its body, into `small`.
    HsHead,
    HsBody {
        len: usize,
    },
    /// A record's length is read into `ahead`.
    RecHead,
    /// A small record (`len` bytes of ciphertext) is read into `ahead`, its length still
    /// there before it.
    RecSmall {
        len: usize,
    },
    /// A long record's ciphertext and tag are read into `rec` (`have` bytes in).
    RecLong {
        len: usize,
    },
    /// Reading a block's ciphertext (`done` bytes of it are in).
    Data {
        piece: u32,
        offset: u32,
        len: u32,
        done: u32,
    },
    /// Reading the ciphertext of a block the caller drops into `rec` (`done` bytes of it are
    /// in): it is opened there all the same, so that its tag is checked.
    Dropping {
        piece: u32,
        offset: u32,
        len: u32,
        done: u32,
    },
    /// The block's tag is read into `ahead`.
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
/// handshake's message 2, a read-ahead buffer of [`AHEAD_CAP`] bytes, and one long record
/// (a frame of at most the peer link's largest, an `Accept`).
///
/// Small reads are merged: a block's tag, the next record's length and a block header record
/// (49 bytes) come in one read where the three took one each, so a block costs the socket
/// read of its header and those of its data. What is read ahead is bounded so that it never
/// reaches block data ([`LOOKAHEAD`]).
pub struct SealedSharerStream {
    inner: SharerStream,
    handshake: Option<Box<snow::HandshakeState>>,
    /// This downloader's cipher preferences (offered in the preamble).
    prefs: CipherPrefs,
    opener: Option<Opener>,
    small: [u8; 2 + MAX_HANDSHAKE_MSG],
    have: usize,
    /// Read-ahead bytes: `ahead[start..end]` are in and not yet used.
    ahead: [u8; AHEAD_CAP],
    start: usize,
    end: usize,
    rec: Vec<u8>,
    tag: [u8; TAG_LEN],
    aad: [u8; BLOCK_HEAD_LEN],
    state: SharerState,
    /// The block being read is dropped: its ciphertext is in `rec` (see
    /// [`drop_block`](Self::drop_block)).
    dropping: bool,
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
            prefs: CipherPrefs::detect(),
            opener: None,
            small: [0; 2 + MAX_HANDSHAKE_MSG],
            have: 0,
            ahead: [0; AHEAD_CAP],
            start: 0,
            end: 0,
            rec: Vec::new(),
            tag: [0; TAG_LEN],
            aad: [0; BLOCK_HEAD_LEN],
            state: SharerState::HsHead,
            dropping: false,
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

    /// Offers `prefs` instead of what this CPU prefers (tests; the benchmark's switch).
    pub fn with_prefs(mut self, prefs: CipherPrefs) -> Self {
        self.prefs = prefs;
        self
    }

    /// Starts the handshake (see [`initiate`]): the preamble and message 1 go into `out`.
    pub fn start(
        &mut self,
        local_private: &[u8; 32],
        sharer_public: &[u8; 32],
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), PeerSecureError> {
        self.handshake = Some(initiate(
            local_private,
            sharer_public,
            payload,
            out,
            self.prefs,
        )?);
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

    /// For the read-ahead states: the bytes the current unit needs in `ahead` (from
    /// `start`), and how far past them a read may go.
    fn ahead_want(&self) -> Option<(usize, usize)> {
        match self.state {
            SharerState::RecHead => Some((RECORD_HEAD_LEN, LOOKAHEAD - RECORD_HEAD_LEN)),
            // After what may be a block's header record nothing is read ahead: its data
            // follows.
            SharerState::RecSmall { len } => Some((
                RECORD_HEAD_LEN + len + TAG_LEN,
                if len == BLOCK_HEAD_LEN { 0 } else { LOOKAHEAD },
            )),
            SharerState::Tag { .. } => Some((TAG_LEN, LOOKAHEAD)),
            _ => None,
        }
    }

    /// Where the next bytes of the link go.
    pub fn next_read(&mut self) -> SealedNext<'_> {
        if let Some((need, beyond)) = self.ahead_want() {
            if self.end - self.start >= need {
                return SealedNext::Ready;
            }
            if self.start > 0 {
                self.ahead.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let limit = (need + beyond).min(AHEAD_CAP);
            return SealedNext::Buffer(&mut self.ahead[self.end..limit]);
        }
        match self.state {
            SharerState::HsHead => SealedNext::Buffer(&mut self.small[self.have.min(2)..2]),
            SharerState::HsBody { len } => {
                SealedNext::Buffer(&mut self.small[self.have.min(2 + len)..2 + len])
            }
            SharerState::RecLong { len } => {
                let want = len + TAG_LEN;
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
            SharerState::Dropping { len, done, .. } => {
                SealedNext::Buffer(&mut self.rec[done as usize..len as usize])
            }
            // Nothing is read until the block is opened or skipped.
            SharerState::Sealed { .. }
            | SharerState::Failed
            | SharerState::RecHead
            | SharerState::RecSmall { .. }
            | SharerState::Tag { .. } => SealedNext::Buffer(&mut []),
        }
    }

    /// `n` bytes went where [`next_read`](Self::next_read) said (0 after
    /// [`SealedNext::Ready`]). Returns what they completed, if anything. Errors are final.
    pub fn filled(&mut self, n: usize) -> Result<Option<SealedDecoded>, PeerSecureError> {
        let result = self.filled_inner(n);
        if result.is_err() {
            self.state = SharerState::Failed;
        }
        result
    }

    fn filled_inner(&mut self, n: usize) -> Result<Option<SealedDecoded>, PeerSecureError> {
        if self.ahead_want().is_some() {
            self.end = (self.end + n).min(AHEAD_CAP);
            return self.take_ahead();
        }
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
            SharerState::RecLong { len } => {
                self.have = (self.have + n).min(len + TAG_LEN);
                if self.have < len + TAG_LEN {
                    return Ok(None);
                }
                let Some(opener) = self.opener.as_mut() else {
                    return Err(PeerSecureError::OutOfTurn("a record before the handshake"));
                };
                let head = (len as u32).to_be_bytes();
                let found = open_record(
                    opener,
                    &mut self.inner,
                    &head,
                    &mut self.rec[..len + TAG_LEN],
                    &mut self.aad,
                )?;
                // A large `Accept` does not keep its buffer for the records after it.
                if self.rec.capacity() > 4 * 4096 {
                    self.rec = Vec::new();
                }
                self.have = 0;
                self.after_record(found)
            }
            state @ (SharerState::Data {
                piece,
                offset,
                len,
                done,
            }
            | SharerState::Dropping {
                piece,
                offset,
                len,
                done,
            }) => {
                // A block's data, kept or dropped alike: on to its tag once it is all here.
                let done = done
                    .saturating_add(u32::try_from(n).unwrap_or(u32::MAX))
                    .min(len);
                self.state = match state {
                    _ if done == len => SharerState::Tag { piece, offset, len },
                    SharerState::Dropping { .. } => SharerState::Dropping {
                        piece,
                        offset,
                        len,
                        done,
                    },
                    _ => SharerState::Data {
                        piece,
                        offset,
                        len,
                        done,
                    },
                };
                Ok(None)
            }
            SharerState::RecHead | SharerState::RecSmall { .. } | SharerState::Tag { .. } => {
                Err(PeerSecureError::OutOfTurn("read-ahead state"))
            }
        }
    }

    /// Whether the next bytes are a block's data (kept or dropped): a link sending them is
    /// not stalled.
    pub fn in_block_data(&self) -> bool {
        matches!(
            self.state,
            SharerState::Data { .. } | SharerState::Dropping { .. }
        )
    }

    /// Right after [`SealedDecoded::BlockStart`]: the caller does not keep this block (an
    /// end-game duplicate, a block it did not ask for). Its ciphertext is then read into the
    /// stream's own buffer (at most one block, [`MAX_BLOCK_LEN`] bytes) instead of the
    /// caller's, and [`skip_block`](Self::skip_block) opens it there, so that its tag is
    /// checked like any other: a block that fails closes the link whatever is done with its
    /// data (otherwise a tampered duplicate would pass unnoticed).
    ///
    /// [`MAX_BLOCK_LEN`]: crate::wire::peer_link::MAX_BLOCK_LEN
    pub fn drop_block(&mut self) -> Result<(), PeerSecureError> {
        let SharerState::Data {
            piece,
            offset,
            len,
            done: 0,
        } = self.state
        else {
            // Zero-length blocks go straight to their tag: nothing to buffer.
            if let SharerState::Tag { len: 0, .. } = self.state {
                self.dropping = true;
                return Ok(());
            }
            self.state = SharerState::Failed;
            return Err(PeerSecureError::OutOfTurn(
                "a block is dropped only before its data",
            ));
        };
        self.rec.clear();
        // `len` is at most MAX_BLOCK_LEN: the inner decoder checked the frame's length.
        self.rec.resize(len as usize, 0);
        self.dropping = true;
        self.state = SharerState::Dropping {
            piece,
            offset,
            len,
            done: 0,
        };
        Ok(())
    }

    /// Takes what the read-ahead bytes complete: a record's length, a small record, a tag.
    fn take_ahead(&mut self) -> Result<Option<SealedDecoded>, PeerSecureError> {
        loop {
            let avail = self.end - self.start;
            match self.state {
                SharerState::RecHead => {
                    if avail < RECORD_HEAD_LEN {
                        return Ok(None);
                    }
                    let at = self.start;
                    let len = u32::from_be_bytes([
                        self.ahead[at],
                        self.ahead[at + 1],
                        self.ahead[at + 2],
                        self.ahead[at + 3],
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
                    if RECORD_HEAD_LEN + len + TAG_LEN <= SMALL_RECORD {
                        self.state = SharerState::RecSmall { len };
                        continue;
                    }
                    // A long record: what was read ahead is all its own (a read stops
                    // LOOKAHEAD bytes past the record's start, and it is longer).
                    let want = len + TAG_LEN;
                    if self.rec.len() != want {
                        self.rec.resize(want, 0);
                    }
                    let got = avail - RECORD_HEAD_LEN;
                    self.rec[..got].copy_from_slice(&self.ahead[at + RECORD_HEAD_LEN..self.end]);
                    self.have = got;
                    self.start = 0;
                    self.end = 0;
                    self.state = SharerState::RecLong { len };
                    return Ok(None);
                }
                SharerState::RecSmall { len } => {
                    let whole = RECORD_HEAD_LEN + len + TAG_LEN;
                    if avail < whole {
                        return Ok(None);
                    }
                    let Some(opener) = self.opener.as_mut() else {
                        return Err(PeerSecureError::OutOfTurn("a record before the handshake"));
                    };
                    let at = self.start;
                    let (head, body) = self.ahead[at..at + whole].split_at_mut(RECORD_HEAD_LEN);
                    let found = open_record(opener, &mut self.inner, head, body, &mut self.aad)?;
                    self.start += whole;
                    return self.after_record(found);
                }
                SharerState::Tag { piece, offset, len } => {
                    if avail < TAG_LEN {
                        return Ok(None);
                    }
                    self.tag
                        .copy_from_slice(&self.ahead[self.start..self.start + TAG_LEN]);
                    self.start += TAG_LEN;
                    self.state = SharerState::Sealed { piece, offset, len };
                    return Ok(Some(SealedDecoded::BlockSealed { piece, offset, len }));
                }
                _ => return Ok(None),
            }
        }
    }

    /// A record was opened: the stream moves on to the next record, or to a block's data.
    fn after_record(&mut self, found: Decoded) -> Result<Option<SealedDecoded>, PeerSecureError> {
        match found {
            Decoded::Msg(msg) => {
                self.state = SharerState::RecHead;
                Ok(Some(SealedDecoded::Msg(msg)))
            }
            Decoded::BlockStart { piece, offset, len } => {
                if self.start != self.end {
                    // Cannot happen: reads stop where a block's header record ends.
                    return Err(PeerSecureError::OutOfTurn(
                        "block data was read ahead of its header",
                    ));
                }
                self.start = 0;
                self.end = 0;
                self.state = if len == 0 {
                    SharerState::Tag { piece, offset, len }
                } else {
                    SharerState::Data {
                        piece,
                        offset,
                        len,
                        done: 0,
                    }
                };
                Ok(Some(SealedDecoded::BlockStart { piece, offset, len }))
            }
            Decoded::BlockEnd { .. } => Err(PeerSecureError::RecordShape(
                "a record that does not hold exactly one frame",
            )),
        }
    }

    fn finish_handshake(&mut self, len: usize) -> Result<Option<SealedDecoded>, PeerSecureError> {
        let Some(mut hs) = self.handshake.take() else {
            return Err(PeerSecureError::OutOfTurn(
                "bytes before the handshake started",
            ));
        };
        let (sealer, opener) = finish_initiator(&mut hs, &self.small[2..2 + len], self.prefs)?;
        self.opener = Some(opener);
        self.have = 0;
        self.state = SharerState::RecHead;
        Ok(Some(SealedDecoded::Established(sealer)))
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

    /// The sealed block was dropped ([`drop_block`](Self::drop_block) at its start): it is
    /// opened in the stream's own buffer, its tag checked, and the plaintext thrown away.
    /// Without that call at its start the block's data went elsewhere and cannot be checked
    /// here: an error (open it with [`open_block`](Self::open_block)).
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
        let tag = self.tag;
        match data {
            Some(_) if self.dropping => {
                return Err(PeerSecureError::OutOfTurn("a dropped block is not opened"))
            }
            Some(data) => {
                if data.len() != len as usize {
                    return Err(PeerSecureError::OutOfTurn("a block of another length"));
                }
                opener.open(&self.aad, data, &tag)?;
            }
            None if self.dropping => {
                let buf = self
                    .rec
                    .get_mut(..len as usize)
                    .ok_or(PeerSecureError::OutOfTurn("a dropped block's buffer"))?;
                opener.open(&self.aad, buf, &tag)?;
                self.dropping = false;
                // Kept for the next dropped block (end-game duplicates come in runs) up to the
                // usual block size; a larger one is given back.
                if self.rec.capacity() > KEEP_DROP_BUFFER {
                    self.rec = Vec::new();
                }
            }
            None => {
                return Err(PeerSecureError::OutOfTurn(
                    "a block's data must be opened (or dropped at its start)",
                ))
            }
        }
        // The inner decoder learns that the data went by.
        match self.inner.filled(len as usize)? {
            Some(Decoded::BlockEnd { .. }) => {}
            _ => return Err(PeerSecureError::OutOfTurn("the block did not end")),
        }
        self.state = SharerState::RecHead;
        Ok((piece, offset, len))
    }
}

/// Opens one record (`body`: `len` bytes of ciphertext, then the tag; `head`: its length
/// prefix, the AAD) in place and hands its frame to `inner`; a block's header is also kept
/// in `aad` (its data's AAD). Returns what the frame was.
fn open_record(
    opener: &mut Opener,
    inner: &mut SharerStream,
    head: &[u8],
    body: &mut [u8],
    aad: &mut [u8; BLOCK_HEAD_LEN],
) -> Result<Decoded, PeerSecureError> {
    let len = body.len() - TAG_LEN;
    let (plain, tail) = body.split_at_mut(len);
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(tail);
    opener.open(head, plain, &tag)?;
    let mut pos = 0;
    let mut found = None;
    while pos < len {
        match inner.next_read() {
            Next::Buffer(buf) => {
                let k = buf.len().min(len - pos);
                if k == 0 {
                    return Err(PeerSecureError::RecordShape(
                        "a record the frame cannot take",
                    ));
                }
                buf[..k].copy_from_slice(&plain[pos..pos + k]);
                pos += k;
                if let Some(d) = inner.filled(k)? {
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
    match found {
        Some(Decoded::BlockStart { .. }) if pos != BLOCK_HEAD_LEN => Err(
            PeerSecureError::RecordShape("a block header of another size"),
        ),
        Some(d @ Decoded::BlockStart { .. }) => {
            aad.copy_from_slice(&plain[..BLOCK_HEAD_LEN]);
            Ok(d)
        }
        Some(d) => Ok(d),
        None => Err(PeerSecureError::RecordShape(
            "a record that does not hold exactly one frame",
        )),
    }
}

#[cfg(test)]
#[path = "peer_secure_tests.rs"]
mod tests;
