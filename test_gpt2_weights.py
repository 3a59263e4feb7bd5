"""
Tests of loading GPT-2 weights in Hugging Face's format (from_pretrained, init_from=<gpt2 or a
folder> in train_jax.py and sample_jax.py) and of export_hf.py, against transformers' GPT-2 on
tiny random models saved with save_pretrained.

$ python -m pytest test_gpt2_weights.py -q
"""
import os
import re
import json
import shutil

import numpy as np
import pytest
import jax
import jax.numpy as jnp

import checkpoints
import jax_train_utils as tu
from gpt2_weights import from_pretrained
from jax_transformer import GPTConfig, ARCHITECTURE_KEYS, init_params
from jax_sampling import generate
from conftest import SHAKESPEARE, TIKTOKEN_CACHE, needs_shakespeare, run_script, model_logits

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
pytest.importorskip('safetensors')
tiktoken = pytest.importorskip('tiktoken')

STEP = re.compile(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)")


def make_hf_gpt2(path, **kwargs):
    """A random tiny GPT-2 from transformers, saved with save_pretrained (safetensors) to path."""
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, bos_token_id=None, eos_token_id=None,
                                  initializer_range=0.1, **kwargs)  # sharp logits: greedy picks are clear
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # random LayerNorm and bias values, so that every parameter matters
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if 'ln_' in name and name.endswith('weight') else 0.0))
    model.save_pretrained(path)
    return str(path), model


@pytest.fixture(scope='module')
def gpt2_bpe(tmp_path_factory):
    """GPT-2's vocabulary (tanh GELU, like OpenAI's), 128 positions."""
    return make_hf_gpt2(tmp_path_factory.mktemp('gpt2_bpe'), vocab_size=50257, n_positions=128)


@pytest.fixture(scope='module')
def gpt2_gelu(tmp_path_factory):
    """A small vocabulary, exact GELU, 16 positions."""
    return make_hf_gpt2(tmp_path_factory.mktemp('gpt2_gelu'), vocab_size=100, n_positions=16,
                        activation_function='gelu')


@pytest.fixture(scope='module')
def hub_cache(tmp_path_factory, gpt2_bpe):
    """A Hugging Face hub cache holding gpt2_bpe as openai-community/gpt2."""
    cache = tmp_path_factory.mktemp('hub')
    commit = '0' * 40
    repo = cache / 'models--openai-community--gpt2'
    (repo / 'snapshots' / commit).mkdir(parents=True)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(commit)
    for name in ('config.json', 'model.safetensors'):
        shutil.copy(os.path.join(gpt2_bpe[0], name), repo / 'snapshots' / commit / name)
    return str(cache)


@pytest.fixture(scope='module')
def data_root(tmp_path_factory, script_env):
    if not os.path.exists(SHAKESPEARE):
        pytest.skip(f"offline data not found at {SHAKESPEARE} (set NANOGPT_SHARED_DATA)")
    root = tmp_path_factory.mktemp('data')
    run_script('data/shakespeare/prepare.py', [f'--input={SHAKESPEARE}', f'--out_dir={root / "shakespeare"}'],
               script_env)
    return str(root)


def hf_logits(model, idx):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(idx))).logits.numpy()


def hf_greedy(model, ids, max_new_tokens):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0)
    return out[0].tolist()


def jax_greedy(config, params, ids, max_new_tokens):
    out = generate(params, config, jnp.array([ids]), jax.random.key(0), max_new_tokens, 1.0, 1)
    return np.asarray(out)[0].tolist()


# -----------------------------------------------------------------------------
# loading

@pytest.mark.parametrize('which', ['gpt2_bpe', 'gpt2_gelu'])
def test_load_folder_matches_transformers(which, request):
    path, model = request.getfixturevalue(which)
    config, params = from_pretrained(path)
    hf = model.config
    assert (config.n_layer, config.n_head, config.n_embd, config.block_size, config.vocab_size, config.bias) == \
        (hf.n_layer, hf.n_head, hf.n_embd, hf.n_positions, hf.vocab_size, True)
    assert config.gelu_approximate == (hf.activation_function == 'gelu_new')
    assert (config.dropout, config.dtype) == (0.0, 'float32')
    idx = np.random.default_rng(0).integers(0, config.vocab_size, (2, config.block_size))
    np.testing.assert_allclose(model_logits(config, params, idx), hf_logits(model, idx), atol=1e-5, rtol=0)


def test_load_openai_names_without_prefix(tmp_path, gpt2_gelu):
    # OpenAI's files on the hub name GPT2Model's tensors, and hold the attention mask buffers
    from safetensors.numpy import save_file
    from safetensors import safe_open
    path, _ = gpt2_gelu
    with safe_open(os.path.join(path, 'model.safetensors'), framework='numpy') as f:
        tensors = {k.removeprefix('transformer.'): f.get_tensor(k) for k in f.keys()}
    tensors['h.0.attn.bias'] = np.tril(np.ones((1, 1, 16, 16), np.float32))
    save_file(tensors, str(tmp_path / 'model.safetensors'))
    shutil.copy(os.path.join(path, 'config.json'), tmp_path)
    config, params = from_pretrained(str(tmp_path))
    expected_config, expected = from_pretrained(path)
    assert config == expected_config
    jax.tree.map(np.testing.assert_array_equal, params, expected)


