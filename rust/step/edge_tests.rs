//! Tests of a batch call's edges: a thread's scratch returned after a large call, cancellation,
//! and every bad argument named in its error (the builders are `tests.rs`').

use super::tests::{dyn_cfg, family, inputs};
use super::*;
use crate::config::{SolverConfig, SolverKind};

/// A call that grows a thread's scratch beyond `SCRATCH_KEEP_BYTES` leaves it freed.
#[test]
fn large_scratch_is_returned() {
    let (b, v) = (1, (SCRATCH_KEEP_BYTES / 8) / 4 + 1000);
    let z = vec![0.5f32; v];
    let ex = [z.as_slice(), z.as_slice(), z.as_slice(), z.as_slice()];
    let inp = inputs(&z, &z, &ex, b, v);
    let w = dyn_cfg(None, SolverKind::Grid);
    let smp = Sampling::default();
    fuse_step_impl(&inp, &w, &smp, &Seeds::One(0), false, Cancel::NEVER).unwrap();
    let after = SCRATCH.with(|c| c.borrow().heap_bytes());
    assert!(after <= SCRATCH_KEEP_BYTES, "{after} bytes kept");
    // A normal call keeps its buffers (no reallocation per call).
    let (l, s, e) = family(2, 300, 1);
    let ex1 = [e[0].as_slice()];
    fuse_step_impl(
        &inputs(&l, &s, &ex1, 2, 300),
        &w,
        &smp,
        &Seeds::One(0),
        false,
        Cancel::NEVER,
    )
    .unwrap();
    assert!(SCRATCH.with(|c| c.borrow().heap_bytes()) > 0);
}

/// A set cancellation flag stops every entry point with `Cancelled`.
#[test]
fn cancellation_stops_the_call() {
    use std::sync::atomic::AtomicBool;
    let (l, s, e) = family(3, 200, 2);
    let ex: Vec<&[f32]> = e.iter().map(|x| x.as_slice()).collect();
    let inp = inputs(&l, &s, &ex, 3, 200);
    let flag = AtomicBool::new(true);
    let smp = Sampling::default();
    for w in [
        dyn_cfg(None, SolverKind::Grid),
        Weights::Static(vec![1.0, 0.0]),
    ] {
        let r = fuse_step_with_cancel(&inp, &w, &smp, &Seeds::One(0), Cancel::new(&flag));
        assert_eq!(r, Err(DlfError::Cancelled));
    }
    let mut out = vec![0.0f32; 600];
    let r = fuse_logits_with_cancel(&inp, &[1.0; 6], &mut out, Cancel::new(&flag));
    assert_eq!(r, Err(DlfError::Cancelled));
    let r = crate::sample::sample_batch_with_cancel(
        &l,
        3,
        200,
        &smp,
        &Seeds::One(0),
        Cancel::new(&flag),
    );
    assert_eq!(r, Err(DlfError::Cancelled));
}

