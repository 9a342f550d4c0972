"""What training's optimizer needs beside the module: which parameters get weight decay, the LR
schedule (linear warm-up, cosine decay) and the note a resume with another schedule prints."""

from __future__ import annotations

import math

import torch


def no_decay(name: str, param: torch.nn.Parameter, module_types: dict[str, type]) -> bool:
    """Norm weights, biases, embeddings, hash tables and pad/start parameters get no weight decay."""
    owner = module_types.get(name.rsplit(".", 1)[0], type(None))
    return param.ndim < 2 or issubclass(owner, (torch.nn.Embedding, torch.nn.RMSNorm, torch.nn.LayerNorm))


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """The LR as a fraction of the peak after ``step`` steps: linear warm-up over ``warmup``
    steps, then a cosine from 1 down to ``min_ratio`` at step ``total``, held there after it."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def schedule_notice(saved: dict | None, now: dict | None, step: int, hp) -> str | None:
    """One line when a fit resumed at ``step`` has another LR schedule (``{"max_steps",
    "warmup_steps"}``) than its checkpoint (``saved``; None values unknown), else None. The
    scheduler keeps only its step count, so the new values take over at the next update: step
    ``step`` runs at the LR the checkpoint holds, step ``step + 1`` on the new schedule."""
    if not saved or not now:
        return None
    changed = [k for k in ("max_steps", "warmup_steps") if saved.get(k) is not None and saved[k] != now[k]]
    if not changed:
        return None
    old = {k: now[k] if saved.get(k) is None else saved[k] for k in now}
    was = hp.lr * lr_factor(step + 1, old["max_steps"], old["warmup_steps"], hp.min_lr_ratio)
    new = hp.lr * lr_factor(step + 1, now["max_steps"], now["warmup_steps"], hp.min_lr_ratio)
    diff = ", ".join(f"{k} {saved[k]} -> {now[k]}" for k in changed)
    return (
        f"resuming at step {step} with another LR schedule than the checkpoint's ({diff}): it is "
        f"recomputed for the new values, not continued: from step {step + 1} the LR is {new:.3g} (on the "
        f"checkpoint's schedule: {was:.3g}), warm-up {now['warmup_steps']} steps, cosine down to "
        f"{hp.lr * hp.min_lr_ratio:.3g} at step {now['max_steps']}"
    )
