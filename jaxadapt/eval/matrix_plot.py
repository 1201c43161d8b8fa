"""The source x source heat-map of a study scored on pair splits (`source:<a>-><b>`)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxadapt.data import splits as splits_lib
from jaxadapt.eval.reports import Row


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
