"""Noise-to-data transport cost of a coupling: IC, batch-OT, Sinkhorn and GC (docs/paper.md
section 4): a short façade over one module per concept.

The transport cost of a coupling is the mean squared distance ``E ||data - noise||^2`` between
the data point and the *unscaled* noise it is paired with. gcflows measures it for

- IC, the independent coupling: ``c_IC = E ||data - noise||^2`` (:func:`ic_cost`);
- batch-OT: the mean cost after the exact assignment inside a batch of ``B`` pairs
  (:func:`batch_ot_cost`, :func:`batch_ot_curve` for ``B = 16, 128, 512, 2048``), and its entropic
  relaxation (:func:`sinkhorn_cost`, the plan's expected cost ``<P, C>``);
- GC, the generator-induced coupling of docs/paper.md Eq. 13-15: the data point is replaced by the
  prediction ``f(x_t, t)`` made from the noised pair, with the same noise, so

      c(t) = E_IC || f(x_t, t) - noise ||^2,   x_t = a(t) data + b(t) noise          (Lemma 1)

  for the ideal flow map ``f = fo`` of a :class:`~gcflows.gmm.GaussianMixture` (the exact PF-ODE
  solution down to ``t_min``) or for any model ``f(x, t)``, e.g. a trained consistency model
  (:func:`gc_cost_curve`).

Conventions: time runs from data (``t_min``) to noise (``t_max``); batches are ``(B, *dims)``;
per-sample times ``(B,)``; all randomness comes from the ``generator`` argument (data is drawn
first, then noise, batch by batch). Intervals are two-sided Student-t intervals at ``level``
(default 95 %) over independent units: samples for IC and GC, whole batches for batch-OT.

==============  ==================================================================================
module          concept
==============  ==================================================================================
``costs``       IC, batch-OT and Sinkhorn costs, their intervals (:func:`estimate`) and samplers
``curves``      the GC cost curve ``c(t)`` on a noise-level grid (:func:`gc_cost_curve`,
                :func:`sigma_grid`)
``lemma1``      Lemma 1 and its corollaries (:func:`lemma1_check`, :func:`flow_map_jvp`)
``gaussian``    closed forms: ``g(t)`` of any process, one Gaussian's flow map, ``c(t)``, ``c'(t)``
==============  ==================================================================================

The ideal flow map itself is ``GaussianMixture.flow_map`` (integrators in ``gcflows.flowmap``);
``ideal_flow_map`` is its ``method="segmented"``.
"""

from gcflows.transport.costs import (
    DEFAULT_BATCH_SIZES,
    DEFAULT_SINKHORN_REG,
    BatchCost,
    as_sampler,
    batch_ot_cost,
    batch_ot_curve,
    estimate,
    ic_cost,
    sinkhorn_cost,
)
from gcflows.transport.curves import CostCurve, gc_cost_curve, ideal_flow_map, sigma_grid
from gcflows.transport.gaussian import (
    effective_sdot,
    gaussian_cost_curve,
    gaussian_cost_derivative,
    gaussian_flow_map,
    gaussian_ic_cost,
    gaussian_s0,
)
from gcflows.transport.lemma1 import (
    Lemma1Result,
    corollary2_prediction,
    effective_s0,
    flow_map_jvp,
    lemma1_check,
)

__all__ = [
    "DEFAULT_BATCH_SIZES",
    "DEFAULT_SINKHORN_REG",
    "BatchCost",
    "CostCurve",
    "Lemma1Result",
    "estimate",
    "as_sampler",
    "ic_cost",
    "batch_ot_cost",
    "sinkhorn_cost",
    "batch_ot_curve",
    "sigma_grid",
    "gc_cost_curve",
    "effective_sdot",
    "flow_map_jvp",
    "ideal_flow_map",
    "lemma1_check",
    "effective_s0",
    "corollary2_prediction",
    "gaussian_flow_map",
    "gaussian_ic_cost",
    "gaussian_cost_curve",
    "gaussian_cost_derivative",
    "gaussian_s0",
]
