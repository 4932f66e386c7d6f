//! The caps on served links, over real loopback sockets: the total and per-address caps, and
//! the idle timeout (with `now` moved forward, no waiting).

use std::io::{ErrorKind, Read};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Poll, Token, Waker};

use super::*;

/// A serve link's socket keeps at most [`SERVE_NOTSENT_LOWAT`] unsent (the kernel's default
/// is unlimited, which let each socket hold a megabyte or more on a shaped link).
#[test]
fn serve_sockets_limit_their_unsent_bytes() {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let before = nix::sys::socket::getsockopt(&stream, TcpNotSentLowat).unwrap();
    assert_ne!(before, SERVE_NOTSENT_LOWAT);
    limit_unsent(&stream).unwrap();
    assert_eq!(
        nix::sys::socket::getsockopt(&stream, TcpNotSentLowat).unwrap(),
        SERVE_NOTSENT_LOWAT
    );
}

/// A serve link that moves hundreds of MB a second (a downloader on loopback) gets a larger
/// unsent limit than the 128 KiB it starts with (`client::unsent`), so that its sharer is not
/// woken up every 128 KiB; the downloader here reads as fast as it can on its own thread.
#[test]
fn a_fast_serve_link_may_hold_more_unsent() {
    let mut h = Harness::new();
    let mut downloader = h.connect_from(Ipv4Addr::LOCALHOST);
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            match downloader.read(&mut buf) {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n as u64,
            }
        }
    });
    let id = h.transfers.conns.iter().next().unwrap().id;
    let chunk = vec![7u8; 1 << 20];
    let deadline = Instant::now() + Duration::from_secs(30);
    let limit = loop {
        let conn = h.transfers.conns.get_mut(id).unwrap();
        if conn.pending_write() < chunk.len() {
            conn.out().extend_from_slice(&chunk);
        }
        h.transfers.flush_conn(h.poll.registry(), id);
        let conn = h.transfers.conns.get_mut(id).unwrap();
        let (stream, _, _) = conn.parts();
        let limit = nix::sys::socket::getsockopt(&*stream, TcpNotSentLowat).unwrap();
        if limit > SERVE_NOTSENT_LOWAT || Instant::now() > deadline {
            break limit;
        }
    };
    assert!(
        limit > SERVE_NOTSENT_LOWAT,
        "the unsent limit stayed at {limit} bytes"
    );
    let conn = h.transfers.conns.remove(h.poll.registry(), id).unwrap();
    drop(conn);
    assert!(reader.join().unwrap() > 0);
}

fn caps() -> PeerCaps {
    PeerCaps {
        max_fetch: 8,
        max_serve: 3,
        max_serve_per_addr: 2,
        serve_idle: Duration::from_secs(5),
    }
}

struct Harness {
    poll: Poll,
    hasher: HashPool,
    listener: TcpListener,
    transfers: Transfers,
}

impl Harness {
    fn new() -> Harness {
        let poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), Token(1)).unwrap());
        let (hasher, _) = HashPool::start(1, waker).unwrap();
        Harness {
            poll,
            hasher,
            listener: TcpListener::bind("127.0.0.1:0").unwrap(),
            // The caps and timers are the same for secure links; these tests speak plain
            // frames to the served links.
            transfers: Transfers::default()
                .with_caps(caps())
                .with_plaintext_peer_links(),
        }
    }

    /// Connects from `from` and hands the accepted socket to `Transfers`.
    fn connect_from(&mut self, from: Ipv4Addr) -> TcpStream {
        use rustix::net::{AddressFamily, SocketType};
        let fd = rustix::net::socket(AddressFamily::INET, SocketType::STREAM, None).unwrap();
        rustix::net::bind(&fd, &std::net::SocketAddrV4::new(from, 0)).unwrap();
        rustix::net::connect(&fd, &self.listener.local_addr().unwrap()).unwrap();
        let (stream, addr) = self.listener.accept().unwrap();
        stream.set_nonblocking(true).unwrap();
        self.transfers.accept(
            self.poll.registry(),
            mio::net::TcpStream::from_std(stream),
            addr,
        );
        TcpStream::from(fd)
    }

    fn served(&self) -> usize {
        self.transfers.count_links(None).1
    }
}

/// Whether the sharer closed `stream` (EOF or reset within a second), or kept it open.
fn closed(stream: &mut TcpStream) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_millis(1000)))
        .unwrap();
    let mut buf = [0u8; 16];
    match stream.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) if e.kind() == ErrorKind::ConnectionReset => true,
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => false,
        Err(e) => panic!("{e}"),
    }
}

