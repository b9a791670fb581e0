"""The paper's super-resolution comparisons at tiny scale (`python -m codi_jax.reproduce`).

Every run is `configs/sr.py:<base>` plus the overrides below, trained from one shared pretrained
teacher (the paper's Stable Diffusion: every method starts from the same pretrained model), once
per seed. Runs marked `needs_finetune` start from the same seed's `finetune` run (two-stage
baselines: finetune, then distil).

Sections: 'table2' (Table 2, SR rows), 'table3' (Table 3: the distillation process),
'fig7' (Fig. 7: pretraining, sampling of t), 'dx' (the d_x alternatives of sec 4.3).
"""

import ml_collections as mlc

FINETUNE_STEPS = (4, 8, 20, 50)
FEW_STEPS = (1, 2, 4)


def _run(name, label, section, overrides, needs_finetune=False):
    # overrides: (dotted config key, value) pairs (ConfigDict keys cannot hold dots)
    return mlc.ConfigDict(
        dict(name=name, label=label, section=section, overrides=tuple(overrides.items()), needs_finetune=needs_finetune)
    )


def runs():
    cm = {"codi.init": "finetuned", "codi.consistency_space": "x", "codi.guidance_weight": 0.0}
    return [
        # Table 2: the finetuned model with DDIM at 4-50 steps and DPM-Solver++(2M), the two-stage
        # distillations of it (GD-II, CM-II frozen / not), PE-CoDi and CoDi.
        _run(
            "finetune",
            "Finetuned",
            "table2",
            {"method": "finetune", "eval.steps": FINETUNE_STEPS, "eval.samplers": ("deterministic", "dpmpp_2m")},
        ),
        _run("gd", "GD-II", "table2", {"method": "gd", "eval.steps": (4,)}, needs_finetune=True),
        _run(
            "cm_frozen", "CM-II (frozen)", "table2", dict(cm, **{"codi.zs_predictor": "teacher"}), needs_finetune=True
        ),
        _run("cm", "CM-II", "table2", dict(cm, **{"codi.zs_predictor": "ddim"}), needs_finetune=True),
        _run("pe_codi", "PE-CoDi", "table2", {"codi.mode": "pe"}),
        _run("codi", "CoDi", "table2", {}),
        # Table 3: without the distilled PF-ODE (the frozen pretrained teacher's step, as consistency
        # models do), without noise-space consistency (consistency on x instead), without guidance.
        _run("no_pf_ode", "- distilling PF-ODE (frozen teacher step)", "table3", {"codi.zs_predictor": "teacher"}),
        _run(
            "no_noise_consistency",
            "- noise consistency (x-space consistency)",
            "table3",
            {"codi.consistency_space": "x"},
        ),
        _run("no_guidance", "- conditional guidance (lambda = 0)", "table3", {"codi.guidance_weight": 0.0}),
        # Fig. 7: random initialisation; one t per batch (the paper's CoDi) instead of per sample (the
        # tiny recipe's, and the consistency-model baselines' protocol).
        _run("random_init", "random initialisation", "fig7", {"codi.init": "random"}),
        _run("t_per_batch", "one t per batch (the paper's choice)", "fig7", {"codi.t_per_sample": False}),
        # d_x alternatives (eq 15): pseudo-Huber instead of l2.
        _run("dx_huber", "d_x pseudo-Huber", "dx", {"codi.d_x": "pseudo_huber"}),
    ]


def get_config(variant="tiny"):
    """variant: 'tiny' (the README's embedded-data recipe) or 'smoke' (the end-to-end test)."""
    if variant not in ("tiny", "smoke"):
        raise ValueError(f"unknown variant {variant!r} of configs/repro.py; use 'tiny' or 'smoke'")
    config = mlc.ConfigDict()
    config.base = f"configs/sr.py:{variant}"
    config.seeds = (0, 1, 2)  # training seeds (the evaluation crops and sampler noise stay fixed)
    config.few_steps = FEW_STEPS  # step counts of the distilled models
    config.runs = runs()
    # (dotted config key, value) pairs applied to every run and the shared teacher before each run's own
    # overrides: the comparison on your own images, e.g.
    #   --config.common="(('data.source', 'folder'), ('data.folder', '/my/images'))"
    config.common = ()
    if variant == "smoke":
        config.seeds = (0,)
        config.few_steps = (1, 2)
        for r in config.runs:
            r.overrides = tuple((k, ((2,) if k == "eval.steps" else v)) for k, v in r.overrides)
    return config
