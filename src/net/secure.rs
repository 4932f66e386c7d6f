//! A sans-IO secure channel: a Noise handshake (via `snow`), then a byte stream carried in
//! encrypted, authenticated records. Bytes in, bytes out: no sockets, clocks or threads here,
//! and no cryptography of our own (every key exchange, cipher and MAC is `snow`'s).
//!
//! On the wire, the initiator first sends a clear preamble, `magic (4 bytes) | u16 version`,
//! which lets the accepting side tell this kind of link from a plain framed one before it
//! reads anything else, and which is bound into the handshake as its prologue. Then both sides
//! exchange the Noise handshake messages and, after it, records, all in the same shape:
//!
//! ```text
//! message = u16 len | len bytes        (big-endian; a handshake message or a record)
//! record  = Noise transport message: ciphertext of 0..=65519 plaintext bytes | 16-byte tag
//! ```
//!
//! The plaintext of the records is one byte stream: frames of the protocol above may span
//! records, and one record may hold many frames. The pattern and keys are parameters
//! ([`Params`]), so other links can run other Noise patterns on the same layer.
//!
//! Every buffer is bounded: the input buffer holds at most one message (2 + 65535 bytes), the
//! decrypted plaintext at most one record's, and [`SecureLink::seal`] takes plaintext only
//! while less than [`MAX_SEALED_PENDING`] ciphertext waits to be sent. A handshake message
//! longer than [`MAX_HANDSHAKE_MSG`], a record too short to hold a tag, a record that fails
//! authentication, a wrong preamble or a failed handshake is an error: the link must close.
//! Any error is final: the link refuses everything afterwards.

use std::fmt;

use byteorder::{BigEndian, ByteOrder};

/// The preamble's magic for tracker-to-tracker links: "P2PT". Read as the length prefix of a
/// plain frame it is about 1.3 GB, far over any link's handshake limit, so it can never be
/// mistaken for the start of a plain framed link.
pub const TRACKER_LINK_MAGIC: [u8; 4] = *b"P2PT";
/// Version of this record layer, sent in the preamble.
pub const SECURE_VERSION: u16 = 1;
/// Bytes of the clear preamble.
pub const PREAMBLE_LEN: usize = 6;
/// The tracker links' Noise protocol: no static keys, a pre-shared key mixed in from the first
/// message. Every tracker of a service holds the same secret, so static keys would prove
/// nothing more than the PSK does; `NNpsk0` needs two messages and authenticates both sides
/// (neither can derive the transport keys without the PSK).
pub const TRACKER_LINK_PATTERN: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";

/// The preamble's magic for client-to-tracker links: "P2PC" (like "P2PT", far over any plain
/// link's frame limit when read as a length prefix).
pub const CLIENT_LINK_MAGIC: [u8; 4] = *b"P2PC";
/// The client links' Noise protocol: the responder (tracker) transmits its static key,
/// encrypted, in the second message and proves it holds its private half (`es`); a payload
/// signed by the service key binds that static key to the service. The client has no static
/// key: it is anonymous to the tracker until it logs in.
pub const CLIENT_LINK_PATTERN: &str = "Noise_NX_25519_ChaChaPoly_BLAKE2s";

/// Checks the identity a responder presents (its handshake payload and static key) and returns
/// the identity it proves (a 32-byte public key), or why not. A plain function so that the
/// format of the proof stays with whoever makes it ([`crate::keys`]).
pub type VerifyIdentity = fn(payload: &[u8], remote_static: &[u8]) -> Result<[u8; 32], String>;

/// What an initiator demands of the responder's identity, checked before transport mode.
#[derive(Clone, Copy)]
pub struct IdentityCheck {
    pub verify: VerifyIdentity,
    /// The identity the responder must prove; `None` accepts any identity that verifies (trust
    /// on first use: the caller reads it with [`SecureLink::remote_identity`] and remembers it).
    pub expected: Option<[u8; 32]>,
}

