"""`trainer experiment plot`: every trial's objective curve, and the search space against the
objective as parallel coordinates. The data are prepared by pure functions (`objective_curve`,
`parallel_coordinates`) and drawn by `draw` with matplotlib."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from stepstream.kernel.experiment import Distribution

# An eval's values are keyed by Keras' metric names: the objective's short name may differ.
_EVAL_KEYS = {"mae": ("mae", "mean_absolute_error")}


@dataclass(frozen=True)
class Curve:
    """A trial's curve: steps, values, and what the values are."""

    steps: list[int]
    values: list[float]
    label: str


def objective_curve(metrics: Any, objective: str) -> Curve:
    """A trial's curve of its objective from its job's metrics: for val_<m> and test_<m> the
    evaluations' <m> (the validation split's, where there is one; a test value comes only at
    the end), else the per-step loss, accuracy or mae."""
    prefix, _, name = objective.partition("_")
    if prefix in ("val", "test") and name:
        keys = _EVAL_KEYS.get(name, (name,))
        evals = [e for e in metrics.evals if any(k in e.values for k in keys)]
        splits = {e.split for e in evals}
        split = next((s for s in ("validation", "val") if s in splits), None)
        if split is None and splits - {"test"}:
            split = sorted(splits - {"test"})[0]
        split = split or "test"
        points = [
            (e.step, next(e.values[k] for k in keys if k in e.values))
            for e in evals
            if e.split == split
        ]
        points = [(s, v) for s, v in points if math.isfinite(v)]
        return Curve(
            [s for s, _ in points], [v for _, v in points], f"{name} ({split} evaluations)"
        )
    series = {"loss": metrics.loss, "accuracy": metrics.accuracy, "mae": metrics.mae}
    values = series.get(objective, metrics.loss)
    label = objective if objective in series else "loss"
    points = [(s, v) for s, v in zip(metrics.steps, values, strict=False) if math.isfinite(v)]
    return Curve([s for s, _ in points], [v for _, v in points], f"step {label}")


@dataclass(frozen=True)
class Axis:
    """One vertical axis of the parallel coordinates: its name, its scale (linear, log,
    categorical) and its labelled ticks, at positions from 0 to 1."""

    name: str
    scale: str
    ticks: list[tuple[float, str]]


def _label(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return text if len(text) <= 14 else text[:13] + "…"


def _numeric_axis(path: str, dist: Distribution) -> tuple[Axis, Any]:
    low, high = float(dist.low), float(dist.high)  # type: ignore[arg-type]
    if dist.log:

        def place(v: float) -> float:
            return (math.log(v) - math.log(low)) / (math.log(high) - math.log(low))

        middle = math.sqrt(low * high)
    else:

        def place(v: float) -> float:
            return (v - low) / (high - low)

        middle = (low + high) / 2
    ticks = [(place(v), _label(v if dist.kind == "float" else int(v))) for v in (low, high)]
    ticks.insert(1, (0.5, _label(middle)))
    return Axis(path, "log" if dist.log else "linear", ticks), place


def _choice_axis(path: str, dist: Distribution) -> tuple[Axis, Any]:
    choices = dist.choices or []
    spots = {
        json.dumps(c, sort_keys=True): (i / (len(choices) - 1) if len(choices) > 1 else 0.5)
        for i, c in enumerate(choices)
    }
    ticks = [(spots[json.dumps(c, sort_keys=True)], _label(c)) for c in choices]

    def place(v: Any) -> float | None:
        return spots.get(json.dumps(v, sort_keys=True))

    return Axis(path, "categorical", ticks), place


def parallel_coordinates(
    space: dict[str, Any], trials: list[Any], objective: str
) -> tuple[list[Axis], list[tuple[list[float | None], float | None, Any]]]:
    """(axes, lines): an axis per space path, in the spec's order, then the objective's; a line
    per trial, its position on each axis from 0 to 1 (None where it has no value there), its
    objective value, and the trial. Ranges are placed between their ends (on a log scale for a
    log range), choices evenly in their order, the objective between the values seen."""
    axes, places = [], []
    for path, raw in space.items():
        dist = raw if isinstance(raw, Distribution) else Distribution.model_validate(raw)
        axis, place = (_choice_axis if dist.kind == "choice" else _numeric_axis)(path, dist)
        axes.append(axis)
        places.append(place)
    seen = [t.value for t in trials if t.value is not None and math.isfinite(t.value)]
    low, high = (min(seen), max(seen)) if seen else (0.0, 1.0)
    spread = high - low

    def place_value(v: float | None) -> float | None:
        if v is None or not math.isfinite(v):
            return None
        return (v - low) / spread if spread else 0.5

    ticks = [(0.0, _label(low)), (1.0, _label(high))] if spread else [(0.5, _label(low))]
    axes.append(Axis(objective, "linear", ticks if seen else []))
    lines = []
    for t in trials:
        spots: list[float | None] = []
        for path, place in zip(space, places, strict=True):
            value = t.params.get(path)
            try:
                spot = None if value is None else place(value)
            except (TypeError, ValueError):  # a value outside what the axis can place
                spot = None
            spots.append(None if spot is None else min(max(spot, 0.0), 1.0))
        spots.append(place_value(t.value))
        lines.append((spots, t.value, t))
    return axes, lines


def draw(info: Any, curves: dict[int, Curve], path: str) -> None:
    """Left: each trial's objective curve, pruned ones dashed with an x where they stopped;
    right: the parallel coordinates. Lines are coloured by objective value, the best
    brightest; trials without one are grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import cm, colors

    trials = sorted(info.trials, key=lambda t: t.number)
    values = [t.value for t in trials if t.value is not None and math.isfinite(t.value)]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    norm = colors.Normalize(low, high if high > low else low + 1)
    cmap = matplotlib.colormaps["viridis" if info.direction == "maximize" else "viridis_r"]

    def colour(value: float | None) -> Any:
        return cmap(norm(value)) if value is not None and math.isfinite(value) else "0.6"

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5), width_ratios=(1, 1.3))
    label = ""
    for t in trials:
        curve = curves.get(t.number)
        if curve is None or not curve.steps:
            continue
        label = label or curve.label
        pruned = str(t.state) == "PRUNED"
        left.plot(curve.steps, curve.values, "--" if pruned else "-", lw=1.2, color=colour(t.value))
        if pruned:
            left.plot(curve.steps[-1], curve.values[-1], "x", ms=8, color=colour(t.value))
    left.set(xlabel="step", ylabel=label or info.objective, title=f"{info.display_name}: trials")
    left.grid(alpha=0.3)

    axes, lines = parallel_coordinates(info.spec.get("space", {}), trials, info.objective)
    for spots, value, t in lines:
        xs = [i for i, s in enumerate(spots) if s is not None]
        ys = [s for s in spots if s is not None]
        pruned = str(t.state) == "PRUNED"
        right.plot(xs, ys, "--" if pruned else "-", lw=1.2, alpha=0.8, color=colour(value))
    for i, axis in enumerate(axes):
        right.axvline(i, color="0.3", lw=0.8)
        for y, text in axis.ticks:
            right.text(i + 0.03, y, text, fontsize=7, va="center", color="0.2")
    right.set_xticks(range(len(axes)))
    names = [a.name + (" (log)" if a.scale == "log" else "") for a in axes]
    right.set_xticklabels(names, rotation=15, ha="right", fontsize=8)
    right.set_yticks([])
    right.set_xlim(-0.2, len(axes) - 0.5)
    right.set_ylim(-0.05, 1.05)
    right.set_title(f"search space against {info.objective} ({info.direction})")
    if values:
        fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=right, label=info.objective)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
