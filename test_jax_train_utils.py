"""Tests of jax_train_utils.py: LR schedule, weight decay mask, optimizer against torch's AdamW,
gradient accumulation, evaluation, batches, MFU, 8 devices against 1 (replicated and FSDP)."""
import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import jax
import jax.numpy as jnp

import jax_train_utils as tu
from jax_transformer import GPT, GPTConfig, init_params, param_paths, param_shapes, estimate_mfu
from conftest import REPO, cpu_devices

TINY = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, bias=True)
train_step = tu.make_train_step()


def nanogpt_lr(it, learning_rate=6e-4, warmup_iters=2000, lr_decay_iters=600000, min_lr=6e-5):
    # nanoGPT's get_lr, written out
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


@pytest.mark.parametrize('it', [0, 1, 999, 1999, 2000, 2001, 100000, 300000, 599999, 600000, 600001, 10**7])
def test_lr_schedule_is_nanogpts(it):
    assert float(tu.get_lr(it, 6e-4, 2000, 600000, 6e-5)) == pytest.approx(nanogpt_lr(it), rel=1e-6)
    assert float(tu.lr_schedule(6e-4, True, 2000, 600000, 6e-5)(it)) == pytest.approx(nanogpt_lr(it), rel=1e-6)
    assert tu.lr_schedule(6e-4, False, 2000, 600000, 6e-5)(it) == 6e-4  # decay_lr=False


def test_lr_schedule_without_a_decay_phase():
    """lr_decay_iters == warmup_iters, where nanoGPT's get_lr divides by zero at that iteration: the
    warmup reaches learning_rate there, and min_lr follows."""
    lrs = [float(tu.get_lr(it, 1e-3, 10, 10, 1e-4)) for it in (0, 9, 10, 11, 100)]
    np.testing.assert_allclose(lrs, [1e-3 / 11, 1e-3 * 10 / 11, 1e-3, 1e-4, 1e-4], rtol=1e-6)


def test_lr_schedule_inside_the_optimizer_follows_the_step():
    """The optimizer's update at step `it` is scaled by get_lr(it): Adam's moments are zero and its
    step counters set to `it`, so one unit gradient gives a known update (weight decay off)."""
    params = {'w': jnp.ones((2, 2))}
    tx = tu.configure_optimizer(params, tu.lr_schedule(1e-3, True, 10, 100, 1e-4), 0.0, 0.9, 0.95, 0.0)
    for it in range(0, 120, 7):
        count_state = jax.tree.map(lambda x: jnp.full_like(x, it) if x.dtype == jnp.int32 else x, tx.init(params))
        updates, _ = tx.update({'w': jnp.ones((2, 2))}, count_state, params)
        lr = nanogpt_lr(it, 1e-3, 10, 100, 1e-4)
        # with m, v at zero and bias correction of step it+1, the first moment/second moment ratio
        # is (1-b1)/(1-b1^(it+1)) / sqrt((1-b2)/(1-b2^(it+1)))
        ratio = (0.1 / (1 - 0.9 ** (it + 1))) / math.sqrt(0.05 / (1 - 0.95 ** (it + 1)))
        np.testing.assert_allclose(np.array(updates['w']), -lr * ratio, rtol=1e-4)


def test_weight_decay_on_exactly_the_matrices():
    params = init_params(TINY, jax.random.key(0))
    mask = tu.decay_mask(params)
    decayed = {path for path, m in param_paths(mask) if m}
    for path, p in param_paths(params):
        assert (path in decayed) == (p.ndim >= 2), path
    names = {'.'.join(p[-2:]) for p in decayed}
    assert names == {'wte.embedding', 'wpe.embedding', 'c_attn.kernel', 'c_proj.kernel', 'c_fc.kernel'}



