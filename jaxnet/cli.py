"""The ``jaxnet`` command: argparse and dispatch only; the library does the work.

The options that ``train`` and ``validate`` share (loss, optimizer, schedule, their
``KEY=VALUE`` arguments) are defined once, by the ``_add_*_group`` functions; each config is
built from the parsed arguments by one function (``_train_config``, ``_validate_config``,
``_bench_config``); every subcommand exits by one rule (``EXIT_RULE``, applied by ``_run``).
"""

from __future__ import annotations

import argparse
import difflib
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from jaxnet import (
    bench,
    convert,
    export,
    features,
    host,
    parallel,
    predict,
    torch_checkpoint,
    train,
    tutorial,
    validation,
)
from jaxnet.config import TrainConfig
from jaxnet.criteria import CRITERIA
from jaxnet.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_RUN_FAILED, ConfigError, JaxnetError
from jaxnet.model import Net, summary
from jaxnet.optim import OPTIMIZERS
from jaxnet.options import key_value
from jaxnet.schedules import SCHEDULES
from jaxnet.validation import PRECISIONS, ValidateConfig

__all__ = ["EXIT_RULE", "build_parser", "main"]

EXIT_RULE = """\
exit status (the same for every subcommand):
  0      done (validate: the verdict passed)
  1      the run failed (a NaN loss, a full disk) or validate's verdict failed
  2      bad input or usage (a bad option value, a missing file); stderr says why:
         "jaxnet <subcommand>: error: ...". A bare `jaxnet` prints this help and exits 2
         (nothing was run).
  128+N  stopped by signal N: 130 SIGINT (Ctrl-C), 143 SIGTERM
         (train saves a checkpoint first; continue it with --resume)"""

_BAD_PATH = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)


# --- the exit-code rule ----------------------------------------------------------------------


def signal_exit(name: str | None) -> int:
    """128 + the number of signal ``name`` (``"SIGTERM"`` -> 143); no name means SIGINT, 130."""
    return 128 + int(signal.Signals[name or "SIGINT"])


def _fail(command: str, error: BaseException, code: int) -> int:
    message = str(error) or type(error).__name__
    print(f"jaxnet {command}: error: {message}", file=sys.stderr)
    return code


def _run(args: argparse.Namespace) -> int:
    """Run the subcommand; map how it ended to the exit status of ``EXIT_RULE``."""
    try:
        return args.func(args)
    except JaxnetError as e:  # bad input (2), or a run that failed (1, e.g. a NaN loss)
        return _fail(args.command, e, e.exit_code)
    except KeyboardInterrupt:  # before train's own handler is installed, or any other command
        print(f"jaxnet {args.command}: interrupted by SIGINT", file=sys.stderr)
        return signal_exit("SIGINT")
    except _BAD_PATH as e:  # a path given that is not there, or not of the kind needed
        return _fail(args.command, e, EXIT_BAD_INPUT)
    except OSError as e:  # a full disk, a lost mount: the run failed
        return _fail(args.command, e, EXIT_RUN_FAILED)
    except (ValueError, TypeError) as e:  # a value of an option that cannot be used
        return _fail(args.command, e, EXIT_BAD_INPUT)


# --- the subcommands -------------------------------------------------------------------------


def _cmd_summary(args: argparse.Namespace) -> int:
    print(summary(Net(num_classes=args.num_classes)))
    return EXIT_OK


def _cmd_tutorial(args: argparse.Namespace) -> int:
    r = tutorial.run_tutorial(seed=args.seed, lr=args.lr)
    np.set_printoptions(precision=6, suppress=True)
    print(f"input: random normal, shape {r['input_shape']} (NHWC)")
    print(f"target: {np.asarray(r['target'])}")
    print(f"output before the step: {np.asarray(r['output_before'])}")
    print(f"L1 loss before: {float(r['loss_before']):.6f}")
    print(f"one SGD(lr={args.lr}) step taken")
    print(f"output after the step:  {np.asarray(r['output_after'])}")
    print(f"L1 loss after:  {float(r['loss_after']):.6f}")
    return EXIT_OK


