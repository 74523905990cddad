"""Loading: any Llama checkpoint becomes one `Checkpoint` with lazy float32 tensors in our names."""

from .checkpoint import Checkpoint, open_checkpoint
from .default_model import default_checkpoint_path
from .errors import CheckpointError
from .sources import TensorSource

__all__ = ["Checkpoint", "CheckpointError", "TensorSource", "default_checkpoint_path", "open_checkpoint"]
