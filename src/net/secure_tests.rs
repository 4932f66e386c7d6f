use super::*;

const PSK: [u8; 32] = [7u8; 32];

/// Moves everything `from` has to send into `to` (as much as `to` takes; the rest stays).
fn pass(from: &mut SecureLink, to: &mut SecureLink) -> usize {
    let n = to.feed(from.outgoing());
    from.advance_outgoing(n);
    n
}

/// Reads every plaintext byte `link` can produce now.
fn drain(link: &mut SecureLink) -> Result<Vec<u8>, SecureError> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1000];
    loop {
        let n = link.read_plain(&mut buf)?;
        if n == 0 {
            return Ok(got);
        }
        got.extend_from_slice(&buf[..n]);
    }
}

/// Runs the handshake between an initiator and a responder to completion.
fn pair_with(initiator_psk: [u8; 32], responder_psk: [u8; 32]) -> (SecureLink, SecureLink) {
    let mut a = SecureLink::initiator(&Params::tracker_link(initiator_psk)).unwrap();
    let mut b = SecureLink::responder(&Params::tracker_link(responder_psk)).unwrap();
    pass(&mut a, &mut b);
    assert_eq!(drain(&mut b).unwrap(), b"");
    pass(&mut b, &mut a);
    assert_eq!(drain(&mut a).unwrap(), b"");
    (a, b)
}

fn pair() -> (SecureLink, SecureLink) {
    pair_with(PSK, PSK)
}

/// Seals all of `data` on `from` (passing records on as the pending bound requires) and
/// returns what `to` decrypted.
fn send_all(from: &mut SecureLink, to: &mut SecureLink, data: &[u8]) -> Vec<u8> {
    let mut sent = 0;
    let mut got = Vec::new();
    while sent < data.len() || from.pending_out() > 0 {
        sent += from.seal(&data[sent..]).unwrap();
        // Deliver in odd-sized pieces so that records and reads never line up.
        let out = from.outgoing();
        let n = out.len().min(7919);
        let taken = to.feed(&out[..n]);
        from.advance_outgoing(taken);
        got.extend(drain(to).unwrap());
    }
    got
}

#[test]
fn handshake_establishes_both_sides() {
    let (a, b) = pair();
    assert!(a.is_established());
    assert!(b.is_established());
    assert_eq!(a.pending_out(), 0);
    assert_eq!(b.pending_out(), 0);
}

#[test]
fn preamble_is_sent_in_clear_first() {
    let a = SecureLink::initiator(&Params::tracker_link(PSK)).unwrap();
    let out = a.outgoing();
    assert_eq!(&out[..4], b"P2PT");
    assert_eq!(&out[4..6], &SECURE_VERSION.to_be_bytes());
    // Then one handshake message: its length prefix and an ephemeral key with a tag.
    let len = usize::from(u16::from_be_bytes([out[6], out[7]]));
    assert_eq!(out.len(), 8 + len);
    assert_eq!(len, 32 + TAG_LEN);
}

#[test]
fn round_trip_across_record_boundaries() {
    let (mut a, mut b) = pair();
    // Larger than several records, with a pattern that shows misordering.
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(send_all(&mut a, &mut b, &data), data);
    let back: Vec<u8> = data.iter().rev().copied().collect();
    assert_eq!(send_all(&mut b, &mut a, &back), back);
    // Small writes make small records; they arrive in order too.
    let mut got = Vec::new();
    for i in 0..100u8 {
        got.extend(send_all(&mut a, &mut b, &[i; 3]));
    }
    let want: Vec<u8> = (0..100u8).flat_map(|i| [i; 3]).collect();
    assert_eq!(got, want);
}

#[test]
fn records_are_at_most_noise_size() {
    let (mut a, _b) = pair();
    let data = vec![1u8; 100_000];
    let took = a.seal(&data).unwrap();
    assert_eq!(took, MAX_RECORD_PLAIN);
    let out = a.outgoing();
    assert_eq!(
        usize::from(u16::from_be_bytes([out[0], out[1]])),
        MAX_MESSAGE
    );
    assert_eq!(out.len(), 2 + MAX_MESSAGE);
}

