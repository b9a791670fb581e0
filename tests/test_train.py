"""Train loop: exact resumption after a crash, and a non-finite loss stops with the last good checkpoint kept."""

import functools
import json
import os

import jax
import numpy as np
import pytest

from codi_jax import logging_utils, sharding, train
from codi_jax.data import pipeline
from codi_jax.methods import base, pretrain
from tests import helpers


def _teacher_stage(config, workdir, num_steps, seen=None, on_state=None):
    """The teacher stage of the smoke config; `seen` (a list) gets, per init_fn call, the params it
    returned when called concretely, or None when traced."""
    denoiser = helpers.denoisers(config)[0]  # the diffusion model
    module = denoiser.module
    tcfg = config.pretrain
    tcfg.update(num_steps=num_steps, checkpoint_every=2, log_every=1, batch_size=4)

    def init_fn(rng):
        params = {"unet": base.init_model_params(module, config.model, rng, config.data.crop_size)["unet"]}
        if seen is not None:
            seen.append(None if isinstance(rng, jax.core.Tracer) else params)
        return params, {}

    return train.run_stage(
        on_state=on_state,
        name="teacher",
        workdir=workdir,
        tcfg=tcfg,
        loss_fn=functools.partial(pretrain.diffusion_loss, denoiser=denoiser, use_cond=False),
        init_fn=init_fn,
        data_cfg=config.data,
        task="uncond",
        seed=0,
        mesh=sharding.make_mesh(config.mesh),
    )


def _params(state):
    return jax.tree_util.tree_map(np.asarray, {k: state[k] for k in ("params", "ema_params", "opt_state", "step")})


@pytest.mark.heavy(50)
def test_interrupted_then_resumed_run_ends_with_the_same_params(tmp_path, monkeypatch):
    config = helpers.smoke_config()
    straight = _params(_teacher_stage(config, str(tmp_path / "a"), 3))

    # Crash right after step 3 ran (the last checkpoint is step 2), as a preemption would.
    real_update = logging_utils.Progress.update

    def crash_at_3(self, step, **kw):
        if step == 3:
            raise KeyboardInterrupt("preempted")
        return real_update(self, step, **kw)

    monkeypatch.setattr(logging_utils.Progress, "update", crash_at_3)
    with pytest.raises(KeyboardInterrupt):
        _teacher_stage(config, str(tmp_path / "b"), 3)
    monkeypatch.setattr(logging_utils.Progress, "update", real_update)
    assert sorted(os.listdir(tmp_path / "b" / "teacher" / "checkpoints")) == ["2"]

    resumed = _params(_teacher_stage(config, str(tmp_path / "b"), 3))
    assert int(resumed["step"]) == 3
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed, straight)

    # Running the finished stage again restores it without training.
    again = _params(_teacher_stage(config, str(tmp_path / "b"), 3))
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, straight)

    # The stage's parameter table (clu.parameter_overview): every trained tensor, and their total.
    table = open(tmp_path / "b" / "teacher" / train.PARAMETER_TABLE).read()
    leaves = jax.tree_util.tree_leaves_with_path(straight["params"])
    assert len([ln for ln in table.splitlines() if ln.startswith("| unet/")]) == len(leaves)
    assert f"Total: {sum(x.size for _, x in leaves):,}" in table


def test_a_stage_takes_over_its_initial_arrays_and_a_resumed_one_builds_no_fresh_state(tmp_path):
    # What init_fn returns (a pretrained teacher) becomes the state's without a second copy: the
    # arrays are donated to it. A resumed stage restores into shapes: init_fn is only traced.
    config, seen, released = helpers.smoke_config(), [], []
    _teacher_stage(config, str(tmp_path), 2, seen, on_state=lambda: released.append(True))
    assert [p is None for p in seen] == [True, False] and released == [True]
    leaves = jax.tree_util.tree_leaves(seen[1])
    assert leaves and all(x.is_deleted() for x in leaves)

    seen.clear()
    state = _teacher_stage(config, str(tmp_path), 3, seen, on_state=lambda: released.append(True))
    assert seen == [None] and released == [True, True] and int(state["step"]) == 3


