"""Streaming statistics vs sklearn: ShrunkCovariance, Calinski-Harabasz, merging, robustness."""
import numpy as np
import pytest
import torch
from sklearn.covariance import ShrunkCovariance
from sklearn.metrics import calinski_harabasz_score

from dupfast.detection.stats import LayerStats, calinski_harabasz, shrunk_covariance, whiteners


def _data(n=57, L=3, d=11, K=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (n,), generator=g)
    x = torch.randn(n, L, d, generator=g) * torch.linspace(0.1, 5, d) + 3.0 + y.view(-1, 1, 1) * 0.7
    return x, y


def _stream(x, y, K, chunk=10):
    st = LayerStats(x.shape[1], x.shape[2], K)
    for i in range(0, x.shape[0], chunk):
        st.update(x[i:i + chunk], y[i:i + chunk])
    return st


def test_shrunk_covariance_precision_matches_sklearn():
    x, y = _data()
    st = _stream(x, y, 3)
    W = whiteners(shrunk_covariance(st.covariance()))
    for l in range(x.shape[1]):
        sk = ShrunkCovariance().fit(x[:, l].double().numpy())
        np.testing.assert_allclose(shrunk_covariance(st.covariance())[l].numpy(), sk.covariance_, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose((W[l] @ W[l].T).numpy(), sk.precision_, rtol=1e-8, atol=1e-10)
        assert torch.equal(W[l], W[l].tril()), "whitener must be lower triangular"


def test_within_class_covariance_matches_class_centred_sklearn():
    x, y = _data()
    st = _stream(x, y, 3)
    cov = st.covariance(within_class=True)
    for l in range(x.shape[1]):
        xl = x[:, l].double().numpy()
        centred = np.concatenate([xl[y.numpy() == c] - xl[y.numpy() == c].mean(0) for c in range(3)])
        sk = ShrunkCovariance().fit(centred)  # DAN's tied estimator
        np.testing.assert_allclose(shrunk_covariance(cov)[l].numpy(), sk.covariance_, rtol=1e-9, atol=1e-11)


def test_calinski_harabasz_matches_sklearn():
    x, y = _data(K=4)
    st = _stream(x, y, 5)  # class 4 never seen: must be ignored, as sklearn sees only present labels
    ch = calinski_harabasz(st)
    for l in range(x.shape[1]):
        assert ch[l].item() == pytest.approx(calinski_harabasz_score(x[:, l].numpy(), y.numpy()), rel=1e-9)


def test_one_class_makes_calinski_harabasz_undefined():
    x, _ = _data()
    st = _stream(x, torch.zeros(x.shape[0], dtype=torch.long), 2)
    with pytest.raises(ValueError, match="Calinski-Harabasz is undefined with 1 class"):
        calinski_harabasz(st)


def test_merge_equals_single_stream_and_chunking_is_irrelevant():
    x, y = _data(n=40)
    a = _stream(x[:17], y[:17], 3, chunk=4).merge(_stream(x[17:], y[17:], 3, chunk=9))
    b = _stream(x, y, 3, chunk=40)
    for k in ("n", "sum", "sumsq", "class_n", "class_sum"):
        torch.testing.assert_close(getattr(a, k), getattr(b, k), rtol=1e-12, atol=1e-10)


def test_fewer_samples_than_dims_and_constant_features_stay_finite():
    x, y = _data(n=5, d=40)
    x[:, :, 7] = 2.5  # a constant (zero-variance) feature
    st = _stream(x, y, 3)
    W = whiteners(shrunk_covariance(st.covariance()))
    assert torch.isfinite(W).all()
    for l in range(x.shape[1]):
        sk = ShrunkCovariance().fit(x[:, l].double().numpy())
        np.testing.assert_allclose((W[l] @ W[l].T).numpy(), sk.precision_, rtol=1e-6, atol=1e-6)


def test_all_constant_layer_gives_zero_whitener_like_sklearn_pinvh():
    x = torch.ones(6, 1, 4) * 3.0
    st = LayerStats(1, 4).update(x)
    W = whiteners(shrunk_covariance(st.covariance()))
    sk = ShrunkCovariance().fit(x[:, 0].double().numpy())
    np.testing.assert_allclose((W[0] @ W[0].T).numpy(), sk.precision_, atol=0)


def test_unshrunk_singular_covariance_falls_back_to_pseudo_inverse():
    x, _ = _data(n=4, d=9)
    st = LayerStats(3, 9).update(x)
    W = whiteners(shrunk_covariance(st.covariance(), shrinkage=0.0))
    assert torch.isfinite(W).all()
    P = W[0] @ W[0].T
    np.testing.assert_allclose(P.numpy(), np.linalg.pinv(st.covariance()[0].numpy(), hermitian=True), rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_named():
    st = LayerStats(2, 3, 2)
    with pytest.raises(ValueError, match=r"features must be \[B, 2, 3\]"):
        st.update(torch.zeros(4, 3, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="NaN or inf"):
        st.update(torch.full((2, 2, 3), float("nan")), torch.zeros(2))
    with pytest.raises(ValueError, match="labels must lie in"):
        st.update(torch.zeros(2, 2, 3), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="need at least 2 samples"):
        LayerStats(2, 3).update(torch.zeros(1, 2, 3)).covariance()
