"""`polybyte bench --what train`: peers in the same run, rows as measured, clear errors."""

from __future__ import annotations

import json

import pytest
import yaml

from polybyte.pipelines import bench

pytestmark = pytest.mark.usefixtures("one_thread")

MEGABYTE = dict(
    backbone="megabyte",
    patch_size=4,
    global_dim=16,
    global_layers=1,
    global_heads=2,
    local_dim=32,
    local_layers=1,
    local_heads=2,
    max_seq_len=64,
)
BLT = dict(
    backbone="blt",
    max_seq_len=64,
    patcher=dict(kind="entropy", patch_size=4, max_patch_len=16, max_patches_ratio=1.25),
    hash_ngrams=dict(sizes=[3, 4], table_size=64),
    encoder=dict(dim=32, n_layers=1, n_heads=2, window=16),
    latent=dict(dim=64, n_layers=1, n_heads=2),
    decoder=dict(dim=32, n_layers=1, n_heads=2, window=16),
    entropy_model=dict(dim=32, n_layers=1, n_heads=2, window=16, max_seq_len=64),
)


def write(tmp_path, name, model):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"model": {"model": model}}))
    return str(path)


def test_peers_are_timed_beside_ours_in_the_same_run(tmp_path, capsys):
    missing = bench.missing_peers()
    if missing:
        pytest.skip(f"bench extra not installed (missing {missing})")
    configs = [write(tmp_path, "mb.yaml", MEGABYTE), write(tmp_path, "blt.yaml", BLT)]
    out_json = tmp_path / "rows.json"
    argv = [
        "--what",
        "train",
        "--model",
        *configs,
        "--peers",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--train-batch-size",
        "2",
        "--json",
        str(out_json),
    ]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    rows = json.loads(out_json.read_text())
    assert [r["name"] for r in rows] == [
        "mb.yaml",
        "lucidrains MEGABYTE @ mb.yaml",
        "blt.yaml",
        "transformers BLT @ blt.yaml",
    ]
    ours, peer = rows[0], rows[1]
    assert ours["peer"] == peer["name"] and ours["vs_peer"] == pytest.approx(ours["bytes_per_s"] / peer["bytes_per_s"])
    assert peer["ours_vs_peer"] == pytest.approx(ours["vs_peer"]) and peer["impl"] == "MEGABYTE_pytorch"
    assert rows[3]["impl"] == "transformers" and rows[2]["mean_patch_len"] > 0
    # every row is announced, then printed as it is measured, and each of ours gets its ratio
    assert out.index("mb.yaml: warming up") < out.index("lucidrains MEGABYTE @ mb.yaml: warming up")
    assert f"mb.yaml: {ours['vs_peer']:.2f}x lucidrains MEGABYTE" in out
    assert "blt.yaml: " in out and "x transformers BLT @ blt.yaml (bytes/s, same run)" in out


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--model", "no/such.yaml"], "config not found: no/such.yaml"),
        (["--steps", "0"], "--steps and --train-batch-size must be >= 1"),
        (["--text", "no/such.txt"], "--text no/such.txt: no such file"),
        (["--peers"], "--peers needs the bench extra"),
    ],
)
def test_bad_train_input_is_one_line_and_exit_2(extra, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "missing_peers", lambda: ["MEGABYTE_pytorch"])
    config = write(tmp_path, "mb.yaml", MEGABYTE)
    argv = ["--what", "train", "--model", config, *extra] if "--model" not in extra else ["--what", "train", *extra]
    assert bench.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("polybyte bench: ") and message in err


def test_a_config_without_a_model_section_is_refused(tmp_path, capsys):
    path = tmp_path / "empty.yaml"
    path.write_text("trainer: {}\n")
    assert bench.main(["--what", "train", "--model", str(path)]) == 2
    assert "not a LightningCLI config with a model.model section" in capsys.readouterr().err


def test_sample_peers_time_transformers_generate_on_the_same_weights(tmp_path, capsys, one_thread):
    """`bench --what sample --peers` on a transformers BLT folder: ours (imported in memory) and
    transformers' own generate, same weights, same run; the JSON holds both speeds."""
    transformers = pytest.importorskip("transformers")
    import torch
    from test_blt_hf_parity import VARIANTS, hf_config

    torch.manual_seed(0)
    transformers.BltForCausalLM(hf_config(VARIANTS["released-layout"], threshold=3.0)).save_pretrained(tmp_path / "hf")
    out = tmp_path / "bench.json"
    args = ["--what", "sample", "--model", str(tmp_path / "hf"), "--peers", "--modality", "text"]
    args += ["--sample-bytes", "24", "--uncached-bytes", "8", "--sample-batch-size", "2", "--json", str(out)]
    capsys.readouterr()
    assert bench.main(args) == 0
    printed = capsys.readouterr().out
    assert "transformers generate (greedy, use_cache=False)" in printed and "same weights" in printed
    (r,) = json.loads(out.read_text())
    assert r["backbone"] == "blt" and r["transformers_bytes_per_s"] > 0 and r["cached_short_bytes_per_s"] > 0
