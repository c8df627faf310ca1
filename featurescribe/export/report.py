"""`featurescribe report`: one self-contained HTML file to browse the features.

The page is `templates/report.html` (its CSS and JavaScript inline, nothing fetched from the
network) with the data embedded as JSON in a `<script type="application/json">` element,
written feature by feature. For each feature: its stats, every explanation with its scores and
baselines, its strongest top windows and some random ones, and a histogram of its activations.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Callable

from featurescribe.errors import FeaturescribeError
from featurescribe.export.common import dumps
from featurescribe.export.tabular import best_explanation, lift_of
from featurescribe.store.export_queries import FeatureBundle, iter_feature_bundles

MARKER = "/*@@DATA@@*/"
CSS_MARKER = "/*@@CARDS_CSS@@*/"


REPORT_TITLE = "<title>featurescribe report</title>"


def check_report_target(out: str | Path) -> None:
    """`out` may be new or an earlier report, which is replaced; any other file is refused, so a
    mistyped --out does not overwrite the user's own file."""
    path = Path(out)
    if not path.is_file():
        return
    try:
        with open(path, "rb") as f:
            head = f.read(2048)
    except OSError as err:
        raise FeaturescribeError(f"cannot write {out}: {err.strerror or err}") from None
    if REPORT_TITLE.encode() not in head:
        raise FeaturescribeError(f"cannot write {out}: the file exists and is not an earlier featurescribe "
                                 "report; choose another name, or remove it first")


def template_text(name: str) -> str:
    return resources.files("featurescribe.export").joinpath(f"templates/{name}").read_text("utf-8")


def _template() -> tuple[str, str]:
    text = template_text("report.html").replace(CSS_MARKER, template_text("cards.css"))
    head, tail = text.split(MARKER)
    return head, tail


def embed(json_text: str) -> str:
    """JSON made safe inside a <script> element: no '<', '>' or '&' (they only occur in strings)."""
    return (json_text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _window(w: dict) -> dict:
    return {"seq_id": w["seq_id"], "start_pos": w["start_pos"], "split": w["split"],
            "tokens": w["tokens"], "acts": w["acts"]}


def report_entry(b: FeatureBundle, n_top: int, n_random: int) -> dict:
    return {
        "source_id": b.source_id,
        "feature_id": b.feature_id,
        "stats": b.stats,
        "best": best_explanation(b),
        "explanations": [
            {"explanation_id": e["explanation_id"], "text": e["text"], "explainer": e["explainer"],
             "method": e["method"], "candidate": e["candidate"], "chosen": e["chosen"], "status": e["status"],
             "scores": [
                 {"scorer": s["scorer"], "split": s["split"], "simulator": s["simulator"], "value": s["value"],
                  "baseline_shuffled": s["baseline_shuffled"], "baseline_tokens": s["baseline_tokens"],
                  "lift": lift_of(s),
                  "n_examples": s["n_examples"]}
                 for s in e["scores"]]}
            for e in b.explanations
        ],
        "top": [_window(w) for w in b.windows("top")][:n_top],
        "random": [_window(w) for w in b.windows("random")][:n_random],
        "histogram": b.histogram,
    }


class SizeGuard:
    """Stops a report that would pass `max_bytes`: after the first SAMPLE features it extrapolates
    to all `total` features, and it stops outright once the file passes the limit."""

    SAMPLE = 200

    def __init__(self, max_bytes: int | None, total: int, db_path: str):
        self.max_bytes, self.total, self.db_path = max_bytes, total, db_path
        self.written = 0

    def add(self, n_bytes: int, n_features: int) -> None:
        self.written += n_bytes
        if self.max_bytes is None:
            return
        estimate = self.written / max(n_features, 1) * self.total  # what the features so far say of all
        if self.written > self.max_bytes or (n_features == self.SAMPLE and estimate > self.max_bytes):
            raise FeaturescribeError(
                f"the report of {self.total:,} features would be about {_mb(estimate)} MB, over "
                f"--max-mb {self.max_bytes / 1e6:g}; browse this database with: featurescribe browse --db "
                f"{self.db_path} (or raise --max-mb, or pick one --source)")


def _mb(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:,.0f}" if n_bytes >= 1e7 else f"{n_bytes / 1e6:.2g}"


def write_report(con, sources: list[dict], out: Path, *, db_name: str = "", top_examples: int = 8,
                 on_feature: Callable[[], None] | None = None, guard: SizeGuard | None = None) -> int:
    head, tail = _template()
    n_random = max(2, top_examples // 2) if top_examples else 0
    n = 0
    with open(out, "w", encoding="utf-8", newline="\n") as f:
        f.write(head)
        meta = {"db": db_name, "sources": [
            {k: s[k] for k in ("source_id", "model_id", "hook_name", "layer", "kind", "width")} for s in sources]}
        f.write(embed(dumps(meta, compact=True))[:-1] + ',"features":[')
        for src in sources:
            for b in iter_feature_bundles(
                con, src["source_id"], example_kinds=("top", "random"),
                examples_per_kind=max(top_examples, n_random), histogram=True,
            ):
                entry = ("" if n == 0 else ",\n") + embed(dumps(report_entry(b, top_examples, n_random), compact=True))
                f.write(entry)
                n += 1
                if guard is not None:
                    guard.add(len(entry.encode("utf-8")), n)
                if on_feature:
                    on_feature()
        f.write("]}")
        f.write(tail)
    return n
