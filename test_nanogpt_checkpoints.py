"""
Tests of nanoGPT's own checkpoints, both ways. A ckpt.pt made as nanoGPT's train.py makes it (its
GPT, configure_optimizers, a few AdamW steps, torch.save) loads here with nanoGPT's logits and
makes torch's next AdamW update; train_jax.py resumes and evaluates it, sample_jax.py samples it.
export_nanogpt.py writes this port's runs as a ckpt.pt that nanoGPT's GPT and optimizer load.
nanoGPT's model.py is read from ../shared/reference/nanogpt.

$ python -m pytest test_nanogpt_checkpoints.py -q
"""
import os
import pickle
import re
import shutil
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import jax
import jax.numpy as jnp

import checkpoints
import jax_train_utils as tu
from jax_transformer import GPTConfig, ARCHITECTURE_KEYS, param_shapes
from nanogpt_checkpoints import read_nanogpt_checkpoint, params_from_nanogpt, params_to_nanogpt
from conftest import run_script, file_hashes, model_logits, nanogpt_model
from test_jax_train_utils import nanogpt_lr, train_step

torch = pytest.importorskip('torch')
nanogpt = nanogpt_model()

# nanoGPT's train.py settings for the tiny runs: its lr schedule, AdamW and clipping
SCHEDULE = dict(learning_rate=1e-3, warmup_iters=2, lr_decay_iters=20, min_lr=1e-4)
WEIGHT_DECAY, BETAS, GRAD_CLIP = 0.1, (0.9, 0.95), 1.0
ITERS = 4  # the AdamW steps of the nanoGPT run: its ckpt.pt is at iter_num 4
BATCH = 4
# the checkpoints of the tests: a compiled model's, and a cropped model's without biases or flash attention
RUNS = {
    'compiled': dict(bias=True, block_size=32, crop_to=None, flash=True, prefix='_orig_mod.'),
    'plain': dict(bias=False, block_size=48, crop_to=32, flash=False, prefix=''),
}
CHARS = sorted("\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")  # shakespeare_char's 65
WORDS = ['To', 'be,', 'or', 'not', 'to', 'be:', 'that', 'is', 'the', 'question.\n', 'KING', 'RICHARD', '3!']


def new_nanogpt(model_args, flash=True):
    """nanoGPT's GPT; without flash as on a PyTorch before 2.0, with its causal mask buffers."""
    with pytest.MonkeyPatch.context() as mp:
        if not flash:
            mp.delattr(torch.nn.functional, 'scaled_dot_product_attention')
        return nanogpt.GPT(nanogpt.GPTConfig(**model_args))


def nanogpt_resume(ckpt_path, flash=True):
    """nanoGPT's model and optimizer resumed from ckpt_path, as its train.py does it."""
    checkpoint = torch.load(ckpt_path, map_location='cpu')
    model = new_nanogpt(checkpoint['model_args'], flash)
    state_dict = {k.removeprefix('_orig_mod.'): v for k, v in checkpoint['model'].items()}
    model.load_state_dict(state_dict)
    optimizer = model.configure_optimizers(WEIGHT_DECAY, SCHEDULE['learning_rate'], BETAS, 'cpu')
    optimizer.load_state_dict(checkpoint['optimizer'])
    return checkpoint, model, optimizer


def nanogpt_step(model, optimizer, iter_num, x, y):
    """One iteration of nanoGPT's training loop (no accumulation, float32): its loss."""
    for group in optimizer.param_groups:
        group['lr'] = nanogpt_lr(iter_num, **SCHEDULE)
    _, loss = model(torch.tensor(x).long(), torch.tensor(y).long())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def nanogpt_logits(model, idx):
    model.eval()
    with torch.no_grad():  # with targets, nanoGPT's forward gives the logits at every position
        return model(torch.tensor(idx).long(), torch.zeros(idx.shape, dtype=torch.long))[0].numpy()


def batch(data, block_size, seed):
    starts = np.random.default_rng(seed).integers(0, len(data) - block_size, BATCH)
    windows = np.stack([data[i:i + block_size + 1] for i in starts]).astype(np.int64)
    return windows[:, :-1], windows[:, 1:]


