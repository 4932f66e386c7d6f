//! Unit tests of the tracker-link core on a fake clock: every failover path the process-level
//! tests cover (a tracker killed, hung, down at the start, refusing, not answering the
//! connect) and the ones they cannot time (the race between trackers, backoff, giving up).

use super::*;
use crate::wire::tracker_link::{Reply, ReplyBody};

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 6000 + i as u16))
}

fn uplink(n: usize) -> Uplink {
    Uplink::new((0..n).map(addr).collect(), 77)
}

fn request(req_id: u64) -> Request {
    Request {
        req_id,
        body: RequestBody::ListGroups,
    }
}

fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
}

fn events(u: &mut Uplink) -> Vec<UplinkEvent> {
    std::iter::from_fn(|| u.poll_event()).collect()
}

/// The frames to send, with the connection each goes on.
fn sent(u: &mut Uplink) -> Vec<(LinkId, ClientMsg)> {
    std::iter::from_fn(|| u.poll_transmit()).collect()
}

/// The frames to send (all on the link).
fn transmits(u: &mut Uplink) -> Vec<ClientMsg> {
    sent(u).into_iter().map(|(_, m)| m).collect()
}

/// The single `Connect` among `evs` (other events ignored): its id and address.
fn connect_in(evs: &[UplinkEvent]) -> (LinkId, SocketAddr) {
    let connects: Vec<_> = evs
        .iter()
        .filter_map(|e| match e {
            UplinkEvent::Connect(id, a) => Some((*id, *a)),
            _ => None,
        })
        .collect();
    assert_eq!(connects.len(), 1, "one connect expected: {evs:?}");
    connects[0]
}

/// The one `Connect` the core asks for now (and nothing else but closes).
fn next_connect(u: &mut Uplink) -> (LinkId, SocketAddr) {
    let evs = events(u);
    assert!(
        evs.iter()
            .all(|e| matches!(e, UplinkEvent::Connect(..) | UplinkEvent::Close(_))),
        "{evs:?}"
    );
    connect_in(&evs)
}

fn frame(msg: &TrackerMsg) -> Vec<u8> {
    let mut out = Vec::new();
    msg.emit(&mut out);
    out.split_off(4)
}

fn welcome() -> Vec<u8> {
    frame(&TrackerMsg::Welcome {
        version: PROTOCOL_VERSION,
        tracker_no: 1,
    })
}

fn reply(req_id: u64, body: ReplyBody) -> Vec<u8> {
    frame(&TrackerMsg::Reply(Reply { req_id, body }))
}

/// Attempt `id` connects, completes its handshake (the hello goes out on it) and is
/// welcomed: it becomes the link.
fn up(u: &mut Uplink, id: LinkId, now: Instant) {
    u.handle_transport_up(id, now);
    u.handle_connected(id, now);
    assert!(sent(u).contains(&(id, ClientMsg::hello(77))));
    assert_eq!(u.handle_frame(id, &welcome(), now), None);
    let evs = events(u);
    assert!(evs.contains(&UplinkEvent::Connected), "{evs:?}");
    assert!(u.is_open());
}

/// A link connected to tracker `i` of `n` and welcomed, at `t0`.
fn open_on(n: usize, i: usize, t0: Instant) -> (Uplink, LinkId) {
    let mut u = uplink(n);
    u.index = i;
    u.send(request(1), t0);
    let (id, a) = next_connect(&mut u);
    assert_eq!(a, addr(i));
    up(&mut u, id, t0);
    (u, id)
}

/// Checks that the core never asks to be woken in the past, so the driver cannot spin.
fn assert_no_spin(u: &Uplink, now: Instant) {
    if let Some(t) = u.poll_timeout() {
        assert!(t > now, "timeout {t:?} not after {now:?}: {u:?}");
    }
}

#[test]
fn first_request_connects_to_the_first_tracker_and_goes_out_once_welcomed() {
    let t0 = Instant::now();
    let mut u = uplink(2);
    assert_eq!(u.poll_timeout(), None);
    u.send(request(1), t0);
    let (id, a) = next_connect(&mut u);
    assert_eq!(a, addr(0));
    assert!(u.is_reconnecting());
    // Dropped here: the session hands it over again once the link is up.
    assert!(transmits(&mut u).is_empty());
    // The next tracker is raced after the stagger unless this one is welcomed first.
    assert_eq!(u.poll_timeout(), Some(t0 + RACE_STAGGER));
    let t1 = t0 + ms(3);
    u.handle_transport_up(id, t1);
    u.handle_connected(id, t1);
    assert_eq!(sent(&mut u), [(id, ClientMsg::hello(77))]);
    assert_eq!(events(&mut u), [], "not the link before its welcome");
    assert!(!u.is_open());
    assert_eq!(u.handle_frame(id, &welcome(), t1), None);
    assert_eq!(events(&mut u), [UplinkEvent::Connected]);
    assert_eq!(u.tracker(), Some(addr(0)));
    u.send(request(1), t1);
    assert_eq!(sent(&mut u), [(id, ClientMsg::Request(request(1)))]);
    assert_eq!(
        u.handle_frame(id, &reply(1, ReplyBody::Done), t1),
        Some(Reply {
            req_id: 1,
            body: ReplyBody::Done
        })
    );
    // No second attempt was ever started.
    assert_eq!(u.n_opened, 1);
}

