//! Tests of the batch loops' results: both solvers end to end, pruning, rayon vs sequential, the
//! fused logits recipe, -inf and degenerate rows, weights in range. The call's edges (argument
//! names, limits, scratch, cancellation) are in `edge_tests.rs`, which shares these builders.

use super::*;
use crate::config::{SolverConfig, SolverKind};

/// Deterministic LM-like logits: a Zipf-ish head under a scrambled order, plus noise.
pub(crate) fn lm_logits(seed: u64, b: usize, v: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut out = Vec::with_capacity(b * v);
    for _ in 0..b {
        let shift = (next() * v as f64) as usize;
        for i in 0..v {
            let rank = ((i * 7919 + shift) % v) as f64 + 1.0;
            out.push((-1.2 * rank.ln() + 0.5 * next() + 3.0) as f32);
        }
    }
    out
}

pub(super) fn inputs<'a>(
    l: &'a [f32],
    s: &'a [f32],
    e: &'a [&'a [f32]],
    b: usize,
    v: usize,
) -> StepInputs<'a> {
    StepInputs {
        large: l,
        small: s,
        experts: e,
        batch: b,
        vocab: v,
    }
}

#[test]
fn smoke_grid_and_exact() {
    let (b, v) = (3, 500);
    let l = lm_logits(1, b, v);
    let s = lm_logits(2, b, v);
    let e1: Vec<f32> = s
        .iter()
        .zip(lm_logits(3, b, v))
        .map(|(x, y)| x + 0.3 * y)
        .collect();
    let ex = [e1.as_slice()];
    let inp = inputs(&l, &s, &ex, b, v);
    for solver in [SolverKind::Grid, SolverKind::Exact] {
        let w = Weights::Dynamic(SolverConfig {
            solver,
            ..Default::default()
        });
        let out = fuse_step(&inp, &w, &Sampling::default(), &Seeds::One(0)).unwrap();
        assert_eq!(out.tokens.len(), b);
        assert!(out.loss.iter().all(|x| x.is_finite()));
        eprintln!("{solver:?} {:?} {:?}", out.alphas, out.loss);
    }
}

pub(super) fn dyn_cfg(k: Option<usize>, solver: SolverKind) -> Weights {
    Weights::Dynamic(SolverConfig {
        support_k: k,
        solver,
        ..Default::default()
    })
}

pub(super) fn family(b: usize, v: usize, n_t: usize) -> (Vec<f32>, Vec<f32>, Vec<Vec<f32>>) {
    let l = lm_logits(11, b, v);
    let s = lm_logits(12, b, v);
    let e = (0..n_t)
        .map(|t| {
            let p = lm_logits(20 + t as u64, b, v);
            s.iter().zip(p).map(|(x, y)| x + 0.2 * y).collect()
        })
        .collect();
    (l, s, e)
}

#[test]
fn support_k_at_least_vocab_equals_full_vocabulary() {
    let (b, v) = (4, 300);
    let (l, s, e) = family(b, v, 2);
    let ex: Vec<&[f32]> = e.iter().map(|x| x.as_slice()).collect();
    let inp = inputs(&l, &s, &ex, b, v);
    let smp = Sampling {
        temperature: 0.8,
        ..Default::default()
    };
    for solver in [SolverKind::Grid, SolverKind::Exact] {
        let full = fuse_step(&inp, &dyn_cfg(None, solver), &smp, &Seeds::One(5)).unwrap();
        for k in [v, v + 7] {
            let pr = fuse_step(&inp, &dyn_cfg(Some(k), solver), &smp, &Seeds::One(5)).unwrap();
            // The default may be certified from the one-pass summary: the same weights and
            // tokens, the loss and KLs to float tolerance (rust/step/certified_tests.rs).
            assert_eq!(
                (&full.alphas, &full.tokens, &full.active),
                (&pr.alphas, &pr.tokens, &pr.active)
            );
            for (a, b) in full.loss.iter().zip(&pr.loss) {
                assert!((a - b).abs() <= 2e-5 * a.abs().max(b.abs()) + 1e-9);
            }
        }
        let small = fuse_step(&inp, &dyn_cfg(Some(16), solver), &smp, &Seeds::One(5)).unwrap();
        assert!(small
            .support_size
            .iter()
            .all(|&n| n > 16 && (n as usize) < v));
    }
}