@pytest.fixture(scope='module')
def root(tmp_path_factory):
    """A folder as a nanoGPT user has it: data/chars (65 characters, meta.pkl) and, for each of
    RUNS, an out_dir holding the ckpt.pt of ITERS iterations of nanoGPT's train.py."""
    root = tmp_path_factory.mktemp('nanogpt')
    text = ' '.join(np.random.default_rng(0).choice(WORDS, size=6000))
    stoi = {c: i for i, c in enumerate(CHARS)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    os.makedirs(root / 'data' / 'chars')
    ids[:int(0.9 * len(ids))].tofile(root / 'data' / 'chars' / 'train.bin')
    ids[int(0.9 * len(ids)):].tofile(root / 'data' / 'chars' / 'val.bin')
    with open(root / 'data' / 'chars' / 'meta.pkl', 'wb') as f:
        pickle.dump({'vocab_size': len(CHARS), 'itos': dict(enumerate(CHARS)), 'stoi': stoi}, f)
    for name, run in RUNS.items():
        model_args = dict(n_layer=2, n_head=2, n_embd=32, block_size=run['block_size'], bias=run['bias'],
                          vocab_size=len(CHARS), dropout=0.0)
        torch.manual_seed(0)
        model = new_nanogpt(model_args, run['flash'])
        with torch.no_grad():  # random LayerNorm and bias values, so that every parameter matters
            for pname, p in model.named_parameters():
                if p.ndim == 1:
                    p.copy_(torch.randn_like(p) * 0.1 + (1.0 if 'ln_' in pname and pname.endswith('weight') else 0.0))
        if run['crop_to']:
            model.crop_block_size(run['crop_to'])
            model_args['block_size'] = run['crop_to']
        optimizer = model.configure_optimizers(WEIGHT_DECAY, SCHEDULE['learning_rate'], BETAS, 'cpu')
        for iter_num in range(ITERS):
            nanogpt_step(model, optimizer, iter_num, *batch(ids, model_args['block_size'], iter_num))
        checkpoint = {
            'model': {run['prefix'] + k: v for k, v in model.state_dict().items()},
            'optimizer': optimizer.state_dict(),
            'model_args': model_args,
            'iter_num': ITERS,
            'best_val_loss': torch.tensor(3.25),  # as nanoGPT keeps it: the tensor of its estimate_loss
            'config': dict(dataset='chars', batch_size=BATCH, block_size=model_args['block_size'],
                           weight_decay=WEIGHT_DECAY, beta1=BETAS[0], beta2=BETAS[1], **SCHEDULE),
        }
        os.makedirs(root / name)
        torch.save(checkpoint, root / name / 'ckpt.pt')
    return root


def train_args(root, out_dir, *extra):
    return [f'--out_dir={out_dir}', f'--data_root={root / "data"}', '--dataset=chars', '--device=cpu',
            '--cpu_devices=1', '--block_size=32', f'--batch_size={BATCH}', '--gradient_accumulation_steps=1',
            '--eval_iters=2', '--eval_interval=4', '--dropout=0.0', '--decay_lr=False', '--learning_rate=3e-3',
            *extra]


STEP = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)$", re.M)
ITER = re.compile(r"^iter (\d+): loss ([\d.]+),", re.M)


# -----------------------------------------------------------------------------
# nanoGPT -> here

