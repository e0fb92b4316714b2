"""The CT / CD discrepancy of Theorem 1, measured exactly on Gaussian mixtures (docs/paper.md
section 3): a short façade over one module per concept.

Everything here uses the *exact* PF-ODE velocity ``v_t`` of a :class:`~gcflows.gmm.GaussianMixture`
(``gcflows.velocity.TrueVelocity``), so that CD, CT and the limit ``R(theta)`` can be compared
without a learned teacher. Shapes: data / noise / points ``(B, d)``, times ``(B,)``; a consistency
function is any callable ``model(x (B, d), t (B,)) -> (B, d)`` that treats rows independently
(e.g. a ``ConsistencyModel`` in float64, in eval mode; large batches are evaluated in chunks of
``derivatives.EVAL_ROWS`` rows). Monte-Carlo results come as :class:`gcflows.stats.Interval` (mean,
standard error, 95 % interval, how it was computed).

==================  ==============================================================================
module              concept
==================  ==============================================================================
``times``           importance sampling of ``t`` and of the grid index (:func:`sample_times`)
``derivatives``     JVPs, Jacobians and ``df/dt`` of a consistency function
``theorem1``        the limit ``R(theta)`` (Eq. 11, :func:`r_theta`)
``gaps``            the discrete losses: scaled loss and gradient gaps (:func:`loss_gaps`,
                    :func:`gradient_gaps`)
``proxy``           the proxy ``R~_t`` of a coupling (Eq. 17): exact for IC (:func:`ic_proxy`),
                    by k-NN regression otherwise (:func:`knn_proxy`)
``reference``       a model against the exact flow map (:class:`FlowMapGenerator`,
                    :func:`flow_map_error`)
==================  ==============================================================================

The flow map itself is ``GaussianMixture.flow_map`` (integrators in ``gcflows.flowmap``).
"""

from gcflows.discrepancy.derivatives import directional_derivative, jacobian_vector_product
from gcflows.discrepancy.gaps import (
    GapResult,
    GradientGapResult,
    discrete_terms,
    gradient_gaps,
    loss_gaps,
)
from gcflows.discrepancy.proxy import coupled_path, ic_proxy, knn_proxy, mc_proxy
from gcflows.discrepancy.reference import (
    FlowMapGenerator,
    flow_map_error,
    flow_map_reference,
    multistep_flow_map,
)
from gcflows.discrepancy.theorem1 import (
    limit_constant,
    posterior_jacobian_trace,
    r_integrand,
    r_theta,
)
from gcflows.discrepancy.times import (
    grid_interval,
    interval_probs,
    sample_times,
    stratified_uniforms,
    time_cdf,
    time_density,
    time_quantile,
)
from gcflows.stats import paired_ratio

__all__ = [
    "paired_ratio",
    "grid_interval",
    "time_density",
    "stratified_uniforms",
    "time_quantile",
    "time_cdf",
    "sample_times",
    "interval_probs",
    "directional_derivative",
    "jacobian_vector_product",
    "posterior_jacobian_trace",
    "r_integrand",
    "r_theta",
    "limit_constant",
    "discrete_terms",
    "GapResult",
    "loss_gaps",
    "GradientGapResult",
    "gradient_gaps",
    "ic_proxy",
    "mc_proxy",
    "coupled_path",
    "knn_proxy",
    "FlowMapGenerator",
    "multistep_flow_map",
    "flow_map_reference",
    "flow_map_error",
]
