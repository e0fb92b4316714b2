"""Benchmark: exact batch-OT coupling (gcflows) against torchcfm's exact OT sampler and POT.

For each batch size B and dimension D (float32 Gaussian data and noise, as in training), times in
the same run, interleaved repeat by repeat (so a busy machine slows every method alike):

- ``gcflows auto``: ``gcflows.couplings.ot_coupling(data, noise)``, the default
  ``solver="auto"`` (the whole call: cost matrix by ``pairwise_sqdist``, the solver the measured
  rule picks, the permuted noise, both mean costs);
- ``gcflows lsa`` / ``gcflows emd``: the same call with ``solver="lsa"`` (scipy
  ``linear_sum_assignment``) and ``solver="emd"`` (POT network simplex, limit ``50 B^2``);
- ``cost matrix``: ``gcflows.kernels.pairwise_sqdist`` alone;
- ``torchcfm exact``: ``torchcfm.optimal_transport.OTPlanSampler("exact").sample_plan`` when
  torchcfm is installed (``pip install torchcfm --no-deps``, not a gcflows dependency);
  otherwise ``torchcfm-like``: the same three steps written here (squared ``torch.cdist``,
  ``ot.emd`` with POT's default iteration limit, B pairs drawn from the flattened plan with
  replacement), so that the comparison can run without it;
- ``ot.dist + ot.emd``: the plain POT call with its default iteration limit.

Each timing is the median of ``--repeats`` (>= 3) calls after ``--warmup`` (default 1) untimed
ones, by the wall clock or (``--clock cpu --threads 1``, for a busy machine) the CPU time.
Outside the timings, every result is checked: whether the pairing is a permutation and (unless
``--no-verify``) its cost against the optimum ``ot.emd2`` (float64, limit ``50 B^2``). Prints
the goals (auto within 10 % of the faster of lsa and emd in every cell; at least 1.5x faster
than torchcfm's exact sampler at 512 x 3072), then the table; writes ``config.json``,
``results.json`` and ``table.md`` to ``--out``.

    python experiments/bench_couplings.py            # B 128 / 512 / 2048, D 2 / 3072
    python experiments/bench_couplings.py --quick    # B 128 / 512, 3 repeats
    python experiments/bench_couplings.py --methods auto lsa emd --batches 1024 4096 --dims 2 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import ot
import torch

from gcflows.couplings import auto_ot_solver, ot_coupling
from gcflows.kernels import pairwise_sqdist
from gcflows.records import cpu_model, git_sha

#: Largest batch accepted: the float64 cost matrix alone holds 8 B^2 bytes (2 GiB at 16384).
MAX_BATCH = 16384
#: Short names of ``--methods`` -> column names.
METHODS = {
    "auto": "gcflows auto",
    "lsa": "gcflows lsa",
    "emd": "gcflows emd",
    "cost": "cost matrix",
    "torchcfm": "torchcfm exact",
    "pot": "ot.dist + ot.emd",
}
OURS = ("gcflows auto", "gcflows lsa", "gcflows emd")


def load_torchcfm():
    """``(sampler, version)`` of torchcfm's exact OT sampler, or ``(None, None)``."""
    try:
        from torchcfm.optimal_transport import OTPlanSampler
    except ImportError as err:
        print(f"torchcfm not available ({err}); the torchcfm-like re-statement is timed instead")
        return None, None
    import importlib.metadata

    return OTPlanSampler("exact"), importlib.metadata.version("torchcfm")


