"""Instructed image editing (paper sec. 5, Fig. 6; InstructPix2Pix data): input image + instruction -> edit.

The input image is the condition (through the duplicated encoder); the instruction goes through the
text encoder into cross-attention (`text.*`, with prompt dropout for classifier-free guidance).
Sampled in 1 step as in Fig. 6 (`eval.steps` also has 2 and 4). The 'tiny' variant edits embedded
photographs with computable instructions (`data.edit.names`: grayscale, invert, blur, flip, darken),
so the metrics compare with the true edit; its teacher is a tiny text-to-image model of edited crops
captioned by their instructions.
"""

from configs import common


def get_config(variant=""):
    common.check_variant(variant, "configs/edit.py")
    config = common.recipe("edit")
    config.eval.steps = (1, 2, 4)
    if variant == "tiny":
        common.shrink_to_tiny(config)
        config.model.adapter.mu_per_feature = True
    elif variant == "smoke":
        common.shrink_to_smoke(config)
        config.eval.steps = (1, 2)
    if variant:
        config.model.unet.cross_attention_dim = config.text.tiny.width  # the tiny text encoder's width
        config.model.adapter.input = "cond_as_sample"  # the input image in z_t's place: editing starts from it
    config.variant = variant
    return config
