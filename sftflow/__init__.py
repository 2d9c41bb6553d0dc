"""sftflow: raw instruction drops -> validated datasets -> QLoRA SFT -> evaluated, published models."""

__version__ = "0.1.0"
