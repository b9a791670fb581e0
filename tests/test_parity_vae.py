"""Our Flax AutoencoderKL against diffusers' PyTorch one, on a tiny random VAE."""

import copy
import json
import os
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
from flax import traverse_util  # noqa: E402

from codi_jax.models import vae as vae_lib  # noqa: E402
from codi_jax.pretrained import convert, diffusers_folder, safetensors_io  # noqa: E402

TOL = 1e-4
TINY = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
)


@pytest.fixture(scope="module")
def torch_vae():
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**TINY).eval()
    with torch.no_grad():  # norms start at weight 1, bias 0: move them so the test sees them
        for name, p in vae.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return vae


@pytest.fixture(scope="module")
def saved(torch_vae, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("vae"))
    torch_vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def loaded(saved):
    return diffusers_folder.load_vae(saved)


def _flat(params):
    return traverse_util.flatten_dict(jax.device_get(params))


def test_parity_with_diffusers(torch_vae, loaded):
    module, params, cfg = loaded
    assert cfg.block_out_channels == (32, 64) and cfg.shift_factor == 0.0
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    z = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    with torch.no_grad():
        dist = torch_vae.encode(torch.from_numpy(x)).latent_dist
        t_mean, t_logvar = dist.mean.numpy(), dist.logvar.numpy()
        t_dec = torch_vae.decode(torch.from_numpy(z)).sample.numpy()

    nhwc = lambda a: np.transpose(a, (0, 2, 3, 1))
    enc = jax.jit(lambda p, x: module.apply({"params": p}, x, method=module.encode))
    dec = jax.jit(lambda p, z: module.apply({"params": p}, z, method=module.decode))
    mean, logvar = enc(params, nhwc(x))
    out = dec(params, nhwc(z))
    diffs = {
        "encode mean": np.abs(np.asarray(mean) - nhwc(t_mean)).max(),
        "encode logvar": np.abs(np.asarray(logvar) - nhwc(t_logvar)).max(),
        "decode": np.abs(np.asarray(out) - nhwc(t_dec)).max(),
    }
    print("max abs differences vs diffusers:", {k: f"{v:.2e}" for k, v in diffs.items()})
    for k, v in diffs.items():
        assert v <= TOL, f"{k}: max abs difference {v:.3g} > {TOL}"


def test_old_attention_names_load_the_same(torch_vae, saved, loaded, tmp_path):
    state = {k: v.detach().numpy() for k, v in torch_vae.state_dict().items()}
    old, n = {}, 0
    for k, v in state.items():
        new = re.sub(r"\.to_q\.", ".query.", k)
        new = re.sub(r"\.to_k\.", ".key.", new)
        new = re.sub(r"\.to_v\.", ".value.", new)
        new = re.sub(r"\.to_out\.0\.", ".proj_attn.", new)
        if new != k and v.ndim == 2 and "decoder" in k:
            v = v[:, :, None, None]  # some old files hold these as 1x1 convs
        n += new != k
        old[new] = v
    assert n == 16  # q, k, v, out (weight + bias) in the encoder and decoder mid blocks
    with open(os.path.join(saved, "config.json")) as f:
        config = json.load(f)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    safetensors_io.save(str(tmp_path / "diffusion_pytorch_model.safetensors"), old)
    _, params, _ = diffusers_folder.load_vae(str(tmp_path))
    want, got = _flat(loaded[1]), _flat(params)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg="/".join(k))


@pytest.mark.parametrize("half", ["fp16", "bf16"])
def test_half_precision_weights_load(torch_vae, loaded, tmp_path, half):
    if half == "fp16":
        copy.deepcopy(torch_vae).half().save_pretrained(str(tmp_path), variant="fp16")
        assert os.listdir(tmp_path) and not (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    else:
        copy.deepcopy(torch_vae).to(torch.bfloat16).save_pretrained(str(tmp_path))
    _, params, _ = diffusers_folder.load_vae(str(tmp_path))
    want, got = _flat(loaded[1]), _flat(params)
    assert want.keys() == got.keys()
    rtol = 1e-3 if half == "fp16" else 8e-3
    for k in want:
        assert got[k].dtype == np.float32
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=1e-6, err_msg="/".join(k))


def test_config_weights_mismatch_is_one_line(saved, tmp_path):
    with open(os.path.join(saved, "config.json")) as f:
        config = json.load(f)
    config["block_out_channels"] = [32, 48]
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    os.symlink(
        os.path.join(saved, "diffusion_pytorch_model.safetensors"), tmp_path / "diffusion_pytorch_model.safetensors"
    )
    with pytest.raises(convert.ConversionError) as e:
        diffusers_folder.load_vae(str(tmp_path))
    msg = str(e.value)
    print(msg)
    assert "\n" not in msg
    assert re.search(
        r"parameter \S+ has shape \([\d, ]+\) in the checkpoint but the model config expects \([\d, ]+\)", msg
    )
    assert "64" in msg and "48" in msg


def test_bad_config_and_missing_files(saved, tmp_path):
    with pytest.raises(ValueError, match="down_block_types") as e:
        vae_lib.vae_config_from_diffusers(dict(TINY, down_block_types=["DownBlock2D"] * 2))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="act_fn"):
        vae_lib.vae_config_from_diffusers(dict(TINY, act_fn="gelu"))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        diffusers_folder.load_vae(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        diffusers_folder.load_vae(str(tmp_path))
    with open(os.path.join(saved, "config.json")) as f:
        config = json.load(f)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        diffusers_folder.load_vae(str(tmp_path))
