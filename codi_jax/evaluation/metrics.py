"""Image-quality metrics for evaluating CoDi samples (JAX, weight-free).

Conventions
-----------
* Images are float arrays in NHWC layout. Unless a function says otherwise
  they are in [-1, 1] (the model's range); `psnr` and `ssim` expect [0, 1]
  images (use `to_unit` first), `evaluate_batch` does the conversion itself.
* Nothing here needs pretrained weights (no Inception/FID), so the metrics run
  offline and are deterministic: every random choice uses a fixed PRNG key.

Metrics
-------
* `psnr` / `ssim`: per-image fidelity to a reference (paired).
* `laplacian_swd`: sliced Wasserstein distance between the distributions of
  local patches of two image sets, per Laplacian-pyramid level (Karras et al.
  2018, "Progressive Growing of GANs"). Blurry samples lose the fine-scale
  patch statistics, which shows up at level 0 even when PSNR is good.
* `high_frequency_ratio`: finest-level Laplacian energy of pred / ref; a
  direct, cheap blur indicator (1.0 = as sharp as the reference).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "to_unit",
    "psnr",
    "ssim",
    "laplacian_pyramid",
    "num_pyramid_levels",
    "sliced_wasserstein",
    "laplacian_swd",
    "high_frequency_ratio",
    "evaluate_batch",
]


def to_unit(x) -> jax.Array:
    """Maps images from [-1, 1] to [0, 1] (float32), clipping out-of-range values."""
    x = jnp.asarray(x, jnp.float32)
    return jnp.clip((x + 1.0) * 0.5, 0.0, 1.0)


def _check_pair(a: jax.Array, b: jax.Array) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    if a.ndim != 4:
        raise ValueError(f"expected NHWC images, got shape {a.shape}")


# --------------------------------------------------------------------------
# PSNR
# --------------------------------------------------------------------------


@jax.jit
def psnr(a, b, data_range=1.0) -> jax.Array:
    """Peak signal-to-noise ratio in dB per image, shape [N].

    `a`, `b`: NHWC images in [0, data_range] (use `to_unit` for [-1, 1] data).
    The MSE is taken over all pixels and channels of each image.
    Identical images give +inf (MSE = 0), like skimage; we do not clamp, so an
    exact copy is never silently reported as a finite "very good" score.
    """
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    _check_pair(a, b)
    mse = jnp.mean(jnp.square(a - b), axis=(1, 2, 3))
    return 10.0 * jnp.log10(jnp.square(data_range) / mse)


# --------------------------------------------------------------------------
# SSIM
# --------------------------------------------------------------------------

_SSIM_SIGMA = 1.5
_SSIM_TRUNCATE = 3.5  # skimage/scipy default -> radius 5, an 11-tap window
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03


def _gaussian_taps(sigma: float, truncate: float) -> np.ndarray:
    # Same discretisation as scipy.ndimage.gaussian_filter (used by skimage).
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * np.square(x / sigma))
    return (w / w.sum()).astype(np.float32)


def _separable_valid(x: jax.Array, taps: np.ndarray) -> jax.Array:
    """'valid' separable correlation of NHWC `x` with 1-D `taps` along H and W."""
    k = int(taps.shape[0])
    h = x.shape[1] - k + 1
    y = sum(float(taps[i]) * x[:, i : i + h] for i in range(k))
    w = x.shape[2] - k + 1
    return sum(float(taps[i]) * y[:, :, i : i + w] for i in range(k))


@jax.jit
def ssim(a, b, data_range=1.0) -> jax.Array:
    """Mean structural similarity per image, shape [N].

    Matches ``skimage.metrics.structural_similarity(a_i, b_i,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=data_range, channel_axis=-1)``: 11x11 Gaussian window
    (sigma 1.5), K1 = 0.01, K2 = 0.03, population covariance, mean over the
    SSIM map and then over channels.

    Border handling: skimage filters with 'reflect' padding but then averages
    the SSIM map only after cropping (win_size - 1) // 2 = 5 pixels from every
    side. Those cropped-map pixels are exactly the ones whose 11x11 window lies
    inside the image, so a 'valid' convolution (no padding at all) gives the
    identical result and the padding mode never matters. Consequently images
    must be at least 11x11; a 32x32 image is averaged over its central 22x22.
    """
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    _check_pair(a, b)
    taps = _gaussian_taps(_SSIM_SIGMA, _SSIM_TRUNCATE)
    if a.shape[1] < taps.shape[0] or a.shape[2] < taps.shape[0]:
        raise ValueError(f"ssim needs images of at least {taps.shape[0]}x{taps.shape[0]}, got {a.shape}")
    c1 = jnp.square(_SSIM_K1 * data_range)
    c2 = jnp.square(_SSIM_K2 * data_range)

    # Second moments are shift invariant: centring on the per-image/channel mean
    # first avoids float32 cancellation in E[x^2] - E[x]^2 on smooth images.
    ma = jnp.mean(a, axis=(1, 2), keepdims=True)
    mb = jnp.mean(b, axis=(1, 2), keepdims=True)
    ac, bc = a - ma, b - mb
    stacked = jnp.concatenate([ac, bc, ac * ac, bc * bc, ac * bc], axis=-1)
    mu_a, mu_b, e_aa, e_bb, e_ab = jnp.split(_separable_valid(stacked, taps), 5, axis=-1)
    var_a = e_aa - mu_a * mu_a
    var_b = e_bb - mu_b * mu_b
    cov = e_ab - mu_a * mu_b
    mu_a = mu_a + ma  # luminance term needs the un-centred means
    mu_b = mu_b + mb

    num = (2.0 * mu_a * mu_b + c1) * (2.0 * cov + c2)
    den = (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    return jnp.mean(num / den, axis=(1, 2, 3))


# --------------------------------------------------------------------------
# Laplacian pyramid
# --------------------------------------------------------------------------

# 5-tap binomial kernel, the classic Burt & Adelson / cv2.pyrDown filter.
_BINOMIAL = np.array([1.0, 4.0, 6.0, 4.0, 1.0], np.float32) / 16.0


def _blur5(x: jax.Array) -> jax.Array:
    # 'reflect' = mirror without repeating the edge pixel (cv2 BORDER_REFLECT_101).
    xp = jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
    return _separable_valid(xp, _BINOMIAL)


def _pyr_down(x: jax.Array) -> jax.Array:
    return _blur5(x)[:, ::2, ::2]


def _pyr_up(x: jax.Array, shape) -> jax.Array:
    """Upsamples to `shape` (the finer level's shape, which may be odd)."""
    z = jnp.zeros(shape, x.dtype).at[:, ::2, ::2].set(x)
    # x4 restores the mean lost by inserting three zeros per 2x2 block.
    return 4.0 * _blur5(z)


def _level_sizes(height: int, width: int, levels: int) -> list[tuple]:
    sizes = [(height, width)]
    for _ in range(levels - 1):
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes


@functools.partial(jax.jit, static_argnames=("levels",))
def laplacian_pyramid(x, levels: int) -> list[jax.Array]:
    """Laplacian pyramid of NHWC images, finest level first.

    Level i < levels-1 holds the band-pass detail G_i - up(G_{i+1}); the last
    entry is the low-pass Gaussian residual G_{levels-1}. Level i has spatial
    size ceil(H / 2^i) x ceil(W / 2^i). Summing up-sampled levels reconstructs
    the input exactly (up to float rounding).
    """
    if levels < 1:
        raise ValueError("levels must be >= 1")
    cur = jnp.asarray(x, jnp.float32)
    pyramid = []
    for _ in range(levels - 1):
        down = _pyr_down(cur)
        pyramid.append(cur - _pyr_up(down, cur.shape))
        cur = down
    pyramid.append(cur)
    return pyramid


def num_pyramid_levels(height: int, width: int, levels: int, patch_size: int) -> int:
    """Number of levels (<= `levels`) whose resolution still fits a patch.

    Small images get fewer levels instead of an error: e.g. 32x32 with 7x7
    patches keeps 32, 16, 8 (3 levels) but not 4; 16x16 keeps only 2 levels.
    """
    usable = 0
    for h, w in _level_sizes(height, width, levels):
        if h < patch_size or w < patch_size:
            break
        usable += 1
    return usable


# --------------------------------------------------------------------------
# Sliced Wasserstein distance
# --------------------------------------------------------------------------


def _resample_sorted(s: jax.Array, m: int) -> jax.Array:
    """Linearly interpolates sorted samples `s` [n, P] at m evenly spaced quantiles."""
    n = s.shape[0]
    pos = jnp.clip((jnp.arange(m, dtype=jnp.float32) + 0.5) * (n / m) - 0.5, 0.0, n - 1.0)
    lo = jnp.floor(pos).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, n - 1)
    frac = (pos - lo)[:, None]
    return s[lo] * (1.0 - frac) + s[hi] * frac


