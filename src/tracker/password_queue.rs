//! Fair, bounded scheduling of password work (sans-IO, `now` passed in).
//!
//! Argon2id costs about 9 ms of a password thread per job, so whoever can queue jobs fastest
//! would own those threads. The [`PasswordQueue`] decides which job runs next: at most
//! `workers` jobs are handed out at once (the driver's channel never holds more), at most
//! [`MAX_WAITING_JOBS`] wait, and a connection has at most one job (the core parks it while
//! its job waits or runs). Failures are remembered per connection, per user name and per
//! address: a job whose connection or user failed recently is not started before a delay that
//! doubles with each failure ([`FIRST_DELAY`] to [`MAX_DELAY`]), and among the jobs ready to
//! start, those with fewer recent failures (connection plus user, then address) go first, then
//! those from an address with fewer jobs waiting (so a flood from one address does not queue
//! ahead of a user elsewhere), oldest first among equals. So a connection that never failed, logging in as a user nobody
//! is guessing, waits for at most the jobs already running, however many connections flood
//! wrong passwords. A correct password clears the connection's and the user's record; records
//! are forgotten [`FORGET_AFTER`] the last failure, and at most [`MAX_REMEMBERED`] user names
//! and as many addresses are remembered (the oldest record goes first).
//!
//! When the waiting room is full, a job with fewer failures pushes out the one with the most
//! (whose request is refused as busy); otherwise the new job is refused.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::password::PasswordJob;
use crate::net::ConnId;
use crate::wire::UserId;

/// Jobs that may wait for a password thread at once.
pub const MAX_WAITING_JOBS: usize = 4096;
/// The pause after the first recent failure; it doubles with each further one.
pub const FIRST_DELAY: Duration = Duration::from_millis(100);
/// The longest pause.
pub const MAX_DELAY: Duration = Duration::from_secs(5);
/// A record of failures is forgotten this long after its last failure.
pub const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);
/// User names, and separately addresses, whose failures are remembered at once.
pub const MAX_REMEMBERED: usize = 65_536;

/// The pause owed after `failures` recent failures.
pub fn delay(failures: u32) -> Duration {
    match failures {
        0 => Duration::ZERO,
        f => FIRST_DELAY
            .saturating_mul(1u32 << (f - 1).min(16))
            .min(MAX_DELAY),
    }
}

/// A failure count and the time of the last failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Record {
    failures: u32,
    last: Instant,
}

impl Record {
    fn ready_at(&self) -> Instant {
        self.last + delay(self.failures)
    }
}

/// Recent failures per key, bounded: the oldest record is dropped when full.
#[derive(Debug)]
struct Failures<K: Ord + Clone> {
    by_key: BTreeMap<K, Record>,
    by_time: BTreeSet<(Instant, K)>,
    max: usize,
}

impl<K: Ord + Clone> Failures<K> {
    fn new(max: usize) -> Self {
        Failures {
            by_key: BTreeMap::new(),
            by_time: BTreeSet::new(),
            max,
        }
    }

    fn get(&self, key: &K, now: Instant) -> Option<Record> {
        self.by_key
            .get(key)
            .copied()
            .filter(|r| now.saturating_duration_since(r.last) < FORGET_AFTER)
    }

    /// Counts a failure of `key` at `now`; returns the recent failures now counted.
    fn fail(&mut self, key: &K, now: Instant) -> u32 {
        let failures = self.get(key, now).map_or(0, |r| r.failures) + 1;
        self.clear(key);
        while self.by_key.len() >= self.max {
            let Some((_, oldest)) = self.by_time.pop_first() else {
                break;
            };
            self.by_key.remove(&oldest);
        }
        self.by_key.insert(
            key.clone(),
            Record {
                failures,
                last: now,
            },
        );
        self.by_time.insert((now, key.clone()));
        failures
    }

    fn clear(&mut self, key: &K) {
        if let Some(r) = self.by_key.remove(key) {
            self.by_time.remove(&(r.last, key.clone()));
        }
    }

    /// Drops the records older than [`FORGET_AFTER`].
    fn expire(&mut self, now: Instant) {
        while let Some((t, key)) = self.by_time.first().cloned() {
            if now.saturating_duration_since(t) < FORGET_AFTER {
                break;
            }
            self.by_time.pop_first();
            self.by_key.remove(&key);
        }
    }

