"""HealConfig is the one declaration of heal settings: the experiment schema, the CLI and the row schema derive
from it, field metadata says what forms grid axes and what must match to resume, and a per-model setting
in an experiment file reaches the trial."""

from __future__ import annotations

import dataclasses

import pytest

from helpers import save_tiny_models, tiny_spec
from ray_prune.core.heal.config import HealConfig
from ray_prune.errors import UserError


def test_every_setting_has_a_default_and_a_reason():
    for f in dataclasses.fields(HealConfig):
        assert f.default is not dataclasses.MISSING, f.name
        assert len(f.metadata["why"]) > 10, f.name
        assert f.metadata["identity"] in ("always", "if_changed", "never"), f.name


def test_schema_cli_and_columns_derive_from_the_dataclass():
    from ray_prune.cli import build_parser
    from ray_prune.ledger.schema import COLUMNS
    from ray_prune.sweep.sections import HealSection

    settings = {f.name for f in HealConfig.settings()}
    assert settings == set(HealSection.model_fields) - {"enabled", "by_fraction"}
    assert {f"heal_{s}" for s in settings} <= set(COLUMNS)
    heal = build_parser()._subparsers._group_actions[0].choices["heal"]
    flags = {a.dest for a in heal._actions}
    assert {f.name for f in dataclasses.fields(HealConfig)} - {"dtype"} <= flags and "dtype" in flags  # --dtype: common


def test_cli_flags_build_the_config(tmp_path):
    from ray_prune.cli import build_parser
    from ray_prune.cli.flags import settings_from_args

    args = build_parser().parse_args(["heal", "m", "--out", str(tmp_path), "--alpha", "16", "--grad-accum", "4",
                                      "--gradient-checkpointing", "--target", "gate_proj,up_proj", "--dtype", "fp32"])
    config = settings_from_args(HealConfig, args, dtype=args.dtype)
    assert (config.alpha, config.grad_accum, config.gradient_checkpointing) == (16.0, 4, True)
    assert config.target == ["gate_proj", "up_proj"] and config.dtype == "fp32" and config.steps == 5000


def test_resume_fields_are_metadata_and_exclude_what_does_not_shape_training():
    resume = set(HealConfig.names(resume=True))
    assert {"lr", "steps", "seed", "grad_accum", "alpha", "target"} <= resume
    assert not {"eval_every", "val_sequences", "gradient_checkpointing", "dtype"} & resume
    assert set(HealConfig().resume_key()) == resume


@pytest.mark.parametrize("bad", [dict(alpha=0), dict(grad_accum=0), dict(gradient_checkpointing="yes"),
                                 dict(weight_decay=-1), dict(max_grad_norm=-0.5), dict(dropout=-0.1)])
def test_every_setting_is_validated(bad):
    with pytest.raises(UserError, match=next(iter(bad))):
        HealConfig(**bad).validate()


def test_axes_are_field_metadata():
    from ray_prune.sweep.experiment import parse_experiment

    exp = parse_experiment(tiny_spec(["smollm2-135m"], heal={"lr": [1e-4, 3e-4], "rank": [2, 8], "steps": 4}))
    points = exp.heal_points(exp.models[0])
    assert len(points) == 4 and {(p["lr"], p["rank"]) for p in points} == {(1e-4, 2), (1e-4, 8), (3e-4, 2), (3e-4, 8)}
    with pytest.raises(UserError, match="grad_accum"):  # not an axis: a list is refused
        parse_experiment(tiny_spec(["smollm2-135m"], heal={"grad_accum": [1, 2]}))


def test_new_settings_enter_a_cell_id_only_when_set():
    from ray_prune.sweep.experiment import parse_experiment
    from ray_prune.sweep.grid import expand

    def ids(**heal):
        spec = tiny_spec(["smollm2-135m"])
        spec["heal"] = {**spec["heal"], **heal}
        return {c.cell_id for c in expand(parse_experiment(spec), {"smollm2-135m": 30})}

    plain = ids()
    assert ids(alpha=None, dropout=0.05) == plain  # the defaults, spelled out
    assert ids(gradient_checkpointing=True) == plain  # changes how, not what
    assert not ids(alpha=16) & plain and not ids(dropout=0.1) & plain


def test_per_model_heal_settings_reach_the_trial(tokenizer, tmp_path, monkeypatch):
    """heal: {gradient_checkpointing: true, grad_accum: 4, alpha: 16} for one model: the trial trains with them."""
    from ray_prune.core.heal import loop
    from ray_prune.core.heal.lora import checkpointing_enabled
    from ray_prune.ledger.rows import load_results
    from ray_prune.sweep.experiment import parse_experiment
    from ray_prune.sweep.grid import expand
    from ray_prune.sweep.trial import TrialSpec, run_cell

    models = save_tiny_models(tmp_path / "models", ["a", "b"], tokenizer)
    special = {"gradient_checkpointing": True, "grad_accum": 4, "alpha": 16}
    exp = parse_experiment(tiny_spec([{"name": str(models / "a"), "heal": special}, str(models / "b")],
                                     fractions=[0.5], strategies=["deepest"]))
    cells = {c.model: c for c in expand(exp, {m.name: 6 for m in exp.models})}
    seen = {}
    real_heal = loop.heal

    def spy(model, tokenizer, config, **kw):
        scaling = {m.scaling["default"] for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)}
        seen[config.grad_accum] = (config, checkpointing_enabled(model), scaling)
        return real_heal(model, tokenizer, config, **kw)

    monkeypatch.setattr(loop, "heal", spy)
    for name in ("a", "b"):
        cell = dataclasses.replace(cells[str(models / name)], removed_layers=[2, 3, 4])
        run_cell(TrialSpec(cell=cell, storage_uri=str(tmp_path / "s"), data_dir=None, threads=1,
                           baseline_loss=None, reference_loss=None, do_unhealed=False))
    config, checkpointing, scaling = seen[4]
    assert (config.alpha, config.grad_accum, config.gradient_checkpointing) == (16, 4, True)
    assert checkpointing and scaling == {16 / 8}
    assert seen[1][1] is False and seen[1][2] == {1.0}  # the other model keeps the defaults
    df = load_results(str(tmp_path / "s")).set_index("model")
    a, b = df.loc[str(models / "a")], df.loc[str(models / "b")]
    assert (a["heal_alpha"], a["heal_grad_accum"], bool(a["heal_gradient_checkpointing"])) == (16.0, 4, True)
    assert a["tokens_seen"] == 4 * 2 * 4 * 32 and b["tokens_seen"] == 4 * 2 * 1 * 32  # steps x batch x accum x len