@functools.partial(jax.jit, static_argnames=("num_projections",))
def sliced_wasserstein(a_patches, b_patches, key, num_projections: int = 128) -> jax.Array:
    """Sliced 1-Wasserstein distance between two point sets [Na, D] and [Nb, D].

    Projects both sets onto `num_projections` random unit directions drawn from
    `key`, and averages the 1-D W1 distances (mean |sorted_a - sorted_b|).
    If Na != Nb the larger sorted projection is resampled at the smaller set's
    quantiles. Returns a scalar.
    """
    a = jnp.asarray(a_patches, jnp.float32)
    b = jnp.asarray(b_patches, jnp.float32)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected [N, D] point sets with equal D, got {a.shape} and {b.shape}")
    dirs = jax.random.normal(key, (a.shape[1], num_projections), jnp.float32)
    dirs = dirs / jnp.linalg.norm(dirs, axis=0, keepdims=True)
    pa = jnp.sort(a @ dirs, axis=0)
    pb = jnp.sort(b @ dirs, axis=0)
    if pa.shape[0] > pb.shape[0]:
        pa = _resample_sorted(pa, pb.shape[0])
    elif pb.shape[0] > pa.shape[0]:
        pb = _resample_sorted(pb, pa.shape[0])
    return jnp.mean(jnp.abs(pa - pb))


