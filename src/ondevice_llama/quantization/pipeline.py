"""From a checkpoint and a recipe to a quantized checkpoint on disk, calibrated once and reused.

`export` and `quantize` both come through here, so a w4a16 export made twice (say with another part
count) quantizes once: the result is cached under a key of the checkpoint, recipe and calibration data.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..files import cache_path, fingerprint, folder_lock
from ..loading import Checkpoint
from ..loading.names import num_parameters
from .calibration import SEED_PROMPTS, Generation, builtin_sequences, file_sequences, pack_sequences
from .quantize_model import quantize_model
from .quantized_checkpoint import QUANTIZED_VERSION, QuantizedModel
from .recipe import Recipe
from .rotation import checkpoint_for

CALIBRATION_LENGTH = 256  # tokens per calibration row
CALIBRATION_FILE_ROWS = 64  # at most this many rows from --calibration-file
# Self-generated calibration text needs the whole float model in memory and a generation run: worth it
# for GPTQ (which overfits a few hundred tokens once layers have thousands of inputs) on models between
# these sizes. Larger ones use the hand-written set (or --calibration-file) so that memory stays bounded
# by one layer; tiny ones (tests) have too few inputs per layer to need it.
GENERATED_CALIBRATION_PARAMETERS = (50_000_000, 2_000_000_000)


def uses_generated_calibration(checkpoint: Checkpoint, recipe: Recipe | None) -> bool:
    low, high = GENERATED_CALIBRATION_PARAMETERS
    return recipe is not None and recipe.algorithm == "gptq" and low <= num_parameters(checkpoint.config) <= high


def calibration_token_estimate(generated: bool, from_file: bool) -> int:
    """About how many calibration tokens a quantization runs through each layer (for the memory estimate)."""
    if from_file:
        return CALIBRATION_FILE_ROWS * CALIBRATION_LENGTH
    handwritten = 1024
    return handwritten + (len(SEED_PROMPTS) * Generation().length if generated else 0)


def calibration_batch(checkpoint: Checkpoint, calibration_file: Path | None = None, recipe: Recipe | None = None,
                      progress: bool = True) -> tuple[torch.Tensor, dict]:
    """Calibration token ids [rows, CALIBRATION_LENGTH] and a description of where they came from."""
    if calibration_file is None:
        generated = uses_generated_calibration(checkpoint, recipe)
        sequences = builtin_sequences(checkpoint, generated=generated, progress=progress)
        source = "built-in (hand-written + self-generated)" if generated else "built-in (hand-written)"
    else:
        sequences = file_sequences(checkpoint, calibration_file, CALIBRATION_LENGTH, CALIBRATION_FILE_ROWS)
        source = str(Path(calibration_file).resolve())
    sink = attention_sink_token(checkpoint)
    batch = pack_sequences(sequences, CALIBRATION_LENGTH, first_token=sink)
    return batch, {"source": source, "rows": batch.shape[0], "length": batch.shape[1],
                   "tokens": sum(len(s) for s in sequences), "attention_sink_token": sink}


def attention_sink_token(checkpoint: Checkpoint) -> int | None:
    """The token every quantized sequence starts with (attention_sink.py): the model's BOS, if it has one."""
    return checkpoint.special_tokens.bos_id


def quantized_cache_folder(checkpoint: Checkpoint, recipe: Recipe, calibration_file: Path | None) -> Path:
    """Where the quantized checkpoint of `checkpoint` with `recipe` and this calibration data is cached."""
    return cache_path("quantized", Path(checkpoint.path).stem, fingerprint(checkpoint.path), recipe.to_dict(),
                      fingerprint(calibration_file) if calibration_file else "built-in", QUANTIZED_VERSION)


def prepare_quantized(checkpoint: Checkpoint, recipe: Recipe, calibration_file: Path | None = None,
                      out: Path | None = None, progress: bool = True, cache: Path | None = None
                      ) -> tuple[QuantizedModel, Path]:
    """The quantized checkpoint for `recipe`: loaded from `out` (default: the cache) if already made there.

    cache: the cache's folder when already worked out (`quantized_cache_folder`, as an export plan has it).
    A rotating recipe quantizes the rotated model (`rotation.checkpoint_for`); its config is that model's.
    """
    checkpoint = checkpoint_for(checkpoint, recipe)
    folder = out or cache or quantized_cache_folder(checkpoint, recipe, calibration_file)
    with folder_lock(folder):  # a second process quantizing the same waits, then reuses the result
        return _prepare_locked(checkpoint, recipe, calibration_file, folder, progress, cached=out is None), folder


def _prepare_locked(checkpoint: Checkpoint, recipe: Recipe, calibration_file: Path | None, folder: Path,
                    progress: bool, cached: bool) -> QuantizedModel:
    """`prepare_quantized` under the lock; a damaged cached checkpoint is made again (a user's is an error)."""
    if (folder / "quantization.json").exists():
        try:
            model = QuantizedModel.load(folder)
        except ValueError as e:
            if not cached:
                raise
            print(f"{e}; quantizing again", file=sys.stderr)
            model = None
        if model is not None and model.recipe == recipe and model.config == checkpoint.config:
            if progress:
                print(f"reusing the quantized checkpoint {folder}", file=sys.stderr)
            return model
    calibration, info = calibration_batch(checkpoint, calibration_file, recipe, progress)
    if progress:
        print(f"quantizing {checkpoint.name} ({recipe.describe()}) on {info['tokens']} calibration tokens "
              f"({info['source']}) into {folder}", file=sys.stderr)
    return quantize_model(checkpoint, recipe, calibration, progress, out=folder, calibration_info=info,
                          sink_token=info["attention_sink_token"])


def load_quantized(folder: Path, checkpoint: Checkpoint) -> QuantizedModel:
    """A quantized checkpoint given by the user, checked against the checkpoint it will be used with."""
    model = QuantizedModel.load(folder)
    if model.config != checkpoint_for(checkpoint, model.recipe).config:
        raise ValueError(f"{folder}: quantized from a model with another configuration than {checkpoint.path}")
    return model
