"""Small matplotlib figures for TensorBoard (headless backend)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def heatmap(values_XY: np.ndarray, row_names: list[str], col_names: list[str], title: str):
    """Expert (rows) × domain (columns) heatmap with values written in the cells, sized so the
    numbers read at TensorBoard's default image size: large cells, 10 pt text, dark text on
    the bright end of the colour map and white on the dark end."""
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(col_names), 1.2 + 0.6 * len(row_names)), dpi=110)
    im = ax.imshow(values_XY, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(col_names)), col_names, rotation=30, ha="right", fontsize=10)
    ax.set_yticks(range(len(row_names)), row_names, fontsize=10)
    lo, hi = im.get_clim()
    for (i, j), v in np.ndenumerate(values_XY):
        if np.isfinite(v):
            bright = hi > lo and (v - lo) / (hi - lo) > 0.6
            ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=10, color="black" if bright else "white")
    ax.set_title(title, fontsize=11)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def close(fig) -> None:
    plt.close(fig)
