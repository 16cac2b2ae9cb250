//! Unit and property tests of the penalties (`penalty.rs`) and their place in the flow: after
//! fusion, before the sampler, never in the weights.

use super::*;
use crate::config::{Sampling, Seeds, Weights};
use crate::sample::{sample_batch, sample_batch_penalized};
use crate::step::{fuse_step, fuse_step_with_penalties, StepInputs};
use crate::Cancel;

fn pen(repetition: f64, frequency: f64, presence: f64) -> Penalties {
    Penalties {
        repetition,
        frequency,
        presence,
    }
}

fn applied(z: &[f32], seen: &[i64], p: Penalties) -> Vec<f32> {
    let mut out = z.to_vec();
    apply_penalties(&mut out, seen, &p, &mut SeenCounts::default());
    out
}

/// The reference: per distinct id, straight from the definitions (counts by a scan).
fn reference(z: &[f32], seen: &[i64], p: Penalties) -> Vec<f32> {
    let mut out = z.to_vec();
    for (i, o) in out.iter_mut().enumerate() {
        let c = seen.iter().filter(|&&t| t == i as i64).count();
        if c == 0 || *o == f32::NEG_INFINITY {
            continue;
        }
        let r = p.repetition as f32;
        let mut x = if *o > 0.0 { *o / r } else { *o * r };
        x -= p.frequency as f32 * c as f32;
        x -= p.presence as f32;
        *o = x.clamp(-f32::MAX, f32::MAX);
    }
    out
}

#[test]
fn each_penalty_by_hand() {
    let z = [2.0f32, -2.0, 0.0, 1.0, f32::NEG_INFINITY];
    let seen = [0, 1, 1, 2, 4, -1, 0, 0];
    assert_eq!(
        applied(&z, &seen, pen(2.0, 0.0, 0.0)),
        [1.0, -4.0, 0.0, 1.0, f32::NEG_INFINITY]
    );
    // counts: token 0 three times, 1 twice, 2 once, 4 once (padding -1 ignored)
    assert_eq!(
        applied(&z, &seen, pen(1.0, 0.5, 0.0)),
        [0.5, -3.0, -0.5, 1.0, f32::NEG_INFINITY]
    );
    assert_eq!(
        applied(&z, &seen, pen(1.0, 0.0, 0.25)),
        [1.75, -2.25, -0.25, 1.0, f32::NEG_INFINITY]
    );
    // repetition first, then frequency and presence: 2 / 2 - 3 * 0.5 - 1 = -1.5
    assert_eq!(applied(&z, &seen, pen(2.0, 0.5, 1.0))[0], -1.5);
    // negative frequency / presence reward seen tokens
    assert_eq!(applied(&z, &seen, pen(1.0, -1.0, -1.0))[0], 6.0);
    // a repetition penalty < 1 encourages them
    assert_eq!(applied(&z, &seen, pen(0.5, 0.0, 0.0))[..2], [4.0, -1.0]);
    // neutral values change nothing, and an empty history nothing either
    assert_eq!(applied(&z, &seen, Penalties::default()), z);
    assert_eq!(applied(&z, &[], pen(3.0, 1.0, 1.0)), z);
}

#[test]
fn matches_the_reference_on_random_rows() {
    let mut next = crate::testing::xorshift(0x5eed_fa11);
    let mut counts = SeenCounts::default();
    for case in 0..400 {
        let v = 1 + (next() % 300) as usize;
        let z: Vec<f32> = (0..v)
            .map(|_| match next() % 11 {
                0 => f32::NEG_INFINITY,
                1 => 0.0,
                _ => ((next() % 20_000) as f32 - 10_000.0) / 997.0,
            })
            .collect();
        let len = (next() % 60) as usize;
        let seen: Vec<i64> = (0..len)
            .map(|_| (next() % (v as u64 + 3)) as i64 - 3)
            .collect();
        let f = |k: u64| ((k % 401) as f64 - 200.0) / 100.0;
        let p = pen(0.05 + (next() % 400) as f64 / 100.0, f(next()), f(next()));
        let mut got = z.clone();
        // One scratch for every row: it must come back zeroed.
        apply_penalties(&mut got, &seen, &p, &mut counts);
        let want = reference(&z, &seen, p);
        assert_eq!(
            got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            "case {case}: {p:?} {seen:?}"
        );
        assert!(counts.0.iter().all(|&c| c == 0), "case {case}");
    }
}

