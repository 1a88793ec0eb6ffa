"""Every figure of models/students/evaluate equals its reference implementation on the same images or features,
within 1e-4 relative: torchmetrics' functions, pytorch-fid (its Frechet distance, and its FID Inception given the
same random weights, written to files the way a user's are), the CMMD and Inception Score formulas written out
here as their reference code has them. Plus the bad files, bootstrap intervals and the report's notes.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from distilled_unets.models.students.evaluate import EvaluationError, ImageSet, judge
from distilled_unets.models.students.evaluate import inception as I
from distilled_unets.models.students.evaluate import metrics as M
from distilled_unets.models.students.evaluate.report import format_report

REL = 1e-4
pytestmark = pytest.mark.filterwarnings("ignore:.*disp.*:DeprecationWarning", "ignore:Matrix is singular",
                                        "ignore:Detected pickle protocol")


def rel(a, b) -> float:
    return abs(float(a) - float(b)) / max(abs(float(b)), 1e-12)


def images(n, h=64, w=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, h, w, 3, generator=g) * 255).to(torch.uint8)


def perturbed(u8, amount=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (u8.int() + torch.randint(-amount, amount + 1, u8.shape, generator=g)).clamp(0, 255).to(torch.uint8)


def feats(n, d, shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) + shift


# ------------------------------------------------------------------------------------------------
# references written out


def pytorch_fid_frechet(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid's calculate_frechet_distance (src/pytorch_fid/fid_score.py)."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    return calculate_frechet_distance(mu1, sigma1, mu2, sigma2, eps)


def stats(x):
    x = np.asarray(x, dtype=np.float64)
    return x.mean(0), np.cov(x, rowvar=False)


def cmmd_reference(x, y, sigma=10.0, scale=1000.0):
    """google-research cmmd/distance.py ``mmd`` in numpy (inputs already L2-normalised)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    xs, ys = np.diag(x @ x.T), np.diag(y @ y.T)
    gamma = 1 / (2 * sigma ** 2)
    k_xx = np.mean(np.exp(-gamma * (-2 * x @ x.T + xs[:, None] + xs[None, :])))
    k_xy = np.mean(np.exp(-gamma * (-2 * x @ y.T + xs[:, None] + ys[None, :])))
    k_yy = np.mean(np.exp(-gamma * (-2 * y @ y.T + ys[:, None] + ys[None, :])))
    return scale * (k_xx + k_yy - 2 * k_xy)


def kid_reference(x, y):
    """Unbiased MMD^2 with the cubic polynomial kernel (Binkowski et al. 2018), all vectors at once."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    d, n = x.shape[1], x.shape[0]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
            - 2 * kxy.mean())


def inception_score_reference(logits, splits, seed=2020):
    """Salimans et al.: exp(E_x KL(p(y|x) || p(y))) per split, mean over splits (torch-fidelity's shuffle)."""
    x = np.asarray(logits, np.float64)
    x = x[np.random.RandomState(seed).permutation(x.shape[0])]
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    n, scores = x.shape[0], []
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]
        q = part.mean(0, keepdims=True)
        scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(q)), 1))))
    return float(np.mean(scores))


# ------------------------------------------------------------------------------------------------
# same-seed agreement


def test_pair_scores_equal_torchmetrics_per_image():
    from torchmetrics.functional.image import (
        multiscale_structural_similarity_index_measure as msssim,
    )
    from torchmetrics.functional.image import (
        peak_signal_noise_ratio as psnr,
    )
    from torchmetrics.functional.image import (
        structural_similarity_index_measure as ssim,
    )

    t = images(2, 184, 176)
    s = perturbed(t)
    got = M.pair_scores(t, s, chunk=1)
    assert set(got) == {"psnr", "ssim", "ms_ssim"}
    for i in range(2):
        a = t[i:i + 1].permute(0, 3, 1, 2).double() / 255
        b = s[i:i + 1].permute(0, 3, 1, 2).double() / 255
        assert rel(got["psnr"][i], psnr(b, a, data_range=1.0)) < REL
        assert rel(got["ssim"][i], ssim(b, a, data_range=1.0)) < REL
        assert rel(got["ms_ssim"][i], msssim(b, a, data_range=1.0)) < REL
        mse = float(((a - b) ** 2).mean())
        assert rel(got["psnr"][i], 10 * np.log10(1.0 / mse)) < REL  # the textbook formula


def test_ms_ssim_only_where_the_size_allows_and_identical_images():
    t = images(2, 64, 64)
    got = M.pair_scores(t, t.clone())
    assert "ms_ssim" not in got and torch.isinf(got["psnr"]).all()
    assert torch.allclose(got["ssim"], torch.ones(2).double())
    j = judge(ImageSet(t), ImageSet(t.clone()), intervals=False)
    assert any("ms_ssim left out" in n for n in j.notes)


