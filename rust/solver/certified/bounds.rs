//! Interval arithmetic of the certificate: the KL intervals of every expert at every grid point
//! from the summary (support exactly, tail by its Taylor polynomial and Lagrange remainder), and
//! J's interval from them, each widened for its own rounding.

use super::*;

/// [lo, hi] with lo <= hi.
pub(super) type Iv = (f64, f64);

pub(super) fn mul_scalar(a: f64, x: Iv) -> Iv {
    let (p, q) = (a * x.0, a * x.1);
    (p.min(q), p.max(q))
}

/// Range of (k - b)^2 for k in `k`, b in `b`.
pub(super) fn sq_diff(k: Iv, b: Iv) -> Iv {
    let (lo, hi) = (k.0 - b.1, k.1 - b.0);
    let m = (lo * lo).max(hi * hi);
    if lo <= 0.0 && hi >= 0.0 {
        (0.0, m)
    } else {
        ((lo * lo).min(hi * hi), m)
    }
}

/// J's interval from the KL intervals and the targets' intervals, widened for its own rounding.
pub(super) fn j_interval(k1: Iv, k2: Iv, b: &[Iv], c: &[Iv]) -> Iv {
    let (mut lo, mut hi) = (0.0, 0.0);
    for (bs, cs) in b.iter().zip(c) {
        let (x, y) = (sq_diff(k1, *bs), sq_diff(k2, *cs));
        lo += x.0 + y.0;
        hi += x.1 + y.1;
    }
    let r = 4.0 * EPS * (2 * b.len() + 2) as f64;
    (lo * (1.0 - r), hi * (1.0 + r))
}

/// Support tokens per chunk of the lattice (w, e, x: 24 KiB, inside L1).
const LATTICE_CHUNK: usize = 1024;

/// What the KL intervals of one expert need besides the support's sums: the normaliser, E_P[d],
/// the tail's power sums with their magnitudes, and the rounding scales.
pub(super) struct TailBounds<'s> {
    z: Iv,
    mu0: Iv,
    m: &'s [f64; WIDE_ORDER + 1],
    order: usize,
    dt: f64,
    abs_mom: [f64; WIDE_ORDER + 1],
    facts: [f64; WIDE_ORDER + 1],
    gv: f64,
    tiny: f64,
    n_sup: usize,
    /// Largest -log p over the support (its weights' arguments lp + a d are rounded).
    lp_span: f64,
    dmax: f64,
}

impl<'s> TailBounds<'s> {
    pub(super) fn new(s: &'s Summary, t: usize, sp: &[f64]) -> Self {
        // Every sum of the pass runs in LANES independent lanes of at most ceil(V / LANES)
        // terms, then three levels of adds (`total`): its rounding error is at most that many
        // ulps of the sum of magnitudes.
        let gv = (s.n_vocab.div_ceil(LANES) + 3) as f64 * EPS * 1.01;
        // Z: the sum's rounding and each p's (fast_exp: < 4e-16 relative) error.
        let zr = gv + 2e-15;
        let z: Iv = (s.z * (1.0 - zr), s.z * (1.0 + zr));
        let mu0_mid = s.pd[t] / s.z;
        let mu0_err = (gv + 2e-15) * s.pabsd[t] / z.0 + 4.0 * EPS * mu0_mid.abs();
        let (m, order) = (&s.mom[t], s.order);
        // sum p |d|^j over the tail (the scale of S_j's rounding): S_j for even j, for odd j at
        // most sqrt(S_{j-1} S_{j+1}) (Cauchy-Schwarz); the factor covers the sums' own rounding.
        let abs_mom: [f64; WIDE_ORDER + 1] = std::array::from_fn(|j| {
            if j > order {
                return 0.0;
            }
            let x = if j % 2 == 0 {
                m[j].max(0.0)
            } else {
                (m[j - 1].max(0.0) * m[j + 1].max(0.0)).sqrt()
            };
            x * (1.0 + 1e-10)
        });
        let n_sup = s.n_sup;
        // The support holds possible tokens only (lp > -inf); a select, not f64::max, so that
        // the fold vectorises.
        let lp_span = sp[..n_sup]
            .iter()
            .fold(0.0f64, |a, &x| if -x > a { -x } else { a });
        TailBounds {
            z,
            mu0: (mu0_mid - mu0_err, mu0_mid + mu0_err),
            m,
            order,
            dt: s.tail_absmax[t],
            abs_mom,
            facts: std::array::from_fn(|k| (1..=k).map(|x| x as f64).product()),
            gv,
            // Underflowed or subnormal weights (support or tail): at most 1e-300 each.
            tiny: (n_sup as f64 + s.n_vocab as f64) * 1e-300,
            n_sup,
            lp_span,
            dmax: s.absmax[t],
        }
    }