def _cmd_train(args: argparse.Namespace) -> int:
    if not args.malloc_defaults:
        host.tune_malloc()
    else:  # and jaxnet's steps leave it alone on their first call too
        host.restore_malloc()
    # Before any other JAX call.
    parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    result = train.train_and_evaluate(_train_config(args), args.workdir)
    if parallel.is_primary():
        print(_written(Path(args.workdir), result.best_epoch))
    if result.status == "interrupted":  # checkpoint saved; --resume continues it
        return signal_exit(result.signal)
    return EXIT_OK


def _written(workdir: Path, best_epoch: int) -> str:
    """The end of ``train``: the workdir and each file in it that the run wrote."""
    what = {
        "metrics.jsonl": "one line per epoch",
        "curves.png": "loss and accuracy",
        "checkpoints/best": f"params of epoch {best_epoch}, used by export/predict/features",
        "checkpoints/last": "the full state, for --resume",
    }
    lines = [f"workdir {workdir}:"]
    lines += [
        f"  {workdir / name}  ({text})" for name, text in what.items() if (workdir / name).exists()
    ]
    return "\n".join(lines)


def _cmd_export(args: argparse.Namespace) -> int:
    out = Path(args.out)
    fmt = args.format if args.format != "auto" else _export_format(out)
    if fmt == "torch-checkpoint":
        return _export_torch_checkpoint(args, out)
    params, info = export.run_info(args.workdir, args.which)
    _refuse_to_replace([out, Path(f"{out}.json")] if fmt == "stablehlo" else [out], args.overwrite)
    if fmt == "stablehlo":
        export.export_stablehlo(params, info, out, tuple(args.platforms.split(",")))
        what = f"jax.export StableHLO of the logits, batch symbolic, {export.LAYOUT_JAX} input"
        print(f"wrote {out} ({args.which} params; {what}) and {out}.json (its metadata)")
    else:
        export.save_weights(params, out, info)
        print(f"wrote {out} ({args.which} params, the state_dict of TorchNet, with metadata)")
    print(f"classes: {info.classes}; inputs are (x - {info.mean:.6f}) / {info.std:.6f}")
    return EXIT_OK


def _export_torch_checkpoint(args: argparse.Namespace, out: Path) -> int:
    _refuse_to_replace([out], args.overwrite)
    ckpt = torch_checkpoint.save_torch_checkpoint(args.workdir, out)
    cls = ckpt["jaxnet"]["torch_class"]
    sched = ", scheduler_state_dict" if "scheduler_state_dict" in ckpt else ""
    print(
        f"wrote {out} (the last checkpoint, epoch {ckpt['epoch']}, step {ckpt['step']}: "
        f"model_state_dict, optimizer_state_dict of torch.optim.{cls}{sched})"
    )
    print(
        "continue it in PyTorch: net.load_state_dict(c['model_state_dict']); "
        f"torch.optim.{cls}(net.parameters(), **c['jaxnet']['optimizer']['options'])"
        ".load_state_dict(c['optimizer_state_dict'])"
    )
    return EXIT_OK


def _refuse_to_replace(paths: Sequence[Path], overwrite: bool) -> None:
    """Nothing the user has is replaced without ``--overwrite``."""
    taken = [str(p) for p in paths if p.exists()]
    if taken and not overwrite:
        raise ConfigError(
            f"{', '.join(taken)} already exist(s); pass --overwrite to replace, or give "
            "another file name."
        )


def _export_format(out: Path) -> str:
    suffix = out.suffix.lower()
    if suffix in (".pt", ".pth", ".safetensors"):
        return "state-dict"
    if suffix in (".stablehlo", ".jax_exported"):
        return "stablehlo"
    raise ConfigError(
        f"cannot tell the format of {out} from its suffix; name it .pt, .safetensors or "
        ".stablehlo, or pass --format."
    )


