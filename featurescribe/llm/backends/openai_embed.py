"""`openai:MODEL` as an embedder: `POST /embeddings` through the openai SDK.

It plugs into `featurescribe.llm.Client` like a chat backend, so embeddings get the same
retries, limits, ledger rows, cost and response cache: the request's messages are the texts
(one `user` message each), and the answer's `text` is a JSON object holding one base64 float32
vector per text (compact in `llm_cache`), which `decode_vectors` turns back into an array.
"""

from __future__ import annotations

import base64
import json

import numpy as np

from featurescribe.llm.backends.base import BadAnswer
from featurescribe.llm.backends.openai_backend import OpenAIBackend
from featurescribe.llm.base import ChatRequest, ChatResponse, UnparseableResponse


def encode_vectors(vectors: list[list[float]]) -> str:
    blobs = [base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii") for v in vectors]
    return json.dumps({"vectors": blobs})


def decode_vectors(text: str, n_expected: int) -> np.ndarray:
    """The (n, d) float32 array of an embedding answer; UnparseableResponse when it does not fit."""
    try:
        blobs = json.loads(text)["vectors"]
        rows = [np.frombuffer(base64.b64decode(b), dtype="<f4") for b in blobs]
    except (ValueError, KeyError, TypeError) as err:
        raise UnparseableResponse(f"not an embedding answer: {err}") from None
    if len(rows) != n_expected or not rows or len({r.size for r in rows}) != 1 or rows[0].size == 0:
        raise UnparseableResponse(f"expected {n_expected} vectors of one size, got {len(rows)}")
    return np.stack(rows).astype(np.float32)


class OpenAIEmbedBackend(OpenAIBackend):
    """The chat backend's SDK set-up (key, base URL, connection pools), posting to /embeddings."""

    supports_logprobs = False

    async def send(self, request: ChatRequest, *, max_tokens: int, timeout: float,
                   retry_index: int = 0) -> ChatResponse:
        import httpx

        sdk = self._sdk.get().next()
        texts = [m["content"] for m in request.messages]
        body = {"model": self.model, "input": texts, "encoding_format": "float"}
        http = await sdk.post("/embeddings", body=body, cast_to=httpx.Response, options={"timeout": timeout})
        try:
            r = http.json()
            data = sorted(r["data"], key=lambda d: d.get("index", 0))
            vectors = [d["embedding"] for d in data]
        except (ValueError, KeyError, TypeError):
            raise BadAnswer(f"the server's answer is not an embedding list: {http.text[:200]!r}") from None
        usage = r.get("usage") or {}
        return ChatResponse(text=encode_vectors(vectors), input_tokens=int(usage.get("prompt_tokens") or 0),
                            output_tokens=0, finish_reason="stop", raw={"model": r.get("model")})
