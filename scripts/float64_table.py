"""Measure every case of ``jaxnet.optim_reference.CASES`` against torch.optim after 100 steps
on the fixed gradient stream, and write ``benchmarks/float64-optimizers.json``.

Per case (max over steps and tensors of ``max|a - b| / max|b|``, b torch's float64 run):

* ``float64``: jaxnet float64 (``jax_enable_x64``) vs torch float64;
* ``torch_foreach_float64``: torch's foreach implementation vs its default for-loop one, both
  float64: how far rounding alone carries the trajectory (large only where it is chaotic);
* ``float32``: jaxnet float32 vs torch float64, next to ``torch_float32``: torch float32 vs
  torch float64 (the float32 noise floor).

Usage: ``python scripts/float64_table.py [--out benchmarks/float64-optimizers.json]``; with
``--markdown``, print the table of an existing ``--out`` for docs/optimizers.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's jaxnet, also when another one is installed

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402

from jaxnet import optim  # noqa: E402
from jaxnet import optim_reference as ref  # noqa: E402

STEPS = 100


def measure(case: tuple) -> dict[str, Any]:
    """The four distances of one case."""
    spec = ref.case_spec(case)
    t64 = ref.run_torch(spec, STEPS, torch.float64)
    with jax.enable_x64(True):
        j64 = ref.run_jax(optim.transform(spec), STEPS, jnp.float64)
    return {
        "case": ref.case_id(case),
        "optimizer": spec.name,
        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in spec.options.items()},
        "schedule": spec.schedule,
        "schedule_options": dict(spec.schedule_options),
        "schedule_every": spec.schedule_every,
        "float64": ref.max_relative_difference(j64, t64),
        "torch_foreach_float64": ref.max_relative_difference(
            ref.run_torch(spec, STEPS, torch.float64, foreach=True), t64
        ),
        "float32": ref.max_relative_difference(
            ref.run_jax(optim.transform(spec), STEPS, jnp.float32), t64
        ),
        "torch_float32": ref.max_relative_difference(
            ref.run_torch(spec, STEPS, torch.float32), t64
        ),
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table of docs/optimizers.md."""
    lines = [
        "| optimizer, options and schedule | float64 | torch foreach vs for-loop, float64 "
        "| float32 | torch float32 |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r[k] for k in ("float64", "torch_foreach_float64", "float32", "torch_float32")]
        lines.append(f"| `{r['case']}` | " + " | ".join(f"{c:.1e}" for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/float64-optimizers.json"))
    parser.add_argument(
        "--markdown", action="store_true", help="print the table of --out (no measuring)"
    )
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.out.read_text())["rows"]))
        return
    rows = []
    for case in ref.CASES:
        row = measure(case)
        rows.append(row)
        print(
            f"{row['case']:70s} f64 {row['float64']:.1e}  "
            f"torch-foreach {row['torch_foreach_float64']:.1e}  "
            f"f32 {row['float32']:.1e}  torch-f32 {row['torch_float32']:.1e}"
        )
    record = {
        "what": f"max relative difference from torch.optim float64 after {STEPS} steps on "
        "jaxnet.optim_reference.gradient_stream (parameters w (40, 30), b (30,))",
        "date": datetime.date.today().isoformat(),
        "command": "python scripts/float64_table.py",
        "versions": {
            "jax": jax.__version__,
            "optax": optax.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "steps": STEPS,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
