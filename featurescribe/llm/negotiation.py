"""What an OpenAI-compatible server accepts, learnt from its refusals.

Servers that speak the chat-completions API differ in what they take: llama.cpp's server refuses
`response_format: json_schema`, some servers have no `logprobs`, others refuse parameters they do
not know. A refusal of the request's form is a `RequestRejected` failure: it is never retried as
an outage. When the refused part has a weaker form, the backend moves to it at once, for the rest
of the run, and the client remembers it per base URL + model in the database (`llm_capabilities`)
so the next run starts right.

Structured answers, best first: `json_schema` (the server enforces the schema), `json_object`
(the server enforces JSON, and the schema where it reads `response_format.schema`, as llama.cpp
does; the schema is stated in the prompt too), `text` (the schema is stated in the prompt and
the answer is parsed strictly as JSON).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from featurescribe.llm.base import LLMCallFailed
from featurescribe.statuses import STRUCTURED_CHOICES, StructuredForm  # noqa: F401 (re-exported)

STRUCTURED_FORMS = tuple(f.value for f in StructuredForm)
# optional request parameters a server may not know: dropped, one by one, when it says so
OPTIONAL_PARAMS = ("seed", "temperature")
_REFUSAL_WORDS = re.compile(
    r"unrecognized|unknown|unsupported|not supported|not permitted|extra inputs|extra_forbidden"
    r"|invalid|should be|not allowed|unexpected", re.I)


class RequestRejected(LLMCallFailed):
    """The server refused the form of a request (a field or parameter it does not take).

    `changed` says the backend now asks in another form, so the call is worth sending again."""

    def __init__(self, message: str, feature: str, changed: bool):
        super().__init__(message)
        self.feature = feature
        self.changed = changed


@dataclass
class Capabilities:
    """What one server + model has been found to take."""

    structured: str = "json_schema"
    logprobs: bool = True
    dropped: set[str] = field(default_factory=set)  # optional parameters it refused

    def weaker_structured(self) -> str | None:
        i = STRUCTURED_FORMS.index(self.structured)
        return STRUCTURED_FORMS[i + 1] if i + 1 < len(STRUCTURED_FORMS) else None


def refused_feature(status: int | None, message: str, sent: dict) -> str | None:
    """The part of a sent request body that a server error refuses: 'response_format',
    'logprobs', or an optional parameter's name; None when the error is not such a refusal.

    A 400/422 naming a part that was sent is a refusal; so is any status whose message is a
    validation error naming `response_format` (llama.cpp's server answers that with a 500)."""
    text = message or ""
    lowered = text.lower()
    if "response_format" in sent and ("response_format" in lowered or "json_schema" in lowered):
        if status in (400, 422) or _REFUSAL_WORDS.search(text):
            return "response_format"
    if status not in (400, 422) and "validation error" not in lowered:
        return None
    if "logprobs" in sent and "logprobs" in lowered:
        return "logprobs"
    for name in OPTIONAL_PARAMS:
        if name in sent and re.search(rf"\b{name}\b", lowered) and _REFUSAL_WORDS.search(text):
            return name
    return None
