"""Tests of compile_jax.py and accelerators.py: tiny configs compiled for TPU slices (one host,
several hosts with FSDP) and an H100 that are not here, runs that do not fit, bad input, and the
CPU, where the program it compiles is compared with the one train_jax.py runs. The GPU and TPU
tests need requirements_compile.txt and are skipped without it."""

import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import accelerators
from conftest import REPO, SHAKESPEARE, SHARED, run_script

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                                  reason="compiling for TPUs needs libtpu: pip install -r requirements_compile.txt")
needs_cuda = pytest.mark.skipif(importlib.util.find_spec('jax_plugins.xla_cuda13') is None,
                                reason="compiling for GPUs needs jax[cuda13]: pip install -r requirements_compile.txt")

TINY = ['--n_layer=2', '--n_head=2', '--n_embd=64', '--block_size=64', '--batch_size=8', '--vocab_size=96',
        '--gradient_accumulation_steps=2', '--eval_iters=2', '--dataset=none', '--sample=False']


@pytest.fixture(scope='module')
def compile_env(script_env):
    """The scripts' environment without the test suite's XLA flags, some of which libtpu refuses."""
    return dict(script_env, XLA_FLAGS='')


def compile_for(target, args, env, tmp_path, check=True):
    """compile_jax.py run for target: (the process, the figures of its --json)."""
    path = tmp_path / f'{target}.json'
    p = run_script('compile_jax.py', [f'--target={target}', f'--json={path}'] + args, env, check=check)
    return p, json.loads(path.read_text()) if path.exists() else None


def nanogpt_causal_flops(n_layer, n_embd, block_size, vocab_size, tokens):
    """nanoGPT's training FLOPs with causal attention, 6 N + 6 L H Q T per token (N without wpe)."""
    n_params = n_layer * 12 * n_embd ** 2 + vocab_size * n_embd
    return (6 * n_params + 6 * n_layer * n_embd * block_size) * tokens


@needs_libtpu
def test_a_tpu_slice(compile_env, tmp_path):
    """Compiled for 8 TPU v5e chips: it fits, runs Pallas' flash attention, and the step's figures
    are whole: FLOPs at least nanoGPT's formula, memory traffic, the bound and the MFU it allows,
    and the gradients averaged over the chips once, after the micro-steps."""
    p, figures = compile_for('v5e-8', TINY, compile_env, tmp_path)
    assert figures['devices'] == 8 and figures['hosts'] == 1 and figures['device_kind'] == 'TPU v5 lite'
    assert figures['fits'] and figures['bytes_per_device']['total'] < figures['bytes_per_device']['capacity']
    assert figures['attention'] == ['flash']
    tokens_per_device = 2 * 8 * 64 / 8
    assert figures['flops'] >= nanogpt_causal_flops(2, 64, 64, 96, tokens_per_device)
    assert 0 < figures['hbm_bytes'] <= figures['bytes_accessed']
    assert figures['bound_ms'] > 0 and 0 < figures['mfu_bound'] <= 1
    assert figures['collectives']['all_reduce'] >= 1 and figures['collectives']['in_loop'] == 0
    assert figures['collectives']['all_gather'] == 0  # each chip its own rows, from the embedding on
    assert re.search(r'the training step: .* of the 15\.8 GiB of each TPU v5 lite: fits', p.stdout)
    assert 'most memory traffic, by the JAX code it comes from:' in p.stdout


@needs_libtpu
def test_a_multi_host_tpu_slice_with_fsdp(compile_env, tmp_path):
    """v5e-16 is 4 hosts of 4 chips; with FSDP each chip holds a sixteenth of the large arrays and
    gathers them when it needs them."""
    args = TINY + ['--batch_size=16', '--gradient_accumulation_steps=1', '--eval_iters=16']
    _, replicated = compile_for('v5e-16', args, compile_env, tmp_path)
    _, sharded = compile_for('v5e-16', args + ['--fsdp=True', '--fsdp_min_size=1024'], compile_env, tmp_path)
    assert sharded['devices'] == 16 and sharded['hosts'] == 4 and sharded['fits']
    assert sharded['bytes_per_device']['state'] < replicated['bytes_per_device']['state'] / 4
    assert sharded['collectives']['all_gather'] > replicated['collectives']['all_gather']


