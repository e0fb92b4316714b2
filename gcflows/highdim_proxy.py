"""The high-dimensional study's proxy part (docs/paper.md Eq. 17, Fig. 2) as library functions;
experiments/highdim_study.py runs them, draws the figures and prints the tables.

- Pairs ``(x_t, noise)`` of each coupling (:func:`make_sampler`): IC, batch-OT at a batch size,
  GC at ``mu`` with the ideal generator (exact flow map, RK4) or a given model, on a Gaussian
  mixture or on data (the real digits, resampled).
- The proxy of one coupling with the design's regressor and its convergence bookkeeping
  (:func:`estimate`, :func:`proxy_rows`): ``gcflows.regression.estimate_proxy`` with the n/2-pairs
  estimate (the convergence margin).
- References at every time where one exists (:func:`references`): IC exact (posterior covariance
  trace, ``gcflows.discrepancy.ic_proxy``); at times where the modes do not mix
  (:func:`non_mixing`), GC with the ideal generator in closed form on isotropic components
  (:func:`closed_form`) and per-component least squares for every coupling
  (:func:`linear_reference`; exact for IC and GC mu = 1, an upper bound for batch-OT).
- The (target, coupling) jobs in worker processes (:func:`proxy_job`, :func:`proxy_part`), the
  ordering of couplings per time including the convergence margin (:func:`ordering_verdicts`)
  and the verdict on "GC < batch-OT < IC" per target (:func:`target_verdict`).

``cfg`` is the study's settings dict (experiments/highdim_study.py ``settings``): ``proxy_times``,
``proxy_targets``, ``couplings``, ``n_train``, ``n_test``, ``big_d_pairs``, ``regressor``,
``estimator``, ``conv_tol``, ``reg_seed``, ``ideal_steps``, ``ref_pairs``.
"""

from __future__ import annotations

import math
import time

import torch

from gcflows import couplings
from gcflows.data import load_digits
from gcflows.discrepancy import ic_proxy
from gcflows.gmm import GaussianMixture, get_preset
from gcflows.progress import JobPool
from gcflows.regression import (
    RegressorConfig,
    estimate_proxy,
    gaussian_gc_proxy,
    linear_proxy,
)

__all__ = [
    "BIG_D_TARGETS",
    "NON_MIXING",
    "EXACT_DRAWS",
    "real_digits",
    "data_sampler",
    "make_sampler",
    "estimate",
    "proxy_rows",
    "proxy_couplings",
    "non_mixing",
    "linear_reference",
    "closed_form",
    "references",
    "proxy_job",
    "proxy_part",
    "ordering_verdicts",
    "target_verdict",
]

# only with --full, and there with fewer couplings and pairs (cost ~ d)
BIG_D_TARGETS = ["random_3072"]
# references need the mixture's modes not to mix at t: mean (1 - max responsibility) below this
NON_MIXING = 1e-4


def real_digits() -> torch.Tensor:
    images, _ = load_digits("all", dtype=torch.float64)
    return images.reshape(images.shape[0], -1)


def data_sampler(target):
    """``(n, generator) -> data (n, d)`` float64 for a mixture or the real digits (resampled)."""
    if isinstance(target, GaussianMixture):
        return lambda n, g: target.sample(n, generator=g)
    return lambda n, g: target[torch.randint(0, target.shape[0], (n,), generator=g)]


