"""
What the test files share: where the repository and the offline data are, running the scripts as
a user does (in a subprocess, on the CPU, offline, with a compilation cache of the test session's
own), the model's logits, file hashes, and the test order.

$ python -m pytest -q                          # the whole suite, the slowest modules first
$ python -m pytest -q --order=reverse          # modules, and the tests of each, in reverse order
$ python -m pytest -q --order=shuffle:7        # shuffled with seed 7
"""
import contextlib
import csv
import functools
import hashlib
import os
import random
import socket
import subprocess
import sys

import pytest

import host_memory

REPO = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get('NANOGPT_SHARED_DATA', os.path.join(REPO, '..', 'shared', 'data'))
SHAKESPEARE = os.path.join(SHARED, 'tinyshakespeare', 'input.txt')
TIKTOKEN_CACHE = os.path.join(SHARED, 'tiktoken_cache')
NANOGPT_DIR = os.path.join(REPO, '..', 'shared', 'reference', 'nanogpt')  # nanoGPT's model.py
needs_shakespeare = pytest.mark.skipif(not os.path.exists(SHAKESPEARE),
                                       reason=f"offline data not found at {SHARED} (set NANOGPT_SHARED_DATA)")

# XLA compiles the tests' programs, in this process and in the scripts they run, with its backend
# optimizations off and, where its CPU backend still has them, its older fusion emitters: the
# numbers the tests check, compiled in a third of the time (speed is bench_jax.py's concern)
FAST_COMPILE = ['--xla_backend_optimization_level=0', '--xla_llvm_disable_expensive_passes=true']
OLD_EMITTERS = '--xla_cpu_use_fusion_emitters=false'  # jaxlib 0.10 has it; XLA rejects it in jax 0.12


def fast_compile_flags():
    """XLA_FLAGS with FAST_COMPILE, and OLD_EMITTERS if this XLA accepts it (the workers of
    pytest-xdist inherit them from the main process)."""
    flags = os.environ.get('XLA_FLAGS', '')
    if FAST_COMPILE[0] in flags:  # set by the main process
        return flags
    flags = ' '.join([flags] + FAST_COMPILE).strip()
    probe = subprocess.run([sys.executable, '-c', 'import jax; jax.devices()'], capture_output=True,
                           env=dict(os.environ, XLA_FLAGS=f'{flags} {OLD_EMITTERS}', JAX_PLATFORMS='cpu'))
    return f'{flags} {OLD_EMITTERS}' if probe.returncode == 0 else flags


os.environ['XLA_FLAGS'] = fast_compile_flags()
# the suite runs on the CPU, also where the GPU and TPU compilers are installed (requirements_compile.txt)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')


def cpu_devices(n):
    """XLA_FLAGS that make n JAX devices of the CPU, for a script run by a test."""
    return f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={n}"


# -----------------------------------------------------------------------------
# running the scripts

@pytest.fixture(scope='session')
def script_env(tmp_path_factory):
    """The environment of the scripts the tests run: the CPU, offline, unbuffered output, and one
    compilation cache for the session, in a temporary folder, so that the same small models compile
    once (tests of the cache itself bring their own). The project's modules are compiled to bytecode
    once, not at each of the suite's ~170 script starts (0.17 s each), whatever PYTHONDONTWRITEBYTECODE
    the machine sets. glibc's huge pages are set from the start, as host_memory.use_huge_pages would
    set them, without the restart (test_host_memory.py tests that)."""
    environ = {k: v for k, v in os.environ.items() if k != 'PYTHONDONTWRITEBYTECODE'}
    return dict(environ, GLIBC_TUNABLES=host_memory.HUGE_PAGES, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
                TIKTOKEN_CACHE_DIR=TIKTOKEN_CACHE, HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', WANDB_MODE='offline',
                JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp('jax_cache')),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')


def start_script(script, args, env, cwd=REPO, stdout=subprocess.PIPE, stdin=None):
    """The script running in a subprocess, its output read as text (its input written as text, with
    stdin=subprocess.PIPE)."""
    return subprocess.Popen([sys.executable, os.path.join(REPO, script)] + list(args), cwd=cwd, env=env, text=True,
                            stdin=stdin, stdout=stdout, stderr=subprocess.PIPE)


