"""Training-step throughput: the library's CT / batch-OT / GC steps against a bare PyTorch CT loop.

Two workloads:
- ``toy``: ToyMLP (width 256) on 2D two_gaussians_1to2, batch 256;
- ``digits``: the ``digits`` U-Net preset on the 8x8 scikit-learn digits, batch 64.

For each workload, in the same process and interleaved repeat by repeat (so that load from other
processes hits every variant alike):
- ``bare``: a hand-written CT step (data draw, noise, iCT curriculum / lognormal indices / weights,
  the EDM parametrization written inline, two forward passes with a shared dropout stream,
  pseudo-Huber, Adam, EMA by ``torch._foreach_lerp_``): what one writes without the library;
- ``ct``, ``ot``, ``gc``: ``gcflows.training.train`` with the same model, optimizer and batch,
  writing its run folder (metrics every 100 steps, checkpoint at the end, outside the timing).

Steps per second are measured after ``--warmup`` steps (callback timestamps for the library) by
two clocks: wall time and process CPU time. On a CPU the goals are judged on CPU time, which other
processes sharing the machine do not inflate (run with ``--threads 1`` there); on a GPU on wall
time. Rates are medians over ``--repeats``; ratios are medians of the per-repeat step-time ratios
(the variants of one repeat run back to back, in a rotating order). Goals: library CT within
1.15x of the bare step time; GC at most 1.3x the CT step time. Prints a table last; ``--out``
receives the JSON record.

Third workload, ``ensemble``: seed-steps per second of ``gcflows.ensemble.train_ensemble`` (S
seeds in one step) against ``train_sequential`` (seed after seed, the library objective) for the
high-dimensional study's MLP targets (``random_64``, ``digits_mixture``, ``random_256``; ToyMLP
depth 2, batch 256, ``--ens-method``) at widths ``--ens-widths`` and S in ``--ens-seeds``. Per
repeat the sequential run (``--ens-seq-seeds`` seeds) and the ensembles run back to back in a
rotating order; steps 2 to ``--ens-steps`` of each run are timed (callback timestamps: model
set-up, optimizer state and first-step costs stay out on both sides); rates are medians over
repeats, ratios medians of the per-repeat ratios. Goal: ensemble >= 4x
the sequential seed-steps per second, judged on wall time (the ensemble may use both cores,
where the small per-seed operations of the sequential run cannot), with the process-CPU-time
ratio beside it (the work ratio, which load from other processes disturbs less). Each row also
gives the matrix-product FLOPs of a seed-step (counted) and their CPU time at the measured
``torch.bmm`` rate: the floor that bounds any batching (at width 256 the sequential step is close
to it). The load average is recorded before and after.

    python experiments/bench_training.py --threads 1 --out runs/bench_training.json
    python experiments/bench_training.py --workloads ensemble --threads 2
    python experiments/bench_training.py --quick        # every workload, small, < 60 s
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from gcflows.consistency import ConsistencyModel
from gcflows.data import load_digits
from gcflows.ensemble import EnsembleSpec, train_ensemble, train_sequential
from gcflows.gmm import get_preset, two_gaussians_1to2
from gcflows.networks import ToyMLP, build_unet
from gcflows.processes import VEProcess, karras_grid
from gcflows.records import check_output_file, given_options
from gcflows.training import TrainConfig, train

SIGMA_DATA = 0.5
VARIANTS = ("bare", "ct", "ot", "gc")
WORKLOADS = ("toy", "digits", "ensemble")
# the MLP trainings of experiments/highdim_study.py (docs/highdim.md): ToyMLP depth 2, batch 256
ENSEMBLE_TARGETS = ("random_64", "digits_mixture", "random_256")
ENSEMBLE_DEPTH, ENSEMBLE_BATCH = 2, 256
ENSEMBLE_GOAL = 4.0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ------------------------------------------------------------------------------------------------
# the bare loop: everything written out, no gcflows objective / trainer
# ------------------------------------------------------------------------------------------------
def bare_ct_times(model: ConsistencyModel, sample, cfg: TrainConfig, steps: int, device) -> list:
    """Run ``steps`` bare CT steps; return the wall-clock time after each one."""
    backbone = model.backbone
    t_min, t_max = cfg.t_min, cfg.t_max
    params = list(backbone.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr)
    ema = [p.detach().clone() for p in params]
    g_data = torch.Generator().manual_seed(1)
    g_noise = torch.Generator(device=device).manual_seed(2)
    k_prime = max(1, math.floor(cfg.total_steps / (math.log2(cfg.s1 // cfg.s0) + 1)))
    cache: dict[int, tuple] = {}
    sd = SIGMA_DATA
    huber_c = None

    def f(x, t):
        shape = (-1,) + (1,) * (x.dim() - 1)
        c_skip = sd**2 / ((t - t_min) ** 2 + sd**2)
        c_out = sd * (t - t_min) / torch.sqrt(sd**2 + t**2)
        c_in = 1 / torch.sqrt(sd**2 + t**2)
        out = backbone(x * c_in.reshape(shape), torch.log(t) / 4)
        return c_skip.reshape(shape) * x + c_out.reshape(shape) * out

    times = []
    for k in range(steps):
        n = min(cfg.s0 * 2 ** (k // k_prime), cfg.s1)
        if n not in cache:
            grid = karras_grid(n, t_min, t_max, cfg.rho)
            cdf = torch.erf((torch.log(grid) - cfg.p_mean) / (math.sqrt(2) * cfg.p_std))
            probs = cdf[1:] - cdf[:-1]
            cache[n] = (
                grid.to(device, torch.float32),
                (probs / probs.sum()).to(device),
                (1 / (grid[1:] - grid[:-1])).to(device, torch.float32),
            )
        grid, probs, weights = cache[n]
        data = sample(cfg.batch_size, g_data).to(device)
        noise = torch.randn(data.shape, generator=g_noise, device=device)
        idx = torch.multinomial(probs, cfg.batch_size, replacement=True, generator=g_noise)
        t_lo, t_hi, lam = grid[idx], grid[idx + 1], weights[idx]
        shape = (-1,) + (1,) * (data.dim() - 1)
        x_lo = data + t_lo.reshape(shape) * noise
        x_hi = data + t_hi.reshape(shape) * noise
        rng = torch.get_rng_state()  # shared dropout masks between the two passes
        f_hi = f(x_hi, t_hi)
        torch.set_rng_state(rng)
        with torch.no_grad():
            f_lo = f(x_lo, t_lo)
        diff = (f_hi - f_lo).reshape(data.shape[0], -1)
        if huber_c is None:
            huber_c = 0.00054 * math.sqrt(diff.shape[1])
        dist = torch.sqrt((diff * diff).sum(1) + huber_c**2) - huber_c
        loss = (lam * dist).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        torch._foreach_lerp_(ema, params, 1 - cfg.ema_decay)
        if (k + 1) % 100 == 0:
            float(loss.detach())  # what a loop that logs reads back
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter(), time.process_time()))
    return times


def library_times(model, source, cfg: TrainConfig, device) -> list:
    times = []

    def stamp(info):
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter(), time.process_time()))

    with tempfile.TemporaryDirectory() as tmp:
        train(cfg.replace(out_dir=str(Path(tmp) / "run")), model, source, callbacks=[stamp])
    return times


def rate(times: list, warmup: int, clock: int) -> float:
    """Steps per second after ``warmup`` steps by wall clock (0) or process CPU time (1)."""
    return (len(times) - warmup) / (times[-1][clock] - times[warmup - 1][clock])


# ------------------------------------------------------------------------------------------------
def workload(name: str):
    """(model, sampler fn(n, generator), batch size, description) of a workload."""
    process = VEProcess()
    if name == "toy":
        gmm = two_gaussians_1to2(dtype=torch.float32)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = ConsistencyModel(ToyMLP(2, hidden=256), process)
        return model, gmm.sample, 256, {"model": "ToyMLP(2, hidden=256)", "data": "2D"}
    images, _ = load_digits("train")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ConsistencyModel(build_unet("digits"), process)

    def sample(n, g):
        return images[torch.randint(images.shape[0], (n,), generator=g)]

    info = {"model": "UNet preset 'digits'", "data": "digits 1x8x8"}
    return model, sample, 64, info


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="small smoke run of every workload (< 60 s; numbers indicative only)",
    )
    ap.add_argument("--toy-steps", type=int, default=150, help="measured steps per repeat (toy)")
    ap.add_argument("--digits-steps", type=int, default=30, help="measured steps (digits)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--clock",
        choices=["auto", "cpu", "wall"],
        default="auto",
        help="time base of the goals: process CPU time (auto on CPU) or wall clock (auto on GPU)",
    )
    ap.add_argument("--ens-targets", nargs="+", default=list(ENSEMBLE_TARGETS))
    ap.add_argument("--ens-widths", nargs="+", type=int, default=[64, 128, 256])
    ap.add_argument("--ens-seeds", nargs="+", type=int, default=[4, 8, 10], help="values of S")
    ap.add_argument(
        "--ens-steps", type=int, default=20, help="training steps per call (steps 2.. timed)"
    )
    ap.add_argument("--ens-seq-seeds", type=int, default=2, help="seeds of the sequential run")
    ap.add_argument("--ens-method", default="ct", choices=["ct", "cd", "ot", "gc"])
    ap.add_argument(
        "--ens-prefetch",
        choices=["on", "off"],
        default="on",
        help="the ensemble draws the next step's random numbers in a background thread",
    )
    ap.add_argument("--out", default="runs/bench_training.json")
    return ap


QUICK = dict(
    toy_steps=20,
    digits_steps=4,
    warmup=2,
    repeats=1,
    ens_targets=["random_64", "digits_mixture"],
    ens_widths=[64, 256],
    ens_seeds=[4, 10],
    ens_steps=4,
    ens_seq_seeds=1,
)


def check_args(args: argparse.Namespace) -> None:
    """Every argument, before any work (``ValueError`` with one message)."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        raise ValueError(f"--device={args.device!r} is invalid: use cpu, cuda or cuda:N")
    for flag, lo in (
        ("toy_steps", 2),
        ("digits_steps", 2),
        ("warmup", 1),
        ("repeats", 1),
        ("ens_steps", 2),
        ("ens_seq_seeds", 1),
    ):
        if getattr(args, flag) < lo:
            raise ValueError(
                f"--{flag.replace('_', '-')} must be >= {lo}, got {getattr(args, flag)}"
            )
    for flag in ("ens_widths", "ens_seeds"):
        if any(v < 1 for v in getattr(args, flag)):
            raise ValueError(f"--{flag.replace('_', '-')} must be integers >= 1")
    unknown = sorted(set(args.ens_targets) - set(ENSEMBLE_TARGETS))
    if unknown:
        raise ValueError(f"--ens-targets {unknown}: use some of {list(ENSEMBLE_TARGETS)}")
    if "ensemble" in args.workloads and args.device != "cpu":
        raise ValueError("the ensemble workload runs on the CPU; use --device cpu")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0 (0: torch default), got {args.threads}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available; use --device cpu")
    check_output_file(args.out)


