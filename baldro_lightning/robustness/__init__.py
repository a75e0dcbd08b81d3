"""Does the forgetting last? Attacks on a finished model, scored with the benchmark evaluators (issue 20).

``splits`` (which forget rows a relearning attack trains on and which it is scored on), ``quantization`` (per-channel
weight quantization), ``relearning`` (a short fine-tune through Lightning), ``attacks`` (the attacks, chosen by
``class_path``), ``recovery`` (before/after per forget metric), ``suite`` (runs the attacks and writes their records),
``callbacks`` (the attacks at the end of ``fit``) and ``command`` (``python -m baldro_lightning attack``).
"""
