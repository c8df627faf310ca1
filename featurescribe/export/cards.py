"""Compact HTML cards for notebooks: a feature, a list of labels, a search result.

A feature card renders the same entry the HTML report embeds (`report.report_entry`) with the
report's own styles (`templates/cards.css`, scoped to `.fs`) and its colour rule for a token:
the activation over the largest one shown, as the opacity of one warm colour. Nothing here runs
JavaScript, so the cards show in any notebook front end and in exported HTML.
"""

from __future__ import annotations

from html import escape
from typing import Any, Iterable

from featurescribe.export.report import template_text

LIST_ROWS = 50  # rows a labels or search card shows


def _num(v: Any, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _pct(v: Any) -> str:
    return "–" if v is None else f"{100 * v:.3g}%"


def _wrap(body: str) -> str:
    return f'<div class="fs"><style>{template_text("cards.css")}</style>{body}</div>'


def histogram_svg(h: dict | None, width: int = 300, height: int = 60) -> str:
    if not h:
        return '<div class="empty">no activations</div>'
    counts = h["counts"]
    top, bw = max(counts + [1]), width / len(counts)
    bars = "".join(
        f'<rect x="{i * bw + 1:.1f}" y="{height - c / top * (height - 4):.1f}" width="{max(1.0, bw - 2):.1f}" '
        f'height="{c / top * (height - 4):.1f}"><title>{c}</title></rect>' for i, c in enumerate(counts) if c)
    labels = (f'<text x="0" y="{height + 12}">{_num(h["lo"])}</text>'
              f'<text x="{width}" y="{height + 12}" text-anchor="end">{_num(h["hi"])}</text>')
    return f'<svg class="hist" width="{width}" height="{height + 16}">{bars}{labels}</svg>'


def window_html(w: dict, max_act: float) -> str:
    spans = []
    for tok, a in zip(w["tokens"], w["acts"]):
        style = f' style="background:rgba(var(--hot),{min(1.0, a / max_act):.3f})"' if a > 0 and max_act > 0 else ""
        spans.append(f'<span class="tok" title="{escape(repr(tok))} {a:.3g}"{style}>'
                     f'{escape(tok.replace(chr(10), "↵"))}</span>')
    meta = f'{w.get("split") or "-"} · seq {w["seq_id"]}:{w["start_pos"]}'
    return f'<div class="window"><span class="wmeta">{escape(meta)}</span>{"".join(spans)}</div>'


def _best_html(best: dict | None) -> str:
    if best is None:
        return '<div class="empty">no scored explanation yet</div>'
    by = f'{best["explainer"]} · {best["scorer"]} {_num(best["score"])} · lift {_num(best["lift"])}'
    return (f'<div class="expl best"><div class="text">{escape(best["text"] or "(empty)")}</div>'
            f'<div class="by">{escape(by)}<span class="tag best">best</span></div></div>')


def feature_card(entry: dict, n_windows: int = 5) -> str:
    """One feature (a `report_entry` dict): stats, histogram, best explanation, top windows."""
    s = entry["stats"]
    top = entry["top"][:n_windows]
    max_act = max([s.get("max_act") or 0.0] + [a for w in top for a in w["acts"]])
    stats = (f'<span>active on {s.get("n_active", 0):,} tokens ({_pct(s.get("frac_active"))})</span>'
             f'<span>max {_num(s.get("max_act"))}</span>'
             f'<span>{len(entry["explanations"])} explanation(s)</span>')
    windows = "".join(window_html(w, max_act) for w in top) or '<div class="empty">no windows</div>'
    return _wrap(f'<h4>{escape(entry["source_id"])} / {entry["feature_id"]}</h4><div class="stats">{stats}</div>'
                 f'{histogram_svg(entry["histogram"])}{_best_html(entry["best"])}{windows}')


def _rows_table(rows: Iterable[dict], columns: list[tuple[str, str]], total: int) -> str:
    head = "".join(f"<th>{escape(title)}</th>" for _, title in columns)
    body = []
    for r in rows:
        cells = [escape(_num(r[k]) if isinstance(r[k], float) else str(r[k] if r[k] is not None else "–"))
                 for k, _ in columns]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    shown = len(body)
    more = f'<div class="empty">{total - shown} more not shown</div>' if total > shown else ""
    return _wrap(f'<table class="scores"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>{more}')


def labels_card(rows: list[dict]) -> str:
    """The best label of each feature, as the `labels` view gives them."""
    cols = [("source_id", "source"), ("feature_id", "feature"), ("explanation", "explanation"),
            ("score", "score"), ("lift", "lift"), ("scorer", "scorer"), ("explainer", "explainer")]
    return _rows_table(rows[:LIST_ROWS], cols, len(rows))


def search_card(rows: list[dict]) -> str:
    """Search hits, nearest first."""
    cols = [("source_id", "source"), ("feature_id", "feature"), ("similarity", "similarity"),
            ("explanation", "explanation"), ("score", "score"), ("lift", "lift")]
    return _rows_table(rows[:LIST_ROWS], cols, len(rows))