def measure(wl: str, args: argparse.Namespace, device: torch.device, clock: str) -> dict:
    """Rates and paired step-time ratios of every variant on workload ``wl``."""
    measured = args.toy_steps if wl == "toy" else args.digits_steps
    steps = args.warmup + measured
    template, sample, batch, info = workload(wl)
    template.to(device)
    cfg = TrainConfig(
        batch_size=batch,
        total_steps=steps,
        lr=1e-4,
        optimizer="adam",
        ema_decay=0.999,
        distance="pseudo_huber",
        log_every=100,
        checkpoint_every=0,
        progress=False,
        device=str(device),
    )
    clocks = {"wall": 0, "cpu": 1}
    rates = {c: {v: [] for v in VARIANTS} for c in clocks}
    for rep in range(args.repeats):
        order = VARIANTS[rep % 4 :] + VARIANTS[: rep % 4]  # rotate who runs first
        for v in order:
            model = copy.deepcopy(template)
            if v == "bare":
                times = bare_ct_times(model, sample, cfg, steps, device)
            else:
                times = library_times(model, sample, cfg.replace(method=v), device)
            for c, idx in clocks.items():
                rates[c][v].append(rate(times, args.warmup, idx))
    res = {**info, "batch": batch, "clock": clock}
    for c in clocks:
        r = rates[c]
        med = {v: statistics.median(r[v]) for v in VARIANTS}
        # step-time ratios per repeat (the variants of one repeat ran back to back), median
        paired = {
            f"{a}/{b}": statistics.median(x / y for x, y in zip(r[b], r[a], strict=True))
            for a, b in (("ct", "bare"), ("gc", "ct"), ("ot", "ct"))
        }
        res[c] = {
            "steps_per_s_median": med,
            "steps_per_s_all": r,
            "ms_per_step": {v: 1000.0 / med[v] for v in VARIANTS},
            "ratios": paired,
        }
    main_ratios = res[clock]["ratios"]
    res["goal_ct_within_1.15x_bare"] = main_ratios["ct/bare"] <= 1.15
    res["goal_gc_within_1.3x_ct"] = main_ratios["gc/ct"] <= 1.3
    return res


