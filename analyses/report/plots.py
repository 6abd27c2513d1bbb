"""Small dependency-free SVG charts: lines, points, bars and steps on linear or log-x axes.

Every label reaches the page through ``html.escape``; coordinates are formatted numbers. Points
that are not finite (or not positive on a log axis) are dropped, never drawn at the origin.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from typing import Literal

POS_COLOR = "#b2182b"  # positive side of a signed latent
NEG_COLOR = "#2166ac"  # negative side
# Series colours; red and blue are kept for the two signs.
PALETTE = ("#1b7837", "#762a83", "#e08214", "#35978f", "#8c510a", "#4d4d4d", "#c51b7d", "#7fbc41")

Kind = Literal["line", "points", "bars", "step"]

_LEFT, _RIGHT, _TOP, _BOTTOM = 56, 14, 26, 40


@dataclass
class Series:
    """One thing to draw. ``bars`` and ``step`` read ``x`` as bin left edges of width ``width``;
    ``titles`` are hover texts for ``points``, ``labels`` texts written beside them."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    color: str
    kind: Kind = "line"
    dashed: bool = False
    width: float = 0.0
    titles: Sequence[str] | None = None
    labels: Sequence[str] | None = None


def color(i: int) -> str:
    """The i-th palette colour (cycling)."""
    return PALETTE[i % len(PALETTE)]


def chart(
    series: Sequence[Series],
    title: str,
    xlabel: str,
    ylabel: str,
    xlog: bool = False,
    xlim: tuple[float, float] | None = None,
    ylim: tuple[float, float] | None = None,
    size: tuple[int, int] = (380, 260),
) -> str:
    """A ``<figure>`` with one SVG chart and an HTML legend (series with an empty label are
    left out of the legend)."""
    w, h = size
    pts = [(x, y) for s in series for x, y in _finite(s, xlog)]
    bar_ends = [
        x + s.width for s in series if s.kind in ("bars", "step") for x, _ in _finite(s, xlog)
    ]
    xs = [p[0] for p in pts] + bar_ends
    ys = [p[1] for p in pts] + [0.0] * any(s.kind == "bars" for s in series)
    sx = _Scale(*(xlim or _span(xs, xlog)), _LEFT, w - _RIGHT, xlog)
    sy = _Scale(*(ylim or _span(ys, False)), h - _BOTTOM, _TOP, False)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" height="{h}" '
        f'role="img" aria-label="{escape(title)}">',
        f'<text x="{w / 2:.1f}" y="16" class="t">{escape(title)}</text>',
        *_axes(sx, sy, w, h, xlabel, ylabel),
    ]
    for s in series:
        parts.extend(_draw(s, sx, sy, xlog))
    parts.append("</svg>")
    legend = "".join(
        f'<span class="key"><i style="background:{s.color}"></i>{escape(s.label)}'
        f"{' (dashed)' if s.dashed else ''}</span>"
        for s in series
        if s.label
    )
    return f'<figure class="chart">{"".join(parts)}<figcaption>{legend}</figcaption></figure>'


def empty(title: str, message: str, size: tuple[int, int] = (380, 260)) -> str:
    """A placeholder figure saying why there is nothing to draw."""
    w, h = size
    return (
        f'<figure class="chart"><svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" '
        f'width="{w}" height="{h}" role="img" aria-label="{escape(title)}">'
        f'<text x="{w / 2:.1f}" y="16" class="t">{escape(title)}</text>'
        f'<text x="{w / 2:.1f}" y="{h / 2:.1f}" class="msg">{escape(message)}</text></svg>'
        "</figure>"
    )


class _Scale:
    """Maps data [lo, hi] to pixels [a, b], linearly or in log10."""

    def __init__(self, lo: float, hi: float, a: float, b: float, log: bool) -> None:
        self.log = log
        self.lo, self.hi = (math.log10(lo), math.log10(hi)) if log else (lo, hi)
        self.a, self.b = a, b

    def __call__(self, v: float) -> float:
        t = math.log10(v) if self.log else v
        return self.a + (t - self.lo) / (self.hi - self.lo) * (self.b - self.a)

    def ticks(self) -> list[float]:
        if self.log:
            return [
                10.0**e for e in range(math.ceil(self.lo - 1e-9), math.floor(self.hi + 1e-9) + 1)
            ]
        step = _nice((self.hi - self.lo) / 5)
        first = math.ceil(self.lo / step - 1e-9)
        return [
            round(k * step, 12)
            for k in range(first, first + 12)
            if k * step <= self.hi + 1e-9 * step
        ]


def _nice(raw: float) -> float:
    """1, 2, 2.5 or 5 times a power of ten, at least ``raw``."""
    power = 10.0 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * (1 - 1e-9))


