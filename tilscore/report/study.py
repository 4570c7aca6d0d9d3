"""The report's study section: Kaplan–Meier curves as inline SVG, the Cox, log-rank, PH,
Spearman and group-comparison tables, and the notes. Pure: a
:class:`~tilscore.report.survival.CohortStats` in, one HTML string out (no matplotlib)."""

from __future__ import annotations

from html import escape
from pathlib import Path

from tilscore.report.plots import nice_ticks
from tilscore.report.survival import (
    CohortStats,
    KMPlot,
    StatRow,
    cohort_stats,
    read_clinical,
    write_stats,
)
from tilscore.samples import build_samples

CURVE_COLORS = ("#1f4e9c", "#d1495b", "#2a9d4b")  # low / high, or T1 / T2 / T3
W, PH, ML, MR, MT = 340, 150, 44, 10, 26  # width, plot height and margins (px)
LEGEND_LINE = 13  # px per legend entry, under the time axis and its label


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return ""
    if isinstance(v, int):
        return str(v)
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.{digits}f}".rstrip("0").rstrip(".") \
        if abs(v) < 100 else f"{v:.1f}"


def _p(p) -> str:
    return "" if p is None else "< 0.001" if p < 0.001 else f"{p:.3f}"


def km_svg(plot: KMPlot, time_label: str) -> str:
    """One Kaplan–Meier plot: a step line per group with censoring ticks, the log-rank p,
    axes (time, survival probability 0–1) and a legend with n and events."""
    t_max = max((max(c.times + c.censor_times, default=0.0) for c in plot.curves), default=1.0)
    t_max = t_max or 1.0
    ticks = nice_ticks(t_max, 5)
    t_top = max(ticks[-1], t_max)
    pw, ph = W - ML - MR, PH
    H = MT + ph + 38 + LEGEND_LINE * len(plot.curves)

    def sx(t: float) -> float:
        return ML + pw * t / t_top

    def sy(s: float) -> float:
        return MT + ph * (1 - s)

    parts = [f'<svg class="km" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
             f'viewBox="0 0 {W} {H}" role="img" data-variable="{escape(plot.variable)}" '
             f'data-split="{plot.split}" data-curves="{len(plot.curves)}">',
             f'<text class="ttl" x="{ML}" y="15">{escape(_short(plot.variable))} '
             f'({plot.split})</text>']
    for s in (0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line class="grid" x1="{ML}" x2="{ML + pw}" y1="{sy(s):.1f}" '
                     f'y2="{sy(s):.1f}" stroke="#e4e4e4"/><text class="tick" x="{ML - 4}" '
                     f'y="{sy(s) + 4:.1f}" text-anchor="end">{s:g}</text>')
    for t in ticks:
        parts.append(f'<text x="{sx(t):.1f}" y="{MT + ph + 14}" text-anchor="middle">'
                     f'{t:g}</text>')
    parts.append(f'<line x1="{ML}" x2="{ML + pw}" y1="{MT + ph}" y2="{MT + ph}" '
                 f'stroke="#888"/><line x1="{ML}" x2="{ML}" y1="{MT}" y2="{MT + ph}" '
                 f'stroke="#888"/>')
    parts.append(f'<text x="{ML + pw / 2:.0f}" y="{MT + ph + 28}" text-anchor="middle">'
                 f'{escape(time_label)}</text>')
    for k, c in enumerate(plot.curves):
        color = CURVE_COLORS[k % len(CURVE_COLORS)]
        d = [f"M{sx(0):.1f},{sy(1):.1f}"]
        prev = 1.0
        for t, s in zip(c.times, c.survival, strict=True):
            d.append(f"H{sx(t):.1f}V{sy(s):.1f}" if s != prev else f"H{sx(t):.1f}")
            prev = s
        d.append(f"H{sx(max(c.times + c.censor_times, default=0)):.1f}")
        parts.append(f'<path class="curve" d="{"".join(d)}" fill="none" stroke="{color}" '
                     f'stroke-width="1.8"><title>{escape(c.label)}: n {c.n}, {c.events} events'
                     f'</title></path>')
        for t, s in zip(c.censor_times, c.censor_survival, strict=True):
            parts.append(f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{sy(s) - 4:.1f}" '
                         f'y2="{sy(s) + 4:.1f}" stroke="{color}"/>')
        ly = MT + ph + 48 + LEGEND_LINE * k
        parts.append(f'<rect x="{ML}" y="{ly - 8}" width="10" height="3" fill="{color}"/>'
                     f'<text x="{ML + 14}" y="{ly - 4}">{escape(c.label)}: n {c.n}, '
                     f'{c.events} events</text>')
    parts.append(f'<text x="{ML + pw - 4}" y="{MT + 12}" text-anchor="end">log-rank p '
                 f'{_p(plot.p)}</text></svg>')
    return "".join(parts)