def _sample_patches(x: jax.Array, key, patch_size: int, num: int) -> jax.Array:
    """`num` random patch_size^2 patches per image -> [N * num, p, p, C]."""
    n, h, w, c = x.shape
    ky, kx = jax.random.split(key)
    ys = jax.random.randint(ky, (n, num), 0, h - patch_size + 1)
    xs = jax.random.randint(kx, (n, num), 0, w - patch_size + 1)

    def crop(img, y, x_):
        return jax.lax.dynamic_slice(img, (y, x_, 0), (patch_size, patch_size, c))

    per_image = jax.vmap(crop, in_axes=(None, 0, 0))
    patches = jax.vmap(per_image)(x, ys, xs)
    return patches.reshape(n * num, patch_size, patch_size, c)


@functools.partial(
    jax.jit,
    static_argnames=("levels", "patch_size", "patches_per_image", "num_projections", "num_repeats"),
)
def _swd_per_level(a, b, key, *, levels, patch_size, patches_per_image, num_projections, num_repeats):
    pyr_a = laplacian_pyramid(a, levels)
    pyr_b = laplacian_pyramid(b, levels)
    out = []
    for lvl in range(levels):

        def one_repeat(rep_key, la=pyr_a[lvl], lb=pyr_b[lvl]):
            k_patch, k_proj = jax.random.split(rep_key)
            # Same positions for both sets: identical sets then give exactly 0,
            # and paired pred/ref batches are compared on corresponding patches.
            pa = _sample_patches(la, k_patch, patch_size, patches_per_image)
            pb = _sample_patches(lb, k_patch, patch_size, patches_per_image)
            # Joint (not per-set) normalisation so that a loss of contrast in
            # one set, i.e. blur, is not normalised away.
            both = jnp.concatenate([pa, pb], axis=0)
            mean = jnp.mean(both, axis=(0, 1, 2), keepdims=True)
            std = jnp.std(both, axis=(0, 1, 2), keepdims=True) + 1e-8
            pa = ((pa - mean) / std).reshape(pa.shape[0], -1)
            pb = ((pb - mean) / std).reshape(pb.shape[0], -1)
            return sliced_wasserstein(pa, pb, k_proj, num_projections)

        rep_keys = jax.random.split(jax.random.fold_in(key, lvl), num_repeats)
        # lax.map (a loop, not vmap): one trace per level and bounded memory.
        out.append(jnp.mean(jax.lax.map(one_repeat, rep_keys)))
    return jnp.stack(out)