#[test]
fn first_tracker_down_the_next_one_is_used() {
    let t0 = Instant::now();
    let mut u = uplink(3);
    u.send(request(1), t0);
    let (id0, _) = next_connect(&mut u);
    u.handle_connect_failed(id0, "connection refused", t0);
    let evs = events(&mut u);
    assert_eq!(evs[0], UplinkEvent::Close(id0));
    let (id1, a1) = connect_in(&evs);
    assert_eq!(a1, addr(1));
    up(&mut u, id1, t0);
    assert_eq!(u.tracker(), Some(addr(1)));
}

/// A hung tracker's kernel accepts the connection; its process never answers the handshake.
/// The next tracker is raced after [`RACE_STAGGER`], not after a whole silence timeout.
#[test]
fn a_hung_first_tracker_costs_the_stagger_for_a_first_connection() {
    let t0 = Instant::now();
    let mut u = uplink(3);
    u.send(request(1), t0);
    let (hung, _) = next_connect(&mut u);
    u.handle_transport_up(hung, t0 + ms(1));
    assert_eq!(u.poll_timeout(), Some(t0 + RACE_STAGGER));
    u.handle_timeout(t0 + RACE_STAGGER);
    let (live, a) = next_connect(&mut u);
    assert_eq!(a, addr(1));
    assert_eq!(u.n_attempts(), 2);
    let t1 = t0 + RACE_STAGGER + ms(2);
    u.handle_transport_up(live, t1);
    u.handle_connected(live, t1);
    sent(&mut u);
    assert_eq!(u.handle_frame(live, &welcome(), t1), None);
    // The hung attempt is closed; the link is up.
    assert_eq!(
        events(&mut u),
        [UplinkEvent::Close(hung), UplinkEvent::Connected]
    );
    assert_eq!(u.tracker(), Some(addr(1)));
    assert_eq!(u.n_attempts(), 0);
    // The hung one's late events change nothing.
    u.handle_connected(hung, t1);
    assert_eq!(u.handle_frame(hung, &welcome(), t1), None);
    u.handle_closed(hung, "reset", t1);
    assert_eq!(events(&mut u), []);
    assert!(sent(&mut u).is_empty());
    assert!(u.is_open());
}

#[test]
fn a_tracker_that_never_answers_the_connect_is_given_up_after_the_timeout() {
    let t0 = Instant::now();
    let mut u = uplink(1);
    u.send(request(1), t0);
    let (id, _) = next_connect(&mut u);
    assert_eq!(u.poll_timeout(), Some(t0 + CONNECT_TIMEOUT));
    u.handle_timeout(t0 + CONNECT_TIMEOUT - ms(1));
    assert!(events(&mut u).is_empty(), "not yet");
    u.handle_timeout(t0 + CONNECT_TIMEOUT);
    assert_eq!(
        events(&mut u),
        [UplinkEvent::Close(id), UplinkEvent::Unreachable]
    );
    // A late result of that attempt is ignored.
    u.handle_connected(id, t0 + CONNECT_TIMEOUT);
    assert_eq!(sent(&mut u), []);
    assert_eq!(u.poll_timeout(), None);
}

#[test]
fn no_tracker_reachable_for_a_first_request_fails_it_and_retries_on_the_next() {
    let t0 = Instant::now();
    let mut u = uplink(2);
    u.send(request(1), t0);
    let (a, _) = next_connect(&mut u);
    u.handle_connect_failed(a, "refused", t0);
    let (b, addr_b) = next_connect(&mut u);
    assert_eq!(addr_b, addr(1));
    u.handle_connect_failed(b, "refused", t0);
    assert_eq!(
        events(&mut u),
        [UplinkEvent::Close(b), UplinkEvent::Unreachable]
    );
    assert_eq!(u.poll_timeout(), None, "idle: no spinning");
    u.send(request(2), t0);
    assert_eq!(next_connect(&mut u).1, addr(0));
}

#[test]
fn a_closed_link_moves_to_the_next_tracker_at_once() {
    let t0 = Instant::now();
    let (mut u, id) = open_on(3, 0, t0);
    let t1 = t0 + ms(100);
    u.handle_closed(id, "closed the connection", t1);
    let evs = events(&mut u);
    assert_eq!(evs[0], UplinkEvent::Close(id));
    let (next, a) = connect_in(&evs);
    assert_eq!(a, addr(1));
    // Requests made meanwhile are re-sent by the session on the new link.
    u.send(request(5), t1);
    assert!(transmits(&mut u).is_empty());
    up(&mut u, next, t1);
    assert_eq!(u.tracker(), Some(addr(1)));
}

#[test]
fn failover_wraps_around_and_starts_after_the_tracker_lost() {
    let t0 = Instant::now();
    let (mut u, id) = open_on(3, 2, t0);
    u.handle_closed(id, "reset", t0);
    let (a, addr_a) = next_connect(&mut u);
    assert_eq!(addr_a, addr(0));
    u.handle_connect_failed(a, "refused", t0);
    assert_eq!(next_connect(&mut u).1, addr(1));
}

