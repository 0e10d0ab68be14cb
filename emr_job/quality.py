"""Nearest neighbours in the PCA space: the label vote of a query, and how well the space separates labels
(leave-one-out k-nearest-neighbour accuracy, on a bounded sample)."""

from __future__ import annotations

from collections import Counter
from typing import Optional

import numpy as np

KNN_K = 5
MAX_SAMPLE = 5000  # leave-one-out on this many rows: 5000^2 distances, about a second on one core
CHUNK = 1024  # query rows per distance block: 1024 x 100k float64 stays under 1 GB


def nearest(queries: np.ndarray, stored: np.ndarray, k: int, skip_self: bool = False) -> tuple:
    """Indices and Euclidean distances of the k nearest stored rows of each query, nearest first.

    skip_self: queries are stored[0:len(queries)] themselves (leave-one-out), so row i never sees itself."""
    queries, stored = np.asarray(queries, np.float64), np.asarray(stored, np.float64)
    k = min(k, len(stored) - (1 if skip_self else 0))
    stored_sq = np.einsum("ij,ij->i", stored, stored)
    index = np.empty((len(queries), k), np.int64)
    dist = np.empty((len(queries), k))
    for start in range(0, len(queries), CHUNK):
        q = queries[start : start + CHUNK]
        d2 = np.einsum("ij,ij->i", q, q)[:, None] + stored_sq[None, :] - 2.0 * q @ stored.T
        if skip_self:
            d2[np.arange(len(q)), np.arange(start, start + len(q))] = np.inf
        part = np.argpartition(d2, k - 1, axis=1)[:, :k]
        part_d2 = np.take_along_axis(d2, part, axis=1)
        order = np.argsort(part_d2, axis=1, kind="stable")
        index[start : start + len(q)] = np.take_along_axis(part, order, axis=1)
        dist[start : start + len(q)] = np.sqrt(np.clip(np.take_along_axis(part_d2, order, axis=1), 0.0, None))
    return index, dist


def vote(labels: list) -> tuple:
    """(label, votes) of the majority among neighbours listed nearest first; a tie goes to the label whose
    nearest neighbour is closest."""
    counts = Counter(labels)
    best = max(counts.values())
    winner = next(label for label in labels if counts[label] == best)
    return winner, best


def loo_accuracy(coords: np.ndarray, labels: list, k: int = KNN_K) -> dict:
    """Leave-one-out k-NN accuracy over the rows given, overall and per label."""
    labels = list(labels)
    if len(labels) < 2:
        return {"k": k, "sample": len(labels), "accuracy": None, "per_label": {}}
    index, _ = nearest(coords, coords, k, skip_self=True)
    hits: Counter = Counter()
    seen: Counter = Counter()
    for i, row in enumerate(index):
        guess, _ = vote([labels[j] for j in row])
        seen[labels[i]] += 1
        hits[labels[i]] += guess == labels[i]
    per_label = {name: {"sample": seen[name], "accuracy": hits[name] / seen[name]} for name in sorted(seen)}
    return {"k": min(k, len(labels) - 1), "sample": len(labels), "accuracy": sum(hits.values()) / len(labels),
            "per_label": per_label}  # fmt: skip


def caveat(weights_spec: str, labels: int) -> Optional[str]:
    """Why the accuracy says nothing about the data, if it does not."""
    if weights_spec == "random":
        return "not meaningful: random weights, not trained ones"
    if labels < 2:
        return "not meaningful: there is only one label"
    return None
