"""The outputs of `hybridserve eval`: the text table, the JSON document, and the HTML
report (one self-contained page: inline CSS and SVG bar charts, no script, nothing
fetched over the network).

Answers are untrusted text (a model wrote them, from documents anyone may have
ingested), so the HTML escapes every string it did not write itself.
"""

from __future__ import annotations

import dataclasses
import html
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hybridserve.evaluation.runner import EvalResult
from hybridserve.scoring import ArmSummary, Outcome, Paired, Question, QuestionScore


@dataclass(frozen=True)
class Metric:
    """One column of the table and one chart of the report."""

    header: str
    title: str
    attr: str
    fmt: str = "{:.2f}"
    #: Whether the value is a share (0..1): the charts then share one scale.
    share: bool = True
    #: Whether the text table shows it (the HTML report shows every metric).
    table: bool = True

    def value(self, s: ArmSummary) -> float | None:
        return getattr(s, self.attr)

    def text(self, s: ArmSummary) -> str:
        v = self.value(s)
        return "-" if v is None else self.fmt.format(v)


METRICS = (
    Metric("containment", "containment (answer holds a reference)", "containment"),
    Metric("token-F1", "token F1", "token_f1"),
    Metric("recall@k", "retrieval recall@k (gold docs among the sources)", "recall_at_k"),
    Metric("cited", "citation rate (cites a valid source)", "citation_rate"),
    Metric("cite-prec", "citation precision (cited sources that are gold)", "citation_precision"),
    Metric("cite-recall", "citation recall (cites a gold source it was given)", "citation_recall",
           table=False),
    Metric("grounding", "grounding (answer tokens found in its passages)", "grounding",
           table=False),
    Metric("refusals-ok", "correct refusals (unanswerable questions)", "refusal_correct"),
    Metric("false-ref", "false refusals (answerable questions)", "false_refusals"),
    Metric("format", "format match", "format_match"),
    Metric("p50 s", "median latency, seconds", "latency_p50_s", "{:.2f}", share=False),
    Metric("tokens/answer", "completion tokens per answer", "completion_tokens_mean", "{:.0f}",
           share=False),
)


def shown_metrics(result: EvalResult, *, table: bool = True) -> list[Metric]:
    """The metrics to show (in the text table, or all for the HTML report); format
    match only when a format was checked."""
    checked = any(s.format_match is not None for s in result.summaries.values())
    return [m for m in METRICS
            if (m.attr != "format_match" or checked) and (m.table or not table)]


# -- text ------------------------------------------------------------------------------

def comparison_line(p: Paired) -> str:
    """E.g. "rag+adapter vs rag: 14 questions better, 1 worse, 9 tied (exact sign test
    p = 0.001)": b against a, as `paired` counts them."""
    questions = "question" if p.wins == 1 else "questions"
    return (f"{p.b} vs {p.a}: {p.wins} {questions} better, {p.losses} worse, {p.ties} tied "
            f"(exact sign test p = {format_p(p.p_value)})")


def format_p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def failures_line(result: EvalResult) -> str:
    """One line naming the failed answers per arm and the first error ("" when none)."""
    failed = result.failures
    if not failed:
        return ""
    n = len(result.questions)
    per_arm = ", ".join(f"{arm} {k}/{n}" for arm in result.arms
                        if (k := sum(1 for o in result.outcomes[arm] if o.error)))
    first = failed[0]
    return (f"failed: {per_arm} (counted as wrong); first: {first.question_id} "
            f"[{first.arm}] {first.error}")


def _row(first: str, cells: list[str], first_width: int, widths: list[int]) -> str:
    text = first.ljust(first_width) + " " + "  ".join(
        c.center(w) for c, w in zip(cells, widths, strict=True))
    return text.rstrip()


def render_table(result: EvalResult) -> str:
    """The table, the paired comparisons, and the failures line (if any)."""
    metrics = shown_metrics(result)
    arm_width = max(14, *(len(a) for a in result.arms))
    widths = [max(len(m.header), 5) for m in metrics]
    lines = [_row("arm", [m.header for m in metrics], arm_width, widths)]
    lines.extend(_row(arm, [m.text(result.summaries[arm]) for m in metrics], arm_width, widths)
                 for arm in result.arms)
    if result.comparisons:
        lines.append("")
        lines.extend(comparison_line(p) for p in result.comparisons)
    if line := failures_line(result):
        lines.append("")
        lines.append(line)
    return "\n".join(lines)


# -- JSON ------------------------------------------------------------------------------

def _question_record(result: EvalResult, i: int, q: Question) -> dict:
    return {
        "id": q.id, "line": q.line, "question": q.question, "answers": list(q.answers),
        "gold_docs": list(q.gold_docs), "answerable": q.answerable,
        "arms": {arm: {"outcome": dataclasses.asdict(result.outcomes[arm][i]),
                       "score": dataclasses.asdict(result.scores[arm][i])}
                 for arm in result.arms},
    }