def _cmd_import(args: argparse.Namespace) -> int:
    info = export.import_weights(args.weights, args.workdir, args.data, args.overwrite)
    print(f"imported {args.weights} into {args.workdir}/checkpoints/best")
    _, key, whole = convert.read_state_dict(args.weights)
    if key is not None:  # a checkpoint dict: say where the model's weights came from
        print(f"the model weights are its {key!r} entry")
    if torch_checkpoint.keep_optimizer_state(whole, args.workdir):
        print(
            "kept its optimizer state: jaxnet train --resume --workdir "
            f"{args.workdir} continues the PyTorch run (give its --optimizer, --opt, --schedule)"
        )
    if info is None:
        print("the file has no jaxnet metadata: predict recomputes the normalisation from --data")
    else:
        print(f"classes: {info.classes}; inputs are (x - {info.mean:.6f}) / {info.std:.6f}")
    return EXIT_OK


def _cmd_features(args: argparse.Namespace) -> int:
    path = features.draw_features(
        args.workdir, args.out, which=args.which, split=args.split, index=args.index
    )
    print(f"wrote {path}")
    return EXIT_OK


def _cmd_predict(args: argparse.Namespace) -> int:
    model = predict.load_model(args.workdir, args.which, args.weights, args.mean, args.std)
    out = Path(args.out) if args.out else Path(args.workdir or ".") / "predictions.csv"
    confusion = out.with_name(out.stem + ".confusion.png")
    _refuse_to_replace([out, confusion], args.overwrite)
    result, written = predict.run_predict(
        model, args.data, out, fmt=args.format, rule=args.image_rule, confusion_png=confusion
    )
    print(predict.summary_text(result, model.info))
    print("wrote " + ", ".join(map(str, written)))
    return EXIT_OK


def _cmd_bench(args: argparse.Namespace) -> int:
    config = _bench_config(args)
    tuned = False if args.malloc_defaults else host.tune_malloc()
    if args.malloc_defaults:  # and jaxnet's steps leave it alone on their first call too
        host.restore_malloc()
    results = bench.run_bench(config)
    results["machine"]["malloc_tuned"] = tuned
    print(bench.format_results(results))
    if args.json:
        bench.write_json(results, args.json)
        print(f"results written to {args.json}")
    return EXIT_OK


def _cmd_validate(args: argparse.Namespace) -> int:
    report = validation.validate(_validate_config(args))
    report.print(Console())
    if args.json:
        report.save_json(args.json)
    if args.plot:
        report.plot(args.plot)
    return report.exit_code  # 1 when the verdict failed


# --- configs from arguments ------------------------------------------------------------------


def _train_config(args: argparse.Namespace) -> TrainConfig:
    flags = {k: getattr(args, k) for k in ("momentum", "weight_decay", "nesterov")}
    optimizer_kwargs = {**(args.opt or {}), **{k: v for k, v in flags.items() if v is not None}}
    return TrainConfig(
        data=args.data,
        num_classes=args.num_classes,
        label_rule=args.label_rule,
        limit=args.limit,
        epochs=args.epochs,
        batch_size=args.batch_size,
        loss=args.loss,
        optimizer=args.optimizer,
        lr=args.lr,
        optimizer_kwargs=optimizer_kwargs or None,
        schedule=args.schedule,
        schedule_kwargs=args.sched_opt or None,
        seed=args.seed,
        early_stopping=args.early_stopping,
        per_example_grad_norms=args.per_example_grad_norms,
        progress=not args.no_progress,
        resume=args.resume,
        overwrite=args.overwrite,
    )


