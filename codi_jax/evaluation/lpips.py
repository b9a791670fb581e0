"""LPIPS (Zhang et al. 2018, v0.1, AlexNet trunk) in Flax: the perceptual distance of the paper's tables.

d(x0, x1) = sum_l mean_hw( w_l . (f_l(x0) / |f_l(x0)| - f_l(x1) / |f_l(x1)|)^2 ), f_l the five ReLU
outputs of AlexNet's features (inputs shifted and scaled by LPIPS' fixed ScalingLayer), |.| the
channel norm (+1e-10), w_l the learned non-negative 1x1 "lin" weights.

Weights from local files (`.pth` with torch installed, or `.safetensors`), one or two comma-separated:
the `lpips` package's full model state dict (`net.sliceK.i.*` + `linK.model.1.weight`), or torchvision's
AlexNet (`features.i.*`, e.g. alexnet-owt-7be5be79.pth) plus the lpips package's `weights/v0.1/alex.pth`
(the lin layers). Input: NHWC in [-1, 1].
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from codi_jax.evaluation import weights

# torchvision alexnet.features: (index, out channels, kernel, stride, padding); ReLU after each conv,
# max pools (3, stride 2) before convs 3 and 6. LPIPS' five layers end after each ReLU.
ALEX_CONVS = ((0, 64, 11, 4, 2), (3, 192, 5, 1, 2), (6, 384, 3, 1, 1), (8, 256, 3, 1, 1), (10, 256, 3, 1, 1))
_POOL_BEFORE = (3, 6)
SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
SCALE = np.array([0.458, 0.448, 0.450], np.float32)
WEIGHTS_HELP = (
    "LPIPS needs torchvision's AlexNet weights (alexnet-owt-7be5be79.pth) and the lpips package's "
    "weights/v0.1/alex.pth (pip install lpips), given as 'alexnet.pth,alex.pth'"
)


class LPIPS(nn.Module):
    """(x0, x1) [N, H, W, 3] in [-1, 1] -> [N] distances."""

    @nn.compact
    def __call__(self, x0, x1):
        n = x0.shape[0]
        x = (jnp.concatenate([x0, x1]).astype(jnp.float32) - SHIFT) / SCALE
        total = jnp.zeros((n,), jnp.float32)
        for k, (idx, feat, kernel, stride, pad) in enumerate(ALEX_CONVS):
            if idx in _POOL_BEFORE:
                x = nn.max_pool(x, (3, 3), (2, 2))
            x = nn.relu(
                nn.Conv(feat, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)), name=f"conv{idx}")(
                    x
                )
            )
            f = x / (jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True)) + 1e-10)
            diff = jnp.square(f[:n] - f[n:])
            w = self.param(f"lin{k}", nn.initializers.ones, (feat,))
            total = total + jnp.mean(diff @ w, axis=(1, 2))
        return total


def variables_from_torch_state(state: dict) -> dict:
    """lpips / torchvision names -> {'params': {'conv{i}': {kernel, bias}, 'lin{k}': [C]}}."""
    params = {}
    for name, value in state.items():
        value = np.asarray(value, np.float32)
        parts = name.split(".")
        if parts[0] == "net" and parts[1].startswith("slice"):  # lpips: net.slice2.3.weight
            idx, leaf = int(parts[2]), parts[3]
        elif parts[0] == "features":  # torchvision: features.3.weight
            idx, leaf = int(parts[1]), parts[2]
        elif (
            parts[0][:3] == "lin" and parts[0][3:].isdigit() and parts[-1] == "weight"
        ):  # lin2.model.1.weight [1, C, 1, 1]
            params[parts[0]] = value.reshape(-1)
            continue
        else:
            continue  # scaling_layer buffers (fixed constants here), 'lins.k' duplicates, classifier
        if idx not in {c[0] for c in ALEX_CONVS}:
            continue
        conv = params.setdefault(f"conv{idx}", {})
        conv["kernel" if leaf == "weight" else "bias"] = value.transpose(2, 3, 1, 0) if leaf == "weight" else value
    return {"params": params}


def load_weights(paths: str) -> dict:
    state = {}
    for path in [p for p in paths.split(",") if p]:
        state.update(weights.read_state_dict(path, "LPIPS", WEIGHTS_HELP))
    variables = variables_from_torch_state(state)
    want = jax.eval_shape(LPIPS().init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 64, 3)))
    weights.check_shapes(variables, want, f"LPIPS weights {paths}", WEIGHTS_HELP)
    return variables


@functools.lru_cache(maxsize=2)
def distance_fn(paths: str):
    """A jitted `(x0, x1) -> [N]` LPIPS with the weights at `paths` (loaded once)."""
    variables = load_weights(paths)
    module = LPIPS()
    return jax.jit(lambda a, b: module.apply(variables, a, b))
