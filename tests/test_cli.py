"""The ``jaxnet`` command: its parser, the shared option groups, the configs built from them,
and the one exit-code rule (0 ok, 1 run or verdict failed, 2 bad input or usage, 128+N on
signal N). The library is monkeypatched where a real run would be slow; the bad-input cases
run the real library, which refuses them before any training."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from conftest import SMALL, signal_after_step

import jaxnet
import jaxnet.host
import jaxnet.train
import jaxnet.validation
from jaxnet import cli
from jaxnet.checkpoint import CheckpointError, Checkpoints
from jaxnet.cli import build_parser, main
from jaxnet.config import TrainConfig
from jaxnet.criteria import CRITERIA
from jaxnet.errors import ConfigError
from jaxnet.optim import OPTIMIZERS
from jaxnet.options import key_value, parse_options
from jaxnet.schedules import SCHEDULES
from jaxnet.train import NonFiniteLossError
from jaxnet.validation import ValidateConfig
from jaxnet.workdir import load_params


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


@pytest.fixture(autouse=True)
def no_malloc_tuning(monkeypatch):
    """``train``/``bench`` tune malloc by default: not in the test process."""
    calls = []
    monkeypatch.setattr(jaxnet.host, "tune_malloc", lambda: calls.append(1) or True)
    return calls


# --- KEY=VALUE options -----------------------------------------------------------------------


def test_parse_options() -> None:
    assert parse_options(
        [
            "lr=0.01",
            "betas=0.9,0.99",
            "nesterov=true",
            "anneal_strategy=cos",
            "milestones=[2, 4]",
            "weight=None",
            "reduction=none",
        ]
    ) == {
        "lr": 0.01,
        "betas": (0.9, 0.99),
        "nesterov": True,
        "anneal_strategy": "cos",
        "milestones": [2, 4],
        "weight": None,
        "reduction": "none",
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_options(["lr"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_options(["=1"])
    assert parse_options(None) == {}
    assert parse_options(["weight-decay=0", "amsgrad=FALSE", "lr=1", "lr=2"]) == {
        "weight_decay": 0,
        "amsgrad": False,
        "lr": 2,
    }
    assert key_value(" T_max = 8 ") == ("T_max", 8)
    assert key_value("path=a=b") == ("path", "a=b")


@pytest.mark.parametrize("command", ["train", "validate"])
def test_key_value_options_parse_alike_in_train_and_validate(command) -> None:
    args = parse(
        command,
        "--opt",
        "betas=0.9,0.99",
        "--opt",
        "amsgrad=true",
        "--opt",
        "betas=(0.8, 0.9)",  # a later KEY overrides
        "--sched-opt",
        "milestones=[2, 4]",
        "--sched-opt",
        "gamma=0.5",
    )
    assert args.opt == {"betas": (0.8, 0.9), "amsgrad": True}
    assert args.sched_opt == {"milestones": [2, 4], "gamma": 0.5}
    plain = parse(command)
    assert plain.opt is None and plain.sched_opt is None


def _actions(command: str) -> dict[str, object]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {a.dest: a for a in sub.choices[command]._actions}


def test_shared_groups_give_train_and_validate_the_same_choices_and_parsing() -> None:
    train, validate = _actions("train"), _actions("validate")
    registries = {"loss": CRITERIA, "optimizer": OPTIMIZERS, "schedule": SCHEDULES}
    for dest, registry in registries.items():
        assert train[dest].choices == validate[dest].choices == sorted(registry), dest
    for dest in ("opt", "sched_opt"):
        assert train[dest].type is validate[dest].type is key_value
        assert type(train[dest]) is type(validate[dest])
    assert validate["loss_opt"].type is key_value
    assert "loss_opt" not in train  # TrainConfig has no loss options
    assert {"coordinator_address", "num_processes", "process_id"} <= set(train)


def test_train_config_from_arguments() -> None:
    assert cli._train_config(parse("train")) == TrainConfig()
    config = cli._train_config(
        parse(
            "train",
            "--data",
            "x.npz",
            "--optimizer",
            "sgd",
            "--lr",
            "0.1",
            "--opt",
            "dampening=0.5",
            "--opt",
            "momentum=0.5",
            "--momentum",
            "0.8",  # the flag wins over --opt, as before
            "--weight-decay",
            "0.01",
            "--nesterov",
            "--schedule",
            "step_lr",
            "--sched-opt",
            "step_size=2",
            "--loss",
            "kl_div",
            "--epochs",
            "3",
            "--no-progress",
            "--resume",
        )
    )
    assert config == TrainConfig(
        data="x.npz",
        lr=0.1,
        optimizer_kwargs={
            "dampening": 0.5,
            "momentum": 0.8,
            "weight_decay": 0.01,
            "nesterov": True,
        },
        schedule="step_lr",
        schedule_kwargs={"step_size": 2},
        loss="kl_div",
        epochs=3,
        progress=False,
        resume=True,
    )


def test_validate_config_from_arguments() -> None:
    assert cli._validate_config(parse("validate")) == dataclasses.replace(
        ValidateConfig(), data="random"
    )
    config = cli._validate_config(
        parse(
            "validate",
            "--steps",
            "5",
            "--loss",
            "cross_entropy",
            "--loss-opt",
            "label_smoothing=0.1",
            "--optimizer",
            "adam",
            "--opt",
            "lr=1e-3",
            "--schedule",
            "one_cycle_lr",
            "--sched-opt",
            "max_lr=0.01",
            "--steps-per-epoch",
            "2",
            "--data",
            "digits",
            "--torch-threads",
            "1",
        )
    )
    assert config == dataclasses.replace(
        ValidateConfig(),
        steps=5,
        loss_options={"label_smoothing": 0.1},
        optimizer="adam",
        optimizer_options={"lr": 1e-3},
        schedule="one_cycle_lr",
        schedule_options={"max_lr": 0.01},
        steps_per_epoch=2,
        data="digits",
        torch_threads=1,
    )


def test_every_subcommand_is_there() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == {
        "summary",
        "tutorial",
        "train",
        "predict",
        "export",
        "import",
        "features",
        "bench",
        "validate",
    }
    for command in ("train", "bench"):
        assert parse(command).malloc_defaults is False
        assert parse(command, "--malloc-defaults").malloc_defaults is True


def test_help_states_the_exit_codes(capsys) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for text in ("exit status", "0 ", "1 ", "2 ", "128+N", "130", "143"):
        assert text in out, text
    assert main(["train", "--help"]) == 0
    assert "128+N" in capsys.readouterr().out


# --- the exit-code rule ----------------------------------------------------------------------


def _result(status: str = "finished", sig: str | None = None):
    return SimpleNamespace(status=status, signal=sig, best_epoch=1)


def _train_returns_or_raises(monkeypatch, outcome) -> list:
    configs = []

    def fake(config, workdir, mesh=None):
        configs.append((config, workdir))
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    monkeypatch.setattr(jaxnet.train, "train_and_evaluate", fake)
    return configs


@pytest.mark.parametrize(
    ("outcome", "code"),
    [
        (_result(), 0),
        (_result("early-stopped"), 0),
        (_result("interrupted", "SIGTERM"), 143),
        (_result("interrupted", "SIGINT"), 130),
        (_result("interrupted", None), 130),  # another process got the signal
        (NonFiniteLossError("loss is nan at step 3"), 1),
        (OSError(errno.ENOSPC, "No space left on device"), 1),
        (KeyboardInterrupt(), 130),
        (ConfigError("epochs must be at least 1"), 2),
        (CheckpointError("cannot resume: the run was made with other settings"), 2),
        (ValueError("batch size 12 does not split evenly"), 2),
        (TypeError("'<' not supported between 'str' and 'float'"), 2),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "x.npz"), 2),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "runs"), 2),
        (NotADirectoryError(errno.ENOTDIR, "Not a directory", "f/x"), 2),
        (FileExistsError(errno.EEXIST, "File exists", "runs"), 2),  # --workdir is a file
    ],
)
def test_train_outcomes_map_to_exit_codes(outcome, code, monkeypatch, capsys, tmp_path) -> None:
    configs = _train_returns_or_raises(monkeypatch, outcome)
    assert main(["train", "--workdir", str(tmp_path), "--epochs", "2"]) == code
    assert configs == [(TrainConfig(epochs=2), str(tmp_path))]
    err = capsys.readouterr().err
    if isinstance(outcome, KeyboardInterrupt):
        assert err.startswith("jaxnet train: interrupted by SIGINT")
    elif isinstance(outcome, BaseException):
        assert err.startswith(f"jaxnet train: error: {outcome}"), err
    else:
        assert err == ""


def test_a_bug_is_not_hidden(monkeypatch) -> None:
    _train_returns_or_raises(monkeypatch, RuntimeError("a bug"))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["train"])


def test_train_tunes_malloc_unless_told_not_to(monkeypatch, no_malloc_tuning) -> None:
    _train_returns_or_raises(monkeypatch, _result())
    assert main(["train"]) == 0 and no_malloc_tuning == [1]
    assert main(["train", "--malloc-defaults"]) == 0 and no_malloc_tuning == [1]


class _Report:
    def __init__(self, exit_code: int) -> None:
        self.exit_code = exit_code
        self.calls: list[str] = []

    def print(self, console=None) -> None:
        print("VERDICT: fake")

    def save_json(self, path) -> None:
        self.calls.append(f"json {path}")

    def plot(self, path) -> None:
        self.calls.append(f"plot {path}")


@pytest.mark.parametrize("code", [0, 1])
def test_validate_exits_with_the_verdict(code, monkeypatch, capsys) -> None:
    report, configs = _Report(code), []

    def fake(config, /, *, progress=None):
        configs.append(config)
        return report

    monkeypatch.setattr(jaxnet.validation, "validate", fake)
    assert main(["validate", "--steps", "3", "--json", "r.json", "--plot", "r.png"]) == code
    assert configs == [dataclasses.replace(ValidateConfig(), steps=3, data="random")]
    assert report.calls == ["json r.json", "plot r.png"]
    assert "VERDICT: fake" in capsys.readouterr().out


def test_usage_errors_exit_2(capsys) -> None:
    for argv in (
        [],
        ["nope"],
        ["train", "--epochs", "two"],
        ["train", "--loss", "nope"],
        ["validate", "--optimizer", "nope"],
        ["train", "--schedule", "nope"],
        ["train", "--loss-opt", "label_smoothing=0.1"],  # validate only
        ["train", "--opt", "lr"],
        ["validate", "--sched-opt", "=1"],
        ["bench", "--batch-sizes", "0,8"],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "error:" in err and "Traceback" not in err, argv
    assert main(["train", "--opt", "lr"]) == 2
    assert "jaxnet train: error: argument --opt: option 'lr' is not KEY=VALUE" in (
        capsys.readouterr().err
    )


# --- no traceback for a bad value of any option: the real library refuses it -----------------


def _train(tmp_path, *args: str) -> list[str]:
    return ["train", "--workdir", str(tmp_path / "run"), "--limit", "64", "--no-progress", *args]


def _validate(*args: str) -> list[str]:
    return ["validate", "--steps", "2", "--batch-size", "2", "--torch-threads", "1", *args]


def _garbage(tmp_path, name: str) -> str:
    path = tmp_path / name
    path.write_text("not what was asked for")
    return str(path)


BAD_INPUTS = {
    "train unknown --opt key": (lambda t: _train(t, "--opt", "bogus=1"), "bogus"),
    "train --opt momentum=abc": (lambda t: _train(t, "--opt", "momentum=abc"), "momentum must"),
    "train --opt lr=abc": (lambda t: _train(t, "--opt", "lr=abc"), "lr must be a number"),
    "train --lr -1": (lambda t: _train(t, "--lr", "-1"), "--lr must be"),
    "train --limit 0": (lambda t: _train(t, "--limit", "0"), "limit"),
    "train --num-classes 3 on digits": (lambda t: _train(t, "--num-classes", "3"), "num_classes"),
    "train --data not MNIST": (lambda t: _train(t, "--data", str(t)), "MNIST"),
    "train --sched-opt bogus": (
        lambda t: _train(
            t, "--schedule", "step_lr", "--sched-opt", "step_size=1", "--sched-opt", "bogus=1"
        ),
        "bogus",
    ),
    "train step_lr without step_size": (
        lambda t: _train(t, "--schedule", "step_lr"),
        "step_size",
    ),
    "train --batch-size 0": (lambda t: _train(t, "--batch-size", "0"), "--batch-size must be"),
    "train --epochs 0": (lambda t: _train(t, "--epochs", "0"), "epochs"),
    "train missing --data": (lambda t: _train(t, "--data", str(t / "none.npz")), "none.npz"),
    "train --num-processes alone": (lambda t: _train(t, "--num-processes", "2"), "missing"),
    "export missing workdir": (
        lambda t: ["export", str(t / "x.pt"), "--workdir", str(t / "none")],
        "no checkpoints",
    ),
    "features missing workdir": (
        lambda t: ["features", "--workdir", str(t / "none")],
        "no checkpoints",
    ),
    "import missing weights": (
        lambda t: ["import", str(t / "none.pt"), "--workdir", str(t / "run")],
        "none.pt",
    ),
    "import not a weight file": (
        lambda t: ["import", _garbage(t, "w.safetensors"), "--workdir", str(t / "run")],
        "w.safetensors",
    ),
    "tutorial --lr -1": (lambda t: ["tutorial", "--lr", "-1"], "learning rate"),
    "validate --steps 0": (lambda t: _validate("--steps", "0"), "steps"),
    "validate --batch-size 0": (lambda t: _validate("--batch-size", "0"), "batch_size"),
    "validate bad --loss-opt": (lambda t: _validate("--loss-opt", "reduction=none"), "scalar"),
    "validate unknown --loss-opt": (lambda t: _validate("--loss-opt", "bogus=1"), "bogus"),
    "validate unknown --opt key": (lambda t: _validate("--opt", "bogus=1"), "bogus"),
    "validate --sched-opt bogus": (
        lambda t: _validate(
            "--schedule", "step_lr", "--sched-opt", "step_size=1", "--sched-opt", "bogus=1"
        ),
        "bogus",
    ),
    "validate step_lr without step_size": (
        lambda t: _validate("--schedule", "step_lr"),
        "step_size",
    ),
    "validate missing --weights": (
        lambda t: _validate("--weights", str(t / "none.safetensors")),
        "none.safetensors",
    ),
    "validate missing --data": (lambda t: _validate("--data", str(t / "none.npz")), "none.npz"),
    "validate --opt momentum=abc": (lambda t: _validate("--opt", "momentum=abc"), "momentum must"),
    "validate --num-classes 0": (lambda t: _validate("--num-classes", "0"), "num_classes"),
    "validate --record-every 0": (lambda t: _validate("--record-every", "0"), "record_every"),
    "validate --drift-factor 0": (lambda t: _validate("--drift-factor", "0"), "drift_factor"),
    "validate --device nope": (lambda t: _validate("--device", "nope"), "nope"),
    "validate step_size=abc": (
        lambda t: _validate("--schedule", "step_lr", "--sched-opt", "step_size=abc"),
        "step_size",
    ),
    "bench --reps 0": (lambda t: ["bench", "--reps", "0", "--no-torch"], "reps"),
    "summary --num-classes 0": (lambda t: ["summary", "--num-classes", "0"], "num_classes >= 1"),
    "train --per-example-grad-norms -1": (
        lambda t: _train(t, "--per-example-grad-norms", "-1"),
        "--per-example-grad-norms must be",
    ),
    "train --early-stopping 0": (lambda t: _train(t, "--early-stopping", "0"), "--early-stopping"),
    "train --lr inf": (lambda t: _train(t, "--lr", "inf"), "finite"),
    "train --seed 2**64": (lambda t: _train(t, "--seed", str(2**64)), "--seed must be"),
    "train --workdir a file": (
        lambda t: ["train", "--workdir", _garbage(t, "file.txt"), "--no-progress"],
        "is a file",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_values_exit_2_without_a_traceback(case, tmp_path, capsys) -> None:
    argv, needle = BAD_INPUTS[case]
    argv = argv(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"jaxnet {argv[0]}: error: "), err
    assert (needle or "") in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()  # nothing was written


# --- the commands that run in a blink --------------------------------------------------------


def test_summary_and_tutorial_run(capsys) -> None:
    assert main(["summary"]) == 0
    assert "6,456,942" in capsys.readouterr().out
    assert main(["tutorial", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    before = float(out.split("L1 loss before:")[1].split()[0])
    after = float(out.split("L1 loss after:")[1].split()[0])
    assert after < before


def test_signal_exit() -> None:
    assert cli.signal_exit("SIGTERM") == 128 + signal.SIGTERM == 143
    assert cli.signal_exit(None) == cli.signal_exit("SIGINT") == 130


def test_python_dash_m_is_the_same_command() -> None:
    import subprocess

    out = subprocess.run(
        [sys.executable, "-m", "jaxnet", "train", "--opt", "lr"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "jaxnet train: error:" in out.stderr
    assert out.stdout == "" and "Traceback" not in out.stderr


# ---------------------------------------------------------------------------------------------
# from test_export_features.py (library side: test_workdir.py, test_features.py)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_cli_export_and_import(reference_run, tmp_path: Path, suffix: str, capsys):
    workdir, _ = reference_run
    out = tmp_path / f"net{suffix}"
    assert main(["export", str(out), "--workdir", str(workdir)]) == 0
    assert "inputs are (x - " in capsys.readouterr().out
    # The file is the best params, in torch's layout, bit for bit.
    params, _, _ = load_params(workdir, "best")
    written = jaxnet.params_from_torch(out)
    for a, b in zip(jax.tree.leaves(written), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    again = tmp_path / "imported"
    assert main(["import", str(out), "--workdir", str(again)]) == 0
    imported, config, _ = load_params(again, "best")
    assert config.num_classes == 2
    for a, b in zip(jax.tree.leaves(imported), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    capsys.readouterr()
    # No silent overwrite: the occupied workdir is bad input.
    assert main(["import", str(out), "--workdir", str(again)]) == CheckpointError.exit_code
    assert "--overwrite" in capsys.readouterr().err


def test_cli_export_of_a_missing_run_is_a_clear_error(tmp_path: Path, capsys):
    args = ["export", str(tmp_path / "x.pt"), "--workdir", str(tmp_path / "none")]
    assert main(args) == CheckpointError.exit_code
    assert "no checkpoints at" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_cli_features_writes_the_png(reference_run, tmp_path: Path):
    workdir, _ = reference_run
    out = tmp_path / "features.png"
    assert main(["features", "--workdir", str(workdir), "--index", "3", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# from test_train_job.py (library side: test_train.py, test_optim.py)
# ---------------------------------------------------------------------------------------------


def test_sigint_saves_and_exits_cleanly(tmp_path: Path, monkeypatch, capsys):
    signal_after_step(monkeypatch, signal.SIGINT, at_step=5)
    argv = [
        "train",
        "--workdir",
        str(tmp_path),
        "--limit",
        str(SMALL.limit),
        "--batch-size",
        str(SMALL.batch_size),
        "--no-progress",
    ]
    before = signal.getsignal(signal.SIGINT)  # pytest's, or SIG_IGN under nohup / `&`
    assert main(argv) == 130  # no KeyboardInterrupt, the conventional status of SIGINT
    assert "interrupted by SIGINT at step 5" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is before  # the handler from before the run
    with Checkpoints(tmp_path / "checkpoints") as ckpts:
        step, meta = ckpts.read_meta("last")
    assert step == 5 and meta["epoch"] == 1 and meta["partial"]["batches_done"] == 5


def test_cli_optimizer_options_parse():
    args = build_parser().parse_args(["train", "--opt", "dampening=0.5", "--weight-decay", "0"])
    assert dict(args.opt) == {"dampening": 0.5}


# ---------------------------------------------------------------------------------------------
# from test_host.py
# ---------------------------------------------------------------------------------------------


def test_train_and_bench_tune_malloc_unless_told_not_to():
    for command in ("train", "bench"):
        assert build_parser().parse_args([command]).malloc_defaults is False
        assert build_parser().parse_args([command, "--malloc-defaults"]).malloc_defaults is True


# ---------------------------------------------------------------------------------------------
# from test_fast_step.py (library side: test_bench.py, which runs the benchmark itself)
# ---------------------------------------------------------------------------------------------


def test_cli_bench_passes_its_options_and_writes_json(tmp_path, capsys, monkeypatch):
    from jaxnet import bench

    seen = []

    def fake_run_bench(cfg, log=print):  # the benchmark itself: test_bench.py
        seen.append(cfg)
        return {"machine": {}, "config": {}, "batches": []}

    monkeypatch.setattr(bench, "run_bench", fake_run_bench)
    monkeypatch.setattr(bench, "format_results", lambda results: "TABLE jaxnet / torch")
    path = tmp_path / "out" / "bench.json"
    argv = ["bench", "--batch-sizes", "2", "--reps", "1", "--warmup", "0", "--min-rep-s", "0"]
    argv += ["--scan-steps", "2", "--no-torch-compile", "--malloc-defaults", "--json", str(path)]
    assert main(argv) == 0
    assert seen == [
        bench.BenchConfig(
            batch_sizes=(2,), reps=1, warmup=0, min_rep_s=0, scan_steps=2, torch_compile=False
        )
    ]
    assert "TABLE jaxnet / torch" in capsys.readouterr().out
    results = json.loads(path.read_text())
    assert results["machine"]["malloc_tuned"] is False  # --malloc-defaults: left as it is
    assert [p.name for p in path.parent.iterdir()] == ["bench.json"]  # no temporary left


# ---------------------------------------------------------------------------------------------
# A CLI that explains itself: defaults, version, bare jaxnet, did-you-mean, plain output
# ---------------------------------------------------------------------------------------------


def _subparsers():
    parser = build_parser()
    return parser, cli._subparsers(parser)


def test_every_help_shows_every_default(capsys) -> None:
    _, subs = _subparsers()
    for name, sub in subs.items():
        text = " ".join(sub.format_help().split())  # argparse's line breaks undone
        for action in sub._actions:
            default = action.default
            unset = default is None or default is False or default == argparse.SUPPRESS
            if not action.option_strings or unset:  # 0 is a default; an unset flag is not
                continue
            flag = action.option_strings[-1]
            assert action.help, f"jaxnet {name} {flag} has no help"
            if "default" in action.help:  # the help says it in its own words
                continue
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
            assert f"(default: {shown})" in text, f"jaxnet {name} {flag}"
    assert "--workdir WORKDIR metrics, curves, checkpoints (default: runs/default)" in " ".join(
        subs["train"].format_help().split()
    )


def test_version_and_bare_jaxnet(capsys) -> None:
    from jaxnet.export import jaxnet_version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"jaxnet {jaxnet_version()}"
    assert main([]) == 2  # nothing was run: a usage error, with the whole help to read
    out, err = capsys.readouterr()
    assert out.startswith("usage: jaxnet") and "predict" in out and "exit status" in out
    assert err == "jaxnet: error: a command is required (listed above)\n"


@pytest.mark.parametrize(
    ("typo", "meant"),
    [
        ("--work-dir", "--workdir"),
        ("--num_classes", "--num-classes"),
        ("--learning-rate", "--lr"),
        ("--batchsize=8", "--batch-size"),
    ],
)
def test_misspelt_flags_get_the_subcommand_usage_and_a_guess(typo, meant, capsys) -> None:
    assert main(["train", typo, "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: jaxnet train "), err
    assert f"jaxnet train: error: unrecognized arguments: {typo}" in err
    assert f"did you mean {meant} (for {typo.split('=')[0]})?" in err
    assert main(["predict", "--data", "x", "--wieghts", "w.pt"]) == 2
    assert "did you mean --weights" in capsys.readouterr().err
    assert main(["train", "--zzz"]) == 2
    assert "did you mean" not in capsys.readouterr().err  # nothing close: no guess
    assert main(["--verison"]) == 2
    assert "did you mean --version (for --verison)?" in capsys.readouterr().err
    assert main(["trian", "--epochs", "1"]) == 2
    assert "jaxnet: error: unknown command 'trian' (choose from summary, " in (
        err := capsys.readouterr().err
    ) and err.endswith("; did you mean train?\n")


def test_train_ends_with_the_workdir_and_its_files(tmp_path) -> None:
    for name in ("metrics.jsonl", "curves.png", "checkpoints/best", "checkpoints/last"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "checkpoints" / "last").rmdir()  # say, an imported run
    lines = cli._written(tmp_path, 5).splitlines()
    assert lines[0] == f"workdir {tmp_path}:"
    assert [line.split()[0] for line in lines[1:]] == [
        str(tmp_path / n) for n in ("metrics.jsonl", "curves.png", "checkpoints/best")
    ]
    assert "epoch 5" in lines[3]


def test_train_output_to_a_file_is_plain_lines(tmp_path, capsys) -> None:
    """stdout not a terminal: no progress bars dumped at the end, no wrapping, no trailing
    spaces; the end names every file written."""
    workdir = tmp_path / "run"
    argv = ["train", "--workdir", str(workdir), "--limit", "64", "--batch-size", "16"]
    assert main([*argv, "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert not any(line != line.rstrip() for line in lines), out
    assert "━" not in out and "samples/s" not in out  # no progress bar
    (diagnosis,) = [line for line in lines if line.startswith("diagnosis: ")]
    assert diagnosis.endswith(")") and len(diagnosis) > 80  # one line, not wrapped at 80
    assert f"workdir {workdir}:" in out
    for name in ("metrics.jsonl", "curves.png", "checkpoints/best", "checkpoints/last"):
        assert f"  {workdir / name}  (" in out, name
