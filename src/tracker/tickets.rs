//! The tickets a tracker issues: with a file's sharers, a member gets the service's signed
//! permission to download that file, valid for [`TICKET_LIFE`]; sharers check it offline
//! (`keys::verify_ticket`) and serve only with one. A user who left a group, or was never
//! accepted, gets no sharers and so no ticket; one they kept ends at its expiry (at most
//! [`TICKET_LIFE_SECS`], 60 s, after they left).
//!
//! Sans-IO like the core that uses it: the wall-clock time (seconds since the Unix epoch,
//! which a ticket's expiry is written in, since other processes check it) is set by the
//! driver ([`TicketIssuer::set_unix_time`]), never read here.

use crate::keys::ServiceKey;
use crate::wire::ticket::{Ticket, TicketBody};
use crate::wire::{GroupId, Sha1Digest, UserId};

/// How long a ticket is valid. A running download renews its ticket when less than half of
/// this is left (one `FileSharers` question per 30 s per download), so a former member keeps
/// access for at most this long after leaving, even at a sharer that keeps serving whatever
/// the downloader's own client does. Short for that bound; long enough that a tracker
/// failover (seconds) never lets a running download's ticket lapse, and that clocks need only
/// roughly agree (a sharer whose clock is ahead by more than this refuses every ticket).
pub const TICKET_LIFE_SECS: u64 = 60;

/// Signs tickets with the service key.
pub struct TicketIssuer {
    key: ServiceKey,
    life_secs: u64,
    unix_now: u64,
}

impl std::fmt::Debug for TicketIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketIssuer")
            .field("key", &self.key)
            .field("life_secs", &self.life_secs)
            .finish_non_exhaustive()
    }
}

impl TicketIssuer {
    pub fn new(key: ServiceKey) -> Self {
        TicketIssuer {
            key,
            life_secs: TICKET_LIFE_SECS,
            unix_now: 0,
        }
    }

    /// Tickets valid this long (tests).
    pub fn with_life_secs(mut self, secs: u64) -> Self {
        self.life_secs = secs;
        self
    }

    /// The time now, in seconds since the Unix epoch.
    pub fn set_unix_time(&mut self, secs: u64) {
        self.unix_now = secs;
    }

    /// The ticket of `user`, on the client whose identity key is `client_key`, for the
    /// content `file_sha1` of `group`. Sharers serve it only over a peer link whose
    /// downloader proved that key.
    pub fn issue(
        &self,
        group: &GroupId,
        file_sha1: Sha1Digest,
        user: &UserId,
        client_key: [u8; 32],
    ) -> Ticket {
        self.key.sign_ticket(TicketBody {
            expires: self.unix_now.saturating_add(self.life_secs),
            file_sha1,
            group: group.clone(),
            user: user.clone(),
            client_key,
        })
    }
}
