//! Unit tests of the tracker-link core on a fake clock: every failover path the process-level
//! tests cover (a tracker killed, hung, down at the start, refusing, not answering the
//! connect) and the ones they cannot time (backoff, giving up).

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

fn events(u: &mut Uplink) -> Vec<UplinkEvent> {
    std::iter::from_fn(|| u.poll_event()).collect()
}

fn transmits(u: &mut Uplink) -> Vec<ClientMsg> {
    std::iter::from_fn(|| u.poll_transmit()).collect()
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

/// A link connected to tracker `i` of `n` and welcomed, at `t0`.
fn open_on(n: usize, i: usize, t0: Instant) -> Uplink {
    let mut u = uplink(n);
    u.index = i;
    u.send(request(1), t0);
    assert_eq!(events(&mut u), [UplinkEvent::Connect(addr(i))]);
    u.handle_connected(t0);
    assert_eq!(events(&mut u), [UplinkEvent::Connected]);
    assert_eq!(transmits(&mut u), [ClientMsg::hello(77)]);
    assert_eq!(u.handle_frame(&welcome(), t0), None);
    u
}

/// Checks that the core never asks to be woken in the past, so the driver cannot spin.
fn assert_no_spin(u: &Uplink, now: Instant) {
    if let Some(t) = u.poll_timeout() {
        assert!(t > now, "timeout {t:?} not after {now:?}: {u:?}");
    }
}

#[test]
fn first_request_connects_to_the_first_tracker_and_goes_out_with_the_others() {
    let t0 = Instant::now();
    let mut u = uplink(2);
    assert_eq!(u.poll_timeout(), None);
    u.send(request(1), t0);
    assert_eq!(events(&mut u), [UplinkEvent::Connect(addr(0))]);
    assert!(u.is_reconnecting());
    // Dropped here: the session hands it over again once the link is up.
    assert!(transmits(&mut u).is_empty());
    assert_eq!(u.poll_timeout(), Some(t0 + CONNECT_TIMEOUT));
    let t1 = t0 + Duration::from_millis(3);
    u.handle_connected(t1);
    assert_eq!(events(&mut u), [UplinkEvent::Connected]);
    assert_eq!(transmits(&mut u), [ClientMsg::hello(77)]);
    assert_eq!(u.tracker(), Some(addr(0)));
    u.send(request(1), t1);
    assert_eq!(transmits(&mut u), [ClientMsg::Request(request(1))]);
    assert_eq!(u.handle_frame(&welcome(), t1), None);
    assert_eq!(
        u.handle_frame(&reply(1, ReplyBody::Done), t1),
        Some(Reply {
            req_id: 1,
            body: ReplyBody::Done
        })
    );
    u.send(request(2), t1);
    assert_eq!(transmits(&mut u), [ClientMsg::Request(request(2))]);
}

#[test]
fn first_tracker_down_the_next_one_is_used() {
    let t0 = Instant::now();
    let mut u = uplink(3);
    u.send(request(1), t0);
    assert_eq!(events(&mut u), [UplinkEvent::Connect(addr(0))]);
    u.handle_connect_failed("connection refused", t0);
    assert_eq!(events(&mut u), [UplinkEvent::Connect(addr(1))]);
    u.handle_connected(t0);
    assert_eq!(events(&mut u), [UplinkEvent::Connected]);
    assert_eq!(u.tracker(), Some(addr(1)));
}

#[test]
fn a_tracker_that_never_answers_the_connect_is_passed_after_the_timeout() {
    let t0 = Instant::now();
    let mut u = uplink(2);
    u.send(request(1), t0);
    assert_eq!(events(&mut u), [UplinkEvent::Connect(addr(0))]);
    u.handle_timeout(t0 + CONNECT_TIMEOUT - Duration::from_millis(1));
    assert!(events(&mut u).is_empty(), "not yet");
    u.handle_timeout(t0 + CONNECT_TIMEOUT);
    assert_eq!(
        events(&mut u),
        [UplinkEvent::Close, UplinkEvent::Connect(addr(1))]
    );
    assert_eq!(u.poll_timeout(), Some(t0 + 2 * CONNECT_TIMEOUT));
    // A late result of the first attempt is not confused with the second's.
    u.handle_connected(t0 + CONNECT_TIMEOUT);
    assert_eq!(u.tracker(), Some(addr(1)));
}

#[test]
fn no_tracker_reachable_for_a_first_request_fails_it_and_retries_on_the_next() {
    let t0 = Instant::now();
    let mut u = uplink(2);
    u.send(request(1), t0);
    u.handle_connect_failed("refused", t0);
    u.handle_connect_failed("refused", t0);
    assert_eq!(
        events(&mut u),
        [
            UplinkEvent::Connect(addr(0)),
            UplinkEvent::Connect(addr(1)),
            UplinkEvent::Unreachable
        ]
    );
    assert_eq!(u.poll_timeout(), None, "idle: no spinning");
    u.send(request(2), t0);
    assert_eq!(events(&mut u), [UplinkEvent::Connect(addr(0))]);
}

#[test]
fn a_closed_link_moves_to_the_next_tracker_at_once() {
    let t0 = Instant::now();
    let mut u = open_on(3, 0, t0);
    let t1 = t0 + Duration::from_millis(100);
    u.handle_closed("closed the connection", t1);
    assert_eq!(events(&mut u), [UplinkEvent::Connect(addr(1))]);
    // Requests made meanwhile are re-sent by the session on the new link.
    u.send(request(5), t1);
    assert!(transmits(&mut u).is_empty());
    u.handle_connected(t1);
    assert_eq!(events(&mut u), [UplinkEvent::Connected]);
    assert_eq!(transmits(&mut u), [ClientMsg::hello(77)]);
    assert_eq!(u.tracker(), Some(addr(1)));
}

#[test]
fn failover_wraps_around_and_starts_after_the_tracker_lost() {
    let t0 = Instant::now();
    let mut u = open_on(3, 2, t0);
    u.handle_closed("reset", t0);
    u.handle_connect_failed("refused", t0);
    assert_eq!(
        events(&mut u),
        [UplinkEvent::Connect(addr(0)), UplinkEvent::Connect(addr(1))]
    );
}

#[test]
fn rounds_back_off_exponentially_from_zero_to_a_second_then_the_session_is_lost() {
    let t0 = Instant::now();
    let mut u = open_on(2, 0, t0);
    u.handle_closed("reset", t0);
    let mut now = t0;
    let mut pauses = Vec::new();
    let mut n_connects = 0;
    let mut n_unreachable = 0;
    'run: loop {
        while let Some(ev) = u.poll_event() {
            if ev == UplinkEvent::SessionLost {
                break 'run;
            }
            if ev == UplinkEvent::Unreachable {
                n_unreachable += 1;
                continue;
            }
            assert!(matches!(ev, UplinkEvent::Connect(_)), "{ev:?}");
            n_connects += 1;
            // Every tracker refuses at once.
            u.handle_connect_failed("refused", now);
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
    let ms = |m| Duration::from_millis(m);
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
    let mut u = open_on(2, 0, t0);
    u.handle_closed("reset", t0);
    // The first round: both refuse.
    for _ in 0..2 {
        let evs = events(&mut u);
        assert!(
            matches!(evs.as_slice(), [UplinkEvent::Connect(_)]),
            "{evs:?}"
        );
        u.handle_connect_failed("refused", t0);
    }
    let evs = events(&mut u);
    assert_eq!(evs[0], UplinkEvent::Unreachable, "{evs:?}");
    // The second round starts at once; it fails too.
    assert!(matches!(evs[1..], [UplinkEvent::Connect(_)]), "{evs:?}");
    u.handle_connect_failed("refused", t0);
    assert!(matches!(
        events(&mut u).as_slice(),
        [UplinkEvent::Connect(_)]
    ));
    u.handle_connect_failed("refused", t0);
    assert_eq!(events(&mut u), []);
    // A command now fails at once, not after its timeout.
    u.send(request(7), t0);
    assert_eq!(events(&mut u), [UplinkEvent::Unreachable]);
    assert!(u.is_reconnecting());
    // A tracker comes back: the next round (after a pause) finds it, and commands go out.
    let now = u.poll_timeout().expect("a timer");
    assert!(now - t0 <= BACKOFF_MAX);
    u.handle_timeout(now);
    assert!(matches!(
        events(&mut u).as_slice(),
        [UplinkEvent::Connect(_)]
    ));
    u.handle_connected(now);
    assert_eq!(events(&mut u), [UplinkEvent::Connected]);
    assert_eq!(u.handle_frame(&welcome(), now), None);
    transmits(&mut u);
    u.send(request(8), now);
    assert_eq!(transmits(&mut u), [ClientMsg::Request(request(8))]);
}

#[test]
fn a_tracker_back_during_the_backoff_is_found_within_a_second() {
    let t0 = Instant::now();
    let mut u = open_on(2, 0, t0);
    u.handle_closed("reset", t0);
    let mut now = t0;
    // Both refuse for 3 s.
    while now < t0 + Duration::from_secs(3) {
        while let Some(ev) = u.poll_event() {
            if let UplinkEvent::Connect(_) = ev {
                u.handle_connect_failed("refused", now);
            }
        }
        now = u.poll_timeout().expect("a timer");
        u.handle_timeout(now);
    }
    let back = now;
    // The next attempt comes within the capped backoff, and it connects.
    let connect_at = loop {
        let evs = events(&mut u);
        if let Some(UplinkEvent::Connect(a)) = evs.first() {
            break (now, *a);
        }
        now = u.poll_timeout().expect("a timer");
        u.handle_timeout(now);
    };
    assert!(connect_at.0 - back <= BACKOFF_MAX);
    u.handle_connected(now);
    assert_eq!(events(&mut u), [UplinkEvent::Connected]);
    assert!(u.is_open());
}

#[test]
fn a_quiet_link_is_pinged_and_a_silent_tracker_left() {
    let t0 = Instant::now();
    let mut u = open_on(2, 0, t0);
    assert_eq!(u.poll_timeout(), Some(t0 + PING_AFTER));
    u.handle_timeout(t0 + PING_AFTER);
    let pings = transmits(&mut u);
    assert!(matches!(
        pings[..],
        [ClientMsg::Request(Request {
            body: RequestBody::Ping,
            ..
        })]
    ));
    let ClientMsg::Request(Request {
        req_id: ping_id, ..
    }) = pings[0]
    else {
        unreachable!()
    };
    assert!(ping_id > u64::MAX - PING_IDS);
    assert_eq!(u.poll_timeout(), Some(t0 + 2 * PING_AFTER));
    // The pong is the link's own business; hearing it resets the silence.
    let t1 = t0 + PING_AFTER + Duration::from_millis(5);
    assert_eq!(u.handle_frame(&reply(ping_id, ReplyBody::Pong), t1), None);
    assert_eq!(u.poll_timeout(), Some(t1 + PING_AFTER));
    // Now the tracker hangs: pings every 600 ms, and at 1.8 s of silence the link is left.
    let mut n_pings = 0;
    let now = loop {
        let now = u.poll_timeout().unwrap();
        u.handle_timeout(now);
        n_pings += transmits(&mut u).len();
        let evs = events(&mut u);
        if !evs.is_empty() {
            assert_eq!(evs, [UplinkEvent::Close, UplinkEvent::Connect(addr(1))]);
            break now;
        }
    };
    assert_eq!(now, t1 + TRACKER_SILENCE);
    assert_eq!(n_pings, 2);
}

#[test]
fn a_tracker_that_holds_its_welcome_too_long_is_left() {
    // A tracker still copying the state holds the welcome; silence still counts.
    let t0 = Instant::now();
    let mut u = uplink(2);
    u.send(request(1), t0);
    u.handle_connected(t0);
    events(&mut u);
    u.handle_timeout(t0 + TRACKER_SILENCE);
    assert_eq!(
        events(&mut u),
        [UplinkEvent::Close, UplinkEvent::Connect(addr(1))]
    );
}

#[test]
fn protocol_errors_break_the_link() {
    let t0 = Instant::now();
    // Another version.
    let mut u = uplink(2);
    u.send(request(1), t0);
    u.handle_connected(t0);
    events(&mut u);
    let old = frame(&TrackerMsg::Welcome {
        version: PROTOCOL_VERSION + 1,
        tracker_no: 1,
    });
    assert_eq!(u.handle_frame(&old, t0), None);
    assert_eq!(events(&mut u), [UplinkEvent::Connect(addr(1))]);
    // A reply before the welcome.
    u.handle_connected(t0);
    events(&mut u);
    assert_eq!(u.handle_frame(&reply(1, ReplyBody::Done), t0), None);
    assert_eq!(events(&mut u), [UplinkEvent::Connect(addr(0))]);
    // Garbage, and a second welcome.
    let mut u = open_on(2, 0, t0);
    assert_eq!(u.handle_frame(&[0xee, 1, 2], t0), None);
    assert_eq!(events(&mut u), [UplinkEvent::Connect(addr(1))]);
    let mut u = open_on(2, 0, t0);
    assert_eq!(u.handle_frame(&welcome(), t0), None);
    assert_eq!(events(&mut u), [UplinkEvent::Connect(addr(1))]);
}

#[test]
fn links_that_keep_breaking_before_the_welcome_lose_the_session() {
    let t0 = Instant::now();
    let mut u = open_on(2, 0, t0);
    u.handle_closed("reset", t0);
    let mut lost = false;
    for _ in 0..4 {
        let evs = events(&mut u);
        if evs.contains(&UplinkEvent::SessionLost) {
            lost = true;
            break;
        }
        assert!(matches!(evs[..], [UplinkEvent::Connect(_)]), "{evs:?}");
        u.handle_connected(t0);
        events(&mut u);
        u.handle_closed("closed the connection", t0);
    }
    assert!(lost || events(&mut u).contains(&UplinkEvent::SessionLost));
    assert_eq!(u.poll_timeout(), None);
    // A welcomed link resets the count.
    let mut u = open_on(2, 0, t0);
    u.handle_closed("reset", t0);
    u.handle_connected(t0);
    u.handle_closed("reset", t0);
    u.handle_connected(t0);
    u.handle_frame(&welcome(), t0);
    u.handle_closed("reset", t0);
    u.handle_connected(t0);
    u.handle_closed("reset", t0);
    assert!(!events(&mut u).contains(&UplinkEvent::SessionLost));
}

#[test]
fn after_the_session_is_lost_a_new_request_connects_again() {
    let t0 = Instant::now();
    let mut u = uplink(1);
    u.send(request(1), t0);
    u.handle_connected(t0);
    u.handle_frame(&welcome(), t0);
    u.handle_closed("reset", t0);
    let mut now = t0;
    while !events(&mut u).contains(&UplinkEvent::SessionLost) {
        u.handle_connect_failed("refused", now);
        if let Some(t) = u.poll_timeout() {
            now = t;
            u.handle_timeout(now);
        }
    }
    u.send(request(2), now);
    assert_eq!(events(&mut u), [UplinkEvent::Connect(addr(0))]);
}

#[test]
fn backoff_is_zero_then_doubles_to_the_cap() {
    assert_eq!(backoff(0), Duration::ZERO);
    assert_eq!(backoff(1), BACKOFF_FIRST);
    assert_eq!(backoff(2), BACKOFF_FIRST * 2);
    assert_eq!(backoff(40), BACKOFF_MAX);
    assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
}

#[test]
fn random_event_sequences_never_spin_or_panic() {
    let mut rng = crate::rng::SplitMix64::new(10);
    for _ in 0..300 {
        let n = rng.between(1, 4);
        let t0 = Instant::now();
        let mut now = t0;
        let mut u = uplink(n);
        for _ in 0..200 {
            match rng.between(0, 8) {
                0 => u.send(request(rng.between(1, 100) as u64), now),
                1 => u.handle_connected(now),
                2 => u.handle_connect_failed("refused", now),
                3 => u.handle_closed("reset", now),
                4 => {
                    u.handle_frame(&welcome(), now);
                }
                5 => {
                    u.handle_frame(&reply(3, ReplyBody::Done), now);
                }
                _ => {
                    if let Some(t) = u.poll_timeout() {
                        now = t;
                        u.handle_timeout(now);
                    }
                }
            }
            events(&mut u);
            transmits(&mut u);
            assert_no_spin(&u, now);
        }
    }
}

#[test]
fn links_left_for_silence_in_a_row_get_more_time_until_a_reply() {
    // One tracker, slow rather than hung: it welcomes at once but answers after 5 s.
    let t0 = Instant::now();
    let mut u = open_on(1, 0, t0);
    let mut now = t0;
    let mut silences = Vec::new();
    for _ in 0..5 {
        let opened = now;
        loop {
            now = u.poll_timeout().unwrap();
            u.handle_timeout(now);
            transmits(&mut u);
            if !events(&mut u).is_empty() {
                break;
            }
        }
        silences.push(now - opened);
        u.handle_connected(now);
        events(&mut u);
        u.handle_frame(&welcome(), now);
    }
    let s = TRACKER_SILENCE;
    assert_eq!(silences, [s, 2 * s, 4 * s, 8 * s, 8 * s]);
    // A reply: the next silence is the short one again.
    u.handle_frame(&reply(1, ReplyBody::Done), now);
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
    let mut u = uplink(2);
    u.send(request(1), t0);
    assert_eq!(events(&mut u), [UplinkEvent::Connect(addr(0))]);
    assert_eq!(u.poll_timeout(), Some(t0 + CONNECT_TIMEOUT));
    let t1 = t0 + Duration::from_millis(100);
    u.handle_transport_up(t1);
    assert_eq!(u.poll_timeout(), Some(t1 + TRACKER_SILENCE));
    // Past the connect timeout, the handshake still has time.
    u.handle_timeout(t0 + CONNECT_TIMEOUT + Duration::from_millis(1));
    assert_eq!(events(&mut u), []);
    // Past the silence, the next tracker is tried.
    u.handle_timeout(t1 + TRACKER_SILENCE);
    assert_eq!(
        events(&mut u),
        [UplinkEvent::Close, UplinkEvent::Connect(addr(1))]
    );
    // A handshake that fails is a failed attempt too: the next one after it.
    u.handle_transport_up(t1 + TRACKER_SILENCE);
    u.handle_connect_failed("refused: wrong key", t1 + TRACKER_SILENCE);
    assert_eq!(events(&mut u), [UplinkEvent::Unreachable]);
}

/// Every login and resume carries the number of the link it goes out on: 1 for the first
/// link, one more for each link after, and a request handed over again on a new link (the
/// same request id) carries the new number. The trackers order a client's links by it.
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
    let mut u = open_on(2, 0, t0);
    u.send(login(5), t0);
    u.send(request(6), t0);
    let sent = transmits(&mut u);
    assert_eq!(
        sent.iter().map(link_of).collect::<Vec<_>>(),
        [Some(1), None],
        "{sent:?}"
    );
    // The link breaks; on the next one the same login goes out again, with a resume.
    u.handle_closed("reset", t0);
    assert_eq!(events(&mut u), [UplinkEvent::Connect(addr(1))]);
    u.handle_connected(t0);
    assert_eq!(events(&mut u), [UplinkEvent::Connected]);
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
    let sent = transmits(&mut u);
    assert_eq!(
        sent.iter().map(link_of).collect::<Vec<_>>(),
        [None, Some(2), Some(2)],
        "hello, then both with the second link's number: {sent:?}"
    );
}

#[test]
fn a_key_mismatch_fails_a_first_connection_at_once_without_trying_the_others() {
    let t0 = Instant::now();
    let mut u = uplink(3);
    u.send(request(1), t0);
    assert_eq!(events(&mut u), [UplinkEvent::Connect(addr(0))]);
    u.handle_transport_up(t0);
    u.handle_refused("tracker 127.0.0.1:6000 refused: ...", t0);
    // No first-use trust of the next tracker: the command fails, naming the refusal.
    assert_eq!(events(&mut u), [UplinkEvent::Unreachable]);
    assert_eq!(u.tracker(), None);
    assert_eq!(u.poll_timeout(), None);
    // The next command tries again (and is refused again while the key is wrong).
    u.send(request(2), t0);
    assert_eq!(events(&mut u), [UplinkEvent::Connect(addr(0))]);
}

#[test]
fn a_key_mismatch_while_failing_over_tries_the_next_tracker() {
    let t0 = Instant::now();
    let mut u = open_on(3, 0, t0);
    u.handle_closed("closed the connection", t0);
    assert_eq!(events(&mut u), [UplinkEvent::Connect(addr(1))]);
    u.handle_transport_up(t0);
    u.handle_refused("refused", t0);
    // The session is kept; the next must present the expected key too (the driver checks).
    assert_eq!(events(&mut u), [UplinkEvent::Connect(addr(2))]);
}

/// A process stopped for a few seconds (SIGSTOP, swapped out) comes back to a link whose
/// tracker it has not heard for longer than the silence: that is its own absence, not the
/// tracker's silence, so it pings rather than leaving a live tracker. A tracker that then
/// stays silent is still left once silent for the silence while this process was there.
#[test]
fn a_client_that_was_away_pings_its_tracker_instead_of_leaving_it() {
    let t0 = Instant::now();
    let mut u = open_on(3, 0, t0);
    u.handle_timeout(t0 + PING_AFTER);
    assert!(matches!(
        transmits(&mut u)[..],
        [ClientMsg::Request(Request {
            body: RequestBody::Ping,
            ..
        })]
    ));
    // Stopped for 5 s: the loop turns 3.8 s after it asked to.
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
    assert_eq!(u.handle_frame(&reply(req_id, ReplyBody::Pong), back), None);
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
    let mut u = open_on(3, 0, t0);
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
            assert_eq!(ev, [UplinkEvent::Close, UplinkEvent::Connect(addr(1))]);
            break now;
        }
    };
    // Heard at t0; 1.2 s of silence counted before the stop (t0 .. t0 + 1.2 s asked turn),
    // so 0.6 s more after coming back.
    assert_eq!(left, back + (TRACKER_SILENCE - PING_AFTER * 2));
}

/// A connect whose timer was due while this process was away gets its time back.
#[test]
fn a_connect_timer_does_not_run_while_the_client_was_away() {
    let t0 = Instant::now();
    let mut u = uplink(2);
    u.send(request(1), t0);
    assert_eq!(events(&mut u), [UplinkEvent::Connect(addr(0))]);
    u.handle_timeout(t0);
    let back = t0 + Duration::from_secs(4);
    u.handle_timeout(back);
    assert_eq!(events(&mut u), []);
    assert_eq!(u.poll_timeout(), Some(back + CONNECT_TIMEOUT));
    u.handle_timeout(back + CONNECT_TIMEOUT);
    assert_eq!(
        events(&mut u),
        [UplinkEvent::Close, UplinkEvent::Connect(addr(1))]
    );
}
