use super::*;
use crate::rng::SplitMix64 as Rng;

fn sample() -> Ticket {
    Ticket {
        body: TicketBody {
            expires: 1_800_000_000,
            file_sha1: Sha1Digest([0xab; 20]),
            group: GroupId::new("g1").unwrap(),
            user: UserId::new("bob").unwrap(),
            client_key: [7; 32],
        },
        signature: [9; 64],
    }
}

fn golden() -> Vec<u8> {
    let mut g = vec![1, 0, 0, 0, 0, 0x6b, 0x49, 0xd2, 0x00];
    g.extend_from_slice(&[0xab; 20]);
    g.extend_from_slice(&[0, 2, b'g', b'1', 0, 3, b'b', b'o', b'b']);
    g.extend_from_slice(&[7; 32]);
    g.extend_from_slice(&[9; 64]);
    g
}

#[test]
fn golden_bytes() {
    assert_eq!(sample().to_bytes(), golden());
    assert_eq!(Ticket::parse(&golden()).unwrap(), sample());
    let mut signed = b"p2pshare v1 ticket\0".to_vec();
    signed.extend_from_slice(&golden()[..golden().len() - 64]);
    assert_eq!(sample().body.signed_bytes(), signed);
}

#[test]
fn every_strict_prefix_and_any_extra_byte_is_an_error() {
    let g = golden();
    for n in 0..g.len() {
        assert!(Ticket::parse(&g[..n]).is_err(), "prefix of {n}");
    }
    let mut long = g.clone();
    long.push(0);
    assert_eq!(Ticket::parse(&long), Err(DecodeError::TrailingBytes(1)));
}

#[test]
fn bad_fields_are_errors() {
    let mut v2 = golden();
    v2[0] = 2;
    assert_eq!(
        Ticket::parse(&v2),
        Err(DecodeError::BadValue("ticket version"))
    );
    // A group id with a space.
    let mut bad_group = golden();
    bad_group[31] = b' ';
    assert!(matches!(
        Ticket::parse(&bad_group),
        Err(DecodeError::BadId(_))
    ));
}

#[test]
fn longest_ticket_fits_the_bound() {
    let mut t = sample();
    t.body.group = GroupId::new(&"g".repeat(MAX_ID_LEN)).unwrap();
    t.body.user = UserId::new(&"u".repeat(MAX_ID_LEN)).unwrap();
    assert_eq!(t.to_bytes().len(), MAX_TICKET_LEN);
    assert_eq!(Ticket::parse(&t.to_bytes()).unwrap(), t);
}

#[test]
fn random_and_mutated_input_never_panics() {
    let mut rng = Rng::new(0x7ac3);
    let g = golden();
    for _ in 0..20_000 {
        let mut bytes = if rng.percent(50) {
            let mut b = vec![0u8; rng.below(MAX_TICKET_LEN + 8)];
            rng.fill(&mut b);
            b
        } else {
            g.clone()
        };
        for _ in 0..rng.between(1, 4) {
            if !bytes.is_empty() {
                let i = rng.below(bytes.len());
                bytes[i] = rng.next_u64() as u8;
            }
        }
        let _ = Ticket::parse(&bytes);
    }
}
