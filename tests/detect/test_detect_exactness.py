"""mode="dup" equals a direct implementation of the authors' MSDefender (sklearn + per-sample numpy SVD)."""
import numpy as np
import pytest
import torch
from sklearn.covariance import ShrunkCovariance
from sklearn.metrics import calinski_harabasz_score

from dupfast.detection import Detector
from dupfast.detection.calibration import split


def authors_dup(cal_x, cal_y, val_x, pool_x, top_k=3, alpha=0.9, frr=0.05):
    """DUP `ms_defender.py::detect`, transcribed: features [N, L, d] float32 arrays."""
    L = cal_x.shape[1]
    means, precs, ch = {}, {}, {}
    for l in range(L):
        acts = cal_x[:, l].astype(np.float64)
        means[l] = torch.from_numpy(acts.mean(0)).float()
        precs[l] = torch.from_numpy(ShrunkCovariance().fit(acts).precision_).float()
        ch[l] = calinski_harabasz_score(acts, cal_y)
    top = [l for l, _ in sorted(ch.items(), key=lambda kv: kv[1], reverse=True)[:top_k]]

    def md(x):
        per = []
        for l in top:
            diffs = torch.from_numpy(x[:, l]).float() - means[l]
            per.append(torch.sqrt(torch.relu(torch.einsum("bi,ij,bj->b", diffs, precs[l], diffs))))
        return torch.stack(per).mean(0).numpy()

    def ss(x):
        out = []
        for i in range(x.shape[0]):
            s = np.linalg.svd(np.diff(x[i].astype(np.float64), axis=0), compute_uv=False)
            out.append(s[0] / np.sum(s) if s.size > 0 and np.sum(s) > 0 else 0.0)
        return np.array(out)

    md_v, ss_v, md_p, ss_p = md(val_x), ss(val_x), md(pool_x), ss(pool_x)
    m_md, s_md, m_ss, s_ss = md_v.mean(), md_v.std(), ss_v.mean(), ss_v.std()
    s_md = 1 if s_md < 1e-6 else s_md
    s_ss = 1 if s_ss < 1e-6 else s_ss
    fused_v = alpha * (md_v - m_md) / s_md + (1 - alpha) * (ss_v - m_ss) / s_ss
    fused_p = alpha * (md_p - m_md) / s_md + (1 - alpha) * (ss_p - m_ss) / s_ss
    return dict(md=md_p, ss=ss_p, scores=fused_p, threshold=np.percentile(fused_v, (1 - frr) * 100), layers=sorted(top))


def _features(n, L, d, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    # BERT-like scales: a large shared offset, unequal feature scales, class separation growing with depth
    x = 4.0 + torch.randn(n, L, d, generator=g) * torch.linspace(0.2, 3.0, d)
    x = x + (y.view(-1, 1, 1) * 2 - 1) * torch.linspace(0.1, 1.5, L).view(1, L, 1) + shift
    return x.float(), y


@pytest.mark.parametrize("n,L,d", [(120, 6, 24), (80, 5, 96)])  # second: calibration half (40) < d (96)
def test_dup_mode_equals_the_authors_algorithm(n, L, d):
    clean, labels = _features(n, L, d, seed=1)
    pool, _ = _features(70, L, d, seed=2)
    pool[35:] += torch.randn(d) * 0.9  # a "poisoned" cluster
    det = Detector(mode="dup", pooling="cls").fit_features({"cls": clean}, labels, num_classes=2)
    res = det.score_features({"cls": pool})
    cal, val = split(n, None, det.seed, det.calibration_fraction)
    ref = authors_dup(clean[cal].numpy(), labels[cal].numpy(), clean[val].numpy(), pool.numpy())

    assert res.selected_layers == ref["layers"]
    raw_md = res.layer_distances[:, res.selected_layers].double().mean(1).numpy()
    np.testing.assert_allclose(raw_md, ref["md"], rtol=1e-4)
    np.testing.assert_allclose(res.transitions["concentration"].numpy(), ref["ss"], rtol=1e-4)
    scale = np.abs(ref["scores"]).max()
    assert np.abs(res.scores.numpy() - ref["scores"]).max() <= 1e-4 * scale
    assert det.threshold == pytest.approx(ref["threshold"], rel=1e-4, abs=1e-4 * scale)
    np.testing.assert_array_equal(res.flags.numpy(), ref["scores"] > ref["threshold"])
