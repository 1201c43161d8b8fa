"""Result tables: per-run scores aggregated to mean +- std, written as JSON, Markdown, CSV, PNG.

The file format is fixed so that runs can be compared across tools:
`results.json = {"study", "config", "rows": [{"method", "split", "setting", "metric",
"mean", "std", "n"}]}`; `results.md` and `results.csv` hold the same rows.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from jaxadapt.data import splits as splits_lib


@dataclasses.dataclass(frozen=True)
class Score:
    """One metric value of one run (one seed and fold) of one method on one split."""

    method: str
    split: str
    metric: str
    value: float
    setting: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    run: str = ""  # e.g. "seed=0,train_source=source_3"; identifies the replicate


@dataclasses.dataclass(frozen=True)
class Row:
    """Mean +- std of one (method, split, setting, metric) over replicates."""

    method: str
    split: str
    setting: Mapping[str, Any]
    metric: str
    mean: float
    std: float
    n: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"setting": dict(self.setting)}


def _setting_key(setting: Mapping[str, Any]) -> str:
    return json.dumps(dict(setting), sort_keys=True)


def aggregate(scores: Iterable[Score]) -> list[Row]:
    """Groups scores by (method, split, setting, metric) and summarises the replicates.

    The std is the sample standard deviation (ddof 1) over replicates; 0 for n = 1.
    Row order follows first appearance, so tables read in the order methods ran.

    Args:
      scores: per-replicate scores.

    Returns:
      One Row per group.

    Raises:
      ValueError: if one replicate reports the same group twice (a silent overwrite).
    """
    groups: dict[tuple, list[float]] = defaultdict(list)
    runs: dict[tuple, set[str]] = defaultdict(set)
    settings: dict[str, Mapping[str, Any]] = {}
    for s in scores:
        key = (s.method, s.split, _setting_key(s.setting), s.metric)
        if s.run in runs[key]:
            raise ValueError(
                f"score {key} reported twice for run {s.run!r}; give each replicate a distinct run id"
            )
        runs[key].add(s.run)
        settings[key[2]] = s.setting
        groups[key].append(float(s.value))
    rows = []
    for (method, split, skey, metric), values in groups.items():
        v = np.asarray(values)
        std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
        rows.append(Row(method, split, settings[skey], metric, float(v.mean()), std, len(v)))
    return rows


def _setting_text(setting: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in setting.items()) or "-"


def markdown_table(rows: list[Row], *, title: str = "") -> str:
    """Formats rows as a Markdown table: one line per (method, setting), a column per
    (split, metric), cells `mean +- std (n)`.

    Args:
      rows: aggregated rows.
      title: optional heading.

    Returns:
      Markdown text.
    """
    columns = list(dict.fromkeys((r.split, r.metric) for r in rows))
    lines = list(dict.fromkeys((r.method, _setting_key(r.setting)) for r in rows))
    cell = {(r.method, _setting_key(r.setting), r.split, r.metric): r for r in rows}
    settings = {_setting_key(r.setting): r.setting for r in rows}
    has_setting = any(r.setting for r in rows)
    head = ["method"] + (["setting"] if has_setting else []) + [f"{s} {m}" for s, m in columns]
    out = [f"## {title}", ""] if title else []
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, skey in lines:
        cells = [method] + ([_setting_text(settings[skey])] if has_setting else [])
        for split, metric in columns:
            r = cell.get((method, skey, split, metric))
            cells.append(f"{r.mean:.3f} ± {r.std:.3f} ({r.n})" if r else "")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def csv_text(rows: list[Row]) -> str:
    """The rows as CSV with columns method, split, setting (JSON), metric, mean, std, n."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "split", "setting", "metric", "mean", "std", "n"])
    for r in rows:
        w.writerow([r.method, r.split, _setting_key(r.setting), r.metric, repr(r.mean), repr(r.std), r.n])
    return buf.getvalue()


