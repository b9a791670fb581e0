"""Task data (masks, rendered depth scenes, computable edits), text conditioning and the task metrics."""

import logging
import os
import re

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from codi_jax import build, experiment
from codi_jax.data import pipeline, sources, tasks
from codi_jax.evaluation import evaluate
from codi_jax.methods import text
from codi_jax.pretrained import text_encoder
from configs import data as data_configs
from configs import depth as depth_configs
from configs import edit as edit_configs
from configs import inpaint as inpaint_configs


@pytest.fixture(scope="module")
def data_cfg():
    return data_configs.get_data_config()


def test_masks_cover_the_configured_ratio_and_are_binary(data_cfg):
    rng = np.random.default_rng(0)
    lo, hi = data_cfg.mask.hole_ratio
    kinds = {"box": 0, "free_form": 0}
    for _ in range(40):
        m = tasks.random_mask(rng, 32, data_cfg.mask)
        assert m.shape == (32, 32) and set(np.unique(m)) <= {0.0, 1.0}
        assert lo <= m.mean() <= hi
    for kind in kinds:
        one = mlc.ConfigDict(data_cfg.mask.to_dict())
        one.kinds, one.kind_probs = (kind,), (1.0,)
        m = tasks.random_mask(rng, 32, one)
        assert 0 < m.mean() < 1
    # A box is one filled rectangle: its rows and columns of ones are contiguous.
    box = tasks.box_mask(rng, 32, (0.3, 0.5))
    ys, xs = np.nonzero(box)
    assert box[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].all()


def test_inpaint_record_hides_exactly_the_hole(data_cfg):
    b = pipeline.make_eval_batch(data_cfg, task="inpaint", num_examples=4, seed=0)
    img, cond, mask = b["image"], b["cond"], b["mask"]
    assert cond.shape == img.shape[:3] + (4,)
    np.testing.assert_array_equal(cond[..., :3] * mask, 0.0)  # the hole carries no pixels
    np.testing.assert_allclose(cond[..., :3] * (1 - mask), img * (1 - mask))  # the rest is the image
    np.testing.assert_array_equal(cond[..., 3:], mask * 2 - 1)


def test_check_mask_errors():
    good = np.zeros((8, 8), np.uint8)
    good[2:4] = 255
    m = tasks.check_mask(good, (8, 8, 3))
    assert m.shape == (8, 8, 1) and m.sum() == 16
    with pytest.raises(ValueError, match="mask is 8x6 but the image is 8x8"):
        tasks.check_mask(np.zeros((8, 6)), (8, 8, 3))
    with pytest.raises(ValueError, match="not binary"):
        tasks.check_mask(np.full((8, 8), 0.5), (8, 8, 3))


def test_edits_are_the_functions_their_instructions_name(data_cfg):
    b = pipeline.make_eval_batch(data_cfg, task="edit", num_examples=12, seed=0)
    names = data_cfg.edit.names
    src = (b["cond"] + 1) / 2
    tgt = (b["image"] + 1) / 2
    seen = set()
    for i, k in enumerate(b["prompt"]):
        name = names[int(k)]
        seen.add(name)
        if name == "invert":
            np.testing.assert_allclose(tgt[i], 1 - src[i], atol=1e-5)
        elif name == "flip":
            np.testing.assert_allclose(tgt[i], src[i][::-1], atol=1e-5)
        elif name == "grayscale":
            assert np.allclose(tgt[i][..., 0], tgt[i][..., 1]) and np.allclose(tgt[i][..., 1], tgt[i][..., 2])
        elif name == "darken":
            np.testing.assert_allclose(tgt[i], src[i] * data_cfg.edit.darken_factor, atol=1e-5)
        elif name == "blur":
            assert np.abs(np.diff(tgt[i], axis=0)).mean() < np.abs(np.diff(src[i], axis=0)).mean()
    assert len(seen) >= 3
    assert tasks.prompts(data_cfg, "edit") == [tasks.EDITS[n][0] for n in names]
    with pytest.raises(ValueError, match="known edits"):
        tasks.edit_instructions(mlc.ConfigDict(dict(names=("sharpen",))))


