"""report.json and a self-contained report.html (plots inline) for `lorakit compare`."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from lorakit.adapters.files import atomic_write


def _atomic_write(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def plots(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(caption, data URI) of each figure: the learning-forgetting plane, and KL per adapter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    adapters = report["adapters"]
    task = report.get("task")
    threshold = report["kl_threshold"]
    if task is not None:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        ax.scatter([0.0], [task["base"]["metric"]], marker="s", color="grey", zorder=3)
        ax.annotate("base", (0.0, task["base"]["metric"]), textcoords="offset points", xytext=(6, 6))
        for a in adapters:
            ax.scatter([a["kl_mean"]], [a["task_metric"]], zorder=3)
            ax.annotate(a["name"], (a["kl_mean"], a["task_metric"]), textcoords="offset points", xytext=(6, -12))
        ax.axvline(threshold, color="tab:red", ls="--", lw=1, label=f"--kl-threshold {threshold:g}")
        ax.set_xlabel("forgetting: mean KL(base || adapted) on the base's text (nats/token)")
        ax.set_ylabel(f"learning: task {task['metric_name']}")
        ax.set_ylim(-0.05, 1.05)
        widest = max([threshold] + [a["kl_mean"] for a in adapters])
        ax.set_xlim(-0.03 * widest, 1.25 * widest)  # room for the labels right of the points
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
        fig.tight_layout()
        out.append(("The learning-forgetting plane: up is better on the task, left is closer to the base.", _png(fig)))
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.5, 0.6 + 0.45 * len(adapters)))
    names = [a["name"] for a in adapters]
    ax.barh(names, [a["kl_mean"] for a in adapters], color="tab:blue", label="mean")
    ax.scatter([a["kl_p95"] for a in adapters], names, marker="|", s=200, color="black", label="p95", zorder=3)
    ax.axvline(threshold, color="tab:red", ls="--", lw=1, label="threshold")
    ax.invert_yaxis()
    ax.set_xlabel("KL(base || adapted) per token (nats)")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    out.append(("KL from the base per token: mean (bar) and 95th percentile.", _png(fig)))
    plt.close(fig)
    return out


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; } td, th { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.kept { color: #1a7f37; } .changed { color: #b42318; font-weight: bold; }
pre { white-space: pre-wrap; margin: 0; font-size: 0.9em; max-width: 420px; }
"""


def _cell(text: Any) -> str:
    return f"<td><pre>{html.escape(str(text))}</pre></td>"


def render_html(report: dict[str, Any]) -> str:
    adapters = report["adapters"]
    task = report.get("task")
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>lorakit compare</title><style>{_STYLE}</style></head><body>",
             "<h1>lorakit compare</h1>",
             f"<p>Base model: {e(report['base_model'])}. Reference text: {e(report['reference']['source'])}, "
             f"{report['reference']['tokens']} tokens measured.</p>", "<ul>"]
    for a in adapters:
        parts.append(f"<li class='{a['verdict']}'>{e(a['headline'])}</li>")
    parts.append("</ul><h2>Per adapter</h2><table><tr><th>adapter</th><th>mean KL</th><th>p95 KL</th>"
                 "<th>top-1 agreement</th><th>perplexity, base</th><th>perplexity, adapted</th>")
    if task is not None:
        parts.append(f"<th>task loss</th><th>task {e(task['metric_name'])}</th>")
    parts.append("</tr>")
    if task is not None:
        parts.append(f"<tr><td>base</td><td class='num'>0</td><td class='num'>0</td><td class='num'>100%</td>"
                     f"<td class='num'>{adapters[0]['perplexity_base']:.3f}</td><td class='num'>-</td>"
                     f"<td class='num'>{task['base']['loss']:.4f}</td><td class='num'>{task['base']['metric']:.1%}</td></tr>")
    for a in adapters:
        parts.append(f"<tr><td>{e(a['name'])}</td><td class='num {a['verdict']}'>{a['kl_mean']:.4f}</td>"
                     f"<td class='num'>{a['kl_p95']:.4f}</td><td class='num'>{a['agreement']:.1%}</td>"
                     f"<td class='num'>{a['perplexity_base']:.3f}</td><td class='num'>{a['perplexity_adapted']:.3f}</td>")
        if task is not None:
            parts.append(f"<td class='num'>{a['task_loss']:.4f}</td><td class='num'>{a['task_metric']:.1%}</td>")
        parts.append("</tr>")
    parts.append("</table>")
    for caption, uri in plots(report):
        parts.append(f"<figure><img src='{uri}' alt='{e(caption)}'><figcaption>{e(caption)}</figcaption></figure>")
    names = [a["name"] for a in adapters]
    if report.get("generations"):
        parts.append("<h2>General prompts: base vs adapters (greedy)</h2><table><tr><th>prompt</th><th>base</th>"
                     + "".join(f"<th>{e(n)}</th>" for n in names) + "</tr>")
        for g in report["generations"]:
            parts.append("<tr>" + _cell(g["prompt"]) + _cell(g["base"]) + "".join(_cell(g["adapters"][n]) for n in names) + "</tr>")
        parts.append("</table>")
    if task is not None and task.get("samples"):
        parts.append(f"<h2>Task: {e(task['data'])} (greedy)</h2><table><tr><th>prompt</th><th>reference</th><th>base</th>"
                     + "".join(f"<th>{e(n)}</th>" for n in names) + "</tr>")
        for s in task["samples"]:
            parts.append("<tr>" + _cell(s["prompt"]) + _cell(s["reference"]) + _cell(s["base"])
                         + "".join(_cell(s["adapters"][n]) for n in names) + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(report: dict[str, Any], output: Path) -> None:
    """report.json and report.html in `output`, each written whole (temporary name, then renamed)."""
    output.mkdir(parents=True, exist_ok=True)
    _atomic_write(output / "report.json", json.dumps(report, indent=2) + "\n")
    _atomic_write(output / "report.html", render_html(report))
