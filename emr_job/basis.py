"""Whether a run keeps the published PCA basis or refits it (`--refit auto|always|never`).

A kept basis keeps every stored image's coordinates where they were: only new and rewritten rows are projected.
`auto` keeps the published basis (mean, components, k) while, on the current rows, both hold:

  captured = tr(V C V^T) / tr(C)      the share of the rows' variance the basis's k axes capture
  best     = (top k eigenvalues of C) / tr(C)      what a refit with the same k would capture

  1. captured >= the variance target (with --variance; with --k N there is no target, and only 2 applies), and
  2. captured >= (1 - EPSILON) * best.

C is the covariance of the current rows around their own mean (from the merged cached moments, without reading a
row): variance is spread, which the basis's origin (the published mean) does not change. V holds the basis's
components. A basis is never kept across new weights (other features), an erased or replaced image (its trace
stays in the mean and components, and with few images they can reveal it), a --k other than the basis's, or a
pca table written before one pca file per features file. `never` keeps it whenever one of those does not force a
refit; `always` refits at every run, as sklearn on every row would."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

CHOICES = ("auto", "always", "never")
# A kept basis may capture 1% less variance than a refit would: the spread a 1% sample of new images moves it by
# is far below that, while a new kind of image carrying real variance moves it past (tests/job/test_basis.py).
EPSILON = 0.01


@dataclass
class Decision:
    refit: bool
    why: str
    captured: Optional[float] = None  # share of the current rows' variance the published basis captures
    best: Optional[float] = None  # share the current rows' top k axes capture (k: the basis's)
    ratios: Optional[np.ndarray] = None  # every axis's share of the current rows' variance, largest first
    kept_ratios: Optional[np.ndarray] = None  # each basis axis's share of the current rows' variance


def shares(cov: np.ndarray, components: np.ndarray) -> Decision:
    """captured and best of the docstring (and the shares behind them), from a covariance matrix and a basis's
    components (k, d)."""
    total = float(np.trace(cov))
    if total <= 0:
        return Decision(True, "the rows do not vary")
    kept = np.einsum("ij,jk,ik->i", components, cov, components) / total
    ratios = np.clip(np.linalg.eigvalsh(cov)[::-1], 0, None) / total
    return Decision(False, "", float(kept.sum()), float(ratios[: len(components)].sum()), ratios, kept)


def decide(policy: str, cov: Optional[np.ndarray], components: Optional[np.ndarray], variance: Optional[float],
           forced: Optional[str]) -> Decision:  # fmt: skip
    """Keep or refit. components: the published basis's (None: there is none); forced: why a refit is due whatever
    the policy (or None)."""
    if policy not in CHOICES:
        raise ValueError(f"--refit must be one of {', '.join(CHOICES)}, got {policy!r}")
    if components is None:
        return Decision(True, forced or "no published basis")
    if forced:
        return Decision(True, forced)
    if policy == "always":
        return Decision(True, "--refit always")
    found = shares(cov, components)
    if found.captured is None:
        return found
    found.why = f"the basis captures {found.captured:.4f} of the variance, a refit {found.best:.4f}"
    if policy == "never":
        found.why = f"--refit never; {found.why}"
    elif variance is not None and found.captured < variance:
        found.refit, found.why = True, f"{found.why}: under the target {variance}"
    elif found.captured < (1 - EPSILON) * found.best:
        found.refit, found.why = True, f"{found.why}: more than {EPSILON:.0%} less"
    return found
