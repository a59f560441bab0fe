"""The ``pgrec eval`` report: JSON, PNG plots and one HTML page that shows them."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from engine.evaluation.funnel import EvalReport

METRICS = ("ndcg@10", "recall@10", "recall@50", "map@10", "coverage@10", "diversity@10")


def _plots(report: EvalReport, out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: dict[str, Path] = {}
    names = list(report.methods)
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.5))
    for ax, metric in zip(axes, ("ndcg@10", "recall@10", "recall@50", "map@10"), strict=True):
        vals = [report.methods[n].get(metric, 0.0) for n in names]
        colors = ["tab:red" if n == "funnel" else "tab:blue" if not n.startswith("source:") else "tab:gray"
                  for n in names]
        ax.barh(names, vals, color=colors)
        ax.set_title(metric)
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=8)
    fig.suptitle(f"methods on the split at {report.split['cutoff']} ({report.split['users']} users)")
    fig.tight_layout()
    paths["methods"] = out / "methods.png"
    fig.savefig(paths["methods"], dpi=110)
    plt.close(fig)

    rc = report.recall_vs_candidates
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rc["n"], rc["recall"], marker="o")
    ax.set_xscale("log")
    ax.set_xlabel("candidates per user (n)")
    ax.set_ylabel("recall of the candidate union")
    ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.3)
    ax.set_title("recall against candidate count")
    fig.tight_layout()
    paths["recall"] = out / "recall_vs_candidates.png"
    fig.savefig(paths["recall"], dpi=110)
    plt.close(fig)

    imp = list(report.importance.items())[:25]
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.3 * len(imp) + 1)))
    ax.barh([n for n, _ in imp], [v for _, v in imp], color="tab:green")
    ax.invert_yaxis()
    ax.set_xlabel("share of total gain")
    ax.set_title("ranker feature importance")
    fig.tight_layout()
    paths["importance"] = out / "feature_importance.png"
    fig.savefig(paths["importance"], dpi=110)
    plt.close(fig)
    return paths


def _table_html(report: EvalReport) -> str:
    head = "".join(f"<th>{html.escape(m)}</th>" for m in METRICS)
    rows = []
    for name, vals in report.methods.items():
        cls = ' class="funnel"' if name == "funnel" else ""
        cells = "".join(f"<td>{vals.get(m, 0.0):.4f}</td>" for m in METRICS)
        rows.append(f"<tr{cls}><td>{html.escape(name)}</td>{cells}</tr>")
    return f"<table><tr><th>method</th>{head}</tr>{''.join(rows)}</table>"


def write(report: EvalReport, out: Path, command: str | None = None) -> dict[str, Path]:
    """Write report.json, the PNGs and report.html into ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = report.as_dict()
    if command:
        data["command"] = command
    paths = _plots(report, out)
    paths["json"] = out / "report.json"
    paths["json"].write_text(json.dumps(data, indent=2, default=str))
    s = data["summary"]
    ratio = f"{s['ratio']:.3f}" if s["ratio"] is not None else "n/a"
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in report.notes)
    split = "".join(f"<li>{html.escape(str(k))}: {html.escape(str(v))}</li>" for k, v in report.split.items())
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>pgrec offline evaluation</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} td:first-child{{text-align:left}}
tr.funnel{{font-weight:bold;background:#fee}} img{{max-width:100%}}</style></head><body>
<h1>pgrec offline evaluation</h1>
<p>{html.escape(command or "")}</p>
<p>Full funnel NDCG@10 <b>{s['funnel_ndcg@10']:.4f}</b>; best baseline {html.escape(str(s['best_baseline']))}
{s['best_baseline_ndcg@10']:.4f}; ratio <b>{ratio}</b>.</p>
<h2>Split</h2><ul>{split}</ul>
<h2>Metrics</h2>{_table_html(report)}
<p><img src="{paths['methods'].name}" alt="metrics per method"></p>
<h2>Recall against candidate count</h2><p><img src="{paths['recall'].name}" alt="recall vs n"></p>
<h2>Ranker</h2><pre>{html.escape(json.dumps(report.ranker, indent=2, default=str))}</pre>
<p><img src="{paths['importance'].name}" alt="feature importance"></p>
<h2>Notes</h2><ul>{notes}</ul>
<h2>Timings (s)</h2><pre>{html.escape(json.dumps(report.timings_s, indent=2))}</pre>
</body></html>
"""
    paths["html"] = out / "report.html"
    paths["html"].write_text(page)
    return paths
