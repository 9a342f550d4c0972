"""`ByteLMModule`: Lightning training around any `ByteLM` (DESIGN.md §2 and §5).

Loss, per-modality BPB (training and validation, through bpb.py), throughput, patch counts and
MFU are logged; a step whose loss or gradients are NaN/Inf is skipped on the device and counted,
and too many in a row stop the run (`NonFiniteLossError`). AdamW with decoupled weight decay on
matrices only, linear warm-up and cosine decay. The `polybyte fit|validate` command line and
the checkpoint callback are lit.py.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.plugins.precision import MixedPrecision

from polybyte.modalities import TAG_NAMES, TAGS
from polybyte.models import ByteLM, build_model, config_to_dict, merge_fields
from polybyte.models.base import nll_loss

from .bpb import BPBMeter
from .checkpoints import one_line
from .compiling import CompileScope, compile_for_training, compile_scope
from .export import load_exported
from .optim import lr_factor, no_decay, schedule_notice
from .reading import SKIP_REASONS, skip_summary
from .runtime import device_peak_flops
from .val_samples import ValSamples


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
    stray = sorted(k for k in model if k not in ("backbone", "preset") and k not in fields)
    if stray:
        hints = [
            f"{k!r}" + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, fields, 1)) else "")
            for k in stray
        ]
        owner = f"backbone {name!r}" if name else "any backbone"
        raise ValueError(
            f"model.model: unknown key {', '.join(hints)}: not a field of {owner}"
            + (
                ""
                if name
                else "; a dict given on the command line replaces the config's whole "
                "model.model, so give its backbone too, or set one field with "
                "--model.model.KEY VALUE"
            )
        )
    if name is None:
        raise ValueError(
            f"model.model names no backbone (keys given: {sorted(model)}): a dict given on the command line "
            f'replaces the config\'s whole model.model, so add "backbone" (one of {known}), or set one field '
            f"with --model.model.KEY VALUE"
        )


class ByteLMModule(L.LightningModule):
    """Trains a byte model; logs loss, per-modality BPB, bytes/s, patches, MFU, lr.

    Args:
        model: backbone config as a dict, ``{"backbone": "megabyte", ...fields}`` (see configs/);
            with ``init_from``, only the fields to change (None: the export's config as it is).
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
        patch_targets: BLT entropy patching only: the target mean patch length per modality
            (``{text: 4, image: 8}``). At fit start each named modality without a threshold yet
            gets its own, calibrated on its first training windows (``BLT.calibrate_thresholds``);
            they are kept in the checkpoint and the export's config, so sampling patches alike.
        val_samples: images and audio clips sampled per image or audio source at each validation
            of a fit and logged to TensorBoard (only with a TensorBoard logger; val_samples.py);
            0 turns them off.
        init_from: an export folder (or its ``X.ckpt``) to start from, e.g. one written by
            ``polybyte import blt``: its backbone config, with the fields of ``model`` set over
            it, and all its weights (the entropy model's included). Optimizer and step start
            afresh (``--ckpt_path`` resumes a run instead).
    """

    def __init__(
        self,
        model: dict[str, Any] | None = None,
        lr: float = 3e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.1,
        warmup_steps: int = 100,
        max_steps: int = -1,
        min_lr_ratio: float = 0.1,
        compile: bool | CompileScope = False,
        entropy_model: str | None = None,
        max_nonfinite_steps: int = 5,
        patch_targets: dict[str, float] | None = None,
        val_samples: int = 2,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        compile_scope(compile)  # a bad value fails here, not at the first step
        start = None
        if init_from:
            start, info = load_exported(init_from)
            model = merge_fields(info["model"], model or {})
            self.hparams["model"] = model  # the checkpoints record the whole config
            self.hparams["init_from"] = None  # ... and its weights: rebuilding one needs no export folder
        elif model is None:
            raise ValueError("model.model is required (a backbone config), unless model.init_from names an export")
        check_model_dict(model)
        self.model: ByteLM = build_model(dict(model))
        if start is not None:
            try:
                self.model.load_state_dict(start.state_dict())
            except RuntimeError as e:  # a field of model.model changed a shape
                raise ValueError(
                    f"model.init_from {init_from}: its weights do not fit model.model ({one_line(e)})"
                ) from None
        if entropy_model:
            self._load_entropy_model(entropy_model)
        self.bpb_meter = BPBMeter()  # validation: bits and bytes per modality over the val set
        self.train_meter = BPBMeter()  # training: since the last logging step
        # throughput (see _log_throughput): Lightning's Throughput over the last two logging steps,
        # fed the counts since the fit started (steps, windows, bytes) and their FLOPs
        self._throughput: Throughput | None = None
        self._t0 = 0.0
        self._seen = (0, 0, 0)  # steps, windows, bytes
        # cumulative over the run, resumes included (kept in the checkpoint): perf/train_seconds, _flops
        self._seconds_base, self._train_flops = 0.0, 0.0
        self._bytes, self._patches, self._patch_bytes = 0, 0, 0
        self._loss_sum, self._loss_steps = 0, 0  # train/loss: device sum over the interval
        self._fused = False  # fused AdamW (see configure_optimizers)
        self._compiled = None
        self._last_loss: torch.Tensor | None = None  # this step's loss, checked before the update
        self._grad_norm: torch.Tensor | None = None  # this step's gradient norm, reused by clipping
        # skipped (non-finite) steps: device counts since start or resume (in all, in a row) and
        # the count restored from a checkpoint (see nonfinite_steps)
        self._bad_total, self._bad_run = 0, 0
        self._nonfinite_base = 0
        # the LR schedule's length and warm-up: this fit's (configure_optimizers) and the
        # checkpoint's it resumes from (on_load_checkpoint), compared at the start of training
        self._schedule: dict[str, int] | None = None
        self._saved_schedule: dict[str, int | None] | None = None

    # --- helpers ------------------------------------------------------------------------------
    def _load_entropy_model(self, path: str) -> None:
        target = getattr(self.model, "entropy_model", None)
        if target is None:
            raise ValueError(f"entropy_model={path!r} given but backbone {self.model.backbone!r} has none")
        loaded, _ = load_exported(path)
        # max_seq_len only sizes caches and FLOP counts; any other difference changes the weights
        want = {k: v for k, v in config_to_dict(target.config).items() if k != "max_seq_len"}
        have = {k: v for k, v in config_to_dict(loaded.config).items() if k != "max_seq_len"}
        if want != have:
            differ = ", ".join(
                f"{k}: config {want.get(k)!r} vs file {have.get(k)!r}"
                for k in sorted(want.keys() | have.keys())
                if want.get(k) != have.get(k)
            )
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
        patch = self.model.seq_multiple  # MEGABYTE: whole patches
        if isinstance(seq_len, int) and patch > 1 and seq_len % patch:
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
        self._log_throughput(B, T)
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

    def _log_throughput(self, windows: int, seq_len: int) -> None:
        """bytes/s, MFU and (BLT) patches/s and mean patch length over the steps between the last
        two logging steps (none at the first logging step after a validation): counts accumulate
        on the device, read back (one sync) only when logged. The rates come from Lightning's
        `Throughput`; its `ThroughputMonitor` callback does not fit, as it synchronizes the GPU
        after every batch and reads the FLOPs (for BLT a device count) at every step."""
        aux = self.model.aux
        steps, seen, grid = self._seen
        self._seen = (steps + 1, seen + windows, grid + windows * seq_len)  # since the fit started
        self._bytes += windows * seq_len  # since the last logging step
        if "num_patches" in aux:
            self._patches = self._patches + aux["num_patches"].detach()
            self._patch_bytes = self._patch_bytes + aux["num_bytes"].detach()
        if not self._is_log_step() or self._throughput is None:
            return
        mean_patch = None
        if "num_patches" in aux:
            patches = float(self._patches)
            mean_patch = float(self._patch_bytes) / max(patches, 1.0)
        tp, interval = self._throughput, self._bytes
        flops_per_byte = self.model.flops_per_byte(mean_patch_len=mean_patch)
        flops = flops_per_byte * interval if tp.available_flops else None
        steps, seen, grid = self._seen
        elapsed = time.perf_counter() - self._t0
        tp.update(time=elapsed, batches=steps, samples=seen, lengths=grid, flops=flops)
        rates = tp.compute()
        # learning curves (`polybyte plot`): the fit's wall time and training FLOPs so far
        self._train_flops += flops_per_byte * interval * self.trainer.world_size
        self.log("perf/train_seconds", self._seconds_base + elapsed)
        self.log("perf/train_flops", self._train_flops)
        if "device/items_per_sec" in rates:
            bytes_per_s = rates["device/items_per_sec"] * self.trainer.world_size
            self.log("perf/bytes_per_s", bytes_per_s, prog_bar=True)
            if mean_patch is not None:
                self.log("perf/patches_per_s", bytes_per_s * patches / interval)
                self.log("perf/mean_patch_len", mean_patch)
            if "device/mfu" in rates:
                self.log("perf/mfu", rates["device/mfu"], prog_bar=True)
        self._bytes, self._patches, self._patch_bytes = 0, 0, 0

    def on_train_start(self) -> None:
        peak = device_peak_flops(self.device, compute_dtype(self.trainer.precision))
        self._throughput = Throughput(available_flops=peak, world_size=self.trainer.world_size, window_size=2)
        self._t0 = time.perf_counter()
        notice = schedule_notice(self._saved_schedule, self._schedule, self.global_step, self.hparams)
        if notice and self.trainer.is_global_zero:
            print(f"polybyte fit: note: {notice}", file=sys.stderr)

    def configure_callbacks(self) -> list[L.Callback]:
        return [ValSamples(self.hparams.val_samples)] if self.hparams.val_samples > 0 else []

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
        message = (
            f"validation scored no {' or '.join(empty)} sample although the data has val shards ({shards}); "
            f"{sum(lost.values())} val samples were skipped ({skip_summary(lost)}), "
            f"reasons in the warnings above"
        )
        if self.trainer.state.fn == "validate":
            raise ValueError(message)
        if self.trainer.is_global_zero:
            print(f"polybyte fit: warning: {message}", file=sys.stderr)

    # --- validation ---------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self.bpb_meter = BPBMeter()
        if self._throughput is not None:
            self._throughput.reset()  # time spent validating is not training throughput

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

    @property
    def nonfinite_steps(self) -> int:
        """Steps skipped as non-finite in the whole run (reads the device count back: a sync)."""
        return self._nonfinite_base + int(self._bad_total)

    def _check_nonfinite(self) -> None:
        """Read the device counts back, log them, stop when the run is too long."""
        run = int(self.trainer.strategy.reduce(self._bad_run.float(), reduce_op="max"))
        skipped = self.nonfinite_steps
        for logger in self.loggers:
            logger.log_metrics({"train/nonfinite_steps": float(skipped)}, step=self.global_step)
        limit = self.hparams.max_nonfinite_steps
        if run >= limit:
            raise NonFiniteLossError(
                f"loss or gradients were NaN/Inf for {limit} steps in a row (max_nonfinite_steps; {run} by step "
                f"{self.global_step}, {skipped} skipped in all); the weights were not updated by them "
                f"and the last checkpoint holds the last good weights. Lower model.lr or raise "
                f"trainer.gradient_clip_val"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["nonfinite_steps"] = self.nonfinite_steps
        checkpoint["train_seconds"] = self._seconds_base + (time.perf_counter() - self._t0 if self._throughput else 0.0)
        checkpoint["train_flops"] = self._train_flops
        patcher = getattr(self.model.config, "patcher", None)
        if patcher is not None and patcher.thresholds:
            checkpoint["patch_thresholds"] = dict(patcher.thresholds)
        if self._schedule is not None:
            checkpoint["lr_schedule"] = dict(self._schedule)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._nonfinite_base = checkpoint.get("nonfinite_steps", 0)
        self._bad_total, self._bad_run = 0, 0
        self._seconds_base = checkpoint.get("train_seconds", 0.0)
        self._train_flops = checkpoint.get("train_flops", 0.0)
        if "patch_thresholds" in checkpoint:  # calibrated once, at the run's first start
            self.model.config.patcher.thresholds = dict(checkpoint["patch_thresholds"])
        # older checkpoints hold no resolved schedule: their hyperparameters give the warm-up,
        # and the length when model.max_steps set it
        hp = checkpoint.get("hyper_parameters") or {}
        old = {"max_steps": hp.get("max_steps") if (hp.get("max_steps") or -1) > 0 else None}
        self._saved_schedule = checkpoint.get("lr_schedule") or {**old, "warmup_steps": hp.get("warmup_steps")}

    def on_fit_start(self) -> None:
        self._calibrate_patching()

    def _calibrate_patching(self) -> None:
        """``patch_targets``: a threshold per modality that has none yet, from its training windows."""
        targets = self.hparams.patch_targets
        if not targets:
            return
        patcher = getattr(self.model.config, "patcher", None)
        if patcher is None or not patcher.needs_entropies:
            raise ValueError("model.patch_targets needs a BLT with entropy patching (model.model.patcher.kind entropy)")
        unknown = sorted(set(targets) - set(TAGS))
        if unknown:
            raise ValueError(f"model.patch_targets names unknown modalities {unknown}; known: {sorted(TAGS)}")
        todo = {TAGS[m]: float(t) for m, t in targets.items() if TAGS[m] not in (patcher.thresholds or {})}
        if not todo:
            return
        ids, modality = self.trainer.datamodule.calibration_batch([TAG_NAMES[t] for t in todo])
        found = self.model.calibrate_thresholds(ids.to(self.device), modality.to(self.device), todo)
        if self.trainer.is_global_zero:
            parts = ", ".join(f"{TAG_NAMES[t]} {v:.3f} (mean {todo[t]:g})" for t, v in found.items())
            print(f"patching: entropy thresholds per modality, on {len(ids)} training windows: {parts}", flush=True)

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
        self._schedule = {"max_steps": total, "warmup_steps": warm}
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total, warm, hp.min_lr_ratio))
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


def compute_dtype(precision: str) -> torch.dtype:
    """The matmul dtype of a Trainer ``precision`` ("bf16-mixed", "16-mixed", "32-true", ...)."""
    p = str(precision)
    return torch.bfloat16 if p.startswith("bf16") else torch.float16 if p.startswith("16") else torch.float32


class NonFiniteLossError(ValueError):
    """Training diverged: NaN/Inf losses or gradients for ``max_nonfinite_steps`` steps in a row."""
