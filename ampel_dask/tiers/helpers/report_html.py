"""The pages of the T3 HTML report: a sortable candidate table and one page per object.

Static files only, no network: the sorting is a few lines of inline JavaScript (no CDN; a report is
opened from a laptop's disk, a cluster's shared folder or a mail attachment), the styles are inline,
figures are files beside the pages. The table fits a laptop screen (about 1,300 px): a handful of
chosen result columns with readable names and units, a small light curve and the cutouts per row;
everything else is on the object's page.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ...io.layout import DETECTION, FORCED, UPPER_LIMIT
from ...keys import id_hex
from ..labels import heading

e = html.escape
CUTOUT_NAMES = {"science": "Science", "template": "Template", "difference": "Difference"}
KIND_NAMES = {DETECTION: "detection", UPPER_LIMIT: "upper limit", FORCED: "forced"}
_ZTF_NAME = re.compile(r"^ZTF\d{2}[a-z]{7}$")
RUBIN_MIN_ID = 2**32  # Rubin's diaObjectIds are packed 64-bit ids; smaller ones come from simulations (ELAsTiCC)


@dataclass
class Column:
    """A result column as the pages show it."""

    name: str  # in the selection, e.g. T2LightCurveSummary__peak_mag
    label: str
    unit: str
    numeric: bool

    @property
    def heading(self) -> str:
        return heading(self.label, self.unit)

    @property
    def group(self) -> str:
        """The unit that computed it (``T2LightCurveSummary``), or '' for an alert column."""
        return self.name.split("__", 1)[0] if "__" in self.name else ""


@dataclass
class Entry:
    """One object of the report."""

    rank: int
    stem: str  # file-name-safe id: objects/<stem>.html and its figures
    object_id: str
    stock: int
    survey: str
    alert_id: int | None
    state_id: Any
    ra: float | None
    dec: float | None
    mjd: float | None
    latest: str  # '19.12 (r)'
    values: dict[str, Any]  # every result column of the selection
    stamps: list[str] = field(default_factory=list)  # cutout kinds with a PNG, in CUTOUT_NAMES order
    dps: pa.StructArray | None = None


# --- values ---------------------------------------------------------------------------------------


def _finite(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and not math.isfinite(value))


def fmt(value: Any, unit: str = "") -> str:
    """A value as a cell shows it: a dash when missing, numbers to a precision that suits the unit,
    nested values as short JSON."""
    if not _finite(value):
        return "&ndash;"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        digits = {"MJD": ".4f", "deg": ".5f", "mag": ".2f"}.get(unit, ".4g")
        return e(format(value, digits))
    if isinstance(value, (list, dict)):
        text = json.dumps(value, separators=(",", ":"), default=str)
        return e(text if len(text) <= 80 else text[:77] + "...")
    return e(str(value))


def sort_value(value: Any) -> str:
    """The ``data-v`` a cell sorts by: the number itself, the text, or '' (missing: always last)."""
    if not _finite(value) or isinstance(value, (list, dict)):
        return ""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return repr(value)
    return e(str(value))


def broker_links(object_id: str, survey: str, stock: int) -> list[tuple[str, str]]:
    """The object's pages at public brokers: ALeRCE, Fink and Lasair for a ZTF name; Fink and Lasair for
    a Rubin diaObjectId (not for simulated ids or solar-system objects)."""
    oid = str(object_id)
    if _ZTF_NAME.match(oid):
        return [("ALeRCE", f"https://alerce.online/object/{oid}"), ("Fink", f"https://fink-portal.org/{oid}"),
                ("Lasair", f"https://lasair-ztf.lsst.ac.uk/objects/{oid}/")]  # fmt: skip
    if survey == "lsst" and stock is not None and int(stock) >= RUBIN_MIN_ID and oid == str(stock):
        return [("Fink", f"https://lsst.fink-portal.org/{oid}"), ("Lasair", f"https://lasair.lsst.ac.uk/objects/{oid}/")]
    return []


def sexagesimal(ra: float | None, dec: float | None) -> str:
    """'12:34:56.78 +12:34:56.7' (ICRS), or '' without a position."""
    if not (_finite(ra) and _finite(dec)):
        return ""
    from astropy.coordinates import Angle

    return f"{Angle(ra, 'deg').to_string(unit='hourangle', sep=':', precision=2, pad=True)} " \
           f"{Angle(dec, 'deg').to_string(unit='deg', sep=':', precision=1, alwayssign=True, pad=True)}"  # fmt: skip


def utc(mjd: float | None) -> str:
    """An MJD as a UTC date and time ('2025-12-03 04:12')."""
    if not _finite(mjd):
        return ""
    return (_dt.datetime(1858, 11, 17, tzinfo=_dt.timezone.utc) + _dt.timedelta(days=float(mjd))).strftime("%Y-%m-%d %H:%M")


# --- shared page parts ----------------------------------------------------------------------------

_CSS = """
body{font-family:"DejaVu Sans",Arial,sans-serif;margin:16px 20px;color:#1d1d1d;background:#fff}
h1{font-size:22px;margin:0 0 6px}h2{font-size:17px;margin:22px 0 8px}
p.meta{margin:0 0 12px;color:#444;font-size:13px}a{color:#0b57a4}
table{border-collapse:collapse}
th,td{padding:3px 6px;font-size:13px;vertical-align:middle;border-bottom:1px solid #e2e2e2}
th{background:#f2f2f2;font-weight:600;text-align:left}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}td.num{white-space:nowrap}
code,.mono{font-family:"DejaVu Sans Mono",monospace;font-size:12px}
img.stamp{image-rendering:pixelated;background:#000}
.sub{color:#666;font-weight:normal;font-size:11px}
"""

_TABLE_CSS = """
table.cands{width:100%}
table.cands th{position:sticky;top:0;z-index:1;max-width:6.5em;line-height:1.2;vertical-align:bottom}
table.cands th[data-sort]{cursor:pointer;user-select:none}
table.cands th[data-sort]:hover{background:#e4e4e4}
table.cands th[aria-sort=ascending]::after{content:" \\25B2";font-size:10px}
table.cands th[aria-sort=descending]::after{content:" \\25BC";font-size:10px}
table.cands tbody tr:hover{background:#f7fbff}
table.cands td.rank{background:#fdf6dc}table.cands th.rank{background:#f3e7b8}
td.lc{padding:1px 4px;width:250px}td.lc img{display:block}
td.cut{white-space:nowrap;padding:1px 4px}td.cut img{width:46px;height:46px;margin-right:2px;vertical-align:middle}
td.oid{white-space:nowrap}
"""

_OBJECT_CSS = """
nav{font-size:13px;margin-bottom:10px}
table.facts th{background:none;font-weight:normal;color:#555;padding-right:14px;white-space:nowrap}
figure{margin:8px 0}figcaption{font-size:12px;color:#555;margin-top:4px}
img.lc{max-width:100%;height:auto;border:1px solid #e2e2e2}
.stamps{display:flex;gap:14px}.stamps figure{margin:0;text-align:center}.stamps img{width:189px;height:189px}
table.results{min-width:640px}table.results td.col{color:#777}h3{font-size:14px;margin:14px 0 4px;color:#333}
details{margin-top:18px}summary{cursor:pointer;font-weight:600}
"""

# click (or Enter on) a header to sort by it, again to reverse; missing values stay last; stable
_SORT_JS = """
(function(){
  function key(row,i,num){var v=row.cells[i].getAttribute('data-v');if(v===null||v==='')return null;return num?parseFloat(v):v;}
  function sortBy(table,th,i){
    var asc=th.getAttribute('aria-sort')!=='ascending',num=th.getAttribute('data-sort')==='num';
    Array.prototype.forEach.call(table.tHead.rows[0].cells,function(c){c.removeAttribute('aria-sort');});
    th.setAttribute('aria-sort',asc?'ascending':'descending');
    var body=table.tBodies[0],rows=Array.prototype.slice.call(body.rows);
    rows.sort(function(a,b){
      var x=key(a,i,num),y=key(b,i,num);
      if(x===null)return y===null?0:1;if(y===null)return -1;
      var c=num?x-y:(x<y?-1:(x>y?1:0));return asc?c:-c;});
    rows.forEach(function(r){body.appendChild(r);});
  }
  Array.prototype.forEach.call(document.querySelectorAll('table.cands'),function(table){
    Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,i){
      if(!th.hasAttribute('data-sort'))return;
      th.tabIndex=0;
      th.addEventListener('click',function(){sortBy(table,th,i);});
      th.addEventListener('keydown',function(ev){if(ev.key==='Enter'||ev.key===' '){ev.preventDefault();sortBy(table,th,i);}});
    });
  });
})();
"""


def _page(title: str, css: str, body: list[str], script: str = "") -> str:
    lines = [
        "<!DOCTYPE html>",
        f'<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(title)}</title><style>{_CSS}{css}</style></head><body>",
        *body,
    ]
    if script:
        lines.append(f"<script>{script}</script>")
    lines += ["</body></html>", ""]
    return "\n".join(lines)


# --- the candidate table --------------------------------------------------------------------------


def index_page(title: str, channel: str, run_id: str, entries: list[Entry], shown: list[Column], rank_by: Column,
               descending: bool, total: int) -> str:  # fmt: skip
    """index.html: the ranked objects, one row each, sortable by every column but the figures."""
    order = "highest first" if descending else "lowest first"
    now = _dt.datetime.now(_dt.timezone.utc)
    body = [
        f"<h1>{e(title)}</h1>",
        f'<p class="meta">channel <b>{e(channel)}</b> &middot; run <code>{e(str(run_id))}</code> &middot; '
        f"{len(entries)} of {total} objects, ranked by <b>{e(rank_by.heading)}</b> ({order}) &middot; "
        f"written {now:%Y-%m-%d %H:%M} UTC &middot; click a column to sort, an object for its page</p>",
    ]
    counts: dict[str, int] = {}
    for c in shown:
        counts[c.heading] = counts.get(c.heading, 0) + 1
    rank_sort = "descending" if descending else "ascending"
    head = [
        '<th class="num" data-sort="num" aria-sort="ascending" title="rank">#</th>',
        '<th data-sort="text">Object</th>',
        "<th>Light curve</th>",
        "<th>Cutouts</th>",
        '<th class="num" data-sort="num" title="sorts by RA">RA, Dec<br><span class="sub">[deg]</span></th>',
        '<th class="num" data-sort="num">Last alert<br><span class="sub">[MJD]</span></th>',
        '<th class="num" data-sort="num">Latest<br><span class="sub">[mag]</span></th>',
    ]
    for c in shown:
        unit = f'<br><span class="sub">[{e(c.unit)}]</span>' if c.unit else ""
        source = f'<br><span class="sub">{e(c.group)}</span>' if counts[c.heading] > 1 and c.group else ""
        kind = "num" if c.numeric else "text"
        cls = cell_class(c, rank_by)
        tip = f"{c.name}: the ranking ({rank_sort})" if c.name == rank_by.name else c.name
        head.append(f'<th class="{cls}" data-sort="{kind}" title="{e(tip)}">{e(c.label)}{unit}{source}</th>')
    body.append('<table class="cands" id="candidates"><thead><tr>' + "".join(head) + "</tr></thead><tbody>")
    for en in entries:
        page = f"objects/{e(en.stem)}.html"
        oid = e(str(en.object_id))
        stamps = "".join(
            f'<img class="stamp" src="objects/{e(en.stem)}_{k}.png" width="46" height="46" alt="{CUTOUT_NAMES[k]} cutout of {oid}" title="{CUTOUT_NAMES[k]}">'
            for k in en.stamps
        )
        latest_mag = en.latest.split(" ")[0] if en.latest else ""
        cells = [
            f'<td class="num" data-v="{en.rank}">{en.rank}</td>',
            f'<td class="oid" data-v="{oid}"><a href="{page}">{oid}</a></td>',
            f'<td class="lc"><a href="{page}"><img src="objects/{e(en.stem)}_lc_small.svg" width="250" height="130" alt="light curve of {oid}"></a></td>',
            f'<td class="cut">{stamps}</td>' if stamps else '<td class="cut"><span class="sub">none</span></td>',
            f'<td class="num" data-v="{sort_value(en.ra)}">{fmt(en.ra, "deg")}<br>{fmt(en.dec, "deg")}</td>',
            f'<td class="num" data-v="{sort_value(en.mjd)}">{fmt(en.mjd, "MJD")}</td>',
            f'<td class="num" data-v="{e(latest_mag)}">{e(en.latest) or "&ndash;"}</td>',
            *(f'<td class="{cell_class(c, rank_by)}" data-v="{sort_value(en.values.get(c.name))}">{fmt(en.values.get(c.name), c.unit)}</td>' for c in shown),
        ]
        body.append(f'<tr id="{e(en.stem)}">' + "".join(cells) + "</tr>")
    body.append("</tbody></table>")
    if not entries:
        body.append('<p class="meta">No objects in this selection.</p>')
    return _page(title, _TABLE_CSS, body, _SORT_JS)


def cell_class(c: Column, rank_by: Column) -> str:
    return " ".join(x for x in ("num" if c.numeric else "", "rank" if c.name == rank_by.name else "") if x)


# --- one object -------------------------------------------------------------------------------------


def object_page(title: str, channel: str, run_id: str, en: Entry, columns: list[Column], n: int,
                prev: Entry | None, nxt: Entry | None, links: bool) -> str:  # fmt: skip
    """objects/<stem>.html: the full light curve, the cutouts, every T2 result, the ids, broker links."""
    oid = e(str(en.object_id))
    nav = ['<a href="../index.html">&larr; all candidates</a>']
    if prev is not None:
        nav.append(f'<a href="{e(prev.stem)}.html">&lsaquo; #{prev.rank} {e(str(prev.object_id))}</a>')
    if nxt is not None:
        nav.append(f'<a href="{e(nxt.stem)}.html">#{nxt.rank} {e(str(nxt.object_id))} &rsaquo;</a>')
    body = [f'<nav>{" &middot; ".join(nav)}</nav>', f'<h1>{oid} <span class="sub">#{en.rank} of {n} in {e(title)}</span></h1>']
    facts = [
        ("Survey", e(str(en.survey))),
        ("Position (ICRS)", f"{fmt(en.ra, 'deg')}, {fmt(en.dec, 'deg')} deg &nbsp; <span class=\"mono\">{e(sexagesimal(en.ra, en.dec))}</span>"),
        ("Latest alert", f"<code>{e(str(en.alert_id))}</code> at MJD {fmt(en.mjd, 'MJD')} ({e(utc(en.mjd))} UTC)"),
        ("Latest magnitude", e(en.latest) or "&ndash;"),
        ("State", f"<code>{e(id_hex(en.state_id) if isinstance(en.state_id, bytes) else str(en.state_id))}</code>"),  # 32 hex digits
        ("Channel / run", f"{e(channel)} / <code>{e(str(run_id))}</code>"),
        ("Object id (stock)", f"<code>{e(str(en.stock))}</code>"),
    ]
    brokers = broker_links(en.object_id, en.survey, en.stock) if links else []
    if brokers:
        facts.append(("Public broker pages", " &middot; ".join(f'<a href="{e(url)}" rel="noopener">{name}</a>' for name, url in brokers)))
    body.append('<table class="facts">' + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts) + "</table>")
    body += [
        "<h2>Light curve</h2>",
        f'<figure><img class="lc" src="{e(en.stem)}_lc.svg" width="960" height="480" alt="light curve of {oid}">'
        "<figcaption>Filled circles: detections with 1&sigma; error bars; open triangles: upper limits (5&sigma;, the flat side at the "
        "limit); open squares: forced photometry with S/N &ge; 3; dotted line: the latest alert. Every datapoint of the state "
        "the channel may see.</figcaption></figure>",
    ]
    if en.stamps:
        body.append("<h2>Cutouts of the latest alert</h2>")
        body.append('<div class="stamps">' + "".join(
            f'<figure><img class="stamp" src="{e(en.stem)}_{k}.png" width="189" height="189" alt="{CUTOUT_NAMES[k]} cutout of {oid}">'
            f"<figcaption>{CUTOUT_NAMES[k]}</figcaption></figure>" for k in en.stamps) + "</div>")  # fmt: skip
    body.append("<h2>T2 results</h2>")
    groups: dict[str, list[Column]] = {}
    for c in columns:
        groups.setdefault(c.group, []).append(c)
    if not groups:
        body.append('<p class="meta">No T2 results in this selection.</p>')
    for group, cols in groups.items():
        rows = "".join(
            f'<tr><td>{e(c.label)}</td><td class="num">{fmt(en.values.get(c.name), c.unit)}</td><td>{e(c.unit)}</td>'
            f'<td class="col"><code>{e(c.name.split("__", 1)[-1])}</code></td></tr>' for c in cols
        )
        body.append(f'<h3>{e(group)}</h3><table class="results"><thead><tr><th>Result</th><th class="num">Value</th>'
                    f"<th>Unit</th><th>Column</th></tr></thead><tbody>{rows}</tbody></table>")  # fmt: skip
    body.append(datapoints_table(en.dps))
    return _page(f"{en.object_id}: {title}", _OBJECT_CSS, body)


def datapoints_table(dps: pa.StructArray | None) -> str:
    """The state's datapoints in time order, folded away by default."""
    if dps is None or not len(dps):
        return '<p class="meta">No datapoints.</p>'
    cols = {k: pc.cast(dps.field(k), pa.float64()).to_numpy(zero_copy_only=False) for k in ("mjd", "mag", "mag_err", "maglim", "flux", "flux_err")}
    kind = dps.field("kind").to_numpy(zero_copy_only=False)
    band = dps.field("band").to_pylist()
    order = np.argsort(np.nan_to_num(cols["mjd"], nan=np.inf), kind="stable")
    rows = []
    for i in order.tolist():
        mag = f'{fmt(cols["mag"][i], "mag")} &plusmn; {fmt(cols["mag_err"][i], "mag")}' if math.isfinite(cols["mag"][i]) else "&ndash;"
        flux = f'{fmt(cols["flux"][i])} &plusmn; {fmt(cols["flux_err"][i])}' if math.isfinite(cols["flux"][i]) else "&ndash;"
        rows.append(f'<tr><td class="num">{fmt(cols["mjd"][i], "MJD")}</td><td>{e(str(band[i]))}</td><td>{KIND_NAMES.get(int(kind[i]), str(kind[i]))}</td>'
                    f'<td class="num">{mag}</td><td class="num">{fmt(cols["maglim"][i], "mag")}</td><td class="num">{flux}</td></tr>')  # fmt: skip
    return (f"<details><summary>Datapoints ({len(rows)})</summary><table><thead><tr><th>MJD</th><th>Band</th><th>Kind</th>"
            '<th class="num">Magnitude</th><th class="num">Limit [mag]</th><th class="num">Flux [nJy]</th></tr></thead><tbody>'
            + "".join(rows) + "</tbody></table></details>")  # fmt: skip


__all__ = ["Column", "Entry", "index_page", "object_page", "broker_links", "fmt"]
