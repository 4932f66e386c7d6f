//! Tests of the data directory: recovery after every kind of crash and damage, the disk
//! thread's group commit, compaction, and the lock.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::format::{self, SEGMENT_HEADER_LEN};
use super::*;

const WAIT: Duration = Duration::from_secs(60);

fn rec(first_seq: u64, last_seq: u64) -> LogRecord {
    LogRecord {
        first_seq,
        last_seq,
        payload: format!("entries {first_seq}..={last_seq}").into_bytes(),
    }
}

fn open(dir: &Path) -> (DataDir, Recovered) {
    DataDir::open(dir).unwrap_or_else(|e| panic!("open {}: {e}", dir.display()))
}

fn small_segments() -> DiskOptions {
    DiskOptions { segment_size: 4096 }
}

/// Starts the disk thread, sends `msgs`, waits until the last is durable (and every
/// snapshot among them is reported), closes, and returns the events seen.
fn run_with(data: DataDir, msgs: Vec<DiskMsg>) -> Vec<DiskEvent> {
    let n_snapshots = msgs
        .iter()
        .filter(|m| matches!(m, DiskMsg::Snapshot(..)))
        .count();
    let mut disk = data.start(Box::new(|| {})).unwrap();
    let mut last = None;
    for m in msgs {
        last = Some(disk.send(m).unwrap());
    }
    let mut events = Vec::new();
    let mut durable_done = last.is_none();
    let mut snapshots_seen = 0;
    while !durable_done || snapshots_seen < n_snapshots {
        let e = disk
            .wait_event(WAIT)
            .expect("no event from the disk thread");
        match &e {
            DiskEvent::Durable { ticket, .. } => durable_done |= Some(*ticket) == last,
            DiskEvent::Snapshotted { .. } => snapshots_seen += 1,
            DiskEvent::Failed(err) => panic!("disk failed: {err}"),
        }
        events.push(e);
    }
    disk.close();
    events
}

fn run(dir: &Path, msgs: Vec<DiskMsg>) -> Vec<DiskEvent> {
    let (data, _) = open(dir);
    run_with(data, msgs)
}

fn appends(seqs: std::ops::RangeInclusive<u64>) -> Vec<DiskMsg> {
    seqs.map(|s| DiskMsg::Append(rec(s, s))).collect()
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

/// Offsets of every record in a segment file.
fn record_offsets(bytes: &[u8]) -> Vec<usize> {
    let mut at = SEGMENT_HEADER_LEN;
    let mut offsets = Vec::new();
    while at < bytes.len() {
        offsets.push(at);
        at = format::parse_record(bytes, at).unwrap().1;
    }
    offsets
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn round_trip_and_reopen_to_append_more() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let (data, recovered) = open(&dir);
    assert_eq!(recovered, Recovered::default());
    let mut msgs = vec![DiskMsg::SetMeta(b"view 1".to_vec())];
    msgs.push(DiskMsg::Append(rec(1, 3)));
    msgs.push(DiskMsg::Append(rec(4, 4)));
    msgs.push(DiskMsg::SetMeta(b"view 2".to_vec()));
    let events = run_with(data, msgs);
    assert!(matches!(
        events.last(),
        Some(DiskEvent::Durable {
            seq: 4,
            ticket: Ticket(4)
        })
    ));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );

    let (data, recovered) = open(&dir);
    assert_eq!(recovered.meta.as_deref(), Some(&b"view 2"[..]));
    assert_eq!(recovered.records, vec![rec(1, 3), rec(4, 4)]);
    assert_eq!(recovered.last_seq, 4);
    assert_eq!(recovered.snapshot, None);
    run_with(data, appends(5..=6));

    let (_, recovered) = open(&dir);
    assert_eq!(
        recovered.records,
        vec![rec(1, 3), rec(4, 4), rec(5, 5), rec(6, 6)]
    );
    assert_eq!(recovered.meta.as_deref(), Some(&b"view 2"[..]));
    assert_eq!(recovered.torn_tail, None);
}

