"""A training data reader in its own process, for tests/test_prepare.py.

python tests/data_worker.py ids DATA_JSON PROCESS_INDEX PROCESS_COUNT NUM_BATCHES OUT.json
    the record ids (an image's constant pixel value) of this process's first NUM_BATCHES batches
python tests/data_worker.py crash DATA_JSON CKPT_DIR NUM_BATCHES OUT.json
    read NUM_BATCHES batches, checkpoint the iterator with Orbax as training does, then die (os._exit)
python tests/data_worker.py resume DATA_JSON CKPT_DIR NUM_BATCHES OUT.json
    restore that checkpoint and read NUM_BATCHES more
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GLOBAL_BATCH = 8


def _config(data_json):
    from configs import data as data_configs

    c = data_configs.get_data_config()
    c.update(json.loads(data_json))
    return c


def _ids(batch):
    """The id of each example: the images are constant, value 10 * id + 5 (signed to [-1, 1] here)."""
    px = (batch["image"][:, 0, 0, 0] + 1.0) / 2.0 * 255.0
    return [int(round((v - 5) / 10)) for v in px]


def _iterator(c, index=0, count=1):
    from codi_jax.data import pipeline

    return pipeline.make_train_iterator(
        c, task="uncond", global_batch_size=GLOBAL_BATCH, seed=3, process_index=index, process_count=count
    )


def _manager(path):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(path, item_names=("data_iter",))


def main():
    mode, data_json = sys.argv[1], sys.argv[2]
    c = _config(data_json)
    if mode == "ids":
        index, count, n, out = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
        it = _iterator(c, index, count)
        ids = [i for _ in range(n) for i in _ids(next(it))]
        with open(out, "w") as f:
            json.dump({"ids": ids, "skipped": it.skipped_records}, f)
        return
    import grain
    import orbax.checkpoint as ocp

    ckpt, n, out = sys.argv[3], int(sys.argv[4]), sys.argv[5]
    it = _iterator(c)
    mgr = _manager(ckpt)
    if mode == "resume":
        step = mgr.latest_step()
        mgr.restore(step, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(it)))
    ids = [i for _ in range(n) for i in _ids(next(it))]
    with open(out, "w") as f:
        json.dump({"ids": ids, "skipped": it.skipped_records}, f)
    if mode == "crash":
        mgr.save(n, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
        mgr.wait_until_finished()
        os._exit(9)  # no clean shutdown: what a preempted host does


if __name__ == "__main__":
    main()