def run_script(script, args, env, cwd=REPO, check=True, timeout=300):
    """The script run to its end: the subprocess.CompletedProcess; with check, it must succeed."""
    p = subprocess.run([sys.executable, os.path.join(REPO, script)] + list(args), cwd=cwd, env=env, text=True,
                       capture_output=True, timeout=timeout)
    if check:
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


@contextlib.contextmanager
def reserved_port():
    """A free TCP port of 127.0.0.1 for a coordinator of several processes, kept bound by this
    process (SO_REUSEPORT) until the block ends, so that no other program takes it meanwhile; jax's
    coordination service binds it too, with SO_REUSEPORT."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(('127.0.0.1', 0))
        yield s.getsockname()[1]


def lines(stdout, prefix):
    return [line for line in stdout.splitlines() if line.startswith(prefix)]


def metrics(out_dir, columns=('iter', 'loss', 'train_loss', 'val_loss', 'lr')):
    """The rows of out_dir/metrics.csv, in the given columns: by default those that do not depend on timing."""
    with open(os.path.join(out_dir, 'metrics.csv'), newline='') as f:
        return [[row[c] for c in columns] for row in csv.DictReader(f)]


def file_hashes(folder):
    """{path relative to folder: sha256} of every file under folder."""
    return {os.path.relpath(os.path.join(d, f), folder): hashlib.sha256(open(os.path.join(d, f), 'rb').read()).digest()
            for d, _, files in os.walk(folder) for f in files}


# -----------------------------------------------------------------------------
# the model

@functools.cache
def _jitted_logits(config):
    import jax
    import jax.numpy as jnp
    from jax_transformer import GPT
    return jax.jit(lambda params, idx: GPT(config).apply({'params': params}, idx, jnp.zeros_like(idx))[0])


def model_logits(config, params, idx):
    """The model's logits at every position of idx (B, T), as a NumPy array."""
    import numpy as np
    return np.asarray(_jitted_logits(config)(params, idx))


def nanogpt_model():
    """nanoGPT's own model.py (the module), read from ../shared/reference/nanogpt; the test is skipped
    without it or without torch."""
    import importlib.util
    pytest.importorskip('torch')
    path = os.path.join(NANOGPT_DIR, 'model.py')
    if not os.path.exists(path):
        pytest.skip(f"nanoGPT's model.py not found at {path}")
    spec = importlib.util.spec_from_file_location('nanogpt_model', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -----------------------------------------------------------------------------
# the order of the tests

def pytest_addoption(parser):
    parser.addoption('--order', default='', help="'reverse', or 'shuffle:SEED': the order of the modules and of "
                                                  "the tests in each (the suite must pass in any)")


# the modules that take longest first (in that order, the others after them), so that the two
# workers of pytest-xdist, each given a module when it is nearly done with its last, end together
SLOWEST_MODULES = ['test_robustness', 'test_train', 'test_processes', 'test_interrupts', 'test_nanogpt_checkpoints',
                   'test_gpt2_weights', 'test_compile_jax', 'test_jax_sampling', 'test_hellaswag',
                   'test_jax_train_utils', 'test_jax_transformer', 'test_data']


def pytest_collection_modifyitems(config, items):
    order = config.getoption('--order')
    modules = {}
    for item in items:  # modules stay whole, so that their fixtures are made once
        modules.setdefault(item.module.__name__, []).append(item)
    groups = list(modules.values())
    if not order:
        rank = {name: i for i, name in enumerate(SLOWEST_MODULES)}
        groups.sort(key=lambda g: rank.get(g[0].module.__name__, len(rank)))
    elif order == 'reverse':
        groups = [g[::-1] for g in groups[::-1]]
    elif order.startswith('shuffle:'):
        rng = random.Random(int(order.split(':')[1]))
        rng.shuffle(groups)
        for g in groups:
            rng.shuffle(g)
    else:
        raise pytest.UsageError(f"--order={order}: use 'reverse' or 'shuffle:SEED'")
    items[:] = [item for g in groups for item in g]
