import math

import pytest
import torch

from polybyte.models.entropy import byte_entropies, compute_entropies, entropy_model_config, step_entropies
from polybyte.models.transformer import Transformer

TEXT, IMAGE, AUDIO, PAD = 258, 259, 260, 256


def entropy_model(window=6) -> Transformer:
    torch.manual_seed(0)
    cfg = entropy_model_config(dim=32, n_layers=2, n_heads=4, window=window, max_seq_len=64)
    return Transformer(cfg).eval()


def test_byte_entropies_known_distributions():
    V = 264
    uniform = torch.zeros(2, 3, V)
    assert torch.allclose(byte_entropies(uniform), torch.full((2, 3), math.log(V)))
    two = torch.full((V,), -torch.inf)
    two[[5, 9]] = 0.0  # two equally likely bytes, the rest impossible
    certain = torch.full((V,), -torch.inf)
    certain[0] = 3.0
    h = byte_entropies(torch.stack([two, certain]).to(torch.bfloat16))
    assert h.dtype == torch.float32
    assert torch.allclose(h, torch.tensor([math.log(2), 0.0]))


def test_entropies_of_a_row_do_not_depend_on_the_other_rows():
    model = entropy_model()
    g = torch.Generator().manual_seed(3)
    row = torch.randint(0, 256, (1, 40), generator=g)
    alone = compute_entropies(model, row, torch.tensor([TEXT]))
    others = torch.randint(0, 256, (3, 40), generator=g)
    others[1, 10:] = PAD  # a short padded row
    others[2] = 0  # all 0x00
    batch = torch.cat([others[:1], row, others[1:]])
    batched = compute_entropies(model, batch, torch.tensor([IMAGE, TEXT, AUDIO, TEXT]))
    assert alone.shape == (1, 40)
    assert (batched[1] - alone[0]).abs().max() < 1e-5
    # and the entropies are real per-row quantities: another row's context gives other values
    assert (batched[0] - alone[0]).abs().max() > 1e-3


def test_entropies_are_causal_per_position():
    model = entropy_model()
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(4))
    base = compute_entropies(model, ids, torch.tensor([TEXT, TEXT]))
    changed = ids.clone()
    changed[:, 12] ^= 0xFF
    out = compute_entropies(model, changed, torch.tensor([TEXT, TEXT]))
    # entropies[:, p] conditions on bytes < p: byte 12 first matters at p = 13
    assert (out[:, :13] - base[:, :13]).abs().max() < 1e-5
    assert (out[:, 13] - base[:, 13]).abs().max() > 1e-4


@pytest.mark.parametrize("window", [6, 64])
def test_incremental_entropies_match_full(window):
    model = entropy_model(window)
    ids = torch.randint(0, 256, (2, 25), generator=torch.Generator().manual_seed(5))
    mod = torch.tensor([TEXT, AUDIO])
    full = compute_entropies(model, ids, mod)
    cache = model.new_cache(2, max_len=26)
    stream = torch.cat([mod[:, None], ids], 1)  # [tag, b0, b1, ...]
    parts = [step_entropies(model, stream[:, :8], cache)]  # a prompt chunk
    parts += [step_entropies(model, stream[:, t : t + 1], cache) for t in range(8, 25)]
    stepped = torch.cat(parts, 1)  # entropies of bytes 0..24
    assert (stepped - full).abs().max() < 1e-5


def test_entropy_model_needs_a_window():
    with pytest.raises(ValueError, match="sliding-window"):
        entropy_model_config(window=None)
