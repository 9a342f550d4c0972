"""Lightning training around any `ByteLM`, and the `polybyte fit|validate` LightningCLI.

Every checkpoint `X.ckpt` written by `ExportCheckpoint` also gets a sibling folder `X/` holding
`model.safetensors` + `config.json` (model and modality settings), which is what `polybyte eval`
and `polybyte sample` load — no Lightning state, no pickles. Both are written atomically, the
export first (see checkpoints.py).

One run folder: ``trainer.default_root_dir`` holds the loggers' ``tb/`` and ``csv/`` and the
checkpoints in ``checkpoints/``; a fit refuses a folder holding another run's checkpoints.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities.exceptions import SIGTERMException

from polybyte.modalities import TAG_NAMES
from polybyte.models import ByteLM, build_model, config_to_dict
from polybyte.models.base import nll_loss

from .bpb import BPBMeter
from .checkpoints import TMP, check_ckpt_file, commit, prepare, refuse_other_run, sibling
from .compiling import CompileScope, compile_for_training, compile_scope
from .data import ByteDataModule
from .export import load_exported, save_exported
from .runtime import device_peak_flops
from .sources import SKIP_REASONS, skip_summary


def no_decay(name: str, param: torch.nn.Parameter, module_types: dict[str, type]) -> bool:
    """Norm weights, biases, embeddings, hash tables and pad/start parameters get no weight decay."""
    owner = module_types.get(name.rsplit(".", 1)[0], type(None))
    return param.ndim < 2 or issubclass(owner, (torch.nn.Embedding, torch.nn.RMSNorm, torch.nn.LayerNorm))


def check_model_dict(model: Any) -> None:
    """Refuse a ``model.model`` that names no known backbone or holds a key no backbone has, with
    one line naming the key: a dict given on the command line replaces the config's whole
    ``model.model``, so a partial override loses the backbone."""
    import dataclasses
    import difflib

    from polybyte.models import backbone_names, config_class

    if not isinstance(model, dict):
        raise ValueError(f"model.model must be a mapping such as {{backbone: megabyte, ...}}, got {model!r}")
    known = backbone_names()
    name = model.get("backbone")
    if name is not None and name not in known:
        raise ValueError(f"model.model.backbone {name!r} is unknown; known: {known}")
    fields = {f.name for n in ([name] if name else known) for f in dataclasses.fields(config_class(n))}
    stray = sorted(k for k in model if k != "backbone" and k not in fields)
    if stray:
        hints = [f"{k!r}" + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, fields, 1)) else "")
                 for k in stray]  # fmt: skip
        owner = f"backbone {name!r}" if name else "any backbone"
        raise ValueError(f"model.model: unknown key {', '.join(hints)}: not a field of {owner}"
                         + ("" if name else "; a dict given on the command line replaces the config's whole "
                            "model.model, so give its backbone too, or set one field with "
                            "--model.model.KEY VALUE"))  # fmt: skip
    if name is None:
        raise ValueError(
            f"model.model names no backbone (keys given: {sorted(model)}): a dict given on the command line "
            f"replaces the config's whole model.model, so add \"backbone\" (one of {known}), or set one field "
            f"with --model.model.KEY VALUE"
        )


class ByteLMModule(L.LightningModule):
    """Trains a byte model; logs loss, per-modality BPB, bytes/s, patches, MFU, lr.

    Args:
        model: backbone config as a dict, ``{"backbone": "megabyte", ...fields}`` (see configs/).
        lr: peak learning rate of AdamW.
        betas: AdamW betas (0.9, 0.95 as in MEGABYTE/BLT/nanoGPT).
        weight_decay: decoupled weight decay on matrices only (not norms, embeddings, hash tables).
        warmup_steps: linear warm-up from 0 to ``lr``.
        max_steps: length of the cosine decay; -1 takes the trainer's ``max_steps``.
        min_lr_ratio: cosine floor as a fraction of ``lr``.
        compile: ``torch.compile`` the model (not this module) at fit start: ``true`` or
            ``"blocks"`` compiles each repeated layer (fast warm-up), ``"model"`` the whole
            forward as one graph (see pipelines/compiling.py).
        entropy_model: BLT only: a folder (or .safetensors file) exported by an entropy-model run,
            loaded into the BLT's frozen entropy model.
        max_nonfinite_steps: a step whose loss or gradients are NaN/Inf is skipped (no update) and
            counted in ``train/nonfinite_steps``; this many in a row stop the run with an error.
    """

    def __init__(
        self,
        model: dict[str, Any],
        lr: float = 3e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.1,
        warmup_steps: int = 100,
        max_steps: int = -1,
        min_lr_ratio: float = 0.1,
        compile: bool | CompileScope = False,
        entropy_model: str | None = None,
        max_nonfinite_steps: int = 5,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        compile_scope(compile)  # a bad value fails here, not at the first step
        check_model_dict(model)
        self.model: ByteLM = build_model(dict(model))
        if entropy_model:
            self._load_entropy_model(entropy_model)
        self.bpb_meter = BPBMeter()  # validation: bits and bytes per modality over the val set
        self.train_meter = BPBMeter()  # training: since the last logging step
        # throughput since the last logging step (see _log_throughput)
        self._t_last: float | None = None
        self._bytes, self._patches, self._patch_bytes = 0, 0, 0
        self._loss_sum, self._loss_steps = 0, 0  # train/loss: device sum over the interval
        self._fused = False  # fused AdamW (see configure_optimizers)
        self._peak_flops: float | None = None
        self._compiled = None
        self._last_loss: torch.Tensor | None = None  # this step's loss, checked before the update
        self._grad_norm: torch.Tensor | None = None  # this step's gradient norm, reused by clipping
        # skipped (non-finite) steps: device counts since start or resume (in all, in a row), the
        # count restored from a checkpoint, and the total as last read back
        self._bad_total, self._bad_run = 0, 0
        self._nonfinite_base = self.nonfinite_steps = 0

    # --- helpers ------------------------------------------------------------------------------
    def _load_entropy_model(self, path: str) -> None:
        target = getattr(self.model, "entropy_model", None)
        if target is None:
            raise ValueError(f"entropy_model={path!r} given but backbone {self.model.backbone!r} has none")
        loaded, info = load_exported(path)
        # max_seq_len only sizes caches and FLOP counts; any other difference changes the weights
        want = {k: v for k, v in config_to_dict(target.config).items() if k != "max_seq_len"}
        have = {k: v for k, v in info["model"].items() if k != "max_seq_len"}
        if want != have:
            differ = ", ".join(f"{k}: config {want.get(k)!r} vs file {have.get(k)!r}"
                               for k in sorted(want.keys() | have.keys()) if want.get(k) != have.get(k))  # fmt: skip
            raise ValueError(f"entropy model at {path} does not match model.model.entropy_model ({differ})")
        missing, unexpected = target.load_state_dict(loaded.state_dict(), strict=False)
        if missing or unexpected:
            raise ValueError(f"entropy model at {path} does not fit: missing {missing}, unexpected {unexpected}")
        target.requires_grad_(False).eval()

    @property
    def net(self):
        return self._compiled if self._compiled is not None else self.model

    def setup(self, stage: str) -> None:
        """Refuse a data window the backbone cannot take before any step, naming the config keys."""
        seq_len = getattr(getattr(self.trainer, "datamodule", None), "seq_len", None)
        patch = getattr(self.model.config, "patch_size", None)  # fixed patches (MEGABYTE)
        if isinstance(seq_len, int) and isinstance(patch, int) and seq_len % patch:
            fit = -(-seq_len // patch) * patch
            raise ValueError(
                f"data.seq_len {seq_len} is not a multiple of model.model.patch_size {patch}; "
                f"set data.seq_len and model.model.max_seq_len to {fit} (or another multiple of {patch})"
            )

    def configure_model(self) -> None:
        if self.hparams.compile and self._compiled is None:
            # kept out of the module tree: a registered copy would store every weight twice
            self.__dict__["_compiled"] = compile_for_training(self.model, self.hparams.compile)

    def forward(self, ids: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        return self.net(ids, modality)

    def _step(self, batch):
        ids, modality = batch[0], batch[1]
        loss, nll = nll_loss(self.net(ids, modality), ids, self.model.config.pad_id)
        return ids, modality, loss, nll

    # --- training -----------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        ids, modality, loss, nll = self._step(batch)
        B, T = ids.shape
        # Nothing here reads a device value back except on logging steps: a host sync per step
        # would leave the GPU idle while the host queues the backward pass. train/loss is the
        # mean over the steps since the last logging step, read once (progress-bar values that
        # stay device tensors would be read back at every step).
        self._last_loss = loss.detach()
        self._loss_sum, self._loss_steps = self._loss_sum + loss.detach(), self._loss_steps + 1
        if self._is_log_step():
            self.log("train/loss", float(self._loss_sum) / self._loss_steps, prog_bar=True)
            self._loss_sum, self._loss_steps = 0, 0
        self._log_train_bpb(nll.detach(), ids, modality)
        self._log_throughput(B * T)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        self._log_skips("train", "data/skipped")
        return loss

    def _log_train_bpb(self, nll: torch.Tensor, ids: torch.Tensor, modality: torch.Tensor) -> None:
        """``train/bpb_<modality>`` pooled over the batches since the last logging step, for the
        modalities they held. Written to the loggers directly: through ``self.log`` a modality
        missing from a batch would be logged again with its last value (Lightning re-logs every
        key it has seen this epoch at each step)."""
        # no tag check (a host sync): training batches come from ByteDataModule, tag ids only
        self.train_meter.update(nll, ids, modality, check=False)
        if not self._is_log_step():
            return
        values = {f"train/bpb_{name}": bpb for name, bpb in self.train_meter.compute().items()}
        self.train_meter = BPBMeter()
        for logger in self.loggers:
            logger.log_metrics(values, step=self.global_step)

    def _is_log_step(self) -> bool:
        return (self.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0 or self.trainer.should_stop

    def _log_throughput(self, grid_bytes: int) -> None:
        """bytes/s, MFU and (BLT) patches/s and mean patch length over the steps since the last
        logging step: counts accumulate on the device, read back (one sync) only when logged."""
        aux = self.model.aux
        self._bytes += grid_bytes
        if "num_patches" in aux:
            self._patches = self._patches + aux["num_patches"].detach()
            self._patch_bytes = self._patch_bytes + aux["num_bytes"].detach()
        if not self._is_log_step():
            return
        now = time.perf_counter()
        if self._t_last is not None:
            dt = now - self._t_last
            world = self.trainer.world_size
            bytes_per_s = self._bytes * world / dt
            self.log("perf/bytes_per_s", bytes_per_s, prog_bar=True)
            mean_patch = None
            if "num_patches" in aux:
                patches = float(self._patches)
                mean_patch = float(self._patch_bytes) / max(patches, 1.0)
                self.log("perf/patches_per_s", patches * world / dt)
                self.log("perf/mean_patch_len", mean_patch)
            if self._peak_flops:
                mfu = self.model.flops_per_byte(mean_patch_len=mean_patch) * bytes_per_s / (self._peak_flops * world)
                self.log("perf/mfu", mfu, prog_bar=True)
        self._t_last, self._bytes, self._patches, self._patch_bytes = now, 0, 0, 0

    def on_train_start(self) -> None:
        self._peak_flops = device_peak_flops(self.device)

    def _log_skips(self, split: str, key: str) -> dict[str, int] | None:
        """Log ``key`` (samples the ``split`` stream lost so far) and ``key_<reason>`` per reason
        of `SKIP_REASONS` (``over_limit`` included); None when the data module counts none."""
        dm = getattr(self.trainer, "datamodule", None)
        if not hasattr(dm, "skips"):
            return None
        counts = dm.skips(split)
        self.log(key, float(sum(counts.values())))
        for reason, n in counts.items():
            self.log(f"{key}_{reason}", float(n))
        return counts

    def _val_skips(self) -> dict[str, int] | None:
        """Samples this validation pass lost, by reason, summed over ranks (the counters are
        cumulative: the pass's share is the change since the last pass ended)."""
        dm = getattr(self.trainer, "datamodule", None)
        if not hasattr(dm, "skips"):
            return None
        now = dm.skips("val")
        before = getattr(self, "_val_skips_before", None) or dict.fromkeys(now, 0)
        self._val_skips_before = now
        delta = torch.tensor([now[r] - before.get(r, 0) for r in SKIP_REASONS], dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            torch.distributed.all_reduce(delta)
        return {r: int(v) for r, v in zip(SKIP_REASONS, delta.tolist())}

    def _check_val_modalities(self, totals: dict, skips: dict[str, int] | None) -> None:
        """A modality that has val shards but scored no sample in a full validation pass is an error
        in ``validate`` and a warning in ``fit`` (a limited pass may simply not reach it)."""
        dm = getattr(self.trainer, "datamodule", None)
        limit = self.trainer.limit_val_batches
        if self.trainer.sanity_checking or not (type(limit) is float and limit == 1.0):
            return
        expected = {s.modality: s for s in getattr(dm, "sources", []) if s.val}
        scored = {TAG_NAMES[tag] for tag, (_, count) in totals.items() if count > 0}
        empty = [m for m in expected if m not in scored]
        if not empty:
            return
        lost = skips or {}
        shards = "; ".join(f"{m}: {len(expected[m].val)} val shards, e.g. {expected[m].val[0]}" for m in empty)
        message = (f"validation scored no {' or '.join(empty)} sample although the data has val shards ({shards}); "
                   f"{sum(lost.values())} val samples were skipped ({skip_summary(lost)}), "
                   f"reasons in the warnings above")  # fmt: skip
        if self.trainer.state.fn == "validate":
            raise ValueError(message)
        if self.trainer.is_global_zero:
            print(f"polybyte fit: warning: {message}", file=sys.stderr)

    # --- validation ---------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self.bpb_meter = BPBMeter()
        self._t_last = None  # time spent validating is not training throughput

    def validation_step(self, batch, batch_idx):
        ids, modality, loss, nll = self._step(batch)
        self.bpb_meter.update(nll, ids, modality)
        self.log("val/loss", loss, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        totals = self.bpb_meter.totals(device=self.device)  # tag -> [bits, count]
        if self.trainer.world_size > 1:
            for v in totals.values():
                torch.distributed.all_reduce(v)
        for tag, (bits, count) in totals.items():
            if count > 0:
                self.log(f"val/bpb_{TAG_NAMES[tag]}", bits / count, sync_dist=False, rank_zero_only=False)
        skips = self._val_skips()
        if skips is not None:
            values = {"val/skipped": float(sum(skips.values()))}
            values.update({f"val/skipped_{r}": float(n) for r, n in skips.items()})
            for key, value in values.items():
                self.log(key, value, sync_dist=False, rank_zero_only=False)
        try:
            self._check_val_modalities(totals, skips)
        except ValueError:
            # straight to the loggers: the run ends before Lightning writes this pass's metrics
            logged = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")}
            for logger in self.loggers:
                logger.log_metrics(logged, step=self.global_step)
                logger.save()
            raise

    # --- optimisation -------------------------------------------------------------------------
    def on_before_optimizer_step(self, optimizer) -> None:
        """Skip the update of a step whose loss or gradients are not finite, count it, and stop
        after ``max_nonfinite_steps`` in a row — without a host sync per step: the decision stays
        on the device (fused AdamW's ``found_inf`` flag leaves weights, moments and step count
        alone, as it does for a grad scaler), and the counts are read back on logging steps only,
        so a run of bad steps is noticed at the next logging step (their updates are skipped
        meanwhile). The gradient norm computed here is the one clipping uses. Under DDP the
        gradients are already averaged, so every rank reaches the same decision. Under fp16's
        grad scaler only the loss counts: the scaler skips steps with overflowing gradients."""
        plugin = self.trainer.precision_plugin
        scaled = isinstance(plugin, MixedPrecision) and plugin.scaler is not None
        bad = ~torch.isfinite(self._last_loss)
        self._grad_norm = None
        if not scaled:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            self._grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True)
            bad |= ~torch.isfinite(self._grad_norm)
            optimizer.found_inf = bad.float()  # fused AdamW skips the whole update when it is 1
        self._bad_total = self._bad_total + bad.long()
        self._bad_run = (self._bad_run + 1) * bad.long()  # bad steps in a row, 0 after a good one
        if self._is_log_step():
            self._check_nonfinite()

    def _check_nonfinite(self) -> None:
        """Read the device counts back (one sync), log them, stop when the run is too long."""
        run = int(self.trainer.strategy.reduce(self._bad_run.float(), reduce_op="max"))
        self.nonfinite_steps = self._nonfinite_base + int(self._bad_total)
        for logger in self.loggers:
            logger.log_metrics({"train/nonfinite_steps": float(self.nonfinite_steps)}, step=self.global_step)
        limit = self.hparams.max_nonfinite_steps
        if run >= limit:
            raise NonFiniteLossError(
                f"loss or gradients were NaN/Inf for {limit} steps in a row (max_nonfinite_steps; {run} by step "
                f"{self.global_step}, {self.nonfinite_steps} skipped in all); the weights were not updated by them "
                f"and the last checkpoint holds the last good weights. Lower model.lr or raise "
                f"trainer.gradient_clip_val"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite_steps = self._nonfinite_base + int(self._bad_total)
        checkpoint["nonfinite_steps"] = self.nonfinite_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite_steps = self._nonfinite_base = checkpoint.get("nonfinite_steps", 0)
        self._bad_total, self._bad_run = 0, 0

    def configure_optimizers(self):
        hp = self.hparams
        module_types = {n: type(m) for n, m in self.model.named_modules()}
        decay, keep = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (keep if no_decay(name, p, module_types) else decay).append(p)
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": keep, "weight_decay": 0.0}]
        # Fused AdamW (one kernel for the whole update, CUDA and CPU) unless fp16 needs a grad
        # scaler; its found_inf flag skips non-finite steps on the device (on_before_optimizer_step).
        # Lightning refuses to clip a fused optimizer's gradients, so configure_gradient_clipping
        # clips them itself (bf16 and fp32 gradients are never scaled).
        self._fused = str(getattr(self.trainer, "precision", "")) not in ("16-mixed", "16")
        kernel = {"fused": True} if self._fused else {"foreach": True}
        opt = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), **kernel)
        total = hp.max_steps if hp.max_steps > 0 else max(int(self.trainer.max_steps), 1)
        warm = max(int(hp.warmup_steps), 0)

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if not self._fused or not gradient_clip_val:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        elif self._grad_norm is not None:  # the norm on_before_optimizer_step computed
            torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, self._grad_norm, foreach=True)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val, foreach=True)


