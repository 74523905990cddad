"""Build one `tokenizers.Tokenizer` (plus special ids and chat template) from a GGUF or a HF folder.

The runtime only ever sees a `tokenizer.json`-style `tokenizers.Tokenizer`, so every source is turned
into one here, at build time. SentencePiece BPE vocabularies (Llama-2 `tokenizer.model`, GGUF
`tokenizer.ggml.model == "llama"`) are converted the way transformers' `LlamaConverter` does (legacy
Llama behaviour); byte-level BPE vocabularies (GGUF `"gpt2"`) are rebuilt with the pre-tokenizer that
llama.cpp's `tokenizer.ggml.pre` names.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import sentencepiece
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from ..config import SpecialTokens
from ..files import read_json_object
from .errors import CheckpointError
from .gguf_file import GGUFFile

# llama.cpp / SentencePiece token types (tokenizer.ggml.token_type, ModelProto.SentencePiece.Type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Tokens that end an assistant turn in common chat formats; they stop generation like EOS does.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>")

SPIECE_UNDERLINE = "\u2581"

# Llama-3's split regex (llama.cpp "llama-bpe", tiktoken cl100k-style with digits in groups of 3).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


# ---------------------------------------------------------------- GGUF


def tokenizer_from_gguf(file: GGUFFile) -> tuple[Tokenizer, SpecialTokens, str | None]:
    """Rebuild the tokenizer a GGUF describes in its metadata, since a GGUF carries no tokenizer.json."""
    path = file.path
    name = file.value("tokenizer.ggml.model", "str", None)
    tokens: list[str] = file.value("tokenizer.ggml.tokens", "[str]", [])
    types: list[int] = file.value("tokenizer.ggml.token_type", "[int]", None) or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise CheckpointError(path, f"{len(tokens)} tokens but {len(types)} token types")
    try:
        if name == "gpt2":
            merges = file.value("tokenizer.ggml.merges", "[str]", [])
            pre = file.value("tokenizer.ggml.pre", "str", "default")
            tokenizer = _byte_level_bpe(tokens, merges, pre, path)
        elif name == "llama":
            scores = file.value("tokenizer.ggml.scores", "[float]", None) or [0.0] * len(tokens)
            if len(scores) != len(tokens):
                raise CheckpointError(path, f"{len(tokens)} tokens but {len(scores)} scores")
            prefix = file.value("tokenizer.ggml.add_space_prefix", "bool", True)
            tokenizer = _sentencepiece_bpe(tokens, scores, types, add_space_prefix=prefix)
        else:
            raise CheckpointError(path, f"unsupported tokenizer model {name!r}")
        _add_typed_tokens(tokenizer, tokens, types)
    except ValueError:
        raise
    except Exception as e:  # tokenizers raises bare Exceptions ("Error while initializing BPE")
        raise CheckpointError(path, f"inconsistent tokenizer vocabulary ({_first_line(e)})") from None
    add_bos = file.value("tokenizer.ggml.add_bos_token", "bool", name == "llama")
    special = _special_tokens(
        tokenizer,
        bos=_token_at(tokens, file.value("tokenizer.ggml.bos_token_id", "int", None)),
        eos=_token_at(tokens, file.value("tokenizer.ggml.eos_token_id", "int", None)),
        extra_eos_ids=[file.value("tokenizer.ggml.eot_token_id", "int", None)],
        add_bos=add_bos,
    )
    return tokenizer, special, file.value("tokenizer.chat_template", "str", None)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _token_at(tokens: Sequence[str], index: int | None) -> str | None:
    """The token string for an id from metadata, tolerating ids that are absent or out of range."""
    return tokens[index] if index is not None and 0 <= index < len(tokens) else None


def _byte_level_bpe(tokens: Sequence[str], merges: Sequence[str], pre: str, path: Path) -> Tokenizer:
    """GPT-2-style BPE over bytes; llama.cpp stores tokens and merges already in the byte alphabet."""
    vocab = {token: index for index, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    if any(len(pair) != 2 for pair in pairs):
        raise CheckpointError(path, "a tokenizer merge is not two tokens separated by a space")
    ignore_merges = pre in ("llama-bpe", "llama3", "llama-v3")  # llama.cpp and Llama-3's tokenizer.json
    tokenizer = Tokenizer(models.BPE(vocab, pairs, ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(pre, path)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _byte_level_pre_tokenizer(pre: str, path: Path) -> pre_tokenizers.PreTokenizer:
    """How text is split before merging, as llama.cpp's `tokenizer.ggml.pre` names it."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("default", "gpt2"):
        return byte_level
    if pre == "smollm":  # SmolLM's tokenizer.json: each digit alone, then the GPT-2 regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("llama-bpe", "llama3", "llama-v3"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    raise CheckpointError(path, f"unsupported pre-tokenizer {pre!r}")