/// The race after a hung link: the next tracker at once, the one after it a stagger later,
/// and the first to welcome wins; the other is closed, and its welcome, if it comes anyway,
/// neither makes a second link nor sends anything.
#[test]
fn the_first_of_two_welcomes_wins_and_the_loser_is_closed_and_ignored() {
    let t0 = Instant::now();
    let (mut u, id) = open_on(3, 0, t0);
    let left = t0 + TRACKER_SILENCE;
    u.handle_timeout(left);
    sent(&mut u);
    let evs = events(&mut u);
    assert_eq!(evs[0], UplinkEvent::Close(id));
    let (b, addr_b) = connect_in(&evs);
    assert_eq!(addr_b, addr(1));
    // Tracker 1 hangs after accepting: tracker 2 is raced after the stagger.
    u.handle_transport_up(b, left + ms(1));
    assert_eq!(u.poll_timeout(), Some(left + RACE_STAGGER));
    u.handle_timeout(left + RACE_STAGGER);
    let (c, addr_c) = next_connect(&mut u);
    assert_eq!(addr_c, addr(2));
    // Then the one after: the tracker lost, last.
    u.handle_timeout(left + 2 * RACE_STAGGER);
    let (d, addr_d) = next_connect(&mut u);
    assert_eq!(addr_d, addr(0));
    assert_eq!(u.n_attempts(), MAX_RACE);
    // No fourth: every tracker of the round is started.
    assert!(u.poll_timeout().unwrap() > left + 2 * RACE_STAGGER + RACE_STAGGER);
    // Both 1 and 2 complete their handshakes; 2 welcomes first.
    let t = left + 2 * RACE_STAGGER + ms(5);
    u.handle_connected(b, t);
    u.handle_transport_up(c, t);
    u.handle_connected(c, t);
    assert_eq!(
        sent(&mut u),
        [(b, ClientMsg::hello(77)), (c, ClientMsg::hello(77))]
    );
    assert_eq!(u.handle_frame(c, &welcome(), t), None);
    assert_eq!(
        events(&mut u),
        [
            UplinkEvent::Close(b),
            UplinkEvent::Close(d),
            UplinkEvent::Connected
        ]
    );
    assert_eq!(u.tracker(), Some(addr(2)));
    // The session's resume and requests go on the winner only.
    u.send(request(9), t);
    assert_eq!(sent(&mut u), [(c, ClientMsg::Request(request(9)))]);
    // The loser's welcome comes late: nothing, and no frame of its is wanted.
    assert!(!u.wants_frames(b));
    assert!(u.wants_frames(c));
    assert_eq!(u.handle_frame(b, &welcome(), t), None);
    assert_eq!(u.handle_frame(b, &reply(9, ReplyBody::Done), t), None);
    assert_eq!(events(&mut u), []);
    assert!(sent(&mut u).is_empty());
    assert_eq!(u.n_links, 2, "one link per welcome won");
}

/// Two hung trackers of three: the live one is reached a stagger after the link was left,
/// whatever the order.
#[test]
fn two_hung_trackers_cost_the_stagger_not_a_silence() {
    let t0 = Instant::now();
    let (mut u, id) = open_on(3, 0, t0);
    let left = t0 + TRACKER_SILENCE;
    u.handle_timeout(left);
    sent(&mut u);
    let evs = events(&mut u);
    assert_eq!(evs[0], UplinkEvent::Close(id));
    let (hung, _) = connect_in(&evs);
    u.handle_transport_up(hung, left);
    let (live, now) = loop {
        let now = u.poll_timeout().unwrap();
        u.handle_timeout(now);
        if let Some(UplinkEvent::Connect(id, a)) = events(&mut u).first() {
            assert_eq!(*a, addr(2));
            break (*id, now);
        }
    };
    assert_eq!(now, left + RACE_STAGGER);
    up(&mut u, live, now + ms(1));
    assert_eq!(u.tracker(), Some(addr(2)));
}

#[test]
fn all_candidates_hung_end_the_round_and_back_off_as_before() {
    let t0 = Instant::now();
    let (mut u, id) = open_on(3, 0, t0);
    u.handle_closed(id, "reset", t0);
    let mut now = t0;
    let mut ids = Vec::new();
    // Every tracker accepts and never completes the handshake.
    let unreachable_at = loop {
        let evs = events(&mut u);
        if evs.contains(&UplinkEvent::Unreachable) {
            break now;
        }
        for e in evs {
            if let UplinkEvent::Connect(id, _) = e {
                u.handle_transport_up(id, now);
                ids.push(id);
            }
        }
        assert!(u.n_attempts() <= MAX_RACE);
        assert_no_spin(&u, now);
        now = u.poll_timeout().unwrap();
        u.handle_timeout(now);
    };
    assert_eq!(ids.len(), 3, "each tracker once in the round");
    // The last attempt started 2 staggers in, and had the silence for its handshake.
    assert_eq!(unreachable_at, t0 + 2 * RACE_STAGGER + TRACKER_SILENCE);
    // The second round starts at once (no backoff before the first retry).
    assert!(u.is_reconnecting());
    assert_eq!(u.n_attempts(), 1);
    assert!(u.unreachable);
}

#[test]
fn rounds_back_off_exponentially_from_zero_to_a_second_then_the_session_is_lost() {
    let t0 = Instant::now();
    let (mut u, id) = open_on(2, 0, t0);
    u.handle_closed(id, "reset", t0);
    let mut now = t0;
    let mut pauses = Vec::new();
    let mut n_connects = 0;
    let mut n_unreachable = 0;
    'run: loop {
        while let Some(ev) = u.poll_event() {
            match ev {
                UplinkEvent::SessionLost => break 'run,
                UplinkEvent::Unreachable => n_unreachable += 1,
                UplinkEvent::Close(_) => {}
                UplinkEvent::Connect(id, _) => {
                    n_connects += 1;
                    // Every tracker refuses at once.
                    u.handle_connect_failed(id, "refused", now);
                }
                UplinkEvent::Connected => panic!("nobody welcomed"),
            }
        }
        assert_no_spin(&u, now);
        if let Some(t) = u.poll_timeout() {
            pauses.push(t - now);
            now = t;
            u.handle_timeout(now);
        }
        assert!(
            now < t0 + RECONNECT_FOR + Duration::from_secs(10),
            "bounded"
        );
    }
    assert_eq!(
        pauses[..7],
        [
            ms(50),
            ms(100),
            ms(200),
            ms(400),
            ms(800),
            ms(1000),
            ms(1000)
        ]
    );
    assert!(pauses[6..].iter().all(|&p| p == BACKOFF_MAX));
    assert!(now >= t0 + RECONNECT_FOR && now < t0 + RECONNECT_FOR + BACKOFF_MAX);
    // About one round (of both trackers) a second once the backoff is at its cap.
    let bound = 2 * (RECONNECT_FOR.as_secs() + 10);
    assert!(
        n_connects < bound,
        "{n_connects} attempts in {RECONNECT_FOR:?}: no spinning"
    );
    assert_eq!(u.poll_timeout(), None);
    assert!(!u.is_open() && !u.is_reconnecting());
    assert_eq!(
        n_unreachable, 1,
        "the command in flight fails once, after the first round"
    );
}

