"""LightningModules: supervised fine-tuning (to make target/retain models) and unlearning.

:class:`UnlearningModule` computes ``gamma * forget_objective(forget_loss) + alpha * retain_objective(retain_loss)``
(paper Eq. 1; ``alpha`` is the paper's lambda) with a trainable policy and a frozen reference.
"""

from __future__ import annotations

import logging
import math
from typing import Literal, get_args

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor, nn
from torch.distributed.fsdp import FullyShardedDataParallel
from transformers import PreTrainedModel

from baldro_lightning.data.accumulation import hf_warmup_updates
from baldro_lightning.train import distributed as dist_ops
from baldro_lightning.train.batches import Batch, batch_size, concat_rows, pad_rows_to, select_rows
from baldro_lightning.train.checkpointing import surviving_checkpoints
from baldro_lightning.train.logprobs import SequenceLogProbs, sequence_logprobs
from baldro_lightning.train.lora import LoRA, add_adapters
from baldro_lightning.train.losses import NLL, PerSampleLoss
from baldro_lightning.train.models import TorchDtype, enable_activation_checkpointing, eval_mode, load_causal_lm
from baldro_lightning.train.objectives import Mean, Objective
from baldro_lightning.train.sharding import (
    data_parallel_mesh,
    fsdp1_callback_problems,
    mixed_precision_policy,
    shard_model,
)
from baldro_lightning.user_errors import UserInputError

log = logging.getLogger(__name__)

SelectionPasses = Literal["two", "one", "released"]
SelectionScore = Literal["loss", "mean_nll"]
# The defaults of the options that only a forget objective which selects rows uses.
_SELECTION_DEFAULTS = {"selection_passes": "two", "selection_score": "loss", "subsample_retain": False}


def _storage_ptr(param: Tensor) -> int:
    # A sharded (DTensor) parameter reports data_ptr() == 0; its local shard holds the real storage.
    local = param.to_local() if hasattr(param, "to_local") else param
    return local.data_ptr()


class NonFiniteLossError(FloatingPointError):
    """A training step produced a NaN or infinite loss."""


def _undecayed(model: nn.Module) -> set[Tensor]:
    """Biases and norm gains (vectors, or named ``norm``): not decayed, as in the HF Trainer."""
    return {param for name, param in model.named_parameters() if param.dim() < 2 or "norm" in name.lower()}