/// Bytes of a length prefix.
const LEN_PREFIX: usize = 2;
/// Noise's limit on one message, and so on one record.
pub const MAX_MESSAGE: usize = 65535;
/// Bytes of the authentication tag of every record.
pub const TAG_LEN: usize = 16;
/// Most plaintext bytes in one record.
pub const MAX_RECORD_PLAIN: usize = MAX_MESSAGE - TAG_LEN;
/// Longest handshake message accepted. The patterns used here send 32-96 bytes; anything
/// much longer is not a peer speaking this protocol.
pub const MAX_HANDSHAKE_MSG: usize = 1024;
/// Once this much ciphertext waits to be sent, [`SecureLink::seal`] takes no more plaintext.
pub const MAX_SEALED_PENDING: usize = 256 * 1024;

/// What a link needs to run its handshake.
#[derive(Clone)]
pub struct Params {
    /// Sent (and expected) in the clear preamble.
    pub magic: [u8; 4],
    /// A Noise protocol name, e.g. [`TRACKER_LINK_PATTERN`].
    pub pattern: &'static str,
    /// A pre-shared key and its position in the pattern (`psk0` is 0).
    pub psk: Option<(u8, [u8; 32])>,
    /// This side's static X25519 private key, for patterns that have one.
    pub local_private: Option<[u8; 32]>,
    /// The other side's static public key, for patterns that know it in advance.
    pub remote_public: Option<[u8; 32]>,
    /// Payload sent (encrypted where the pattern allows) in each handshake message this side
    /// writes; empty for most links. At most [`MAX_HANDSHAKE_PAYLOAD`] bytes.
    pub payload: Vec<u8>,
    /// For an initiator: the identity the responder must prove before transport mode.
    pub identity: Option<IdentityCheck>,
}

impl fmt::Debug for Params {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print keys.
        f.debug_struct("Params")
            .field("magic", &self.magic)
            .field("pattern", &self.pattern)
            .finish_non_exhaustive()
    }
}

impl Params {
    /// A tracker-to-tracker link of the service whose tracker PSK is `psk`.
    pub fn tracker_link(psk: [u8; 32]) -> Self {
        Params {
            magic: TRACKER_LINK_MAGIC,
            pattern: TRACKER_LINK_PATTERN,
            psk: Some((0, psk)),
            local_private: None,
            remote_public: None,
            payload: Vec::new(),
            identity: None,
        }
    }

    /// The tracker's side of a client link: its static key pair's private half and the
    /// payload that certifies the public half.
    pub fn client_link_responder(static_private: [u8; 32], certificate: Vec<u8>) -> Self {
        Params {
            magic: CLIENT_LINK_MAGIC,
            pattern: CLIENT_LINK_PATTERN,
            psk: None,
            local_private: Some(static_private),
            remote_public: None,
            payload: certificate,
            identity: None,
        }
    }

    /// The client's side of a client link: the tracker must prove an identity `check`
    /// accepts.
    pub fn client_link_initiator(check: IdentityCheck) -> Self {
        Params {
            magic: CLIENT_LINK_MAGIC,
            pattern: CLIENT_LINK_PATTERN,
            psk: None,
            local_private: None,
            remote_public: None,
            payload: Vec::new(),
            identity: Some(check),
        }
    }

    fn preamble(&self) -> [u8; PREAMBLE_LEN] {
        let mut p = [0u8; PREAMBLE_LEN];
        p[..4].copy_from_slice(&self.magic);
        BigEndian::write_u16(&mut p[4..], SECURE_VERSION);
        p
    }
}

/// Why a secure link failed; the link must close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecureError {
    /// The clear preamble has another magic.
    BadMagic([u8; 4]),
    /// The preamble names a version this program does not speak.
    BadVersion(u16),
    /// A handshake message longer than [`MAX_HANDSHAKE_MSG`].
    HandshakeTooLong(usize),
    /// A record shorter than its tag.
    RecordTooShort(usize),
    /// The handshake failed: the peer does not hold the same key (or sent garbage).
    Handshake(String),
    /// A record did not authenticate: tampered, replayed, or not from the peer.
    BadRecord,
    /// The parameters are not usable (a bad pattern name or key).
    Config(String),
    /// Sending failed (a nonce ran out); never expected in practice.
    Seal(String),
    /// The responder's identity did not verify (no or a bad certificate of its static key).
    BadIdentity(String),
    /// The responder proved an identity, but not the one expected.
    WrongIdentity {
        expected: [u8; 32],
        presented: [u8; 32],
    },
    /// The link failed before; nothing more passes.
    Failed,
}

