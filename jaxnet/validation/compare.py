"""The comparison maths: how far apart the runs are, and the verdict figures (float32: first
step and drift against the noise floor; float64: the worst relative difference)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["TINY", "drift_check", "float64_check"]

F32_EPS = float(np.finfo(np.float32).eps)  # 2**-23
TINY = 2.0**-24
"""The smallest relative distance float32 can resolve (the floor below a noise floor)."""

_PAIRS = (("jax", "torch32"), ("jax", "torch64"), ("torch32", "torch64"))


def _pairs(runs: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The pairs of ``_PAIRS`` whose two runs are both there (float64 checks: jax, torch64)."""
    return [(a, b) for a, b in _PAIRS if a in runs and b in runs]


def _diff(a: Any, b: Any, scale: float) -> dict[str, float]:
    """max|a - b| and that relative to ``scale`` = max|reference| (elementwise ratios explode
    where the reference is ~0)."""
    d = float(np.max(np.abs(np.subtract(a, b, dtype=np.float64))))
    return {"max_abs": d, "max_rel": _ratio(d, scale), "scale": scale}


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def _compare_group(
    group: Mapping[str, Mapping[str, np.ndarray]], scratch: dict[str, np.ndarray]
) -> dict[str, dict[str, Any]]:
    """Per-tensor max abs/rel and the overall relative L2 distance for each pair of runs.

    Differences against the float64 run are taken in float64 (in a reused scratch buffer: this
    runs on 6.4 M values three times per step); jax vs torch float32 in float32, whose
    difference of nearby float32 values is exact or off by half an ulp of the difference.
    """
    ref = group["torch64"]
    keys = list(ref)
    scales = {k: float(np.max(np.abs(ref[k]))) for k in keys}
    norms = {k: math.sqrt(float(np.dot(ref[k].ravel(), ref[k].ravel()))) for k in keys}
    norm = math.sqrt(sum(n * n for n in norms.values()))
    out = {}
    for pa, pb in _pairs(group):
        leaves, total = {}, 0.0
        for k in keys:
            a, b = group[pa][k], group[pb][k]
            if a.dtype == b.dtype == np.float32:
                d = np.abs(a - b).ravel()
            else:
                d = scratch.setdefault(k, np.empty(a.shape, np.float64)).ravel()
                np.subtract(a.ravel(), b.ravel(), out=d)
                np.abs(d, out=d)
            sq = float(np.dot(d, d))  # float32 accumulation suffices for a norm
            total += sq
            m = float(np.max(d)) if d.size else 0.0
            leaves[k] = {
                "max_abs": m,
                "max_rel": _ratio(m, scales[k]),
                "scale": scales[k],
                "rel_l2": _ratio(math.sqrt(sq), norms[k]),
            }
        out[f"{pa}_vs_{pb}"] = {
            "leaves": leaves,
            "max_abs": max(v["max_abs"] for v in leaves.values()),
            "max_rel": max(v["max_rel"] for v in leaves.values()),
            "rel_l2": _ratio(math.sqrt(total), norm),
        }
    return out


def _compare(
    runs: Mapping[str, Mapping[str, Any]], scratch: dict[str, np.ndarray]
) -> dict[str, Any]:
    """Differences of the runs, pair by pair; relative figures are relative to the PyTorch
    float64 run (max_rel: to its max |value| per tensor; rel_l2: to its L2 norm)."""
    rec: dict[str, Any] = {"loss": {r: runs[r]["loss"] for r in runs}}
    groups = {
        g: _compare_group({r: runs[r][g] for r in runs}, scratch) for g in ("grads", "params")
    }
    ref_out = runs["torch64"]["outputs"]
    out_scale = float(np.max(np.abs(ref_out)))
    out_norm = float(np.linalg.norm(ref_out))
    for pa, pb in _pairs(runs):
        key = f"{pa}_vs_{pb}"
        a, b = runs[pa], runs[pb]
        entry: dict[str, Any] = {
            "loss": _diff(a["loss"], b["loss"], abs(runs["torch64"]["loss"])),
            "outputs": _diff(a["outputs"], b["outputs"], out_scale),
            "outputs_rel_l2": _ratio(
                float(np.linalg.norm(np.subtract(a["outputs"], b["outputs"], dtype=np.float64))),
                out_norm,
            ),
        }
        for g in ("grads", "params"):
            grp = groups[g][key]
            entry[g] = grp["leaves"]
            entry[f"{g}_max_abs"] = grp["max_abs"]
            entry[f"{g}_max_rel"] = grp["max_rel"]
            entry[f"{g}_rel_l2"] = grp["rel_l2"]
        rec[key] = entry
    return rec


