"""U-Net and the eq 12 adapter: names, sizes, and exact equality with the backbone at init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax.methods import base
from codi_jax.models import adapter as adapter_lib
from codi_jax.models import layers
from codi_jax.models import unet as unet_lib
from configs import common


def _model_cfg(fusion="mix", cross_attention_dim=None):
    cfg = common.model(common.tiny_unet())
    cfg.unet.cross_attention_dim = cross_attention_dim
    cfg.adapter.fusion = fusion
    return cfg


def _init(cfg, size=16, seed=0):
    module = base.make_module(cfg)
    params = base.init_model_params(module, cfg, jax.random.PRNGKey(seed), size)
    return module, params


def test_tiny_unet_size_and_diffusers_names():
    cfg = _model_cfg()
    _, params = _init(cfg)
    n = unet_lib.count_params(params["unet"])
    assert 1.0e6 < n < 3.0e6, n  # "a tiny (~2M parameters)" U-Net
    flat = {"/".join(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params["unet"])}
    for name in [
        "conv_in/kernel",
        "time_embedding/linear_1/kernel",
        "down_blocks_0/resnets_0/conv1/kernel",
        "down_blocks_0/downsamplers_0/conv/kernel",
        "down_blocks_2/attentions_0/proj_in/kernel",
        "down_blocks_2/attentions_0/transformer_blocks_0/attn1/to_q/kernel",
        "down_blocks_2/attentions_0/transformer_blocks_0/ff/net_0/proj/kernel",
        "mid_block/attentions_0/transformer_blocks_0/attn1/to_out_0/bias",
        "up_blocks_0/resnets_1/conv_shortcut/kernel",
        "up_blocks_1/upsamplers_0/conv/kernel",
        "conv_norm_out/scale",
        "conv_out/kernel",
    ]:
        assert name in flat, name


def test_sd15_sized_unet_has_860m_parameters():
    cfg = common.model(common.sd15_unet())
    module = unet_lib.UNet(cfg.unet)
    shapes = jax.eval_shape(
        lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 4)), jnp.zeros((1,)), jnp.zeros((1, 77, 768)))
    )
    n = unet_lib.count_params(shapes["params"])
    assert abs(n - 859_520_964) < 1e6, n  # SD 1.5's UNet2DConditionModel parameter count


def test_cross_attention_uses_context():
    cfg = _model_cfg(cross_attention_dim=32)
    module = unet_lib.UNet(cfg.unet)
    x, t = jnp.ones((2, 16, 16, 3)), jnp.array([3, 500])
    ctx = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 32))
    params = layers.unbox(jax.jit(module.init)(jax.random.PRNGKey(0), x, t, ctx))
    assert "attn2" in params["params"]["mid_block"]["attentions_0"]["transformer_blocks_0"]
    apply = jax.jit(module.apply)  # one compile; eager apply dispatches (and compiles) op by op
    out1, out2 = apply(params, x, t, ctx), apply(params, x, t, ctx * 2.0)
    assert out1.shape == x.shape
    assert not np.allclose(out1, out2)


@pytest.mark.parametrize("fusion", adapter_lib.FUSIONS)
def test_adapted_model_equals_backbone_at_init_bit_for_bit(fusion):
    cfg = _model_cfg(fusion)
    module, params = _init(cfg)
    params = {
        "unet": params["unet"],
        "adapter": adapter_lib.init_adapter_from_backbone(params["adapter"], params["unet"]),
    }
    k1, k2 = jax.random.split(jax.random.PRNGKey(2))
    z = jax.random.normal(k1, (3, 16, 16, 3))
    cond = jax.random.normal(k2, (3, 16, 16, 3))
    t = jnp.array([1, 400, 999])
    adapted_fn = jax.jit(lambda p: module.apply({"params": p}, z, t, cond))
    adapted = adapted_fn(params)
    backbone = jax.jit(lambda p: unet_lib.UNet(cfg.unet).apply({"params": p}, z, t))(params["unet"])
    np.testing.assert_array_equal(np.asarray(adapted), np.asarray(backbone))
    # The condition does reach the output once the fusion opens.
    opened = jax.tree_util.tree_map(lambda x: x, params)
    if fusion == "mix":
        opened["adapter"]["mu"] = jnp.asarray(0.5)
    else:
        opened["adapter"]["controlnet_mid_block"]["kernel"] = (
            jnp.ones_like(opened["adapter"]["controlnet_mid_block"]["kernel"]) * 0.01
        )
    moved = adapted_fn(opened)  # the same compiled program
    assert not np.allclose(moved, backbone)


def test_adapter_is_a_copy_of_the_backbone_encoder():
    cfg = _model_cfg()
    _, params = _init(cfg)
    adapter = adapter_lib.init_adapter_from_backbone(params["adapter"], params["unet"])
    for key in ("conv_in", "time_embedding", "down_blocks_0", "down_blocks_2", "mid_block"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, adapter[key], params["unet"][key])
    assert float(adapter["mu"]) == 0.0
    assert "controlnet_cond_embedding" in adapter
    assert "up_blocks_0" not in adapter  # only the encoder is duplicated


def test_bad_unet_config_errors_name_the_key():
    cfg = _model_cfg()
    cfg.unet.down_block_types = ("DownBlock2D", "Bogus2D", "DownBlock2D")
    with pytest.raises(ValueError, match="unet.down_block_types"):
        _init(cfg)
    cfg = _model_cfg(fusion="sum")
    with pytest.raises(ValueError, match="model.adapter.fusion"):
        _init(cfg)


def test_remat_policies_change_nothing_but_memory():
    """unet.remat policies recompute activations in the backward pass: same outputs and gradients."""

    def cfg(remat):
        c = common.tiny_unet()
        c.update(
            block_out_channels=(8,),
            down_block_types=("CrossAttnDownBlock2D",),
            up_block_types=("CrossAttnUpBlock2D",),
            norm_num_groups=4,
            cross_attention_dim=8,
            remat=remat,
        )
        return c

    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.standard_normal((2, 4, 4, 3)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((2, 3, 8)), jnp.float32)
    t = jnp.array([10.0, 700.0])
    plain = unet_lib.UNet(cfg("none"))
    # Shapes from eval_shape, values from numpy: initialising through flax costs more than the test.
    shapes = layers.unbox(jax.eval_shape(plain.init, jax.random.PRNGKey(0), z, t, ctx)["params"])
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), jnp.float32), shapes)

    def loss(m):
        return lambda p: jnp.mean(jnp.square(m.apply({"params": p}, z, t, ctx)))

    l0, g0 = jax.jit(jax.value_and_grad(loss(plain)))(params)
    n_convs = lambda m: str(jax.make_jaxpr(jax.grad(loss(m)))(params)).count("conv_general_dilated")
    for policy in ("full", "dots"):
        remat = unet_lib.UNet(cfg(policy))
        l1, g1 = jax.jit(jax.value_and_grad(loss(remat)))(params)
        np.testing.assert_allclose(l0, l1, rtol=1e-6)
        assert jax.tree_util.tree_structure(g0) == jax.tree_util.tree_structure(g1)
        for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
        # The policy reaches the program: a checkpoint region with it; 'full' recomputes every convolution.
        jaxpr = str(jax.make_jaxpr(loss(remat))(params))
        assert f"policy={unet_lib.REMAT_POLICIES[policy]!r}" in jaxpr or (
            policy == "full" and "policy=<function nothing_saveable" in jaxpr
        ), policy
        if policy == "full":
            assert n_convs(remat) > n_convs(plain)
    with pytest.raises(ValueError, match="model.unet.remat='some'"):
        unet_lib.remat_policy("some")


def test_attention_backend_choice(monkeypatch):
    assert unet_lib.attention_backend("auto", jnp.bfloat16, 40) == "xla"  # this CPU
    monkeypatch.setattr(unet_lib.sharding.jax, "default_backend", lambda: "gpu")
    assert unet_lib.attention_backend("auto", jnp.bfloat16, 40) == "cudnn"  # SD 1.5's 320-wide blocks
    assert unet_lib.attention_backend("auto", jnp.bfloat16, 160) == "xla"  # 1280-wide: beyond cuDNN's 128
    assert unet_lib.attention_backend("auto", jnp.bfloat16, 40, 4096, 4096) == "cudnn"  # self-attention at 64x64
    assert unet_lib.attention_backend("auto", jnp.bfloat16, 40, 4096, 77) == "xla"  # CLIP's 77 tokens (H200 refusal)
    assert unet_lib.attention_backend("auto", jnp.float32, 40) == "xla"  # flash attention needs half precision
    assert unet_lib.attention_backend("xla", jnp.bfloat16, 40) == "xla"
    with pytest.raises(ValueError, match="model.unet.attention='flash'"):
        unet_lib.attention_backend("flash", jnp.bfloat16, 40)


def test_splash_attention_equals_xla_attention_and_its_gradients():
    """The TPU kernel path (models/splash.py; Pallas' interpreter on this CPU): softmax(q k^T / sqrt(d)) v
    and its gradients as XLA computes them, for SD 1.x's 40-wide heads (padded to 128 inside) and
    different query and key lengths."""
    from codi_jax.models import splash

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 256, 2, 40)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 128, 2, 40)), jnp.float32) for _ in range(2))
    loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)))
    xla = lambda *a: jax.nn.dot_product_attention(*a, implementation="xla")
    np.testing.assert_allclose(jax.jit(splash.attention)(q, k, v), xla(q, k, v), atol=2e-6)
    got = jax.jit(jax.grad(loss(splash.attention), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=2e-5)
    # lengths off the 128-lane grid (CLIP's 77 tokens) take XLA's attention, even when splash is asked for
    assert unet_lib.attention_backend("splash", jnp.bfloat16, 40, 4096, 77) == "xla"
    assert unet_lib.attention_backend("splash", jnp.bfloat16, 40, 4096, 4096) == "splash"