#[test]
fn torn_tail_at_every_byte_offset_of_the_last_record() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    run(&base, appends(1..=5));
    let seg = segment_files(&base).pop().unwrap();
    let bytes = fs::read(&seg).unwrap();
    let last = *record_offsets(&bytes).last().unwrap();
    for cut in last..bytes.len() {
        let dir = tmp.path().join(format!("cut-{cut}"));
        copy_dir(&base, &dir);
        let path = dir.join(seg.file_name().unwrap());
        fs::write(&path, &bytes[..cut]).unwrap();
        let (data, recovered) = open(&dir);
        assert_eq!(
            recovered.records,
            (1..=4).map(|s| rec(s, s)).collect::<Vec<_>>()
        );
        let torn = recovered.torn_tail.clone();
        if cut == last {
            assert_eq!(torn, None, "cut {cut}");
        } else {
            assert_eq!(
                torn,
                Some(TornTail {
                    path: path.clone(),
                    offset: last as u64,
                    bytes_dropped: (cut - last) as u64
                }),
                "cut {cut}"
            );
        }
        assert_eq!(fs::metadata(&path).unwrap().len(), last as u64);
        // The log goes on right after the last valid record.
        run_with(data, appends(5..=5));
        let (_, again) = open(&dir);
        assert_eq!(
            again.records,
            (1..=5).map(|s| rec(s, s)).collect::<Vec<_>>()
        );
        assert_eq!(again.torn_tail, None);
        fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn a_flipped_byte_in_the_last_record_is_a_torn_tail() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    run(&dir, appends(1..=3));
    let seg = segment_files(&dir).pop().unwrap();
    let mut bytes = fs::read(&seg).unwrap();
    let last = *record_offsets(&bytes).last().unwrap();
    let n = bytes.len();
    bytes[n - 2] ^= 0x10;
    fs::write(&seg, &bytes).unwrap();
    let (_, recovered) = open(&dir);
    assert_eq!(recovered.records, vec![rec(1, 1), rec(2, 2)]);
    assert_eq!(recovered.torn_tail.unwrap().offset, last as u64);
}

#[test]
fn a_flipped_byte_in_the_middle_is_an_error_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    run(&base, appends(1..=5));
    let seg = segment_files(&base).pop().unwrap();
    let bytes = fs::read(&seg).unwrap();
    let third = record_offsets(&bytes)[2];
    // In the payload, in the length field, in the marker.
    for (i, at) in [third + 20, third + 5, third].into_iter().enumerate() {
        let dir = tmp.path().join(format!("d{i}"));
        copy_dir(&base, &dir);
        let path = dir.join(seg.file_name().unwrap());
        let mut bad = bytes.clone();
        bad[at] ^= 0x01;
        fs::write(&path, &bad).unwrap();
        let err = DataDir::open(&dir)
            .err()
            .expect("damage must stop recovery");
        match &err {
            DiskError::Corrupt {
                path: p, offset, ..
            } => {
                assert_eq!(p, &path);
                assert_eq!(*offset, third as u64);
            }
            other => panic!("expected Corrupt, got {other}"),
        }
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains(&format!("offset {third}")), "{text}");
        // Nothing was cut: the file is as it was.
        assert_eq!(fs::read(&path).unwrap(), bad);
    }
}

#[test]
fn damage_in_a_closed_segment_is_an_error_even_at_its_end() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let (data, _) = DataDir::open_with(&dir, small_segments()).unwrap();
    run_with(data, appends(1..=200));
    let segs = segment_files(&dir);
    assert!(segs.len() >= 3, "{segs:?}");
    let mut bytes = fs::read(&segs[0]).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0x01;
    fs::write(&segs[0], &bytes).unwrap();
    match DataDir::open(&dir) {
        Err(DiskError::Corrupt { path, .. }) => assert_eq!(path, segs[0]),
        Err(e) => panic!("expected Corrupt, got {e}"),
        Ok(_) => panic!("damage in a closed segment was accepted"),
    }
}