def torchcfm_like(x0: torch.Tensor, x1: torch.Tensor, rng: np.random.Generator):
    """Exact-OT minibatch pairs as torchcfm's exact sampler makes them (written here): squared
    Euclidean ``torch.cdist``, ``ot.emd`` with POT's default limit, B index pairs drawn from the
    flattened plan with replacement. Returns ``(x0[i], x1[j])``."""
    b = x0.shape[0]
    w = np.full(b, 1.0 / b)
    plan = ot.emd(w, w, (torch.cdist(x0, x1) ** 2).numpy())
    p = plan.ravel() / plan.sum()
    k = rng.choice(p.size, size=b, replace=True, p=p)
    i, j = np.divmod(k, plan.shape[1])
    return x0[i], x1[j]


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_methods(methods: dict, repeats: int, warmup: int, clock: str) -> tuple[dict, dict, dict]:
    """Interleaved timings: ``(outputs of the first call, times, warnings caught)``.

    ``clock="cpu"`` counts the process's CPU time (``time.process_time``): with one torch thread
    (scipy and POT solve on one thread) it is the work done, nearly free of the time spent
    waiting for a core on a busy machine; ``"wall"`` is ``time.perf_counter``.
    """
    now = CLOCKS[clock]
    outputs: dict = {}
    times: dict = {name: [] for name in methods}
    caught: dict = {name: [] for name in methods}
    for rep in range(warmup + repeats):  # the first `warmup` rounds are not timed
        for name, fn in methods.items():
            with warnings.catch_warnings(record=True) as rec:
                warnings.simplefilter("always")
                t0 = now()
                out = fn()
                dt = now() - t0
            if rep == 0:
                outputs[name] = out
                caught[name] = sorted({str(x.message)[:80] for x in rec})
            if rep >= warmup:
                times[name].append(dt)
    return outputs, times, caught


def verify(outputs: dict, data, noise, verify_optimum: bool) -> dict:
    """Permutation check and mean cost of every pairing (and its gap to ``ot.emd2``)."""
    dn, zn = data.numpy().astype(np.float64), noise.numpy().astype(np.float64)
    b = dn.shape[0]
    cost64 = ot.dist(dn, zn)
    rows = np.arange(b)
    checks = {}
    for name in OURS:
        if name in outputs:
            res = outputs[name]
            perm = res.permutation.numpy()
            checks[name] = {
                "mean_cost": float(cost64[rows, perm].mean()),
                "is_permutation": bool(np.array_equal(np.sort(perm), rows)),
                "fell_back": res.fell_back,
            }
    if "ot.dist + ot.emd" in outputs:
        plan = outputs["ot.dist + ot.emd"]
        checks["ot.dist + ot.emd"] = {
            "mean_cost": float((plan * cost64).sum()),
            "is_permutation": bool(np.array_equal(np.sort((plan * b).argmax(1)), rows)),
        }
    if "torchcfm exact" in outputs:
        x0, x1 = outputs["torchcfm exact"]
        # recover the sampled indices by exact row matching (rows are distinct Gaussian draws)
        i = torch.cdist(x0, data).argmin(1).numpy()
        j = torch.cdist(x1, noise).argmin(1).numpy()
        checks["torchcfm exact"] = {
            "mean_cost": float(cost64[i, j].mean()),
            "is_permutation": bool(
                np.array_equal(np.sort(i), rows) and np.array_equal(np.sort(j), rows)
            ),
            "distinct_noise_rows": int(len(np.unique(j))),
        }
    opt = None
    if verify_optimum:
        w = np.full(b, 1.0 / b)
        opt = float(ot.emd2(w, w, cost64, numItermax=max(100_000, 50 * b * b)))
        for c in checks.values():
            c["rel_gap_to_emd2"] = c["mean_cost"] / opt - 1.0
    return {"optimum_emd2": opt, "checks": checks}