# ------------------------------------------------------------------------------------------------
# seed ensemble against sequential training
# ------------------------------------------------------------------------------------------------
def _step_clock(train, seeds: list[int], steps: int) -> tuple[float, float]:
    """(wall, process CPU) seconds of steps 2..``steps`` of ``train(seeds, callback=,
    callback_steps=)``, summed over its calls: model set-up, optimizer state and the first
    step's one-off costs stay outside, on both sides alike."""
    stamps: list[tuple[float, float]] = []

    def stamp(step, _):
        stamps.append((time.perf_counter(), time.process_time()))

    train(seeds, callback=stamp, callback_steps=[1, steps])
    pairs = list(zip(stamps[::2], stamps[1::2], strict=True))
    return sum(b[0] - a[0] for a, b in pairs), sum(b[1] - a[1] for a, b in pairs)


def matmul_floor(target, spec: EnsembleSpec, seeds: int) -> tuple[float, float]:
    """``(matmul FLOPs per seed-step, matmul FLOPs per CPU second)``.

    The FLOPs are counted (``FlopCounterMode``: the matrix products of the forward and backward
    passes) in one sequential step; the rate is that of ``torch.bmm`` on the ensemble's largest
    hidden-layer product, ``(S, B, width) @ (S, width, width)``, in process CPU time. Their
    quotient is a lower bound on the CPU time of a seed-step, batched or not."""
    one = EnsembleSpec(**{**spec.as_dict(), "steps": 1})
    with FlopCounterMode(display=False) as counter:
        train_sequential(target, one, 0)
    flops = counter.get_total_flops()
    a = torch.randn(seeds, spec.batch, spec.hidden)
    b = torch.randn(seeds, spec.hidden, spec.hidden)
    torch.bmm(a, b)
    n, start = 0, time.process_time()
    while time.process_time() - start < 0.3:
        torch.bmm(a, b)
        n += 1
    rate = n * 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2] / (time.process_time() - start)
    return float(flops), rate


