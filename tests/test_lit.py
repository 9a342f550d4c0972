"""`polybyte fit|validate` (LightningCLI around ByteLMModule) on the demo data, on CPU.

One 30-step debug run is shared by the module; it checks loss falling, checkpoints with their
safetensors exports, the saved config, validation = `polybyte eval`, and resuming. The demo
dataset is built once per session into a temporary POLYBYTE_CACHE.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import tarfile
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from polybyte.modalities import EOS, IMAGE, NUM_BYTES, PAD, TEXT
from polybyte.pipelines import cli, lit
from polybyte.pipelines.demo import DEMO_SETTINGS
from polybyte.pipelines.evaluate import evaluate
from polybyte.pipelines.export import load_exported

REPO = Path(__file__).resolve().parents[1]
DEBUG_YAML = REPO / "configs" / "debug.yaml"
STEPS = 30  # long enough for the text loss to fall clearly (tiny MEGABYTE, lr 3e-3)
VAL_SAMPLES = {"text": 2, "image": 3, "audio": 2}  # per modality in the small val set


def head_shards(shards: dict[str, Path], out: Path, counts: dict[str, int]) -> dict[str, Path]:
    """Folders holding the first ``counts[m]`` val samples of each demo source, with its manifest
    made to list just them (loaders count the samples a shard lacks against its manifest)."""
    dirs = {}
    for modality, src in shards.items():
        dst = out / modality
        dst.mkdir(parents=True, exist_ok=True)
        manifest = json.loads((src / "manifest.json").read_text())
        manifest["splits"] = {
            "train": {"samples": 0, "payload_bytes": 0, "shards": [], "shard_samples": []},
            "val": {"samples": counts[modality], "shards": ["val-000000.tar"], "shard_samples": [counts[modality]]},
        }
        (dst / "manifest.json").write_text(json.dumps(manifest))
        keys: list[str] = []
        with tarfile.open(src / "val-000000.tar") as tin, tarfile.open(dst / "val-000000.tar", "w") as tout:
            for member in tin.getmembers():
                key = member.name.split(".", 1)[0]
                if key not in keys:
                    if len(keys) == counts[modality]:
                        break
                    keys.append(key)
                tout.addfile(member, tin.extractfile(member))
        dirs[modality] = dst
    return dirs


def write_config(path: Path, run: Path, *, steps: int, val_every: int, ckpt_every: int, **data) -> Path:
    """configs/debug.yaml with every output under ``run`` (its default_root_dir) and a shorter,
    quieter schedule; metrics.csv is flushed at every step (log_every_n_steps 1). No samples are
    drawn for TensorBoard at validation (tests/test_console.py checks them)."""
    cfg = yaml.safe_load(DEBUG_YAML.read_text())
    trainer = cfg["trainer"]
    trainer.update(
        default_root_dir=str(run),
        max_steps=steps,
        val_check_interval=val_every,
        limit_val_batches=3,  # one batch of each source: batches take turns between sources
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    cfg["checkpoint"].update(every_n_train_steps=ckpt_every)  # logs and checkpoints follow default_root_dir
    cfg["data"].update(num_workers=1, **data)
    cfg["model"]["val_samples"] = 0
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def metrics(run: Path, version: int | None = None) -> list[dict[str, float]]:
    """Rows of a CSVLogger metrics.csv (latest version unless given), empty cells dropped."""
    versions = sorted((run / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    folder = versions[-1] if version is None else run / "csv" / f"version_{version}"
    with open(folder / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), r[key]) for r in rows if key in r]


def run_cli(args: list[str], monkeypatch) -> int:
    monkeypatch.setattr(sys, "argv", ["polybyte"])
    return cli.main(args)


@pytest.fixture(scope="module")
def trained(demo_shards, tmp_path_factory):
    """A 30-step debug fit; returns paths and a snapshot taken right after it."""
    root = tmp_path_factory.mktemp("fit")
    run = root / "run"
    small_val = head_shards(demo_shards, root / "val", VAL_SAMPLES)
    config = write_config(
        root / "debug.yaml",
        run,
        steps=STEPS,
        val_every=10,
        ckpt_every=15,
        val_sources={m: str(d) for m, d in small_val.items()},
    )
    with pytest.MonkeyPatch.context() as mp:
        assert run_cli(["fit", "--config", str(config)], mp) == 0
    ckpts = run / "checkpoints"
    return {
        "root": root,
        "run": run,
        "config": config,
        "small_val": small_val,
        "rows": metrics(run, 0),
        "files": sorted(str(p.relative_to(run)) for p in run.rglob("*")),
        "last_info": json.loads((ckpts / "last" / "config.json").read_text()),
    }


def test_fit_loss_falls(trained):
    rows = trained["rows"]
    val = series(rows, "val/loss")
    assert [s for s, _ in val] == [9, 19, 29]  # val every 10 steps (steps count from 0)
    # The same val windows every time: a robust measure, unlike the loss of randomly mixed
    # training batches. Text is what a tiny model learns first (~8 -> ~5 bits in 30 steps).
    assert val[-1][1] < val[0][1], val
    val_text = series(rows, "val/bpb_text")
    assert val_text[-1][1] < val_text[0][1] - 0.5, val_text
    text = series(rows, "train/bpb_text")
    assert len(text) > 10 and text[-1][1] < text[0][1] - 1.0, text
    assert all(math.isfinite(v) for _, v in series(rows, "train/loss"))
    steps = [s for s, _ in series(rows, "train/loss")]
    assert steps == list(range(STEPS))


def test_fit_validation_scores_every_modality(trained):
    """Validation batches take turns between the sources, so each check of a fit limited to 3
    batches logs text, image and audio (read one source after the other, the 3 batches were
    all text)."""
    rows = [r for r in trained["rows"] if "val/loss" in r]
    assert len(rows) == 3
    for row in rows:
        assert {k for k in row if k.startswith("val/bpb_")} == {"val/bpb_text", "val/bpb_image", "val/bpb_audio"}, row


def test_fit_logs_training_metrics(trained):
    keys = set().union(*trained["rows"])
    rows = [r for r in trained["rows"] if "train/loss" in r]
    for key in (
        "train/loss",
        "lr",
        "data/skipped",
        "perf/bytes_per_s",
        "train/bpb_text",
        "train/bpb_image",
        "train/bpb_audio",
    ):
        assert key in keys, key
    assert all(r["data/skipped"] == 0 for r in rows)
    lr = series(trained["rows"], "lr")
    peak = max(v for _, v in lr)
    assert lr[0][1] < peak and peak == pytest.approx(3e-3, rel=1e-3) and lr[-1][1] < peak / 2  # warm-up, cosine
    # every logged per-modality BPB is a BPB (a uniform guess over 264 ids is ~8.04 bits)
    for key in ("train/bpb_text", "train/bpb_image", "train/bpb_audio"):
        assert all(0 < v < 9 for _, v in series(trained["rows"], key))


def test_fit_writes_checkpoints_exports_and_config(trained):
    files, run = set(trained["files"]), trained["run"]
    for name in ("last", "epoch=0-step=15", f"epoch=0-step={STEPS}"):
        assert f"checkpoints/{name}.ckpt" in files
        assert f"checkpoints/{name}/model.safetensors" in files
        assert f"checkpoints/{name}/config.json" in files
    info = trained["last_info"]
    assert info["step"] == STEPS and info["seq_len"] == 780
    assert info["model"]["backbone"] == "megabyte" and info["model"]["patch_size"] == 12
    for modality, settings in DEMO_SETTINGS.items():
        assert {k: info["modalities"][modality][k] for k in settings} == settings
    # the export holds exactly the checkpoint's weights
    step_ckpt = run / "checkpoints" / f"epoch=0-step={STEPS}.ckpt"
    state = torch.load(step_ckpt, map_location="cpu", weights_only=False)["state_dict"]
    model, _ = load_exported(step_ckpt)  # a .ckpt path resolves to its export folder
    exported = model.state_dict()
    assert set(exported) == {k.removeprefix("model.") for k in state}
    for k, v in exported.items():
        assert torch.equal(v, state["model." + k]), k
    # LightningCLI saved the resolved config next to the run's logs
    saved = [f for f in files if f.endswith("config.yaml")]
    assert saved, files
    cfg = yaml.safe_load((run / saved[0]).read_text())
    assert cfg["trainer"]["max_steps"] == STEPS and cfg["model"]["model"]["backbone"] == "megabyte"
    assert cfg["data"]["sources"] == "demo"


def test_exports_carry_a_model_card_of_the_run(trained, demo_shards):
    """config.json and the card (README.md) record the data and the last validation before each
    save, with its step: Lightning saves at a step before that step's validation runs."""
    ckpts = trained["run"] / "checkpoints"
    val_text = dict(series(trained["rows"], "val/bpb_text"))  # metrics.csv step = global step - 1
    assert sorted(val_text) == [9, 19, 29]
    for name, val_step in (("epoch=0-step=15", 10), (f"epoch=0-step={STEPS}", 20), ("last", 20)):
        info = json.loads((ckpts / name / "config.json").read_text())
        assert info["val"]["step"] == val_step and info["val"]["limit_val_batches"] == 3
        (row,) = [r for r in trained["rows"] if r.get("step") == val_step - 1 and "val/loss" in r]
        assert info["val"]["bpb"] == pytest.approx(  # the modalities this (limited) pass scored
            {k.removeprefix("val/bpb_"): v for k, v in row.items() if k.startswith("val/bpb_")}, rel=1e-6
        )
        assert info["val"]["bpb"]["text"] == pytest.approx(val_text[val_step - 1], rel=1e-6)
        assert {d["name"]: Path(d["shards"]) for d in info["data"]} == {
            m: Path(f).resolve() for m, f in demo_shards.items()
        }
        assert all(d["weight"] == 1.0 and d["train_shards"] >= 1 for d in info["data"])
        card = (ckpts / name / "README.md").read_text()
        for fact in (
            "| backbone | `megabyte` |",
            f"| training steps | {info['step']} |",
            f"text {info['val']['bpb']['text']:.3f}",
            f"(validation at step {val_step}, on `limit_val_batches: 3` of the val set)",
            f"`text` (text): {next(d['train_shards'] for d in info['data'] if d['name'] == 'text')} train shard",
            f" in `{Path(demo_shards['text']).resolve()}`, weight 1",
            "patch_size 12, global_dim 16, global_layers 2",
            f'polybyte.load("{ckpts / name}")',
        ):
            assert fact in card, (name, fact)


