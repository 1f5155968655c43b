"""Healed cells are scored on what was trained, not on a bf16 merge of it.

The base's weights sit on the bf16 grid (a bf16 checkpoint). The trained model computes in the healing
dtype (fp32 on a CPU) with the adapter unmerged; the old scoring merged the adapter into a bf16 reload in
bf16, where ``w += delta`` drops every part of the update below half a bf16 step (peft issue 1388;
MEASUREMENTS: at lr 3e-5 it kept none of the healing gain).
"""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import tiny_model
from ray_prune.core.heal.config import HealConfig
from ray_prune.core.heal.lora import merge_adapter, prepare_for_healing

DELTA = 2e-5  # per weight: below half a bf16 step for every weight of magnitude above ~0.005


def _with_update(base: torch.nn.Module, dtype: str):
    """``base`` with a rank-1 LoRA adapter adding DELTA to every FFN weight, computing in ``dtype``."""
    config = HealConfig(quantize="none", dtype=dtype, rank=1, alpha=1.0, dropout=0.0)
    model = prepare_for_healing(copy.deepcopy(base), config, device="cpu")
    for m in model.modules():
        if hasattr(m, "lora_A") and "default" in m.lora_A:
            m.lora_A["default"].weight.data.fill_(1.0)
            m.lora_B["default"].weight.data.fill_(DELTA)
    return model.eval()


@pytest.fixture
def base():
    return tiny_model("llama", num_layers=2, seed=0, dtype=torch.bfloat16)


def _ffn(model):
    return [m for n, m in model.named_modules() if n.endswith(("gate_proj", "up_proj", "down_proj"))
            and isinstance(m, torch.nn.Linear)]


def test_the_old_bf16_merge_drops_the_update_and_the_fp32_merge_keeps_it(base):
    old = _with_update(base, "bf16").merge_and_unload()  # what healed rows used to be scored on
    new = merge_adapter(_with_update(base, "bf16"), dtype=torch.float32)
    for o, n, b in zip(_ffn(old), _ffn(new), _ffn(base)):
        w = b.weight.data.float()
        kept = ((o.weight.data.float() - w).mean() / DELTA).item()
        assert kept < 0.5, f"the bf16 merge kept {kept:.0%} of the update"
        assert torch.allclose(n.weight.data - w, torch.full_like(w, DELTA), atol=1e-7)


def test_the_trained_model_scores_the_whole_update_the_bf16_merge_little_of_it(base):
    ids = torch.randint(3, 40000, (2, 32))
    trained = _with_update(base, "fp32")  # the bf16-grid weights, healed and scored in fp32, adapter unmerged
    with torch.no_grad():
        exact = merge_adapter(trained, dtype=torch.float32)(ids).logits
        plain = copy.deepcopy(base).float()(ids).logits
        scored = trained(ids).logits
        old = _with_update(base, "bf16").merge_and_unload().float()(ids).logits

    def seen(x):  # the share of the exact update a model's logits carry, along the update's direction
        d = exact - plain
        return ((x - plain) * d).sum().item() / (d * d).sum().item()

    assert seen(scored) == pytest.approx(1.0, abs=1e-3)
    assert seen(old) < 0.6, f"the bf16 merge carries {seen(old):.0%} of the update"
