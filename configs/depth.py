"""Text-guided depth-to-image (paper sec. 5, Fig. 5, Table 2): a depth map and a caption -> an image.

The condition is a 1-channel inverse-depth map (near = 1); the caption goes through the text encoder.
The 'tiny' variant renders scenes (a sphere or a box before a tilted wall, textured by the embedded
photographs) so that depth is exact, and captions name the colours, which the depth map does not
show: `colour_acc_object` / `colour_acc_wall` in metrics.json say whether samples follow the text.
Its teacher is a tiny text-to-image model of such scenes.
"""

from configs import common


def get_config(variant=""):
    common.check_variant(variant, "configs/depth.py")
    config = common.recipe("depth")
    if variant == "tiny":
        common.shrink_to_tiny(config)
        config.model.adapter.mu_per_feature = True
    elif variant == "smoke":
        common.shrink_to_smoke(config)
    if variant:  # the tiny text encoder's width (a pretrained folder sets its own)
        config.model.unet.cross_attention_dim = config.text.tiny.width
    config.model.adapter.cond_channels = 1  # inverse depth
    config.variant = variant
    return config