def test_depth_scenes_are_exact(data_cfg):
    d = data_cfg.depth
    rng = np.random.default_rng(3)
    tex = np.full((32, 32, 3), 255, np.uint8)
    rgb, z, obj = tasks.render_scene(tex, rng, d, 32, ("red", "sphere", "blue"))
    assert obj.any() and (~obj).any()
    # The sphere is in front of the wall, and its centre is its nearest point.
    assert z[obj].max() < z[~obj].min()
    # Colours follow the caption: chromaticity of the object red, the wall blue.
    assert rgb[obj].mean(0).argmax() == 0 and rgb[~obj].mean(0).argmax() == 2
    cond = tasks.depth_condition(z)
    assert cond.max() == pytest.approx(1.0) and cond.min() == pytest.approx(-1.0)
    assert cond[obj].mean() > cond[~obj].mean()  # near = bright
    b = pipeline.make_eval_batch(data_cfg, task="depth", num_examples=4, seed=0)
    assert b["cond"].shape[-1] == 1 and b["prompt"].dtype == np.int32
    assert len(tasks.prompts(data_cfg, "depth")) == len(d.colours) ** 2 * len(d.shapes)


def test_caption_colour_accuracy_scores_the_true_images(data_cfg):
    b = pipeline.make_eval_batch(data_cfg, task="depth", num_examples=8, seed=1)
    right = evaluate.caption_colour_accuracy(b["image"], b, data_cfg.depth)
    assert right == {"colour_acc_object": 1.0, "colour_acc_wall": 1.0}
    gray = evaluate.caption_colour_accuracy(np.zeros_like(b["image"]), b, data_cfg.depth)
    assert gray["colour_acc_object"] < 1.0


def test_hole_psnr_separates_inside_and_outside():
    ref = np.zeros((2, 8, 8, 3), np.float32)
    mask = np.zeros((2, 8, 8, 1), np.float32)
    mask[:, :4] = 1
    out = ref.copy()
    out[:, :4] = 0.2  # wrong only inside the hole: error 0.1 in [0, 1] units -> 20 dB
    m = evaluate.hole_psnr(out, ref, mask)
    assert m["psnr_hole"] == pytest.approx(20.0, abs=1e-4) and m["psnr_known"] == pytest.approx(100.0)


def _text_cfg(**kw):
    tcfg = depth_configs.get_config("smoke")
    tcfg.text.update(kw)
    return tcfg


def test_tiny_text_encoder_tokens_and_cache(tmp_path, caplog):
    config = _text_cfg()
    ps = ["make it grayscale", "invert the colours"]
    enc = text_encoder.make_encoder(config, ps, str(tmp_path))
    assert enc.tokenizer.tokenize("make it grayscale") == ["make</w>", "it</w>", "grayscale</w>"]
    table = text_encoder.prompt_table(enc, ps, str(tmp_path), 10)
    assert table.shape == (3, config.text.tiny.max_length, config.text.tiny.width)
    assert not np.allclose(table[1], table[2]) and not np.allclose(table[0], table[1])
    again = text_encoder.prompt_table(enc, ps, str(tmp_path), 10)  # from the cache file
    np.testing.assert_array_equal(table, again)
    with pytest.raises(ValueError, match="text.max_cached_prompts=1"):
        text_encoder.prompt_table(enc, ps, None, 1)
    with caplog.at_level(logging.WARNING):
        long = enc.embed(["make it grayscale " * 8])
    assert long.shape[1] == config.text.tiny.max_length
    assert "truncated" in caplog.text


