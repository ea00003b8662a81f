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


def _cmd_bench(args: argparse.Namespace) -> int:
    from jaxnet.bench import BenchConfig, format_results, run_bench, write_json

    cfg = BenchConfig(
        batch_sizes=args.batch_sizes, warmup=args.warmup, reps=args.reps,
        min_rep_s=args.min_rep_s, scan_steps=args.scan_steps, torch=not args.no_torch,
        torch_compile=not args.no_torch_compile, dtype=args.dtype,
    )
    results = run_bench(cfg)
    print(format_results(results))
    if args.json:
        write_json(results, args.json)
        print(f"results written to {args.json}")
    return 0


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

    def batch_sizes(text: str) -> tuple[int, ...]:
        from jaxnet.bench import parse_batch_sizes  # imports jax: only when benchmarking

        try:
            return parse_batch_sizes(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    p = sub.add_parser("bench", help="time train_step against PyTorch eager and torch.compile")
    p.add_argument("--batch-sizes", type=batch_sizes, default="1,8,32,128,256,1024",
                   help="comma-separated, default 1,8,32,128,256,1024")
    p.add_argument("--reps", type=int, default=7, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls after the first")
    p.add_argument("--min-rep-s", type=float, default=0.2, help="seconds per repetition")
    p.add_argument("--scan-steps", type=int, default=8, help="batches per train_steps call")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--no-torch", action="store_true", help="time jaxnet only")
    p.add_argument("--no-torch-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