def test_validate_logs_every_modality_and_equals_eval(trained, tmp_path, monkeypatch):
    """`polybyte validate` over all val windows gives the BPB `polybyte eval` reports."""
    ckpt = trained["run"] / "checkpoints" / f"epoch=0-step={STEPS}.ckpt"
    run = tmp_path / "validate"
    config = write_config(
        tmp_path / "validate.yaml",
        run,
        steps=STEPS,
        val_every=10,
        ckpt_every=15,
        val_sources={m: str(d) for m, d in trained["small_val"].items()},
    )
    # the config limits validation to 2 batches (during fit); `validate` still scores every sample
    assert run_cli(["validate", "--config", str(config), "--ckpt_path", str(ckpt)], monkeypatch) == 0
    (row,) = [r for r in metrics(run) if "val/loss" in r]
    report = evaluate(ckpt, [f"{m}={d}" for m, d in trained["small_val"].items()], tmp_path / "eval")
    for modality in ("text", "image", "audio"):
        assert row[f"val/bpb_{modality}"] == pytest.approx(report["modalities"][modality]["bpb"], abs=1e-5)
    assert report["modalities"]["image"]["samples"] == VAL_SAMPLES["image"]
    # a limit on the command line still limits: one batch of 4 windows, all text (read first)
    args = ["validate", "--config", str(config), "--ckpt_path", str(ckpt), "--trainer.limit_val_batches", "1"]
    assert run_cli(args, monkeypatch) == 0
    (row,) = [r for r in metrics(run) if "val/loss" in r]
    assert "val/bpb_text" in row and "val/bpb_audio" not in row


