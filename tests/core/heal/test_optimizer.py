"""The heal optimizer setting: ``paged_adamw_8bit`` trains through bitsandbytes' 8-bit AdamW where the device runs
it, resumes exactly, keeps existing cell ids, and is refused with a fix where bitsandbytes cannot run it."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model, tiny_spec

from ray_prune.core.data import load_texts
from ray_prune.core.heal.config import HealConfig
from ray_prune.core.heal.loop import HealReport, heal
from ray_prune.core.heal.lora import prepare_for_healing
from ray_prune.errors import UserError

# rank 64 on a 64-wide tiny model: LoRA tensors of 64 x 64 elements and more, which bitsandbytes keeps in 8 bits (it
# keeps tensors under 4096 elements in 32 bits)
FAST = dict(batch_size=2, seq_len=16, lr=1e-2, warmup_steps=1, val_sequences=2, quantize="none", rank=64,
            target="all-linear", eval_every=1)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def texts(data_dir):
    return load_texts("heal", 12), load_texts("selection", 2)


def _run(config: HealConfig, tokenizer, texts, **kw):
    base = tiny_model("llama")
    base.get_output_embeddings().weight.data.mul_(10)  # sharper logits: LoRA can move the loss in a few steps
    with pytest.warns(UserWarning, match="not paged") if config.optimizer != "adamw" else _nothing():
        return heal(prepare_for_healing(base, config), tokenizer, config, train_texts=texts[0], val_texts=texts[1],
                    progress=False, **kw)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_paged_adamw_8bit_trains_with_8bit_moments_close_to_adamw(tokenizer, texts):
    doc = texts[0][0]
    memorise = ([doc] * 4, [doc])  # one document over and over, validated on itself: the loss must fall
    config = HealConfig(steps=12, optimizer="paged_adamw_8bit", **{**FAST, "eval_every": 4})
    _, eight = _run(config, tokenizer, memorise)
    _, plain = _run(HealConfig(**{**config.__dict__, "optimizer": "adamw"}), tokenizer, memorise)
    assert eight[-1].val_loss < eight[0].val_loss - 0.2  # it trains
    assert [r.val_loss for r in eight] != [r.val_loss for r in plain]  # 8-bit moments: other updates ...
    drop = plain[0].val_loss - plain[-1].val_loss
    assert eight[0].val_loss - eight[-1].val_loss > 0.5 * drop > 0  # ... that learn at a comparable pace

    from ray_prune.core.heal import loop

    params = [torch.nn.Parameter(torch.randn(64, 64))]
    optimizer, _ = loop._optimizer(params, config, torch.device("cpu"))
    params[0].grad = torch.randn(64, 64)
    optimizer.step()
    assert optimizer.state[params[0]]["state1"].dtype == torch.uint8  # the moments are 8-bit


def test_paged_adamw_8bit_resumes_exactly(tokenizer, texts, tmp_path):
    config = HealConfig(steps=4, optimizer="paged_adamw_8bit", **FAST)
    _, full = _run(config, tokenizer, texts, checkpoint_dir=tmp_path / "full")

    class Killed(Exception):
        pass

    def die_at_2(report: HealReport) -> None:
        if report.step == 2:
            raise Killed

    with pytest.raises(Killed):
        _run(config, tokenizer, texts, checkpoint_dir=tmp_path / "run", callback=die_at_2)
    _, resumed = _run(config, tokenizer, texts, checkpoint_dir=tmp_path / "run", resume_from=tmp_path / "run")
    assert [(r.step, r.val_loss, r.train_loss) for r in resumed] == [(r.step, r.val_loss, r.train_loss) for r in full]
    with pytest.raises(UserError, match="optimizer"):  # the 8-bit state does not resume a plain AdamW run
        _run(HealConfig(steps=4, **FAST), tokenizer, texts, resume_from=tmp_path / "run")


def test_a_device_bitsandbytes_cannot_run_is_refused_with_the_fix(monkeypatch):
    import bitsandbytes as bnb

    from ray_prune.core.heal import loop

    def broken(*args, **kwargs):
        raise NotImplementedError("no 8-bit optimizer kernel for this backend")

    monkeypatch.setattr(bnb.optim.AdamW8bit, "step", broken)  # what a CPU build without its kernels does
    params = [torch.nn.Parameter(torch.zeros(8))]
    with pytest.raises(UserError, match="cannot run its 8-bit AdamW") as e:
        loop._optimizer(params, HealConfig(optimizer="paged_adamw_8bit"), torch.device("cpu"))
    assert "optimizer: adamw" in e.value.fix
    with pytest.raises(UserError, match="no 8-bit optimizer for mps"):
        loop._optimizer(params, HealConfig(optimizer="paged_adamw_8bit"), torch.device("mps"))


def test_the_setting_keeps_existing_cell_ids_and_is_validated():
    from ray_prune.sweep.experiment import parse_experiment
    from ray_prune.sweep.grid import expand

    def ids(**heal):
        spec = tiny_spec(["smollm2-135m"])
        spec["heal"] = {**spec["heal"], **heal}
        return {c.cell_id for c in expand(parse_experiment(spec), {"smollm2-135m": 30})}

    assert ids(optimizer="adamw") == ids()
    assert not ids(optimizer="paged_adamw_8bit") & ids()
    with pytest.raises(UserError, match="optimizer must be one of"):
        HealConfig(optimizer="sgd").validate()
    assert "optimizer" in HealConfig.names(resume=True)  # another optimizer's state never resumes this one's run
