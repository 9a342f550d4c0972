"""README's "CLI tour", run as written: every ``polybyte`` line of its bash block goes through the
real CLI (a subprocess of this interpreter's ``polybyte``) in one temporary folder, on small real
data placed at README's own paths. A command waits for the earlier ones whose outputs it names;
independent ones run two at a time.

The block is parsed from README.md on every run, so the test follows README when it changes.
What the test changes is listed below, each with its reason: SWAPPED (README text replaced,
placeholders and sizes too large for a 2-core CPU), APPENDED (arguments added to shorten a run)
and SKIPPED (commands not run). A listed entry that matches no README command fails the test,
and so does a README command of a subcommand with no check in CHECKS: a new line either runs and
is checked, or is listed here with its reason.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from polybyte.pipelines.runtime import shipped_config

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
POLYBYTE = [sys.executable, "-m", "polybyte.pipelines.cli"]

# (README text, what runs instead, why). Texts are compared as shell words; ``{demo}`` is the demo
# shards' folder (conftest's ``demo_shards``, the same cache the debug fit builds and reads).
SWAPPED = [
    (
        "--trainer.max_steps 50000",
        "--trainer.max_steps 2 --model.model.preset tiny --model.model.max_seq_len 256 --data.seq_len 256 "
        "--model.compile false --data.batch_size 2 --data.num_workers 0 --checkpoint.every_n_train_steps 2",
        "text-megabyte.yaml is the 170M base preset at 8192 bytes, compiled: the tiny preset at 256 bytes "
        "checks the config and its data/shards/text path in seconds",
    ),
    (
        "text=DIR image=DIR audio=DIR",
        "text=data/shards/text image={demo}/image audio={demo}/audio",
        "DIR is a placeholder; runs/debug was trained on the demo's 16 px patch2 images and 8 kHz mu-law "
        "audio, so its image and audio DIRs are the demo shards (the tour's own are 64 px and pcm16)",
    ),
    (
        "--ckpt ... --modality",
        "--ckpt runs/debug/checkpoints/last --modality",
        "`...` is a placeholder: the debug checkpoint (it knows text, image and audio)",
    ),
    ("--num 16", "--num 2", "16 images of 768 bytes sampled byte by byte take long on 2 cores"),
    (
        "--prompt-seconds 1",
        "--prompt-seconds 0.05",
        "the debug model's 780-byte window holds 0.1 s of its 8 kHz mu-law audio (an audio model's holds 1 s)",
    ),
    (
        "--max-bytes 2000",
        "--max-bytes 64",
        "the debug model's window is 780 bytes (a model trained at a longer seq_len takes 2000)",
    ),
]
# (README command prefix, words added at its end, why)
APPENDED = [
    (
        "polybyte fit --config configs/debug.yaml",
        "--trainer.max_steps 2 --trainer.val_check_interval 2 --trainer.limit_val_batches 1 "
        "--checkpoint.every_n_train_steps 2 --data.batch_size 2 --data.num_workers 0 --model.val_samples 0",
        "debug.yaml's 80 steps take over a minute on 2 cores: 2 steps of 2 windows, validated and saved once, "
        "no images sampled into TensorBoard at the validation (9 s for one CIFAR image)",
    ),
    (
        "polybyte validate",
        "--trainer.limit_val_batches 2 --data.num_workers 0",
        "validate scores every val sample of the demo data; two batches show it loads and scores",
    ),
    ("polybyte eval", "--max-samples 4", "every val sample of each source is more than a CPU test needs"),
    ("polybyte bench --what data", "--batches 3", "50 timed batches are more than a CPU test needs"),
]
# (README command prefix, why it is not run)
SKIPPED = [
    (
        "polybyte bench --what train",
        "times the shipped text configs (170M-parameter models at 8192 bytes, --peers: the bench extra): GPU work",
    ),
    (
        "polybyte bench --what sample",
        "times 64x64-image sampling of the base presets, cached and uncached: GPU work",
    ),
]


# --- README's block -----------------------------------------------------------------------------
def tour_block(text: str) -> str:
    """The first ```bash block under the "## CLI tour" heading."""
    section = re.search(r"^## CLI tour\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, 'README.md has no "## CLI tour" section'
    block = re.search(r"^```bash\n(.*?)^```", section.group(1), re.S | re.M)
    assert block, 'README.md\'s "## CLI tour" has no ```bash block'
    return block.group(1)


