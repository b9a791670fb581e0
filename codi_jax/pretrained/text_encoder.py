"""The frozen text encoder of the tasks with prompts: tokenizer + CLIP text model, cached embeddings.

A task with prompts (depth captions, editing instructions) turns each record's text into its context
in one of two ways (`text.prompt_source`):
  table    the record's 'prompt' is an index into the task's prompt list. The frozen text encoder
           embeds the list once per dataset: the table `[1 + P, L, D]`, row 0 the empty prompt, row
           i + 1 prompt i, cached as a .npy file in the job's workdir (keyed by the encoder and the
           prompts). The table rides in the train state's frozen params ('prompt_table'), so a train
           step looks contexts up instead of running the encoder.
  encoder  the record's 'prompt' is its token ids (`Tokenize`, in the data pipeline); the encoder's
           params ride in the frozen params ('text_encoder') and the step runs it: any number of
           distinct prompts (InstructPix2Pix's ~313k instructions, LAION captions).
Prompt dropout and classifier-free guidance are in `codi_jax/methods/text.py`.

Encoders (`text.encoder`):
  'pretrained'  tokenizer/ and text_encoder/ of `teacher.pretrained_path` (Stable Diffusion's CLIP);
  a folder      holding tokenizer/ and text_encoder/ in the same (transformers) format;
  'tiny'        the offline default of the tiny recipes: no weights can be downloaded here, so a small
                CLIP text model with seeded random weights, frozen like SD's, and a CLIP BPE tokenizer
                whose whole-word merges are the words of the task's prompts. Random features still tell
                prompts apart; the diffusion model learns what they mean.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from codi_jax import storage
from codi_jax.models import clip_text
from codi_jax.pretrained import diffusers_folder

ENCODERS = ("tiny", "pretrained")


def tiny_tokenizer_folder(path: str, words: Sequence[str], max_length: int, digits: bool = True) -> str:
    """Write a valid CLIP BPE tokenizer: letters (and digits), each also as a word end, plus merges that
    build every word of `words` whole (so each is one token)."""
    os.makedirs(path, exist_ok=True)
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ([str(d) for d in range(10)] if digits else [])
    pieces = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    merges = []
    for word in sorted(set(words)):
        if not re.fullmatch(r"[a-z0-9]+", word) or len(word) < 2:
            continue
        left = word[0]
        for i, c in enumerate(word[1:], start=1):
            right = c + "</w>" if i == len(word) - 1 else c
            if (left, right) not in merges:
                merges.append((left, right))
            left = left + right
    seen = set(pieces)
    for a, b in merges:
        if a + b not in seen:
            pieces.append(a + b)
            seen.add(a + b)
    vocab = {p: i for i, p in enumerate(pieces)}
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": int(max_length)}, f)
    return path


def prompt_words(prompts: Sequence[str]) -> list[str]:
    return sorted({w for p in prompts for w in re.findall(r"[a-z0-9]+", p.lower())})


@dataclasses.dataclass
class TextEncoder:
    tokenizer: Any
    module: Any
    params: Any
    max_length: int
    name: str  # identifies the weights (cache key)

    @property
    def width(self) -> int:
        return int(self.module.cfg.hidden_size)

    def encode(self, params, ids):
        """last_hidden_state of token ids [B, L]: traceable, for the jitted train step."""
        return self.module.apply({"params": params}, ids)[0]

    def embed_tokens(self, ids) -> np.ndarray:
        return np.asarray(self._apply(self.params, np.asarray(ids, np.int32)), np.float32)

    def embed(self, prompts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """last_hidden_state [n, max_length, width] (float32); longer prompts are cut with a warning."""
        ids = clip_text.encode_prompts(self.tokenizer, list(prompts), max_length=self.max_length)
        return np.concatenate(
            [
                np.asarray(self._apply(self.params, ids[i : i + batch_size]), np.float32)
                for i in range(0, len(ids), batch_size)
            ]
        )

    @functools.cached_property
    def _apply(self):
        """The encoder's forward, jitted once per encoder (compiled once per batch shape)."""
        return jax.jit(lambda p, i: self.module.apply({"params": p}, i)[0])