def measure_ensemble(target_name: str, width: int, args: argparse.Namespace) -> list[dict]:
    """One row per S: seed-steps per second of the ensemble and of sequential training, and the
    matmul floor of a seed-step (:func:`matmul_floor`)."""
    target = get_preset(target_name)
    spec = EnsembleSpec(
        method=args.ens_method,
        hidden=width,
        depth=ENSEMBLE_DEPTH,
        batch=ENSEMBLE_BATCH,
        steps=args.ens_steps,
    )
    prefetch = args.ens_prefetch == "on"

    def sequential(seeds, **kw) -> None:
        for s in seeds:
            train_sequential(target, spec, s, **kw)

    def ensemble(seeds, **kw) -> None:
        train_ensemble(target, spec, seeds, prefetch=prefetch, **kw)

    runs = {"seq": (sequential, list(range(args.ens_seq_seeds)))}
    for n in args.ens_seeds:
        runs[n] = (ensemble, list(range(n)))
    names = list(runs)
    measured = args.ens_steps - 1
    rates = {c: {k: [] for k in names} for c in ("wall", "cpu")}
    for rep in range(args.repeats):
        for k in names[rep % len(names) :] + names[: rep % len(names)]:
            train, seeds = runs[k]
            wall, cpu = _step_clock(train, seeds, args.ens_steps)
            rates["wall"][k].append(len(seeds) * measured / wall)
            rates["cpu"][k].append(len(seeds) * measured / cpu)
    flops, rate = matmul_floor(target, spec, max(args.ens_seeds))
    floor_ms = 1000.0 * flops / rate
    rows = []
    for n in args.ens_seeds:
        row = dict(target=target_name, dim=target.dim, width=width, seeds=n)
        row.update(mflop_per_seed_step=flops / 1e6, matmul_gflop_per_cpu_s=rate / 1e9)
        row["matmul_floor_ms"] = floor_ms
        for c in ("wall", "cpu"):
            r = rates[c]
            row[f"sequential_{c}"] = statistics.median(r["seq"])
            row[f"ensemble_{c}"] = statistics.median(r[n])
            row[f"ratio_{c}"] = statistics.median(
                e / q for e, q in zip(r[n], r["seq"], strict=True)
            )
        # the best CPU-time ratio any batching could reach if only the matmuls remained
        row["cpu_ratio_ceiling"] = (1000.0 / row["sequential_cpu"]) / floor_ms
        row["goal_met"] = row["ratio_wall"] >= ENSEMBLE_GOAL
        rows.append(row)
    return rows


