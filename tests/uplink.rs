//! The client's reactor never blocks on its tracker link: while it fails over toward a tracker
//! address that accepts no connection (a listener whose accept queue is full, so the kernel
//! drops the SYNs and a connect hangs), a download goes on at full pace.
//!
//! The sharer is played by this test (registered with the tracker through the wire protocol,
//! serving the file itself), so that it can pace the download and time the downloader: it
//! sends one block, waits for the new request the downloader sends on receiving it, and only
//! then sends the next. A downloader whose reactor stood in a connect for 500 ms would show
//! round trips that long.

mod common;

use std::collections::{BTreeSet, VecDeque};
use std::io::{self, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{read_frame, Client, RawTracker, Tracker};
use p2pshare::bitfield::Bitfield;
use p2pshare::hasher::sha1_of;
use p2pshare::wire::peer_link::{emit_block_header, BlockRef, DownloaderMsg, SharerMsg};
use p2pshare::wire::tracker_link::{FileMeta, ReplyBody, RequestBody};
use p2pshare::wire::{FileName, GroupId, Password, UserId, PIECE_LEN};

const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// The sharer's pause between a new request and the next block: the download takes a few
/// seconds, well inside the client's 10 s of failover.
const PACE: Duration = Duration::from_millis(15);

/// Fills `listener`'s accept queue (never accepting) until a connection no longer completes:
/// from then on the kernel drops SYNs to it, and a connect there hangs until its timeout.
/// Returns the connections holding the queue full.
fn fill_backlog(listener: &TcpListener) -> Vec<TcpStream> {
    let addr = listener.local_addr().unwrap();
    // The queue holds as many connections as the listen backlog (128 from `std`, or up to
    // `somaxconn`): room for them all under a low default open-file limit.
    let _ = rlimit::increase_nofile_limit(16_384);
    let mut held = Vec::new();
    for _ in 0..10_000 {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(s) => held.push(s),
            Err(e)
                if e.kind() == io::ErrorKind::TimedOut || e.kind() == io::ErrorKind::WouldBlock =>
            {
                return held;
            }
            Err(e) => panic!("filling the backlog of {addr}: {e}"),
        }
    }
    panic!("the accept queue of {addr} never filled");
}

/// Queues a request; returns when it arrived.
fn take(
    queue: &mut VecDeque<BlockRef>,
    asked: &mut BTreeSet<(u32, u32)>,
    (at, block): (Instant, BlockRef),
) -> Instant {
    queue.push_back(block);
    asked.insert((block.piece, block.offset));
    at
}

/// What the test's sharer measured.
struct Served {
    /// For each block sent while the downloader still had blocks to ask for: the time until
    /// its next new request arrived.
    round_trips: Vec<Duration>,
    blocks_sent: usize,
}

/// Serves `data` to one downloader, one block per new request (see the module doc). Tells
/// `first_block` once the first block is out.
fn serve(
    listener: TcpListener,
    data: &[u8],
    block_len: u32,
    first_block: mpsc::Sender<()>,
) -> io::Result<Served> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    };
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    // The downloader's ticket comes first (this sharer does not check it), then its handshake.
    let ticket = DownloaderMsg::parse(&read_frame(&mut stream)?).expect("a ticket");
    assert!(matches!(ticket, DownloaderMsg::Ticket(_)), "{ticket:?}");
    let handshake = DownloaderMsg::parse(&read_frame(&mut stream)?).expect("a handshake");
    assert!(matches!(handshake, DownloaderMsg::Handshake { .. }));
    let n_pieces = data.len().div_ceil(PIECE_LEN as usize);
    let n_blocks = data.len().div_ceil(block_len as usize);
    let mut out = Vec::new();
    SharerMsg::accept(Bitfield::full(n_pieces)).emit(&mut out);
    stream.write_all(&out)?;

    let mut queue: VecDeque<BlockRef> = VecDeque::new();
    let mut asked = BTreeSet::new();
    let mut served = Served {
        round_trips: Vec::new(),
        blocks_sent: 0,
    };
    let mut first_block = Some(first_block);
    let mut reader = stream.try_clone()?;
    // Requests arrive on their own thread, stamped with their arrival time.
    let (req_tx, req_rx) = mpsc::channel::<(Instant, BlockRef)>();
    thread::spawn(move || loop {
        let Ok(frame) = read_frame(&mut reader) else {
            return;
        };
        match DownloaderMsg::parse(&frame) {
            Ok(DownloaderMsg::Request(block)) => {
                if req_tx.send((Instant::now(), block)).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(_) => return,
        }
    });
    while served.blocks_sent < n_blocks || !queue.is_empty() {
        while let Ok(req) = req_rx.try_recv() {
            take(&mut queue, &mut asked, req);
        }
        let Some(block) = queue.pop_front() else {
            match req_rx.recv_timeout(IO_TIMEOUT) {
                Ok(req) => {
                    take(&mut queue, &mut asked, req);
                    continue;
                }
                // The downloader has everything (or gave up): done.
                Err(_) => break,
            }
        };
        let start = block.piece as usize * PIECE_LEN as usize + block.offset as usize;
        let bytes = &data[start..start + block.len as usize];
        let mut out = Vec::new();
        emit_block_header(&mut out, block.piece, block.offset, bytes.len());
        out.extend_from_slice(bytes);
        let all_asked = asked.len() >= n_blocks;
        let sent_at = Instant::now();
        stream.write_all(&out)?;
        served.blocks_sent += 1;
        if let Some(tx) = first_block.take() {
            let _ = tx.send(());
        }
        if all_asked {
            continue;
        }
        // Lock step: the next block goes out only once the downloader has reacted to this one
        // (it keeps its pipeline full, so each block it takes in brings a new request).
        if let Ok(req) = req_rx.recv_timeout(Duration::from_secs(3)) {
            let at = take(&mut queue, &mut asked, req);
            served
                .round_trips
                .push(at.saturating_duration_since(sent_at));
        }
        thread::sleep(PACE);
    }
    Ok(served)
}

