//! Criterion benches of one decoding step (`fuse_step`) on LM-shaped logits.
//!
//! Logits: z = -1.1 ln(rank) + noise under a per-row random permutation (a Zipf-like head), the
//! small model an independent draw of the same shape, each expert = small + a sparse
//! perturbation on ~2% of tokens; all from a fixed xorshift seed. Runs are kept short by default
//! (10 samples, 1 s warm-up, 2 s measurement); pass criterion flags to lengthen them.
//!
//! `kinds` compares row kinds side by side at V in {32000, 128256, 151936}, B=8 T=1
//! and B=32 T=4: the default, the plain full scan (support_k=V) and the exact solver on the Zipf
//! family above and on dense rows shaped like real fine-tunes (`dense_family`: each expert =
//! small + N(0, s) on every token, s in [0.05, 0.3] per row, plus 20 tokens boosted by 2..6).
//! Real rows: `kinds/real_*` reads the rows recorded by `python -m dlf_rs.real_family record`
//! (Qwen2.5-Coder 1.5B / 0.5B, V = 151,936, one expert; the file named by `DLF_RS_REAL_ROWS`,
//! default `~/.cache/dlf_rs/real-family/rows-8x32.safetensors`), B = 8 and 32, T = 1, when the
//! file exists. The shipped family's rows are in `benches/bench_fuse_step.py`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use dlf_rs::{fuse_step, Sampling, Seeds, SolverConfig, SolverKind, StepInputs, Weights};

struct XorShift(u64);

impl XorShift {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn zipf_rows(rng: &mut XorShift, b: usize, v: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; b * v];
    let mut perm: Vec<usize> = (0..v).collect();
    for row in out.chunks_mut(v) {
        for i in (1..v).rev() {
            let j = (rng.next_f64() * (i + 1) as f64) as usize;
            perm.swap(i, j.min(i));
        }
        for (rank, &tok) in perm.iter().enumerate() {
            row[tok] = (-1.1 * ((rank + 1) as f64).ln() + 0.3 * rng.next_f64()) as f32;
        }
    }
    out
}

struct Family {
    large: Vec<f32>,
    small: Vec<f32>,
    experts: Vec<Vec<f32>>,
}

impl Family {
    fn expert_rows(&self) -> Vec<&[f32]> {
        self.experts.iter().map(|e| e.as_slice()).collect()
    }

    fn inputs<'a>(&'a self, ex: &'a [&'a [f32]], b: usize, v: usize) -> StepInputs<'a> {
        StepInputs {
            large: &self.large,
            small: &self.small,
            experts: ex,
            batch: b,
            vocab: v,
        }
    }
}

fn family(b: usize, v: usize, n_t: usize) -> Family {
    let mut rng = XorShift(0x5eed_1234_abcd_0001);
    let large = zipf_rows(&mut rng, b, v);
    let small = zipf_rows(&mut rng, b, v);
    let experts = (0..n_t)
        .map(|_| {
            small
                .iter()
                .map(|&s| {
                    if rng.next_f64() < 0.02 {
                        s + (4.0 * rng.next_f64() - 1.0) as f32
                    } else {
                        s
                    }
                })
                .collect()
        })
        .collect();
    Family {
        large,
        small,
        experts,
    }
}

impl XorShift {
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.next_f64().max(1e-300), self.next_f64());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// Rows like a real fine-tune's: d = z_E - z_S small and nonzero on every token (N(0, s),
/// s ~ U(0.05, 0.3) per row and expert) plus 20 task tokens boosted by U(2, 6).
fn dense_family(b: usize, v: usize, n_t: usize) -> Family {
    let mut rng = XorShift(0x5eed_1234_abcd_0002);
    let large = zipf_rows(&mut rng, b, v);
    let small = zipf_rows(&mut rng, b, v);
    let experts = (0..n_t)
        .map(|_| {
            let mut e = Vec::with_capacity(b * v);
            for row in small.chunks(v) {
                let sigma = 0.05 + 0.25 * rng.next_f64();
                let start = e.len();
                e.extend(row.iter().map(|&s| s + (sigma * rng.normal()) as f32));
                for _ in 0..20 {
                    let k = (rng.next_f64() * v as f64) as usize % v;
                    e[start + k] += (2.0 + 4.0 * rng.next_f64()) as f32;
                }
            }
            e
        })
        .collect();
    Family {
        large,
        small,
        experts,
    }
}

