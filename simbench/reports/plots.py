"""Geometry of the report's inline SVG plots (numbers only; the templates draw them, autoescaped).

No chart library and no network: each plot is a handful of lines, circles and rects that print well.
"""

from __future__ import annotations

from typing import Any, Optional

# Okabe-Ito: distinguishable with colour-vision deficiencies and in greyscale print.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#000000", "#F0E442"]


def colours(variants: list[str]) -> dict[str, str]:
    return {v: PALETTE[i % len(PALETTE)] for i, v in enumerate(variants)}


def rate_plot(summary: dict[str, Any]) -> dict[str, Any]:
    """Pass rate with its interval, one row per variant, grouped by dimension."""
    variants = summary.get("variants") or []
    colour = colours(variants)
    x0, x1, row, head = 190, 590, 20, 24
    scale = lambda v: round(x0 + (x1 - x0) * v, 1)  # noqa: E731
    groups, y = [], 30
    for dim, d in summary["dimensions"].items():
        group = {"dim": dim, "y": y + 14, "rows": []}
        y += head
        for v in variants:
            c = d["by_variant"].get(v)
            r: dict[str, Any] = {"variant": v, "baseline": v == summary.get("baseline"), "y": y + row / 2,
                                 "colour": colour[v], "rate": None}
            if c and c["pass_ci"]:
                r.update(rate=c["pass_rate"], x=scale(c["pass_rate"]), lo=scale(c["pass_ci"][0]),
                         hi=scale(c["pass_ci"][1]), text=f"{100 * c['pass_rate']:.0f}% ({c['pass']}/{c['judged']})")
            group["rows"].append(r)
            y += row
        groups.append(group)
        y += 8
    ticks = [{"x": scale(t / 100), "label": f"{t}%"} for t in (0, 25, 50, 75, 100)]
    return {"width": 720, "height": y + 4, "x0": x0, "x1": x1, "top": 22, "ticks": ticks, "groups": groups}


def diff_plot(comparison: dict[str, Any], width: int = 150) -> Optional[dict[str, Any]]:
    """A one-row forest plot of a paired difference on a -100..+100 point axis."""
    if comparison.get("diff") is None:
        return None
    mid, half = width / 2, width / 2 - 6
    x = lambda v: round(mid + half * v, 1)  # noqa: E731
    kind = {"better": "#1a7f37", "worse": "#c62828"}.get(comparison["verdict"], "#666")
    return {"width": width, "height": 16, "mid": mid, "x": x(comparison["diff"]), "lo": x(comparison["ci"][0]),
            "hi": x(comparison["ci"][1]), "colour": kind}


def turns_plot(turns: dict[str, list[int]], variants: list[str]) -> Optional[dict[str, Any]]:
    """Grouped histogram: how many completed sessions ran 0, 1, 2, ... tutor turns, per variant."""
    values = [t for ts in turns.values() for t in ts]
    if not values:
        return None
    colour = colours(variants)
    cats = list(range(min(values), max(values) + 1))
    counts = {v: [turns.get(v, []).count(c) for c in cats] for v in variants}
    top = max(max(cs) for cs in counts.values()) or 1
    x0, x1, y0, y1 = 50, 690, 20, 190
    group = (x1 - x0) / len(cats)
    bar = min(40.0, group * 0.8 / max(1, len(variants)))
    pad = (group - bar * len(variants)) / 2
    bars = []
    for i, c in enumerate(cats):
        for k, v in enumerate(variants):
            n = counts[v][i]
            h = (y1 - y0) * n / top
            bars.append({"x": round(x0 + i * group + pad + k * bar, 1), "y": round(y1 - h, 1),
                         "w": round(max(1.0, bar - 1), 1), "h": round(h, 1), "n": n, "colour": colour[v],
                         "variant": v, "turns": c})
    labels = [{"x": round(x0 + (i + 0.5) * group, 1), "label": c} for i, c in enumerate(cats)]
    yticks = sorted({0, top // 2, top})
    return {"width": 720, "height": 250, "x0": x0, "x1": x1, "y0": y0, "y1": y1, "bars": bars, "labels": labels,
            "yticks": [{"y": round(y1 - (y1 - y0) * t / top, 1), "label": t} for t in yticks],
            "legend": [{"variant": v, "colour": colour[v], "x": x0 + 150 * k} for k, v in enumerate(variants)]}
