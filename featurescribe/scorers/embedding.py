"""The embedding scorer (as delphi defines it): retrieval of activating windows by the explanation.

The explanation is embedded as a query and each held-out window (its text) as a document; the
score is the AUC of ranking the activating windows (top and quantile windows where the feature
fires) above the non-activating ones (random windows where it is silent) by cosine similarity:
0.5 is chance, 1.0 a perfect separation. The shuffled-explanation baseline is the same AUC with
another feature's explanation as the query, on the same windows. Window vectors are computed once
per feature and reused by the baseline.

The embedder is `local:all-minilm-l6-v2` unless another is handed in; it makes no LLM calls
(the judge column records the embedder).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from featurescribe.records import Explanation, ScoreResult, Window
from featurescribe.scorers.metrics import auc


def window_text(w: Window) -> str:
    return "".join(w.tokens).strip() or " "


def split_windows(windows: Sequence[Window]) -> tuple[list[Window], list[Window]]:
    """(activating, non-activating): windows where the feature fires that were picked for it
    (top, quantile), and random windows where it is silent."""
    pos = [w for w in windows if w.kind != "random" and w.max_act > 0]
    neg = [w for w in windows if w.kind == "random" and w.max_act <= 0]
    return pos, neg


class NoWindows(Exception):
    pass


@dataclass
class EmbeddingScorer:
    embedder: object
    _docs: dict = field(default_factory=dict)  # (source, feature, split) -> (n_pos, vectors)

    @property
    def spec(self) -> str:
        return self.embedder.spec

    async def _doc_vectors(self, key, windows: Sequence[Window]) -> tuple[int, np.ndarray]:
        if key not in self._docs:
            pos, neg = split_windows(windows)
            if not pos or not neg:
                raise NoWindows(f"needs activating and non-activating windows (has {len(pos)} and {len(neg)})")
            vecs = await self.embedder.embed([window_text(w) for w in pos + neg], purpose="score")
            self._docs[key] = (len(pos), vecs)
        return self._docs[key]

    async def _auc(self, text: str, n_pos: int, docs: np.ndarray) -> tuple[float, np.ndarray]:
        q = (await self.embedder.embed([text], purpose="score"))[0]
        sims = docs @ q
        return auc(sims[:n_pos], sims[n_pos:]), sims

    async def score(self, e: Explanation, windows: Sequence[Window], split: str,
                    other_text: str | None = None, other_id: str | None = None) -> ScoreResult:
        """The ScoreResult of `e`; NoWindows when the split lacks one of the two kinds."""
        n_pos, docs = await self._doc_vectors((e.source_id, e.feature_id, split), windows)
        value, sims = await self._auc(e.text, n_pos, docs)
        details = {"method": "AUC of activating over non-activating windows by cosine similarity to the explanation",
                   "embedder": self.spec, "n_activating": n_pos, "n_non_activating": int(docs.shape[0] - n_pos),
                   "mean_similarity_activating": float(sims[:n_pos].mean()),
                   "mean_similarity_non_activating": float(sims[n_pos:].mean())}
        res = ScoreResult(explanation_id=e.explanation_id, scorer="embedding", value=value, simulator=self.spec,
                          n_examples=int(docs.shape[0]), split=split, details=details)
        if other_text is not None:
            res.baseline_shuffled, _ = await self._auc(other_text, n_pos, docs)
            details["baseline_shuffled"] = {"explanation_id": other_id, "text": other_text}
        return res


def make_embedding_scorer(embedder=None) -> EmbeddingScorer:
    """A scorer with `embedder` (an embedder object or spec), by default the offline MiniLM."""
    from featurescribe.llm.embeddings import DEFAULT_EMBEDDER, make_embedder

    if embedder is None or isinstance(embedder, str):
        embedder = make_embedder(embedder or DEFAULT_EMBEDDER)
    return EmbeddingScorer(embedder)


async def score_embedding_in_context(e: Explanation, ctx) -> "ScoreResult | ScoreFailure":
    """The registry's entry: one explanation's AUC on its held-out windows, with the shuffled baseline."""
    from featurescribe.scorers.context import ScoreFailure

    scorer = ctx.cache.get("embedding_scorer")
    if scorer is None:
        scorer = ctx.cache["embedding_scorer"] = make_embedding_scorer()
    other = ctx.baseline_text(e)
    other_id = ctx.other_ids.get(e.explanation_id) if other is not None else None
    try:
        return await scorer.score(e, ctx.windows_of(e)[1], ctx.split, other, other_id)
    except NoWindows as err:
        return ScoreFailure(e.explanation_id, "embedding", scorer.spec, str(err))