    /// Relative error of the support's sum when each weight's argument lp + a d was built with
    /// `products` products by e^{h d} after one exponential at a0: the lane sums' roundings,
    /// the exponentials' (< 6e-16 each, with the product's rounding), and the rounding of the
    /// arguments (|lp| + 2 |a0| |d| at the start, |h d| per product), relative to the weight.
    pub(super) fn support_rel(&self, a0: f64, h: f64, products: usize) -> f64 {
        let arg =
            EPS * 1.01 * (self.lp_span + (2.0 * a0.abs() + products as f64 * h.abs()) * self.dmax);
        (self.n_sup as f64 + 8.0) * EPS * 1.01 + (products as f64 + 2.0) * 6e-16 + 2e-15 + arg
    }

    /// K1, K2 intervals at weight a from the support's sums of w, w d, w |d| (w = p e^{a d},
    /// relative error `sr`) and the tail's Taylor polynomial with its Lagrange remainder.
    pub(super) fn kls(&self, a: f64, sums: (f64, f64, f64), sr: f64) -> (Iv, Iv) {
        let (a_s, b_s, b_abs) = sums;
        let (m, order, fact) = (self.m, self.order, &self.facts);
        let (z, mu0, tiny) = (self.z, self.mu0, self.tiny);
        let aa = a.abs();
        let ea = (aa * self.dt).exp() * (1.0 + 1e-15);
        let (mut ar, mut br) = (0.0, 0.0);
        // With them, sum_j |a|^j / j! sum p |d|^j (A's terms) and sum p |d|^{j+1} (B's): the
        // scale of the power sums' rounding.
        let (mut ta, mut tb, mut apow) = (0.0, 0.0, 1.0);
        for j in 0..order {
            let f = fact[j];
            ar += apow * m[j] / f;
            ta += apow.abs() * self.abs_mom[j] / f;
            if j < order - 1 {
                br += apow * m[j + 1] / f;
                tb += apow.abs() * self.abs_mom[j + 1] / f;
            }
            apow *= a;
        }
        // (1 + 1e-12): the remainders' own rounding (S_order and the factors, a few ulps).
        let rem_a = aa.powi(order as i32) / fact[order] * ea * m[order] * (1.0 + 1e-12);
        let rem_b = aa.powi(order as i32 - 1) / fact[order - 1] * ea * m[order] * (1.0 + 1e-12);
        // Rounding of the power sums (n terms each, |p d^j| <= p dt^j; each power a product
        // tree of at most 2 * order roundings) and of the polynomial (order terms).
        let ur = self.gv + 2e-15 + 4.0 * order as f64 * EPS;
        let (tr_a, tr_b) = (ur * ta, ur * tb);
        let a_iv: Iv = (
            a_s * (1.0 - sr) + ar - rem_a - tr_a - tiny,
            a_s * (1.0 + sr) + ar + rem_a + tr_a + tiny,
        );
        let b_err = sr * b_abs + rem_b + tr_b + tiny;
        let b_iv: Iv = (b_s + br - b_err, b_s + br + b_err);
        if a == 0.0 {
            ((0.0, 0.0), (0.0, 0.0))
        } else if a_iv.0.is_nan() || a_iv.0 <= 0.0 {
            ((f64::NAN, f64::NAN), (f64::NAN, f64::NAN))
        } else {
            let l: Iv = ((a_iv.0 / z.1).ln(), (a_iv.1 / z.0).ln());
            let l = (
                l.0 - 4.0 * EPS * (1.0 + l.0.abs()),
                l.1 + 4.0 * EPS * (1.0 + l.1.abs()),
            );
            let r: Iv = if b_iv.0 >= 0.0 {
                (b_iv.0 / a_iv.1, b_iv.1 / a_iv.0)
            } else if b_iv.1 <= 0.0 {
                (b_iv.0 / a_iv.0, b_iv.1 / a_iv.1)
            } else {
                (b_iv.0 / a_iv.0, b_iv.1 / a_iv.0)
            };
            let ar_ = mul_scalar(a, r);
            let amu = mul_scalar(a, mu0);
            let k1 = (ar_.0 - l.1, ar_.1 - l.0);
            let k2 = (l.0 - amu.1, l.1 - amu.0);
            let w1 = 4.0 * EPS * (ar_.0.abs().max(ar_.1.abs()) + l.0.abs().max(l.1.abs()));
            let w2 = 4.0 * EPS * (amu.0.abs().max(amu.1.abs()) + l.0.abs().max(l.1.abs()));
            // The full scan clamps the KLs at 0 (monotone: the interval's ends clamp likewise).
            (
                ((k1.0 - w1).max(0.0), (k1.1 + w1).max(0.0)),
                ((k2.0 - w2).max(0.0), (k2.1 + w2).max(0.0)),
            )
        }
    }
}