#[test]
fn after_a_failed_round_commands_fail_at_once_and_the_link_keeps_trying() {
    let t0 = Instant::now();
    let (mut u, id) = open_on(2, 0, t0);
    u.handle_closed(id, "reset", t0);
    // The first round: both refuse.
    for _ in 0..2 {
        let (id, _) = next_connect(&mut u);
        u.handle_connect_failed(id, "refused", t0);
    }
    let evs = events(&mut u);
    assert!(evs.contains(&UplinkEvent::Unreachable), "{evs:?}");
    // The second round starts at once; it fails too.
    let (id, _) = connect_in(&evs);
    u.handle_connect_failed(id, "refused", t0);
    let (id, _) = next_connect(&mut u);
    u.handle_connect_failed(id, "refused", t0);
    assert!(events(&mut u)
        .iter()
        .all(|e| matches!(e, UplinkEvent::Close(_))));
    // A command now fails at once, not after its timeout.
    u.send(request(7), t0);
    assert_eq!(events(&mut u), [UplinkEvent::Unreachable]);
    assert!(u.is_reconnecting());
    // A tracker comes back: the next round (after a pause) finds it, and commands go out.
    let now = u.poll_timeout().expect("a timer");
    assert!(now - t0 <= BACKOFF_MAX);
    u.handle_timeout(now);
    let (id, _) = next_connect(&mut u);
    up(&mut u, id, now);
    sent(&mut u);
    u.send(request(8), now);
    assert_eq!(transmits(&mut u), [ClientMsg::Request(request(8))]);
}

#[test]
fn a_tracker_back_during_the_backoff_is_found_within_a_second() {
    let t0 = Instant::now();
    let (mut u, id) = open_on(2, 0, t0);
    u.handle_closed(id, "reset", t0);
    let mut now = t0;
    // Both refuse for 3 s.
    while now < t0 + Duration::from_secs(3) {
        while let Some(ev) = u.poll_event() {
            if let UplinkEvent::Connect(id, _) = ev {
                u.handle_connect_failed(id, "refused", now);
            }
        }
        now = u.poll_timeout().expect("a timer");
        u.handle_timeout(now);
    }
    let back = now;
    // The next attempt comes within the capped backoff, and it connects.
    let (at, id) = loop {
        let evs = events(&mut u);
        if let Some(UplinkEvent::Connect(id, _)) = evs.first() {
            break (now, *id);
        }
        now = u.poll_timeout().expect("a timer");
        u.handle_timeout(now);
    };
    assert!(at - back <= BACKOFF_MAX);
    up(&mut u, id, now);
}

#[test]
fn a_quiet_link_is_pinged_and_a_silent_tracker_left() {
    let t0 = Instant::now();
    let (mut u, id) = open_on(2, 0, t0);
    sent(&mut u);
    assert_eq!(u.poll_timeout(), Some(t0 + PING_AFTER));
    u.handle_timeout(t0 + PING_AFTER);
    let pings = sent(&mut u);
    assert!(matches!(
        pings[..],
        [(
            to,
            ClientMsg::Request(Request {
                body: RequestBody::Ping,
                ..
            })
        )] if to == id
    ));
    let ClientMsg::Request(Request {
        req_id: ping_id, ..
    }) = pings[0].1
    else {
        unreachable!()
    };
    assert!(ping_id > u64::MAX - PING_IDS);
    assert_eq!(u.poll_timeout(), Some(t0 + 2 * PING_AFTER));
    // The pong is the link's own business; hearing it resets the silence.
    let t1 = t0 + PING_AFTER + ms(5);
    assert_eq!(
        u.handle_frame(id, &reply(ping_id, ReplyBody::Pong), t1),
        None
    );
    assert_eq!(u.poll_timeout(), Some(t1 + PING_AFTER));
    // Now the tracker hangs: pings every ping interval, and after the silence the link is left.
    let mut n_pings = 0;
    let now = loop {
        let now = u.poll_timeout().unwrap();
        u.handle_timeout(now);
        n_pings += transmits(&mut u).len();
        let evs = events(&mut u);
        if !evs.is_empty() {
            assert_eq!(evs[0], UplinkEvent::Close(id));
            assert_eq!(connect_in(&evs).1, addr(1));
            break now;
        }
    };
    assert_eq!(now, t1 + TRACKER_SILENCE);
    assert_eq!(
        n_pings as u32,
        TRACKER_SILENCE.div_duration_f64(PING_AFTER) as u32 - 1
    );
}

