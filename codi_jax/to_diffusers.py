"""A finished run's distilled weights as diffusers folders.

    python -m codi_jax.to_diffusers --run=RUN_DIR --out=OUT [--dtype=float16]

OUT/unet/ is the distilled backbone as a `UNet2DConditionModel`; the adapter goes beside it as
OUT/controlnet/ (a `ControlNetModel`, residual fusion) or OUT/adapter_mix.safetensors (eq 12's mix
fusion, which no diffusers class computes; codi_jax/pretrained/export.py says why). A pixel-space run's
U-Net has no text cross-attention: it goes out with zero attn2 layers, so any `encoder_hidden_states`
of width 1 gives its outputs. A latent run's OUT also gets the teacher folder's other components
(vae/, text_encoder/, tokenizer/, scheduler/, model_index.json), so that OUT is a whole pipeline folder.

OUT/codi_jax.json says how the weights sample as they did here: the network's prediction type, the
noise schedule, CoDi's boundary scalings (eq 17: the consistency function wraps the network; a
diffusers scheduler does not), the step counts and metrics of the run's own evaluation, and the run.
RUN_DIR and OUT may be local folders or gs:// URLs.
"""

from __future__ import annotations

import tempfile

import numpy as np
from absl import flags, logging

from codi_jax import build, logging_utils, runs, storage
from codi_jax.pretrained import export

INFO_FILE = "codi_jax.json"
TEACHER_PARTS = ("vae", "text_encoder", "tokenizer", "scheduler", "model_index.json")  # copied from a latent teacher


def export_run(run_dir: str, out: str, dtype: str = "float32") -> dict:
    """Write the run's final EMA weights to `out` (see the module docstring); returns codi_jax.json's contents."""
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"--dtype={dtype!r} must be float32, float16 or bfloat16")
    if storage.listdir(out):
        raise FileExistsError(f"--out={out!r} exists and is not empty; choose a new folder")
    config = runs.read_run_config(run_dir)
    with tempfile.TemporaryDirectory(prefix="codi_to_diffusers_") as scratch:  # the build's caches
        model = build.build_model(config, scratch)
    params, _, step = runs.restore_final(model.config, run_dir, model=model)
    cfg = model.config
    np_dtype = {"float32": np.float32, "float16": np.float16}.get(dtype) or _bfloat16()
    side = model.space.shape[0]  # the U-Net's input side: the crop, in latents for a latent run
    written = export.export_diffusers(out, cfg.model.unet, params, cfg.model.adapter, sample_size=side, dtype=np_dtype)
    if cfg.teacher.pretrained_path:
        for part in TEACHER_PARTS:
            src = storage.join(cfg.teacher.pretrained_path, part)
            if storage.isdir(src):
                storage.copy_tree(src, storage.join(out, part))
            elif storage.isfile(src):
                storage.copy(src, storage.join(out, part))
    metrics_file = storage.join(run_dir, "metrics.json")
    metrics = storage.read_json(metrics_file)["metrics"] if storage.isfile(metrics_file) else {}
    info = dict(
        run=storage.absolute(run_dir),
        step=int(step),
        task=cfg.task,
        method=cfg.method,
        components={k: storage.basename(v) for k, v in written.items()},
        teacher_components=[p for p in TEACHER_PARTS if storage.exists(storage.join(out, p))],
        dtype=dtype,
        prediction=cfg.model.prediction,
        schedule=cfg.schedule.to_dict(),
        consistency_boundary=cfg.codi.boundary.to_dict() if cfg.method == "codi" else None,
        adapter=dict(cfg.model.adapter.to_dict()),
        encoder_hidden_states_width=cfg.model.unet.cross_attention_dim or export.NO_TEXT_CONTEXT_DIM,
        sample_size=int(side),
        evaluated=metrics,
    )
    storage.write_json(storage.join(out, INFO_FILE), info)
    logging.info("to_diffusers: step %d of %s -> %s (%s)", step, run_dir, out, ", ".join(sorted(written)))
    return info


def _bfloat16():
    import ml_dtypes

    return ml_dtypes.bfloat16


def define_flags() -> None:
    flags.DEFINE_string("run", None, "Workdir of a finished run (local or gs://).")
    flags.DEFINE_string("out", None, "A new folder for the diffusers folders (local or gs://).")
    flags.DEFINE_enum("dtype", "float32", ("float32", "float16", "bfloat16"), "Weights' dtype in the files.")
    flags.mark_flags_as_required(["run", "out"])


def main(argv):
    del argv
    logging.set_verbosity(logging.INFO)
    info = export_run(flags.FLAGS.run, flags.FLAGS.out, flags.FLAGS.dtype)
    print(
        f"to_diffusers: {', '.join(info['components'].values())} in {flags.FLAGS.out} ({INFO_FILE} says how to sample)"
    )


if __name__ == "__main__":
    define_flags()
    logging_utils.run_cli(main)
