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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