/// The silence less the ping interval is the tracker's own stall limit: a tracker stalled
/// just under it, whenever the stall began, is kept.
#[test]
fn a_tracker_stalled_under_its_own_stall_limit_is_kept() {
    let stall = crate::tracker::replica::STALL_LIMIT;
    assert_eq!(TRACKER_SILENCE - PING_AFTER, stall);
    // The worst moment: the stall begins just before the ping arrives.
    let t0 = Instant::now();
    let (mut u, id) = open_on(2, 0, t0);
    sent(&mut u);
    u.handle_timeout(t0 + PING_AFTER);
    let ClientMsg::Request(Request { req_id, .. }) = transmits(&mut u)[0] else {
        unreachable!()
    };
    let answered = t0 + PING_AFTER + stall - ms(1);
    while u.poll_timeout().unwrap() < answered {
        let t = u.poll_timeout().unwrap();
        u.handle_timeout(t);
        transmits(&mut u);
    }
    assert_eq!(
        u.handle_frame(id, &reply(req_id, ReplyBody::Pong), answered),
        None
    );
    assert_eq!(events(&mut u), []);
    assert!(u.is_open());
}

#[test]
fn a_tracker_that_holds_its_welcome_too_long_is_left() {
    // A tracker still copying the state holds the welcome; the next is raced meanwhile, and
    // the attempt ends after the silence.
    let t0 = Instant::now();
    let mut u = uplink(1);
    u.send(request(1), t0);
    let (id, _) = next_connect(&mut u);
    u.handle_transport_up(id, t0);
    u.handle_connected(id, t0);
    u.handle_timeout(t0 + TRACKER_SILENCE - ms(1));
    assert_eq!(events(&mut u), []);
    u.handle_timeout(t0 + TRACKER_SILENCE);
    assert_eq!(
        events(&mut u),
        [UplinkEvent::Close(id), UplinkEvent::Unreachable]
    );
}

#[test]
fn protocol_errors_break_the_link() {
    let t0 = Instant::now();
    // Another version: that attempt fails and the next tracker is tried.
    let mut u = uplink(2);
    u.send(request(1), t0);
    let (id, _) = next_connect(&mut u);
    u.handle_connected(id, t0);
    let old = frame(&TrackerMsg::Welcome {
        version: PROTOCOL_VERSION + 1,
        tracker_no: 1,
    });
    assert_eq!(u.handle_frame(id, &old, t0), None);
    let evs = events(&mut u);
    assert_eq!(evs[0], UplinkEvent::Close(id));
    let (id, a) = connect_in(&evs);
    assert_eq!(a, addr(1));
    // A reply before the welcome: that one fails too, and the round with it.
    u.handle_connected(id, t0);
    assert_eq!(u.handle_frame(id, &reply(1, ReplyBody::Done), t0), None);
    assert_eq!(
        events(&mut u),
        [UplinkEvent::Close(id), UplinkEvent::Unreachable]
    );
    // Garbage, and a second welcome, on a link.
    let (mut u, id) = open_on(2, 0, t0);
    assert_eq!(u.handle_frame(id, &[0xee, 1, 2], t0), None);
    assert_eq!(next_connect(&mut u).1, addr(1));
    let (mut u, id) = open_on(2, 0, t0);
    assert_eq!(u.handle_frame(id, &welcome(), t0), None);
    assert_eq!(next_connect(&mut u).1, addr(1));
}

#[test]
fn links_that_keep_breaking_before_the_welcome_lose_the_session() {
    let t0 = Instant::now();
    let (mut u, id) = open_on(2, 0, t0);
    u.handle_closed(id, "reset", t0);
    let mut lost = false;
    for _ in 0..5 {
        let evs = events(&mut u);
        if evs.contains(&UplinkEvent::SessionLost) {
            lost = true;
            break;
        }
        let (id, _) = connect_in(&evs);
        u.handle_connected(id, t0);
        u.handle_closed(id, "closed the connection", t0);
    }
    assert!(lost || events(&mut u).contains(&UplinkEvent::SessionLost));
    assert_eq!(u.poll_timeout(), None);
    // A welcomed link resets the count.
    let (mut u, id) = open_on(2, 0, t0);
    u.handle_closed(id, "reset", t0);
    let mut lost = false;
    for i in 0..5 {
        let evs = events(&mut u);
        lost |= evs.contains(&UplinkEvent::SessionLost);
        let (id, _) = connect_in(&evs);
        u.handle_connected(id, t0);
        if i == 2 {
            u.handle_frame(id, &welcome(), t0);
            events(&mut u);
            u.handle_closed(id, "reset", t0);
        } else {
            u.handle_closed(id, "reset", t0);
        }
    }
    assert!(!lost && !events(&mut u).contains(&UplinkEvent::SessionLost));
}

#[test]
fn after_the_session_is_lost_a_new_request_connects_again() {
    let t0 = Instant::now();
    let (mut u, id) = open_on(1, 0, t0);
    u.handle_closed(id, "reset", t0);
    let mut now = t0;
    loop {
        let evs = events(&mut u);
        if evs.contains(&UplinkEvent::SessionLost) {
            break;
        }
        for e in evs {
            if let UplinkEvent::Connect(id, _) = e {
                u.handle_connect_failed(id, "refused", now);
            }
        }
        if let Some(t) = u.poll_timeout() {
            now = t;
            u.handle_timeout(now);
        }
    }
    u.send(request(2), now);
    assert_eq!(next_connect(&mut u).1, addr(0));
}

#[test]
fn backoff_is_zero_then_doubles_to_the_cap() {
    assert_eq!(backoff(0), Duration::ZERO);
    assert_eq!(backoff(1), BACKOFF_FIRST);
    assert_eq!(backoff(2), BACKOFF_FIRST * 2);
    assert_eq!(backoff(40), BACKOFF_MAX);
    assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
}

