"""The tests behind the claim verdicts (mabn.lab.verdicts) against closed forms and textbook values."""

import math

import numpy as np
import pytest

from mabn.lab import verdicts


@pytest.mark.parametrize("x", [-30.0, -2.5, -0.3, 0.0, 0.7, 4.0, 100.0])
def test_t_cdf_against_the_closed_forms_of_one_and_two_degrees_of_freedom(x):
    assert verdicts.t_cdf(x, 1) == pytest.approx(0.5 + math.atan(x) / math.pi, abs=1e-10)  # Cauchy
    assert verdicts.t_cdf(x, 2) == pytest.approx(0.5 + x / (2 * math.sqrt(2 + x * x)), abs=1e-10)


@pytest.mark.parametrize("p, df, table", [(0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 9, 2.262),
                                          (0.95, 2, 2.920), (0.95, 4, 2.132), (0.95, 9, 1.833),
                                          (0.975, 30, 2.042), (0.995, 5, 4.032)])
def test_t_quantile_against_the_printed_table(p, df, table):
    assert verdicts.t_quantile(p, df) == pytest.approx(table, abs=6e-4)
    assert verdicts.t_quantile(1 - p, df) == pytest.approx(-table, abs=6e-4)


def test_tost_p_value_and_decision_by_hand():
    # 3 gaps: mean 0.5, std 0.5, se 0.5 / sqrt 3; df 2 has a closed-form cdf.
    diffs, margin = [0.0, 0.5, 1.0], 1.5
    se = 0.5 / math.sqrt(3)
    cdf2 = lambda x: 0.5 + x / (2 * math.sqrt(2 + x * x))
    p = max(1 - cdf2((0.5 + margin) / se), cdf2((0.5 - margin) / se))
    outcome, g, half, p_tost = verdicts.tost(diffs, margin)
    assert g == pytest.approx(0.5) and p_tost == pytest.approx(p, rel=1e-6)
    assert half == pytest.approx(2.919986 * se, rel=1e-5) and outcome == "equivalent"  # 0.5 + 0.843 < 1.5
    assert verdicts.tost(diffs, 1.0)[0] == "undecided"  # 1.343 > 1.0 > -0.343
    assert verdicts.tost([3.0, 3.5, 4.0], 1.5)[0] == "different"  # [2.66, 4.34] beyond 1.5
    assert verdicts.tost([1.0], 1.5)[0] == "one seed"


def test_decide_on_intervals():
    assert verdicts.decide("higher", 0.1, 2.0, 1.5) == "agrees"
    assert verdicts.decide("lower", 0.1, 2.0, 1.5).startswith("**disagrees**")
    assert verdicts.decide("lower", -0.5, 2.0, 1.5) == "cannot tell (opposite sign, interval includes 0)"
    assert verdicts.decide("equal", -1.4, 1.4, 1.5).startswith("agrees")
    assert verdicts.decide("equal", 1.6, 3.0, 1.5).startswith("**disagrees**")
    assert verdicts.decide("equal", 0.2, 1.6, 1.5).startswith("cannot tell")


def test_paired_bootstrap_variance_matches_the_two_way_formula():
    """The replicates' variance against the exact variance of the two-way bootstrap mean:
    with plug-in variances V_r (of the seed means), V_c (of the image means) and V (of all
    cells), Var = ((I - 1) V_r + (S - 1) V_c + V) / (S I)."""
    rng = np.random.default_rng(1)
    S, I = 5, 300
    seed_effect = rng.normal(0, 0.08, (S, 1))
    a = (rng.random((S, I)) < 0.35 + seed_effect).astype(np.int64)
    b = (rng.random((S, I)) < 0.30).astype(np.int64)
    d = (a - b).astype(np.float64)
    v_r, v_c, v = d.mean(axis=1).var(), d.mean(axis=0).var(), d.var()
    expected_var = ((I - 1) * v_r + (S - 1) * v_c + v) / (S * I)
    wa, wb = dict(enumerate(a)), dict(enumerate(b))
    # the replicates themselves: rerun the draw with a wide level to get at them through the bounds
    g, lo, hi, n = verdicts.paired_bootstrap(wa, wb, level=0.6827, replicates=20000, seed=3)
    assert n == S and g == pytest.approx(100 * d.mean())
    half_sd = (hi - lo) / 2 / 100  # a central 68.27% interval is +- 1 sd for a near-normal mean
    assert half_sd == pytest.approx(math.sqrt(expected_var), rel=0.06)


def test_paired_bootstrap_is_deterministic_and_checks_its_input():
    a = {0: np.array([1, 0, 1, 1]), 1: np.array([0, 0, 1, 1]), 7: np.array([1, 1, 1, 1])}
    b = {0: np.array([1, 0, 0, 1]), 1: np.array([0, 1, 1, 0])}
    assert verdicts.paired_bootstrap(a, b) == verdicts.paired_bootstrap(a, b)
    assert verdicts.paired_bootstrap(a, b)[3] == 2  # seed 7 has no partner
    same = {0: np.array([1, 0, 1]), 1: np.array([0, 1, 1])}
    assert verdicts.paired_bootstrap(same, same)[:3] == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="no seed"):
        verdicts.paired_bootstrap({0: np.ones(3)}, {1: np.ones(3)})
    with pytest.raises(ValueError, match="seed 0: 3 vs 2"):
        verdicts.paired_bootstrap({0: np.ones(3)}, {0: np.ones(2)})
