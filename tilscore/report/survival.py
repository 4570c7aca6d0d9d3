"""The study's statistics on ``samples.csv``: survival (Kaplan–Meier, log-rank, Cox) per
marker, Spearman correlations between markers, and group comparisons (Mann–Whitney;
Wilcoxon signed-rank on a patient's matched pairs).

Every test is computed by lifelines or scipy; this module only chooses the data, the
splits and the transformations, and turns each result into a :class:`StatRow` (one row
of ``OUT/cohort_stats.csv``) or a note saying why it was not computed (too few events,
a constant marker, no survival data, ...). Definitions: ``docs/report.md``.

Pure: rows in (dicts as :func:`tilscore.samples.build_samples` returns them, clinical
rows from a CSV), dataclasses out. lifelines, pandas and scipy are imported where used.
"""

from __future__ import annotations

import csv
import logging
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tilscore.errors import UsageError
from tilscore.io import atomic
from tilscore.io.atomic import read_csv_value
from tilscore.samples import DEFAULT_COLUMNS, SampleColumns

log = logging.getLogger(__name__)

MIN_EVENTS = 3  # fewer events: no log-rank / Cox (a note instead)
MIN_UNITS = 5  # fewer patients (or samples) with a value and survival: no analysis
MIN_PAIRS = 3  # Wilcoxon signed-rank needs this many matched pairs
LOG_OFFSET = 1.0  # log(x + 1): densities (cells/mm²) and sTIL % may be 0
LEVELS = ("patient", "sample")
EVENT_TRUE = {"1", "1.0", "true", "yes", "y", "dead", "died", "event"}
EVENT_FALSE = {"0", "0.0", "false", "no", "n", "alive", "censored"}
STATS_COLUMNS = ("analysis", "variable", "other", "level", "n", "events", "estimate",
                 "ci_low", "ci_high", "statistic", "df", "p", "cutoff", "note")


@dataclass
class StatRow:
    """One result (a row of cohort_stats.csv). `estimate`: HR (Cox), rho (Spearman),
    median difference (Mann–Whitney: group A − group B; Wilcoxon: median paired
    difference); `statistic`: chi² (log-rank, PH test), z (Cox), U, W; `note`: why the
    row has no numbers, or what to keep in mind."""

    analysis: str
    variable: str
    other: str = ""
    level: str = ""
    n: int | None = None
    events: int | None = None
    estimate: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    statistic: float | None = None
    df: float | None = None
    p: float | None = None
    cutoff: str = ""
    note: str = ""


@dataclass
class KMCurve:
    """A Kaplan–Meier curve: step times and survival (starting at time 0, S = 1), the
    times of censored observations and the survival there (for tick marks)."""

    label: str
    n: int
    events: int
    times: list[float]
    survival: list[float]
    censor_times: list[float]
    censor_survival: list[float]


@dataclass
class KMPlot:
    variable: str
    split: str  # "median" or "tertiles"
    curves: list[KMCurve]
    p: float | None
    note: str = ""


@dataclass
class CoxTerm:
    """One covariate of a fitted Cox model (lifelines' summary, 95 % CI)."""

    name: str
    coef: float
    hr: float
    se: float
    coef_low: float
    coef_high: float
    hr_low: float
    hr_high: float
    z: float
    p: float


@dataclass
class CoxModel:
    n: int
    events: int
    terms: list[CoxTerm]
    log_likelihood: float
    lr_statistic: float
    lr_df: float
    lr_p: float
    concordance: float
    fitter: object = field(repr=False, default=None)


@dataclass
class CohortStats:
    """Everything the report's statistics section shows and cohort_stats.csv holds."""

    level: str
    time_col: str
    event_col: str
    group_col: str | None
    variables: list[str]
    n_units: int
    n_with_survival: int
    rows: list[StatRow] = field(default_factory=list)
    km: list[KMPlot] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# -- the statistical building blocks (lifelines / scipy) ----------------------------------

