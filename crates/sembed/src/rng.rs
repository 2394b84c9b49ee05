//! The one random-number generator of the crate, shared by weight initialisation, LoRA, dropout and
//! training data order (below every module that uses it).

/// SplitMix64: a tiny seeded generator whose sequence is fixed forever, so a data order can be
/// reproduced exactly when a run resumes (a crate's generator may change its stream across versions).
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

/// The step SplitMix64 adds to its state per draw: the state after `n` draws is `state + n·GAMMA`.
pub const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output for a state: draw `i` (from 0) of a generator at `state` is
/// `mix(state + (i + 1)·GAMMA)`, so any draw can be computed from its index.
#[inline(always)]
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GAMMA);
        mix(self.0)
    }
    /// Fisher–Yates.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}