def test_quantize_is_what_saveimage_writes():
    x = torch.tensor([[[[0.0, 0.5, 1.0], [0.99999, 1.2, -0.1]]]])
    ref = np.clip(255.0 * x.numpy(), 0, 255).astype(np.uint8)  # ComfyUI's SaveImage
    assert torch.equal(M.quantize(x), torch.from_numpy(ref))


# ------------------------------------------------------------------------------------------------
# distribution distances


def test_frechet_equals_pytorch_fid():
    x, y = feats(80, 24), feats(90, 24, shift=0.2, seed=1) * 1.3
    ref = pytorch_fid_frechet(*stats(x), *stats(y))
    assert rel(M.frechet_distance(x, y), ref) < REL
    assert rel(M.frechet_fast(x, y), ref) < REL


def test_frechet_fewer_images_than_dimensions():
    """n < d: singular covariances. The nuclear-norm form (used there, and by the bootstrap) equals torchmetrics'
    FrechetInceptionDistance on the same features."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    x, y = feats(12, 64), feats(10, 64, shift=0.1, seed=1)
    m = FrechetInceptionDistance(feature=M.Features(64), normalize=True)
    m.set_dtype(torch.float64)
    m.update(x, real=True)
    m.update(y, real=False)
    assert rel(M.frechet_distance(x, y), float(m.compute())) < REL
    assert rel(M.frechet_fast(x, y), float(m.compute())) < REL


def test_frechet_to_reference_stats_from_an_npz(tmp_path):
    x, y = feats(100, 16), feats(60, 16, shift=0.3, seed=2)
    mu, sigma = stats(x)
    path = str(tmp_path / "ref.npz")
    np.savez(path, mu=mu, sigma=sigma)
    mu2, sigma2 = I.read_reference_stats(path, dim=16)
    ref = pytorch_fid_frechet(mu, sigma, *stats(y))
    assert rel(M.frechet_distance_to_stats(mu2, sigma2, y), ref) < REL


def test_kid_equals_the_unbiased_estimator():
    x, y = feats(40, 8), feats(40, 8, shift=0.5, seed=3)
    mean, std = M.kid(x, y, subsets=5, subset_size=1000)
    assert rel(mean, kid_reference(x, y)) < REL and std < 1e-9  # subsets of all 40 vectors: one value
    assert M.kid(x, y, subsets=10, subset_size=20, seed=4) == M.kid(x, y, subsets=10, subset_size=20, seed=4)
    idx = np.arange(40)
    assert rel(M.kid_fast(M.poly_kernel(x, x), M.poly_kernel(y, y), M.poly_kernel(x, y), idx), kid_reference(x, y)) \
        < REL


def test_cmmd_equals_the_reference_formula():
    x, y = feats(30, 32), feats(25, 32, shift=0.4, seed=5)
    xn, yn = (x / x.norm(dim=1, keepdim=True)).numpy(), (y / y.norm(dim=1, keepdim=True)).numpy()
    assert rel(M.cmmd(x, y), cmmd_reference(xn, yn)) < REL
    assert abs(M.cmmd(x, x)) < 1e-9
    # blockwise kernel means give the same value as one big matrix
    assert rel(M._rbf_mean(torch.from_numpy(xn), torch.from_numpy(yn), 0.005, block=7),
               M._rbf_mean(torch.from_numpy(xn), torch.from_numpy(yn), 0.005)) < 1e-12


def test_inception_score_equals_the_formula():
    logits = feats(50, 12, seed=6).float() * 3
    for splits in (1, 5, 10):
        assert rel(M.inception_score(logits, splits=splits)[0], inception_score_reference(logits, splits)) < REL


# ------------------------------------------------------------------------------------------------
# the FID Inception from a file, against pytorch-fid given the same weights


@pytest.fixture(scope="module")
def inception_files(tmp_path_factory):
    """pytorch-fid's FID Inception with random weights, saved as a user's file would be (a plain state dict
    .pth, and .safetensors), and pytorch-fid's InceptionV3 holding the same weights."""
    from pytorch_fid import inception as pi
    from safetensors.torch import save_file

    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as mp:
        state = {}

        def fake_download(url, progress=True):  # pytorch-fid would download here; hand it our random weights
            m = pi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
            sd = m.state_dict()
            g = torch.Generator().manual_seed(1)
            for k, v in sd.items():
                if k.endswith("running_var"):
                    sd[k] = 0.5 + torch.rand(v.shape, generator=g)
                elif k.endswith("running_mean"):
                    sd[k] = 0.1 * torch.randn(v.shape, generator=g)
            state.update(sd)
            return sd

        mp.setattr(pi, "load_state_dict_from_url", fake_download)
        ref_net = pi.InceptionV3([pi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True, normalize_input=True,
                                 use_fid_inception=True).eval()
    root = tmp_path_factory.mktemp("inception")
    pth = str(root / "pt_inception-2015-12-05-6726825d.pth")
    torch.save(state, pth)
    st = str(root / "inception.safetensors")
    save_file({k: v.contiguous() for k, v in state.items() if not k.endswith("num_batches_tracked")}, st)
    return {"pth": pth, "safetensors": st, "ref": ref_net, "state": state, "root": root}


def test_inception_features_equal_pytorch_fid(inception_files):
    """Both file formats give the same network; its features (and the logits of the Inception Score) equal
    pytorch-fid's InceptionV3 holding the same weights."""
    net = I.load_inception(inception_files["pth"])
    st = I.load_inception(inception_files["safetensors"])
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), st.state_dict().values()))
    imgs = torch.cat([images(3, 96, 80, seed=7), perturbed(images(3, 96, 80, seed=7), 40, seed=8)])
    pool, logits = I.features_in_batches(net, imgs, batch=3)
    with torch.no_grad():
        ref = inception_files["ref"](imgs.permute(0, 3, 1, 2).float() / 255.0)[0].squeeze(-1).squeeze(-1)
    assert pool.shape == (6, 2048) and logits.shape == (6, 1008)
    assert float((pool - ref).norm() / ref.norm()) < REL
    w = inception_files["state"]["fc.weight"]
    assert float((logits - ref @ w.T).norm() / (ref @ w.T).norm()) < REL
    # FID = the formula (test_frechet_*) of these features; random weights make every image's features nearly
    # the same, so a FID of them is rounding noise and is not compared here


