"""Banks against Hugging Face PEFT itself (skipped without torch / transformers / peft).

Three PEFT adapters of different ranks, scales and target modules on one tiny transformers Llama are
saved by PEFT and imported one by one into a jlora bank (``import_peft`` per name, then
``stack_adapters``). References, all computed by PEFT in PyTorch:

* a mixed batch: PEFT's ``model(input_ids, adapter_names=[...])`` (one pass per adapter, per layer)
  against jlora's ``apply(params, ids, adapter_ids=...)``, unrolled and scanned layers;
* weighted combination: PEFT's ``add_weighted_adapter(..., combination_type=linear | cat | svd)``
  then the combined adapter's logits, against ``jlora.combine_adapters`` with the same weights.
"""

from __future__ import annotations

import copy

import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from test_peft import PROJ, _torch_logits, tiny  # noqa: F401  (tiny: the module-scoped model fixture)

NAMES = ("en", "de", "fr")  # not "a"/"b": PEFT warns about names inside its "lora_" prefix


@pytest.fixture(scope="module")
def bank_setup(tiny, tmp_path_factory):  # noqa: F811
    torch, peft = tiny["torch"], tiny["peft"]
    configs = {
        "en": peft.LoraConfig(r=4, lora_alpha=8, target_modules=PROJ, task_type="CAUSAL_LM"),
        "de": peft.LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"),
        "fr": peft.LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "o_proj", "up_proj"], task_type="CAUSAL_LM"),
    }
    pm = peft.get_peft_model(copy.deepcopy(tiny["hf"]), configs["en"], adapter_name="en")
    for name in ("de", "fr"):
        pm.add_adapter(name, configs[name])
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.2)
    d = tmp_path_factory.mktemp("peft_bank")
    pm.save_pretrained(str(d))  # one sub-directory per adapter name
    pm.eval()
    ids = np.random.default_rng(5).integers(0, 97, (4, 8)).astype(np.int32)
    return dict(pm=pm, dir=d, ids=ids)


def _bank(tiny, setup, scan):  # noqa: F811
    base = tiny["flax"][scan][1]
    bank = jlora.stack_adapters({n: jlora.import_peft(setup["dir"] / n, base) for n in NAMES})
    return base, bank


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_mixed_batch_against_peft_adapter_names(tiny, bank_setup, scan):  # noqa: F811
    torch, pm = tiny["torch"], bank_setup["pm"]
    base, bank = _bank(tiny, bank_setup, scan)
    l0 = bank["params"]["layers" if scan else "layers_0"]
    assert l0["self_attn"]["q_proj"]["kernel"].ranks == (4, 2, 4)
    assert l0["mlp"]["gate_proj"]["kernel"].ranks == (4, 0, 0)
    names = ["de", "__base__", "en", "fr"]
    pm.set_adapter("en")
    with torch.no_grad():
        want = pm(input_ids=torch.tensor(bank_setup["ids"]), adapter_names=names).logits.float().numpy()
    ids = jnp.asarray(bank_setup["ids"])
    got = np.asarray(tiny["applies"][scan](jlora.combine(bank, base), ids, adapter_ids=jlora.adapter_ids(bank, names)))
    base_logits = np.asarray(tiny["flax"][scan][0].apply(base, ids))
    moved = [float(np.abs(want[e] - base_logits[e]).max()) for e in range(4)]
    assert min(moved[0], moved[2], moved[3]) > 0.1, moved  # every adapter matters
    np.testing.assert_allclose(got[1], base_logits[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method,adapters,weights,rank", [
    ("linear", ("en", "fr"), (0.7, 0.5), None),  # equal ranks (4); different targets and scales
    ("cat", ("en", "de", "fr"), (0.6, -0.8, 1.2), None),
    ("svd", ("en", "de"), (1.0, 0.5), None),  # rank: the largest of the two (4)
    ("svd", ("de", "fr"), (1.5, -0.5), 3),
])
def test_combine_adapters_against_peft_add_weighted_adapter(tiny, bank_setup, method, adapters, weights, rank):  # noqa: F811
    torch, pm = tiny["torch"], bank_setup["pm"]
    base, bank = _bank(tiny, bank_setup, False)
    name = f"mix_{method}_{'_'.join(adapters)}"
    pm.add_weighted_adapter(list(adapters), list(weights), name, combination_type=method, svd_rank=rank)
    pm.set_adapter(name)
    want = _torch_logits(torch, pm, bank_setup["ids"])
    pm.set_adapter("en")
    mixed = jlora.combine_adapters(bank, dict(zip(adapters, weights)), method=method, rank=rank)
    q = mixed["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.scale == 1.0 and q.rank == {"linear": 4, "cat": 10, "svd": rank or 4}[method]
    ids = jnp.asarray(bank_setup["ids"])
    got = np.asarray(tiny["applies"][False](jlora.combine(mixed, base), ids))
    assert np.abs(want - np.asarray(tiny["flax"][False][0].apply(base, ids))).max() > 0.1
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
