"""Rank statistics for the proxy's decision utility: ROC-AUC and Spearman.

Plain numpy, rank-based, with ties given their average rank.
"""

from __future__ import annotations

from typing import Optional

import numpy as np


def average_ranks(values) -> np.ndarray:
  """1-based ranks of `values`; tied values share the mean of their ranks.

  Example: ``average_ranks([10, 20, 20, 5]) == [2, 3.5, 3.5, 1]``.
  """
  values = np.asarray(values, np.float64)
  order = np.argsort(values, kind="stable")
  sorted_values = values[order]
  ranks = np.empty(len(values), np.float64)
  start = 0
  while start < len(values):
    end = start
    while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
      end += 1
    ranks[order[start:end + 1]] = 0.5 * (start + end) + 1.0
    start = end + 1
  return ranks


def roc_auc(scores, labels) -> Optional[float]:
  r"""Area under the ROC curve of `scores` for predicting boolean `labels`.

  The Mann-Whitney form: the probability that a random positive scores above
  a random negative, ties counting one half,

  .. math:: \mathrm{AUC} = \frac{\sum_{i \in +} r_i - n_+(n_+ + 1)/2}{n_+ n_-}

  with ``r`` the average ranks of all scores. None when a class is empty.
  """
  labels = np.asarray(labels, bool)
  positives, negatives = int(labels.sum()), int((~labels).sum())
  if positives == 0 or negatives == 0:
    return None
  ranks = average_ranks(scores)
  return float((ranks[labels].sum() - positives * (positives + 1) / 2)
               / (positives * negatives))


def spearman(x, y) -> Optional[float]:
  """Spearman's rank correlation: Pearson's correlation of the average ranks.

  None when fewer than two points or either variable is constant.
  """
  if len(x) < 2:
    return None
  rx, ry = average_ranks(x), average_ranks(y)
  rx, ry = rx - rx.mean(), ry - ry.mean()
  norm = np.sqrt((rx * rx).sum() * (ry * ry).sum())
  return None if norm == 0 else float((rx * ry).sum() / norm)
