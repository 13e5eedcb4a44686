"""F2C's frequency-selective filter and its generated data (plain PyTorch, no Ray)."""
import numpy as np
import pytest
import torch

from conftest import compose
from trustlab.methods.f2c import SpectralFilter, radial_frequency, selective_weight
from trustlab.platform.data.genimage_synth import upsample_decoder
from trustlab.platform.registry import get_method


def test_weight_zero_at_and_below_tau_and_formula_above():
    f = radial_frequency(32, 32)
    w = selective_weight(f, 0.3, -0.2, 0.8, -0.05)
    assert torch.all(w[f <= 0.3] == 0)
    hi = f > 0.3
    k = -0.2 * f[hi] ** 2 + 0.8 * f[hi] - 0.05
    assert torch.allclose(w[hi], (torch.exp(k / 2) - 1) / f[hi])
    assert f.max() == pytest.approx(2 ** 0.5, rel=0.05) and f[0, 0] == 0


def test_filter_shapes_and_low_frequencies_removed():
    flt = SpectralFilter(0.25, -0.2, 0.8, -0.05)
    x = torch.rand(3, 3, 32, 48)
    y = flt(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    # a pure low-frequency image (below tau) is removed entirely (up to the standardisation eps)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    low = torch.cos(2 * np.pi * 2 * xx / 32).expand(1, 3, 32, 32)  # f = 2/32/0.5 = 0.125
    raw = torch.fft.ifft2(torch.fft.fft2(low) * flt.weight(32, 32, "cpu")).real
    assert raw.abs().max() < 1e-5
    high = torch.cos(2 * np.pi * 12 * xx / 32).expand(1, 3, 32, 32)  # f = 0.75 > tau: kept
    raw = torch.fft.ifft2(torch.fft.fft2(high) * flt.weight(32, 32, "cpu")).real
    assert raw.abs().max() > 0.1


def test_none_mode_is_identity_up_to_normalisation_and_bad_mode_rejected():
    x = torch.rand(2, 3, 16, 16)
    assert torch.allclose(SpectralFilter(0.1, 0, 0, 0, "none")(x), (x - 0.5) / 0.25)
    with pytest.raises(ValueError):
        SpectralFilter(0.1, 0, 0, 0, "bandpass")


def test_decoder_leaves_high_frequency_trace():
    """The fake path moves spectral energy into the top band (checkerboard peaks at Nyquist)."""
    rng = np.random.default_rng(0)
    flat = np.full((32, 32, 3), 128.0, np.float32)
    fake = upsample_decoder(flat, rng, strength=0.1)
    spec = np.abs(np.fft.fft2(fake[..., 0] - fake[..., 0].mean()))
    assert spec[16, 16] + spec[0, 16] + spec[16, 0] > 10 * (spec.sum() - spec[16, 16] - spec[0, 16] - spec[16, 0]) / spec.size


def test_f2c_learns_generated_vs_real_in_process(tmp_path):
    cfg = compose(["method=f2c", "method.data.n_train=256", "method.data.n_val=64", "method.data.n_test=128",
                   "method.data.size=32", f"method.data.root={tmp_path}"])
    m = get_method("f2c")
    data = m.build_data(cfg)
    assert data["train"]["x"].dtype == np.uint8 and data["train"]["x"].shape[1:] == (3, 32, 32)
    assert set(np.unique(data["train"]["y"])) == {0, 1}
    torch.manual_seed(0)
    model = m.build_model(cfg, "train")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    tr = data["train"]
    for epoch in range(3):
        model.train()
        perm = np.random.default_rng(epoch).permutation(len(tr["y"]))
        for s in range(0, len(perm), 32):
            b = m.to_batch({k: v[perm[s:s + 32]] for k, v in tr.items()})
            loss = m.loss_step(model, b, "train", cfg)["loss"]
            opt.zero_grad(); loss.backward(); opt.step()
    from trustlab.platform.evaluate import evaluate_arrays

    metrics, _ = evaluate_arrays(m, model, data["test"], cfg)
    assert metrics["frame"]["auc"] >= 0.9, metrics
