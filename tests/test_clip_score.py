"""CLIP score: our Flax CLIPModel towers against transformers' CLIPModel (random tiny weights), and
the score's definition (torchmetrics': 100 * max(cos, 0))."""

import numpy as np
import pytest
import torch
import transformers

from codi_jax.evaluation import clip_score
from tests import sd_folder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    vocab = sd_folder.tiny_clip_tokenizer(path)
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=8,
            hidden_act="quick_gelu",
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            hidden_act="quick_gelu",
        ),
        projection_dim=16,
    )
    model = transformers.CLIPModel(cfg).eval()
    model.save_pretrained(path)
    return path, model


def test_embeddings_and_score_match_transformers(tiny_clip):
    path, model = tiny_clip
    scorer = clip_score.CLIPScorer(str(path))
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (3, 40, 48, 3)).astype(np.float32)  # resized and centre-cropped to 32
    prompts = ["cat", "dog", "a cat dog"]
    ids = np.asarray(scorer.tokenizer(prompts, padding="max_length", max_length=8, truncation=True)["input_ids"])
    pixels = np.asarray(clip_score.preprocess(images, 32))
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
    img = scorer._images(scorer.params, pixels)
    txt = scorer._text(scorer.params, ids)
    np.testing.assert_allclose(
        img, out.image_embeds.numpy() * np.linalg.norm(img, axis=-1, keepdims=True), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        txt, out.text_embeds.numpy() * np.linalg.norm(txt, axis=-1, keepdims=True), rtol=1e-4, atol=1e-5
    )
    # transformers normalises the embeddings; the score is 100 * max(cos, 0) of those
    want = 100 * np.maximum(np.sum(out.image_embeds.numpy() * out.text_embeds.numpy(), axis=-1), 0)
    np.testing.assert_allclose(scorer.score(images, prompts), want, rtol=1e-4, atol=1e-3)


def test_not_a_clip_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        clip_score.CLIPScorer(str(tmp_path))
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    with pytest.raises(ValueError, match="not a CLIPModel's"):
        clip_score.CLIPScorer(str(tmp_path))


def test_clip_score_row_scores_each_sample_against_its_own_prompt(tiny_clip):
    from codi_jax.data import pipeline, tasks
    from codi_jax.evaluation import evaluate
    from configs import edit

    path, _ = tiny_clip
    config = edit.get_config("smoke")
    config.eval.clip_model = str(path)
    config.eval.batch_size = 4  # the CLIP model sees batches of 4 (and the last of 2)
    batch = pipeline.make_eval_batch(config.data, task="edit", num_examples=6, seed=0)
    words = tasks.prompts(config.data, "edit")
    got = evaluate.prompt_metrics(batch["image"], batch, config.eval, config.data, "edit")
    scorer = clip_score.CLIPScorer(str(path))
    want = np.mean([scorer.score(batch["image"][i : i + 1], [words[int(k)]])[0] for i, k in enumerate(batch["prompt"])])
    assert got["clip_score"] == pytest.approx(float(want), rel=1e-4)
    # Shuffled prompts give another score: the row pairs each sample with its own prompt.
    shuffled = dict(batch, prompt=(batch["prompt"] + 1) % len(words))
    assert (
        evaluate.prompt_metrics(batch["image"], shuffled, config.eval, config.data, "edit")["clip_score"]
        != got["clip_score"]
    )
    assert evaluate.prompt_metrics(batch["image"], batch, config.eval, config.data, "sr") == {}