#[test]
fn byte_by_byte_delivery_decrypts() {
    let (mut a, mut b) = pair();
    let data = b"frames may span records and reads".to_vec();
    assert_eq!(a.seal(&data).unwrap(), data.len());
    let wire = a.outgoing().to_vec();
    let mut got = Vec::new();
    for (i, byte) in wire.iter().enumerate() {
        assert_eq!(b.feed(&[*byte]), 1);
        let part = drain(&mut b).unwrap();
        if i + 1 < wire.len() {
            // A truncated record waits: nothing comes out, nothing fails.
            assert!(part.is_empty());
        }
        got.extend(part);
    }
    assert_eq!(got, data);
}

#[test]
fn tampered_record_is_an_error() {
    for at in [2usize, 10, 20] {
        let (mut a, mut b) = pair();
        a.seal(b"0123456789abcdef0123456789").unwrap();
        let mut wire = a.outgoing().to_vec();
        wire[at] ^= 0x01;
        b.feed(&wire);
        assert_eq!(drain(&mut b), Err(SecureError::BadRecord));
        // The link stays failed.
        assert_eq!(drain(&mut b), Err(SecureError::Failed));
        assert_eq!(b.seal(b"x"), Err(SecureError::Failed));
    }
}

#[test]
fn replayed_record_is_an_error() {
    let (mut a, mut b) = pair();
    a.seal(b"once").unwrap();
    let wire = a.outgoing().to_vec();
    b.feed(&wire);
    assert_eq!(drain(&mut b).unwrap(), b"once");
    b.feed(&wire);
    assert_eq!(drain(&mut b), Err(SecureError::BadRecord));
}

#[test]
fn wrong_psk_fails_the_handshake() {
    let mut a = SecureLink::initiator(&Params::tracker_link([1u8; 32])).unwrap();
    let mut b = SecureLink::responder(&Params::tracker_link([2u8; 32])).unwrap();
    pass(&mut a, &mut b);
    match drain(&mut b) {
        Err(SecureError::Handshake(_)) => {}
        other => panic!("expected a handshake failure, got {other:?}"),
    }
    // The responder sent nothing back and never became established.
    assert_eq!(b.pending_out(), 0);
    assert!(!b.is_established());
}

#[test]
fn responder_without_the_psk_cannot_answer() {
    // An impostor responder (wrong key) that somehow answered would still fail at the
    // initiator: check the initiator rejects a reply made with another key.
    let mut a = SecureLink::initiator(&Params::tracker_link(PSK)).unwrap();
    let mut honest = SecureLink::responder(&Params::tracker_link(PSK)).unwrap();
    let mut impostor_init = SecureLink::initiator(&Params::tracker_link([9u8; 32])).unwrap();
    let mut impostor = SecureLink::responder(&Params::tracker_link([9u8; 32])).unwrap();
    pass(&mut impostor_init, &mut impostor);
    drain(&mut impostor).unwrap();
    pass(&mut a, &mut honest);
    drain(&mut honest).unwrap();
    // The impostor's second message, handed to the real initiator.
    let reply = impostor.outgoing().to_vec();
    a.feed(&reply);
    assert!(matches!(drain(&mut a), Err(SecureError::Handshake(_))));
}

#[test]
fn seal_waits_for_the_handshake() {
    let mut a = SecureLink::initiator(&Params::tracker_link(PSK)).unwrap();
    let before = a.pending_out();
    assert_eq!(a.seal(b"hello").unwrap(), 0);
    assert_eq!(a.pending_out(), before);
}

#[test]
fn bad_preamble_is_an_error() {
    let mut b = SecureLink::responder(&Params::tracker_link(PSK)).unwrap();
    // A plain frame header, as a client would send.
    b.feed(&[0, 0, 0, 19, 1, 0x50]);
    assert!(matches!(drain(&mut b), Err(SecureError::BadMagic(_))));

    let mut b = SecureLink::responder(&Params::tracker_link(PSK)).unwrap();
    b.feed(b"P2PT\x00\x63");
    assert_eq!(drain(&mut b), Err(SecureError::BadVersion(0x63)));
}

#[test]
fn oversize_handshake_message_is_rejected_at_its_prefix() {
    let mut b = SecureLink::responder(&Params::tracker_link(PSK)).unwrap();
    let mut wire = b"P2PT\x00\x01".to_vec();
    wire.extend_from_slice(&2000u16.to_be_bytes());
    b.feed(&wire);
    // Rejected before the 2000 bytes arrive.
    assert_eq!(drain(&mut b), Err(SecureError::HandshakeTooLong(2000)));
}