def _validate_config(args: argparse.Namespace) -> ValidateConfig:
    return ValidateConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        num_classes=args.num_classes,
        weights=args.weights,
        loss=args.loss,
        loss_options=args.loss_opt,
        optimizer=args.optimizer,
        optimizer_options=args.opt,
        schedule=args.schedule,
        schedule_options=args.sched_opt,
        steps_per_epoch=args.steps_per_epoch,
        data=args.data,
        drift_factor=args.drift_factor,
        step_factor=args.step_factor,
        precision=args.precision,
        float64_tolerance=args.float64_tolerance,
        device=args.device,
        torch_threads=args.torch_threads,
        record_every=args.record_every,
    )


def _bench_config(args: argparse.Namespace) -> bench.BenchConfig:
    return bench.BenchConfig(
        batch_sizes=args.batch_sizes,
        warmup=args.warmup,
        reps=args.reps,
        min_rep_s=args.min_rep_s,
        scan_steps=args.scan_steps,
        torch=not args.no_torch,
        torch_compile=not args.no_torch_compile,
        dtype=args.dtype,
    )


# --- option groups shared by the subcommands -------------------------------------------------


class _KeyValues(argparse.Action):
    """Repeated ``--flag KEY=VALUE`` (each parsed by ``jaxnet.options.key_value``) gathered
    into one dict; a later KEY overrides an earlier one."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None):
        key, value = values
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest) or {}), key: value})


def _add_key_values(group: Any, flag: str, help: str) -> None:
    group.add_argument(
        flag, type=key_value, action=_KeyValues, metavar="KEY=VALUE", help=f"{help} (repeatable)"
    )


def _add_loss_group(p: argparse.ArgumentParser, default: str, *, with_options: bool) -> Any:
    g = p.add_argument_group("loss (jaxnet.criteria.CRITERIA)")
    g.add_argument("--loss", default=default, choices=sorted(CRITERIA), help=f"default {default}")
    if with_options:
        _add_key_values(g, "--loss-opt", "a torch.nn.functional option, e.g. label_smoothing=0.1")
    return g


def _add_optimizer_group(p: argparse.ArgumentParser, default: str) -> Any:
    g = p.add_argument_group("optimizer (torch.optim's names and arguments)")
    g.add_argument(
        "--optimizer", default=default, choices=sorted(OPTIMIZERS), help="a torch.optim name"
    )
    _add_key_values(g, "--opt", "an optimizer argument, e.g. --opt lr=0.01 --opt betas=0.9,0.99")
    return g


def _add_schedule_group(p: argparse.ArgumentParser, stepped: str) -> Any:
    g = p.add_argument_group("learning-rate schedule (torch.optim.lr_scheduler)")
    g.add_argument(
        "--schedule",
        choices=sorted(SCHEDULES),
        help=f"a torch scheduler in snake case, stepped {stepped} (one_cycle_lr: every batch)",
    )
    _add_key_values(g, "--sched-opt", "a scheduler argument, e.g. --sched-opt T_max=8")
    return g


def _add_multiprocess_group(p: argparse.ArgumentParser) -> Any:
    g = p.add_argument_group("multi-process (one process per host; all devices are used)")
    g.add_argument(
        "--coordinator-address",
        help=f"host:port of process 0 (default: ${parallel.COORDINATOR_ADDRESS_ENV})",
    )
    g.add_argument(
        "--num-processes", type=int, help=f"process count (default: ${parallel.NUM_PROCESSES_ENV})"
    )
    g.add_argument(
        "--process-id", type=int, help=f"this process' index (default: ${parallel.PROCESS_ID_ENV})"
    )
    return g


def _add_malloc_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--malloc-defaults",
        action="store_true",
        help="keep glibc's malloc thresholds (default: raise them, jaxnet.host.tune_malloc; "
        "XLA:CPU's per-step buffers then stop costing page faults); JAXNET_TUNE_MALLOC=0 in "
        "the environment also keeps glibc's per-thread arenas",
    )


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        return bench.parse_batch_sizes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# --- the parser ------------------------------------------------------------------------------


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; every option's default shown, ``(default: X)``,
    unless its help already says it or there is none (``None``, an unset flag)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        if "default" in text or default is None or default is False:
            return text
        if default == argparse.SUPPRESS or not action.option_strings:
            return text
        shown = ",".join(map(str, default)) if isinstance(default, tuple | list) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})".lstrip()


def _subparser(sub: Any, name: str, help: str, func: Callable[..., int], **kwargs: Any) -> Any:
    p = sub.add_parser(
        name,
        help=help,
        epilog=EXIT_RULE,
        formatter_class=_HelpFormatter,
        **kwargs,
    )
    p.set_defaults(func=func)
    return p


def _train_parser(sub: Any) -> None:
    d = TrainConfig()
    p = _subparser(
        sub, "train", "train Net on real data (default: the digits, even vs odd)", _cmd_train
    )
    p.add_argument("--workdir", default="runs/default", help="metrics, curves, checkpoints")
    p.add_argument("--data", default=d.data, help="'digits', a .npz (x, y) or an MNIST folder")
    p.add_argument(
        "--num-classes", type=int, default=d.num_classes, help="2 (by --label-rule) or 10 digits"
    )
    p.add_argument(
        "--label-rule",
        default=d.label_rule,
        choices=["parity", "low-high"],
        help="2-class rule for digit data: even/odd or 0-4/5-9",
    )
    p.add_argument("--limit", type=int, default=None, help="use only this many examples")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the data")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per step")
    p.add_argument("--seed", type=int, default=d.seed, help="init and batch order")
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
    _add_malloc_flag(p)
    _add_loss_group(p, d.loss, with_options=False)  # TrainConfig has no loss options
    g = _add_optimizer_group(p, d.optimizer)
    g.add_argument("--lr", type=float, default=d.lr, help="learning rate")
    g.add_argument("--momentum", type=float, default=None, help="default 0.9 for sgd")
    g.add_argument("--weight-decay", type=float, default=None, help="default: the optimizer's")
    g.add_argument("--nesterov", action="store_true", default=None, help="Nesterov momentum (sgd)")
    _add_schedule_group(p, "once per epoch")
    _add_multiprocess_group(p)


def _validate_parser(sub: Any) -> None:
    d = ValidateConfig()
    p = _subparser(
        sub,
        "validate",
        "train jaxnet and PyTorch side by side and judge the difference against the "
        "float32 noise floor (exit 1 when beyond it)",
        _cmd_validate,
        description="Options use torch's names, e.g. --optimizer adam --opt lr=1e-3\n"
        "--opt amsgrad=true --schedule cosine_annealing_lr --sched-opt T_max=100.",
    )
    p.add_argument("--steps", type=int, default=d.steps, help="training steps compared")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per step")
    p.add_argument("--seed", type=int, default=d.seed, help="weights and data")
    p.add_argument("--num-classes", type=int, default=d.num_classes, help="fc3's outputs")
    p.add_argument("--weights", help="start from this .pt/.safetensors state_dict")
    p.add_argument(
        "--data",
        default="random",
        help="'random' (normal images, as in the tutorial), 'digits' (the default data set), "
        "a .npz (x, y) or an MNIST folder",
    )
    p.add_argument(
        "--drift-factor",
        type=float,
        default=d.drift_factor,
        help="fail when drift from float64 exceeds this many noise floors",
    )
    p.add_argument(
        "--step-factor",
        type=float,
        default=d.step_factor,
        help="fail when the first step exceeds this many float32 round-offs",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=d.precision,
        help="float32: jaxnet f32 judged against PyTorch f32's noise floor; float64: jaxnet "
        "f64 against PyTorch f64 to round-off (tells a float32 rounding event from a real "
        "difference)",
    )
    p.add_argument(
        "--float64-tolerance",
        type=float,
        default=d.float64_tolerance,
        help="float64: fail when a relative difference exceeds this at any step",
    )
    p.add_argument("--device", default=d.device, help="torch device: auto, cpu or cuda")
    p.add_argument("--torch-threads", type=int, help="torch CPU threads (1 on a busy CPU)")
    p.add_argument(
        "--record-every", type=int, default=d.record_every, help="compare every N-th step"
    )
    p.add_argument("--json", metavar="PATH", help="write the per-step record as JSON")
    p.add_argument(
        "--plot",
        metavar="PATH",
        help="plot drift vs noise floor (float64: the differences vs the tolerance), PNG",
    )
    _add_loss_group(p, d.loss, with_options=True)
    _add_optimizer_group(p, d.optimizer)
    g = _add_schedule_group(p, "every --steps-per-epoch batches")
    g.add_argument(
        "--steps-per-epoch",
        type=int,
        default=d.steps_per_epoch,
        help="step the schedule every N batches (default 1: every batch)",
    )


def _bench_parser(sub: Any) -> None:
    p = _subparser(
        sub, "bench", "time train_step against PyTorch eager and torch.compile", _cmd_bench
    )
    p.add_argument(
        "--batch-sizes",
        type=_batch_sizes,
        default=",".join(map(str, bench.DEFAULT_BATCH_SIZES)),
        help="comma-separated, default %(default)s",
    )
    p.add_argument("--reps", type=int, default=7, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls after the first")
    p.add_argument("--min-rep-s", type=float, default=0.2, help="seconds per repetition")
    p.add_argument("--scan-steps", type=int, default=8, help="batches per train_steps call")
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="of the images"
    )
    p.add_argument("--no-torch", action="store_true", help="time jaxnet only")
    p.add_argument("--no-torch-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    _add_malloc_flag(p)


def _add_run_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="runs/default", help="the trained run")
    p.add_argument(
        "--which", choices=["best", "last"], default="best", help="best: lowest val loss"
    )


def _workdir_parsers(sub: Any) -> None:
    """export, import and features: what a trained run's workdir is used for."""
    p = _subparser(
        sub,
        "export",
        "write trained params as a PyTorch state_dict (with metadata) or a StableHLO export",
        _cmd_export,
    )
    p.add_argument("out", help="a .pt, .safetensors or .stablehlo file")
    _add_run_source(p)
    p.add_argument(
        "--format",
        choices=["auto", "state-dict", "stablehlo", "torch-checkpoint"],
        default="auto",
        help="auto: from the suffix of OUT; torch-checkpoint: the PyTorch tutorials' "
        "{model,optimizer}_state_dict dict of the last checkpoint (a .pt), to continue in torch",
    )
    p.add_argument("--platforms", default="cpu,cuda", help="stablehlo: the platforms to lower for")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")

    p = _subparser(sub, "import", "read a PyTorch state_dict into a workdir", _cmd_import)
    p.add_argument("weights", help="a .pt or .safetensors file of the tutorial's Net")
    p.add_argument("--workdir", required=True, help="the new run's folder")
    p.add_argument(
        "--data",
        default=None,
        help="the data the weights belong to (default: what the file's metadata names, "
        "else 'digits')",
    )
    p.add_argument("--overwrite", action="store_true", help="replace checkpoints in --workdir")

    p = _subparser(
        sub, "features", "draw conv1/conv2 activations for one input as a PNG", _cmd_features
    )
    _add_run_source(p)
    p.add_argument("--split", choices=["val", "train"], default="val", help="the run's data")
    p.add_argument("--index", type=int, default=0, help="the example of --split")
    p.add_argument("--out", default=None, help="the PNG (default: <workdir>/features.png)")


