//! Tracker recovery benchmark (`cargo bench --bench recovery`): how long a tracker takes to
//! come back from its data directory, and to catch up with a serving tracker.
//!
//! It writes data directories through the library's own disk thread (`DataDir`, the same
//! records `tracker_program` writes): 1,000 users log in, then each change alternates
//! `CreateGroup g<i>` and `LeaveGroup g<i>` of one of them (as `cargo bench --bench
//! replication` does), in batches of 256 entries, with no snapshot, so a start-up replays
//! every record. Then, with real `tracker_program`s (release builds) on free loopback ports:
//!
//! - **start-up**: one tracker on the directory of N changes; the time from spawning it until
//!   it answers a client's hello with its welcome (recovery, then serving);
//! - **catch-up**: that tracker serving, a second one started on a directory holding the same
//!   history but `BEHIND` changes shorter; the time until the second one serves (its own
//!   replay included). Both directories carry the metadata of trackers that served together
//!   in view 1 under tracker 1, so the second one is sent only the changes it lacks when
//!   they are in the first one's ring of recent batches (refilled from its log at start-up),
//!   else a copy of the state.
//!
//! Knobs (environment): `RECOVERY_BENCH_CHANGES` (1,000,000), `RECOVERY_BENCH_BEHIND`
//! (100,000), `RECOVERY_BENCH_HISTORY` (1; 0 writes no metadata, as the benchmark did before
//! the suffix catch-up: the history is then unknown and the state is copied),
//! `RECOVERY_BENCH_TRACKER` (the `tracker_program` to run, this build's by default: another
//! build for an A/B comparison in one run), `RECOVERY_BENCH_LOG` (1: the trackers log at
//! `info` on stderr, which shows how the second one caught up). Every process is killed when
//! the benchmark ends, also on an error; the directories live in a temporary directory under
//! `target/` (on the real disk).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use p2pshare::tracker::disk::{DataDir, DiskEvent};
use p2pshare::tracker::durable::{self, Meta, Persist};
use p2pshare::tracker::state::{Entry, Op, Origin, SessionId, TrackerRef, TrackerState};
use p2pshare::wire::frame::{FrameBuffer, MAX_CLIENT_TRACKER_FRAME};
use p2pshare::wire::tracker_link::{ClientMsg, TrackerMsg};
use p2pshare::wire::{GroupId, UserId};

const TRACKER_BIN: &str = env!("CARGO_BIN_EXE_tracker_program");
const USERS: u64 = 1000;
const BATCH: usize = 256;
/// Longest wait of one step.
const STEP: Duration = Duration::from_secs(300);

type Res<T> = Result<T, String>;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

/// The `i`-th change of the history (the same for every directory).
fn change(i: u64) -> Entry {
    let tracker = TrackerRef {
        no: 1,
        incarnation: 7,
    };
    if i < USERS {
        return Entry {
            origin: Some(Origin {
                client: i + 1,
                req_id: 1,
            }),
            op: Op::CreateUser {
                user: UserId::new(&format!("u{i}")).expect("id"),
                pw_hash: format!(
                    "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0{i:06}$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g"
                ),
            },
        };
    }
    if i < 2 * USERS {
        let u = i - USERS;
        return Entry {
            origin: Some(Origin {
                client: u + 1,
                req_id: 2,
            }),
            op: Op::OpenSession {
                user: UserId::new(&format!("u{u}")).expect("id"),
                peer_addr: SocketAddr::from(([127, 0, 0, 1], 20_000 + u as u16)),
                tracker,
                client: u + 1,
                token: [(u % 251) as u8; 16],
                shares: None,
                client_key: [0; 32],
                link: 0,
            },
        };
    }
    let k = i - 2 * USERS;
    let u = k % USERS;
    // Sessions are numbered from 1 in the order they opened.
    let session = SessionId(u + 1);
    let group = GroupId::new(&format!("g{u}")).expect("id");
    let round = k / USERS;
    Entry {
        origin: Some(Origin {
            client: u + 1,
            req_id: 3 + round,
        }),
        op: if round.is_multiple_of(2) {
            Op::CreateGroup {
                session,
                group,
                quotas: None,
            }
        } else {
            Op::LeaveGroup { session, group }
        },
    }
}

/// Writes a data directory holding the first `n` changes (and, with `meta`, the metadata
/// before them); returns the state they make.
fn write_dir(dir: &Path, n: u64, meta: Option<Meta>) -> Res<TrackerState> {
    let (data, recovered) = DataDir::open(dir).map_err(|e| e.to_string())?;
    if recovered.last_seq != 0 {
        return Err(format!("{} is not empty", dir.display()));
    }
    let disk_started = Instant::now();
    let mut disk = data.start(Box::new(|| {})).map_err(|e| e.to_string())?;
    let mut state = TrackerState::new();
    let mut seq = 1;
    let mut last = None;
    if let Some(m) = meta {
        last = Some(
            disk.send(durable::to_disk_msg(Persist::Meta(m)))
                .map_err(|e| e.to_string())?,
        );
    }
    while seq <= n {
        let len = (n + 1 - seq).min(BATCH as u64);
        let entries: Vec<Entry> = (seq - 1..seq - 1 + len).map(change).collect();
        for e in &entries {
            let _ = state.apply_entry(e);
        }
        let msg = durable::to_disk_msg(Persist::Entries {
            first_seq: seq,
            entries: entries.into(),
        });
        last = Some(disk.send(msg).map_err(|e| e.to_string())?);
        seq += len;
        // Keep the queue short.
        while let Some(ev) = disk.try_event() {
            if let DiskEvent::Failed(e) = ev {
                return Err(e.to_string());
            }
        }
    }
    let want = last.ok_or("no changes")?;
    loop {
        match disk.wait_event(STEP) {
            Some(DiskEvent::Durable { ticket, .. }) if ticket >= want => break,
            Some(DiskEvent::Failed(e)) => return Err(e.to_string()),
            Some(_) => {}
            None => return Err("the disk thread did not answer".into()),
        }
    }
    disk.close();
    let bytes: u64 = std::fs::read_dir(dir)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    println!(
        "  wrote {n} changes to {} ({:.1} MiB) in {:.2?}",
        dir.display(),
        bytes as f64 / (1 << 20) as f64,
        disk_started.elapsed()
    );
    Ok(state)
}

