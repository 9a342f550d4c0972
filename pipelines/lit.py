"""`polybyte fit|validate`: the LightningCLI around `ByteLMModule` (training.py) and
`ByteDataModule` (data.py), the checkpoint callback, stop signals and one run folder.

Every checkpoint `X.ckpt` written by `ExportCheckpoint` also gets a sibling folder `X/` holding
`model.safetensors` + `config.json` (model and modality settings), which is what `polybyte eval`
and `polybyte sample` load — no Lightning state, no pickles. Both are written atomically, the
export first (see checkpoints.py).

One run folder: ``trainer.default_root_dir`` holds the loggers' ``tb/`` and ``csv/`` and the
checkpoints in ``checkpoints/``; a fit refuses a folder holding another run's checkpoints.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from . import console
from .card import training_facts, validation_record
from .checkpoints import STOP_SIGNALS, TMP, check_ckpt_file, commit, prepare, refuse_other_run, sibling
from .data import ByteDataModule
from .export import save_exported
from .runtime import shipped_config, with_shipped_configs
from .training import ByteLMModule


class NonFiniteWeightsError(ValueError):
    """A checkpoint was about to be written with NaN/Inf weights."""


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
    # the last val bits/byte and its step, for the model card (a save at step N precedes N's validation)
    last_validation: dict | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.last_validation = validation_record(trainer) or self.last_validation
        super().on_validation_end(trainer, pl_module)  # may save `last`, now with this validation

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
            extra.update(training_facts(trainer, self.last_validation))  # data sources, last validation
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

    - ``configs/defaults.yaml`` is read before the ``--config`` files, so a config states only
      what differs; the run's ``ExportCheckpoint`` is always there, set under ``checkpoint:``.
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
        # configs/defaults.yaml under every --config: a config states only what differs from it
        defaults = {"default_config_files": [str(shipped_config("defaults.yaml"))]}
        subcommands = kwargs.get("run", True)
        kwargs.setdefault("parser_kwargs", {"fit": defaults, "validate": defaults} if subcommands else defaults)
        # the trainer is appended here as soon as it exists, so a caller reaches it (and its
        # callbacks' state) even when the subcommand ends in an exception
        self.trainers = [] if trainers is None else trainers
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        # the run's checkpoint callback is always there, set under `checkpoint:` (defaults.yaml)
        parser.add_lightning_class_args(ExportCheckpoint, "checkpoint")

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
            kwargs["logger"] = [
                TensorBoardLogger(root, name="tb"),
                CSVLogger(root, name="csv", flush_logs_every_n_steps=every),
            ]
        given = _as_list(config.get("callbacks")) + _as_list(kwargs.get("callbacks"))
        trainer = super().instantiate_trainer(**kwargs)
        console.install(trainer, given)  # step progress bar, summary with FLOPs (console.py)
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
        folders = [
            Path(cb.dirpath)
            for cb in self.trainer.checkpoint_callbacks
            if isinstance(cb, ModelCheckpoint) and cb.dirpath
        ]
        where = ", ".join(str(f) for f in folders) or "no checkpoint folder (no checkpoint callback)"
        path, why = asked, ""
        if asked == "last":
            found = {
                p
                for cb in self.trainer.checkpoint_callbacks
                if isinstance(cb, ModelCheckpoint)
                for p in cb._find_last_checkpoints(self.trainer)
            }
            path = max(found, key=os.path.getmtime) if found else None
            why = " and no last.ckpt for --ckpt_path last" if path is None else ""
            if path is None and not fit:
                raise ValueError(
                    f"--ckpt_path last: no last.ckpt in {where}; nothing to validate "
                    f"(pass a .ckpt file, or the run's --trainer.default_root_dir)"
                )
        elif asked is None and not fit:
            raise ValueError(
                f"no checkpoint to validate: pass --ckpt_path last (the newest last.ckpt in {where}) "
                f"or --ckpt_path FILE.ckpt; an untrained model is not validated"
            )
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


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


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
    console.quiet_lightning()  # Lightning's tips and a known deprecation warning (console.py)
    torch.set_float32_matmul_precision("high")
    args = with_shipped_configs(sys.argv[1:] if argv is None else list(argv))  # `--config debug.yaml` anywhere
    if argv is None:
        sys.argv[1:] = args
    else:
        argv = args
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
        signum = next(
            (
                cb.received_signal
                for t in trainers
                for cb in t.callbacks
                if isinstance(cb, ExportCheckpoint) and cb.received_signal
            ),
            signal.SIGTERM,
        )
        print(
            f"polybyte {command[0]}: stopped by {signal.Signals(signum).name}; `last` checkpoint saved, "
            f"resume with --ckpt_path last",
            file=sys.stderr,
        )
        return 128 + signum
    return 0
