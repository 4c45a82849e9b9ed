"""A tiny dependency-free SVG line-plot writer for benchmark figures.

Rules: pure string building, no I/O; one figure is panels stacked vertically, each with its own
axes; a point marked `bad` is drawn hollow (e.g. a probe that missed its SLO); NaN and None
points are skipped. Colours follow the order of the series, the same in every panel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape

__all__ = ["Panel", "Series", "figure"]

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf")
WIDTH, PANEL_H = 720, 300
LEFT, RIGHT, TOP, BOTTOM = 70, 170, 34, 46


@dataclass(frozen=True, slots=True)
class Series:
    label: str
    points: tuple[tuple[float, float | None], ...]
    bad: tuple[bool, ...] = ()
    markers: bool = True


@dataclass(frozen=True, slots=True)
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: tuple[Series, ...]
    hlines: tuple[tuple[float, str], ...] = ()
    log_y: bool = False
    y_min: float | None = None
    y_max: float | None = None
    notes: tuple[str, ...] = field(default=())


def _nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    if integer:
        step = max(1, math.ceil(step))
    start = math.ceil(lo / step) * step
    return [round(start + i * step, 10) for i in range(int((hi - start) / step + 1e-9) + 1)]


def _log_ticks(lo: float, hi: float) -> list[float]:
    ticks = []
    for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        ticks += [m * 10**e for m in (1, 2, 5) if lo <= m * 10**e <= hi]
    return ticks or [lo, hi]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:g}"


def _finite(points: tuple[tuple[float, float | None], ...]) -> list[tuple[float, float]]:
    return [(x, y) for x, y in points if y is not None and math.isfinite(y) and math.isfinite(x)]


def _panel(p: Panel, top: float) -> list[str]:
    pts = [pt for s in p.series for pt in _finite(s.points)]
    ys = [y for _, y in pts] + [y for y, _ in p.hlines]
    xs = [x for x, _ in pts] or [0.0, 1.0]
    if p.log_y:
        ys = [y for y in ys if y > 0] or [1.0]
    y_lo = p.y_min if p.y_min is not None else (min(ys) / 1.5 if p.log_y else min(0.0, min(ys, default=0.0)))
    y_hi = p.y_max if p.y_max is not None else (max(ys, default=1.0) * (1.5 if p.log_y else 1.1))
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    if y_hi <= y_lo:
        y_hi = y_lo + 1.0
    w, h = WIDTH - LEFT - RIGHT, PANEL_H - TOP - BOTTOM

    def sx(x: float) -> float:
        return LEFT + (x - x_lo) / (x_hi - x_lo) * w

    def sy(y: float) -> float:
        if p.log_y:
            frac = (math.log10(max(y, y_lo)) - math.log10(y_lo)) / (math.log10(y_hi) - math.log10(y_lo))
        else:
            frac = (y - y_lo) / (y_hi - y_lo)
        return top + TOP + h - min(max(frac, 0.0), 1.0) * h

    out = [f'<text x="{LEFT}" y="{top + 20}" font-size="14" font-weight="bold">{escape(p.title)}</text>',
           f'<rect x="{LEFT}" y="{top + TOP}" width="{w}" height="{h}" fill="none" stroke="#333"/>']
    for t in (_log_ticks(y_lo, y_hi) if p.log_y else _nice_ticks(y_lo, y_hi)):
        y = sy(t)
        out.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + w}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{_fmt(t)}</text>')
    for t in _nice_ticks(x_lo, x_hi, 8, integer=all(float(x).is_integer() for x in xs)):
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" y1="{top + TOP + h}" x2="{x:.1f}" y2="{top + TOP + h + 4}" stroke="#333"/>')
        out.append(f'<text x="{x:.1f}" y="{top + TOP + h + 17}" font-size="11" text-anchor="middle">{_fmt(t)}</text>')
    out.append(f'<text x="{LEFT + w / 2}" y="{top + PANEL_H - 8}" font-size="12" '
               f'text-anchor="middle">{escape(p.xlabel)}</text>')
    cy = top + TOP + h / 2
    out.append(f'<text x="16" y="{cy:.1f}" font-size="12" text-anchor="middle" '
               f'transform="rotate(-90 16 {cy:.1f})">{escape(p.ylabel)}</text>')
    for value, label in p.hlines:
        y = sy(value)
        out.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + w}" y2="{y:.1f}" stroke="#555" '
                   f'stroke-dasharray="6 4"/>')
        out.append(f'<text x="{LEFT + w - 4}" y="{y - 4:.1f}" font-size="11" text-anchor="end">{escape(label)}</text>')
    for i, s in enumerate(p.series):
        colour = PALETTE[i % len(PALETTE)]
        bad = dict(zip(s.points, s.bad, strict=False))
        finite = sorted(_finite(s.points))
        if len(finite) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in finite)
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, y in finite if s.markers else ():
            fill = "white" if bad.get((x, y), False) else colour
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4" fill="{fill}" stroke="{colour}" '
                       f'stroke-width="2"/>')
        ly = top + TOP + 12 + 18 * i
        out.append(f'<line x1="{LEFT + w + 12}" y1="{ly}" x2="{LEFT + w + 34}" y2="{ly}" stroke="{colour}" '
                   f'stroke-width="2"/>')
        out.append(f'<text x="{LEFT + w + 40}" y="{ly + 4}" font-size="12">{escape(s.label)}</text>')
    for j, note in enumerate(p.notes):
        ly = top + TOP + 12 + 18 * (len(p.series) + 1 + j)
        out.append(f'<text x="{LEFT + w + 12}" y="{ly + 4}" font-size="10" fill="#555">{escape(note)}</text>')
    return out


def figure(panels: list[Panel], title: str = "") -> str:
    """The SVG document for `panels`, stacked top to bottom under an optional title."""
    head = 28 if title else 0
    height = head + PANEL_H * len(panels)
    body = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
            f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif">',
            f'<rect width="{WIDTH}" height="{height}" fill="white"/>']
    if title:
        body.append(f'<text x="{WIDTH / 2}" y="20" font-size="15" text-anchor="middle">{escape(title)}</text>')
    for i, p in enumerate(panels):
        body += _panel(p, head + i * PANEL_H)
    body.append("</svg>")
    return "\n".join(body) + "\n"