def tour_commands(block: str) -> list[list[str]]:
    """The block's ``polybyte`` command lines as words: ``\\`` continuations joined, comments
    dropped, optional ``[--flag ...]`` kept without their brackets."""
    lines, current = [], ""
    for raw in block.splitlines():
        current += raw
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        lines.append(current)
        current = ""
    commands = []
    for line in lines:
        words = shlex.split(re.sub(r"\[(--[^\]]*)\]", r"\1", line), comments=True)
        if words and words[0] == "polybyte":
            commands.append(words)
    return commands


def _find(words: list[str], part: list[str]) -> int:
    return next((i for i in range(len(words) - len(part) + 1) if words[i : i + len(part)] == part), -1)


def planned(commands: list[list[str]]) -> tuple[list[tuple[list[str], list[str]]], set[str]]:
    """``([(README words, words to run)], entries used)``; skipped commands are left out."""
    used: set[str] = set()
    runs = []
    for words in commands:
        line = " ".join(words)
        skip = [prefix for prefix, _ in SKIPPED if line.startswith(prefix)]
        if skip:
            used.add(skip[0])
            continue
        run = list(words)
        for old, new, _ in SWAPPED:
            i = _find(run, shlex.split(old))
            if i >= 0:
                run[i : i + len(shlex.split(old))] = shlex.split(new)
                used.add(old)
        for prefix, extra, _ in APPENDED:
            if line.startswith(prefix):
                run += shlex.split(extra)
                used.add(prefix)
        runs.append((words, run))
    return runs, used


def option(words: list[str], flag: str) -> str | None:
    """The value after the last ``flag`` (``--flag V``; the last one given wins), else None."""
    where = [i for i, w in enumerate(words[:-1]) if w == flag]
    return words[where[-1] + 1] if where else None


def values(words: list[str], flag: str) -> list[str]:
    """The words after ``flag`` up to the next option (``--data a=b c=d``)."""
    if flag not in words:
        return []
    rest = words[words.index(flag) + 1 :]
    end = next((i for i, w in enumerate(rest) if w.startswith("--")), len(rest))
    return rest[:end]


# --- what each command claims -------------------------------------------------------------------
def _check_shard(words, cwd, out):
    folder = cwd / option(words, "--out")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["modality"] == words[2]
    assert manifest["splits"]["train"]["samples"] > 0 and manifest["splits"]["val"]["samples"] > 0
    assert sorted(folder.glob("train-*.tar")) and sorted(folder.glob("val-*.tar"))


def run_root(words, cwd) -> Path:
    """The run folder of a fit/validate command: --trainer.default_root_dir, else its config's."""
    root = option(words, "--trainer.default_root_dir")
    if root is None:
        config = option(words, "--config")
        path = cwd / config if (cwd / config).is_file() else shipped_config(Path(config).name)
        root = yaml.safe_load(path.read_text())["trainer"]["default_root_dir"]
    return cwd / root


def _check_fit(words, cwd, out):
    checkpoints = run_root(words, cwd) / "checkpoints"
    assert (checkpoints / "last.ckpt").is_file()
    config = json.loads((checkpoints / "last" / "config.json").read_text())
    assert (checkpoints / "last" / "model.safetensors").is_file()
    steps = option(words, "--trainer.max_steps")
    assert config["step"] == int(steps) if steps else config["step"] > 0


def _check_validate(words, cwd, out):
    assert re.search(r"val/bpb_\w+\W+\d", out), out[-2000:]