/// Random calls, on live and dead connection ids alike: the core never spins, never panics,
/// never holds more than [`MAX_RACE`] attempts, asks to close every connection it opened at
/// most once, and emits `Connected` once per link, always on a connection that it opened,
/// did not close, and that said hello.
#[test]
fn random_event_sequences_never_spin_or_panic() {
    let mut rng = crate::rng::SplitMix64::new(10);
    for _ in 0..300 {
        let n = rng.between(1, 4);
        let t0 = Instant::now();
        let mut now = t0;
        let mut u = uplink(n);
        let mut opened: Vec<LinkId> = Vec::new();
        let mut closed = std::collections::BTreeSet::new();
        let mut helloed = std::collections::BTreeSet::new();
        for _ in 0..300 {
            let id = if opened.is_empty() {
                LinkId(1)
            } else {
                opened[rng.between(0, opened.len() - 1)]
            };
            match rng.between(0, 10) {
                0 => u.send(request(rng.between(1, 100) as u64), now),
                1 => u.handle_transport_up(id, now),
                2 => u.handle_connected(id, now),
                3 => u.handle_connect_failed(id, "refused", now),
                4 => u.handle_closed(id, "reset", now),
                5 => {
                    u.handle_frame(id, &welcome(), now);
                }
                6 => {
                    u.handle_frame(id, &reply(3, ReplyBody::Done), now);
                }
                7 => u.handle_refused(id, "wrong key", now),
                _ => {
                    if let Some(t) = u.poll_timeout() {
                        now = t;
                        u.handle_timeout(now);
                    }
                }
            }
            for (to, msg) in sent(&mut u) {
                assert!(!closed.contains(&to), "frame for closed {to:?}");
                if msg == ClientMsg::hello(77) {
                    helloed.insert(to);
                }
            }
            for e in events(&mut u) {
                match e {
                    UplinkEvent::Connect(id, _) => {
                        assert!(!opened.contains(&id));
                        opened.push(id);
                    }
                    UplinkEvent::Close(id) => {
                        assert!(opened.contains(&id));
                        assert!(closed.insert(id), "{id:?} closed twice");
                    }
                    UplinkEvent::Connected => {
                        let State::Open { id, .. } = u.state else {
                            panic!("connected but not open")
                        };
                        assert!(helloed.contains(&id) && !closed.contains(&id));
                    }
                    _ => {}
                }
            }
            assert!(u.n_attempts() <= MAX_RACE);
            assert_no_spin(&u, now);
        }
    }
}

#[test]
fn links_left_for_silence_in_a_row_get_more_time_until_a_reply() {
    // One tracker, slow rather than hung: it welcomes at once but never answers in time.
    let t0 = Instant::now();
    let (mut u, mut id) = open_on(1, 0, t0);
    let mut now = t0;
    let mut silences = Vec::new();
    for _ in 0..5 {
        let opened = now;
        let evs = loop {
            now = u.poll_timeout().unwrap();
            u.handle_timeout(now);
            transmits(&mut u);
            let evs = events(&mut u);
            if !evs.is_empty() {
                break evs;
            }
        };
        silences.push(now - opened);
        id = connect_in(&evs).0;
        up(&mut u, id, now);
    }
    let s = TRACKER_SILENCE;
    assert_eq!(silences, [s, 2 * s, 4 * s, 8 * s, 8 * s]);
    // A reply: the next silence is the short one again.
    u.handle_frame(id, &reply(1, ReplyBody::Done), now);
    let opened = now;
    loop {
        now = u.poll_timeout().unwrap();
        u.handle_timeout(now);
        if !events(&mut u).is_empty() {
            break;
        }
    }
    assert_eq!(now - opened, s);
}

#[test]
fn a_connected_socket_gets_the_silence_timeout_for_its_handshake() {
    let t0 = Instant::now();
    let mut u = uplink(1);
    u.send(request(1), t0);
    let (id, _) = next_connect(&mut u);
    assert_eq!(u.poll_timeout(), Some(t0 + CONNECT_TIMEOUT));
    let t1 = t0 + ms(100);
    u.handle_transport_up(id, t1);
    assert_eq!(u.poll_timeout(), Some(t1 + TRACKER_SILENCE));
    // Past the connect timeout, the handshake still has time.
    u.handle_timeout(t0 + CONNECT_TIMEOUT + ms(1));
    assert_eq!(events(&mut u), []);
    // Past the silence, the round (of one) ends.
    u.handle_timeout(t1 + TRACKER_SILENCE);
    assert_eq!(
        events(&mut u),
        [UplinkEvent::Close(id), UplinkEvent::Unreachable]
    );
}

