"""LPIPS in Flax against the `lpips` package (the reference implementation), same random weights."""

import numpy as np
import pytest

from codi_jax.evaluation import lpips as lpips_jax


def test_distances_match_the_lpips_package(tmp_path):
    torch = pytest.importorskip("torch")
    lpips = pytest.importorskip("lpips")
    torch.manual_seed(0)
    # Random trunk (pnet_rand) and random non-negative lin weights: no download, every weight exercised.
    ref = lpips.LPIPS(net="alex", pretrained=False, pnet_rand=True, verbose=False).eval()
    with torch.no_grad():
        for k in range(5):
            lin = getattr(ref, f"lin{k}").model[1].weight
            lin.copy_(torch.rand_like(lin))
    path = str(tmp_path / "lpips_alex.pth")
    torch.save(ref.state_dict(), path)

    rng = np.random.default_rng(0)
    a = rng.uniform(-1, 1, (3, 64, 64, 3)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.3, a.shape), -1, 1).astype(np.float32)
    with torch.no_grad():
        t = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2)
        want = ref(t(a), t(b)).reshape(-1).numpy()
    got = np.asarray(lpips_jax.distance_fn(path)(a, b))
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert np.all(got > 0)
    np.testing.assert_allclose(np.asarray(lpips_jax.distance_fn(path)(a, a)), 0.0, atol=1e-7)
    # and as the evaluation reports it: the batch mean
    import ml_collections as mlc

    from codi_jax.evaluation import evaluate

    out = evaluate.all_metrics(a, b, mlc.ConfigDict(dict(fid_weights="", lpips_weights=path, batch_size=3)))
    assert out["lpips"] == pytest.approx(float(want.mean()), rel=1e-4) and "fid" not in out


def test_two_file_form_and_bad_files(tmp_path):
    torch = pytest.importorskip("torch")
    lpips = pytest.importorskip("lpips")
    ref = lpips.LPIPS(net="alex", pretrained=False, pnet_rand=True, verbose=False)
    sd = ref.state_dict()
    # torchvision's AlexNet names for the trunk, the lpips file for the lin layers
    trunk = {f"features.{k.split('.')[2]}.{k.split('.')[3]}": v for k, v in sd.items() if k.startswith("net.")}
    lins = {k: v for k, v in sd.items() if k.startswith("lin") and not k.startswith("lins")}
    torch.save(trunk, tmp_path / "alexnet.pth")
    torch.save(lins, tmp_path / "alex.pth")
    both = lpips_jax.load_weights(f"{tmp_path / 'alexnet.pth'},{tmp_path / 'alex.pth'}")
    full = lpips_jax.variables_from_torch_state({k: v.numpy() for k, v in sd.items()})
    assert set(both["params"]) == set(full["params"])
    np.testing.assert_array_equal(both["params"]["conv3"]["kernel"], full["params"]["conv3"]["kernel"])
    np.testing.assert_array_equal(both["params"]["lin4"], full["params"]["lin4"])
    with pytest.raises(ValueError, match=r"\['params'\]\['lin0'\] is None"):
        lpips_jax.load_weights(str(tmp_path / "alexnet.pth"))  # the lin layers missing
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth"):
        lpips_jax.load_weights(str(tmp_path / "nope.pth"))
