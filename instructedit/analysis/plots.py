"""Figures of the analysis studies as PNG files (matplotlib's object API on the Agg canvas; no pyplot state)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import NullFormatter, StrMethodFormatter

from instructedit.io import atomic_write

# One colour per task in every figure, so panels and studies can be compared at a glance.
TASK_COLORS = {"counterfact": "tab:blue", "wikirecent": "tab:orange", "convsent": "tab:green", "zsre": "tab:red"}
METRIC_COLORS = {"reliability": "tab:blue", "generalization": "tab:orange", "locality": "tab:green", "portability": "tab:purple"}
SEEN_COLOR, UNSEEN_COLOR = "tab:blue", "tab:red"
DPI = 150


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))


def _task_color(task: str, index: int) -> str:
    return TASK_COLORS.get(task, f"C{index % 10}")


def scatter_tasks(ax: Any, coords: np.ndarray, tasks: Sequence[str], title: str, subtitle: str = "", axis_name: str = "dim") -> None:
    """One point per edit in 2-D, coloured by task, with a legend giving each task's count."""
    tasks_arr = np.asarray(tasks)
    for i, task in enumerate(dict.fromkeys(tasks)):
        mask = tasks_arr == task
        ax.scatter(coords[mask, 0], coords[mask, 1], s=14, alpha=0.75, color=_task_color(task, i),
                   label=f"{task} (n={int(mask.sum())})", edgecolors="none")
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""), fontsize=11)
    ax.set_xlabel(f"{axis_name} 1")
    ax.set_ylabel(f"{axis_name} 2")
    ax.legend(fontsize=8, loc="best", frameon=True, markerscale=1.5)
    ax.grid(alpha=0.25)


def gradient_scatter(path: str | Path, coords: np.ndarray, tasks: Sequence[str], title: str, subtitle: str, axis_name: str) -> Path:
    """A single editor's embedded MEND updates."""
    fig = _figure(6.0, 5.2)
    scatter_tasks(fig.add_subplot(1, 1, 1), coords, tasks, title, subtitle, axis_name)
    return _save(fig, path)


def gradient_comparison(path: str | Path, panels: Sequence[Mapping[str, Any]], suptitle: str, axis_name: str) -> Path:
    """Several editors side by side; each panel: {coords, tasks, title, subtitle}."""
    if not panels:
        raise ValueError("gradient_comparison needs at least one panel")
    n = len(panels)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig = _figure(4.6 * cols, 4.4 * rows)
    for i, panel in enumerate(panels):
        scatter_tasks(fig.add_subplot(rows, cols, i + 1), panel["coords"], panel["tasks"], panel["title"], panel.get("subtitle", ""), axis_name)
    fig.suptitle(suptitle, fontsize=13)
    return _save(fig, path)


def scaling_plot(path: str | Path, points: Sequence[Mapping[str, Any]], eval_task: str,
                 metrics: Sequence[str] = ("reliability", "generalization")) -> Path:
    """Post-edit metrics (%) on the held-out task against the number of training tasks; pre-edit dashed."""
    fig = _figure(6.4, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    x = [p["n_tasks"] for p in points]
    for k, metric in enumerate(metrics):
        color = METRIC_COLORS.get(metric, None)
        post = [100 * p["post"][metric] if p["post"].get(metric) is not None else np.nan for p in points]
        ax.plot(x, post, marker="o", color=color, label=f"{metric} (post-edit)")
        for xi, yi in zip(x, post):
            if not np.isnan(yi):
                ax.annotate(f"{yi:.1f}", (xi, yi), textcoords="offset points", xytext=(0, 7 if k % 2 == 0 else -13), ha="center",
                            fontsize=8, color=color)  # alternate above / below so close values stay readable
        pre = [100 * p["pre"][metric] if p["pre"].get(metric) is not None else np.nan for p in points]
        if not all(np.isnan(pre)):
            ax.plot(x, pre, linestyle="--", marker=".", color=color, alpha=0.5, label=f"{metric} (pre-edit)")
    ax.set_xticks(x, [f"{p['n_tasks']}\n" + "+".join(p["tasks"]) for p in points], fontsize=8)
    ax.set_xlim(min(x) - 0.5, max(x) + 0.5)
    ax.set_xlabel("training tasks")
    ax.set_ylabel(f"held-out {eval_task} score (%)")
    ax.set_ylim(-6, 105)  # room below 0 for the annotations of near-zero points
    ax.set_title(f"Task scaling: editors trained on 1..{max(x)} tasks, tested on {eval_task}")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.25)
    return _save(fig, path)