/// Marks the served link from `from` as accepted (what a handshake with a valid ticket
/// does), serving a small file in `dir`.
fn accept_link(h: &mut Harness, from: Ipv4Addr, dir: &std::path::Path) {
    use super::serve::{Serving, Source};
    use crate::wire::{FileName, GroupId, Sha1Digest};
    let path = dir.join(format!("f{from}"));
    std::fs::write(&path, b"data").unwrap();
    let map = std::sync::Arc::new(crate::storage::SourceMap::open(&path).unwrap());
    for conn in h.transfers.conns.iter_mut() {
        if let PeerConn::Serve(link) = &mut conn.data {
            if link.addr.ip() == from {
                link.serving = Some(Serving {
                    group: GroupId::new("g").unwrap(),
                    name: FileName::new("f").unwrap(),
                    file_sha1: Sha1Digest([1; 20]),
                    source: Source::File(map.clone(), None),
                    download: None,
                });
            }
        }
    }
}

#[test]
fn served_links_are_capped_per_address_and_in_all() {
    let mut h = Harness::new();
    let a = Ipv4Addr::new(127, 0, 0, 1);
    let b = Ipv4Addr::new(127, 0, 0, 2);
    let mut a1 = h.connect_from(a);
    let mut a2 = h.connect_from(a);
    // Over the per-address cap: the newcomer takes the place of the quietest link from that
    // address not accepted yet (a1, the oldest).
    let mut a3 = h.connect_from(a);
    assert_eq!(h.served(), 2, "at most two from one address");
    assert!(
        closed(&mut a1),
        "the oldest unaccepted link from a is evicted"
    );
    let mut b1 = h.connect_from(b);
    assert_eq!(h.served(), 3);
    // Over the cap of all served links: the quietest unaccepted link of any address goes.
    let mut c1 = h.connect_from(Ipv4Addr::new(127, 0, 0, 3));
    assert_eq!(h.served(), 3, "at most three in all");
    assert!(closed(&mut a2));
    for s in [&mut a3, &mut b1, &mut c1] {
        assert!(!closed(s));
    }
}

#[test]
fn accepted_served_links_are_never_evicted_for_a_newcomer() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new();
    let a = Ipv4Addr::new(127, 0, 0, 1);
    let b = Ipv4Addr::new(127, 0, 0, 2);
    let mut a1 = h.connect_from(a);
    let mut a2 = h.connect_from(a);
    accept_link(&mut h, a, dir.path());
    // Both links from a serve: a third from a is closed, not them.
    let mut a3 = h.connect_from(a);
    assert_eq!(h.served(), 2);
    assert!(closed(&mut a3));
    // b's unaccepted link is evicted by c's at the cap of all; then, with every link
    // accepted, a newcomer is closed.
    let mut b1 = h.connect_from(b);
    let mut c1 = h.connect_from(Ipv4Addr::new(127, 0, 0, 3));
    assert_eq!(h.served(), 3);
    assert!(closed(&mut b1));
    accept_link(&mut h, Ipv4Addr::new(127, 0, 0, 3), dir.path());
    let mut d1 = h.connect_from(Ipv4Addr::new(127, 0, 0, 4));
    assert_eq!(h.served(), 3);
    assert!(closed(&mut d1));
    for s in [&mut a1, &mut a2, &mut c1] {
        assert!(!closed(s));
    }
}

#[test]
fn unaccepted_served_links_close_at_the_handshake_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new();
    let now = Instant::now();
    let mut silent = h.connect_from(Ipv4Addr::new(127, 0, 0, 1));
    let mut serving = h.connect_from(Ipv4Addr::new(127, 0, 0, 2));
    accept_link(&mut h, Ipv4Addr::new(127, 0, 0, 2), dir.path());
    let deadline = now + super::SERVE_HANDSHAKE_TIMEOUT;
    h.transfers.on_tick(
        h.poll.registry(),
        &h.hasher,
        deadline - Duration::from_millis(500),
    );
    assert_eq!(h.served(), 2, "before the deadline");
    h.transfers.on_tick(
        h.poll.registry(),
        &h.hasher,
        deadline + Duration::from_millis(500),
    );
    assert_eq!(h.served(), 1);
    assert!(closed(&mut silent));
    assert!(!closed(&mut serving));
}

