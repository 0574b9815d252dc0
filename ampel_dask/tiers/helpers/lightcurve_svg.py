"""One object's light curve as a small SVG document, for the HTML report.

The report used to draw its light curves with matplotlib's Agg canvas: ~50-100 ms per object, nearly
all of it laying out and rasterising tick-label text, and a PNG the browser scales down. A light curve
is a few hundred marks; written as SVG it costs well under a millisecond, stays sharp at any zoom and
the text is real text. Tick positions come from matplotlib's ``MaxNLocator`` (the same "nice" steps a
matplotlib axis would choose; no figure is made).

Marks as in AMPEL's and Fink's plots: detections with 1-sigma error bars (filled circles), upper limits
as open down-triangles (flat side at the limit), forced photometry with S/N >= 3 as open squares, one
colour per band, the alert's time as a dotted line; magnitudes increase downwards. Two sizes: a large
plot for an object's page (15 px text, 960 px wide) and a small one for a row of the candidate table.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ...io.layout import DETECTION, FORCED, UPPER_LIMIT, flux_to_mag

BAND_COLORS = {"u": "#6a3d9a", "g": "#1b9e3e", "r": "#d62728", "i": "#e6a100", "z": "#8c564b", "y": "#555555"}
OTHER_BAND = "#1f77b4"
MAX_ERR_RANGE = 1.0  # mag: error bars count towards the axis range up to this length


@dataclass(frozen=True)
class Layout:
    """Size of the drawing and of its marks, in px of the viewBox (shown 1:1 on the report's pages)."""

    width: int
    height: int
    left: int
    right: int
    top: int
    bottom: int
    font: int  # px
    marker: float  # radius of a detection's circle; triangles and squares scale with it
    x_ticks: int
    y_ticks: int
    labels: bool  # axis titles and the object's name (the small plot sits in a row that names it)


LARGE = Layout(960, 480, 78, 880, 36, 426, 15, 4.5, 8, 6, True)  # the object's own page
SMALL = Layout(250, 130, 38, 226, 6, 110, 10, 2.4, 3, 3, False)  # a cell of the candidate table
WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = LARGE.width, LARGE.height, LARGE.left, LARGE.right, LARGE.top, LARGE.bottom


def _bands(band: np.ndarray) -> list[str]:
    present = {b for b in band.tolist() if b}
    return [b for b in BAND_COLORS if b in present] + sorted(present - set(BAND_COLORS))


def padded(values: list[np.ndarray], empty: tuple[float, float]) -> tuple[float, float]:
    """Data range plus 5% on each side (matplotlib's default margins); a single value gets +-1."""
    v = np.concatenate(values) if values else np.empty(0)
    v = v[np.isfinite(v)]
    if not len(v):
        return empty
    lo, hi = float(v.min()), float(v.max())
    pad = 0.05 * (hi - lo) if hi > lo else 1.0
    return lo - pad, hi + pad


def ticks(lo: float, hi: float, n: int) -> list[tuple[float, str]]:
    """At most ``n`` nice tick values inside [lo, hi] with labels that show just enough decimals."""
    from matplotlib.ticker import MaxNLocator

    vals = [v for v in MaxNLocator(n).tick_values(lo, hi) if lo <= v <= hi]
    if len(vals) < 2:
        return [(v, f"{v:g}") for v in vals]
    step = min(b - a for a, b in zip(vals, vals[1:]))
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 0
    return [(v, f"{v:.{decimals}f}") for v in vals]


class _Scale:
    def __init__(self, lo: float, hi: float, a: float, b: float):
        self.lo, self.k, self.a = lo, (b - a) / (hi - lo), a

    def __call__(self, v: np.ndarray | float) -> np.ndarray | float:
        return self.a + (np.asarray(v, dtype=float) - self.lo) * self.k


def _fmt(v: np.ndarray) -> list[str]:
    return [f"{x:.1f}" for x in np.asarray(v, dtype=float).tolist()]


def light_curve_svg(dps: pa.StructArray | None, object_id: str, alert_mjd: float | None, layout: Layout = LARGE) -> str:
    """The SVG text of one light curve (a pure function of its arguments)."""
    L = layout
    layers: list[tuple[str, str, dict]] = []  # (band, color, marks)
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    if dps is not None and len(dps):
        f = {k: pc.cast(dps.field(k), pa.float64()).to_numpy(zero_copy_only=False) for k in ("mjd", "mag", "mag_err", "maglim", "flux", "flux_err")}
        kind = dps.field("kind").to_numpy(zero_copy_only=False)
        band = np.asarray(dps.field("band").to_pylist(), dtype=object)
        with np.errstate(divide="ignore", invalid="ignore"):
            snr = f["flux"] / f["flux_err"]
            fmag, fmag_err = flux_to_mag(f["flux"]), 1.0857 * f["flux_err"] / f["flux"]
        t_ok = np.isfinite(f["mjd"])
        for b in _bands(band):
            sel = (band == b) & t_ok
            det = sel & (kind == DETECTION) & np.isfinite(f["mag"])
            ul = sel & (kind == UPPER_LIMIT) & np.isfinite(f["maglim"])
            fp = sel & (kind == FORCED) & (snr >= 3) & np.isfinite(fmag)
            marks = {
                "det": (f["mjd"][det], f["mag"][det], np.where(np.isfinite(f["mag_err"][det]), f["mag_err"][det], 0.0)),
                "ul": (f["mjd"][ul], f["maglim"][ul]),
                "fp": (f["mjd"][fp], fmag[fp], np.where(np.isfinite(fmag_err[fp]), fmag_err[fp], 0.0)),
            }
            for key in ("det", "fp"):
                x, y, e = marks[key]
                xs.append(x)
                e = np.minimum(e, MAX_ERR_RANGE)  # a point with a huge error must not flatten the others; its bar is clipped
                ys += [y - e, y + e]
            xs.append(marks["ul"][0])
            ys.append(marks["ul"][1])
            layers.append((b, BAND_COLORS.get(b, OTHER_BAND), marks))
    has_alert = alert_mjd is not None and math.isfinite(alert_mjd)
    if has_alert:
        xs.append(np.array([alert_mjd]))
    x0, x1 = padded(xs, (0.0, 1.0))
    y0, y1 = padded(ys, (0.0, 1.0))
    sx, sy = _Scale(x0, x1, L.left, L.right), _Scale(y0, y1, L.top, L.bottom)  # magnitudes: brighter up
    e = html.escape
    r = L.marker
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {L.width} {L.height}" width="{L.width}" height="{L.height}" '
        f'font-family="DejaVu Sans, Arial, sans-serif" font-size="{L.font}">',
        f"<title>{e(str(object_id))}: light curve</title>",
        '<rect width="100%" height="100%" fill="white"/>',
        f'<clipPath id="plot"><rect x="{L.left}" y="{L.top}" width="{L.right - L.left}" height="{L.bottom - L.top}"/></clipPath>',
    ]
    grid = []
    for v, label in ticks(x0, x1, L.x_ticks):
        x = f"{sx(v):.1f}"
        grid.append(f"M{x} {L.bottom}v{L.font // 3}")
        out.append(f'<text x="{x}" y="{L.bottom + 1.3 * L.font:.0f}" text-anchor="middle">{label}</text>')
    for v, label in ticks(y0, y1, L.y_ticks):
        y = f"{sy(v):.1f}"
        grid.append(f"M{L.left} {y}h-{L.font // 3}")
        out.append(f'<text x="{L.left - L.font // 2}" y="{y}" text-anchor="end" dominant-baseline="middle">{label}</text>')
    out.append(f'<path d="{"".join(grid)}" stroke="black" fill="none"/>')
    if L.labels:
        out.append(f'<text x="{(L.left + L.right) / 2:.0f}" y="{L.height - 8}" text-anchor="middle">MJD</text>')
        out.append(f'<text transform="translate({L.font + 4} {(L.top + L.bottom) / 2:.0f}) rotate(-90)" text-anchor="middle">magnitude (AB)</text>')
        out.append(f'<text x="{(L.left + L.right) / 2:.0f}" y="{L.top - 12}" text-anchor="middle" font-size="{L.font + 1}">{e(str(object_id))}</text>')
    body = ['<g clip-path="url(#plot)">']
    if has_alert:
        body.append(f'<path class="alert" d="M{sx(alert_mjd):.1f} {L.top}V{L.bottom}" stroke="#999" stroke-dasharray="2 3" fill="none"/>')
    legend = []
    # an upper limit: an open triangle pointing down (fainter), its flat top at the limit
    tri = f"m-{1.4 * r:.1f} 0h{2.8 * r:.1f}l-{1.4 * r:.1f} {2.4 * r:.1f}z"
    for b, color, m in layers:
        x, y = m["ul"]
        if len(x):
            d = "".join(f"M{a} {c}{tri}" for a, c in zip(_fmt(sx(x)), _fmt(sy(y))))
            body.append(f'<path class="ul" d="{d}" stroke="{color}" stroke-width="1.2" stroke-opacity="0.75" fill="white" fill-opacity="0.6"/>')
        x, y, err = m["det"]
        if len(x):
            px, lo, hi = _fmt(sx(x)), _fmt(sy(y - err)), _fmt(sy(y + err))
            body.append(f'<path class="err" d="{"".join(f"M{a} {c}V{d}" for a, c, d in zip(px, lo, hi))}" stroke="{color}" stroke-width="1.2" fill="none"/>')
            body.append(f'<g class="det" fill="{color}">' + "".join(f'<circle cx="{a}" cy="{c}" r="{r}"/>' for a, c in zip(px, _fmt(sy(y)))) + "</g>")
        x, y, err = m["fp"]
        if len(x):
            px = _fmt(sx(x))
            bars = "".join(f"M{a} {c}V{d}" for a, c, d in zip(px, _fmt(sy(y - err)), _fmt(sy(y + err))))
            boxes = "".join(f"M{a} {c}m-{r:.1f} -{r:.1f}h{2 * r:.1f}v{2 * r:.1f}h-{2 * r:.1f}z" for a, c in zip(px, _fmt(sy(y))))
            body.append(f'<path class="fp" d="{bars}{boxes}" stroke="{color}" stroke-opacity="0.8" fill="none"/>')
        if any(len(m[k][0]) for k in m):
            legend.append((b, color))
    body.append("</g>")
    out += body
    out.append(f'<rect x="{L.left}" y="{L.top}" width="{L.right - L.left}" height="{L.bottom - L.top}" stroke="black" fill="none"/>')
    if not legend:
        out.append(f'<text x="{(L.left + L.right) / 2:.0f}" y="{(L.top + L.bottom) / 2:.0f}" text-anchor="middle">no photometry</text>')
    for i, (b, color) in enumerate(legend):
        y = L.top + L.font * (0.8 + 1.4 * i)
        out.append(f'<circle cx="{L.right + r + 8:.1f}" cy="{y:.1f}" r="{r}" fill="{color}"/>'
                   f'<text x="{L.right + 2 * r + 14:.1f}" y="{y:.1f}" dominant-baseline="middle">{e(b)}</text>')  # fmt: skip
    out.append("</svg>")
    return "\n".join(out) + "\n"


__all__ = ["light_curve_svg", "ticks", "padded", "BAND_COLORS", "Layout", "LARGE", "SMALL"]
