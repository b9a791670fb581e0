"""Our Flax U-Net and residual-fusion adapter against diffusers' PyTorch classes.

Tiny random models of both SD families are built and saved by the test, read back by our
loader, and run on the same inputs: max abs difference at most 1e-4 in float32.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from codi_jax.models import adapter as adapter_lib  # noqa: E402
from codi_jax.models import layers  # noqa: E402
from codi_jax.models import unet as unet_lib  # noqa: E402
from codi_jax.pretrained import convert, diffusers_folder  # noqa: E402

TOL = 1e-4

# Tiny versions of the two SD families' U-Net configs.
FAMILIES = {
    "sd1": dict(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4,
        cross_attention_dim=24,
        use_linear_projection=False,
    ),
    "sd2": dict(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4),
        cross_attention_dim=40,
        use_linear_projection=True,
    ),
}


def _randomise(model, seed):
    """Default init leaves zero-initialised convs and unit norms: perturb every tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _tiny_unet(family, seed=0):
    torch.manual_seed(seed)
    cfg = FAMILIES[family]
    return _randomise(
        diffusers.UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8, **cfg
        ),
        seed,
    )


def _inputs(family, batch=2, size=16, seed=1):
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((batch, size, size, 4)).astype(np.float32)
    t = np.array([3, 901][:batch], np.int32)
    ctx = rng.standard_normal((batch, 7, FAMILIES[family]["cross_attention_dim"])).astype(np.float32)
    return sample, t, ctx


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_unet_matches_diffusers(family, tmp_path):
    ref = _tiny_unet(family)
    ref.save_pretrained(tmp_path / "unet")
    cfg, params = diffusers_folder.load_unet(str(tmp_path / "unet"))
    sample, t, ctx = _inputs(family)
    ours = np.asarray(jax.jit(unet_lib.UNet(cfg).apply)({"params": params}, sample, t, ctx))
    with torch.no_grad():
        want = ref(_nchw(sample), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy().transpose(0, 2, 3, 1)
    err = float(np.max(np.abs(ours - want)))
    print(f"{family} unet max abs diff {err:.2e}")
    assert err <= TOL, err


def test_bf16_compute_stays_close_to_the_fp32_reference(tmp_path):
    """model.dtype bfloat16: float32 params, bf16 activations; close to diffusers' float32 output."""
    ref = _tiny_unet("sd1")
    ref.save_pretrained(tmp_path / "unet")
    cfg, params = diffusers_folder.load_unet(str(tmp_path / "unet"))
    sample, t, ctx = _inputs("sd1")
    ours = np.asarray(jax.jit(unet_lib.UNet(cfg, jnp.bfloat16).apply)({"params": params}, sample, t, ctx))
    with torch.no_grad():
        want = ref(_nchw(sample), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy().transpose(0, 2, 3, 1)
    assert ours.dtype == np.float32 and jax.tree_util.tree_leaves(params)[0].dtype == np.float32
    rel = float(np.linalg.norm(ours - want) / np.linalg.norm(want))
    print(f"bf16 compute vs fp32 reference: relative error {rel:.2e}")
    assert 1e-5 < rel < 3e-2, rel  # bf16 rounding is visible, and small


def test_residual_adapter_matches_controlnet(tmp_path):
    """Our 'residual' fusion = diffusers ControlNetModel's residuals added into the U-Net."""
    family = "sd1"
    unet_ref = _tiny_unet(family)
    torch.manual_seed(3)
    cn = _randomise(diffusers.ControlNetModel.from_unet(unet_ref, conditioning_embedding_out_channels=(8, 16)), 3)
    unet_ref.save_pretrained(tmp_path / "unet")
    cn.save_pretrained(tmp_path / "controlnet")
    cfg, unet_params = diffusers_folder.load_unet(str(tmp_path / "unet"))
    acfg = dict(
        fusion="residual",
        conditioning_embedding_out_channels=(8, 16),
        cond_channels=3,
        input="sample_and_cond",
        mu_per_feature=False,
    )
    import ml_collections as mlc

    model = adapter_lib.AdaptedUNet(cfg, mlc.ConfigDict(acfg))
    sample, t, ctx = _inputs(family)
    cond = np.random.default_rng(5).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    import jax

    shapes = layers.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), sample, t, cond, ctx))["params"])
    adapter_params = diffusers_folder.load_params(
        str(tmp_path / "controlnet"), "diffusion_pytorch_model", shapes["adapter"], what="controlnet"
    )
    params = {"unet": unet_params, "adapter": adapter_params}
    ours = np.asarray(jax.jit(model.apply)({"params": params}, sample, t, cond, ctx))
    with torch.no_grad():
        down, mid = cn(_nchw(sample), torch.from_numpy(t), torch.from_numpy(ctx), _nchw(cond), return_dict=False)
        want = unet_ref(
            _nchw(sample),
            torch.from_numpy(t),
            torch.from_numpy(ctx),
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample
    want = want.numpy().transpose(0, 2, 3, 1)
    err = float(np.max(np.abs(ours - want)))
    print(f"residual adapter + unet vs ControlNetModel + UNet2DConditionModel: max abs diff {err:.2e}")
    assert err <= TOL, err


def test_config_weight_mismatch_names_parameter_and_shapes(tmp_path):
    _tiny_unet("sd1").save_pretrained(tmp_path / "unet")
    cfg_path = tmp_path / "unet" / "config.json"
    import json

    d = json.loads(cfg_path.read_text())
    d["cross_attention_dim"] = 16
    cfg_path.write_text(json.dumps(d))
    with pytest.raises(convert.ConversionError, match=r"attn2\.to_k\.weight has shape \(32, 24\).*expects \(32, 16\)"):
        diffusers_folder.load_unet(str(tmp_path / "unet"))


def test_pickle_weights_refused_unless_opted_in(tmp_path):
    ref = _tiny_unet("sd1")
    ref.save_pretrained(tmp_path / "unet", safe_serialization=False)
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.bin is a pickle-based checkpoint"):
        diffusers_folder.load_unet(str(tmp_path / "unet"))
    cfg, params = diffusers_folder.load_unet(str(tmp_path / "unet"), allow_pickle=True)
    sample, t, ctx = _inputs("sd1")
    assert np.isfinite(np.asarray(jax.jit(unet_lib.UNet(cfg).apply)({"params": params}, sample, t, ctx))).all()


def test_bf16_and_fp16_weights_load(tmp_path):
    ref = _tiny_unet("sd1")
    ref.half().save_pretrained(tmp_path / "fp16", variant="fp16")
    ref.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    _, p16 = diffusers_folder.load_unet(str(tmp_path / "fp16"))
    _, pbf = diffusers_folder.load_unet(str(tmp_path / "bf16"))
    w = ref.conv_in.weight.float().detach().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(pbf["conv_in"]["kernel"], w)
    assert p16["conv_in"]["kernel"].dtype == np.float32
    np.testing.assert_allclose(p16["conv_in"]["kernel"], w, atol=1e-2)


def _our_adapted(family, fusion, seed=0):
    """Our U-Net + adapter of `family`'s tiny config with random params, and inputs for it."""
    import jax
    import ml_collections as mlc

    cfg = diffusers_folder.unet_config_from_diffusers(
        dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8, **FAMILIES[family])
    )
    acfg = mlc.ConfigDict(
        dict(
            fusion=fusion,
            conditioning_embedding_out_channels=(8, 16),
            cond_channels=3,
            input="sample_and_cond",
            mu_per_feature=False,
        )
    )
    model = adapter_lib.AdaptedUNet(cfg, acfg)
    sample, t, ctx = _inputs(family)
    cond = np.random.default_rng(5).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    params = layers.unbox(jax.jit(model.init)(jax.random.PRNGKey(seed), sample, t, cond, ctx)["params"])
    return cfg, acfg, model, (sample, t, cond, ctx), params