def _first_step_check(rec: Mapping[str, Any]) -> tuple[float, str]:
    """Worst ratio of jax's error to torch float32's round-off (plus one ulp), and where.

    Outputs, loss and gradients are compared as computed from the identical start. The
    update is compared given jaxnet's own gradients (``rec["update"]``): Adam/RMSprop divide
    by ``sqrt(v) + eps``, so a gradient near ``eps`` turns its own round-off into ~lr/100 of
    update, in torch as much as in jaxnet, and which weights those are is a lottery. Judging
    the optimizer on the same gradients keeps the check at round-off.
    """
    ours, floor = rec["jax_vs_torch64"], rec["torch32_vs_torch64"]
    items = [("loss", ours["loss"], floor["loss"]), ("outputs", ours["outputs"], floor["outputs"])]
    items += [(f"grads[{k}]", ours["grads"][k], floor["grads"][k]) for k in ours["grads"]]
    upd = rec["update"]
    items += [
        (f"update[{k}]", upd["jax_vs_torch64"][k], upd["torch32_vs_torch64"][k])
        for k in upd["jax_vs_torch64"]
    ]
    worst, where = 0.0, ""
    for name, o, f in items:
        allowed = f["max_abs"] + F32_EPS * f["scale"]
        ratio = o["max_abs"] / allowed if allowed > 0 else (0.0 if o["max_abs"] == 0 else math.inf)
        if ratio > worst:
            worst, where = ratio, name
    return worst, where


def _update_check(
    jax_params: Mapping[str, np.ndarray],
    jax_grads: Mapping[str, np.ndarray],
    make_run: Callable[[Any], Any],
) -> dict[str, dict[str, dict[str, float]]]:
    """torch's optimizer (float32 and float64, ``make_run(dtype)``: a fresh ``TorchRun`` from
    the start) applied to jaxnet's first gradients: per tensor, max|jax - torch64| and torch's
    own max|torch32 - torch64|."""
    import torch

    new = {
        name: make_run(dtype).apply(jax_grads)
        for name, dtype in (("torch32", torch.float32), ("torch64", torch.float64))
    }
    ref = new["torch64"]
    out: dict[str, dict[str, dict[str, float]]] = {"jax_vs_torch64": {}, "torch32_vs_torch64": {}}
    for k in ref:
        scale = float(np.max(np.abs(ref[k])))
        out["jax_vs_torch64"][k] = _diff(jax_params[k], ref[k], scale)
        out["torch32_vs_torch64"][k] = _diff(new["torch32"][k], ref[k], scale)
    return out


def drift_check(records: Sequence[Mapping[str, Any]]) -> tuple[float, int]:
    """The worst drift / noise floor over the recorded steps, and its step."""
    drift = np.array([r["jax_vs_torch64"]["params_rel_l2"] for r in records])
    floor = np.array([r["torch32_vs_torch64"]["params_rel_l2"] for r in records])
    ratios = drift / np.maximum(floor, TINY)
    worst = int(np.nanargmax(ratios)) if np.any(np.isfinite(ratios)) else 0
    return float(ratios[worst]), int(records[worst]["step"])


def float64_check(records: Sequence[Mapping[str, Any]]) -> tuple[float, int, str]:
    """The worst relative difference between jaxnet and PyTorch float64 over the recorded
    steps, and its step and quantity: the loss (relative to PyTorch's), and the relative L2
    distances of all outputs, all gradients and all parameters.

    Relative L2 over whole groups, as the float32 drift is judged: per weight, Adam's and
    RMSprop's division by ``sqrt(v) + eps`` magnifies the round-off of a gradient near
    ``eps`` in float64 as in float32 (by ~2**-29 less), so max-abs figures of single weights
    reach ~1e-12 with equal semantics, while a float32 constant anywhere moves the group's
    distance by ~1e-9 or more.
    """
    worst, step, where = 0.0, 0, ""
    for r in records:
        d = r["jax_vs_torch64"]
        items = [
            ("loss", d["loss"]["max_rel"]),
            ("outputs", d["outputs_rel_l2"]),
            ("gradients", d["grads_rel_l2"]),
            ("parameters", d["params_rel_l2"]),
        ]
        for name, value in items:
            if math.isnan(value):  # the first NaN is the worst there is
                return math.nan, int(r["step"]), name
            if value > worst:
                worst, step, where = value, int(r["step"]), name
    return float(worst), step, where