@pytest.mark.parametrize('name', RUNS)
def test_loaded_model_gives_nanogpts_logits(name, root):
    meta, params, _ = read_nanogpt_checkpoint(str(root / name / 'ckpt.pt'), with_optimizer=False)
    checkpoint, model, _ = nanogpt_resume(root / name / 'ckpt.pt', RUNS[name]['flash'])
    assert any(k.endswith('.attn.bias') for k in checkpoint['model']) == (not RUNS[name]['flash'])  # mask buffers
    assert meta['model_args'] == {**checkpoint['model_args'], 'gelu_approximate': False}
    assert (meta['iter_num'], meta['best_val_loss'], meta['config']) == (ITERS, 3.25, checkpoint['config'])
    config = GPTConfig(**meta['model_args'])
    idx = np.random.default_rng(1).integers(0, config.vocab_size, (2, config.block_size))
    np.testing.assert_allclose(model_logits(config, params, jnp.asarray(idx)), nanogpt_logits(model, idx),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize('name', RUNS)
def test_next_update_is_torch_adamws(name, root):
    """From the checkpoint, one step of this port's optimizer (the schedule reading torch's step
    count) and one of nanoGPT's train.py on the same batch give the same loss and parameters."""
    meta, params, (count, mu, nu) = read_nanogpt_checkpoint(str(root / name / 'ckpt.pt'))
    assert int(count) == ITERS
    config = GPTConfig(**meta['model_args'])
    schedule = tu.lr_schedule(SCHEDULE['learning_rate'], True, SCHEDULE['warmup_iters'], SCHEDULE['lr_decay_iters'],
                              SCHEDULE['min_lr'])
    tx = tu.configure_optimizer(params, schedule, WEIGHT_DECAY, *BETAS, GRAD_CLIP)
    before = jax.tree.map(np.asarray, params)  # the step donates the state
    state = tu.create_train_state(config, params, tx).replace(opt_state=tu.AdamWState(jnp.asarray(count), mu, nu))
    x, y = batch(np.random.default_rng(2).integers(0, config.vocab_size, 1000), config.block_size, 0)
    state, loss = train_step(state, jnp.asarray(x[None], jnp.int32), jnp.asarray(y[None], jnp.int32),
                                jax.random.key(0))

    _, model, optimizer = nanogpt_resume(root / name / 'ckpt.pt', RUNS[name]['flash'])
    model.train()
    torch_loss = nanogpt_step(model, optimizer, ITERS, x, y)
    assert abs(float(loss) - torch_loss) < 1e-5
    expected = params_from_nanogpt({k: v.numpy() for k, v in model.state_dict().items()}, config)
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.params, before)
    assert min(jax.tree.leaves(moved)) > 1e-5  # every parameter moved further than the tolerance
    jax.tree.map(partial(np.testing.assert_allclose, atol=1e-5, rtol=0), state.params, expected)


def test_sample_greedy_gives_nanogpts_tokens(root, script_env):
    """sample_jax.py run where nanoGPT's sample.py runs (the dataset's meta.pkl under data/), greedy."""
    start = 'To be'
    p = run_script('sample_jax.py', ['--out_dir=compiled', '--device=cpu', '--num_samples=1', '--max_new_tokens=20',
                              '--top_k=1', f'--start={start}'], script_env, cwd=root)
    assert "Loading meta from data/chars/meta.pkl" in p.stdout
    _, model, _ = nanogpt_resume(root / 'compiled' / 'ckpt.pt')
    model.eval()
    with torch.no_grad():
        tokens = model.generate(torch.tensor([[CHARS.index(c) for c in start]]), 20, top_k=1)[0].tolist()
    assert f"\n{''.join(CHARS[i] for i in tokens)}\n---------------\n" in p.stdout


@pytest.fixture(scope='module')
def resumed(root, script_env, tmp_path_factory):
    """The cropped run without biases, resumed here to iter 8, then from this port's checkpoint to 12."""
    out_dir = tmp_path_factory.mktemp('resumed')
    shutil.copy(root / 'plain' / 'ckpt.pt', out_dir)
    first = run_script('train_jax.py', train_args(root, out_dir, '--init_from=resume', '--max_iters=8'), script_env).stdout
    second = run_script('train_jax.py', train_args(root, out_dir, '--init_from=resume', '--max_iters=12'), script_env).stdout
    return out_dir, first, second


def nanogpt_eval_loss(model, root, split, stream):
    """nanoGPT's loss on train_jax.py's evaluation batches at ITERS: of stream 1 (train) or 2 (val),
    eval_iters=2 batches in one draw."""
    data_path = str(root / 'data' / 'chars' / f'{split}.bin')
    starts = tu.batch_starts(data_path, 1337, ITERS, stream, (1, 2 * BATCH), 32)
    data = np.memmap(data_path, dtype=np.uint16, mode='r')
    windows = np.stack([data[i:i + 33] for i in starts[0]]).astype(np.int64)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor(windows[:, :-1]), torch.tensor(windows[:, 1:]))[1].item()