#[test]
fn a_missing_segment_in_the_middle_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let (data, _) = DataDir::open_with(&dir, small_segments()).unwrap();
    run_with(data, appends(1..=200));
    let segs = segment_files(&dir);
    assert!(segs.len() >= 3);
    fs::remove_file(&segs[1]).unwrap();
    match DataDir::open(&dir) {
        Err(e @ DiskError::MissingSegment { .. }) => {
            assert!(e.to_string().contains("0000000000000002"), "{e}");
        }
        Err(e) => panic!("expected MissingSegment, got {e}"),
        Ok(_) => panic!("a hole in the log was accepted"),
    }
    // The first segment gone: the log no longer starts at seq 1 and no snapshot covers it.
    let dir2 = tmp.path().join("d2");
    let (data, _) = DataDir::open_with(&dir2, small_segments()).unwrap();
    run_with(data, appends(1..=200));
    fs::remove_file(&segment_files(&dir2)[0]).unwrap();
    assert!(matches!(
        DataDir::open(&dir2),
        Err(DiskError::Gap {
            expected_seq: 1,
            ..
        })
    ));
}

#[test]
fn segments_roll_over_and_compaction_follows_snapshots() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let (data, _) = DataDir::open_with(&dir, small_segments()).unwrap();
    let mut msgs = vec![DiskMsg::SetMeta(b"m".to_vec())];
    msgs.extend(appends(1..=300));
    run_with(data, msgs);
    let before = segment_files(&dir);
    assert!(before.len() >= 3, "{} segments", before.len());
    // A record larger than a segment gets one of its own.
    let (data, _) = DataDir::open_with(&dir, small_segments()).unwrap();
    let big = LogRecord {
        first_seq: 301,
        last_seq: 301,
        payload: vec![7; 10_000],
    };
    let mut msgs = vec![DiskMsg::Append(big.clone())];
    msgs.extend(appends(302..=310));
    msgs.push(DiskMsg::Snapshot(150, b"state@150".to_vec()));
    run_with(data, msgs);
    // One snapshot: nothing dropped yet (it could be damaged: the log stays whole).
    assert!(segment_files(&dir).len() >= before.len());
    let (data, _) = DataDir::open_with(&dir, small_segments()).unwrap();
    let mut msgs = appends(311..=400);
    msgs.push(DiskMsg::Snapshot(250, b"state@250".to_vec()));
    run_with(data, msgs);
    let after = segment_files(&dir);
    assert!(after[0] > before[0], "the oldest segments were dropped");

    let (_, recovered) = DataDir::open_with(&dir, small_segments()).unwrap();
    assert_eq!(recovered.snapshot, Some((250, b"state@250".to_vec())));
    assert_eq!(recovered.records.first(), Some(&rec(251, 251)));
    assert_eq!(recovered.records.len(), 150);
    assert!(recovered.records.contains(&big));
    assert_eq!(recovered.meta.as_deref(), Some(&b"m"[..]));
    assert_eq!(recovered.last_seq, 400);

    // The log still reaches back to the previous snapshot: with the newest one damaged,
    // recovery falls back to it and replays more of the log.
    let snap = dir.join(snapshot_name(250));
    let mut bytes = fs::read(&snap).unwrap();
    bytes[30] ^= 0xff;
    fs::write(&snap, &bytes).unwrap();
    let (_, recovered) = DataDir::open_with(&dir, small_segments()).unwrap();
    assert_eq!(recovered.snapshot, Some((150, b"state@150".to_vec())));
    assert_eq!(recovered.records.first(), Some(&rec(151, 151)));
    assert_eq!(recovered.last_seq, 400);

    // Snapshots older than the two newest are removed; so is the damaged one, once a newer
    // one exists.
    let (data, _) = DataDir::open_with(&dir, small_segments()).unwrap();
    let mut msgs = appends(401..=450);
    msgs.push(DiskMsg::Snapshot(420, b"state@420".to_vec()));
    run_with(data, msgs);
    let mut snaps: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".snap"))
        .collect();
    snaps.sort();
    assert_eq!(snaps, vec![snapshot_name(150), snapshot_name(420)]);
}