def fit_cox(df, *, duration_col: str, event_col: str) -> CoxModel:
    """Cox proportional hazards on every other column of `df` (lifelines' CoxPHFitter,
    Efron ties, no penalty); raises what lifelines raises on a failed fit."""
    from lifelines import CoxPHFitter  # lazy: lifelines (~2 s), only with survival columns

    cph = CoxPHFitter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings become notes by the caller
        cph.fit(df, duration_col=duration_col, event_col=event_col)
    s = cph.summary
    terms = [CoxTerm(str(name), float(r["coef"]), float(r["exp(coef)"]), float(r["se(coef)"]),
                     float(r["coef lower 95%"]), float(r["coef upper 95%"]),
                     float(r["exp(coef) lower 95%"]), float(r["exp(coef) upper 95%"]),
                     float(r["z"]), float(r["p"])) for name, r in s.iterrows()]
    lr = cph.log_likelihood_ratio_test()
    return CoxModel(int(len(df)), int(df[event_col].sum()), terms, float(cph.log_likelihood_),
                    float(lr.test_statistic), float(lr.degrees_freedom), float(lr.p_value),
                    float(cph.concordance_index_), cph)


def ph_test(model: CoxModel, df) -> dict[str, tuple[float, float]]:
    """Proportional-hazards check of each covariate: (chi², p) of lifelines'
    ``proportional_hazard_test`` (scaled Schoenfeld residuals against rank(time))."""
    # lazy: lifelines (~2 s), only with survival columns
    from lifelines.statistics import proportional_hazard_test

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = proportional_hazard_test(model.fitter, df, time_transform="rank")
    s = res.summary
    return {str(name if not isinstance(name, tuple) else name[0]):
            (float(r["test_statistic"]), float(r["p"])) for name, r in s.iterrows()}


def logrank(durations, events, *, groups) -> tuple[float, float, float]:
    """(chi², df, p) of the log-rank test between the groups (lifelines'
    ``multivariate_logrank_test``; for two groups it equals ``logrank_test``)."""
    # lazy: lifelines (~2 s), only with survival columns
    from lifelines.statistics import multivariate_logrank_test

    res = multivariate_logrank_test(np.asarray(durations, float), np.asarray(groups),
                                    np.asarray(events, int))
    return float(res.test_statistic), float(res.degrees_of_freedom), float(res.p_value)


def km_curve(durations, events, *, label: str) -> KMCurve:
    """Kaplan–Meier estimate of one group (lifelines' KaplanMeierFitter)."""
    from lifelines import KaplanMeierFitter  # lazy: lifelines (~2 s), only with survival columns

    d, e = np.asarray(durations, float), np.asarray(events, int)
    kmf = KaplanMeierFitter().fit(d, e, label=label)
    sf = kmf.survival_function_.iloc[:, 0]
    times, surv = [float(t) for t in sf.index], [float(v) for v in sf.values]
    cens = sorted(float(t) for t, ev in zip(d, e, strict=True) if not ev)
    cens_s = [float(kmf.survival_function_at_times(t).iloc[0]) for t in cens]
    return KMCurve(label, int(len(d)), int(e.sum()), times, surv, cens, cens_s)


# -- reading survival data ----------------------------------------------------------------

def parse_time(value, where: str) -> float | None:
    """A follow-up time (≥ 0); None when empty; UsageError when not a number."""
    text = str(value if value is not None else "").strip()
    if not text:
        return None
    try:
        t = float(text)
    except ValueError:
        raise UsageError(f"{where}: survival time {text!r} is not a number") from None
    if not math.isfinite(t) or t < 0:
        raise UsageError(f"{where}: survival time {text!r} must be a number ≥ 0")
    return t


def parse_event(value, where: str) -> int | None:
    """1 (event) or 0 (censored) from 1/0, true/false, yes/no, dead/alive; None when
    empty; UsageError otherwise."""
    text = str(value if value is not None else "").strip().lower()
    if not text:
        return None
    if text in EVENT_TRUE:
        return 1
    if text in EVENT_FALSE:
        return 0
    raise UsageError(f"{where}: event {text!r} is not 1/0 (true/false, yes/no, dead/alive)")


