"""grain input pipelines for unconditional generation and super-resolution.

Training stream (global, identical for any process count):
  records -> shuffle (reseeded each epoch) -> repeat forever
  -> random_map(crop, flip, [USM, degrade]) with grain's per-index RNG
  -> process shard [process_index::process_count] -> drop and count corrupt records -> batch.
Because the random map runs before sharding, record i of the global stream is
the same no matter how many processes read it. Everything is lazy: a process decodes
only the records of its own shard, when the batch that holds them is made.

Batches are dicts of numpy arrays:
  'image': float32 [B, S, S, 3] in [-1, 1] (HR crop)
  'cond':  float32 [B, S, S, 3] in [-1, 1] (bicubic-upsampled LR; sr only)
  'lr':    float32 [B, S/scale, S/scale, 3] in [-1, 1] (degraded LR; sr only)
  'latent_mean', 'latent_logvar', 'context': float32, what the frozen encoders made of the image and the
           text, when the records carry them and the model uses them (`cache_fields`; docs/data.md)
The iterator's `skipped_records` is the count of corrupt records dropped since the stream began
(SkipAndBatch; part of the checkpointed state).
Tasks 'inpaint', 'depth' and 'edit' make their records in `codi_jax.data.tasks` (keys there).
"""

from __future__ import annotations

import grain
import numpy as np
from absl import logging

from codi_jax.data import catalog, degradation, sources, tasks

TASKS = ("uncond", "sr", "inpaint", "depth", "edit")
_MIN_SHUFFLE_LEN = 1 << 16  # performance constant, see make_train_dataset


def to_signed(img: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] or float [0, 1] -> float32 [-1, 1]."""
    x = np.asarray(img, np.float32)
    if np.asarray(img).dtype == np.uint8:
        x = x / 255.0
    return np.clip(x * 2.0 - 1.0, -1.0, 1.0)


def random_crop(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Random size x size crop; images smaller than that are upscaled first."""
    h, w = img.shape[:2]
    if min(h, w) < size:  # only possible with tiny folder images
        f = size / min(h, w)
        img = degradation.bicubic_upsample(img, (max(size, round(h * f)), max(size, round(w * f))))
        h, w = img.shape[:2]
    y = int(rng.integers(h - size + 1))
    x = int(rng.integers(w - size + 1))
    return img[y : y + size, x : x + size]


def _check(data_config, task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}.")
    if task == "sr" and data_config.crop_size % data_config.sr_scale:
        raise ValueError(
            f"data.crop_size={data_config.crop_size} must be divisible by data.sr_scale={data_config.sr_scale}."
        )


def make_example(
    img: np.ndarray,
    rng: np.random.Generator,
    *,
    task: str,
    crop_size: int,
    flip: bool,
    sr_scale: int = 4,
    deg_config=None,
    usm_config=None,
    data_config=None,
    prompt_of=None,
) -> dict[str, np.ndarray]:
    """One record: crop (+flip) and, for 'sr', USM + degradation + condition;
    the other tasks' records from `tasks.MAKERS` (they read `data_config`), or
    from a paired dataset's record (a dict: `codi_jax.data.paired`)."""
    if isinstance(img, sources.Corrupt):
        return img  # dropped and counted by SkipAndBatch
    if isinstance(img, dict) and "cache" in img:
        # A cached record (records.RecordSource): its pixels are the cached crop (side crop_size, so the
        # crop below takes all of it), its cache arrays ride along to the step.
        kw = dict(task=task, crop_size=crop_size, flip=False, sr_scale=sr_scale, deg_config=deg_config)
        kw.update(usm_config=usm_config, data_config=data_config, prompt_of=prompt_of)
        return dict(make_example(img["pixels"], rng, **kw), **img["cache"])
    if isinstance(img, dict):
        return tasks.make_paired_example(img, rng, task=task, crop_size=crop_size, flip=flip, prompt_of=prompt_of)
    crop = random_crop(img, crop_size, rng)
    if flip and rng.random() < 0.5:
        crop = crop[:, ::-1]
    if task == "uncond":
        return {"image": to_signed(crop)}
    if task in tasks.MAKERS:
        return tasks.MAKERS[task](np.ascontiguousarray(crop), rng, data_config)
    hr = crop.astype(np.float32) / 255.0
    if usm_config is not None:
        # Real-ESRGAN degrades and supervises with the sharpened GT.
        hr = degradation.usm_sharpen_from_config(hr, usm_config)
    lr = degradation.degrade(hr, deg_config, scale=sr_scale, rng=rng)
    cond = degradation.bicubic_upsample(lr, crop_size)
    return {"image": to_signed(hr), "cond": to_signed(cond), "lr": to_signed(lr)}


_THREADS_LIMITED = False


