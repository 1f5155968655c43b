"""Healing a pruned model with QLoRA (Gromov et al., Sec. 3.2), one idea per file.

- ``config``: :class:`HealConfig`, the one declaration of every heal setting.
- ``quantize``: loading the base in NF4 (or full precision) for training.
- ``lora``: where the adapters go, attaching them, merging them for export.
- ``schedule``: the learning-rate schedule and the sample order, both pure functions of the step.
- ``checkpoint``: what a checkpoint holds and how it is written atomically and resumed.
- ``loop``: the training loop itself, :func:`heal`.

Importing this package imports nothing heavy: ``config`` is torch-free, so the
experiment schema and the CLI derive their fields from it without loading torch.
"""