def read_clinical(path) -> list[dict]:
    """Rows of a clinical CSV (UsageError when unreadable or empty)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = [{(k or "").strip(): read_csv_value((v or "").strip()) for k, v in r.items()}
                    for r in reader]
            fields = [f.strip() for f in reader.fieldnames or []]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"clinical file {path}: cannot read it ({exc})") from exc
    if not rows:
        raise UsageError(f"clinical file {path}: no rows")
    for r in rows:
        r["__fields__"] = fields
    return rows


def attach_survival(samples: list[dict], *, time_col: str, event_col: str,
                    cols: SampleColumns = DEFAULT_COLUMNS, clinical: list[dict] | None = None
                    ) -> list[dict]:
    """Each sample row with ``__time`` and ``__event`` (None where missing).

    Without `clinical` the values come from the manifest (``metadata.<col>`` of
    samples.csv). With `clinical` rows (a CSV), they are joined on the sample column when
    the CSV has it, else on the patient column; the CSV must have the time and event
    columns and one of the id columns. UsageError on a missing column or a value that is
    not a number / an event code."""
    out = []
    if clinical is not None:
        fields = clinical[0]["__fields__"]
        missing = [c for c in (time_col, event_col) if c not in fields]
        if missing:
            raise UsageError(f"clinical file: missing column(s) {', '.join(missing)} "
                             f"(columns: {', '.join(fields)})")
        key = cols.sample if cols.sample in fields else cols.patient
        if key not in fields:
            raise UsageError(f"clinical file: needs a {cols.patient} or {cols.sample} column "
                             f"to join on (columns: {', '.join(fields)})")
        table = {}
        for line, r in enumerate(clinical, start=2):
            table[str(r.get(key, ""))] = (parse_time(r.get(time_col), f"clinical line {line}"),
                                          parse_event(r.get(event_col), f"clinical line {line}"))
        for s in samples:
            t, e = table.get(str(s.get(key, "")), (None, None))
            out.append({**s, "__time": t, "__event": e})
        return out
    t_key, e_key = f"metadata.{time_col}", f"metadata.{event_col}"
    known = set().union(*(s.keys() for s in samples)) if samples else set()
    missing = [c for c, k in ((time_col, t_key), (event_col, e_key)) if k not in known]
    if missing:
        meta = sorted(k.removeprefix("metadata.") for k in known if k.startswith("metadata."))
        raise UsageError(f"--survival: no column {', '.join(missing)} in the manifest "
                         f"metadata (columns: {', '.join(meta) or 'none'}); give --clinical "
                         "CSV or add the columns to the manifest")
    for s in samples:
        where = f"sample {s.get(cols.sample)}"
        out.append({**s, "__time": parse_time(s.get(t_key), where),
                    "__event": parse_event(s.get(e_key), where)})
    return out


def default_variables(samples: list[dict]) -> list[str]:
    """The study's markers present in samples.csv: H&E sTIL %, then per IHC marker the
    positive-cell density in stroma and in tumour."""
    keys: dict[str, None] = {}
    for s in samples:
        keys.update(dict.fromkeys(k for k, v in s.items() if v not in (None, "")))
    out = [k for k in ("he.stromal_til_percent",) if k in keys]
    markers = sorted({k.split(".")[0] for k in keys if ".densities_per_mm2." in k
                      and k.split(".")[2].endswith("_positive")})
    for m in markers:
        out += [k for k in (f"{m}.densities_per_mm2.{m}_positive.stroma",
                            f"{m}.densities_per_mm2.{m}_positive.tumour") if k in keys]
    return out


def _num(v) -> float | None:
    if isinstance(v, bool) or v is None or v == "":
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def analysis_units(rows: list[dict], variables: list[str], *, level: str,
                   cols: SampleColumns) -> tuple[list[dict], list[str]]:
    """Units of the survival analysis: samples as they are, or patients (the mean of each
    variable over the patient's samples; time and event must agree across them, else the
    patient is left out with a note)."""
    if level not in LEVELS:
        raise UsageError(f"unknown level {level!r}; valid: {', '.join(LEVELS)}")
    if level == "sample":
        return [{**r, "__id": str(r.get(cols.sample))} for r in rows], []
    by_patient: dict[str, list[dict]] = {}
    for r in rows:
        by_patient.setdefault(str(r.get(cols.patient)), []).append(r)
    units, notes = [], []
    for pid, rs in sorted(by_patient.items()):
        surv = {(r["__time"], r["__event"]) for r in rs if r["__time"] is not None
                or r["__event"] is not None}
        if len(surv) > 1:
            notes.append(f"patient {pid}: samples disagree on survival ({sorted(surv)}); "
                         "left out")
            continue
        t, e = next(iter(surv)) if surv else (None, None)
        unit = {"__id": pid, cols.patient: pid, "__time": t, "__event": e,
                "__n_samples": len(rs)}
        for v in variables:
            vals = [x for x in (_num(r.get(v)) for r in rs) if x is not None]
            unit[v] = float(np.mean(vals)) if vals else None
        units.append(unit)
    return units, notes


# -- the analyses --------------------------------------------------------------------------

def _label(variable: str) -> str:
    return variable


def survival_of_variable(units: list[dict], variable: str, *, level: str
                         ) -> tuple[list[StatRow], list[KMPlot]]:
    """KM split at the median and at tertiles with log-rank p; Cox per SD of
    log(x + 1) and high vs low (median), each with its PH test; or notes."""
    import pandas as pd  # lazy: lifelines' data frames, only with survival columns

    data = [(u[variable], u["__time"], u["__event"]) for u in units
            if _num(u.get(variable)) is not None and u["__time"] is not None
            and u["__event"] is not None]
    n = len(data)
    x = np.array([d[0] for d in data], float)
    t = np.array([d[1] for d in data], float)
    e = np.array([d[2] for d in data], int)
    events = int(e.sum()) if n else 0
    rows: list[StatRow] = []
    plots: list[KMPlot] = []

    def note_all(why: str) -> tuple[list[StatRow], list[KMPlot]]:
        for a in ("km_logrank_median", "km_logrank_tertiles", "cox_per_sd_log",
                  "cox_high_vs_low"):
            rows.append(StatRow(a, variable, level=level, n=n, events=events, note=why))
        return rows, [KMPlot(variable, "median", [], None, why)]

    if n < MIN_UNITS:
        return note_all(f"{n} {level}s with a value and survival data (< {MIN_UNITS}): "
                        "not analysed")
    if events < MIN_EVENTS:
        return note_all(f"{events} events (< {MIN_EVENTS}): not analysed")
    if np.ptp(x) == 0:
        return note_all(f"constant marker ({x[0]:g} in every {level}): not analysed")

    median = float(np.median(x))
    high = x > median
    if high.all() or not high.any():
        rows.append(StatRow("km_logrank_median", variable, level=level, n=n, events=events,
                            cutoff=f"{median:.6g}", note="no split at the median (ties)"))
        plots.append(KMPlot(variable, "median", [], None, "no split at the median (ties)"))
    else:
        chi2, df, p = logrank(t, e, groups=np.where(high, "high", "low"))
        rows.append(StatRow("km_logrank_median", variable, level=level, n=n, events=events,
                            statistic=chi2, df=df, p=p, cutoff=f"{median:.6g}",
                            note=f"high: > median ({int(high.sum())}), low: ≤ median "
                                 f"({int((~high).sum())})"))
        plots.append(KMPlot(variable, "median", [
            km_curve(t[~high], e[~high], label=f"low (≤ {median:.3g})"),
            km_curve(t[high], e[high], label=f"high (> {median:.3g})")], p))
    q1, q2 = (float(q) for q in np.quantile(x, [1 / 3, 2 / 3]))
    tert = np.where(x <= q1, 0, np.where(x <= q2, 1, 2))
    names = (f"T1 (≤ {q1:.3g})", f"T2 ({q1:.3g}–{q2:.3g}]", f"T3 (> {q2:.3g})")
    if len(set(tert.tolist())) < 3:
        rows.append(StatRow("km_logrank_tertiles", variable, level=level, n=n, events=events,
                            cutoff=f"{q1:.6g}; {q2:.6g}", note="fewer than 3 tertile groups "
                            "(ties)"))
    else:
        chi2, df, p = logrank(t, e, groups=tert)
        counts = ", ".join(f"T{k + 1} {int((tert == k).sum())}" for k in range(3))
        rows.append(StatRow("km_logrank_tertiles", variable, level=level, n=n, events=events,
                            statistic=chi2, df=df, p=p, cutoff=f"{q1:.6g}; {q2:.6g}",
                            note=counts))
        plots.append(KMPlot(variable, "tertiles", [
            km_curve(t[tert == k], e[tert == k], label=names[k]) for k in range(3)], p))
    # Cox: per SD of log(x + 1), and high vs low
    lx = np.log(x + LOG_OFFSET)
    sd = float(np.std(lx, ddof=1))
    models = []
    if sd > 0:
        z = (lx - lx.mean()) / sd
        models.append(("cox_per_sd_log", pd.DataFrame({"x": z, "T": t, "E": e}),
                       f"per SD of log(x + {LOG_OFFSET:g}) (SD {sd:.3g})"))
    if high.any() and not high.all():
        models.append(("cox_high_vs_low", pd.DataFrame({"x": high.astype(float), "T": t,
                                                        "E": e}),
                       f"> median ({median:.3g}) vs ≤ median"))
    for name, df_, what in models:
        try:
            m = fit_cox(df_, duration_col="T", event_col="E")
        except Exception as exc:  # lifelines ConvergenceError, singular matrix, ...
            rows.append(StatRow(name, variable, level=level, n=n, events=events,
                                note=f"Cox fit failed: {type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0] if str(exc) else ''}"))
            continue
        term = m.terms[0]
        note = what
        if not math.isfinite(term.se) or term.se > 10:
            note += "; unstable fit (huge SE: separation?)"
        rows.append(StatRow(name, variable, level=level, n=n, events=events, estimate=term.hr,
                            ci_low=term.hr_low, ci_high=term.hr_high, statistic=term.z,
                            p=term.p, note=note))
        try:
            chi2, p = ph_test(m, df_)["x"]
            rows.append(StatRow(f"ph_test_{name.removeprefix('cox_')}", variable, level=level,
                                n=n, events=events, statistic=chi2, df=1.0, p=p,
                                note="Schoenfeld residuals vs rank(time); small p: "
                                     "hazards not proportional"))
        except Exception as exc:
            rows.append(StatRow(f"ph_test_{name.removeprefix('cox_')}", variable, level=level,
                                n=n, events=events, note=f"PH test failed: {exc}"))
    return rows, plots


def spearman_rows(units: list[dict], variables: list[str], *, level: str) -> list[StatRow]:
    """Spearman's rho between every pair of variables (scipy), on units with both."""
    # lazy: scipy.stats (~1 s): only the study statistics, not every report
    from scipy.stats import spearmanr

    rows = []
    for i, a in enumerate(variables):
        for b in variables[i + 1:]:
            pairs = [(_num(u.get(a)), _num(u.get(b))) for u in units]
            pairs = [p for p in pairs if p[0] is not None and p[1] is not None]
            xa, xb = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
            if len(pairs) < 3 or np.ptp(xa) == 0 or np.ptp(xb) == 0:
                rows.append(StatRow("spearman", a, b, level, n=len(pairs),
                                    note="fewer than 3 pairs or a constant marker"))
                continue
            res = spearmanr(xa, xb)
            rows.append(StatRow("spearman", a, b, level, n=len(pairs),
                                estimate=float(res.statistic), p=float(res.pvalue)))
    return rows