/// Every login and resume carries the number of the link it goes out on: 1 for the first
/// link, one more for each link after, and a request handed over again on a new link (the
/// same request id) carries the new number. The trackers order a client's links by it;
/// attempts that lost a race are no links.
#[test]
fn logins_and_resumes_carry_the_number_of_their_link() {
    let t0 = Instant::now();
    let login = |req_id| Request {
        req_id,
        body: RequestBody::Login {
            user: crate::testing::uid("al"),
            password: crate::wire::Password::new(b"pw").unwrap(),
            peer_addr: addr(9),
            shares: Vec::new(),
            client_key: [0; 32],
            link: 0,
        },
    };
    let link_of = |msg: &ClientMsg| match msg {
        ClientMsg::Request(Request {
            body: RequestBody::Login { link, .. } | RequestBody::Resume { link, .. },
            ..
        }) => Some(*link),
        _ => None,
    };
    let (mut u, id) = open_on(3, 0, t0);
    sent(&mut u);
    u.send(login(5), t0);
    u.send(request(6), t0);
    let out = transmits(&mut u);
    assert_eq!(
        out.iter().map(link_of).collect::<Vec<_>>(),
        [Some(1), None],
        "{out:?}"
    );
    // The link breaks; two attempts race (the first hangs), the second wins; on it the same
    // login goes out again, with a resume.
    u.handle_closed(id, "reset", t0);
    let (hung, _) = next_connect(&mut u);
    u.handle_timeout(t0 + RACE_STAGGER);
    let (live, _) = next_connect(&mut u);
    u.handle_transport_up(hung, t0 + RACE_STAGGER);
    up(&mut u, live, t0 + RACE_STAGGER);
    u.send(
        Request {
            req_id: 7,
            body: RequestBody::Resume {
                token: [1; 16],
                link: 0,
            },
        },
        t0,
    );
    u.send(login(5), t0);
    let out = sent(&mut u);
    assert!(out.iter().all(|(to, _)| *to == live));
    assert_eq!(
        out.iter().map(|(_, m)| link_of(m)).collect::<Vec<_>>(),
        [Some(2), Some(2)],
        "both with the second link's number: {out:?}"
    );
}

#[test]
fn a_key_mismatch_fails_a_first_connection_at_once_without_trying_the_others() {
    let t0 = Instant::now();
    let mut u = uplink(3);
    u.send(request(1), t0);
    let (id, _) = next_connect(&mut u);
    u.handle_transport_up(id, t0);
    u.handle_refused(id, "tracker 127.0.0.1:6000 refused: ...", t0);
    // No first-use trust of the next tracker: the command fails, naming the refusal.
    assert_eq!(
        events(&mut u),
        [UplinkEvent::Close(id), UplinkEvent::Unreachable]
    );
    assert_eq!(u.tracker(), None);
    assert_eq!(u.poll_timeout(), None);
    // The next command tries again (and is refused again while the key is wrong).
    u.send(request(2), t0);
    assert_eq!(next_connect(&mut u).1, addr(0));
}

/// A mismatch on any attempt of a race for a first connection fails the command and closes
/// every attempt, even one whose handshake completed (it is never welcomed into a link).
#[test]
fn a_key_mismatch_on_a_raced_attempt_fails_a_first_connection_and_closes_all() {
    let t0 = Instant::now();
    let mut u = uplink(3);
    u.send(request(1), t0);
    let (a, _) = next_connect(&mut u);
    u.handle_transport_up(a, t0);
    u.handle_timeout(t0 + RACE_STAGGER);
    let (b, _) = next_connect(&mut u);
    u.handle_connected(a, t0 + RACE_STAGGER);
    sent(&mut u);
    u.handle_refused(b, "tracker 127.0.0.1:6001 refused: ...", t0 + RACE_STAGGER);
    let evs = events(&mut u);
    assert!(evs.contains(&UplinkEvent::Close(a)) && evs.contains(&UplinkEvent::Close(b)));
    assert_eq!(evs.last(), Some(&UplinkEvent::Unreachable));
    // A's welcome comes anyway: ignored.
    assert_eq!(u.handle_frame(a, &welcome(), t0 + RACE_STAGGER), None);
    assert_eq!(events(&mut u), []);
    assert!(!u.is_open());
    assert_eq!(u.poll_timeout(), None);
}

#[test]
fn a_key_mismatch_while_failing_over_tries_the_next_tracker() {
    let t0 = Instant::now();
    let (mut u, id) = open_on(3, 0, t0);
    u.handle_closed(id, "closed the connection", t0);
    let (next, a) = next_connect(&mut u);
    assert_eq!(a, addr(1));
    u.handle_transport_up(next, t0);
    u.handle_refused(next, "refused", t0);
    // The session is kept; the next must present the expected key too (the driver checks).
    assert_eq!(next_connect(&mut u).1, addr(2));
}

/// The session's give-up still holds with racing: trackers that all hang keep failing their
/// rounds until [`RECONNECT_FOR`], then the session is lost, with never more than
/// [`MAX_RACE`] connections at once.
#[test]
fn hung_trackers_are_raced_until_the_session_is_given_up() {
    let t0 = Instant::now();
    let (mut u, id) = open_on(3, 0, t0);
    u.handle_timeout(t0 + TRACKER_SILENCE);
    let mut now = t0 + TRACKER_SILENCE;
    let mut open = std::collections::BTreeSet::new();
    open.insert(id);
    let mut most = 0;
    loop {
        let evs = events(&mut u);
        for e in &evs {
            match *e {
                UplinkEvent::Connect(id, _) => {
                    open.insert(id);
                    u.handle_transport_up(id, now);
                }
                UplinkEvent::Close(id) => {
                    assert!(open.remove(&id));
                }
                _ => {}
            }
        }
        if evs.contains(&UplinkEvent::SessionLost) {
            break;
        }
        most = most.max(open.len());
        transmits(&mut u);
        assert_no_spin(&u, now);
        now = u.poll_timeout().unwrap();
        u.handle_timeout(now);
    }
    assert!(open.is_empty(), "every connection closed: {open:?}");
    assert!(most <= MAX_RACE);
    assert!(now >= t0 + TRACKER_SILENCE + RECONNECT_FOR);
    assert!(now < t0 + TRACKER_SILENCE + RECONNECT_FOR + 2 * BACKOFF_MAX + 2 * TRACKER_SILENCE);
}

