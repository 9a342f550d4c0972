"""`polybyte bench --what train`: full training steps of each config (and its peer), CUDA-event timed."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .peers import PEER_MODULES, PEER_NAMES, lucidrains_megabyte, transformers_blt
from .runtime import default_device, device_peak_flops


def model_config(path: str) -> dict:
    """The ``model.model`` mapping of a LightningCLI YAML."""
    import yaml

    cfg = yaml.safe_load(Path(path).read_text())
    return dict(cfg["model"]["model"])


def _time_training(
    net, params, batches, pad_id: int, steps: int, warmup: int, cuda: bool, aux=None, profile: Path | None = None
):
    """Run ``warmup`` then ``steps`` training steps (bf16 autocast on CUDA, the loss of
    models.base.nll_loss, gradient clipping at 1.0, fused AdamW on CUDA) of ``net(ids, modality)``;
    returns (seconds of the timed steps, mean patch length or None, seconds of the warm-up).
    ``aux``: the model whose ``aux`` holds BLT patch counts (read once, at the end).
    ``profile``: afterwards, run 3 more steps under torch.profiler and write its operator table
    (sorted by device time) to this file."""
    from polybyte.models.base import nll_loss

    device = batches[0][0].device
    opt = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
    patches, patch_bytes = 0, 0

    def step(i):
        ids, modality = batches[i % len(batches)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss, _ = nll_loss(net(ids, modality), ids, pad_id)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    # One pair of CUDA events around all timed steps, not Lightning's ThroughputMonitor (a Trainer
    # callback that synchronizes after every batch): no host sync inside the timed loop.
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
        if aux is not None and "num_patches" in aux.aux:  # device sums, no sync per step
            patches = patches + aux.aux["num_patches"]
            patch_bytes = patch_bytes + aux.aux["num_bytes"]
    if cuda:
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        seconds = time.perf_counter() - t0
    mean_patch = float(patch_bytes) / float(patches) if isinstance(patches, torch.Tensor) else None
    if profile is not None:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profiler(activities=activities) as prof:
            for i in range(3):
                step(i)
            if cuda:
                torch.cuda.synchronize()
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        profile.parent.mkdir(parents=True, exist_ok=True)
        profile.write_text(prof.key_averages().table(sort_by=key, row_limit=45, max_name_column_width=70))
    return seconds, mean_patch, warm_s


def bench_train(
    configs: list[str],
    text: str | None,
    batch_size: int,
    steps: int,
    warmup: int,
    compile_model: bool | str,
    peers: bool = False,
    report=None,
    profile_dir: str | None = None,
) -> list[dict]:
    """Time training steps of each config (and with ``peers``, the peer implementation of each
    MEGABYTE / BLT config at its shapes, right after it); returns one result dict per row.
    ``compile_model``: a ``compile`` setting of polybyte fit (False, True, "blocks", "model");
    peers are compiled whole (``torch.compile``) whenever ours are compiled.
    ``report(row)`` is called with each row as soon as it is measured. ``profile_dir``: write a
    torch.profiler operator table per row there (``NAME.txt``)."""
    from polybyte.models import build_model
    from polybyte.pipelines.compiling import compile_for_training, compile_scope

    device = default_device()
    cuda = device.type == "cuda"
    corpus = np.frombuffer(Path(text).read_bytes(), dtype=np.uint8) if text else None
    peak = device_peak_flops(device, torch.bfloat16)  # the steps run under bf16 autocast on CUDA
    scope = compile_scope(compile_model)  # None: eager
    results = []

    def emit(row):
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        results.append(row)
        if report is not None:
            report(row)

    def say(msg):
        if report is not None:
            print(msg, flush=True)

    for path in configs:
        model_cfg = model_config(path)
        torch.manual_seed(0)
        model = build_model(model_cfg).to(device)
        seq_len = model.config.max_seq_len
        rng = np.random.default_rng(0)

        def batch(rng=rng, seq_len=seq_len):
            if corpus is None:
                ids = rng.integers(0, 256, size=(batch_size, seq_len))
            else:
                starts = rng.integers(0, len(corpus) - seq_len, size=batch_size)
                ids = np.stack([corpus[s : s + seq_len] for s in starts])
            return torch.from_numpy(ids).long().to(device), torch.full((batch_size,), 258, device=device)

        if getattr(model.config, "patcher", None) is not None and model.config.patcher.needs_entropies:
            # An untrained entropy model is unsure everywhere (1-byte patches): calibrate the
            # threshold on this data to the configured mean patch length, as a trained one would be.
            ids, modality = batch()
            model.calibrate_threshold(ids, modality)
        batches = [batch() for _ in range(4)]
        name = Path(path).name
        say(f"{name}: {f'compiling ({scope}) and ' if scope else ''}warming up {warmup} steps ...")
        net = compile_for_training(model, scope)
        params = [p for p in model.parameters() if p.requires_grad]
        prof = Path(profile_dir) / f"{Path(name).stem}.txt" if profile_dir else None
        seconds, mean_patch, warm_s = _time_training(
            net, params, batches, model.config.pad_id, steps, warmup, cuda, aux=model, profile=prof
        )
        bytes_per_s = steps * batch_size * seq_len / seconds
        flops = model.flops_per_byte(mean_patch_len=mean_patch)
        ours = {
            "config": path,
            "name": name,
            "impl": "polybyte",
            "backbone": model.backbone,
            "params": model.num_params(),
            "seq_len": seq_len,
            "batch_size": batch_size,
            "ms_per_step": 1000 * seconds / steps,
            "bytes_per_s": bytes_per_s,
            "flops_per_byte": flops,
            "mfu": flops * bytes_per_s / peak if peak else None,
            "mean_patch_len": mean_patch,
            "compiled": scope or False,
            "warmup_s": warm_s,
            "peer": None,
        }
        del net, batches[1:]
        if peers and model.backbone in PEER_MODULES:
            emit(ours)
            make = lucidrains_megabyte if model.backbone == "megabyte" else transformers_blt
            torch.manual_seed(0)
            peer = make(model.config).to(device)
            peer_name = f"{PEER_NAMES[model.backbone]} @ {name}"
            peer_compiled = "model" if scope else False  # a peer is compiled whole
            say(f"{peer_name}: {'compiling and ' if scope else ''}warming up {warmup} steps ...")
            batches = [batch() for _ in range(4)]
            ps = [p for p in peer.parameters() if p.requires_grad]
            try:
                net = torch.compile(peer) if scope else peer
                prof = Path(profile_dir) / f"{Path(name).stem}-peer.txt" if profile_dir else None
                seconds, _, warm_s = _time_training(
                    net, ps, batches, model.config.pad_id, steps, warmup, cuda, profile=prof
                )
            except Exception as e:  # a peer that does not compile is timed eagerly, and says so
                if not scope:
                    raise
                say(f"{peer_name}: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); eager")
                peer_compiled = False
                seconds, _, warm_s = _time_training(peer, ps, batches, model.config.pad_id, steps, warmup, cuda)
            peer_bps = steps * batch_size * seq_len / seconds
            ours["peer"] = peer_name
            ours["vs_peer"] = bytes_per_s / peer_bps
            emit(
                {
                    "config": path,
                    "name": peer_name,
                    "impl": PEER_MODULES[model.backbone],
                    "backbone": model.backbone,
                    "params": sum(p.numel() for p in peer.parameters()),
                    "seq_len": seq_len,
                    "batch_size": batch_size,
                    "ms_per_step": 1000 * seconds / steps,
                    "bytes_per_s": peer_bps,
                    "flops_per_byte": None,
                    "mfu": None,
                    "mean_patch_len": float(model.config.patcher.patch_size) if model.backbone == "blt" else None,
                    "compiled": peer_compiled,
                    "warmup_s": warm_s,
                    "peer": None,
                    "ours_vs_peer": bytes_per_s / peer_bps,
                }
            )
            del peer, net, ps
        else:
            emit(ours)
        del model, params
        if cuda:
            torch.cuda.empty_cache()
    return results


def print_train_header(batch_size: int) -> None:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"train steps on {device} (bf16 autocast and fused AdamW on GPU), batch {batch_size}:")
    print(
        f"{'model':<40} {'params':>8} {'seq':>6} {'compiled':>8} {'warm s':>7} {'ms/step':>8} {'bytes/s':>12} "
        f"{'MFU':>6} {'patch':>6} {'vs first':>8} {'ours/peer':>9}",
        flush=True,
    )


def print_train_row(r: dict, base: float) -> None:
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
    patch = f"{r['mean_patch_len']:.2f}" if r["mean_patch_len"] else "-"
    vs_peer = r.get("ours_vs_peer")
    ratio = f"{vs_peer:.2f}x" if vs_peer is not None else "-"
    print(
        f"{r['name']:<40} {r['params'] / 1e6:>7.1f}M {r['seq_len']:>6} {r['compiled'] or 'no':>8} "
        f"{r['warmup_s']:>7.1f} {r['ms_per_step']:>8.1f} {r['bytes_per_s']:>12,.0f} {mfu:>6} {patch:>6} "
        f"{r['bytes_per_s'] / base:>7.2f}x {ratio:>9}",
        flush=True,
    )


def print_train(results: list[dict]) -> None:
    print_train_header(results[0]["batch_size"])
    for r in results:
        print_train_row(r, results[0]["bytes_per_s"])
