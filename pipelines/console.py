"""What `polybyte fit` and `validate` print: a step-based progress bar, a model summary with the
model's own FLOP count, and none of Lightning's tips or known deprecation warnings.

- `quiet_lightning` drops, at their source, three messages a Lightning 2.6.6 fit prints: the
  "💡 Tip" lines advertising litlogger and litmodels (`rank_zero_info` in
  ``_LoggerConnector.configure_logger`` whenever no `LitLogger` is among the loggers, and in
  ``_CallbackConnector._maybe_show_litmodels_tip`` when Lightning adds its default
  `ModelCheckpoint`), and torch 2.11's FutureWarning "`isinstance(treespec, LeafSpec)` is
  deprecated", raised because ``lightning.pytorch.utilities._pytree._tree_flatten`` still builds
  a ``LeafSpec()`` (in each `CombinedLoader`: every train and val loop). No Trainer argument
  avoids them, so each gets a filter that matches only it.
- `StepProgressBar` counts optimizer steps (``step 30/1200``, loss, bytes/s, MFU) where
  Lightning's bar counts the batches of an epoch (``Epoch 0/-2`` on an endless stream).
- `ByteLMSummary` fills in the summary's FLOPs with the count MFU uses, for one training step of
  the data module's batch. Lightning counts FLOPs only by running an ``example_input_array``
  under torch's FlopCounterMode, and the module has none; that counter would also see the
  kernels actually run rather than the FLOPs the model needs (models/flops.py).
- `install` puts both in place of the defaults Lightning adds; a bar or summary the config names
  itself, or ``enable_progress_bar`` / ``enable_model_summary`` false, is left as it is.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelSummary, ProgressBar, RichModelSummary, RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import (
    CustomBarColumn,
    CustomTimeColumn,
    MetricsTextColumn,
    RichProgressBarTheme,
)
from lightning.pytorch.utilities.model_summary import ModelSummary as Summary
from rich.progress import ProgressColumn
from rich.text import Text

# the logger Lightning's rank_zero_info writes to, and the functions whose tips are dropped
RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"
TIP_SOURCES = ("configure_logger", "_maybe_show_litmodels_tip")


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.funcName in TIP_SOURCES and str(record.msg).startswith("💡 Tip:"))


def quiet_lightning() -> None:
    """Install the two filters of the module docstring (once per process; idempotent)."""
    logger = logging.getLogger(RANK_ZERO_LOGGER)
    if not any(isinstance(f, _DropTips) for f in logger.filters):
        logger.addFilter(_DropTips())
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )


# --- progress bar ------------------------------------------------------------------------------
def _si(value: float) -> str:
    """12345678 -> "12.3M"."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


# progress-bar metric -> (label, format)
BAR_METRICS = {
    "train/loss": ("loss", lambda v: f"{v:.3f}"),
    "perf/bytes_per_s": ("bytes/s", _si),
    "perf/mfu": ("MFU", lambda v: f"{v:.1%}"),
}


class _CountColumn(ProgressColumn):
    """``step 30/1200`` for training (the task's ``unit`` field), ``Validation 3/8`` for the
    others; ``?`` for an unknown total."""

    def render(self, task) -> Text:
        total = task.total if task.total is not None and math.isfinite(task.total) else None
        shown = "?" if total is None else str(int(total))
        what = task.fields.get("unit") or f"{task.description} "
        return Text(f"{what}{int(task.completed)}/{shown}")


class _MetricsColumn(MetricsTextColumn):
    """``loss 4.848 · bytes/s 2.32k``: Lightning's metrics column without its colons."""

    def _generate_metrics_texts(self):
        for name, value in self._metrics.items():
            yield f"{name} {value}"


