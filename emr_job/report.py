"""What a person looks at after a run: the two PNG plots, report.html (self-contained), the printed summary."""

from __future__ import annotations

import base64
import html as _html
import io

import numpy as np

MAX_SCATTER_POINTS = 20000
MAX_LEGEND_LABELS = 20
FIRST_FAILURES = 20  # listed by path in report.html; the failures table has them all


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
        if report.get("basis"):
            lines.append(basis_line(report["basis"]))
    else:
        lines.append(f"pca: skipped: {report.get('pca_skipped')}")
    quality = report.get("quality")
    if quality and quality.get("accuracy") is not None:
        caveat = f"; {quality['caveat']}" if quality["caveat"] else ""
        lines.append(
            f"labels: {len(report['labels'])}, {quality['k']}-NN accuracy {quality['accuracy']:.1%} (leave-one-out,"
            f" {quality['sample']} of {quality['of']} images{caveat})"
        )
    lines.append(f"weights: {report['weights']}")
    t = report["timings_s"]
    speed = (
        f"{report['images_per_second']:.1f} images/s featurizing" if report["images_featurized"] else "no model work"
    )
    stages = ", ".join(f"{name} {t[name]:.1f}s" for name in ("featurize", "pca") if name in t)
    lines.append(f"speed: {speed}; total {t['total']:.1f}s ({stages})")
    if report.get("resources"):
        r = report["resources"]
        lines.append(f"resources: {r['vcpu_seconds']:.0f} vCPU-s, {r['gb_seconds']:.0f} GB-s, about"
                     f" ${r['estimated_usd']:.4f} at EMR Serverless prices ({r['basis']})")  # fmt: skip
    for reason, count in sorted(report["failures_by_reason"].items(), key=lambda kv: -kv[1])[:5]:
        lines.append(f"failed: {count} x {reason}")
    lines.append(f"results: {report['output']}/report.json")
    if report.get("html"):
        lines.append(f"report: {report['output']}/{report['html']}  (open it in a browser)")
    return "\n".join(lines)


def basis_line(basis: dict) -> str:
    """Which basis the pca rows are in, and why this run kept or refit it."""
    if not basis:
        return ""
    what = "refit by this run" if basis["refit"] else f"kept from run {basis['run_id']}: coordinates unchanged"
    return f"PCA basis {what} ({basis['why']})."


