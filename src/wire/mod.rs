//! The binary wire format shared by every link (client-tracker, tracker-tracker, peer-peer).
//!
//! Every frame is `u32 length | u8 type | body`, big-endian, where `length` counts the type byte
//! and the body. Each link has its own maximum frame length, checked the moment the four length
//! bytes arrive ([`frame::FrameBuffer`]), so a peer can never make us buffer more than that.
//!
//! Contract of this module, after smoltcp's `wire`: `parse` never panics on any input (a
//! malformed frame is a [`DecodeError`]), `emit` never panics, and no count read off the wire is
//! used to allocate before it has been checked against the bytes that remain. Nothing here does
//! IO; the `net` module moves the bytes.

pub mod codec;
pub mod frame;
pub mod ids;
pub mod ops;
pub mod peer_link;
pub mod replication;
pub mod ticket;
pub mod tracker_link;

pub use codec::DecodeError;
pub use ids::{FileName, GroupId, IdError, Password, Sha1Digest, UserId};

/// Identifies this protocol in every handshake ("P2PG").
pub const PROTOCOL_MAGIC: u32 = 0x5032_5047;
/// The version spoken by this build; a peer with another version is refused at the handshake.
pub const PROTOCOL_VERSION: u16 = 3;
/// Size of a file piece: 512 KiB (the last piece of a file may be shorter).
pub const PIECE_LEN: u32 = 512 * 1024;
