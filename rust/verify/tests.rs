//! Unit and property tests of the acceptance rule (`verify.rs`).

use super::*;
use crate::config::SolverConfig;
use crate::sample::sample_batch;
use crate::step::fuse_step;
use proptest::prelude::*;

/// LM-like logits: a Zipf-ish head under a per-row scrambled order, plus noise.
fn logits(seed: u64, rows: usize, v: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut out = Vec::with_capacity(rows * v);
    for _ in 0..rows {
        let shift = (next() * v as f64) as usize;
        for i in 0..v {
            let rank = ((i * 7919 + shift) % v) as f64 + 1.0;
            out.push((-1.2 * rank.ln() + 0.5 * next() + 3.0) as f32);
        }
    }
    out
}

/// Three models over `rows` rows: an expert close to the small base, a large model.
fn models(seed: u64, rows: usize, v: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let l = logits(seed, rows, v);
    let s = logits(seed + 1, rows, v);
    let e = s
        .iter()
        .zip(logits(seed + 2, rows, v))
        .map(|(a, b)| a + 0.4 * b)
        .collect();
    (l, s, e)
}

/// Equality that treats NaN as equal to NaN (unused positions, static weights' traces).
fn same(a: &StepOutput, b: &StepOutput) -> bool {
    let f = |x: &[f32], y: &[f32]| {
        x.len() == y.len() && x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits())
    };
    a.batch == b.batch
        && a.tokens == b.tokens
        && a.active == b.active
        && a.support_size == b.support_size
        && f(&a.alphas, &b.alphas)
        && f(&a.loss, &b.loss)
        && f(&a.kl_fused_large, &b.kl_fused_large)
        && f(&a.kl_large_fused, &b.kl_large_fused)
        && f(&a.kl_expert_small, &b.kl_expert_small)
        && f(&a.kl_small_expert, &b.kl_small_expert)
}

fn dlf() -> Weights {
    Weights::Dynamic(SolverConfig::default())
}

fn smp(temperature: f64) -> Sampling {
    Sampling {
        temperature,
        ..Default::default()
    }
}

struct Case {
    l: Vec<f32>,
    s: Vec<f32>,
    e: Vec<f32>,
    b: usize,
    p: usize,
    v: usize,
}

impl Case {
    fn new(seed: u64, b: usize, p: usize, v: usize) -> Self {
        let (l, s, e) = models(seed, b * p, v);
        Case { l, s, e, b, p, v }
    }

    /// What sequential DLF does at every position: `fuse_step` on the `[B * P, V]` rows.
    fn sequential(&self, w: &Weights) -> StepOutput {
        let ex = [self.e.as_slice()];
        let flat = StepInputs {
            large: &self.l,
            small: &self.s,
            experts: &ex,
            batch: self.b * self.p,
            vocab: self.v,
        };
        fuse_step(&flat, w, &smp(0.0), &Seeds::One(0)).unwrap()
    }

    fn verify(
        &self,
        drafts: &[i64],
        lens: &[usize],
        q: Option<&[f32]>,
        w: &Weights,
        s: &Sampling,
        seeds: &Seeds,
    ) -> Result<VerifyOutput, DlfError> {
        let ex = [self.e.as_slice()];
        let inp = VerifyInputs {
            large: &self.l,
            small: &self.s,
            experts: &ex,
            batch: self.b,
            positions: self.p,
            vocab: self.v,
            draft_tokens: drafts,
            draft_lens: lens,
            draft_logits: q,
        };
        fuse_verify(&inp, w, s, seeds)
    }
}

/// Checks a greedy verification against the sequential rule position by position.
fn check_greedy(c: &Case, drafts: &[i64], lens: &[usize], w: &Weights) -> Vec<i64> {
    let seq = c.sequential(w);
    let out = c
        .verify(drafts, lens, None, w, &smp(0.0), &Seeds::Entropy)
        .unwrap();
    let (k, n_t) = (c.p - 1, 1);
    for b in 0..c.b {
        let want = (0..lens[b])
            .take_while(|&j| drafts[b * k + j] == seq.tokens[b * c.p + j])
            .count();
        assert_eq!(out.accepted[b], want as i64, "row {b}");
        for j in 0..c.p {
            let r = b * c.p + j;
            if j <= want {
                assert_eq!(out.steps.tokens[r], seq.tokens[r]);
                assert_eq!(out.steps.alphas[r * n_t], seq.alphas[r * n_t]);
                assert_eq!(out.steps.loss[r].to_bits(), seq.loss[r].to_bits());
            } else {
                assert_eq!(out.steps.tokens[r], -1);
                assert!(out.steps.alphas[r * n_t].is_nan());
            }
        }
    }
    out.accepted
}

