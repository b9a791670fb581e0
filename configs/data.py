"""Data configuration: image sources, crops and Real-ESRGAN-style degradation.

All tunable numbers of the data pipeline live here; code in `codi_jax/data`
only reads them. Use `get_data_config()` for the defaults.

Sources
-------
* `source='embedded'`: colour photographs (and a few grayscale ones, made RGB)
  that ship inside scikit-image / scikit-learn, so everything works offline.
  Valid names: see `codi_jax.data.sources.EMBEDDED_IMAGE_NAMES`.
* `source='folder'`: every image file under `folder`, recursive (sorted by
  path; only the file list is built at start, each image is decoded when read;
  undecodable files are skipped and counted). Eval images come from
  `eval_folder`; when `eval_folder` is empty, the last `ceil(eval_fraction * N)`
  files of `folder` (sorted by path) are held out for evaluation and never used
  for training.
* `source='array_record'`: a folder `python -m codi_jax.data.prepare` wrote
  (`path`; docs/data.md): ArrayRecord shards read record by record, for
  datasets of any size. Eval records come from `eval_path`, or the last
  `ceil(eval_fraction * N)` records of `path`.

Train and eval images must be disjoint; an overlap raises a ValueError.
"""

import math

import ml_collections

# Kernel families of Real-ESRGAN and their sampling probabilities
# (train_realesrnet_x4plus.yml); shared by both stages.
_KERNEL_LIST = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
_KERNEL_PROB = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)


def _stage(*, blur_prob, sigma, betag, betap, resize_prob, resize_range, noise_range, poisson_range, jpeg_range=None):
    """One blur -> resize -> noise (-> JPEG) degradation stage."""
    s = ml_collections.ConfigDict()
    s.blur_prob = blur_prob  # probability of applying the blur at all
    s.kernel_list = _KERNEL_LIST  # kernel families to choose from
    s.kernel_prob = _KERNEL_PROB  # their probabilities (sum to 1)
    s.sinc_prob = 0.1  # probability the blur kernel is a sinc instead
    s.blur_sigma = sigma  # Gaussian sigma range (pixels), per axis
    s.betag_range = betag  # generalized-Gaussian shape beta range
    s.betap_range = betap  # plateau shape beta range
    s.rotation_range = (-math.pi, math.pi)  # anisotropic kernel angle range
    s.resize_prob = resize_prob  # probabilities of (up, down, keep)
    s.resize_range = resize_range  # scale factor range (lo for down, hi for up)
    s.gaussian_noise_prob = 0.5  # Gaussian noise, else Poisson noise
    s.noise_range = noise_range  # Gaussian sigma range on the 0..255 scale
    s.poisson_scale_range = poisson_range  # Poisson noise strength range
    s.gray_noise_prob = 0.4  # probability the noise is the same on all channels
    if jpeg_range is not None:
        s.jpeg_range = jpeg_range  # JPEG quality range
    return s


def _degradation(*, stage1, stage2, final_jpeg_range):
    d = ml_collections.ConfigDict()
    d.kernel_size_range = (7, 21)  # odd kernel sizes drawn uniformly in range
    # Sinc cutoff (rad/pixel) ranges; small kernels can't represent low cutoffs.
    d.sinc_cutoff_small = (math.pi / 3, math.pi)
    d.sinc_cutoff_large = (math.pi / 5, math.pi)
    d.sinc_large_kernel_min = 13  # kernel size from which the large range applies
    d.resize_modes = ("area", "bilinear", "bicubic")  # chosen uniformly
    # Smallest side (pixels) of any intermediate image. Real-ESRGAN never gets
    # this small on 256 px crops, but 32 px crops can shrink to 1 px otherwise.
    d.min_size = 4
    # Base of the 2nd-stage resize: 'target' = final LR size (as Real-ESRGAN's
    # code does), 'current' = size after stage 1.
    d.second_resize_base = "target"
    d.stage1 = stage1
    d.stage2 = stage2
    d.final = ml_collections.ConfigDict()
    d.final.sinc_prob = 0.8  # probability of the final sinc filter
    d.final.sinc_cutoff = (math.pi / 3, math.pi)  # its cutoff range
    d.final.resize_first_prob = 0.5  # [resize + sinc, JPEG] else [JPEG, ...]
    d.final.jpeg_range = final_jpeg_range  # final JPEG quality range
    return d


