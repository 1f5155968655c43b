"""``process_docs`` for our task YAMLs: bring every row into the hub schema.

Our task templates (``rp_*.yaml``) use lm-eval's built-in prompt templates
verbatim, and those templates name the hub datasets' fields (``label``,
``answerKey``, ``ctx_a``...). The local Parquet mirror (``$RAY_PRUNE_DATA_DIR``)
stores the same records under slightly different fields (``answer``,
``answer_key``, a pre-joined ``query``...). Each function here takes a split
from either source and returns it in the hub schema: rows that already are
hub-schema pass through (apart from what lm-eval's own ``process_docs`` does,
which is reproduced), local rows are mapped. So one template, one prompt, two
data sources, and the mapping is the only code that knows the difference.

lm-eval loads this file by path (``!function hub_schema.<name>`` is resolved
next to the YAML), so it imports nothing from ray_prune.
"""

from __future__ import annotations

import re


def _columns(dataset) -> set[str]:
    return set(dataset.column_names)


def boolq(dataset):
    """SuperGLUE BoolQ (``aps/super_glue``: ``label`` 0/1) from the mirror's ``answer`` bool."""
    if "label" in _columns(dataset):
        return dataset
    return dataset.map(lambda b: {"label": [int(a) for a in b["answer"]]}, batched=True)


def arc(dataset):
    """AI2 ARC (``choices: {text, label}``, ``answerKey``) from the mirror's flat lists."""
    if "answerKey" in _columns(dataset):
        return dataset

    def convert(b):
        return {
            "choices": [{"text": list(t), "label": list(lab)} for t, lab in zip(b["choices"], b["choice_labels"])],
            "answerKey": list(b["answer_key"]),
        }

    return dataset.map(convert, batched=True, remove_columns=["choices"])


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's ``hellaswag/utils.py::preprocess``, verbatim."""
    text = text.strip()
    # NOTE: Brackets are artifacts of the WikiHow dataset portion of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag(dataset):
    """lm-eval's HellaSwag docs: ``query``, ``choices``, ``gold`` (and the hub's ``label``).

    Hub rows get lm-eval's ``process_docs`` exactly (``ctx_a + " " +
    ctx_b.capitalize()``, then ``preprocess``). Mirror rows already hold the
    preprocessed ``query`` and ``endings``; ``preprocess`` is applied again
    (it is idempotent on them). The mirror joined ``ctx_a`` and ``ctx_b``
    without lm-eval's ``capitalize()``, and the boundary is lost, so on the
    mirror the first word of ``ctx_b`` keeps its lower case ("...on a roof. he"
    where lm-eval reads "...on a roof. He"). That is the one known difference
    from lm-eval's built-in ``hellaswag`` prompt.
    """
    if "ctx_a" in _columns(dataset):

        def hub(doc):
            ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
            return {
                "query": hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
                "choices": [hellaswag_preprocess(ending) for ending in doc["endings"]],
                "gold": int(doc["label"]),
            }

        return dataset.map(hub)

    def local(b):
        return {
            "query": [hellaswag_preprocess(q) for q in b["query"]],
            "choices": [[hellaswag_preprocess(e) for e in endings] for endings in b["endings"]],
            "gold": [int(a) for a in b["answer"]],
            "label": [str(int(a)) for a in b["answer"]],
        }

    return dataset.map(local, batched=True)


def piqa(dataset):
    """PIQA (``label`` 0/1) from the mirror's ``answer``."""
    if "label" in _columns(dataset):
        return dataset
    return dataset.map(lambda b: {"label": [int(a) for a in b["answer"]]}, batched=True)


def winogrande(dataset):
    """WinoGrande (``answer`` "1"/"2", a string) from the mirror's 0-based int ``answer``."""
    if dataset.features["answer"].dtype == "string":
        return dataset
    as_text = dataset.map(lambda b: {"_answer": [str(int(a) + 1) for a in b["answer"]]}, batched=True)
    return as_text.remove_columns("answer").rename_column("_answer", "answer")