class StepProgressBar(RichProgressBar):
    """Lightning's Rich bar, counting optimizer steps over the whole fit (resumed fits start at
    the checkpoint's step) against ``max_steps`` (or the epochs' estimate), with the loss,
    bytes/s and MFU the module logs to the bar: ``step 30/1200 ━━━━ 0:00:38 • 0:14:20 loss 4.848
    · bytes/s 2.32k``."""

    def __init__(self, refresh_rate: int = 10, **kwargs: Any) -> None:
        kwargs.setdefault("theme", RichProgressBarTheme(metrics_text_delimiter=" · "))
        super().__init__(refresh_rate=refresh_rate, **kwargs)

    def configure_columns(self, trainer: L.Trainer) -> list:
        return [
            _CountColumn(),
            CustomBarColumn(
                bar_width=16,  # the line with loss and bytes/s fits 80 columns
                complete_style=self.theme.progress_bar,
                finished_style=self.theme.progress_bar_finished,
                pulse_style=self.theme.progress_bar_pulse,
            ),
            CustomTimeColumn(style=self.theme.time),
        ]

    def _init_progress(self, trainer: L.Trainer) -> None:
        super()._init_progress(trainer)  # appends Lightning's MetricsTextColumn: ours replaces it
        old = self._metric_component
        if self.progress is not None and old is not None and not isinstance(old, _MetricsColumn):
            new = _MetricsColumn(trainer, old._style, old._text_delimiter, old._metrics_format)
            self.progress.columns = tuple(new if c is old else c for c in self.progress.columns)
            self._metric_component = new

    @staticmethod
    def total_steps(trainer: L.Trainer) -> float:
        total = trainer.estimated_stepping_batches
        return float(total) if total is not None and total > 0 else math.inf

    def _initialize_train_progress_bar_id(self) -> None:
        assert self.progress is not None
        trainer = self.trainer
        self.train_progress_bar_id = self.progress.add_task(
            "train", total=self.total_steps(trainer), completed=trainer.global_step, unit="step "
        )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.is_disabled or self.progress is None:
            return
        if self.train_progress_bar_id is None:  # one task for the whole fit, not one per epoch
            self._initialize_train_progress_bar_id()
        self.refresh()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        out: dict[str, Any] = {}
        for key, value in items.items():
            label, fmt = BAR_METRICS.get(key, (key, None))
            out[label] = fmt(float(value)) if fmt is not None and isinstance(value, (int, float)) else value
        return out


# --- model summary -----------------------------------------------------------------------------
def step_flops(trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[float, str] | None:
    """Training FLOPs (forward + backward) of one step, counted as MFU counts them
    (``flops_per_byte`` × batch × seq_len), and a line saying so; None without a ByteLM or
    without a data module that has ``batch_size`` and ``seq_len``."""
    model = getattr(pl_module, "model", None)
    dm = getattr(trainer, "datamodule", None)
    batch, seq_len = getattr(dm, "batch_size", None), getattr(dm, "seq_len", None)
    if not hasattr(model, "flops_per_byte") or not isinstance(batch, int) or not isinstance(seq_len, int):
        return None
    per_byte = model.flops_per_byte()
    patcher = getattr(model.config, "patcher", None)
    mean = f" at mean patch length {patcher.patch_size}" if patcher is not None else ""
    line = f"FLOPs: per training step of {batch} × {seq_len} bytes, forward + backward ({_si(per_byte)} per byte{mean})"
    return per_byte * batch * seq_len, line


class _CountedSummary(Summary):
    """Lightning's summary with the FLOPs of ``flops`` on the ``model`` row (other rows: "-")."""

    def __init__(self, module: L.LightningModule, max_depth: int, flops: float) -> None:
        self._step_flops = int(flops)  # before super().__init__, which summarizes
        super().__init__(module, max_depth=max_depth)

    @property
    def total_flops(self) -> int:
        return self._step_flops

    @property
    def flop_counts(self) -> dict[str, dict[Any, int]]:
        return {name: ({"step": self._step_flops} if name == "model" else {}) for name in self.layer_names}

    def _get_summary_data(self) -> list[tuple[str, list[str]]]:
        data = super()._get_summary_data()
        names = dict(data)["Name"]
        return [
            (key, [v if n == "model" else "-" for n, v in zip(names, values)] if key == "FLOPs" else values)
            for key, values in data
        ]


class ByteLMSummary(RichModelSummary):
    """Lightning's Rich model summary with real FLOPs (`step_flops`) and a line saying what
    they count."""

    def _summary(self, trainer: L.Trainer, pl_module: L.LightningModule):
        counted = step_flops(trainer, pl_module)
        if counted is None:
            return super()._summary(trainer, pl_module)
        self._flops_line = counted[1]
        return _CountedSummary(pl_module, self._max_depth, counted[0])

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flops_line = None
        super().on_fit_start(trainer, pl_module)
        if self._max_depth and self._flops_line and trainer.is_global_zero:
            from rich import get_console

            get_console().print(self._flops_line, highlight=False)


# --- installing them ---------------------------------------------------------------------------
def install(trainer: L.Trainer, given: Iterable[L.Callback]) -> None:
    """Put `StepProgressBar` and `ByteLMSummary` in place of the bar and summary Lightning added
    by default to ``trainer.callbacks``: those that are none of ``given`` (the callbacks the
    config or caller passed). Lightning adds none when the config sets ``enable_progress_bar`` /
    ``enable_model_summary`` false or names its own."""
    ours = {id(cb) for cb in given}
    for i, cb in enumerate(trainer.callbacks):
        if id(cb) in ours:
            continue
        if isinstance(cb, ProgressBar):
            trainer.callbacks[i] = StepProgressBar()
        elif isinstance(cb, ModelSummary):
            trainer.callbacks[i] = ByteLMSummary(max_depth=cb._max_depth)
