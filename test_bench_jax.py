"""Tests of bench_jax.py: the training benchmark and its profile table, on a small model."""
import re

from conftest import run_script


def test_bench_times_the_train_step_and_names_the_ops_of_its_profile(tmp_path, script_env):
    args = ['--device=cpu', '--real_data=False', '--vocab_size=64', '--block_size=32', '--batch_size=4',
            '--n_layer=2', '--n_head=2', '--n_embd=32', '--num_steps=5', '--warmup_steps=1', '--peak_flops=1e11',
            '--profile=True', f'--profile_dir={tmp_path}']
    out = run_script('bench_jax.py', args, dict(script_env, XLA_FLAGS='--xla_force_host_platform_device_count=2'))
    assert 'data: random tokens (--real_data=False)' in out.stdout
    assert re.search(r'^jax: [\d.]+ ms/iter, [\d,]+ tokens/s, mfu [\d.]+%$', out.stdout, re.M), out.stdout
    busy, matmul = map(float, re.search(r'device 0 busy ([\d.]+) ms per step, of which matrix products ([\d.]+) ms',
                                        out.stdout).groups())
    assert 0 < matmul < busy
    # the table names the model's operations, layers merged, the backward pass apart
    table = out.stdout.split('top XLA ops over the timed steps:')[1]
    assert 'backward/h_*/mlp/c_fc/dot_general' in table and 'forward/h_*/attn/c_attn/dot_general' in table
