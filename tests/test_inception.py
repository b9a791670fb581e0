"""FID's InceptionV3 in Flax against pytorch-fid's (the reference FID implementation), same random
weights. pytorch-fid's strict load_state_dict also proves our parameter names are its names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax.evaluation import inception


def _random_torch_state(rng):
    """Random weights in pytorch-fid's state-dict layout, from the Flax model's shapes (He-scaled
    convs, BN statistics near identity so 90-odd layers keep their scale)."""
    shapes = jax.eval_shape(inception.FIDInceptionV3().init, jax.random.PRNGKey(0), jnp.zeros((1, 75, 75, 3)))
    state = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        keys = [p.key for p in path]
        coll, mods, leaf_name = keys[0], keys[1:-1], keys[-1]
        base = ".".join(mods)
        if leaf_name == "kernel":
            kh, kw, cin, cout = leaf.shape
            w = rng.normal(0.0, np.sqrt(2.0 / (kh * kw * cin)), (cout, cin, kh, kw))
            state[f"{base}.weight"] = w
        elif coll == "params":
            state[f"{base}.{'weight' if leaf_name == 'scale' else 'bias'}"] = (
                rng.uniform(0.8, 1.2, leaf.shape) if leaf_name == "scale" else rng.normal(0.0, 0.1, leaf.shape)
            )
        else:
            state[f"{base}.{'running_mean' if leaf_name == 'mean' else 'running_var'}"] = (
                rng.normal(0.0, 0.1, leaf.shape) if leaf_name == "mean" else rng.uniform(0.8, 1.2, leaf.shape)
            )
            state[f"{base}.num_batches_tracked"] = np.array(0)
    state["fc.weight"] = rng.normal(0.0, 0.01, (1008, 2048))
    state["fc.bias"] = np.zeros(1008)
    return {k: v.astype(np.int64 if k.endswith("num_batches_tracked") else np.float32) for k, v in state.items()}


@pytest.mark.heavy(58)
def test_features_match_pytorch_fid(monkeypatch, tmp_path):
    torch = pytest.importorskip("torch")
    from pytorch_fid import inception as pfi

    state = _random_torch_state(np.random.default_rng(0))
    # pytorch-fid downloads its weights; give it ours (its strict load checks every name and shape).
    monkeypatch.setattr(
        pfi, "load_state_dict_from_url", lambda *a, **k: {n: torch.from_numpy(v) for n, v in state.items()}
    )
    ref = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()

    images = np.random.default_rng(1).uniform(-1.0, 1.0, (3, 48, 40, 3)).astype(np.float32)  # resized to 299
    with torch.no_grad():
        want = ref(torch.from_numpy((images + 1.0) / 2.0).permute(0, 3, 1, 2))[0].reshape(3, -1).numpy()

    path = str(tmp_path / "pt_inception.pth")
    torch.save({n: torch.from_numpy(v) for n, v in state.items()}, path)
    got = np.asarray(inception.feature_fn(path)(jnp.asarray(images)))
    assert got.shape == (3, inception.FEATURE_DIM)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())  # measured: 2.9e-6 of 7.5

    # FID as the evaluation reports it (the same weights file: the compiled network is reused).
    import ml_collections as mlc

    from codi_jax.evaluation import evaluate, frechet

    ecfg = mlc.ConfigDict(dict(fid_weights=path, lpips_weights="", batch_size=3))
    rng = np.random.default_rng(2)
    a = rng.uniform(-1, 1, (6, 48, 40, 3)).astype(np.float32)  # chunks of 3: the shape compiled above
    b = np.clip(a + rng.normal(0, 0.5, a.shape), -1, 1).astype(np.float32)
    out = evaluate.all_metrics(a, b, ecfg)
    feats = lambda x: np.concatenate([np.asarray(inception.feature_fn(path)(x[i : i + 3])) for i in (0, 3)])
    assert out["fid"] == pytest.approx(frechet.frechet_distance_of_features(feats(a), feats(b)), rel=1e-5)
    assert out["fid"] > 0  # (zero on identical sets: tests/test_frechet.py)


def test_bad_weights_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
        inception.load_weights(str(tmp_path / "missing.pth"))
    (tmp_path / "w.npy").write_bytes(b"x")
    with pytest.raises(ValueError, match="expected a .pth or .safetensors file"):
        inception.load_weights(str(tmp_path / "w.npy"))
    torch = pytest.importorskip("torch")
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(8, 3, 3, 3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not the FID InceptionV3 weights"):
        inception.load_weights(str(tmp_path / "other.pth"))
    import ml_collections as mlc

    from codi_jax.evaluation import evaluate

    with pytest.raises(FileNotFoundError, match="FID Inception weights"):  # at the start of a run
        evaluate.check_metric_weights(mlc.ConfigDict(dict(fid_weights=str(tmp_path / "no.pth"), lpips_weights="")))
