"""maxact-card: measure where a model's activations peak, and publish it in the model card."""

from __future__ import annotations

__version__ = "0.1.0"
