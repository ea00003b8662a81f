"""Re-run issue 11's list of bad inputs and faults as a user would (``jaxnet`` subprocesses in
a temporary folder) and print, per case, whether it was handled cleanly, then the count.

Handled cleanly: the exit status the case calls for, no traceback, a failure's stderr ending in
one ``jaxnet <command>: error: ...`` line that says what the case needs it to say, and what
must survive (checkpoints, a user's files, a live run) intact. Not part of pytest (minutes,
and the full-disk and read-only cases mount a tmpfs: root only; skipped otherwise).

    python scripts/fault_sweep.py [--only SUBSTRING] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from the source tree: jaxnet is imported from it
    sys.path.insert(0, str(ROOT))
JAXNET = [sys.executable, "-m", "jaxnet"]
SMALL = ["--limit", "160", "--batch-size", "16", "--no-progress", "--malloc-defaults"]
TIMEOUT = 300


class Case:
    """One fault: ``run(tmp) -> (ok, detail)``."""

    def __init__(self, name: str, run: Callable[[Path], tuple[bool, str]]) -> None:
        self.name, self.run = name, run


def jaxnet(
    *argv: str, cwd: Path | None = None, timeout: float = TIMEOUT
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [*JAXNET, *argv], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env
    )


def clean_failure(p: subprocess.CompletedProcess, code: int, *needles: str) -> tuple[bool, str]:
    """Exit ``code``, no traceback, last stderr line an ``error:`` line holding ``needles``."""
    lines = p.stderr.strip().splitlines()
    last = lines[-1] if lines else ""
    ok = (
        p.returncode == code
        and "Traceback" not in p.stderr
        and ": error: " in last
        and all(n.lower() in last.lower() for n in needles)
    )
    return ok, f"rc={p.returncode} {last[:220]}"


def clean_success(p: subprocess.CompletedProcess, *needles: str) -> tuple[bool, str]:
    out = p.stdout + p.stderr
    ok = p.returncode == 0 and "Traceback" not in out and all(n in out for n in needles)
    tail = (p.stderr.strip().splitlines() or p.stdout.strip().splitlines() or [""])[-1]
    return ok, f"rc={p.returncode} {tail[:220]}"


# --- fixtures --------------------------------------------------------------------------------

_BASE: dict[str, Path] = {}


def base_run(tmp: Path) -> Path:
    """A copy of one small finished run (2 epochs), made once per sweep."""
    if "run" not in _BASE:
        run = tmp.parent / "base-run"
        p = jaxnet("train", "--workdir", str(run), "--epochs", "2", *SMALL)
        assert p.returncode == 0, p.stderr
        _BASE["run"] = run
    dst = tmp / "run"
    shutil.copytree(_BASE["run"], dst)
    return dst


def torch_weights(tmp: Path, name: str, transform: Callable[[dict], object]) -> Path:
    import torch

    from jaxnet.torch_reference import make_torch_net

    path = tmp / name
    obj = transform(make_torch_net(0).state_dict())
    if name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(obj, str(path))
    else:
        torch.save(obj, path)
    return path


def snapshot(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in folder.rglob("*")
        if p.is_file() and p.name != ".jaxnet.lock"
    }


def mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)])
    return p.returncode == 0


def umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


# --- 1. readers during a run -----------------------------------------------------------------


def readers_during_training(tmp: Path, reader: Callable[[int], list[str]]) -> tuple[bool, str]:
    run = tmp / "live"
    argv = [*JAXNET, "train", "--workdir", str(run), "--epochs", "25", "--limit", "400"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    train = subprocess.Popen(
        [*argv, "--no-progress", "--malloc-defaults"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    bad, reads = [], 0
    while train.poll() is None:
        p = jaxnet(*reader(reads + len(bad)), "--workdir", str(run), cwd=tmp)
        if p.returncode == 0:
            reads += 1
        elif not ("no checkpoints at" in p.stderr or "no complete" in p.stderr) or reads:
            bad.append(p.stderr.strip().splitlines()[-1:])
    _, err = train.communicate()
    ok = train.returncode == 0 and not bad and reads > 0
    return ok, f"train rc={train.returncode}, {reads} reads, bad={bad[:2]} {err[-200:]}"


# --- 2./7. read-only and full disks (tmpfs) --------------------------------------------------


def read_only_resume(tmp: Path) -> tuple[bool, str]:
    mnt = tmp / "mnt"
    if not mount_tmpfs(mnt, "400m"):
        return False, "SKIP: cannot mount a tmpfs (not root?)"
    try:
        run = mnt / "run"
        jaxnet("train", "--workdir", str(run), "--epochs", "1", *SMALL)
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        t0 = time.monotonic()
        p = jaxnet("train", "--workdir", str(run), "--epochs", "2", "--resume", *SMALL, timeout=120)
        ok, detail = clean_failure(p, 2, "cannot be written", "Read-only")
        return ok, f"{detail} ({time.monotonic() - t0:.0f} s)"
    except subprocess.TimeoutExpired:
        return False, "hung (timeout)"
    finally:
        umount(mnt)


def full_disk(tmp: Path) -> tuple[bool, str]:
    mnt = tmp / "mnt"
    if not mount_tmpfs(mnt, "110m"):  # epoch 1's best + last fit, epoch 2's last does not
        return False, "SKIP: cannot mount a tmpfs (not root?)"
    try:
        run = mnt / "run"
        p = jaxnet("train", "--workdir", str(run), "--epochs", "3", *SMALL, timeout=240)
        ok, detail = clean_failure(p, 1, "no space left", "last good checkpoint is", "--resume")
        subprocess.run(["mount", "-o", "remount,size=600m", str(mnt)], check=True)
        q = jaxnet("train", "--workdir", str(run), "--epochs", "3", "--resume", *SMALL)
        resumed, how = clean_success(q)
        return ok and resumed, f"{detail} | resume {how}"
    except subprocess.TimeoutExpired:
        return False, "hung (timeout)"
    finally:
        umount(mnt)


# --- 3. corrupt bytes ------------------------------------------------------------------------


def byte_flip(tmp: Path, where: float, command: str) -> tuple[bool, str]:
    run = base_run(tmp)
    which = "last" if command == "resume" else "best"
    files = [p for p in (run / "checkpoints" / which).rglob("*") if p.is_file()]
    largest = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[int(len(data) * where)] ^= 0x40
    largest.write_bytes(bytes(data))
    if command == "resume":
        before = snapshot(run)
        p = jaxnet("train", "--workdir", str(run), "--epochs", "3", "--resume", *SMALL)
        ok, detail = clean_failure(p, 2, "is corrupt")
        return ok and snapshot(run) == before, detail
    p = jaxnet("export", str(tmp / "w.pt"), "--workdir", str(run), "--which", which)
    ok, detail = clean_failure(p, 2, "is corrupt")
    return ok and not (tmp / "w.pt").exists(), detail


# --- 4./5./6. deleting, second writer, non-finite --------------------------------------------


def resume_imported(tmp: Path) -> tuple[bool, str]:
    weights = torch_weights(tmp, "w.pt", lambda sd: sd)
    run = tmp / "imported"
    jaxnet("import", str(weights), "--workdir", str(run))
    p = jaxnet("train", "--workdir", str(run), "--epochs", "1", "--resume", *SMALL)
    ok, detail = clean_success(p, "starting a new run from the weights in")
    best = sorted(x.name for x in (run / "checkpoints" / "best").iterdir())
    return ok and best in (["0"], ["1"]), f"{detail}; best/ holds {best}"


def second_writer(tmp: Path) -> tuple[bool, str]:
    run = tmp / "live"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [*JAXNET, "train", "--workdir", str(run), "--epochs", "30", *SMALL]
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        while not (run / ".jaxnet.lock").exists() and first.poll() is None:
            time.sleep(0.2)
        time.sleep(1)
        p = jaxnet("train", "--workdir", str(run), "--epochs", "30", "--resume", *SMALL)
        ok, detail = clean_failure(p, 2, f"in use by pid {first.pid}")
        read = jaxnet("features", "--workdir", str(run), "--out", str(tmp / "f.png"))
        alive = first.poll() is None
        return ok and alive, f"{detail}; first run alive: {alive}; reader rc={read.returncode}"
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait()


def nan_params_one_step_epochs(tmp: Path) -> tuple[bool, str]:
    run = tmp / "nan"
    argv = ["--limit", "40", "--batch-size", "32", "--lr", "1e30", "--epochs", "3"]
    p = jaxnet("train", "--workdir", str(run), *argv, "--no-progress", "--malloc-defaults")
    ok, detail = clean_failure(p, 1, "training stopped")
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []

    def refuse(c: str) -> None:
        raise ValueError(c)

    try:
        [json.loads(line, parse_constant=refuse) for line in lines]
    except ValueError:
        return False, f"{detail}; metrics.jsonl is not valid JSON"
    e = jaxnet("export", str(tmp / "w.pt"), "--workdir", str(run))
    if e.returncode == 0:  # what was saved must import back
        i = jaxnet("import", str(tmp / "w.pt"), "--workdir", str(tmp / "back"))
        ok = ok and i.returncode == 0
    return ok, f"{detail}; export rc={e.returncode}"


# --- 8./9. bad inputs: one command each ------------------------------------------------------


def _file(tmp: Path, name: str, data: bytes = b"") -> str:
    (tmp / name).write_bytes(data)
    return str(tmp / name)


def _npy(tmp: Path) -> str:
    np.save(tmp / "x.npy", np.zeros((8, 32, 32), np.float32))
    return str(tmp / "x.npy")


def _zip_not_array(tmp: Path) -> str:
    with zipfile.ZipFile(tmp / "d.npz", "w") as z:
        z.writestr("x.npy", b"not an array")
        z.writestr("y.npy", b"nor this")
    return str(tmp / "d.npz")


def _idx_overflow(tmp: Path) -> str:
    folder = tmp / "mnist"
    folder.mkdir()
    header = bytes([0, 0, 0x08, 3]) + (2**31).to_bytes(4, "big") * 3
    (folder / "train-images-idx3-ubyte").write_bytes(header + bytes(10))
    (folder / "train-labels-idx1-ubyte").write_bytes(bytes([0, 0, 0x08, 1, 0, 0, 0, 1, 0]))
    return str(folder)


def _workdir_checkpoints_file(tmp: Path) -> str:
    (tmp / "w").mkdir()
    (tmp / "w" / "checkpoints").write_text("x")
    return str(tmp / "w")


def _sd(transform: Callable) -> Callable[[dict], dict]:
    def apply(sd: dict) -> dict:
        sd = dict(sd)
        sd["fc2.bias"] = transform(sd["fc2.bias"])
        return sd

    return apply


def _torch() -> object:
    import torch

    return torch


T = ["train", "--epochs", "1", *SMALL]
# name: (argv from tmp, exit status, what the error line must say)
COMMANDS: dict[str, tuple[Callable[[Path], list[str]], int, tuple[str, ...]]] = {
    "step_lr without step_size": (
        lambda t: [*T, "--workdir", str(t / "r"), "--schedule", "step_lr"],
        2,
        ("step_size",),
    ),
    "--sched-opt bogus=1": (
        lambda t: [
            *T,
            "--workdir",
            str(t / "r"),
            "--schedule",
            "step_lr",
            "--sched-opt",
            "step_size=1",
            "--sched-opt",
            "bogus=1",
        ],
        2,
        ("bogus",),
    ),
    "--sched-opt T_max=abc": (
        lambda t: [
            *T,
            "--workdir",
            str(t / "r"),
            "--schedule",
            "cosine_annealing_lr",
            "--sched-opt",
            "T_max=abc",
        ],
        2,
        ("T_max",),
    ),
    "--opt momentum=abc": (
        lambda t: [*T, "--workdir", str(t / "r"), "--opt", "momentum=abc"],
        2,
        ("momentum",),
    ),
    "--opt momentum=[1,2]": (
        lambda t: [*T, "--workdir", str(t / "r"), "--opt", "momentum=[1,2]"],
        2,
        ("momentum",),
    ),
    "empty .pt: import": (
        lambda t: ["import", _file(t, "e.pt"), "--workdir", str(t / "r")],
        2,
        ("e.pt",),
    ),
    "empty .pt: validate": (
        lambda t: ["validate", "--weights", _file(t, "e.pt"), "--steps", "1"],
        2,
        ("e.pt",),
    ),
    ".npy as --data": (lambda t: [*T, "--workdir", str(t / "r"), "--data", _npy(t)], 2, ("x.npy",)),
    "zip member not an array": (
        lambda t: [*T, "--workdir", str(t / "r"), "--data", _zip_not_array(t)],
        2,
        ("not .npy arrays",),
    ),
    "workdir is a file": (lambda t: [*T, "--workdir", _file(t, "f.txt", b"x")], 2, ("is a file",)),
    "checkpoints is a file": (
        lambda t: [*T, "--workdir", _workdir_checkpoints_file(t)],
        2,
        ("is a file",),
    ),
    "huge --seed": (
        lambda t: [*T, "--workdir", str(t / "r"), "--seed", str(2**70)],
        2,
        ("--seed",),
    ),
    "summary --num-classes 0": (lambda t: ["summary", "--num-classes", "0"], 2, ("num",)),
    "tutorial --lr nan": (lambda t: ["tutorial", "--lr", "nan"], 2, ("learning rate",)),
    "sparse tensor": (
        lambda t: [
            "import",
            str(torch_weights(t, "s.pt", _sd(lambda x: x.to_sparse()))),
            "--workdir",
            str(t / "r"),
        ],
        2,
        ("sparse",),
    ),
    "float8 tensor": (
        lambda t: [
            "import",
            str(torch_weights(t, "f8.pt", _sd(lambda x: x.to(_torch().float8_e4m3fn)))),
            "--workdir",
            str(t / "r"),
        ],
        2,
        ("float8",),
    ),
    "meta tensor": (
        lambda t: [
            "import",
            str(torch_weights(t, "m.pt", _sd(lambda x: _torch().empty(x.shape, device="meta")))),
            "--workdir",
            str(t / "r"),
        ],
        2,
        ("meta tensor",),
    ),
    "--batch-size 0": (
        lambda t: [*T, "--workdir", str(t / "r"), "--batch-size", "0"],
        2,
        ("--batch-size must be",),
    ),
    "--batch-size -1": (
        lambda t: [*T, "--workdir", str(t / "r"), "--batch-size", "-1"],
        2,
        ("--batch-size must be",),
    ),
    "--early-stopping -1": (
        lambda t: [*T, "--workdir", str(t / "r"), "--early-stopping", "-1"],
        2,
        ("--early-stopping",),
    ),
    "--per-example-grad-norms -5": (
        lambda t: [*T, "--workdir", str(t / "r"), "--per-example-grad-norms", "-5"],
        2,
        ("--per-example-grad-norms",),
    ),
    "--lr inf": (lambda t: [*T, "--workdir", str(t / "r"), "--lr", "inf"], 2, ("finite",)),
    "IDX overflow": (
        lambda t: [*T, "--workdir", str(t / "r"), "--data", _idx_overflow(t)],
        2,
        ("train-images-idx3-ubyte",),
    ),
    "import --data missing": (
        lambda t: [
            "import",
            str(torch_weights(t, "w.pt", lambda sd: sd)),
            "--workdir",
            str(t / "r"),
            "--data",
            str(t / "none.npz"),
        ],
        2,
        ("none.npz",),
    ),
}
# name: (argv from tmp, what stdout/stderr must say), exit status 0
WORKS: dict[str, tuple[Callable[[Path], list[str]], tuple[str, ...]]] = {
    "tutorial checkpoint dict": (
        lambda t: [
            "import",
            str(
                torch_weights(
                    t,
                    "c.pt",
                    lambda sd: {
                        "epoch": 3,
                        "model_state_dict": sd,
                        "optimizer_state_dict": {},
                        "loss": 0.1,
                    },
                )
            ),
            "--workdir",
            str(t / "r"),
        ],
        ("'model_state_dict' entry",),
    ),
    "{'state_dict': ...}": (
        lambda t: [
            "import",
            str(torch_weights(t, "c.pt", lambda sd: {"state_dict": sd})),
            "--workdir",
            str(t / "r"),
        ],
        ("'state_dict' entry",),
    ),
    "bf16 .safetensors": (
        lambda t: [
            "import",
            str(
                torch_weights(
                    t,
                    "b.safetensors",
                    lambda sd: {k: v.bfloat16().contiguous() for k, v in sd.items()},
                )
            ),
            "--workdir",
            str(t / "r"),
        ],
        (),
    ),
}


def command_case(name: str) -> Case:
    argv, code, needles = COMMANDS[name]

    def run(tmp: Path) -> tuple[bool, str]:
        p = jaxnet(*argv(tmp), cwd=tmp)
        ok, detail = clean_failure(p, code, *needles)
        return ok and not (tmp / "r").exists(), detail

    return Case(name, run)


def works_case(name: str) -> Case:
    argv, needles = WORKS[name]
    return Case(name, lambda tmp: clean_success(jaxnet(*argv(tmp), cwd=tmp), *needles))


def changed_labels_on_resume(tmp: Path) -> tuple[bool, str]:
    rng = np.random.default_rng(0)
    x, y = rng.random((60, 32, 32), np.float32), rng.integers(0, 2, 60)
    np.savez(tmp / "d.npz", x=x, y=y)
    run, data = tmp / "run", ["--data", str(tmp / "d.npz"), "--batch-size", "16", "--no-progress"]
    jaxnet("train", "--workdir", str(run), "--epochs", "1", *data, "--malloc-defaults")
    np.savez(tmp / "d.npz", x=x, y=1 - y)
    p = jaxnet("train", "--workdir", str(run), "--epochs", "2", "--resume", *data)
    return clean_failure(p, 2, "fingerprint", "data differs")


def overwrite_user_file(tmp: Path) -> tuple[bool, str]:
    run = base_run(tmp)
    mine = run / "checkpoints" / "my-notes.txt"
    mine.write_text("mine")
    p = jaxnet("train", "--workdir", str(run), "--epochs", "1", "--overwrite", *SMALL)
    ok, detail = clean_failure(p, 2, "my-notes.txt", "did not write")
    return ok and mine.read_text() == "mine" and (run / "checkpoints" / "last").is_dir(), detail


def resume_without_num_classes(tmp: Path) -> tuple[bool, str]:
    run = tmp / "ten"
    jaxnet("train", "--workdir", str(run), "--epochs", "1", "--num-classes", "10", *SMALL)
    p = jaxnet("train", "--workdir", str(run), "--epochs", "2", "--resume", *SMALL)
    ok, detail = clean_failure(p, 2, "num_classes: checkpoint 10, now 2")
    clean = not any(w in p.stderr for w in ("corrupt", "Delete", "Event loop"))
    return ok and clean, detail


def sigint_test_with_sigint_ignored(tmp: Path) -> tuple[bool, str]:
    code = (
        "import signal, sys, pytest; signal.signal(signal.SIGINT, signal.SIG_IGN); "
        "sys.exit(pytest.main(['-q', '-x', '-p', 'no:cacheprovider', 'tests/test_cli.py', "
        "'-k', 'sigint_saves']))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    return p.returncode == 0, (p.stdout.strip().splitlines() or [""])[-1]


def cases() -> list[Case]:
    found = [
        Case(
            "export while training",
            lambda t: readers_during_training(
                t, lambda i: ["export", f"w{i}.pt", "--which", "last"]
            ),
        ),
        Case(
            "features while training",
            lambda t: readers_during_training(
                t, lambda i: ["features", "--which", "last", "--out", f"f{i}.png"]
            ),
        ),
        Case("--resume into a read-only workdir", read_only_resume),
        *[
            Case(f"byte flip {i} ({cmd})", lambda t, w=w, cmd=cmd: byte_flip(t, w, cmd))
            for i, (w, cmd) in enumerate(
                [(0.5, "export"), (0.25, "export"), (0.75, "resume"), (0.9, "resume")]
            )
        ],
        Case("--resume with best/ but no last/", resume_imported),
        Case("a second writer", second_writer),
        Case("NaN params, one step per epoch", nan_params_one_step_epochs),
        Case("a full disk", full_disk),
        *[command_case(n) for n in COMMANDS],
        *[works_case(n) for n in WORKS],
        Case("changed labels on --resume", changed_labels_on_resume),
        Case("--overwrite with a user's file in checkpoints/", overwrite_user_file),
        Case("--resume without --num-classes 10", resume_without_num_classes),
        Case("the SIGINT test with SIGINT ignored", sigint_test_with_sigint_ignored),
    ]
    return found


def costs() -> dict[str, float]:
    """What the guards cost, in this process (minimum of repeats, ms): the NaN/inf check of
    the params before a save, and the checksums of a save of params + SGD momentum."""
    import jax

    from jaxnet.checkpoint import checksums
    from jaxnet.model import Net, init_params
    from jaxnet.train import _all_finite

    params = init_params(Net(), jax.random.key(0))
    state = {"params": params, "momentum": params}

    def best_ms(f: Callable[[], object], n: int) -> float:
        f()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return round(min(times) * 1e3, 2)

    return {
        "all_finite_params_ms": best_ms(lambda: bool(_all_finite(params)), 20),
        "checksums_params_and_momentum_ms": best_ms(lambda: checksums(state), 7),
        "cpus": os.cpu_count() or 0,
        "load_average_1min": round(os.getloadavg()[0], 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the cases whose name holds this")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="jaxnet-fault-sweep-"))
    handled = tried = 0
    records = []
    try:
        for i, case in enumerate(c for c in cases() if args.only in c.name):
            tmp = root / f"case{i:02d}"
            tmp.mkdir()
            t0 = time.monotonic()
            try:
                ok, detail = case.run(tmp)
            except Exception as e:  # the sweep itself must go on: count it as not handled
                ok, detail = False, f"sweep error: {type(e).__name__}: {e}"
            if detail.startswith("SKIP"):
                print(f"skip  {case.name}: {detail}", flush=True)
                continue
            tried += 1
            handled += ok
            seconds = time.monotonic() - t0
            records.append({"case": case.name, "handled": ok, "detail": detail, "seconds": seconds})
            mark = "ok  " if ok else "FAIL"
            print(f"{mark}  {case.name} ({seconds:.0f} s): {detail}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"handled cleanly: {handled}/{tried}")
    if args.json:
        from jaxnet.io import atomic_write

        result = {
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "command": "python scripts/fault_sweep.py",
            "handled": handled,
            "tried": tried,
            "costs": costs(),
            "cases": records,
        }
        text = json.dumps(result, indent=1) + "\n"
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(text))
    return 0 if handled == tried else 1


if __name__ == "__main__":
    sys.exit(main())
