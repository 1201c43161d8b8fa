"""Result tables: per-run scores aggregated to mean +- std, written as JSON, Markdown, CSV, PNG.

The file format is fixed by PROTOCOLS.md so that runs can be compared across tools:
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
from typing import Any, Iterable, Mapping

import numpy as np


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
    from jaxadapt.eval import matrix_plot  # it reads Row from here: imported when needed

    matrix = os.path.join(workdir, "results_matrix.png")
    if matrix_plot.plot_source_matrix(rows, matrix, title=study):
        paths["matrix"] = matrix
    return paths


def load_rows(path: str) -> list[Row]:
    """Reads the rows of a results.json back."""
    with open(path) as f:
        payload = json.load(f)
    return [Row(**r) for r in payload["rows"]]