def group_rows(samples: list[dict], variables: list[str], *, group_key: str,
               cols: SampleColumns) -> tuple[list[StatRow], list[str]]:
    """Two-group comparisons at sample level when `group_key` (a samples.csv column) has
    exactly two values (e.g. primary / metastasis): Mann–Whitney U (two-sided) over all
    samples, and Wilcoxon signed-rank on patients with a sample in each group (the mean
    of a patient's samples within a group)."""
    from scipy.stats import mannwhitneyu, wilcoxon  # lazy: scipy.stats (~1 s): the study only

    values = sorted({str(s.get(group_key)) for s in samples if s.get(group_key) not in
                     (None, "")})
    if len(values) != 2:
        return [], [f"group comparisons need exactly two values of {group_key} "
                    f"(found {len(values)}: {', '.join(values) or 'none'}): not computed"]
    ga, gb = values
    contrast = f"{ga} vs {gb}"
    rows = []
    for v in variables:
        xa = np.array([x for s in samples if str(s.get(group_key)) == ga
                       and (x := _num(s.get(v))) is not None])
        xb = np.array([x for s in samples if str(s.get(group_key)) == gb
                       and (x := _num(s.get(v))) is not None])
        if len(xa) < 2 or len(xb) < 2:
            rows.append(StatRow("mann_whitney", v, contrast, "sample", n=len(xa) + len(xb),
                                note=f"fewer than 2 samples in a group ({ga} {len(xa)}, "
                                     f"{gb} {len(xb)})"))
        else:
            res = mannwhitneyu(xa, xb, alternative="two-sided")
            rows.append(StatRow("mann_whitney", v, contrast, "sample", n=len(xa) + len(xb),
                                estimate=float(np.median(xa) - np.median(xb)),
                                statistic=float(res.statistic), p=float(res.pvalue),
                                note=f"n {ga} {len(xa)}, {gb} {len(xb)}; median {ga} "
                                     f"{np.median(xa):.4g}, {gb} {np.median(xb):.4g}"))
        per: dict[str, dict[str, list[float]]] = {}
        for s in samples:
            x, g = _num(s.get(v)), str(s.get(group_key))
            if x is not None and g in (ga, gb):
                per.setdefault(str(s.get(cols.patient)), {}).setdefault(g, []).append(x)
        pairs = [(np.mean(d[ga]), np.mean(d[gb])) for d in per.values() if ga in d and gb in d]
        diffs = np.array([a - b for a, b in pairs])
        if len(pairs) < MIN_PAIRS:
            rows.append(StatRow("wilcoxon_paired", v, contrast, "patient", n=len(pairs),
                                note=f"{len(pairs)} patients with both (< {MIN_PAIRS})"))
        elif not diffs.any():
            rows.append(StatRow("wilcoxon_paired", v, contrast, "patient", n=len(pairs),
                                estimate=0.0, note="all paired differences are 0"))
        else:
            res = wilcoxon(diffs)
            rows.append(StatRow("wilcoxon_paired", v, contrast, "patient", n=len(pairs),
                                estimate=float(np.median(diffs)),
                                statistic=float(res.statistic), p=float(res.pvalue),
                                note=f"difference {ga} − {gb} per patient"))
    return rows, []


