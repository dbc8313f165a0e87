"""The tests behind the collector's verdicts on the paper's claims.

Three tests, each for one kind of question about the gap m(a) - m(b) between two rows of a study:

- :func:`t_interval`: the paired gap over seeds with its two-sided Student's t interval. A claim
  that one row is higher or lower agrees when the whole 95% interval lies on the claimed side of 0.
- :func:`tost`: two one-sided tests (Schuirmann 1987) against an equivalence margin ``M``. A
  claim of no difference agrees when both one-sided tests at 5% reject, i.e. the 90% interval
  lies inside (-M, M); it disagrees when the 90% interval lies wholly beyond the margin (a
  difference larger than M resolved at the same 5% level on that side).
- :func:`paired_bootstrap`: the gap in error on the validation images that both rows predicted,
  resampling seeds and images together (a two-way bootstrap), so that the images are treated as a
  sample of the image population once, in both rows at the same time, instead of once per row.

The quantiles of Student's t are computed (:func:`t_quantile`), not tabulated. Everything is
deterministic: the bootstrap draws from a generator with a fixed seed, so a table regenerates
byte for byte.
"""

from __future__ import annotations

import functools
import math
import statistics

import numpy as np

#: Replicates of the two-way bootstrap; its percentile bounds move by about 0.05 points between
#: generator seeds at this count.
BOOTSTRAP_REPLICATES = 4000


def _t_density(x: float, df: int) -> float:
    c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(c - (df + 1) / 2 * math.log1p(x * x / df))


def t_cdf(x: float, df: int) -> float:
    """P(T <= x) for Student's t with ``df`` degrees of freedom (Simpson's rule on the density in
    the variable u = atan(t), which maps the real line onto a bounded interval)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if x == 0:
        return 0.5
    # integral of f(t) dt from 0 to |x| = integral of f(tan u) / cos^2 u du from 0 to atan|x|
    top, n = math.atan(abs(x)), 2000
    h = top / n
    total = 0.0
    for k in range(n + 1):
        u = k * h
        w = 1 if k in (0, n) else (4 if k % 2 else 2)
        total += w * _t_density(math.tan(u), df) / math.cos(u) ** 2
    half = total * h / 3
    return 0.5 + half if x > 0 else 0.5 - half


@functools.lru_cache(maxsize=None)
def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on t_cdf)."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def t_interval(diffs: list[float], level: float = 0.95) -> tuple[float, float | None]:
    """Mean of ``diffs`` and the half-width of its two-sided ``level`` Student's t interval (None
    below two values)."""
    g = statistics.mean(diffs)
    if len(diffs) < 2:
        return g, None
    n = len(diffs)
    return g, t_quantile(0.5 + level / 2, n - 1) * statistics.stdev(diffs) / math.sqrt(n)


def tost(diffs: list[float], margin: float) -> tuple[str, float, float | None, float | None]:
    """Two one-sided tests of |mean gap| < ``margin`` at 5% each.

    Returns the verdict ("equivalent", "different" (the 90% interval wholly beyond the margin),
    "undecided", or "one seed"), the mean gap, the half-width of its 90% interval and the TOST
    p-value (the larger of the two one-sided p-values; None below two values or with no spread)."""
    g, half = t_interval(diffs, level=0.90)
    if half is None:
        return "one seed", g, None, None
    lo, hi = g - half, g + half
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    p = None
    if se > 0:
        df = len(diffs) - 1
        p = max(1 - t_cdf((g + margin) / se, df), t_cdf((g - margin) / se, df))
    if -margin < lo and hi < margin:
        return "equivalent", g, half, p
    if lo > margin or hi < -margin:
        return "different", g, half, p
    return "undecided", g, half, p


def shared_seeds(a: dict, b: dict, what: str, differ) -> list[int]:
    """The seeds both rows have (sorted), for a paired per-image test over ``what`` ("predictions",
    "matches"); ValueError when there is none, or when ``differ(a[s], b[s])`` names a way the two
    rows' records of seed s do not cover the same images."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError(f"no seed has {what} of both rows")
    for s in seeds:
        if why := differ(a[s], b[s]):
            raise ValueError(f"seed {s}: {why}")
    return seeds


def paired_bootstrap(wrong_a: dict[int, np.ndarray], wrong_b: dict[int, np.ndarray], level: float = 0.95,
                     replicates: int = BOOTSTRAP_REPLICATES, seed: int = 0) -> tuple[float, float, float, int]:
    """The gap in error rate (points) of row a over row b on the same validation images, with a
    percentile interval of a two-way bootstrap over seeds and images.

    ``wrong_a[s]`` / ``wrong_b[s]``: per seed, one 0/1 entry per validation image (1 = the final
    prediction was wrong), the images in the same order in both. Only the seeds both have are used.
    Each replicate draws the seeds with replacement and, independently, the images with
    replacement, and takes the mean over the drawn (seed, image) cells of wrong_a - wrong_b.
    Returns the observed gap, the interval's bounds and the number of seeds."""
    seeds = shared_seeds(wrong_a, wrong_b, "predictions",
                         lambda x, y: x.shape != y.shape and f"{x.shape[0]} vs {y.shape[0]} predictions")
    d = np.stack([wrong_a[s].astype(np.float64) - wrong_b[s].astype(np.float64) for s in seeds])
    n_seeds, n_images = d.shape
    rng = np.random.Generator(np.random.PCG64(seed))
    stats = np.empty(replicates)
    for k in range(replicates):
        rows = d[rng.integers(0, n_seeds, n_seeds)]
        stats[k] = rows[:, rng.integers(0, n_images, n_images)].mean()
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    return 100 * float(d.mean()), 100 * float(lo), 100 * float(hi), n_seeds


def decide(kind: str, lo: float, hi: float, margin: float) -> str:
    """The verdict on a claim of ``kind`` from an interval [lo, hi] of the gap m(a) - m(b).

    "higher" / "lower" (give the 95% interval): agrees when the interval lies on the claimed side
    of 0, disagrees when it lies on the other side, else cannot tell. "equal" (give the 90%
    interval, the two one-sided tests at 5% each): agrees when it lies inside (-margin, margin),
    disagrees when it lies wholly beyond the margin, else cannot tell."""
    if kind == "equal":
        if -margin < lo and hi < margin:
            return f"agrees (equivalent within ± {margin:g})"
        if lo > margin or hi < -margin:
            return f"**disagrees** (a gap beyond ± {margin:g} resolved)"
        return f"cannot tell (the interval reaches past ± {margin:g})"
    sign = {"higher": 1, "lower": -1}[kind]
    if sign * lo > 0 and sign * hi > 0:
        return "agrees"
    if sign * lo < 0 and sign * hi < 0:
        return "**disagrees** (the opposite difference resolved)"
    mid = (lo + hi) / 2
    return ("cannot tell (same sign, interval includes 0)" if sign * mid > 0
            else "cannot tell (opposite sign, interval includes 0)")
