"""Real-ESRGAN-style second-order degradation in numpy/scipy/PIL.

Every parameter comes from a ConfigDict (see `configs/data.py`); every random
draw comes from the `np.random.Generator` passed in, so results are
reproducible from a seed. Images are float32 [H, W, 3] in [0, 1] unless noted.

Follows Wang et al., "Real-ESRGAN" (2021): two rounds of
blur -> resize -> noise (-> JPEG), then a final [resize + sinc, JPEG] block
in random order. Resizes mimic `torch.nn.functional.interpolate` without
antialiasing (as Real-ESRGAN uses it), so downscaling can alias; that aliasing
is part of the degradation space.
"""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image
from scipy import ndimage, signal, special

# ---------------------------------------------------------------------------
# Blur kernels (all return float64 [k, k] summing to 1).
# ---------------------------------------------------------------------------


def _grid(size: int) -> np.ndarray:
    """[k, k, 2] (x, y) offsets from the kernel centre."""
    ax = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    xx, yy = np.meshgrid(ax, ax)
    return np.stack([xx, yy], axis=-1)


def _quad_form(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """x^T Sigma^-1 x over the grid, Sigma = R diag(sx^2, sy^2) R^T."""
    c, s = np.cos(theta), np.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    cov = rot @ np.diag([sigma_x**2, sigma_y**2]) @ rot.T
    g = _grid(size)
    return np.einsum("...i,ij,...j->...", g, np.linalg.inv(cov), g)


def _normalize(k: np.ndarray) -> np.ndarray:
    return k / np.sum(k)


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float | None = None, theta: float = 0.0) -> np.ndarray:
    """Bivariate (isotropic when sigma_y is None) Gaussian kernel."""
    sigma_y = sigma_x if sigma_y is None else sigma_y
    return _normalize(np.exp(-0.5 * _quad_form(size, sigma_x, sigma_y, theta)))


def generalized_gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float) -> np.ndarray:
    """exp(-0.5 q^beta): beta < 1 gives heavier tails, > 1 a flatter top."""
    q = _quad_form(size, sigma_x, sigma_y, theta)
    return _normalize(np.exp(-0.5 * np.power(q, beta)))


def plateau_kernel(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float) -> np.ndarray:
    """1 / (1 + q^beta): flat top with slowly decaying tails."""
    q = _quad_form(size, sigma_x, sigma_y, theta)
    return _normalize(1.0 / (np.power(q, beta) + 1.0))


