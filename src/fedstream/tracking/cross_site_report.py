"""A cross-site evaluation matrix as files: a CSV of every value and a heat map of the key metric."""

from __future__ import annotations

import csv
import io
import logging

from fedstream.workflows.cross_site import CrossSiteMatrix

log = logging.getLogger(__name__)


def matrix_csv(matrix: CrossSiteMatrix) -> str:
    """``model,site,metric,value`` rows, one per value (a failed validation has none)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["model", "site", "metric", "value"])
    for model in matrix.models:
        for site, metrics in matrix.metrics.get(model, {}).items():
            for metric, value in sorted(metrics.items()):
                writer.writerow([model, site, metric, repr(value)])
    return out.getvalue()


def heat_map_png(matrix: CrossSiteMatrix) -> bytes | None:
    """The key metric as a heat map (models down, sites across, the values written in); ``None`` without
    matplotlib (``pip install matplotlib``), which is only needed for this picture."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: the cross-site heat map is left out (the CSV has every value)")
        return None
    values = [
        [matrix.metrics.get(model, {}).get(site, {}).get(matrix.key_metric, float("nan")) for site in matrix.sites]
        for model in matrix.models
    ]
    figure, axes = plt.subplots(figsize=(1.2 + 0.9 * len(matrix.sites), 1.0 + 0.5 * len(matrix.models)))
    image = axes.imshow(values, cmap="viridis", aspect="auto")
    axes.set_xticks(range(len(matrix.sites)), matrix.sites, rotation=45, ha="right")
    axes.set_yticks(range(len(matrix.models)), matrix.models)
    axes.set_xlabel("validated on")
    axes.set_ylabel("model")
    known = [value for line in values for value in line if value == value]  # not NaN
    low, high = (min(known), max(known)) if known else (0.0, 0.0)
    for row, line in enumerate(values):
        for column, value in enumerate(line):
            if value == value:
                shade = (value - low) / (high - low) if high > low else 0.5  # dark text on the light end
                color = "black" if shade > 0.6 else "white"
                axes.text(column, row, f"{value:.3f}", ha="center", va="center", color=color, fontsize=8)
    figure.colorbar(image, ax=axes, label=matrix.key_metric)
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=100)
    plt.close(figure)
    return out.getvalue()
