"""Each source's settings for one harvest run: its threshold, whether it exists, its `sources` row."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone

from featurescribe.errors import FeaturescribeError
from featurescribe.harvest import corpus as corpus_mod
from featurescribe.harvest.sources import SourcePlan
from featurescribe.harvest.thresholds import parse_threshold

FIRST_POS = 1  # positions < FIRST_POS are context only (BOS / the attention sink), not harvested


@dataclass
class SourceState:
    plan: SourcePlan
    rule: str  # 'abs' | 'keep'
    value: float  # the absolute threshold, or the fraction to keep
    threshold: float | None  # None until estimated on the first batch
    exists: bool
    want: dict = field(default_factory=dict)  # the settings a stored source must have
    params: dict = field(default_factory=dict)

    @property
    def keep(self) -> float:
        return self.value


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _check_existing(con, source_id: str, want: dict, explicit_threshold: bool) -> tuple[bool, float | None]:
    """(exists, stored threshold). A source that exists with other settings is an error."""
    from featurescribe.store.harvest_rows import source_settings

    have = source_settings(con, source_id)
    if have is None:
        return False, None
    stored = have["threshold"]
    diffs = settings_diffs(have, want, want["threshold"] if explicit_threshold else None)
    if diffs:
        raise FeaturescribeError(
            f"source {source_id} already exists with {'; '.join(diffs)}; pass --source-id NEW_ID to keep "
            "both, or --overwrite to replace it")
    return True, stored


def _diff(key: str, have, want) -> str:
    if key == "corpus_key":  # same path and ctx, other files: the stored sequences are not these
        return f"other corpus contents (the files of {want.split('|')[0]} changed since: size or modification time)"
    return f"{key} {have!r} (now {want!r})"


def settings_diffs(have: dict, want: dict, threshold: float | None) -> list[str]:
    """How a stored source's settings (`source_settings`) differ from a harvest's; `threshold`: the
    harvest's threshold where it must match too."""
    diffs = [_diff(k, have[k], want[k]) for k in have if k != "threshold" and have[k] != want[k]]
    stored = have.get("threshold")
    if threshold is not None and stored is not None and abs(stored - threshold) > 1e-9 * max(1.0, abs(stored)):
        diffs.append(f"threshold {stored!r} (now {threshold!r})")
    return diffs


def _params(h, cfg, corpus, tokenizer_id: str, batch_size: int, st: SourceState) -> dict:
    params = {
        "tokenizer_id": tokenizer_id, "corpus_key": corpus.key(cfg.ctx), "corpus_spec": corpus.spec,
        "first_pos": FIRST_POS, "bos": corpus_mod.adds_bos(h.tokenizer),
        "threshold_rule": f"keep {st.value:.2%} (estimated on the first batch)" if st.rule == "keep" else "absolute",
        "dtype": str(next(h.model.parameters()).dtype).replace("torch.", ""),
        "device": h.device.type, "batch_size": batch_size, "max_tokens": cfg.max_tokens,
    }
    sae = st.plan.sae
    if sae is not None:
        params["sae"] = {"architecture": sae.cfg.architecture, "hook_name": sae.cfg.hook_name,
                         "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "k": sae.cfg.k,
                         "format": sae.cfg.format, "transcoder": sae.cfg.transcoder}
    return params


def _state(con, h, cfg, corpus, tokenizer_id: str, batch_size: int, p: SourcePlan) -> SourceState:
    from featurescribe.store.harvest_rows import delete_source

    rule, value = parse_threshold(cfg.threshold if cfg.threshold is not None
                                  else ("auto" if p.kind == "neuron" else 0.0))
    want = {"model_id": h.model_id, "hook_name": p.hook_name, "layer": p.layer, "kind": p.kind,
            "width": p.width, "sae_path": p.sae.path if p.sae is not None else None, "corpus": corpus.name,
            "ctx": cfg.ctx, "tokenizer_id": tokenizer_id, "corpus_key": corpus.key(cfg.ctx),
            "threshold": value if rule == "abs" else None}
    if cfg.overwrite:
        delete_source(con, p.source_id)
    exists, stored = _check_existing(con, p.source_id, want, cfg.threshold is not None and rule == "abs")
    threshold = stored if stored is not None else (value if rule == "abs" else None)
    if threshold is None and cfg.thresholds and p.source_id in cfg.thresholds:
        threshold = float(cfg.thresholds[p.source_id])
    st = SourceState(p, rule, value, threshold, exists, want)
    st.params = _params(h, cfg, corpus, tokenizer_id, batch_size, st)
    return st


def prepare_states(con, h, cfg, corpus, tokenizer_id: str, batch_size: int) -> list[SourceState]:
    return [_state(con, h, cfg, corpus, tokenizer_id, batch_size, p) for p in h.plans]


def source_row(st: SourceState) -> dict:
    """The `sources` row of a new source (status running until its statistics are written)."""
    p, w = st.plan, st.want
    return {
        "source_id": p.source_id, "model_id": w["model_id"], "hook_name": p.hook_name, "layer": p.layer,
        "kind": p.kind, "width": p.width, "site": p.site, "threshold": float(st.threshold),
        "sae_path": w["sae_path"], "corpus": w["corpus"], "ctx": w["ctx"], "n_tokens": None,
        "params": json.dumps({**st.params, "status": "running"}), "created_at": _now(),
    }