#[test]
fn served_links_close_when_idle_but_not_while_the_downloader_talks() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new();
    let now = Instant::now();
    let mut quiet = h.connect_from(Ipv4Addr::new(127, 0, 0, 1));
    let mut talking = h.connect_from(Ipv4Addr::new(127, 0, 0, 2));
    // Both accepted, so that only idleness can close them (not the handshake deadline).
    accept_link(&mut h, Ipv4Addr::new(127, 0, 0, 1), dir.path());
    accept_link(&mut h, Ipv4Addr::new(127, 0, 0, 2), dir.path());
    assert_eq!(h.served(), 2);
    assert!(h.transfers.next_deadline().is_some());
    h.transfers
        .on_tick(h.poll.registry(), &h.hasher, now + Duration::from_secs(3));
    assert_eq!(h.served(), 2, "not idle yet");
    // The other link's downloader is heard at 4 s (what reading any of its frames records).
    for conn in h.transfers.conns.iter_mut() {
        if let PeerConn::Serve(link) = &mut conn.data {
            if link.addr.ip() == Ipv4Addr::new(127, 0, 0, 2) {
                link.last_heard = now + Duration::from_secs(4);
            }
        }
    }
    // At 6 s.
    h.transfers
        .on_tick(h.poll.registry(), &h.hasher, now + Duration::from_secs(6));
    assert_eq!(h.served(), 1, "the quiet link is idle");
    assert!(closed(&mut quiet));
    assert!(!closed(&mut talking));
}

#[test]
fn a_running_download_renews_its_ticket_at_half_life() {
    use crate::wire::ticket::{Ticket, TicketBody};
    use crate::wire::tracker_link::FileMeta;
    use crate::wire::{FileName, GroupId, Sha1Digest, UserId};
    let mut h = Harness::new();
    let tmp = tempfile::tempdir().unwrap();
    let now = Instant::now();
    let id = DownloadId(1);
    let meta = FileMeta {
        name: FileName::new("f").unwrap(),
        size: 10,
        piece_len: crate::wire::PIECE_LEN,
        file_sha1: Sha1Digest([1; 20]),
        piece_hashes: vec![Sha1Digest([2; 20])],
    };
    // A sharer address that refuses: the download stays running, waiting for sharers.
    let closed_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    h.transfers
        .start_download(
            h.poll.registry(),
            &h.hasher,
            id,
            GroupId::new("g").unwrap(),
            meta,
            &[closed_port],
            tmp.path().join("f"),
            now,
        )
        .unwrap();
    let ticket = |expires| Ticket {
        body: TicketBody {
            expires,
            file_sha1: Sha1Digest([1; 20]),
            group: GroupId::new("g").unwrap(),
            user: UserId::new("u").unwrap(),
            client_key: [0; 32],
        },
        signature: [0; 64],
    };
    // The engine asks for sharers by itself too (its one sharer refuses): the renewal is
    // told by the state it leaves, and by the event.
    let asked = |h: &mut Harness| {
        let mut event = false;
        while let Some(e) = h.transfers.poll_event() {
            event |= e == (TransferEvent::QuerySharers { download: id });
        }
        h.transfers.renewing.contains(&id) && event
    };
    let unix = h.transfers.unix_at(now);
    let life = crate::tracker::tickets::TICKET_LIFE_SECS;
    h.transfers
        .set_ticket(h.poll.registry(), id, ticket(unix + life), Vec::new());
    // Before half-life: nothing asked; the renewal time is among the deadlines.
    h.transfers.on_tick(
        h.poll.registry(),
        &h.hasher,
        now + Duration::from_secs(life / 2 - 5),
    );
    assert!(!asked(&mut h));
    let due = h.transfers.next_deadline().unwrap();
    assert!(
        due <= now + Duration::from_secs(life / 2 + 1),
        "{:?}",
        due - now
    );
    // At half-life: asked once, not again while the answer is on its way.
    let half = now + Duration::from_secs(life / 2 + 1);
    h.transfers.on_tick(h.poll.registry(), &h.hasher, half);
    assert!(asked(&mut h));
    assert!(
        h.transfers.next_renewal().is_none(),
        "asked again while waiting"
    );
    // The new ticket arrives: the next renewal is half its life later.
    h.transfers.set_ticket(
        h.poll.registry(),
        id,
        ticket(unix + life / 2 + 1 + life),
        Vec::new(),
    );
    h.transfers
        .on_tick(h.poll.registry(), &h.hasher, half + Duration::from_secs(2));
    assert!(!asked(&mut h));
    h.transfers.on_tick(
        h.poll.registry(),
        &h.hasher,
        half + Duration::from_secs(life / 2 + 1),
    );
    assert!(asked(&mut h));
}
