"""Evaluation while training: TOFU and MUSE metrics, per-sample forgetting curves and forgetting synchrony.

The callbacks read the policy and write logs and files; they change no training state. Each rank scores its
share of every split's rows (sharded models generate with ``synced_gpus``), the per-row values are gathered,
and every rank aggregates the same numbers, so results equal a single-process evaluation.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from tqdm.auto import tqdm

from baldro_lightning.data.tofu import check_perturbed_alignment, load_split
from baldro_lightning.evaluation import metrics
from baldro_lightning.evaluation.engine import BenchmarkEvaluator, RowScores, reporting_progress, shard_rows
from baldro_lightning.evaluation.muse import MuseEvaluator, MuseSettings
from baldro_lightning.evaluation.per_sample_figure import quantile_bands, run_figure
from baldro_lightning.evaluation.run_record import (
    CURVES,
    SampleCurves,
    default_eval_dir,
    per_sample_path,
    reference_truth_ratios,
    remove_steps_after,
    step_eval_path,
    write_eval_json,
    write_per_sample,
)
from baldro_lightning.evaluation.tofu import TofuEvaluator, TofuSettings
from baldro_lightning.train import distributed as dist_ops
from baldro_lightning.train.checkpointing import log_directory, purge_tensorboard_from
from baldro_lightning.user_errors import UserInputError

log = logging.getLogger(__name__)


def _gather_scores(local: dict[str, RowScores]) -> dict[str, RowScores]:
    """Every rank's per-row values joined, on every rank (:meth:`RowScores.concat`, sorted by row index).

    Gathered as Python objects with ``all_gather_object``, not as torchmetrics states: the per-row values include
    generated strings (and, for MUSE, ragged token-id arrays), and a torchmetrics state is a tensor or a list of
    tensors, synced with tensor all-gathers only.
    """
    if not dist_ops.is_distributed():
        return local
    parts: list[dict[str, RowScores]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(parts, local)
    return {role: RowScores.concat([p[role] for p in parts if p[role].indices]) for role in local}


class EvaluationProgress:
    """A progress bar for one evaluation, one bar per phase the engine reports (scoring, then generating).

    Called as the engine's ``progress(phase, done, total)`` (:func:`~baldro_lightning.evaluation.engine.
    reporting_progress`); a new bar starts when the phase changes or its count starts again.
    """

    def __init__(self, title: str) -> None:
        """Start with no bar; the first report opens one.

        Args:
            title: What the bars are labelled with, e.g. ``"evaluation at step 13"``.
        """
        self.title = title
        self._bar: Any = None
        self._key: tuple[str, int] | None = None

    def __call__(self, phase: str, done: int, total: int) -> None:
        if (phase, total) != self._key or done < self._bar.n:
            self.close()
            self._key = (phase, total)
            self._bar = tqdm(total=total, desc=f"{self.title}: {phase}", unit=" answers", leave=False)
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class ScheduledEvaluation(Callback, ABC):
    """Evaluates the policy with a benchmark evaluator at the start of training, every N steps and/or every epoch.

    Each evaluation logs ``val/<metric>`` (also into ``trainer.callback_metrics``, so ``ModelCheckpoint`` can
    monitor it) and writes ``<dirpath>/step_<N>/eval.json``. Subclasses build the evaluator from the data module
    (:meth:`build_evaluator`) and may add to each result (:meth:`extend_result`).

    What the record depends on is part of every checkpoint (:meth:`state_dict`), so a run resumed from one
    continues the record exactly (:meth:`_continue_record`): it makes no "first" evaluation of its own, and makes
    again, identically, the evaluations the interrupted run made after the checkpoint.
    """

    needs_fsdp2 = True
    """Sharded generation needs an FSDP2 device mesh (see ``train.sharding.fsdp1_callback_problems``)."""

    headline: tuple[tuple[str, str], ...] = ()
    """(label, metric key) pairs printed after each evaluation when the trainer shows a progress bar."""

    def __init__(self, every_n_steps: int | None, every_epoch: bool, on_start: bool, dirpath: str | None) -> None:
        """Check and store the schedule every evaluation callback has.

        Args:
            every_n_steps: Also evaluate after every N optimizer steps (null: only at epoch ends).
            every_epoch: Evaluate at the end of every epoch.
            on_start: Evaluate before the first update.
            dirpath: Where ``step_<N>/eval.json`` goes; ``<log_dir>/eval`` when null.
        """
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"{type(self).__name__} every_n_steps must be >= 1 or null, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.every_epoch = every_epoch
        self.on_start = on_start
        self.dirpath = dirpath
        self.evaluator: BenchmarkEvaluator | None = None
        self._last_step: int | None = None
        # What the last evaluation logged ({"step", "values"}): a resumed run logs it again (see on_train_start).
        self._logged: dict[str, Any] | None = None

    @abstractmethod
    def build_evaluator(self, data: L.LightningDataModule) -> BenchmarkEvaluator:
        """The evaluator for the trainer's data module (called once, after its ``setup``)."""

    def extend_result(
        self, trainer: L.Trainer, pl_module: L.LightningModule, scores: dict[str, RowScores], result: dict[str, Any]
    ) -> dict[str, float]:
        """Add to an evaluation's result before it is written; returns further values to log as ``val/<key>``."""
        return {}

    # -- set-up -------------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.evaluator is None:
            trainer.datamodule.setup(stage)
            self.prepare(trainer.datamodule)

    def prepare(self, data: L.LightningDataModule) -> None:
        """Build the evaluator from the set-up data module: its splits are read and the retain reference is
        checked. The command line's pre-flight checks call this before a run writes anything; ``setup`` otherwise.
        """
        if self.evaluator is None:
            self.evaluator = self.build_evaluator(data)

    def _out_dir(self, trainer: L.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        # Not trainer.log_dir: a collective, and only rank 0 writes.
        return default_eval_dir(log_directory(trainer))

    # -- schedule -----------------------------------------------------------------------------------------------
    def _evaluates_at_start(self) -> bool:
        return self.on_start

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step > 0:
            # Resumed: the evaluation before the first update was made by the run that wrote the checkpoint.
            self._continue_record(trainer)
        elif self._evaluates_at_start():
            self._evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._evaluate(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_epoch:
            self._evaluate(trainer, pl_module)

    # -- the record in the checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step, "logged": self._logged}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict["last_step"]
        self._logged = state_dict["logged"]

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # _continue_record logs the resume step's values again; TensorBoard must first drop the interrupted run's.
        # (LatestCheckpoint purges too; a second purge at the same step changes nothing.)
        if trainer.is_global_zero:
            purge_tensorboard_from(trainer, int(checkpoint.get("global_step", 0)))

    def _continue_record(self, trainer: L.Trainer) -> None:
        """Make a run resumed at ``trainer.global_step`` continue the record as the checkpoint left it.

        Evaluations the interrupted run wrote after its checkpoint are removed (the resumed run makes them again);
        the last evaluation's values are published again (``callback_metrics``, for a monitoring
        ``ModelCheckpoint``), and logged again when it was at the resume step, since the resume drops the
        TensorBoard events from that step on (``checkpointing.purge_tensorboard_from``).
        """
        step = trainer.global_step
        if trainer.is_global_zero:
            for removed in remove_steps_after(self._out_dir(trainer), step):
                log.warning("resumed at global step %d: removed %s of the interrupted run", step, removed)
        if self._logged is None:
            return
        values = self._logged["values"]
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})
        if self._logged["step"] == step and trainer.logger is not None:
            trainer.logger.log_metrics(values, step=step)

    # -- evaluation ---------------------------------------------------------------------------------------------
    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if self._last_step == step:
            return
        self._last_step = step
        evaluator = self.evaluator
        world, rank = trainer.world_size, trainer.global_rank
        local = {role: shard_rows(r, rank, world) for role, r in evaluator.rows.items()}
        synced = dist_ops.is_distributed() and getattr(pl_module, "device_mesh", None) is not None
        # The trainer's progress bar is on (rank zero only): so is the evaluation's, and a line with its result.
        shown = trainer.is_global_zero and trainer.progress_bar_callback is not None
        progress = EvaluationProgress(f"evaluation at step {step}") if shown else None
        started = time.perf_counter()
        try:
            with reporting_progress(progress):
                scores = _gather_scores(evaluator.score(pl_module.policy, local, synced_gpus=synced))
        finally:
            if progress is not None:
                progress.close()
        aggregated = evaluator.aggregate(scores)  # before meta, which records the notes of this aggregation
        result = {"meta": evaluator.meta(pl_module.policy, getattr(pl_module, "model_path", None))}
        result["meta"]["global_step"] = step
        result["metrics"] = aggregated
        extra = self.extend_result(trainer, pl_module, scores, result)
        self._log(trainer, result, extra, step)
        if trainer.is_global_zero:
            write_eval_json(result, step_eval_path(self._out_dir(trainer), step))
        if shown:
            tqdm.write(headline_text(step, time.perf_counter() - started, result["metrics"], self.headline))

    def _log(self, trainer: L.Trainer, result: dict[str, Any], extra: dict[str, float], step: int) -> None:
        values = {f"val/{k}": float(v["agg_value"]) for k, v in result["metrics"].items() if _is_number(v)}
        values.update({f"val/{k}": v for k, v in extra.items()})
        finite = {k: v for k, v in values.items() if np.isfinite(v)}
        # callback_metrics is what ModelCheckpoint(monitor=...) reads; this works from any hook.
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in finite.items()})
        self._logged = {"step": step, "values": finite}
        if trainer.logger is not None:
            trainer.logger.log_metrics(finite, step=step)


class TofuEvaluation(ScheduledEvaluation):
    """TOFU evaluation of the policy at the start of training, every N steps and/or every epoch.

    Logs ``val/<metric>`` (so ``ModelCheckpoint(monitor="val/forget_quality", mode="max")`` can keep the best
    checkpoint), writes ``<dirpath>/step_<N>/eval.json``, per-sample forgetting curves to TensorBoard and
    ``<dirpath>/per_sample.csv``, and the synchrony of forgetting.

    A forget sample's *forget step* is counted from its own start: the first evaluation at which it has moved from
    where it was before the first update to where the retain model is (``criterion``). ``truth_ratio``: its truth
    ratio (wrong/correct) has risen to at least the ``retain_quantiles[0]`` quantile of the retain model's
    per-sample forget truth ratios (read from ``retain_reference``; the median by default); it is *over-forgotten*
    when it is above the ``retain_quantiles[1]`` quantile. ``rouge``: its greedy answer's ROUGE-L recall has dropped
    to ``rouge_threshold`` or below (no over-forgetting is defined). A sample already there at the first evaluation
    never showed that it was remembered: it gets no forget step, is left out of the median, IQR and std, and is
    counted in ``val/fraction_forgotten_at_start`` (on real TOFU models most samples are past the retain model's 5th
    percentile before any update, so a step of 0 for them would swamp the spread).
    """

    headline = (("forget ROUGE", "forget_Q_A_ROUGE"), ("MU", "model_utility"), ("FQ", "forget_quality"))

    def __init__(
        self,
        settings: TofuSettings | None = None,
        every_n_steps: int | None = None,
        every_epoch: bool = True,
        on_start: bool = True,
        criterion: Literal["truth_ratio", "rouge"] = "truth_ratio",
        retain_quantiles: tuple[float, float] = (0.5, 0.95),
        rouge_threshold: float = 0.3,
        dirpath: str | None = None,
        curves: bool = True,
        per_sample_scalars: bool = False,
    ) -> None:
        """Evaluate the policy on TOFU on a schedule; record per-sample forgetting curves and synchrony.

        Args:
            settings: How each evaluation runs (metric groups, retain reference, batch sizes, generation length, row
                limits); the defaults of :class:`~baldro_lightning.evaluation.tofu.TofuSettings` when null. The data
                (benchmark, forget split, prompt template, max_length) is the trainer's data module's.
            every_n_steps: Also evaluate after every N optimizer steps (null: only at epoch ends).
            every_epoch: Evaluate at the end of every epoch.
            on_start: Evaluate before the first update (the curves evaluate then anyway: it is their reference).
            criterion: When a forget sample counts as forgotten: ``truth_ratio`` or ``rouge`` (see the class).
            retain_quantiles: The retain model's truth-ratio quantiles at which a sample counts as forgotten (its
                median by default) and over-forgotten.
            rouge_threshold: ROUGE-L recall at or below which a sample counts as forgotten (``criterion="rouge"``).
            dirpath: Where ``step_<N>/eval.json`` and ``per_sample.csv`` go; ``<log_dir>/eval`` when null.
            curves: Record per-sample forgetting curves and synchrony: ``per_sample.csv``, and in TensorBoard the
                quantiles over samples as ``val_per_sample/<curve>/{q10,q25,median,q75,q90}``, histograms, a
                custom-scalars layout and a figure (median and bands, a heat map of every sample, DRO weights).
            per_sample_scalars: Also log one TensorBoard scalar per forget sample and curve
                (``val_per_sample/<curve>/<row>``; 400 charts for forget10), drawn together in the custom-scalars
                layout.
        """
        super().__init__(every_n_steps, every_epoch, on_start, dirpath)
        self.settings = settings or TofuSettings()
        if criterion == "truth_ratio" and self.settings.retain_reference is None and curves:
            raise ValueError(
                "TofuEvaluation criterion='truth_ratio' needs retain_reference (init_args.settings.retain_reference): "
                "the retain model's eval.json on the same forget split (python -m baldro_lightning evaluate --model "
                "<retain model> --out <path>), or use criterion='rouge'"
            )
        self.criterion = criterion
        lo, hi = retain_quantiles
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(
                f"TofuEvaluation retain_quantiles must be (forgotten, over-forgotten) with 0 <= lo < hi <= 1, got "
                f"{retain_quantiles}; the default is [0.5, 0.95]"
            )
        self.retain_quantiles = retain_quantiles
        self.rouge_threshold = rouge_threshold
        self.curves = curves
        self.per_sample_scalars = per_sample_scalars
        self.history: list[dict[str, Any]] = []
        self._reference_nll: np.ndarray | None = None
        self._retain_tr: np.ndarray | None = None

    def build_evaluator(self, data: L.LightningDataModule) -> TofuEvaluator:
        evaluator = TofuEvaluator(
            benchmark=data.benchmark,
            tokenizer=data.tokenizer,
            forget_split=data.forget_split,
            template=data.template,
            max_length=data.max_length,
            settings=self.settings,
            attention_from=data.attention_from,
        )
        if "forget" in evaluator.rows:
            # Per-sample weights (training: forget split rows) and curves (evaluation: perturbed rows) join by row.
            check_perturbed_alignment(
                data.benchmark,
                data.forget_split,
                load_split(data.benchmark, data.forget_split),
                evaluator.rows["forget"],
            )
        if self.criterion == "truth_ratio" and self.curves:
            forget_rows = evaluator.rows["forget"]
            self._retain_tr = reference_truth_ratios(
                self.settings.retain_reference,
                data.forget_split,
                len(forget_rows),
                [r["index"] for r in forget_rows],
                [r["question"] for r in forget_rows],
                str(data.benchmark),
            )
        return evaluator

    def _evaluates_at_start(self) -> bool:
        # The curves' log perplexity ratio needs the policy before any update as its reference.
        return self.on_start or self.curves

    # -- the record in the checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The base's, plus everything the curves and synchrony depend on: the reference NLLs, the retain model's
        truth ratios and every evaluation's per-sample values (what ``per_sample.csv`` holds), as float64 tensors
        (exact, and loadable with ``torch.load(weights_only=True)``)."""
        history = [
            {"step": h["step"], "index": list(h["index"]), **{c: _tensor(h[c]) for c in CURVES}} for h in self.history
        ]
        return {
            **super().state_dict(),
            "history": history,
            "reference_nll": _tensor(self._reference_nll),
            "retain_truth_ratios": _tensor(self._retain_tr),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.history = [
            {"step": h["step"], "index": list(h["index"]), **{c: _array(h[c]) for c in CURVES}}
            for h in state_dict["history"]
        ]
        self._reference_nll = _array(state_dict["reference_nll"])
        saved = _array(state_dict["retain_truth_ratios"])
        if saved is not None and self._retain_tr is not None and not np.array_equal(saved, self._retain_tr, True):
            log.warning(
                "the retain reference %s changed since the checkpoint was saved; the resumed run keeps judging "
                "forgetting by the truth ratios it started with, so its synchrony stays comparable",
                self.settings.retain_reference,
            )
        self._retain_tr = saved if saved is not None else self._retain_tr

    def _continue_record(self, trainer: L.Trainer) -> None:
        if self.curves and self._reference_nll is None:
            raise UserInputError(
                f"resuming at global step {trainer.global_step} from a checkpoint without the TofuEvaluation record "
                "(saved before the callback kept one, or without the callback): the forgetting curves need the "
                "evaluation before the first update as their reference. Start the run again without --ckpt_path, or "
                "resume with the callback's init_args.curves=false."
            )
        super()._continue_record(trainer)
        if not (self.curves and self.history and trainer.is_global_zero):
            return
        # per_sample.csv as of the checkpoint; the interrupted run may have written rows of later evaluations.
        synchrony = self._synchrony()
        write_per_sample(per_sample_path(self._out_dir(trainer)), self.history, synchrony["forget_step_by_index"])
        if self.history[-1]["step"] == trainer.global_step:
            self._tensorboard_curves(trainer, self.history[-1], synchrony)

    def extend_result(
        self, trainer: L.Trainer, pl_module: L.LightningModule, scores: dict[str, RowScores], result: dict[str, Any]
    ) -> dict[str, float]:
        if not (self.curves and "forget" in scores):
            return {}
        step = result["meta"]["global_step"]
        result["synchrony"] = synchrony = self._record_curves(trainer, pl_module, scores["forget"], step)
        return {key: value for key, value in synchrony.items() if isinstance(value, float)}

    def _record_curves(self, trainer, pl_module, forget: RowScores, step: int) -> dict[str, Any]:
        cols = forget.columns
        nll = np.asarray(cols["answer_nll"], dtype=float)
        if self._reference_nll is None:
            # The first evaluation runs before any update, so the policy is the reference there.
            self._reference_nll = nll
        truth = metrics.truth_ratio(np.asarray(cols["para_nll"], float), np.asarray(cols["pert_nll"], float))
        rouge = np.array([np.nan if v is None else v for v in cols["rougeL_recall"]], dtype=float)
        weights = getattr(pl_module, "forget_weights", None)
        weight = np.full(len(forget.indices), np.nan)
        if weights is not None:
            weight = weights.numpy()[np.asarray(forget.indices)]
        entry = {
            "step": step,
            "index": list(forget.indices),
            "log_ppl_ratio": nll - self._reference_nll,
            "truth_ratio": truth,
            "rougeL_recall": rouge,
            "dro_weight": weight,
        }
        self.history.append(entry)
        synchrony = self._synchrony()
        if trainer.is_global_zero:
            write_per_sample(per_sample_path(self._out_dir(trainer)), self.history, synchrony["forget_step_by_index"])
            self._tensorboard_curves(trainer, entry, synchrony)
        return synchrony

    def _synchrony(self) -> dict[str, Any]:
        steps = np.array([h["step"] for h in self.history], dtype=float)
        if self.criterion == "truth_ratio":
            tr = np.stack([h["truth_ratio"] for h in self.history])
            level = metrics.retain_level(self._retain_tr, self.retain_quantiles[0])
            found = metrics.forget_steps_from_start(tr, steps, level, "up")
            over = metrics.past_level(tr[-1], metrics.retain_level(self._retain_tr, self.retain_quantiles[1]), "up")
            summary = metrics.synchrony_summary_from_start(found.step, found.forgotten_at_start, over)
        else:
            rouge = np.stack([h["rougeL_recall"] for h in self.history])
            found = metrics.forget_steps_from_start(rouge, steps, self.rouge_threshold, "down")
            summary = metrics.synchrony_summary_from_start(found.step, found.forgotten_at_start)
        step_of = found.step
        summary["criterion"] = self.criterion
        summary["forget_step_by_index"] = {
            str(i): (None if np.isnan(s) else float(s)) for i, s in zip(self.history[-1]["index"], step_of, strict=True)
        }
        return summary

    # -- per-sample outputs -------------------------------------------------------------------------------------
    def _tensorboard_curves(self, trainer: L.Trainer, entry: dict[str, Any], synchrony: dict[str, Any]) -> None:
        experiment = getattr(trainer.logger, "experiment", None)
        if not hasattr(experiment, "add_scalar"):
            return
        step = entry["step"]
        if len(self.history) == 1:
            experiment.add_custom_scalars(per_sample_layout(self.per_sample_scalars))
        for curve in CURVES:
            values = np.asarray(entry[curve], dtype=float)
            finite = np.isfinite(values)
            if not finite.any():
                continue
            bands = quantile_bands(values[None, :])[:, 0]
            for name, value in zip(QUANTILE_TAGS, bands, strict=True):
                experiment.add_scalar(f"{PER_SAMPLE_TAG}/{curve}/{name}", value, step)
            experiment.add_histogram(f"{PER_SAMPLE_TAG}/{curve}", values[finite], step)
            if self.per_sample_scalars:
                for index, value in zip(entry["index"], values, strict=True):
                    if np.isfinite(value):
                        experiment.add_scalar(f"{PER_SAMPLE_TAG}/{curve}/{index:04d}", value, step)
        curves = SampleCurves.from_history(self.history, synchrony["forget_step_by_index"])
        band = None
        if self._retain_tr is not None:
            band = tuple(float(q) for q in np.nanquantile(self._retain_tr, self.retain_quantiles))
        samples = len(curves.indices)
        title = f"Per-sample forgetting at step {step}: {samples} forget samples, {self.criterion} criterion"
        experiment.add_figure(f"{PER_SAMPLE_TAG}/figure", run_figure(curves, title, band), step)


PER_SAMPLE_TAG = "val_per_sample"
"""TensorBoard prefix of the per-sample curves: it sorts after ``train/`` and ``val/``, so they come first."""

QUANTILE_TAGS = ("q10", "q25", "median", "q75", "q90")
"""Scalar names of the quantiles over forget samples logged at each evaluation (``per_sample_figure.QUANTILES``)."""


def per_sample_layout(samples: bool) -> dict[str, dict[str, list[Any]]]:
    """TensorBoard's custom-scalars layout of the per-sample curves.

    One chart per curve with its median and the 10-90% band (a "Margin" chart: value, lower, upper); with
    ``samples``, also one chart per curve with a line per forget sample (``per_sample_scalars``).
    """
    margins = {
        f"{curve}: median, 10-90% of samples": [
            "Margin",
            [f"{PER_SAMPLE_TAG}/{curve}/median", f"{PER_SAMPLE_TAG}/{curve}/q10", f"{PER_SAMPLE_TAG}/{curve}/q90"],
        ]
        for curve in CURVES
    }
    layout = {"per-sample forgetting: median and 10-90% band": margins}
    if samples:
        lines = {curve: ["Multiline", [rf"{PER_SAMPLE_TAG}/{curve}/\d+"]] for curve in CURVES}
        layout["per-sample forgetting: one line per sample"] = lines
    return layout


def headline_text(step: int, seconds: float, metrics_: dict[str, Any], headline: tuple[tuple[str, str], ...]) -> str:
    """One line with an evaluation's main numbers, e.g. ``evaluation at step 13 (4 s): forget ROUGE 0.812 | MU 0.7``."""
    values = [f"{label} {metrics_[key]['agg_value']:.3g}" for label, key in headline if _is_number(metrics_.get(key))]
    return f"evaluation at step {step} ({seconds:.0f} s): " + " | ".join(values)


def _tensor(values: np.ndarray | None) -> torch.Tensor | None:
    return None if values is None else torch.from_numpy(np.asarray(values, dtype=np.float64).copy())


def _array(values: torch.Tensor | None) -> np.ndarray | None:
    return None if values is None else values.numpy().astype(np.float64)


def _is_number(entry: Any) -> bool:
    value = entry.get("agg_value") if isinstance(entry, dict) else None
    return isinstance(value, int | float) and not isinstance(value, bool)


class MuseEvaluation(ScheduledEvaluation):
    """MUSE evaluation of the policy (KnowMem, VerbMem, PrivLeak; methods §3.7) at the start of training, every N
    steps and/or every epoch, on the corpus and data of the trainer's
    :class:`~baldro_lightning.data.muse.MuseDataModule`.

    Logs ``val/forget_knowmem_ROUGE``, ``val/retain_knowmem_ROUGE``, ``val/forget_verbmem_ROUGE``, ``val/privleak``
    and the other entries of :class:`baldro_lightning.evaluation.muse.MuseEvaluator`, and writes
    ``<dirpath>/step_<N>/eval.json``.
    """

    headline = (
        ("VerbMem forget", "forget_verbmem_ROUGE"),
        ("KnowMem forget", "forget_knowmem_ROUGE"),
        ("KnowMem retain", "retain_knowmem_ROUGE"),
        ("PrivLeak", "privleak"),
    )

    def __init__(
        self,
        settings: MuseSettings | None = None,
        every_n_steps: int | None = None,
        every_epoch: bool = True,
        on_start: bool = True,
        max_length: int | None = None,
        dirpath: str | None = None,
    ) -> None:
        """Evaluate the policy on MUSE on a schedule.

        Args:
            settings: How each evaluation runs (metric groups, retain reference, batch sizes, generation lengths,
                stemming, row limit); the defaults of :class:`~baldro_lightning.evaluation.muse.MuseSettings` when
                null. The data (benchmark, corpus, prompt template) is the trainer's data module's.
            every_n_steps: Also evaluate after every N optimizer steps (null: only at epoch ends).
            every_epoch: Evaluate at the end of every epoch.
            on_start: Evaluate before the first update.
            max_length: Most target tokens of a teacher-forced text; the data module's chunk length when null.
            dirpath: Where ``step_<N>/eval.json`` go; ``<log_dir>/eval`` when null.
        """
        super().__init__(every_n_steps, every_epoch, on_start, dirpath)
        self.settings = settings or MuseSettings()
        self.max_length = max_length

    def build_evaluator(self, data: L.LightningDataModule) -> MuseEvaluator:
        if not hasattr(data, "corpus"):
            raise UserInputError(
                f"MuseEvaluation needs a MUSE data module (baldro_lightning.data.muse.MuseDataModule), got "
                f"{type(data).__name__}; use baldro_lightning.evaluation.callbacks.TofuEvaluation for TOFU data"
            )
        return MuseEvaluator(
            benchmark=data.benchmark,
            tokenizer=data.tokenizer,
            corpus=data.corpus,
            template=data.template,
            max_length=self.max_length or data.max_length,
            settings=self.settings,
            attention_from=data.attention_from,
        )