def test_resume_continues_step_count(trained, monkeypatch):
    """Runs last in this module: it moves `last` on (the snapshot in `trained` is from before)."""
    run, ckpts = trained["run"], trained["run"] / "checkpoints"
    before = json.loads((ckpts / "last" / "config.json").read_text())["step"]
    assert before == STEPS
    rc = run_cli(
        ["fit", "--config", str(trained["config"]), "--ckpt_path", "last", "--trainer.max_steps", str(STEPS + 6)],
        monkeypatch,
    )
    assert rc == 0
    after = json.loads((ckpts / "last" / "config.json").read_text())["step"]
    assert after == STEPS + 6
    resumed = [s for s, _ in series(metrics(run), "train/loss")]
    assert resumed == list(range(STEPS, STEPS + 6))  # continued, not restarted from 0
    assert not list(ckpts.glob("last-v*"))  # the same `last` was moved on
    # the learning curves' axes (polybyte plot) run on over the resume: cumulative time and FLOPs
    for key in ("perf/train_seconds", "perf/train_flops"):
        first, second = [v for _, v in series(trained["rows"], key)], [v for _, v in series(metrics(run), key)]
        values = first + second
        assert len(first) > 1 and len(second) > 1 and all(b > a for a, b in zip(values, values[1:])), key


