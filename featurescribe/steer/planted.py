"""A planted bed for output effects: features whose effect on the next token is known.

Each planted feature is a direction added to the residual stream of a real model after one layer:
the mean unembedding row of a class of tokens (digits, closing brackets, a word, colour words),
scaled to unit norm. Pushed along it, the model writes those tokens more. Strength is in multiples
of the median residual-stream norm at that layer on the neutral prompts. Each plant has its true
description; every other plant's description is a mismatched candidate, so a scorer is good when
it scores the true one above the mismatched ones (`testbed.planted.ranking_auc`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from featurescribe.records import Explanation

SOURCE_ID = "planted-output"
DEFAULT_LAYER = 20


@dataclass(frozen=True)
class OutputPlant:
    feature_id: int
    name: str
    explanation: str  # the true description of the effect
    words: tuple[str, ...]  # the tokens whose unembedding rows make the direction


def default_output_plants() -> list[OutputPlant]:
    plants = [
        ("digits", "makes the model write numbers with digits",
         tuple(str(d) for d in range(10)) + tuple(f" {d}" for d in range(10))),
        ("brackets", 'makes the model close brackets: ")" and "]"', (")", "]", " )", " ]", "))", ");")),
        ("water", 'makes the model write the word "water"', (" water", "water", " Water", "Water")),
        ("money", 'makes the model write the word "money"', (" money", "money", " Money", "Money")),
        ("colours", 'colour words such as "red", "blue" and "green"',
         (" red", " blue", " green", " yellow", " Red", " Blue", " Green")),
    ]
    return [OutputPlant(i, *p) for i, p in enumerate(plants)]


def plant_direction(model, tokenizer, plant: OutputPlant):
    """The unit mean of the plant's tokens' unembedding rows (single-token words only)."""
    unembed = model.get_output_embeddings().weight.detach().float()
    ids = []
    for w in plant.words:
        toks = tokenizer.encode(w, add_special_tokens=False)
        if len(toks) == 1:
            ids.append(toks[0])
    if not ids:
        raise ValueError(f"no token of plant {plant.name} is a single token of this tokenizer")
    d = unembed[sorted(set(ids))].mean(0)
    return d / d.norm()


def residual_norm(steerer, prompts: Sequence[str]) -> float:
    """The median norm of the hooked residual stream over the prompts' tokens after the first
    (the first position of a sequence carries outlier norms, an attention sink)."""
    import torch

    box = []
    handle = steerer.point.module.register_forward_hook(
        lambda m, a, out: box.append((out[0] if isinstance(out, tuple) else out).detach()))
    try:
        ids, mask = steerer.encode(prompts)
        with torch.inference_mode():
            steerer.model(input_ids=ids, attention_mask=mask)
    finally:
        handle.remove()
    keep = mask.bool() & (mask.cumsum(-1) > 1)
    return float(box[0].float().norm(dim=-1)[keep].median())


@dataclass
class OutputBed:
    plants: list[OutputPlant]
    steering: object  # scorers.intervention.FeatureSteering
    layer: int
    scale: float

    def explanations(self) -> list[Explanation]:
        out = []
        for p in self.plants:
            for j, q in enumerate([p] + [q for q in self.plants if q.feature_id != p.feature_id]):
                out.append(Explanation(f"{SOURCE_ID}-{p.feature_id}-{q.name}", SOURCE_ID, p.feature_id,
                                       q.explanation, "planted", "true" if j == 0 else "mismatched", j))
        return out


def build_output_bed(local, *, layer: int = DEFAULT_LAYER, config=None, plants=None,
                     on_pass=None) -> OutputBed:
    """The bed on `local` (an llm.backends.local.LocalModel): a FeatureSteering whose features
    are the plants' directions added after decoder layer `layer`."""
    from featurescribe.scorers.intervention import FeatureSteering, InterventionConfig
    from featurescribe.steer.calibrate import neutral_prompts
    from featurescribe.steer.hooks import Intervention, hook_point

    plants = plants or default_output_plants()
    config = config or InterventionConfig()
    with local.lock:
        point = hook_point(local.model, "resid", layer)
        directions = {p.feature_id: plant_direction(local.model, local.tokenizer, p) for p in plants}
        steering = FeatureSteering(local, point, lambda f: None, config, key=SOURCE_ID, on_pass=on_pass)
        scale = residual_norm(steering.steerer, neutral_prompts(config.n_prompts))
    steering.intervention_for = lambda f: Intervention("add", scale, direction=directions[f])
    return OutputBed(plants, steering, layer, scale)