def cohort_stats(samples: list[dict], *, time_col: str | None, event_col: str | None,
                 cols: SampleColumns = DEFAULT_COLUMNS, level: str = "patient",
                 group_col: str | None = None, clinical: list[dict] | None = None,
                 variables: list[str] | None = None) -> CohortStats:
    """All statistics of the report's study section. Without `time_col` only the
    correlations and group comparisons are computed. UsageError on bad input (missing
    columns, non-numeric times, unknown level or group column)."""
    variables = variables or default_variables(samples)
    rows = (attach_survival(samples, time_col=time_col, event_col=event_col, cols=cols,
                            clinical=clinical)
            if time_col else [{**s, "__time": None, "__event": None} for s in samples])
    units, notes = analysis_units(rows, variables, level=level, cols=cols)
    with_surv = sum(u["__time"] is not None and u["__event"] is not None for u in units)
    stats = CohortStats(level, time_col or "", event_col or "", group_col, variables,
                        len(units), with_surv, notes=notes)
    if not variables:
        stats.notes.append("no marker values in samples.csv (no H&E sTIL % nor IHC "
                           "densities): nothing to analyse")
        return stats
    if time_col:
        if with_surv == 0:
            stats.notes.append(f"no {level} has both {time_col} and {event_col}: no survival "
                               "analysis")
        elif with_surv < len(units):
            stats.notes.append(f"{len(units) - with_surv} of {len(units)} {level}s lack "
                               "survival data and are left out of the survival analysis")
        for v in variables:
            r, k = survival_of_variable(units, v, level=level)
            stats.rows += r
            stats.km += k
    stats.rows += spearman_rows(units, variables, level=level)
    if group_col:
        key = next((k for k in (group_col, f"metadata.{group_col}")
                    if any(k in s for s in samples)), None)
        if key is None:  # e.g. --group-by stain: a slide's column, not a sample's
            stats.notes.append(f"{group_col} is not a samples.csv column (a manifest column "
                               "on which a sample's slides agree): no group comparisons")
        else:
            r, n = group_rows(samples, variables, group_key=key, cols=cols)
            stats.rows += r
            stats.notes += n
    return stats


