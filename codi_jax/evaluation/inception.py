"""InceptionV3 of FID (the TF 2015-12-05 graph as pytorch-fid runs it), in Flax, for FID in JAX.

Weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (the standard FID weights), read from
a local file (`.pth` needs torch; `.safetensors` with the same names needs nothing more). Module
names follow torchvision's Inception3 (`Conv2d_1a_3x3/conv`, `Mixed_5b/branch1x1/bn`, ...) so the
state dict converts by name. Input: NHWC images in [-1, 1] (the models' range), any size; they are
resized bilinearly to 299 x 299 (no antialiasing, half-pixel centres: torch's F.interpolate with
align_corners=False). Output: the 2048-d pool3 features FID uses.

The FID variant differs from torchvision's Inception3 in its pools: average pools do not count
padding, and the last block (Mixed_7c) max-pools its pool branch.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from codi_jax.evaluation import weights

FEATURE_DIM = 2048
WEIGHTS_HELP = (
    "the standard FID weights are pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
    "(https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth)"
)


class BasicConv(nn.Module):
    features: int
    kernel: tuple = (1, 1)
    strides: tuple = (1, 1)
    padding: tuple = (0, 0)

    @nn.compact
    def __call__(self, x):
        pad = tuple((p, p) for p in self.padding)
        x = nn.Conv(self.features, self.kernel, self.strides, padding=pad, use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool(x):
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, stride=2, pad=0):
    return nn.max_pool(x, (3, 3), (stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(64, name="branch1x1")(x)
        b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(BasicConv(48, name="branch5x5_1")(x))
        b3 = BasicConv(64, name="branch3x3dbl_1")(x)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv(self.pool_features, name="branch_pool")(_avg_pool(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(384, (3, 3), (2, 2), name="branch3x3")(x)
        bd = BasicConv(64, name="branch3x3dbl_1")(x)
        bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, (3, 3), (2, 2), name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c = self.channels_7x7
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        b1 = BasicConv(192, name="branch1x1")(x)
        b7 = BasicConv(c, name="branch7x7_1")(x)
        b7 = BasicConv(c, **row, name="branch7x7_2")(b7)
        b7 = BasicConv(192, **col, name="branch7x7_3")(b7)
        bd = BasicConv(c, name="branch7x7dbl_1")(x)
        for i, (feat, shape) in enumerate([(c, col), (c, row), (c, col), (192, row)], start=2):
            bd = BasicConv(feat, **shape, name=f"branch7x7dbl_{i}")(bd)
        bp = BasicConv(192, name="branch_pool")(_avg_pool(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(320, (3, 3), (2, 2), name="branch3x3_2")(BasicConv(192, name="branch3x3_1")(x))
        b7 = BasicConv(192, name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, (3, 3), (2, 2), name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)


class InceptionE(nn.Module):
    max_pool_branch: bool  # FID's Mixed_7c (FIDInceptionE_2); Mixed_7b averages without padding

    @nn.compact
    def __call__(self, x):
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        b1 = BasicConv(320, name="branch1x1")(x)
        b3 = BasicConv(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [BasicConv(384, **row, name="branch3x3_2a")(b3), BasicConv(384, **col, name="branch3x3_2b")(b3)], axis=-1
        )
        bd = BasicConv(448, name="branch3x3dbl_1")(x)
        bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [BasicConv(384, **row, name="branch3x3dbl_3a")(bd), BasicConv(384, **col, name="branch3x3dbl_3b")(bd)],
            axis=-1,
        )
        pooled = _max_pool(x, stride=1, pad=1) if self.max_pool_branch else _avg_pool(x)
        bp = BasicConv(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """Images [N, H, W, 3] in [-1, 1] -> pool3 features [N, 2048]."""

    @nn.compact
    def __call__(self, images):
        x = (jnp.clip(images.astype(jnp.float32), -1.0, 1.0) + 1.0) / 2.0  # pytorch-fid's input range [0, 1]
        x = jax.image.resize(x, (x.shape[0], 299, 299, x.shape[-1]), "bilinear", antialias=False)
        x = 2.0 * x - 1.0
        x = BasicConv(32, (3, 3), (2, 2), name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool(x)
        x = BasicConv(80, name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool(x)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, c in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(c, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(False, name="Mixed_7b")(x)
        x = InceptionE(True, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


def variables_from_torch_state(state: dict) -> dict:
    """pytorch-fid / torchvision Inception3 state dict (name -> array) -> Flax variables.

    conv.weight [O, I, kh, kw] -> conv/kernel [kh, kw, I, O]; bn.weight/bias -> bn/scale/bias;
    bn.running_mean/var -> batch_stats bn/mean/var. The classifier (fc.*) and BN step counters are unused.
    """
    params, stats = {}, {}

    def put(tree, path, value):
        for p in path[:-1]:
            tree = tree.setdefault(p, {})
        tree[path[-1]] = value

    for name, value in state.items():
        value = np.asarray(value, np.float32)
        *mods, leaf = name.split(".")
        if mods[:1] == ["fc"] or leaf == "num_batches_tracked":
            continue
        if mods[-1] == "conv" and leaf == "weight":
            put(params, mods + ["kernel"], value.transpose(2, 3, 1, 0))
        elif mods[-1] == "bn" and leaf in ("weight", "bias"):
            put(params, mods + ["scale" if leaf == "weight" else "bias"], value)
        elif mods[-1] == "bn" and leaf in ("running_mean", "running_var"):
            put(stats, mods + ["mean" if leaf == "running_mean" else "var"], value)
        else:
            raise ValueError(f"unexpected InceptionV3 weight {name!r} (not an FID Inception state dict?)")
    return {"params": params, "batch_stats": stats}


def load_weights(path: str) -> dict:
    """Flax variables from the FID Inception weights file (.pth with torch installed, or .safetensors)."""
    variables = variables_from_torch_state(weights.read_state_dict(path, "FID Inception", WEIGHTS_HELP))
    want = jax.eval_shape(FIDInceptionV3().init, jax.random.PRNGKey(0), jnp.zeros((1, 75, 75, 3)))
    weights.check_shapes(variables, want, f"FID Inception weights {path}", "not the FID InceptionV3 weights?")
    return variables


@functools.lru_cache(maxsize=2)
def feature_fn(path: str):
    """A jitted `images -> [N, 2048] features` with the weights at `path` (loaded once)."""
    variables = load_weights(path)
    module = FIDInceptionV3()
    return jax.jit(lambda images: module.apply(variables, images))
