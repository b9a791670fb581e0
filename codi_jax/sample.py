"""Sampling for users, and PE-CoDi's per-task adapters.

    python -m codi_jax.sample --run=RUN_DIR --inputs=IMAGES --out=OUT [--steps=4] [--prompt=...|--prompts=FILE]
        [--masks=DIR] [--adapter=NAME=ADAPTER_DIR ...] [--use=NAME] [--guidance_scale=W] [--batch_size=8]

Inputs per task (every file of a folder, sorted by name, or a comma-separated list of files):
  sr       low-resolution images; results are `sr_scale` times larger.
  inpaint  images, and `--masks=DIR` holding a mask of the same name and size for each
           (white or 1 = fill in, black or 0 = keep; a mask that is not binary is an error).
  depth    depth maps (grayscale; near = bright, as MiDaS-style inverse depth) and a caption each.
  edit     images and an instruction each.
Prompts: `--prompt` for every input, or `--prompts=FILE` with one line per input (in input order);
a prompt longer than the tokenizer's limit is cut, with a warning.

Adapters (PE-CoDi, sec 4.4). A run whose backbone stayed frozen (`codi.mode=pe`, or the 'pe'
finetuned baseline) writes RUN_DIR/adapter/: `adapter.safetensors` (the EMA adapter weights, mu
included) and `adapter.json` (the run's config, the task, and a fingerprint of the backbone it was
trained against). `AdapterSampler` loads a backbone once and switches adapters by name; an adapter
trained against another backbone, or for a task other than the one asked for, is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import time

import jax
import ml_collections as mlc
import numpy as np
from absl import logging

from codi_jax import build, runs, sampling, storage, workdir
from codi_jax.data import degradation, sources
from codi_jax.data import tasks as task_data
from codi_jax.methods import text
from codi_jax.pretrained import text_encoder


@dataclasses.dataclass
class Adapter:
    name: str
    task: str
    model: build.Model
    params: dict
    backbone: str
    encoder: text_encoder.TextEncoder | None


class AdapterSampler:
    """One frozen backbone in memory; adapters (one per task) added and used by name."""

    def __init__(self, run_dir: str, cache_dir: str):
        self.cache_dir = cache_dir
        if not storage.isfile(storage.join(run_dir, "config.json")):
            raise FileNotFoundError(f"run {run_dir}: no config.json there (not a finished codi_jax run's workdir?)")
        config = runs.read_run_config(run_dir)
        model = build.build_model(config, cache_dir)
        params, frozen, _ = runs.restore_final(model.config, run_dir, model=model)
        self.frozen = frozen
        self.backbone = params["unet"]
        self.fingerprint = runs.backbone_fingerprint(self.backbone)
        self.adapters: dict[str, Adapter] = {}
        own = Adapter("own", model.config.task, model, params["adapter"], self.fingerprint, self._encoder(model.config))
        self.adapters["own"] = own

    def _encoder(self, config):
        if config.task not in task_data.PROMPT_TASKS:
            return None
        return text_encoder.make_encoder(
            config, task_data.prompts(config.data, config.task), storage.join(self.cache_dir, "cache")
        )

    def add(self, name: str, folder: str, expect_task: str = "") -> Adapter:
        meta, params = runs.load_adapter_files(folder)
        if expect_task and meta["task"] != expect_task:
            raise ValueError(f"adapter {name!r} ({folder}) was trained for task {meta['task']!r}, not {expect_task!r}")
        if meta["backbone"] != self.fingerprint:
            raise ValueError(
                f"adapter {name!r} ({folder}) was trained against backbone {meta['backbone']}, "
                f"not this run's ({self.fingerprint})"
            )
        config = mlc.ConfigDict(meta["config"])
        model = build.build_model(config, self.cache_dir)
        self.adapters[name] = Adapter(name, meta["task"], model, params, meta["backbone"], self._encoder(model.config))
        logging.info(
            "adapter %r: task %s, %d params (%.1f MB)",
            name,
            meta["task"],
            meta["adapter_params"],
            runs.param_bytes(params) / 1e6,
        )
        return self.adapters[name]

    def memory(self) -> dict:
        """Bytes held: the backbone once and every adapter, against one full model per adapter."""
        adapters = {n: runs.param_bytes(a.params) for n, a in self.adapters.items()}
        backbone = runs.param_bytes(self.backbone)
        return {
            "backbone_bytes": backbone,
            "adapter_bytes": adapters,
            "shared_total_bytes": backbone + sum(adapters.values()),
            "separate_models_bytes": sum(backbone + b for b in adapters.values()),
        }

    def sample(
        self,
        name: str,
        cond: np.ndarray,
        prompts=None,
        *,
        steps: int = 4,
        sampler: str = "deterministic",
        guidance_scale: float | None = None,
        negative_prompt: str | None = None,
        seed: int = 0,
        batch_size: int = 8,
        eps_scale: float = 1.0,
    ) -> np.ndarray:
        """Images in [-1, 1] for conditions `cond` [N, H, W, C] (see `conditions`), with adapter `name`
        (`eps_scale`: `sampling.sample`'s epsilon scaling, 1 = none)."""
        if name not in self.adapters:
            raise ValueError(f"no adapter named {name!r}; loaded: {sorted(self.adapters)}")
        a = self.adapters[name]
        config, space = a.model.config, a.model.space
        sampling.check_sampler(sampler, "--sampler")
        want = task_data.COND_CHANNELS[a.task]
        if cond.shape[-1] != want:
            raise ValueError(f"adapter {name!r} (task {a.task}) takes {want}-channel conditions, got {cond.shape[-1]}")
        context = None
        denoiser = a.model.method_denoiser
        n = cond.shape[0]
        if a.encoder is not None:
            if prompts is None or len(prompts) != n:
                raise ValueError(f"task {a.task!r} needs a prompt for each of the {n} inputs (--prompt or --prompts)")
            scale = config.text.guidance_scale if guidance_scale is None else guidance_scale
            neg = config.text.negative_prompt if negative_prompt is None else negative_prompt
            context = {"prompt": a.encoder.embed(prompts), "negative": a.encoder.embed([neg])}
            denoiser = text.Guided(denoiser, float(scale))
        elif space.context is not None:
            context = space.context
        params = {"unet": self.backbone, "adapter": a.params}
        # make_sampler keeps one compiled program per (denoiser, steps, sampler, guidance, scale)
        fn = sampling.make_sampler(denoiser, steps, sampler, eps_scale=eps_scale)
        factor = config.data.crop_size // space.shape[0]
        shape = (cond.shape[1] // factor, cond.shape[2] // factor, space.shape[2])
        from codi_jax.evaluation import evaluate

        return evaluate.sample_batches(
            fn,
            params,
            cond,
            rng=jax.random.PRNGKey(seed),
            n=n,
            batch_size=batch_size,
            one_shape=shape,
            context=context,
            to_pixels=None if a.model.codec is None else (lambda x: space.to_pixels(x, self.frozen)),
        )


# ----------------------------------------------------------------------------- files -> conditions


def list_inputs(spec: str) -> list[str]:
    files = []
    for part in [p for p in spec.split(",") if p]:
        if storage.isdir(part):
            files += sources.list_image_files(part, "--inputs")
        elif storage.isfile(part):
            files.append(part)
        else:
            raise FileNotFoundError(f"--inputs: {part} does not exist")
    if not files:
        raise ValueError(f"--inputs={spec!r} names no image files")
    return files


def _open_image(path):
    from PIL import Image

    return Image.open(io.BytesIO(storage.read_bytes(path)))


def _read_rgb(path):
    try:
        with _open_image(path) as im:
            return sources.to_rgb_uint8(im)
    except OSError as e:
        raise ValueError(f"{path}: not an image this reader can decode ({e})") from None


def _resize(img, side, resample="bicubic"):
    from PIL import Image

    mode = {"bicubic": Image.Resampling.BICUBIC, "nearest": Image.Resampling.NEAREST}[resample]
    return np.asarray(Image.fromarray(img).resize((side, side), mode))


def conditions(task: str, files: list[str], config, size: int, masks_dir: str = "") -> np.ndarray:
    """Model conditions [N, size, size, C] in [-1, 1] from the user's files (see the module docstring)."""
    out = []
    for path in files:
        img = _read_rgb(path)
        if task == "sr":
            lr = _resize(img, size // config.data.sr_scale).astype(np.float32) / 255.0
            out.append(degradation.bicubic_upsample(lr, size) * 2.0 - 1.0)
        elif task == "inpaint":
            if not masks_dir:
                raise ValueError("task 'inpaint' needs --masks=DIR (a mask of the same name for each input)")
            mpath = storage.join(masks_dir, storage.basename(path))
            if not storage.isfile(mpath):
                raise FileNotFoundError(f"--masks: no mask {mpath} for input {path}")
            with _open_image(mpath) as im:
                mask = task_data.check_mask(np.asarray(im.convert("L")), img.shape, what=f"mask {mpath}")
            mask = (_resize((mask[..., 0] * 255).astype(np.uint8), size, "nearest") > 127).astype(np.float32)[..., None]
            image = _resize(img, size).astype(np.float32) / 127.5 - 1.0
            out.append(task_data.inpaint_condition(image, mask))
        elif task == "depth":
            out.append(task_data.inverse_depth_condition(_resize(img, size).astype(np.float32).mean(-1)))
        elif task == "edit":
            out.append(_resize(img, size).astype(np.float32) / 127.5 - 1.0)
        else:
            raise ValueError(f"no sampling inputs for task {task!r}")
    return np.stack(out).astype(np.float32)


def keep_known(samples: np.ndarray, cond: np.ndarray) -> np.ndarray:
    """Inpainting: the given pixels from the input, the hole from the samples (cond = image with the hole
    at 0, mask in [-1, 1])."""
    mask = (cond[..., 3:4] + 1.0) / 2.0
    return mask * samples + (1.0 - mask) * cond[..., :3]


def read_prompts(prompt: str, prompts_file: str, n: int) -> list[str] | None:
    if prompts_file:
        lines = [ln for ln in storage.read_text(prompts_file).split("\n") if ln.strip()]
        if len(lines) != n:
            raise ValueError(f"--prompts={prompts_file} has {len(lines)} prompts for {n} inputs (one per line)")
        return lines
    return None if prompt is None else [prompt] * n


def _main(argv):
    from absl import flags
    from PIL import Image

    from codi_jax.evaluation import grids

    f = flags.FLAGS
    run_dir, out = f.run, f.out
    workdir.check_workdir(out, "--out")
    t0 = time.perf_counter()
    s = AdapterSampler(run_dir, out)
    for spec in f.adapter:
        name, _, folder = spec.partition("=")
        if not folder:
            raise ValueError(f"--adapter={spec!r}: give NAME=FOLDER")
        s.add(name, folder)
    a = s.adapters[f.use] if f.use in s.adapters else None
    if a is None:
        raise ValueError(f"--use={f.use!r}: loaded adapters are {sorted(s.adapters)}")
    files = list_inputs(f.inputs)
    size = f.size or a.model.config.data.crop_size
    cond = conditions(a.task, files, a.model.config, size, f.masks)
    prompts = read_prompts(f.prompt, f.prompts, len(files))
    t1 = time.perf_counter()
    x = s.sample(
        f.use,
        cond,
        prompts,
        steps=f.steps,
        sampler=f.sampler,
        guidance_scale=f.guidance_scale,
        negative_prompt=f.negative_prompt,
        seed=f.seed,
        batch_size=f.batch_size,
        eps_scale=f.eps_scale,
    )
    t2 = time.perf_counter()
    if a.task == "inpaint" and f.keep_known:
        x = keep_known(x, cond)
    images = grids.to_uint8(x)
    for path, img in zip(files, images):
        name = os.path.splitext(storage.basename(path))[0] + ".png"
        storage.save_with(storage.join(out, name), functools.partial(Image.fromarray(img).save, format="PNG"))
    print(
        f"sample: {len(files)} results of task {a.task} ({f.steps} steps) in {out}; load {t1 - t0:.1f} s, "
        f"sampling {t2 - t1:.1f} s (compile included)"
    )
    print("sample: memory " + json.dumps(s.memory()))


def _define_flags():
    from absl import flags

    flags.DEFINE_string("run", None, "Workdir of a finished run: its backbone (and its own adapter, 'own').")
    flags.DEFINE_string("inputs", None, "A folder of images, or comma-separated image files.")
    flags.DEFINE_string("out", None, "Folder for the results (one PNG per input, same stem).")
    flags.DEFINE_multi_string("adapter", [], "NAME=FOLDER: a PE-CoDi adapter (RUN_DIR/adapter) to load.")
    flags.DEFINE_string("use", "own", "Which adapter samples: 'own' (the run's) or a --adapter NAME.")
    flags.DEFINE_string("masks", "", "Inpainting: a folder with one mask per input, same file name.")
    flags.DEFINE_bool("keep_known", True, "Inpainting: keep the input's pixels outside the hole exactly.")
    flags.DEFINE_string("prompt", None, "The prompt (caption or instruction) for every input.")
    flags.DEFINE_string("prompts", "", "A text file with one prompt per input, in input order.")
    flags.DEFINE_string("negative_prompt", None, "Classifier-free guidance's negative prompt (default: the run's).")
    flags.DEFINE_float(
        "guidance_scale", None, "Classifier-free guidance weight (default: the run's text.guidance_scale)."
    )
    flags.DEFINE_integer("steps", 4, "Sampling steps.")
    flags.DEFINE_string("sampler", "deterministic", f"One of {sampling.SAMPLERS}.")
    flags.DEFINE_integer("size", 0, "Output side in pixels (default: the run's crop size).")
    flags.DEFINE_integer("batch_size", 8, "Images per model call.")
    flags.DEFINE_integer("seed", 0, "Noise seed.")
    flags.DEFINE_float(
        "eps_scale",
        1.0,
        "Scale the noise estimate by this (epsilon scaling; 1 = none): for a model "
        "whose many-step samples come out grainy (see python -m codi_jax.evaluation.diagnose).",
    )
    flags.mark_flags_as_required(["run", "inputs", "out"])


def main():
    from codi_jax import logging_utils

    _define_flags()
    logging_utils.run_cli(_main)


if __name__ == "__main__":
    main()
