"""The ``jaxnet`` command: a thin layer over the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _cmd_summary(args: argparse.Namespace) -> int:
    from jaxnet.model import Net, summary

    print(summary(Net(num_classes=args.num_classes)))
    return 0


def _cmd_tutorial(args: argparse.Namespace) -> int:
    import numpy as np

    from jaxnet.tutorial import run_tutorial

    r = run_tutorial(seed=args.seed, lr=args.lr)
    np.set_printoptions(precision=6, suppress=True)
    print(f"input: random normal, shape {r['input_shape']} (NHWC)")
    print(f"target: {np.asarray(r['target'])}")
    print(f"output before the step: {np.asarray(r['output_before'])}")
    print(f"L1 loss before: {float(r['loss_before']):.6f}")
    print(f"one SGD(lr={args.lr}) step taken")
    print(f"output after the step:  {np.asarray(r['output_after'])}")
    print(f"L1 loss after:  {float(r['loss_after']):.6f}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from rich.console import Console

    from jaxnet.validation import parse_options, validate

    console = Console(stderr=False)
    try:
        report = validate(
            steps=args.steps, batch_size=args.batch_size, seed=args.seed,
            num_classes=args.num_classes, weights=args.weights,
            loss=args.loss, loss_options=parse_options(args.loss_opt),
            optimizer=args.optimizer, optimizer_options=parse_options(args.opt),
            schedule=args.schedule, schedule_options=parse_options(args.sched_opt),
            steps_per_epoch=args.steps_per_epoch, drift_factor=args.drift_factor,
            step_factor=args.step_factor, device=args.device,
            torch_threads=args.torch_threads, record_every=args.record_every,
        )
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"jaxnet validate: error: {e}", file=sys.stderr)
        return 2
    report.print(console)
    if args.json:
        report.save_json(args.json)
    if args.plot:
        report.plot(args.plot)
    return report.exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxnet", description="The PyTorch tutorial's Net in functional JAX/Flax."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("summary", help="print the network summary (like the tutorial's print(net))")
    p.add_argument("--num-classes", type=int, default=2)
    p.set_defaults(func=_cmd_summary)

    p = sub.add_parser("tutorial", help="run the tutorial's steps: forward, L1 loss, one SGD step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.01)
    p.set_defaults(func=_cmd_tutorial)

    from jaxnet.validation import DEFAULT_DRIFT_FACTOR, DEFAULT_STEP_FACTOR

    p = sub.add_parser(
        "validate",
        help="train jaxnet and PyTorch side by side and judge the difference against the "
        "float32 noise floor (exit 1 when beyond it)",
        description="Options use torch's names, e.g. --optimizer adam --opt lr=1e-3 "
        "--opt amsgrad=true --schedule cosine_annealing_lr --sched-opt T_max=100.",
    )
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-classes", type=int, default=2)
    p.add_argument("--weights", help="start from this .pt/.safetensors state_dict")
    p.add_argument("--loss", default="cross_entropy",
                   choices=["l1", "mse", "cross_entropy", "kl_div"])
    p.add_argument("--loss-opt", action="append", metavar="KEY=VALUE", help="e.g. "
                   "label_smoothing=0.1 (repeatable)")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "adamw", "rmsprop"])
    p.add_argument("--opt", action="append", metavar="KEY=VALUE",
                   help="optimizer argument, e.g. lr=0.01 (repeatable)")
    p.add_argument("--schedule", choices=["step_lr", "multi_step_lr", "exponential_lr",
                                          "cosine_annealing_lr", "linear_lr", "one_cycle_lr"])
    p.add_argument("--sched-opt", action="append", metavar="KEY=VALUE",
                   help="scheduler argument, e.g. T_max=100 (repeatable)")
    p.add_argument("--steps-per-epoch", type=int, default=1,
                   help="step the schedule every N batches (default 1: every batch)")
    p.add_argument("--drift-factor", type=float, default=DEFAULT_DRIFT_FACTOR,
                   help="fail when drift from float64 exceeds this many noise floors")
    p.add_argument("--step-factor", type=float, default=DEFAULT_STEP_FACTOR,
                   help="fail when the first step exceeds this many float32 round-offs")
    p.add_argument("--device", default="auto", help="torch device: auto, cpu or cuda")
    p.add_argument("--torch-threads", type=int, help="torch CPU threads (1 on a busy CPU)")
    p.add_argument("--record-every", type=int, default=1, help="compare every N-th step")
    p.add_argument("--json", metavar="PATH", help="write the per-step record as JSON")
    p.add_argument("--plot", metavar="PATH", help="plot drift vs noise floor (PNG)")
    p.set_defaults(func=_cmd_validate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
