"""gcflows.mixture_study: the toy study's evaluation reuses mixture_eval's consistency error on the
flow-map reference of gcflows.discrepancy, and gives the same numbers as the direct computation;
the training summary and the section helpers keep their order and arithmetic."""

from __future__ import annotations

import math

import pytest
import torch

from gcflows import discrepancy as dsc
from gcflows import mixture_study as ms
from gcflows.consistency import ConsistencyModel
from gcflows.gmm import get_preset
from gcflows.mixture_eval import eval_set_from_reference
from gcflows.networks import ToyMLP
from gcflows.processes import get_process
from gcflows.stats import Interval


def _model(process, seed: int = 3) -> ConsistencyModel:
    torch.manual_seed(seed)
    net = ToyMLP(2, hidden=16, depth=2, time_embed_dim=8, time_scale=16.0)
    return ConsistencyModel(net, process, sigma_data=0.5)


@pytest.mark.parametrize("name", ["ve", "linear"])
def test_consistency_error_matches_the_direct_flow_map_error(name):
    """score_model's consistency error (mixture_eval.consistency_error on the reference's draws,
    float32, times d) against discrepancy.flow_map_error (float64 differences) on the same draws:
    relative 1e-5 (float32 rounding of the flow map, ~1e-7 relative, summed over 2 coordinates
    and 30 points), far below the 3 digits the toy table prints. The eight-Gaussians target is
    not axis-aligned and has unequal distances, so a dropped or doubled factor d shows."""
    target = get_preset("eight_gaussians")
    t_max = 5.0 if name == "ve" else 0.999
    process = get_process(name, t_min=1e-3, t_max=t_max)
    sizes = ms.StudySizes.preset(True, n_eval=50)
    sizes = ms.StudySizes(**{**sizes.__dict__, "ref_per_time": 30, "n_traj": 3, "traj_times": 4})
    ctx = ms.make_eval_context(target, process, sizes, seed=0)
    model = _model(process)
    scores = ms.score_model(model, target, process, ctx, sizes, seed=0, step=5)
    direct = dsc.flow_map_error(model, ctx.reference)
    assert scores.consistency_by_t["times"] == pytest.approx(direct["times"], rel=1e-12)
    assert scores.consistency_by_t["mse"] == pytest.approx(direct["mse"], rel=1e-5)
    mean = sum(direct["mse"]) / len(direct["mse"])
    assert scores.consistency_error == pytest.approx(mean, rel=1e-5)
    assert scores.step == 5 and scores.metric("r_theta") == scores.r_theta.mean > 0
    assert 0 <= scores.mode_balance_tv <= 1 and math.isfinite(scores.w2)


def test_eval_set_from_reference_groups_rows_by_time():
    target = get_preset("two_gaussians_1to2")
    process = get_process("ve", t_min=1e-3, t_max=5.0)
    ref = dsc.flow_map_reference(target, process, [0.01, 0.5, 4.0], 7, rtol=1e-4, atol=1e-6)
    ev = eval_set_from_reference(ref)
    assert ev.times == (0.01, 0.5, 4.0) and ev.x.shape == ev.flow.shape == (3, 7, 2)
    # row j of time k is row k * 7 + j of the reference (a transposed reshape would mix times)
    assert torch.equal(ev.x[2, 5], ref["x"][2 * 7 + 5].float())
    assert torch.equal(ev.flow[1, 0], ref["target"][7].float())
    with pytest.raises(ValueError, match="reference=.* is invalid"):
        eval_set_from_reference({**ref, "times": ref["times"][:2]})


def test_training_section_summarises_per_method_in_the_given_order():
    def scores(step, w2):
        return ms.Scores(
            step,
            w2,
            2 * w2,
            {"times": [1.0], "mse": [2 * w2]},
            0.1,
            0.0,
            [0.5],
            Interval(w2, 0.0, 1),
        )

    runs = [
        {
            "name": n,
            "seed": s,
            "mu": 0.5,
            "evals": [scores(1, w), scores(2, w / 2)],
            "train_s": 1.0,
            "denoiser_s": 0.0,
        }
        for n, base in (("b", 1.0), ("a", 3.0))
        for s, w in ((1, base + 1.0), (0, base))
    ]
    out = ms.training_section(runs, ["a", "b"])
    assert list(out) == ["a", "b"]
    a = out["a"]
    assert a.steps == [1, 2] and a.per_seed_final["seeds"] == [0, 1]
    assert a.final["w2"].mean == pytest.approx((3.0 / 2 + 4.0 / 2) / 2)
    assert a.curves["w2"][0].mean == pytest.approx(3.5)
    assert a.consistency_by_t["mean"] == pytest.approx([(3.0 + 4.0) / 2])  # 2 w2 at the end
    assert ms.training_section([], ["a"]) == {}