def print_ensemble(rows: list[dict], info: dict) -> None:
    print(
        f"\nseed ensemble vs sequential ({info['method']}, ToyMLP depth {ENSEMBLE_DEPTH}, batch "
        f"{ENSEMBLE_BATCH}, {info['steps']} steps per call, median of {info['repeats']} "
        f"repeats, prefetch {info['prefetch']}; load average {info['load_before']} before, "
        f"{info['load_after']} after)"
    )
    print(
        "| target | width | S | sequential seed-steps/s | ensemble seed-steps/s | ratio (wall) "
        "| ratio (CPU time) | MFLOP / seed-step | matmul floor ms (CPU) | CPU ratio ceiling "
        "| goal >= 4x (wall) |"
    )
    print("| --- " * 11 + "|")
    for r in rows:
        print(
            f"| {r['target']} | {r['width']} | {r['seeds']} | {r['sequential_wall']:.0f} | "
            f"{r['ensemble_wall']:.0f} | {r['ratio_wall']:.2f} | {r['ratio_cpu']:.2f} | "
            f"{r['mflop_per_seed_step']:.0f} | {r['matmul_floor_ms']:.2f} | "
            f"{r['cpu_ratio_ceiling']:.1f} | {'met' if r['goal_met'] else 'not met'} |"
        )
    print(
        "(seed-steps/s by wall time; the CPU ratio ceiling is the sequential CPU time per "
        "seed-step over the matmul floor: no batching of the seeds' arithmetic can do better)"
    )


def print_summary(record: dict, clock: str, repeats: int, out: Path) -> None:
    m = record["machine"]
    print(f"\n{m['cpu']} ({m['device']}, {m['torch_threads']} torch threads), {record['date']}")
    print(f"median of {repeats} repeats; JSON: {out}")
    steps = {wl: r for wl, r in record["results"].items() if wl != "ensemble"}
    if steps:
        print(f"training step, {clock} time:")
        print("| workload | batch | bare | CT | OT | GC | CT / bare | GC / CT | OT / CT |")
        print("| --- " * 9 + "|")
    for wl, r in steps.items():
        s = r[clock]["steps_per_s_median"]
        q = r[clock]["ratios"]
        print(
            f"| {wl} | {r['batch']} | {s['bare']:.1f} | {s['ct']:.1f} | {s['ot']:.1f} | "
            f"{s['gc']:.1f} | {q['ct/bare']:.3f} | {q['gc/ct']:.3f} | {q['ot/ct']:.3f} |"
        )
    if steps:
        print("(steps/s; ratios are step-time ratios; goals: CT / bare <= 1.15, GC / CT <= 1.3)")
    if "ensemble" in record["results"]:
        print_ensemble(record["results"]["ensemble"]["rows"], record["results"]["ensemble"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line (one ``error:`` line and exit 2 on a bad value);
    ``--quick`` sets only the values not given explicitly."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:  # an explicit value wins over --quick's
        given = given_options(parser, argv)
        for k, v in QUICK.items():
            if k not in given:
                setattr(args, k, v)
    try:
        check_args(args)
    except ValueError as err:
        parser.error(str(err))
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # process CPU time is robust to other processes sharing the CPU; a GPU needs wall time
    clock = args.clock if args.clock != "auto" else ("cpu" if device.type == "cpu" else "wall")
    record = {
        "machine": {
            "cpu": cpu_name(),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "args": vars(args),
        "results": {},
    }
    for wl in args.workloads:
        if wl == "ensemble":
            info = dict(
                method=args.ens_method,
                steps=args.ens_steps,
                repeats=args.repeats,
                prefetch=args.ens_prefetch,
                load_before=[round(v, 2) for v in os.getloadavg()],
                rows=[],
            )
            for name in args.ens_targets:
                for width in args.ens_widths:
                    rows = measure_ensemble(name, width, args)
                    info["rows"].extend(rows)
                    for r in rows:
                        print(json.dumps(r), flush=True)
            info["load_after"] = [round(v, 2) for v in os.getloadavg()]
            record["results"]["ensemble"] = info
            continue
        res = record["results"][wl] = measure(wl, args, device, clock)
        ratios = res[clock]["ratios"]
        print(
            f"{wl} ({clock} time): "
            + "  ".join(f"{k} {v:.3f}" for k, v in ratios.items())
            + "   (wall: "
            + "  ".join(f"{k} {v:.3f}" for k, v in res["wall"]["ratios"].items())
            + ")",
            flush=True,
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print_summary(record, clock, args.repeats, out)
    return record


if __name__ == "__main__":
    main()