def make_sampler(name: str, target, ideal_steps: int, gc_model=None):
    """The pairs ``(x_t, noise)`` of a coupling at time ``t`` (ve)."""
    draw = data_sampler(target)

    def ic(t, n, g):
        data = draw(n, g)
        noise = torch.randn(data.shape, generator=g, dtype=data.dtype)
        return data + t * noise, noise

    def ot(batch):
        def sampler(t, n, g):
            xs, zs = [], []
            for _ in range(math.ceil(n / batch)):
                data = draw(batch, g)
                noise = torch.randn(data.shape, generator=g, dtype=data.dtype)
                # the assignment on the float32 cost matrix (exact for it; about 25 % faster)
                perm = couplings.ot_coupling(data.float(), noise.float()).permutation
                noise = noise[perm]
                xs.append(data + t * noise)
                zs.append(noise)
            return torch.cat(xs)[:n], torch.cat(zs)[:n]

        return sampler

    def gc(mu, model):
        def sampler(t, n, g):
            data = draw(n, g)
            noise = torch.randn(data.shape, generator=g, dtype=data.dtype)
            mask = torch.rand(n, generator=g) < mu
            if bool(mask.any()):
                x_t = data[mask] + t * noise[mask]
                data = data.clone()
                data[mask] = model(x_t, torch.full((x_t.shape[0],), t, dtype=x_t.dtype))
            return data + t * noise, noise

        return sampler

    if name == "ic":
        return ic
    if name.startswith("ot"):
        return ot(int(name[2:]))
    mu = float(name[2:].split("-")[0])
    if name.endswith("-ideal"):
        return gc(mu, lambda x, t: target.flow_map(x, t, "ve", method="rk4", steps=ideal_steps))
    return gc(mu, gc_model)


EXACT_DRAWS = 4096  # x_t draws of the exact IC reference per time


def estimate(cfg: dict, sampler, n_train, n_test: int):
    """The proxy of one coupling with the design's regressor (same seed for every coupling), with
    its n/2-pairs estimate (convergence margin)."""
    return estimate_proxy(
        sampler,
        cfg["proxy_times"],
        n_train=n_train,
        n_test=n_test,
        config=RegressorConfig(**cfg["regressor"]),
        product=cfg["estimator"] == "product",
        convergence=True,
        tolerance=cfg["conv_tol"],
        generator=torch.Generator().manual_seed(cfg["reg_seed"]),
    )


def proxy_rows(tname: str, dim: int, cname: str, est, wall: float) -> list[dict]:
    return [
        dict(
            part="proxy",
            target=tname,
            d=dim,
            coupling=cname,
            t=t,
            proxy_per_d=v / dim,
            half_width_per_d=h / dim,
            half_pairs_per_d=vh / dim,
            margin_per_d=mg / dim,
            converged=ok,
            n_train=n,
            reg_steps=k,
            reg_capped=c,
            fit_s=round(wall, 1),
        )
        for t, v, h, vh, mg, ok, n, k, c in zip(
            est.times,
            est.value,
            est.half_width,
            est.value_half,
            est.margin,
            est.converged,
            est.n_train,
            est.steps,
            est.capped,
            strict=True,
        )
    ]


def proxy_couplings(cfg: dict, tname: str) -> list[str]:
    """The couplings estimated on one target."""
    names = list(cfg["couplings"])
    if tname == "digits":  # no exact oracle, no ideal generator
        return [c for c in names if not c.startswith("gc")]
    if tname in BIG_D_TARGETS:  # 3072-D (--full): fewer couplings and pairs (cost ~ d)
        return [c for c in names if c in ("ic", "ot512", "gc1-ideal")]
    return names


def non_mixing(target: GaussianMixture, t: float) -> bool:
    """True where the modes do not mix at ``t`` (IC ``x_t``: mean ``1 - max_k r_k < NON_MIXING``);
    there each component is its own Gaussian problem and the closed forms apply."""
    g = torch.Generator().manual_seed(3)
    x = target.sample(4096, generator=g)
    x = x + t * torch.randn(x.shape, generator=g, dtype=x.dtype)
    r = target.responsibilities(x, t, "ve")
    return float((1 - r.max(1).values).mean()) < NON_MIXING


def linear_reference(target: GaussianMixture, sampler, t: float, n: int) -> tuple[float, float]:
    """Per-component least squares of the noise on ``x_t`` (component = the most likely one given
    ``x_t``) on ``n`` pairs: ``gcflows.regression.linear_proxy``. Exact (up to ``n``) where the
    pairs are jointly Gaussian within a component (IC, GC mu = 1 at non-mixing times), an upper
    bound otherwise (batch-OT, GC mu < 1)."""
    n = max(n, 16 * (target.dim + 1) * target.n_components)
    x, z = sampler(t, n, torch.Generator().manual_seed(17))
    labels = target.responsibilities(x, t, "ve").argmax(1)
    return linear_proxy(x, z, labels)