def description_bars(path: str | Path, rows: Sequence[Mapping[str, Any]], task: str, metrics: Sequence[str]) -> Path:
    """One group of bars per description; seen ones in one colour, unseen ones in another; seen mean as a line."""
    fig = _figure(max(7.0, 0.6 * len(rows) * len(metrics)), 4.8)
    axes = [fig.add_subplot(1, len(metrics), i + 1) for i in range(len(metrics))]
    idx = np.arange(len(rows))
    for ax, metric in zip(axes, metrics):
        values = [100 * r["metrics"][metric] if r["metrics"].get(metric) is not None else 0.0 for r in rows]
        colors = [SEEN_COLOR if r["seen"] else UNSEEN_COLOR for r in rows]
        ax.bar(idx, values, color=colors, edgecolor="black", linewidth=0.5)
        for i, v in zip(idx, values):
            ax.annotate(f"{v:.0f}", (i, v), textcoords="offset points", xytext=(0, 2), ha="center", fontsize=7)
        seen_values = [v for v, r in zip(values, rows) if r["seen"]]
        if seen_values:
            ax.axhline(float(np.mean(seen_values)), color=SEEN_COLOR, linestyle="--", linewidth=1, label="seen mean")
        ax.set_xticks(idx, [str(r["index"]) for r in rows])
        ax.set_xlabel("description index")
        ax.set_ylabel(f"{metric} (%)")
        ax.set_ylim(0, 105)
        ax.set_title(f"{metric}")
        ax.grid(axis="y", alpha=0.25)
        # Proxy artists so the legend explains the colours even when one group is absent.
        ax.bar([0], [0], color=SEEN_COLOR, label="seen in training")
        ax.bar([0], [0], color=UNSEEN_COLOR, label="unseen (held out)")
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{task}: post-edit scores per instruction description", fontsize=12)
    return _save(fig, path)


def balance_plot(path: str | Path, variants: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> Path:
    """Left: per-task post-edit reliability per mixture variant. Right: gradient silhouette per variant."""
    fig = _figure(11.0, 4.6)
    ax = fig.add_subplot(1, 2, 1)
    width = 0.8 / max(1, len(variants))
    idx = np.arange(len(tasks))
    for j, variant in enumerate(variants):
        values = [100 * (variant["reliability"].get(t) or 0.0) for t in tasks]
        ax.bar(idx + (j - (len(variants) - 1) / 2) * width, values, width, label=variant["name"], color=f"C{j}", edgecolor="black", linewidth=0.5)
    ax.set_xticks(idx, list(tasks))
    ax.set_xlabel("task (test split)")
    ax.set_ylabel("post-edit reliability (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Reliability per task")
    ax.legend(fontsize=8, title="training mixture", title_fontsize=8)
    ax.grid(axis="y", alpha=0.25)
    ax2 = fig.add_subplot(1, 2, 2)
    names = [v["name"] for v in variants]
    scores = [v.get("silhouette") if v.get("silhouette") is not None else 0.0 for v in variants]
    ax2.bar(np.arange(len(names)), scores, color=[f"C{j}" for j in range(len(names))], edgecolor="black", linewidth=0.5)
    for j, s in enumerate(scores):
        ax2.annotate(f"{s:.3f}", (j, s), textcoords="offset points", xytext=(0, 4 if s >= 0 else -12), ha="center", fontsize=8)
    ax2.axhline(0, color="black", linewidth=0.5)
    ax2.set_xticks(np.arange(len(names)), names)
    ax2.set_xlabel("training mixture")
    ax2.set_ylabel("silhouette of task clusters (PCA space)")
    ax2.set_title("Gradient separation by task")
    ax2.grid(axis="y", alpha=0.25)
    fig.suptitle("ConvSent balancing in the training mixture", fontsize=12)
    return _save(fig, path)


def optimization_plot(path: str | Path, rounds: Sequence[Mapping[str, Any]], metric: str) -> Path:
    """Every candidate's score per round (dots) and the best score so far (line)."""
    fig = _figure(6.4, 4.4)
    ax = fig.add_subplot(1, 1, 1)
    xs, ys = [], []
    for r in rounds:
        for c in r["candidates"]:
            value = c["metrics"].get(metric)
            if value is not None:
                xs.append(r["round"])
                ys.append(100 * value)
    ax.scatter(xs, ys, s=18, alpha=0.6, color="tab:gray", label="candidate")
    best = [(r["round"], 100 * r["best"]["metrics"][metric]) for r in rounds if r.get("best") and r["best"]["metrics"].get(metric) is not None]
    if best:
        ax.plot([b[0] for b in best], [b[1] for b in best], marker="o", color="tab:blue", label="best so far")
    ax.set_xticks([r["round"] for r in rounds])
    ax.set_xlabel("round (0 = the base pool's descriptions)")
    ax.set_ylabel(f"{metric} on the scoring records (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Instruction construction")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.25)
    return _save(fig, path)


