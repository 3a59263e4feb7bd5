"""Tests of hlo_costs.py: its figures against XLA's own cost analysis where XLA counts right (programs
without loops, loops unrolled), every trip of a loop counted where XLA counts one, collectives
counted where they run. Compiled for the CPU here; for TPUs and GPUs in test_compile_jax.py."""

import json
import subprocess
import sys

import pytest
import jax
import jax.numpy as jnp

import hlo_costs
import jax_train_utils as tu
from conftest import REPO, cpu_devices
from jax_attention import blockwise_attention
from jax_transformer import GPTConfig, init_params


def costs_of(f, *args):
    compiled = jax.jit(f).lower(*args).compile()
    return compiled.cost_analysis(), hlo_costs.program_costs(compiled.as_text())


@pytest.mark.parametrize('program', ['loss', 'update'])
def test_a_program_without_loops_costs_what_xla_says(program):
    """FLOPs, bytes and transcendentals of every instruction as XLA counts them: the model's loss,
    and AdamW's update of its parameters."""
    config = GPTConfig(block_size=128, vocab_size=96, n_layer=2, n_head=4, n_embd=64, attention='dense',
                       platform='cpu')
    params = init_params(config, jax.random.key(0))
    tx = tu.adamw(lambda c: 1e-3, 0.1, 0.9, 0.95, 1.0, tu.decay_mask(params))
    x = jnp.zeros((4, 128), jnp.int32)
    if program == 'loss':
        f, args = lambda p, x: tu.loss_fn(p, tu.model_apply(config), x, x, None), (params, x)
    else:
        f, args = lambda p, s: tx.update(p, s, p), (params, tx.init(params))
    compiled = jax.jit(f).lower(*args).compile()
    assert ' while(' not in compiled.as_text()
    xla, ours = compiled.cost_analysis(), hlo_costs.program_costs(compiled.as_text())
    assert ours.flops == pytest.approx(xla['flops'], rel=1e-3)
    assert ours.bytes == pytest.approx(xla['bytes accessed'], rel=1e-3)
    assert ours.transcendentals == xla['transcendentals']


def test_every_micro_step_of_a_scan_counts():
    """XLA counts a loop's body once: a scan of 7 steps costs what it costs unrolled."""
    w, x = jnp.ones((128, 256)), jnp.ones((7, 64, 128))

    def steps(unroll):
        return lambda w, x: jax.lax.scan(lambda c, xi: (c + jnp.tanh(xi @ w).sum(), None), 0.0, x, unroll=unroll)[0]
    xla_rolled, ours = costs_of(steps(1), w, x)
    xla_unrolled, _ = costs_of(steps(True), w, x)
    assert xla_rolled['flops'] < xla_unrolled['flops'] / 5  # the body, once
    assert ours.flops == pytest.approx(xla_unrolled['flops'], rel=1e-4)
    assert ours.flops >= 7 * 2 * 64 * 128 * 256
    assert ours.transcendentals == xla_unrolled['transcendentals'] == 7 * 64 * 256


def test_a_loop_whose_bound_changes_counts_each_trip():
    """An inner loop up to the outer one's counter (blockwise attention's key blocks up to the
    diagonal): 1 + 2 + ... + 6 = 21 trips, as the unrolled program."""
    step = lambda j, acc: jnp.tanh(acc @ acc + j)

    def triangle(a):
        return jax.lax.fori_loop(0, 6, lambda i, acc: jax.lax.fori_loop(0, i + 1, step, acc), a)

    def unrolled(a):
        for i in range(6):
            for j in range(i + 1):
                a = step(j, a)
        return a
    a = jnp.ones((64, 64))
    _, ours = costs_of(triangle, a)
    xla_unrolled, _ = costs_of(unrolled, a)
    assert ours.loops_uncounted == 0
    assert ours.flops == pytest.approx(xla_unrolled['flops'], rel=1e-2)
    assert ours.transcendentals == xla_unrolled['transcendentals'] == 21 * 64 * 64


def test_blockwise_attention_counts_its_tiles():
    """Forward and backward of blockwise attention, T = 256 in blocks of 64: 4 + 3 + 2 + 1 = 10
    tiles up to the diagonal, each 2 products forward and 5 backward of 2 H bq bk hs FLOPs (the
    bound of each query block's loop comes from a table of them, on the host)."""
    B, T, nh, hs = 2, 256, 2, 32
    q = jax.random.normal(jax.random.key(0), (B, T, nh, hs))
    loss = lambda q, k, v: blockwise_attention(q, k, v, block_q=64, block_k=64).sum()
    _, ours = costs_of(jax.grad(loss, argnums=(0, 1, 2)), q, q, q)
    products = 10 * 7 * 2 * B * nh * 64 * 64 * hs
    assert ours.loops_uncounted == 0
    assert products <= ours.flops < 1.1 * products


COLLECTIVES = """
import json, jax, jax.numpy as jnp
import hlo_costs, jax_train_utils as tu
from jax_transformer import GPTConfig, init_params
config = GPTConfig(block_size=32, vocab_size=96, n_layer=1, n_head=2, n_embd=32, platform='cpu')
params = init_params(config, jax.random.key(0))
state = tu.create_train_state(config, params, tu.adamw(lambda c: 1e-3, 0.1, 0.9, 0.95, 1.0, tu.decay_mask(params)))
mesh = tu.make_mesh()
x = jax.ShapeDtypeStruct((3, 4, 32), jnp.int32, sharding=tu.batch_spec(mesh, (3, 4), 32).sharding)
out = {}
for name, step_mesh in (('flat', mesh), ('xla', None)):  # one flat all-reduce; XLA's own, left in the loop
    step = jax.jit(lambda s, x, y, k: tu._train_step(s, x, y, k, step_mesh))
    costs = hlo_costs.program_costs(step.lower(state, x, x, jax.random.key(0)).compile().as_text())
    out[name] = dict(costs.collectives, in_loop=costs.in_loop)
print(json.dumps(out))
"""


def test_collectives_are_counted_where_they_run():
    """On 2 devices: the CPU's one flat all-reduce of the gradients, after the 3 micro-steps; XLA's
    all-reduces placed inside the micro-step loop run once per micro-step."""
    env = dict(subprocess.os.environ, XLA_FLAGS=cpu_devices(2), JAX_PLATFORMS='cpu')
    p = subprocess.run([sys.executable, '-c', COLLECTIVES], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    counts = json.loads(p.stdout.splitlines()[-1])
    assert counts['flat']['all_reduce'] == 1 and counts['flat']['in_loop'] == 0
    assert counts['xla']['in_loop'] >= 3 and counts['xla']['in_loop'] % 3 == 0


def test_attention_is_named_in_the_program():
    config = GPTConfig(block_size=128, vocab_size=96, n_layer=1, n_head=4, n_embd=64, attention='blockwise',
                       platform='cpu')
    from jax_transformer import GPT
    params = init_params(config, jax.random.key(0))
    x = jnp.zeros((2, 128), jnp.int32)
    text = jax.jit(lambda p, x: GPT(config).apply({'params': p}, x, x)[1]).lower(params, x).compile().as_text()
    assert hlo_costs.attention_in(text) == ['blockwise']
