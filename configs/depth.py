"""Text-guided depth-to-image (paper sec. 5, Fig. 5, Table 2): a depth map and a caption -> an image.

The condition is a 1-channel inverse-depth map (near = 1); the caption goes through the text encoder.
The 'tiny' variant renders scenes (a sphere or a box before a tilted wall, textured by the embedded
photographs) so that depth is exact, and captions name the colours, which the depth map does not
show: `colour_acc_object` / `colour_acc_wall` in metrics.json say whether samples follow the text.
Its teacher is a tiny text-to-image model of such scenes.
"""

from configs import sr


def get_config(variant=""):
    config = sr.get_config(variant)
    config.task = "depth"
    config.model.adapter.cond_channels = 1
    if variant in ("tiny", "smoke"):
        config.model.unet.cross_attention_dim = config.text.tiny.width
        config.model.adapter.input = "sample_and_cond"
    else:
        config.text.encoder = "pretrained"
    return config
