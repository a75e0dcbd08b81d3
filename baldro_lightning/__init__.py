"""baldro-lightning: balanced LLM unlearning (BalDRO) on PyTorch Lightning."""

import logging

__version__ = "0.1.0"

# transformers imports torchao (the quantization attack's library, baldro_lightning.robustness.quantization) whenever
# it is installed, before any of our code runs. torchao then logs a warning for each CUDA kernel library a CPU build
# cannot load, and torch one for each of torchao's enums it registers the deprecated way; none of those kernels or
# enums is used here, and the four lines would open every command's output.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