#[test]
fn finite_stays_finite_and_minus_inf_stays() {
    let z = [3e38f32, -3e38, 1.0, f32::NEG_INFINITY];
    let seen = [0, 1, 2, 3];
    let tiny = applied(&z, &seen, pen(1e-300, 0.0, 0.0));
    // 1e-300 rounds to 0 in f32 and is kept at the smallest subnormal instead.
    let sub = f32::from_bits(1);
    assert_eq!(tiny, [f32::MAX, -3e38 * sub, f32::MAX, f32::NEG_INFINITY]);
    let huge = applied(&z, &seen, pen(1e300, 0.0, 0.0));
    assert_eq!(huge, [0.0, -f32::MAX, 0.0, f32::NEG_INFINITY]);
    let many: Vec<i64> = vec![1; 1000];
    assert_eq!(applied(&z, &many, pen(1e300, 2.0, 2.0))[1], -f32::MAX);
    assert!(applied(&z, &seen, pen(1e-300, 2.0, 2.0))
        .iter()
        .all(|x| !x.is_nan()));
}

#[test]
fn history_is_checked_only_when_a_penalty_is_active() {
    let tokens = [0i64, 1, -1, 7];
    let bad_id = History {
        tokens: &tokens,
        offsets: &[0, 2, 4],
    };
    let p = pen(1.2, 0.0, 0.0);
    assert!(resolve_history(&Penalties::default(), Some(&bad_id), 2, 5)
        .unwrap()
        .is_none());
    assert!(resolve_history(&Penalties::default(), None, 2, 5)
        .unwrap()
        .is_none());
    let msg = resolve_history(&p, Some(&bad_id), 2, 5)
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with("history[1]: expected token ids < 5"),
        "{msg}"
    );
    assert!(msg.ends_with("got 7 at position 1"), "{msg}");
    assert!(resolve_history(&p, Some(&bad_id), 2, 8).unwrap().is_some());
    let msg = resolve_history(&p, None, 2, 8).unwrap_err().to_string();
    assert!(msg.starts_with("history: expected the tokens"), "{msg}");
    for p in [pen(1.0, 0.1, 0.0), pen(1.0, 0.0, -0.1)] {
        assert!(resolve_history(&p, None, 2, 8).is_err());
    }
    let rows = resolve_history(&p, Some(&bad_id), 3, 8).unwrap_err();
    assert!(matches!(rows, DlfError::Shape { ref arg, .. } if arg == "history"));
    for off in [&[1usize, 2, 4][..], &[0, 3, 2], &[0, 2, 3]] {
        let h = History {
            tokens: &tokens,
            offsets: off,
        };
        let e = resolve_history(&p, Some(&h), 2, 8).unwrap_err();
        assert!(matches!(e, DlfError::InvalidArgument { ref arg, .. } if arg == "history"));
    }
}

fn rows(next: &mut impl FnMut() -> u64, b: usize, v: usize) -> Vec<f32> {
    (0..b * v)
        .map(|_| ((next() % 4000) as f32 - 2000.0) / 500.0)
        .collect()
}