def test_train_resumes_a_nanogpt_run_then_its_own_checkpoint(resumed, root):
    """The resumed run starts with an evaluation (what --eval_only=True prints), which gives nanoGPT's
    losses; it learns and saves; resumed again, it continues from its own checkpoint."""
    out_dir, first, second = resumed
    assert f"reading nanoGPT's checkpoint {out_dir}/ckpt.pt" in first
    assert [int(i) for i, _ in ITER.findall(first)] == [4, 5, 6, 7, 8]
    steps = {int(s): (float(t), float(v)) for s, t, v in STEP.findall(first)}
    _, model, _ = nanogpt_resume(root / 'plain' / 'ckpt.pt', flash=False)
    for stream, split in ((1, 'train'), (2, 'val')):
        assert abs(steps[ITERS][stream - 1] - nanogpt_eval_loss(model, root, split, stream)) <= 1e-4, (split, steps)
    assert sorted(steps) == [4, 8] and steps[8][1] < steps[4][1] - 0.2, first  # it learns
    assert 'saving checkpoint' in first
    # the second resume takes this port's checkpoint, newer than ckpt.pt, which stays as it was
    assert "reading nanoGPT's" not in second
    assert [int(i) for i, _ in ITER.findall(second)] == [8, 9, 10, 11, 12]
    assert {int(s): (float(t), float(v)) for s, t, v in STEP.findall(second)}[8] == steps[8]
    assert sorted(os.listdir(out_dir)) == ['12', 'ckpt.pt', 'metrics.csv']
    assert file_hashes(out_dir)['ckpt.pt'] == file_hashes(root / 'plain')['ckpt.pt']


# -----------------------------------------------------------------------------
# here -> nanoGPT

def check_nanogpt_takes_it(ckpt_path, meta, config, state):
    """nanoGPT's GPT and AdamW load ckpt_path as its train.py resumes: the state's logits and moments,
    the optimizer state_dict nanoGPT's own has; then one of its training steps."""
    checkpoint, model, optimizer = nanogpt_resume(ckpt_path)
    assert sorted(checkpoint) == ['best_val_loss', 'config', 'iter_num', 'model', 'model_args', 'optimizer']
    assert checkpoint['model_args'] == {k: v for k, v in meta['model_args'].items() if k != 'gelu_approximate'}
    assert (checkpoint['iter_num'], checkpoint['best_val_loss'], checkpoint['config']) == \
        (meta['iter_num'], meta['best_val_loss'], meta['config'])
    assert list(checkpoint['model']) == list(new_nanogpt(checkpoint['model_args']).state_dict())
    idx = np.random.default_rng(3).integers(0, config.vocab_size, (2, config.block_size))
    exact = GPTConfig(**{**meta['model_args'], 'gelu_approximate': False})  # nanoGPT's GELU
    np.testing.assert_allclose(nanogpt_logits(model, idx), model_logits(exact, state.params, jnp.asarray(idx)),
                               atol=1e-5, rtol=0)
    # the layout of nanoGPT's own optimizer: the same groups and keys
    own = new_nanogpt(checkpoint['model_args']).configure_optimizers(WEIGHT_DECAY, 1e-3, BETAS, 'cpu').state_dict()
    without_lr = lambda groups: [{k: v for k, v in g.items() if k != 'lr'} for g in groups]  # nanoGPT sets it anew
    assert without_lr(checkpoint['optimizer']['param_groups']) == without_lr(own['param_groups'])
    exp_avg, exp_avg_sq = params_to_nanogpt(state.opt_state.mu), params_to_nanogpt(state.opt_state.nu)
    for name, p in model.named_parameters():
        s = optimizer.state[p]
        assert s['step'].item() == int(state.opt_state.count)
        np.testing.assert_array_equal(s['exp_avg'].numpy(), exp_avg[name], err_msg=name)
        np.testing.assert_array_equal(s['exp_avg_sq'].numpy(), exp_avg_sq[name], err_msg=name)
    model.train()
    before = model.transformer.wte.weight.detach().clone()
    x = np.random.default_rng(4).integers(0, config.vocab_size, (BATCH, config.block_size + 1))
    assert np.isfinite(nanogpt_step(model, optimizer, checkpoint['iter_num'], x[:, :-1], x[:, 1:]))
    assert not torch.equal(before, model.transformer.wte.weight)
    assert optimizer.state[model.transformer.wte.weight]['step'].item() == int(state.opt_state.count) + 1


