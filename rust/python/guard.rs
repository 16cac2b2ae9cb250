//! The last line of defence at the Python boundary: no panic reaches Python (one
//! `DlfInternalError` per call, the panic hook kept quiet inside calls) and Ctrl-C stops a long
//! call (`run_core`: large work on a scoped worker thread, the detached caller polling signals).

use super::*;

/// Number of dlf_rs calls in flight (process-wide) and whether this thread is running one.
pub(super) static CALLS_IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
thread_local! {
    static IN_CALL: Cell<bool> = const { Cell::new(false) };
}
/// The first caught panic's message with its location, taken by the call that reports it.
pub(super) static FIRST_PANIC: Mutex<Option<String>> = Mutex::new(None);

/// Installs, once per process, a panic hook that stays quiet for panics raised inside a dlf_rs
/// call (on the calling thread, the worker thread, or a rayon worker while a call is in flight)
/// and records the first one's message and location for the `DlfInternalError`; every other
/// panic goes to the previous hook unchanged. Chosen over a hook swapped around each call because
/// `set_hook` is process-global: swapping it per call would race between concurrent calls and
/// with other extensions. The cost: while a dlf_rs call runs, a panic of some other library on
/// a rayon worker thread of the global pool is not printed (it still propagates as usual).
pub(super) fn install_quiet_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let ours = IN_CALL.with(|c| c.get())
                || (CALLS_IN_FLIGHT.load(Ordering::SeqCst) > 0
                    && rayon::current_thread_index().is_some());
            if !ours {
                return prev(info);
            }
            if let Ok(mut slot) = FIRST_PANIC.lock() {
                if slot.is_none() {
                    let loc = info
                        .location()
                        .map(|l| format!(" at {}:{}", l.file(), l.line()))
                        .unwrap_or_default();
                    *slot = Some(format!("{}{loc}", payload_text(info.payload())));
                }
            }
        }));
    });
}

pub(super) fn payload_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

pub(super) fn internal_error(func: &str, payload: &(dyn std::any::Any + Send)) -> PyErr {
    let recorded = FIRST_PANIC.lock().ok().and_then(|mut s| s.take());
    let msg = recorded.unwrap_or_else(|| payload_text(payload));
    DlfInternalError::new_err(format!(
        "internal error in dlf_rs {func} (a bug): {msg}; please report it with the inputs' shapes"
    ))
}

/// Marks this thread as inside a dlf_rs call for the quiet hook, for the guard's lifetime.
pub(super) struct InCall {
    was: bool,
}

impl InCall {
    fn enter() -> Self {
        CALLS_IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
        InCall {
            was: IN_CALL.with(|c| c.replace(true)),
        }
    }
}

impl Drop for InCall {
    fn drop(&mut self) {
        IN_CALL.with(|c| c.set(self.was));
        CALLS_IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Runs a `#[pyfunction]` body; a panic in it becomes one `DlfInternalError`.
pub(super) fn guarded<R>(func: &str, body: impl FnOnce() -> PyResult<R>) -> PyResult<R> {
    let _in_call = InCall::enter();
    catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|p| Err(internal_error(func, &*p)))
}

/// Below this estimate of a call's work (logit reads x passes, see the callers) the core runs
/// on the calling thread: such a call takes about 11 ms at most (the full-vocabulary grid just
/// under this estimate, B = 16, V = 32000, T = 4, measured 12 ms on two cores), so Ctrl-C is
/// served promptly anyway, and a decode step is spared the ~20-50 us of starting a worker
/// thread. It was 2^22, which sent every B = 8, T = 1 step (0.7 ms) to a new thread.
pub(super) const INLINE_WORK: u64 = 1 << 24;

/// How often the detached calling thread wakes to run Python's signal handlers.
pub(super) const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// Runs the core work `work` with the GIL released. Small calls run inline; large ones run on a
/// scoped worker thread while this thread polls for signals every `SIGNAL_POLL`: on
/// KeyboardInterrupt (or any exception a signal handler raises) it sets the cancellation flag,
/// waits for the worker to stop (it checks the flag between rows and between groups of grid
/// points) and raises that exception. A panic in the work becomes one `DlfInternalError`.
pub(super) fn run_core<R: Send>(
    py: Python<'_>,
    func: &str,
    work_estimate: u64,
    work: impl FnOnce(Cancel<'_>) -> Result<R, CoreError> + Send,
) -> PyResult<R> {
    let flag = AtomicBool::new(false);
    let caught = |r: std::thread::Result<Result<R, CoreError>>| match r {
        Ok(res) => res.map_err(to_py),
        Err(p) => Err(internal_error(func, &*p)),
    };
    if work_estimate < INLINE_WORK {
        return caught(py.detach(|| catch_unwind(AssertUnwindSafe(|| work(Cancel::NEVER)))));
    }
    let (tx, rx) = mpsc::sync_channel(1);
    std::thread::scope(|scope| {
        let flag = &flag;
        let worker = std::thread::Builder::new()
            .name("dlf_rs-core".into())
            .spawn_scoped(scope, move || {
                let _in_call = InCall::enter();
                let r = catch_unwind(AssertUnwindSafe(|| work(Cancel::new(flag))));
                // The receiver outlives the scope; a send can only fail if it is gone.
                let _ = tx.send(r);
            });
        if let Err(e) = worker {
            return Err(DlfError::new_err(format!(
                "dlf_rs {func}: could not start a worker thread: {e}"
            )));
        }
        // The receiver is not Sync, so it moves into each detached wait and back out.
        let mut rx = rx;
        loop {
            let (got, back) = py.detach(move || (rx.recv_timeout(SIGNAL_POLL), rx));
            rx = back;
            match got {
                Ok(r) => return caught(r),
                Err(RecvTimeoutError::Timeout) => {
                    if let Err(interrupt) = py.check_signals() {
                        flag.store(true, Ordering::Relaxed);
                        // Wait (detached) for the worker to notice; its result is dropped.
                        let _ = py.detach(move || rx.recv());
                        return Err(interrupt);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(DlfInternalError::new_err(format!(
                        "internal error in dlf_rs {func} (a bug): the worker thread ended \
                         without a result; please report it with the inputs' shapes"
                    )));
                }
            }
        }
    })
}

/// A rough count of a step's work for `run_core`: logit reads per pass times passes (the grid's
/// points per expert count as passes, the exact solver as a few more on the full vocabulary and a
/// few dozen more with `support_k`).
pub(super) fn step_work(b: usize, v: usize, n_t: usize, weights: &Weights) -> u64 {
    let reads = (b as u64) * (v as u64) * (n_t as u64 + 2);
    let passes = match weights {
        Weights::Static(_) => 1,
        Weights::Dynamic(cfg) => {
            let pts = cfg.grid_len().clamp(1.0, MAX_GRID_POINTS as f64) as u64;
            // The exact solver's extra work: on the certified default (full vocabulary) it
            // refines from the row's summary and rarely runs a full pass (about 1.0-1.2x the
            // grid's time); with support_k it may scan many candidates.
            let exact = match (cfg.solver, cfg.support_k) {
                (SolverKind::Exact, None) => 4,
                (SolverKind::Exact, Some(_)) => 64,
                _ => 0,
            };
            1 + pts / 4 + exact
        }
    };
    reads.saturating_mul(passes)
}
