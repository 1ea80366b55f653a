"""Chat messages -> one prompt string, with the checkpoint's own Jinja chat template.

The template is where Hugging Face checkpoints keep it: ``chat_template.jinja`` beside the
tokenizer, or the ``chat_template`` key of ``tokenizer_config.json`` (a string, or a list of named
templates of which we take "default"). It is rendered the way ``transformers``'
``apply_chat_template`` renders it: a sandboxed Jinja environment with trim_blocks / lstrip_blocks,
loop controls, ``raise_exception``, ``strftime_now`` and a ``tojson`` filter, and the tokenizer's
special tokens (``bos_token``, ``eos_token``, ...) as variables.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from afsplit.errors import RequestError

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict | None = None):
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, separators=None, sort_keys=False: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.template = env.from_string(source)
        self.special_tokens = special_tokens or {}

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text; raises RequestError when the template rejects the conversation."""
        from jinja2 import TemplateError

        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **self.special_tokens)
        except RequestError:
            raise
        except TemplateError as e:
            raise RequestError(f"messages: the chat template failed: {e}") from None


def _raise(message: str):
    raise RequestError(f"messages: {message}")


def load_chat_template(model_dir: str) -> ChatTemplate | None:
    """The checkpoint's chat template, or None if it has none."""
    if not model_dir:
        return None
    d = Path(model_dir)
    cfg_path = d / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    source = (d / "chat_template.jinja").read_text() if (d / "chat_template.jinja").exists() else cfg.get("chat_template")
    if isinstance(source, list):  # [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if not isinstance(source, str):
        return None
    special = {}
    for key in SPECIAL_KEYS:
        tok = cfg.get(key)
        if isinstance(tok, dict):  # {"content": "<s>", ...}
            tok = tok.get("content")
        if isinstance(tok, str):
            special[key] = tok
    return ChatTemplate(source, special)