/// The recorded real rows (large, small, expert_0 as f32 `[rows, vocab]`) from a safetensors
/// file, or None when it is absent. The header is read by hand (a JSON object of
/// `{"name": {"dtype": "F32", "shape": [r, v], "data_offsets": [a, b]}}`): no dependency for a
/// bench.
fn real_rows() -> Option<(Family, usize, usize)> {
    let path = std::env::var("DLF_RS_REAL_ROWS").ok().or_else(|| {
        std::env::var("HOME")
            .ok()
            .map(|h| format!("{h}/.cache/dlf_rs/real-family/rows-8x32.safetensors"))
    })?;
    let bytes = std::fs::read(&path).ok()?;
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header = std::str::from_utf8(bytes.get(8..8 + n)?).ok()?;
    let tensor = |name: &str| -> Option<(Vec<f32>, usize, usize)> {
        let at = header.find(&format!("\"{name}\""))?;
        let rest = &header[at..];
        let nums = |key: &str| -> Option<Vec<usize>> {
            let k = rest.find(key)? + key.len();
            let close = rest[k..].find(']')?;
            rest[k..k + close]
                .split(',')
                .map(|x| x.trim().trim_start_matches('[').parse().ok())
                .collect()
        };
        let (shape, off) = (nums("\"shape\":")?, nums("\"data_offsets\":")?);
        let data = bytes.get(8 + n + off[0]..8 + n + off[1])?;
        let z = data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Some((z, shape[0], shape[1]))
    };
    let (large, r, v) = tensor("large")?;
    let (small, _, _) = tensor("small")?;
    let (expert, _, _) = tensor("expert_0")?;
    Some((
        Family {
            large,
            small,
            experts: vec![expert],
        },
        r,
        v,
    ))
}

fn bench_kinds(c: &mut Criterion) {
    let mut group = c.benchmark_group("kinds");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    for &v in &[32_000usize, 128_256, 151_936] {
        for &(b, n_t) in &[(8usize, 1usize), (32, 4)] {
            for (kind, fam) in [
                ("zipf", family(b, v, n_t)),
                ("dense", dense_family(b, v, n_t)),
            ] {
                let ex = fam.expert_rows();
                bench_kind(&mut group, kind, &fam.inputs(&ex, b, v));
            }
        }
    }
    match real_rows() {
        Some((fam, rows, v)) => {
            for b in [8usize, 32].into_iter().filter(|&b| b <= rows) {
                let ex: Vec<&[f32]> = vec![&fam.experts[0][..b * v]];
                let inputs = StepInputs {
                    large: &fam.large[..b * v],
                    small: &fam.small[..b * v],
                    experts: &ex,
                    batch: b,
                    vocab: v,
                };
                bench_kind(&mut group, "real", &inputs);
            }
        }
        None => eprintln!("kinds/real: no recorded rows (DLF_RS_REAL_ROWS); skipped"),
    }
    group.finish();
}

/// The default, the plain full scan and the exact solver on one batch of one kind of rows.
fn bench_kind(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    kind: &str,
    inputs: &StepInputs<'_>,
) {
    let (b, v, n_t) = (inputs.batch, inputs.vocab, inputs.experts.len());
    for (name, solver, support_k) in [
        ("default", SolverKind::Grid, None),
        ("full_scan", SolverKind::Grid, Some(v)),
        ("exact", SolverKind::Exact, None),
    ] {
        let w = Weights::Dynamic(SolverConfig {
            solver,
            support_k,
            ..Default::default()
        });
        let id = BenchmarkId::new(format!("{kind}_{name}"), format!("B{b}_V{v}_T{n_t}"));
        group.bench_with_input(id, inputs, |bch, inp| {
            bch.iter(|| {
                fuse_step(black_box(inp), &w, &Sampling::default(), &Seeds::One(0)).unwrap()
            })
        });
    }
}

fn bench_fuse_step(c: &mut Criterion) {
    let mut group = c.benchmark_group("fuse_step");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    for &v in &[32_000usize, 128_256] {
        for &b in &[1usize, 8, 32] {
            for &n_t in &[1usize, 4] {
                let fam = family(b, v, n_t);
                let ex = fam.expert_rows();
                let inputs = fam.inputs(&ex, b, v);
                let mut configs = vec![("grid_full", SolverKind::Grid, None)];
                configs.push(("grid_k256", SolverKind::Grid, Some(256)));
                if b == 8 {
                    configs.push(("exact_full", SolverKind::Exact, None));
                    configs.push(("exact_k256", SolverKind::Exact, Some(256)));
                }
                for (name, solver, support_k) in configs {
                    let w = Weights::Dynamic(SolverConfig {
                        solver,
                        support_k,
                        ..Default::default()
                    });
                    let id = BenchmarkId::new(name, format!("B{b}_V{v}_T{n_t}"));
                    group.bench_with_input(id, &inputs, |bch, inp| {
                        bch.iter(|| {
                            fuse_step(black_box(inp), &w, &Sampling::default(), &Seeds::One(0))
                                .unwrap()
                        })
                    });
                }
            }
        }
    }
    group.finish();
}

