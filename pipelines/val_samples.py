"""`ValSamples`: at each validation of a fit, a few images and audio clips sampled from the model
and logged to TensorBoard, so a run shows what it has learnt beside its curves.

`ByteLMModule` installs it (``model.val_samples``: samples per source, 0 turns it off). It does
nothing without a `TensorBoardLogger`. Per image or audio source of the data module, it draws
``num`` unprompted samples with `polybyte sample`'s code (runtime.draw_samples: the same
generation and lengths, a whole image and at most one training window of audio), from a fixed
seed so that successive validations differ only by the weights. Logged as
``samples/<source>`` (images, one summary of ``num``) and ``samples/<source>/<i>`` (audio).

Cheap by construction: a few windows of bytes through the decoding caches, on rank 0 only (see
`_sampling`). On the shared 2-core CPU here, busy with other jobs, the debug model's 2 images
and 2 clips took about 6 s per validation.
Skipped under sharded strategies (FSDP, DeepSpeed...), whose weights no single rank holds.
"""

from __future__ import annotations

import contextlib

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from .runtime import draw_samples, sample_bytes

MODALITIES = ("image", "audio")  # text is in the logs' BPB; images and audio need to be seen or heard
SEED = 0
MIN_SIDE = 64  # images smaller than this are shown enlarged (nearest) to about it


@contextlib.contextmanager
def _sampling(model: torch.nn.Module):
    """No grad; layers compiled in place for training (``compile: blocks``) run eagerly, as the
    decoding shapes would recompile them; on a CPU one thread (byte-by-byte decoding of a small
    model is many tiny ops, which a second thread slows when the other core is busy)."""
    compiled = any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())
    cpu = next(model.parameters()).device.type == "cpu"
    threads = torch.get_num_threads()
    try:
        if cpu:
            torch.set_num_threads(1)
        with torch.no_grad(), torch.compiler.set_stance("force_eager") if compiled else contextlib.nullcontext():
            yield
    finally:
        torch.set_num_threads(threads)


class ValSamples(L.Callback):
    """Log ``num`` sampled images / audio clips per image or audio source to TensorBoard after
    each validation of a fit (none during the sanity check or ``validate``)."""

    def __init__(self, num: int = 2) -> None:
        self.num = int(num)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tb = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if (
            self.num < 1
            or tb is None
            or trainer.sanity_checking
            or trainer.state.fn != "fit"
            or not trainer.is_global_zero
            or not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy))
        ):
            return
        dm = getattr(trainer, "datamodule", None)
        window = getattr(dm, "seq_len", None)
        for source in [s for s in getattr(dm, "sources", []) if s.modality in MODALITIES]:
            adapter = source.adapter()
            length = sample_bytes(adapter, window)
            if not length:
                continue
            with _sampling(pl_module.model):
                payloads = draw_samples(pl_module.model, adapter, self.num, length, seed=SEED)
            self._log(tb.experiment, f"samples/{source.name}", adapter, payloads, trainer.global_step)

    @staticmethod
    def _log(writer, tag: str, adapter, payloads: list[bytes], step: int) -> None:
        if adapter.name == "image":
            images = np.stack([np.asarray(adapter.decode(p)) for p in payloads])  # [N, H, W, 3] uint8
            scale = max(1, MIN_SIDE // images.shape[1])  # small images enlarged, pixels kept sharp
            images = images.repeat(scale, axis=1).repeat(scale, axis=2)
            writer.add_images(tag, images, step, dataformats="NHWC")
            return
        for i, payload in enumerate(payloads):
            wave, rate = adapter.decode(payload)
            writer.add_audio(f"{tag}/{i}", torch.from_numpy(np.asarray(wave, dtype=np.float32))[None], step, rate)
