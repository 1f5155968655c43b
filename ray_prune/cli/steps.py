"""``ray-prune profile | prune | heal | eval``: each step of the method on one model, reading what the last wrote."""

from __future__ import annotations

import json
from pathlib import Path

from ray_prune.cli.flags import settings_from_args
from ray_prune.errors import UserError


def _load(args, model: str | None = None):
    from ray_prune.core.models import load_model

    return load_model(model or args.model, dtype=args.dtype, device=args.device,
                      trust_remote_code=args.trust_remote_code)


def _calibration_config(args):
    from ray_prune.core.calibration import CalibrationConfig

    return settings_from_args(CalibrationConfig, args).validate()


def _calibration(args, model, tok, metric: str | None = None):
    """The distance table of the calibration flags (of ``metric`` where a strategy needs its own)."""
    from ray_prune.core.data import load_texts
    from ray_prune.core.profile import profile

    cal = _calibration_config(args)
    texts = load_texts("calibration", cal.samples, dataset=cal.dataset, data_dir_path=args.data_dir)
    return profile(model, tok, texts, metric=metric or cal.metric, batch_size=cal.batch_size,
                   max_length=cal.max_length, model_id=args.model, progress=not args.quiet)


def _calibration_blocks(args, tok):
    """The calibration text packed into blocks of ``max_length`` tokens: what greedy and the linear repair read,
    as a sweep packs it (``sweep/profile_stage.py``, ``sweep/trial.py``)."""
    from ray_prune.core.data import load_texts
    from ray_prune.core.packing import pack_texts

    cal = _calibration_config(args)
    texts = load_texts("calibration", cal.samples, dataset=cal.dataset, data_dir_path=args.data_dir)
    return pack_texts(texts, tok, cal.max_length, max_blocks=cal.samples), cal.batch_size


def _stage1(args, model, tok, n: int, packed):
    """What the strategy reads (``core.select.STAGE1_NEEDS``): a distance table (``--table``, or profiled now) or a
    greedy removal order of n rounds on the ``packed`` calibration blocks; ``(table, order)``."""
    from ray_prune.core.distance import DistanceTable
    from ray_prune.core.select import STAGE1_NEEDS

    kind, metric = STAGE1_NEEDS.get(args.strategy, (None, None))
    if kind == "table":
        return (DistanceTable.load(args.table) if args.table else _calibration(args, model, tok, metric)), None
    if kind == "order":
        from ray_prune.core.greedy import greedy_order
        from ray_prune.core.packing import scored_bos

        blocks, batch_size = packed
        blocks = blocks[:_calibration_config(args).greedy_blocks]
        return None, greedy_order(model, blocks, bos=scored_bos(tok), batch_size=batch_size,
                                  max_remove=n,
                                  progress=not args.quiet).order
    return None, None


def cmd_profile(args) -> int:
    from ray_prune.core.select import optimal_starts

    _calibration_config(args)  # bad settings fail before the model loads
    model, tok = _load(args)
    table = _calibration(args, model, tok)
    out = Path(args.out)
    path = table.save(out / "distance.parquet" if out.suffix != ".parquet" else out)
    print(f"{table.model_id}: {table.num_layers} layers, metric {table.metric}, {table.samples} samples, "
          f"{table.tokens} tokens -> {path}")
    print("  n  l*(n)  d")
    for n, l, d in optimal_starts(table):
        print(f"{n:3d}  {l:5d}  {d:.4f}")
    return 0


def cmd_prune(args) -> int:
    from ray_prune.core.architecture import num_layers
    from ray_prune.core.prune import prune_layers
    from ray_prune.core.select import STAGE1_NEEDS, layers_to_remove, n_from_fraction

    if not args.out and not args.mergekit_config:
        raise UserError("prune needs somewhere to write", "pass --out DIR, --mergekit-config FILE, or both")
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and any(out.iterdir()):
        raise UserError(f"output directory {out} is not empty", "choose a new --out or remove it")
    if args.mergekit_config and Path(args.mergekit_config).is_dir():
        raise UserError(f"--mergekit-config {args.mergekit_config} is a directory",
                        "pass a file name, e.g. prune.yaml")
    if args.fraction is not None and not 0.0 <= args.fraction < 1.0:  # fail before loading anything
        raise UserError(f"fraction {args.fraction} is outside [0, 1)", "use a fraction of layers such as 0.25")
    if args.repair != "none" and args.mergekit_config:
        raise UserError(f"--repair {args.repair} changes weights, which a mergekit slicing config cannot express",
                        "drop --mergekit-config (the repaired model is saved with --out), or --repair")
    if args.repair != "none" and out is None:
        raise UserError(f"--repair {args.repair} needs --out", "pass --out DIR for the repaired model")
    if args.table and STAGE1_NEEDS.get(args.strategy, ("",))[0] != "table":
        raise UserError(f"--table is read by the strategies that rank by a distance table, not {args.strategy}",
                        "drop --table, or use --strategy similarity or block_influence")
    model = tok = None
    if out is not None or (STAGE1_NEEDS.get(args.strategy) and not args.table):
        model, tok = _load(args)
        L = num_layers(model)
    else:  # config only: the layer count is in the config, no weights needed
        from ray_prune.core.model_configs import load_config

        L = load_config(args.model, args.trust_remote_code).config.num_hidden_layers
    n = n_from_fraction(args.fraction, L) if args.fraction is not None else args.n
    # greedy and the linear repair read the same packed calibration text: packed once
    packed = _calibration_blocks(args, tok) if args.strategy == "greedy" or args.repair == "linear" else None
    table, order = _stage1(args, model, tok, n, packed) if n else (None, None)
    remove = layers_to_remove(args.strategy, L, n=n, table=table, layers=args.layers, order=order)
    if args.mergekit_config:  # before the model is saved: a config mergekit cannot build fails fast
        from ray_prune.core.export import write_mergekit_config

        path = write_mergekit_config(args.mergekit_config, args.model, L, remove, args.dtype)
        print(f"mergekit config -> {path} (run: mergekit-yaml {path} OUT_DIR)")
    if out is not None:
        if args.repair == "linear":
            from ray_prune.core.repair import default_form, linear_repair

            blocks, batch_size = packed
            linear_repair(model, remove, blocks, batch_size=batch_size,
                          form=args.repair_form or default_form(model.config))
        else:
            prune_layers(model, remove)
        model.config.layer_pruning["strategy"] = args.strategy
        _save_model(model, tok, out)
    how = args.strategy + (f", {args.repair} repair" if args.repair != "none" else "")
    print(f"removed {len(remove)} of {L} layers {remove} ({how})" + (f" -> {out}" if out else ""))
    return 0


