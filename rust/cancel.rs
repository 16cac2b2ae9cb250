//! Cooperative cancellation of a long call: a flag the caller may set from another thread (the
//! Python binding sets it on Ctrl-C), checked by the batch loops before each row and by the grid
//! between groups of lattice points, so that a call stops within milliseconds of the request.
//! A cancelled call returns `DlfError::Cancelled`; nothing is left half-written that a caller sees.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::DlfError;

/// A borrowed cancellation flag, or none (`Cancel::NEVER`). Copy, so it is passed by value.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cancel<'a>(Option<&'a AtomicBool>);

impl<'a> Cancel<'a> {
    /// No cancellation: what the plain entry points (`fuse_step`, `sample_batch`) use.
    pub const NEVER: Cancel<'static> = Cancel(None);

    pub fn new(flag: &'a AtomicBool) -> Self {
        Cancel(Some(flag))
    }

    /// `Err(Cancelled)` once the flag is set. A relaxed load: the flag carries no data, and a
    /// check that sees it one group late only delays the stop by microseconds.
    #[inline(always)]
    pub fn check(self) -> Result<(), DlfError> {
        match self.0 {
            Some(f) if f.load(Ordering::Relaxed) => Err(DlfError::Cancelled),
            _ => Ok(()),
        }
    }
}