def _short(variable: str) -> str:
    """A readable name: ``cd20.densities_per_mm2.cd20_positive.stroma`` → CD20+ /mm²
    stroma; ``he.stromal_til_percent`` → sTIL %."""
    parts = variable.split(".")
    if variable == "he.stromal_til_percent":
        return "sTIL %"
    if len(parts) == 4 and parts[1] == "densities_per_mm2":
        return f"{parts[2].removesuffix('_positive').upper()}+ /mm² {parts[3]}"
    return variable


def _table(rows: list[StatRow], heads: list[tuple[str, str]], table_id: str) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for _, h in heads)
    body = []
    for r in rows:
        cells = []
        for key, _ in heads:
            v = getattr(r, key)
            if key in ("variable", "other"):
                cells.append(f'<td title="{escape(str(v))}">{escape(_short(str(v)))}</td>')
            elif key == "p":
                cells.append(f'<td class="n" data-value="{"" if v is None else repr(v)}">'
                             f'{_p(v)}</td>')
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                cells.append(f'<td class="n" data-value="{v!r}">{_fmt(v)}</td>')
            else:
                cells.append(f"<td>{escape('' if v is None else str(v))}</td>")
        body.append(f'<tr data-analysis="{escape(r.analysis)}" '
                    f'data-variable="{escape(r.variable)}">{"".join(cells)}</tr>')
    return (f'<div class="wrap"><table class="data" id="{table_id}"><thead><tr>{head}</tr>'
            f'</thead><tbody>{"".join(body)}</tbody></table></div>') if body else ""


def survival_section(stats: CohortStats) -> str:
    """The study section of the report."""
    what = (f"survival: time <b>{escape(stats.time_col)}</b>, event "
            f"<b>{escape(stats.event_col)}</b>; " if stats.time_col else "")
    head = (f'<h2 id="study">Study statistics</h2><p class="muted">{what}one unit per '
            f'<b>{stats.level}</b> ({stats.n_units}, {stats.n_with_survival} with survival '
            f'data); all numbers are in cohort_stats.csv and defined in docs/report.md.</p>')
    notes = "".join(f"<li>{escape(n)}</li>" for n in stats.notes)
    parts = [head, f'<ul class="notes" id="study-notes">{notes}</ul>' if notes else ""]
    if stats.km:
        figs = []
        for plot in stats.km:
            if plot.curves:
                figs.append(f'<div class="plot km-plot">{km_svg(plot, stats.time_col)}</div>')
            else:
                figs.append(f'<div class="plot km-plot muted" data-variable='
                            f'"{escape(plot.variable)}">{escape(_short(plot.variable))}: '
                            f'{escape(plot.note)}</div>')
        parts.append(f'<h3>Kaplan–Meier</h3><div class="plots">{"".join(figs)}</div>')
    surv = [r for r in stats.rows if r.analysis.startswith(("km_", "cox_", "ph_test_"))]
    if surv:
        parts.append("<h3>Survival: log-rank, Cox proportional hazards, PH check</h3>")
        parts.append(_table(surv, [("variable", "variable"), ("analysis", "analysis"),
                                   ("n", "n"), ("events", "events"), ("estimate", "HR"),
                                   ("ci_low", "95% CI low"), ("ci_high", "95% CI high"),
                                   ("statistic", "statistic"), ("df", "df"), ("p", "p"),
                                   ("cutoff", "cutoff"), ("note", "note")], "survival-table"))
    corr = [r for r in stats.rows if r.analysis == "spearman"]
    if corr:
        parts.append("<h3>Spearman correlations between markers</h3>")
        parts.append(_table(corr, [("variable", "marker"), ("other", "other marker"),
                                   ("n", "n"), ("estimate", "rho"), ("p", "p"),
                                   ("note", "note")], "spearman-table"))
    groups = [r for r in stats.rows if r.analysis in ("mann_whitney", "wilcoxon_paired")]
    if groups:
        parts.append(f"<h3>Group comparisons by {escape(stats.group_col or '')}</h3>")
        parts.append(_table(groups, [("variable", "marker"), ("analysis", "test"),
                                     ("other", "groups"), ("level", "unit"), ("n", "n"),
                                     ("estimate", "difference"), ("statistic", "statistic"),
                                     ("p", "p"), ("note", "note")], "groups-table"))
    return f'<section id="study-section">{"".join(parts)}</section>'


def run_study(out_dir, summaries: list[dict], *, group_column: str | None, opts) -> str:
    """Build samples.csv rows from `summaries`, compute the statistics of `opts` (a
    :class:`~tilscore.report.survival.StudyOptions`), write ``OUT/cohort_stats.csv`` and return
    the report section. UsageError on bad input (raised before anything is written)."""
    rows = build_samples(summaries, opts.columns)
    clinical = read_clinical(opts.clinical) if opts.clinical else None
    stats = cohort_stats(rows, time_col=opts.time_col, event_col=opts.event_col,
                         cols=opts.columns, level=opts.level, group_col=group_column,
                         clinical=clinical)
    write_stats(Path(out_dir) / "cohort_stats.csv", stats)
    return survival_section(stats)