def test_inception_bad_files(tmp_path, inception_files):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"fc.weight": Evil()}, f)
    with pytest.raises(EvaluationError, match="weights-only") as e:
        I.read_state_dict(str(evil))
    assert "evil.pth" in str(e.value) and "Fix:" in str(e.value)
    wrong = tmp_path / "vgg.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, wrong)
    with pytest.raises(EvaluationError, match="not the FID Inception"):
        I.read_state_dict(str(wrong))
    with pytest.raises(EvaluationError, match="does not exist"):
        I.read_state_dict(str(tmp_path / "missing.pth"))


def test_reference_stats_bad_files(tmp_path):
    p = str(tmp_path / "s.npz")
    np.savez(p, mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(EvaluationError, match="64-dimensional, the Inception's pool3 features 2048") as e:
        I.read_reference_stats(p)
    assert "s.npz" in str(e.value)
    np.savez(p, mean=np.zeros(4))
    with pytest.raises(EvaluationError, match="not mu and sigma"):
        I.read_reference_stats(p)
    np.savez(p, mu=np.array([{"a": 1}], dtype=object), sigma=np.eye(1))  # a pickled object: refused unread
    with pytest.raises(EvaluationError, match="cannot be read"):
        I.read_reference_stats(p, dim=1)


# ------------------------------------------------------------------------------------------------
# intervals, judge, report


def test_bootstrap_intervals_are_seeded_and_hold_the_estimate():
    v = torch.linspace(10, 20, 40).double()
    a, b = M.mean_ci(v, seed=3), M.mean_ci(v, seed=3)
    assert a == b and a[0] < float(v.mean()) < a[1]
    assert M.mean_ci(torch.ones(10)) is None and M.mean_ci(torch.tensor([1.0, 2.0])) is None
    x, y = feats(30, 8), feats(30, 8, shift=1.0, seed=1)
    lo, hi = M.resample_ci(30, lambda i: M.frechet_fast(x[i], y[i]))
    assert lo < hi and lo > 0


def test_judge_with_features_and_notes():
    t = images(12, 64, 64)
    s = perturbed(t, 30)
    tc, sc = feats(12, 32), feats(12, 32, shift=0.3, seed=2)
    text = feats(12, 32, seed=9)
    j = judge(ImageSet(t, clip=tc), ImageSet(s, clip=sc), text=text, seed=1)
    for k in ("psnr", "ssim", "clip_image_cosine", "fd_clip", "kid_clip", "cmmd", "clip_score", "clip_score_teacher",
              "clip_score_ratio"):
        assert k in j.metrics and j.counts[k] == 12, k
    assert rel(j.metrics["cmmd"], cmmd_reference((tc / tc.norm(dim=1, keepdim=True)).numpy(),
                                                  (sc / sc.norm(dim=1, keepdim=True)).numpy())) < REL
    assert rel(j.metrics["fd_clip"], pytorch_fid_frechet(*stats(tc), *stats(sc))) < 1e-3  # n < d: singular
    assert "psnr" in j.ci and "fd_clip" in j.ci
    assert any("fewer than its 32 feature dimensions" in n for n in j.notes)
    assert any("no Inception file" in n for n in j.notes)
    flat = j.flat()
    assert flat["psnr_ci_low"] <= flat["psnr"] <= flat["psnr_ci_high"]
    text_report = format_report({"student": j}, header=["Evaluate Student"])
    assert "fd_clip" in text_report and "lower is better" in text_report and "note: " in text_report
    j2 = judge(ImageSet(t), ImageSet(s), text_note="SD 1.x has no text projection", intervals=False)
    assert "clip_score" not in j2.metrics and any("no CLIP vision" in n for n in j2.notes)
    assert j2.to_json()["metrics"]["psnr"] == j2.metrics["psnr"]