def to_json(result: EvalResult) -> dict:
    """The whole result as one JSON-able document."""
    qs = result.question_set
    t = result.target
    return {
        "question_file": {"path": str(qs.path), "sha256": qs.sha256,
                          "questions": len(qs.questions), "asked": len(result.questions)},
        "tenant": t.tenant, "adapter": t.adapter or None,
        "adapter_source": t.adapter_source or None, "key_kind": t.key_kind,
        "settings": result.settings,
        "arms": list(result.arms),
        "summaries": {arm: result.summaries[arm].to_dict() for arm in result.arms},
        "comparisons": [dataclasses.asdict(p) | {"summary": comparison_line(p)}
                        for p in result.comparisons],
        "failed": len(result.failures),
        "questions": [_question_record(result, i, q) for i, q in enumerate(result.questions)],
    }


# -- HTML ------------------------------------------------------------------------------

def esc(value: object) -> str:
    """`value` as HTML text (quotes too, so it is safe in an attribute)."""
    return html.escape(str(value), quote=True)


ARM_COLORS = {"base": "#8c8c8c", "adapter": "#e08a2c", "rag": "#3a7bd5",
              "rag+adapter": "#2e9e5b"}

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;
 max-width:1200px;padding:0 16px;color:#1d1d1f;background:#fff}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:0 0 4px}