fn free_addr() -> Res<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    l.local_addr().map_err(|e| e.to_string())
}

/// Kills its process when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_tracker(info: &Path, no: u16, data: &Path, home: &Path) -> Res<Proc> {
    let other = std::env::var("RECOVERY_BENCH_TRACKER").ok();
    let plain_flag = other.is_none().then_some("--accept-plain-clients");
    let bin = other.unwrap_or_else(|| TRACKER_BIN.into());
    let log = env_num("RECOVERY_BENCH_LOG", 0) == 1;
    let child = Command::new(bin)
        .env("XDG_STATE_HOME", home)
        .args(["--log-level", if log { "info" } else { "warn" }])
        // The bench's probes speak plain client frames, which trackers of this build refuse
        // unless told; a tracker given by RECOVERY_BENCH_TRACKER (an earlier build, for an
        // A/B) may predate the option and accept them anyway.
        .args(plain_flag)
        .args(["--data-dir"])
        .arg(data)
        .arg(info)
        .arg(no.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(if log { Stdio::inherit() } else { Stdio::null() })
        .spawn()
        .map_err(|e| format!("start tracker_program: {e}"))?;
    let mut proc = Proc(child);
    // Drain stdout so the tracker never blocks on it.
    if let Some(out) = proc.0.stdout.take() {
        let (tx, _rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    Ok(proc)
}

/// Waits until the tracker at `addr` welcomes a client (it serves).
fn wait_serving(addr: SocketAddr, proc: &mut Proc) -> Res<()> {
    let deadline = Instant::now() + STEP;
    loop {
        if let Ok(Some(status)) = proc.0.try_wait() {
            return Err(format!("the tracker exited: {status}"));
        }
        if Instant::now() > deadline {
            return Err("the tracker did not serve in time".into());
        }
        let Ok(mut s) = TcpStream::connect(addr) else {
            std::thread::sleep(Duration::from_millis(2));
            continue;
        };
        let mut hello = Vec::new();
        ClientMsg::hello(0xBE9C).emit(&mut hello);
        if s.write_all(&hello).is_err() {
            continue;
        }
        let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
        let mut buf = FrameBuffer::new(MAX_CLIENT_TRACKER_FRAME);
        let mut welcomed = false;
        let until = Instant::now() + Duration::from_secs(1);
        while Instant::now() < until {
            if let Ok(Some(payload)) = buf.next_frame() {
                welcomed = matches!(TrackerMsg::parse(payload), Ok(TrackerMsg::Welcome { .. }));
                break;
            }
            match s.read(buf.spare()) {
                Ok(0) => break,
                Ok(k) => buf.commit(k),
                Err(_) => {}
            }
        }
        if welcomed {
            return Ok(());
        }
    }
}

fn run() -> Res<()> {
    let n = env_num("RECOVERY_BENCH_CHANGES", 1_000_000).max(2 * USERS + 2);
    let behind = env_num("RECOVERY_BENCH_BEHIND", 100_000).min(n - 2 * USERS);
    let root = tempfile::Builder::new()
        .prefix("recovery-bench")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .map_err(|e| e.to_string())?;
    let home = root.path().join("home");
    let (d1, d2): (PathBuf, PathBuf) = (root.path().join("t1"), root.path().join("t2"));
    println!("recovery: {n} changes on disk; a second tracker {behind} changes behind");
    // Tracker 1 was primary of view 1 with tracker 2 as its backup, until tracker 2 stopped.
    let history = env_num("RECOVERY_BENCH_HISTORY", 1) == 1;
    let meta = |wait_for: &[u16]| {
        history.then(|| Meta {
            claim: (1, 1),
            accepted_view: 1,
            accepted_by: 1,
            highest_view: 1,
            wait_for: wait_for.iter().copied().collect(),
        })
    };
    write_dir(&d1, n, meta(&[]))?;
    write_dir(&d2, n - behind, meta(&[1]))?;
    let (a1, a2) = (free_addr()?, free_addr()?);
    let info = root.path().join("tracker_info.txt");
    std::fs::write(&info, format!("{a1}\n{a2}\n")).map_err(|e| e.to_string())?;

    let started = Instant::now();
    let mut t1 = start_tracker(&info, 1, &d1, &home)?;
    wait_serving(a1, &mut t1)?;
    println!(
        "  start-up: tracker 1 serves {:.2?} after it was started ({n} changes replayed)",
        started.elapsed()
    );
    let started = Instant::now();
    let mut t2 = start_tracker(&info, 2, &d2, &home)?;
    wait_serving(a2, &mut t2)?;
    println!(
        "  catch-up: tracker 2 ({behind} changes behind) serves {:.2?} after it was started",
        started.elapsed()
    );
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("recovery: failed: {e}");
        std::process::exit(1);
    }
}