def test_load_refuses_what_is_not_a_gpt2(tmp_path, gpt2_gelu):
    with pytest.raises(ValueError, match="neither one of gpt2"):
        from_pretrained(str(tmp_path / 'missing'))
    with pytest.raises(ValueError, match="no config.json"):
        from_pretrained(str(tmp_path))
    cfg = json.load(open(os.path.join(gpt2_gelu[0], 'config.json')))
    (tmp_path / 'config.json').write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no model.safetensors"):
        from_pretrained(str(tmp_path))
    shutil.copy(os.path.join(gpt2_gelu[0], 'model.safetensors'), tmp_path)
    for change, message in [({'model_type': 'gpt_neo'}, "not 'gpt2'"), ({'activation_function': 'relu'}, 'relu'),
                            ({'n_inner': 64}, 'n_inner'), ({'tie_word_embeddings': False}, 'tie_word_embeddings')]:
        (tmp_path / 'config.json').write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ValueError, match=message) as e:
            from_pretrained(str(tmp_path))
        assert '\n' not in str(e.value)


# -----------------------------------------------------------------------------
# sampling

def test_greedy_generate_matches_transformers(gpt2_bpe):
    path, model = gpt2_bpe
    config, params = from_pretrained(path)
    ids = [464, 3290, 318, 257, 1332]
    assert jax_greedy(config, params, ids, 20) == hf_greedy(model, ids, 20)


def test_greedy_generate_past_block_size(gpt2_gelu):
    # transformers cannot go past n_positions: up to it compare with transformers, then with
    # nanoGPT's generate, which runs the model on the last block_size tokens for each new one
    path, model = gpt2_gelu
    config, params = from_pretrained(path)
    ids = [5, 17, 42, 99, 3, 64, 0, 12, 80, 7]
    out = jax_greedy(config, params, ids, 20)
    assert out[:config.block_size] == hf_greedy(model, ids, config.block_size - len(ids))
    seq = list(ids)
    for _ in range(20):
        logits = model_logits(config, params, np.array([seq[-config.block_size:]]))
        seq.append(int(np.argmax(logits[0, -1])))
    assert out == seq


@needs_shakespeare
@pytest.mark.parametrize('source', ['folder', 'hub'])
def test_sample_script_greedy(source, gpt2_bpe, hub_cache, monkeypatch, script_env):
    path, model = gpt2_bpe
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', os.environ.get('TIKTOKEN_CACHE_DIR', TIKTOKEN_CACHE))
    enc = tiktoken.get_encoding('gpt2')
    start = "To be, or not to be"
    init_from = path if source == 'folder' else 'gpt2'
    p = run_script('sample_jax.py', [f'--init_from={init_from}', '--top_k=1', '--num_samples=1', '--max_new_tokens=20',
                                     f'--start={start}', '--device=cpu', '--dtype=float32'],
                   dict(script_env, HF_HUB_CACHE=hub_cache))
    if source == 'hub':
        assert "forcing vocab_size=50257, block_size=128, bias=True" in p.stdout
    expected = enc.decode(hf_greedy(model, enc.encode(start), 20))
    assert f"\n{expected}\n---------------\n" in p.stdout


# -----------------------------------------------------------------------------
# training from GPT-2 weights

def losses(stdout):
    return {int(m[1]): (float(m[2]), float(m[3])) for m in STEP.finditer(stdout)}


def latest_meta(out_dir):
    checkpoint = checkpoints.newest_checkpoint(checkpoints.checkpoint_manager(out_dir, read_only=True))
    return checkpoint.step, checkpoint.meta


# fine-tuning the tiny GPT-2 on Shakespeare; eval_only with the same arguments evaluates as that run compiled
FINETUNE = ['--dataset=shakespeare', '--device=cpu', '--eval_interval=3', '--eval_iters=2', '--batch_size=2',
            '--block_size=64', '--gradient_accumulation_steps=1', '--always_save_checkpoint=True',
            '--learning_rate=1e-3', '--decay_lr=False', '--dropout=0.1']


def test_finetune_then_resume(gpt2_bpe, data_root, tmp_path, script_env):
    """Fine-tuning (dropout 0.1, a cropped block size) learns, and resumes from its own checkpoint."""
    path, _ = gpt2_bpe
    out = str(tmp_path / 'out')
    common = FINETUNE + [f'--data_root={data_root}', f'--out_dir={out}']
    p = run_script('train_jax.py', [f'--init_from={path}', '--max_iters=6', *common], script_env)
    assert f"Initializing from OpenAI GPT-2 weights: {path}" in p.stdout
    assert "overriding dropout rate to 0.1" in p.stdout
    first = losses(p.stdout)
    assert sorted(first) == [0, 3, 6] and first[6][1] < first[0][1], p.stdout
    step, meta = latest_meta(out)
    assert step == 6
    assert meta['model_args'] == dict(n_layer=2, n_head=2, n_embd=32, block_size=64, bias=True,
                                      vocab_size=50257, dropout=0.1, gelu_approximate=True)

    p = run_script('train_jax.py', ['--init_from=resume', '--max_iters=9', *common], script_env)
    assert f"Resuming training from {out}" in p.stdout
    assert re.findall(r"^iter (\d+):", p.stdout, re.M) == ['6', '7', '8', '9']
    resumed = losses(p.stdout)
    assert sorted(resumed) == [6, 9]
    assert resumed[6] == first[6]
    step, meta = latest_meta(out)
    assert step == 9 and meta['model_args']['gelu_approximate'] is True