impl fmt::Display for SecureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecureError::BadMagic(m) => write!(f, "secure link: bad preamble magic {m:02x?}"),
            SecureError::BadVersion(v) => write!(f, "secure link: version {v} not spoken here"),
            SecureError::HandshakeTooLong(n) => write!(
                f,
                "secure link: handshake message too long ({n} > {MAX_HANDSHAKE_MSG})"
            ),
            SecureError::RecordTooShort(n) => {
                write!(
                    f,
                    "secure link: record of {n} bytes is shorter than its tag"
                )
            }
            SecureError::Handshake(e) => write!(
                f,
                "secure link: handshake failed ({e}): the peer does not hold this service's key"
            ),
            SecureError::BadRecord => write!(f, "secure link: a record failed authentication"),
            SecureError::Config(e) => write!(f, "secure link: bad parameters: {e}"),
            SecureError::Seal(e) => write!(f, "secure link: cannot encrypt: {e}"),
            SecureError::BadIdentity(e) => {
                write!(f, "secure link: the peer's identity does not verify: {e}")
            }
            SecureError::WrongIdentity { .. } => write!(
                f,
                "secure link: the peer proved another identity than the one expected"
            ),
            SecureError::Failed => write!(f, "secure link: failed earlier"),
        }
    }
}

impl std::error::Error for SecureError {}

/// Where a link is in its life.
enum Phase {
    /// The responder waits for the clear preamble.
    Preamble(Box<snow::HandshakeState>),
    Handshake(Box<snow::HandshakeState>),
    Transport(Box<snow::TransportState>),
    Failed,
}

/// One end of a secure link.
pub struct SecureLink {
    phase: Phase,
    preamble: [u8; PREAMBLE_LEN],
    /// Received bytes not yet processed: `inbuf[in_start..in_end]`.
    inbuf: Vec<u8>,
    in_start: usize,
    in_end: usize,
    /// Decrypted plaintext not yet taken: `plain[plain_pos..]`.
    plain: Vec<u8>,
    plain_pos: usize,
    /// Bytes to send: `out[out_pos..]`.
    out: Vec<u8>,
    out_pos: usize,
    /// Sent in each handshake message this side writes.
    payload: Vec<u8>,
    /// The last non-empty handshake payload received.
    remote_payload: Vec<u8>,
    /// Checked when the handshake completes (initiators of client links).
    identity: Option<IdentityCheck>,
    /// The identity the responder proved, once checked.
    remote_identity: Option<[u8; 32]>,
}

impl fmt::Debug for SecureLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecureLink")
            .field("established", &self.is_established())
            .field("pending_out", &self.pending_out())
            .finish_non_exhaustive()
    }
}

/// Largest input buffered at once: one whole message with its prefix.
const MAX_IN: usize = LEN_PREFIX + MAX_MESSAGE;
/// Longest handshake payload this side sends (a certificate is 96 bytes).
pub const MAX_HANDSHAKE_PAYLOAD: usize = 512;
/// Bytes asked of the socket beyond what the next message needs.
const READ_CHUNK: usize = 16 * 1024;

fn snow_err(e: snow::Error) -> String {
    e.to_string()
}

impl SecureLink {
    fn build(
        params: &Params,
        preamble: &[u8],
        initiator: bool,
    ) -> Result<snow::HandshakeState, SecureError> {
        let config = |e: snow::Error| SecureError::Config(snow_err(e));
        if params.payload.len() > MAX_HANDSHAKE_PAYLOAD {
            return Err(SecureError::Config(format!(
                "handshake payload of {} bytes (at most {MAX_HANDSHAKE_PAYLOAD})",
                params.payload.len()
            )));
        }
        let noise: snow::params::NoiseParams = params.pattern.parse().map_err(config)?;
        let mut b = snow::Builder::new(noise)
            .prologue(preamble)
            .map_err(config)?;
        if let Some((location, psk)) = &params.psk {
            b = b.psk(*location, psk).map_err(config)?;
        }
        if let Some(key) = &params.local_private {
            b = b.local_private_key(key).map_err(config)?;
        }
        if let Some(key) = &params.remote_public {
            b = b.remote_public_key(key).map_err(config)?;
        }
        if initiator {
            b.build_initiator().map_err(config)
        } else {
            b.build_responder().map_err(config)
        }
    }

