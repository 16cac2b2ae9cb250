//! Helpers shared by the unit tests.

/// A xorshift64 generator from `seed` (nonzero): reproducible test inputs without a dependency.
pub(crate) fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

/// Uniform draws in [0, 1) from `xorshift(seed)` (53 bits).
pub(crate) fn uniform(seed: u64) -> impl FnMut() -> f64 {
    let mut next = xorshift(seed);
    move || (next() >> 11) as f64 / (1u64 << 53) as f64
}