class Tokenize:
    """A record's text -> its token ids int32 [max_length] (the data pipeline's `prompt_fn` when the text
    encoder runs in the train step). Picklable, for grain's worker processes."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, int(max_length)

    def __call__(self, text: str) -> np.ndarray:
        return clip_text.encode_prompts(self.tokenizer, [text], max_length=self.max_length)[0]


def tiny_encoder(tcfg, words: Sequence[str], folder: str) -> TextEncoder:
    t = tcfg.tiny
    tok = diffusers_folder.load_tokenizer(tiny_tokenizer_folder(folder, words, t.max_length))
    cfg = clip_text.clip_text_config_from_transformers(
        dict(
            vocab_size=len(tok.get_vocab()),
            hidden_size=t.width,
            intermediate_size=t.intermediate,
            num_hidden_layers=t.layers,
            num_attention_heads=t.heads,
            max_position_embeddings=t.max_length,
            hidden_act="quick_gelu",
            eos_token_id=1,
        )
    )
    module = clip_text.CLIPTextModel(cfg)
    params = module.init(jax.random.PRNGKey(t.seed), jnp.zeros((1, t.max_length), jnp.int32))["params"]
    digest = hashlib.sha1(json.dumps([t.to_dict(), sorted(words)], sort_keys=True).encode()).hexdigest()[:12]
    return TextEncoder(tok, module, params, int(t.max_length), f"tiny-{digest}")


def folder_encoder(folder: str, allow_pickle: bool = False) -> TextEncoder:
    for sub in ("tokenizer", "text_encoder"):
        if not os.path.isdir(os.path.join(folder, sub)):
            raise FileNotFoundError(f"config text.encoder: {folder} has no {sub}/ folder")
    tok = diffusers_folder.load_tokenizer(os.path.join(folder, "tokenizer"))
    module, params, cfg = diffusers_folder.load_text_encoder(
        os.path.join(folder, "text_encoder"), allow_pickle=allow_pickle
    )
    max_length = min(int(cfg.max_position_embeddings), int(tok.model_max_length))
    return TextEncoder(tok, module, params, max_length, os.path.abspath(folder))


def make_encoder(config, prompts: Sequence[str], cache_dir: str) -> TextEncoder:
    """The text encoder that `config.text.encoder` names (see the module docstring)."""
    tcfg = config.text
    if tcfg.encoder == "tiny":
        # transformers reads a tokenizer from a local folder: a gs:// workdir's goes to a temporary one
        local = tempfile.mkdtemp(prefix="codi_tiny_tokenizer_") if storage.is_remote(cache_dir) else cache_dir
        return tiny_encoder(
            tcfg, prompt_words(list(prompts) + [tcfg.negative_prompt]), os.path.join(local, "tiny_tokenizer")
        )
    if tcfg.encoder == "pretrained":
        if not config.teacher.pretrained_path:
            raise ValueError("config text.encoder='pretrained' needs teacher.pretrained_path (a diffusers folder)")
        return folder_encoder(config.teacher.pretrained_path, config.teacher.allow_pickle)
    if os.path.isdir(tcfg.encoder):
        return folder_encoder(tcfg.encoder, config.teacher.allow_pickle)
    raise ValueError(f"config text.encoder={tcfg.encoder!r} is not one of {ENCODERS} nor a folder")


def prompt_table(encoder: TextEncoder, prompts: Sequence[str], cache_dir: str | None, max_prompts: int) -> np.ndarray:
    """[1 + P, L, D]: the empty prompt, then `prompts`; computed once and cached by content."""
    if len(prompts) > max_prompts:
        raise ValueError(
            f"the dataset has {len(prompts)} distinct prompts, more than config "
            f"text.max_cached_prompts={max_prompts} (the cache lives in device memory)"
        )
    rows = [""] + list(prompts)
    key = hashlib.sha1(json.dumps([encoder.name, encoder.max_length, rows]).encode()).hexdigest()[:16]
    path = storage.join(cache_dir, f"prompts_{key}.npy") if cache_dir else None
    if path and storage.isfile(path):
        return np.load(io.BytesIO(storage.read_bytes(path)))
    table = encoder.embed(rows)
    if path:
        storage.save_with(path, lambda f: np.save(f, table))
    logging.info("prompt embeddings: %d prompts -> %s", len(prompts), table.shape)
    return table