    fn empty(phase: Phase, preamble: [u8; PREAMBLE_LEN], params: &Params) -> Self {
        SecureLink {
            payload: params.payload.clone(),
            remote_payload: Vec::new(),
            identity: params.identity,
            remote_identity: None,
            phase,
            preamble,
            inbuf: Vec::new(),
            in_start: 0,
            in_end: 0,
            plain: Vec::new(),
            plain_pos: 0,
            out: Vec::new(),
            out_pos: 0,
        }
    }

    /// The dialing side: queues the preamble and the first handshake message at once.
    pub fn initiator(params: &Params) -> Result<Self, SecureError> {
        let preamble = params.preamble();
        let hs = Self::build(params, &preamble, true)?;
        let mut link = Self::empty(Phase::Handshake(Box::new(hs)), preamble, params);
        link.out.extend_from_slice(&preamble);
        link.write_handshake()?;
        Ok(link)
    }

    /// The accepting side: expects the preamble, then the initiator's first message.
    pub fn responder(params: &Params) -> Result<Self, SecureError> {
        let preamble = params.preamble();
        let hs = Self::build(params, &preamble, false)?;
        Ok(Self::empty(Phase::Preamble(Box::new(hs)), preamble, params))
    }

    /// The handshake is done: plaintext flows both ways.
    pub fn is_established(&self) -> bool {
        matches!(self.phase, Phase::Transport(_))
    }

    /// The peer's static public key, for patterns that transmit one (once established).
    pub fn remote_static(&self) -> Option<&[u8]> {
        match &self.phase {
            Phase::Transport(t) => t.get_remote_static(),
            _ => None,
        }
    }

    /// The identity the responder proved (its checked certificate's key), once established
    /// with an [`IdentityCheck`].
    pub fn remote_identity(&self) -> Option<[u8; 32]> {
        self.remote_identity
    }

    /// Space to read received bytes into (empty while a whole message waits to be
    /// processed: call [`read_plain`](Self::read_plain) first).
    pub fn spare(&mut self) -> &mut [u8] {
        if self.in_start > 0 {
            self.inbuf.copy_within(self.in_start..self.in_end, 0);
            self.in_end -= self.in_start;
            self.in_start = 0;
        }
        // Room for the rest of the next message, and for a few more small ones behind it so
        // that one read usually brings several records; never more than one full message.
        let want = self
            .next_need()
            .max(self.in_end + READ_CHUNK)
            .min(MAX_IN)
            .max(self.in_end);
        if self.inbuf.len() < want {
            self.inbuf.resize(want, 0);
        }
        &mut self.inbuf[self.in_end..want]
    }

    /// Records that `n` bytes were written into [`spare`](Self::spare).
    pub fn commit(&mut self, n: usize) {
        self.in_end = (self.in_end + n).min(self.inbuf.len());
    }

    /// Copies as much of `data` as fits into the input buffer; returns how much was taken.
    /// (A convenience over `spare`/`commit` for callers holding bytes already.)
    pub fn feed(&mut self, data: &[u8]) -> usize {
        let spare = self.spare();
        let n = spare.len().min(data.len());
        spare[..n].copy_from_slice(&data[..n]);
        self.commit(n);
        n
    }

    /// Buffered input bytes not yet processed.
    fn buffered(&self) -> usize {
        self.in_end - self.in_start
    }

    /// How many buffered bytes the next step needs in all: the preamble, or a whole message.
    /// Reads stop there, so the input buffer never holds more than one message.
    fn next_need(&self) -> usize {
        match self.phase {
            Phase::Preamble(_) => PREAMBLE_LEN,
            _ => {
                let head = &self.inbuf[self.in_start..self.in_end];
                if head.len() < LEN_PREFIX {
                    LEN_PREFIX
                } else {
                    LEN_PREFIX + usize::from(BigEndian::read_u16(head))
                }
            }
        }
    }

