"""Benchmark: exact batch-OT coupling (gcflows) against torchcfm's exact OT sampler and POT.

For each batch size B and dimension D (float32 Gaussian data and noise, as in training), times in
the same run, interleaved repeat by repeat (so a busy machine slows every method alike):

- ``gcflows lsa``: ``gcflows.couplings.ot_coupling(data, noise, solver="lsa")`` (the float32
  cost matrix by ``pairwise_sqdist``, scipy ``linear_sum_assignment``, the permuted noise, both
  mean costs: the whole call);
- ``cost matrix``: ``gcflows.kernels.pairwise_sqdist`` alone (the part of ``gcflows lsa`` spent
  on the cost matrix);
- ``gcflows emd``: the same with ``solver="emd"`` (POT network simplex, limit ``50 B^2``);
- ``torchcfm exact``: ``torchcfm.optimal_transport.OTPlanSampler("exact").sample_plan`` (its
  default: ``torch.cdist ** 2``, ``ot.emd`` with POT's default iteration limit, pairs sampled
  from the plan with replacement); skipped with a message when torchcfm is not installed
  (``pip install torchcfm --no-deps``: it is not a gcflows dependency);
- ``ot.dist + ot.emd``: the plain POT call with its default iteration limit.

Each timing is the median of ``--repeats`` (>= 3) calls after one warm-up call. Outside the
timings, every result is checked against the optimum ``ot.emd2`` (float64, iteration limit
``50 B^2``): relative cost gap, whether the pairing is a permutation, how many noise rows the
sampler dropped. Writes ``config.json`` and ``results.json`` to ``--out`` and prints the ratios
and, last, the table.

    python experiments/bench_couplings.py            # B 128 / 512 / 2048, D 2 / 3072
    python experiments/bench_couplings.py --quick    # B 128 / 512, 3 repeats
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

from gcflows.couplings import ot_coupling
from gcflows.kernels import pairwise_sqdist
from gcflows.records import cpu_model, git_sha


def load_torchcfm():
    try:
        from torchcfm.optimal_transport import OTPlanSampler
    except ImportError as err:
        print(
            f"torchcfm not available ({err}); its column is skipped. Install it for the "
            "benchmark only: pip install torchcfm --no-deps"
        )
        return None, None
    import importlib.metadata

    return OTPlanSampler("exact"), importlib.metadata.version("torchcfm")


def optimum(data: np.ndarray, noise: np.ndarray) -> tuple[float, np.ndarray]:
    """Exact OT mean cost (uniform weights) in float64 with a raised iteration limit."""
    b = data.shape[0]
    w = np.full(b, 1.0 / b)
    cost = ot.dist(data, noise)
    return float(ot.emd2(w, w, cost, numItermax=max(100_000, 50 * b * b))), cost


def run_case(b: int, d: int, repeats: int, seed: int, sampler) -> dict:
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(b, d, generator=g)
    noise = torch.randn(b, d, generator=g)
    dn, zn = data.numpy(), noise.numpy()
    w = np.full(b, 1.0 / b)

    def pot_emd():
        return ot.emd(w, w, ot.dist(dn, zn))

    methods = {
        "gcflows lsa": lambda: ot_coupling(data, noise, solver="lsa"),
        "cost matrix": lambda: pairwise_sqdist(data, noise),
        "gcflows emd": lambda: ot_coupling(data, noise, solver="emd"),
        "ot.dist + ot.emd": pot_emd,
    }
    if sampler is not None:
        methods["torchcfm exact"] = lambda: sampler.sample_plan(data, noise)
    outputs: dict = {}
    times: dict = {name: [] for name in methods}
    caught: dict = {name: [] for name in methods}
    for rep in range(repeats + 1):  # repeat 0 is the warm-up, not timed
        for name, fn in methods.items():
            with warnings.catch_warnings(record=True) as rec:
                warnings.simplefilter("always")
                t0 = time.perf_counter()
                out = fn()
                dt = time.perf_counter() - t0
            if rep == 0:
                outputs[name] = out
                caught[name] = sorted({str(x.message)[:80] for x in rec})
            else:
                times[name].append(dt)

    # --- verification (not timed) ---
    opt, cost64 = optimum(dn.astype(np.float64), zn.astype(np.float64))
    rows = np.arange(b)
    checks = {}
    for name in ("gcflows lsa", "gcflows emd"):
        res = outputs[name]
        perm = res.permutation.numpy()
        checks[name] = {
            "mean_cost": float(cost64[rows, perm].mean()),
            "is_permutation": bool(np.array_equal(np.sort(perm), rows)),
            "fell_back": res.fell_back,
        }
    plan = outputs["ot.dist + ot.emd"]
    checks["ot.dist + ot.emd"] = {
        "mean_cost": float((plan * cost64).sum()),
        "is_permutation": bool(np.array_equal(np.sort((plan * b).argmax(1)), rows)),
    }
    if sampler is not None:
        x0, x1 = outputs["torchcfm exact"]
        # recover the sampled indices by exact row matching (rows are distinct Gaussian draws)
        i = torch.cdist(x0, data).argmin(1).numpy()
        j = torch.cdist(x1, noise).argmin(1).numpy()
        checks["torchcfm exact"] = {
            "mean_cost": float(cost64[i, j].mean()),
            "is_permutation": bool(
                np.array_equal(np.sort(i), rows) and np.array_equal(np.sort(j), rows)
            ),
            "distinct_data_rows": int(len(np.unique(i))),
            "distinct_noise_rows": int(len(np.unique(j))),
        }
    for name, c in checks.items():
        c["rel_gap_to_emd2"] = c["mean_cost"] / opt - 1.0
        c["warnings"] = caught[name]
    return {
        "batch": b,
        "dim": d,
        "optimum_emd2": opt,
        "median_s": {k: float(np.median(v)) for k, v in times.items()},
        "times_s": times,
        "checks": checks,
    }


#: Largest batch accepted: the float64 cost matrix alone holds 8 B^2 bytes (2 GiB at 16384).
MAX_BATCH = 16384


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check every argument before any work: one clear line (exit 2) on bad input."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=None, help="default 128 512 2048")
    p.add_argument("--dims", type=int, nargs="+", default=[2, 3072])
    p.add_argument("--repeats", type=int, default=None, help="timed repeats, >= 3 (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
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
    if args.seed < 0:
        p.error(f"--seed {args.seed} is invalid: use an integer >= 0")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} is a file: name a folder for the results")
    parent = args.out
    while not parent.exists():
        parent = parent.parent
    try:  # a real write (os.access says yes to root on read-only or virtual file systems)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        p.error(
            f"--out {args.out} cannot be written ({parent}: {err.strerror}): name another folder"
        )
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    sampler, tcfm_version = load_torchcfm()
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
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    results = []
    for d in args.dims:
        for b in args.batches:
            print(f"B={b} D={d} ...", flush=True)
            results.append(run_case(b, d, args.repeats, args.seed, sampler))

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(json.dumps(config, indent=2))
    (args.out / "results.json").write_text(json.dumps(results, indent=2))

    names = ["gcflows lsa", "cost matrix", "gcflows emd", "torchcfm exact", "ot.dist + ot.emd"]
    print("\nRatios (other method's median time / gcflows lsa median time; > 1: gcflows faster)")
    for r in results:
        ours = r["median_s"]["gcflows lsa"]
        parts = [f"{n}: {r['median_s'][n] / ours:.2f}x" for n in names[2:] if n in r["median_s"]]
        share = r["median_s"]["cost matrix"] / ours
        print(
            f"  B={r['batch']:5d} D={r['dim']:5d}  "
            + ", ".join(parts)
            + f"  (cost matrix = {share:.0%} of gcflows lsa)"
        )
    print("\nOptimality (mean cost / ot.emd2 optimum - 1; perm = a permutation of the batch)")
    for r in results:
        parts = []
        for n in names:
            c = r["checks"].get(n)
            if c is None:
                continue
            extra = ""
            if "distinct_noise_rows" in c:
                extra = f", {c['distinct_noise_rows']}/{r['batch']} noise rows kept"
            if c["warnings"]:
                extra += ", warned: " + "; ".join(c["warnings"])
            parts.append(
                f"{n}: {c['rel_gap_to_emd2']:+.1e} ({'perm' if c['is_permutation'] else 'NOT perm'}"
                f"{extra})"
            )
        print(f"  B={r['batch']:5d} D={r['dim']:5d}  " + " | ".join(parts))

    header = (
        "| B | D | gcflows lsa (ms) | of which cost matrix (ms) | gcflows emd (ms) | "
        "torchcfm exact (ms) | ot.dist + ot.emd (ms) | torchcfm / ours |"
    )
    lines = [header, "|" + " --- |" * (len(names) + 3)]
    for r in results:
        ms = r["median_s"]
        cells = [f"{ms[n] * 1e3:.1f}" if n in ms else "n/a" for n in names]
        ratio = (
            f"{ms['torchcfm exact'] / ms['gcflows lsa']:.2f}x" if "torchcfm exact" in ms else "n/a"
        )
        lines.append(f"| {r['batch']} | {r['dim']} | " + " | ".join(cells) + f" | {ratio} |")
    table = "\n".join(lines)
    (args.out / "table.md").write_text(table + "\n")
    print(f"\nwrote {args.out}/config.json, results.json, table.md")
    print(
        f"median of {args.repeats} interleaved repeats, float32 inputs, "
        f"{config['torch_threads']} torch threads, {config['cpu']}, {config['date']}\n"
    )
    print(table)


if __name__ == "__main__":
    main()