def closed_form(target: GaussianMixture, cname: str, t: float) -> tuple[float, float] | None:
    """GC with the ideal generator on a mixture of isotropic components at a non-mixing ``t``:
    the weighted per-component value of ``gcflows.regression.gaussian_gc_proxy``, else None."""
    stds = target.stds
    if not cname.endswith("-ideal") or stds is None or stds.dim() != 1:
        return None
    mu = float(cname[2:].split("-")[0])
    value, var = 0.0, 0.0
    for w, s in zip(target.weights.tolist(), stds.tolist(), strict=True):
        v, h = gaussian_gc_proxy(
            s * s, target.dim, t, mu, generator=torch.Generator().manual_seed(5)
        )
        value, var = value + w * v, var + (w * h) ** 2
    return value, math.sqrt(var)


def references(target, tname: str, cname: str, sampler, est, cfg: dict) -> list[dict]:
    """The validation rows of one coupling: per time with a reference, the estimate against it.

    References: IC, exact (Monte Carlo of the posterior trace) at every t; at non-mixing times,
    GC with the ideal generator on isotropic components in closed form, and for every coupling the
    per-component least-squares value (exact for IC and GC mu = 1, an upper bound for batch-OT
    and GC mu < 1; the digits mixture's GC mu = 1 reference is this one).
    """
    if tname == "digits":
        return []
    dim = target.dim
    rows = []
    g = torch.Generator().manual_seed(2)
    for i, t in enumerate(est.times):
        ref, ref_hw, kind = None, None, None
        lin = lin_hw = None
        if cname == "ic":
            exact_ic = ic_proxy(target, "ve", t, n_samples=EXACT_DRAWS, generator=g)
            ref, ref_hw = exact_ic.mean, exact_ic.half_width
            kind = "exact"
        if non_mixing(target, t):
            lin, lin_hw = linear_reference(target, sampler, t, cfg["ref_pairs"])
            cf = closed_form(target, cname, t)
            if cf is not None:
                (ref, ref_hw), kind = cf, "closed form"
            elif ref is None:
                exact = cname == "gc1-ideal"
                ref, ref_hw = lin, lin_hw
                kind = "least squares" if exact else "least-squares bound"
        if ref is None:
            continue
        v, m = est.value[i], est.margin[i]
        rows.append(
            dict(
                target=tname,
                d=dim,
                coupling=cname,
                t=t,
                estimate_per_d=v / dim,
                estimate_hw_per_d=est.half_width[i] / dim,
                reference_per_d=ref / dim,
                reference_hw_per_d=ref_hw / dim,
                reference=kind,
                rel_bias=(v - ref) / ref,
                rel_margin=m / v,
                converged=est.converged[i],
                linear_per_d=None if lin is None else lin / dim,
                linear_hw_per_d=None if lin_hw is None else lin_hw / dim,
                reg_steps=est.steps[i],
                reg_capped=est.capped[i],
            )
        )
    return rows


def proxy_job(job: dict) -> dict:
    """One (target, coupling) of the proxy part: estimate and references (a worker's job)."""
    torch.set_num_threads(job["threads"])
    cfg, tname, cname = job["cfg"], job["target"], job["coupling"]
    target = real_digits() if tname == "digits" else get_preset(tname)
    dim = target.shape[1] if tname == "digits" else target.dim
    n_train = cfg["big_d_pairs"] if tname in BIG_D_TARGETS else cfg["n_train"]
    t0 = time.perf_counter()
    sampler = make_sampler(cname, target, cfg["ideal_steps"])
    est = estimate(cfg, sampler, n_train, cfg["n_test"])
    fit_s = time.perf_counter() - t0
    validation = references(target, tname, cname, sampler, est, cfg)
    return dict(
        curve=est.as_dict(),
        rows=proxy_rows(tname, dim, cname, est, fit_s),
        validation=validation,
        seconds=time.perf_counter() - t0,
    )