#[test]
fn record_shorter_than_a_tag_is_rejected() {
    let (_a, mut b) = pair();
    b.feed(&[0, 5, 1, 2, 3, 4, 5]);
    assert_eq!(drain(&mut b), Err(SecureError::RecordTooShort(5)));
}

#[test]
fn truncated_handshake_waits() {
    let mut a = SecureLink::initiator(&Params::tracker_link(PSK)).unwrap();
    let mut b = SecureLink::responder(&Params::tracker_link(PSK)).unwrap();
    let wire = a.outgoing().to_vec();
    for cut in 0..wire.len() {
        let mut b2 = SecureLink::responder(&Params::tracker_link(PSK)).unwrap();
        b2.feed(&wire[..cut]);
        assert_eq!(drain(&mut b2).unwrap(), b"");
        assert!(!b2.is_established());
        assert_eq!(b2.pending_out(), 0);
    }
    b.feed(&wire);
    a.advance_outgoing(wire.len());
    drain(&mut b).unwrap();
    assert!(b.is_established());
}

#[test]
fn input_and_output_stay_bounded() {
    let (mut a, mut b) = pair();
    // The input buffer never offers more than one message's worth of room.
    assert!(b.spare().len() <= MAX_IN);
    // Sealing stops once MAX_SEALED_PENDING bytes wait.
    let data = vec![0u8; 4 * MAX_SEALED_PENDING];
    let mut sealed = 0;
    loop {
        let n = a.seal(&data[sealed..]).unwrap();
        if n == 0 {
            break;
        }
        sealed += n;
    }
    assert!(a.pending_out() >= MAX_SEALED_PENDING);
    assert!(a.pending_out() < MAX_SEALED_PENDING + 2 + MAX_MESSAGE);
    assert!(sealed < data.len());
}

#[test]
fn random_input_never_panics() {
    let mut rng = crate::rng::SplitMix64::new(0x5ec0);
    for _ in 0..300 {
        let (_a, mut b) = pair();
        let mut fresh = SecureLink::responder(&Params::tracker_link(PSK)).unwrap();
        let len = (rng.next_u64() % 300) as usize;
        let mut junk: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        if rng.percent(50) && junk.len() >= 6 {
            junk[..6].copy_from_slice(b"P2PT\x00\x01");
        }
        b.feed(&junk);
        let _ = drain(&mut b);
        fresh.feed(&junk);
        let _ = drain(&mut fresh);
    }
}

/// The layer under a real [`Conn`](crate::net::Conn) pair on loopback: frames of many sizes
/// (some spanning records, one of 1 MiB) and a mapped slice go both ways, queued before the
/// handshake is done, and arrive intact and in order.
#[test]
fn conns_carry_frames_over_the_secure_layer() {
    carry_frames_over_secure_conns(false);
}

/// The same with short reads ending the reading (`Conn::set_short_reads_end`), as the tracker
/// reads: each side is read only after a readiness event for it (or when its last read
/// stopped at its frame budget), so a read that stopped while the socket or the secure layer
/// still held bytes leaves frames missing at the deadline.
#[test]
fn secure_conns_read_on_events_alone_with_short_reads_ending_the_reading() {
    carry_frames_over_secure_conns(true);
}