def run_case(b: int, d: int, args: argparse.Namespace, sampler) -> dict:
    g = torch.Generator().manual_seed(args.seed)
    data = torch.randn(b, d, generator=g)
    noise = torch.randn(b, d, generator=g)
    dn, zn = data.numpy(), noise.numpy()
    w = np.full(b, 1.0 / b)
    rng = np.random.default_rng(args.seed)
    every = {
        "gcflows auto": lambda: ot_coupling(data, noise),
        "gcflows lsa": lambda: ot_coupling(data, noise, solver="lsa"),
        "gcflows emd": lambda: ot_coupling(data, noise, solver="emd"),
        "cost matrix": lambda: pairwise_sqdist(data, noise),
        "ot.dist + ot.emd": lambda: ot.emd(w, w, ot.dist(dn, zn)),
        "torchcfm exact": (
            (lambda: sampler.sample_plan(data, noise))
            if sampler is not None
            else (lambda: torchcfm_like(data, noise, rng))
        ),
    }
    wanted = {METHODS[m] for m in args.methods}
    methods = {k: v for k, v in every.items() if k in wanted}
    outputs, times, caught = time_methods(methods, args.repeats, args.warmup, args.clock)
    result = {"batch": b, "dim": d, "auto_chose": auto_ot_solver(b, d)}
    result.update(verify(outputs, data, noise, args.verify))
    for name, c in result["checks"].items():
        c["warnings"] = caught[name]
    result["median_s"] = {k: float(np.median(v)) for k, v in times.items()}
    result["times_s"] = times
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check every argument before any work: one clear line (exit 2) on bad input."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=None, help="default 128 512 2048")
    p.add_argument("--dims", type=int, nargs="+", default=[2, 3072])
    p.add_argument("--repeats", type=int, default=None, help="timed repeats, >= 3 (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), help=f"of {list(METHODS)}")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip ot.emd2")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per method first")
    p.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall", help="cpu: process CPU time (load)"
    )
    p.add_argument(
        "--quick", action="store_true", help="batches 128 / 512 and 3 repeats unless given"
    )
    p.add_argument("--out", type=Path, default=Path("runs/bench_couplings"))
    args = p.parse_args(argv)
    if args.batches is None:
        args.batches = [128, 512] if args.quick else [128, 512, 2048]
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    bad_b = [b for b in args.batches if not 1 <= b <= MAX_BATCH]
    if bad_b:
        p.error(f"--batches {bad_b} is invalid: use batch sizes between 1 and {MAX_BATCH}")
    bad_d = [d for d in args.dims if d < 1]
    if bad_d:
        p.error(f"--dims {bad_d} is invalid: use dimensions >= 1")
    if args.repeats < 3:
        p.error(f"--repeats {args.repeats} is invalid: use >= 3 (the table reports medians)")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads {args.threads} is invalid: use >= 1, or leave it out for torch's")
    if args.warmup < 0:
        p.error(f"--warmup {args.warmup} is invalid: use an integer >= 0")
    if args.clock == "cpu" and args.threads != 1:
        p.error("--clock cpu needs --threads 1 (CPU time adds up the threads of a parallel call)")
    if args.seed < 0:
        p.error(f"--seed {args.seed} is invalid: use an integer >= 0")
    bad_m = [m for m in args.methods if m not in METHODS]
    if bad_m:
        p.error(f"--methods {bad_m} is invalid: use names of {list(METHODS)}")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} is a file: name a folder for the results")
    parent = args.out
    while not parent.exists():
        parent = parent.parent
    try:  # a real write (os.access says yes to root on read-only or virtual file systems)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        p.error(f"--out {args.out} cannot be written (no new file in {parent}: {err.strerror})")
    return args


