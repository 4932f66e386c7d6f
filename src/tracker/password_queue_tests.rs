//! Unit tests of the [`PasswordQueue`] on a fake clock: jobs are placeholders, never run.

use super::*;
use crate::testing::{pw, uid};

use std::net::Ipv4Addr;

fn conn(key: usize) -> ConnId {
    ConnId { key, generation: 1 }
}

fn job() -> PasswordJob {
    PasswordJob::Verify {
        password: pw("guess"),
        phc: "$argon2id$placeholder".to_owned(),
    }
}

fn owner(c: usize, user: &str, ip: u8) -> JobOwner {
    JobOwner {
        conn: conn(c),
        user: Some(uid(user)),
        ip: Some(IpAddr::from(Ipv4Addr::new(127, 0, 0, ip))),
    }
}

/// Runs jobs until none may start, failing each; returns the connections served, in order.
fn fail_all(q: &mut PasswordQueue, owners: &[JobOwner], now: Instant) -> Vec<ConnId> {
    let mut served = Vec::new();
    while let Some((c, _)) = q.next_job(now) {
        q.job_done();
        let o = owners.iter().find(|o| o.conn == c).unwrap();
        q.record_failure(o, now);
        served.push(c);
    }
    served
}

#[test]
fn delays_double_up_to_the_cap() {
    assert_eq!(delay(0), Duration::ZERO);
    assert_eq!(delay(1), FIRST_DELAY);
    assert_eq!(delay(2), FIRST_DELAY * 2);
    assert_eq!(delay(4), FIRST_DELAY * 8);
    assert_eq!(delay(10), MAX_DELAY);
    assert_eq!(delay(u32::MAX), MAX_DELAY);
}

#[test]
fn at_most_one_job_per_thread_is_handed_out() {
    let now = Instant::now();
    let mut q = PasswordQueue::new(2);
    for c in 0..5 {
        assert_eq!(
            q.push(owner(c, &format!("u{c}"), 1), job(), now),
            Pushed::Queued
        );
    }
    assert!(q.next_job(now).is_some());
    assert!(q.next_job(now).is_some());
    assert_eq!(q.next_job(now), None, "both threads busy");
    assert_eq!(q.running(), 2);
    assert_eq!(q.poll_timeout(), None, "nothing to wake for while busy");
    q.job_done();
    let (c, _) = q.next_job(now).unwrap();
    assert_eq!(c, conn(2), "oldest first among equals");
}

#[test]
fn a_fresh_login_goes_before_a_thousand_failing_connections() {
    let t0 = Instant::now();
    let mut q = PasswordQueue::new(2);
    // 1,000 attacking connections from 127.0.0.2, each guessing its own user's password.
    let attackers: Vec<JobOwner> = (0..1000).map(|c| owner(c, &format!("v{c}"), 2)).collect();
    for o in &attackers {
        q.push(o.clone(), job(), t0);
    }
    // (The fake threads finish at once: every attacker fails once at t0.)
    assert_eq!(fail_all(&mut q, &attackers, t0).len(), 1000);
    for o in &attackers {
        q.push(o.clone(), job(), t0);
    }
    // Each guesses again as soon as it may, for 3 s.
    let mut now = t0;
    for _ in 0..20 {
        now += Duration::from_millis(150);
        let served = fail_all(&mut q, &attackers, now);
        for c in served {
            q.push(attackers[c.key].clone(), job(), now);
        }
        while q.running() > 0 {
            q.job_done();
        }
    }
    assert!(q.waiting() > 900, "{}", q.waiting());
    // Fill the threads with attackers' jobs, then a user logs in on a fresh connection.
    now += MAX_DELAY;
    let busy: Vec<ConnId> = std::iter::from_fn(|| q.next_job(now).map(|(c, _)| c)).collect();
    assert_eq!(busy.len(), 2);
    let user = owner(5000, "alice", 1);
    assert_eq!(q.push(user.clone(), job(), now), Pushed::Queued);
    assert_eq!(q.next_job(now), None, "both threads still busy");
    q.job_done();
    let (c, _) = q.next_job(now).unwrap();
    assert_eq!(
        c,
        user.conn,
        "the fresh login is next, ahead of {} others",
        q.waiting()
    );
}

#[test]
fn a_failing_connection_waits_longer_each_time() {
    let t0 = Instant::now();
    let mut q = PasswordQueue::new(1);
    let o = owner(1, "alice", 1);
    let mut now = t0;
    for failures in 1..=8u32 {
        assert_eq!(q.push(o.clone(), job(), now), Pushed::Queued);
        if failures > 1 {
            let wait = delay(failures - 1);
            assert_eq!(q.next_job(now), None, "failure {failures}: too early");
            assert_eq!(q.poll_timeout(), Some(now + wait));
            assert_eq!(q.next_job(now + wait - Duration::from_millis(1)), None);
            now += wait;
        }
        assert!(q.next_job(now).is_some(), "failure {failures}");
        q.job_done();
        assert_eq!(q.record_failure(&o, now), (failures, failures));
    }
    // The right password clears the connection's and the user's record.
    q.record_success(&o);
    q.push(o.clone(), job(), now);
    assert!(q.next_job(now).is_some());
}

