//! The unsent-limit rule on a fake clock.

use super::*;

const MIB: f64 = 1024.0 * 1024.0;

/// Writes `chunk` bytes every millisecond for `ms` milliseconds from `t`; returns the limits
/// reported and the time after.
fn stream(u: &mut UnsentLimit, mut t: Instant, chunk: usize, ms: u64) -> (Vec<u32>, Instant) {
    let mut set = Vec::new();
    for _ in 0..ms {
        t += Duration::from_millis(1);
        set.extend(u.on_written(chunk, t));
    }
    (set, t)
}

#[test]
fn the_limit_is_ten_milliseconds_of_the_rate_within_bounds() {
    assert_eq!(limit_for(0.0), MIN_UNSENT);
    assert_eq!(limit_for(f64::NAN), MIN_UNSENT);
    assert_eq!(limit_for(-5.0), MIN_UNSENT);
    // 100 Mbit/s: 125 kB in 10 ms, under the floor.
    assert_eq!(limit_for(12.5e6), MIN_UNSENT);
    // 1 Gbit/s: 1.25 MB.
    assert_eq!(limit_for(125e6), 1_250_000);
    // Loopback's hundreds of MiB a second, and beyond: the ceiling.
    assert_eq!(limit_for(700.0 * MIB), MAX_UNSENT);
    assert_eq!(limit_for(f64::INFINITY), MAX_UNSENT);
}

/// A link on a shaped 100 Mbit/s uplink keeps the 128 KiB it started with (issue 15's
/// setting): the socket option is never touched.
#[test]
fn a_slow_link_keeps_the_floor() {
    let mut u = UnsentLimit::new();
    // 12.5 kB a millisecond = 100 Mbit/s, for 2 s.
    let (set, _) = stream(&mut u, Instant::now(), 12_500, 2000);
    assert!(set.is_empty(), "{set:?}");
    assert_eq!(u.limit(), MIN_UNSENT);
}

/// A fast link (one downloader on loopback) gets the ceiling after one window, and back to
/// the floor once it slows down, each change reported once.
#[test]
fn a_fast_link_grows_and_shrinks_back() {
    let mut u = UnsentLimit::new();
    let t = Instant::now();
    // 700 MiB/s: about 734 kB a millisecond.
    let (set, t) = stream(&mut u, t, (700.0 * MIB / 1000.0) as usize, 500);
    assert_eq!(set, [MAX_UNSENT]);
    assert_eq!(u.limit(), MAX_UNSENT);
    // Now shaped to 100 Mbit/s.
    let (set, _) = stream(&mut u, t, 12_500, 500);
    assert_eq!(set, [MIN_UNSENT]);
}

/// Small moves of the rate do not touch the socket option; a doubling does.
#[test]
fn only_a_change_by_half_or_more_is_reported() {
    let mut u = UnsentLimit::new();
    let t = Instant::now();
    // 1 Gbit/s: 1.25 MB.
    let (set, t) = stream(&mut u, t, 125_000, 300);
    assert_eq!(set, [1_250_000]);
    // 1.5 Gbit/s: 1.875 MB, under twice the limit set.
    let (set, t) = stream(&mut u, t, 187_500, 300);
    assert!(set.is_empty(), "{set:?}");
    // 2.5 Gbit/s: 3.125 MB, over twice 1.25 MB.
    let (set, _) = stream(&mut u, t, 312_500, 300);
    assert_eq!(set, [3_125_000]);
}

/// A link that pauses (its turn passed, nothing requested) measures the pause in its rate: its
/// limit can only fall.
#[test]
fn a_pause_counts_as_slow() {
    let mut u = UnsentLimit::new();
    let t = Instant::now();
    let fast = (700.0 * MIB / 1000.0) as usize;
    let (set, t) = stream(&mut u, t, fast, 200);
    assert_eq!(set, [MAX_UNSENT]);
    // 10 s of nothing, then the link streams again: the window that holds the pause says
    // about 7 MB/s (73 MB in 10.1 s).
    let t = t + Duration::from_secs(10);
    assert_eq!(u.on_written(fast, t), Some(MIN_UNSENT));
    let (set, _) = stream(&mut u, t, fast, 200);
    assert_eq!(set, [MAX_UNSENT]);
}
