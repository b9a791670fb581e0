"""The batch evaluation job: a finished run's checkpoint and a data split in; metrics, grids and
plots out (`codi_jax/evaluation/job.py`).

  python -m codi_jax.main --config=configs/eval.py --config.checkpoint=RUN_WORKDIR --workdir=OUT
  # split over 4 hosts or jobs (each takes every 4th (sampler, steps) entry; any may finish the summary):
  python -m codi_jax.main --config=configs/eval.py --config.checkpoint=RUN --workdir=OUT \
      --config.shard=0 --config.num_shards=4

Resumable: each (sampler, steps) entry is written on its own and skipped when present.
"""

import ml_collections as mlc


def get_config():
    return mlc.ConfigDict(
        dict(
            job="eval",
            checkpoint="",  # a run's WORKDIR (its config.json and the method's final stage checkpoints)
            method="",  # '' = the run's; else the method the checkpoint must have been trained with
            split="eval",  # data split: 'eval' (held-out images) or 'train'
            samplers=("deterministic", "dpmpp_2m"),  # each of 'deterministic' | 'stochastic' | 'dpmpp_2m'
            steps=(1, 2, 4, 8),  # step counts; every sampler x every count is one entry
            num_examples=0,  # crops evaluated (0: the run's eval.num_examples); crops cycle over the images
            min_images=1,  # fail if the split has fewer distinct images than this
            batch_size=16,
            seed=-1,  # crops and sampler noise (-1: the run's eval.seed, same crops as its metrics.json)
            grid_examples=8,
            fid_weights="",  # pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or .safetensors): adds 'fid'
            lpips_weights="",  # 'alexnet-owt-7be5be79.pth,<lpips package>/weights/v0.1/alex.pth': adds 'lpips'
            clip_model="",  # a local transformers CLIPModel folder: adds 'clip_score' for tasks with prompts
            guidance_scale=-1.0,  # tasks with prompts: classifier-free guidance weight (-1: the run's text.guidance_scale)
            shard=0,  # this job's index in [0, num_shards)
            num_shards=1,
            compilation_cache_dir="auto",  # as configs/common.py: 'auto' = $JAX_COMPILATION_CACHE_DIR or WORKDIR/../.jax_cache
        )
    )