def _predict_parser(sub: Any) -> None:
    p = _subparser(
        sub,
        "predict",
        "classify images with a trained run or a weight file; write CSV or JSON",
        _cmd_predict,
        description="jaxnet predict --workdir W (or --weights FILE) --data SOURCE\n"
        "SOURCE: an .npz (x, optional labels y) or .npy, a folder of MNIST IDX files, a PNG/JPEG\n"
        "image or a folder of them (drawn digits; see --image-rule). With labels, the\n"
        "accuracy and the confusion matrix are printed and drawn (<out>.confusion.png).",
    )
    p.add_argument("--data", required=True, help="the images (see above)")
    p.add_argument("--workdir", default=None, help="a trained run (or give --weights)")
    p.add_argument("--which", choices=["best", "last"], default="best", help="--workdir's")
    p.add_argument("--weights", default=None, help="a .pt/.safetensors file (jaxnet export)")
    p.add_argument(
        "--out", default=None, help="CSV or JSON (default: <workdir or .>/predictions.csv)"
    )
    p.add_argument("--format", choices=predict.FORMATS, help="default: from --out's suffix")
    p.add_argument(
        "--image-rule",
        choices=sorted(predict.IMAGE_RULES),
        help="how a drawn image becomes 32x32 (default: the one of the model's training data)",
    )
    p.add_argument("--mean", type=float, help="input mean (default: the model's)")
    p.add_argument("--std", type=float, help="input std (default: the model's)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxnet",
        description="The PyTorch tutorial's Net in functional JAX/Flax.",
        epilog=EXIT_RULE,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"jaxnet {export.jaxnet_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = _subparser(
        sub, "summary", "print the network summary (like the tutorial's print(net))", _cmd_summary
    )
    p.add_argument("--num-classes", type=int, default=2, help="fc3's outputs")
    p = _subparser(
        sub, "tutorial", "run the tutorial's steps: forward, L1 loss, one SGD step", _cmd_tutorial
    )
    p.add_argument("--seed", type=int, default=0, help="of the random input and weights")
    p.add_argument("--lr", type=float, default=0.01, help="SGD's learning rate")
    _train_parser(sub)
    _predict_parser(sub)
    _workdir_parsers(sub)
    _bench_parser(sub)
    _validate_parser(sub)
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _did_you_mean(flag: str, known: Sequence[str]) -> str | None:
    """The option ``flag`` most likely meant: dashes for underscores (``--num_classes``), a close
    spelling (``--work-dir``), or the initials of its words (``--learning-rate`` -> ``--lr``)."""
    name = flag.split("=", 1)[0].replace("_", "-")
    if name in known:
        return name
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
    if close:
        return close[0]
    initials = "--" + "".join(w[0] for w in name.lstrip("-").split("-") if w)
    return initials if len(initials) > 3 and initials in known else None


