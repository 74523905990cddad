"""The one model config every stage receives.

Loaders build it from `config.json` or GGUF metadata; nothing downstream guesses sizes from
file names. It is plain Python so that the torch-free runtime can read it from a manifest.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
# Keys of Hugging Face's `rope_parameters` / `rope_scaling` that each rope type reads (others are refused).
_ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor", "mscale",
             "mscale_all_dim", "truncate"),
}
_ROPE_COMMON_KEYS = ("rope_type", "type", "rope_theta", "partial_rotary_factor")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, as Hugging Face's `rope_parameters` (formerly `rope_scaling`) describes it."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 8192  # llama3, yarn: the pretraining context
    beta_fast: float = 32.0  # yarn: ramp bounds, in rotations
    beta_slow: float = 1.0
    attention_factor: float | None = None  # yarn: cos/sin scale; None derives it from factor (and mscale)
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn: round the correction range to whole dimensions

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope type {self.rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
        if not self.factor > 0:
            raise ValueError(f"rope scaling factor must be positive, got {self.factor}")
        if self.rope_type in ("llama3", "yarn") and self.original_max_position_embeddings <= 0:
            raise ValueError("rope original_max_position_embeddings must be positive, got "
                             f"{self.original_max_position_embeddings}")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            raise ValueError(f"llama3 rope needs high_freq_factor > low_freq_factor > 0, got "
                             f"{self.high_freq_factor} and {self.low_freq_factor}")


def read_number(data: dict[str, Any], key: str, kind: type, default: Any = None, where: str = "") -> Any:
    """`data[key]` as an int or float, refusing null, strings, booleans and (for ints) fractions."""
    value = data.get(key, default)
    if value is None and default is None and key not in data:
        raise ValueError(f"{where}{key} is missing")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where}{key} must be a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):  # NaN, or a JSON number too large (inf)
        raise ValueError(f"{where}{key} must be finite, got {value!r}")
    if kind is int:
        if value != int(value):
            raise ValueError(f"{where}{key} must be a whole number, got {value!r}")
        return int(value)
    if abs(value) > 1e300:  # a JSON integer too large for a float
        raise ValueError(f"{where}{key} must be finite, got {value!r}")
    return float(value)


def rope_from_hf(hf: dict[str, Any]) -> tuple[float, RopeScaling]:
    """(rope theta, scaling) from a config.json: transformers 5's `rope_parameters` or the older top-level
    `rope_theta` with `rope_scaling`; an unknown rope type, or a key it would silently ignore, is refused."""
    params = {}
    for key in ("rope_scaling", "rope_parameters"):  # the newer form wins where both are given
        value = hf.get(key)
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"{key} must be an object, got {value!r}")
        params |= {k: v for k, v in (value or {}).items() if v is not None}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if not isinstance(rope_type, str) or rope_type not in ROPE_TYPES:
        raise ValueError(f"unsupported rope type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
    unknown = sorted(set(params) - set(_ROPE_COMMON_KEYS) - set(_ROPE_KEYS[rope_type]))
    if unknown:
        raise ValueError(f"rope type {rope_type!r} does not take {', '.join(unknown)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor {params['partial_rotary_factor']} is not supported (only 1.0)")
    where = "rope_parameters."
    theta = read_number(params, "rope_theta", float, hf.get("rope_theta", 10000.0), where)
    fields: dict[str, Any] = {"rope_type": rope_type}
    if rope_type != "default":
        factor = params.get("factor")
        if factor is None and rope_type == "yarn" and "original_max_position_embeddings" in params:
            # transformers 5: a yarn factor left out is the ratio of the two context lengths
            factor = read_number(hf, "max_position_embeddings", int) / read_number(
                params, "original_max_position_embeddings", int, where=where)
        fields["factor"] = read_number({"factor": factor}, "factor", float, where=where)
    if rope_type in ("llama3", "yarn"):
        original = params.get("original_max_position_embeddings", hf.get("max_position_embeddings", 4096))
        fields["original_max_position_embeddings"] = read_number({"o": original}, "o", int, where=where)
    for key in ("low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "attention_factor", "mscale",
                "mscale_all_dim"):
        if key in params and key in _ROPE_KEYS[rope_type]:
            fields[key] = read_number(params, key, float, where=where)
    if "truncate" in params:
        if not isinstance(params["truncate"], bool):
            raise ValueError(f"{where}truncate must be true or false, got {params['truncate']!r}")
        fields["truncate"] = params["truncate"]
    return theta, RopeScaling(**fields)


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0: hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim <= 0:
            raise ValueError(f"head_dim must be positive, got {self.head_dim}")
        if not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            raise ValueError(f"rms_norm_eps and rope_theta must be positive, got {self.rms_norm_eps} and "
                             f"{self.rope_theta}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def group_size(self) -> int:
        """Query heads that share one key/value head (1 for multi-head attention)."""
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LlamaConfig:
        """From `to_dict`'s output (a manifest, a quantized checkpoint); a mistyped number is a ValueError."""
        data = dict(data)
        for f in fields(cls):
            if f.name in data and f.type in ("int", "float"):
                data[f.name] = read_number(data, f.name, int if f.type == "int" else float)
        if not isinstance(data.get("tie_word_embeddings", False), bool):
            raise ValueError(f"tie_word_embeddings must be true or false, got {data['tie_word_embeddings']!r}")
        data["rope_scaling"] = RopeScaling(**data.get("rope_scaling", {}))
        return cls(**data)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> LlamaConfig:
        """Build from a Hugging Face `config.json` dictionary; a missing, null or mistyped field is a ValueError."""
        if not isinstance(hf, dict):
            raise ValueError(f"config must be a JSON object, got {type(hf).__name__}")
        theta, rope = rope_from_hf(hf)
        heads = read_number(hf, "num_attention_heads", int)
        kv_heads = hf.get("num_key_value_heads")
        head_dim = hf.get("head_dim")
        tied = hf.get("tie_word_embeddings", False)
        if not isinstance(tied, bool):
            raise ValueError(f"tie_word_embeddings must be true or false, got {tied!r}")
        return cls(
            vocab_size=read_number(hf, "vocab_size", int),
            hidden_size=read_number(hf, "hidden_size", int),
            intermediate_size=read_number(hf, "intermediate_size", int),
            num_layers=read_number(hf, "num_hidden_layers", int),
            num_heads=heads,
            num_kv_heads=heads if kv_heads is None else read_number(hf, "num_key_value_heads", int),
            head_dim=0 if head_dim is None else read_number(hf, "head_dim", int),
            rms_norm_eps=read_number(hf, "rms_norm_eps", float, 1e-6),
            rope_theta=theta,
            rope_scaling=rope,
            max_position_embeddings=read_number(hf, "max_position_embeddings", int, 4096),
            tie_word_embeddings=tied,
        )

    def to_hf(self) -> dict[str, Any]:
        """The equivalent Hugging Face `config.json` (for synthetic checkpoints and references)."""
        hf: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": "float32",
        }
        rs = self.rope_scaling
        if rs.rope_type != "default":
            keys = ("rope_type", *_ROPE_KEYS[rs.rope_type])
            hf["rope_scaling"] = {k: v for k, v in asdict(rs).items() if k in keys and v is not None}
        return hf


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids the runtime needs: BOS to start a sequence, and every id that ends a reply."""

    bos_id: int | None
    eos_ids: tuple[int, ...]
    bos_token: str | None = None
    eos_token: str | None = None
    add_bos: bool = True  # whether plain text starts with BOS (Llama-2 yes, SmolLM2 no)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpecialTokens:
        data = dict(data)
        ids = [data.get("bos_id"), *data["eos_ids"]] if isinstance(data["eos_ids"], list | tuple) else None
        if ids is None or not all(i is None or (isinstance(i, int) and not isinstance(i, bool)) for i in ids):
            raise ValueError("bos_id and eos_ids must be token ids")
        data["eos_ids"] = tuple(data["eos_ids"])
        return cls(**data)
