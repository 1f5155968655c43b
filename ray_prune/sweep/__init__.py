"""The sweep: an experiment file run as a grid of cells on Ray, resumable from its results.

Stages, one file each: ``experiment`` (the schema) and ``heal_schema``
(its heal section, derived from ``HealConfig``), ``grid`` (cells and their
ids), ``plan`` (every check before Ray starts), ``lock``, ``cluster`` (Ray and
trial resources), ``profile_stage`` (one actor per model), ``trial`` (what a
cell does), ``tune_run`` (the Tune grid), ``scheduler`` (ASHA within each
pruned model), ``progress`` (the live view), ``outcomes`` (rows of failed and
stopped cells), ``rows`` (what each row holds), ``run`` (the stages in order).
"""