#[test]
fn a_guessed_user_name_delays_its_logins_on_fresh_connections_too() {
    let now = Instant::now();
    let mut q = PasswordQueue::new(1);
    for c in 0..3 {
        q.record_failure(&owner(c, "alice", 2), now);
    }
    // A fresh connection, another address: alice's name still waits out 400 ms, while bob
    // is served at once.
    q.push(owner(10, "alice", 1), job(), now);
    q.push(owner(11, "bob", 1), job(), now);
    assert_eq!(q.next_job(now).map(|(c, _)| c), Some(conn(11)));
    q.job_done();
    assert_eq!(q.next_job(now), None);
    assert_eq!(q.poll_timeout(), Some(now + delay(3)));
    assert_eq!(q.next_job(now + delay(3)).map(|(c, _)| c), Some(conn(10)));
}

#[test]
fn a_full_queue_refuses_the_guilty_not_the_fresh() {
    let now = Instant::now();
    let mut q = PasswordQueue::new(1).with_max_waiting(3);
    for c in 0..3 {
        let o = owner(c, &format!("v{c}"), 2);
        q.record_failure(&o, now);
        assert_eq!(q.push(o, job(), now), Pushed::Queued);
    }
    // Another failing connection finds the room full of its peers: refused.
    let guilty = owner(3, "v3", 2);
    q.record_failure(&guilty, now);
    assert_eq!(q.push(guilty, job(), now), Pushed::Full);
    // A fresh one pushes out the newest of those with the most failures.
    assert_eq!(
        q.push(owner(4, "alice", 1), job(), now),
        Pushed::QueuedInstead(conn(2))
    );
    assert_eq!(q.waiting(), 3);
    assert_eq!(q.next_job(now).map(|(c, _)| c), Some(conn(4)));
    // Fresh jobs filling the room refuse a fresh newcomer rather than each other.
    let mut q = PasswordQueue::new(1).with_max_waiting(2);
    q.push(owner(0, "a", 1), job(), now);
    q.push(owner(1, "b", 1), job(), now);
    assert_eq!(q.push(owner(2, "c", 1), job(), now), Pushed::Full);
}

#[test]
fn a_closed_connection_leaves_the_queue() {
    let now = Instant::now();
    let mut q = PasswordQueue::new(1);
    q.push(owner(1, "a", 1), job(), now);
    q.push(owner(2, "b", 1), job(), now);
    assert!(q.forget_conn(conn(1)));
    assert!(!q.forget_conn(conn(1)));
    assert_eq!(q.next_job(now).map(|(c, _)| c), Some(conn(2)));
    assert_eq!(q.waiting(), 0);
}

#[test]
fn records_are_bounded_and_forgotten() {
    let t0 = Instant::now();
    let mut f: Failures<u32> = Failures::new(3);
    for k in 0..10 {
        f.fail(&k, t0 + Duration::from_millis(u64::from(k)));
    }
    assert_eq!(f.len(), 3, "the oldest records went");
    assert!(f.get(&9, t0 + Duration::from_secs(1)).is_some());
    assert!(f.get(&0, t0 + Duration::from_secs(1)).is_none());
    assert_eq!(f.fail(&9, t0 + Duration::from_secs(1)), 2);
    let later = t0 + Duration::from_secs(1) + FORGET_AFTER;
    assert!(f.get(&9, later).is_none(), "forgotten after FORGET_AFTER");
    f.expire(later);
    assert_eq!(f.len(), 0);
    // A failure long after the last one starts counting again.
    assert_eq!(f.fail(&9, later), 1);
}

#[test]
fn a_crowd_from_one_address_does_not_queue_ahead_of_a_user_elsewhere() {
    let now = Instant::now();
    let mut q = PasswordQueue::new(1);
    // 500 fresh connections from one address, none failed yet, then one from another.
    for c in 0..500 {
        q.push(owner(c, &format!("v{c}"), 2), job(), now);
    }
    q.push(owner(1000, "alice", 1), job(), now);
    assert_eq!(q.next_job(now).map(|(c, _)| c), Some(conn(1000)));
    q.job_done();
    assert_eq!(q.next_job(now).map(|(c, _)| c), Some(conn(0)));
    q.job_done();
    // The counts follow the jobs out: 499 wait, all from 127.0.0.2.
    assert_eq!(q.waiting(), 499);
    assert!(q.forget_conn(conn(1)));
    assert_eq!(q.by_ip.values().sum::<usize>(), 498);
}
