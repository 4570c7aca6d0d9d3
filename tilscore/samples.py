"""``samples.csv``: one row per sample across its stains (H&E, CD20, FOXP3 slides).

Slides are tied together by two manifest columns, carried into each summary's
``metadata`` (``patient_id`` and ``sample_id`` by default; other names can be given). A
sample's row holds its H&E scores and, per IHC marker, the densities by compartment and
percent positive, with the slide ids they came from. Nothing is dropped or merged
silently: a stain with no slide is named in ``stains_missing``; a stain with two or more
slides is named in ``duplicates``, and its values are then pooled as documented in
``docs/report.md`` (densities: summed counts ÷ summed areas; percent positive: summed
positive ÷ summed detected cells; other values: the mean of the slides), with every
slide id listed.

Pure: summaries (dicts as :func:`tilscore.summary.read_summary` returns them) in, rows
out; :func:`write_samples` is the one I/O edge.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from tilscore.io import atomic
from tilscore.results import LIST_SEPARATOR, all_summaries, flatten

log = logging.getLogger(__name__)

PATIENT_COLUMN = "patient_id"
SAMPLE_COLUMN = "sample_id"
STAIN_ORDER = ("he", "cd20", "foxp3")  # the stains every sample is expected to have
SAMPLES_CSV = "samples.csv"
# Flattened summary keys carried per stain (prefix match), besides densities.
HE_KEYS = ("stromal_til_percent", "stromal_til_percent_segmented", "til_score_tiger",
           "til_parts.lymphocytes_in_bulk_stroma", "til_parts.bulk_stroma_area_mm2")
IHC_KEYS = ("percent_positive", "h_score")
COMMON_KEYS = ("areas_mm2.tissue", "areas_mm2.tumour", "areas_mm2.stroma")
SPATIAL_PREFIX = "spatial."  # per-slide spatial measures (tilscore.scoring.spatial), all numeric
COMPARTMENTS = ("tumour", "stroma", "tissue")


@dataclass(frozen=True)
class SampleColumns:
    """Names of the manifest columns that identify a sample's patient and the sample."""

    patient: str = PATIENT_COLUMN
    sample: str = SAMPLE_COLUMN


DEFAULT_COLUMNS = SampleColumns()


def sample_key(summary: dict, cols: SampleColumns) -> tuple[str, str, str]:
    """(patient id, sample id, note) of a slide. A slide without a sample id is its own
    sample (named by the slide id) and a slide without a patient id its own patient;
    the note says so (empty when both were given)."""
    meta = summary.get("metadata") or {}
    slide = str(summary.get("slide") or "")
    patient, sample = str(meta.get(cols.patient) or ""), str(meta.get(cols.sample) or "")
    notes = []
    if not sample:
        sample = slide
        notes.append(f"{slide}: no {cols.sample}, the slide is its own sample")
    if not patient:
        patient = sample
        notes.append(f"{slide}: no {cols.patient}, the sample is its own patient")
    return patient, sample, "; ".join(notes)


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


def _density_keys(flat: dict, stain: str) -> list[str]:
    """The density columns of one stain: lymphocytes on H&E, ``<stain>_positive`` on IHC."""
    cls = "lymphocyte" if stain == "he" else f"{stain}_positive"
    return [f"densities_per_mm2.{cls}.{c}" for c in COMPARTMENTS
            if f"densities_per_mm2.{cls}.{c}" in flat]


def _value_keys(flat: dict, stain: str) -> list[str]:
    own = HE_KEYS if stain == "he" else IHC_KEYS
    keys = [k for k in own + COMMON_KEYS if k in flat]
    keys += sorted(k for k in flat if k.startswith(SPATIAL_PREFIX) and _number(flat[k])
                   is not None)
    return keys


def _pooled_density(summaries: list[dict], key: str) -> float | None:
    """Σ counts ÷ Σ areas of the compartment over the slides (per mm²); None when a slide
    lacks its count or area."""
    _, cls, comp = key.split(".")
    n = area = 0.0
    for s in summaries:
        count = _number(((s.get("counts") or {}).get(cls) or {}).get(comp))
        a = _number((s.get("areas_mm2") or {}).get(comp))
        if count is None or a is None:
            return None
        n, area = n + count, area + a
    return n / area if area > 0 else None


def _pooled_percent_positive(summaries: list[dict], stain: str) -> float | None:
    """Σ positive ÷ Σ detected cells × 100 over the slides (tissue counts)."""
    pos = total = 0.0
    for s in summaries:
        counts = s.get("counts") or {}
        p = _number((counts.get(f"{stain}_positive") or {}).get("tissue"))
        if p is None:
            return None
        neg = sum(_number((v or {}).get("tissue")) or 0.0 for k, v in counts.items()
                  if k != f"{stain}_positive")
        pos, total = pos + p, total + p + neg
    return 100.0 * pos / total if total > 0 else None


