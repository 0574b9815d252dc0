"""One object's light curve as a small SVG document, for the HTML report.

The report used to draw its light curves with matplotlib's Agg canvas: ~50-100 ms per object, nearly
all of it laying out and rasterising tick-label text, and a PNG the browser scales down. A light curve
is a few hundred marks; written as SVG it costs well under a millisecond, stays sharp at any zoom and
the text is real text. Tick positions come from matplotlib's ``MaxNLocator`` (the same "nice" steps a
matplotlib axis would choose; no figure is made).

Marks as in AMPEL's and Fink's plots: detections with error bars (filled circles), upper limits as open
down-triangles, forced photometry with S/N >= 3 as open squares, the alert's time as a dotted line;
magnitudes increase downwards.
"""

from __future__ import annotations

import html
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ...io.layout import DETECTION, FORCED, UPPER_LIMIT, flux_to_mag

BAND_COLORS = {"u": "#6a3d9a", "g": "#1b9e3e", "r": "#d62728", "i": "#e6a100", "z": "#8c564b", "y": "#555555"}
OTHER_BAND = "#1f77b4"
WIDTH, HEIGHT = 640, 340
LEFT, RIGHT, TOP, BOTTOM = 70, 570, 30, 292  # the plot area, in px of the viewBox


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


def light_curve_svg(dps: pa.StructArray | None, object_id: str, alert_mjd: float | None) -> str:
    """The SVG text of one light curve (a pure function of its arguments)."""
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
                ys += [y - e, y + e]
            xs.append(marks["ul"][0])
            ys.append(marks["ul"][1])
            layers.append((b, BAND_COLORS.get(b, OTHER_BAND), marks))
    has_alert = alert_mjd is not None and math.isfinite(alert_mjd)
    if has_alert:
        xs.append(np.array([alert_mjd]))
    x0, x1 = padded(xs, (0.0, 1.0))
    y0, y1 = padded(ys, (0.0, 1.0))
    sx, sy = _Scale(x0, x1, LEFT, RIGHT), _Scale(y0, y1, TOP, BOTTOM)  # magnitudes: brighter up
    e = html.escape
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
        'font-family="DejaVu Sans, Arial, sans-serif" font-size="12">',
        f"<title>{e(str(object_id))}: light curve</title>",
        '<rect width="100%" height="100%" fill="white"/>',
        f'<clipPath id="plot"><rect x="{LEFT}" y="{TOP}" width="{RIGHT - LEFT}" height="{BOTTOM - TOP}"/></clipPath>',
    ]
    grid = []
    for v, label in ticks(x0, x1, 6):
        x = f"{sx(v):.1f}"
        grid.append(f"M{x} {BOTTOM}v5")
        out.append(f'<text x="{x}" y="{BOTTOM + 18}" text-anchor="middle">{label}</text>')
    for v, label in ticks(y0, y1, 5):
        y = f"{sy(v):.1f}"
        grid.append(f"M{LEFT} {y}h-5")
        out.append(f'<text x="{LEFT - 8}" y="{y}" text-anchor="end" dominant-baseline="middle">{label}</text>')
    out.append(f'<path d="{"".join(grid)}" stroke="black" fill="none"/>')
    out.append(f'<text x="{(LEFT + RIGHT) / 2:.0f}" y="{HEIGHT - 8}" text-anchor="middle">MJD</text>')
    out.append(f'<text transform="translate(16 {(TOP + BOTTOM) / 2:.0f}) rotate(-90)" text-anchor="middle">mag (AB)</text>')
    out.append(f'<text x="{(LEFT + RIGHT) / 2:.0f}" y="{TOP - 10}" text-anchor="middle" font-size="13">{e(str(object_id))}</text>')
    body = ['<g clip-path="url(#plot)">']
    if has_alert:
        body.append(f'<path class="alert" d="M{sx(alert_mjd):.1f} {TOP}V{BOTTOM}" stroke="#999" stroke-dasharray="2 3" fill="none"/>')
    legend = []
    for b, color, m in layers:
        x, y, err = m["det"]
        if len(x):
            px, lo, hi = _fmt(sx(x)), _fmt(sy(y - err)), _fmt(sy(y + err))
            body.append(f'<path d="{"".join(f"M{a} {c}V{d}" for a, c, d in zip(px, lo, hi))}" stroke="{color}" fill="none"/>')
            body.append(f'<g class="det" fill="{color}">' + "".join(f'<circle cx="{a}" cy="{c}" r="3.5"/>' for a, c in zip(px, _fmt(sy(y)))) + "</g>")
        x, y = m["ul"]
        if len(x):
            d = "".join(f"M{a} {c}m-4.5 -3h9l-4.5 7.5z" for a, c in zip(_fmt(sx(x)), _fmt(sy(y))))
            body.append(f'<path class="ul" d="{d}" stroke="{color}" stroke-opacity="0.6" fill="none"/>')
        x, y, err = m["fp"]
        if len(x):
            px = _fmt(sx(x))
            bars = "".join(f"M{a} {c}V{d}" for a, c, d in zip(px, _fmt(sy(y - err)), _fmt(sy(y + err))))
            boxes = "".join(f"M{a} {c}m-3 -3h6v6h-6z" for a, c in zip(px, _fmt(sy(y))))
            body.append(f'<path class="fp" d="{bars}{boxes}" stroke="{color}" stroke-opacity="0.7" fill="none"/>')
        if any(len(m[k][0]) for k in m):
            legend.append((b, color))
    body.append("</g>")
    out += body
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{RIGHT - LEFT}" height="{BOTTOM - TOP}" stroke="black" fill="none"/>')
    if not legend:
        out.append(f'<text x="{(LEFT + RIGHT) / 2:.0f}" y="{(TOP + BOTTOM) / 2:.0f}" text-anchor="middle">no photometry</text>')
    for i, (b, color) in enumerate(legend):
        y = TOP + 10 + 18 * i
        out.append(f'<circle cx="{RIGHT + 16}" cy="{y}" r="3.5" fill="{color}"/><text x="{RIGHT + 26}" y="{y}" dominant-baseline="middle">{e(b)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


__all__ = ["light_curve_svg", "ticks", "padded", "BAND_COLORS"]