def test_print_config(demo_shards, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["polybyte"])
    with pytest.raises(SystemExit) as exit_:
        lit.main(["fit", "--config", str(DEBUG_YAML), "--print_config"])
    assert exit_.value.code in (0, None)
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["model"]["backbone"] == "megabyte"
    assert cfg["data"]["seq_len"] == cfg["model"]["model"]["max_seq_len"] == 780
    assert cfg["trainer"]["max_steps"] == 80


@pytest.mark.parametrize("name", ["debug.yaml", "configs/debug.yaml"])
def test_shipped_configs_are_found_by_name_from_any_folder(name, demo_shards, tmp_path, monkeypatch, capsys):
    """`polybyte fit --config debug.yaml` outside a checkout (as after `pip install polybyte`),
    through sys.argv as the console script runs it; a file of that name here still wins."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["polybyte", "fit", "--config", name, "--print_config"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code in (0, None)
    assert yaml.safe_load(capsys.readouterr().out)["model"]["model"]["backbone"] == "megabyte"
    mine = tmp_path / name
    mine.parent.mkdir(exist_ok=True)
    mine.write_text(DEBUG_YAML.read_text().replace("max_steps: 80", "max_steps: 7"))
    with pytest.raises(SystemExit):
        lit.main(["fit", f"--config={name}", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["trainer"]["max_steps"] == 7


def test_an_unknown_config_name_is_left_to_the_parser(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        run_cli(["fit", "--config", "nope.yaml"], monkeypatch)
    assert exit_.value.code == 2 and f"{tmp_path / 'nope.yaml'}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["--data.seq_len", "790", "--model.model.max_seq_len", "792"],
            "data.seq_len 790 is not a multiple of model.model.patch_size 12",
        ),
        (
            ["--data.seq_len", "600", "--model.model.max_seq_len", "600"],
            "a 16x16 image is 768 bytes plus EOS, which does not fit seq_len=600",
        ),
        (["--model.model.max_seq_len", "781"], "max_seq_len 781 must be a multiple of patch_size 12"),
        (["--ckpt_path", "/nonexistent/last.ckpt"], "/nonexistent/last.ckpt"),
    ],
)
def test_bad_config_is_one_clear_error(overrides, message, demo_shards, tmp_path, monkeypatch, capsys):
    args = [
        "fit",
        "--config",
        str(DEBUG_YAML),
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.logger",
        "false",
        "--trainer.callbacks",
        "[]",
        "--data.num_workers",
        "0",
        "--trainer.max_steps",
        "2",
        *overrides,
    ]
    assert run_cli(args, monkeypatch) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if "error" in ln]
    assert line.startswith("polybyte fit: error: ") and message in line


# --- BPB accounting through the LightningModule ----------------------------------------------
def tiny_module() -> lit.ByteLMModule:
    torch.manual_seed(0)
    model = dict(
        backbone="megabyte",
        patch_size=4,
        global_dim=8,
        global_layers=1,
        global_heads=2,
        local_dim=16,
        local_layers=1,
        local_heads=2,
        max_seq_len=16,
    )
    return lit.ByteLMModule(model, lr=1e-3, warmup_steps=1)


def hand_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Row 0: packed text with an in-stream EOS and tag; row 1: an image clip + EOS + PAD;
    row 2: text ending in EOS + PAD. Payload bytes include 0x00 (a real byte, counted)."""
    g = torch.Generator().manual_seed(1)
    rnd = lambda n: torch.randint(0, NUM_BYTES, (n,), generator=g).tolist()  # noqa: E731
    rows = [
        rnd(5) + [EOS, TEXT] + [0] + rnd(8),
        rnd(9) + [0, EOS] + [PAD] * 5,
        [TEXT] + rnd(10) + [EOS] + [PAD] * 4,
    ]
    return torch.tensor(rows), torch.tensor([TEXT, IMAGE, TEXT])


