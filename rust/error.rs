//! One error type for the whole core. Every variant names the argument, what was expected and
//! what came, so the Python layer can raise it unchanged (`ValueError` subclass `DlfError`).

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum DlfError {
    /// An array has the wrong shape: `arg` is the caller's argument name (`large`, `experts[2]`).
    #[error("{arg}: expected shape {expected}, got {got}")]
    Shape {
        arg: String,
        expected: String,
        got: String,
    },
    /// NaN or +inf in a model's logits (a caller error; -inf is allowed and means "impossible").
    #[error("{model}: logits must be finite or -inf, got {value} at row {row}, token {token}")]
    NonFinite {
        model: String,
        row: usize,
        token: usize,
        value: f32,
    },
    /// A row in which every logit is -inf has no distribution.
    #[error("{model}: row {row} has no finite logit (every token is -inf)")]
    NoFiniteLogit { model: String, row: usize },
    /// A value the first scan saw as NaN/+inf was gone when looked at again: another thread wrote
    /// to the array while the core read it (the binding borrows arrays without copying).
    #[error(
        "{arg}: the input changed during the call (row {row}); another thread wrote to the array \
         while dlf_rs was reading it, which is not supported"
    )]
    InputChanged { arg: String, row: usize },
    /// The caller set the cancellation flag (`cancel::Cancel`); the Python binding raises the
    /// pending `KeyboardInterrupt` instead of this.
    #[error("the call was cancelled before it finished")]
    Cancelled,
    /// A scalar or list argument outside its domain.
    #[error("{arg}: expected {expected}, got {got}")]
    InvalidArgument {
        arg: String,
        expected: String,
        got: String,
    },
}

impl DlfError {
    pub(crate) fn invalid(arg: &str, expected: impl Into<String>, got: impl ToString) -> Self {
        DlfError::InvalidArgument {
            arg: arg.to_string(),
            expected: expected.into(),
            got: got.to_string(),
        }
    }
}