def _decay_groups(model: nn.Module, weight_decay: float, undecayed: set[Tensor]) -> list[dict]:
    """Weight decay on the trainable parameters outside ``undecayed`` (from :func:`_undecayed`)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param in undecayed else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class CausalLMModule(L.LightningModule):
    """Shared plumbing: loads the policy in ``configure_model``, one-pass statistics, optimizer and schedule."""

    def __init__(
        self,
        model: str,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        weight_decay: float = 0.01,
        lr_schedule: Literal["linear", "constant"] = "linear",
        warmup_epochs: float = 1.0,
        torch_dtype: TorchDtype = "float32",
        gradient_checkpointing: bool = False,
        lora: LoRA | None = None,
    ) -> None:
        """Options shared by every module; subclasses take them as keyword arguments (the YAML keys under
        ``model.init_args`` are these names).

        Args:
            model: Hugging Face model directory or Hub id: the policy, and the reference where one is needed.
            optimizer: Optimizer class and its arguments (``class_path``/``init_args``), e.g. AdamW with ``lr``.
            weight_decay: Decay of weight matrices; biases and norm gains are never decayed.
            lr_schedule: ``linear``: warm-up, then linear decay to 0 at the last step (HF's); or ``constant``.
            warmup_epochs: Length of the linear warm-up in epochs (fractions allowed).
            torch_dtype: dtype the weights are loaded in (``bfloat16`` with ``--trainer.precision=bf16-true``).
            gradient_checkpointing: Recompute each decoder layer's activations in backward.
            lora: Train LoRA adapters only (see :class:`~.lora.LoRA`); ``None`` trains all weights.
        """
        super().__init__()
        if warmup_epochs < 0:
            raise ValueError(f"--model.warmup_epochs must be >= 0, got {warmup_epochs}")
        self.model_path = model
        self.optimizer_factory = optimizer
        self.weight_decay = weight_decay
        self.lr_schedule = lr_schedule
        self.warmup_epochs = warmup_epochs
        self.torch_dtype = torch_dtype
        self.gradient_checkpointing = gradient_checkpointing
        self.lora = lora
        self.policy: PreTrainedModel | None = None
        self._no_decay: set[Tensor] | None = None

    def configure_model(self) -> None:
        # Weights load here, not in __init__, so that parsing a config is instant and sharding strategies
        # can wrap the model inside their own context.
        if self.policy is not None:
            return
        if self._trainer is not None:
            if isinstance(self.trainer.strategy, FSDPStrategy):
                if problems := self._fsdp1_problems():
                    raise ValueError("--trainer.strategy=FSDPStrategy (FSDP1):\n  - " + "\n  - ".join(problems))
                # FSDP1 moves the parameters to the GPU without Module.to, so Lightning never updates self.device
                # (litgpt#383); the tensors the training step creates on self.device must land there too.
                self._device = self.trainer.strategy.root_device
        self.policy = load_causal_lm(self.model_path, self.torch_dtype)
        # from_pretrained returns eval mode and Lightning 2.x keeps each submodule's mode as found.
        self.policy.train()
        if self.gradient_checkpointing:
            enable_activation_checkpointing(self.policy)
        if self.lora is not None:
            # Before sharding, so that each FSDP2 unit holds its layer's adapters next to the frozen weights.
            self.policy = add_adapters(self.policy, self.lora)
        if self.device_mesh is not None:
            # ModelParallelStrategy set a mesh: shard with FSDP2 here, before the optimizer sees the parameters.
            mp_policy = mixed_precision_policy(self.trainer.precision)
            shard_model(self.policy, data_parallel_mesh(self.device_mesh), mp_policy=mp_policy)
        # Decided now, on the parameters' real shapes: FSDPStrategy wraps the model after this hook and turns each
        # parameter into a flat 1-D view of its shard (keeping the Parameter objects), so shapes read later lie.
        self._no_decay = _undecayed(self.policy)

    def _fsdp1_problems(self) -> list[str]:
        """What this configuration needs that Lightning's ``FSDPStrategy`` cannot give; checked before training."""
        return fsdp1_callback_problems(self.trainer.callbacks)

    @property
    def pad_token_id(self) -> int:
        config = self.policy.config
        pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
        if isinstance(pad, list):
            pad = pad[0]
        return int(pad) if pad is not None else 0

    def forward_stats(
        self, model: nn.Module, batches: list[Batch], keep_vocab: list[bool] | None = None
    ) -> list[SequenceLogProbs]:
        """One forward pass of ``model`` over all ``batches`` at once, split back into per-batch statistics."""
        keep_vocab = keep_vocab or [False] * len(batches)
        joined = batches[0] if len(batches) == 1 else concat_rows(batches, self.pad_token_id)
        logits = model(input_ids=joined["input_ids"], attention_mask=joined["attention_mask"], use_cache=False).logits
        # Scored once over the joined rows and split afterwards, so the backward pass never scatters a slice of the
        # (B, T, V) logits; a part that needs the whole distribution (KL) slices its own.
        joined_stats = None if all(keep_vocab) else sequence_logprobs(logits, joined["labels"])
        out, start = [], 0
        for part, vocab in zip(batches, keep_vocab, strict=True):
            rows = batch_size(part)
            length = part["labels"].shape[1]
            # Right padding: trimming the shared padding columns changes no labelled position.
            if vocab:
                out.append(sequence_logprobs(logits[start : start + rows, :length], part["labels"], keep_vocab=True))
            else:
                out.append(joined_stats.rows(start, rows, length - 1))
            start += rows
        return out

    def configure_optimizers(self):
        undecayed = self._no_decay if self._no_decay is not None else _undecayed(self.policy)
        optimizer = self.optimizer_factory(_decay_groups(self.policy, self.weight_decay, undecayed))
        if self.lr_schedule == "constant":
            return optimizer
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = self._warmup_updates(total)

        def linear(step: int) -> float:
            # HF's linear schedule: the first update uses multiplier 0 whenever there is a warm-up (methods §1.6).
            if step < warmup:
                return step / max(1, warmup)
            return max(0.0, (total - step) / max(1, total - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _warmup_updates(self, total: int) -> int:
        """Warm-up length in updates: the reference's formula under ``update_accounting: hf`` (methods §1.6), else
        ``warmup_epochs`` times Lightning's updates per epoch."""
        datamodule = self.trainer.datamodule
        # Data modules of this package carry update_accounting; any other (or plain dataloaders) counts Lightning's way.
        if getattr(datamodule, "update_accounting", "lightning") == "hf":
            trainer = self.trainer
            return hf_warmup_updates(
                self.warmup_epochs,
                datamodule.forget_size,
                datamodule.batch_size,
                trainer.accumulate_grad_batches,
                trainer.world_size,
            )
        return math.floor(self.warmup_epochs * total / max(self.trainer.max_epochs or 1, 1))

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        root = self.trainer.strategy.model
        by_norm = gradient_clip_algorithm in (None, "norm")
        if gradient_clip_val and by_norm and isinstance(root, FullyShardedDataParallel):
            # FSDP1 shards the gradients, so only its root wrapper can compute their global norm; Lightning's
            # FSDPPrecision refuses to clip by norm and points to this method.
            root.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _check_finite(self, loss: Tensor, what: str, indices: Tensor | None = None) -> None:
        if torch.isfinite(loss).all():
            return
        ids = "" if indices is None else f"; forget rows in this batch: {indices.tolist()}"
        raise NonFiniteLossError(
            f"{what} is {loss.item()} at global step {self.global_step}{ids}; lower the learning rate, check the "
            f"rows above, or use a stabler loss setting. {surviving_checkpoints(self._trainer)}"
        )


class FinetuneModule(CausalLMModule):
    """Plain NLL fine-tuning: how the embedded target and retain models are trained."""

    def __init__(self, model: str, loss: PerSampleLoss | None = None, **kwargs) -> None:
        """Fine-tune a causal LM with a per-sample loss (NLL by default): how target and retain models are made.

        Args:
            model: Hugging Face model directory or Hub id to fine-tune.
            loss: Per-sample training loss; NLL by default.
            **kwargs: The optimizer, schedule, dtype, checkpointing and LoRA options of :class:`CausalLMModule`
                (``--model.init_args.optimizer``, ``weight_decay``, ``lr_schedule``, ``warmup_epochs``, …).
        """
        # Explicit **kwargs into the base: LightningCLI (jsonargparse) follows them to CausalLMModule's signature,
        # so the YAML keys and their types are the base's, written once.
        super().__init__(model, **kwargs)
        self.loss = loss or NLL()
        if self.loss.requires_reference:
            raise ValueError(f"--model.loss={type(self.loss).__name__} needs a reference model; fine-tuning has none")

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        (stats,) = self.forward_stats(self.policy, [batch])
        loss = self.loss(stats).mean()
        self._check_finite(loss, "train/loss")
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size(batch))
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> Tensor:
        (stats,) = self.forward_stats(self.policy, [batch])
        loss = self.loss(stats).mean()
        self.log("val/loss", loss, sync_dist=True, batch_size=batch_size(batch))
        return loss


class UnlearningModule(CausalLMModule):
    """Unlearning with any per-sample forget loss under any DRO objective, plus a retain term.

    The reference model is frozen: eval mode, no gradients, forwards under ``no_grad``, absent from the optimizer
    and from checkpoints. ``reference="cached"`` computes its per-sample log-likelihoods of the forget set once,
    with the policy itself before the first update (it *is* the reference then), so no second model is held.
    With ``lora`` only the adapters train and the live reference is the policy with its adapters switched off,
    so no second model is held either.

    Every forget objective is called alike, ``objective(global_losses, scores=..., row_ids=...)``. One that selects
    rows (``selects_rows``, e.g. BalDRO-G) is first asked which rows to keep (``select``) on scores from a scoring
    pass, and only the kept rows' losses carry autograd; ``selection_passes`` and ``selection_score`` say how.
    """

    def __init__(
        self,
        model: str,
        forget_loss: PerSampleLoss,
        retain_loss: PerSampleLoss | None = None,
        forget_objective: Objective | None = None,
        retain_objective: Objective | None = None,
        gamma: float = 1.0,
        alpha: float = 1.0,
        reference: Literal["live", "cached"] = "live",
        selection_passes: SelectionPasses = "two",
        selection_score: SelectionScore = "loss",
        subsample_retain: bool = False,
        **kwargs,
    ) -> None:
        """The losses, objectives and weights of the unlearning step; the models load later, in ``configure_model``.

        Args:
            model: Hugging Face model directory or Hub id: the policy, and the frozen reference.
            forget_loss: Per-sample loss on forget rows (``baldro_lightning.train.losses``).
            retain_loss: Per-sample loss on retain rows; ``None`` turns the retain term off.
            forget_objective: Reduction of the forget losses over the batch (``baldro_lightning.train.objectives``);
                Mean.
            retain_objective: Reduction of the retain losses; Mean. The ``selection_*`` options concern the forget
                objective only.
            gamma: Weight of the forget term.
            alpha: Weight of the retain term (the paper's lambda).
            reference: ``live``: a frozen reference model; ``cached``: forget-set log-likelihoods computed once.
            selection_passes: For a forget objective that selects rows (BalDRO-G): ``two``, a no-grad scoring pass
                over the forget batch, then the gradient pass on the kept rows only; ``one``, a single gradient pass
                over every row with the dropped rows weighted 0 (back-propagates through all of them);
                ``released``, as ``two`` but the scoring pass builds an autograd graph, as the released code does
                (methods P-6). Any other forget objective keeps every row and takes one pass; leave this at ``two``
                then.
            selection_score: What a selecting forget objective ranks the rows by (higher = harder): ``loss``, the
                per-sample forget loss (the paper); ``mean_nll``, the lowest current mean NLL, the released code's
                hardness proxy (methods P-6).
            subsample_retain: Also cut the retain batch to a random ``forget_objective.kept_count(B)`` of its rows
                (seeded by the step), as the released BalDRO-G does; this halves the retain signal at ratio 0.5.
                Only with a selecting forget objective.
            **kwargs: The optimizer, schedule, dtype, checkpointing and LoRA options of :class:`CausalLMModule`
                (``--model.init_args.optimizer``, ``weight_decay``, ``lr_schedule``, ``warmup_epochs``, …).
        """
        super().__init__(model, **kwargs)
        self.forget_loss = forget_loss
        self.retain_loss = retain_loss
        self.forget_objective = forget_objective or Mean()
        self.retain_objective = retain_objective or Mean()
        self.gamma = gamma
        self.alpha = alpha
        self.reference_mode = reference
        self.selection_passes = selection_passes
        self.selection_score = selection_score
        self.subsample_retain = subsample_retain
        self._validate()
        self.reference: PreTrainedModel | None = None
        # The reference is rebuilt from `model` on load, so checkpoints omit it and loading must be non-strict.
        self.strict_loading = False
        self.reference_cache: Tensor | None = None
        self.forget_weights: Tensor | None = None
        self.forget_losses: Tensor | None = None
        self.save_hyperparameters(ignore=["optimizer"])

    # -- construction -------------------------------------------------------------------------------------------
    def _validate(self) -> None:
        problems = []
        if self.retain_loss is not None and self.retain_loss.requires_reference and self.reference_mode == "cached":
            problems.append(
                f"--model.reference=cached cannot serve --model.retain_loss={type(self.retain_loss).__name__}: it "
                "compares whole next-token distributions on retain rows, which a cache of forget-set sums does not "
                "hold. Use --model.reference=live."
            )
        if self.forget_loss.requires_vocab:
            problems.append(f"--model.forget_loss={type(self.forget_loss).__name__} is a retain loss (KL)")
        if self.gamma < 0 or self.alpha < 0:
            problems.append(f"--model.gamma and --model.alpha must be >= 0, got gamma={self.gamma}, alpha={self.alpha}")
        for flag, choices in (("selection_passes", SelectionPasses), ("selection_score", SelectionScore)):
            if getattr(self, flag) not in get_args(choices):
                problems.append(
                    f"--model.init_args.{flag} must be one of {get_args(choices)}, got {getattr(self, flag)!r}"
                )
        if not self.forget_objective.selects_rows:
            objective = type(self.forget_objective).__name__
            for flag, default in _SELECTION_DEFAULTS.items():
                if getattr(self, flag) != default:
                    problems.append(
                        f"--model.init_args.{flag}={getattr(self, flag)!r} applies only to a forget objective that "
                        f"selects rows (e.g. objectives.Group); {objective} keeps every row. Remove the flag."
                    )
        if self.forget_objective.granularity == "token" and not self.forget_loss.token_level:
            problems.append(
                f"--model.init_args.forget_objective.init_args.granularity=token needs a forget loss with per-token "
                f"values (SatImp, WGA, GradAscent); {type(self.forget_loss).__name__} is per sequence. Use "
                "granularity=sample."
            )
        if self.forget_objective.granularity == "token" and self.forget_objective.selects_rows:
            problems.append(
                f"--model.init_args.forget_objective={type(self.forget_objective).__name__} selects rows; it cannot "
                "reduce per-token losses. Use granularity=sample."
            )
        if self.retain_objective.granularity == "token":
            problems.append(
                "--model.init_args.retain_objective.init_args.granularity=token is not supported; the retain "
                "objective reduces per-sample losses. Use granularity=sample."
            )
        if self.retain_loss is None and self.alpha != 0:
            log.info("no --model.retain_loss given: the retain term is off (alpha=%s ignored)", self.alpha)
        if problems:
            raise ValueError("invalid unlearning configuration:\n  - " + "\n  - ".join(problems))

    @property
    def needs_reference_model(self) -> bool:
        live_forget = self.forget_loss.requires_reference and self.reference_mode == "live"
        return live_forget or (self.retain_loss is not None and self.retain_loss.requires_reference)

    def configure_model(self) -> None:
        super().configure_model()
        if self.needs_reference_model and self.reference is None and self.lora is None:
            reference = load_causal_lm(self.model_path, self.torch_dtype)
            reference.requires_grad_(False)
            reference.eval()
            self.reference = reference
            self._check_reference_is_separate()
            if self.device_mesh is not None:
                # Sharded after the check: a DTensor parameter reports data_ptr() == 0.
                mp_policy = mixed_precision_policy(self.trainer.precision)
                shard_model(self.reference, data_parallel_mesh(self.device_mesh), mp_policy=mp_policy)

    def _fsdp1_problems(self) -> list[str]:
        problems = super()._fsdp1_problems()
        if self.reference_mode == "cached" and self.forget_loss.requires_reference:
            # The cache is computed in on_fit_start, with the policy called outside FSDP1's wrapped root forward.
            problems.append(
                "--model.init_args.reference=cached runs the policy before training, outside the wrapped forward; "
                "use reference=live (the reference is sharded too) or ModelParallelStrategy"
            )
        return problems

    def _check_reference_is_separate(self) -> None:
        if self.reference is self.policy:
            raise ValueError("the reference model is the policy object itself; it would move with every update")
        policy_ptrs = {_storage_ptr(p) for p in self.policy.parameters()}
        if any(_storage_ptr(p) in policy_ptrs for p in self.reference.parameters()):
            raise ValueError("the reference model shares parameter storage with the policy; load a separate copy")

    def train(self, mode: bool = True) -> UnlearningModule:
        # Lightning toggles train/eval on the whole module; the reference must stay in eval mode regardless.
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        for key in [k for k in state if k.startswith("reference.") or ".reference." in k]:
            del state[key]
        return state

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["reference_cache"] = self.reference_cache
        checkpoint["forget_weights"] = self.forget_weights
        checkpoint["forget_losses"] = self.forget_losses

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._check_restorable_reference(checkpoint)
        self.reference_cache = checkpoint.get("reference_cache")
        self.forget_weights = checkpoint.get("forget_weights")
        self.forget_losses = checkpoint.get("forget_losses")

    def _check_restorable_reference(self, checkpoint: dict) -> None:
        """A cached reference is only faithful if computed before the first update: refuse to rebuild it later."""
        step = int(checkpoint.get("global_step", 0))
        cached = self.reference_mode == "cached" and self.forget_loss.requires_reference
        if cached and step > 0 and checkpoint.get("reference_cache") is None:
            path = getattr(self._trainer, "ckpt_path", None) or "the checkpoint"
            raise UserInputError(
                f"--model.init_args.reference=cached cannot resume from {path}: it was saved at global step {step} "
                "without cached reference log-probs (a run with reference=live), and a cache computed now would "
                "come from the updated policy, not the reference. Resume with --model.init_args.reference=live (the "
                "frozen reference is reloaded from --model.init_args.model), or start the run again without "
                "--ckpt_path."
            )

    # -- reference ----------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        datamodule = self.trainer.datamodule
        size = datamodule.forget_size
        if self.forget_weights is None:
            self.forget_weights = torch.full((size,), float("nan"))
            self.forget_losses = torch.full((size,), float("nan"))
        if self.reference_mode == "cached" and self.forget_loss.requires_reference and self.reference_cache is None:
            self.reference_cache = self._compute_reference_cache(datamodule.forget_dataloader(), size)

    @torch.no_grad()
    def _compute_reference_cache(self, loader, size: int) -> Tensor:
        """Per-sample ``log pi_ref(y|x)`` over the whole forget set, with the not-yet-updated policy."""
        was_training = self.policy.training
        self.policy.eval()
        cache = torch.full((size,), float("nan"), dtype=torch.float32, device=self.device)
        for batch in loader:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            (stats,) = self.forward_stats(self.policy, [batch])
            cache[batch["index"]] = stats.logp_sum
        self.policy.train(was_training)
        if torch.isnan(cache).any():
            raise ValueError("reference cache is incomplete: the forget dataloader did not visit every row")
        return cache

    def _reference_stats(self, batches: list[Batch], keep_vocab: list[bool]) -> list[SequenceLogProbs]:
        if not batches:
            return []
        if self.lora is not None:
            # The base model is the reference: the policy with its adapters off, in eval mode like a frozen copy.
            with torch.no_grad(), self.policy.disable_adapter(), eval_mode(self.policy):
                return self.forward_stats(self.policy, batches, keep_vocab)
        with torch.no_grad():
            return self.forward_stats(self.reference, batches, keep_vocab)

    def _cached_reference(self, forget: Batch) -> SequenceLogProbs:
        sums = self.reference_cache.to(self.device)[forget["index"]]
        return SequenceLogProbs(logp_sum=sums, count=torch.ones_like(sums, dtype=torch.long))

    # -- training -----------------------------------------------------------------------------------------------
    def _with_global_counts(self, stats: SequenceLogProbs, real_rows: Tensor | None = None) -> SequenceLogProbs:
        """``stats`` with the global batch's row and token counts (for token-pooled losses), counting only the rows
        ``real_rows`` (B,) marks: the sampler's repeats and a selection's placeholder row count for nothing."""
        if not dist_ops.is_distributed():
            return stats
        real = None if real_rows is None else real_rows.to(stats.count.dtype)
        count = stats.count if real is None else stats.count * real
        rows = torch.tensor(float(stats.count.numel() if real is None else real.sum()), device=self.device)
        return SequenceLogProbs(
            logp_sum=stats.logp_sum,
            count=stats.count,
            token_logps=stats.token_logps,
            mask=stats.mask,
            vocab_logps=stats.vocab_logps,
            global_batch_size=int(dist_ops.all_reduce_sum(rows).item()),
            global_token_count=dist_ops.all_reduce_sum(count.sum()),
        )

    @staticmethod
    def _real_rows(forget: Batch) -> Tensor:
        """(B,) bool: the rows that are not repeats the sampler added to fill the last global batch."""
        padded = forget.get("padded")
        if padded is None:
            return torch.ones(batch_size(forget), dtype=torch.bool, device=forget["input_ids"].device)
        return ~padded.bool()

    @staticmethod
    def _reduce_real(
        objective: Objective, losses: Tensor, real: Tensor, scores: Tensor | None = None, row_ids: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``objective`` over the real rows of the global batch; the sampler's repeats get weight 0 and no loss.

        The repeats stay in the graph with gradient 0, so that a rank whose rows are all repeats still reaches every
        parameter in its backward and the data-parallel collectives stay in step.
        """
        if bool(real.all()):
            return objective(losses, scores=scores, row_ids=row_ids)
        keep = real.nonzero().squeeze(1)

        def pick(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.index_select(0, keep)

        value, kept_weights = objective(losses.index_select(0, keep), scores=pick(scores), row_ids=pick(row_ids))
        weights = torch.zeros(losses.shape, dtype=kept_weights.dtype, device=kept_weights.device)
        weights = weights.index_copy(0, keep, kept_weights)
        return value + 0.0 * losses[~real].sum(), weights

    def _forget_term(self, forget: Batch, retain: Batch | None) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple | None]:
        """Forward passes and the forget objective.

        Returns ``(forget_value, global_weights, global_losses, global_index, retain_stats)``; ``global_losses``
        holds each forget row's loss before reweighting (from the scoring pass when the objective selects rows).
        """
        need_live_forget = self.forget_loss.requires_reference and self.reference_mode == "live"
        need_live_retain = retain is not None and self.retain_loss.requires_reference
        vocab_r = retain is not None and self.retain_loss.requires_vocab

        ref_parts = ([forget] if need_live_forget else []) + ([retain] if need_live_retain else [])
        ref_stats = self._reference_stats(ref_parts, [False] * need_live_forget + [vocab_r] * need_live_retain)
        ref_forget = ref_stats[0] if need_live_forget else None
        ref_retain = ref_stats[-1] if need_live_retain else None
        if self.forget_loss.requires_reference and self.reference_mode == "cached":
            ref_forget = self._cached_reference(forget)
        index = dist_ops.gather_detached(forget["index"])
        real_local = self._real_rows(forget)
        real = dist_ops.gather_detached(real_local)
        retain_part = [retain] if retain is not None else []
        vocab_part = [vocab_r] if retain is not None else []

        if self.forget_objective.selects_rows:
            local, scores, row_losses, policy_retain = self._selected_forget_losses(
                forget, retain_part, vocab_part, ref_forget, index, real_local, real
            )
        else:
            stats = self._policy_forward(forget, retain_part, vocab_part)
            policy_retain = stats[1:]
            if self.forget_objective.granularity == "token":
                value, weights, row_losses = self._token_forget_term(stats[0], ref_forget, real_local)
                retain_stats = (policy_retain[0], ref_retain) if retain is not None else None
                return value, weights, row_losses, index, retain_stats
            local = self.forget_loss(self._with_global_counts(stats[0], real_local), ref_forget)
            scores, row_losses = None, None
        everyone, _ = dist_ops.gather_with_local_grad(local)
        value, weights = self._reduce_real(self.forget_objective, everyone, real, scores=scores, row_ids=index)
        row_losses = everyone.detach() if row_losses is None else row_losses
        retain_stats = (policy_retain[0], ref_retain) if retain is not None else None
        return value, weights, row_losses, index, retain_stats

    def _policy_forward(
        self, forget: Batch, retain_part: list[Batch], vocab_part: list[bool]
    ) -> list[SequenceLogProbs]:
        """The policy's statistics of the forget rows and of the retain rows (if any), in one forward pass."""
        return self.forward_stats(self.policy, [forget, *retain_part], [False, *vocab_part])

    def _token_forget_term(
        self, policy: SequenceLogProbs, reference: SequenceLogProbs | None, real_local: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The forget objective over every labelled token of the global micro-batch (``granularity: token``).

        Returns:
            ``(value, weights, row_losses)``: the objective, each global row's weight (the sum of its tokens'; 0 for
            the sampler's repeats) and each global row's per-sample loss (detached, for the record).
        """
        tokens = self.forget_loss.token_losses(policy, reference)  # (B, T-1)
        mask = policy.mask & real_local.unsqueeze(1)
        row_local = self.forget_loss(self._with_global_counts(policy, real_local), reference)
        rows_everyone, rows_here = dist_ops.gather_with_local_grad(row_local.detach())
        everyone, _ = dist_ops.gather_with_local_grad(tokens[mask])
        token_rows = dist_ops.gather_detached(mask.nonzero()[:, 0] + rows_here.start)
        value, token_weights = self.forget_objective(everyone)
        weights = torch.zeros(rows_everyone.shape, dtype=token_weights.dtype, device=token_weights.device)
        weights = weights.index_add(0, token_rows, token_weights)
        # Every token stays in the graph (masked ones with gradient 0), so a rank whose rows are all repeats still
        # reaches every parameter.
        return value + 0.0 * tokens.sum(), weights, rows_everyone

    def _selected_forget_losses(
        self,
        forget: Batch,
        retain_part: list[Batch],
        vocab_part: list[bool],
        ref_forget: SequenceLogProbs | None,
        index: Tensor,
        real_local: Tensor,
        real: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, list[SequenceLogProbs]]:
        """Score every forget row, let the objective select over the global batch, then take the kept rows' losses.

        ``selection_passes`` decides the forward passes and ``selection_score`` what the rows are ranked by. Only real
        rows (``real``, not the sampler's repeats) are selected.

        Returns:
            ``(local, scores, row_losses, policy_retain)``: this rank's (B,) forget losses, the kept rows' from the
            gradient pass (with autograd) and the others' from the scoring pass; the global (B,) scores the rows
            were ranked by; every row's scoring-pass loss over the global batch (detached); the policy's
            statistics of the retain rows, if any.
        """
        if self.selection_passes == "one":
            # One pass over every row; dropped rows get no loss term but are still back-propagated through.
            stats = self._policy_forward(forget, retain_part, vocab_part)
            scoring = stats[0]
        else:
            # The efficient form: rank under no_grad, then run the gradient pass on the kept rows only.
            # "released" builds the ranking graph anyway, as the authors' code does (methods P-6), for timing parity.
            grad_mode = torch.enable_grad() if self.selection_passes == "released" else torch.no_grad()
            with grad_mode:
                (scoring,) = self.forward_stats(self.policy, [forget])
        row_losses = self.forget_loss(self._with_global_counts(scoring, real_local), ref_forget).detach()
        with torch.no_grad():
            scores = row_losses if self.selection_score == "loss" else -scoring.nll_mean
        everyone, local = dist_ops.gather_with_local_grad(scores)
        candidates = real.nonzero().squeeze(1)
        kept = candidates[self.forget_objective.select(everyone[candidates], row_ids=index[candidates])]
        mine = kept[(kept >= local.start) & (kept < local.stop)] - local.start
        # A rank none of whose rows was kept still runs row 0 at weight 0, so that its backward reaches every
        # parameter and the data-parallel collectives stay in step.
        placeholder = torch.ones(mine.numel(), device=self.device)
        if mine.numel() == 0:
            mine, placeholder = torch.zeros(1, dtype=torch.long, device=self.device), torch.zeros(1, device=self.device)

        ref_kept = None if ref_forget is None else ref_forget.select(mine)
        if self.selection_passes == "one":
            policy_kept, policy_retain = scoring.select(mine), stats[1:]
        else:
            stats = self._policy_forward(select_rows(forget, mine), retain_part, vocab_part)
            policy_kept, policy_retain = stats[0], stats[1:]
        # Token-pooled losses pool over the kept rows' tokens, as the released Group* trainers do.
        losses = self.forget_loss(self._with_global_counts(policy_kept, placeholder), ref_kept)
        # The placeholder row keeps its scoring-pass value but stays in the graph (with gradient 0).
        kept_losses = torch.where(placeholder.bool(), losses, row_losses.index_select(0, mine))
        local_losses = row_losses.index_put((mine,), kept_losses)
        return local_losses, everyone, dist_ops.gather_detached(row_losses), policy_retain

    def _retain_term(
        self, retain_stats: tuple[SequenceLogProbs, SequenceLogProbs | None], real_local: Tensor | None = None
    ) -> Tensor:
        """The retain objective over the global batch's retain rows; ``real_local`` (B,) marks the rows that count
        (a repeated forget row's retain partner does not); all of them when omitted."""
        policy_retain, ref_retain = retain_stats
        if real_local is None:
            real_local = torch.ones(policy_retain.count.shape, dtype=torch.bool, device=policy_retain.count.device)
        losses = self.retain_loss(self._with_global_counts(policy_retain, real_local), ref_retain)
        everyone, _ = dist_ops.gather_with_local_grad(losses)
        value, _ = self._reduce_real(self.retain_objective, everyone, dist_ops.gather_detached(real_local))
        return value

    def _subsample_retain(self, retain: Batch, forget_rows: int, real: Tensor | None = None) -> Batch:
        """A random ``k`` of the retain rows, ``k`` the forget rows the objective keeps (released BalDRO-G,
        methods P-6).

        Seeded by the step; ranks draw from their own rows alike, so the rows differ from a 1-process run's. Only
        rows paired with a real forget row (``real``, B) are drawn.
        """
        candidates = torch.arange(batch_size(retain)) if real is None else real.cpu().nonzero().squeeze(1)
        k = min(self.forget_objective.kept_count(forget_rows), candidates.numel())
        generator = torch.Generator().manual_seed(self.global_step)
        rows = candidates[torch.randperm(candidates.numel(), generator=generator)[:k]].sort().values
        return select_rows(retain, rows)

    def training_step(self, batch: dict[str, Batch], batch_idx: int) -> Tensor:
        forget = batch["forget"]
        retain = batch.get("retain") if self.retain_loss is not None and self.alpha != 0 else None
        real_local = self._real_rows(forget)
        retain_real = real_local
        if retain is not None and getattr(self.retain_loss, "positions", None) == "all" and dist_ops.is_distributed():
            # KL over all positions averages over the padded length, which must be the global batch's.
            longest = dist_ops.all_reduce_max(torch.tensor(retain["input_ids"].shape[1], device=self.device))
            retain = pad_rows_to(retain, int(longest.item()), self.pad_token_id)
        if retain is not None and self.subsample_retain:
            retain = self._subsample_retain(retain, int(real_local.sum()), real_local)
            retain_real = torch.ones(batch_size(retain), dtype=torch.bool, device=self.device)

        forget_value, weights, losses, index, retain_stats = self._forget_term(forget, retain)
        loss = self.gamma * forget_value
        retain_value = torch.zeros((), device=self.device)
        if retain_stats is not None:
            retain_value = self._retain_term(retain_stats, retain_real)
            loss = loss + self.alpha * retain_value

        self._check_finite(loss, "train/loss", index)
        self._record_per_sample(index, weights, losses, dist_ops.gather_detached(real_local))
        rows = batch_size(forget)
        self.log("train/forget_loss", forget_value.detach(), prog_bar=True, batch_size=rows)
        self.log("train/retain_loss", retain_value.detach(), batch_size=rows)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=rows)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=rows)
        self.log("train/dro_weight_max", weights.max(), batch_size=rows)
        self._log_weight_histogram(weights)
        # Data-parallel averaging divides each rank's gradient by the world size; the objective is global.
        return loss * dist_ops.data_parallel_scale()

    def _record_per_sample(self, index: Tensor, weights: Tensor, losses: Tensor, real: Tensor | None = None) -> None:
        """Remember each forget row's latest weight and loss; a repeated row (``real`` False) keeps its own."""
        if self.forget_weights is None:
            return
        keep = slice(None) if real is None else real.cpu().bool()
        index = index.cpu()[keep]
        self.forget_weights[index] = weights.detach().float().cpu()[keep]
        self.forget_losses[index] = losses.detach().float().cpu()[keep]

    def _log_weight_histogram(self, weights: Tensor) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if self.trainer.is_global_zero and hasattr(experiment, "add_histogram"):
            experiment.add_histogram("train/dro_weights", weights.detach().float().cpu(), self.global_step)