/// `fuse_step` with penalties: the weights and traces are those without, and the token is the
/// one `sample_batch` draws from the penalised fused logits (greedy and sampled, every row).
#[test]
fn step_penalises_the_fused_row_only() {
    let mut next = crate::testing::xorshift(77);
    for case in 0..24 {
        let (b, v) = (1 + case % 5, 40 + 13 * case);
        let large = rows(&mut next, b, v);
        let small = rows(&mut next, b, v);
        let e0 = rows(&mut next, b, v);
        let e1 = rows(&mut next, b, v);
        let experts: Vec<&[f32]> = if case % 2 == 0 {
            vec![&e0]
        } else {
            vec![&e0, &e1]
        };
        let inputs = StepInputs {
            large: &large,
            small: &small,
            experts: &experts,
            batch: b,
            vocab: v,
        };
        // Ragged rows of random ids, each ending in padding.
        let mut tokens = vec![];
        let mut offsets = vec![0usize];
        for _ in 0..b {
            let n = 1 + (next() % 30) as usize;
            tokens.extend((0..n).map(|_| (next() % v as u64) as i64));
            tokens.push(-1);
            offsets.push(tokens.len());
        }
        let history = History {
            tokens: &tokens,
            offsets: &offsets,
        };
        let weights = if case % 3 == 0 {
            Weights::Static(vec![1.0; experts.len()])
        } else {
            Weights::Dynamic(Default::default())
        };
        let p = pen(1.3, 0.4, 0.2);
        for temperature in [0.0, 0.8] {
            let s = Sampling {
                temperature,
                top_k: 7,
                ..Default::default()
            };
            let seeds = Seeds::One(case as u64);
            let plain = fuse_step(&inputs, &weights, &s, &seeds).unwrap();
            let got = fuse_step_with_penalties(
                &inputs,
                &weights,
                &s,
                &p,
                Some(&history),
                &seeds,
                Cancel::NEVER,
            )
            .unwrap();
            assert_eq!(got.alphas, plain.alphas);
            assert_eq!(
                got.loss.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                plain.loss.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
            assert_eq!(got.active, plain.active);
            // The reference: fuse, penalise row by row, sample.
            let mut fused = vec![0.0f32; b * v];
            crate::step::fuse_logits(&inputs, &plain.alphas, &mut fused).unwrap();
            for (r, row) in fused.chunks_mut(v).enumerate() {
                let penalised = reference(row, history.row(r), p);
                row.copy_from_slice(&penalised);
            }
            let want = sample_batch(&fused, b, v, &s, &seeds).unwrap();
            assert_eq!(got.tokens, want, "case {case}, T = {temperature}");
            // And sample_batch_penalized on the raw fused logits agrees.
            let mut raw = vec![0.0f32; b * v];
            crate::step::fuse_logits(&inputs, &plain.alphas, &mut raw).unwrap();
            let by_sample =
                sample_batch_penalized(&raw, b, v, &s, &p, Some(&history), &seeds, Cancel::NEVER)
                    .unwrap();
            assert_eq!(by_sample, want);
        }
    }
}

#[test]
fn neutral_penalties_change_nothing_and_ignore_history() {
    let mut next = crate::testing::xorshift(5);
    let (b, v) = (3, 64);
    let (large, small, e) = (
        rows(&mut next, b, v),
        rows(&mut next, b, v),
        rows(&mut next, b, v),
    );
    let experts: Vec<&[f32]> = vec![&e];
    let inputs = StepInputs {
        large: &large,
        small: &small,
        experts: &experts,
        batch: b,
        vocab: v,
    };
    let junk = History {
        tokens: &[999],
        offsets: &[0, 1],
    };
    let w = Weights::Dynamic(Default::default());
    let s = Sampling::default();
    let plain = fuse_step(&inputs, &w, &s, &Seeds::One(1)).unwrap();
    let with = fuse_step_with_penalties(
        &inputs,
        &w,
        &s,
        &Penalties::default(),
        Some(&junk),
        &Seeds::One(1),
        Cancel::NEVER,
    )
    .unwrap();
    assert_eq!(plain, with);
    let err = fuse_step_with_penalties(
        &inputs,
        &w,
        &s,
        &pen(1.0, 0.0, 1.0),
        None,
        &Seeds::One(1),
        Cancel::NEVER,
    )
    .unwrap_err();
    assert!(err.to_string().starts_with("history:"), "{err}");
}