def _jittered(params):
    """Every tensor moved off its init (zero convs, unit norms), so that a comparison sees all weights."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [w + 0.05 * jax.random.normal(k, w.shape) for w, k in zip(leaves, keys)]
    )


def _unet_with_controlnet(unet_pt, cn_pt, sample, t, cond, ctx) -> np.ndarray:
    """diffusers' UNet with its ControlNet's residuals added, NHWC out."""
    with torch.no_grad():
        down, mid = cn_pt(_nchw(sample), torch.from_numpy(t), ctx, _nchw(cond), return_dict=False)
        out = unet_pt(
            _nchw(sample),
            torch.from_numpy(t),
            ctx,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample
    return out.numpy().transpose(0, 2, 3, 1)


@pytest.mark.heavy(60)
def test_export_round_trips_into_diffusers(tmp_path):
    """Our params (random, every tensor non-zero) -> diffusers folders -> PyTorch gives our outputs."""
    import jax

    from codi_jax.pretrained import export

    cfg, acfg, model, (sample, t, cond, ctx), params = _our_adapted("sd2", "residual")
    params = _jittered(params)
    written = export.export_diffusers(str(tmp_path / "out"), cfg, params, acfg, sample_size=16)
    assert set(written) == {"unet", "controlnet"}
    unet_pt = diffusers.UNet2DConditionModel.from_pretrained(written["unet"]).eval()
    cn_pt = diffusers.ControlNetModel.from_pretrained(written["controlnet"]).eval()
    ours = np.asarray(jax.jit(model.apply)({"params": params}, sample, t, cond, ctx))
    err = float(np.max(np.abs(ours - _unet_with_controlnet(unet_pt, cn_pt, sample, t, cond, torch.from_numpy(ctx)))))
    print(f"export round trip (sd2 family, residual adapter): max abs diff {err:.2e}")
    assert err <= TOL, err
    with pytest.raises(FileExistsError, match="not empty"):
        export.export_diffusers(str(tmp_path / "out"), cfg, params, acfg, sample_size=16)


def test_a_pixel_space_unet_without_text_exports_with_inert_cross_attention(tmp_path):
    """The tiny pixel-space U-Net (no cross-attention) and its residual adapter become diffusers folders
    whose attn2 layers are zero: PyTorch gives our outputs whatever encoder_hidden_states it is given."""
    import ml_collections as mlc

    from codi_jax.pretrained import export
    from configs import common

    cfg = common.tiny_unet()
    acfg = mlc.ConfigDict(
        dict(
            fusion="residual",
            conditioning_embedding_out_channels=(16,),
            cond_channels=3,
            input="sample_and_cond",
            mu_per_feature=False,
        )
    )
    model = adapter_lib.AdaptedUNet(cfg, acfg)
    rng = np.random.default_rng(2)
    sample, cond = (rng.standard_normal((2, 16, 16, 3)).astype(np.float32) for _ in range(2))
    t = np.array([3, 901], np.int32)
    params = layers.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), sample, t, cond, None)["params"])
    params = _jittered(params)
    written = export.export_diffusers(str(tmp_path / "out"), cfg, params, acfg, sample_size=16)
    unet_pt = diffusers.UNet2DConditionModel.from_pretrained(written["unet"]).eval()
    cn_pt = diffusers.ControlNetModel.from_pretrained(written["controlnet"]).eval()
    ours = np.asarray(jax.jit(model.apply)({"params": params}, sample, t, cond, None))
    ctx = torch.randn(2, 5, export.NO_TEXT_CONTEXT_DIM)  # any context: the zero attn2 ignores it
    err = float(np.max(np.abs(ours - _unet_with_controlnet(unet_pt, cn_pt, sample, t, cond, ctx))))
    print(f"export round trip (pixel-space tiny U-Net, residual adapter): max abs diff {err:.2e}")
    assert err <= TOL, err


def test_mix_adapter_exports_in_own_format(tmp_path):
    from codi_jax.pretrained import export, safetensors_io

    cfg, acfg, _, _, params = _our_adapted("sd1", "mix")
    written = export.export_diffusers(str(tmp_path / "out"), cfg, params, acfg, sample_size=16)
    assert set(written) == {"unet", "adapter_mix"}
    back = safetensors_io.load(written["adapter_mix"])
    assert back["mu"].shape == () and "conv_in/kernel" in back