class NonFiniteLossError(ValueError):
    """Training diverged: NaN/Inf losses or gradients for ``max_nonfinite_steps`` steps in a row."""


class NonFiniteWeightsError(ValueError):
    """A checkpoint was about to be written with NaN/Inf weights."""


# Signals that stop a fit with a resumable `last` checkpoint (exit status 128 + signum).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class ExportCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also exports ``X/model.safetensors`` + ``X/config.json`` per ``X.ckpt``.

    It refuses to write non-finite weights, and on SIGTERM, SIGINT or SIGUSR1 it saves ``last``
    (``.ckpt`` + export) at the step reached: the signals go through Lightning's SIGTERM handling,
    which ends the run after the current batch with ``SIGTERMException``. Without ``dirpath`` it
    writes to ``trainer.default_root_dir/checkpoints`` (Lightning's own default is under the
    first logger's version folder). Each save writes the export, then the ``.ckpt``, each under a
    temporary name renamed into place. ``received_signal`` is the stop signal that came during
    the current fit (None if none did): `main` exits with 128 + it.
    """

    received_signal: int | None = None

    def _default_dirpath(self, trainer: L.Trainer) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.realpath(os.path.join(trainer.default_root_dir, "checkpoints"))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._default_dirpath(trainer)
        super().setup(trainer, pl_module, stage)

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        self._default_dirpath(trainer)
        return super()._find_last_checkpoints(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Route SIGINT and SIGUSR1 to the SIGTERM handler Lightning installed for this run,
        noting which signal came. SIGUSR1 is left alone when something (Lightning's SLURM requeue)
        already handles it; Lightning restores every handler when the run ends."""
        super().on_train_start(trainer, pl_module)
        self.received_signal = None
        lightning_sigterm = signal.getsignal(signal.SIGTERM)

        def stop(signum, frame) -> None:
            self.received_signal = self.received_signal or signum
            if callable(lightning_sigterm):
                lightning_sigterm(signum, frame)

        for signum in STOP_SIGNALS:
            if signum != signal.SIGUSR1 or signal.getsignal(signum) in (signal.SIG_DFL, None):
                signal.signal(signum, stop)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """On a stop signal, save ``last`` at the step reached (unless it was just saved)."""
        stopped = isinstance(exception, SIGTERMException)
        if stopped and self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_exception(trainer, pl_module, exception)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        final = Path(filepath)
        if trainer.is_global_zero:
            prepare(final)  # a killed save's left-overs go before any rank writes
        # Every rank takes part: under FSDP this gathers the full, unsharded weights.
        full = trainer.strategy.lightning_module_state_dict()
        finite = all(bool(torch.isfinite(v).all()) for v in full.values() if v.is_floating_point())
        if not trainer.strategy.reduce_boolean_decision(finite, all=True):
            raise NonFiniteWeightsError(
                f"refusing to write {filepath} at step {trainer.global_step}: the weights hold NaN/Inf; "
                f"earlier checkpoints are kept"
            )
        if trainer.is_global_zero:  # the export first: a kill before the .ckpt lands leaves the pair's steps unequal
            module: ByteLMModule = trainer.lightning_module
            state = {k.removeprefix("model."): v for k, v in full.items() if k.startswith("model.")}
            dm = getattr(trainer, "datamodule", None)
            modalities = dm.modality_settings() if dm is not None and hasattr(dm, "modality_settings") else {}
            extra = {"step": trainer.global_step, "seq_len": getattr(dm, "seq_len", None)}
            save_exported(final.with_suffix(""), module.model, modalities, extra, state=state)
        tmp = sibling(final, TMP)  # the same name on every rank (sharded checkpoints: all ranks write)
        super()._save_checkpoint(trainer, str(tmp))  # writes on the ranks the strategy picks, then a barrier
        if trainer.is_global_zero:
            commit(tmp, final)
        self._last_checkpoint_saved = filepath

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Save ``last`` at the final step too when training stops between periodic checkpoints
        (``max_time``, a step count that is no multiple of ``every_n_train_steps``): Lightning only
        does when nothing was saved at all."""
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        """Drop the export folder with its ``.ckpt`` (``save_top_k`` rotation), never a stale copy."""
        super()._remove_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            shutil.rmtree(Path(filepath).with_suffix(""), ignore_errors=True)


class PolybyteCLI(LightningCLI):
    """LightningCLI with one run folder and checked checkpoints.

    - ``trainer.default_root_dir`` is the run folder: unless the config lists its own loggers,
      TensorBoard writes to ``ROOT/tb`` and CSV to ``ROOT/csv`` (flushed every logging step), and
      an ``ExportCheckpoint`` without ``dirpath`` to ``ROOT/checkpoints``.
    - ``fit`` refuses a checkpoint folder that holds another run's checkpoints unless it resumes
      from it (``--ckpt_path last`` or a path in it); ``validate`` needs a checkpoint that exists.
      A ``--ckpt_path`` that is missing or truncated is one error naming the file.
    - ``validate`` scores every val sample, as ``polybyte eval`` does: a config's
      ``limit_val_batches`` only shortens the checks during ``fit``, unless
      ``--trainer.limit_val_batches`` is given on the command line.
    """

    def __init__(self, *args, limit_validate: str | None = None, trainers: list | None = None, **kwargs) -> None:
        self.limit_validate = limit_validate  # set before super().__init__ runs the subcommand
        # the trainer is appended here as soon as it exists, so a caller reaches it (and its
        # callbacks' state) even when the subcommand ends in an exception
        self.trainers = [] if trainers is None else trainers
        super().__init__(*args, **kwargs)

    def _parse_ckpt_path(self) -> None:
        """LightningCLI reads a ``--ckpt_path`` file's hyperparameters right after parsing:
        check the file first, so a truncated one is one error naming it."""
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path and Path(path).is_file():
            check_ckpt_file(path)
        super()._parse_ckpt_path()

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        config = self._get(self.config_init, "trainer", default={})
        root = config.get("default_root_dir") or os.getcwd()  # what the Trainer defaults to
        if config.get("logger") in (None, True) and "logger" not in kwargs:
            every = config.get("log_every_n_steps") or 50
            kwargs["logger"] = [TensorBoardLogger(root, name="tb"),
                                CSVLogger(root, name="csv", flush_logs_every_n_steps=every)]  # fmt: skip
        trainer = super().instantiate_trainer(**kwargs)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ExportCheckpoint):
                callback._default_dirpath(trainer)
        self.trainers.append(trainer)
        return trainer

    def before_fit(self) -> None:
        self._check_ckpt_path(fit=True)

    def before_validate(self) -> None:
        if self.limit_validate is None:
            self.trainer.limit_val_batches = 1.0
        elif self.limit_validate.isdigit():
            # Trainer types it float | int, so the parser makes "1" the fraction 1.0 (every
            # batch); a whole number typed on the command line is a batch count, as in Lightning
            self.trainer.limit_val_batches = int(self.limit_validate)
        self._check_ckpt_path(fit=False)

    def _check_ckpt_path(self, fit: bool) -> None:
        """Look ``last`` up here (the newest ``last*.ckpt`` of the checkpoint callbacks, as
        Lightning would) and check the file before Lightning loads it."""
        config = self.config_init[self.subcommand]
        asked = config.get("ckpt_path")
        folders = [Path(cb.dirpath) for cb in self.trainer.checkpoint_callbacks
                   if isinstance(cb, ModelCheckpoint) and cb.dirpath]  # fmt: skip
        where = ", ".join(str(f) for f in folders) or "no checkpoint folder (no checkpoint callback)"
        path, why = asked, ""
        if asked == "last":
            found = {p for cb in self.trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)
                     for p in cb._find_last_checkpoints(self.trainer)}  # fmt: skip
            path = max(found, key=os.path.getmtime) if found else None
            why = " and no last.ckpt for --ckpt_path last" if path is None else ""
            if path is None and not fit:
                raise ValueError(f"--ckpt_path last: no last.ckpt in {where}; nothing to validate "
                                 f"(pass a .ckpt file, or the run's --trainer.default_root_dir)")  # fmt: skip
        elif asked is None and not fit:
            raise ValueError(f"no checkpoint to validate: pass --ckpt_path last (the newest last.ckpt in {where}) "
                             f"or --ckpt_path FILE.ckpt; an untrained model is not validated")  # fmt: skip
        elif asked is not None:
            text = str(asked)
            if text in ("best", "hpc") or "://" in text or text.startswith("registry:"):
                return  # Lightning's own look-ups
            why = f" (--ckpt_path {asked} is not one of them)"
        if path is not None:
            check_ckpt_file(path)
            config["ckpt_path"] = str(path)
        if fit:
            for folder in folders:
                refuse_other_run(folder, path, why)


def cli_value(args: list[str], key: str) -> str | None:
    """The value given for ``key`` on the command line (``--key V`` or ``--key=V``), else None."""
    for i, arg in enumerate(args):
        if arg == key and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(key + "="):
            return arg[len(key) + 1 :]
    return None


# NVLink multicast (NVLS) stays off in NCCL, PyTorch and NVSHMEM: on shared multi-GPU hosts it can
# take the GPUs out of service. Set before any process group exists; a user's own setting wins.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def main(argv: list[str] | None = None) -> int:
    """``argv`` starts with the subcommand (fit / validate); None reads ``sys.argv``.

    A bad setting (ValueError, e.g. a seq_len the backbone or the data cannot use), a missing
    file or a diverged fit (`NonFiniteLossError`) is reported as one line ``polybyte CMD: error:
    ...`` with exit status 2. A fit stopped by SIGTERM, SIGINT or SIGUSR1 saves ``last`` and exits
    with 128 + the signal's number (143, 130, 138).
    """
    for key, value in MULTICAST_OFF.items():
        os.environ.setdefault(key, value)
    torch.set_float32_matmul_precision("high")
    args = sys.argv[1:] if argv is None else list(argv)
    command = args[:1] or ["fit"]
    if argv is not None:
        sys.argv = sys.argv[:1]  # LightningCLI warns when args= and sys.argv both carry arguments
    trainers: list[L.Trainer] = []
    try:
        PolybyteCLI(
            ByteLMModule,
            ByteDataModule,
            args=argv,
            limit_validate=cli_value(args, "--trainer.limit_val_batches"),
            trainers=trainers,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"precision": "bf16-mixed" if torch.cuda.is_available() else "32-true"},
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"polybyte {command[0]}: error: {e}", file=sys.stderr)
        return 2
    except SIGTERMException:
        signum = next((cb.received_signal for t in trainers for cb in t.callbacks
                       if isinstance(cb, ExportCheckpoint) and cb.received_signal), signal.SIGTERM)  # fmt: skip
        print(f"polybyte {command[0]}: stopped by {signal.Signals(signum).name}; `last` checkpoint saved, "
              f"resume with --ckpt_path last", file=sys.stderr)  # fmt: skip
        return 128 + signum
    return 0