#[test]
fn greedy_all_none_and_first_rejected() {
    let (b, p, v) = (4, 5, 300);
    let c = Case::new(7, b, p, v);
    let seq = c.sequential(&dlf());
    let k = p - 1;
    let right: Vec<i64> = (0..b)
        .flat_map(|r| (0..k).map(move |j| (r, j)))
        .map(|(r, j)| seq.tokens[r * p + j])
        .collect();
    // All accepted: the bonus token comes from the last position.
    assert_eq!(check_greedy(&c, &right, &[k; 4], &dlf()), vec![k as i64; 4]);
    // None: every first draft wrong.
    let mut wrong = right.clone();
    for r in 0..b {
        wrong[r * k] = (right[r * k] + 1) % v as i64;
    }
    assert_eq!(check_greedy(&c, &wrong, &[k; 4], &dlf()), vec![0; 4]);
    // First rejection at a different position per row, and per-row draft lengths.
    let mut mixed = right.clone();
    for r in 0..b {
        if r < k {
            mixed[r * k + r] = (right[r * k + r] + 3) % v as i64;
        }
    }
    assert_eq!(
        check_greedy(&c, &mixed, &[4, 4, 4, 4], &dlf()),
        vec![0, 1, 2, 3]
    );
    assert_eq!(
        check_greedy(&c, &mixed, &[0, 1, 4, 2], &dlf()),
        vec![0, 1, 2, 2]
    );
    // Static weights (proxy-tuning) take the same path.
    check_greedy(&c, &right, &[k; 4], &Weights::Static(vec![1.0]));
}

#[test]
fn k0_equals_fuse_step() {
    let (b, v) = (6, 257);
    let c = Case::new(3, b, 1, v);
    let ex = [c.e.as_slice()];
    let step = StepInputs {
        large: &c.l,
        small: &c.s,
        experts: &ex,
        batch: b,
        vocab: v,
    };
    let seeds = [
        Seeds::One(5),
        Seeds::PerRow((0..b as u64).map(|i| i * 31).collect()),
    ];
    for w in [dlf(), Weights::Static(vec![0.7])] {
        for s in [
            smp(0.0),
            smp(1.0),
            Sampling {
                temperature: 0.8,
                top_k: 20,
                top_p: 0.9,
                min_p: 0.01,
            },
        ] {
            for seed in &seeds {
                let want = fuse_step(&step, &w, &s, seed).unwrap();
                let got = c.verify(&[], &[0; 6], None, &w, &s, seed).unwrap();
                assert_eq!(got.accepted, vec![0; b]);
                assert!(same(&got.steps, &want), "{got:?} vs {want:?}");
            }
        }
    }
}

#[test]
fn ties_go_to_the_lowest_index() {
    // Static weight 0: the fused logits are the large model's. Tokens 2 and 5 tie at the top.
    let v = 8;
    let mut l = vec![0.0f32; 2 * v];
    for j in 0..2 {
        l[j * v + 2] = 4.0;
        l[j * v + 5] = 4.0;
    }
    let s = vec![0.0f32; 2 * v];
    let c = Case {
        l,
        s: s.clone(),
        e: s,
        b: 1,
        p: 2,
        v,
    };
    let w = Weights::Static(vec![0.0]);
    let out = c
        .verify(&[5], &[1], None, &w, &smp(0.0), &Seeds::Entropy)
        .unwrap();
    assert_eq!((out.accepted[0], out.steps.tokens[0]), (0, 2));
    let out = c
        .verify(&[2], &[1], None, &w, &smp(0.0), &Seeds::Entropy)
        .unwrap();
    assert_eq!(out.accepted[0], 1);
    assert_eq!(&out.steps.tokens[..], &[2, 2]);
}