def _limit_worker_threads(n: int) -> None:
    """In a grain worker process, cap BLAS/OpenMP threads at `n` (data.worker_threads) once: N workers with
    a thread per core each would oversubscribe the cores (measured on 2 cores: 2 workers gave 4.0
    images/s at 512 px with default threads against 6.6 in one process; docs/benchmarks.md)."""
    global _THREADS_LIMITED
    if _THREADS_LIMITED or n <= 0:
        return
    import multiprocessing

    if multiprocessing.parent_process() is not None:
        import threadpoolctl

        threadpoolctl.threadpool_limits(n)
    _THREADS_LIMITED = True


class PromptIndex:
    """A record's text -> its index in the task's prompt list (`tasks.prompts`), the row of the prompt
    table; the list is read on first use (in each worker process). Picklable."""

    def __init__(self, data_config, task: str):
        self.data_config, self.task = data_config, task
        self._index = None

    def __call__(self, text: str) -> np.ndarray:
        if self._index is None:
            self._index = {p: i for i, p in enumerate(tasks.prompts(self.data_config, self.task))}
        if text not in self._index:
            raise ValueError(f"text {text[:80]!r} is not in the dataset's prompt list")
        return np.int32(self._index[text])

    def __getstate__(self):
        return {"data_config": self.data_config, "task": self.task, "_index": None}


class _TrainTransform:
    """Picklable random-map callable (needed when worker_count > 0). `prompt_fn` turns a record's text
    into its 'prompt': an index into the prompt table (default, PromptIndex) or the text's tokens for
    a text encoder run in the step (`pretrained.text_encoder.Tokenize`)."""

    def __init__(self, data_config, task: str, prompt_fn=None):
        self.task = task
        self.crop_size = int(data_config.crop_size)
        self.flip = bool(data_config.random_flip)
        self.sr_scale = int(data_config.sr_scale)
        self.deg = data_config.degradation
        self.usm = data_config.usm if data_config.usm_sharpen_gt else None
        self.data_config = data_config
        self.prompt_of = prompt_fn or PromptIndex(data_config, task)
        self.worker_threads = int(data_config.worker_threads)

    def __call__(self, img: np.ndarray, rng: np.random.Generator):
        _limit_worker_threads(self.worker_threads)
        return make_example(
            img,
            rng,
            task=self.task,
            crop_size=self.crop_size,
            flip=self.flip,
            sr_scale=self.sr_scale,
            deg_config=self.deg,
            usm_config=self.usm,
            data_config=self.data_config,
            prompt_of=self.prompt_of,
        )

    def __repr__(self) -> str:
        return f"_TrainTransform(task={self.task!r})"


SKIPPED = "skipped_records"
_MIN_RECORDS_BEFORE_GIVING_UP = 100  # corrupt records seen before max_skipped_fraction is enforced


class SkipAndBatch(grain.IterDataset):
    """Batches of `batch_size` examples; `sources.Corrupt` markers (records that did not decode) are
    dropped, logged and counted. Each batch carries the count so far under SKIPPED; the count is part
    of the iterator's state, so it survives a checkpoint. More than `max_fraction` of the records
    corrupt (after the first hundred) stops the run: the data, not a few files, is broken.
    (The count rides in the batch through grain's worker processes; TrainIterator takes it off.)"""

    def __init__(self, parent: grain.IterDataset, batch_size: int, max_fraction: float, what: str):
        super().__init__(parent)
        self.batch_size, self.max_fraction, self.what = int(batch_size), float(max_fraction), what

    def __iter__(self):
        return _SkipAndBatchIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return f"SkipAndBatch(batch_size={self.batch_size})"


class _SkipAndBatchIterator(grain.DatasetIterator):
    def __init__(self, parent, spec: SkipAndBatch):
        super().__init__(parent)
        self._spec = spec
        self._seen = 0
        self._skipped = 0

    def __next__(self):
        examples = []
        while len(examples) < self._spec.batch_size:
            e = next(self._parent)
            self._seen += 1
            if isinstance(e, sources.Corrupt):
                self._skipped += 1
                if self._skipped <= 10 or self._skipped % 1000 == 0:
                    logging.warning("skipped corrupt record %s (%s); %d so far", e.key, e.reason, self._skipped)
                if self._seen >= _MIN_RECORDS_BEFORE_GIVING_UP and self._skipped > self._spec.max_fraction * self._seen:
                    raise ValueError(
                        f"{self._skipped} of {self._seen} records of {self._spec.what} do not decode, more than "
                        f"config data.max_skipped_fraction={self._spec.max_fraction} (last: {e.key}: {e.reason})"
                    )
                continue
            examples.append(e)
        batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
        batch[SKIPPED] = np.int64(self._skipped)
        return batch

    def get_state(self):
        return {"parent": self._parent.get_state(), "seen": self._seen, "skipped": self._skipped}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._seen, self._skipped = int(state["seen"]), int(state["skipped"])


