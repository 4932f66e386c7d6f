//! p2pshare: peer-to-peer file sharing for groups.
pub mod cli;
pub mod client;
pub mod hasher;
pub mod net;
pub mod storage;
pub mod tracker;
pub mod wire;