def laplacian_swd(
    images_a,
    images_b,
    *,
    levels: int = 3,
    patch_size: int = 7,
    patches_per_image: int = 64,
    num_projections: int = 128,
    num_repeats: int = 4,
    seed: int = 0,
) -> dict[str, float]:
    """Per-level sliced Wasserstein distance between patch distributions.

    Following the SWD of Karras et al. (ProGAN): build a Laplacian pyramid of
    both image sets, sample `patches_per_image` random patch_size x patch_size
    patches per image and level, normalise each level's patch descriptors per
    channel by the mean/std over *both* sets, and compute the sliced
    Wasserstein distance with `num_projections` random directions. This is
    repeated `num_repeats` times with fresh patch positions and directions
    (all derived from `seed`, so results are reproducible) and averaged.

    Values are raw (ProGAN reports them x1e3). The sets may differ in N but
    must share H, W, C. Any consistent value range works (the normalisation
    removes scale).

    Small images: only levels whose resolution is >= patch_size are used (see
    `num_pyramid_levels`); the dict then has fewer 'swd_l*' keys. Patches are
    drawn with replacement, so tiny coarse levels just repeat positions.

    Returns {'swd_l0': finest, ..., 'swd_l{L-1}': coarsest, 'swd_mean': mean}
    as python floats.
    """
    a = jnp.asarray(images_a, jnp.float32)
    b = jnp.asarray(images_b, jnp.float32)
    if a.ndim != 4 or b.ndim != 4 or a.shape[1:] != b.shape[1:]:
        raise ValueError(f"expected NHWC sets with equal H, W, C; got {a.shape} and {b.shape}")
    eff = num_pyramid_levels(a.shape[1], a.shape[2], levels, patch_size)
    if eff == 0:
        raise ValueError(f"images {a.shape[1:3]} are smaller than the {patch_size}x{patch_size} patch")
    per_level = _swd_per_level(
        a,
        b,
        jax.random.PRNGKey(seed),
        levels=eff,
        patch_size=patch_size,
        patches_per_image=patches_per_image,
        num_projections=num_projections,
        num_repeats=num_repeats,
    )
    per_level = np.asarray(per_level, np.float64)
    out = {f"swd_l{i}": float(v) for i, v in enumerate(per_level)}
    out["swd_mean"] = float(per_level.mean())
    return out


# --------------------------------------------------------------------------
# High-frequency energy ratio
# --------------------------------------------------------------------------


@jax.jit
def high_frequency_ratio(pred, ref) -> jax.Array:
    """Energy (mean square) of the finest Laplacian level of `pred` over `ref`.

    Computed over the whole batch, returns a scalar. 1.0 means pred carries as
    much fine detail as the reference; blur gives < 1, noise/over-sharpening
    > 1. Scale-sensitive, so pass both in the same range.
    """
    pred = jnp.asarray(pred, jnp.float32)
    ref = jnp.asarray(ref, jnp.float32)

    def energy(x):
        band = x - _pyr_up(_pyr_down(x), x.shape)
        return jnp.mean(jnp.square(band))

    return energy(pred) / jnp.maximum(energy(ref), 1e-12)


# --------------------------------------------------------------------------
# Convenience
# --------------------------------------------------------------------------


def evaluate_batch(
    pred,
    ref,
    *,
    swd_levels: int = 3,
    swd_patches_per_image: int = 64,
    swd_num_projections: int = 128,
    seed: int = 0,
) -> dict[str, float]:
    """All metrics for a paired batch of NHWC images in [-1, 1].

    Returns python floats: 'psnr' and 'ssim' (batch means, on [0, 1] images),
    'swd_l0'..'swd_l{L-1}' and 'swd_mean' (pred set vs ref set), 'hf_ratio'.
    'psnr' is +inf only if some prediction equals its reference exactly.
    """
    p = to_unit(pred)
    r = to_unit(ref)
    _check_pair(p, r)
    out = {
        "psnr": float(jnp.mean(psnr(p, r))),
        "ssim": float(jnp.mean(ssim(p, r))),
    }
    out.update(
        laplacian_swd(
            p,
            r,
            levels=swd_levels,
            patches_per_image=swd_patches_per_image,
            num_projections=swd_num_projections,
            seed=seed,
        )
    )
    out["hf_ratio"] = float(high_frequency_ratio(p, r))
    return out