def test_optimizer_matches_torch_adamw_with_clipping():
    """Three steps of our optimizer against torch.optim.AdamW + clip_grad_norm_, nanoGPT's pair,
    on the same parameters and gradients, with the parameter groups nanoGPT builds."""
    torch = pytest.importorskip('torch')
    rng = np.random.default_rng(0)
    params = {'w': rng.normal(size=(4, 3)).astype(np.float32), 'b': rng.normal(size=(3,)).astype(np.float32)}
    grads = [{k: (5 * rng.normal(size=v.shape)).astype(np.float32) for k, v in params.items()} for _ in range(3)]
    lr, wd, clip = 1e-2, 0.1, 1.0
    tx = tu.configure_optimizer(params, tu.lr_schedule(lr, False, 0, 0, 0.0), wd, 0.9, 0.95, clip)
    p, opt_state = jax.tree.map(jnp.asarray, params), tx.init(params)
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    topt = torch.optim.AdamW([{'params': [tp['w']], 'weight_decay': wd}, {'params': [tp['b']], 'weight_decay': 0.0}],
                             lr=lr, betas=(0.9, 0.95), eps=1e-8)
    for g in grads:
        updates, opt_state = tx.update(jax.tree.map(jnp.asarray, g), opt_state, p)
        p = jax.tree.map(jnp.add, p, updates)
        for k in tp:
            tp[k].grad = torch.tensor(g[k])
        torch.nn.utils.clip_grad_norm_(tp.values(), clip)
        topt.step()
    for k in params:
        np.testing.assert_allclose(np.array(p[k]), tp[k].detach().numpy(), atol=1e-6)


@functools.cache
def optimizer(grad_clip):
    """The tests' AdamW, one object per grad_clip: a train state holds it as a static field, so that
    the steps would compile again for a new one."""
    return tu.configure_optimizer(param_shapes(TINY), tu.lr_schedule(1e-3, True, 2, 10, 1e-4), 0.1, 0.9, 0.95,
                                  grad_clip)


def make_state(grad_clip=1.0, config=TINY):
    return tu.create_train_state(config, init_params(config, jax.random.key(0)), optimizer(grad_clip))


def random_batch(n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, TINY.vocab_size, (n, TINY.block_size)).astype(np.int32)
    y = rng.integers(0, TINY.vocab_size, (n, TINY.block_size)).astype(np.int32)
    return x, y


def whole_batch_gradient(state, x, y):
    """The gradient of the mean loss over all rows of x, y (B, T) at once: no micro-steps."""
    loss = lambda p: GPT(TINY).apply({'params': p}, x, y)[1]
    return jax.jit(jax.grad(loss))(state.params)


def test_accumulating_k_micro_batches_equals_one_k_times_larger_batch():
    """4 micro-batches of 2 rows make the update of one batch of 8, and their mean gradient is the
    gradient of the whole batch's mean loss: Adam's first moment after one step is (1 - beta1) g,
    unclipped (grad_clip 0), so a wrong 1/gradient_accumulation_steps shows in it."""
    x, y = random_batch(8)
    key = jax.random.key(1)
    expected = whole_batch_gradient(make_state(), x, y)
    big, big_loss = train_step(make_state(grad_clip=0.0), x[None], y[None], key)  # GA=1, B=8
    acc, acc_loss = train_step(make_state(grad_clip=0.0), x.reshape(4, 2, -1), y.reshape(4, 2, -1), key)  # GA=4, B=2
    np.testing.assert_allclose(float(acc_loss), float(big_loss), rtol=1e-6)
    for state in (big, acc):
        for (path, mu), (_, g) in zip(param_paths(state.opt_state.mu), param_paths(expected)):
            np.testing.assert_allclose(np.array(mu), 0.1 * np.array(g), rtol=1e-4, atol=1e-9, err_msg=str(path))
    for (path, a), (_, b) in zip(param_paths(big.params), param_paths(acc.params)):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-6, err_msg=str(path))
    assert int(acc.step) == 1