def html(report: dict, run_files: dict, failure_rows: list) -> bytes:
    """report.html: the run for a person, one file with the plots inline. Figures carry data-field attributes
    (tests check them against report.json)."""
    e = _html.escape

    def field(name, value, fmt="{}"):
        return f'<td data-field="{e(name)}">{e(fmt.format(value)) if value is not None else "-"}</td>'

    def image(name: str, alt: str) -> str:
        if name not in run_files:
            return ""
        data = base64.b64encode(run_files[name]).decode()
        return f'<img alt="{e(alt)}" src="data:image/png;base64,{data}">'

    counts = [
        ("images_total", "images"),
        ("images_ok", "featurized, in the tables"),
        ("images_failed", "failed"),
        ("images_featurized", "featurized by this run"),
        ("images_reused", "reused from earlier runs"),
        ("images_removed", "removed (gone from the input)"),
        ("files_ignored", "other files ignored"),
    ]
    count_rows = "".join(f"<tr><td>{e(label)}</td>{field(key, report[key])}</tr>" for key, label in counts)
    quality = report.get("quality") or {}
    per_label = quality.get("per_label", {})
    label_rows = "".join(
        f"<tr><td>{e(name)}</td>{field(f'labels.{name}.images', row['images'])}"
        f"{field(f'labels.{name}.failed', row['failed'])}"
        f"{field(f'quality.per_label.{name}.sample', per_label.get(name, {}).get('sample'))}"
        f"{field(f'quality.per_label.{name}.accuracy', per_label.get(name, {}).get('accuracy'), '{:.1%}')}</tr>"
        for name, row in report.get("labels", {}).items()
    )
    reasons = "".join(
        f"<tr><td>{e(reason)}</td>{field(f'failures_by_reason.{reason}', n)}</tr>"
        for reason, n in sorted(report["failures_by_reason"].items(), key=lambda kv: -kv[1])
    )
    first = sorted(failure_rows, key=lambda r: r["path"])[:FIRST_FAILURES]
    failures = "".join(
        f"<tr><td>{e(r['path'])}</td><td>{e(r['label'] or '')}</td><td>{e(r['reason'])}</td></tr>" for r in first
    )
    timings = "".join(f"<tr><td>{e(k)}</td>{field(f'timings_s.{k}', v, '{:.1f} s')}</tr>"
                      for k, v in report["timings_s"].items())  # fmt: skip
    cost = ""
    if report.get("resources"):
        r = report["resources"]
        rows = [("vCPU-seconds", "vcpu_seconds", "{:.0f}"), ("GB-seconds", "gb_seconds", "{:.0f}"),
                ("estimated price (USD)", "estimated_usd", "{:.4f}")]  # fmt: skip
        cells = "".join(f"<tr><td>{name}</td>{field(f'resources.{key}', r[key], fmt)}</tr>" for name, key, fmt in rows)
        cost = (f"<h2>Resources</h2><table>{cells}</table><p>At {r['prices']['usd_per_vcpu_hour']} USD per vCPU-hour"
                f" and {r['prices']['usd_per_gb_hour']} USD per GB-hour (EMR Serverless); {e(r['basis'])}. On AWS, the"
                " job-state function records what EMR measured for the run.</p>")  # fmt: skip
    if report.get("k"):
        pca = (f"<p><span data-field=\"k\">{report['k']}</span> components explain "
               f"<span data-field=\"explained_variance_total\">{report['explained_variance_total']:.1%}</span> of the "
               f"variance. {e(basis_line(report.get('basis')))}</p>"
               f"{image('explained_variance.png', 'cumulative explained variance')}"
               f"{image('pca_scatter.png', 'first two components by label')}")  # fmt: skip
    else:
        pca = f"<p>PCA skipped: {e(str(report.get('pca_skipped')))}</p>"
    if quality.get("accuracy") is not None:
        separability = (
            f"<p>Leave-one-out {quality['k']}-nearest-neighbour accuracy in the PCA space: "
            f'<strong data-field="quality.accuracy">{quality["accuracy"]:.1%}</strong>, on a random sample of '
            f'<span data-field="quality.sample">{quality["sample"]}</span> of {quality["of"]} images.</p>'
            + (f'<p class="caveat" data-field="quality.caveat">{e(quality["caveat"])}</p>' if quality["caveat"] else "")
        )
    else:
        separability = "<p>Label separability: not computed (fewer than 2 images in the PCA space).</p>"
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Image features: run {e(report["run_id"])}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; max-width: 980px; margin: 2em auto; padding: 0 1em; color: #222 }}
table {{ border-collapse: collapse; margin: .5em 0 1.5em }} td, th {{ padding: 3px 10px; border-bottom: 1px solid #ddd;
text-align: left }} td[data-field] {{ text-align: right; font-variant-numeric: tabular-nums }}
img {{ max-width: 100%; display: block; margin: .5em 0 }} .caveat {{ color: #a33 }} code {{ font-size: 12px }}
</style></head><body>
<h1>Image features: run <span data-field="run_id">{e(report["run_id"])}</span></h1>
<p>Finished {e(str(report["finished_at"]))}. Input <code>{e(report["input"])}</code>, results
<code>{e(report["output"])}</code>. Weights: <span data-field="weights">{e(report["weights"])}</span>.</p>
<h2>Images</h2><table>{count_rows}</table>
<h2>PCA</h2>{pca}
<h2>How well the PCA space separates the labels</h2>{separability}
<table><tr><th>label</th><th>images</th><th>failed</th><th>in the sample</th><th>k-NN accuracy</th></tr>
{label_rows}</table>
<h2>Failures</h2><table><tr><th>reason</th><th>files</th></tr>{reasons}</table>
<p>The first {len(first)} of {report["images_failed"]} by path:</p>
<table><tr><th>file</th><th>label</th><th>reason</th></tr>{failures}</table>
<h2>Timings</h2><table>{timings}</table>
{cost}
<h2>Files</h2><p>Tables: <code>{e(report["output"])}/tables/</code> (features, pca, failures; Apache Iceberg).
Fitted model: <code>{e(str(report.get("model")))}</code>. Machine-readable: <code>report.json</code>.</p>
</body></html>
"""
    return body.encode()
