"""Real-ESRGAN's second-order degradation by its reference implementation, basicsr's, for comparison.

basicsr (`pip install basicsr-fixed`, the maintained build that imports with current torchvision) draws
the blur kernels in `RealESRGANDataset.__getitem__` (numpy: `random_mixed_kernels`,
`circular_lowpass_kernel`) and degrades in `RealESRGANModel.feed_data` (torch: `filter2D`,
`F.interpolate`, `random_add_{gaussian,poisson}_noise_pt`, `DiffJPEG`). This module calls those
functions in that order with the parameters of our config (configs/data.py `realesrgan_degradation`),
on the CPU, one image at a time, so that `codi_jax/data/degradation.py` can be measured against it:
the same parameters, the same inputs, the same machine (benchmarks/data.py, tests/test_data.py).
basicsr's randomness comes from python's `random`, numpy's global state and torch's; `seed` sets all three.
"""

from __future__ import annotations

import math
import random

import numpy as np


def _odd_sizes(cfg) -> list[int]:
    lo, hi = cfg.kernel_size_range
    return list(range(lo if lo % 2 else lo + 1, hi + 1, 2))


def _blur_kernel(stage, cfg):
    from basicsr.data.degradations import circular_lowpass_kernel, random_mixed_kernels

    size = random.choice(_odd_sizes(cfg))
    if np.random.uniform() < stage.sinc_prob:
        lo = cfg.sinc_cutoff_small if size < cfg.sinc_large_kernel_min else cfg.sinc_cutoff_large
        kernel = circular_lowpass_kernel(np.random.uniform(*lo), size, pad_to=False)
    else:
        kernel = random_mixed_kernels(
            list(stage.kernel_list),
            list(stage.kernel_prob),
            size,
            tuple(stage.blur_sigma),
            tuple(stage.blur_sigma),
            [-math.pi, math.pi],
            tuple(stage.betag_range),
            tuple(stage.betap_range),
            noise_range=None,
        )
    pad = (cfg.kernel_size_range[1] - size) // 2
    return np.pad(kernel, ((pad, pad), (pad, pad)))


def kernels(cfg, seed: int):
    """(stage-1 kernel, stage-2 kernel, final sinc kernel or a pulse) as RealESRGANDataset draws them."""
    from basicsr.data.degradations import circular_lowpass_kernel

    random.seed(seed)
    np.random.seed(seed % (2**32))
    k1, k2 = _blur_kernel(cfg.stage1, cfg), _blur_kernel(cfg.stage2, cfg)
    side = cfg.kernel_size_range[1]
    if np.random.uniform() < cfg.final.sinc_prob:
        size = random.choice(_odd_sizes(cfg))
        sinc = circular_lowpass_kernel(np.random.uniform(*cfg.final.sinc_cutoff), size, pad_to=side)
    else:
        sinc = np.zeros((side, side), np.float32)
        sinc[side // 2, side // 2] = 1.0
    return k1, k2, sinc


class Degrader:
    """basicsr's feed_data for one image [H, W, 3] float in [0, 1] (RGB) -> the LR image [H/s, W/s, 3]."""

    def __init__(self, cfg, scale: int, usm=None):
        import torch
        from basicsr.utils import DiffJPEG, USMSharp

        self.cfg, self.scale = cfg, int(scale)
        self.jpeger = DiffJPEG(differentiable=False)
        self.usm = None if usm is None else USMSharp(radius=int(usm.radius))
        self.usm_cfg = usm
        self.torch = torch

    def __call__(self, hr: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(the USM-sharpened GT [H, W, 3], its LR [H/s, W/s, 3]), both float32 in [0, 1]."""
        import torch

        with torch.no_grad():
            return self._degrade(hr, seed)

    def _degrade(self, hr, seed):
        import torch
        import torch.nn.functional as F
        from basicsr.data.degradations import random_add_gaussian_noise_pt, random_add_poisson_noise_pt
        from basicsr.utils.img_process_util import filter2D

        cfg, s1, s2 = self.cfg, self.cfg.stage1, self.cfg.stage2
        k1, k2, sinc = (torch.from_numpy(np.asarray(k, np.float32))[None] for k in kernels(cfg, seed))
        torch.manual_seed(seed)
        gt = torch.from_numpy(np.ascontiguousarray(hr, np.float32)).permute(2, 0, 1)[None]
        if self.usm is not None:
            gt = self.usm(gt, weight=self.usm_cfg.weight, threshold=self.usm_cfg.threshold)
        h, w = gt.shape[2:]

        def resize_scale(stage):
            kind = random.choices(["up", "down", "keep"], list(stage.resize_prob))[0]
            if kind == "up":
                return np.random.uniform(1, stage.resize_range[1])
            return np.random.uniform(stage.resize_range[0], 1) if kind == "down" else 1

        def noise(x, stage):
            if np.random.uniform() < stage.gaussian_noise_prob:
                return random_add_gaussian_noise_pt(x, sigma_range=tuple(stage.noise_range), clip=True, rounds=False, gray_prob=stage.gray_noise_prob)  # fmt: skip
            return random_add_poisson_noise_pt(x, scale_range=tuple(stage.poisson_scale_range), gray_prob=stage.gray_noise_prob, clip=True, rounds=False)  # fmt: skip

        def jpeg(x, q_range):
            q = x.new_zeros(x.size(0)).uniform_(*q_range)
            return self.jpeger(torch.clamp(x, 0, 1), quality=q)

        modes = list(cfg.resize_modes)
        out = filter2D(gt, k1)
        out = F.interpolate(out, scale_factor=resize_scale(s1), mode=random.choice(modes))
        out = jpeg(noise(out, s1), s1.jpeg_range)
        if np.random.uniform() < s2.blur_prob:
            out = filter2D(out, k2)
        sc = resize_scale(s2)
        out = F.interpolate(out, size=(int(h / self.scale * sc), int(w / self.scale * sc)), mode=random.choice(modes))
        out = noise(out, s2)
        size = (h // self.scale, w // self.scale)
        if np.random.uniform() < cfg.final.resize_first_prob:
            out = filter2D(F.interpolate(out, size=size, mode=random.choice(modes)), sinc)
            out = jpeg(out, cfg.final.jpeg_range)
        else:
            out = jpeg(out, cfg.final.jpeg_range)
            out = filter2D(F.interpolate(out, size=size, mode=random.choice(modes)), sinc)
        lq = torch.clamp((out * 255.0).round(), 0, 255) / 255.0
        to_np = lambda t: t[0].permute(1, 2, 0).detach().numpy().astype(np.float32)
        return to_np(gt), to_np(lq)
