"""Turn a conversation into prompt token ids, with the model's chat template or Llama-2's format.

A file format shared by calibration (its chat-formatted text) and the runtime: only stdlib, tokenizers
and jinja2 (imported when a template is rendered), so it runs where torch and transformers do not, and
quantization reads it without importing the runtime.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .config import SpecialTokens

if TYPE_CHECKING:
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from tokenizers import Tokenizer

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}

# Meta's Llama-2 chat markers (facebookresearch/llama, llama/generation.py).
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def encode_text(tokenizer: Tokenizer, text: str, special: SpecialTokens) -> list[int]:
    """Plain-text prompt ids, starting with BOS for models that expect one (Llama-2 yes, SmolLM2 no)."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    return [special.bos_id, *ids] if special.add_bos and special.bos_id is not None else ids


def format_chat(
    tokenizer: Tokenizer,
    messages: list[Message],
    special: SpecialTokens,
    chat_template: str | None,
    add_generation_prompt: bool = True,
) -> list[int]:
    """Prompt ids for a conversation, exactly as the model was trained to see one."""
    _check_messages(messages)
    if chat_template is None:
        return _llama2_chat(tokenizer, messages, special, add_generation_prompt)
    text = render_chat_template(chat_template, messages, special, add_generation_prompt)
    return tokenizer.encode(text, add_special_tokens=False).ids


def render_chat_template(
    chat_template: str, messages: list[Message], special: SpecialTokens, add_generation_prompt: bool = True
) -> str:
    """Render a HF chat template the way transformers' `apply_chat_template` does."""
    template = _jinja_env().from_string(chat_template)
    return template.render(messages=messages, bos_token=special.bos_token or "",
                           eos_token=special.eos_token or "", add_generation_prompt=add_generation_prompt)


def _jinja_env() -> ImmutableSandboxedEnvironment:
    """The sandboxed environment and helpers transformers gives chat templates."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _raise_exception(message: str) -> None:
    """Templates call this to reject a conversation they cannot format."""
    import jinja2.exceptions

    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """transformers' `tojson`: unlike jinja2's built-in, it does not HTML-escape."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _check_messages(messages: list[Message]) -> None:
    """Fail early, with the index, on messages that are not {"role", "content"} dicts."""
    if not messages:
        raise ValueError("a chat needs at least one message")
    for index, message in enumerate(messages):
        if message.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"message {index}: role must be system, user or assistant, "
                             f"got {message.get('role')!r}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"message {index}: content must be a string")


def _llama2_chat(
    tokenizer: Tokenizer, messages: list[Message], special: SpecialTokens, add_generation_prompt: bool
) -> list[int]:
    """Meta's Llama-2 `chat_completion` format, built per turn at the token level as Meta does.

    The system prompt goes inside the first user turn; each finished (user, assistant) pair is
    `BOS [INST] user [/INST] answer EOS`; the last user turn is `BOS [INST] user [/INST]`. Without a
    generation prompt a conversation may also end with an answer (every pair then ends in EOS).
    """
    turns = _merge_system(messages)
    roles = [turn["role"] for turn in turns]
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    if roles != expected:
        given = [message["role"] for message in messages]
        raise ValueError(f"Llama-2 chat needs an optional system message, then user and assistant "
                         f"messages alternating, starting with user; got roles {given}")
    if roles[-1] == "assistant" and add_generation_prompt:
        raise ValueError("the last message must be from the user to generate a reply, got assistant")
    ids: list[int] = []
    for user, answer in zip(turns[::2], turns[1::2], strict=False):
        text = f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} "
        ids += _segment(tokenizer, text, special, eos=True)
    if roles[-1] == "user":
        ids += _segment(tokenizer, f"{B_INST} {turns[-1]['content'].strip()} {E_INST}", special, eos=False)
    return ids


def _merge_system(messages: list[Message]) -> list[Message]:
    """Fold a leading system message into the first user message, as Meta's reference does."""
    if messages[0]["role"] != "system":
        return list(messages)
    if len(messages) < 2:
        raise ValueError("a system message must be followed by a user message")
    first = messages[1]
    merged = {"role": first["role"], "content": B_SYS + messages[0]["content"] + E_SYS + first["content"]}
    return [merged, *messages[2:]]


def _segment(tokenizer: Tokenizer, text: str, special: SpecialTokens, eos: bool) -> list[int]:
    """One turn encoded on its own (so it gets SentencePiece's leading "▁"), with BOS and maybe EOS."""
    if special.bos_id is None or (eos and not special.eos_ids):
        raise ValueError("the Llama-2 chat format needs BOS and EOS token ids")
    ids = [special.bos_id, *tokenizer.encode(text, add_special_tokens=False).ids]
    return [*ids, special.eos_ids[0]] if eos else ids