def test_train_step_compiles_once_across_iterations():
    """The loop feeds each step the state the previous one returned and a new batch: one compiled
    program must serve them all (a changed dtype, weak type or placement would compile again).
    The first state is built by a jitted create_train_state, as train_jax.py builds it."""
    params = init_params(TINY, jax.random.key(0))
    tx = tu.configure_optimizer(params, tu.lr_schedule(1e-3, True, 2, 10, 1e-4), 0.1, 0.9, 0.95, 1.0)
    state = jax.jit(tu.create_train_state, static_argnums=(0, 2))(TINY, params, tx)
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kwargs: compiles.append(event) if event.endswith('backend_compile_duration') else None)
    for seed in range(4):
        x, y = random_batch(6, seed)
        state, loss = train_step(state, x.reshape(3, 2, -1), y.reshape(3, 2, -1), jax.random.key(1))
        float(loss)
        if seed == 0:  # the first step may compile (or find its program compiled by another test)
            compiles.clear()
    assert int(state.step) == 4
    assert compiles == []


def test_evaluation_is_the_loss_without_dropout():
    """eval_loss of a dropout 0.5 model is the mean loss of the same weights with dropout 0, over
    all batches; the train step's loss of that model is another, and depends on the dropout key."""
    config = dataclasses.replace(TINY, dropout=0.5)
    state = make_state(config=config)
    x, y = random_batch(6)
    x, y = x.reshape(3, 2, -1), y.reshape(3, 2, -1)
    no_dropout = jax.jit(GPT(dataclasses.replace(TINY, dropout=0.0)).apply)
    expected = np.mean([float(no_dropout({'params': state.params}, xb, yb)[1]) for xb, yb in zip(x, y)])
    assert abs(float(tu.eval_loss(state, x, y)) - expected) < 1e-6
    fresh_state = lambda: make_state(config=config)  # the step donates its state
    losses = [float(train_step(fresh_state(), x, y, jax.random.key(k))[1]) for k in (0, 0, 1)]
    assert losses[0] == losses[1] != losses[2] and abs(losses[0] - expected) > 1e-3


def test_batches_are_windows_of_the_token_file(tmp_path):
    data = np.arange(1000, dtype=np.uint16)
    path = str(tmp_path / 'train.bin')
    data.tofile(path)
    starts = tu.batch_starts(path, 1337, 5, 0, (4, 16), 16)
    x, y = map(np.asarray, tu.get_batch(tu.make_mesh(), path, starts, 16))
    assert x.shape == y.shape == (4, 16, 16) and x.dtype == np.int32
    np.testing.assert_array_equal(x[..., 0], starts)  # token i of this file is i
    np.testing.assert_array_equal(x - starts[..., None], np.broadcast_to(np.arange(16), x.shape))
    np.testing.assert_array_equal(y, x + 1)  # the targets are the next tokens
    assert starts.min() >= 0 and starts.max() < 1000 - 16
    # the same rows in any layout, other rows for another iteration or stream
    np.testing.assert_array_equal(tu.batch_starts(path, 1337, 5, 0, (64,), 16), starts.ravel())
    assert not np.array_equal(tu.batch_starts(path, 1337, 6, 0, (4, 16), 16), starts)
    assert not np.array_equal(tu.batch_starts(path, 1337, 5, 1, (4, 16), 16), starts)


def test_mfu_and_the_peak_table():
    """nanoGPT's MFU (PaLM's flops per token, 6N + 12 L H Q T, times the tokens of an iteration, per
    second, over the peak), with the peak of the device in use, looked up by its kind."""
    config = GPTConfig(block_size=1024, n_layer=12, n_head=12, n_embd=768)
    flops_per_iter = (6 * 124e6 + 12 * 12 * 12 * 64 * 1024) * 1024 * 480
    assert estimate_mfu(config, 124e6, 480, 1.5, 8 * 312e12) == pytest.approx(flops_per_iter / 1.5 / (8 * 312e12))
    kinds = {'NVIDIA H100 80GB HBM3': 989e12, 'NVIDIA H100 PCIe': 756e12, 'NVIDIA A100-SXM4-40GB': 312e12,
             'NVIDIA H200': 989e12, 'NVIDIA B200': 2250e12, 'NVIDIA H20': 148e12, 'NVIDIA L4': 121e12,
             'NVIDIA L40': 181e12, 'NVIDIA L40S': 362e12, 'NVIDIA GeForce RTX 4090': 165e12,
             'AMD Instinct MI300X': 1307e12, 'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5': 459e12,
             'TPU v6 lite': 918e12, 'a new accelerator': None}
    for kind, peak in kinds.items():
        assert tu.device_peak_flops(SimpleNamespace(platform='gpu', device_kind=kind)) == peak, kind
    cpu = SimpleNamespace(platform='cpu', device_kind='cpu')
    assert tu.device_peak_flops(cpu) == tu.CPU_PEAK_FLOPS_PER_CORE * os.cpu_count() / jax.local_device_count()


