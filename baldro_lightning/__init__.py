"""baldro-lightning: balanced LLM unlearning (BalDRO) on PyTorch Lightning."""

__version__ = "0.1.0"
