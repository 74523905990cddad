"""Evaluation: perplexity of each logit source on a text, and KL divergence / top-1 agreement to a reference.

Sources are plain functions from one window of token ids to its logits (`LogitFn`), so the float
reference, an exported folder and a simulated-quantization model are all measured the same way.
The metrics themselves (numpy only) live in `ondevice_llama.evaluation.metrics`.
"""

from .evaluate import EvaluationReport, LogitFn, SourceResult, evaluate
from .sources import SOURCE_BUILDERS, exported_logits, float_logits, simulated_logits
from .text import load_text_tokens

__all__ = ["SOURCE_BUILDERS", "EvaluationReport", "LogitFn", "SourceResult", "evaluate", "exported_logits",
           "float_logits", "load_text_tokens", "simulated_logits"]