def plot_rows(rows: list[Row], path: str, *, metric: str = "accuracy", title: str = "") -> None:
    """Grouped bar chart of `metric`: a group per split, a bar per (method, setting).

    Args:
      rows: aggregated rows.
      path: PNG file to write.
      metric: which metric to draw.
      title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: CI and servers have no display
    import matplotlib.pyplot as plt

    chosen = [r for r in rows if r.metric == metric]
    splits = list(dict.fromkeys(r.split for r in chosen))
    bars = list(dict.fromkeys((r.method, _setting_key(r.setting)) for r in chosen))
    width = 0.8 / max(len(bars), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(splits) * max(len(bars), 1) * 0.5), 4))
    for i, (method, skey) in enumerate(bars):
        label = method if skey == "{}" else f"{method} {_setting_text(json.loads(skey))}"
        xs, means, stds = [], [], []
        for j, split in enumerate(splits):
            for r in chosen:
                if (r.method, _setting_key(r.setting), r.split) == (method, skey, split):
                    xs.append(j + i * width)
                    means.append(r.mean)
                    stds.append(r.std)
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(splits))], splits)
    ax.set_ylabel(metric)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize="small", ncols=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(workdir: str, study: str, config: Mapping[str, Any], rows: list[Row]) -> dict[str, str]:
    """Writes results.json, results.md, results.csv and results.png under `workdir`; for
    a study scored on source pairs also the heat-map results_matrix.png.

    Args:
      workdir: output directory (created).
      study: study name.
      config: the run's configuration as plain JSON-able data.
      rows: aggregated rows.

    Returns:
      Mapping of format -> path written.
    """
    os.makedirs(workdir, exist_ok=True)
    paths = {ext: os.path.join(workdir, f"results.{ext}") for ext in ("json", "md", "csv", "png")}
    payload = {"study": study, "config": dict(config), "rows": [r.as_dict() for r in rows]}
    with open(paths["json"], "w") as f:
        json.dump(payload, f, indent=1, default=str)
    with open(paths["md"], "w") as f:
        f.write(markdown_table(rows, title=study))
    with open(paths["csv"], "w") as f:
        f.write(csv_text(rows))
    plot_rows(rows, paths["png"], title=study)

    matrix = os.path.join(workdir, "results_matrix.png")
    if plot_source_matrix(rows, matrix, title=study):
        paths["matrix"] = matrix
    return paths


def load_rows(path: str) -> list[Row]:
    """Reads the rows of a results.json back."""
    with open(path) as f:
        payload = json.load(f)
    return [Row(**r) for r in payload["rows"]]


def matrix_cells(rows: Sequence[Row], *, metric: str = "accuracy"
                 ) -> tuple[list[str], list[str], dict[str, np.ndarray]]:
    """The mean `metric` of every (method and setting, training source, target source).

    Args:
      rows: aggregated result rows; rows of pooled splits are left out.
      metric: the metric to arrange.

    Returns:
      (training sources, target sources, label -> float [n_train, n_target] with NaN
      where a cell was not scored); a label is the method, plus its setting if it has one.
    """
    cells: dict[str, dict[tuple[str, str], float]] = {}
    for r in rows:
        pair = splits_lib.parse_pair(r.split)
        if pair is None or r.metric != metric:
            continue
        label = r.method + ("" if not r.setting else " " + ",".join(
            f"{k}={v}" for k, v in sorted(r.setting.items())))
        cells.setdefault(label, {})[pair] = r.mean
    pairs = [p for c in cells.values() for p in c]
    train = list(dict.fromkeys(a for a, _ in pairs))
    target = list(dict.fromkeys(b for _, b in pairs))
    grids = {}
    for label, c in cells.items():
        grid = np.full((len(train), len(target)), np.nan)
        for (a, b), value in c.items():
            grid[train.index(a), target.index(b)] = value
        grids[label] = grid
    return train, target, grids


def plot_source_matrix(rows: Sequence[Row], path: str, *, metric: str = "accuracy",
                       title: str = "") -> bool:
    """One heat-map panel per method: rows = training source, columns = target source.

    Args:
      rows: aggregated result rows.
      path: PNG file to write.
      metric: the metric drawn (cells annotated with their value).
      title: figure title.

    Returns:
      False (and nothing written) when no row is a pair split.
    """
    train, target, grids = matrix_cells(rows, metric=metric)
    if not grids:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = max(float(np.nanmax(g)) for g in grids.values() if np.isfinite(g).any()) or 1.0
    n = len(grids)
    fig, axes = plt.subplots(1, n, figsize=(1.2 + 0.9 * len(target) * n, 1.4 + 0.6 * len(train)),
                             squeeze=False)
    for ax, (label, grid) in zip(axes[0], grids.items()):
        ax.imshow(grid, vmin=0, vmax=top, cmap="viridis")
        for i in range(len(train)):
            for j in range(len(target)):
                if np.isfinite(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="w",
                            fontsize=7)
        ax.set_xticks(range(len(target)), [t.replace("source_", "S") for t in target])
        ax.set_yticks(range(len(train)), [t.replace("source_", "S") for t in train])
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("target")
    axes[0][0].set_ylabel("trained on")
    fig.suptitle(f"{title} ({metric})" if title else metric, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