def proxy_part(
    cfg: dict, bar, workers: int = 1, threads: int = 1, on_job=None
) -> tuple[list, list, dict]:
    """Every (target, coupling) job, in ``workers`` processes; results in the jobs' order.
    ``on_job(rows, validation, curves)`` gets the results so far after each finished job."""
    jobs = [
        dict(cfg=cfg, target=tname, coupling=cname, threads=threads)
        for tname in cfg["proxy_targets"]
        for cname in proxy_couplings(cfg, tname)
    ]
    done = {}

    def collect() -> tuple[list, list, dict]:
        rows, validation, curves = [], [], {}
        for job in jobs:
            res = done.get(f"proxy {job['target']} {job['coupling']}")
            if res is None:
                continue
            curves.setdefault(job["target"], {})[job["coupling"]] = res["curve"]
            rows += res["rows"]
            validation += res["validation"]
        return rows, validation, curves

    with JobPool(proxy_job, workers, bar) as pool:
        for job in jobs:
            pool.submit(job, f"proxy {job['target']} {job['coupling']}")
        for label, res in pool.results():
            done[label] = res
            if on_job is not None:
                on_job(*collect())
    return collect()


def _interval(est: dict, i: int) -> tuple[float, float]:
    """``value -+ (half_width + margin)``: the sampling half-width and the convergence margin."""
    v = est["value"][i]
    margin = est["margin"][i] if est.get("margin") else 0.0
    w = est["half_width"][i] + margin
    return v - w, v + w


def ordering_verdicts(curves: dict, times: list[float]) -> list[dict]:
    """Per target and t: the coupling order (lowest R~ first; ``<`` where the intervals including
    the convergence margin separate, ``~`` where they do not) and the paper's claim."""
    out = []
    for tname, per in curves.items():
        gc_name = "gc1-ideal" if "gc1-ideal" in per else None
        for i, t in enumerate(times):
            have = [c for c in per if i < len(per[c]["value"])]
            span = {c: _interval(per[c], i) for c in have}
            order = sorted(have, key=lambda c: per[c]["value"][i])
            text = order[0] if order else ""
            for a, b in zip(order, order[1:], strict=False):
                text += (" < " if span[a][1] < span[b][0] else " ~ ") + b
            row = dict(target=tname, t=t, order=text)
            if gc_name and "ot512" in span and "ic" in span:
                gc_ot = span[gc_name][1] < span["ot512"][0]
                ot_ic = span["ot512"][1] < span["ic"][0]
                row["gc<ot<ic"] = bool(gc_ot and ot_ic)
                row["gc/ic"] = per[gc_name]["value"][i] / per["ic"]["value"][i]
                row["ot/ic"] = per["ot512"]["value"][i] / per["ic"]["value"][i]
            out.append(row)
    return out


def target_verdict(order_rows: list[dict]) -> list[dict]:
    out = []
    for tname in dict.fromkeys(r["target"] for r in order_rows):
        rs = [r for r in order_rows if r["target"] == tname and "gc<ot<ic" in r]
        if not rs:
            out.append(dict(target=tname, verdict="not testable (no GC oracle)", held=None))
            continue
        held = sum(r["gc<ot<ic"] for r in rs)
        gap = [1 - r["gc/ic"] for r in rs]
        growing = all(b >= a - 0.02 for a, b in zip(gap, gap[1:], strict=False))
        if held == len(rs):
            verdict = "confirmed" + (" (gap growing with t)" if growing else " (gap not monotone)")
        elif held == 0:
            verdict = "refuted at every t"
        else:
            verdict = f"holds at {held} of {len(rs)} times"
        out.append(dict(target=tname, verdict=verdict, held=held, of=len(rs)))
    return out