#[test]
fn impossible_tokens_are_never_accepted() {
    // Token 1 is -inf in the large model at position 0, and the draft's favourite.
    let v = 6;
    let mut l = logits(11, 2, v);
    l[1] = f32::NEG_INFINITY;
    let s = logits(12, 2, v);
    let c = Case {
        l,
        s: s.clone(),
        e: s,
        b: 1,
        p: 2,
        v,
    };
    let w = dlf();
    let out = c
        .verify(&[1], &[1], None, &w, &smp(0.0), &Seeds::Entropy)
        .unwrap();
    assert_eq!(out.accepted[0], 0);
    assert_ne!(out.steps.tokens[0], 1);
    let mut q = vec![-5.0f32; v];
    q[1] = 5.0;
    for seed in 0..300 {
        let out = c
            .verify(&[1], &[1], Some(&q), &w, &smp(1.0), &Seeds::One(seed))
            .unwrap();
        assert_eq!(out.accepted[0], 0);
        assert_ne!(out.steps.tokens[0], 1, "seed {seed}");
    }
    // A draft token with q = 0 (-inf in the draft) is rejected too.
    let mut q0 = q.clone();
    q0[3] = f32::NEG_INFINITY;
    let out = c
        .verify(&[3], &[1], Some(&q0), &w, &smp(1.0), &Seeds::One(1))
        .unwrap();
    assert_eq!(out.accepted[0], 0);
}

/// Speculative sampling keeps the target distribution: the first emitted token, over many
/// seeds, follows p (chi-square), whatever q drafted it.
#[test]
fn first_token_follows_the_fused_distribution() {
    let v = 12;
    let c = Case::new(21, 1, 2, v);
    let w = dlf();
    let s = Sampling {
        temperature: 0.9,
        top_k: 8,
        top_p: 0.95,
        min_p: 0.0,
    };
    // p: the fused, warped distribution at position 0.
    let seq = c.sequential(&w);
    let ex = [&c.e[..v]];
    let one = StepInputs {
        large: &c.l[..v],
        small: &c.s[..v],
        experts: &ex,
        batch: 1,
        vocab: v,
    };
    let mut fused = vec![0.0f32; v];
    crate::step::fuse_logits(&one, &seq.alphas[..1], &mut fused).unwrap();
    let mut sc = SampleScratch::default();
    warp(&fused, &s, &mut sc);
    let tot: f64 = sc.probs().iter().sum();
    let p: Vec<f64> = sc.probs().iter().map(|x| x / tot).collect();
    // q: a different distribution (another model's logits).
    let q = logits(99, 1, v);
    let n = 30_000;
    let drafts = sample_batch(&q.repeat(n), n, v, &s, &Seeds::One(7)).unwrap();
    let mut counts = vec![0usize; v];
    for (i, &d) in drafts.iter().enumerate() {
        let out = c
            .verify(&[d], &[1], Some(&q), &w, &s, &Seeds::One(1000 + i as u64))
            .unwrap();
        counts[out.steps.tokens[0] as usize] += 1;
    }
    let mut chi = 0.0;
    let mut dof = 0;
    for i in 0..v {
        let e = p[i] * n as f64;
        if e == 0.0 {
            assert_eq!(counts[i], 0, "token {i} has p = 0 but was emitted");
        } else {
            chi += (counts[i] as f64 - e).powi(2) / e;
            dof += 1;
        }
    }
    // P(chi2_{dof-1} > 45) < 1e-5 for dof <= 12.
    assert!(
        chi < 45.0,
        "chi2 {chi} over {dof} tokens: {counts:?} vs {p:?}"
    );
}

