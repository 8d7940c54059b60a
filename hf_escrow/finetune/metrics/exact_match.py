"""Exact match: the share of predicted strings equal to their references.

A local `evaluate` metric module for causal-LM jobs: the prediction is the model's
greedy continuation over the reference's length (end-of-sequence token included), so a
model that answers the right word but does not stop scores 0 for that row. Keep imports
one per line: `evaluate` scans them to find the module's dependencies.
"""

import datasets
import evaluate

_DESCRIPTION = "Exact match = predictions identical to their references / all predictions."
_CITATION = ""
_KWARGS = """
Args:
    predictions (list of str): predicted texts.
    references (list of str): reference texts.
    strip (bool): compare with surrounding whitespace removed (default False).
Returns:
    exact_match (float): in [0, 1]; 0.0 for no rows.
"""


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, strip=False):
        total = len(references)
        if strip:
            predictions = [p.strip() for p in predictions]
            references = [r.strip() for r in references]
        same = sum(int(p == r) for p, r in zip(predictions, references))
        return {"exact_match": same / total if total else 0.0}
