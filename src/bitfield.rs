//! A fixed-length set of bits, one per piece of a file: which pieces a peer holds verified.
//!
//! Bits are numbered from 0 and packed most significant bit first, the order they travel in on
//! the wire: bit `i` lives in byte `i / 8` under the mask `0x80 >> (i % 8)`. The spare bits of
//! the last byte are always clear, so two bitfields with the same bits have the same bytes.
//! The number of set bits is kept up to date on every change, so [`Bitfield::count_ones`] and
//! [`Bitfield::is_full`] cost nothing.
//!
//! No method panics: reading an index out of range gives `false`, and setting or clearing one
//! does nothing. Nothing here does IO.

use std::fmt;

/// `n_bits` bits packed MSB-first into `ceil(n_bits / 8)` bytes.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Bitfield {
    n_bits: usize,
    bytes: Vec<u8>,
    /// How many bits are set; always equal to the popcount of `bytes`.
    n_ones: usize,
}

/// The mask of bit `i` within its byte.
fn mask(i: usize) -> u8 {
    0x80 >> (i % 8)
}

/// The mask of the bits of the last byte that lie past bit `n_bits - 1` (0 if none do).
fn spare_mask(n_bits: usize) -> u8 {
    match n_bits % 8 {
        0 => 0,
        used => 0xff >> used,
    }
}

impl Bitfield {
    /// `n_bits` bits, all clear.
    pub fn new(n_bits: usize) -> Self {
        Bitfield {
            n_bits,
            bytes: vec![0; n_bits.div_ceil(8)],
            n_ones: 0,
        }
    }

    /// `n_bits` bits, all set.
    pub fn full(n_bits: usize) -> Self {
        let mut bytes = vec![0xff; n_bits.div_ceil(8)];
        if let Some(last) = bytes.last_mut() {
            *last &= !spare_mask(n_bits);
        }
        Bitfield {
            n_bits,
            bytes,
            n_ones: n_bits,
        }
    }

    /// The bitfield whose packed form is `bytes`, or `None` unless `bytes` is exactly
    /// `ceil(n_bits / 8)` bytes long with every spare bit clear.
    pub fn from_bytes(bytes: &[u8], n_bits: usize) -> Option<Self> {
        if bytes.len() != n_bits.div_ceil(8) {
            return None;
        }
        if let Some(last) = bytes.last() {
            if last & spare_mask(n_bits) != 0 {
                return None;
            }
        }
        let n_ones = bytes.iter().map(|b| b.count_ones() as usize).sum();
        Some(Bitfield {
            n_bits,
            bytes: bytes.to_vec(),
            n_ones,
        })
    }

    /// The packed bits, `ceil(len() / 8)` bytes, spare bits clear.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The number of bits (set or not).
    pub fn len(&self) -> usize {
        self.n_bits
    }

    /// Whether there are no bits at all (`len() == 0`); see [`count_ones`](Self::count_ones)
    /// for whether any bit is set.
    pub fn is_empty(&self) -> bool {
        self.n_bits == 0
    }

    /// Whether bit `i` is set; `false` when `i` is out of range.
    pub fn get(&self, i: usize) -> bool {
        i < self.n_bits && self.bytes.get(i / 8).is_some_and(|b| b & mask(i) != 0)
    }

    /// Sets bit `i`; does nothing when `i` is out of range.
    pub fn set(&mut self, i: usize) {
        if i >= self.n_bits {
            return;
        }
        if let Some(b) = self.bytes.get_mut(i / 8) {
            if *b & mask(i) == 0 {
                *b |= mask(i);
                self.n_ones += 1;
            }
        }
    }

    /// Clears bit `i`; does nothing when `i` is out of range.
    pub fn clear(&mut self, i: usize) {
        if i >= self.n_bits {
            return;
        }
        if let Some(b) = self.bytes.get_mut(i / 8) {
            if *b & mask(i) != 0 {
                *b &= !mask(i);
                self.n_ones -= 1;
            }
        }
    }

    /// The number of set bits, in constant time.
    pub fn count_ones(&self) -> usize {
        self.n_ones
    }

    /// Whether every bit is set (true for a bitfield of no bits: an empty file is complete).
    pub fn is_full(&self) -> bool {
        self.n_ones == self.n_bits
    }

