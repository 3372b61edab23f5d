"""The floor every family has to beat: the majority-class rate of the test split.

    rate = majority_rate(y_true, classes)              # MajorityRate(rate=0.32, label='bus', n=75)
    below_majority({"simple_cnn": 0.185}, rate)        # ['simple_cnn: test accuracy 0.185 does not beat ...']

A classifier that always answers the most frequent test class scores this accuracy without looking
at an image; a family at or below it has learnt nothing usable, however its macro-F1 ranks.
`carclf report` and `carclf promote` both warn about such a family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

RATE_METRIC = "test_majority_class_rate"  # on the report run, so promote reads it without the manifest


@dataclass(frozen=True)
class MajorityRate:
    rate: float  # share of the test images in the most frequent class
    label: str  # that class
    n: int  # test images

    def words(self) -> str:
        return f"{self.rate:.3f}, what always answering '{self.label}' scores on its {self.n} images"


def majority_rate(y_true: Sequence[int], classes: Sequence[str]) -> MajorityRate:
    """The accuracy of always answering the test split's most frequent class."""
    counts = np.bincount(np.asarray(y_true, dtype=int), minlength=len(classes))
    top = int(np.argmax(counts))
    return MajorityRate(float(counts[top] / counts.sum()), str(classes[top]), int(counts.sum()))


def majority_from_labels(labels: Sequence[str]) -> MajorityRate:
    """The same from the test split's class names (a manifest's 'class' column)."""
    classes, y = np.unique(np.asarray(labels, dtype=str), return_inverse=True)
    return majority_rate(y, list(classes))


def does_not_beat(accuracy: float, rate: MajorityRate) -> bool:
    return bool(np.isfinite(accuracy)) and accuracy <= rate.rate + 1e-12


def below_majority(accuracies: Mapping[str, float], rate: MajorityRate, *, what: str = "test accuracy") -> list[str]:
    """One warning per family whose accuracy does not beat the majority-class rate."""
    return [f"{family}: {what} {acc:.3f} does not beat the majority-class rate of the test split "
            f"({rate.words()}): it has learnt nothing usable"
            for family, acc in accuracies.items() if does_not_beat(acc, rate)]