def edits_curves(path: str | Path, series: Sequence[Mapping[str, Any]], panels: Sequence[tuple[str, str]], suptitle: str) -> Path:
    """Metrics against the number of edits (log-x), one panel per ``(key, y label)``, one colour per series (editor).

    ``series``: ``{label, points}``, each point ``{n_edits, key: value}``. A metric summary
    (``{mean, ci_low, ci_high}``, 0-1) is drawn in % with its 95 % band: the teacher-forced value
    (``key``) solid with dots, the generation value (``gen_<key>``) dashed with open squares. A plain number (seconds per edit,
    perplexity ratio) is drawn as it is. Each edit alone (``analyze batch --singles``) is dotted: through the
    points' ``single_same_cases`` (the same N cases as each call) where they exist, else the series' ``single`` as a
    horizontal line. A study of one N draws the intervals as error bars and the legends under the panels. A point's ``unedited`` summaries (``analyze batch --unedited-locality``) are triangles with their
    intervals (up: teacher-forced, down: generation). A y label that starts with ``%`` fixes the axis to 0-100.
    """
    fig = _figure(4.2 * len(panels), 3.9)
    for i, (key, ylabel) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for k, s in enumerate(series):
            for name, style, marker, protocol in ((key, "-", "o", "teacher-forced"), (f"gen_{key}", "--", "s", "generation")):
                points = [p for p in s["points"] if p.get(name) is not None]
                if not points:
                    continue
                x = [p["n_edits"] for p in points]
                summaries = isinstance(points[0][name], Mapping)
                y = [100 * p[name]["mean"] if summaries else p[name] for p in points]
                label = f"{s['label']} ({protocol})" if summaries else s["label"]
                ax.plot(x, y, style, marker=marker, markersize=4, markerfacecolor="none" if marker == "s" else None, color=f"C{k % 10}",
                        label=label)  # open squares: generation, told apart from teacher forcing where a study has one N
                if summaries and len(points) > 1:
                    ax.fill_between(x, [100 * p[name]["ci_low"] for p in points], [100 * p[name]["ci_high"] for p in points],
                                    color=f"C{k % 10}", alpha=0.12, linewidth=0)
                elif summaries:  # one N: a band of no width shows nothing, so the interval is an error bar
                    ax.errorbar(x, y, yerr=[[y[0] - 100 * points[0][name]["ci_low"]], [100 * points[0][name]["ci_high"] - y[0]]],
                                fmt="none", capsize=3, linewidth=1, color=f"C{k % 10}")
                same = [p for p in points if (p.get("single_same_cases") or {}).get(name) is not None]
                single = (s.get("single") or {}).get(name)
                if same:  # each edit alone, the same N cases as each call: the reference the N-edit calls are compared with
                    ax.plot([p["n_edits"] for p in same], [100 * p["single_same_cases"][name]["mean"] for p in same], ":",
                            marker=".", linewidth=1.2, color=f"C{k % 10}")  # unlabelled: the title says what it is
                elif single is not None:  # each edit alone, the first max(N) cases
                    value = 100 * single["mean"] if isinstance(single, Mapping) else single
                    ax.axhline(value, linestyle=":", linewidth=1.2, color=f"C{k % 10}")
                others = [p for p in s["points"] if (p.get("unedited") or {}).get(name) is not None]
                if others:  # analyze batch --unedited-locality: the same call's locality on records it did not edit
                    ax.errorbar([p["n_edits"] for p in others], [100 * p["unedited"][name]["mean"] for p in others],
                                yerr=[[100 * (p["unedited"][name]["mean"] - p["unedited"][name]["ci_low"]) for p in others],
                                      [100 * (p["unedited"][name]["ci_high"] - p["unedited"][name]["mean"]) for p in others]],
                                fmt="^" if marker == "o" else "v", markersize=5, capsize=2, linewidth=0.8, color=f"C{k % 10}",
                                markerfacecolor="none" if marker == "s" else None,
                                label=f"{s['label']} ({protocol}, {others[0]['unedited']['n_cases']} unedited records)")
        ax.set_xscale("log")
        sizes = sorted({p["n_edits"] for s in series for p in s["points"]})
        if 0 < len(sizes) <= 12:  # ticks at the numbers of edits measured (a log axis would label 2×10¹, 3×10¹, ... over each other)
            ax.set_xticks(sizes)
            if any(b / a < 2.5 for a, b in zip(sizes, sizes[1:])) and len(sizes) > 8:  # e.g. 512 and 1000: slanted, apart
                ax.tick_params(axis="x", labelsize=8, labelrotation=45)
        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))  # 1, 10, 100 rather than 10^0, 10^1, 10^2
        ax.xaxis.set_minor_formatter(NullFormatter())
        if ylabel.startswith("%"):
            ax.set_ylim(-3, 103)
        elif key.startswith("perplexity"):  # a collapsing model multiplies it by orders of magnitude: then a log axis
            low, high = ax.dataLim.intervaly
            if low > 0 and high / low >= 10:  # (within a decade a log axis labels its ticks 1.2×10⁰, 1.4×10⁰, ...)
                ax.set_yscale("log")
        ax.set_xlabel("edits")
        ax.set_ylabel(ylabel)
        ax.set_title(key.replace("_", " "), fontsize=10)
        ax.grid(alpha=0.25)
        if ax.get_legend_handles_labels()[0] and len(sizes) == 1:  # one N: its points sit mid-axis, where "best" would put it
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2))
        elif ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    if any(s.get("single") for s in series):
        suptitle += " (dotted: each edit alone)"
    fig.suptitle(suptitle, fontsize=12)
    return _save(fig, path)