    fn len(&self) -> usize {
        self.by_key.len()
    }
}

/// Who a job is for, to look up its failures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOwner {
    pub conn: ConnId,
    /// The user name whose password is checked (none for a new account).
    pub user: Option<UserId>,
    /// The address the connection comes from, if known.
    pub ip: Option<IpAddr>,
}

#[derive(Debug)]
struct Queued {
    owner: JobOwner,
    job: PasswordJob,
}

/// The order of jobs: (recent failures of connection and user, of the address, jobs waiting
/// from the address, arrival).
type Rank = (u32, u32, usize, u64);

/// What happened to a job offered with [`PasswordQueue::push`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pushed {
    /// It waits for a thread.
    Queued,
    /// It waits, and pushed out the job of this connection, whose request must be refused.
    QueuedInstead(ConnId),
    /// The waiting room is full of jobs with no more failures than this one: refuse it.
    Full,
}

/// The waiting room of password jobs; see the module doc.
#[derive(Debug)]
pub struct PasswordQueue {
    workers: usize,
    running: usize,
    /// Waiting jobs by arrival.
    waiting: BTreeMap<u64, Queued>,
    /// The waiting job of each connection (at most one).
    by_conn: BTreeMap<ConnId, u64>,
    /// Jobs waiting per address.
    by_ip: BTreeMap<IpAddr, usize>,
    next_seq: u64,
    conns: BTreeMap<ConnId, Record>,
    users: Failures<UserId>,
    addrs: Failures<IpAddr>,
    /// No waiting job can start before this (an early guess is harmless).
    wake_at: Option<Instant>,
    max_waiting: usize,
}

impl PasswordQueue {
    /// A queue for `workers` password threads.
    pub fn new(workers: usize) -> Self {
        PasswordQueue {
            workers: workers.max(1),
            running: 0,
            waiting: BTreeMap::new(),
            by_conn: BTreeMap::new(),
            by_ip: BTreeMap::new(),
            next_seq: 0,
            conns: BTreeMap::new(),
            users: Failures::new(MAX_REMEMBERED),
            addrs: Failures::new(MAX_REMEMBERED),
            wake_at: None,
            max_waiting: MAX_WAITING_JOBS,
        }
    }

