"""WinoGrande's partial scoring, as lm-eval's ``winogrande/preprocess_winogrande.py``.

Each option fills the blank, giving two contexts; both are scored on the same
continuation (the sentence after the blank), and the context with the higher
log-likelihood wins. ``doc_to_text`` returns the index of the correct context
(lm-eval's "multiple input" mode). Rows are in the hub schema (``answer`` is
"1" or "2"); ``hub_schema.winogrande`` maps the local mirror to it.
"""

from __future__ import annotations


def doc_to_text(doc):
    answer_to_num = {"1": 0, "2": 1}
    return answer_to_num[doc["answer"]]


def doc_to_target(doc):
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def doc_to_choice(doc):
    idx = doc["sentence"].index("_")
    options = [doc["option1"], doc["option2"]]
    return [doc["sentence"][:idx] + opt for opt in options]