#[test]
fn rayon_equals_sequential() {
    let (b, v) = (9, 257);
    let (l, s, e) = family(b, v, 3);
    let ex: Vec<&[f32]> = e.iter().map(|x| x.as_slice()).collect();
    let inp = inputs(&l, &s, &ex, b, v);
    let smp = Sampling {
        temperature: 1.0,
        top_p: 0.9,
        ..Default::default()
    };
    for w in [
        dyn_cfg(None, SolverKind::Grid),
        dyn_cfg(Some(8), SolverKind::Exact),
    ] {
        let par = fuse_step_impl(&inp, &w, &smp, &Seeds::One(3), true, Cancel::NEVER).unwrap();
        let seq = fuse_step_impl(&inp, &w, &smp, &Seeds::One(3), false, Cancel::NEVER).unwrap();
        assert_eq!(par, seq);
        assert_eq!(par, fuse_step(&inp, &w, &smp, &Seeds::One(3)).unwrap());
    }
}

#[test]
fn fused_logits_follow_the_f32_recipe() {
    let l = [1.0f32, f32::NEG_INFINITY, 3e38, 0.5, -2.0];
    let s = [0.0f32, 1.0, -3e38, f32::NEG_INFINITY, 1.0];
    let e = [2.0f32, 0.0, 3e38, 1.0, f32::NEG_INFINITY];
    let ex = [e.as_slice()];
    let inp = inputs(&l, &s, &ex, 1, 5);
    let mut out = [0.0f32; 5];
    fuse_logits(&inp, &[0.7], &mut out).unwrap();
    let rep_s = -3e38f32 - 30.0;
    let rep_e = 0.0f32 - 30.0; // expert row minimum is 0
    assert_eq!(out[0], 1.0 + 0.7f32 * (2.0 - 0.0));
    assert_eq!(out[1], f32::NEG_INFINITY);
    assert_eq!(out[2], f32::MAX); // overflow saturates
    assert_eq!(out[3], 0.5 + 0.7f32 * (1.0 - rep_s));
    assert_eq!(out[4], -2.0 + 0.7f32 * (rep_e - 1.0));
    // Static weights give the same fused logits to the sampler.
    let st = fuse_step(
        &inp,
        &Weights::Static(vec![0.7]),
        &Sampling::default(),
        &Seeds::One(0),
    )
    .unwrap();
    assert_eq!(st.tokens, vec![2]);
    assert!(st.kl_fused_large[0].is_nan() && st.active[0] == -1 && st.loss[0] == 0.0);
}

#[test]
fn neg_inf_never_gives_nan() {
    let v = 6;
    let ninf = f32::NEG_INFINITY;
    let l = [0.0f32, 1.0, ninf, ninf, 2.0, 0.5];
    let s = [ninf, 1.0, 0.0, ninf, 2.0, 0.5];
    let e1 = [1.0f32, ninf, 0.0, 3.0, 2.0, ninf];
    let e2 = [ninf, ninf, ninf, ninf, ninf, 0.0];
    let ex = [e1.as_slice(), e2.as_slice()];
    let inp = inputs(&l, &s, &ex, 1, v);
    for w in [
        dyn_cfg(None, SolverKind::Grid),
        dyn_cfg(None, SolverKind::Exact),
        dyn_cfg(Some(1), SolverKind::Exact),
        dyn_cfg(Some(2), SolverKind::Grid),
    ] {
        let o = fuse_step(
            &inp,
            &w,
            &Sampling {
                temperature: 1.0,
                ..Default::default()
            },
            &Seeds::One(1),
        )
        .unwrap();
        for x in o
            .loss
            .iter()
            .chain(&o.kl_fused_large)
            .chain(&o.kl_large_fused)
            .chain(&o.kl_expert_small)
            .chain(&o.kl_small_expert)
        {
            assert!(x.is_finite(), "{o:?}");
        }
        assert!(l[o.tokens[0] as usize].is_finite());
    }
}