def test_prompt_dropout_and_lookup():
    table = jnp.arange(4 * 2 * 3, dtype=jnp.float32).reshape(4, 2, 3)
    seen = {}

    def loss(params, frozen, ema, batch, rng):
        seen["ctx"] = batch["context"]
        return 0.0, {}

    idx = jnp.asarray([0, 1, 2, 2, 1, 0, 2, 1] * 8, jnp.int32)
    frozen = {"prompt_table": table}
    text.with_prompts(loss, 0.0)(None, frozen, None, {"prompt": idx}, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(seen["ctx"], table[idx + 1])
    text.with_prompts(loss, 0.5)(None, frozen, None, {"prompt": idx}, jax.random.PRNGKey(0))
    empty = np.all(np.asarray(seen["ctx"]) == np.asarray(table[0]), axis=(1, 2))
    assert 0.25 < empty.mean() < 0.75
    kept = ~empty
    np.testing.assert_array_equal(np.asarray(seen["ctx"])[kept], np.asarray(table)[np.asarray(idx)[kept] + 1])


def test_classifier_free_guidance_combines_two_passes():
    from codi_jax import diffusion

    class Fake:
        """A 'network' whose output depends on the context: x_hat = z * mean(context)."""

        schedule = diffusion.make_schedule(depth_configs.get_config("smoke").schedule)

        def __call__(self, params, z, t, cond, context):
            c = jnp.mean(context, axis=(1, 2))[:, None, None, None]
            return z * c, z * 0 + c

    z = jnp.ones((2, 4, 4, 3))
    pos = jnp.full((2, 3, 5), 2.0)
    neg = jnp.full((2, 3, 5), 0.5)
    ctx = {"prompt": pos, "negative": neg}
    x1, e1 = text.Guided(Fake(), 1.0)(None, z, 10, None, ctx)
    np.testing.assert_allclose(x1, 2.0)
    x3, e3 = text.Guided(Fake(), 3.0)(None, z, 10, None, ctx)
    np.testing.assert_allclose(x3, 0.5 + 3.0 * (2.0 - 0.5))
    np.testing.assert_allclose(e3, 0.5 + 3.0 * (2.0 - 0.5))


@pytest.mark.parametrize(
    "get_config,key,value,expected",
    [
        (inpaint_configs.get_config, "model.adapter.cond_channels", 3, "task 'inpaint' has 4-channel conditions"),
        (depth_configs.get_config, "model.unet.cross_attention_dim", None, "cross_attention_dim is None"),
        (edit_configs.get_config, "text.dropout", 1.5, "text.dropout=1.5"),
    ],
)
def test_task_config_errors(get_config, key, value, expected):
    config = get_config("smoke")
    node, leaf = config, key.split(".")
    for part in leaf[:-1]:
        node = node[part]
    node[leaf[-1]] = value
    with pytest.raises(ValueError, match=expected.replace("(", r"\(")):
        experiment.validate_config(config)


def test_text_encoder_width_must_match_the_unet(tmp_path):
    config = edit_configs.get_config("smoke")
    config.text.tiny.width = 16
    with pytest.raises(ValueError, match="16-wide embeddings but model.unet.cross_attention_dim=32"):
        build.prompt_embeddings(config, str(tmp_path))


def _write(path, arr):
    from PIL import Image

    Image.fromarray(arr).save(path)
    return str(path)


def test_sampling_inputs_from_files(tmp_path):
    from codi_jax import sample

    config = inpaint_configs.get_config("smoke")
    img = np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8)
    files = [_write(tmp_path / "a.png", img)]
    masks = tmp_path / "masks"
    masks.mkdir()
    m = np.zeros((20, 20), np.uint8)
    m[5:10, 5:10] = 255
    _write(masks / "a.png", m)
    cond = sample.conditions("inpaint", files, config, 16, str(masks))
    assert cond.shape == (1, 16, 16, 4) and set(np.unique(cond[..., 3])) == {-1.0, 1.0}
    with pytest.raises(ValueError, match="needs --masks"):
        sample.conditions("inpaint", files, config, 16)
    _write(masks / "a.png", np.zeros((10, 20), np.uint8))
    with pytest.raises(ValueError, match="mask is 10x20 but the image is 20x20"):
        sample.conditions("inpaint", files, config, 16, str(masks))
    _write(masks / "a.png", np.full((20, 20), 128, np.uint8))
    with pytest.raises(ValueError, match="not binary"):
        sample.conditions("inpaint", files, config, 16, str(masks))
    sr = sample.conditions("sr", files, config, 16)  # LR at 16 / sr_scale, bicubic-upsampled
    assert sr.shape == (1, 16, 16, 3)
    d = sample.conditions("depth", files, config, 16)
    assert d.shape == (1, 16, 16, 1) and d.min() == -1.0 and d.max() == 1.0
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png: not an image"):
        sample.conditions("edit", [str(bad)], config, 16)
    assert sample.read_prompts("x", "", 2) == ["x", "x"]
    (tmp_path / "p.txt").write_text("one\ntwo\n")
    with pytest.raises(ValueError, match="has 2 prompts for 3 inputs"):
        sample.read_prompts(None, str(tmp_path / "p.txt"), 3)
    with pytest.raises(FileNotFoundError, match="--inputs: /nonexistent does not exist"):
        sample.list_inputs("/nonexistent")


def _photos(n, size=24, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8) for _ in range(n)]


