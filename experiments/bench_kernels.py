"""Benchmark of the kernel ops (DESIGN.md, "The kernels"; docs/performance.md).

On CUDA (the Triton path), ``triton.testing.do_bench`` medians, every method on the same device in
the same run:

- ``interpolate_pair`` (float32, ``ve``; plus bfloat16 and ``linear`` at the largest size): the
  Triton kernel through the public op (``validate=True``, one host sync for the time check, and
  ``validate=False``), the naive eager expression, the torch reference (``backend="torch"``) and
  ``torch.compile`` of the reference expression; effective GB/s (2 reads + 2 writes of ``B x D``
  elements) and its fraction of the measured device-to-device copy bandwidth of the same traffic
  (``copy_`` of a ``2 x B x D`` buffer); B 128 / 512 / 2048 / 8192, D 2 / 3072 / 12288.
- ``pairwise_sqdist`` (float32): the Triton kernel with ``ieee`` / ``tf32`` / ``tf32x3``, the
  torch reference, ``torch.cdist(a, b) ** 2`` and ``ot.dist`` in TFLOP/s (``2 B^2 D``); B 128 / 512
  / 2048 / 4096 / 8192, D 2 / 3072 / 12288.
- a short sweep of launch configurations at two sizes, for retuning ``launch_config``.

On CPU (no Triton: it needs CUDA), medians of interleaved repeats (a busy machine slows every
method alike) of the reference ``interpolate_pair`` against the naive eager expression
``(data + t_lo[:, None] * noise, data + t_hi[:, None] * noise, ((data - noise) ** 2).sum(1))`` and
against a same-size memory copy, both ``data.clone()`` (fresh output, as the op allocates) and
``copy_`` into a buffer already in memory (the bandwidth floor), with and without ``out=``; and
of the reference ``pairwise_sqdist`` against ``torch.cdist(a, b) ** 2`` and ``ot.dist``.

Writes ``config.json`` (seed, git SHA, versions, device, command, load average) and
``results.json`` to ``--out`` and prints the ratios and, last, the table.

    python experiments/bench_kernels.py            # full grid
    python experiments/bench_kernels.py --quick    # B = 4096, D = 3072 and one cost matrix (CPU)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import gcflows.kernels as K

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gcflows.records import cpu_model, git_sha

try:  # a gcflows dependency, but absent from some GPU images: its column is then skipped
    import ot
except ImportError:
    ot = None
import numpy as np
import torch

SEED = 0


class Record:
    """Rows, notes and sweeps of a run, saved to ``results.json`` after every case (a run cut
    short by a time limit keeps what it measured)."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.sweeps: dict[str, list] = {"interpolate_pair": [], "pairwise_sqdist": []}

    def save(self) -> None:
        data = {"rows": self.rows, "notes": self.notes, "sweeps": self.sweeps}
        self.path.write_text(json.dumps(data, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# run record
# ---------------------------------------------------------------------------------------------
def versions() -> dict:
    v = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pot": getattr(ot, "__version__", None),
    }
    v["numpy"] = np.__version__
    try:
        import triton

        v["triton"] = triton.__version__
    except ImportError:
        v["triton"] = None
    return v


def load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def time_cpu(fns: dict, repeats: int) -> dict:
    """Median and minimum seconds per call, the methods interleaved round by round."""
    for fn in fns.values():  # warm-up: first touch of buffers, lazy initialisation
        fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate who goes first
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {n: (statistics.median(v), min(v)) for n, v in times.items()}


def time_cuda(fn, warmup=10, rep=40) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median") * 1e-3


def naive_pair(data, noise, t_lo, t_hi):
    return (
        data + t_lo[:, None] * noise,
        data + t_hi[:, None] * noise,
        ((data - noise) ** 2).sum(1),
    )


def spec_pair(data, noise, t_lo, t_hi):
    """The reference expression (ve) as one function, for ``torch.compile``."""
    d32, n32 = data.float(), noise.float()
    diff = d32 - n32
    x_lo = (d32 + t_lo[:, None] * n32).to(data.dtype)
    x_hi = (d32 + t_hi[:, None] * n32).to(data.dtype)
    return x_lo, x_hi, (diff * diff).sum(1)


def make_pair(B, D, dtype, device, gen):
    data = torch.randn(B, D, generator=gen).to(device=device, dtype=dtype)
    noise = torch.randn(B, D, generator=gen).to(device=device, dtype=dtype)
    t_lo = (0.002 + 10 * torch.rand(B, generator=gen)).to(device)
    t_hi = t_lo + torch.rand(B, generator=gen).to(device)
    return data, noise, t_lo, t_hi


# ---------------------------------------------------------------------------------------------
# CPU
# ---------------------------------------------------------------------------------------------
def bench_cpu(args, rec: Record) -> None:
    gen = torch.Generator().manual_seed(SEED)
    rows, notes = rec.rows, rec.notes
    repeats = 7 if args.quick else 15
    pair_sizes = [(4096, 3072)] if args.quick else [(4096, 3072), (512, 3072), (128, 12288)]
    pair_sizes += [] if args.quick else [(8192, 2)]
    for B, D in pair_sizes:
        data, noise, t_lo, t_hi = make_pair(B, D, torch.float32, "cpu", gen)
        buf = torch.empty_like(data)
        outs = (torch.empty_like(data), torch.empty_like(data), torch.empty(B))
        fns = {
            "naive eager": lambda d=data, n=noise, a=t_lo, b=t_hi: naive_pair(d, n, a, b),
            "reference": lambda d=data, n=noise, a=t_lo, b=t_hi: K.interpolate_pair(
                d, n, a, b, backend="torch"
            ),
            "reference out=": lambda d=data, n=noise, a=t_lo, b=t_hi, o=outs: K.interpolate_pair(
                d, n, a, b, backend="torch", out=o
            ),
            "copy (clone)": lambda d=data: d.clone(),
            "copy (copy_ to buffer)": lambda d=data, o=buf: o.copy_(d),
        }
        res = time_cpu(fns, repeats)
        traffic = 4 * B * D * 4  # reads data, noise; writes x_lo, x_hi (float32)
        for name, (med, best) in res.items():
            bytes_moved = 2 * B * D * 4 if name.startswith("copy") else traffic
            rows.append(
                {
                    "op": "interpolate_pair",
                    "shape": f"{B}x{D}",
                    "dtype": "float32",
                    "method": name,
                    "median_ms": med * 1e3,
                    "min_ms": best * 1e3,
                    "GB/s": bytes_moved / med / 1e9,
                    "vs": med / res["reference"][0],
                }
            )
        ref, naive = res["reference"][0], res["naive eager"][0]
        clone, copy_ = res["copy (clone)"][0], res["copy (copy_ to buffer)"][0]
        ref_out = res["reference out="][0]
        notes.append(
            f"interpolate_pair {B}x{D} float32: naive eager / reference = {naive / ref:.2f}x "
            f"(goal >= 3); reference / copy (clone) = {ref / clone:.2f}x and reference / copy_ "
            f"to buffer = {ref / copy_:.2f}x (goal <= 4); reference out= / copy_ to buffer = "
            f"{ref_out / copy_:.2f}x"
        )
        rec.save()
    sq_sizes = [(2048, 3072)] if args.quick else [(512, 3072), (2048, 3072), (2048, 2)]
    for B, D in sq_sizes:
        a = torch.randn(B, D, generator=gen)
        b = torch.randn(B, D, generator=gen)
        fns = {
            "reference": lambda a=a, b=b: K.pairwise_sqdist(a, b, backend="torch"),
            "torch.cdist**2": lambda a=a, b=b: torch.cdist(a, b) ** 2,
        }
        if ot is not None:
            fns["ot.dist"] = lambda a=a, b=b: ot.dist(a, b)
        res = time_cpu(fns, max(3, repeats // 2) if B * D > 4e6 else repeats)
        flops = 2.0 * B * B * D
        for name, (med, best) in res.items():
            rows.append(
                {
                    "op": "pairwise_sqdist",
                    "shape": f"{B}x{B}x{D}",
                    "dtype": "float32",
                    "method": name,
                    "median_ms": med * 1e3,
                    "min_ms": best * 1e3,
                    "TFLOP/s": flops / med / 1e12,
                    "vs": med / res["reference"][0],
                }
            )
        ref = res["reference"][0]
        pot = f"{res['ot.dist'][0] / ref:.2f}x" if ot is not None else "not installed"
        notes.append(
            f"pairwise_sqdist {B}x{B}x{D}: torch.cdist**2 / reference = "
            f"{res['torch.cdist**2'][0] / ref:.2f}x, ot.dist / reference = {pot} "
            "(goal >= 1, not slower)"
        )
        rec.save()
    notes.append(
        "The Triton path needs CUDA: on this CPU only the reference ops were timed "
        "(the Triton kernels are tested here under TRITON_INTERPRET=1, not timed)."
    )
    rec.save()


# ---------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------
def bench_cuda(args, rec: Record) -> None:
    gen = torch.Generator().manual_seed(SEED)
    rows, notes, sweeps = rec.rows, rec.notes, rec.sweeps
    Bs = [2048, 8192] if args.quick else [128, 512, 2048, 8192]
    Ds = [3072] if args.quick else [2, 3072, 12288]
    compiled = torch.compile(spec_pair, dynamic=True)
    cases = [(B, D, torch.float32, "ve") for B in Bs for D in Ds]
    cases += [(8192, 3072, torch.bfloat16, "ve"), (8192, 3072, torch.float32, "linear")]
    for B, D, dtype, process in cases:
        cuda_pair_case(B, D, dtype, process, gen, compiled, rows, notes, sweeps)
        torch.cuda.empty_cache()
        rec.save()
    sq_Bs = [4096] if args.quick else [128, 512, 2048, 4096, 8192]
    sq_Ds = [3072] if args.quick else [2, 3072, 12288]
    for B in sq_Bs:
        for D in sq_Ds:
            cuda_sqdist_case(B, D, gen, rows, notes, sweeps)
            torch.cuda.empty_cache()
            rec.save()


def cuda_pair_case(B, D, dtype, process, gen, compiled, rows, notes, sweeps) -> None:
    from gcflows.kernels.interpolate import interpolate_pair_triton

    data, noise, t_lo, t_hi = make_pair(B, D, dtype, "cuda", gen)
    if process == "linear":
        t_lo, t_hi = t_lo / 20, t_hi / 20
    es = data.element_size()
    traffic = 4 * B * D * es + 3 * B * 4
    src = torch.empty(2 * B * D, dtype=dtype, device="cuda")
    dst = torch.empty_like(src)
    copy_s = time_cuda(lambda: dst.copy_(src))
    copy_bw = 2 * src.numel() * es / copy_s  # bytes read + written per second
    fns = {
        "triton": lambda: K.interpolate_pair(data, noise, t_lo, t_hi, process),
        "triton validate=False": lambda: K.interpolate_pair(
            data, noise, t_lo, t_hi, process, validate=False
        ),
        "reference (torch)": lambda: K.interpolate_pair(
            data, noise, t_lo, t_hi, process, backend="torch"
        ),
    }
    if process == "ve":
        fns["naive eager"] = lambda: naive_pair(data, noise, t_lo, t_hi)
        fns["torch.compile(reference expr)"] = lambda: compiled(data, noise, t_lo, t_hi)
    res = {}
    for name, fn in fns.items():
        try:
            res[name] = time_cuda(fn)
        except Exception as err:  # torch.compile needs a working inductor toolchain
            if not name.startswith("torch.compile"):
                raise
            notes.append(f"{name} failed at {B}x{D}: {repr(err)[:300]}")
    base = res.get("naive eager", res["reference (torch)"])
    label = str(dtype).replace("torch.", "") + ("" if process == "ve" else " lin")
    copy_bytes = 2 * src.numel() * es
    for name, sec in list(res.items()) + [("copy_ (same traffic)", copy_s)]:
        moved = copy_bytes if name.startswith("copy_") else traffic
        rows.append(
            {
                "op": "interpolate_pair",
                "shape": f"{B}x{D}",
                "dtype": label,
                "method": name,
                "median_ms": sec * 1e3,
                "GB/s": moved / sec / 1e9,
                "copy_frac": moved / sec / copy_bw,
                "vs": base / sec,
            }
        )
    if B * D >= 1e7 and process == "ve" and dtype == torch.float32:
        frac = traffic / res["triton validate=False"] / copy_bw
        frac_v = traffic / res["triton"] / copy_bw
        notes.append(
            f"interpolate_pair {B}x{D} fp32: {frac:.0%} of copy bandwidth without the time "
            f"check, {frac_v:.0%} with it (goal >= 80%); "
            f"{res['naive eager'] / res['triton']:.2f}x eager (goal >= 2)"
        )
        for cfg in [(1, 1024, 4), (2, 1024, 8), (4, 1024, 8), (1, 2048, 8), (8, 512, 8)]:
            sec = time_cuda(
                lambda c=cfg: interpolate_pair_triton(
                    data, noise, t_lo, t_hi, validate=False, config=c
                )
            )
            sweeps["interpolate_pair"].append(
                {"shape": f"{B}x{D}", "config": cfg, "ms": sec * 1e3, "GB/s": traffic / sec / 1e9}
            )


SQDIST_SWEEP = {
    "ieee": [
        (64, 64, 32, 8, 4, 3),
        (128, 64, 32, 8, 4, 3),
        (64, 128, 32, 8, 4, 4),
        (128, 128, 32, 8, 8, 3),
        (64, 64, 64, 8, 4, 2),
    ],
    "tf32": [
        (128, 128, 32, 8, 8, 3),
        (128, 256, 32, 8, 8, 3),
        (128, 128, 64, 8, 8, 3),
        (256, 128, 32, 8, 8, 3),
    ],
}


def cuda_sqdist_case(B, D, gen, rows, notes, sweeps) -> None:
    from gcflows.kernels.sqdist import pairwise_sqdist_triton

    a = torch.randn(B, D, generator=gen).to("cuda")
    b = torch.randn(B, D, generator=gen).to("cuda")
    fns = {
        "triton ieee": lambda: K.pairwise_sqdist(a, b, "ieee"),
        "triton tf32x3": lambda: K.pairwise_sqdist(a, b, "tf32x3"),
        "triton tf32": lambda: K.pairwise_sqdist(a, b, "tf32"),
        "reference (torch)": lambda: K.pairwise_sqdist(a, b, backend="torch"),
        "torch.cdist**2": lambda: torch.cdist(a, b) ** 2,
    }
    if ot is not None:
        fns["ot.dist"] = lambda: ot.dist(a, b)
    res = {name: time_cuda(fn) for name, fn in fns.items()}
    flops = 2.0 * B * B * D
    for name, sec in res.items():
        rows.append(
            {
                "op": "pairwise_sqdist",
                "shape": f"{B}x{B}x{D}",
                "dtype": "float32",
                "method": name,
                "median_ms": sec * 1e3,
                "TFLOP/s": flops / sec / 1e12,
                "vs": res["torch.cdist**2"] / sec,
            }
        )
    if (B, D) != (4096, 3072):
        return
    ieee = res["triton ieee"]
    pot = f"{res['ot.dist'] / ieee:.2f}x ot.dist" if ot is not None else "POT not installed"
    notes.append(
        f"pairwise_sqdist 4096x4096x3072 ieee: {res['torch.cdist**2'] / ieee:.2f}x "
        f"torch.cdist**2 (goal >= 1.2), {pot}"
    )
    for prec, cfgs in SQDIST_SWEEP.items():
        for cfg in cfgs:
            try:
                sec = time_cuda(lambda c=cfg, p=prec: pairwise_sqdist_triton(a, b, p, config=c))
            except Exception as err:  # a config can exceed shared memory: record, go on
                entry = {"precision": prec, "config": cfg, "error": repr(err)[:200]}
            else:
                entry = {"precision": prec, "config": cfg, "ms": sec * 1e3}
                entry["TFLOP/s"] = flops / sec / 1e12
            sweeps["pairwise_sqdist"].append(entry)


# ---------------------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    head = (
        f"{'op':<17}{'shape':<17}{'dtype':<13}{'method':<31}{'median ms':>11}{'rate':>15}{'x':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if "GB/s" in r:
            rate = f"{r['GB/s']:.1f} GB/s"
            if "copy_frac" in r:
                rate = f"{r['GB/s']:.0f} GB/s {r['copy_frac']:.0%}"
        else:
            rate = f"{r['TFLOP/s']:.3f} TFLOP/s"
        lines.append(
            f"{r['op']:<17}{r['shape']:<17}{r['dtype']:<13}{r['method']:<31}"
            f"{r['median_ms']:>11.3f}{rate:>15}{r['vs']:>8.2f}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    parser.add_argument("--out", default="runs/bench_kernels", help="output folder")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)"
    )
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not (torch.cuda.is_available() and K.triton_available()):
        print("--device cuda needs a CUDA device and triton", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seed": SEED,
        "git": git_sha(),
        "versions": versions(),
        "device": torch.cuda.get_device_name() if device == "cuda" else cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "quick": args.quick,
        "load_before": load(),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    rec = Record(out / "results.json")
    if device == "cuda":
        bench_cuda(args, rec)
    else:
        bench_cpu(args, rec)
    rows, notes, sweeps = rec.rows, rec.notes, rec.sweeps
    config["load_after"] = load()
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(
        f"device: {config['device']}; torch threads {config['torch_threads']}; "
        f"load average before {config['load_before']} after {config['load_after']}"
    )
    print(f"wrote {out / 'config.json'} and {out / 'results.json'}")
    for s in sweeps.get("interpolate_pair", []) + sweeps.get("pairwise_sqdist", []):
        print("sweep", s)
    for n in notes:
        print(n)
    if device == "cuda":
        print(
            "'x' = baseline time / method time (naive eager for interpolate_pair, "
            "torch.cdist**2 for pairwise_sqdist): above 1, the method is faster"
        )
    else:
        print("'x' = method time / reference time: above 1, the reference is faster")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
