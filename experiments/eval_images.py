"""Evaluate an image consistency model from a checkpoint of ``experiments/train_images.py``.

    python experiments/eval_images.py runs/images/digits_gc_mix50_gc_s0/checkpoint.pt
    python experiments/eval_images.py CKPT --seeds 0 1 2 3 4 --n-samples 2000 --out runs/eval_gc
    python experiments/eval_images.py CKPT --data-root ~/data/cifar10 --n-samples 50000

Protocol (also written into ``results.json`` under ``"protocol"``):

- Samplers: **one-step** ``f(t_max z, t_max)`` (docs/paper.md section 5) and **two-step**
  (Song et al. 2023, Algorithm 1): ``x = f(80 z, 80)``, then ``x' = x + sqrt(s^2 - t_min^2)
  z'`` and ``f(x', s)`` at the intermediate time ``s = 0.821``, iCT's CIFAR-10 value, for every
  data set: on the digits it was also the best of s in {0.2, 0.5, 0.821, 1.5, 3} for a
  ``digits_base`` model (3000 steps, seed 0, 1000 samples: classifier FD 19.1, 13.0, 9.9, 11.5,
  15.4) and near-best for a ``digits_gc_mix50`` one (22.7, 16.0, 11.9, 11.3, 11.9).
  ``--two-step-sigma`` overrides it. The EMA weights are evaluated (``--weights model`` for the
  online network).
- Seeds: for each seed ``k`` in ``--seeds``, the noise ``z`` (and the two-step ``z'``) come from a
  CPU ``torch.Generator`` seeded by ``derive_seed(k, stream)``; the same seed gives the same noise
  for every checkpoint, so models are compared on identical noise. The reported value is the mean
  over seeds with a 95 % Student-t interval (``mean +- t_{0.975, n-1} std / sqrt(n)``).
- Samples are **clipped** to the data range [-1, 1] (never rescaled by a batch's own min / max);
  the fraction of pixels that needed clipping is reported.
- Reference set: the held-out **test** split (digits: 359 images, a fixed stratified split of
  scikit-learn's 1797; MNIST / CIFAR-10: their test sets) by default, ``--reference train`` for
  the training split (the usual CIFAR-10 FID convention, 50k training images).
- Metrics: ``sw2_pixels``: sliced W2 in pixel space (``gcflows.metrics.sliced_w2``, 256
  directions from a fixed seed, shared by all models); digits only: ``fd_classifier``: Frechet
  distance between the Gaussians fitted to the features of the cached digits classifier
  (``gcflows.classifier``; trained on the train split only) of the samples and of the reference
  set, and what the classifier says about the samples (``confident_fraction``: share classified
  with probability >= 0.9; per-class counts; classes covered; balance; classifier score);
  MNIST / CIFAR-10: Inception ``fid`` / ``kid`` through ``torchmetrics`` when it is installed and
  the Inception weights are on disk (in the torch hub cache, or ``--inception-weights``); nothing is
  downloaded or installed; otherwise the reason is written instead.
- Floor: the same metrics for ``--n-samples`` real training images (at most the training set),
  drawn without replacement with each seed, against the same reference: the value a perfect
  generator would get at this sample size (the Frechet distance is biased in the sample size,
  so compare numbers computed with the same ``--n-samples``).

Writes ``config.json`` (checkpoint, its training config, seeds, git SHA, versions, device),
``results.json`` / ``results.csv`` and ``samples_<sampler>.png`` to ``--out``; a table last.
The default ``--out`` is a new ``eval_<time>`` folder inside the checkpoint's run folder; an
explicit ``--out`` that holds a training run or another evaluation is refused (its config.json and
results would be replaced), and the folder is owned by the evaluation while it runs
(``gcflows.atomic.claim_folder``): a training or evaluation started into it meanwhile is refused.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gcflows.atomic import claim_folder
from gcflows.evaluation import evaluate_checkpoint, samplers
from gcflows.records import make_run_dir, print_table, write_config, write_results
from gcflows.training import TrainConfig, load_checkpoint
from gcflows.training.images import save_image_grid
from gcflows.training.rundir import run_files

__all__ = ["build_parser", "check_args", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoint", help="checkpoint.pt written by train_images.py")
    p.add_argument("--out", default=None, help="output folder (default: <run>/eval_<time>)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n-samples", type=int, default=1000)
    p.add_argument("--reference", choices=["test", "train"], default="test")
    p.add_argument("--data-root", default=None, help="MNIST / CIFAR-10 folder (not digits)")
    p.add_argument("--two-step-sigma", type=float, default=None, help="intermediate time")
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    p.add_argument("--inception", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--inception-weights", default=None, help="local Inception weights file")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--classifier-cache", default=None, help="default ~/.cache/gcflows")
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: 1 for digits on CPU)"
    )
    return p


def _writable(folder: Path) -> None:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(
            f"the output folder {str(folder)!r} cannot be written; choose another --out"
        )


def check_args(args: argparse.Namespace) -> dict[str, Any]:
    """Check every argument before any work (the checkpoint is read and its digest verified);
    returns the checkpoint's training config record. Raises ``ValueError`` with one message."""
    for flag in ("n_samples", "batch_size", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if any(seed < 0 for seed in args.seeds) or len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds must be distinct non-negative integers, got {args.seeds}")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        raise ValueError(f"--device={args.device!r} is invalid: use cpu, cuda or cuda:N")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device={args.device!r} is invalid: no CUDA device here; use cpu")
    if args.inception_weights is not None and not Path(args.inception_weights).is_file():
        raise ValueError(f"--inception-weights {args.inception_weights!r}: no such file")
    config = load_checkpoint(args.checkpoint)["config"]
    data = (config.get("model") or {}).get("data")
    if args.two_step_sigma is not None:
        try:
            samplers(TrainConfig.from_dict(config), data or "digits", args.two_step_sigma)
        except ValueError as err:
            raise ValueError(f"--two-step-sigma={args.two_step_sigma} is invalid: {err}") from None
    if data == "digits" and args.data_root is not None:
        print("warning: --data-root is ignored: the digits are bundled", file=sys.stderr)
    if data not in (None, "digits") and args.data_root is None:
        raise ValueError(f"{data} checkpoints need --data-root (the reference images)")
    _writable(Path(args.out) if args.out else Path(args.checkpoint).parent)
    if args.out is not None:
        _not_a_run(Path(args.out))
    return config