#[test]
fn degenerate_inputs_never_panic() {
    let ninf = f32::NEG_INFINITY;
    let w = dyn_cfg(None, SolverKind::Exact);
    let smp = Sampling {
        temperature: 1.0,
        top_k: 3,
        top_p: 0.5,
        min_p: 0.1,
    };
    // all -inf row
    let l = [ninf; 3];
    let s = [0.0f32; 3];
    let ex = [s.as_slice()];
    let r = fuse_step(&inputs(&l, &s, &ex, 1, 3), &w, &smp, &Seeds::One(0));
    assert!(matches!(r, Err(DlfError::NoFiniteLogit { ref model, row: 0 }) if model == "large"));
    let r = fuse_step(&inputs(&s, &l, &ex, 1, 3), &w, &smp, &Seeds::One(0));
    assert!(matches!(r, Err(DlfError::NoFiniteLogit { ref model, .. }) if model == "small"));
    // V = 1
    let one = [0.5f32];
    let ex1 = [one.as_slice()];
    let o = fuse_step(&inputs(&one, &one, &ex1, 1, 1), &w, &smp, &Seeds::One(0)).unwrap();
    assert_eq!(o.tokens, vec![0]);
    // B = 0
    let o = fuse_step(&inputs(&[], &[], &[&[]], 0, 7), &w, &smp, &Seeds::One(0)).unwrap();
    assert!(o.tokens.is_empty() && o.alphas.is_empty());
    // huge logits
    for big in [1e30f32, 1e38, -1e38, 3.4e38] {
        let l = [big, -big, 0.0, 1.0];
        let s = [-big, big, 1.0, 0.0];
        let e = [big, big, -big, 0.0];
        let ex = [e.as_slice()];
        for w in [
            dyn_cfg(None, SolverKind::Grid),
            dyn_cfg(None, SolverKind::Exact),
            dyn_cfg(Some(1), SolverKind::Exact),
        ] {
            if let Ok(o) = fuse_step(&inputs(&l, &s, &ex, 1, 4), &w, &smp, &Seeds::One(0)) {
                assert!(o.alphas.iter().all(|a| a.is_finite()));
                assert!(!o.loss[0].is_nan());
            }
        }
    }
}

/// Issue 14: static weights beyond f32 (1e300 became inf and picked the wrong token) and
/// ranges outside [-100, 100] are refused; results always lie in the range.
#[test]
fn weights_stay_finite_and_in_range() {
    let l = [5.0f32, 0.0];
    let s = [0.0f32, 0.0];
    let e = [0.0f32, -1.0];
    let ex = [e.as_slice()];
    let inp = inputs(&l, &s, &ex, 1, 2);
    let smp = Sampling::default();
    for a in [1e300, -1e300, 100.5, f64::NAN] {
        let r = fuse_step(&inp, &Weights::Static(vec![a]), &smp, &Seeds::One(0));
        assert!(matches!(r, Err(DlfError::InvalidArgument { ref arg, .. }) if arg == "alpha"));
    }
    let mut out = [0.0f32; 2];
    let r = fuse_logits(&inp, &[1e30], &mut out);
    assert!(matches!(r, Err(DlfError::InvalidArgument { ref arg, .. }) if arg == "alphas"));
    let cfg = |lo: f64, hi: f64, step: f64, solver| {
        Weights::Dynamic(SolverConfig {
            alpha_min: lo,
            alpha_max: hi,
            grid_step: step,
            solver,
            ..Default::default()
        })
    };
    let r = fuse_step(
        &inp,
        &cfg(-1e300, -1e300, 0.1, SolverKind::Grid),
        &smp,
        &Seeds::One(0),
    );
    assert!(matches!(r, Err(DlfError::InvalidArgument { ref arg, .. }) if arg == "alpha_range"));
    let (b, v) = (6, 400);
    let (zl, zs, ze) = family(b, v, 2);
    let exs: Vec<&[f32]> = ze.iter().map(|x| x.as_slice()).collect();
    let inp = inputs(&zl, &zs, &exs, b, v);
    for (lo, hi, step) in [
        (-100.0, -100.0, 0.1),
        (-100.0, 100.0, 0.1),
        (-3.0, -1.0, 0.05),
        (0.5, 0.7, 0.1),
        (97.0, 100.0, 0.3),
    ] {
        for solver in [SolverKind::Grid, SolverKind::Exact] {
            let o = fuse_step(&inp, &cfg(lo, hi, step, solver), &smp, &Seeds::One(0)).unwrap();
            for (r, a) in o.alphas.chunks(2).enumerate() {
                let w = if o.active[r] >= 0 {
                    a[o.active[r] as usize]
                } else {
                    0.0
                };
                assert!(a.iter().all(|x| x.is_finite()));
                if o.active[r] >= 0 || lo <= 0.0 && 0.0 <= hi {
                    assert!(
                        (lo as f32) <= w && w <= (hi as f32),
                        "{w} not in [{lo}, {hi}]"
                    );
                }
            }
        }
    }
}

