"""Benchmark of the kernel ops (docs/design.md, "The kernels"; docs/performance.md).

On CUDA (the Triton path), ``triton.testing.do_bench`` medians, every method on the same device in
the same run:

- ``interpolate_pair`` (float32, ``ve``; plus bfloat16 and ``linear`` at the largest size): the
  Triton kernel through the public op (``validate=True``, one host sync for the value checks, and
  ``validate=False``), the naive eager expression, the torch backend (``backend="torch"``) and
  ``torch.compile`` of the specification (``reference.interpolate_pair``); effective GB/s (2 reads
  + 2 writes of ``B x D`` elements) and its fraction of the measured device-to-device copy
  bandwidth of the same traffic (``copy_`` of a ``2 x B x D`` buffer); B 128 / 512 / 2048 / 8192,
  D 2 / 3072 / 12288.
- ``pairwise_sqdist`` (float32): the Triton kernel with ``ieee`` / ``tf32`` / ``tf32x3``, the
  torch backend, ``torch.cdist(a, b) ** 2`` and ``ot.dist`` in TFLOP/s (``2 B^2 D``); B 128 / 512
  / 2048 / 4096 / 8192, D 2 / 3072 / 12288.
- a short sweep of launch configurations at two sizes, for retuning ``launch_config``.

On CPU (no Triton: it needs CUDA), medians of interleaved repeats (a busy machine slows every
method alike) of the torch backend's ``interpolate_pair`` (``kernels/cpu.py``) against the naive
eager expression ``(data + t_lo[:, None] * noise, data + t_hi[:, None] * noise, ((data - noise)
** 2).sum(1))`` and against a same-size memory copy, both ``data.clone()`` (fresh output, as the
op allocates) and ``copy_`` into a buffer already in memory (the bandwidth floor), with and
without ``out=``; and of the torch backend's ``pairwise_sqdist`` against ``torch.cdist(a, b) **
2`` and ``ot.dist``.

``--contended`` (CPU): the same table while one competing CPU-bound process runs (a pure-Python
busy loop, started before the timings and killed after them; it stops by itself after
``--contended-seconds`` in any case). It measures how the op holds up when another process takes
a core.

Writes ``config.json`` (seed, git SHA, versions, device, command, load average) and
``results.json`` to ``--out`` and prints the ratios and, last, the table.

    python experiments/bench_kernels.py                # full grid
    python experiments/bench_kernels.py --quick        # B = 4096, D = 3072 and one cost matrix
    python experiments/bench_kernels.py --quick --contended
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import gcflows.kernels as K
from gcflows.records import check_writable, cpu_model, git_sha

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
    repeats = args.repeats or (7 if args.quick else 15)
    pair_sizes = [(4096, 3072)] if args.quick else [(4096, 3072), (512, 3072), (128, 12288)]
    pair_sizes += [] if args.quick else [(8192, 2)]
    for B, D in pair_sizes:
        cpu_pair_case(B, D, gen, repeats, rec)
        rec.save()
    sq_sizes = [(2048, 3072)] if args.quick else [(512, 3072), (2048, 3072), (2048, 2)]
    for B, D in sq_sizes:
        cpu_sqdist_case(B, D, gen, max(3, repeats // 2) if B * D > 4e6 else repeats, rec)
        rec.save()
    rec.notes.append(
        "The Triton path needs CUDA: on this CPU only the torch backend was timed "
        "(the Triton kernels are tested here under TRITON_INTERPRET=1, not timed)."
    )
    rec.save()


def cpu_pair_case(B: int, D: int, gen, repeats: int, rec: Record) -> None:
    data, noise, t_lo, t_hi = make_pair(B, D, torch.float32, "cpu", gen)
    buf = torch.empty_like(data)
    outs = (torch.empty_like(data), torch.empty_like(data), torch.empty(B))
    fns = {
        "naive eager": lambda: naive_pair(data, noise, t_lo, t_hi),
        "torch backend": lambda: K.interpolate_pair(data, noise, t_lo, t_hi, backend="torch"),
        "torch backend out=": lambda: K.interpolate_pair(
            data, noise, t_lo, t_hi, backend="torch", out=outs
        ),
        "copy (clone)": lambda: data.clone(),
        "copy (copy_ to buffer)": lambda: buf.copy_(data),
    }
    res = time_cpu(fns, repeats)
    traffic = 4 * B * D * 4  # reads data, noise; writes x_lo, x_hi (float32)
    for name, (med, best) in res.items():
        moved = 2 * B * D * 4 if name.startswith("copy") else traffic
        rec.rows.append(
            {
                "op": "interpolate_pair",
                "shape": f"{B}x{D}",
                "dtype": "float32",
                "method": name,
                "median_ms": med * 1e3,
                "min_ms": best * 1e3,
                "GB/s": moved / med / 1e9,
                "vs": med / res["torch backend"][0],
            }
        )
    ref, naive = res["torch backend"][0], res["naive eager"][0]
    clone, copy_ = res["copy (clone)"][0], res["copy (copy_ to buffer)"][0]
    ref_out = res["torch backend out="][0]
    rec.notes.append(
        f"interpolate_pair {B}x{D} float32: naive eager / torch backend = {naive / ref:.2f}x "
        f"(goal >= 2); torch backend / copy (clone) = {ref / clone:.2f}x and torch backend / "
        f"copy_ to buffer = {ref / copy_:.2f}x (goal <= 4 on a quiet machine); torch backend "
        f"out= / copy_ to buffer = {ref_out / copy_:.2f}x"
    )


def cpu_sqdist_case(B: int, D: int, gen, repeats: int, rec: Record) -> None:
    a = torch.randn(B, D, generator=gen)
    b = torch.randn(B, D, generator=gen)
    fns = {
        "torch backend": lambda: K.pairwise_sqdist(a, b, backend="torch"),
        "torch.cdist**2": lambda: torch.cdist(a, b) ** 2,
    }
    if ot is not None:
        fns["ot.dist"] = lambda: ot.dist(a, b)
    res = time_cpu(fns, repeats)
    flops = 2.0 * B * B * D
    for name, (med, best) in res.items():
        rec.rows.append(
            {
                "op": "pairwise_sqdist",
                "shape": f"{B}x{B}x{D}",
                "dtype": "float32",
                "method": name,
                "median_ms": med * 1e3,
                "min_ms": best * 1e3,
                "TFLOP/s": flops / med / 1e12,
                "vs": med / res["torch backend"][0],
            }
        )
    ref = res["torch backend"][0]
    pot = f"{res['ot.dist'][0] / ref:.2f}x" if ot is not None else "not installed"
    rec.notes.append(
        f"pairwise_sqdist {B}x{B}x{D}: torch.cdist**2 / torch backend = "
        f"{res['torch.cdist**2'][0] / ref:.2f}x, ot.dist / torch backend = {pot} "
        "(goal >= 1, not slower)"
    )


# A bounded CPU-bound loop: one core's worth of pure-Python work that ends by itself.
_BUSY = (
    "import sys, time\nend = time.time() + float(sys.argv[1])\nwhile time.time() < end:\n    pass\n"
)


class Competitor:
    """Context manager: one competing CPU-bound process for the duration of the block."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Competitor:
        self.proc = subprocess.Popen([sys.executable, "-c", _BUSY, str(self.seconds)])
        time.sleep(0.5)  # let it start spinning
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()

    @property
    def ran_throughout(self) -> bool:
        return self.proc is not None and self.proc.returncode not in (0, None)


