"""Tests for codi_jax.evaluation.metrics and codi_jax.evaluation.grids."""

import math

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter
from skimage import data as skdata
from skimage.metrics import structural_similarity

from codi_jax.evaluation import grids
from codi_jax.evaluation import metrics as M

# ---------------------------------------------------------------- helpers


def _skimage_ssim(a, b):
    return np.array(
        [
            structural_similarity(
                a[i],
                b[i],
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
                data_range=1.0,
                channel_axis=-1,
            )
            for i in range(a.shape[0])
        ]
    )


@pytest.fixture(scope="module")
def texture_sets():
    """Two disjoint sets of random 32x32 crops of grass/gravel/brick in [-1, 1], plus a blurred copy."""
    rng = np.random.default_rng(1234)
    crops = []
    for tex in (skdata.grass(), skdata.gravel(), skdata.brick()):
        for _ in range(24):
            y, x = rng.integers(0, tex.shape[0] - 32, size=2)
            crops.append(tex[y : y + 32, x : x + 32])
    crops = np.stack(crops)[..., None].astype(np.float32) / 127.5 - 1.0
    a, b = crops[0::2], crops[1::2]  # interleaved: both halves hold all three textures
    blurred = gaussian_filter(a, sigma=(0, 1.0, 1.0, 0))
    return a, b, blurred


# ---------------------------------------------------------------- to_unit / psnr


def test_to_unit_maps_and_clips():
    x = np.array([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0], np.float32).reshape(1, 1, 6, 1)
    np.testing.assert_allclose(np.asarray(M.to_unit(x)).ravel(), [0.0, 0.0, 0.5, 0.75, 1.0, 1.0])


def test_psnr_closed_form():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.2, 0.7, size=(2, 16, 16, 3)).astype(np.float32)
    b = a.copy()
    b[0] += 0.1  # MSE 1e-2 -> 20 dB
    b[1] -= 0.01  # MSE 1e-4 -> 40 dB
    np.testing.assert_allclose(np.asarray(M.psnr(a, b)), [20.0, 40.0], atol=1e-3)
    # data_range 2 multiplies the peak power by 4: +10*log10(4) dB.
    np.testing.assert_allclose(
        np.asarray(M.psnr(a, b, data_range=2.0)), [20.0 + 10 * math.log10(4), 40.0 + 10 * math.log10(4)], atol=1e-3
    )


def test_psnr_identical_is_inf():
    # Documented choice: exact copies give +inf (MSE 0), as in skimage.
    x = np.random.default_rng(1).random((3, 8, 8, 1)).astype(np.float32)
    out = np.asarray(M.psnr(x, x))
    assert out.shape == (3,)
    assert np.all(np.isposinf(out))