def _paired_cfg(task, **kw):
    cfg = (edit_configs if task == "edit" else depth_configs).get_config("smoke")
    cfg.data.update(kw, image_downscale=1, eval_fraction=0.3)
    return cfg


def test_edit_jsonl_and_ip2p_layouts(tmp_path):
    import json

    photos = _photos(3)
    lines = []
    for i, p in enumerate(photos):
        _write(tmp_path / f"in{i}.png", p)
        _write(tmp_path / f"out{i}.png", 255 - p)
        lines.append(
            {
                "input": f"in{i}.png",
                "edited": f"out{i}.png",
                "instruction": "invert the colours" if i < 2 else "make it darker",
            }
        )
    (tmp_path / "edits.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    cfg = _paired_cfg("edit", source="edit_jsonl", pairs_file=str(tmp_path / "edits.jsonl"))
    experiment.validate_config(cfg)
    assert tasks.prompts(cfg.data, "edit") == ["invert the colours", "make it darker"]
    b = pipeline.make_eval_batch(cfg.data, task="edit", num_examples=2, seed=0)  # the held-out last edit
    np.testing.assert_allclose(b["image"], -b["cond"], atol=1e-5)  # the inverted crop, aligned
    assert list(b["prompt"]) == [1, 1]
    it = pipeline.make_train_iterator(cfg.data, task="edit", global_batch_size=4, seed=0)
    t = next(it)
    np.testing.assert_allclose(t["image"], -t["cond"], atol=1e-5)
    assert set(t["prompt"].tolist()) == {0}

    # InstructPix2Pix's folder layout
    root = tmp_path / "ip2p"
    for i, p in enumerate(photos):
        d = root / f"{i:04d}"
        d.mkdir(parents=True)
        (d / "prompt.json").write_text(json.dumps({"edit": "turn it upside down", "input": "a", "output": "b"}))
        _write(d / "77_0.jpg", p)
        _write(d / "77_1.jpg", p[::-1].copy())
    cfg2 = _paired_cfg("edit", source="ip2p_folder", folder=str(root))
    b2 = pipeline.make_eval_batch(cfg2.data, task="edit", num_examples=1, seed=0)
    assert b2["image"].shape == (1, 16, 16, 3) and tasks.prompts(cfg2.data, "edit") == ["turn it upside down"]

    lines[1]["instruction"] = " "
    (tmp_path / "bad.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    bad = _paired_cfg("edit", source="edit_jsonl", pairs_file=str(tmp_path / "bad.jsonl"))
    with pytest.raises(ValueError, match="bad.jsonl line 2: the edit has no instruction"):
        tasks.prompts(bad.data, "edit")
    wrong = _paired_cfg("depth", source="edit_jsonl", pairs_file=str(tmp_path / "edits.jsonl"))
    with pytest.raises(ValueError, match="holds edit data, not 'depth'"):
        experiment.validate_config(wrong)


def test_depth_folder_layout(tmp_path):
    import json

    (tmp_path / "images").mkdir()
    (tmp_path / "depth").mkdir()
    caps = []
    for i, p in enumerate(_photos(3)):
        _write(tmp_path / "images" / f"im{i}.png", p)
        z = np.linspace(1.0, 4.0, p.shape[1], dtype=np.float32)[None].repeat(p.shape[0], 0)
        np.save(tmp_path / "depth" / f"im{i}.npy", z)
        caps.append({"file": f"im{i}.png", "caption": f"scene {i}"})
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(c) for c in caps))
    cfg = _paired_cfg("depth", source="depth_folder", folder=str(tmp_path))
    b = pipeline.make_eval_batch(cfg.data, task="depth", num_examples=1, seed=0)
    # Depth grows to the right: inverse depth, near = bright, falls left to right (-1..1 per crop).
    assert b["cond"][0, 0, 0, 0] == pytest.approx(1.0) and b["cond"][0, 0, -1, 0] == pytest.approx(-1.0)
    assert tasks.prompts(cfg.data, "depth") == ["scene 0", "scene 1", "scene 2"] and b["prompt"][0] == 2
    os.remove(tmp_path / "depth" / "im1.npy")
    cfg2 = _paired_cfg("depth", source="depth_folder", folder=str(tmp_path), pairs_file="x")  # new cache key
    with pytest.raises(FileNotFoundError, match="no depth map depth/im1.npy or .png for images/im1.png"):
        tasks.prompts(cfg2.data, "depth")
    np.save(tmp_path / "depth" / "im1.npy", np.ones((5, 5), np.float32))
    cfg3 = _paired_cfg("depth", source="depth_folder", folder=str(tmp_path), pairs_file="y")
    # A map of the wrong size makes its record corrupt: it reads as a marker naming the file, and
    # training skips it and counts it (records are decoded when read, not at start).
    from codi_jax.data import catalog

    bad = catalog.make_source(cfg3.data, "train", "depth")[1]
    assert isinstance(bad, sources.Corrupt) and re.search(
        "depth map .*im1.npy is 5x5 but its image is 24x28", bad.reason
    )
    it = pipeline.make_train_iterator(cfg3.data, task="depth", global_batch_size=2, seed=0)
    batches = [next(it) for _ in range(3)]
    assert all(b["image"].shape[0] == 2 for b in batches) and it.skipped_records >= 1


