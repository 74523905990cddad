"""How big each part's graph will be on an NPU, and how many parts keep every one under QNN HTP's limit.

A QNN HTP context (one part: its prompt processor and token generator sharing weights) cannot allocate more
than 2 GiB on the device: Qualcomm's Llama-2-7B export fails there with a part over it (ai-hub-models #129).
The size is almost all weights, in the graph's own storage: 4- or 8-bit codes plus a float32 scale per block
or per output channel, the embedding's gather table as 16-bit activation codes, float norms. The compiled
binary of the default model measured 162.9 MB for 157.7 MB of exported weights (x 1.033), which
`CONTEXT_OVERHEAD` rounds up; `compile` records both, so the estimate is checked on every compile.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import LlamaConfig
from ..loading.names import PROJECTIONS, tensor_shape
from ..quantization.recipe import Recipe
from .llama_graph import PartSpec

HTP_CONTEXT_LIMIT = 2 * 1024**3  # bytes one QNN HTP context may allocate on the device
CONTEXT_OVERHEAD = 1.05  # context binary bytes per exported weight byte (1.033 measured; see the docstring)
SCALE_BYTES = 4  # float32 scale per block (or per output channel)


@dataclass(frozen=True)
class Storage:
    """How a part's graphs store weights: `recipe` None for float weights (`float_bytes` 4, or 2 with fp16)."""

    recipe: Recipe | None
    float_bytes: int = 4
    activation_quantized: bool = False  # the gather table is then 16-bit activation codes

    def weight_bytes(self, name: str, rows: int, columns: int) -> float:
        if self.recipe is None:
            return rows * columns * self.float_bytes
        bits = self.recipe.bits_for(name)
        group = self.recipe.block_size or columns
        return rows * columns * bits / 8 + rows * (columns // group) * SCALE_BYTES


def part_bytes(config: LlamaConfig, part: PartSpec, storage: Storage) -> float:
    """Estimated bytes of the part's QNN context: its graphs' weights times the measured overhead."""
    c = config
    total = 0.0
    for layer in part.layers:
        total += sum(storage.weight_bytes(f"layers.{layer}.{p}", *tensor_shape(c, p)) for p in PROJECTIONS)
        total += 2 * c.hidden_size * 4  # the two norms, float
    table = c.vocab_size * c.hidden_size
    if part.first:
        total += 2 * table if storage.activation_quantized else storage.weight_bytes("embed_tokens", *(
            c.vocab_size, c.hidden_size))
    if part.last:
        tied_view = c.tie_word_embeddings and part.first and storage.recipe is None
        if not tied_view:
            total += storage.weight_bytes("embed_tokens" if c.tie_word_embeddings else "lm_head", c.vocab_size,
                                          c.hidden_size)
        total += c.hidden_size * 4
    return total * CONTEXT_OVERHEAD


def largest_part(config: LlamaConfig, parts: list[PartSpec], storage: Storage) -> tuple[PartSpec, float]:
    sizes = [(part, part_bytes(config, part, storage)) for part in parts]
    return max(sizes, key=lambda item: item[1])


def storage_of(precision: str, recipe: Recipe | None) -> Storage:
    return Storage(recipe, 2 if precision == "fp16" else 4, recipe is not None and recipe.activation_bits is not None)


def parts_that_fit(config: LlamaConfig, storage: Storage, at_least: int, plan) -> int:
    """The fewest parts (from `at_least`) whose largest stays under the HTP context limit; `plan(k)` splits."""
    for count in range(at_least, config.num_layers + 1):
        if largest_part(config, plan(count), storage)[1] <= HTP_CONTEXT_LIMIT:
            return count
    part, size = largest_part(config, plan(config.num_layers), storage)
    raise ValueError(f"even one layer per part leaves part {part.index + 1} at about {size / 1e9:.2f} GB, over QNN "
                     f"HTP's {HTP_CONTEXT_LIMIT / 2**30:.0f} GiB context limit; quantize to fewer bits")


def check_parts_fit(config: LlamaConfig, parts: list[PartSpec], storage: Storage, fitting: int) -> None:
    """A `--num-parts` whose largest part would not fit an HTP context is refused, naming the count that fits."""
    part, size = largest_part(config, parts, storage)
    if size > HTP_CONTEXT_LIMIT:
        raise ValueError(f"--num-parts {len(parts)}: part {part.index + 1} would be about {size / 1e9:.2f} GB, over "
                         f"QNN HTP's {HTP_CONTEXT_LIMIT / 2**30:.0f} GiB context limit (a device cannot load it); "
                         f"use --num-parts {fitting} or more")
