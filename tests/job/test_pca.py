"""PCA from merged per-file moments equals sklearn's, also where features vary little compared with their mean; merged
moments equal the rows' own, and a cache entry that is missing, damaged or another file's is recomputed."""

import numpy as np
import pyarrow as pa
import pytest

from emr_job import moments
from emr_job.model import FEATURE_DIM
from emr_job.pca import fit


def moments_of(x: np.ndarray, parts: int) -> list:
    out = []
    for chunk in np.array_split(x, parts):
        batches = [pa.RecordBatch.from_pydict({"features": pa.array(list(part.astype(np.float32)))})
                   for part in np.array_split(chunk, 3)]  # fmt: skip
        out.append(moments.of_batches(batches))
    return out


@pytest.mark.parametrize("offset, spread", [(0.0, 1.0), (1000.0, 0.01)])
def test_moments_pca_equals_sklearn(offset, spread):
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    latent = rng.normal(size=(300, 12)) @ rng.normal(size=(12, FEATURE_DIM))
    x = (offset + spread * (latent + 0.05 * rng.normal(size=latent.shape))).astype(np.float32).astype(np.float64)
    ours = fit(moments.merge(moments_of(x, parts=4) + moments_of(x[:0], parts=1)), 0.9, None)
    ref = PCA(n_components=0.9, svd_solver="full").fit(x)
    assert ours.k == ref.n_components_
    np.testing.assert_allclose(ours.explained_variance_ratio, ref.explained_variance_ratio_, rtol=1e-6)
    np.testing.assert_allclose(ours.mean, ref.mean_, rtol=1e-9)
    cosines = np.abs(np.sum(ours.components * ref.components_, axis=1))
    assert cosines.min() > 1 - 1e-9
