"""report.json and the two PNG plots a person looks at after a run."""

from __future__ import annotations

import io

import numpy as np

MAX_SCATTER_POINTS = 20000
MAX_LEGEND_LABELS = 20


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def variance_plot(all_ratios: np.ndarray, k: int, target) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cumulative = np.cumsum(all_ratios)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(np.arange(1, len(cumulative) + 1), cumulative, lw=1.5)
    ax.axvline(k, color="tab:red", ls="--", lw=1, label=f"k = {k} ({cumulative[k - 1]:.1%})")
    if target is not None:
        ax.axhline(target, color="grey", ls=":", lw=1, label=f"target {target:.0%}")
    ax.set_xscale("log")
    ax.set_xlabel("number of components")
    ax.set_ylabel("cumulative explained variance")
    ax.set_ylim(0, 1.01)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    data = _png(fig)
    plt.close(fig)
    return data


def scatter_plot(coords: np.ndarray, labels: list) -> bytes:
    """First two PCA coordinates coloured by label; a sample when there are very many points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(set(labels))
    index = {name: i for i, name in enumerate(names)}
    colours = np.array([index[label] for label in labels])
    y = coords[:, 1] if coords.shape[1] > 1 else np.zeros(len(coords))
    fig, ax = plt.subplots(figsize=(7, 5.5))
    cmap = plt.get_cmap("tab20" if len(names) <= 20 else "turbo", max(len(names), 1))
    if len(names) <= MAX_LEGEND_LABELS:
        for name in names:
            mask = colours == index[name]
            ax.scatter(coords[mask, 0], y[mask], s=8, alpha=0.7, color=cmap(index[name]), label=name)
        ax.legend(fontsize=7, markerscale=2, loc="best")
    else:
        ax.scatter(coords[:, 0], y, s=4, alpha=0.6, c=colours, cmap=cmap)
        ax.set_title(f"{len(names)} labels (too many for a legend)")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.grid(alpha=0.3)
    data = _png(fig)
    plt.close(fig)
    return data


def summary(report: dict) -> str:
    """The few lines `make run` prints."""
    if not report.get("published", True):
        return (
            f"nothing changed under the input since run {report.get('run_id')}: no model work, nothing published"
            f"\nresults: {report.get('output')}/report.json ({report.get('images_ok')} images ok,"
            f" {report.get('images_failed')} failed)"
        )
    lines = [
        f"images: {report['images_total']} total, {report['images_ok']} ok, {report['images_failed']} failed"
        f" ({report['images_featurized']} featurized this run, {report['images_reused']} reused,"
        f" {report['images_removed']} removed)",
    ]
    if report.get("k"):
        lines.append(
            f"pca: k={report['k']} components explain {report['explained_variance_total']:.1%} of the variance"
        )
    else:
        lines.append(f"pca: skipped: {report.get('pca_skipped')}")
    lines.append(f"weights: {report['weights']}")
    t = report["timings_s"]
    speed = (
        f"{report['images_per_second']:.1f} images/s featurizing" if report["images_featurized"] else "no model work"
    )
    stages = ", ".join(f"{name} {t[name]:.1f}s" for name in ("featurize", "pca") if name in t)
    lines.append(f"speed: {speed}; total {t['total']:.1f}s ({stages})")
    for reason, count in sorted(report["failures_by_reason"].items(), key=lambda kv: -kv[1])[:5]:
        lines.append(f"failed: {count} x {reason}")
    lines.append(f"results: {report['output']}/report.json  (plots: {', '.join(report['plots']) or 'none'})")
    return "\n".join(lines)