@needs_cuda
def test_eight_h100s_reduce_the_gradients_once(compile_env, tmp_path):
    """nanoGPT's DDP on 8 GPUs: each its rows from the embedding on (no all-gather), and the
    gradients averaged once a step, after the micro-steps."""
    _, figures = compile_for('8xh100', TINY + ['--dtype=bfloat16'], compile_env, tmp_path)
    assert figures['devices'] == 8 and figures['attention'] == ['cudnn']
    collectives = figures['collectives']
    assert collectives['all_reduce'] >= 1 and collectives['in_loop'] == 0 and collectives['all_gather'] == 0


@needs_cuda
def test_an_h100_runs_cudnn_attention(compile_env, tmp_path):
    p, figures = compile_for('h100', TINY + ['--dtype=bfloat16'], compile_env, tmp_path)
    assert figures['attention'] == ['cudnn'] and figures['fits']
    assert figures['kernels'] > 0 and figures['flops'] >= nanogpt_causal_flops(2, 64, 64, 96, 2 * 8 * 64)
    assert 'kernel launches' in p.stdout
    _, with_dropout = compile_for('h100', TINY + ['--dtype=bfloat16', '--dropout=0.1'], compile_env, tmp_path)
    assert with_dropout['attention'] == ['dense']  # cuDNN's kernel here has no dropout


@pytest.mark.parametrize('target', [pytest.param('h100', marks=needs_cuda), pytest.param('v5e-1', marks=needs_libtpu)])
def test_a_run_that_does_not_fit_exits_1_with_what_to_try(compile_env, tmp_path, target):
    """An H100's program is compared with the memory jax may use there (the figures are written
    all the same); a TPU's compiler refuses the program itself."""
    big = ['--n_layer=1', '--n_head=2', '--n_embd=64', '--block_size=1024', '--batch_size=1024',
           '--gradient_accumulation_steps=1', '--eval_iters=1', '--sample=False']  # 1024 x 1024 x 50304 logits
    p, figures = compile_for(target, big, compile_env, tmp_path, check=False)
    assert p.returncode == 1, p.stderr[-2000:]
    assert not figures['fits']
    error = p.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith('error: ') and 'the training step' in error[0], p.stderr
    assert 'try a smaller --batch_size with more --gradient_accumulation_steps' in error[0]


@needs_cuda
def test_a_gpu_compiles_with_a_saved_target_config(compile_env, tmp_path):
    """An H100's exact figures, as XLA reads them off the GPU, given instead of the table's; saving
    them needs the GPU itself."""
    saved = os.path.join(SHARED, '..', 'aot', 'h100.textproto')
    if not os.path.exists(saved):
        pytest.skip(f"no saved target config at {saved}")
    p, figures = compile_for('h100', TINY + ['--dtype=bfloat16', f'--target_config={saved}'], compile_env, tmp_path)
    assert figures['device_kind'] == 'NVIDIA H100 80GB HBM3' and figures['attention'] == ['cudnn']
    if accelerators.attached() != 'gpu':
        p = run_script('compile_jax.py', [f'--save_target_config={tmp_path / "here.textproto"}'], compile_env,
                       check=False)
        assert p.returncode == 2 and 'needs that GPU' in p.stderr and not (tmp_path / 'here.textproto').exists()


def test_bad_input_exits_2(compile_env):
    p = run_script('compile_jax.py', ['--target=h300'] + TINY, compile_env, check=False)
    assert p.returncode == 2 and p.stderr.startswith("error: unknown target 'h300'") and 'v5e-8' in p.stderr
    p = run_script('compile_jax.py', TINY, compile_env, check=False)
    assert p.returncode == 2 and '--target=' in p.stderr
    with pytest.raises(ValueError, match='unknown target'):
        accelerators.parse_target('v5e-3')


@pytest.mark.parametrize('target, devices, hosts', [
    ('8xh100', 8, 1), ('2x8xa100-40gb', 16, 2), ('v4-8', 4, 1), ('v4-32', 16, 4), ('v5e-8', 8, 1), ('v5e-256', 256, 64),
    ('v5p-8', 4, 1), ('v6e-8', 8, 1)])