/// The support's sums of w, w d, w |d| at weight a, w = p e^{a d} (one exponential per token;
/// x: the expert's d over the support, contiguous).
pub(super) fn support_sums(sp: &[f64], x: &[f64], a: f64) -> (f64, f64, f64) {
    let mut acc = [[0.0f64; LANES]; 3];
    simd_dispatch!(
        avx512: kernels::avx512_support_at(sp, x, a, &mut acc),
        avx2: kernels::avx2_support_at(sp, x, a, &mut acc),
        portable: kernels::support_at(sp, x, a, &mut acc),
    );
    (total(&acc[0]), total(&acc[1]), total(&acc[2]))
}

/// Expert t's d over the support, contiguous (the support stores every expert's d per token).
pub(super) fn support_direction(s: &Summary, sd: &[f64], t: usize) -> Vec<f64> {
    let n_t = s.pd.len();
    (0..s.n_sup).map(|k| sd[k * n_t + t]).collect()
}

/// K1, K2 intervals of expert t at any weight a (the exact solver's refined weights); x is
/// `support_direction(t)`.
pub(super) fn kls_at(s: &Summary, sp: &[f64], x: &[f64], t: usize, a: f64) -> (Iv, Iv) {
    let tb = TailBounds::new(s, t, sp);
    let sums = support_sums(&sp[..s.n_sup], &x[..s.n_sup], a);
    tb.kls(a, sums, tb.support_rel(a, 0.0, 0))
}

/// K1, K2 intervals of expert t at every grid point.
pub(super) fn kl_bounds(
    s: &Summary,
    cfg: &SolverConfig,
    n_pts: usize,
    t: usize,
    sc: &mut CertScratch,
    cancel: Cancel<'_>,
) -> Result<(), DlfError> {
    let n_t = s.pd.len();
    let n_sup = s.n_sup;
    let tb = TailBounds::new(s, t, &sc.sp);
    // Lattice over the support: x = d, w = p e^{a_0 d}, advanced by e^{h d} per grid point, in
    // chunks of LATTICE_CHUNK tokens that stay in L1 while every grid point runs over them
    // (grid point by grid point over the whole support read w, e and x from L3 or memory once
    // per point: real fine-tunes' rows put a third of the vocabulary or more in the support).
    sc.x.clear();
    sc.x.extend((0..n_sup).map(|k| sc.sd[k * n_t + t]));
    sc.w.resize(LATTICE_CHUNK.min(n_sup), 0.0);
    sc.e.resize(LATTICE_CHUNK.min(n_sup), 0.0);
    sc.lat.clear();
    sc.lat.resize(n_pts, [[0.0; LANES]; 3]);
    let h = cfg.grid_step;
    let mut c0 = 0;
    while c0 < n_sup {
        cancel.check()?;
        let c1 = (c0 + LATTICE_CHUNK).min(n_sup);
        let (lp, x) = (&sc.sp[c0..c1], &sc.x[c0..c1]);
        let (w, e) = (&mut sc.w[..c1 - c0], &mut sc.e[..c1 - c0]);
        simd_dispatch!(
            avx512: kernels::avx512_lattice_start(lp, x, cfg.alpha_min, h, w, e),
            avx2: kernels::avx2_lattice_start(lp, x, cfg.alpha_min, h, w, e),
            portable: kernels::lattice_start(lp, x, cfg.alpha_min, h, w, e),
        );
        for acc in sc.lat.iter_mut() {
            simd_dispatch!(
                avx512: kernels::avx512_lattice(w, e, x, acc),
                avx2: kernels::avx2_lattice(w, e, x, acc),
                portable: kernels::lattice(w, e, x, acc),
            );
        }
        c0 = c1;
    }
    for i in 0..n_pts {
        let a_lat = cfg.alpha_min + i as f64 * h;
        let a = cfg.grid_value(i);
        let (sums, sr) = if a == a_lat {
            let [as_, bs_, babs] = &sc.lat[i];
            (
                (total(as_), total(bs_), total(babs)),
                tb.support_rel(cfg.alpha_min, h, i),
            )
        } else {
            // The clamped last grid value (rounding only): evaluated directly.
            let sums = support_sums(&sc.sp[..n_sup], &sc.x[..n_sup], a);
            (sums, tb.support_rel(a, 0.0, 0))
        };
        let (k1, k2) = tb.kls(a, sums, sr);
        sc.k1[t * n_pts + i] = k1;
        sc.k2[t * n_pts + i] = k2;
    }
    Ok(())
}
