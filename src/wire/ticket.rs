//! A ticket: the service's signed statement that a user may download a file of a group, until
//! a time. The tracker issues one with a file's sharers; a sharer checks it offline with the
//! service's public key (`keys::verify_ticket`) before it serves. This module holds
//! only the encoding: signing and checking are `keys`' (the wire depends on nothing else).
//!
//! ```text
//! ticket   = u8 version (1) | u64 expires | sha1 file | str group | str user
//!            | [32] client key | [64] signature
//! signed   = "p2pshare v1 ticket\0" | every byte of the ticket before the signature
//! ```
//!
//! `expires` is in seconds since the Unix epoch (UTC); `client key` names the downloading
//! client (its identity key; all zero until clients have one). `parse` never panics and
//! checks every field; a ticket is at most [`MAX_TICKET_LEN`] bytes.

use super::codec::{put_sha1, put_str16, put_u64, put_u8, DecodeError, Reader};
use super::ids::{GroupId, Sha1Digest, UserId, MAX_ID_LEN};

/// The only ticket version this build reads and writes.
pub const TICKET_VERSION: u8 = 1;
/// What the service key signs before a ticket's bytes, so that a ticket's signature can never
/// be taken for another statement of the service (a tracker's static key certificate, say).
pub const TICKET_CONTEXT: &[u8] = b"p2pshare v1 ticket\0";
/// Bytes of the signature.
pub const SIGNATURE_LEN: usize = 64;
/// The longest ticket: both ids at their longest.
pub const MAX_TICKET_LEN: usize = 1 + 8 + 20 + 2 * (2 + MAX_ID_LEN) + 32 + SIGNATURE_LEN;

/// What a ticket says (everything but the signature).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TicketBody {
    /// Seconds since the Unix epoch after which the ticket is void.
    pub expires: u64,
    pub file_sha1: Sha1Digest,
    pub group: GroupId,
    pub user: UserId,
    pub client_key: [u8; 32],
}

/// A signed ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub body: TicketBody,
    pub signature: [u8; SIGNATURE_LEN],
}

impl TicketBody {
    /// The body's bytes, as they are laid out in the ticket.
    pub fn emit(&self, out: &mut Vec<u8>) {
        put_u8(out, TICKET_VERSION);
        put_u64(out, self.expires);
        put_sha1(out, &self.file_sha1);
        put_str16(out, self.group.as_str());
        put_str16(out, self.user.as_str());
        out.extend_from_slice(&self.client_key);
    }

    /// The bytes the service signs: the context, then the body.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut out = TICKET_CONTEXT.to_vec();
        self.emit(&mut out);
        out
    }

    fn parse(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let version = r.u8()?;
        if version != TICKET_VERSION {
            return Err(DecodeError::BadValue("ticket version"));
        }
        Ok(TicketBody {
            expires: r.u64()?,
            file_sha1: r.sha1()?,
            group: GroupId::new(r.str16(MAX_ID_LEN)?)?,
            user: UserId::new(r.str16(MAX_ID_LEN)?)?,
            client_key: r.array()?,
        })
    }
}

impl Ticket {
    /// Appends the whole ticket.
    pub fn emit(&self, out: &mut Vec<u8>) {
        self.body.emit(out);
        out.extend_from_slice(&self.signature);
    }

    /// The ticket's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAX_TICKET_LEN);
        self.emit(&mut out);
        out
    }

    /// Reads a ticket from the reader's next bytes.
    pub fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let body = TicketBody::parse(r)?;
        Ok(Ticket {
            body,
            signature: r.array()?,
        })
    }

    /// Parses exactly one ticket.
    pub fn parse(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let ticket = Self::read(&mut r)?;
        r.finish()?;
        Ok(ticket)
    }
}

#[cfg(test)]
#[path = "ticket_tests.rs"]
mod tests;
