//! How much a serve link's socket may hold not yet sent (`TCP_NOTSENT_LOWAT`), sized to the
//! link's measured rate. Sans-IO: the shell reports the bytes it wrote into the socket with
//! `now`, and sets the limit this core returns.
//!
//! Why a rate: the limit exists so that the upload slots, not the socket buffers, decide what
//! goes on the wire (issue 15: with the kernel's defaults a seed's serve sockets held 0.6-1.4
//! MiB each on a shaped 100 Mbit/s uplink). What matters there is how long the unsent bytes
//! take to leave, so the limit is a time, [`UNSENT_TIME`] of the link's rate: on such an
//! uplink that is the fixed [`MIN_UNSENT`] of before (128 KiB is 10 ms at 100 Mbit/s), while
//! a link that moves hundreds of MiB a second (one downloader on loopback) gets up to
//! [`MAX_UNSENT`]. With 128 KiB there, the socket said "full" every 128 KiB, and the sharer
//! woke up and wrote about that much at a time: in alternated runs of 1 GiB from one sharer
//! on loopback, the option left unset made the transfer faster in 7 of 7 pairs (5% summed)
//! and the sharer spent 0.48-0.52 CPU-s/GiB against 0.53-0.58; this rule against the fixed
//! 128 KiB, 4 of 4 pairs faster (5% summed), the sharer 0.48-0.54 against 0.58-0.62 CPU-s/GiB
//! (README, Download throughput). On the shaped links of the swarm benchmark (100 Mbit/s
//! shared by the seed's links) no link's limit ever changed.
//!
//! The rate is the bytes written per [`RATE_WINDOW`], in windows that follow each other from
//! the link's first write: a link that pauses (its turn passed to another link, nothing
//! requested) measures lower than it can go, which only keeps its limit small, the safe side.
//! A new limit is reported only when it differs from the one set by a factor of two or more,
//! so a link's socket option changes a few times at most, not on every write.

use std::time::{Duration, Instant};

/// The least a serve socket may hold unsent: 10 ms at 100 Mbit/s (issue 15's shaped links).
pub const MIN_UNSENT: u32 = 128 * 1024;
/// The most: the kernel's default largest send buffer (`net.ipv4.tcp_wmem`, 4 MiB), which a
/// socket without the option would hold anyway.
pub const MAX_UNSENT: u32 = 4 * 1024 * 1024;
/// How much of a link's rate its socket may hold unsent.
pub const UNSENT_TIME: Duration = Duration::from_millis(10);
/// The window over which a link's rate is measured.
pub const RATE_WINDOW: Duration = Duration::from_millis(100);

/// The unsent limit for a link that moves `rate` bytes a second: [`UNSENT_TIME`] of it, in
/// `[MIN_UNSENT, MAX_UNSENT]`.
pub fn limit_for(rate: f64) -> u32 {
    let bytes = rate * UNSENT_TIME.as_secs_f64();
    // `as` saturates and maps NaN to 0; the clamp keeps the bounds.
    (bytes as u32).clamp(MIN_UNSENT, MAX_UNSENT)
}

/// One serve link's unsent limit and the window its rate is measured in.
#[derive(Debug, Clone)]
pub struct UnsentLimit {
    /// The limit set on the socket.
    limit: u32,
    /// When the current window started and the bytes written in it (none before the first
    /// write).
    window: Option<(Instant, u64)>,
}

impl Default for UnsentLimit {
    fn default() -> Self {
        Self::new()
    }
}

impl UnsentLimit {
    /// A link starts at [`MIN_UNSENT`] (the shell sets it when it accepts the connection).
    pub fn new() -> Self {
        UnsentLimit {
            limit: MIN_UNSENT,
            window: None,
        }
    }

    /// The limit set on the socket.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// `bytes` went into the socket at `now`. Returns the limit to set on the socket when it
    /// changes.
    pub fn on_written(&mut self, bytes: usize, now: Instant) -> Option<u32> {
        if bytes == 0 {
            return None;
        }
        // The first write opens the first window; its bytes went in before any time passed.
        let Some((start, total)) = self.window.as_mut() else {
            self.window = Some((now, 0));
            return None;
        };
        *total = total.saturating_add(bytes as u64);
        let elapsed = now.saturating_duration_since(*start);
        if elapsed < RATE_WINDOW {
            return None;
        }
        let rate = *total as f64 / elapsed.as_secs_f64();
        self.window = Some((now, 0));
        let want = limit_for(rate);
        let (low, high) = (want.min(self.limit), want.max(self.limit));
        if high / 2 >= low {
            self.limit = want;
            Some(want)
        } else {
            None
        }
    }
}

#[cfg(test)]
#[path = "unsent_tests.rs"]
mod tests;
