"""The method as plain functions on a model and data: profile, select, prune, heal, evaluate.

Nothing under ``core`` imports Ray or the sweep, ledger or report layers
(``tests/core/test_layering.py`` enforces it), so a notebook can use every step
without a cluster. Submodules are imported on use: ``ray_prune.core`` itself
pulls in neither torch nor transformers.
"""