def sinc_kernel(size: int, cutoff: float) -> np.ndarray:
    """Circular low-pass (2-D sinc / Airy) kernel with `cutoff` in rad/pixel.

    Mimics ringing and overshoot artifacts; has negative lobes.
    """
    r = np.linalg.norm(_grid(size), axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = cutoff * special.j1(cutoff * r) / (2.0 * np.pi * r)
    c = (size - 1) // 2
    k[c, c] = cutoff**2 / (4.0 * np.pi)  # limit of the expression at r = 0
    return _normalize(k)


def random_kernel_size(rng: np.random.Generator, cfg) -> int:
    lo, hi = cfg.kernel_size_range
    return int(rng.choice(np.arange(lo | 1, hi + 1, 2)))  # odd sizes only


def _random_beta(rng: np.random.Generator, beta_range) -> float:
    # Half the time below 1 and half above, as Real-ESRGAN samples shape betas.
    if rng.random() < 0.5:
        return float(rng.uniform(beta_range[0], 1.0))
    return float(rng.uniform(1.0, beta_range[1]))


def random_mixed_kernel(rng: np.random.Generator, size: int, stage) -> np.ndarray:
    """A kernel from `stage.kernel_list` with params drawn from `stage`."""
    kind = stage.kernel_list[rng.choice(len(stage.kernel_list), p=np.asarray(stage.kernel_prob))]
    iso = kind.endswith("_iso") or kind == "iso"
    sx = float(rng.uniform(*stage.blur_sigma))
    if iso:
        sy, theta = sx, 0.0
    else:
        sy = float(rng.uniform(*stage.blur_sigma))
        theta = float(rng.uniform(*stage.rotation_range))
    if kind in ("iso", "aniso"):
        return gaussian_kernel(size, sx, sy, theta)
    if kind.startswith("generalized"):
        return generalized_gaussian_kernel(size, sx, sy, theta, _random_beta(rng, stage.betag_range))
    if kind.startswith("plateau"):
        return plateau_kernel(size, sx, sy, theta, _random_beta(rng, stage.betap_range))
    raise ValueError(f"Unknown kernel type {kind!r} in degradation config.")


def random_blur_kernel(rng: np.random.Generator, cfg, stage) -> np.ndarray:
    """Stage blur kernel: a sinc with prob `stage.sinc_prob`, else mixed."""
    size = random_kernel_size(rng, cfg)
    if rng.random() < stage.sinc_prob:
        rng_range = cfg.sinc_cutoff_small if size < cfg.sinc_large_kernel_min else cfg.sinc_cutoff_large
        return sinc_kernel(size, float(rng.uniform(*rng_range)))
    return random_mixed_kernel(rng, size, stage)


def random_final_sinc_kernel(rng: np.random.Generator, cfg) -> np.ndarray | None:
    """Final sinc kernel with prob `cfg.final.sinc_prob`, else None (identity)."""
    if rng.random() < cfg.final.sinc_prob:
        size = random_kernel_size(rng, cfg)
        return sinc_kernel(size, float(rng.uniform(*cfg.final.sinc_cutoff)))
    return None


# ---------------------------------------------------------------------------
# Image operations.
# ---------------------------------------------------------------------------


def blur(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Per-channel convolution with reflect padding (like torch 'reflect').

    FFT-based: ~10x faster than ndimage.convolve for 21x21 kernels.
    """
    r = kernel.shape[0] // 2
    padded = np.pad(img.astype(np.float32), ((r, r), (r, r), (0, 0)), mode="reflect")
    out = signal.fftconvolve(padded, kernel.astype(np.float32)[:, :, None], mode="valid", axes=(0, 1))
    return out.astype(np.float32)


def _cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
    # Keys cubic convolution; a=-0.75 matches PyTorch's bicubic.
    x = np.abs(x)
    return np.where(
        x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1, np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0)
    )


@functools.lru_cache(maxsize=1024)
def _resize_matrix(n_in: int, n_out: int, mode: str) -> np.ndarray:
    """[n_out, n_in] 1-D resampling matrix (half-pixel centres, no antialias)."""
    m = np.zeros((n_out, n_in), np.float64)
    scale = n_in / n_out
    rows = np.arange(n_out)
    if mode == "area":  # adaptive average pooling bins
        for i in rows:
            a = (i * n_in) // n_out
            b = -((-(i + 1) * n_in) // n_out)
            m[i, a:b] = 1.0 / (b - a)
    elif mode == "bilinear":
        src = np.maximum((rows + 0.5) * scale - 0.5, 0.0)
        i0 = np.floor(src).astype(int)
        i0 = np.minimum(i0, n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        w = src - i0
        np.add.at(m, (rows, i0), 1.0 - w)
        np.add.at(m, (rows, i1), w)
    elif mode == "bicubic":
        src = (rows + 0.5) * scale - 0.5
        i0 = np.floor(src).astype(int)
        t = src - i0
        for off in (-1, 0, 1, 2):
            idx = np.clip(i0 + off, 0, n_in - 1)  # edge replication
            np.add.at(m, (rows, idx), _cubic(t - off))
    else:
        raise ValueError(f"Unknown resize mode {mode!r}; use area, bilinear or bicubic.")
    m.setflags(write=False)
    return m


def resize(img: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """Resizes float [H, W, C] to size=(h, w) with 'area'/'bilinear'/'bicubic'."""
    h, w = size
    mh = _resize_matrix(img.shape[0], h, mode)
    mw = _resize_matrix(img.shape[1], w, mode)
    hh, ww, c = img.shape
    # Two matmuls (rows, then columns); much faster than a 3-operand einsum.
    tmp = (mh @ img.reshape(hh, ww * c)).reshape(h, ww, c)
    return np.matmul(mw, tmp).astype(np.float32)


def _resize_scale(rng: np.random.Generator, stage) -> float:
    kind = rng.choice(3, p=np.asarray(stage.resize_prob))  # up, down, keep
    if kind == 0:
        return float(rng.uniform(1.0, stage.resize_range[1]))
    if kind == 1:
        return float(rng.uniform(stage.resize_range[0], 1.0))
    return 1.0


def random_resize(
    img: np.ndarray, rng: np.random.Generator, cfg, stage, base_hw: tuple[int, int] | None = None
) -> np.ndarray:
    """Resizes by a random factor of `base_hw` (default: current size)."""
    scale = _resize_scale(rng, stage)
    mode = cfg.resize_modes[rng.integers(len(cfg.resize_modes))]
    bh, bw = base_hw if base_hw is not None else img.shape[:2]
    # Guard: tiny crops must not collapse to 1-2 pixels.
    size = (max(cfg.min_size, int(bh * scale)), max(cfg.min_size, int(bw * scale)))
    return resize(img, size, mode)


def add_gaussian_noise(img: np.ndarray, rng: np.random.Generator, sigma: float, gray: bool) -> np.ndarray:
    """Adds N(0, sigma^2) noise; sigma on the [0, 1] scale."""
    h, w, c = img.shape
    noise = rng.standard_normal((h, w, 1 if gray else c)) * sigma
    return np.clip(img + noise, 0.0, 1.0).astype(np.float32)


def add_poisson_noise(img: np.ndarray, rng: np.random.Generator, scale: float, gray: bool) -> np.ndarray:
    """Adds scaled shot noise; the photon count follows the image's levels."""
    x = img
    if gray:
        x = (img @ np.array([0.299, 0.587, 0.114]))[..., None]
    x = np.clip(np.round(x * 255.0), 0, 255) / 255.0
    vals = 2.0 ** np.ceil(np.log2(max(len(np.unique(x)), 2)))
    noise = rng.poisson(x * vals) / vals - x
    return np.clip(img + noise * scale, 0.0, 1.0).astype(np.float32)


def random_noise(img: np.ndarray, rng: np.random.Generator, stage) -> np.ndarray:
    if rng.random() < stage.gaussian_noise_prob:
        sigma = float(rng.uniform(*stage.noise_range)) / 255.0  # 0..255 scale
        gray = rng.random() < stage.gray_noise_prob
        return add_gaussian_noise(img, rng, sigma, gray)
    scale = float(rng.uniform(*stage.poisson_scale_range))
    gray = rng.random() < stage.gray_noise_prob
    return add_poisson_noise(img, rng, scale, gray)


def to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """JPEG round trip in memory (PIL, default 4:2:0 chroma subsampling)."""
    buf = io.BytesIO()
    Image.fromarray(to_uint8(img)).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf, formats=("JPEG",)) as im:  # skip format probing
        return np.asarray(im.convert("RGB"), np.float32) / 255.0


def random_jpeg(img: np.ndarray, rng: np.random.Generator, jpeg_range) -> np.ndarray:
    return jpeg(img, int(round(rng.uniform(*jpeg_range))))


def usm_sharpen(img: np.ndarray, *, weight: float, radius: int, threshold: float) -> np.ndarray:
    """Unsharp masking with a soft edge mask (Real-ESRGAN's GT sharpening).

    `radius` is the Gaussian kernel size (made odd); sigma follows OpenCV's
    rule for a kernel size with sigma=0. `threshold` is on the 0..255 scale.
    """
    k = radius if radius % 2 else radius + 1
    sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8
    gblur = functools.partial(
        ndimage.gaussian_filter, sigma=(sigma, sigma, 0), mode="mirror", radius=((k - 1) // 2,) * 2 + (0,)
    )
    img = img.astype(np.float32)
    residual = img - gblur(img)
    mask = (np.abs(residual) * 255.0 > threshold).astype(np.float32)
    soft = gblur(mask)
    sharp = np.clip(img + weight * residual, 0.0, 1.0)
    return (soft * sharp + (1.0 - soft) * img).astype(np.float32)


def usm_sharpen_from_config(img: np.ndarray, usm_cfg) -> np.ndarray:
    """USM with the kernel size clamped to `max_radius_frac` of the crop.

    The published radius (50, i.e. a 51 px kernel) is for 256 px crops; on a
    32 px crop it would span the whole image, so it is scaled down by the same
    ratio (~0.2 of the side -> 7 px kernel for 32 px crops).
    """
    cap = 2 * int(usm_cfg.max_radius_frac * min(img.shape[:2]) / 2) + 1
    radius = max(3, min(usm_cfg.radius + (1 - usm_cfg.radius % 2), cap))
    return usm_sharpen(img, weight=usm_cfg.weight, radius=radius, threshold=usm_cfg.threshold)


def bicubic_upsample(lr: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """PIL bicubic resize of an uint8 [h, w, 3] image to size (H, W)."""
    if isinstance(size, int):
        size = (size, size)
    return np.asarray(Image.fromarray(np.asarray(lr, np.uint8)).resize((size[1], size[0]), Image.Resampling.BICUBIC))


# ---------------------------------------------------------------------------
# Full pipeline.
# ---------------------------------------------------------------------------


def _stage(img: np.ndarray, rng: np.random.Generator, cfg, stage, base_hw=None) -> np.ndarray:
    """Blur (with prob) -> random resize -> noise."""
    if rng.random() < stage.blur_prob:
        img = blur(img, random_blur_kernel(rng, cfg, stage))
    img = random_resize(img, rng, cfg, stage, base_hw)
    return random_noise(img, rng, stage)


def _resize_and_sinc(img, rng, cfg, size, kernel):
    mode = cfg.resize_modes[rng.integers(len(cfg.resize_modes))]
    img = resize(img, size, mode)
    return img if kernel is None else blur(img, kernel)


def degrade(hr: np.ndarray, cfg, *, scale: int, rng: np.random.Generator) -> np.ndarray:
    """Second-order degradation of an HR image to uint8 [H/scale, W/scale, 3].

    Args:
      hr: uint8 or float [0, 1] image [H, W, 3].
      cfg: degradation ConfigDict (`configs/data.py`).
      scale: downscaling factor (data.sr_scale).
      rng: source of all randomness.
    """
    img = hr.astype(np.float32)
    if hr.dtype == np.uint8:
        img = img / 255.0
    h, w = img.shape[:2]
    target = (h // scale, w // scale)
    if min(target) < 1:
        raise ValueError(f"HR size {(h, w)} too small for sr_scale={scale}.")
    # Stage 1 (always blurs when blur_prob=1) and its JPEG.
    img = _stage(img, rng, cfg, cfg.stage1)
    img = random_jpeg(np.clip(img, 0.0, 1.0), rng, cfg.stage1.jpeg_range)
    # Stage 2, resized relative to the LR target (Real-ESRGAN) or current size.
    base = target if cfg.second_resize_base == "target" else None
    img = _stage(img, rng, cfg, cfg.stage2, base)
    # Final block: resize to the target + sinc, and JPEG, in random order.
    kernel = random_final_sinc_kernel(rng, cfg)
    if rng.random() < cfg.final.resize_first_prob:
        img = _resize_and_sinc(img, rng, cfg, target, kernel)
        img = random_jpeg(np.clip(img, 0.0, 1.0), rng, cfg.final.jpeg_range)
    else:
        img = random_jpeg(np.clip(img, 0.0, 1.0), rng, cfg.final.jpeg_range)
        img = _resize_and_sinc(img, rng, cfg, target, kernel)
    return to_uint8(img)