/// What an exact answer cannot go below, on the issue-11 shapes, beside the default: reading
/// every input logit once (a sum), and one f64 exponential of every input logit (the exact
/// targets KL(Q_t||Q), KL(Q||Q_t) and Z need exp of every logit of every model), both over the
/// rows in parallel as fuse_step runs them, on the best tier the CPU has.
fn bench_floors(c: &mut Criterion) {
    use rayon::prelude::*;
    let mut group = c.benchmark_group("floors");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    for &(b, n_t) in &[(8usize, 1usize), (32, 4)] {
        let v = 32_000;
        let fam = family(b, v, n_t);
        let ex = fam.expert_rows();
        let mut arrays: Vec<&[f32]> = vec![&fam.large, &fam.small];
        arrays.extend(ex.iter().copied());
        let rows = |a: &[&[f32]], f: &(dyn Fn(&[f32]) -> f64 + Sync)| -> f64 {
            (0..b)
                .into_par_iter()
                .map(|r| a.iter().map(|m| f(&m[r * v..(r + 1) * v])).sum::<f64>())
                .sum()
        };
        let shape = format!("B{b}_V{v}_T{n_t}");
        group.bench_function(BenchmarkId::new("read_once", &shape), |bch| {
            bch.iter(|| rows(black_box(&arrays), &read_sum))
        });
        group.bench_function(BenchmarkId::new("exp_once_f64", &shape), |bch| {
            bch.iter(|| rows(black_box(&arrays), &exp_sum))
        });
        let inputs = fam.inputs(&ex, b, v);
        let w = Weights::Dynamic(SolverConfig::default());
        group.bench_function(BenchmarkId::new("fuse_step_default", &shape), |bch| {
            bch.iter(|| {
                fuse_step(black_box(&inputs), &w, &Sampling::default(), &Seeds::One(0)).unwrap()
            })
        });
    }
    group.finish();
}

/// sum z in sixteen f32 lanes (as numpy sums float32), vectorised.
fn read_sum(z: &[f32]) -> f64 {
    dlf_rs::numerics::with_simd(
        #[inline(always)]
        || {
            let mut acc = [0.0f32; 16];
            let ch = z.chunks_exact(16);
            let rest = ch.remainder();
            for c in ch {
                for l in 0..16 {
                    acc[l] += c[l];
                }
            }
            (acc.iter().sum::<f32>() + rest.iter().sum::<f32>()) as f64
        },
    )
}

/// sum exp(z - 1) in f64 with the crate's fastest exponential for this CPU.
fn exp_sum(z: &[f32]) -> f64 {
    #[inline(always)]
    fn body<X: dlf_rs::numerics::Exp>(z: &[f32]) -> f64 {
        let mut acc = [0.0f64; 8];
        let ch = z.chunks_exact(8);
        let rest = ch.remainder();
        for c in ch {
            for l in 0..8 {
                acc[l] += X::exp(c[l] as f64 - 1.0);
            }
        }
        acc.iter().sum::<f64>() + rest.iter().map(|&x| X::exp(x as f64 - 1.0)).sum::<f64>()
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn avx2(z: &[f32]) -> f64 {
        body::<dlf_rs::numerics::Plain>(z)
    }
    #[cfg(target_arch = "x86_64")]
    {
        if dlf_rs::numerics::has_avx512() {
            // The table exponential the AVX-512 summary pass uses.
            // SAFETY: the features were detected at run time.
            return unsafe { dlf_rs::numerics::exp512::exp_sum(z, 1.0) };
        }
        if dlf_rs::numerics::has_avx2() {
            // SAFETY: as above.
            return unsafe { avx2(z) };
        }
    }
    body::<dlf_rs::numerics::Plain>(z)
}

/// The same number of grid points (2001) on the plain lattice (alpha_min >= 0, narrow range) and
/// on the restarted lattice (a negative lower bound, or a range so wide that weights could
/// underflow): the goal is that the latter costs at most a small multiple of the former.
fn bench_grid_ranges(c: &mut Criterion) {
    let mut group = c.benchmark_group("grid_range");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let (b, v, n_t) = (8usize, 32_000usize, 1usize);
    let fam = family(b, v, n_t);
    let ex = fam.expert_rows();
    let inputs = fam.inputs(&ex, b, v);
    for (name, lo, hi, step) in [
        ("plain_0_2_step0.001", 0.0, 2.0, 0.001),
        ("restarted_-1_1_step0.001", -1.0, 1.0, 0.001),
        ("restarted_-100_100_step0.1", -100.0, 100.0, 0.1),
        ("restarted_0_100_step0.05", 0.0, 100.0, 0.05),
    ] {
        let w = Weights::Dynamic(SolverConfig {
            alpha_min: lo,
            alpha_max: hi,
            grid_step: step,
            ..Default::default()
        });
        let id = BenchmarkId::new(name, format!("B{b}_V{v}_T{n_t}_2001pts"));
        group.bench_with_input(id, &inputs, |bch, inp| {
            bch.iter(|| {
                fuse_step(black_box(inp), &w, &Sampling::default(), &Seeds::One(0)).unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    bench_floors,
    bench_grid_ranges,
    bench_fuse_step,
    bench_kinds
);
criterion_main!(benches);