def test_targets_are_named_as_users_know_them(target, devices, hosts):
    """Cloud TPU names count TensorCores for v4 and v5p (2 a chip, one jax device) and chips for
    v5e and v6e, which have 8 chips on one host, else hosts of 4."""
    accelerator, args = accelerators.parse_target(target)
    if args['platform'] == 'cuda' and importlib.util.find_spec('jax_plugins.xla_cuda13') is None or \
            args['platform'] == 'tpu' and importlib.util.find_spec('libtpu') is None:
        pytest.skip("the compiler for it is not installed")
    found, _ = accelerators.target_devices(target)
    assert len(found) == devices and len({d.process_index for d in found}) == hosts
    assert {d.device_kind for d in found} == {accelerator.device_kind}


@pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason=f"offline data not found at {SHARED}")
def test_for_the_cpu_it_compiles_the_program_train_jax_runs(script_env, tmp_path):
    """One code path builds both: the training step train_jax.py runs and the one compile_jax.py
    measures for the same config are the same program, as XLA writes them out."""
    data = tmp_path / 'data' / 'shakespeare_char'
    os.makedirs(data)
    shutil.copy(SHAKESPEARE, data / 'input.txt')
    args = ['config/train_shakespeare_char.py', '--n_layer=1', '--n_embd=32', '--n_head=2', '--block_size=32',
            '--batch_size=4', '--eval_iters=2', '--max_iters=0', f'--data_root={tmp_path / "data"}']
    programs = []
    for script, extra in (('train_jax.py', [f'--out_dir={tmp_path / "out"}']), ('compile_jax.py', ['--target=cpu'])):
        dump = tmp_path / script
        env = dict(script_env, XLA_FLAGS=f"{script_env['XLA_FLAGS']} --xla_dump_to={dump}")
        run_script(script, args + extra + ['--compilation_cache='], env)
        [path] = glob.glob(str(dump / '*jit__train_step*after_optimizations.txt'))
        text = open(path).read().split('\n%', 1)[1]  # the computations, after the source files' table
        programs.append(re.sub(r', metadata=\{[^}]*\}|stack_frame_id=\d+', '', text))
    assert programs[0] == programs[1]


@needs_libtpu
def test_train_jax_runs_on_a_cpu_with_the_compilers_installed(script_env, tmp_path):
    """libtpu installed is not a TPU VM: the run joins no other process, and neither the TPU nor
    the CUDA package prints its warnings; JAX_PLATFORMS unset, as a user has it."""
    if not os.path.exists(SHAKESPEARE):
        pytest.skip(f"offline data not found at {SHARED}")
    data = tmp_path / 'shakespeare_char'
    os.makedirs(data)
    shutil.copy(SHAKESPEARE, data / 'input.txt')
    env = {k: v for k, v in script_env.items() if k != 'JAX_PLATFORMS'}
    p = run_script('train_jax.py', ['config/train_shakespeare_char.py', '--n_layer=1', '--n_embd=32', '--n_head=2',
                                    '--block_size=32', '--batch_size=4', '--eval_iters=2', '--max_iters=1',
                                    f'--data_root={tmp_path}', f'--out_dir={tmp_path / "out"}'], env)
    assert 'devices: 2 x cpu' in p.stdout or 'devices: 1 x cpu' in p.stdout
    assert 'TPU' not in p.stderr and 'CUDA' not in p.stderr and 'cuda' not in p.stderr, p.stderr[-2000:]


@needs_libtpu
def test_a_run_on_the_cpu_loads_no_accelerator_plugin(script_env):
    """jax loads every installed plugin when it starts, even for the CPU alone (JAX_PLATFORMS=cpu);
    a run on the CPU does not: about 430 MiB of libraries it would never use."""
    plugins = "import sys, jax; jax.devices(); print(sorted(m for m in sys.modules if m.startswith('jax_plugins.')))"
    plain = run_script_code(plugins, script_env)
    ours = run_script_code("import jax_train_utils as tu; tu.configure_devices('cpu', 1, []); " + plugins, script_env)
    assert plain != '[]' and ours == '[]', (plain, ours)


def run_script_code(code, env):
    p = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout.strip().splitlines()[-1]