#[test]
fn each_bad_argument_names_itself() {
    let z = [0.0f32, 1.0, 2.0, 3.0];
    let ex = [z.as_slice()];
    let inp = inputs(&z, &z, &ex, 2, 2);
    let ok_w = dyn_cfg(None, SolverKind::Grid);
    let ok_s = Sampling::default();
    let arg_of = |r: Result<StepOutput, DlfError>| match r {
        Err(DlfError::InvalidArgument { arg, .. }) | Err(DlfError::Shape { arg, .. }) => arg,
        Err(DlfError::NonFinite { model, .. }) | Err(DlfError::NoFiniteLogit { model, .. }) => {
            model
        }
        Err(DlfError::InputChanged { arg, .. }) => arg,
        Err(DlfError::Cancelled) => "cancelled".into(),
        Ok(_) => "ok".into(),
    };
    let sc = |f: fn(&mut SolverConfig)| {
        let mut c = SolverConfig::default();
        f(&mut c);
        Weights::Dynamic(c)
    };
    let cases: Vec<(Weights, Sampling, Seeds, &str)> = vec![
        (
            Weights::Static(vec![1.0, 2.0]),
            ok_s,
            Seeds::One(0),
            "alpha",
        ),
        (
            Weights::Static(vec![f64::NAN]),
            ok_s,
            Seeds::One(0),
            "alpha",
        ),
        (
            sc(|c| c.alpha_min = 3.0),
            ok_s,
            Seeds::One(0),
            "alpha_range",
        ),
        (
            sc(|c| c.alpha_max = f64::INFINITY),
            ok_s,
            Seeds::One(0),
            "alpha_range",
        ),
        (sc(|c| c.grid_step = 0.0), ok_s, Seeds::One(0), "grid_step"),
        (
            sc(|c| c.grid_step = f64::NAN),
            ok_s,
            Seeds::One(0),
            "grid_step",
        ),
        (sc(|c| c.grid_step = 1e-9), ok_s, Seeds::One(0), "grid_step"),
        (
            sc(|c| c.support_k = Some(0)),
            ok_s,
            Seeds::One(0),
            "support_k",
        ),
        (
            ok_w.clone(),
            Sampling {
                temperature: -1.0,
                ..ok_s
            },
            Seeds::One(0),
            "temperature",
        ),
        (
            ok_w.clone(),
            Sampling {
                temperature: f64::NAN,
                ..ok_s
            },
            Seeds::One(0),
            "temperature",
        ),
        (
            ok_w.clone(),
            Sampling { top_p: 0.0, ..ok_s },
            Seeds::One(0),
            "top_p",
        ),
        (
            ok_w.clone(),
            Sampling { top_p: 1.5, ..ok_s },
            Seeds::One(0),
            "top_p",
        ),
        (
            ok_w.clone(),
            Sampling {
                min_p: -0.1,
                ..ok_s
            },
            Seeds::One(0),
            "min_p",
        ),
        (ok_w.clone(), ok_s, Seeds::PerRow(vec![1]), "seed"),
        (ok_w.clone(), ok_s, Seeds::PerRow(vec![1, 2]), "ok"),
    ];
    for (w, s, seeds, want) in cases {
        assert_eq!(arg_of(fuse_step(&inp, &w, &s, &seeds)), want, "{w:?} {s:?}");
    }
    // shapes and non-finite values
    assert_eq!(
        arg_of(fuse_step(
            &inputs(&z[..3], &z, &ex, 2, 2),
            &ok_w,
            &ok_s,
            &Seeds::One(0)
        )),
        "large"
    );
    assert_eq!(
        arg_of(fuse_step(
            &inputs(&z, &z[..2], &ex, 2, 2),
            &ok_w,
            &ok_s,
            &Seeds::One(0)
        )),
        "small"
    );
    let ex2 = [z.as_slice(), &z[..1]];
    assert_eq!(
        arg_of(fuse_step(
            &inputs(&z, &z, &ex2, 2, 2),
            &ok_w,
            &ok_s,
            &Seeds::One(0)
        )),
        "experts[1]"
    );
    assert_eq!(
        arg_of(fuse_step(
            &inputs(&[], &[], &[], 1, 0),
            &Weights::Static(vec![]),
            &ok_s,
            &Seeds::One(0)
        )),
        "large"
    );
    assert_eq!(
        arg_of(fuse_step(
            &inputs(&z, &z, &[], 2, 2),
            &ok_w,
            &ok_s,
            &Seeds::One(0)
        )),
        "experts"
    );
    assert_eq!(
        arg_of(fuse_step(
            &inputs(&z, &z, &[], 2, 2),
            &Weights::Static(vec![]),
            &ok_s,
            &Seeds::One(0)
        )),
        "ok"
    );
    let bad = [0.0f32, 1.0, 2.0, f32::NAN];
    let exb = [bad.as_slice()];
    let r = fuse_step(&inputs(&z, &z, &exb, 2, 2), &ok_w, &ok_s, &Seeds::One(0));
    assert!(
        matches!(r, Err(DlfError::NonFinite { ref model, row: 1, token: 1, .. }) if model == "experts[0]"),
        "{r:?}"
    );
    let pinf = [0.0f32, f32::INFINITY, 2.0, 1.0];
    let r = fuse_step(&inputs(&pinf, &z, &ex, 2, 2), &ok_w, &ok_s, &Seeds::One(0));
    assert!(
        matches!(r, Err(DlfError::NonFinite { ref model, row: 0, token: 1, .. }) if model == "large")
    );
    let mut out = [0.0f32; 4];
    assert!(
        matches!(fuse_logits(&inp, &[1.0], &mut out), Err(DlfError::Shape { ref arg, .. }) if arg == "alphas")
    );
    assert!(
        matches!(fuse_logits(&inp, &[1.0, 1.0], &mut out[..3]), Err(DlfError::Shape { ref arg, .. }) if arg == "out")
    );
}

/// `fuse_step_into`'s `fused_out` must hold `batch * vocab` values (the error names it); an
/// empty batch takes an empty buffer; a cancelled call stops; the sequential loop writes the
/// same rows as the parallel one.
#[test]
fn fuse_step_into_checks_its_buffer() {
    let (b, v) = (3, 200);
    let (l, s, e) = family(b, v, 2);
    let ex: Vec<&[f32]> = e.iter().map(|x| x.as_slice()).collect();
    let inp = inputs(&l, &s, &ex, b, v);
    let (w, smp, pen) = (
        dyn_cfg(None, SolverKind::Grid),
        Sampling::default(),
        Penalties::default(),
    );
    let seeds = Seeds::One(1);
    for n in [0, b * v - 1, b * v + 1, v] {
        let mut out = vec![0.0f32; n];
        let r = fuse_step_into(&inp, &w, &smp, &pen, None, &seeds, &mut out, Cancel::NEVER);
        assert!(
            matches!(r, Err(DlfError::Shape { ref arg, .. }) if arg == "fused_out"),
            "{n}: {r:?}"
        );
    }
    let none: [&[f32]; 1] = [&[]];
    let empty = inputs(&[], &[], &none, 0, v);
    let r = fuse_step_into(&empty, &w, &smp, &pen, None, &seeds, &mut [], Cancel::NEVER);
    assert_eq!(r.unwrap().batch, 0);
    let flag = std::sync::atomic::AtomicBool::new(true);
    let mut out = vec![0.0f32; b * v];
    let r = fuse_step_into(
        &inp,
        &w,
        &smp,
        &pen,
        None,
        &seeds,
        &mut out,
        Cancel::new(&flag),
    );
    assert!(matches!(r, Err(DlfError::Cancelled)), "{r:?}");
    let mut par = vec![0.0f32; b * v];
    let mut seq = vec![1.0f32; b * v];
    let off = Seen {
        penalties: &pen,
        history: None,
    };
    let a = fuse_step_rows(
        &inp,
        &w,
        &smp,
        off,
        &seeds,
        true,
        Some(&mut par),
        Cancel::NEVER,
    );
    let z = fuse_step_rows(
        &inp,
        &w,
        &smp,
        off,
        &seeds,
        false,
        Some(&mut seq),
        Cancel::NEVER,
    );
    assert_eq!(a.unwrap(), z.unwrap());
    assert_eq!(par, seq);
}
