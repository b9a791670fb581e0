import os

# Tests run on the CPU; keep XLA from grabbing every core for intra-op threads twice over.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile many small programs and run each a few times: XLA's CPU backend at -O0 compiles
# them about twice as fast (measured: a tiny U-Net test 32 s -> 17 s). Subprocesses inherit it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

# gcsfs, imported on the first gs:// path, reads this once: no gRPC probe of each bucket (~60 s against
# the tests' local GCS emulator, tests/gcs.py).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

# Many tests compile the same small programs, in this process and in the jobs they start (whose
# compilation_cache_dir='auto' follows this variable): one persistent cache shares the work.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".jax_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def pytest_configure(config):
    config.addinivalue_line("markers", "heavy(seconds): a long test (its rough in-suite time), scheduled first")


def pytest_collection_modifyitems(session, config, items):
    """Run the long tests first: with `-n 2` a long test collected last would run alone at the end
    while the other worker idles (the files' alphabetical order put the longest there). setup.cfg's
    `--dist loadgroup` hands tests out one at a time in this order (xdist's default `load` gives each
    worker a contiguous block first: all the long tests would land on one worker). A module-scoped
    fixture is built once per worker that runs one of its tests: keep the tests of a costly one in
    one test function (xdist_group marks would not help: xdist 3.8's grouping is inert under pytest 9)."""

    def cost(item):
        mark = item.get_closest_marker("heavy")
        return -(mark.args[0] if mark and mark.args else 0)

    items.sort(key=cost)  # stable: everything else keeps its order