fn carry_frames_over_secure_conns(event_driven: bool) {
    use crate::net::conn::{Conn, MappedSlice, ReadEnd};
    use crate::net::ConnId;
    use crate::wire::frame;
    use mio::{Events, Poll, Token};
    use std::time::{Duration, Instant};

    struct Slice(Vec<u8>);
    impl MappedSlice for Slice {
        fn bytes(&self) -> &[u8] {
            &self.0
        }
    }

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dialed = mio::net::TcpStream::connect(addr).unwrap();
    let (accepted, _) = listener.accept().unwrap();
    accepted.set_nonblocking(true).unwrap();
    let accepted = mio::net::TcpStream::from_std(accepted);
    let mut poll = Poll::new().unwrap();
    let id = |key| ConnId { key, generation: 1 };
    let max = 2 << 20;
    let mut a = Conn::new(poll.registry(), dialed, Token(20), id(0), max, ()).unwrap();
    let mut b = Conn::new(poll.registry(), accepted, Token(21), id(1), max, ()).unwrap();
    a.set_secure(SecureLink::initiator(&Params::tracker_link(PSK)).unwrap());
    b.set_secure(SecureLink::responder(&Params::tracker_link(PSK)).unwrap());
    a.set_short_reads_end(event_driven);
    b.set_short_reads_end(event_driven);

    // Each side's frames: sizes around the record size and a big one; the bodies number
    // themselves so that a lost, repeated or misordered byte shows.
    let mut rng = crate::rng::SplitMix64::new(77);
    let mut want: [Vec<Vec<u8>>; 2] = [Vec::new(), Vec::new()];
    for (side, conn) in [&mut a, &mut b].into_iter().enumerate() {
        for i in 0..200usize {
            let len = match i {
                7 => 1 << 20,
                10 => MAX_RECORD_PLAIN - 5,
                11 => MAX_RECORD_PLAIN + 3,
                _ => 1 + rng.below(3000),
            };
            let mut body = vec![0u8; len];
            rng.fill(&mut body);
            let mut payload = vec![0x42u8];
            payload.extend_from_slice(&body);
            let out = conn.out();
            let start = frame::begin(out, 0x42);
            out.extend_from_slice(&body);
            frame::end(out, start);
            want[side].push(payload);
            if i == 50 {
                // A frame whose body is sent from "mapped" memory.
                let mut body = vec![0u8; 200_000];
                rng.fill(&mut body);
                let out = conn.out();
                out.extend_from_slice(&(200_001u32).to_be_bytes());
                out.push(0x43);
                let mut payload = vec![0x43u8];
                payload.extend_from_slice(&body);
                want[side].push(payload);
                conn.queue_mapped(Box::new(Slice(body)));
            }
        }
    }
    let mut got: [Vec<Vec<u8>>; 2] = [Vec::new(), Vec::new()];
    let mut events = Events::with_capacity(16);
    let deadline = Instant::now() + Duration::from_secs(20);
    // Sides to read: every side at each turn, or (event-driven) those with an event or a
    // used-up budget.
    let mut to_read = [true, true];
    let mut budget_used = [false, false];
    while got[0].len() < want[1].len() || got[1].len() < want[0].len() {
        assert!(
            Instant::now() < deadline,
            "frames still missing: {} of {} and {} of {}",
            got[0].len(),
            want[1].len(),
            got[1].len(),
            want[0].len()
        );
        a.flush(poll.registry()).unwrap();
        b.flush(poll.registry()).unwrap();
        let wait = if budget_used.contains(&true) { 0 } else { 50 };
        poll.poll(&mut events, Some(Duration::from_millis(wait)))
            .unwrap();
        for event in events.iter() {
            let side = event.token().0 - 20;
            to_read[side] |= event.is_readable() || event.is_read_closed();
        }
        for (side, conn) in [&mut a, &mut b].into_iter().enumerate() {
            if event_driven && !to_read[side] {
                continue;
            }
            let end = conn
                .read_frames(16, |payload| {
                    got[side].push(payload.to_vec());
                    true
                })
                .unwrap();
            assert_ne!(end, ReadEnd::Eof);
            budget_used[side] = end == ReadEnd::Budget;
            to_read[side] = !event_driven || budget_used[side];
        }
    }
    assert!(a.secure().unwrap().is_established());
    assert!(b.secure().unwrap().is_established());
    assert_eq!(got[0].len(), want[1].len());
    assert!(got[0] == want[1], "b to a: frames differ");
    assert!(got[1] == want[0], "a to b: frames differ");
    assert_eq!(a.pending_write(), 0);
    assert_eq!(b.pending_write(), 0);
}

/// Not a correctness test: the cost of the record layer, for the README's figures. Run with
/// `cargo test --release --lib secure_throughput -- --ignored --nocapture`.
#[test]
#[ignore]
fn secure_throughput() {
    let (mut a, mut b) = pair();
    let mut sink = vec![0u8; MAX_RECORD_PLAIN];
    for size in [128usize, 4096, MAX_RECORD_PLAIN] {
        let data = vec![0xa5u8; size];
        let total = 64 * 1024 * 1024;
        let n = total / size;
        let start = std::time::Instant::now();
        for _ in 0..n {
            assert_eq!(a.seal(&data).unwrap(), size);
            let mut got = 0;
            while got < size {
                let taken = b.feed(a.outgoing());
                a.advance_outgoing(taken);
                got += b.read_plain(&mut sink).unwrap();
            }
        }
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "records of {size} bytes: {:.0} MB/s sealed and opened, {:.2} us per record",
            (n * size) as f64 / secs / 1e6,
            secs / n as f64 * 1e6
        );
    }
}