@pytest.mark.parametrize('n_batches,batch_size,n_devices,layout', [
    (40, 12, 8, (5, 96)),  # nanoGPT's GPT-2 run on 8 GPUs: 5 micro-steps of 12 rows per device
    (40, 12, 1, (40, 12)),
    (1, 12, 2, (1, 12)),  # nanoGPT's CPU run on 2 cores: each micro-batch split in two
    (5, 12, 4, (5, 12)),
])
def test_batch_layout(n_batches, batch_size, n_devices, layout):
    assert tu.batch_layout(n_batches, batch_size, n_devices) == layout


@pytest.mark.parametrize('n_batches,batch_size,n_devices,layout', [
    (2, 128, 2, (2, 128)),  # each batch split over 2 cores: one batch's activations at a time
    (40, 16, 8, (40, 16)),
    (40, 12, 8, (5, 96)),  # batch_size not a multiple: whole batches per device
])
def test_devices_sharing_memory_split_each_batch(n_batches, batch_size, n_devices, layout):
    assert tu.batch_layout(n_batches, batch_size, n_devices, shared_memory=True) == layout


def test_batch_layout_says_what_would_work():
    with pytest.raises(ValueError) as e:
        tu.batch_layout(5, 12, 8, name='eval_iters')
    assert str(e.value) == ("eval_iters=5 and batch_size=12 cannot be split over 8 devices: make one of them "
                            "a multiple of 8 (e.g. --eval_iters=8 or --batch_size=16)")


MULTI_DEVICE = r"""
import json, sys, numpy as np, jax
from jax.sharding import NamedSharding, PartitionSpec as P
import jax_train_utils as tu, checkpoints, test_jax_train_utils as t
from jax_transformer import GPTConfig, param_shapes, dropout_mask
assert jax.device_count() == 8
mesh = tu.make_mesh()
x, y = t.random_batch(16)
batch = lambda a, steps: jax.device_put(a.reshape(steps, -1, a.shape[-1]), NamedSharding(mesh, P(None, 'data')))
# a dropout mask made on 8 devices, each its rows, is the one made whole
mask = lambda key: dropout_mask(key, (16, 4, 8, 30), 0.2)
split_mask = jax.jit(mask, out_shardings=NamedSharding(mesh, P('data')))(jax.random.key(3))
out = {'split_mask_is_whole': bool(np.array_equal(split_mask, jax.jit(mask)(jax.random.key(3))))}
for mode in ('replicated', 'flat', 'fsdp'):  # XLA's all-reduces, one flat all-reduce, sharded state
    state, fsdp = t.make_state(grad_clip=0.0), mode == 'fsdp'
    sharding = tu.state_sharding(mesh, state, fsdp, fsdp_min_size=1024)
    state = jax.device_put(state, sharding)
    step = tu.make_train_step(sharding, None if mode == 'replicated' else mesh, fsdp)
    losses = []
    for i in range(2):  # 2 micro-steps of 8 rows split over 8 devices
        state, loss = step(state, batch(x, 2), batch(y, 2), jax.random.key(1))
        losses.append(float(loss))
    assert all(a.sharding == s for a, s in zip(jax.tree.leaves(state), jax.tree.leaves(sharding)))
    out[mode] = dict(losses=losses, eval=float(tu.eval_loss(state, batch(x, 2), batch(y, 2))),
                     specs={k: list(s.spec) for k, s in [('c_fc', sharding.params['h_0']['mlp']['c_fc']['kernel']),
                            ('wte', sharding.params['wte']['embedding']), ('ln_f', sharding.params['ln_f']['scale']),
                            ('mu', sharding.opt_state.mu['h_0']['mlp']['c_fc']['kernel'])]},
                     bytes=tu.bytes_per_device(state, sharding))
    for name, tree in (('params', state.params), ('mu', state.opt_state.mu)):
        np.save(f'{name}_{mode}.npy', np.concatenate([np.ravel(p) for p in jax.tree.leaves(tree)]))
    if fsdp:  # an FSDP checkpoint restores replicated
        manager = checkpoints.checkpoint_manager('ckpt')
        checkpoints.save_checkpoint(manager, state, {'iter_num': 2})
        abstract = jax.eval_shape(lambda: t.make_state(grad_clip=0.0))
        replicated = jax.tree.map(lambda _: NamedSharding(mesh, P()), abstract)
        restored = checkpoints.restore_train_state(manager, checkpoints.newest_checkpoint(manager), abstract, replicated)
        assert all(a.sharding.is_fully_replicated and np.array_equal(a, b)
                   for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)))
# gpt2-xl's params and AdamW state on 8 devices
xl = GPTConfig(n_layer=48, n_head=25, n_embd=1600, block_size=1024, vocab_size=50257, bias=True)
tx = tu.configure_optimizer(param_shapes(xl), tu.lr_schedule(6e-4, True, 2000, 600000, 6e-5), 0.1, 0.9, 0.95, 1.0)
xl_state = jax.eval_shape(lambda p: tu.create_train_state(xl, p, tx), param_shapes(xl))
out['xl'] = [tu.bytes_per_device(xl_state, tu.state_sharding(mesh, xl_state, fsdp, 2 ** 16)) for fsdp in (False, True)]
print(json.dumps(out))
"""