def restored_state(out_dir):
    """(metadata, GPTConfig, train state) of this port's checkpoint in out_dir, on the host."""
    manager = checkpoints.checkpoint_manager(out_dir, read_only=True)
    checkpoint = checkpoints.newest_checkpoint(manager, nanogpt=False)
    config = GPTConfig(**checkpoint.meta['model_args'])
    tx = tu.configure_optimizer(param_shapes(config), tu.lr_schedule(1e-3, False, 0, 0, 0.0), 0.1, 0.9, 0.95, 1.0)
    abstract_state = jax.eval_shape(partial(tu.create_train_state, config, tx=tx), param_shapes(config))
    on_host = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract_state)
    return checkpoint.meta, config, checkpoints.restore_train_state(manager, checkpoint, abstract_state, on_host)


def test_export_hands_a_resumed_run_back_to_nanogpt(resumed, script_env, tmp_path):
    """export_nanogpt.py writes the run resumed here over the ckpt.pt it came from, older than it."""
    out_dir = tmp_path / 'out'
    shutil.copytree(resumed[0], out_dir)  # the fixture's files stay as they are, for the other tests
    p = run_script('export_nanogpt.py', [f'--out_dir={out_dir}'], script_env)
    assert f"wrote iter 12 of {out_dir} to {out_dir}/ckpt.pt" in p.stdout
    assert 'Warning' not in p.stderr, p.stderr  # torch's of read-only NumPy arrays among them
    check_nanogpt_takes_it(out_dir / 'ckpt.pt', *restored_state(out_dir))
    manager = checkpoints.checkpoint_manager(out_dir, read_only=True)
    assert checkpoints.newest_nanogpt_checkpoint(manager) is None  # the same state: a resume here keeps this port's
    os.utime(out_dir / 'ckpt.pt')  # as if nanoGPT had trained on and saved: then its ckpt.pt is the newest
    assert checkpoints.newest_nanogpt_checkpoint(manager) == f'{out_dir}/ckpt.pt'
    before = file_hashes(out_dir)
    p = run_script('export_nanogpt.py', [f'--out_dir={out_dir}'], script_env, check=False)
    assert (p.returncode, p.stderr) == (2, f"error: {out_dir}/ckpt.pt is newer than the checkpoint of {out_dir} "
                                           f"(iter 12), which would replace it: write it elsewhere with --ckpt_dir\n")
    assert file_hashes(out_dir) == before


def test_export_of_a_tanh_gelu_model(tmp_path, script_env):
    """A model started from OpenAI's weights computes the tanh GELU: exported with a note, and
    nanoGPT's model gives the logits of its weights with the exact GELU."""
    config = GPTConfig(block_size=16, vocab_size=96, n_layer=2, n_head=2, n_embd=32, bias=True, gelu_approximate=True)
    rng = np.random.default_rng(5)
    randoms = lambda scale: jax.tree.map(lambda s: (scale * rng.normal(size=s.shape)).astype(np.float32),
                                         param_shapes(config))
    # every parameter random (LayerNorms and biases too, so that each one matters), and the moments
    state = SimpleNamespace(params=randoms(0.1), opt_state=tu.AdamWState(
        count=np.int32(7), mu=randoms(0.01), nu=jax.tree.map(np.abs, randoms(1e-4))))
    model_args = {k: getattr(config, k) for k in ARCHITECTURE_KEYS + ('dropout',)}
    run_config = dict(dataset='chars', learning_rate=1e-3, weight_decay=WEIGHT_DECAY, beta1=BETAS[0], beta2=BETAS[1])
    meta = {'model_args': model_args, 'iter_num': 7, 'best_val_loss': 4.5, 'config': run_config}
    checkpoints.save_checkpoint(checkpoints.checkpoint_manager(tmp_path / 'out'), state, meta)

    p = run_script('export_nanogpt.py', [f'--out_dir={tmp_path / "out"}', f'--ckpt_dir={tmp_path / "nanogpt"}'], script_env)
    assert "note: this model computes the tanh GELU" in p.stdout
    check_nanogpt_takes_it(tmp_path / 'nanogpt' / 'ckpt.pt', meta, config, state)