// Client links: Noise_NX with the tracker's static key certified by the service key.

fn tracker_side(seed: u8) -> Params {
    let key = crate::keys::ServiceKey::from_seed([seed; 32]);
    let (private, _) = key.client_link_static();
    Params::client_link_responder(private, key.client_link_certificate())
}

fn client_side(expected: Option<u8>) -> Params {
    Params::client_link_initiator(IdentityCheck {
        verify: crate::keys::verify_static_cert,
        expected: expected.map(|s| crate::keys::ServiceKey::from_seed([s; 32]).public_key().0),
    })
}

/// Runs a client-link handshake; returns both ends and the initiator's last result.
fn client_pair(
    client: &Params,
    tracker: &Params,
) -> (SecureLink, SecureLink, Result<Vec<u8>, SecureError>) {
    let mut a = SecureLink::initiator(client).unwrap();
    let mut b = SecureLink::responder(tracker).unwrap();
    // The client queues its first request before the handshake is done, as the driver may.
    assert_eq!(a.seal(b"login alice SECRET").unwrap(), 0);
    pass(&mut a, &mut b);
    assert_eq!(drain(&mut b).unwrap(), b"");
    pass(&mut b, &mut a);
    let result = drain(&mut a);
    (a, b, result)
}

#[test]
fn client_link_proves_the_service_key() {
    let service = crate::keys::ServiceKey::from_seed([5; 32]).public_key();
    for expected in [Some(5), None] {
        let (mut a, mut b, result) = client_pair(&client_side(expected), &tracker_side(5));
        assert_eq!(result.unwrap(), b"");
        assert!(a.is_established() && b.is_established());
        assert_eq!(a.remote_identity(), Some(service.0));
        assert_eq!(send_all(&mut a, &mut b, b"hello tracker"), b"hello tracker");
        assert_eq!(send_all(&mut b, &mut a, b"welcome"), b"welcome");
    }
}

#[test]
fn client_link_refuses_another_service_before_sending_anything() {
    let (a, _b, result) = client_pair(&client_side(Some(5)), &tracker_side(6));
    let expected = crate::keys::ServiceKey::from_seed([5; 32]).public_key().0;
    let presented = crate::keys::ServiceKey::from_seed([6; 32]).public_key().0;
    assert_eq!(
        result,
        Err(SecureError::WrongIdentity {
            expected,
            presented
        })
    );
    assert!(!a.is_established());
    assert_eq!(a.remote_identity(), None);
    // Only the first handshake message ever left the client: no record.
    assert_eq!(a.pending_out(), 0);
}

#[test]
fn client_link_refuses_uncertified_or_forged_static_keys() {
    // No certificate at all.
    let mut bare = tracker_side(5);
    bare.payload.clear();
    let (_, _, result) = client_pair(&client_side(None), &bare);
    assert!(
        matches!(result, Err(SecureError::BadIdentity(_))),
        "{result:?}"
    );
    // Service 5's certificate presented with service 6's static key: the signature covers
    // another static key.
    let mut forged = tracker_side(6);
    forged.payload = crate::keys::ServiceKey::from_seed([5; 32]).client_link_certificate();
    for expected in [Some(5), None] {
        let (a, _, result) = client_pair(&client_side(expected), &forged);
        assert!(
            matches!(result, Err(SecureError::BadIdentity(_))),
            "{result:?}"
        );
        assert!(!a.is_established());
    }
    // A flipped bit in the signature.
    let mut tampered = tracker_side(5);
    tampered.payload[40] ^= 1;
    let (_, _, result) = client_pair(&client_side(Some(5)), &tampered);
    assert!(
        matches!(result, Err(SecureError::BadIdentity(_))),
        "{result:?}"
    );
}

#[test]
fn client_and_tracker_links_do_not_mix() {
    // A client link's preamble at a tracker-link responder, and the other way round.
    let mut a = SecureLink::initiator(&client_side(None)).unwrap();
    let mut b = SecureLink::responder(&Params::tracker_link(PSK)).unwrap();
    pass(&mut a, &mut b);
    assert!(matches!(drain(&mut b), Err(SecureError::BadMagic(_))));
    let mut a = SecureLink::initiator(&Params::tracker_link(PSK)).unwrap();
    let mut b = SecureLink::responder(&tracker_side(5)).unwrap();
    pass(&mut a, &mut b);
    assert!(matches!(drain(&mut b), Err(SecureError::BadMagic(_))));
}
