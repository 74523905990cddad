"""The evaluation text: a UTF-8 file tokenized once, as one stream of token ids.

The whole file is encoded with the model's tokenizer without special tokens (no BOS, no EOS), exactly as
the text reads, and cut to `max_tokens`. Windows are slices of that stream, each starting with the model's
BOS when it has one (`evaluate.split_windows`), as models see text in use. Two models with one tokenizer
are therefore scored on the very same ids.
"""

from __future__ import annotations

from pathlib import Path


def read_text(path: Path | str) -> str:
    """The file's text; a one-line ValueError naming the file when it is missing, not UTF-8 or empty."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such text file")
    if not path.is_file():
        raise ValueError(f"{path}: not a file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise ValueError(f"{path}: the text file is empty")
    return text


def load_text_tokens(path: Path | str, tokenizer, max_tokens: int | None = None) -> list[int]:
    """Token ids of the text in `path` (a `tokenizers.Tokenizer`, no special tokens), the first `max_tokens`."""
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2, got {max_tokens}")
    ids = tokenizer.encode(read_text(path), add_special_tokens=False).ids
    if len(ids) < 2:
        raise ValueError(f"{path}: only {len(ids)} token(s); at least 2 are needed to score anything")
    return list(ids[:max_tokens])