# ---------------------------------------------------------------- ssim


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("kind", ["independent", "noisy", "smooth"])
@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_matches_skimage(size, kind, channels):
    rng = np.random.default_rng(size * 10 + channels)
    a = rng.random((2, size, size, channels))
    if kind == "independent":
        b = rng.random(a.shape)
    elif kind == "noisy":
        b = np.clip(a + 0.2 * rng.standard_normal(a.shape), 0, 1)
    else:  # smooth, low-contrast images: stresses variance cancellation
        a = gaussian_filter(a, sigma=(0, 4, 4, 0))
        a = 0.5 + 0.3 * (a - a.min()) / (a.max() - a.min())
        b = np.clip(a + 0.02 * gaussian_filter(rng.standard_normal(a.shape), sigma=(0, 2, 2, 0)), 0, 1)
    ours = np.asarray(M.ssim(a.astype(np.float32), b.astype(np.float32)))
    ref = _skimage_ssim(a, b)
    assert ours.shape == (2,)
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_ssim_identical_is_one_and_small_images_rejected():
    x = np.random.default_rng(2).random((2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(M.ssim(x, x)), 1.0, atol=1e-5)
    with pytest.raises(ValueError):
        M.ssim(x[:, :10, :10], x[:, :10, :10])


# ---------------------------------------------------------------- pyramid


def test_laplacian_pyramid_shapes_and_reconstruction():
    x = np.random.default_rng(3).random((2, 33, 20, 3)).astype(np.float32)
    pyr = M.laplacian_pyramid(x, 4)
    assert [p.shape for p in pyr] == [(2, 33, 20, 3), (2, 17, 10, 3), (2, 9, 5, 3), (2, 5, 3, 3)]
    rec = pyr[-1]
    for band in pyr[-2::-1]:
        rec = band + M._pyr_up(rec, band.shape)
    np.testing.assert_allclose(np.asarray(rec), x, atol=1e-5)
    # A constant image has no detail at any band-pass level.
    const = M.laplacian_pyramid(np.full((1, 16, 16, 1), 0.3, np.float32), 3)
    assert float(np.abs(np.asarray(const[0])).max()) < 1e-6
    assert float(np.abs(np.asarray(const[1])).max()) < 1e-6
    np.testing.assert_allclose(np.asarray(const[2]), 0.3, atol=1e-6)


def test_num_pyramid_levels_for_small_images():
    assert M.num_pyramid_levels(32, 32, 3, 7) == 3  # 32, 16, 8
    assert M.num_pyramid_levels(32, 32, 5, 7) == 3  # 4x4 cannot hold a 7x7 patch
    assert M.num_pyramid_levels(16, 16, 3, 7) == 2
    assert M.num_pyramid_levels(256, 128, 4, 7) == 4
    with pytest.raises(ValueError):
        M.laplacian_swd(np.zeros((2, 6, 6, 1)), np.zeros((2, 6, 6, 1)))


# ---------------------------------------------------------------- sliced wasserstein


def test_sliced_wasserstein_1d_is_exact_w1():
    # With D = 1 every unit direction is +-1, so SWD equals the 1-D W1 distance.
    import jax

    a = np.arange(8, dtype=np.float32)[:, None]
    key = jax.random.PRNGKey(0)
    assert float(M.sliced_wasserstein(a, a + 0.5, key, 16)) == pytest.approx(0.5, abs=1e-6)
    assert float(M.sliced_wasserstein(a, a[::-1].copy(), key, 16)) == pytest.approx(0.0, abs=1e-6)
    # Unequal set sizes: 1000 vs 250 evenly spaced samples of U(0, 1) are ~0 apart.
    u_big = ((np.arange(1000) + 0.5) / 1000).astype(np.float32)[:, None]
    u_small = ((np.arange(250) + 0.5) / 250).astype(np.float32)[:, None]
    assert float(M.sliced_wasserstein(u_big, u_small, key, 16)) < 1e-3
    assert float(M.sliced_wasserstein(u_big, u_small + 0.25, key, 16)) == pytest.approx(0.25, abs=1e-3)


def test_laplacian_swd_identical_blurred_and_halves(texture_sets):
    a, b, blurred = texture_sets
    same = M.laplacian_swd(a, a)
    assert set(same) == {"swd_l0", "swd_l1", "swd_l2", "swd_mean"}
    assert all(isinstance(v, float) for v in same.values())
    assert max(same.values()) < 1e-6

    halves = M.laplacian_swd(a, b)
    blur = M.laplacian_swd(a, blurred)
    # Blur destroys the fine-scale patch statistics; two disjoint samples of
    # the same textures differ only by sampling noise.
    assert blur["swd_l0"] > 0.1
    assert blur["swd_l0"] > 3.0 * halves["swd_l0"]
    assert blur["swd_l0"] > blur["swd_l2"]  # the damage is at the finest level
    assert halves["swd_l0"] > 0.0

    # Fixed seed -> reproducible; different seed -> different but close.
    assert M.laplacian_swd(a, blurred) == blur
    other = M.laplacian_swd(a, blurred, seed=1)
    assert other["swd_l0"] != blur["swd_l0"]
    assert other["swd_l0"] == pytest.approx(blur["swd_l0"], rel=0.2)


def test_high_frequency_ratio(texture_sets):
    a, _, blurred = texture_sets
    assert float(M.high_frequency_ratio(a, a)) == pytest.approx(1.0, abs=1e-6)
    assert float(M.high_frequency_ratio(blurred, a)) < 0.5
    noisy = a + 0.1 * np.random.default_rng(4).standard_normal(a.shape).astype(np.float32)
    assert float(M.high_frequency_ratio(noisy, a)) > 1.0


def test_evaluate_batch(texture_sets):
    a, _, blurred = texture_sets
    out = M.evaluate_batch(blurred, a)
    assert set(out) == {"psnr", "ssim", "swd_l0", "swd_l1", "swd_l2", "swd_mean", "hf_ratio"}
    assert all(type(v) is float for v in out.values())
    p, r = np.asarray(M.to_unit(blurred)), np.asarray(M.to_unit(a))
    assert out["psnr"] == pytest.approx(float(np.mean(np.asarray(M.psnr(p, r)))), rel=1e-6)
    assert out["ssim"] == pytest.approx(float(np.mean(_skimage_ssim(p, r))), abs=1e-4)
    assert 15.0 < out["psnr"] < 60.0
    assert 0.0 < out["ssim"] < 0.99
    assert out["hf_ratio"] < 0.5
    assert out["swd_mean"] == pytest.approx(np.mean([out["swd_l0"], out["swd_l1"], out["swd_l2"]]))


# ---------------------------------------------------------------- grids


def test_to_uint8():
    x = np.array([-1.5, -1.0, 0.0, 1.0, 2.0], np.float32)
    np.testing.assert_array_equal(grids.to_uint8(x), [0, 0, 128, 255, 255])
    u = np.arange(5, dtype=np.uint8)
    assert grids.to_uint8(u) is u


def test_save_grid_layout_and_nearest_upscale(tmp_path):
    rng = np.random.default_rng(5)
    rows = 3
    lr = rng.uniform(-1, 1, size=(rows, 8, 8, 3)).astype(np.float32)
    pred = rng.uniform(-1, 1, size=(rows, 32, 32, 3)).astype(np.float32)
    gt = rng.integers(0, 256, size=(rows, 32, 32, 1), dtype=np.uint8)
    path = tmp_path / "nested" / "dir" / "grid.png"
    out = grids.save_grid(path, [("LR", lr), ("pred", pred), ("GT", gt)])
    assert out == str(path) and path.exists()

    img = np.asarray(Image.open(path).convert("RGB"))
    g, head = grids.GUTTER, grids.header_height()
    assert head > 5
    assert img.shape == (g + head + g + rows * (32 + g), g + 3 * (32 + g), 3)

    y0 = g + head + g
    for r in range(rows):
        y = y0 + r * (32 + g)
        # LR column: each LR pixel is a clean 4x4 block.
        expected_lr = np.repeat(np.repeat(grids.to_uint8(lr[r]), 4, axis=0), 4, axis=1)
        np.testing.assert_array_equal(img[y : y + 32, g : g + 32], expected_lr)
        x_pred = g + 32 + g
        np.testing.assert_array_equal(img[y : y + 32, x_pred : x_pred + 32], grids.to_uint8(pred[r]))
        x_gt = x_pred + 32 + g
        np.testing.assert_array_equal(img[y : y + 32, x_gt : x_gt + 32], np.repeat(gt[r], 3, axis=-1))
    # Gutters are white, header holds some dark label pixels.
    assert np.all(img[:, :g] == 255) and np.all(img[y0 - g : y0] == 255)
    assert img[g : g + head].min() < 128

    # read_cells gives the pictures back (the reproduction's report reassembles runs' grids).
    cells = grids.read_cells(path, 32)
    assert cells.shape == (3, rows, 32, 32, 3)
    np.testing.assert_array_equal(cells[1], grids.to_uint8(pred))
    np.testing.assert_array_equal(cells[0, :, ::4, ::4], grids.to_uint8(lr))
    with pytest.raises(ValueError, match="is not a grid of 30 px cells"):
        grids.read_cells(path, 30)


def test_save_grid_upscale_to_and_errors(tmp_path):
    x = np.zeros((2, 16, 8, 3), np.float32)
    path = grids.save_grid(str(tmp_path / "g.png"), [("a", x)], upscale_to=48)
    w, h = Image.open(path).size
    g, head = grids.GUTTER, grids.header_height()
    assert (w, h) == (g + 24 + g, g + head + g + 2 * (48 + g))
    with pytest.raises(ValueError):
        grids.save_grid(tmp_path / "bad.png", [("a", x), ("b", x[:1])])
    with pytest.raises(ValueError):
        grids.save_grid(tmp_path / "none.png", [])