    /// The next whole message in the input (its bytes' range), if one is buffered.
    fn next_message(&mut self, max: usize) -> Result<Option<(usize, usize)>, SecureError> {
        let head = &self.inbuf[self.in_start..self.in_end];
        if head.len() < LEN_PREFIX {
            return Ok(None);
        }
        let len = usize::from(BigEndian::read_u16(head));
        if len > max {
            // Checked as soon as the prefix arrives, before waiting for the body.
            return Err(SecureError::HandshakeTooLong(len));
        }
        if head.len() < LEN_PREFIX + len {
            return Ok(None);
        }
        let start = self.in_start + LEN_PREFIX;
        self.in_start = start + len;
        Ok(Some((start, start + len)))
    }

    /// Processes buffered input and copies decrypted plaintext into `dst`. `Ok(0)` means more
    /// input is needed (or `dst` is empty). Handshake steps may queue bytes to send: check
    /// [`outgoing`](Self::outgoing) afterwards.
    pub fn read_plain(&mut self, dst: &mut [u8]) -> Result<usize, SecureError> {
        let result = self.read_plain_inner(dst);
        if result.is_err() {
            self.phase = Phase::Failed;
        }
        result
    }

    fn read_plain_inner(&mut self, dst: &mut [u8]) -> Result<usize, SecureError> {
        loop {
            if self.plain_pos < self.plain.len() {
                let n = dst.len().min(self.plain.len() - self.plain_pos);
                dst[..n].copy_from_slice(&self.plain[self.plain_pos..self.plain_pos + n]);
                self.plain_pos += n;
                return Ok(n);
            }
            if dst.is_empty() {
                return Ok(0);
            }
            match &mut self.phase {
                Phase::Failed => return Err(SecureError::Failed),
                Phase::Preamble(_) => {
                    if self.buffered() < PREAMBLE_LEN {
                        return Ok(0);
                    }
                    let got = &self.inbuf[self.in_start..self.in_start + PREAMBLE_LEN];
                    if got[..4] != self.preamble[..4] {
                        let mut magic = [0u8; 4];
                        magic.copy_from_slice(&got[..4]);
                        return Err(SecureError::BadMagic(magic));
                    }
                    let version = BigEndian::read_u16(&got[4..]);
                    if version != SECURE_VERSION {
                        return Err(SecureError::BadVersion(version));
                    }
                    self.in_start += PREAMBLE_LEN;
                    let Phase::Preamble(hs) = std::mem::replace(&mut self.phase, Phase::Failed)
                    else {
                        return Err(SecureError::Failed);
                    };
                    self.phase = Phase::Handshake(hs);
                }
                Phase::Handshake(_) => {
                    let Some((start, end)) = self.next_message(MAX_HANDSHAKE_MSG)? else {
                        return Ok(0);
                    };
                    let Phase::Handshake(hs) = &mut self.phase else {
                        return Err(SecureError::Failed);
                    };
                    let mut payload = [0u8; MAX_HANDSHAKE_MSG];
                    let n = hs
                        .read_message(&self.inbuf[start..end], &mut payload)
                        .map_err(|e| SecureError::Handshake(snow_err(e)))?;
                    if n > 0 {
                        self.remote_payload.clear();
                        self.remote_payload.extend_from_slice(&payload[..n]);
                    }
                    if !hs.is_handshake_finished() && hs.is_my_turn() {
                        self.write_handshake()?;
                    }
                    self.maybe_established()?;
                }
                Phase::Transport(_) => {
                    let head = &self.inbuf[self.in_start..self.in_end];
                    if head.len() >= LEN_PREFIX {
                        let len = usize::from(BigEndian::read_u16(head));
                        if len < TAG_LEN {
                            return Err(SecureError::RecordTooShort(len));
                        }
                    }
                    let Some((start, end)) = self.next_message(MAX_MESSAGE)? else {
                        return Ok(0);
                    };
                    let Phase::Transport(t) = &mut self.phase else {
                        return Err(SecureError::Failed);
                    };
                    self.plain.resize(end - start, 0);
                    self.plain_pos = 0;
                    match t.read_message(&self.inbuf[start..end], &mut self.plain) {
                        Ok(n) => self.plain.truncate(n),
                        Err(_) => {
                            self.plain.clear();
                            return Err(SecureError::BadRecord);
                        }
                    }
                }
            }
        }
    }

