"""Parity of our Flax CLIP text encoder with transformers' PyTorch `CLIPTextModel`, and the
prompt encoding helpers."""

import json
import logging as std_logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402

from codi_jax.models import clip_text  # noqa: E402
from codi_jax.pretrained import diffusers_folder, safetensors_io  # noqa: E402

VOCAB, SEQ = 1000, 16
EOS = VOCAB - 1


def _torch_model(act: str, eos_token_id: int):
    cfg = transformers.CLIPTextConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=SEQ,
        hidden_act=act,
        eos_token_id=eos_token_id,
        bos_token_id=VOCAB - 2,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    model = transformers.CLIPTextModel(cfg).eval()
    with torch.no_grad():  # larger than the default init, so that differences would show
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _ids():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB - 2, size=(4, SEQ))
    ids[0, 5:] = EOS  # end token then padding with it
    ids[1, -1] = EOS  # at the very end
    ids[2, 3] = EOS  # a second one later: the first (or, legacy, argmax's first) counts
    ids[2, 9] = EOS
    ids[3, 0] = EOS  # at the start
    return ids


@pytest.mark.parametrize(
    "act,eos_id,layout",
    [
        ("quick_gelu", EOS, "save_pretrained"),  # transformers 5 layout, float32
        ("gelu", 2, "legacy_fp16"),  # legacy eos id (argmax pooling), text_model. prefix, position_ids, fp16 file
        ("gelu", EOS, "bf16"),  # bfloat16 weights
    ],
)
def test_parity_with_transformers(tmp_path, act, eos_id, layout):
    model = _torch_model(act, eos_id)
    model.save_pretrained(tmp_path, safe_serialization=True)
    if layout != "save_pretrained":
        import ml_dtypes

        dt = np.float16 if layout == "legacy_fp16" else ml_dtypes.bfloat16
        with torch.no_grad():  # make the torch weights exactly representable in the stored dtype
            for p in model.parameters():
                p.copy_(torch.from_numpy(p.numpy().astype(dt).astype(np.float32)))
        state = {"text_model." + k: v.numpy().astype(dt) for k, v in model.state_dict().items()}
        (tmp_path / "model.safetensors").unlink()
        if layout == "legacy_fp16":
            state["text_model.embeddings.position_ids"] = np.arange(SEQ, dtype=np.int64)[None]
            safetensors_io.save(str(tmp_path / "model.fp16.safetensors"), state)
        else:
            safetensors_io.save(str(tmp_path / "model.safetensors"), state)

    module, params, cfg = diffusers_folder.load_text_encoder(str(tmp_path))
    assert cfg.hidden_act == act and cfg.eos_token_id == eos_id
    ids = _ids()
    last, pooled = jax.jit(module.apply)({"params": params}, ids)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids))
    d_last = float(np.max(np.abs(np.asarray(last) - out.last_hidden_state.numpy())))
    d_pool = float(np.max(np.abs(np.asarray(pooled) - out.pooler_output.numpy())))
    print(f"{act} eos={eos_id} {layout}: max|diff| last_hidden_state {d_last:.2e}, pooled {d_pool:.2e}")
    assert d_last <= 1e-4 and d_pool <= 1e-4
    # The pooled rows are the hidden states at the expected positions.
    pos = ids.argmax(-1) if eos_id == 2 else (ids == EOS).argmax(-1)
    np.testing.assert_array_equal(np.asarray(pooled), np.asarray(last)[np.arange(len(ids)), pos])


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        diffusers_folder.load_text_encoder(str(tmp_path / "nowhere"))
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "vocab_size": 10,
                "hidden_size": 8,
                "intermediate_size": 8,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "max_position_embeddings": 4,
            }
        )
    )
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        diffusers_folder.load_text_encoder(str(tmp_path))
    with pytest.raises(ValueError, match="hidden_act"):
        clip_text.clip_text_config_from_transformers({"hidden_act": "relu"})


from tests.sd_folder import tiny_clip_tokenizer as _tiny_tokenizer_folder  # noqa: E402


def test_tokenizer_truncation_and_warning(tmp_path, caplog):
    vocab = _tiny_tokenizer_folder(tmp_path)
    tok = diffusers_folder.load_tokenizer(str(tmp_path))
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    assert tok("a cat")["input_ids"] == [bos, vocab["a</w>"], vocab["cat</w>"], eos]

    long_prompt = " ".join(["cat dog"] * 5)  # 10 words -> 12 tokens with start/end
    with caplog.at_level(std_logging.WARNING):
        ids = clip_text.encode_prompts(tok, ["a dog", long_prompt])
    assert ids.dtype == np.int32 and ids.shape == (2, 8)
    assert ids[0].tolist() == [bos, vocab["a</w>"], vocab["dog</w>"], eos] + [eos] * 4  # pad token is <|endoftext|>
    assert ids[1].tolist() == [bos] + [vocab["cat</w>"], vocab["dog</w>"]] * 3 + [eos]
    warnings = [
        r.getMessage() for r in caplog.records if r.levelno == std_logging.WARNING and "prompt" in r.getMessage()
    ]
    assert len(warnings) == 1 and "prompt 1 has 12 tokens" in warnings[0], warnings

    caplog.clear()
    with caplog.at_level(std_logging.WARNING):
        ids = clip_text.encode_prompts(tok, ["a dog"], max_length=5)
    assert ids.tolist() == [[bos, vocab["a</w>"], vocab["dog</w>"], eos, eos]]
    assert not [r for r in caplog.records if "prompt" in r.getMessage()]
