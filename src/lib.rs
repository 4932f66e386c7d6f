//! p2pshare: peer-to-peer file sharing for groups.
pub mod cli;
pub mod net;
pub mod tracker;
pub mod wire;
