//! Bounds-checked primitives for reading and writing message bodies.
//!
//! [`Reader`] is the only way message parsers touch bytes: every read checks what remains and
//! returns [`DecodeError::Truncated`] instead of panicking. Writers are plain functions on
//! `Vec<u8>` (writing to a vector cannot fail).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use byteorder::{BigEndian, ByteOrder, WriteBytesExt};

use super::ids::{IdError, Sha1Digest};

/// Why a frame could not be decoded. Any of these closes the connection that sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The frame ended before a field did.
    Truncated,
    /// Bytes were left over after the last field.
    TrailingBytes(usize),
    /// The frame type byte is not one this link knows.
    UnknownType(u8),
    /// A length prefix announced a frame larger than the link allows.
    FrameTooLarge { len: usize, max: usize },
    /// A length prefix of zero (a frame must hold at least its type byte).
    EmptyFrame,
    /// The handshake did not carry our magic number.
    BadMagic(u32),
    /// A string field was not UTF-8.
    NotUtf8,
    /// An identifier field broke its rules.
    BadId(IdError),
    /// A field held a value outside its range.
    BadValue(&'static str),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated => write!(f, "frame truncated"),
            DecodeError::TrailingBytes(n) => write!(f, "{n} trailing bytes after the last field"),
            DecodeError::UnknownType(t) => write!(f, "unknown frame type 0x{t:02x}"),
            DecodeError::FrameTooLarge { len, max } => {
                write!(f, "frame too large ({len} > {max})")
            }
            DecodeError::EmptyFrame => write!(f, "empty frame"),
            DecodeError::BadMagic(m) => write!(f, "bad handshake magic 0x{m:08x}"),
            DecodeError::NotUtf8 => write!(f, "string is not utf-8"),
            DecodeError::BadId(e) => write!(f, "invalid identifier: {e}"),
            DecodeError::BadValue(what) => write!(f, "invalid value: {what}"),
        }
    }
}

impl std::error::Error for DecodeError {}

impl From<IdError> for DecodeError {
    fn from(e: IdError) -> Self {
        DecodeError::BadId(e)
    }
}

/// A cursor over a frame body. Every method checks the remaining length first.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Takes the next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.buf.len() {
            return Err(DecodeError::Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.bytes(1)?[0])
    }

    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(BigEndian::read_u16(self.bytes(2)?))
    }

    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(BigEndian::read_u32(self.bytes(4)?))
    }

    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(BigEndian::read_u64(self.bytes(8)?))
    }

    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    pub fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::BadValue("boolean")),
        }
    }

    /// A `u16`-length-prefixed UTF-8 string of at most `max` bytes.
    pub fn str16(&mut self, max: usize) -> Result<&'a str, DecodeError> {
        let len = usize::from(self.u16()?);
        if len > max {
            return Err(DecodeError::BadValue("string too long"));
        }
        std::str::from_utf8(self.bytes(len)?).map_err(|_| DecodeError::NotUtf8)
    }

    /// A `u16`-length-prefixed byte string of at most `max` bytes.
    pub fn bytes16(&mut self, max: usize) -> Result<&'a [u8], DecodeError> {
        let len = usize::from(self.u16()?);
        if len > max {
            return Err(DecodeError::BadValue("byte string too long"));
        }
        self.bytes(len)
    }

    /// A `u32` element count, checked so that `count * min_elem_len` bytes really remain: a
    /// forged count can never make the caller allocate more than the frame holds.
    pub fn count(&mut self, min_elem_len: usize) -> Result<usize, DecodeError> {
        let count = usize::try_from(self.u32()?).map_err(|_| DecodeError::Truncated)?;
        let need = count
            .checked_mul(min_elem_len.max(1))
            .ok_or(DecodeError::Truncated)?;
        if need > self.buf.len() {
            return Err(DecodeError::Truncated);
        }
        Ok(count)
    }

    pub fn sha1(&mut self) -> Result<Sha1Digest, DecodeError> {
        Ok(Sha1Digest(self.array::<20>()?))
    }

    /// A socket address: `u8 family (4|6) | address bytes | u16 port`.
    pub fn socket_addr(&mut self) -> Result<SocketAddr, DecodeError> {
        let ip = match self.u8()? {
            4 => IpAddr::V4(Ipv4Addr::from(self.array::<4>()?)),
            6 => IpAddr::V6(Ipv6Addr::from(self.array::<16>()?)),
            _ => return Err(DecodeError::BadValue("address family")),
        };
        Ok(SocketAddr::new(ip, self.u16()?))
    }

    /// Fails unless every byte has been consumed.
    pub fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes(self.buf.len()))
        }
    }
}

// Writing into a Vec<u8> cannot fail, so the io::Result of byteorder's writers is discarded
// through these helpers rather than unwrapped.

pub fn put_u8(out: &mut Vec<u8>, v: u8) {
    out.push(v);
}

pub fn put_u16(out: &mut Vec<u8>, v: u16) {
    let _ = out.write_u16::<BigEndian>(v);
}

pub fn put_u32(out: &mut Vec<u8>, v: u32) {
    let _ = out.write_u32::<BigEndian>(v);
}

pub fn put_u64(out: &mut Vec<u8>, v: u64) {
    let _ = out.write_u64::<BigEndian>(v);
}

pub fn put_bool(out: &mut Vec<u8>, v: bool) {
    out.push(u8::from(v));
}

/// Writes a `u16`-length-prefixed string. Callers only pass validated values, whose length is
/// bounded far below `u16::MAX`; longer input is cut at the limit rather than panicking.
pub fn put_str16(out: &mut Vec<u8>, s: &str) {
    put_bytes16(out, s.as_bytes());
}

pub fn put_bytes16(out: &mut Vec<u8>, b: &[u8]) {
    let len = b.len().min(usize::from(u16::MAX));
    put_u16(out, len as u16);
    out.extend_from_slice(&b[..len]);
}

/// Writes a `u32` element count (saturating; no message carries anywhere near 2^32 elements).
pub fn put_count(out: &mut Vec<u8>, n: usize) {
    put_u32(out, u32::try_from(n).unwrap_or(u32::MAX));
}

pub fn put_sha1(out: &mut Vec<u8>, d: &Sha1Digest) {
    out.extend_from_slice(&d.0);
}

pub fn put_socket_addr(out: &mut Vec<u8>, addr: &SocketAddr) {
    match addr.ip() {
        IpAddr::V4(ip) => {
            put_u8(out, 4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            put_u8(out, 6);
            out.extend_from_slice(&ip.octets());
        }
    }
    put_u16(out, addr.port());
}
