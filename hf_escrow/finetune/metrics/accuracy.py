"""Accuracy: the share of predictions equal to their references.

A local `evaluate` metric module, loaded with `evaluate.load("/path/to/accuracy.py")`
(the hub's "accuracy" cannot be fetched offline). Buyer, seller and verifier load the
same file; its sha256 is committed in the job's escrow meta. Keep imports one per line:
`evaluate` scans them to find the module's dependencies.
"""

import datasets
import evaluate

_DESCRIPTION = "Accuracy = correct predictions / all predictions, for integer class ids."
_CITATION = ""
_KWARGS = """
Args:
    predictions (list of int): predicted class ids.
    references (list of int): true class ids.
Returns:
    accuracy (float): in [0, 1]; 0.0 for no rows.
"""


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        total = len(references)
        correct = sum(int(p == r) for p, r in zip(predictions, references))
        return {"accuracy": correct / total if total else 0.0}
