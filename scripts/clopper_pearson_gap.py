"""How conservative tfcert's Clopper-Pearson bounds are for n <= 100 (docs/SOUNDNESS.md §1.2).

    .venv/bin/python scripts/clopper_pearson_gap.py      # about a minute on one core

For every n in 1..100, every k in 0..n and every α of ALPHAS, compares
`tfcert.stats.clopper_pearson` and `clopper_pearson_graph` with the exact one-sided bounds
(the Beta quantile Q_α(k, n − k + 1): scipy's value polished by three Newton steps in
40-digit mpmath; upper(k, n) = 1 − lower(n − k, n)) and prints, per function and side,
the largest gap (exact − lower, upper − exact) with where it occurs, and the smallest,
which must be >= 0 (a negative gap is a bound on the unsafe side).
"""

import mpmath as mp
import numpy as np
import scipy.special as sc

from tfcert import stats

mp.mp.dps = 40
ALPHAS = [0.25, 0.2, 0.1, 0.05, 0.025, 0.01, 5e-3, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9,
          1e-10, 1e-12]
k, n, alpha = map(np.array, zip(*[(k, n, a) for n in range(1, 101) for k in range(n + 1)
                                  for a in ALPHAS]))


def exact_lower(k, n, level):
    """Q_level(k, n − k + 1), 0 for k = 0."""
    if k == 0:
        return mp.mpf(0)
    a, b, x = int(k), int(n - k + 1), mp.mpf(sc.betaincinv(k, n - k + 1, level))
    for _ in range(3):
        x -= ((mp.betainc(a, b, 0, x, regularized=True) - level) * mp.beta(a, b)
              / (x ** (a - 1) * (1 - x) ** (b - 1)))
    return x


exact = {point: exact_lower(*point) for point in zip(k, n, alpha)}
for name in ("clopper_pearson", "clopper_pearson_graph"):
    lower, upper = (t.numpy() for t in getattr(stats, name)(k, n, alpha))
    gaps = {"exact − lower": [exact[p] - mp.mpf(lo) for p, lo in zip(zip(k, n, alpha), lower)],
            "upper − exact": [mp.mpf(up) - (1 - exact[m - j, m, a])
                              for j, m, a, up in zip(k, n, alpha, upper)]}
    for side, gap in gaps.items():
        i = int(np.argmax(gap))
        print(f"{name}: {side}: max {mp.nstr(gap[i], 3)} at k = {k[i]}, n = {n[i]}, "
              f"α = {alpha[i]:g}; min {mp.nstr(min(gap), 3)}")