def transfer_heatmaps(path: str | Path, rows: Sequence[Sequence[Mapping[str, Any]]], trained_on: Sequence[str],
                      evaluated_on: Sequence[str], suptitle: str) -> Path:
    """A grid of heat maps (e.g. a row per protocol, a panel per metric): rows = trained on, columns = evaluated on.

    Each panel is ``{title, values, drops}``: ``values`` (len(trained_on), len(evaluated_on)) in % with NaN
    where the task has no such probe (drawn grey, "n/a"), ``drops`` the same shape (NaN on the diagonal).
    A cell shows its value and, off the diagonal, its drop from the in-task value of its column; in-task
    cells are framed.
    """
    n_cols = max(len(r) for r in rows)
    fig = _figure(1.3 + 1.45 * len(evaluated_on) * n_cols, 0.6 + 1.05 * len(trained_on) * len(rows))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")
    for i, panels in enumerate(rows):
        axes = []
        for j, panel in enumerate(panels):
            ax = fig.add_subplot(len(rows), n_cols, i * n_cols + j + 1)
            axes.append(ax)
            values = np.asarray(panel["values"], dtype=float)
            drops = np.asarray(panel["drops"], dtype=float)
            image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0, vmax=100, aspect="auto")
            for r in range(values.shape[0]):
                for c in range(values.shape[1]):
                    value = values[r, c]
                    if np.isnan(value):
                        ax.text(c, r, "n/a", ha="center", va="center", fontsize=8, color="dimgray")
                        continue
                    text = f"{value:.1f}" + ("" if np.isnan(drops[r, c]) else f"\nΔ {drops[r, c]:+.1f}")
                    ax.text(c, r, text, ha="center", va="center", fontsize=8, color="black" if value > 60 else "white")
                    if trained_on[r] == evaluated_on[c]:
                        ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2, clip_on=False))
            ax.set_xticks(range(len(evaluated_on)), list(evaluated_on), fontsize=8)
            ax.set_yticks(range(len(trained_on)), list(trained_on), fontsize=8)
            ax.set_xlabel("evaluated on", fontsize=8)
            if j == 0:
                ax.set_ylabel("trained on", fontsize=8)
            ax.set_title(panel["title"], fontsize=9)
        fig.colorbar(image, ax=axes, shrink=0.9, label="%")
    fig.suptitle(suptitle, fontsize=11)
    return _save(fig, path)