def _stain_values(stain: str, summaries: list[dict]) -> dict:
    """The stain's columns (``<stain>.<key>``) for the sample: one slide's values, or the
    pooled values of several (see the module docstring)."""
    flats = [flatten(s) for s in summaries]
    keys: dict[str, None] = {}
    for f in flats:
        keys.update(dict.fromkeys(_density_keys(f, stain) + _value_keys(f, stain)))
    out = {}
    for key in keys:
        values = [_number(f.get(key)) for f in flats]
        if len(flats) == 1:
            value = values[0]
        elif key.startswith("densities_per_mm2."):
            value = _pooled_density(summaries, key)
        elif key == "percent_positive":
            value = _pooled_percent_positive(summaries, stain)
        else:
            present = [v for v in values if v is not None]
            value = sum(present) / len(present) if present else None
        out[f"{stain}.{key}"] = value
    return out


def build_samples(summaries: list[dict], cols: SampleColumns = DEFAULT_COLUMNS,
                  *, stains: tuple[str, ...] = STAIN_ORDER) -> list[dict]:
    """One row per sample (sorted by patient, then sample) from slide summaries.

    Columns: patient and sample ids (named as in the manifest), ``n_slides``,
    ``slides.<stain>`` (slide ids, "; "-joined), ``stains_missing``, ``duplicates``,
    ``qc.flags`` and ``warnings`` (each entry prefixed by its slide id), the metadata
    columns on which the sample's slides agree (``metadata.<name>``; a disagreement is a
    warning and leaves the cell empty), then per stain present its values
    (``he.stromal_til_percent``, ``cd20.densities_per_mm2.cd20_positive.stroma``, ...)."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    notes: dict[tuple[str, str], list[str]] = defaultdict(list)
    for s in sorted(summaries, key=lambda s: str(s.get("slide"))):
        patient, sample, note = sample_key(s, cols)
        groups[(patient, sample)].append(s)
        if note:
            notes[(patient, sample)].append(note)
    seen_samples: dict[str, str] = {}
    rows = []
    for (patient, sample), slides in sorted(groups.items()):
        warnings = list(notes[(patient, sample)])
        if sample in seen_samples and seen_samples[sample] != patient:
            warnings.append(f"{cols.sample} {sample} is also used by patient "
                            f"{seen_samples[sample]}")
        seen_samples.setdefault(sample, patient)
        by_stain: dict[str, list[dict]] = defaultdict(list)
        for s in slides:
            by_stain[str(s.get("stain"))].append(s)
        row = {cols.patient: patient, cols.sample: sample, "n_slides": len(slides)}
        order = list(stains) + sorted(set(by_stain) - set(stains))
        for stain in order:
            row[f"slides.{stain}"] = LIST_SEPARATOR.join(str(s.get("slide"))
                                                          for s in by_stain.get(stain, []))
        row["stains_missing"] = LIST_SEPARATOR.join(st for st in stains if st not in by_stain)
        row["duplicates"] = LIST_SEPARATOR.join(
            f"{st}: {len(v)} slides ({', '.join(str(s.get('slide')) for s in v)}), pooled"
            for st in order if len(v := by_stain.get(st, [])) > 1)
        flags, slide_warnings = [], []
        for s in slides:
            flat = flatten(s)
            if flat.get("qc.flags"):
                flags.append(f"{s.get('slide')}: {flat['qc.flags']}")
            slide_warnings += [f"{s.get('slide')}: {w}" for w in s.get("warnings") or []]
        row["qc.flags"] = LIST_SEPARATOR.join(flags)
        row["warnings"] = LIST_SEPARATOR.join(warnings + slide_warnings)
        meta_values: dict[str, set[str]] = defaultdict(set)
        for s in slides:
            for k, v in (s.get("metadata") or {}).items():
                if k not in (cols.patient, cols.sample) and v not in (None, ""):
                    meta_values[k].add(str(v))
        for k in sorted(meta_values):
            values = meta_values[k]
            if len(values) == 1:
                row[f"metadata.{k}"] = next(iter(values))
            else:
                row[f"metadata.{k}"] = ""
                row["warnings"] = LIST_SEPARATOR.join(
                    x for x in (row["warnings"], f"slides disagree on {k}: "
                                f"{', '.join(sorted(values))}") if x)
        for stain in order:
            if by_stain.get(stain):
                row.update(_stain_values(stain, by_stain[stain]))
        rows.append(row)
    return rows


def sample_columns(rows: list[dict], cols: SampleColumns = DEFAULT_COLUMNS) -> list[str]:
    """Column order of samples.csv: ids and bookkeeping, metadata, then the values by
    stain in first-seen order."""
    seen: dict[str, None] = {}
    for r in rows:
        seen.update(dict.fromkeys(r))
    head = [cols.patient, cols.sample, "n_slides"]
    book = [c for c in seen if c.startswith("slides.")] + ["stains_missing", "duplicates",
                                                           "qc.flags", "warnings"]
    meta = sorted(c for c in seen if c.startswith("metadata."))
    rest = [c for c in seen if c not in set(head + book + meta)]
    return head + book + meta + rest


def write_samples(out_dir: Path, cols: SampleColumns = DEFAULT_COLUMNS) -> Path:
    """``OUT/samples.csv`` from every valid summary in `out_dir` (as ``scores.csv``)."""
    rows = build_samples(all_summaries(Path(out_dir)), cols)
    path = Path(out_dir) / SAMPLES_CSV
    atomic.write_csv(path, sample_columns(rows, cols) if rows else [cols.patient, cols.sample],
                     rows=rows)
    return path
