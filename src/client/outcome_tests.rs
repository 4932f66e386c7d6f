use std::path::PathBuf;
use std::time::Duration;

use super::*;
use crate::testing::{fname, gid};

fn started(resumed: Option<Resumed>) -> Started {
    Started {
        name: fname("f.bin"),
        group: gid("g1"),
        target: PathBuf::from("/tmp/x/f.bin"),
        size: 1_048_576,
        n_sharers: 3,
        resumed,
    }
}

#[test]
fn a_started_download_prints_the_line_the_tests_read() {
    assert_eq!(
        started(None).to_string(),
        "download of f.bin from group g1 started: /tmp/x/f.bin (1048576 bytes, 3 sharers online)"
    );
    let resumed = Resumed {
        to_verify: 5,
        n_pieces: 8,
    };
    assert_eq!(
        started(Some(resumed)).to_string(),
        "download of f.bin from group g1 resumed: /tmp/x/f.bin (1048576 bytes, 3 sharers online, \
         5 of 8 pieces to verify again)"
    );
}

#[test]
fn a_completed_download_prints_its_size_time_and_rate() {
    let done = Completed {
        name: fname("f.bin"),
        group: gid("g1"),
        target: PathBuf::from("/tmp/x/f.bin"),
        size: 4 * 1024 * 1024,
        elapsed: Duration::from_millis(500),
    };
    assert_eq!(
        done.to_string(),
        "downloaded f.bin from group g1 to /tmp/x/f.bin (4194304 bytes in 0.500 s, 8.0 MiB/s)"
    );
    // An empty file completes at once: no division by zero.
    let empty = Completed {
        size: 0,
        elapsed: Duration::ZERO,
        ..done
    };
    assert_eq!(
        empty.to_string(),
        "downloaded f.bin from group g1 to /tmp/x/f.bin (0 bytes in 0.000 s, 0.0 MiB/s)"
    );
}

#[test]
fn sharers_errors_read_as_before() {
    assert_eq!(SharersError::NotLoggedIn.to_string(), "not logged in");
    assert_eq!(
        SharersError::Refused("no such file".into()).to_string(),
        "no such file"
    );
    assert_eq!(
        SharersError::Unexpected("Done".into()).to_string(),
        "unexpected answer Done"
    );
    assert_eq!(
        SharersError::ConnectionLost.to_string(),
        "lost the connection to the tracker"
    );
}