#[test]
fn seeds_reproduce_and_rows_are_batch_independent() {
    let (b, p, v) = (3, 4, 50);
    let c = Case::new(5, b, p, v);
    let q = logits(8, b * (p - 1), v);
    let s = smp(1.0);
    let drafts: Vec<i64> = (0..b * (p - 1))
        .map(|r| sample_batch(&q[r * v..(r + 1) * v], 1, v, &s, &Seeds::One(r as u64)).unwrap()[0])
        .collect();
    let seeds = Seeds::PerRow(vec![11, 12, 13]);
    let a = c
        .verify(&drafts, &[3, 2, 3], Some(&q), &dlf(), &s, &seeds)
        .unwrap();
    let again = c
        .verify(&drafts, &[3, 2, 3], Some(&q), &dlf(), &s, &seeds)
        .unwrap();
    assert_eq!(a.accepted, again.accepted);
    assert!(same(&a.steps, &again.steps));
    // Row 1 alone, with its own seed, gives the same tokens.
    let row = |x: &[f32], r: usize, w: usize| x[r * w..(r + 1) * w].to_vec();
    let one = Case {
        l: row(&c.l, 1, p * v),
        s: row(&c.s, 1, p * v),
        e: row(&c.e, 1, p * v),
        b: 1,
        p,
        v,
    };
    let alone = one
        .verify(
            &drafts[3..6],
            &[2],
            Some(&q[3 * v..6 * v]),
            &dlf(),
            &s,
            &Seeds::PerRow(vec![12]),
        )
        .unwrap();
    assert_eq!(alone.accepted[0], a.accepted[1]);
    assert_eq!(alone.steps.tokens[..], a.steps.tokens[p..2 * p]);
}

#[test]
fn arguments_are_checked_by_name() {
    let c = Case::new(1, 2, 3, 10);
    let w = dlf();
    let name = |r: Result<VerifyOutput, DlfError>| match r {
        Err(DlfError::InvalidArgument { arg, .. }) | Err(DlfError::Shape { arg, .. }) => arg,
        other => panic!("expected an argument error, got {other:?}"),
    };
    let g = smp(0.0);
    assert_eq!(
        name(c.verify(&[0; 4], &[3, 0], None, &w, &g, &Seeds::Entropy)),
        "draft_lens[0]"
    );
    assert_eq!(
        name(c.verify(&[0, 10, 0, 0], &[2, 0], None, &w, &g, &Seeds::Entropy)),
        "draft_tokens[0, 1]"
    );
    assert_eq!(
        name(c.verify(&[0; 3], &[0, 0], None, &w, &g, &Seeds::Entropy)),
        "draft_tokens"
    );
    assert_eq!(
        name(c.verify(&[0; 4], &[0], None, &w, &g, &Seeds::Entropy)),
        "draft_lens"
    );
    assert_eq!(
        name(c.verify(&[0; 4], &[1, 0], None, &w, &smp(1.0), &Seeds::One(0))),
        "draft_logits"
    );
    assert_eq!(
        name(c.verify(
            &[0; 4],
            &[1, 0],
            Some(&[0.0; 5]),
            &w,
            &smp(1.0),
            &Seeds::One(0)
        )),
        "draft_logits"
    );
    // Greedy needs no draft logits; sampling without drafts neither.
    assert!(c
        .verify(&[0; 4], &[1, 0], None, &w, &g, &Seeds::Entropy)
        .is_ok());
    assert!(c
        .verify(&[0; 4], &[0, 0], None, &w, &smp(1.0), &Seeds::One(0))
        .is_ok());
    // Rows are read position-major (row b * P + j) and only up to the first rejection: a
    // NaN at row 1's position 0 is found, one at a position never reached would not be.
    let mut bad = c.l.clone();
    bad[35] = f32::NAN;
    let bad_case = Case {
        l: bad,
        ..Case::new(1, 2, 3, 10)
    };
    assert!(matches!(
        bad_case.verify(&[0; 4], &[0, 0], None, &w, &g, &Seeds::Entropy),
        Err(DlfError::NonFinite { ref model, row: 3, .. }) if model == "large"
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// Any drafts, any per-row lengths: greedy verification is the sequential rule.
    #[test]
    fn greedy_is_sequential(
        seed in 0u64..1000,
        b in 1usize..4,
        k in 0usize..5,
        v in 2usize..40,
        hits in proptest::collection::vec(0u8..4, 12),
        lens in proptest::collection::vec(0usize..5, 3),
    ) {
        let p = k + 1;
        let c = Case::new(seed, b, p, v);
        let seq = c.sequential(&dlf());
        // Mostly-right drafts (3 in 4 chances per position) so that long accepted runs occur.
        let drafts: Vec<i64> = (0..b * k)
            .map(|i| {
                let right = seq.tokens[(i / k.max(1)) * p + i % k.max(1)];
                if hits[i % 12] > 0 { right } else { (right + 1) % v as i64 }
            })
            .collect();
        let lens: Vec<usize> = (0..b).map(|r| lens[r].min(k)).collect();
        check_greedy(&c, &drafts, &lens, &dlf());
    }
}