def test_missing_depth_maps_are_made_once_by_a_depth_model(tmp_path):
    import json

    import torch
    import transformers

    torch.manual_seed(0)
    dpt = tmp_path / "dpt"
    cfg = transformers.DPTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=48,
        image_size=32,
        patch_size=8,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[8, 8, 8, 8],
        fusion_hidden_size=8,
        reassemble_factors=[4, 2, 1, 0.5],
    )
    transformers.DPTForDepthEstimation(cfg).save_pretrained(dpt)
    transformers.DPTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(dpt)
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    for i, p in enumerate(_photos(3)):
        _write(root / "images" / f"im{i}.png", p)
    (root / "captions.jsonl").write_text(
        "\n".join(json.dumps({"file": f"im{i}.png", "caption": "c"}) for i in range(3))
    )
    cfg = _paired_cfg("depth", source="depth_folder", folder=str(root))
    cfg.data.depth.model_path = str(dpt)
    b = pipeline.make_eval_batch(cfg.data, task="depth", num_examples=1, seed=0)
    maps = sorted(os.listdir(root / "depth"))
    assert maps == ["im0.png", "im1.png", "im2.png"]
    from PIL import Image

    with Image.open(root / "depth" / "im0.png") as im:
        arr = np.asarray(im)
    assert arr.shape == (24, 28) and arr.dtype == np.uint16 and arr.max() == 65535 and arr.min() == 0
    assert b["cond"].shape == (1, 16, 16, 1)
    mtimes = [os.path.getmtime(root / "depth" / m) for m in maps]
    from codi_jax.data import depth_model

    assert (
        depth_model.estimate_missing(sorted(str(p) for p in (root / "images").iterdir()), str(root / "depth"), str(dpt))
        == []
    )  # cached: nothing to redo
    assert mtimes == [os.path.getmtime(root / "depth" / m) for m in maps]


def test_pretrained_text_encoder_gives_the_prompt_table(tmp_path):
    """text.encoder='pretrained': the Stable Diffusion folder's CLIP embeds the task's prompts, row for
    row as the single-prompt path of the SD loader does (one encoder, two callers)."""
    from codi_jax.pretrained import stable_diffusion
    from tests import sd_folder

    folder = str(sd_folder.make_tiny_sd(tmp_path / "sd"))
    config = edit_configs.get_config("")
    config.teacher.pretrained_path = folder
    config.model.unet.cross_attention_dim = 32  # the tiny SD folder's width (the run takes it from the folder)
    prompts = build.prompt_embeddings(config, str(tmp_path / "run"))
    table, negative = prompts.table, prompts.negative
    words = tasks.prompts(config.data, "edit")
    assert table.shape[0] == 1 + len(words) and negative.shape == (1,) + table.shape[1:]
    for i in (0, 3):
        want = stable_diffusion.prompt_embedding(folder, words[i], None)
        np.testing.assert_allclose(table[i + 1], want[0], atol=1e-5)
    np.testing.assert_allclose(table[0], stable_diffusion.prompt_embedding(folder, "", None)[0], atol=1e-5)


def test_keep_known_pastes_the_given_pixels_back(data_cfg):
    from codi_jax import sample

    b = pipeline.make_eval_batch(data_cfg, task="inpaint", num_examples=2, seed=0)
    noise = np.random.default_rng(0).uniform(-1, 1, b["image"].shape).astype(np.float32)
    out = sample.keep_known(noise, b["cond"])
    m = b["mask"]
    np.testing.assert_allclose(out * (1 - m), b["image"] * (1 - m), atol=1e-6)
    np.testing.assert_allclose(out * m, noise * m, atol=1e-6)


