"""What a run does, decided from the listing of the input and the published store, by path and version.

The images under the input are the truth; the store is made to match them. Hash joins in Arrow, not Python
dicts: a million stored images plan in seconds and a few hundred MB on the driver."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Failures worth another try even when the file did not change.
TRANSIENT_REASONS = ("read error",)


@dataclass
class Plan:
    featurize: pa.Table  # path, label, version: new, changed, or never successfully read
    deletes: dict = field(default_factory=dict)  # features data file -> positions of rows that go
    kept_failures: pa.Table = None  # path, label, reason, version: unchanged files that failed before
    listed: int = 0  # image files under the input
    ignored: int = 0  # other files under the input
    reused: int = 0  # feature rows kept as they are
    removed: int = 0  # images gone from the input whose rows (features or failure) go
    restale: int = 0  # rows recomputed because they were made with other weights
    inputs: Optional[dict] = None  # digest of an S3 listing (emr_job/inputs.py), for the report and the daily pass

    @property
    def changes(self) -> bool:
        return bool(self.featurize.num_rows or self.deletes or self.removed)


def make_plan(listing: pa.Table, ignored: int, store: pa.Table, files: list, failures: pa.Table, weights: str) -> Plan:
    """listing: path, label, version. store: live feature rows (path, version, weights, _file, _pos) of `files`.
    failures: the published failures (path, label, reason, version). weights: this run's fingerprint."""
    listed = listing.select(["path", "version"]).rename_columns(["path", "now"])
    joined = store.join(listed, "path", join_type="left outer")
    stale_weights = pc.not_equal(joined["weights"], weights)
    present = pc.is_valid(joined["now"])
    unchanged = pc.and_(pc.and_(present, pc.equal(joined["version"], joined["now"])), pc.invert(stale_weights))
    unchanged = pc.fill_null(unchanged, False)
    drop = joined.filter(pc.invert(unchanged))
    deletes: dict = {}
    file_index = drop["_file"].to_numpy()
    positions = drop["_pos"].to_numpy()
    for i in np.unique(file_index):
        deletes[files[i].path] = positions[file_index == i]
    kept_paths = joined.filter(unchanged).column("path")

    # A failure is carried forward while its file is unchanged and the reason is not worth a retry.
    prior = failures.select(["path", "reason", "version"]).rename_columns(["path", "reason", "then"])
    with_prior = listing.join(prior, "path", join_type="left outer")
    transient = pc.starts_with(pc.fill_null(with_prior["reason"], ""), TRANSIENT_REASONS[0])
    for reason in TRANSIENT_REASONS[1:]:
        transient = pc.or_(transient, pc.starts_with(pc.fill_null(with_prior["reason"], ""), reason))
    same_failure = pc.fill_null(
        pc.and_(pc.equal(with_prior["version"], with_prior["then"]), pc.invert(transient)), False
    )
    kept_failures = with_prior.filter(same_failure).select(["path", "label", "reason", "version"])
    todo = with_prior.filter(pc.invert(same_failure)).select(["path", "label", "version"])
    todo = todo.filter(pc.invert(pc.is_in(todo["path"], value_set=kept_paths)))

    gone = pc.is_null(joined["now"])
    gone_failures = pc.invert(pc.is_in(failures["path"], value_set=listing["path"]))
    return Plan(
        featurize=todo.sort_by("path"),
        deletes=deletes,
        kept_failures=kept_failures,
        listed=listing.num_rows,
        ignored=ignored,
        reused=len(kept_paths),
        removed=(pc.sum(gone).as_py() or 0) + (pc.sum(gone_failures).as_py() or 0),
        restale=pc.sum(pc.and_(present, pc.fill_null(stale_weights, False))).as_py() or 0,
    )