# -----------------------------------------------------------------------------
# bad files: one line, exit code 2, nothing written

def bad_checkpoint(root, tmp_path, kind):
    """An out_dir holding a ckpt.pt of the given kind, made from the compiled run's."""
    out_dir = tmp_path / 'out'
    os.makedirs(out_dir)
    data = (root / 'compiled' / 'ckpt.pt').read_bytes()
    checkpoint = torch.load(root / 'compiled' / 'ckpt.pt')
    if kind == 'truncated':
        (out_dir / 'ckpt.pt').write_bytes(data[:len(data) // 2])
    elif kind == 'state_dict':  # a model's weights alone, as torch.save(model.state_dict()) writes them
        torch.save(checkpoint['model'], out_dir / 'ckpt.pt')
    elif kind == 'model_args':  # one layer more than the weights have
        torch.save({**checkpoint, 'model_args': {**checkpoint['model_args'], 'n_layer': 3}}, out_dir / 'ckpt.pt')
    else:
        (out_dir / 'ckpt.pt').write_bytes(data)
    return out_dir


BAD_FILES = {
    'truncated': "cannot read {out}/ckpt.pt (RuntimeError): it is cut short or damaged, or was not written by "
                 "torch.save",
    'state_dict': "{out}/ckpt.pt is not a checkpoint of nanoGPT's train.py: it has no model, optimizer, model_args, "
                  "iter_num, best_val_loss",
    'model_args': "{out}/ckpt.pt does not fit its model_args (n_layer=3, n_head=2, n_embd=32, block_size=32, "
                  "bias=True, vocab_size=65): it has no transformer.h.2.attn.c_attn.bias",
}


@pytest.mark.parametrize('kind', BAD_FILES)
def test_bad_checkpoint_is_refused_in_one_line(kind, root, tmp_path):
    out_dir = bad_checkpoint(root, tmp_path, kind)
    with pytest.raises(ValueError) as e:
        read_nanogpt_checkpoint(f'{out_dir}/ckpt.pt')
    assert str(e.value) == BAD_FILES[kind].format(out=out_dir)


BAD_RUNS = [
    ('model_args', [], BAD_FILES['model_args']),
    ('no_torch', [], "reading nanoGPT's checkpoint {out}/ckpt.pt needs PyTorch: pip install torch (the CPU wheel "
                     "is enough: pip install torch --index-url https://download.pytorch.org/whl/cpu)"),
    ('good', ['--init_from=scratch'], "out_dir '{out}' holds nanoGPT's checkpoint ckpt.pt: continue it with "
                                      "--init_from=resume, choose another --out_dir, or train anew beside it with "
                                      "--overwrite_checkpoint=True"),
]


@pytest.mark.parametrize('kind,args,message', BAD_RUNS, ids=[b[0] for b in BAD_RUNS])
def test_train_stops_with_one_line_and_writes_nothing(kind, args, message, root, script_env, tmp_path):
    out_dir = bad_checkpoint(root, tmp_path, kind)
    if kind == 'no_torch':  # a torch that cannot be imported, as when it is not installed
        (tmp_path / 'no_torch').mkdir()
        (tmp_path / 'no_torch' / 'torch.py').write_text("raise ModuleNotFoundError(\"No module named 'torch'\")\n")
        script_env = dict(script_env, PYTHONPATH=str(tmp_path / 'no_torch'))
    before = file_hashes(out_dir)
    p = run_script('train_jax.py', train_args(root, out_dir, '--init_from=resume', *args), script_env, check=False)
    assert (p.returncode, p.stderr) == (2, f"error: {message.format(out=out_dir)}\n")
    assert file_hashes(out_dir) == before
