"""Render Hugging Face style Jinja chat templates safely.

Chat templates come from model files, i.e. from untrusted sources. They run in jinja2's
immutable sandbox, which blocks the attribute walks (`__globals__`, `__init__`, ...) used by
template-injection exploits such as CVE-2024-34359; any sandbox violation or template failure
surfaces as ConfigError.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import ConfigError, InputTypeError

_CACHE_SIZE = 32


def _raise_exception(message: str) -> None:
    # Templates call this to reject conversations they cannot format (e.g. bad role order).
    raise jinja2.TemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False,
            sort_keys: bool = False) -> str:
    # jinja2's own tojson HTML-escapes; templates expect plain JSON, as transformers provides.
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.filters["tojson"] = _tojson
    return env


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _compile(template: str) -> jinja2.Template:
    return _environment().from_string(template)


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list):
        raise InputTypeError(f"messages must be a list of dicts, not {type(messages).__name__}")
    if not messages:
        raise ConfigError("messages must contain at least one message")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise InputTypeError(f"messages[{i}] must be a dict, not {type(msg).__name__}")
        for key in ("role", "content"):
            if key not in msg:
                raise ConfigError(f"messages[{i}] has no {key!r}")
            if not isinstance(msg[key], str):
                raise InputTypeError(
                    f"messages[{i}][{key!r}] must be a str, not {type(msg[key]).__name__}")


def render_chat(template: str, messages: list[dict[str, Any]], *,
                add_generation_prompt: bool = True, bos_token: str | None = None,
                eos_token: str | None = None, **extra: Any) -> str:
    """Render `messages` with a chat template in a sandbox; errors become ConfigError."""
    if not isinstance(template, str):
        raise InputTypeError(f"chat template must be a str, not {type(template).__name__}")
    _check_messages(messages)
    try:
        compiled = _compile(template)
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token or "", eos_token=eos_token or "", **extra)
    except jinja2.TemplateError as e:  # SecurityError is a TemplateError subclass
        raise ConfigError(f"chat template error: {e}") from e
    except (TypeError, ValueError, LookupError, ArithmeticError, AttributeError) as e:
        # Template code failing at runtime (e.g. indexing past the end) is a template defect.
        raise ConfigError(f"chat template error: {type(e).__name__}: {e}") from e
