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

/// Concatenates hand-written pieces of a golden frame.
pub fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Builds frame payloads by hand (independently of `codec`'s writers) for malformed input.
/// Test files add what their link needs in an `impl B` of their own.
pub struct B(pub Vec<u8>);

impl B {
    pub fn ty(t: u8) -> Self {
        B(vec![t])
    }

    pub fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }

    pub fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn raw(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }

    /// A `u16`-length-prefixed string.
    pub fn s(self, b: &[u8]) -> Self {
        self.u16(b.len() as u16).raw(b)
    }

    /// A SHA1 of twenty `fill` bytes.
    pub fn sha(self, fill: u8) -> Self {
        self.raw(&[fill; 20])
    }
}