table.sum{border-collapse:collapse}table.sum th,table.sum td{padding:4px 10px;
 border-bottom:1px solid #eee;text-align:right}table.sum th:first-child,
table.sum td:first-child{text-align:left}
.meta{color:#555}.charts{display:flex;flex-wrap:wrap;gap:12px}
.chart{border:1px solid #eee;border-radius:6px;padding:6px}
.q{border:1px solid #ddd;border-radius:6px;padding:10px;margin:12px 0}
.refs{color:#444;margin:2px 0 8px}
.arms{display:grid;gap:8px}
.cell{border-left:4px solid #ccc;padding:4px 8px;background:#fafafa;min-width:0}
.cell.ok{border-color:#2e9e5b}.cell.bad{border-color:#c0392b}.cell.err{border-color:#7d3c98}
.ans{white-space:pre-wrap;word-wrap:break-word;font-family:ui-monospace,monospace;
 font-size:12.5px;margin:4px 0}
.mark{font-weight:600}.ok .mark{color:#2e9e5b}.bad .mark{color:#c0392b}.err .mark{color:#7d3c98}
.small{font-size:12px;color:#666}.gold{font-weight:600;color:#2e7d32}
.cited{text-decoration:underline}
details pre{white-space:pre-wrap;font-size:12px;background:#f3f3f3;padding:4px}
"""


def _svg_chart(metric: Metric, result: EvalResult) -> str:
    """One bar chart: the metric of every arm, side by side."""
    arms = result.arms
    values = [metric.value(result.summaries[a]) for a in arms]
    known = [v for v in values if v is not None]
    top = 1.0 if metric.share else (max(known) * 1.15 if known and max(known) > 0 else 1.0)
    slot, plot_h, pad = 84, 120, 24
    width = max(slot * len(arms) + 2 * 8, 320)  # room for the title
    height = plot_h + 2 * pad + 8
    parts = [f'<svg class="chart" width="{width}" height="{height}" role="img" '
             f'viewBox="0 0 {width} {height}"><title>{esc(metric.title)}</title>',
             f'<text x="8" y="14" font-size="12" font-weight="600">{esc(metric.title)}</text>',
             f'<line x1="4" y1="{pad + plot_h}" x2="{width - 4}" y2="{pad + plot_h}" '
             'stroke="#999"/>']
    for k, (arm, v) in enumerate(zip(arms, values, strict=True)):
        x = 8 + k * slot + 12
        base_y = pad + plot_h
        if v is None:
            parts.append(f'<text x="{x + 30}" y="{base_y - 6}" font-size="11" fill="#999" '
                         'text-anchor="middle">n/a</text>')
        else:
            h = max(0.0, min(1.0, v / top)) * (plot_h - 16)
            parts.append(f'<rect x="{x}" y="{base_y - h:.1f}" width="60" height="{h:.1f}" '
                         f'fill="{ARM_COLORS.get(arm, "#555")}"/>')
            parts.append(f'<text x="{x + 30}" y="{base_y - h - 4:.1f}" font-size="11" '
                         f'text-anchor="middle">{esc(metric.fmt.format(v))}</text>')
        parts.append(f'<text x="{x + 30}" y="{base_y + 16}" font-size="11" '
                     f'text-anchor="middle">{esc(arm)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _html_table(result: EvalResult) -> str:
    metrics = shown_metrics(result, table=False)
    head = "".join(f"<th>{esc(m.header)}</th>" for m in metrics)
    rows = []
    for arm in result.arms:
        s = result.summaries[arm]
        cells = "".join(f"<td>{esc(m.text(s))}</td>" for m in metrics)
        rows.append(f"<tr><td>{esc(arm)}</td>{cells}<td>{s.failed}</td></tr>")
    return (f'<table class="sum"><tr><th>arm</th>{head}<th>failed</th></tr>'
            f'{"".join(rows)}</table>')


def _mark(o: Outcome, s: QuestionScore) -> tuple[str, str]:
    if o.error:
        return "err", "failed"
    return ("ok", "correct") if s.correct else ("bad", "wrong")


def _sources_html(q: Question, o: Outcome) -> str:
    if not o.sources:
        return ""
    cited = set(o.cited)
    gold = set(q.gold_docs)
    items = []
    for src in o.sources:
        cls = " ".join(c for c in ("gold" if src.doc_id in gold else "",
                                   "cited" if src.number in cited else "") if c)
        items.append(f'<li value="{int(src.number)}"><span class="{cls}">{esc(src.doc_id)}</span>'
                     f"<pre>{esc(src.text)}</pre></li>")
    cites = ", ".join(f"[{int(n)}]" for n in o.cited) or "none"
    invalid = (f"; invalid: {', '.join(f'[{int(n)}]' for n in o.invalid_citations)}"
               if o.invalid_citations else "")
    return (f'<div class="small">cites {esc(cites)}{esc(invalid)}</div>'
            f"<details><summary>sources ({len(o.sources)})</summary><ol>{''.join(items)}</ol>"
            "</details>")


def _cell_html(q: Question, o: Outcome, s: QuestionScore) -> str:
    cls, label = _mark(o, s)
    if o.error:
        body = f'<div class="ans">{esc(o.error)}</div>'
    else:
        body = (f'<div class="ans">{esc(o.answer)}</div>'
                f'<div class="small">finish {esc(o.finish_reason or "-")}, '
                f"{o.latency_s:.2f} s, {o.prompt_tokens}+{o.completion_tokens} tokens</div>"
                + _sources_html(q, o))
    return (f'<div class="cell {cls}"><div><b>{esc(o.arm)}</b> '
            f'<span class="mark">{label}</span></div>{body}</div>')


def _question_html(result: EvalResult, i: int, q: Question) -> str:
    if q.answerable:
        refs = (f"references: {esc(' | '.join(q.answers))}; gold docs: "
                f"{esc(', '.join(q.gold_docs))}")
    else:
        refs = "unanswerable from the documents: the right answer is a refusal"
    cells = "".join(_cell_html(q, result.outcomes[arm][i], result.scores[arm][i])
                    for arm in result.arms)
    return (f'<section class="q" id="q-{i}"><h3>{esc(q.id)}: {esc(q.question)}</h3>'
            f'<div class="refs">{refs}</div>'
            f'<div class="arms" style="grid-template-columns:repeat({len(result.arms)},'
            f'minmax(0,1fr))">{cells}</div></section>')


def render_html(result: EvalResult) -> str:
    """The report: one self-contained HTML page."""
    t = result.target
    qs = result.question_set
    adapter = (f"adapter {esc(t.adapter)}"
               + (" (the tenant's default)" if t.adapter_source == "default" else "")
               if t.adapter else "no adapter")
    comparisons = "".join(f"<li>{esc(comparison_line(p))}</li>" for p in result.comparisons)
    failures = failures_line(result)
    charts = "".join(_svg_chart(m, result) for m in shown_metrics(result, table=False))
    questions = "".join(_question_html(result, i, q) for i, q in enumerate(result.questions))
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>hybridserve eval: {esc(t.tenant)}</title><style>{CSS}</style></head><body>"
        f"<h1>hybridserve eval: tenant {esc(t.tenant)}</h1>"
        f'<p class="meta">{adapter}; {len(result.questions)} of {len(qs.questions)} questions '
        f"from {esc(qs.path.name)} (sha256 {esc(qs.sha256)}); arms {esc(', '.join(result.arms))}; "
        f"settings: {esc(_settings_text(result.settings))}</p>"
        f"<h2>Summary</h2>{_html_table(result)}"
        + (f"<ul>{comparisons}</ul>" if comparisons else "")
        + (f"<p>{esc(failures)}</p>" if failures else "")
        + f'<h2>Charts</h2><div class="charts">{charts}</div>'
        f"<h2>Answers</h2>{questions}</body></html>\n"
    )


def _settings_text(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items() if v not in (None, ""))


def write_atomic(path: str | Path, text: str) -> None:
    """Writes `text` to `path` through a temporary file in the same folder and a rename,
    so a reader never sees half a report."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    # NOTE: reading the umask means setting it; the CLI is single-threaded here.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_html(result: EvalResult, path: str | Path) -> None:
    """Renders the report and writes it atomically to `path`."""
    write_atomic(path, render_html(result))
