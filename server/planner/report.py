"""Tables, JSON and plots of the planner's answers. Every table and plot title says
"simulated", and every JSON document carries ``"simulated": true``."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Cell = str | int | float | None
Row = dict[str, Cell]


@dataclass(frozen=True, slots=True)
class Column:
    key: str
    title: str
    fmt: str = ""  # format spec for numbers; "%" shows a ratio as a percentage

    def show(self, value: Cell) -> str:
        if value is None:
            return "-"
        if isinstance(value, str):
            return value
        if self.fmt == "%":
            return f"{100 * value:.0f}%"
        return format(value, self.fmt)


@dataclass(frozen=True, slots=True)
class Table:
    """One answer: a titled table with notes (the load, the model, what was assumed)."""

    title: str
    columns: tuple[Column, ...]
    rows: list[Row] = field(default_factory=list)
    notes: tuple[str, ...] = ()
    label: str = "simulated"  # what the figures are; every planner table carries simulated ones

    def format(self) -> str:
        head = [c.title for c in self.columns]
        body = [[c.show(row.get(c.key)) for c in self.columns] for row in self.rows]
        widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h)
                  for i, h in enumerate(head)]
        lines = [f"{self.title} [{self.label}]"]
        lines.append("  ".join(h.rjust(w) if i else h.ljust(w)
                               for i, (h, w) in enumerate(zip(head, widths, strict=True))))
        lines.append("  ".join("-" * w for w in widths))
        for r in body:
            lines.append("  ".join(v.rjust(w) if i else v.ljust(w)
                                   for i, (v, w) in enumerate(zip(r, widths, strict=True))))
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"title": self.title, "simulated": True, "figures": self.label,
                "notes": list(self.notes), "rows": self.rows}


def write_json(tables: Sequence[Table], path: str | os.PathLike[str], **meta: Any) -> None:
    payload = {"simulated": True, "meta": meta, "tables": [t.to_json() for t in tables]}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, or None where matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


@dataclass(frozen=True, slots=True)
class Panel:
    """One chart: lines (x, y per series) or, with ``bars``, one bar per x label."""

    ylabel: str
    series: Mapping[str, tuple[Sequence[Any], Sequence[Any]]]
    xlabel: str = ""
    bars: bool = False
    percent: bool = False
    logx: bool = False
    logy: bool = False


def plot(path: str | os.PathLike[str], title: str, panels: Sequence[Panel]) -> bool:
    """The panels side by side in one PNG; False when matplotlib is absent."""
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.8), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        _draw(ax, panel)
    fig.suptitle(f"{title} (simulated)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _draw(ax: Any, panel: Panel) -> None:
    width = 0.8 / max(1, len(panel.series))
    for i, (label, (xs, ys)) in enumerate(panel.series.items()):
        values = [float("nan") if y is None else (100 * y if panel.percent else y) for y in ys]
        if panel.bars:
            ax.bar([j + i * width for j in range(len(xs))], values, width, label=label)
            ax.set_xticks([j + width * (len(panel.series) - 1) / 2 for j in range(len(xs))])
            ax.set_xticklabels([str(x) for x in xs], rotation=25, ha="right", fontsize=8)
        elif label.startswith("the seed"):  # a quoted claim, not a simulated figure
            ax.plot(list(xs), values, "k--", marker="s", label=label)
        else:
            ax.plot(list(xs), values, marker="o", label=label)
    if panel.logx:
        ax.set_xscale("log", base=2)
    if panel.logy:
        ax.set_yscale("log")
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel + (" (%)" if panel.percent else ""))
    ax.grid(alpha=0.3)
    if len(panel.series) > 1 or not panel.bars:
        ax.legend(fontsize=7)
