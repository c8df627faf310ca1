"""The prompt templates, read from this folder (explain_*, simulate_*, detect_*, fuzz_*).

A template is plain text with `$name` placeholders (string.Template, so braces in tokens or JSON
need no escaping). A chat template splits into messages at lines `[system]`, `[user]`,
`[assistant]`; a template without such lines is one plain text (the local simulator's prompt).
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from string import Template

_PROMPTS = Path(__file__).resolve().parent
_ROLE = re.compile(r"^\[(system|user|assistant)\]\s*$", re.M)


def template_names() -> list[str]:
    """Every template in this folder, by name (the file name without `.txt`)."""
    return sorted(p.stem for p in _PROMPTS.glob("*.txt"))


@lru_cache(maxsize=None)
def load_template(name: str) -> str:
    return (_PROMPTS / f"{name}.txt").read_text(encoding="utf-8")


def render_text(name: str, **values) -> str:
    return Template(load_template(name)).substitute(**{k: str(v) for k, v in values.items()})


def render_messages(name: str, **values) -> tuple[dict, ...]:
    """The template's messages, each with its placeholders filled."""
    text = load_template(name)
    parts = _ROLE.split(text)
    if len(parts) == 1:
        raise ValueError(f"prompt {name} has no [system]/[user] lines")
    messages = []
    for role, body in zip(parts[1::2], parts[2::2]):
        content = Template(body.strip("\n")).substitute(**{k: str(v) for k, v in values.items()})
        messages.append({"role": role, "content": content})
    return tuple(messages)


def show_token(token: str) -> str:
    """A token as one line of a prompt: line breaks and tabs written as \\n and \\t."""
    return token.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
