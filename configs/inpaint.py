"""Inpainting (paper sec. 5, ImageNet inpainting): fill a masked region of an image.

The condition is the masked image (hole set to 0) plus the mask, 4 channels; masks are Palette-style
boxes and free-form strokes (`data.mask`, configs/data.py). Metrics on the whole image and inside /
outside the hole (psnr_hole, psnr_known). Variants as configs/sr.py: none (a pretrained latent model),
'tiny' (embedded images, its own tiny unconditional teacher), 'smoke' (the end-to-end test).
"""

from configs import common


def get_config(variant=""):
    common.check_variant(variant, "configs/inpaint.py")
    config = common.recipe("inpaint")
    if variant == "tiny":
        common.shrink_to_tiny(config)
        config.model.adapter.mu_per_feature = True
    elif variant == "smoke":
        common.shrink_to_smoke(config)
    config.model.adapter.cond_channels = 4  # the masked image and the mask
    config.variant = variant
    return config
