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


def _key_value(text: str) -> tuple[str, object]:
    from jaxnet.validation import parse_options

    try:
        ((key, value),) = parse_options([text]).items()
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return key, value


def _errors() -> tuple[type[BaseException], ...]:
    from jaxnet.checkpoint import CheckpointError
    from jaxnet.convert import WeightFileError
    from jaxnet.train import NonFiniteLossError

    return (ValueError, CheckpointError, WeightFileError, NonFiniteLossError, FileNotFoundError)


def _tune_malloc(args: argparse.Namespace) -> bool:
    from jaxnet.host import tune_malloc

    return False if args.malloc_defaults else tune_malloc()


def _add_malloc_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--malloc-defaults",
        action="store_true",
        help="keep glibc's malloc thresholds (default: raise them, jaxnet.host.tune_malloc; "
        "XLA:CPU's per-step buffers then stop costing page faults)",
    )


def _cmd_train(args: argparse.Namespace) -> int:
    import signal

    from jaxnet import parallel
    from jaxnet.train import TrainConfig, train_and_evaluate

    _tune_malloc(args)
    try:  # before any other JAX call
        parallel.initialize_distributed(
            args.coordinator_address, args.num_processes, args.process_id
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    kwargs = dict(args.opt or [])
    for name in ("momentum", "weight_decay", "nesterov"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    config = TrainConfig(
        data=args.data,
        num_classes=args.num_classes,
        label_rule=args.label_rule,
        limit=args.limit,
        epochs=args.epochs,
        batch_size=args.batch_size,
        loss=args.loss,
        optimizer=args.optimizer,
        lr=args.lr,
        optimizer_kwargs=kwargs or None,
        schedule=args.schedule,
        schedule_kwargs=dict(args.sched_opt or []) or None,
        seed=args.seed,
        early_stopping=args.early_stopping,
        per_example_grad_norms=args.per_example_grad_norms,
        progress=not args.no_progress,
        resume=args.resume,
        overwrite=args.overwrite,
    )
    try:
        result = train_and_evaluate(config, args.workdir)
    except _errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the training loop's own handler was installed
        print("interrupted before training started; nothing was saved", file=sys.stderr)
        return 130
    if result.status == "interrupted":
        return 128 + int(signal.Signals[result.signal or "SIGINT"])
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from jaxnet.convert import params_to_torch
    from jaxnet.train import load_params

    try:
        params, _, meta = load_params(args.workdir, args.which)
        params_to_torch(params, args.out, as_numpy=True)
    except _errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    d = meta.get("data") or {}
    norm = f"; inputs are (x - {d['mean']:.6f}) / {d['std']:.6f}" if d else ""
    print(f"wrote {args.out} ({args.which} params, PyTorch state_dict of TorchNet){norm}")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from jaxnet.train import TrainConfig, import_params

    try:
        import_params(args.weights, args.workdir, TrainConfig(data=args.data), args.overwrite)
    except _errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"imported {args.weights} into {args.workdir}/checkpoints/best")
    return 0


def _cmd_features(args: argparse.Namespace) -> int:
    from pathlib import Path

    from jaxnet.data import load_data
    from jaxnet.features import conv_activations, plot_features
    from jaxnet.train import load_params

    try:
        params, c, _ = load_params(args.workdir, args.which)
        ds = load_data(c.data, c.num_classes, c.label_rule, c.val_fraction, c.split_seed, c.limit)
        x, y = (ds.x_val, ds.y_val) if args.split == "val" else (ds.x_train, ds.y_train)
        if not 0 <= args.index < len(x):
            raise ValueError(f"--index must lie in [0, {len(x)}) for the {args.split} split.")
        acts = conv_activations(params, x[args.index : args.index + 1])
        out = Path(args.out or Path(args.workdir) / "features.png")
        title = f"{args.split} example {args.index} (class {int(y[args.index])}): conv + ReLU"
        plot_features(x[args.index], {k: v[0] for k, v in acts.items()}, out, title)
    except _errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")


def _cmd_bench(args: argparse.Namespace) -> int:
    from jaxnet.bench import BenchConfig, format_results, run_bench, write_json

    cfg = BenchConfig(
        batch_sizes=args.batch_sizes,
        warmup=args.warmup,
        reps=args.reps,
        min_rep_s=args.min_rep_s,
        scan_steps=args.scan_steps,
        torch=not args.no_torch,
        torch_compile=not args.no_torch_compile,
        dtype=args.dtype,
    )
    tuned = _tune_malloc(args)
    results = run_bench(cfg)
    results["machine"]["malloc_tuned"] = tuned
    print(format_results(results))
    if args.json:
        write_json(results, args.json)
        print(f"results written to {args.json}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from rich.console import Console

    from jaxnet.validation import dataset_stream, parse_options, validate

    console = Console(stderr=False)
    try:
        report = validate(
            steps=args.steps,
            batch_size=args.batch_size,
            seed=args.seed,
            num_classes=args.num_classes,
            weights=args.weights,
            loss=args.loss,
            loss_options=parse_options(args.loss_opt),
            optimizer=args.optimizer,
            optimizer_options=parse_options(args.opt),
            schedule=args.schedule,
            schedule_options=parse_options(args.sched_opt),
            steps_per_epoch=args.steps_per_epoch,
            drift_factor=args.drift_factor,
            step_factor=args.step_factor,
            device=args.device,
            torch_threads=args.torch_threads,
            record_every=args.record_every,
            data=None
            if args.data == "random"
            else dataset_stream(args.data, args.batch_size, args.seed, args.num_classes),
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

    from jaxnet.schedules import SCHEDULES
    from jaxnet.train import CRITERIA, TrainConfig, optimizer_registry

    d = TrainConfig()
    p = sub.add_parser("train", help="train Net on real data (default: the digits, even vs odd)")
    p.add_argument("--workdir", default="runs/default", help="metrics, curves, checkpoints")
    p.add_argument("--data", default=d.data, help="'digits', a .npz (x, y) or an MNIST folder")
    p.add_argument("--num-classes", type=int, default=d.num_classes)
    p.add_argument(
        "--label-rule",
        default=d.label_rule,
        choices=["parity", "low-high"],
        help="2-class rule for digit data: even/odd or 0-4/5-9",
    )
    p.add_argument("--limit", type=int, default=None, help="use only this many examples")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--loss", default=d.loss, choices=sorted(CRITERIA))
    p.add_argument("--optimizer", default=d.optimizer, choices=sorted(optimizer_registry()))
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--momentum", type=float, default=None, help="default 0.9 for sgd")
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--nesterov", action="store_true", default=None)
    p.add_argument(
        "--schedule",
        choices=sorted(SCHEDULES),
        help="a torch.optim.lr_scheduler, stepped once per epoch (one_cycle_lr: per batch)",
    )
    p.add_argument(
        "--sched-opt",
        type=_key_value,
        action="append",
        metavar="KEY=VALUE",
        help="the scheduler's torch argument, e.g. --sched-opt T_max=8 (repeatable)",
    )
    p.add_argument(
        "--opt",
        type=_key_value,
        action="append",
        metavar="KEY=VALUE",
        help="any other hyperparameter of the optimizer, e.g. --opt dampening=0.1",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--early-stopping",
        type=int,
        default=None,
        metavar="PATIENCE",
        help="stop when val loss has not improved for this many epochs",
    )
    p.add_argument(
        "--per-example-grad-norms",
        type=int,
        nargs="?",
        const=64,
        default=0,
        metavar="N",
        help="log per-example gradient norms of N train examples",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --workdir")
    p.add_argument("--overwrite", action="store_true", help="discard the run in --workdir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    from jaxnet import parallel as par

    g = p.add_argument_group("multi-process (one process per host; all devices are used)")
    g.add_argument(
        "--coordinator-address",
        help=f"host:port of process 0 (default: ${par.COORDINATOR_ADDRESS_ENV})",
    )
    g.add_argument(
        "--num-processes", type=int, help=f"process count (default: ${par.NUM_PROCESSES_ENV})"
    )
    g.add_argument(
        "--process-id", type=int, help=f"this process' index (default: ${par.PROCESS_ID_ENV})"
    )
    _add_malloc_flag(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("export", help="write trained params as a PyTorch state_dict")
    p.add_argument("out", help="a .pt or .safetensors file")
    p.add_argument("--workdir", default="runs/default")
    p.add_argument("--which", choices=["best", "last"], default="best")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("import", help="read a PyTorch state_dict into a workdir")
    p.add_argument("weights", help="a .pt or .safetensors file of the tutorial's Net")
    p.add_argument("--workdir", required=True)
    p.add_argument("--data", default=d.data, help="the data the weights belong to")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser("features", help="draw conv1/conv2 activations for one input as a PNG")
    p.add_argument("--workdir", default="runs/default")
    p.add_argument("--which", choices=["best", "last"], default="best")
    p.add_argument("--split", choices=["val", "train"], default="val")
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--out", default=None, help="default: <workdir>/features.png")
    p.set_defaults(func=_cmd_features)

    def batch_sizes(text: str) -> tuple[int, ...]:
        from jaxnet.bench import parse_batch_sizes  # imports jax: only when benchmarking

        try:
            return parse_batch_sizes(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    p = sub.add_parser("bench", help="time train_step against PyTorch eager and torch.compile")
    p.add_argument(
        "--batch-sizes",
        type=batch_sizes,
        default="1,8,32,128,256,1024",
        help="comma-separated, default 1,8,32,128,256,1024",
    )
    p.add_argument("--reps", type=int, default=7, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls after the first")
    p.add_argument("--min-rep-s", type=float, default=0.2, help="seconds per repetition")
    p.add_argument("--scan-steps", type=int, default=8, help="batches per train_steps call")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--no-torch", action="store_true", help="time jaxnet only")
    p.add_argument("--no-torch-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    _add_malloc_flag(p)
    p.set_defaults(func=_cmd_bench)
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
    p.add_argument(
        "--data",
        default="random",
        help="'random' (normal images, as in the tutorial), 'digits' (the default data set), "
        "a .npz (x, y) or an MNIST folder",
    )
    p.add_argument(
        "--loss", default="cross_entropy", choices=["l1", "mse", "cross_entropy", "kl_div"]
    )
    p.add_argument(
        "--loss-opt",
        action="append",
        metavar="KEY=VALUE",
        help="e.g. label_smoothing=0.1 (repeatable)",
    )
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "adamw", "rmsprop"])
    p.add_argument(
        "--opt",
        action="append",
        metavar="KEY=VALUE",
        help="optimizer argument, e.g. lr=0.01 (repeatable)",
    )
    p.add_argument(
        "--schedule",
        choices=[
            "step_lr",
            "multi_step_lr",
            "exponential_lr",
            "cosine_annealing_lr",
            "linear_lr",
            "one_cycle_lr",
        ],
    )
    p.add_argument(
        "--sched-opt",
        action="append",
        metavar="KEY=VALUE",
        help="scheduler argument, e.g. T_max=100 (repeatable)",
    )
    p.add_argument(
        "--steps-per-epoch",
        type=int,
        default=1,
        help="step the schedule every N batches (default 1: every batch)",
    )
    p.add_argument(
        "--drift-factor",
        type=float,
        default=DEFAULT_DRIFT_FACTOR,
        help="fail when drift from float64 exceeds this many noise floors",
    )
    p.add_argument(
        "--step-factor",
        type=float,
        default=DEFAULT_STEP_FACTOR,
        help="fail when the first step exceeds this many float32 round-offs",
    )
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
