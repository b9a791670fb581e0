"""Inpainting (paper sec. 5, ImageNet inpainting): fill a masked region of an image.

The condition is the masked image (hole set to 0) plus the mask, 4 channels; masks are Palette-style
boxes and free-form strokes (`data.mask`, configs/data.py). Metrics on the whole image and inside /
outside the hole (psnr_hole, psnr_known). Variants as configs/sr.py: 'tiny' (embedded images, its own
tiny unconditional teacher), 'smoke' (the end-to-end test), none (a pretrained latent model).
"""

from configs import sr


def get_config(variant=""):
    config = sr.get_config(variant)
    config.task = "inpaint"
    config.model.adapter.cond_channels = 4
    if variant in ("tiny", "smoke"):
        # The condition has 4 channels, so the duplicated encoder sees z_t + embed(c) (ControlNet's input).
        config.model.adapter.input = "sample_and_cond"
    return config