def realesrgan_degradation() -> ml_collections.ConfigDict:
    """Real-ESRGAN (train_realesrnet_x4plus.yml) second-order degradation."""
    return _degradation(
        stage1=_stage(
            blur_prob=1.0,
            sigma=(0.2, 3.0),
            betag=(0.5, 4.0),
            betap=(1.0, 2.0),
            resize_prob=(0.2, 0.7, 0.1),
            resize_range=(0.15, 1.5),
            noise_range=(1.0, 30.0),
            poisson_range=(0.05, 3.0),
            jpeg_range=(30, 95),
        ),
        stage2=_stage(
            blur_prob=0.8,
            sigma=(0.2, 1.5),
            betag=(0.5, 4.0),
            betap=(1.0, 2.0),
            resize_prob=(0.3, 0.4, 0.3),
            resize_range=(0.3, 1.2),
            noise_range=(1.0, 25.0),
            poisson_range=(0.05, 2.5),
        ),
        final_jpeg_range=(30, 95),
    )


def stablesr_test_degradation() -> ml_collections.ConfigDict:
    """Milder StableSR degradation (its Real-ESRGAN-style config) for eval."""
    return _degradation(
        stage1=_stage(
            blur_prob=1.0,
            sigma=(0.2, 1.5),
            betag=(0.5, 2.0),
            betap=(1.0, 1.5),
            resize_prob=(0.2, 0.7, 0.1),
            resize_range=(0.3, 1.5),
            noise_range=(1.0, 15.0),
            poisson_range=(0.05, 2.0),
            jpeg_range=(60, 95),
        ),
        stage2=_stage(
            blur_prob=0.5,
            sigma=(0.2, 1.0),
            betag=(0.5, 2.0),
            betap=(1.0, 1.5),
            resize_prob=(0.3, 0.4, 0.3),
            resize_range=(0.6, 1.2),
            noise_range=(1.0, 12.0),
            poisson_range=(0.05, 1.0),
        ),
        final_jpeg_range=(60, 100),
    )


# Alias with the name used in the design notes.
stablesr_test = stablesr_test_degradation


def inpaint_masks() -> ml_collections.ConfigDict:
    """Palette-style inpainting masks: boxes and free-form brush strokes."""
    m = ml_collections.ConfigDict()
    m.kinds = ("box", "free_form")  # mask families
    m.kind_probs = (0.5, 0.5)  # their probabilities
    m.hole_ratio = (0.1, 0.5)  # accepted fraction of the image to fill in (redrawn otherwise)
    m.max_tries = 10  # draws before falling back to a box of the mid ratio
    m.box_side = (0.25, 0.7)  # box side as a fraction of the image side
    m.strokes = (1, 4)  # brush strokes per free-form mask
    m.vertices = (3, 8)  # polyline vertices per stroke
    m.stroke_length = (0.1, 0.35)  # segment length, fraction of the image side
    m.brush_width = (0.08, 0.2)  # brush width, fraction of the image side
    m.max_turn = 2.0  # largest turn between segments (radians)
    return m


def edits() -> ml_collections.ConfigDict:
    """Computable instructed edits of the tiny editing data (codi_jax/data/tasks.py EDITS)."""
    e = ml_collections.ConfigDict()
    e.names = ("grayscale", "invert", "blur", "flip", "darken")  # edits (and so instructions) in use
    e.blur_sigma = 1.0  # 'blur it': Gaussian sigma in pixels
    e.darken_factor = 0.5  # 'make it darker': multiplier
    return e


def depth_scenes() -> ml_collections.ConfigDict:
    """Rendered scenes with exact depth for the tiny depth-to-image data."""
    d = ml_collections.ConfigDict()
    d.colours = ("red", "green", "blue", "yellow")  # caption colours (object and wall)
    d.shapes = ("sphere", "box")  # foreground object kinds
    d.palette = dict(
        red=(0.9, 0.15, 0.1), green=(0.15, 0.75, 0.2), blue=(0.15, 0.3, 0.9), yellow=(0.95, 0.85, 0.15)
    )  # RGB in [0, 1]
    d.wall_depth = (3.0, 4.0)  # depth of the wall's centre
    d.wall_tilt = 0.5  # |slope| of the wall's depth over the image plane
    d.object_radius = (0.25, 0.5)  # object half-size, image-plane units ([-1, 1] across)
    d.light = (-0.5, -0.6, -0.6)  # direction towards the light (x right, y down, z away)
    d.texture_strength = (0.55, 1.0)  # photo luminance mapped to this brightness range
    # source='depth_folder': a local transformers depth-estimation folder (DPT/MiDaS) that makes the
    # missing depth/ maps once ('' = every map must exist)
    d.model_path = ""
    return d