def manual_bits(module: lit.ByteLMModule, ids: torch.Tensor, modality: torch.Tensor) -> dict[str, list[float]]:
    """-log2 p of each payload target (ids 0..255) per modality; tags, EOS and PAD left out."""
    with torch.no_grad():
        logp = torch.log_softmax(module.model(ids, modality).double(), -1)
    out: dict[str, list[float]] = {}
    for b in range(ids.shape[0]):
        name = {TEXT: "text", IMAGE: "image"}[int(modality[b])]
        for t in range(ids.shape[1]):
            if int(ids[b, t]) < NUM_BYTES:
                out.setdefault(name, []).append(-float(logp[b, t, ids[b, t]]) / math.log(2))
    return out


def pooled(*bits: dict[str, list[float]]) -> dict[str, float]:
    names = {k for b in bits for k in b}
    return {k: sum(sum(b.get(k, [])) for b in bits) / sum(len(b.get(k, [])) for b in bits) for k in names}


def tiny_trainer(tmp_path, steps: int = 1, log_every: int = 1, callbacks=()) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=CSVLogger(tmp_path, name="csv", version=0),
        log_every_n_steps=log_every,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
        default_root_dir=tmp_path,
    )


class RecordBits(L.Callback):
    """Payload bits of each training batch with the weights that step sees (before its update)."""

    def __init__(self) -> None:
        self.bits: list[dict[str, list[float]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.bits.append(manual_bits(pl_module, *batch))


@pytest.mark.parametrize("log_every", [1, 2])
def test_module_train_bpb_per_modality_present(log_every, tmp_path):
    """train/bpb_<m>: payload bytes only, pooled since the last log, only for modalities seen."""
    ids, modality = hand_batch()
    assert (ids == 0).sum() == 2  # 0x00 payload bytes are present and must count
    text_only = (ids[[0, 2]], modality[[0, 2]])
    batches = [(ids, modality), text_only, text_only, text_only]  # image only in the first batch
    record = RecordBits()
    trainer = tiny_trainer(tmp_path, steps=4, log_every=log_every, callbacks=[record])
    trainer.fit(tiny_module(), train_dataloaders=DataLoader(batches, batch_size=None))
    rows = {int(r["step"]): r for r in metrics(tmp_path) if any(k.startswith("train/bpb_") for k in r)}
    assert sorted(rows) == list(range(log_every - 1, 4, log_every))
    for step, row in rows.items():
        expected = pooled(*record.bits[step + 1 - log_every : step + 1])
        logged = {k.removeprefix("train/bpb_"): v for k, v in row.items() if k.startswith("train/bpb_")}
        assert logged == pytest.approx(expected, rel=1e-5)  # same keys: no stale image value later
    assert "image" in {k.removeprefix("train/bpb_") for k in rows[log_every - 1]}


def test_module_val_bpb_pooled_and_per_modality(tmp_path):
    ids, modality = hand_batch()
    module = tiny_module().eval()
    expected = pooled(manual_bits(module, ids, modality))
    batches = DataLoader([(ids[:2], modality[:2]), (ids[2:], modality[2:])], batch_size=None)
    (result,) = tiny_trainer(tmp_path).validate(module, dataloaders=batches, verbose=False)
    assert {k for k in result if k.startswith("val/bpb_")} == {"val/bpb_text", "val/bpb_image"}
    # val BPB is pooled over batches (sum of bits / sum of bytes), not a mean of batch means
    assert result["val/bpb_text"] == pytest.approx(expected["text"], rel=1e-5)
    assert result["val/bpb_image"] == pytest.approx(expected["image"], rel=1e-5)


def test_module_no_weight_decay_on_norms_and_embeddings():
    module = tiny_module()
    module.trainer = L.Trainer(max_steps=10, logger=False)  # configure_optimizers reads max_steps
    opt = module.configure_optimizers()["optimizer"]
    decay, keep = opt.param_groups
    names = {id(p): n for n, p in module.model.named_parameters()}
    assert decay["weight_decay"] > 0 and keep["weight_decay"] == 0
    assert all(p.ndim == 2 for p in decay["params"])
    kept = {names[id(p)] for p in keep["params"]}
    assert any("norm" in n for n in kept) and any("emb" in n for n in kept), kept
    assert len(decay["params"]) + len(keep["params"]) == len(names)


def test_export_checkpoint_rotation_and_final_last(tmp_path):
    """Rotated checkpoints take their export folder along; `last` holds the final step even when
    training stops between periodic checkpoints."""
    ids, modality = hand_batch()
    ckpt = lit.ExportCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=2, save_top_k=1, save_last=True)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=5,
        logger=False,
        callbacks=[ckpt],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(tiny_module(), train_dataloaders=DataLoader([(ids, modality)] * 5, batch_size=None))
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert names == ["epoch=0-step=4", "epoch=0-step=4.ckpt", "last", "last.ckpt"]
    assert json.loads((tmp_path / "ck" / "last" / "config.json").read_text())["step"] == 5
    assert torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)["global_step"] == 5