/// A process stopped for a few seconds (SIGSTOP, swapped out) comes back to a link whose
/// tracker it has not heard for longer than the silence: that is its own absence, not the
/// tracker's silence, so it pings rather than leaving a live tracker. A tracker that then
/// stays silent is still left once silent for the silence while this process was there.
#[test]
fn a_client_that_was_away_pings_its_tracker_instead_of_leaving_it() {
    let t0 = Instant::now();
    let (mut u, id) = open_on(3, 0, t0);
    sent(&mut u);
    u.handle_timeout(t0 + PING_AFTER);
    assert!(matches!(
        transmits(&mut u)[..],
        [ClientMsg::Request(Request {
            body: RequestBody::Ping,
            ..
        })]
    ));
    // Stopped for 5 s: the loop turns long after it asked to.
    let back = t0 + Duration::from_secs(5);
    u.handle_timeout(back);
    assert_eq!(events(&mut u), []);
    assert_eq!(u.tracker(), Some(addr(0)));
    let pings = transmits(&mut u);
    assert!(
        matches!(
            pings[..],
            [ClientMsg::Request(Request {
                body: RequestBody::Ping,
                ..
            })]
        ),
        "{pings:?}"
    );
    assert_no_spin(&u, back);
    // The tracker answers: kept.
    let ClientMsg::Request(Request { req_id, .. }) = pings[0] else {
        unreachable!()
    };
    assert_eq!(
        u.handle_frame(id, &reply(req_id, ReplyBody::Pong), back),
        None
    );
    assert!(u.is_open());

    // A tracker silent from then on is left after the silence, as without the stop.
    let mut now = back;
    loop {
        let next = u.poll_timeout().expect("a timer");
        assert!(next > now);
        now = next;
        u.handle_timeout(now);
        transmits(&mut u);
        if !events(&mut u).is_empty() {
            break;
        }
    }
    assert_eq!(now, back + TRACKER_SILENCE, "left as without the stop");

    // Stopped again, and this time the tracker is hung: it is left once silent for the
    // silence while this process was there, and no later.
    let (mut u, id) = open_on(3, 0, t0);
    sent(&mut u);
    u.handle_timeout(t0 + PING_AFTER);
    transmits(&mut u);
    let back = t0 + Duration::from_secs(5);
    u.handle_timeout(back);
    assert_eq!(events(&mut u), []);
    transmits(&mut u);
    let left = loop {
        let now = u.poll_timeout().expect("a timer");
        u.handle_timeout(now);
        transmits(&mut u);
        let ev = events(&mut u);
        if !ev.is_empty() {
            assert_eq!(ev[0], UplinkEvent::Close(id));
            assert_eq!(connect_in(&ev).1, addr(1));
            break now;
        }
    };
    // Heard at t0; 2 ping intervals of silence counted before the stop (t0 .. the turn
    // asked at t0 + 2 x the ping interval), so the rest after coming back.
    assert_eq!(left, back + (TRACKER_SILENCE - PING_AFTER * 2));
}

/// A connect whose timer was due while this process was away gets its time back, and so
/// does the race's stagger.
#[test]
fn a_connect_timer_does_not_run_while_the_client_was_away() {
    let t0 = Instant::now();
    let mut u = uplink(2);
    u.send(request(1), t0);
    let (id, _) = next_connect(&mut u);
    u.handle_timeout(t0);
    let back = t0 + Duration::from_secs(4);
    u.handle_timeout(back);
    assert_eq!(events(&mut u), []);
    assert_eq!(u.poll_timeout(), Some(back + RACE_STAGGER));
    u.handle_timeout(back + RACE_STAGGER);
    let (second, a) = next_connect(&mut u);
    assert_eq!(a, addr(1));
    u.handle_timeout(back + CONNECT_TIMEOUT);
    assert_eq!(events(&mut u), [UplinkEvent::Close(id)]);
    u.handle_timeout(back + RACE_STAGGER + CONNECT_TIMEOUT);
    assert_eq!(
        events(&mut u),
        [UplinkEvent::Close(second), UplinkEvent::Unreachable]
    );
}

/// Every tracker of the file up but holding its welcome (restarted and waiting for the
/// tracker with the newest state, or copying the state): each attempt completes its handshake
/// and times out waiting for the welcome. That is a service not serving yet, not links that
/// break: the session is kept, as for hung trackers, until [`RECONNECT_FOR`]. (Counting each
/// timed-out attempt as a broken link gave the session up after two rounds of three raced
/// attempts, 3.6 s, where the trackers are meant to be given two minutes to come back.)
#[test]
fn trackers_holding_their_welcome_keep_the_session_until_the_reconnect_limit() {
    let t0 = Instant::now();
    let (mut u, id) = open_on(3, 0, t0);
    u.handle_closed(id, "reset", t0);
    let mut now = t0;
    let mut hellos = 0;
    loop {
        let evs = events(&mut u);
        if evs.contains(&UplinkEvent::SessionLost) {
            break;
        }
        for e in evs {
            if let UplinkEvent::Connect(id, _) = e {
                u.handle_transport_up(id, now);
                u.handle_connected(id, now);
            }
        }
        hellos += sent(&mut u)
            .iter()
            .filter(|(_, m)| *m == ClientMsg::hello(77))
            .count();
        assert_no_spin(&u, now);
        now = u.poll_timeout().unwrap();
        u.handle_timeout(now);
    }
    assert!(
        now >= t0 + RECONNECT_FOR,
        "the session was given up after {:?} ({hellos} hellos sent)",
        now - t0
    );
    assert!(hellos > 2 * 3, "every attempt sent its hello: {hellos}");
}
