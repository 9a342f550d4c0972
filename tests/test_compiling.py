"""Training compile scopes: which layers are compiled, same numbers as eager, no recompiles per step."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_blt_config

from polybyte.models import build_model
from polybyte.models.base import nll_loss
from polybyte.models.blt import BLT
from polybyte.models.megabyte import MegabyteConfig
from polybyte.models.transformer import TransformerConfig
from polybyte.pipelines.compiling import compile_for_training, compile_scope, repeated_layers

pytestmark = pytest.mark.usefixtures("one_thread")
TEXT, PAD = 258, 256


def tiny_blt() -> BLT:
    """conftest's tiny BLT with entropy patching at a fixed patch capacity, 3 latent layers."""
    return BLT(
        tiny_blt_config(
            dict(kind="entropy", patch_size=3, max_patch_len=6, threshold=1.0, max_patches_ratio=3.0),
            latent=dict(dim=48, n_layers=3, n_heads=2),
            entropy_model=dict(n_layers=2),
        )
    )


def tiny_models():
    return {
        "transformer": build_model(
            {
                "backbone": "transformer",
                **dataclasses.asdict(TransformerConfig(dim=32, n_layers=3, n_heads=2, max_seq_len=64)),
            }
        ),
        "megabyte": build_model(
            {
                "backbone": "megabyte",
                **dataclasses.asdict(
                    MegabyteConfig(
                        patch_size=4,
                        global_dim=16,
                        global_layers=2,
                        global_heads=2,
                        local_dim=32,
                        local_layers=2,
                        local_heads=2,
                        max_seq_len=64,
                    )
                ),
            }
        ),
        "blt": tiny_blt(),
    }


def test_compile_scope_names_the_choices():
    assert compile_scope(False) is None and compile_scope(True) == "blocks" and compile_scope("model") == "model"
    with pytest.raises(ValueError, match="blocks, model"):
        compile_scope("fast")
    from polybyte.pipelines.lit import ByteLMModule

    with pytest.raises(ValueError, match="compile"):
        ByteLMModule(model={"backbone": "transformer", "dim": 32, "n_layers": 1, "n_heads": 2}, compile="fast")


def test_repeated_layers_are_each_list_element_once():
    model = tiny_blt()
    layers = repeated_layers(model)
    c = model.config
    expected = (
        c.encoder.n_layers * 2
        + c.latent.n_layers
        + c.decoder.n_layers * 2  # blocks + cross layers
        + c.entropy_model.n_layers
    )
    assert len(layers) == expected == len({id(m) for m in layers})
    assert all(not isinstance(m, torch.nn.ModuleList) for m in layers)


def rows(seed: int, T: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    alphabet = torch.tensor(list(b"etaoin shrdlu ,.\n"))
    ids = alphabet[torch.randint(len(alphabet), (2, T), generator=g)]
    ids[1, 40 + seed % 10 :] = PAD  # other patch counts per batch
    return ids


DEVICES = [
    pytest.param("cpu", "eager", id="cpu"),  # dynamo's tracing and guards; dense masks
    pytest.param("cuda", "inductor", id="cuda", marks=pytest.mark.gpu),  # kernels; FlexAttention block masks
]


@pytest.mark.parametrize("device, backend", DEVICES)
@pytest.mark.parametrize("name", ["transformer", "megabyte", "blt"])
def test_block_compiled_training_matches_eager_and_never_recompiles(name, device, backend):
    """Compiled blocks give eager's loss and gradients, and later steps (other data, other BLT
    patch counts, the entropy model under no_grad, new block masks) reuse the graphs of the first step."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = tiny_models()[name].to(device)
    compiled = tiny_models()[name].to(device)
    compiled.load_state_dict(eager.state_dict())
    net = compile_for_training(compiled, "blocks", backend=backend)
    assert net is compiled  # in place: the module tree and its state-dict keys are unchanged
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    modality = torch.tensor([TEXT, TEXT], device=device)

    def step(model, ids):
        model.zero_grad(set_to_none=True)
        loss, _ = nll_loss(model(ids, modality), ids, PAD)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    step(net, rows(0).to(device))  # first step: compiles
    torch._dynamo.config.error_on_recompile = True
    try:
        for seed in (1, 2):
            ids = rows(seed).to(device)
            loss_c, grads_c = step(net, ids)
            loss_e, grads_e = step(eager, ids)
            assert torch.allclose(loss_c, loss_e, atol=1e-4)
            assert grads_c.keys() == grads_e.keys()
            for k in grads_e:
                assert torch.allclose(grads_c[k], grads_e[k], atol=1e-4, rtol=1e-3), k
    finally:
        torch._dynamo.config.error_on_recompile = False
        torch._dynamo.reset()