def test_bench_train_times_steps_of_a_config(capsys, tmp_path):
    from polybyte.pipelines import bench

    out_json = tmp_path / "train.json"
    argv = [
        "--what",
        "train",
        "--model",
        str(REPO / "configs" / "debug.yaml"),
        "--steps",
        "2",
        "--warmup",
        "1",
        "--train-batch-size",
        "1",
        "--json",
        str(out_json),
    ]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "debug.yaml" in out and "1.00x" in out
    import json

    (result,) = json.loads(out_json.read_text())
    assert result["backbone"] == "megabyte" and result["bytes_per_s"] > 0 and result["seq_len"] == 780


def test_the_card_records_a_sources_augmentation(shared_data, tmp_path):
    """config.json's data facts and the card name a source's data.augment options (and only its)."""
    from types import SimpleNamespace

    from polybyte.pipelines.card import _data, training_facts
    from polybyte.pipelines.data import ByteDataModule
    from polybyte.pipelines.shards import write_shards

    wavs = sorted((shared_data / "audio" / "fsdd").glob("*.wav"))[:4]
    write_shards("audio", wavs, tmp_path / "audio", val_fraction=0)
    write_shards("text", [shared_data / "text" / "tinyshakespeare.txt"], tmp_path / "text", max_doc_bytes=65536)
    dm = ByteDataModule(
        sources={"audio": str(tmp_path / "audio"), "text": str(tmp_path / "text")},
        augment={"audio": {"invert": 0.5}},
        seq_len=8192,
    )
    dm.setup("fit")
    data = training_facts(SimpleNamespace(datamodule=dm), None)["data"]
    assert [d.get("augment") for d in data] == [{"invert": 0.5}, None]
    line = _data(data)
    assert "`audio` (audio): 1 train shard" in line and 'augmented with {"invert": 0.5}; `text`' in line
    assert line.count("augmented") == 1


@pytest.mark.parametrize("mode", ["min", "max"])
def test_fit_can_keep_the_best_validation_checkpoint(mode, demo_shards, tmp_path, monkeypatch):
    """`checkpoint.monitor` (Lightning's ModelCheckpoint) keeps the best validation's checkpoint and
    its export: what README's early-stopped text number was scored from. Validation falls here, so
    "max" must keep the first checkpoint, not the newest."""
    run = tmp_path / "run"
    config = write_config(tmp_path / "debug.yaml", run, steps=12, val_every=3, ckpt_every=1000)
    args = ["fit", "--config", str(config), "--checkpoint.monitor", "val/bpb_text", "--checkpoint.mode", mode]
    args += ["--checkpoint.save_top_k", "1", "--checkpoint.every_n_train_steps", "null"]
    args += ["--checkpoint.filename", "best-{step}"]
    assert run_cli(args, monkeypatch) == 0
    vals = series(metrics(run), "val/bpb_text")
    assert len(vals) == 4
    pick = min if mode == "min" else max
    best = pick(vals, key=lambda sv: sv[1])[0] + 1  # logged at step N - 1, saved as step N
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == [f"best-step={best}", f"best-step={best}.ckpt", "last", "last.ckpt"]
    assert json.loads((run / "checkpoints" / f"best-step={best}" / "config.json").read_text())["step"] == best
