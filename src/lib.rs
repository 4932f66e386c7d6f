//! p2pshare: peer-to-peer file sharing for groups.
pub mod wire;