def goals(results: list[dict], tcfm_name: str) -> list[str]:
    """The two goals, cell by cell.

    ``pick / best``: the median time of the solver ``auto`` picks over the faster of ``lsa`` and
    ``emd`` (both measured in the same run): whether the rule chose well, free of the scheduling
    noise of a third column. ``auto / best``: the same with the measured ``gcflows auto`` column
    (identical code to the picked solver plus the rule, so any gap is noise)."""
    lines = []
    for r in results:
        ms = r["median_s"]
        head = f"  B={r['batch']:5d} D={r['dim']:5d} auto->{r['auto_chose']}"
        if all(n in ms for n in OURS):
            best = min(ms["gcflows lsa"], ms["gcflows emd"])
            pick = ms[f"gcflows {r['auto_chose']}"] / best
            head += f"  pick / best = {pick:.2f} (<= 1.10: {'met' if pick <= 1.10 else 'NOT met'})"
            head += f"  auto / best = {ms['gcflows auto'] / best:.2f}"
            head += f"  emd / lsa = {ms['gcflows emd'] / ms['gcflows lsa']:.2f}"
        if "torchcfm exact" in ms and "gcflows auto" in ms:
            speedup = ms["torchcfm exact"] / ms["gcflows auto"]
            goal = ""
            if (r["batch"], r["dim"]) == (512, 3072):
                goal = f" (>= 1.5x: {'met' if speedup >= 1.5 else 'NOT met'})"
            head += f"  {tcfm_name} / auto = {speedup:.2f}x{goal}"
        lines.append(head)
    return lines


def optimality(results: list[dict], tcfm_name: str) -> list[str]:
    lines = []
    for r in results:
        parts = []
        for n, c in r["checks"].items():
            gap = f"{c['rel_gap_to_emd2']:+.1e} " if "rel_gap_to_emd2" in c else ""
            extra = ""
            if "distinct_noise_rows" in c:
                extra = f", {c['distinct_noise_rows']}/{r['batch']} noise rows kept"
            if c.get("fell_back"):
                extra += ", FELL BACK"
            if c["warnings"]:
                extra += ", warned: " + "; ".join(c["warnings"])
            perm = "perm" if c["is_permutation"] else "NOT perm"
            label = tcfm_name if n == "torchcfm exact" else n
            parts.append(f"{label}: {gap}({perm}{extra})")
        lines.append(f"  B={r['batch']:5d} D={r['dim']:5d}  " + " | ".join(parts))
    return lines


def table(results: list[dict], tcfm_name: str) -> str:
    names = [n for n in METHODS.values() if any(n in r["median_s"] for r in results)]
    cols = [tcfm_name if n == "torchcfm exact" else n for n in names]
    lines = ["| B | D | auto chose | " + " | ".join(f"{c} (ms)" for c in cols) + " |"]
    lines.append("|" + " --- |" * (len(names) + 3))
    for r in results:
        ms = r["median_s"]
        cells = [f"{ms[n] * 1e3:.1f}" if n in ms else "n/a" for n in names]
        lines.append(
            f"| {r['batch']} | {r['dim']} | {r['auto_chose']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sampler, tcfm_version = (None, None)
    if "torchcfm" in args.methods:
        sampler, tcfm_version = load_torchcfm()
    tcfm_name = "torchcfm exact" if sampler is not None else "torchcfm-like"
    config = {
        "command": "python experiments/bench_couplings.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "pot": ot.__version__,
            "scipy": __import__("scipy").__version__,
            "torchcfm": tcfm_version,
        },
        "git_sha": git_sha(),
        "dtype": "float32",
        "torchcfm_column": tcfm_name,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    results = []
    for d in args.dims:
        for b in args.batches:
            print(f"B={b} D={d} ...", flush=True)
            results.append(run_case(b, d, args, sampler))

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(json.dumps(config, indent=2))
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print("\nGoals (median times; auto = the default ot_coupling(data, noise))")
    print("\n".join(goals(results, tcfm_name)))
    print("\nOptimality (mean cost / ot.emd2 optimum - 1; perm = a permutation of the batch)")
    print("\n".join(optimality(results, tcfm_name)))
    text = table(results, tcfm_name)
    (args.out / "table.md").write_text(text + "\n")
    print(f"\nwrote {args.out}/config.json, results.json, table.md")
    print(
        f"median of {args.repeats} interleaved repeats ({args.clock} clock), float32 inputs, "
        f"{config['torch_threads']} torch threads, {config['cpu']}, {config['date']}\n"
    )
    print(text)


if __name__ == "__main__":
    main()