#[test]
fn missing_snapshots_stop_recovery_when_the_log_does_not_reach_back() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let (data, _) = DataDir::open_with(&dir, small_segments()).unwrap();
    let mut msgs = appends(1..=200);
    msgs.push(DiskMsg::Snapshot(100, b"s100".to_vec()));
    msgs.extend(appends(201..=300));
    msgs.push(DiskMsg::Snapshot(250, b"s250".to_vec()));
    run_with(data, msgs);
    // The newest gone: the older one and the log still give everything.
    fs::remove_file(dir.join(snapshot_name(250))).unwrap();
    let (_, recovered) = open(&dir);
    assert_eq!(recovered.snapshot.as_ref().map(|s| s.0), Some(100));
    assert_eq!(recovered.last_seq, 300);
    // Both gone: the log was cut behind the older one.
    fs::remove_file(dir.join(snapshot_name(100))).unwrap();
    match DataDir::open(&dir) {
        Err(
            e @ DiskError::Gap {
                expected_seq: 1, ..
            },
        ) => {
            assert!(e.to_string().contains("missing"), "{e}");
        }
        Err(e) => panic!("expected Gap, got {e}"),
        Ok(_) => panic!("recovered without the snapshot the log needs"),
    }
}

#[test]
fn a_damaged_snapshot_the_log_cannot_replace_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    // A state installed from elsewhere (past the last appended seq), then a few appends.
    let mut msgs = appends(1..=3);
    msgs.push(DiskMsg::Snapshot(1000, b"installed".to_vec()));
    msgs.extend(appends(1001..=1002));
    run(&dir, msgs);
    let (_, recovered) = open(&dir);
    assert_eq!(recovered.snapshot, Some((1000, b"installed".to_vec())));
    assert_eq!(recovered.records, vec![rec(1001, 1001), rec(1002, 1002)]);

    let snap = dir.join(snapshot_name(1000));
    let mut bytes = fs::read(&snap).unwrap();
    bytes[5] ^= 1;
    fs::write(&snap, &bytes).unwrap();
    match DataDir::open(&dir) {
        Err(e @ DiskError::Gap { .. }) => {
            assert!(e.to_string().contains(&snap.display().to_string()), "{e}")
        }
        Err(e) => panic!("expected Gap, got {e}"),
        Ok(_) => panic!("recovered an older state past a damaged snapshot"),
    }
    // Without records after it, the damaged snapshot is still newer than the whole log.
    let dir2 = tmp.path().join("d2");
    let mut msgs = appends(1..=3);
    msgs.push(DiskMsg::Snapshot(1000, b"installed".to_vec()));
    run(&dir2, msgs);
    let snap2 = dir2.join(snapshot_name(1000));
    fs::write(&snap2, b"garbage").unwrap();
    assert!(matches!(
        DataDir::open(&dir2),
        Err(DiskError::BadNewestSnapshot {
            recovered_seq: 3,
            ..
        })
    ));
}

#[test]
fn truncation_markers_void_later_records_on_recovery() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let msgs = vec![
        DiskMsg::Append(rec(1, 2)),
        DiskMsg::Append(rec(3, 4)),
        DiskMsg::Append(rec(5, 6)),
        DiskMsg::TruncateFrom(3),
        DiskMsg::Append(LogRecord {
            first_seq: 3,
            last_seq: 3,
            payload: b"new 3".to_vec(),
        }),
        // Past the end: nothing to void.
        DiskMsg::TruncateFrom(10),
    ];
    let events = run(&dir, msgs);
    assert!(matches!(
        events.last(),
        Some(DiskEvent::Durable {
            seq: 3,
            ticket: Ticket(6)
        })
    ));
    let (data, recovered) = open(&dir);
    let new3 = LogRecord {
        first_seq: 3,
        last_seq: 3,
        payload: b"new 3".to_vec(),
    };
    assert_eq!(recovered.records, vec![rec(1, 2), new3.clone()]);
    assert_eq!(recovered.last_seq, 3);
    // Truncating everything, then starting again.
    run_with(
        data,
        vec![DiskMsg::TruncateFrom(1), DiskMsg::Append(rec(1, 1))],
    );
    let (_, recovered) = open(&dir);
    assert_eq!(recovered.records, vec![rec(1, 1)]);
}

fn expect_failure(dir: &Path, msgs: Vec<DiskMsg>) -> DiskError {
    let (data, _) = open(dir);
    let mut disk = data.start(Box::new(|| {})).unwrap();
    for m in msgs {
        let _ = disk.send(m);
    }
    loop {
        match disk.wait_event(WAIT).expect("no event") {
            DiskEvent::Failed(e) => return e,
            DiskEvent::Durable { .. } | DiskEvent::Snapshotted { .. } => {}
        }
    }
}