def test_a_logged_metric_is_the_mean_over_its_window_of_steps():
    steps = [{"loss": np.float32(v), "mu": np.float32(0.1 * i), "finite": True} for i, v in enumerate([4.0, 1.0, 2.5])]
    means = train.window_means(steps)
    assert means == pytest.approx({"loss": 2.5, "mu": 0.1})


class _PoisonedIterator:
    """Delegates to a real grain iterator, but the batch of step `bad_step` holds a NaN."""

    def __init__(self, it, bad_step):
        self._it, self._bad, self._n = it, bad_step, 0

    def __next__(self):
        batch = next(self._it)
        self._n += 1
        if self._n == self._bad:
            batch = dict(batch, image=batch["image"] * np.nan)
        return batch

    @property
    def skipped_records(self):
        return self._it.skipped_records

    # grain's checkpoint handler stores a non-grain iterator's state as bytes.
    def get_state(self):
        return json.dumps(self._it.get_state()).encode()

    def set_state(self, state):
        self._it.set_state(json.loads(state))


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    config = helpers.smoke_config()
    real = pipeline.make_train_iterator
    monkeypatch.setattr(pipeline, "make_train_iterator", lambda *a, **k: _PoisonedIterator(real(*a, **k), 3))
    with pytest.raises(train.NonFiniteLossError, match=r"non-finite loss at step 3.*step 2"):
        _teacher_stage(config, str(tmp_path), 6)
    ckpts = tmp_path / "teacher" / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["2"]
    monkeypatch.setattr(pipeline, "make_train_iterator", real)
    # The kept checkpoint is finite and resumable.
    state = _teacher_stage(config, str(tmp_path), 2)
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state["params"]))


def test_mu_learning_rate_multiplier_scales_only_mu():
    """`mu_lr_multiplier` multiplies mu's AdamW update and leaves every other parameter's alone."""
    params = {"adapter": {"mu": np.zeros((), np.float32), "w": np.ones((3,), np.float32)}}
    grads = {"adapter": {"mu": np.full((), -0.5, np.float32), "w": np.full((3,), -0.5, np.float32)}}
    updates = {}
    for mult in (1.0, 25.0):
        tcfg = helpers.smoke_config().codi.train
        tcfg.update(mu_lr_multiplier=mult, warmup_steps=1, lr=1e-3)
        tx, _ = train.make_optimizer(tcfg)
        _, opt_state = tx.update(grads, tx.init(params), params)  # step 0: warmup starts at lr 0
        updates[mult], _ = tx.update(grads, opt_state, params)
    np.testing.assert_allclose(updates[25.0]["adapter"]["mu"], 25.0 * updates[1.0]["adapter"]["mu"], rtol=1e-6)
    np.testing.assert_array_equal(updates[25.0]["adapter"]["w"], updates[1.0]["adapter"]["w"])
    assert float(updates[1.0]["adapter"]["mu"]) != 0.0


def test_ema_warmup_starts_short_and_reaches_the_configured_decay():
    assert float(train.ema_decay_at(0, 0.995, warmup=True)) == pytest.approx(0.1)
    assert float(train.ema_decay_at(90, 0.995, warmup=True)) == pytest.approx(0.91)
    assert float(train.ema_decay_at(100_000, 0.995, warmup=True)) == pytest.approx(0.995)
    assert float(train.ema_decay_at(0, 0.995, warmup=False)) == pytest.approx(0.995)  # Algorithm 1's constant gamma


def _one_codi_step(config, batch_size=4, **train_kw):
    """(loss, new state) of one jitted CoDi train step of the smoke model."""
    trainable, frozen, loss_fn, _ = helpers.codi_setup(config)
    batch = next(pipeline.make_train_iterator(config.data, task="sr", global_batch_size=batch_size, seed=0))
    tcfg = config.codi.train
    tcfg.update(warmup_steps=1, **train_kw)
    tx, sched = train.make_optimizer(tcfg)
    state = train.create_state(trainable, frozen, tx, jax.random.PRNGKey(0))
    step = jax.jit(train.make_train_step(loss_fn, tx, sched, tcfg.ema_decay, grad_accum_steps=tcfg.grad_accum_steps))
    state, m = step(state, batch)
    state, m2 = step(state, batch)  # the first step's learning rate is 0 (warmup): take two
    return (float(m["loss"]), float(m2["loss"])), jax.tree_util.tree_map(np.asarray, state)


