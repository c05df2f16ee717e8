"""`pgen report`: tuning logs -> one self-contained HTML page (templates/report.html.j2).

Per log: the device and versions; per kernel, best vs default time, the sorted times of every
candidate with the default marked, and time against each knob; the block-size trade-off when the
log holds a block-size study. Charts are matplotlib PNGs embedded as base64, so the page is one file.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import jinja2

from pgen_runtime.errors import TuneError

from . import templates, tuning_log

_ENV = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(templates.__file__).parent),
                          undefined=jinja2.StrictUndefined, autoescape=True)
DEFAULT_COLOR, BEST_COLOR, OTHER_COLOR = "#d95f02", "#1b9e77", "#7570b3"


def render(logs: list[Path], out: Path) -> Path:
    """Write the report of `logs` to `out`.

    Raises:
        TuneError: a log is missing or corrupt.
    """
    if not logs:
        raise TuneError("pgen report needs at least one tuning log")
    pages = [_log_view(Path(p)) for p in logs]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_ENV.get_template("report.html.j2").render(logs=pages))
    return out


def _log_view(path: Path) -> dict[str, Any]:
    data = tuning_log.load(path)
    compared = tuning_log.compare(data)
    kernels = []
    for kernel, c in sorted(compared.items()):
        records = [r for r in data["records"] if r["kernel"] == kernel and r.get("workload") == c["best"].get("workload")]
        kernels.append({
            "name": kernel,
            "best_ms": c["best_ms"], "best_config": json.dumps(c["best"]["config"], sort_keys=True),
            "default_ms": c["default_ms"], "confirmed": "confirm_ms" in c["best"],
            "default_config": json.dumps(c["default"]["config"], sort_keys=True) if c["default"] else "not measured",
            "ratio": c["ratio"], "measured": c["measured"], "failed": c["failed"],
            "workload": _workload_text(c["best"].get("workload") or {}),
            "sorted_chart": _sorted_chart(kernel, data, records),
            "knob_chart": _knob_chart(kernel, data, records),
        })
    study = data.get("block_size_study")
    return {"path": str(path), "spec_uri": data.get("spec_uri", path.stem), "target_id": data["target_id"],
            "device": data.get("device", {}), "versions": data.get("versions", {}), "date": data.get("date", ""),
            "kernels": kernels,
            "block_size": {**study, "chart": _block_size_chart(study)} if study else None}


def _workload_text(workload: dict[str, Any]) -> str:
    parts = []
    for key, values in sorted(workload.items()):
        if isinstance(values, list) and values and len(set(values)) == 1:
            parts.append(f"{key} = [{values[0]}] x {len(values)}")
        else:
            parts.append(f"{key} = {values}")
    return ", ".join(parts)


def _sorted_chart(kernel: str, data: dict[str, Any], records: list[dict[str, Any]]) -> str:
    plt = _pyplot()
    ok = sorted((r for r in records if r["median_ms"] is not None), key=lambda r: r["median_ms"])
    fig, ax = plt.subplots(figsize=(7, 3))
    colors = [DEFAULT_COLOR if tuning_log.is_default(data, r) else BEST_COLOR if i == 0 else OTHER_COLOR
              for i, r in enumerate(ok)]
    ax.bar(range(len(ok)), [r["median_ms"] for r in ok], color=colors)
    ax.set_xlabel("candidates, fastest first")
    ax.set_ylabel("median ms")
    failed = len(records) - len(ok)
    ax.set_title(f"{kernel}: {len(ok)} candidates" + (f" ({failed} failed, not shown)" if failed else "")
                 + " - default orange, best green", fontsize=9)
    return _png(fig)


def _knob_chart(kernel: str, data: dict[str, Any], records: list[dict[str, Any]]) -> str:
    plt = _pyplot()
    ok = [r for r in records if r["median_ms"] is not None]
    knobs = sorted({k for r in ok for k in r["config"]})
    fig, axes = plt.subplots(1, max(len(knobs), 1), figsize=(3 * max(len(knobs), 1), 2.8), squeeze=False)
    for ax, knob in zip(axes[0], knobs):
        values = _ordered({r["config"].get(knob) for r in ok})
        pos = {v: i for i, v in enumerate(values)}
        for r in ok:
            default = tuning_log.is_default(data, r)
            ax.scatter(pos[r["config"].get(knob)], r["median_ms"], s=90 if default else 16,
                       color=DEFAULT_COLOR if default else OTHER_COLOR, marker="*" if default else "o",
                       zorder=3 if default else 2)
        ax.set_xticks(range(len(values)), [str(v) for v in values])
        ax.set_xlabel(knob)
        ax.set_ylabel("median ms")
    fig.suptitle(f"{kernel}: time against each knob (default = orange star)", fontsize=9)
    return _png(fig)


def _ordered(values: set) -> list:
    try:
        return sorted(values)
    except TypeError:  # mixed kinds of values: order by their text
        return sorted(values, key=str)


def _block_size_chart(study: dict[str, Any]) -> str:
    plt = _pyplot()
    rows = study["block_sizes"]
    sizes = [str(r["block_size"]) for r in rows]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(11, 3))
    for kernel in study["kernels"]:
        a.plot(sizes, [r["times_ms"][kernel] for r in rows], marker="o", label=kernel)
    a.set_title("best kernel time", fontsize=9)
    a.set_ylabel("ms")
    a.legend(fontsize=8)
    bottom = [0.0] * len(rows)
    for term in ("fragmentation", "table_overhead", "cow_overhead"):
        heights = [100 * r[term] for r in rows]
        b.bar(sizes, heights, bottom=bottom, label=term)
        bottom = [x + y for x, y in zip(bottom, heights)]
    b.set_title("memory overhead (% of useful KV bytes)", fontsize=9)
    b.legend(fontsize=7)
    scores = [r["score"] if r["score"] is not None else 0 for r in rows]
    c.bar(sizes, scores, color=[BEST_COLOR if r["block_size"] == study["recommended"] else OTHER_COLOR for r in rows])
    c.set_title("score = kernel x memory (lower is better)", fontsize=9)
    for ax in (a, b, c):
        ax.set_xlabel("block size")
    return _png(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    _pyplot().close(fig)
    return base64.b64encode(buf.getvalue()).decode()
