"""HTML of the cohort report: header, sortable cohort table, distributions, slide sections,
failed and incomplete slides. Pure: a loaded :class:`~tilscore.report.Cohort` and rendered
maps in, one HTML string out (system fonts, inline CSS/JS/SVG, no network)."""

from __future__ import annotations

import datetime as dt
import os
import re
from html import escape
from pathlib import Path
from urllib.parse import quote

from tilscore.report.plots import Point, colorbar_svg, strip_box_svg
from tilscore.report.types import MISSING_GROUP, Cohort, SlideEntry, SlideMaps, group_of

COMPARTMENTS = ("tumour", "stroma", "tissue")
NO_MODEL = "none"  # the model name of --model none (tilscore.tissue_only.NO_MODEL)
OK_BADGE = '<span class="ok">ok</span>'
LINKED_FILES = ("summary.json", "cells.csv", "overlay.png", "regions.geojson", "cells.geojson")
TABLE_FILES = {"summary.json": "summary", "cells.csv": "cells", "overlay.png": "overlay",
               "regions.geojson": "regions"}  # short link labels in the cohort table
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;
margin:24px;color:#222;background:#fff;line-height:1.4}
h1{margin:0 0 4px}h2{margin-top:32px;border-bottom:1px solid #ccc}
.meta{color:#444}.meta td{padding:1px 12px 1px 0;vertical-align:top}
.wrap{overflow-x:auto;max-width:100%}
table.data{border-collapse:collapse;font-size:13px}
table.data th,table.data td{border:1px solid #ddd;padding:3px 7px;text-align:left;
white-space:nowrap}
table.data td.n{text-align:right;font-variant-numeric:tabular-nums}
table.data thead th{background:#f1f3f6;position:sticky;top:0;white-space:normal;
vertical-align:bottom}
table.sortable th{cursor:pointer;user-select:none}
table.sortable th[aria-sort=ascending]::after{content:" \\25B2"}
table.sortable th[aria-sort=descending]::after{content:" \\25BC"}
table.data tbody tr:nth-child(even){background:#fafafa}
.flag{display:inline-block;background:#fde7c7;border:1px solid #e0a040;border-radius:3px;
padding:0 4px;margin:0 2px;font-size:12px;cursor:help}
.warn{background:#fff3b0;border-color:#c8a600}.ok{color:#2a7a2a}
.files a{margin-right:6px}.muted{color:#777}
.plots{display:flex;flex-wrap:wrap;gap:18px}
svg.dist .grid{stroke:#e4e4e4}svg text{font-size:11px;fill:#333}
svg .tick{text-anchor:end}svg .ttl{font-size:13px;font-weight:600}
svg .glabel,svg .gn,svg .unit{text-anchor:middle}
section.slide{border-top:2px solid #ccd;margin-top:28px;padding-top:4px}
.figs{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
figure{margin:0;width:380px}figure img{width:380px;height:380px;object-fit:contain;
border:1px solid #ddd;background:#fff}figure img.px{image-rendering:pixelated}
figcaption{font-size:12px;color:#555}
.swatch{display:inline-block;width:11px;height:11px;border:1px solid #999;margin:0 3px 0 8px}
.nums{display:flex;flex-wrap:wrap;gap:18px;margin-top:10px}.nums h4{margin:4px 0}
"""
SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function(table){
 table.querySelectorAll('thead th').forEach(function(th, i){
  th.addEventListener('click', function(){
   var asc = th.getAttribute('aria-sort') !== 'ascending';
   table.querySelectorAll('thead th').forEach(function(h){h.removeAttribute('aria-sort');});
   th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
   var key = function(r){var c = r.cells[i]; if (!c) return '';
     return c.hasAttribute('data-value') ? c.getAttribute('data-value') : c.textContent.trim();};
   var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
   rows.sort(function(a, b){
    var x = key(a), y = key(b);
    if (x === '' || y === '') return (x === '') - (y === '');  /* empty cells last */
    var nx = Number(x), ny = Number(y);
    var d = (!isNaN(nx) && !isNaN(ny)) ? nx - ny
            : x.localeCompare(y, undefined, {numeric: true, sensitivity: 'base'});
    return asc ? d : -d;
   });
   rows.forEach(function(r){body.appendChild(r);});
  });
 });
});
"""


def render_report(cohort: Cohort, *, group_column: str | None, maps: dict[str, SlideMaps],
                  report_dir: Path, study_html: str = "") -> str:
    """The whole report page. `maps`: slide folder name → rendered maps; `report_dir`:
    where the page will live (file links are relative to it); `study_html`: the study
    statistics section (tilscore.report.study), after the distributions."""
    anchors = {e.folder.name: _anchor(e.folder.name) for e in cohort.scored}
    links = {e.folder.name: _file_links(e, report_dir) for e in cohort.scored}
    body = [_header(cohort, group_column), _cohort_table(cohort, group_column, anchors, links),
            _distributions(cohort, group_column, anchors), study_html, _not_scored(cohort)]
    body += [_slide_section(e, maps[e.folder.name], anchors[e.folder.name],
                            links[e.folder.name], group_column) for e in cohort.scored]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>tilscore report: {escape(cohort.out_dir.name)}</title>"
            f"<style>{CSS}</style></head>\n<body>\n" + "\n".join(body)
            + f"\n<script>{SORT_JS}</script>\n</body></html>\n")


def _anchor(name: str) -> str:
    return "slide-" + re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _file_links(entry: SlideEntry, report_dir: Path) -> list[tuple[str, str]]:
    """(name, relative href) of the slide's output files that exist."""
    out = []
    for name in LINKED_FILES:
        path = entry.folder / name
        if path.is_file():
            rel = os.path.relpath(path.resolve(), report_dir.resolve())
            out.append((name, quote(Path(rel).as_posix())))
    return out


def _num(v) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "" if v is None else str(v)
    if isinstance(v, int):
        return f"{v:,}"
    a = abs(v)
    return f"{v:,.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}" if a >= 0.1 \
        else f"{v:.3g}"


def _td(value, numeric: bool | None = None, inner: str | None = None) -> str:
    """A cell whose data-value is the exact number (sorting, tests) and text is rounded."""
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool) \
        if numeric is None else numeric
    dv = "" if value is None else repr(value) if numeric else str(value)
    cls = ' class="n"' if numeric else ""
    text = inner if inner is not None else escape(_num(value))
    return f'<td{cls} data-value="{escape(dv)}">{text}</td>'


def _positive_classes(cohort: Cohort) -> list[str]:
    """IHC positive cell classes (e.g. cd20_positive) present in the cohort's summaries."""
    seen: dict[str, None] = {}
    for e in cohort.scored:
        seen.update(dict.fromkeys(k for k in (e.summary.get("densities_per_mm2") or {})
                                  if k.endswith("_positive")))
    return list(seen)


def _score_columns(cohort: Cohort) -> list[tuple[str, str]]:
    """(scores.csv key, header) of the key scores shown for this cohort's stains."""
    stains = {e.summary.get("stain") for e in cohort.scored}
    cols = []
    if "he" in stains or any("stromal_til_percent" in e.summary for e in cohort.scored):
        cols += [("stromal_til_percent", "sTIL %"), ("til_score_tiger", "TIGER %")]
    positives = _positive_classes(cohort)
    if positives or any("percent_positive" in e.summary for e in cohort.scored):
        cols += [("percent_positive", "% positive"), ("h_score", "H-score")]
    for cls in positives:
        marker = cls.removesuffix("_positive").upper()
        cols += [(f"densities_per_mm2.{cls}.{c}", f"{marker}+/mm² {c}") for c in COMPARTMENTS]
    return cols + [(f"areas_mm2.{c}", f"{c} mm²") for c in ("tissue", "tumour", "stroma")]


def _header(cohort: Cohort, group_column: str | None) -> str:
    def distinct(f) -> str:
        values = sorted({str(v) for v in map(f, cohort.scored) if v not in (None, "")})
        return escape(", ".join(values)) or '<span class="muted">unknown</span>'

    def model(e):
        return _model_line(e.summary)

    stains = sorted({str(e.summary.get("stain")) for e in cohort.scored})
    rows = [("output folder", escape(str(cohort.out_dir.resolve()))),
            ("generated", escape(dt.datetime.now().astimezone().isoformat(timespec="seconds"))),
            ("slides", f'<span id="n-scored">{len(cohort.scored)}</span> scored, '
                       f'<span id="n-failed">{len(cohort.failures)}</span> failed, '
                       f'<span id="n-incomplete">{len(cohort.incomplete)}</span> incomplete'),
            ("stains", escape(", ".join(stains))),
            ("tilscore version", distinct(lambda e: e.summary.get("tilscore_version"))),
            ("model", distinct(model)),
            ("config hash", distinct(lambda e: e.summary.get("config_hash"))),
            ("grouped by", escape(group_column) if group_column else "—")]
    table = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in rows)
    return f'<h1>tilscore report</h1><table class="meta" id="meta">{table}</table>'


def _flags_html(summary: dict) -> str:
    flags = (summary.get("qc") or {}).get("flags") or []
    parts = [f'<span class="flag" title="{escape(str(f.get("message", "")))}">'
             f'{escape(str(f.get("code", "?")))}</span>' for f in flags if isinstance(f, dict)]
    warnings = [str(w) for w in summary.get("warnings") or []]
    if warnings:
        parts.append(f'<span class="flag warn" title="{escape(chr(10).join(warnings))}">'
                     f'{len(warnings)} warning{"s" * (len(warnings) > 1)}</span>')
    return "".join(parts)


def _cohort_table(cohort: Cohort, group_column: str | None, anchors: dict[str, str],
                  links: dict[str, list]) -> str:
    scores = _score_columns(cohort)
    meta = cohort.metadata_columns()
    extra = [group_column] if group_column and group_column not in (
        {k for k, _ in scores} | set(meta) | {"slide", "stain"}) else []
    # QC third: the column a reader must not miss, visible without scrolling sideways
    heads = (["slide", "stain", "QC"] + [h for _, h in scores]
             + [m.removeprefix("metadata.") for m in meta] + extra + ["files"])
    rows = []
    for e in cohort.scored:
        flat, name = e.flat, e.folder.name
        flags = _flags_html(e.summary)
        n_flags = len((e.summary.get("qc") or {}).get("flags") or []) + len(
            e.summary.get("warnings") or [])
        cells = [_td(e.slide_id, False, f'<a href="#{anchors[name]}">{escape(e.slide_id)}</a>'),
                 _td(flat.get("stain"), False),
                 _td(n_flags, True, flags or OK_BADGE).replace(' class="n"', ' class="qc"', 1)]
        cells += [_td(flat.get(k)) for k, _ in scores]
        cells += [_td(flat.get(k), False) for k in meta + extra]
        files = " ".join(f'<a href="{href}" title="{escape(n)}">{TABLE_FILES[n]}</a>'
                         for n, href in links[name] if n in TABLE_FILES)
        cells.append(f'<td class="files">{files}</td>')
        rows.append(f'<tr data-slide="{escape(e.slide_id)}">{"".join(cells)}</tr>')
    head = "".join(f"<th>{escape(h)}</th>" for h in heads)
    return (f'<h2>Cohort</h2><p class="muted">Click a column header to sort. Values are '
            f'rounded here; exact values are in scores.csv and each summary.json.</p>'
            f'<div class="wrap"><table class="data sortable" id="cohort"><thead><tr>{head}'
            f'</tr></thead><tbody>{"".join(rows)}</tbody></table></div>')


def _metrics(cohort: Cohort) -> list[tuple[str, str, str]]:
    """(scores.csv key, title, unit) of every plotted distribution."""
    out = [("stromal_til_percent", "Stromal TIL %", "% of bulk stroma")]
    for cls in _positive_classes(cohort):
        marker = cls.removesuffix("_positive").upper()
        out += [(f"densities_per_mm2.{cls}.{c}", f"{marker}+ cells in {c}", "cells per mm²")
                for c in COMPARTMENTS]
    return out


def _group_order(name: str) -> tuple:
    return (name == MISSING_GROUP, [int(t) if t.isdigit() else t.lower()
                                    for t in re.split(r"(\d+)", name)])


def _distributions(cohort: Cohort, group_column: str | None, anchors: dict[str, str]) -> str:
    plots = []
    for key, title, unit in _metrics(cohort):
        groups: dict[str, list[Point]] = {}
        missing = 0
        for e in cohort.scored:
            value = e.flat.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                groups.setdefault(group_of(e, group_column), []).append(
                    Point(float(value), e.slide_id, "#" + anchors[e.folder.name]))
            elif _applies(e, key):
                missing += 1
        if not groups:
            continue
        ordered = sorted(groups.items(), key=lambda kv: _group_order(kv[0]))
        note = (f'<div class="muted">{missing} slide{"s" * (missing != 1)} without a value</div>'
                if missing else "")
        plots.append(f'<div class="plot" data-metric="{escape(key)}">'
                     f'{strip_box_svg(ordered, title=title, unit=unit)}{note}</div>')
    split = f" by <b>{escape(group_column)}</b>" if group_column else ""
    body = "".join(plots) or '<p class="muted">No values to plot.</p>'
    return (f'<h2>Distributions{split}</h2><p class="muted">One dot per slide (hover for its '
            f'id, click to open it); boxes show quartiles and 1.5 IQR whiskers from n ≥ 3.</p>'
            f'<div class="plots">{body}</div>')


def _applies(entry: SlideEntry, key: str) -> bool:
    """Whether a slide should have had a value for `key` (H&E for sTIL %, its marker)."""
    if key == "stromal_til_percent":
        return entry.summary.get("stain") == "he"
    return key.split(".")[1] in (entry.summary.get("densities_per_mm2") or {})


def _not_scored(cohort: Cohort) -> str:
    if not cohort.failures and not cohort.incomplete:
        return ""
    rows = [f'<tr class="failed"><td>{escape(f["input"])}</td><td>failed</td>'
            f'<td>{escape(f["error"])}</td></tr>' for f in cohort.failures]
    rows += [f'<tr class="incomplete" data-slide="{escape(e.slide_id)}"><td>'
             f'{escape(e.slide_id)}/</td><td>incomplete</td><td>{escape(e.problem)}</td></tr>'
             for e in cohort.incomplete]
    return ('<h2 id="not-scored">Failed and incomplete</h2><div class="wrap">'
            '<table class="data" id="not-scored-table"><thead><tr><th>input / folder</th>'
            f'<th>status</th><th>error</th></tr></thead><tbody>{"".join(rows)}</tbody>'
            '</table></div>')


def _kv_table(title: str, rows: list[tuple[str, object]]) -> str:
    body = "".join(f"<tr><td>{escape(k)}</td>{_td(v)}</tr>" for k, v in rows
                   if v is not None and not isinstance(v, (dict, list)))
    return f'<div><h4>{escape(title)}</h4><table class="data">{body}</table></div>' \
        if body else ""


def _cells_table(summary: dict) -> str:
    """Counts with their densities; a compartment no slide value was measured for (all
    null, e.g. tumour and stroma with ``--model none``) is left out, and a cell without a
    value stays empty."""
    counts = summary.get("counts") or {}
    dens = summary.get("densities_per_mm2") or {}
    comps = [c for c in ("tumour", "stroma", "other", "tissue")
             if any((counts.get(cls) or {}).get(c) is not None for cls in counts)]
    head = "".join(f"<th>{c}</th>" for c in comps)
    rows = []
    for cls in counts:
        cells = []
        for c in comps:
            n, d = (counts.get(cls) or {}).get(c), (dens.get(cls) or {}).get(c)
            text = "" if n is None else _num(n) if d is None else \
                f'{_num(n)} <span class="muted">({_num(d)}/mm²)</span>'
            cells.append(_td(n, True, text))
        rows.append(f"<tr><td>{escape(cls)}</td>{''.join(cells)}</tr>")
    return (f'<div><h4>Cells: count (per mm²)</h4><table class="data"><thead><tr><th>class'
            f'</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'
            if rows and comps else "")


def _intensity_table(summary: dict) -> str:
    """IHC: cells per DAB intensity bin (QuPath-style: none = the negative cells; a positive
    cell is at least weak), with the bins' limits in DAB optical density."""
    bins = summary.get("intensity_bins")
    if not isinstance(bins, dict) or len(bins) != 4:
        return ""
    used = summary.get("score_config") or {}  # the bins the slide was scored with
    limits = [used.get(k) for k in ("dab_bin_weak_od", "dab_bin_moderate_od",
                                    "dab_bin_strong_od")]
    names = list(bins)
    labels = [f"{names[0]} (negative)", f"{names[1]} (positive)", names[2], names[3]]
    if len(limits) == 3 and all(isinstance(v, (int, float)) for v in limits):
        _, moderate, strong = limits
        labels[1:] = [f"{names[1]} (positive, < {moderate:g} OD)",
                      f"{names[2]} ({moderate:g}–{strong:g} OD)",
                      f"{names[3]} (≥ {strong:g} OD)"]
    return _kv_table("DAB intensity bins: cells", list(zip(labels, bins.values(), strict=True)))


def _model_line(summary: dict) -> str:
    """The model as a reader needs it: name, version and sha256 prefix; for
    ``--model none`` what that means instead of "none 0.1.0 (sha256 none)"."""
    m = summary.get("model") or {}
    if m.get("name") == NO_MODEL:
        return "none: no compartment model (positive cells over all tissue)"
    return f"{m.get('name', '?')} {m.get('version', '')} (sha256 {str(m.get('sha256'))[:12]})"


def _has_compartments(summary: dict) -> bool:
    """False when tumour and stroma were not separated (``--model none``)."""
    return (summary.get("model") or {}).get("name") != NO_MODEL


def _slide_section(e: SlideEntry, maps: SlideMaps, anchor: str, links: list,
                   group_column: str | None) -> str:
    s = e.summary
    model = s.get("model") or {}
    compartments = _has_compartments(s)
    sub = " · ".join(x for x in (str(s.get("stain", "")), f"{s.get('mpp')} µm/px"
                                  if s.get("mpp") else "",
                                  f"model {model.get('name', '?')}" if compartments
                                  else "no compartment model") if x)
    notes = [f'<li><span class="flag">{escape(str(f.get("code", "?")))}</span> '
             f'{escape(str(f.get("message", "")))}</li>'
             for f in (s.get("qc") or {}).get("flags") or [] if isinstance(f, dict)]
    notes += [f'<li><span class="flag warn">warning</span> {escape(str(w))}</li>'
              for w in s.get("warnings") or []]
    notes += [f'<li class="muted">{escape(p)}</li>' for p in maps.problem]
    figs = []
    if maps.overlay_uri:
        figs.append(f'<figure><img alt="overlay of {escape(e.slide_id)}" '
                    f'src="{maps.overlay_uri}"><figcaption>overlay: '
                    f'{"regions and detected cells" if compartments else "positive cells"}'
                    f'</figcaption></figure>')
    if maps.regions_uri and compartments:  # without a model every tissue pixel is "other"
        legend = "".join(f'<span class="swatch" style="background:rgb({r},{g},{b})"></span>'
                         f'{escape(n)}' for n, (r, g, b, *_) in maps.legend)
        figs.append(f'<figure><img class="px" alt="region map" src="{maps.regions_uri}">'
                    f'<figcaption>region map (maps.zarr){legend}</figcaption></figure>')
    if maps.density_uri:
        figs.append(f'<figure><img class="px" alt="{escape(maps.density_title)}" '
                    f'src="{maps.density_uri}"><figcaption>{escape(maps.density_title)} '
                    f'({escape(maps.density_unit)}; glass transparent)<br>'
                    f'{colorbar_svg(maps.density_vmax, maps.density_unit)}</figcaption></figure>')
    parts = s.get("til_parts") or {}
    scores = [("stromal TIL % (ITWG, disc nuclear area)", s.get("stromal_til_percent")),
              ("stromal TIL % (segmented nuclei)", s.get("stromal_til_percent_segmented")),
              ("TIGER TIL score", s.get("til_score_tiger")),
              ("lymphocytes in bulk stroma (N)", parts.get("lymphocytes_in_bulk_stroma")),
              ("bulk stroma area mm²", parts.get("bulk_stroma_area_mm2")),
              ("nucleus area µm²", parts.get("nucleus_area_um2")),
              ("TIGER cell area µm²", parts.get("tiger_cell_area_um2")),
              ("stromal lymphocytes near tumour (fraction)",
               s.get("stromal_lymphocytes_near_tumour_fraction")),
              ("% positive", s.get("percent_positive")),
              *((f"% positive in {c}", (s.get("percent_positive_by_compartment") or {}).get(c))
                for c in ("tumour", "stroma")),
              ("H-score (0–300, QuPath-style)", s.get("h_score"))]
    qc = [(k, v) for k, v in (s.get("qc") or {}).items() if k != "flags"]
    run = [("tilscore", s.get("tilscore_version")),
           *((("model version", model.get("version")),
              ("model sha256", str(model.get("sha256", ""))[:12] or None)) if compartments
             else (("model", _model_line(s)),)),
           ("config hash", s.get("config_hash")), ("device", s.get("device")),
           ("mode", s.get("mode")),
           ("region model", ((s.get("fast") or {}).get("region_model") or {}).get("name")),
           ("runtime s", s.get("runtime_s")), ("input", s.get("path"))]
    meta = list((s.get("metadata") or {}).items())
    if group_column and not group_column.startswith("metadata."):
        meta.append((group_column, e.flat.get(group_column)))
    tables = [_kv_table("Scores and their parts", scores),
              _kv_table("Areas mm²", list((s.get("areas_mm2") or {}).items())),
              _cells_table(s), _intensity_table(s), _kv_table("Metadata", meta),
              _kv_table("QC", qc),
              _kv_table("Run", run)]
    files = " ".join(f'<a href="{href}">{escape(n)}</a>' for n, href in links)
    return (f'<section class="slide" id="{anchor}"><h3>{escape(e.slide_id)} '
            f'<small class="muted">{escape(sub)}</small> <small><a href="#cohort">'
            f'↑ table</a></small></h3>'
            + (f'<ul class="notes">{"".join(notes)}</ul>' if notes else "")
            + f'<div class="figs">{"".join(figs)}</div><div class="nums">{"".join(tables)}'
            f'</div><p class="files">files: {files}</p></section>')
