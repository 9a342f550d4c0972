"""An imported transformers BLT through the rest of polybyte: `polybyte fit --model.init_from DIR`
fine-tunes it for a few steps on CPU, then `polybyte sample` and `polybyte eval` run on the
result, and `polybyte.load` on the import itself."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")

from test_blt_hf_parity import VARIANTS, hf_config  # noqa: E402

import polybyte  # noqa: E402
from polybyte.pipelines import cli  # noqa: E402
from polybyte.pipelines.export import load_exported  # noqa: E402


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.BltForCausalLM(hf_config(VARIANTS["released-layout"], threshold=5.0)).eval()
    root = tmp_path_factory.mktemp("import")
    hf.save_pretrained(root / "hf")
    card = "---\nlicense: other\nlicense_name: fair-noncommercial-research-license\n---\n"
    (root / "hf" / "README.md").write_text(card)
    assert cli.main(["import", "blt", str(root / "hf"), "--out", str(root / "export")]) == 0
    return root / "export"


def test_import_card_and_load(imported):
    card = (imported / "README.md").read_text()
    assert "license: fair-noncommercial-research-license" in card and "`blt`" in card
    info = json.loads((imported / "config.json").read_text())
    assert info["source"]["format"] == "transformers BltForCausalLM" and list(info["modalities"]) == ["text"]
    model = polybyte.load(imported, device="cpu")
    text = model.generate("text", "To be", max_bytes=16, seed=0)
    assert isinstance(text, str) and text.startswith("To be")
    assert model.score(b"To be, or not to be", modality="text") > 0


def test_fit_init_from_then_sample_and_eval(imported, demo_shards, tmp_path, monkeypatch):
    run = tmp_path / "run"
    config = {
        "trainer": dict(
            max_steps=3,
            val_check_interval=3,
            limit_val_batches=1,
            log_every_n_steps=1,
            num_sanity_val_steps=0,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(run),
        ),
        "checkpoint": dict(every_n_train_steps=3),
        "model": dict(init_from=str(imported), lr=1e-3, warmup_steps=1, val_samples=0),
        "data": dict(sources={"text": str(demo_shards["text"])}, weights=None, seq_len=96, batch_size=2, num_workers=0),
    }
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setattr(sys, "argv", ["polybyte"])
    assert cli.main(["fit", "--config", str(path)]) == 0
    last = run / "checkpoints" / "last"
    tuned, info = load_exported(last)
    start, start_info = load_exported(imported)
    assert info["step"] == 3 and info["model"] == start_info["model"]
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, start.state_dict()[k])]
    assert changed and not any(k.startswith("entropy_model.") for k in changed)  # frozen entropy model
    out = tmp_path / "samples"
    args = ["--ckpt", str(last), "--modality", "text", "--num", "1", "--max-bytes", "24", "--out", str(out)]
    assert cli.main(["sample", *args, "--seed", "0", "--device", "cpu"]) == 0
    assert list(out.iterdir())
    report = tmp_path / "report"
    eval_args = ["--ckpt", str(last), "--data", f"text={demo_shards['text']}", "--out", str(report)]
    assert cli.main(["eval", *eval_args, "--max-samples", "2", "--device", "cpu", "--quiet"]) == 0
    assert (report / "report.json").is_file()


def test_init_from_refuses_a_shape_change(imported, demo_shards, monkeypatch, capsys):
    from polybyte.pipelines.training import ByteLMModule

    with pytest.raises(ValueError, match="model.init_from .*: its weights do not fit model.model"):
        ByteLMModule(model={"encoder": {"dim": 64}}, init_from=str(imported))