#[test]
fn download_goes_on_while_the_client_fails_over_toward_a_tracker_that_accepts_nothing() {
    let mut tracker = Tracker::start();
    let dir = tracker.dir.path().to_path_buf();
    // Tracker 2 of the client's file: a listener that accepts nothing.
    let blackhole = TcpListener::bind("127.0.0.1:0").unwrap();
    let held = fill_backlog(&blackhole);
    let client_info = dir.join("client_tracker_info.txt");
    std::fs::write(
        &client_info,
        format!("{}\n{}\n", tracker.addr, blackhole.local_addr().unwrap()),
    )
    .unwrap();

    // The file: 12 MiB of varied bytes, fetched in 128 KiB blocks.
    let data: Vec<u8> = (0..12 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let name = FileName::new("data.bin").unwrap();
    let group = GroupId::new("g").unwrap();
    let meta = FileMeta {
        name: name.clone(),
        size: data.len() as u64,
        piece_len: PIECE_LEN,
        file_sha1: sha1_of(&data),
        piece_hashes: data.chunks(PIECE_LEN as usize).map(sha1_of).collect(),
    };

    // The sharer: registered through the wire protocol, listening in this test.
    let sharer_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let sharer_addr = sharer_listener.local_addr().unwrap();
    let mut raw = RawTracker::connect(tracker.addr);
    let user = UserId::new("sharer").unwrap();
    let password = Password::new(b"pw-s").unwrap();
    assert_eq!(
        raw.call(RequestBody::CreateUser {
            user: user.clone(),
            password: password.clone()
        }),
        ReplyBody::Done
    );
    assert!(matches!(
        raw.call(RequestBody::Login {
            user,
            password,
            peer_addr: sharer_addr,
            shares: Vec::new(),
            client_key: [0; 32],
            link: 0,
        }),
        ReplyBody::LoggedIn { .. }
    ));
    assert_eq!(
        raw.call(RequestBody::CreateGroup {
            group: group.clone()
        }),
        ReplyBody::Done
    );

    // The sharer is played by this test in the plain peer protocol; the downloader speaks
    // it too (the test switch): this test is about the tracker link's failover.
    let mut downloader = Client::new(&client_info).plain_peer_links().live();
    downloader.cmd("create_user d pw-d", &["user d created"]);
    downloader.cmd("login d pw-d", &["logged in as d"]);
    downloader.cmd("join_group g", &["request to join group g sent"]);
    assert_eq!(
        raw.call(RequestBody::AcceptRequest {
            group: group.clone(),
            user: UserId::new("d").unwrap()
        }),
        ReplyBody::Done
    );
    assert!(matches!(
        raw.call(RequestBody::UploadFile { group, meta }),
        ReplyBody::Shared { .. }
    ));

    let (first_tx, first_rx) = mpsc::channel();
    let sharer = {
        let data = data.clone();
        thread::spawn(move || serve(sharer_listener, &data, 128 * 1024, first_tx))
    };
    let out_dir = dir.join("out");
    std::fs::create_dir(&out_dir).unwrap();
    downloader.send(&format!("download_file g data.bin {}/", out_dir.display()));
    let started = downloader.next_out();
    assert!(
        started.starts_with("download of data.bin from group g started"),
        "{started}"
    );
    first_rx
        .recv_timeout(IO_TIMEOUT)
        .expect("the download starts");
    // The tracker dies: the client fails over toward the address that accepts nothing, and
    // goes on doing so for the rest of the download.
    let killed_at = Instant::now();
    tracker.signal("KILL");

    let done = downloader.next_out_within(IO_TIMEOUT);
    let took = killed_at.elapsed();
    assert!(
        done.starts_with("downloaded data.bin from group g to"),
        "{done}"
    );
    let served = sharer.join().expect("the sharer thread").expect("serving");
    let target = out_dir.join("data.bin");
    assert!(
        std::fs::read(&target).unwrap() == data,
        "the file arrived intact"
    );
    assert!(
        took < Duration::from_secs(9),
        "the download ended during the failover ({took:?}); seen:\n{}",
        downloader.seen()
    );
    let mut round_trips = served.round_trips.clone();
    round_trips.sort();
    let n = round_trips.len();
    assert!(n >= 40, "{n} timed round trips of {}", served.blocks_sent);
    let p90 = round_trips[n * 9 / 10];
    let max = round_trips[n - 1];
    eprintln!(
        "{} blocks in {took:?} after the kill; round trips: median {:?}, p90 {p90:?}, max {max:?}; \
         {} connections held the silent tracker's queue full",
        served.blocks_sent,
        round_trips[n / 2],
        held.len()
    );
    // A reactor standing in a 500 ms connect to the silent address (as it did before the
    // tracker link became non-blocking) shows most round trips near that long.
    assert!(
        p90 < Duration::from_millis(250) && max < Duration::from_millis(1500),
        "round trips: p90 {p90:?}, max {max:?}; seen:\n{}",
        downloader.seen()
    );
}