    /// The indices of the set bits, in increasing order. Runs of clear bytes are skipped a byte
    /// at a time.
    pub fn iter_ones(&self) -> impl Iterator<Item = usize> + '_ {
        IterOnes {
            bytes: &self.bytes,
            next_byte: 0,
            base: 0,
            current: 0,
        }
    }
}

/// Iterator behind [`Bitfield::iter_ones`].
struct IterOnes<'a> {
    bytes: &'a [u8],
    /// Index of the next byte to load.
    next_byte: usize,
    /// Bit index of the most significant bit of `current`.
    base: usize,
    /// The bits of the loaded byte not yet returned.
    current: u8,
}

impl Iterator for IterOnes<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        while self.current == 0 {
            self.current = *self.bytes.get(self.next_byte)?;
            self.base = self.next_byte * 8;
            self.next_byte += 1;
        }
        let bit = self.current.leading_zeros() as usize;
        self.current &= !(0x80 >> bit);
        Some(self.base + bit)
    }
}

impl fmt::Debug for Bitfield {
    /// Shows the counts and at most the first 64 bits, so a bitfield of a large file does not
    /// flood a log line or a test failure.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 64;
        write!(f, "Bitfield({}/{} ", self.n_ones, self.n_bits)?;
        for i in 0..self.n_bits.min(SHOWN) {
            f.write_str(if self.get(i) { "1" } else { "0" })?;
        }
        if self.n_bits > SHOWN {
            f.write_str("...")?;
        }
        f.write_str(")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::rng::SplitMix64 as Rng;

    /// Checks every public view of `bf` against a plain `Vec<bool>`.
    fn check_against(bf: &Bitfield, model: &[bool]) {
        assert_eq!(bf.len(), model.len());
        assert_eq!(bf.is_empty(), model.is_empty());
        assert_eq!(bf.as_bytes().len(), model.len().div_ceil(8));
        for (i, want) in model.iter().enumerate() {
            assert_eq!(bf.get(i), *want, "bit {i}");
        }
        let ones: Vec<usize> = (0..model.len()).filter(|i| model[*i]).collect();
        assert_eq!(bf.count_ones(), ones.len());
        assert_eq!(bf.is_full(), ones.len() == model.len());
        assert_eq!(bf.iter_ones().collect::<Vec<_>>(), ones);
        // The packed form reads back as the same bitfield (so spare bits stayed clear).
        assert_eq!(
            Bitfield::from_bytes(bf.as_bytes(), bf.len()).as_ref(),
            Some(bf)
        );
    }

    #[test]
    fn golden_layout_is_msb_first() {
        let mut bf = Bitfield::new(10);
        bf.set(0);
        bf.set(2);
        bf.set(9);
        assert_eq!(bf.as_bytes(), &[0b1010_0000, 0b0100_0000]);
        bf.set(7);
        bf.set(8);
        assert_eq!(bf.as_bytes(), &[0b1010_0001, 0b1100_0000]);
        assert_eq!(bf.iter_ones().collect::<Vec<_>>(), vec![0, 2, 7, 8, 9]);
    }

    #[test]
    fn new_and_full_at_byte_edges() {
        for n in [0usize, 1, 7, 8, 9, 15, 16, 17, 64, 1000, 1001] {
            let empty = Bitfield::new(n);
            check_against(&empty, &vec![false; n]);
            assert!(empty.as_bytes().iter().all(|b| *b == 0));
            let full = Bitfield::full(n);
            check_against(&full, &vec![true; n]);
            assert!(full.is_full());
            assert_eq!(full.count_ones(), n);
        }
        assert_eq!(Bitfield::full(9).as_bytes(), &[0xff, 0x80]);
        assert_eq!(Bitfield::full(8).as_bytes(), &[0xff]);
        assert_eq!(Bitfield::full(3).as_bytes(), &[0xe0]);
        assert!(Bitfield::new(0).is_empty());
        assert!(Bitfield::new(0).is_full());
        assert!(Bitfield::new(0).as_bytes().is_empty());
        assert!(!Bitfield::new(1).is_full());
    }

    #[test]
    fn from_bytes_checks_length_and_spare_bits() {
        assert_eq!(Bitfield::from_bytes(&[], 0), Some(Bitfield::new(0)));
        assert_eq!(Bitfield::from_bytes(&[0], 0), None);
        assert_eq!(Bitfield::from_bytes(&[], 1), None);
        assert_eq!(Bitfield::from_bytes(&[0xff], 8), Some(Bitfield::full(8)));
        assert_eq!(Bitfield::from_bytes(&[0xff], 9), None);
        assert_eq!(Bitfield::from_bytes(&[0xff, 0], 8), None);
        assert_eq!(
            Bitfield::from_bytes(&[0xff, 0x80], 9),
            Some(Bitfield::full(9))
        );
        // Every spare bit of the last byte is refused, for every length within a byte.
        for used in 1..8usize {
            for spare in used..8 {
                let byte = 0x80u8 >> spare;
                assert_eq!(Bitfield::from_bytes(&[byte], used), None, "{used} {spare}");
                assert_eq!(Bitfield::from_bytes(&[0, byte], 8 + used), None);
            }
            for bit in 0..used {
                let bf = Bitfield::from_bytes(&[0x80 >> bit], used).unwrap();
                assert_eq!(bf.count_ones(), 1);
                assert!(bf.get(bit));
            }
        }
        let bf = Bitfield::from_bytes(&[0b1011_0000, 0b0100_0000], 10).unwrap();
        check_against(
            &bf,
            &[
                true, false, true, true, false, false, false, false, false, true,
            ],
        );
    }

    #[test]
    fn out_of_range_is_harmless() {
        let mut bf = Bitfield::new(10);
        for i in [10, 11, 15, 16, 1000, usize::MAX] {
            bf.set(i);
            assert!(!bf.get(i));
            bf.clear(i);
        }
        assert_eq!(bf, Bitfield::new(10));
        assert_eq!(bf.as_bytes(), &[0, 0]);

        let mut full = Bitfield::full(10);
        for i in [10, 16, usize::MAX] {
            full.clear(i);
            full.set(i);
        }
        assert_eq!(full, Bitfield::full(10));

        let mut none = Bitfield::new(0);
        none.set(0);
        none.clear(0);
        assert!(!none.get(0));
        assert_eq!(none.count_ones(), 0);
    }

    #[test]
    fn set_and_clear_are_idempotent() {
        let mut bf = Bitfield::new(3);
        bf.set(1);
        bf.set(1);
        assert_eq!(bf.count_ones(), 1);
        bf.clear(1);
        bf.clear(1);
        assert_eq!(bf.count_ones(), 0);
        bf.clear(2);
        assert_eq!(bf.count_ones(), 0);
    }

    #[test]
    fn random_operations_match_a_plain_model() {
        let mut rng = Rng(0x5eed_b17f);
        for n in [1usize, 5, 8, 13, 64, 200] {
            let mut bf = Bitfield::new(n);
            let mut model = vec![false; n];
            for step in 0..2000 {
                // Indices a little past the end exercise the no-op paths.
                let i = rng.below(n + 9);
                if rng.below(2) == 0 {
                    bf.set(i);
                    if i < n {
                        model[i] = true;
                    }
                } else {
                    bf.clear(i);
                    if i < n {
                        model[i] = false;
                    }
                }
                if step % 50 == 0 {
                    check_against(&bf, &model);
                }
                assert_eq!(bf.count_ones(), model.iter().filter(|b| **b).count());
            }
            check_against(&bf, &model);
            // Fill it up: it becomes equal to `full`.
            for i in 0..n {
                bf.set(i);
            }
            assert!(bf.is_full());
            assert_eq!(bf, Bitfield::full(n));
        }
    }

    #[test]
    fn iter_ones_skips_clear_bytes() {
        let mut bf = Bitfield::new(100_000);
        for i in [0, 7, 8, 50_000, 99_999] {
            bf.set(i);
        }
        assert_eq!(
            bf.iter_ones().collect::<Vec<_>>(),
            vec![0, 7, 8, 50_000, 99_999]
        );
        assert_eq!(Bitfield::new(17).iter_ones().count(), 0);
        assert_eq!(Bitfield::full(17).iter_ones().count(), 17);
        assert_eq!(
            Bitfield::full(17).iter_ones().collect::<Vec<_>>(),
            (0..17).collect::<Vec<_>>()
        );
    }

    #[test]
    fn debug_is_short() {
        let mut bf = Bitfield::new(5);
        bf.set(1);
        assert_eq!(format!("{bf:?}"), "Bitfield(1/5 01000)");
        let big = format!("{:?}", Bitfield::full(1 << 20));
        assert!(big.len() < 100, "{big}");
        assert!(big.starts_with("Bitfield(1048576/1048576 1111"));
        assert!(big.ends_with("...)"));
    }
}