def _unknown(parser: argparse.ArgumentParser, extras: Sequence[str]) -> str:
    known = [o for a in parser._actions for o in a.option_strings]
    hints = []
    for flag in (e for e in extras if e.startswith("-")):
        guess = _did_you_mean(flag, known)
        if guess:
            hints.append(f"did you mean {guess} (for {flag.split('=', 1)[0]})?")
    return f"unrecognized arguments: {' '.join(extras)}" + ("; " + " ".join(hints) if hints else "")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``: a bare ``jaxnet`` prints the help (exit 2); an unknown option is a usage
    error of its subcommand, with a "did you mean" when one is close."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        parser.print_help()
        print("jaxnet: error: a command is required (listed above)", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)
    commands = _subparsers(parser)
    if not argv[0].startswith("-") and argv[0] not in commands:
        close = difflib.get_close_matches(argv[0], list(commands), n=1)
        guess = f"; did you mean {close[0]}?" if close else ""
        parser.error(f"unknown command {argv[0]!r} (choose from {', '.join(commands)}){guess}")
    args, extras = parser.parse_known_args(argv)
    if args.command is None:
        parser.error(_unknown(parser, extras) if extras else "a command is required")
    if extras:
        sub = commands[args.command]
        sub.error(_unknown(sub, extras))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """``jaxnet ARGS``: the exit status of ``EXIT_RULE`` (usage errors and ``--help`` included:
    argparse's exit is returned, not raised)."""
    try:
        args = _parse(argv)
    except SystemExit as e:  # argparse printed the usage error (2) or the help (0)
        return EXIT_OK if e.code is None else e.code if isinstance(e.code, int) else EXIT_BAD_INPUT
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