def _not_a_run(out: Path) -> None:
    """An explicit ``--out`` must not hold a training run or another evaluation: the files an
    evaluation writes (config.json, results.json / .csv) would replace theirs."""
    held = run_files(out)
    if held:
        raise ValueError(
            f"--out {str(out)!r} already holds a run ({', '.join(held)}): an evaluation there "
            "would replace its config.json and results; choose a new --out, or leave --out out "
            "(the default is a new eval_<time> folder inside the checkpoint's run folder)"
        )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the command line ``argv``; a bad argument exits with status 2 and one message before
    any sample is drawn or any file written."""
    parser = build_parser()
    args = parser.parse_args(argv)
    claim = None
    try:
        config = check_args(args)
        if args.out is not None:  # one owner: no training or other evaluation there meanwhile
            claim = claim_folder(args.out, "evaluation")
            _not_a_run(Path(args.out))  # checked again now that the folder is ours
    except ValueError as err:
        if claim is not None:
            claim.release()
        parser.error(str(err))
    try:
        return _evaluate(args, config)
    finally:
        if claim is not None:
            claim.release()


def _evaluate(args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any]:
    threads = args.threads
    if (
        threads is None
        and args.device == "cpu"
        and (config.get("model") or {}).get("data") == "digits"
    ):
        threads = 1  # 8x8 images: extra threads only add synchronisation
    if threads is not None:
        torch.set_num_threads(threads)
    res = evaluate_checkpoint(
        args.checkpoint,
        seeds=args.seeds,
        n_samples=args.n_samples,
        reference=args.reference,
        data_root=args.data_root,
        mid_sigma=args.two_step_sigma,
        which=args.weights,
        inception=args.inception,
        inception_weights=args.inception_weights,
        device=args.device,
        batch_size=args.batch_size,
        classifier_cache=args.classifier_cache,
    )
    samples, config = res.pop("_samples"), res.pop("_config")
    out = Path(args.out) if args.out else make_run_dir(Path(args.checkpoint).parent, "eval")
    out.mkdir(parents=True, exist_ok=True)
    write_config(out, args, seed=args.seeds, train_config=config.to_dict())
    for name, x in samples.items():
        save_image_grid(x[:100], out / f"samples_{name}.png")
    write_results(out, res, res["per_seed"])
    table = []
    for key, stats in res["summary"].items():
        row: dict[str, Any] = {"source/sampler": key}
        for metric in (
            "fd_classifier",
            "confident_fraction",
            "classes_covered",
            "sw2_pixels",
            "fid",
        ):
            if metric in stats and stats[metric]["mean"] is not None:
                s = stats[metric]
                row[metric] = (
                    f"{s['mean']:.4g}"
                    if s["lo"] is None
                    else f"{s['mean']:.4g} [{s['lo']:.4g}, {s['hi']:.4g}]"
                )
        table.append(row)
    skipped = {r["inception"] for r in res["per_seed"] if isinstance(r.get("inception"), str)}
    for reason in sorted(skipped):
        print(f"note: Inception FID / KID skipped: {reason}")
    print(f"results in {out}")
    print_table(
        table,
        title=f"eval_images: {res['protocol']['preset']} step {res['protocol']['step']} "
        f"({len(args.seeds)} seeds x {args.n_samples} samples, mean [95% interval])",
    )
    return res


if __name__ == "__main__":
    main()
