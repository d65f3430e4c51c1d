"""ROC-AUC and Spearman's correlation on hand-checked examples."""

import numpy as np
import pytest

from foam_optax.bench import metrics


def test_average_ranks_share_ties():
  np.testing.assert_array_equal(metrics.average_ranks([10, 20, 20, 5]),
                                [2, 3.5, 3.5, 1])


def test_roc_auc_counts_ordered_pairs():
  # Positives score 0.9 and 0.4, negatives 0.5, 0.4, 0.1. Of the 6
  # (positive, negative) pairs 0.9 wins 3; 0.4 beats 0.1, ties 0.4 (1/2)
  # and loses to 0.5: AUC = (3 + 1.5) / 6 = 0.75.
  scores = [0.9, 0.5, 0.4, 0.4, 0.1]
  labels = [True, False, True, False, False]
  assert metrics.roc_auc(scores, labels) == pytest.approx(0.75)
  assert metrics.roc_auc([1, 2, 3], [False, True, True]) == 1.0
  assert metrics.roc_auc([3, 2, 1], [False, True, True]) == 0.0
  assert metrics.roc_auc([1, 2], [True, True]) is None


def test_spearman_is_pearson_of_ranks():
  # Ranks of x: 1 2 3 4, of y: 1 3 2 4; sum of squared rank differences
  # is 2, so rho = 1 - 6*2 / (4*15) = 0.8.
  assert metrics.spearman([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)
  assert metrics.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
  # Monotone transforms do not change it.
  x = np.array([0.3, 0.1, 0.7, 0.2])
  assert metrics.spearman(x, np.exp(x)) == pytest.approx(1.0)
  assert metrics.spearman([1, 2, 3], [5, 5, 5]) is None