def _check_eval(words, cwd, out):
    report = json.loads((cwd / option(words, "--out") / "report.json").read_text())
    names = [spec.split("=", 1)[0] for spec in values(words, "--data")]
    assert sorted(report["modalities"]) == sorted(names)
    for entry in report["modalities"].values():
        assert entry["samples"] > 0 and entry["bpb"] > 0
        assert ("codecs" in entry) == ("--codecs" in words)
    assert (cwd / option(words, "--out") / "report.md").is_file()


def _check_sample(words, cwd, out):
    folder = cwd / option(words, "--out")
    ext = {"image": "png", "audio": "wav", "text": "txt"}[option(words, "--modality")]
    files = sorted(folder.glob(f"{option(words, '--modality')}_*.{ext}"))
    assert len(files) == int(option(words, "--num") or 4), files
    assert all(f.stat().st_size > 0 for f in files)
    if option(words, "--modality") == "image":
        assert (folder / "grid.png").is_file()


def _check_plot(words, cwd, out):
    with Image.open(cwd / (option(words, "--out") or "curves.png")) as im:
        assert im.width > 100 and im.height > 100
    assert "validation points" in out


def _check_bench(words, cwd, out):
    assert "bytes/s" in out


def _check_import(words, cwd, out):
    folder = cwd / option(words, "--out")
    config = json.loads((folder / "config.json").read_text())
    assert config["model"]["backbone"] == "blt" and config["source"]["format"] == "transformers BltForCausalLM"
    assert (folder / "model.safetensors").is_file() and (folder / "README.md").is_file()


CHECKS = {
    "shard": _check_shard,
    "fit": _check_fit,
    "validate": _check_validate,
    "eval": _check_eval,
    "sample": _check_sample,
    "plot": _check_plot,
    "bench": _check_bench,
    "import": _check_import,
}


# --- README's inputs, from the development data ---------------------------------------------------
def _tar_subset(src: Path, dst: Path, n: int) -> None:
    """The first ``n`` samples (all members of each key) of a webdataset tar."""
    keys: list[str] = []
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for member in tin:
            key = member.name.split(".", 1)[0]
            if key not in keys:
                if len(keys) == n:
                    break
                keys.append(key)
            tout.addfile(member, tin.extractfile(member))