    /// Writes this side's next handshake message into the output.
    fn write_handshake(&mut self) -> Result<(), SecureError> {
        let Phase::Handshake(hs) = &mut self.phase else {
            return Err(SecureError::Failed);
        };
        let mut msg = [0u8; MAX_HANDSHAKE_MSG];
        let n = hs
            .write_message(&self.payload, &mut msg)
            .map_err(|e| SecureError::Handshake(snow_err(e)))?;
        self.push_message(&msg[..n]);
        self.maybe_established()
    }

    fn maybe_established(&mut self) -> Result<(), SecureError> {
        if let Phase::Handshake(hs) = &self.phase {
            if hs.is_handshake_finished() {
                if let Some(check) = self.identity {
                    // Before transport mode: nothing is sealed for a peer that fails this.
                    let remote_static = hs.get_remote_static().unwrap_or(&[]);
                    let presented = (check.verify)(&self.remote_payload, remote_static)
                        .map_err(SecureError::BadIdentity)?;
                    if let Some(expected) = check.expected {
                        if expected != presented {
                            return Err(SecureError::WrongIdentity {
                                expected,
                                presented,
                            });
                        }
                    }
                    self.remote_identity = Some(presented);
                }
                let Phase::Handshake(hs) = std::mem::replace(&mut self.phase, Phase::Failed) else {
                    return Err(SecureError::Failed);
                };
                let t = hs
                    .into_transport_mode()
                    .map_err(|e| SecureError::Handshake(snow_err(e)))?;
                self.phase = Phase::Transport(Box::new(t));
            }
        }
        Ok(())
    }

    fn push_message(&mut self, msg: &[u8]) {
        let mut prefix = [0u8; LEN_PREFIX];
        // Callers never pass more than MAX_MESSAGE bytes.
        BigEndian::write_u16(&mut prefix, u16::try_from(msg.len()).unwrap_or(u16::MAX));
        self.out.extend_from_slice(&prefix);
        self.out.extend_from_slice(msg);
    }

    /// Encrypts a prefix of `plain` as one record; returns how many plaintext bytes it took
    /// (0 before the handshake is done, or while [`MAX_SEALED_PENDING`] bytes wait to be
    /// sent).
    pub fn seal(&mut self, plain: &[u8]) -> Result<usize, SecureError> {
        let pending = self.pending_out();
        let Phase::Transport(t) = &mut self.phase else {
            return match self.phase {
                Phase::Failed => Err(SecureError::Failed),
                _ => Ok(0),
            };
        };
        if plain.is_empty() || pending >= MAX_SEALED_PENDING {
            return Ok(0);
        }
        let take = plain.len().min(MAX_RECORD_PLAIN);
        let at = self.out.len();
        self.out.resize(at + LEN_PREFIX + take + TAG_LEN, 0);
        match t.write_message(&plain[..take], &mut self.out[at + LEN_PREFIX..]) {
            Ok(n) => {
                self.out.truncate(at + LEN_PREFIX + n);
                // n <= MAX_MESSAGE: take + TAG_LEN is at most that.
                BigEndian::write_u16(
                    &mut self.out[at..at + LEN_PREFIX],
                    u16::try_from(n).unwrap_or(u16::MAX),
                );
                Ok(take)
            }
            Err(e) => {
                self.out.truncate(at);
                self.phase = Phase::Failed;
                Err(SecureError::Seal(snow_err(e)))
            }
        }
    }

    /// Bytes waiting to be sent, in order.
    pub fn outgoing(&self) -> &[u8] {
        &self.out[self.out_pos..]
    }

    /// Marks `n` bytes of [`outgoing`](Self::outgoing) as sent.
    pub fn advance_outgoing(&mut self, n: usize) {
        self.out_pos = (self.out_pos + n).min(self.out.len());
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
            if self.out.capacity() > 2 * MAX_SEALED_PENDING {
                self.out = Vec::new();
            }
        } else if self.out_pos > MAX_SEALED_PENDING {
            self.out.drain(..self.out_pos);
            self.out_pos = 0;
        }
    }

    /// Bytes queued to send.
    pub fn pending_out(&self) -> usize {
        self.out.len() - self.out_pos
    }
}

#[cfg(test)]
#[path = "secure_tests.rs"]
mod tests;