class TrainIterator(grain.DatasetIterator):
    """The training batches, arrays only; `skipped_records` is the corrupt records dropped so far."""

    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self.skipped_records = 0

    def __next__(self) -> dict:
        batch = dict(next(self._parent))
        self.skipped_records = int(batch.pop(SKIPPED))
        return batch

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


def make_train_dataset(
    data_config,
    *,
    task: str,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    prompt_fn=None,
    cache_fields: tuple = (),
) -> grain.IterDataset:
    """The training IterDataset behind `make_train_iterator`."""
    _check(data_config, task)
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} is not divisible by process_count={process_count}.")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count}).")
    sources.check_disjoint(data_config)
    src = catalog.make_source(data_config, "train", task, cache_fields=cache_fields)
    logging.info("training data: %d records of %r", len(src), src)
    # grain's index_shuffle costs ~32768/n us per element (2.7 ms for n=12),
    # so shuffle blocks of >= 2**16 records (k copies of the images, each
    # image exactly k times per block) and repeat the block forever.
    copies = -(-_MIN_SHUFFLE_LEN // len(src))
    ds = grain.MapDataset.source(src).repeat(copies).seed(seed).shuffle()
    ds = ds.repeat()
    ds = ds.random_map(_TrainTransform(data_config, task, prompt_fn))
    ds = ds[process_index::process_count]
    per_process = global_batch_size // process_count
    # Bounded prefetch: grain's default (16 threads x 500 elements) would
    # compute hundreds of batches ahead and starve the training step.
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(
            num_threads=int(data_config.read_threads),
            prefetch_buffer_size=int(data_config.prefetch_batches) * per_process,
        )
    )
    it_ds = SkipAndBatch(it_ds, per_process, data_config.max_skipped_fraction, repr(src))
    workers = int(data_config.worker_count)
    if workers > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return it_ds


def make_train_iterator(
    data_config,
    *,
    task: str,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    prompt_fn=None,
    cache_fields: tuple = (),
) -> grain.DatasetIterator:
    """Infinite, checkpointable iterator over this process's training batches.

    Yields dicts with leading dim global_batch_size // process_count (see the
    module docstring for keys). Deterministic given `seed`; supports
    `get_state()` / `set_state()` and grain's orbax CheckpointSave/Restore. `cache_fields`: what of the
    records' cache the batches carry (build.cache_fields; source 'array_record' only).
    """
    return TrainIterator(
        iter(
            make_train_dataset(
                data_config,
                task=task,
                global_batch_size=global_batch_size,
                seed=seed,
                process_index=process_index,
                process_count=process_count,
                prompt_fn=prompt_fn,
                cache_fields=cache_fields,
            )
        )
    )


def _decodable(src, n: int) -> list:
    """The first n records of `src` that decode (all of them, if fewer), in order; corrupt ones logged."""
    out = []
    for i in range(len(src)):
        r = src[i]
        if isinstance(r, sources.Corrupt):
            logging.warning("eval: skipped corrupt record %s (%s)", r.key, r.reason)
            continue
        out.append(r)
        if len(out) == n:
            break
    if not out:
        raise ValueError(f"no record of the eval split decodes ({src!r})")
    return out


def make_eval_batch(
    data_config,
    *,
    task: str,
    num_examples: int,
    seed: int,
    split: str = "eval",
    min_images: int = 1,
    prompt_fn=None,
) -> dict[str, np.ndarray]:
    """Fixed batch from the held-out eval images (or `split`'s; same keys as training).

    Example i uses eval image i % N, a crop position and degradation drawn from
    a Generator seeded by (seed, i), no flip, `data.eval_degradation`, and USM
    only if `data.eval_usm_sharpen_gt`.
    """
    _check(data_config, task)
    sources.check_disjoint(data_config)
    src = catalog.make_source(data_config, split, task)
    if len(src) < max(min_images, 1):
        raise ValueError(
            f"data split {split!r} has {len(src)} images; at least {max(min_images, 1)} asked (eval min_images)"
        )
    usm = data_config.usm if data_config.eval_usm_sharpen_gt else None
    records_ = _decodable(src, num_examples)
    examples = []
    for i in range(num_examples):
        rng = np.random.default_rng([seed, i])
        examples.append(
            make_example(
                records_[i % len(records_)],
                rng,
                task=task,
                crop_size=data_config.crop_size,
                flip=False,
                sr_scale=data_config.sr_scale,
                deg_config=data_config.eval_degradation,
                usm_config=usm,
                data_config=data_config,
                prompt_of=prompt_fn or PromptIndex(data_config, task),
            )
        )
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}
