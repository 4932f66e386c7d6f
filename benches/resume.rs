//! Resume benchmark (`cargo bench --bench resume`): a download killed half-way and resumed.
//!
//! Starts the real binaries (release builds under `cargo bench`) on loopback: one tracker, one
//! sharer (`--serve`) and one downloader. The downloader fetches a file of random bytes; once
//! its resume record (`<target>.part.resume`) lists half the pieces as verified, it is killed
//! with SIGKILL and started again at the same address (so with the same state directory), its
//! user logs in, and the download goes on by itself. Printed, per run:
//!
//! - how far the first run got: pieces in the record at the kill, and the bytes the sharer
//!   served on that first link (from the sharer's log, `closed: N bytes of blocks`),
//! - bytes the sharer served after the restart (its second link), and as a share of the file,
//! - time from the restart (the process started) to the resumed download's first new block:
//!   from outside until the `resumed` line, plus the downloader's own `first block` log figure,
//! - time from the restart to the completion line, and whether the result is byte-identical.
//!
//! Knobs: `RESUME_BENCH_MIB` (file size, default 1024), `RESUME_BENCH_RUNS` (default 1),
//! `RESUME_BENCH_AT` (the fraction of pieces at which to kill, default 0.5),
//! `RESUME_BENCH_DIR` (where the files go, default the system temp dir).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{env_or, free_port, make_file, same_contents, Proc};

use p2pshare::client::part_record::{self, PartRecord};

const STEP_TIMEOUT: Duration = Duration::from_secs(300);
const PIECE: u64 = 512 * 1024;

/// The byte counts of the sharer's `closed: N bytes of blocks` log lines so far, in order.
fn served_per_link(log: &Path) -> Vec<u64> {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once("closed: ").map(|(_, r)| r))
        .filter_map(|r| r.split(' ').next().and_then(|n| n.parse().ok()))
        .collect()
}

/// Waits until `log` has at least `n` served-bytes lines; returns them.
fn wait_served(log: &Path, n: usize) -> Vec<u64> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let served = served_per_link(log);
        if served.len() >= n {
            return served;
        }
        assert!(
            Instant::now() < deadline,
            "the sharer never logged link {n}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The downloader's `first block X s after the download started` figure, from its log.
fn first_block_secs(log: &Path) -> Option<f64> {
    fs::read_to_string(log)
        .ok()?
        .lines()
        .filter_map(|l| l.split_once("first block ").map(|(_, r)| r))
        .filter_map(|r| r.split(' ').next().and_then(|n| n.parse().ok()))
        .next_back()
}

fn verified_in(record: &Path) -> usize {
    fs::read(record)
        .ok()
        .and_then(|b| PartRecord::decode(&b).ok())
        .map_or(0, |r| r.verified.count_ones())
}

fn main() {
    let mib: u64 = env_or("RESUME_BENCH_MIB", 1024);
    let runs: usize = env_or("RESUME_BENCH_RUNS", 1);
    let at: f64 = env_or("RESUME_BENCH_AT", 0.5);
    let base = std::env::var_os("RESUME_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::tempdir_in(base).expect("a temp dir");
    let dir = tmp.path();
    let client = env!("CARGO_BIN_EXE_client_program");
    let tracker_port = free_port();
    let info_path = dir.join("tracker_info.txt");
    fs::write(&info_path, format!("127.0.0.1:{tracker_port}\n")).expect("tracker file");
    let info = info_path.to_str().expect("utf-8");
    let mut tracker = Proc::start(
        env!("CARGO_BIN_EXE_tracker_program"),
        &[info, "1"],
        dir,
        STEP_TIMEOUT,
    );
    tracker.expect("listening");
    let file = dir.join("data.bin");
    make_file(&file, mib, 0);
    let size = mib * 1024 * 1024;
    let n_pieces = size.div_ceil(PIECE) as usize;
    println!(
        "file: {mib} MiB, {n_pieces} pieces; killing at {:.0}%",
        at * 100.0
    );

    for run in 0..runs {
        let sharer_log = dir.join(format!("sharer-{run}.log"));
        let sharer_addr = format!("127.0.0.1:{}", free_port());
        let log_file = sharer_log.to_str().expect("utf-8");
        let mut sharer = Proc::start(
            client,
            &[
                "--serve",
                "--log-level",
                "info",
                "--log-file",
                log_file,
                &sharer_addr,
                info,
            ],
            dir,
            STEP_TIMEOUT,
        );
        let (owner, group) = (format!("s{run}"), format!("g{run}"));
        sharer.send(&format!("create_user {owner} pw"));
        sharer.send(&format!("login {owner} pw"));
        sharer.expect("logged in");
        sharer.send(&format!("create_group {group}"));
        sharer.expect("created");
        sharer.send(&format!("upload_file {} {group}", file.display()));
        sharer.expect(" group ");

        let d_addr = format!("127.0.0.1:{}", free_port());
        let d_log = dir.join(format!("downloader-{run}.log"));
        let d_args = [
            "--log-level",
            "info",
            "--log-file",
            d_log.to_str().expect("utf-8"),
            &d_addr,
            info,
        ];
        let user = format!("d{run}");
        let mut d = Proc::start(client, &d_args, dir, STEP_TIMEOUT);
        d.send(&format!("create_user {user} pw"));
        d.send(&format!("login {user} pw"));
        d.expect("logged in");
        d.send(&format!("join_group {group}"));
        d.expect("request to join");
        sharer.send(&format!("accept_request {group} {user}"));
        sharer.expect("accepted");
        let target = dir.join(format!("out-{run}"));
        let record = part_record::record_path(&target);
        d.send(&format!(
            "download_file {group} data.bin {}",
            target.display()
        ));
        d.expect("started");
        let kill_at = ((n_pieces as f64) * at).ceil() as usize;
        let t0 = Instant::now();
        while verified_in(&record) < kill_at {
            assert!(
                t0.elapsed() < STEP_TIMEOUT,
                "the record never reached {kill_at}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        d.kill();
        let recorded = verified_in(&record);
        let first = wait_served(&sharer_log, 1)[0];

        let restart = Instant::now();
        let mut d = Proc::start(client, &d_args, dir, STEP_TIMEOUT);
        d.send(&format!("login {user} pw"));
        d.expect("logged in");
        let resumed = d.expect("resumed");
        let to_resumed = restart.elapsed().as_secs_f64();
        let done = d.expect("downloaded ");
        let total = restart.elapsed().as_secs_f64();
        let after = wait_served(&sharer_log, 2)[1];
        let identical = same_contents(&file, &target);
        let first_block = first_block_secs(&d_log);
        println!(
            "run {run}: killed with {recorded} of {n_pieces} pieces recorded ({:.1}%); the sharer had served {:.1} MiB",
            100.0 * recorded as f64 / n_pieces as f64,
            first as f64 / 1048576.0
        );
        println!(
            "  after the restart the sharer served {:.1} MiB ({:.1}% of the file); restart to \
             first new block {}; restart to completion {total:.3} s; identical: {identical}",
            after as f64 / 1048576.0,
            100.0 * after as f64 / size as f64,
            match first_block {
                Some(s) => format!(
                    "{:.3} s ({to_resumed:.3} s to the resumed line + {s:.3} s)",
                    to_resumed + s
                ),
                None => "unknown".into(),
            }
        );
        println!("  {resumed}");
        println!("  {done}");
        assert!(identical, "the resumed download differs");
        d.send("quit");
        sharer.kill();
        let _ = fs::remove_file(&target);
    }
}