    /// Lets at most `max` jobs wait (tests).
    pub fn with_max_waiting(mut self, max: usize) -> Self {
        self.max_waiting = max.max(1);
        self
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn running(&self) -> usize {
        self.running
    }

    /// When the earliest job that must wait out a delay may start (`None`: nothing to wait
    /// for, or every thread busy).
    pub fn poll_timeout(&self) -> Option<Instant> {
        (self.running < self.workers)
            .then_some(self.wake_at)
            .flatten()
    }

    /// The recent failures of this connection, user and address at `now`.
    fn records(&self, owner: &JobOwner, now: Instant) -> [Option<Record>; 3] {
        [
            self.conns
                .get(&owner.conn)
                .copied()
                .filter(|r| now.saturating_duration_since(r.last) < FORGET_AFTER),
            owner.user.as_ref().and_then(|u| self.users.get(u, now)),
            owner.ip.as_ref().and_then(|ip| self.addrs.get(ip, now)),
        ]
    }

    /// When the job may start, and its rank among the jobs that may.
    fn rank(&self, seq: u64, owner: &JobOwner, now: Instant) -> (Instant, Rank) {
        let [conn, user, addr] = self.records(owner, now);
        let count = |r: Option<Record>| r.map_or(0, |r| r.failures);
        let ready = [conn, user]
            .into_iter()
            .flatten()
            .map(|r| r.ready_at())
            .max()
            .unwrap_or(now);
        let crowd = owner
            .ip
            .and_then(|ip| self.by_ip.get(&ip).copied())
            .unwrap_or(0);
        (
            ready,
            (
                count(conn).saturating_add(count(user)),
                count(addr),
                crowd,
                seq,
            ),
        )
    }

    /// Offers the job of `owner.conn` (which has no other job here).
    pub fn push(&mut self, owner: JobOwner, job: PasswordJob, now: Instant) -> Pushed {
        let seq = self.next_seq;
        self.next_seq += 1;
        let (ready, rank) = self.rank(seq, &owner, now);
        let mut pushed = Pushed::Queued;
        if self.waiting.len() >= self.max_waiting {
            // The job with the most failures (the newest among equals) leaves, if it has
            // more than this one.
            let worst = self
                .waiting
                .iter()
                .map(|(s, q)| (self.rank(*s, &q.owner, now).1, *s))
                .max();
            match worst {
                Some(((f, a, _, _), s)) if (f, a) > (rank.0, rank.1) => {
                    if let Some(q) = self.remove(s) {
                        pushed = Pushed::QueuedInstead(q.owner.conn);
                    }
                }
                _ => return Pushed::Full,
            }
        }
        if let Some(&old) = self.by_conn.get(&owner.conn) {
            // Not expected (the core parks a connection with a job); the newer one stands.
            self.remove(old);
        }
        self.by_conn.insert(owner.conn, seq);
        if let Some(ip) = owner.ip {
            *self.by_ip.entry(ip).or_insert(0) += 1;
        }
        self.waiting.insert(seq, Queued { owner, job });
        if ready > now {
            self.wake_at = Some(self.wake_at.map_or(ready, |w| w.min(ready)));
        }
        pushed
    }

    /// The next job to run, if a thread is free and a job may start at `now`.
    pub fn next_job(&mut self, now: Instant) -> Option<(ConnId, PasswordJob)> {
        if self.running >= self.workers || self.waiting.is_empty() {
            return None;
        }
        let mut best: Option<Rank> = None;
        let mut wake: Option<Instant> = None;
        for (seq, q) in &self.waiting {
            let (ready, rank) = self.rank(*seq, &q.owner, now);
            if ready > now {
                wake = Some(wake.map_or(ready, |w| w.min(ready)));
            } else if best.is_none_or(|b| rank < b) {
                best = Some(rank);
            }
        }
        self.wake_at = wake;
        let (_, _, _, seq) = best?;
        let q = self.remove(seq)?;
        self.running += 1;
        Some((q.owner.conn, q.job))
    }

    /// Takes the waiting job `seq` out of every index.
    fn remove(&mut self, seq: u64) -> Option<Queued> {
        let q = self.waiting.remove(&seq)?;
        self.by_conn.remove(&q.owner.conn);
        if let Some(ip) = q.owner.ip {
            if let Some(n) = self.by_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    self.by_ip.remove(&ip);
                }
            }
        }
        Some(q)
    }

    /// A job handed out by [`next_job`](Self::next_job) is done.
    pub fn job_done(&mut self) {
        self.running = self.running.saturating_sub(1);
    }

    /// A password check of `owner` failed at `now`: returns the recent failures of the
    /// connection and of the user (0 when there is none).
    pub fn record_failure(&mut self, owner: &JobOwner, now: Instant) -> (u32, u32) {
        let conn = self
            .conns
            .get(&owner.conn)
            .filter(|r| now.saturating_duration_since(r.last) < FORGET_AFTER)
            .map_or(0, |r| r.failures)
            + 1;
        self.conns.insert(
            owner.conn,
            Record {
                failures: conn,
                last: now,
            },
        );
        let user = owner.user.as_ref().map_or(0, |u| self.users.fail(u, now));
        if let Some(ip) = &owner.ip {
            self.addrs.fail(ip, now);
        }
        self.users.expire(now);
        self.addrs.expire(now);
        (conn, user)
    }

    /// The password was right: the connection's and the user's failures are forgiven (not
    /// the address's, which others may share).
    pub fn record_success(&mut self, owner: &JobOwner) {
        self.conns.remove(&owner.conn);
        if let Some(u) = &owner.user {
            self.users.clear(u);
        }
    }

    /// The connection is gone: its waiting job is dropped, its record forgotten. Returns
    /// whether a job was dropped.
    pub fn forget_conn(&mut self, conn: ConnId) -> bool {
        self.conns.remove(&conn);
        match self.by_conn.get(&conn) {
            Some(&seq) => self.remove(seq).is_some(),
            None => false,
        }
    }

    /// Records held: (connections, user names, addresses).
    pub fn remembered(&self) -> (usize, usize, usize) {
        (self.conns.len(), self.users.len(), self.addrs.len())
    }
}

#[cfg(test)]
#[path = "password_queue_tests.rs"]
mod tests;