#[test]
fn misuse_stops_the_disk_thread() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: Vec<Vec<DiskMsg>> = vec![
        vec![DiskMsg::Append(rec(2, 2))],
        vec![DiskMsg::Append(rec(1, 1)), DiskMsg::Append(rec(1, 1))],
        vec![DiskMsg::Append(rec(1, 3)), DiskMsg::TruncateFrom(2)],
        vec![
            DiskMsg::Append(rec(1, 3)),
            DiskMsg::Snapshot(2, vec![]),
            DiskMsg::TruncateFrom(2),
        ],
    ];
    for (i, msgs) in cases.into_iter().enumerate() {
        let dir = tmp.path().join(format!("d{i}"));
        let err = expect_failure(&dir, msgs);
        assert!(matches!(err, DiskError::Misuse(_)), "case {i}: {err}");
    }
}

#[test]
fn durability_reports_cover_everything_sent_before_them() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let (data, _) = open(&dir);
    let woken = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let w = woken.clone();
    let mut disk = data
        .start(Box::new(move || {
            w.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }))
        .unwrap();
    let seg = segment_files(&dir).pop().unwrap();
    let n = 2000u64;
    let mut tickets = Vec::new();
    let mut durable = Vec::new();
    for s in 1..=n {
        tickets.push(disk.send(DiskMsg::Append(rec(s, s))).unwrap());
        while let Some(e) = disk.try_event() {
            durable.push(e);
        }
    }
    assert_eq!(tickets.last(), Some(&Ticket(n)));
    while !matches!(durable.last(), Some(DiskEvent::Durable { ticket, .. }) if *ticket == Ticket(n))
    {
        durable.push(disk.wait_event(WAIT).expect("no event"));
    }
    let mut prev = Ticket(0);
    for e in &durable {
        let DiskEvent::Durable { seq, ticket } = e else {
            panic!("unexpected {e:?}")
        };
        // Ticket t is the append of seq t here.
        assert_eq!(*seq, ticket.0);
        assert!(*ticket > prev);
        prev = *ticket;
        // Everything covered is in the file already (it was written before the fsync).
        let bytes = fs::read(&seg).unwrap();
        assert!(record_offsets(&bytes).len() as u64 >= *seq);
    }
    assert!(
        (durable.len() as u64) < n,
        "group commit: {} fsync reports for {n} appends",
        durable.len()
    );
    assert_eq!(disk.queued_bytes(), 0);
    // The disk thread sends an event, then wakes the reactor: only once it has stopped is
    // every wake-up for the events read done.
    disk.close();
    assert!(woken.load(std::sync::atomic::Ordering::Relaxed) >= durable.len() as u64);
}

#[test]
fn a_second_data_dir_in_this_process_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let (first, _) = open(&dir);
    match DataDir::open(&dir) {
        Err(e @ DiskError::Locked(_)) => {
            assert!(e.to_string().contains("in use"), "{e}");
        }
        Err(e) => panic!("expected Locked, got {e}"),
        Ok(_) => panic!("two openers of one data dir"),
    }
    // A running disk thread holds it too, until it is closed.
    let disk = first.start(Box::new(|| {})).unwrap();
    assert!(matches!(DataDir::open(&dir), Err(DiskError::Locked(_))));
    disk.close();
    open(&dir);
}

const HELPER_ENV: &str = "P2PSHARE_DISK_LOCK_HELPER";
const HELPER_READY: &str = "lock-helper-holds-the-lock";

/// Not a test by itself: run by `a_data_dir_locked_by_another_process_is_refused` in a child
/// process (this same test binary), it holds the lock until its stdin closes.
#[test]
#[ignore]
fn lock_holder_helper() {
    let Some(dir) = std::env::var_os(HELPER_ENV) else {
        return;
    };
    let _held = open(Path::new(&dir));
    // The test harness may print its own text on the same line: look for a token.
    println!("\n{HELPER_READY}");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

#[test]
fn a_data_dir_locked_by_another_process_is_refused() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "tracker::disk::tests::lock_holder_helper",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, &dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Kill(child);
    let stdout = child.0.stdout.take().unwrap();
    // Lines are read on a thread so that the wait for the helper is bounded in time.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = std::time::Instant::now() + WAIT;
    let mut locked = false;
    while let Ok(line) =
        rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
    {
        if line.contains(HELPER_READY) {
            locked = true;
            break;
        }
    }
    assert!(locked, "the helper process did not take the lock");
    match DataDir::open(&dir) {
        Err(DiskError::Locked(path)) => assert_eq!(path, dir.join("LOCK")),
        Err(e) => panic!("expected Locked, got {e}"),
        Ok(_) => panic!("a data dir held by another process was opened"),
    }
    drop(child.0.stdin.take());
    let _ = child.0.wait();
    // Released by the helper's exit.
    open(&dir);
}

