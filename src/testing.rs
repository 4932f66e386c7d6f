//! Helpers shared by the unit tests (compiled only for `cargo test`): ids from literals, and
//! the seeded random draws the fuzzers of `wire` use. Test code only: helpers here may panic.

use crate::rng::SplitMix64;
use crate::wire::{FileName, GroupId, Password, UserId};

pub fn uid(s: &str) -> UserId {
    UserId::new(s).unwrap()
}

pub fn gid(s: &str) -> GroupId {
    GroupId::new(s).unwrap()
}

pub fn fname(s: &str) -> FileName {
    FileName::new(s).unwrap()
}

pub fn pw(s: &str) -> Password {
    Password::new(s.as_bytes()).unwrap()
}

/// What the fuzzers draw besides the generator's own helpers.
pub trait Draw {
    fn chance(&mut self, num: usize, den: usize) -> bool;
    fn byte(&mut self) -> u8;
    fn u32(&mut self) -> u32;
    fn bytes(&mut self, n: usize) -> Vec<u8>;
}

impl Draw for SplitMix64 {
    fn chance(&mut self, num: usize, den: usize) -> bool {
        self.below(den) < num
    }

    fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }

    fn u32(&mut self) -> u32 {
        self.next_u64() as u32
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

/// A string of 1..=`max` bytes of `chars` (often short, one time in eight exactly `max`).
pub fn rand_str(rng: &mut SplitMix64, chars: &[char], max: usize) -> String {
    let target = if rng.chance(1, 8) {
        max
    } else {
        rng.between(1, max.min(24))
    };
    let mut s = String::new();
    loop {
        let c = *rng.pick(chars);
        if s.len() + c.len_utf8() > target {
            break;
        }
        s.push(c);
    }
    if s.is_empty() {
        s.push('x');
    }
    s
}