def _save_model(model, tok, out: Path) -> None:
    """save_pretrained, atomically (``core.atomic``): no half-written model directories."""
    from ray_prune.core.atomic import atomic_path

    with atomic_path(out, directory=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)


def cmd_heal(args) -> int:
    from ray_prune.core.heal.lora import merge_adapter, prepare_for_healing
    from ray_prune.core.heal.loop import heal
    from ray_prune.core.models import load_tokenizer, resolve

    from ray_prune.core.heal.config import HealConfig

    config = settings_from_args(HealConfig, args, dtype=args.dtype).validate()
    tok = load_tokenizer(args.model, args.trust_remote_code)
    model = prepare_for_healing(resolve(args.model), config, device=args.device)

    def show(r) -> None:
        print(f"step {r.step:5d}  train {r.train_loss:.4f}  val {r.val_loss:.4f}  tokens {r.tokens_seen}")

    out = Path(args.out)
    model, reports = heal(model, tok, config, callback=show, checkpoint_dir=out, resume_from=args.resume,
                          data_dir=args.data_dir, progress=not args.quiet)
    from ray_prune.core import dtypes
    from ray_prune.core.architecture import num_layers
    from ray_prune.core.heal.checkpoint import write_adapter_record

    dtype = next(p for p in model.parameters() if p.requires_grad).dtype
    write_adapter_record(out, args.model, [], num_layers(model), config.quantize, str(dtype).removeprefix("torch."),
                         f"nf4+{dtypes.short_name(dtype)}" if config.quantize == "nf4" else dtypes.short_name(dtype))
    if args.merge:
        _save_model(merge_adapter(model), tok, out / "merged")
    print(f"adapter -> {out}" + (f", merged model -> {out / 'merged'}" if args.merge else ""))
    return 0


def _load_for_eval(args):
    """The model to score: with ``--adapter``, its base loaded in the precision the adapter was scored in and
    pruned as its record says (when MODEL is the unpruned model), the adapter applied unmerged."""
    from ray_prune.core.architecture import num_layers
    from ray_prune.core.heal.checkpoint import read_adapter_record
    from ray_prune.core.models import load_model
    from ray_prune.core.prune import prune_layers

    record = read_adapter_record(args.adapter) if args.adapter else {}
    quantize = args.quantize or record.get("quantize", "none")
    dtype = args.dtype if args.dtype != "auto" else record.get("dtype", "auto")
    model, tok = load_model(args.model, dtype=dtype, device=args.device, trust_remote_code=args.trust_remote_code,
                            quantize=quantize)
    if not args.adapter:
        return model, tok
    removed, L = record.get("removed_layers") or [], record.get("original_num_layers")
    if removed and num_layers(model) == L:
        prune_layers(model, removed)
    elif L is not None and num_layers(model) != L - len(removed):
        raise UserError(f"{args.model} has {num_layers(model)} layers; the adapter was trained on {L - len(removed)} "
                        f"({L} less layers {removed})",
                        f"pass the unpruned {record.get('base_model')} or its pruned copy")
    from peft import PeftModel

    return PeftModel.from_pretrained(model, args.adapter).eval(), tok


def cmd_eval(args) -> int:
    from ray_prune.core.atomic import write_text
    from ray_prune.core.data import data_dir
    from ray_prune.core.evaluation.config import EvalConfig
    from ray_prune.core.evaluation.harness import evaluate

    config = settings_from_args(EvalConfig, args)
    config.validate(local=data_dir(args.data_dir) is not None)  # bad tasks, shots or limits fail before any load
    model, tok = _load_for_eval(args)
    scores = evaluate(model, tok, config, data_dir=args.data_dir, progress=not args.quiet)
    write_text(Path(args.out), json.dumps(scores, indent=2))
    for k, v in scores.items():
        print(f"{k:28s} {v:.4f}" if isinstance(v, float) else f"{k:28s} {v}")
    return 0
