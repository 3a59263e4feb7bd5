"""Tests of bench_jax.py: the training benchmark and its profile table, on a small model."""
import re

import numpy as np

from conftest import NANOGPT_DIR as NANOGPT, run_script, cpu_devices, nanogpt_model


def test_bench_times_the_train_step_and_names_the_ops_of_its_profile(tmp_path, script_env):
    args = ['--device=cpu', '--real_data=False', '--vocab_size=64', '--block_size=32', '--batch_size=4',
            '--n_layer=2', '--n_head=2', '--n_embd=32', '--num_steps=5', '--warmup_steps=1', '--peak_flops=1e11',
            '--profile=True', f'--profile_dir={tmp_path}', '--profile_ops=1000']
    out = run_script('bench_jax.py', args, dict(script_env, XLA_FLAGS=cpu_devices(2)))
    assert 'data: random tokens (--real_data=False)' in out.stdout
    assert re.search(r'^jax: [\d.]+ ms/iter, [\d,]+ tokens/s, mfu [\d.]+%, rounds [\d.]+-[\d.]+ ms$', out.stdout, re.M), \
        out.stdout
    busy, matmul = map(float, re.search(r'device 0 busy ([\d.]+) ms per step, of which matrix products ([\d.]+) ms',
                                        out.stdout).groups())
    assert 0 < matmul < busy
    # the table names the model's operations, layers merged, the backward pass apart (all its rows, as
    # which ops rank first depends on the timing and on how XLA fused them)
    table = out.stdout.split('top XLA ops over the timed steps:')[1]
    assert 'backward/h_*/mlp/c_fc/dot_general' in table and 'forward/h_*/attn/c_attn/dot_general' in table


def test_bench_points_run_each_contender_alone_and_report_its_memory(script_env):
    """--points times each (block_size x batch_size) point in a process of its own per contender,
    and reports its peak RSS and, for JAX, the step's compiled memory, which grows with the batch."""
    args = ['--device=cpu', '--real_data=False', '--vocab_size=64', '--n_layer=1', '--n_head=2', '--n_embd=32',
            '--num_steps=5', '--warmup_steps=1', '--peak_flops=1e11', '--points=16x4,16x64', '--rounds=1']
    out = run_script('bench_jax.py', args, script_env)
    rows = re.findall(r'^16 x (\d+): jax [\d.]+ ms/iter, [\d,]+ tokens/s, peak RSS ([\d,]+) MiB, compiled ([\d,]+) MiB, '
                      r'rounds [\d.]+-[\d.]+ ms$', out.stdout, re.M)
    assert [int(b) for b, _, _ in rows] == [4, 64], out.stdout
    (rss_small, small), (rss_big, big) = [(int(r.replace(',', '')), int(c.replace(',', ''))) for _, r, c in rows]
    assert 0 < small < big and rss_small > 100 and rss_big > 100  # MiB: a process with JAX imported


def test_compare_torch_trains_nanogpts_own_model(script_env):
    """The PyTorch side of --compare_torch=True is nanoGPT's model.py: its own parameter count line, and
    its loss at step 0 on the bench's first batch, for the weights its init gives under the bench's seed."""
    nanogpt = nanogpt_model()  # the test is skipped without it or torch
    import torch
    shape = dict(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=32, dropout=0.0, bias=False)
    args = ['--device=cpu', '--real_data=False', '--num_steps=5', '--warmup_steps=1', f'--nanogpt_dir={NANOGPT}',
            "--only=nanoGPT eager", '--batch_size=4'] + [f'--{k}={v}' for k, v in shape.items()]
    out = run_script('bench_jax.py', args, script_env).stdout
    torch.manual_seed(1337)
    model = nanogpt.GPT(nanogpt.GPTConfig(**shape))
    xy = np.random.default_rng(1337).integers(0, 64, (4, 17)).astype(np.int64)  # bench_jax.py's first batch
    with torch.no_grad():
        _, loss = model(*(torch.from_numpy(np.ascontiguousarray(a)) for a in (xy[:, :-1], xy[:, 1:])))
    n = sum(p.numel() for p in model.parameters())
    assert f"number of parameters: {model.get_num_params() / 1e6:.2f}M" in out  # printed by nanoGPT's GPT itself
    assert f"nanoGPT eager: {n / 1e6:.2f}M parameters, loss at step 0 {loss.item():.4f}," in out, out
    assert re.search(r'^nanoGPT eager: [\d.]+ ms/iter, [\d,]+ tokens/s, mfu n/a', out, re.M), out


def test_compare_torch_without_nanogpt_says_where_to_get_it(script_env, tmp_path):
    p = run_script('bench_jax.py', ['--compare_torch=True', f'--nanogpt_dir={tmp_path}'], script_env, check=False)
    assert (p.returncode, p.stderr) == (2, f"error: nanogpt_dir='{tmp_path}' holds no model.py: point --nanogpt_dir= at "
                                           f"a nanoGPT checkout (git clone https://github.com/karpathy/nanoGPT), or time "
                                           f"transformers' GPT-2 with --torch_model=transformers\n")
