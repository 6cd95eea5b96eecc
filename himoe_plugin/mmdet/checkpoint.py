"""Allow-list what MMEngine checkpoints hold, for ``torch.load(weights_only=True)``."""
from __future__ import annotations


def allow_mmengine_checkpoint_globals() -> None:
    """Placeholder until probed."""