# ---------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------
def bench_cuda(args, rec: Record) -> None:
    gen = torch.Generator().manual_seed(SEED)
    rows, notes, sweeps = rec.rows, rec.notes, rec.sweeps
    Bs = [2048, 8192] if args.quick else [128, 512, 2048, 8192]
    Ds = [3072] if args.quick else [2, 3072, 12288]
    compiled = torch.compile(K.reference.interpolate_pair, dynamic=True)
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
        "torch backend": lambda: K.interpolate_pair(
            data, noise, t_lo, t_hi, process, backend="torch"
        ),
    }
    if process == "ve":
        fns["naive eager"] = lambda: naive_pair(data, noise, t_lo, t_hi)
        fns["torch.compile(spec)"] = lambda: compiled(data, noise, t_lo, t_hi)
    res = {}
    for name, fn in fns.items():
        try:
            res[name] = time_cuda(fn)
        except Exception as err:  # torch.compile needs a working inductor toolchain
            if not name.startswith("torch.compile"):
                raise
            notes.append(f"{name} failed at {B}x{D}: {repr(err)[:300]}")
    base = res.get("naive eager", res["torch backend"])
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
                lambda c=cfg: interpolate_pair_triton(data, noise, t_lo, t_hi, config=c)
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
        "torch backend": lambda: K.pairwise_sqdist(a, b, backend="torch"),
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
    parser.add_argument(
        "--repeats", type=int, default=0, help="CPU repeats per method (default 15, --quick 7)"
    )
    parser.add_argument(
        "--contended",
        action="store_true",
        help="CPU: time everything while one competing CPU-bound process runs",
    )
    parser.add_argument(
        "--contended-seconds",
        type=float,
        default=1800.0,
        help="upper bound on the competitor's life (it is killed when the timings end)",
    )
    args = parser.parse_args(argv)
    if args.threads < 0 or args.repeats < 0 or not args.contended_seconds > 0:
        parser.error(
            "--threads and --repeats must be >= 0 (0: the default) and --contended-seconds > 0, "
            f"got {args.threads}, {args.repeats}, {args.contended_seconds}"
        )
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not (torch.cuda.is_available() and K.triton_available()):
        parser.error("--device cuda needs a CUDA device and triton; use --device cpu")
    if device == "cuda" and args.contended:
        parser.error("--contended applies to the CPU benchmark; add --device cpu")
    try:
        check_writable(args.out)
    except ValueError as err:
        parser.error(str(err))
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
        "contended": args.contended,
        "load_before": load(),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    rec = Record(out / "results.json")
    if device == "cuda":
        bench_cuda(args, rec)
    elif args.contended:
        with Competitor(args.contended_seconds) as competitor:
            config["competitor_pid"] = competitor.proc.pid
            config["load_contended"] = load()
            bench_cpu(args, rec)
        config["competitor_ran_throughout"] = competitor.ran_throughout
        rec.notes.append(
            "contended: one competing CPU-bound process ran "
            + ("throughout the timings" if competitor.ran_throughout else "but ended early")
        )
        rec.save()
    else:
        bench_cpu(args, rec)
    config["load_after"] = load()
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    report(config, rec, device, out)
    return 0


def report(config: dict, rec: Record, device: str, out: Path) -> None:
    print(
        f"device: {config['device']}; torch threads {config['torch_threads']}; "
        f"load average before {config['load_before']} after {config['load_after']}"
    )
    print(f"wrote {out / 'config.json'} and {out / 'results.json'}")
    for s in rec.sweeps.get("interpolate_pair", []) + rec.sweeps.get("pairwise_sqdist", []):
        print("sweep", s)
    for n in rec.notes:
        print(n)
    if device == "cuda":
        print(
            "'x' = baseline time / method time (naive eager for interpolate_pair, "
            "torch.cdist**2 for pairwise_sqdist): above 1, the method is faster"
        )
    else:
        print("'x' = method time / torch backend time: above 1, the torch backend is faster")
    print(table(rec.rows))


if __name__ == "__main__":
    sys.exit(main())
