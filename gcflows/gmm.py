"""Gaussian mixtures as exact oracles under an affine noising process (docs/paper.md section 1).

A mixture ``p(data) = sum_k w_k N(mu_k, Sigma_k)`` in R^d, noised by a process
``x_t = a(t) data + b(t) noise`` (``noise ~ N(0, I)``), stays a mixture with components

    N(x; a mu_k, S_k),   S_k = a^2 Sigma_k + b^2 I.

Everything the theory needs follows in closed form. With ``r_k(x)`` the responsibilities
(posterior component probabilities), per component

    m_k = mu_k + a Sigma_k S_k^{-1} (x - a mu_k)          (posterior mean of data)
    C_k = Sigma_k - a^2 Sigma_k S_k^{-1} Sigma_k         (posterior covariance of data)

and for the mixture (law of total expectation / variance)

    D(x, t)         = E[data | x_t = x]  = sum_k r_k m_k                       (ideal denoiser)
    Cov[data | x]   = sum_k r_k C_k + sum_k r_k (m_k - D)(m_k - D)^T
    E[noise | x]    = (x - a D) / b      = b sum_k r_k S_k^{-1} (x - a mu_k)
    grad log p_t(x) = -(x - a D) / b^2   = -sum_k r_k S_k^{-1} (x - a mu_k)     (score)
    v_t(x)          = a' D + b' E[noise | x]                                 (PF-ODE velocity)

which is ``(x - D) / t`` for ``ve`` and ``linear`` (docs/paper.md section 1:
``v_t(x) = E[xdot_t | x_t = x]``). The PF-ODE of that velocity gives the library's one exact flow
map, :meth:`GaussianMixture.flow_map`, whose integrators (adaptive, segmented, RK4, multistep) are
in ``gcflows.flowmap``.

Numerics. Each covariance is eigendecomposed once, ``Sigma_k = U_k diag(lam_k) U_k^T`` (the
isotropic and diagonal cases need no rotation), so that ``S_k = U_k diag(a^2 lam_k + b^2) U_k^T``
is diagonal in that basis for every ``t``: no matrix is inverted and nothing is subtracted that
could cancel (``C_k = U_k diag(lam b^2 / (a^2 lam + b^2)) U_k^T``, and ``x - a m_k`` is written as
``U_k diag(b^2 / (a^2 lam + b^2)) U_k^T (x - a mu_k)``). Log-densities are combined with
log-sum-exp, so responsibilities sum to one even at ``t = 1e-3`` with Dirac components
(``std = 0``) and for points far from every mode. Since ``b(t) > 0`` on every process domain,
``S_k`` is always positive definite.

Shapes: points ``x`` are ``(B, d)``; times ``t`` are a float, a 0-d tensor or ``(B,)``. Computation
runs in the dtype of ``x`` (float64 for theory checks) but never below float32: float16 / bfloat16
points are computed in float32 (at ``t_min`` the variances ``b^2 ~ 4e-6`` and the log-densities
overflow half precision, giving NaN) and the result is returned in the dtype of ``x``. The
mixture's parameters are cast to the working dtype.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from gcflows import flowmap
from gcflows.checks import bad, bad_tensor, batch_times, choice, finite, integer, real
from gcflows.processes import Process, get_process

__all__ = [
    "GaussianMixture",
    "two_gaussians_1to2",
    "two_diracs",
    "eight_gaussians",
    "random_mixture",
    "PRESETS",
    "get_preset",
]

_LOG_2PI = math.log(2.0 * math.pi)
# Rows of a batch are processed in chunks so that no intermediate holds more than about this many
# elements (B x K x d, or B x K x d x d for full covariances).
_CHUNK_ELEMENTS = 1 << 22


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic dtype for points of ``dtype``: float64 stays, anything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _in_input_dtype(method: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Wrap a ``method(self, x, ...)`` computed in ``_work_dtype``: return it in x's dtype."""

    @functools.wraps(method)
    def wrapper(self: GaussianMixture, x: Tensor, *args, **kwargs) -> Tensor:
        out = method(self, x, *args, **kwargs)
        return out.to(x.dtype) if out.is_floating_point() else out

    return wrapper


