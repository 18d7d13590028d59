"""Small matplotlib figures for TensorBoard (headless backend)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def heatmap(values_XY: np.ndarray, row_names: list[str], col_names: list[str], title: str):
    """Expert (rows) × domain (columns) heatmap with values written in the cells."""
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(col_names), 0.8 + 0.45 * len(row_names)))
    im = ax.imshow(values_XY, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(col_names)), col_names, rotation=30, ha="right")
    ax.set_yticks(range(len(row_names)), row_names)
    for (i, j), v in np.ndenumerate(values_XY):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7, color="w")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def close(fig) -> None:
    plt.close(fig)