@pytest.mark.heavy(70)
def test_gradient_accumulation_gives_the_whole_batch_update():
    """Per-example noise keys make 2 microbatches of 2 the same update as one batch of 4."""
    config = helpers.smoke_config()
    (l1a, l1b), whole = _one_codi_step(config, grad_accum_steps=1)
    (l2a, l2b), accum = _one_codi_step(config, grad_accum_steps=2)
    np.testing.assert_allclose([l2a, l2b], [l1a, l1b], rtol=1e-6)
    moved = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(jax.tree_util.tree_leaves(whole["params"]), jax.tree_util.tree_leaves(whole["ema_params"]))
    )
    assert moved > 1e-4
    for a, b in zip(jax.tree_util.tree_leaves(whole["params"]), jax.tree_util.tree_leaves(accum["params"])):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.heavy(45)
def test_bfloat16_compute_keeps_float32_master_params():
    """model.dtype='bfloat16': the forward runs in bf16, params, EMA and Adam moments stay float32,
    and the loss stays close to the float32 one on the same batch and noise."""
    # The float32 loss of the same first step: same params, batch and per-example keys, forward only.
    trainable, frozen, loss_fn, _ = helpers.codi_setup(helpers.smoke_config())
    batch = next(pipeline.make_train_iterator(helpers.smoke_config().data, task="sr", global_batch_size=4, seed=0))
    keys = jax.random.split(jax.random.split(jax.random.PRNGKey(0))[1], 4)  # as make_train_step splits state rng
    f32 = float(jax.jit(loss_fn)(trainable, frozen, trainable, batch, keys)[0])
    config = helpers.smoke_config()
    config.model.dtype = "bfloat16"
    (bf16, bf16_2), state = _one_codi_step(config)
    dtypes = {
        x.dtype
        for k in ("params", "ema_params", "opt_state")
        for x in jax.tree_util.tree_leaves(state[k])
        if np.issubdtype(x.dtype, np.floating)
    }
    assert dtypes == {np.dtype(np.float32)}
    assert np.isfinite(bf16_2)
    assert abs(bf16 - f32) < 0.03 * abs(f32), (bf16, f32)
    assert bf16 != f32  # the compute really ran in bfloat16


@pytest.mark.parametrize(
    "other,expected",
    [
        (
            {"params": {"unet": np.zeros((4, 3)), "adapter": np.zeros(2)}},
            r"\['params'\]\['unet'\] has shape \(3, 3\), this config's model \(4, 3\)",
        ),
        ({"params": {"adapter": np.zeros(2)}}, r"holds \['params'\]\['unet'\] that this config's model lacks"),
        (
            {"params": {"unet": np.zeros((3, 3)), "adapter": np.zeros(2), "mu": np.zeros(())}},
            r"lacks \['params'\]\['mu'\]",
        ),
    ],
)
def test_checkpoint_of_another_model_or_method_is_named(tmp_path, other, expected):
    """A full-mode state restored as PE (no 'unet' among params), another size, or a missing leaf."""
    tcfg = helpers.smoke_config().codi.train
    mgr = train.checkpoint_manager(str(tmp_path / "ck"), tcfg)
    import orbax.checkpoint as ocp

    mgr.save(
        3,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": {"unet": np.zeros((3, 3)), "adapter": np.zeros(2)}})
        ),
    )
    mgr.wait_until_finished()
    train.check_checkpoint_matches(mgr, 3, {"params": {"unet": np.zeros((3, 3)), "adapter": np.zeros(2)}})
    with pytest.raises(train.CheckpointMismatchError, match=expected):
        train.check_checkpoint_matches(mgr, 3, other)
    mgr.close()
