"""How these exports were made: with the code of commit 3158485 (before issue 13's models/
restructure), run in a checkout of that commit: `python make.py OUT` (models/ imported from the
checkout itself). Each folder is a polybyte export (model.safetensors + config.json) of a small
randomly initialised backbone; expected.safetensors holds the ids, tags and each model's logits
(fp16) that this code computed. tests/test_exports_compat.py loads them with today's code."""
# ruff: noqa: E402, F401

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, ".")  # the checkout's own models/
from safetensors.torch import save_file

import models.blt  # registers the backbones with models.base
import models.megabyte
import models.transformer
from models import base

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
blt = {
    "backbone": "blt",
    "max_seq_len": 64,
    "patcher": {"kind": "entropy", "patch_size": 3, "max_patch_len": 6, "threshold": 1.0},
    "hash_ngrams": {"table_size": 31},
    "encoder": {"dim": 16, "n_layers": 1, "n_heads": 2, "window": 5},
    "latent": {"dim": 32, "n_layers": 2, "n_heads": 2},
    "decoder": {"dim": 16, "n_layers": 1, "n_heads": 2, "window": 7},
    "entropy_model": {"dim": 16, "n_layers": 1, "n_heads": 2, "window": 8, "max_seq_len": 64, "init_std": 0.5},
}
configs = {
    "transformer": {"backbone": "transformer", "dim": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 64, "window": 16},
    "megabyte": {
        "backbone": "megabyte",
        "patch_size": 4,
        "global_dim": 8,
        "global_layers": 2,
        "global_heads": 2,
        "local_dim": 16,
        "local_layers": 2,
        "local_heads": 2,
        "max_seq_len": 64,
    },
    "blt": blt,
}
g = torch.Generator().manual_seed(0)
text = torch.tensor([list(b"the cat sat on the mat; a dog ran by.  ok?")[:40]])
noise = torch.randint(0, 256, (1, 40), generator=g)
ids = torch.cat([text, noise])
modality = torch.tensor([258, 259])
expected = {"ids": ids, "modality": modality}
for name, cfg in configs.items():
    torch.manual_seed(0)
    m = base.build_model(dict(cfg)).eval()
    folder = out / name
    folder.mkdir(exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in m.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    info = {"model": base.config_to_dict(m.config), "modalities": {}}
    (folder / "config.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    with torch.no_grad():
        expected[f"{name}_logits"] = m(ids, modality).half().contiguous()
    print(name, sum(v.numel() for v in state.values()))
save_file(expected, str(out / "expected.safetensors"))
