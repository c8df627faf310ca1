"""Next-token distributions and generation with and without an intervention, batched.

`Steerer(model, tokenizer, point)` runs prompts left-padded in one batch; every row has its own
strength (None: unsteered), so a steered and an unsteered continuation of the same prompt come
from the same forward passes. Generation is one loop with the key/value cache, greedy at
temperature 0, else sampled from a `torch.Generator` seeded with `seed` (the same seed gives the
same text). `Steerer.stats` counts forward passes and tokens, for the ledger.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

from featurescribe.errors import BadOption, FeaturescribeError
from featurescribe.steer.hooks import HookPoint, Intervention, steering


@dataclass
class PassStats:
    forward_passes: int = 0
    tokens_in: int = 0  # positions computed (prompt tokens and fed-back tokens, all rows)
    tokens_out: int = 0  # tokens generated (all rows)

    def add(self, other: "PassStats") -> None:
        self.forward_passes += other.forward_passes
        self.tokens_in += other.tokens_in
        self.tokens_out += other.tokens_out


class Steerer:
    def __init__(self, model, tokenizer, point: HookPoint):
        self.model, self.tokenizer, self.point = model, tokenizer, point
        self.device = next(model.parameters()).device
        self.stats = PassStats()
        # called after every forward pass with (positions computed, tokens generated, seconds)
        self.on_pass: Callable[[int, int, float], None] | None = None
        # transformers 5.x names the key/value cache argument `cache`; older versions past_key_values
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def encode(self, prompts: Sequence[str]):
        """(input_ids, attention_mask) left-padded on the model's device."""
        import torch

        rows = [self.tokenizer(p, add_special_tokens=True).input_ids or [self.pad_id] for p in prompts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _forward(self, ids, mask, past, intervention, strengths, n_out: int = 0):
        import time

        import torch

        t0 = time.perf_counter()

        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        with torch.inference_mode(), steering(self.point, intervention, strengths):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                             logits_to_keep=1, **{self._cache_arg: past})
        self.stats.forward_passes += 1
        self.stats.tokens_in += int(ids.numel())
        if self.on_pass is not None:
            self.on_pass(int(ids.numel()), n_out, time.perf_counter() - t0)
        cache = getattr(out, "cache", None)
        return out.logits[:, -1, :].float(), cache if cache is not None else out.past_key_values

    def next_logprobs(self, prompts: Sequence[str], intervention: Intervention | None = None,
                      strengths: Sequence[float | None] | None = None):
        """log p(next token | prompt) [batch, vocab] for each prompt, with its row's strength."""
        import torch

        ids, mask = self.encode(prompts)
        strengths = list(strengths) if strengths is not None else [None] * len(prompts)
        logits, _ = self._forward(ids, mask, None, intervention, strengths)
        return torch.log_softmax(logits, dim=-1)

    def generate(self, prompts: Sequence[str], intervention: Intervention | None = None,
                 strengths: Sequence[float | None] | None = None, *, max_new_tokens: int = 16,
                 temperature: float = 0.0, seed: int = 0) -> list[str]:
        """The continuation of each prompt (text after the prompt), with its row's strength."""
        import torch

        ids, mask = self.encode(prompts)
        _check_length(self.model, ids.shape[1], max_new_tokens)
        strengths = list(strengths) if strengths is not None else [None] * len(prompts)
        gen = torch.Generator(device=self.device).manual_seed(int(seed))
        eos = self.tokenizer.eos_token_id
        out = torch.empty((len(prompts), 0), dtype=torch.long, device=self.device)
        done = torch.zeros(len(prompts), dtype=torch.bool, device=self.device)
        past, step_ids = None, ids
        for _ in range(max_new_tokens):
            logits, past = self._forward(step_ids, mask, past, intervention, strengths, int((~done).sum()))
            _check_finite(logits, strengths)
            nxt = _pick(logits, temperature, gen)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            out = torch.cat([out, nxt[:, None]], dim=1)
            self.stats.tokens_out += int((~done).sum())
            if eos is not None:
                done |= nxt == eos
            if bool(done.all()):
                break
            step_ids = nxt[:, None]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        return [self._text(row, eos) for row in out.tolist()]

    def _text(self, row: list[int], eos: int | None) -> str:
        if eos is not None and eos in row:
            row = row[:row.index(eos)]
        return self.tokenizer.decode(row, skip_special_tokens=True)


def _check_length(model, prompt_tokens: int, max_new_tokens: int) -> None:
    """BadOption for a continuation that would run past the model's context: positions there are
    out of its training distribution, and the run would take minutes before failing or not."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and prompt_tokens + max_new_tokens > limit:
        raise BadOption(f"--max-new-tokens {max_new_tokens:,} with a prompt of {prompt_tokens:,} token(s) is longer "
                        f"than the model's context of {limit:,} tokens")


def _check_finite(logits, strengths: Sequence[float | None]) -> None:
    """FeaturescribeError where a strength overflowed the model's activations: its logits are inf or
    NaN (sampling from them failed with a traceback, greedy picks were token 0)."""
    import torch

    bad = (~torch.isfinite(logits).all(dim=-1)).nonzero()[:, 0].tolist()
    if bad:
        worst = max((strengths[i] for i in bad if strengths[i] is not None), key=abs, default=None)
        if worst is None:
            raise FeaturescribeError("the model's next-token logits are infinite or NaN without steering")
        raise FeaturescribeError(f"steering at strength {worst:g} made the model's next-token logits infinite or "
                                 "NaN (its activations overflow): use a smaller strength")


def _pick(logits, temperature: float, gen):
    import torch

    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]