def test_eight_devices_replicated_or_fsdp_give_the_single_device_result(tmp_path):
    """The batch split over an 8-device mesh (CPU devices, in a subprocess), with the train state
    replicated (XLA's all-reduces, or one flat all-reduce) or FSDP-sharded, gives the losses, eval
    loss and parameters of one device; the shardings survive the step, an FSDP checkpoint
    restores replicated, and a dropout mask made on 8 devices is the one made on one."""
    env = dict(os.environ, XLA_FLAGS=cpu_devices(8), JAX_PLATFORMS='cpu',
               PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, '-c', MULTI_DEVICE], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.splitlines()[-1])
    assert result['split_mask_is_whole']
    state, x, y = make_state(grad_clip=0.0), *random_batch(16)
    losses = []
    for i in range(2):
        state, loss = train_step(state, x.reshape(2, -1, x.shape[-1]), y.reshape(2, -1, y.shape[-1]),
                                 jax.random.key(1))
        losses.append(float(loss))
    eval1 = float(tu.eval_loss(state, x.reshape(2, 8, -1), y.reshape(2, 8, -1)))
    flat = lambda tree: np.concatenate([np.ravel(p) for p in jax.tree.leaves(tree)])
    for mode in ('replicated', 'flat', 'fsdp'):
        np.testing.assert_allclose(result[mode]['losses'], losses, atol=1e-6, err_msg=mode)
        assert abs(result[mode]['eval'] - eval1) < 1e-6
        np.testing.assert_allclose(np.load(tmp_path / f'params_{mode}.npy'), flat(state.params), atol=1e-6, err_msg=mode)
        # the scale of the unclipped gradients: Adam's first moments, (1 - beta1) g_1 + beta1 (1 - beta1) g_0
        np.testing.assert_allclose(np.load(tmp_path / f'mu_{mode}.npy'), flat(state.opt_state.mu), rtol=1e-4,
                                   atol=1e-9, err_msg=mode)
    assert all(spec == [] for spec in result['replicated']['specs'].values())
    # FSDP splits each big array along its largest dimension that 8 divides; small ones stay whole
    assert result['fsdp']['specs'] == {'c_fc': [None, 'data'], 'wte': ['data', None], 'ln_f': [], 'mu': [None, 'data']}
    assert result['fsdp']['bytes'] < result['replicated']['bytes'] / 2
    replicated, sharded = result['xl']
    assert replicated == 3 * 4 * 1_557_611_200 + 2 * 4  # params, Adam's mu and nu in float32; 2 step counts
    assert sharded < replicated / 8 * 1.01, result['xl']