def place_inputs(cwd: Path, data: Path) -> None:
    """README's inputs at README's paths: a corpus, notes, an ImageNet-64 batch, photos,
    recordings, CIFAR-10 webdataset tars and the three prompt files."""
    text = (data / "text" / "tinyshakespeare.txt").read_text()
    (cwd / "corpus").mkdir()
    (cwd / "corpus" / "tinyshakespeare.txt").write_text(text)
    speeches = [s for s in text.split("\n\n") if len(s) > 200][:12]
    (cwd / "notes.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in speeches))
    (cwd / "start.txt").write_text(speeches[0][:120])

    batch = np.load(data / "image" / "imagenet64_sample.npz")
    (cwd / "Imagenet64_train").mkdir()
    np.savez(cwd / "Imagenet64_train" / "train_data_batch_1.npz", data=batch["data"][:24], labels=batch["labels"][:24])

    (cwd / "cifar10").mkdir()
    _tar_subset(data / "image" / "cifar10" / "train-000000.tar", cwd / "cifar10" / "train-000000.tar", 48)
    _tar_subset(data / "image" / "cifar10" / "train-000009.tar", cwd / "cifar10" / "train-000009.tar", 12)
    (cwd / "photos").mkdir()
    with tarfile.open(data / "image" / "cifar10" / "train-000001.tar") as tar:
        jpegs = [m for m in tar.getmembers() if m.name.endswith(".jpg")]
        for m in jpegs[:3]:
            (cwd / "photos" / m.name).write_bytes(tar.extractfile(m).read())
        cat = next(m for m in jpegs if "_cat_" in m.name)
        # a 32x32 CIFAR cat with an alpha channel: sampling converts it to the model's 16x16 RGB
        Image.open(io.BytesIO(tar.extractfile(cat).read())).convert("RGBA").save(cwd / "cat.png")

    wavs = sorted((data / "audio" / "fsdd").glob("*.wav"))[::50]  # 40 recordings, several speakers
    (cwd / "recordings").mkdir()
    for wav in wavs:
        shutil.copy(wav, cwd / "recordings" / wav.name)
    shutil.copy(wavs[0], cwd / "speech.wav")

    # a transformers BLT folder of a tiny random model where README downloads BLT-1B (test extra:
    # transformers), and the fine-tune config README's `--model.init_from` line names
    import transformers
    from test_blt_hf_parity import VARIANTS, hf_config

    torch.manual_seed(0)
    transformers.BltForCausalLM(hf_config(VARIANTS["released-layout"], threshold=5.0)).save_pretrained(
        cwd / "blt-1b-hf"
    )
    finetune = {
        "trainer": dict(max_steps=2, limit_val_batches=1, val_check_interval=2, default_root_dir="runs/finetune"),
        "checkpoint": dict(every_n_train_steps=2),
        "model": dict(lr=1e-3, warmup_steps=1, val_samples=0),
        "data": dict(sources={"text": "data/shards/text"}, weights=None, seq_len=96, batch_size=2, num_workers=0),
    }
    (cwd / "my-finetune.yaml").write_text(yaml.safe_dump(finetune))


# --- the tests ----------------------------------------------------------------------------------
def test_tour_lists_match_readme():
    """Every SWAPPED / APPENDED / SKIPPED entry matches a README command, and every README command
    is run by a subcommand that CHECKS knows."""
    commands = tour_commands(tour_block(README.read_text()))
    assert len(commands) >= 10, commands
    runs, used = planned(commands)
    listed = [e[0] for e in SWAPPED] + [e[0] for e in APPENDED] + [e[0] for e in SKIPPED]
    assert [e for e in listed if e not in used] == [], "entries that match no README command"
    unchecked = [" ".join(words) for words, _ in runs if words[1] not in CHECKS]
    assert unchecked == [], "README commands of a subcommand with no check: add one to CHECKS"
    assert all(len(e) == 3 and e[2] for e in SWAPPED + APPENDED)
    assert all(len(e) == 2 and e[1] for e in SKIPPED)


def test_tour_parsing():
    block = (
        "# a comment with polybyte in it\n"
        "polybyte fit --config a.yaml \\\n"
        "    --data.sources '{image: x/}'   # trailing comment\n"
        'polybyte eval --ckpt c --data "image=x/t-00000[89].tar" [--stride 8] [--quiet]\n'
        "pip install polybyte\n"
    )
    assert tour_commands(block) == [
        ["polybyte", "fit", "--config", "a.yaml", "--data.sources", "{image: x/}"],
        ["polybyte", "eval", "--ckpt", "c", "--data", "image=x/t-00000[89].tar", "--stride", "8", "--quiet"],
    ]


# --- running the tour ----------------------------------------------------------------------------
LANES = 2  # commands run at once, each on one thread: the machine has 2 cores
TIMEOUT_S = 300  # per command


def outputs(words: list[str], cwd: Path) -> list[str]:
    """The paths a command writes (relative to the tour folder)."""
    if words[1] in ("fit", "validate"):
        return [run_root(words, cwd).relative_to(cwd).as_posix()]
    out = option(words, "--out") or ("curves.png" if words[1] == "plot" else None)
    return [out] if out else []


def references(words: list[str], cwd: Path) -> str:
    """A command's words, and for fit/validate its config's data sources: what it may read."""
    text = " ".join(words)
    if words[1] in ("fit", "validate"):
        config = option(words, "--config")
        path = cwd / config if (cwd / config).is_file() else shipped_config(Path(config).name)
        data = yaml.safe_load(path.read_text()).get("data", {})
        text += f" {data.get('sources')} {data.get('val_sources')}"
    return text


def dependencies(runs: list[list[str]], cwd: Path) -> list[set[int]]:
    """For each command, the earlier ones it must wait for: those writing a path it names (or its
    config reads), or naming a path it writes."""
    refs = [references(run, cwd) for run in runs]
    outs = [outputs(run, cwd) for run in runs]
    return [
        {i for i in range(j) if any(o in refs[j] for o in outs[i]) or any(o in refs[i] for o in outs[j])}
        for j in range(len(runs))
    ]


@pytest.mark.slow
def test_readme_cli_tour(tmp_path, shared_data, demo_shards):
    """Every README tour command (as SWAPPED / APPENDED change it) exits 0 and leaves what it
    claims (CHECKS); independent commands run side by side, dependent ones in README order."""
    cwd, logs = tmp_path / "tour", tmp_path / "logs"
    cwd.mkdir()
    logs.mkdir()
    place_inputs(cwd, shared_data)
    demo = str(Path(demo_shards["text"]).parent)
    env = {
        **os.environ,
        "POLYBYTE_CACHE": str(Path(demo).parents[1]),  # the session's demo shards, built once
        "OMP_NUM_THREADS": "1",  # tiny models on a shared 2-core machine (see conftest's one_thread)
        "COLUMNS": "200",
    }
    plan = planned(tour_commands(tour_block(README.read_text())))[0]
    runs = [[w.replace("{demo}", demo) for w in run] for _, run in plan]
    deps = dependencies(runs, cwd)
    pending, running, done, failures = list(range(len(runs))), {}, set(), []
    try:
        while running or (pending and not failures):
            ready = [j for j in pending if deps[j] <= done]
            while ready and len(running) < LANES and not failures:
                j = ready.pop(0)
                pending.remove(j)
                out, err = (logs / f"{j:02d}.out").open("w"), (logs / f"{j:02d}.err").open("w")
                proc = subprocess.Popen(POLYBYTE + runs[j][1:], cwd=cwd, env=env, stdout=out, stderr=err)
                running[j] = (proc, time.perf_counter(), out, err)
            time.sleep(0.05)
            for j, (proc, start, out, err) in list(running.items()):
                seconds = time.perf_counter() - start
                if proc.poll() is None and seconds < TIMEOUT_S:
                    continue
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                out.close()
                err.close()
                del running[j]
                stdout, stderr = (logs / f"{j:02d}.out").read_text(), (logs / f"{j:02d}.err").read_text()
                print(f"{seconds:6.1f} s  {' '.join(runs[j])}", file=sys.stderr)
                try:
                    assert proc.returncode == 0, f"exit status {proc.returncode}" + (
                        f" (killed after {TIMEOUT_S} s)" if seconds >= TIMEOUT_S else ""
                    )
                    CHECKS[runs[j][1]](runs[j], cwd, stdout)
                    if runs[j][1] == "sample" and option(runs[j], "--prompt") == "cat.png":
                        # the CIFAR cat is converted to the debug model's images, and says so once
                        notes = [line for line in stderr.splitlines() if line.startswith("prompt ")]
                        assert notes == ["prompt cat.png: 32x32 RGBA -> 16x16 RGB (the model's settings)"], notes
                    done.add(j)
                except Exception as e:  # noqa: BLE001 — a failed check, or a check's own error
                    failures.append(
                        f"README: {' '.join(plan[j][0])}\nran: {' '.join(runs[j])}\n{e}\n"
                        f"--- stdout\n{stdout[-3000:]}\n--- stderr\n{stderr[-3000:]}"
                    )
    finally:  # an interrupted test leaves no command running
        for proc, *_ in running.values():
            proc.kill()
            proc.wait()
    assert not failures, "\n\n".join(failures)
    assert done == set(range(len(runs)))