def test_eval_only_matches_transformers(gpt2_bpe, data_root, tmp_path, script_env):
    """--eval_only=True evaluates the model as loaded once, dropout off, and stops: the losses that
    transformers' GPT2LMHeadModel gives on the same batches (FINETUNE's arguments, so that the
    evaluation is the one the fine-tuning run compiled)."""
    path, model = gpt2_bpe
    p = run_script('train_jax.py', [f'--init_from={path}', '--eval_only=True', *FINETUNE, f'--data_root={data_root}',
                                    f'--out_dir={tmp_path / "out"}'], script_env)
    printed = losses(p.stdout)
    assert list(printed) == [0]
    batch_size, eval_iters, block_size, seed = 2, 2, 64, 1337  # FINETUNE's, and the default seed
    # train_jax.py's evaluation batches: the evaluation streams of iteration 0, eval_iters batches in one draw
    for i, split in enumerate(['train', 'val']):
        data_path = os.path.join(data_root, 'shakespeare', f'{split}.bin')
        starts = tu.batch_starts(data_path, seed, 0, tu.EVAL_STREAMS[split], (1, eval_iters * batch_size), block_size)
        x, y = (np.asarray(a[0]) for a in tu.get_batch(tu.make_mesh(), data_path, starts, block_size))
        logits = torch.tensor(hf_logits(model, x))
        expected = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), torch.tensor(y).long().view(-1))
        assert abs(printed[0][i] - expected.item()) <= 1e-4, (split, printed, expected.item())


# -----------------------------------------------------------------------------
# export

@pytest.mark.parametrize('config', [
    GPTConfig(block_size=32, vocab_size=65, n_layer=2, n_head=2, n_embd=32, bias=False, gelu_approximate=False),
    GPTConfig(block_size=48, vocab_size=50304, n_layer=2, n_head=4, n_embd=32, bias=True, gelu_approximate=True),
], ids=['char_no_bias', 'padded_vocab'])
def test_export_round_trip(config, tmp_path, script_env):
    import optax
    key = jax.random.key(0)
    params = init_params(config, key)
    # random LayerNorm and bias values, so that every parameter matters
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    model_args = {k: getattr(config, k) for k in ARCHITECTURE_KEYS + ('dropout',)}
    checkpoints.save_checkpoint(checkpoints.checkpoint_manager(tmp_path / 'out'),
                                tu.create_train_state(config, params, optax.adamw(1e-3)),
                                {'model_args': model_args, 'iter_num': 5, 'best_val_loss': 1.0, 'config': {}})

    hf_dir = str(tmp_path / 'hf')
    run_script('export_hf.py', [f'--out_dir={tmp_path / "out"}', f'--hf_dir={hf_dir}'], script_env)
    model, info = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    model.eval()
    assert model.config.activation_function == ('gelu_new' if config.gelu_approximate else 'gelu')
    idx = np.random.default_rng(0).integers(0, config.vocab_size, (2, config.block_size))
    expected = model_logits(config, params, idx)
    np.testing.assert_allclose(hf_logits(model, idx), expected, atol=1e-5, rtol=0)
    # and back: a bias=False model comes back with zero biases, computing the same
    loaded_config, loaded = from_pretrained(hf_dir)
    np.testing.assert_allclose(model_logits(loaded_config, loaded, idx), expected, atol=1e-6, rtol=0)


# -----------------------------------------------------------------------------
# command line errors

@pytest.mark.parametrize('init_from', ['/nonexistent', 'empty_folder', 'gpt2-medium'])
def test_bad_init_from(init_from, tmp_path, script_env):
    if init_from == 'empty_folder':
        init_from = str(tmp_path / 'empty')
        os.mkdir(init_from)
    os.mkdir(tmp_path / 'tokens')  # a dataset, so that the script gets to loading the model
    for split in ('train', 'val'):
        np.zeros(1000, np.uint16).tofile(tmp_path / 'tokens' / f'{split}.bin')
    p = run_script('train_jax.py', [f'--init_from={init_from}', f'--out_dir={tmp_path / "out"}', '--device=cpu',
                                    '--dataset=tokens', f'--data_root={tmp_path}'],
                   dict(script_env, HF_HUB_CACHE=str(tmp_path / 'hub')), check=False)  # an empty cache, offline
    assert p.returncode == 2, p.stdout + p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith('error: '), p.stderr