def get_data_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # 'embedded' (package images) | 'folder' | paired datasets (codi_jax/data/paired.py):
    # 'edit_jsonl' | 'ip2p_folder' (task edit), 'depth_folder' (task depth)
    # 'array_record': shards that `python -m codi_jax.data.prepare` wrote (docs/data.md), read as they are needed
    c.source = "embedded"
    c.path = ""  # source='array_record': the prepared folder (its manifest.json and shards)
    c.eval_path = ""  # source='array_record': a prepared eval folder; '' = hold out the last eval_fraction of `path`
    # Records that do not decode are skipped and counted; more than this fraction of those read stops the run.
    c.max_skipped_fraction = 0.1
    # source='array_record' with a cache (codi_jax.pretrained.record_cache): 'auto' = the train step reads the
    # records' VAE latents (and text-encoder outputs) instead of running those encoders; 'off' = ignore it
    c.cache = "auto"
    c.folder = ""  # image directory for source='folder' (the dataset's root for paired sources)
    c.pairs_file = ""  # source='edit_jsonl': the JSONL file of (input, edited, instruction)
    c.tfds = ml_collections.ConfigDict(
        dict(  # source='tfds' (tasks edit, depth): codi_jax/data/paired.py
            name="",  # dataset name (as registered / built in data_dir)
            data_dir="",  # its folder ('' = tfds' default)
            train_split="train",
            eval_split="",  # '' = hold out data.eval_fraction of the train split
            features=dict(
                input="original_image",
                edited="edited_image",
                instruction="edit_prompt",  # edit
                image="image",
                depth="depth",
                caption="caption",
            ),  # depth
        )
    )
    c.eval_folder = ""  # eval image directory; '' = hold out from `folder`
    c.eval_fraction = 0.1  # held-out fraction of `folder` when eval_folder=''
    # Embedded training images: colour photos plus textured grayscale ones.
    c.train_images = (
        "astronaut",
        "rocket",
        "china",
        "immunohistochemistry",
        "hubble_deep_field",
        "retina",
        "colorwheel",
        "camera",
        "grass",
        "gravel",
        "brick",
        "coins",
    )
    # Held-out colour photographs, never used for training.
    c.eval_images = ("chelsea", "flower", "coffee")
    c.crop_size = 32  # square HR crop side S (pixels)
    c.image_downscale = 2  # pre-downscale factor at load time (1 = off)
    c.downscale_resample = "box"  # 'box' (area) or 'bicubic'
    c.sr_scale = 4  # super-resolution factor; LR side = S / sr_scale
    c.random_flip = True  # random horizontal flip of training crops
    # grain multiprocessing workers (0 = in-process; >0 needs absl flags
    # parsed, i.e. running under absl.app).
    c.worker_count = 0
    c.worker_threads = 1  # BLAS/OpenMP threads per grain worker process (0 = the libraries' default)
    c.read_threads = 1  # grain prefetch threads (in-process)
    c.prefetch_batches = 2  # batches computed ahead of the consumer
    c.usm_sharpen_gt = True  # USM-sharpen the training GT (Real-ESRGAN)
    c.eval_usm_sharpen_gt = False  # eval GT stays the clean crop
    c.usm = ml_collections.ConfigDict()
    c.usm.weight = 0.5  # residual gain
    c.usm.radius = 50  # Gaussian kernel size published for 256-px GT crops
    c.usm.threshold = 10  # residual threshold on the 0..255 scale for the mask
    # Kernel size is clamped to this fraction of the crop side (51/256 ~ 0.2),
    # so a 32 px crop uses a 7 px kernel instead of one wider than the crop.
    c.usm.max_radius_frac = 0.2
    c.degradation = realesrgan_degradation()  # training degradation
    c.eval_degradation = stablesr_test_degradation()  # eval degradation
    c.mask = inpaint_masks()  # task 'inpaint'
    c.edit = edits()  # task 'edit'
    c.depth = depth_scenes()  # task 'depth'
    return c


def get_config() -> ml_collections.ConfigDict:
    return get_data_config()