def write_stats(path, stats: CohortStats) -> None:
    """``cohort_stats.csv``: one row per :class:`StatRow` (:data:`STATS_COLUMNS`)."""
    atomic.write_csv(path, list(STATS_COLUMNS), rows=[asdict(r) for r in stats.rows])


@dataclass(frozen=True)
class StudyOptions:
    """What ``tilscore report --survival TIME,EVENT`` asks for: the survival columns
    (None: no survival analysis), a clinical CSV (None: the manifest's columns), the unit
    (``patient`` or ``sample``) and the manifest's id columns."""

    time_col: str | None = None
    event_col: str | None = None
    clinical: str | None = None
    level: str = "patient"
    columns: SampleColumns = field(default_factory=SampleColumns)

    @staticmethod
    def parse(survival: str | None, **kw) -> StudyOptions:
        """From ``TIME_COL,EVENT_COL`` (UsageError unless two non-empty names)."""
        if kw.get("level", "patient") not in LEVELS:
            raise UsageError(f"--level {kw['level']!r}; valid: {', '.join(LEVELS)}")
        if survival is None:
            if kw.get("clinical"):
                raise UsageError("--clinical needs --survival TIME_COL,EVENT_COL")
            return StudyOptions(**kw)
        names = [s.strip() for s in survival.split(",")]
        if len(names) != 2 or not all(names):
            raise UsageError(f"--survival {survival!r}: give TIME_COL,EVENT_COL "
                             "(e.g. os_months,os_event)")
        return StudyOptions(names[0], names[1], **kw)