def test_latent_loss_keeps_the_prompts_context():
    """Latent space + prompts: the prompt wrapper's per-example context reaches the loss (the latent
    wrapper's single-prompt context only fills in when a batch has none)."""
    from codi_jax.methods import latent

    class Codec:
        def encode(self, vae, images, rng):
            return images * 0.5

    seen = {}

    def loss(params, frozen, ema, batch, rng):
        seen.update(batch)
        return 0.0, {}

    table = jnp.arange(3 * 2 * 4, dtype=jnp.float32).reshape(3, 2, 4)
    frozen = {"vae": None, "context": jnp.full((1, 2, 4), -7.0), "prompt_table": table}
    batch = {"image": jnp.ones((2, 4, 4, 3)), "prompt": jnp.asarray([1, 0], jnp.int32)}
    text.with_prompts(latent.latent_loss(loss, Codec()), 0.0)(None, frozen, None, batch, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(seen["context"], table[jnp.asarray([2, 1])])
    np.testing.assert_array_equal(seen["image"], 0.5)
    latent.latent_loss(loss, Codec())(None, frozen, None, {"image": batch["image"]}, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(seen["context"], -7.0)


def _build_tfds(data_dir, name, features, rows):
    from codi_jax.data import examples

    examples.build_tfds(str(data_dir), name, features, rows)


def test_tfds_edit_and_depth_datasets(tmp_path):
    import tensorflow_datasets as tfds

    photos = _photos(3)
    _build_tfds(
        tmp_path,
        "tiny_edits",
        {
            "original_image": tfds.features.Image(shape=(None, None, 3)),
            "edited_image": tfds.features.Image(shape=(None, None, 3)),
            "edit_prompt": tfds.features.Text(),
        },
        [{"original_image": p, "edited_image": 255 - p, "edit_prompt": "invert the colours"} for p in photos],
    )
    cfg = _paired_cfg("edit", source="tfds")
    cfg.data.tfds.update(name="tiny_edits", data_dir=str(tmp_path))
    assert tasks.prompts(cfg.data, "edit") == ["invert the colours"]
    b = pipeline.make_eval_batch(cfg.data, task="edit", num_examples=2, seed=0)
    np.testing.assert_allclose(b["image"], -b["cond"], atol=1e-5)
    t = next(pipeline.make_train_iterator(cfg.data, task="edit", global_batch_size=2, seed=0))
    np.testing.assert_allclose(t["image"], -t["cond"], atol=1e-5)

    _build_tfds(
        tmp_path,
        "tiny_depth",
        {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "depth": tfds.features.Tensor(shape=(24, 28), dtype=np.float32),  # fixed: written without TensorFlow
            "caption": tfds.features.Text(),
        },
        [
            {
                "image": p,
                "depth": np.linspace(1, 4, p.shape[1], dtype=np.float32)[None].repeat(p.shape[0], 0),
                "caption": f"scene {i}",
            }
            for i, p in enumerate(photos)
        ],
    )
    dcfg = _paired_cfg("depth", source="tfds")
    dcfg.data.tfds.update(name="tiny_depth", data_dir=str(tmp_path))
    d = pipeline.make_eval_batch(dcfg.data, task="depth", num_examples=1, seed=0)
    assert d["cond"][0, 0, 0, 0] == pytest.approx(1.0) and d["cond"][0, 0, -1, 0] == pytest.approx(-1.0)
    assert tasks.prompts(dcfg.data, "depth") == ["scene 0", "scene 1", "scene 2"]
    dcfg.data.tfds.features.caption = "text"
    with pytest.raises(ValueError, match="tiny_depth has no feature 'text'"):
        tasks.prompts(dcfg.data, "depth")
    dcfg.data.tfds.name = "nothing_here"
    with pytest.raises(FileNotFoundError, match="cannot open 'nothing_here'"):
        tasks.prompts(dcfg.data, "depth")


def test_sampling_command_bad_run_is_one_line(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "codi_jax.sample",
            f"--run={tmp_path}/none",
            f"--inputs={tmp_path}",
            f"--out={tmp_path}/out",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "none: no config.json there" in lines[0], out.stderr[-2000:]
