"""The training job at Stable Diffusion size on this machine, with random weights: compile, train steps,
a checkpoint of the whole state written and read back, evaluation through the VAE decoder.

  python -m codi_jax.benchmarks.sd_job --arch=sd15 --workdir=/tmp/sd_job --resolution=256 --out=sd_job.json

1. Writes a diffusers-format folder of the architecture (codi_jax/pretrained/architectures.py) with
   random weights, made by diffusers' and transformers' own classes (`.[test]` installs them), unless
   WORKDIR/teacher_random holds one. Its tokenizer knows a handful of pieces (the training prompt is SD's
   empty one).
2. Runs `python -m codi_jax.main --config=configs/sr.py` on that folder for `--steps` steps
   (PE-CoDi by default: full CoDi at SD size does not fit 24 GiB of host memory; see the planner),
   evaluating at 1 and 4 steps; then the same command with one step more, which restores the whole
   train state from the checkpoint and trains on.
3. Collects compile time, step time, peak host RSS of each run, checkpoint write and read times from
   the job's own log and compile.json, and writes them as JSON.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time

from absl import flags, logging

from codi_jax import logging_utils, storage
from codi_jax.pretrained import architectures

_ARCH = flags.DEFINE_enum("arch", "sd15", list(architectures.PRESETS), "Architecture preset.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the random teacher, the run and its logs go.")
_RES = flags.DEFINE_integer("resolution", 256, "Pixel crop size (latents are 8x smaller).")
_STEPS = flags.DEFINE_integer("steps", 3, "Train steps of the first run (the second trains one more).")
_MODE = flags.DEFINE_enum("mode", "pe", ["pe", "full"], "codi.mode.")
_OUT = flags.DEFINE_string("out", "", "Write the figures as JSON here.")
_EXTRA = flags.DEFINE_list("extra", [], "More --config.x=y flags for the job.")

VOCAB_MERGES = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]


def write_tokenizer(path: str, model_max_length: int) -> dict:
    """A minimal valid CLIP BPE tokenizer folder (letters, the merges of 'cat' and 'dog', the special
    tokens); its vocab. The tests' tiny SD folders use it too."""
    path = str(path)
    os.makedirs(path, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces = ["<|startoftext|>", "<|endoftext|>"] + letters + [c + "</w>" for c in letters]
    pieces += [a + b for a, b in VOCAB_MERGES]
    vocab = {p: i for i, p in enumerate(pieces)}
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in VOCAB_MERGES))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": model_max_length}, f)
    return vocab


def write_random_folder(arch: str, path: str, seed: int = 0) -> str:
    """A diffusers-format folder of preset `arch` with random weights (safetensors)."""
    import diffusers
    import torch
    import transformers

    unet_d, vae_d, sched_d, (width, tokens), res = architectures.PRESETS[arch]
    torch.manual_seed(seed)
    diffusers.UNet2DConditionModel(**unet_d, sample_size=res // 8).save_pretrained(os.path.join(path, "unet"))
    diffusers.AutoencoderKL(**vae_d, sample_size=res).save_pretrained(os.path.join(path, "vae"))
    vocab = write_tokenizer(os.path.join(path, "tokenizer"), tokens)
    text_config = transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=12,
        num_attention_heads=width // 64, max_position_embeddings=tokens, hidden_act="quick_gelu",
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    transformers.CLIPTextModel(text_config).save_pretrained(os.path.join(path, "text_encoder"))
    diffusers.DDPMScheduler(**sched_d).save_pretrained(os.path.join(path, "scheduler"))
    index = {"_class_name": "StableDiffusionPipeline"}
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump(index, f)
    return path


def job_command(teacher: str, workdir: str, steps: int) -> list[str]:
    return [
        sys.executable, "-m", "codi_jax.main", "--config=configs/sr.py", f"--workdir={workdir}",
        f"--config.teacher.pretrained_path={teacher}", f"--config.data.crop_size={_RES.value}",
        f"--config.codi.mode={_MODE.value}", "--config.codi.train.batch_size=1",
        f"--config.codi.train.num_steps={steps}", "--config.codi.train.log_every=1",
        f"--config.codi.train.checkpoint_every={steps}", "--config.codi.train.warmup_steps=1",
        "--config.eval.num_examples=2", "--config.eval.batch_size=1", "--config.eval.grid_examples=2",
        "--config.eval.steps=(1,4)", "--config.eval.teacher_ddim_steps=0", "--config.eval.previews=False",
        "--config.mesh.ici=(1,1,1)", *[f"--config.{x}" for x in _EXTRA.value],
    ]  # fmt: skip


def _run(cmd, log_path: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    text = open(log_path).read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}); its log: {log_path}")
    return wall, text


def _floats(pattern: str, text: str) -> list[float]:
    return [float(m) for m in re.findall(pattern, text)]


def main(argv):
    del argv
    workdir = _WORKDIR.value
    if not workdir:
        raise ValueError("--workdir is required")
    os.makedirs(workdir, exist_ok=True)
    teacher = os.path.join(workdir, "teacher_random")
    t0 = time.perf_counter()
    if not os.path.isfile(os.path.join(teacher, "model_index.json")):
        write_random_folder(_ARCH.value, teacher)
    write_s = time.perf_counter() - t0
    run_dir = os.path.join(workdir, "run")
    report = {"arch": _ARCH.value, "resolution": _RES.value, "mode": _MODE.value, "date": time.strftime("%Y-%m-%d")}
    report["write_teacher_s"] = round(write_s, 1)
    for name, steps in (("first", _STEPS.value), ("resumed", _STEPS.value + 1)):
        logging.info("%s run: %d steps (log in %s)", name, steps, workdir)
        wall, text = _run(job_command(teacher, run_dir, steps), os.path.join(workdir, f"{name}.log"))
        speeds = _floats(r"codi step \d+/\d+ \([\d.]+%\) \| ([\d.]+) steps/s", text)
        report[name] = {
            "wall_s": round(wall, 1),
            "peak_rss_gib_so_far": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2),
            "compile_s": _floats(r"codi: compiled in ([\d.]+) s", text),
            "step_s": [round(1 / s, 2) for s in speeds if s > 0],
            "checkpoint_save_blocking_s": _floats(
                r"codi: checkpoint step \d+: training resumed after ([\d.]+) s", text
            ),
            "checkpoint_wait_s": _floats(r"codi: checkpoint writes finished \(waited ([\d.]+) s", text),
            "restore_s": _floats(r"codi: resumed from step \d+ \(.*?\) in ([\d.]+) s", text),
            "eval_s": _floats(r'"eval_s": ([\d.]+)', open(os.path.join(run_dir, "metrics.json")).read()),
        }
        print(json.dumps({name: report[name]}), flush=True)
    sizes = [os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(run_dir, "codi")) for f in fs]
    report["codi_stage_bytes"] = sum(sizes)
    report["metrics"] = json.load(open(os.path.join(run_dir, "metrics.json")))["metrics"]
    if _OUT.value:
        storage.write_json(_OUT.value, report)
    print(json.dumps(report))


if __name__ == "__main__":
    logging_utils.run_cli(main)