/// `fuse_step_into` leaves in `fused_out` exactly (bit for bit: the same `fuse_row` on the same
/// f32 weights) what `fuse_logits` returns for the step's weights, penalties or not, and returns
/// the same result (tokens included) as `fuse_step_with_penalties`, whose greedy one-expert rows
/// take the argmax kernel that writes no row.
#[test]
fn fuse_step_into_writes_the_rows_fuse_logits_would() {
    let (b, v) = (5, 301);
    for n_t in [1usize, 2, 3] {
        let (mut l, s, mut e) = family(b, v, n_t);
        // -inf in the large model (stays -inf) and in an expert (replaced before differencing).
        l[7] = f32::NEG_INFINITY;
        e[0][v + 3] = f32::NEG_INFINITY;
        let ex: Vec<&[f32]> = e.iter().map(|x| x.as_slice()).collect();
        let inp = inputs(&l, &s, &ex, b, v);
        let toks: Vec<i64> = vec![0, 3, 3, 9, 100, 5, 1, 1];
        let offs = [0usize, 2, 2, 5, 7, 8];
        let hist = History {
            tokens: &toks,
            offsets: &offs,
        };
        let pen = Penalties {
            repetition: 1.3,
            frequency: 0.2,
            presence: 0.1,
        };
        let weights = [
            dyn_cfg(None, SolverKind::Grid),
            dyn_cfg(Some(16), SolverKind::Exact),
            Weights::Static(vec![0.75; n_t]),
        ];
        for w in &weights {
            for (temperature, top_k) in [(0.0, 0), (0.9, 0), (0.7, 20)] {
                let smp = Sampling {
                    temperature,
                    top_k,
                    ..Default::default()
                };
                for penalties in [Penalties::default(), pen] {
                    let h = Some(&hist);
                    let seeds = Seeds::One(9);
                    let want = fuse_step_with_penalties(
                        &inp,
                        w,
                        &smp,
                        &penalties,
                        h,
                        &seeds,
                        Cancel::NEVER,
                    )
                    .unwrap();
                    let mut got_rows = vec![f32::NAN; b * v];
                    let got = fuse_step_into(
                        &inp,
                        w,
                        &smp,
                        &penalties,
                        h,
                        &seeds,
                        &mut got_rows,
                        Cancel::NEVER,
                    )
                    .unwrap();
                    // Debug text: static weights leave NaN traces, which `==` never matches.
                    let (g, wa) = (format!("{got:?}"), format!("{want:?}"));
                    assert_eq!(g, wa, "n_t={n_t} {w:?} t={temperature}");
                    let mut rows = vec![0.0f32; b * v];
                    fuse_logits(&inp, &got.alphas, &mut rows).unwrap();
                    let bits = |x: &[f32]| x.iter().map(|y| y.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got_rows), bits(&rows), "n_t={n_t} {w:?}");
                    assert_eq!(got_rows[7], f32::NEG_INFINITY);
                }
            }
        }
    }
}
