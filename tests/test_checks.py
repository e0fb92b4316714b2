"""The shared validators: each failure names the argument, shows the value and says the fix."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gcflows import checks


def test_integer_and_real_bounds_and_messages():
    assert checks.integer(np.int64(3), "n", lo=1) == 3
    for bad in (0, 2.0, True, "3"):
        with pytest.raises(ValueError, match=r"^n=.* is invalid: use an integer >= 1$"):
            checks.integer(bad, "n", lo=1)
    with pytest.raises(ValueError, match=r"^Cfg\.k=5 is invalid: use an integer >= 1 and <= 4$"):
        checks.integer(5, "k", lo=1, hi=4, where="Cfg")
    assert checks.real(2, "lr", lo_open=0.0) == 2.0
    for bad in (0.0, math.nan, math.inf, None, torch.tensor(1.0)):
        with pytest.raises(ValueError, match=r"^lr=.* is invalid: use a finite number > 0.0$"):
            checks.real(bad, "lr", lo_open=0.0)
    assert checks.probability(1, "mu") == 1.0
    with pytest.raises(ValueError, match=r"use a probability in \[0, 1\] \(of a GC row\)"):
        checks.probability(1.5, "mu", "of a GC row")
    with pytest.raises(ValueError, match=r"^solver='x' is invalid: use one of \['lsa', 'emd'\]$"):
        checks.choice("x", "solver", ("lsa", "emd"))


def test_finite_uses_a_sum_but_never_rejects_finite_values():
    big = torch.full((4,), 3e38)  # finite values whose float32 sum overflows to inf
    assert checks.finite(big, "x") is big
    assert checks.finite(torch.arange(3), "x") is not None  # integers pass
    for value in (math.nan, math.inf, -math.inf):
        x = torch.zeros(5)
        x[2] = value
        with pytest.raises(ValueError, match="x contains NaN or inf"):
            checks.finite(x, "x")
    with pytest.raises(ValueError, match="x must be a torch.Tensor"):
        checks.finite([1.0], "x")


def test_batch_shape_and_pair():
    x = torch.zeros(3, 2)
    assert checks.batch(x, "x", min_dim=2) is x
    with pytest.raises(ValueError, match=r"x must have shape \(B, \*dims\) with B >= 1"):
        checks.batch(torch.zeros(0, 2), "x")
    with pytest.raises(ValueError, match="at least one feature dim"):
        checks.batch(torch.zeros(3), "x", min_dim=2)
    with pytest.raises(ValueError, match="floating-point"):
        checks.batch(torch.zeros(3, 2, dtype=torch.long), "x")
    with pytest.raises(
        ValueError, match=r"c must have shape \(3,\) to match the batch, got \(2,\)"
    ):
        checks.shape(torch.zeros(2), (3,), "c", "to match the batch")
    with pytest.raises(ValueError, match=r"randn_like\(data\)"):
        checks.pair(x, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="share dtype and device"):
        checks.pair(x, x.double())
    checks.same_shape(x, x.double(), match_dtype=False)
    with pytest.raises(ValueError, match="noise contains NaN"):
        checks.pair(x, x + math.nan)


def test_batch_times_broadcasts_or_names_the_shape():
    like = torch.zeros(4, 2, dtype=torch.float64)
    t = checks.batch_times(0.5, 4, like)
    assert t.shape == (4,) and t.dtype == torch.float64
    with pytest.raises(ValueError, match=r"t_next must be a scalar or have shape \(4,\)"):
        checks.batch_times(torch.ones(3), 4, like, "t_next")
