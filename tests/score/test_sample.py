"""The rows drawn by their estimated damage (score.sample.drawn_rows): an unbiased sum, exact
where the damage follows the estimate."""

import numpy as np

from lwq_gguf.score.sample import drawn_rows


def proxy(n=500, seed=1):
    rng = np.random.default_rng(seed)
    p = rng.lognormal(0, 2, n)  # heavy-tailed, as a tensor's rows are
    p[:7] = 0.0  # rows with no gradient
    return p


def test_drawn_rows_are_k_distinct_sorted_rows_and_never_a_zero_one():
    p = proxy()
    keep, w = drawn_rows(p, 60, "blk.0.attn_q.weight")
    assert len(keep) == 60 and (np.diff(keep) > 0).all() and len(w) == 60
    assert (p[keep] > 0).all() and (w >= 1 - 1e-12).all()
    again = drawn_rows(p, 60, "blk.0.attn_q.weight")
    assert (again[0] == keep).all()  # the same name draws the same rows
    assert not (drawn_rows(p, 60, "blk.1.attn_q.weight")[0] == keep).all()


def test_a_sum_that_follows_the_estimate_is_exact_and_the_largest_rows_are_certain():
    p = proxy()
    p[100] = 1e6 * p.max()  # a row far above the rest: drawn for certain, counting for itself
    for name in ("a", "b", "c"):
        keep, w = drawn_rows(p, 40, name)
        assert 100 in keep and w[list(keep).index(100)] == 1.0
        np.testing.assert_allclose((p[keep] * w).sum(), p.sum(), rtol=1e-9)


def test_the_estimate_of_any_damage_is_unbiased():
    p = proxy()
    rng = np.random.default_rng(2)
    damage = p * rng.lognormal(0, 1, len(p))  # follows the estimate only roughly
    sums = [(damage[k] * w).sum() for k, w in (drawn_rows(p, 40, f"t{i}") for i in range(3000))]
    assert abs(np.mean(sums) / damage.sum() - 1) < 0.01
    # and better than a uniform sample of as many rows, by far
    uni = [damage[np.random.default_rng(i).choice(len(p), 40, replace=False)].sum()
           * len(p) / 40 for i in range(3000)]
    assert np.std(sums) < 0.5 * np.std(uni)


def test_fewer_rows_that_can_carry_damage_than_asked_are_all_taken():
    p = np.zeros(50)
    p[[3, 9, 20]] = [1.0, 2.0, 3.0]
    keep, w = drawn_rows(p, 10, "x")
    assert list(keep) == [3, 9, 20] and (w == 1).all()
    keep, w = drawn_rows(np.zeros(50), 10, "x")  # (no gradient at all: any rows, uniformly)
    assert len(keep) == 10 and np.allclose(w, 5.0)