def _span(values: list[float], log: bool) -> tuple[float, float]:
    """A padded data range; never empty or zero-width."""
    if not values:
        return (1.0, 10.0) if log else (0.0, 1.0)
    lo, hi = min(values), max(values)
    if log:
        return (lo / 1.5, hi * 1.5) if lo == hi else (lo, hi)
    if lo == hi:
        return lo - 0.5 - abs(lo) * 0.1, hi + 0.5 + abs(hi) * 0.1
    pad = (hi - lo) * 0.05
    return lo - pad, hi + pad


def _ok(x: float, y: float, xlog: bool) -> bool:
    return math.isfinite(x) and math.isfinite(y) and (x > 0 or not xlog)


def _finite(s: Series, xlog: bool) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in zip(s.x, s.y, strict=True) if _ok(x, y, xlog)]


def _tick_label(v: float) -> str:
    if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
        return f"{v:.0e}".replace("e+0", "e").replace("e-0", "e-")
    return f"{v:.4g}"


def _axes(sx: _Scale, sy: _Scale, w: int, h: int, xlabel: str, ylabel: str) -> list[str]:
    out = [
        f'<rect x="{_LEFT}" y="{_TOP}" width="{w - _LEFT - _RIGHT}" height="{h - _TOP - _BOTTOM}" class="frame"/>'
    ]
    for v in sx.ticks():
        x = sx(v)
        out.append(f'<line x1="{x:.1f}" y1="{_TOP}" x2="{x:.1f}" y2="{h - _BOTTOM}" class="grid"/>')
        out.append(f'<text x="{x:.1f}" y="{h - _BOTTOM + 14}" class="xt">{_tick_label(v)}</text>')
    for v in sy.ticks():
        y = sy(v)
        out.append(f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{w - _RIGHT}" y2="{y:.1f}" class="grid"/>')
        out.append(f'<text x="{_LEFT - 5}" y="{y + 4:.1f}" class="yt">{_tick_label(v)}</text>')
    cx, cy = (_LEFT + w - _RIGHT) / 2, (_TOP + h - _BOTTOM) / 2
    out.append(f'<text x="{cx:.1f}" y="{h - 6}" class="xl">{escape(xlabel)}</text>')
    out.append(
        f'<text x="14" y="{cy:.1f}" class="yl" transform="rotate(-90 14 {cy:.1f})">'
        f"{escape(ylabel)}</text>"
    )
    return out


def _label(px: float, py: float, text: str, sx: _Scale) -> str:
    """A point's label, on the side of the point that has room."""
    anchor, dx = ("end", -6) if px > (sx.a + sx.b) / 2 else ("start", 6)
    return (
        f'<text x="{px + dx:.1f}" y="{py - 5:.1f}" class="pl" text-anchor="{anchor}">'
        f"{escape(text)}</text>"
    )


def _draw(s: Series, sx: _Scale, sy: _Scale, xlog: bool) -> list[str]:
    pts = _finite(s, xlog)
    dash = ' stroke-dasharray="5 3"' if s.dashed else ""
    if s.kind == "bars":
        y0 = sy(max(0.0, sy.lo))
        return [
            f'<rect x="{sx(x):.1f}" y="{min(sy(y), y0):.1f}" width="{max(sx(x + s.width) - sx(x) - 1, 1):.1f}" '
            f'height="{abs(y0 - sy(y)):.1f}" fill="{s.color}" fill-opacity="0.55"/>'
            for x, y in pts
        ]
    if s.kind == "step":
        path = " ".join(
            f"{sx(x):.1f},{sy(y):.1f} {sx(x + s.width):.1f},{sy(y):.1f}" for x, y in pts
        )
        return [
            f'<polyline points="{path}" fill="none" stroke="{s.color}" stroke-width="1.5"{dash}/>'
        ]
    if s.kind == "points":
        titles = list(s.titles) if s.titles is not None else [""] * len(s.x)
        labels = list(s.labels) if s.labels is not None else [""] * len(s.x)
        return [
            f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{s.color}" '
            f'fill-opacity="0.8"><title>{escape(t)}</title></circle>'
            + (_label(sx(x), sy(y), lab, sx) if lab else "")
            for x, y, t, lab in zip(s.x, s.y, titles, labels, strict=True)
            if _ok(x, y, xlog)
        ]
    path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
    dots = "".join(
        f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{s.color}"/>'
        for x, y in pts
        if len(pts) <= 24
    )
    return [
        f'<polyline points="{path}" fill="none" stroke="{s.color}" stroke-width="1.8"{dash}/>{dots}'
    ]