#[test]
fn unfinished_temporary_files_are_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    run(&dir, appends(1..=2));
    let stray = dir.join(format!("{}.tmp", snapshot_name(9)));
    fs::write(&stray, b"half a snapshot").unwrap();
    let (_, recovered) = open(&dir);
    assert_eq!(recovered.records.len(), 2);
    assert!(!stray.exists());
}

#[test]
fn the_default_data_dir_is_per_user_and_per_address() {
    let addr: std::net::SocketAddr = "127.0.0.1:6000".parse().unwrap();
    assert_eq!(
        default_data_dir(Some("/x/state".into()), Some("/home/u".into()), addr).unwrap(),
        PathBuf::from("/x/state/p2pshare/tracker-127.0.0.1-6000")
    );
    for xdg in [None, Some("".into()), Some("relative".into())] {
        assert_eq!(
            default_data_dir(xdg, Some("/home/u".into()), addr).unwrap(),
            PathBuf::from("/home/u/.local/state/p2pshare/tracker-127.0.0.1-6000")
        );
    }
    let v6: std::net::SocketAddr = "[::1]:7".parse().unwrap();
    assert_eq!(
        default_data_dir(Some("/s".into()), None, v6).unwrap(),
        PathBuf::from("/s/p2pshare/tracker---1-7")
    );
    assert!(default_data_dir(None, None, addr).is_err());
}

/// A small deterministic generator (xorshift), so a failing seed can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What recovery must give back, kept by the test alongside the real directory.
#[derive(Default)]
struct Model {
    records: Vec<LogRecord>,
    last_seq: u64,
    meta: Option<Vec<u8>>,
    snapshot: Option<(u64, Vec<u8>)>,
}

impl Model {
    fn snap_seq(&self) -> u64 {
        self.snapshot.as_ref().map_or(0, |s| s.0)
    }

    fn expected(&self) -> (Option<(u64, Vec<u8>)>, Vec<LogRecord>) {
        let s = self.snap_seq();
        let records = self
            .records
            .iter()
            .filter(|r| r.last_seq > s)
            .cloned()
            .collect();
        (self.snapshot.clone(), records)
    }

    /// A random next message, applied to the model.
    fn step(&mut self, rng: &mut Rng) -> DiskMsg {
        match rng.below(20) {
            0 => {
                let blob = format!("meta {}", rng.next()).into_bytes();
                self.meta = Some(blob.clone());
                DiskMsg::SetMeta(blob)
            }
            1 if self.last_seq > self.snap_seq() => {
                let seq = self.snap_seq() + 1 + rng.below(self.last_seq - self.snap_seq());
                let state = format!("state@{seq}").into_bytes();
                self.snapshot = Some((seq, state.clone()));
                DiskMsg::Snapshot(seq, state)
            }
            2 => {
                // A state installed from elsewhere, past the end of the log.
                let seq = self.last_seq + 1 + rng.below(50);
                let state = format!("installed@{seq}").into_bytes();
                self.snapshot = Some((seq, state.clone()));
                self.last_seq = seq;
                DiskMsg::Snapshot(seq, state)
            }
            3 | 4 => {
                let floor = self.snap_seq();
                let boundaries: Vec<u64> = self
                    .records
                    .iter()
                    .rev()
                    .take(5)
                    .map(|r| r.first_seq)
                    .filter(|&f| f > floor)
                    .collect();
                if boundaries.is_empty() {
                    return self.step(rng);
                }
                let from = boundaries[rng.below(boundaries.len() as u64) as usize];
                self.records.retain(|r| r.first_seq < from);
                self.last_seq = from - 1;
                DiskMsg::TruncateFrom(from)
            }
            _ => {
                let first_seq = self.last_seq + 1;
                let last_seq = first_seq + rng.below(3);
                let len = rng.below(700) as usize;
                let fill = rng.next() as u8;
                let r = LogRecord {
                    first_seq,
                    last_seq,
                    payload: vec![fill; len],
                };
                self.records.push(r.clone());
                self.last_seq = last_seq;
                DiskMsg::Append(r)
            }
        }
    }
}

