"""A consistency model against the exact flow map (docs/paper.md section 3).

:class:`FlowMapGenerator` (the ideal GC generator, a module around ``GaussianMixture.flow_map``),
:func:`flow_map_reference` and :func:`flow_map_error`
(``E||f_theta(x_t, t) - flow_map(x_t, t)||^2`` per ``t``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from gcflows import checks, flowmap
from gcflows.discrepancy.times import Model
from gcflows.gmm import GaussianMixture
from gcflows.processes import Process, get_process

#: ``method`` of :class:`FlowMapGenerator`: ``"ode"`` (the adaptive reference, the flow map's
#: ``"dopri5"``) or any method of ``GaussianMixture.flow_map``
FLOW_MAP_METHODS = ("ode", *flowmap.METHODS)

#: the earlier name of ``GaussianMixture.flow_map(..., method="multistep")``, kept importable
multistep_flow_map = flowmap.method_alias("multistep", "multistep_flow_map")


class FlowMapGenerator(nn.Module):
    """The ideal GC generator ``x_t -> flow_map(x_t, t)``, the exact PF-ODE map down to ``t_min``.

    A thin module over ``GaussianMixture.flow_map`` (the one flow map; ``gcflows.flowmap`` holds
    its integrators): ``forward(x (B, d), t (B,) or float) -> (B, d)`` in the dtype of ``x``; no
    parameters, no gradient. ``method``:

    - ``"ode"`` (default): adaptive dopri5 in float64 at ``rtol`` / ``atol``; the reference. All
      rows share the adaptive steps, so rows started at many different times (a training batch)
      cost many steps. ``"segmented"`` takes ``rtol`` / ``atol`` too.
    - ``"multistep"``: DPM-Solver++(2M) with ``steps`` steps per row, a fixed cost (``steps``
      posterior means of the batch). Its mean squared error against the ODE at ``rtol = 1e-10``
      on the authors' 2D target is below 3e-7 at 32 steps and 5e-8 at 64 (tests/test_flowmap.py).
      ``"rk4"`` takes ``steps`` too.
    """

    def __init__(
        self,
        target: GaussianMixture,
        process: Process | str,
        *,
        rtol: float = 1e-6,
        atol: float = 1e-8,
        method: str = "ode",
        steps: int = 64,
    ) -> None:
        super().__init__()
        if not isinstance(target, GaussianMixture):
            fix = "use a gcflows.gmm.GaussianMixture"
            raise checks.bad("type(target)", type(target).__name__, fix, where="FlowMapGenerator")
        checks.real(rtol, "rtol", lo_open=0.0, hi_open=1.0, where="FlowMapGenerator")
        checks.real(atol, "atol", lo_open=0.0, hi_open=1.0, where="FlowMapGenerator")
        self.method = checks.choice(method, "method", FLOW_MAP_METHODS, where="FlowMapGenerator")
        self.steps = checks.integer(steps, "steps", lo=1, where="FlowMapGenerator")
        self.target = target
        self.process = get_process(process)
        self.rtol, self.atol = float(rtol), float(atol)

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        method = "dopri5" if self.method == "ode" else self.method
        if method in flowmap.ADAPTIVE:
            options = {"rtol": self.rtol, "atol": self.atol}
        else:
            options = {"steps": self.steps}
        return self.target.flow_map(x, t, self.process, method=method, **options)


@torch.no_grad()
def flow_map_reference(
    target: GaussianMixture,
    process: Process | str,
    times: Sequence[float],
    n_per_time: int,
    *,
    generator: torch.Generator | None = None,
    rtol: float = 1e-8,
    atol: float = 1e-10,
) -> dict[str, Tensor]:
    """A fixed evaluation set: ``x_t`` (IC) at each time and its exact flow map to ``t_min``.

    Returns ``{"t": (T * n,), "x": (T * n, d), "target": (T * n, d), "times": (T,)}`` (float64),
    one solve for all rows.
    """
    process = get_process(process)
    times_t = torch.as_tensor([float(s) for s in times], dtype=torch.float64)
    if times_t.numel() < 1:
        raise checks.bad("times", list(times), "pass at least one time")
    process.check_time(times_t, "times")
    checks.integer(n_per_time, "n_per_time", lo=1)
    gmm = target.to(dtype=torch.float64)
    n = int(n_per_time)
    t = times_t.repeat_interleave(n)
    data = gmm.sample(t.numel(), generator)
    noise = torch.randn(data.shape, generator=generator, dtype=torch.float64)
    x = process.interpolate(data, noise, t)
    out = gmm.flow_map(x, t, process, rtol=rtol, atol=atol)
    return {"t": t, "x": x, "target": out, "times": times_t}


@torch.no_grad()
def flow_map_error(model: Model, reference: dict[str, Tensor]) -> dict[str, list[float]]:
    """``E||f(x_t, t) - flow_map(x_t, t)||^2`` per reference time, with standard errors.

    ``model`` is evaluated in the dtype of its parameters when it has any (else float64).
    Returns ``{"times": [...], "mse": [...], "se": [...]}``.
    """
    params = list(model.parameters()) if isinstance(model, nn.Module) else []
    dtype = params[0].dtype if params else torch.float64
    device = params[0].device if params else torch.device("cpu")
    x = reference["x"].to(device=device, dtype=dtype)
    t = reference["t"].to(device=device, dtype=dtype)
    pred = model(x, t).double().cpu()
    err = ((pred - reference["target"]) ** 2).sum(1)
    times = reference["times"]
    n = err.numel() // times.numel()
    err = err.reshape(times.numel(), n)
    se = err.std(1, unbiased=True) / math.sqrt(n) if n > 1 else torch.zeros(times.numel())
    return {
        "times": [float(s) for s in times],
        "mse": [float(e) for e in err.mean(1)],
        "se": [float(s) for s in se],
    }
