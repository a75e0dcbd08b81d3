"""Per-rank memory of weights, gradients and AdamW state: FSDP2 on 2 ranks vs 1 process, full and LoRA.

A randomly initialised Llama of about 30M parameters (policy, trainable) plus a frozen copy (the NPO reference)
takes one AdamW step on random tokens. Afterwards each rank sums ``numel * element_size`` over the tensors it
actually holds: its local shards of the policy parameters, their gradients and the optimizer states, and its shard
of the reference. This is a measurement of what stays resident between steps, not an estimate from the parameter
count; it leaves out activations and the transiently all-gathered layer, which FSDP2 frees after use.

The LoRA rows train rank-8 adapters on every attention and MLP projection (``baldro_lightning.train.lora.LoRA``'s
defaults): gradients and AdamW state exist for the adapters only, and the reference is the same base weights with
the adapters switched off, so no reference copy is held.

Run it plainly; it measures one process in-process and launches the 2-rank run itself (gloo, CPU)::

    python experiments/benchmarks/memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, LlamaForCausalLM

from baldro_lightning.train.lora import LoRA, add_adapters
from baldro_lightning.train.sharding import shard_model

COLUMNS = ("policy weights", "gradients", "optimizer state", "reference weights")
VARIANTS = ("full", "lora")


def _config() -> LlamaConfig:
    # 16k vocabulary (tied head) + 8 layers of width 512: 8.4M embedding + 8 x 3.2M blocks = 34M parameters.
    return LlamaConfig(
        vocab_size=16384,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )


def _local_bytes(tensors: Iterable[Tensor | None]) -> int:
    """Bytes this process holds for ``tensors``: the local shard of a DTensor, the whole of a plain tensor."""
    total, seen = 0, set()
    for tensor in tensors:
        if tensor is None:
            continue
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        # A tied weight appears twice in parameters(); count its storage once.
        key = (local.untyped_storage().data_ptr(), local.storage_offset(), local.numel())
        if key in seen:
            continue
        seen.add(key)
        total += local.numel() * local.element_size()
    return total


def measure(variant: str = "full", seed: int = 0, batch_size: int = 2, length: int = 64) -> dict[str, float]:
    """One AdamW step of the policy (sharded when a process group is up); resident MiB per column.

    ``variant="lora"``: the policy carries LoRA adapters and there is no reference model (its forward is the
    policy's with the adapters off).
    """
    torch.manual_seed(seed)
    policy = LlamaForCausalLM(_config())
    parameter_count = sum(p.numel() for p in policy.parameters())
    reference = None
    if variant == "lora":
        policy = add_adapters(policy, LoRA())
    else:
        reference = LlamaForCausalLM(_config()).requires_grad_(False).eval()
        reference.load_state_dict(policy.state_dict())
    if dist.is_initialized():
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("data_parallel",))
        shard_model(policy, mesh["data_parallel"])
        if reference is not None:
            shard_model(reference, mesh["data_parallel"])
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4)

    tokens = torch.randint(policy.config.vocab_size, (batch_size, length))
    with torch.no_grad():
        if reference is not None:
            reference(input_ids=tokens)
        else:
            with policy.disable_adapter():
                policy(input_ids=tokens)
    policy(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()

    states = [value for state in optimizer.state.values() for value in state.values() if isinstance(value, Tensor)]
    mib = 2.0**20
    sizes = {
        "policy weights": _local_bytes(policy.parameters()) / mib,
        "gradients": _local_bytes(p.grad for p in policy.parameters()) / mib,
        "optimizer state": _local_bytes(states) / mib,
        "reference weights": 0.0 if reference is None else _local_bytes(reference.parameters()) / mib,
    }
    sizes["total"] = sum(sizes.values())
    sizes["parameters"] = parameter_count
    sizes["trainable"] = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    return sizes


def _worker(out: Path) -> None:
    dist.init_process_group("gloo")
    results = {}
    for variant in VARIANTS:
        everyone: list[dict[str, float] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, measure(variant))
        results[variant] = everyone
    if dist.get_rank() == 0:
        out.write_text(json.dumps(results))
    dist.destroy_process_group()


def _launch(world_size: int) -> dict[str, list[dict[str, float]]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ranks.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}"]
        command += [__file__, "--worker-out", str(out)]
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2, help="ranks of the sharded run")
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_out is not None:
        _worker(args.worker_out)
        return

    singles = {variant: measure(variant) for variant in VARIANTS}
    ranks = _launch(args.world_size)
    full = singles["full"]
    print(f"Llama, {full['parameters'] / 1e6:.1f}M parameters; fp32; AdamW; resident MiB per process after one step")
    print(f"LoRA: {singles['lora']['trainable'] / 1e6:.2f}M trainable adapter parameters; reference = adapters off")
    header = f"{'':<28}" + "".join(f"{c:>19}" for c in (*COLUMNS, "total"))
    print(header)
    for variant in VARIANTS:
        print(f"{variant + ', 1 process':<28}" + "".join(f"{singles[variant][c]:>19.2f}" for c in (*COLUMNS, "total")))
        for rank, sizes in enumerate(ranks[variant]):
            label = f"{variant}, FSDP2 rank {rank}/{args.world_size}"
            print(f"{label:<28}" + "".join(f"{sizes[c]:>19.2f}" for c in (*COLUMNS, "total")))
    for variant in VARIANTS:
        worst = max(sizes["total"] for sizes in ranks[variant])
        print(
            f"{variant}: largest rank / {variant} on 1 process: {worst / singles[variant]['total']:.3f} "
            f"(ideal {1 / args.world_size:.3f}); / full on 1 process: {worst / full['total']:.3f}"
        )


if __name__ == "__main__":
    main()