# ---------------------------------------------------------------- SentencePiece BPE


def _sentencepiece_bpe(
    tokens: Sequence[str], scores: Sequence[float], types: Sequence[int], add_space_prefix: bool = True
) -> Tokenizer:
    """SentencePiece BPE as a tokenizers BPE, like transformers' LlamaConverter (legacy Llama-2)."""
    vocab = {token: index for index, token in enumerate(tokens)}
    unk = next((tokens[i] for i, kind in enumerate(types) if kind == UNKNOWN), None)
    model = models.BPE(vocab, _merges_from_scores(tokens, scores, types), unk_token=unk,
                       fuse_unk=True, byte_fallback=True)
    tokenizer = Tokenizer(model)
    replace = normalizers.Replace(" ", SPIECE_UNDERLINE)
    steps = [decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(SPIECE_UNDERLINE), replace])
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    else:
        tokenizer.normalizer = replace
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _merges_from_scores(
    tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]
) -> list[tuple[str, str]]:
    """BPE merges implied by the vocabulary: every split of a normal piece into two normal pieces,
    ranked by the merged piece's score (SentencePiece merges the best-scoring piece first)."""
    normal = {token: i for i, (token, kind) in enumerate(zip(tokens, types, strict=True)) if kind == NORMAL}
    found: list[tuple[float, int, int, int, str, str]] = []
    for piece, index in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                found.append((-scores[index], -len(left), normal[left], normal[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _add_typed_tokens(tokenizer: Tokenizer, tokens: Sequence[str], types: Sequence[int]) -> None:
    """Make control tokens special (so "<|im_start|>" in a chat template stays one id) and
    user-defined ones whole-matched added tokens, as llama.cpp and SentencePiece treat them."""
    typed = list(zip(tokens, types, strict=True))
    control = [AddedToken(t, special=True, normalized=False) for t, k in typed if k in (CONTROL, UNKNOWN)]
    user = [AddedToken(t, special=False, normalized=False) for t, k in typed if k == USER_DEFINED]
    tokenizer.add_special_tokens(control)
    tokenizer.add_tokens(user)


def _sentencepiece_model(model_file: Path) -> tuple[Tokenizer, str | None, str | None]:
    """Convert a SentencePiece `tokenizer.model` (BPE) into an equivalent tokenizers Tokenizer,
    with its own BOS and EOS pieces as defaults for folders that have no tokenizer_config.json."""
    try:
        processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        model_type, add_dummy_prefix, user_defined = _sentencepiece_spec(model_file)
    except Exception as e:  # sentencepiece and protobuf raise RuntimeError, OSError or DecodeError
        raise CheckpointError(model_file, f"not a readable SentencePiece model ({_first_line(e)})") from None
    size = processor.get_piece_size()
    tokens = [processor.id_to_piece(i) for i in range(size)]
    scores = [processor.get_score(i) for i in range(size)]
    if model_type not in (None, 2):  # 2 is BPE; a Unigram model cannot be expressed as BPE merges
        raise CheckpointError(model_file, f"only SentencePiece BPE is supported, not model_type {model_type}")
    types = [_piece_type(processor, i, user_defined) for i in range(size)]
    tokenizer = _sentencepiece_bpe(tokens, scores, types, add_space_prefix=add_dummy_prefix)
    _add_typed_tokens(tokenizer, tokens, types)
    return tokenizer, _token_at(tokens, processor.bos_id()), _token_at(tokens, processor.eos_id())


def _piece_type(processor: sentencepiece.SentencePieceProcessor, index: int, user_defined: set[int]) -> int:
    """The llama.cpp token type of one piece, from the processor's own predicates."""
    if processor.is_unknown(index):
        return UNKNOWN
    if processor.is_control(index):
        return CONTROL
    if processor.is_byte(index):
        return BYTE
    if processor.is_unused(index):
        return UNUSED
    return USER_DEFINED if index in user_defined else NORMAL


def _sentencepiece_spec(model_file: Path) -> tuple[int | None, bool, set[int]]:
    """(model type, add_dummy_prefix, user-defined ids) from the model proto; the processor hides them.

    Needs protobuf; without it we assume a BPE model with the dummy prefix and no user-defined pieces.
    """
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:  # protobuf missing
        return None, True, set()
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    user = {i for i, piece in enumerate(proto.pieces) if piece.type == USER_DEFINED}
    return proto.trainer_spec.model_type, proto.normalizer_spec.add_dummy_prefix, user


# ---------------------------------------------------------------- Hugging Face folder


def tokenizer_from_hf_folder(folder: Path) -> tuple[Tokenizer, SpecialTokens, str | None]:
    """Load a HF folder's tokenizer.json, or convert its tokenizer.model, with its special tokens; every file
    is checked, and a problem is a one-line `CheckpointError` naming it."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        tokenizer = load_tokenizer_json(folder / "tokenizer.json")
        default_bos = default_eos = default_add_bos = None  # add_bos: from the post-processor, below
    elif (folder / "tokenizer.model").is_file():
        tokenizer, default_bos, default_eos = _sentencepiece_model(folder / "tokenizer.model")
        default_add_bos = True  # LlamaTokenizer's default
    else:
        raise CheckpointError(folder, "no tokenizer.json or tokenizer.model")
    config_path, generation_path = folder / "tokenizer_config.json", folder / "generation_config.json"
    config = _side_file(config_path)
    generation = _side_file(generation_path)
    bos = _token_content(config_path, config, "bos_token", default_bos)
    eos = _token_content(config_path, config, "eos_token", default_eos)
    add_bos = config.get("add_bos_token", default_add_bos)
    if add_bos is not None and not isinstance(add_bos, bool):
        raise CheckpointError(config_path, f"add_bos_token must be true or false, got {add_bos!r}")
    if add_bos is None:
        bos_id = tokenizer.token_to_id(bos) if bos else None
        add_bos = bos_id is not None and tokenizer.encode("a").ids[:1] == [bos_id]
    gen_eos = generation.get("eos_token_id")
    gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
    if not all(i is None or (isinstance(i, int) and not isinstance(i, bool) and i >= 0) for i in gen_eos):
        raise CheckpointError(generation_path, f"eos_token_id must be a token id or a list of them, "
                                               f"got {generation.get('eos_token_id')!r}")
    special = _special_tokens(tokenizer, bos=bos, eos=eos, add_bos=add_bos, extra_eos_ids=gen_eos)
    return tokenizer, special, _hf_chat_template(folder, config_path, config)


def load_tokenizer_json(path: Path) -> Tokenizer:
    """A tokenizer.json; a damaged one is a one-line error naming it (tokenizers raises bare Exceptions)."""
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise CheckpointError(path, f"not a readable tokenizer.json ({_first_line(e)})") from None


def _side_file(path: Path) -> dict[str, Any]:
    """A JSON object from an optional side file; {} when it does not exist."""
    return read_json_object(path, path.stem.replace("_", " "), CheckpointError) if path.is_file() else {}


def _token_content(path: Path, config: dict[str, Any], key: str, default: str | None) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as AddedToken dicts."""
    token = config.get(key, default)
    if isinstance(token, dict):
        token = token.get("content")
    if token is not None and not isinstance(token, str):
        raise CheckpointError(path, f"{key} must be a string or an object with a string content, got "
                                    f"{config.get(key)!r}")
    return token


def _hf_chat_template(folder: Path, config_path: Path, config: dict[str, Any]) -> str | None:
    """The default chat template: chat_template.jinja (newer HF layout) or tokenizer_config.json's."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(jinja, f"not UTF-8 text (byte {e.start})") from None
    template, source = config.get("chat_template"), config_path
    if not template and (folder / "chat_template.json").is_file():
        source = folder / "chat_template.json"
        template = _side_file(source).get("chat_template")
    if isinstance(template, list) and all(isinstance(e, dict) for e in template):  # [{"name", "template"}, ...]
        named = {entry.get("name"): entry.get("template") for entry in template}
        template = named.get("default", next(iter(named.values()), None))
    if template is not None and not isinstance(template, str):
        raise CheckpointError(source, "chat_template must be a string or a list of named templates")
    return template or None


# ---------------------------------------------------------------- special tokens


def _special_tokens(
    tokenizer: Tokenizer, bos: str | None, eos: str | None, add_bos: bool, extra_eos_ids: Iterable[int | None]
) -> SpecialTokens:
    """BOS, and every id that ends a reply: EOS first, then extra ids and end-of-turn tokens."""
    bos_id = tokenizer.token_to_id(bos) if bos else None
    eos_id = tokenizer.token_to_id(eos) if eos else None
    turn_ids = [tokenizer.token_to_id(token) for token in END_OF_TURN_TOKENS]
    eos_ids = dict.fromkeys(i for i in [eos_id, *extra_eos_ids, *turn_ids] if i is not None)
    return SpecialTokens(bos_id=bos_id, eos_ids=tuple(eos_ids), bos_token=bos if bos_id is not None else None,
                         eos_token=eos if eos_id is not None else None, add_bos=add_bos)