def _as_float_tensor(value, name: str, dtype: torch.dtype | None, device) -> Tensor:
    if dtype is None and not (torch.is_tensor(value) and value.is_floating_point()):
        dtype = torch.float64  # lists, numbers and integer tensors become float64
    try:
        # Given straight to as_tensor, so Python floats are never rounded through float32.
        out = torch.as_tensor(value, dtype=dtype, device=device)
    except (TypeError, ValueError, RuntimeError) as err:
        fix = f"pass a tensor or a nested list of numbers ({err})"
        raise bad(f"type({name})", type(value).__name__, fix) from None
    if not out.is_floating_point():
        raise bad(f"{name}.dtype", out.dtype, "use a floating point dtype")
    return out


class GaussianMixture:
    """Mixture ``sum_k w_k N(mu_k, Sigma_k)`` in R^d with exact noised marginals and posteriors.

    Args:
        weights: ``(K,)`` non-negative, summing to 1 (within 1e-6; then renormalised exactly).
        means: ``(K, d)`` component means.
        stds: isotropic standard deviations: a float (shared), ``(K,)`` (one per component) or
            ``(K, d)`` (diagonal covariances). ``0`` gives a Dirac component.
        covs: ``(K, d, d)`` full covariances, symmetric positive semi-definite. Exactly one of
            ``stds`` and ``covs`` must be given.
        dtype: dtype of the stored parameters (default: that of ``means`` if it is a floating
            tensor, else float64).
        device: device of the stored parameters.

    Raises:
        ValueError: naming the argument, for empty inputs, inconsistent shapes, NaN / inf,
            negative or unnormalised weights, negative stds, asymmetric or non-PSD covariances.
    """

    def __init__(
        self,
        weights,
        means,
        stds=None,
        covs=None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if dtype is None and torch.is_tensor(means) and means.is_floating_point():
            dtype = means.dtype
        means = _as_float_tensor(means, "means", dtype, device)
        dtype, device = means.dtype, means.device
        weights = _as_float_tensor(weights, "weights", dtype, device)
        if weights.dim() != 1 or weights.numel() == 0:
            raise bad_tensor(weights, "weights", "use a non-empty 1-D tensor (K,)")
        k = weights.shape[0]
        if means.dim() != 2 or means.shape[0] != k or means.shape[1] == 0:
            fix = f"use shape (K, d) = ({k}, d) with d >= 1 to match weights"
            raise bad_tensor(means, "means", fix)
        finite(weights, "weights")
        finite(means, "means")
        if bool((weights < 0).any()):
            fix = "use non-negative weights; clip or recompute them"
            raise bad("weights.min()", float(weights.min()), fix)
        total = float(weights.double().sum())
        if abs(total - 1.0) > 1e-6:
            fix = "use weights that sum to 1 (within 1e-6); divide by their sum"
            raise bad("weights.sum()", float(f"{total:.9g}"), fix)
        d = means.shape[1]
        if (stds is None) == (covs is None):
            fix = (
                "give exactly one of stds (isotropic / diagonal; 0 = Dirac) and covs (full "
                "covariances (K, d, d))"
            )
            raise bad("(stds, covs)", "both" if stds is not None else "neither", fix)
        if covs is None:
            stds = _as_float_tensor(stds, "stds", dtype, device)
            finite(stds, "stds")
            if stds.dim() == 0:
                stds = stds.expand(k)
            if stds.shape not in ((k,), (k, d)):
                fix = f"use a float, shape (K,) = ({k},) or (K, d) = ({k}, {d})"
                raise bad_tensor(stds, "stds", fix)
            if bool((stds < 0).any()):
                fix = "use non-negative stds (0 gives a Dirac component)"
                raise bad("stds.min()", float(stds.min()), fix)
            stds = stds.detach().clone()
            lam = (stds if stds.dim() == 2 else stds[:, None].expand(k, d)) ** 2
            rot = None
        else:
            covs = _as_float_tensor(covs, "covs", dtype, device)
            if covs.shape != (k, d, d):
                raise bad_tensor(covs, "covs", f"use shape (K, d, d) = ({k}, {d}, {d})")
            finite(covs, "covs")
            c64 = covs.double()
            scale = c64.abs().amax(dim=(1, 2)).clamp_min(1e-300)
            eps = max(1e-10, 100 * torch.finfo(dtype).eps)
            asym = (c64 - c64.transpose(1, 2)).abs().amax(dim=(1, 2))
            if bool((asym > eps * scale).any()):
                fix = "use symmetric covariances: (covs + covs.transpose(1, 2)) / 2"
                raise bad("max |covs - covs.transpose(1, 2)|", float(f"{asym.max():.3g}"), fix)
            c64 = 0.5 * (c64 + c64.transpose(1, 2))
            lam64, rot64 = torch.linalg.eigh(c64)
            if bool((lam64 < -eps * scale[:, None]).any()):
                fix = "use positive semi-definite covs: project onto the PSD cone or add a ridge"
                raise bad("min eigenvalue of covs", float(f"{float(lam64.min()):.3g}"), fix)
            lam = lam64.clamp_min(0.0).to(dtype)
            rot = rot64.to(dtype)
            stds = None
        self._weights = (weights / weights.sum()).detach().clone()
        self._means = means.detach().clone()
        self._stds = stds
        self._lam = lam.contiguous()
        self._rot = rot

    # --- description ---------------------------------------------------------------------------
    @property
    def n_components(self) -> int:
        """Number of components ``K``."""
        return self._weights.shape[0]

    @property
    def dim(self) -> int:
        """Dimension ``d``."""
        return self._means.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self._means.dtype

    @property
    def device(self) -> torch.device:
        return self._means.device

    @property
    def weights(self) -> Tensor:
        """``(K,)`` mixture weights (a copy)."""
        return self._weights.clone()

    @property
    def means(self) -> Tensor:
        """``(K, d)`` component means (a copy)."""
        return self._means.clone()

    @property
    def stds(self) -> Tensor | None:
        """``(K,)`` or ``(K, d)`` standard deviations as given, or None for full covariances."""
        return None if self._stds is None else self._stds.clone()

    @property
    def eigen(self) -> tuple[Tensor, Tensor | None]:
        """``(lam (K, d), U (K, d, d) | None)`` with ``Sigma_k = U_k diag(lam_k) U_k^T`` (``U``
        is None for diagonal covariances): the tensors ``sample`` draws with (copies)."""
        return self._lam.clone(), None if self._rot is None else self._rot.clone()

    @property
    def covariances(self) -> Tensor:
        """``(K, d, d)`` component covariances ``Sigma_k = U_k diag(lam_k) U_k^T``."""
        if self._rot is None:
            return torch.diag_embed(self._lam)
        return (self._rot * self._lam[:, None, :]) @ self._rot.transpose(1, 2)

    def __repr__(self) -> str:
        kind = "full covs" if self._rot is not None else "stds"
        return (
            f"GaussianMixture(n_components={self.n_components}, dim={self.dim}, {kind}, "
            f"dtype={self.dtype}, device={self.device})"
        )

    def to(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> GaussianMixture:
        """A copy with parameters in ``dtype`` on ``device`` (None keeps the current one)."""
        dtype = self.dtype if dtype is None else dtype
        device = self.device if device is None else device
        new = object.__new__(GaussianMixture)
        new._weights = self._weights.to(dtype=dtype, device=device)
        new._means = self._means.to(dtype=dtype, device=device)
        new._stds = None if self._stds is None else self._stds.to(dtype=dtype, device=device)
        new._lam = self._lam.to(dtype=dtype, device=device)
        new._rot = None if self._rot is None else self._rot.to(dtype=dtype, device=device)
        return new

    def mean(self) -> Tensor:
        """``(d,)`` mixture mean ``sum_k w_k mu_k``."""
        return self._weights @ self._means

    def second_moment(self) -> Tensor:
        """Scalar ``E||data||^2 = sum_k w_k (||mu_k||^2 + tr Sigma_k)``."""
        return self._weights @ ((self._means**2).sum(-1) + self._lam.sum(-1))

    # --- sampling ------------------------------------------------------------------------------
    def sample(
        self, n: int, generator: torch.Generator | None = None, return_components: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Draw ``n`` points ``(n, d)`` (and their component indices ``(n,)`` long if asked)."""
        n = integer(n, "n", lo=1, fix="use a positive integer number of samples")
        comp = torch.multinomial(self._weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=self.dtype, device=self.device)
        z = eps * self._lam[comp].sqrt()
        if self._rot is not None:
            z = (self._rot[comp] @ z[:, :, None])[:, :, 0]
        out = self._means[comp] + z
        return (out, comp) if return_components else out

    # --- validation and the core ---------------------------------------------------------------
    def _check_x(self, x: Tensor, name: str = "x") -> Tensor:
        if not torch.is_tensor(x):
            raise bad_tensor(x, name, f"pass a torch.Tensor of shape (B, {self.dim})")
        if not x.is_floating_point():
            raise bad(f"{name}.dtype", x.dtype, "use a floating point dtype: x.double()")
        if x.dim() != 2 or x.shape[1] != self.dim:
            fix = f"use shape (B, d) = (B, {self.dim}) for this mixture"
            raise bad_tensor(x, name, fix)
        if x.shape[0] == 0:
            raise bad_tensor(x, name, "it is an empty batch; pass at least one point")
        finite(x, name)
        return x

    def _prepare(
        self, x: Tensor, t: Tensor | float, process: Process | str
    ) -> tuple[Tensor, Process, Tensor, Tensor, Tensor, Tensor]:
        """Validate; return ``x, process, a, b, da, db`` with ``a, b, da, db`` of shape ``(B,)``."""
        process = get_process(process)
        x = self._check_x(x)
        x = x.to(_work_dtype(x.dtype))
        process.check_time(t)  # as given: its own dtype sets the rounding tolerance
        t = batch_times(t, x.shape[0], x)
        return x, process, process.a(t), process.b(t), process.da(t), process.db(t)

    def _params(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``log w (K,), mu (K, d), lam (K, d), U (K, d, d) | None`` in the dtype of ``like``."""
        kw = {"dtype": like.dtype, "device": like.device}
        rot = None if self._rot is None else self._rot.to(**kw)
        return self._weights.to(**kw).log(), self._means.to(**kw), self._lam.to(**kw), rot

    def _chunked(self, fn: Callable[..., tuple], full: bool, *rows: Tensor) -> tuple:
        """Apply ``fn`` to row chunks of ``rows`` (each ``(B, ...)``); concatenate the outputs."""
        n = rows[0].shape[0]
        per_row = self.n_components * self.dim * (self.dim if full else 1)
        size = max(1, _CHUNK_ELEMENTS // max(per_row, 1))
        if n <= size:
            return fn(*rows)
        parts = [fn(*(r[i : i + size] for r in rows)) for i in range(0, n, size)]
        return tuple(torch.cat(p, dim=0) for p in zip(*parts, strict=True))

    def _terms(self, x: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor, tuple]:
        """Per-component quantities in each component's eigenbasis.

        Returns ``y = U_k^T (x - a mu_k)`` ``(B, K, d)``, ``var = a^2 lam_k + b^2`` ``(B, K, d)``
        (the eigenvalues of ``S_k``), ``log w_k + log N(x; a mu_k, S_k)`` ``(B, K)`` and the params.
        """
        params = self._params(x)
        logw, mu, lam, rot = params
        diff = x[:, None, :] - a[:, None, None] * mu[None]
        y = diff if rot is None else torch.einsum("kji,bkj->bki", rot, diff)
        var = (a * a)[:, None, None] * lam[None] + (b * b)[:, None, None]
        loglik = -0.5 * ((torch.log(var) + _LOG_2PI).sum(-1) + (y * y / var).sum(-1))
        return y, var, logw + loglik, params

    @staticmethod
    def _rotate(rot: Tensor | None, z: Tensor) -> Tensor:
        """``U_k z_k`` for ``z`` of shape ``(B, K, d)``."""
        return z if rot is None else torch.einsum("kij,bkj->bki", rot, z)

    def _posterior_parts(self, x: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, ...]:
        """``r (B, K)``, ``sum_k r_k U_k (y_k / var_k)`` ``(B, d)`` and ``D (B, d)``."""
        y, var, logj, (_, mu, lam, rot) = self._terms(x, a, b)
        r = torch.softmax(logj, dim=-1)
        resid = (r[:, :, None] * self._rotate(rot, y / var)).sum(1)  # S^{-1}(x - a mu), averaged
        shift = (r[:, :, None] * self._rotate(rot, lam * y / var)).sum(1)
        denoised = r @ mu + a[:, None] * shift
        return r, resid, denoised

    # --- the noised marginal -------------------------------------------------------------------
    @_in_input_dtype
    def log_prob(self, x: Tensor, t: Tensor | float, process: Process | str) -> Tensor:
        """``log p_t(x)`` of the noised marginal ``sum_k w_k N(a mu_k, S_k)``: ``(B,)``."""
        x, _, a, b, _, _ = self._prepare(x, t, process)
        return self._chunked(lambda *r: (self._terms(*r)[2].logsumexp(-1),), False, x, a, b)[0]

    @_in_input_dtype
    def responsibilities(self, x: Tensor, t: Tensor | float, process: Process | str) -> Tensor:
        """Posterior component probabilities ``r_k(x) = P(k | x_t = x)``: ``(B, K)``, rows sum 1."""
        x, _, a, b, _, _ = self._prepare(x, t, process)
        return self._chunked(lambda *r: (self._terms(*r)[2].softmax(-1),), False, x, a, b)[0]

    @_in_input_dtype
    def score(self, x: Tensor, t: Tensor | float, process: Process | str) -> Tensor:
        """``grad_x log p_t(x) = -sum_k r_k S_k^{-1} (x - a mu_k)``: ``(B, d)``."""
        x, _, a, b, _, _ = self._prepare(x, t, process)
        return -self._chunked(lambda *r: self._posterior_parts(*r), False, x, a, b)[1]

    # --- the posterior of data given x_t -------------------------------------------------------
    @_in_input_dtype
    def denoiser(self, x: Tensor, t: Tensor | float, process: Process | str) -> Tensor:
        """Ideal denoiser ``D(x, t) = E[data | x_t = x] = sum_k r_k m_k``: ``(B, d)``."""
        x, _, a, b, _, _ = self._prepare(x, t, process)
        return self._chunked(lambda *r: self._posterior_parts(*r), False, x, a, b)[2]

    @_in_input_dtype
    def expected_noise(self, x: Tensor, t: Tensor | float, process: Process | str) -> Tensor:
        """``E[noise | x_t = x] = (x - a D) / b = b sum_k r_k S_k^{-1} (x - a mu_k)``, ``(B, d)``.

        Computed from the right-hand side, which does not cancel when ``b`` is tiny.
        """
        x, _, a, b, _, _ = self._prepare(x, t, process)
        resid = self._chunked(lambda *r: self._posterior_parts(*r), False, x, a, b)[1]
        return b[:, None] * resid

    @_in_input_dtype
    def velocity(self, x: Tensor, t: Tensor | float, process: Process | str) -> Tensor:
        """Exact PF-ODE velocity ``v_t(x) = a' D + b' E[noise | x] = (x - D) / t``, ``(B, d)``.

        docs/paper.md section 1: ``v_t(x) = E[xdot_t | x_t = x]``.
        """
        x, _, a, b, da, db = self._prepare(x, t, process)
        return self._velocity(x, a, b, da, db)

    def _velocity(self, x: Tensor, a: Tensor, b: Tensor, da: Tensor, db: Tensor) -> Tensor:
        _, resid, denoised = self._chunked(lambda *r: self._posterior_parts(*r), False, x, a, b)
        return da[:, None] * denoised + (db * b)[:, None] * resid

    def _cov_parts(self, x: Tensor, a: Tensor, b: Tensor, full: bool) -> tuple[Tensor]:
        y, var, logj, (_, mu, lam, rot) = self._terms(x, a, b)
        r = torch.softmax(logj, dim=-1)
        m = mu[None] + a[:, None, None] * self._rotate(rot, lam * y / var)  # (B, K, d)
        c = lam * (b * b)[:, None, None] / var  # eigenvalues of C_k, (B, K, d)
        dev = m - (r[:, :, None] * m).sum(1, keepdim=True)
        if not full:
            return ((r * (c.sum(-1) + (dev * dev).sum(-1))).sum(-1),)
        between = torch.einsum("bk,bki,bkj->bij", r, dev, dev)
        if rot is None:
            within = torch.diag_embed((r[:, :, None] * c).sum(1))
        else:
            within = torch.einsum("kij,bkj,klj->bil", rot, r[:, :, None] * c, rot)
        return (within + between,)

    @_in_input_dtype
    def posterior_cov(self, x: Tensor, t: Tensor | float, process: Process | str) -> Tensor:
        """``Cov[data | x_t = x] = sum_k r_k (C_k + (m_k - D)(m_k - D)^T)``, ``(B, d, d)``."""
        x, _, a, b, _, _ = self._prepare(x, t, process)
        return self._chunked(lambda *r: self._cov_parts(*r, True), True, x, a, b)[0]

    @_in_input_dtype
    def posterior_cov_trace(self, x: Tensor, t: Tensor | float, process: Process | str) -> Tensor:
        """``tr Cov[data | x_t = x] = E[||data - D||^2 | x_t = x]``: ``(B,)``."""
        x, _, a, b, _, _ = self._prepare(x, t, process)
        return self._chunked(lambda *r: self._cov_parts(*r, False), False, x, a, b)[0]

    @_in_input_dtype
    def sample_posterior(
        self,
        x: Tensor,
        t: Tensor | float,
        process: Process | str,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Exact draws of ``data ~ p(data | x_t = x)``: ``k ~ r(x)``, then ``N(m_k, C_k)``.

        Returns ``(B, d)``, one draw per row of ``x`` (repeat rows for several draws per point).
        """
        x, _, a, b, _, _ = self._prepare(x, t, process)

        def draw(xx: Tensor, aa: Tensor, bb: Tensor) -> tuple[Tensor]:
            y, var, logj, (_, mu, lam, rot) = self._terms(xx, aa, bb)
            k = torch.multinomial(torch.softmax(logj, dim=-1), 1, generator=generator)[:, 0]
            rows = torch.arange(xx.shape[0], device=xx.device)
            yk, vk, lk = y[rows, k], var[rows, k], lam[k]
            eps = torch.randn(yk.shape, generator=generator, dtype=xx.dtype, device=xx.device)
            z = aa[:, None] * lk * yk / vk + (lk * (bb * bb)[:, None] / vk).sqrt() * eps
            if rot is not None:
                z = (rot[k] @ z[:, :, None])[:, :, 0]
            return (mu[k] + z,)

        return self._chunked(draw, False, x, a, b)[0]

    # --- the flow map --------------------------------------------------------------------------
    @_in_input_dtype
    def flow_map(
        self,
        x: Tensor,
        t: Tensor | float,
        process: Process | str,
        t_end: Tensor | float | None = None,
        rtol: float | None = None,
        atol: float | None = None,
        method: str = "dopri5",
        *,
        steps: int | None = None,
        segments_per_decade: int = 2,
    ) -> Tensor:
        """Exact PF-ODE flow map: solve ``dx/ds = v_s(x)`` from ``s = t`` to ``s = t_end``.

        Returns ``(B, d)``: the points ``x`` (at per-sample times ``t``) carried to ``t_end``, in
        the dtype of ``x`` (float64 inside; no gradient flows through the solve). ``t`` and
        ``t_end`` are floats or per-sample ``(B,)`` (default ``t_end = process.t_min``).

        ``method`` picks the integrator (``gcflows.flowmap``, where each is described):

        - ``"dopri5"`` (default, the reference): adaptive, either direction, any ``t_end``;
          ``rtol`` / ``atol`` default 1e-9 / 1e-11.
        - ``"segmented"``: dopri5 restarted ``segments_per_decade`` times per decade of noise
          level, for loose fast solves from large ``t`` (default ``rtol`` / ``atol`` 1e-5 /
          1e-7); to ``t_min``.
        - ``"rk4"``: RK4 in log-time, ``steps`` (default 48) fixed steps, fast matrix-product
          velocities for isotropic mixtures; to ``t_min``.
        - ``"multistep"``: DPM-Solver++(2M), ``steps`` (default 64) fixed steps in log noise
          level, a fixed cost whatever the spread of start times; to ``t_min``.

        Tolerances: keep the tight defaults of ``dopri5`` unless the start times are small. From a
        large ``t`` a loose ``rtol`` (1e-5) lets the adaptive step grow while the field is nearly
        linear and jump across the short stretch where the posterior commits to a mode (seen in
        3072-D: 3 steps from t = 80, a transport cost 34 % off); ``"segmented"`` is the loose,
        fast and safe choice there.
        """
        method = choice(method, "method", flowmap.METHODS, where="flow_map")
        rtol, atol, steps = self._flow_options(method, t_end, rtol, atol, steps)
        if method == "segmented":
            integer(segments_per_decade, "segments_per_decade", lo=1, where="flow_map")
        process = get_process(process)
        x64 = self._check_x(x).detach().to(torch.float64)  # float64 inside, whatever x's dtype
        process.check_time(t)  # as given: its own dtype sets the rounding tolerance
        t64 = batch_times(t, x.shape[0], x64)
        with torch.no_grad():
            if method == "rk4":  # converts what it needs itself
                return flowmap.rk4(self, x64, t64, process, steps)
            gm = self.to(dtype=torch.float64, device=x.device)
            if method == "multistep":
                return flowmap.multistep(gm, x64, t64, process, steps)
            if method == "segmented":
                return flowmap.segmented(gm, x64, t64, process, rtol, atol, segments_per_decade)
            t_end = process.t_min if t_end is None else t_end
            te64 = batch_times(t_end, x.shape[0], x64, name="t_end")
            process.check_time(te64, name="t_end")
            return flowmap.dopri5(gm, x64, t64, te64, process, rtol, atol)

    @staticmethod
    def _flow_options(method: str, t_end, rtol, atol, steps) -> tuple:
        """``(rtol, atol, steps)`` of ``flow_map``'s ``method``, defaults filled in; options that
        the method does not use raise ``ValueError``."""
        where = "flow_map"
        if t_end is not None and method != "dopri5":
            fix = f"method={method!r} maps to t_min; use method='dopri5'"
            raise bad("t_end", t_end, fix, where)
        if method in flowmap.ADAPTIVE:
            if steps is not None:
                raise bad("steps", steps, f"method={method!r} is adaptive; set rtol / atol", where)
            rtol0, atol0 = flowmap.ADAPTIVE[method]
            rtol, atol = rtol0 if rtol is None else rtol, atol0 if atol is None else atol
            rtol = real(rtol, "rtol", lo_open=0.0, hi_open=1.0, where=where)
            atol = real(atol, "atol", lo_open=0.0, hi_open=1.0, where=where)
            return rtol, atol, None
        if rtol is not None or atol is not None:
            fix = f"method={method!r} takes a fixed number of steps; set steps"
            name, value = ("rtol", rtol) if rtol is not None else ("atol", atol)
            raise bad(name, value, fix, where)
        steps = flowmap.FIXED_STEPS[method] if steps is None else steps
        return None, None, integer(steps, "steps", lo=1, where=where)


# --- presets ----------------------------------------------------------------------------------
def two_gaussians_1to2(
    std: float = 0.01, dtype: torch.dtype = torch.float64, device=None
) -> GaussianMixture:
    """The authors' 2D notebook target: modes ``(0, -0.5)``, ``(0, +0.5)``, std 0.01, weights 1/2.

    docs/paper.md section 5 (the 2D notebook).
    """
    means = torch.tensor([[0.0, -0.5], [0.0, 0.5]], dtype=dtype, device=device)
    return GaussianMixture([0.5, 0.5], means, stds=std, dtype=dtype, device=device)


def two_diracs(dtype: torch.dtype = torch.float64, device=None) -> GaussianMixture:
    """Two Dirac masses at ``(0, -0.5)`` and ``(0, +0.5)`` with equal weights (std 0)."""
    return two_gaussians_1to2(std=0.0, dtype=dtype, device=device)


def eight_gaussians(
    radius: float = 2.0, std: float = 0.04, dtype: torch.dtype = torch.float64, device=None
) -> GaussianMixture:
    """Eight equal-weight modes at angles ``2 pi k / 8`` on a circle of ``radius`` (default 2).

    Default ``std = 0.02 * radius = 0.04``: neighbouring modes are ``2 r sin(pi / 8) = 1.53``
    apart, about 38 standard deviations, so the modes do not overlap.
    """
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    return GaussianMixture(torch.full((8,), 1 / 8), means, stds=std, dtype=dtype, device=device)


def random_mixture(
    dim: int,
    n_components: int = 8,
    generator: torch.Generator | int | None = None,
    *,
    separation: float = 10.0,
    radius: float = 1.0,
    random_weights: bool = False,
    dtype: torch.dtype = torch.float64,
    device=None,
) -> GaussianMixture:
    """Random well-separated isotropic mixture in R^dim.

    Means are drawn ``mu_k = radius g_k / sqrt(dim)`` with ``g_k ~ N(0, I)`` (so
    ``E||mu_k||^2 = radius^2``); one std is shared by all components and set to
    ``min_{j != k} ||mu_j - mu_k|| / separation``. Separation is thereby guaranteed: every pair of
    means is at least ``separation`` standard deviations apart (the overlap of two such components
    is at most ``Phi(-separation / 2)``, 3e-7 for the default 10). Weights are uniform, or with
    ``random_weights`` proportional to ``1 + u_k``, ``u_k ~ U(0, 1)`` (each in ``[1/(2K), 2/K]``).
    ``generator`` is a ``torch.Generator``, an int seed, or None (the global RNG).
    """
    dim = integer(dim, "dim", lo=1)
    n_components = integer(n_components, "n_components", lo=1)
    real(separation, "separation", lo_open=0.0, fix="use a positive number of stds")
    real(radius, "radius", lo_open=0.0)
    if isinstance(generator, int) and not isinstance(generator, bool):
        generator = torch.Generator().manual_seed(generator)
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise bad(
            "type(generator)",
            type(generator).__name__,
            "use a torch.Generator, an int seed or None",
        )
    gen_device = generator.device if generator is not None else "cpu"
    g = torch.randn(n_components, dim, generator=generator, dtype=torch.float64, device=gen_device)
    means = radius * g / math.sqrt(dim)
    if n_components > 1:
        dist = torch.cdist(means, means) + torch.diag(torch.full((n_components,), math.inf))
        std = float(dist.min()) / separation
    else:
        std = radius / separation
    if random_weights:
        u = torch.rand(n_components, generator=generator, dtype=torch.float64, device=gen_device)
        weights = (1 + u) / (1 + u).sum()
    else:
        weights = torch.full((n_components,), 1.0 / n_components, dtype=torch.float64)
    return GaussianMixture(weights.cpu(), means.cpu(), stds=std, dtype=dtype, device=device)


PRESETS: dict[str, Callable[..., GaussianMixture]] = {
    "two_gaussians_1to2": two_gaussians_1to2,
    "two_diracs": two_diracs,
    "eight_gaussians": eight_gaussians,
    "random_mixture": random_mixture,
    # high-dimensional targets with exact oracles (defined at the end of this module)
    "random_16": lambda **kw: random_mixture_preset(16, **kw),
    "random_64": lambda **kw: random_mixture_preset(64, **kw),
    "random_256": lambda **kw: random_mixture_preset(256, **kw),
    "random_3072": lambda **kw: random_mixture_preset(3072, **kw),
    "digits_mixture": lambda **kw: digits_mixture(**kw),
}


def get_preset(name: str, **kwargs) -> GaussianMixture:
    """Build a preset mixture by name (see ``PRESETS``); ``kwargs`` go to its function."""
    if name not in PRESETS:
        # hand-written: tests/test_data.py matches this text ("name must be one of")
        raise ValueError(f"name must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name](**kwargs)


# --- high-dimensional presets -----------------------------------------------------------------
HIGHDIM_DIMS = (16, 64, 256, 3072)


def random_mixture_preset(
    dim: int, seed: int = 0, n_components: int = 8, dtype: torch.dtype = torch.float64, device=None
) -> GaussianMixture:
    """The fixed random well-separated mixture in R^dim (presets ``random_16`` ... ``random_3072``).

    ``random_mixture(dim, n_components, generator=seed)``: 8 equal-weight isotropic components,
    means of expected norm 1, every pair at least 10 standard deviations apart.
    """
    return random_mixture(dim, n_components, generator=int(seed), dtype=dtype, device=device)


def digits_mixture(
    split: str = "all",
    shrinkage: float | None = None,
    dtype: torch.dtype = torch.float64,
    device=None,
) -> GaussianMixture:
    """A 64-D mixture fitted to scikit-learn's 8x8 digits: image statistics with an exact oracle.

    One component per class ``c = 0..9``: weight = the class's share of ``split``, mean = the
    class mean of the images as ``gcflows.data.load_digits`` scales them (``pixel / 8 - 1`` in
    ``[-1, 1]``, flattened row-major to 64 values), covariance = the class's sample covariance
    ``S_c`` (divided by ``n_c``) shrunk towards a multiple of the identity,
    ``(1 - a_c) S_c + a_c (tr S_c / 64) I``, which is positive definite for ``a_c > 0`` (pixels
    that are constant within a class, e.g. the corners, have zero variance in ``S_c``).
    ``shrinkage=None`` takes the Ledoit-Wolf ``a_c`` of each class (scikit-learn); a float in
    ``(0, 1]`` uses that ``a`` for every class.
    """
    import numpy as np
    from sklearn.covariance import ledoit_wolf

    from gcflows.data import load_digits

    if shrinkage is not None and not (
        isinstance(shrinkage, (int, float))
        and not isinstance(shrinkage, bool)
        and 0 < shrinkage <= 1
    ):
        raise bad("shrinkage", shrinkage, "use None (Ledoit-Wolf) or a float in (0, 1]")
    images, labels = load_digits(split, dtype=torch.float64)
    x = images.reshape(images.shape[0], -1).numpy()
    y = labels.numpy()
    weights, means, covs = [], [], []
    for c in range(10):
        xc = x[y == c]
        mean = xc.mean(axis=0)
        if shrinkage is None:
            cov, _ = ledoit_wolf(xc - mean, assume_centered=True)
        else:
            s = np.cov(xc, rowvar=False, bias=True)
            cov = (1 - shrinkage) * s + shrinkage * np.trace(s) / s.shape[0] * np.eye(s.shape[0])
        weights.append(xc.shape[0] / x.shape[0])
        means.append(mean)
        covs.append(0.5 * (cov + cov.T))
    return GaussianMixture(
        torch.tensor(weights, dtype=torch.float64),
        torch.from_numpy(np.stack(means)),
        covs=torch.from_numpy(np.stack(covs)),
        dtype=dtype,
        device=device,
    )