#[test]
fn random_histories_recover_exactly_across_reopens() {
    for seed in 1..=8u64 {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut model = Model::default();
        for round in 0..6 {
            let (data, recovered) = DataDir::open_with(&dir, small_segments()).unwrap();
            let (snapshot, records) = model.expected();
            let what = format!("seed {seed} round {round}");
            assert_eq!(recovered.snapshot, snapshot, "{what}");
            assert_eq!(recovered.records, records, "{what}");
            assert_eq!(recovered.meta, model.meta, "{what}");
            assert_eq!(recovered.last_seq, model.last_seq, "{what}");
            let mut disk = data.start(Box::new(|| {})).unwrap();
            let mut last = Ticket(0);
            for _ in 0..rng.below(150) {
                let msg = model.step(&mut rng);
                last = disk.send(msg).unwrap();
            }
            let mut durable = Ticket(0);
            while durable < last {
                match disk.wait_event(WAIT).expect("no event") {
                    DiskEvent::Durable { ticket, seq } => {
                        durable = ticket;
                        if ticket == last {
                            assert_eq!(seq, model.last_seq, "{what}");
                        }
                    }
                    DiskEvent::Snapshotted { .. } => {}
                    DiskEvent::Failed(e) => panic!("{what}: {e}"),
                }
            }
            disk.close();
        }
    }
}

#[test]
fn an_install_voids_the_records_past_it_and_the_log_goes_on_after_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let other = |first, last| LogRecord {
        payload: format!("other {first}..={last}").into_bytes(),
        ..rec(first, last)
    };
    run(
        &dir,
        vec![
            DiskMsg::Append(rec(1, 3)),
            DiskMsg::Append(rec(4, 5)),
            // The service kept another history from entry 4 on.
            DiskMsg::Install(3, b"state@3".to_vec()),
            DiskMsg::Append(other(4, 4)),
        ],
    );
    let (data, recovered) = open(&dir);
    assert_eq!(recovered.snapshot, Some((3, b"state@3".to_vec())));
    let tail: Vec<&LogRecord> = recovered
        .records
        .iter()
        .filter(|r| r.last_seq > 3)
        .collect();
    assert_eq!(tail, vec![&other(4, 4)]);
    assert_eq!(recovered.last_seq, 4);
    // A state from far ahead: the log continues after it.
    run_with(
        data,
        vec![
            DiskMsg::Install(10, b"state@10".to_vec()),
            DiskMsg::Append(rec(11, 12)),
        ],
    );
    let (_, recovered) = open(&dir);
    assert_eq!(recovered.snapshot, Some((10, b"state@10".to_vec())));
    assert_eq!(recovered.records, vec![rec(11, 12)]);
    assert_eq!(recovered.last_seq, 12);
}

#[test]
fn the_first_tracker_with_a_key_founds_the_service_and_not_after_its_directory_is_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let marker = tmp.path().join("service-x.founder");
    let (a, b) = (tmp.path().join("tracker-a"), tmp.path().join("tracker-b"));
    assert!(found_service(&marker, &a, false).unwrap());
    assert!(!found_service(&marker, &b, false).unwrap());
    // Started again on its directory (it may have died before anything was durable): still
    // the founder.
    assert!(found_service(&marker, &a, true).unwrap());
    assert!(!found_service(&marker, &b, true).unwrap());
    // Its directory removed meanwhile: a member that waits to join, never a second founder
    // of an empty service.
    assert!(!found_service(&marker, &a, false).unwrap());
    assert!(fs::read_dir(tmp.path()).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".tmp")));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&marker).unwrap().permissions().mode() & 0o777,
        0o600
    );
}
