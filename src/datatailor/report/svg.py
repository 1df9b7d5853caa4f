"""Small inline-SVG charts for self-contained HTML reports (no JavaScript, no network, no matplotlib).

Each function returns one `<svg>` element with `role="img"`, an `aria-label` (its alt text) and a
`<title>`, so the report reads well in a screen reader and a test can find every chart.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from html import escape

PALETTE = ("#4269d0", "#efb118", "#ff725c", "#6cc5b0", "#3ca951", "#ff8ab7", "#a463f2", "#97bbf5", "#9c6b4e", "#9498a0")
OUTCOME_COLORS = {"wins": "#3ca951", "ties": "#b0b6bf", "losses": "#ff725c"}


def _open(label: str, width: int, height: int) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{escape(label)}" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" font-family="sans-serif" font-size="11">'
        f"<title>{escape(label)}</title>"
    )


def _legend(names: Sequence[str], colors: Sequence[str], x: int, y: int) -> list[str]:
    parts: list[str] = []
    for i, (name, color) in enumerate(zip(names, colors)):
        yy = y + 16 * i
        parts.append(f'<rect x="{x}" y="{yy}" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{x + 14}" y="{yy + 9}">{escape(name)}</text>')
    return parts


def empty_chart(label: str, message: str, width: int = 640, height: int = 60) -> str:
    return (
        _open(label, width, height)
        + f'<rect x="0.5" y="0.5" width="{width - 1}" height="{height - 1}" fill="#fafafa" stroke="#ddd"/>'
        + f'<text x="{width / 2}" y="{height / 2 + 4}" text-anchor="middle" fill="#666">{escape(message)}</text></svg>'
    )


def bar_chart(
    label: str,
    groups: Sequence[str],
    series: Sequence[tuple[str, Sequence[float | None]]],
    *,
    y_max: float | None = None,
    fmt: Callable[[float], str] = lambda v: f"{v:.2f}",
    width: int = 720,
    height: int = 300,
    legend: bool | None = None,
    intervals: Sequence[Sequence[tuple[float, float] | None] | None] | None = None,
) -> str:
    """Grouped vertical bars: one group per x label, one bar per series. None draws no bar ("n/a").

    The legend is drawn when there is more than one series, or when `legend` is True. `intervals`, parallel to
    `series`, gives bars an error bar: (low, high) per group, drawn as a whisker with caps over the bar.
    """
    legend = len(series) > 1 if legend is None else legend
    values = [v for _, vs in series for v in vs if v is not None]
    top = y_max if y_max is not None else nice_top(max(values) if values else 0.0)
    legend_w = 150 if legend else 0
    left, right, top_pad, bottom = 60, 10 + legend_w, 12, 56
    plot_w, plot_h = width - left - right, height - top_pad - bottom
    parts = [_open(label, width, height)]
    for i in range(TICKS + 1):  # grid and y-axis labels
        v = top * i / TICKS
        y = top_pad + plot_h - plot_h * i / TICKS
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end" fill="#555">{escape(fmt(v))}</text>')
    n_groups, n_series = max(1, len(groups)), max(1, len(series))
    group_w = plot_w / n_groups
    bar_w = max(2.0, group_w * 0.8 / n_series)
    for g, group in enumerate(groups):
        gx = left + g * group_w + group_w * 0.1
        for s, (name, vs) in enumerate(series):
            v = vs[g] if g < len(vs) else None
            x = gx + s * bar_w
            color = PALETTE[s % len(PALETTE)]
            if v is None:
                parts.append(f'<text x="{x + bar_w / 2:.1f}" y="{top_pad + plot_h - 3:.1f}" text-anchor="middle" fill="#999" font-size="9">n/a</text>')
                continue
            h = plot_h * min(max(v, 0.0), top) / top if top else 0.0
            y = top_pad + plot_h - h
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w * 0.92:.1f}" height="{h:.1f}" fill="{color}">'
                f"<title>{escape(f'{group} / {name}: {fmt(v)}')}</title></rect>"
            )
            interval = _at(intervals, s, g)
            if interval is not None:
                ys = [top_pad + plot_h - plot_h * min(max(b, 0.0), top) / top for b in interval]
                parts.append(_whisker(x + bar_w * 0.46, bar_w * 0.3, ys, f"{group} / {name}: {fmt(interval[0])} to {fmt(interval[1])}"))
        parts.append(
            f'<text x="{gx + group_w * 0.4:.1f}" y="{top_pad + plot_h + 16}" text-anchor="middle">{escape(_short(group, group_w))}</text>'
        )
    parts.append(f'<line x1="{left}" y1="{top_pad + plot_h}" x2="{left + plot_w}" y2="{top_pad + plot_h}" stroke="#333"/>')
    if legend:
        parts += _legend([n for n, _ in series], [PALETTE[i % len(PALETTE)] for i in range(len(series))], width - legend_w + 6, top_pad)
    parts.append("</svg>")
    return "".join(parts)


def _at(intervals: Sequence[Sequence[tuple[float, float] | None] | None] | None, s: int, g: int) -> tuple[float, float] | None:
    per_group = intervals[s] if intervals and s < len(intervals) else None
    return per_group[g] if per_group and g < len(per_group) else None


def _whisker(x: float, half: float, ys: list[float], title: str) -> str:
    """An error bar at `x` from ys[0] to ys[1] (pixels), with caps `half` wide each side."""
    low, high = ys
    lines = "".join(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}"/>'
                    for x1, y1, x2, y2 in ((x, low, x, high), (x - half, low, x + half, low), (x - half, high, x + half, high)))
    return f'<g class="interval" stroke="#222" stroke-width="1.5"><title>{escape(title)}</title>{lines}</g>'


def stacked_shares(
    label: str,
    rows: Sequence[str],
    parts_: Sequence[tuple[str, Sequence[int]]],
    colors: Sequence[str] | None = None,
    width: int = 720,
) -> str:
    """Horizontal 100 % bars: one row per label, split into parts (e.g. wins/ties/losses counts)."""
    row_h, left, right, top_pad = 24, 200, 150, 8
    height = top_pad * 2 + max(row_h * max(1, len(rows)), 16 * len(parts_)) + 4
    plot_w = width - left - right
    colors = list(colors or PALETTE)
    out = [_open(label, width, height)]
    for r, row in enumerate(rows):
        y = top_pad + r * row_h
        total = sum(vs[r] for _, vs in parts_)
        out.append(f'<text x="{left - 6}" y="{y + 15}" text-anchor="end">{escape(_short(row, left - 10))}</text>')
        x = float(left)
        for p, (name, vs) in enumerate(parts_):
            count = vs[r]
            w = plot_w * count / total if total else 0.0
            if w > 0:
                out.append(
                    f'<rect x="{x:.1f}" y="{y + 2}" width="{w:.1f}" height="{row_h - 6}" fill="{colors[p % len(colors)]}">'
                    f"<title>{escape(f'{row}: {name} {count} of {total}')}</title></rect>"
                )
                if w > 22:
                    out.append(f'<text x="{x + w / 2:.1f}" y="{y + 15}" text-anchor="middle" fill="#fff">{count}</text>')
            x += w
    out += _legend([n for n, _ in parts_], [colors[i % len(colors)] for i in range(len(parts_))], width - right + 10, top_pad)
    out.append("</svg>")
    return "".join(out)


TICKS = 5


def nice_top(peak: float, intervals: int = TICKS) -> float:
    """An axis maximum above `peak` whose `intervals` ticks are round numbers (1, 2, 2.5 or 5 × 10^k apart)."""
    if peak <= 0:
        return 1.0
    raw_step = peak * 1.02 / intervals
    magnitude = 10 ** math.floor(math.log10(raw_step))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw_step)
    return round(step * intervals, 12)


def _short(text: str, space: float) -> str:
    limit = max(4, int(space / 6.5))
    return text if len(text) <= limit else text[: limit - 1] + "…"
