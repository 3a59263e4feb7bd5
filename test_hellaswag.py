"""
Tests of hellaswag.py, eval_hellaswag.py and data/hellaswag/prepare.py on a dozen examples in
HellaSwag's own format and a tiny random GPT-2 of transformers: the loss of every ending equals
the one torch computes with transformers' GPT2LMHeadModel, whatever the padding, the batch and the
number of devices, and every bad input stops the scripts with one line.

$ python -m pytest test_hellaswag.py -q
"""
import os
import sys
import json
import random
import subprocess
import importlib.util
import shutil
import signal

import numpy as np
import pytest
import jax
from jax.sharding import NamedSharding, PartitionSpec as P

import hellaswag
from gpt2_weights import from_pretrained
from conftest import REPO, SHARED, SHAKESPEARE, TIKTOKEN_CACHE, run_script, metrics, cpu_devices
from test_interrupts import started, stop, answered, ended

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
tiktoken = pytest.importorskip('tiktoken')

if not os.path.isdir(TIKTOKEN_CACHE):
    pytest.skip(f"offline data not found at {SHARED} (set NANOGPT_SHARED_DATA)", allow_module_level=True)
NO_NETWORK = 'http://127.0.0.1:9'  # a proxy that refuses every connection


def make_examples(n, seed):
    """n examples in the schema of HellaSwag's jsonl files, with contexts and endings of many lengths."""
    rng = random.Random(seed)
    words = ("a man woman dog the ball roof ladder water boat kite paint brush rope slowly quickly then "
             "he she they is are was holds climbs throws pulls jumps sits on into over with").split()
    sentence = lambda lo, hi: ' '.join(rng.choices(words, k=rng.randint(lo, hi)))
    examples = []
    for i in range(n):
        ctx_a, ctx_b = sentence(4, 30).capitalize() + '.', sentence(0, 3)  # WikiHow contexts have no ctx_b
        examples.append({
            'ind': 24 + i, 'activity_label': rng.choice(['Roof shingle removal', 'Kite flying', 'Painting']),
            'ctx_a': ctx_a, 'ctx_b': ctx_b, 'ctx': f"{ctx_a} {ctx_b}".strip(), 'split': 'val',
            'split_type': rng.choice(['indomain', 'zeroshot']), 'label': rng.randrange(4),
            'endings': [sentence(1, 14) + '.' for _ in range(4)], 'source_id': f"activitynet~v_{i:011d}"})
    return examples


def write_jsonl(path, examples):
    with open(path, 'w') as f:
        for example in examples:
            f.write(json.dumps(example) + '\n')


@pytest.fixture(scope='module')
def enc():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('TIKTOKEN_CACHE_DIR', TIKTOKEN_CACHE)
        return tiktoken.get_encoding('gpt2')


@pytest.fixture(scope='module')
def examples():
    return make_examples(12, seed=4)  # on which the tiny GPT-2 below has acc 1/12 and acc_norm 5/12


@pytest.fixture(scope='module')
def data_root(tmp_path_factory, examples):
    root = tmp_path_factory.mktemp('data')
    (root / 'hellaswag').mkdir()
    write_jsonl(root / 'hellaswag' / 'hellaswag_val.jsonl', examples)
    return str(root)


@pytest.fixture(scope='module')
def gpt2(tmp_path_factory):
    """A tiny random GPT-2 with GPT-2's vocabulary, saved as a Hugging Face folder, and its torch model."""
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128, vocab_size=50257,
                                  bos_token_id=None, eos_token_id=None, initializer_range=0.1)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    path = tmp_path_factory.mktemp('gpt2')
    model.save_pretrained(path)
    return str(path), model


@pytest.fixture(scope='module')
def torch_scores(gpt2, examples, enc):
    """The summed and mean loss of every ending and acc, acc_norm, computed by torch, one unpadded row at a time."""
    model = gpt2[1]
    sums, means = np.zeros((len(examples), 4)), np.zeros((len(examples), 4))
    with torch.no_grad():
        for i, example in enumerate(examples):
            context = enc.encode(example['ctx'])
            for j, ending in enumerate(example['endings']):
                tokens = enc.encode(' ' + ending)
                logits = model(torch.tensor([context + tokens])).logits[0]
                losses = torch.nn.functional.cross_entropy(logits[len(context) - 1:-1], torch.tensor(tokens),
                                                           reduction='none')
                sums[i, j], means[i, j] = losses.sum().item(), losses.mean().item()
    labels = np.array([example['label'] for example in examples])
    return sums, means, np.mean(sums.argmin(1) == labels), np.mean(means.argmin(1) == labels)


@pytest.fixture(scope='module')
def model(gpt2):
    config, params = from_pretrained(gpt2[0])
    mesh = jax.make_mesh((jax.device_count(),), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
    return config, jax.device_put(params, NamedSharding(mesh, P())), mesh


@pytest.fixture(scope='module')
def scores(model, examples, enc):
    config, params, mesh = model
    rows = hellaswag.process_rows(examples, enc, config.block_size)  # rows of 64 tokens
    return hellaswag.evaluate(params, config, rows, mesh, batch_size=3)


def env(**extra):
    return {**os.environ, 'TIKTOKEN_CACHE_DIR': TIKTOKEN_CACHE, 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1',
            'JAX_PLATFORMS': 'cpu', **extra}


def test_render_and_pack(enc, examples):
    example = examples[0]
    context = enc.encode(example['ctx'])
    rows = hellaswag.render(example, enc)
    for (tokens, mask), ending in zip(rows, example['endings']):
        ending_tokens = enc.encode(' ' + ending)
        assert tokens == context + ending_tokens
        assert mask == [0] * len(context) + [1] * len(ending_tokens)
    longest = max(len(tokens) for tokens, _ in rows)
    tokens, mask = hellaswag.pack([rows], longest + 3)
    for j, (row, row_mask) in enumerate(rows):
        assert tokens[0, j].tolist() == row + [0] * (longest + 3 - len(row))
        assert mask[0, j].tolist() == row_mask + [0] * (longest + 3 - len(row))
    tokens, mask = hellaswag.pack([rows], 5)  # too long: the last 5 tokens, all of the ending's that fit
    for j, (row, row_mask) in enumerate(rows):
        assert tokens[0, j].tolist() == row[-5:] and mask[0, j].tolist() == row_mask[-5:]


def test_losses_equal_transformers(scores, torch_scores):
    sums, means, acc, acc_norm = torch_scores
    result = scores
    np.testing.assert_allclose(result['sum_loss'], sums, rtol=0, atol=1e-4)
    np.testing.assert_allclose(result['mean_loss'], means, rtol=0, atol=1e-4)
    assert result['count'] == 12
    assert (result['acc'], result['acc_norm']) == (acc, acc_norm) == (1 / 12, 5 / 12)


def test_padding_and_batch_do_not_change_the_scores(model, examples, enc, scores):
    # half the examples, in rows of 96 tokens instead of 64, 5 a step: the second step holds 1
    config, params, mesh = model
    rows = hellaswag.process_rows(examples[:6], enc, config.block_size, length=96)
    padded = hellaswag.evaluate(params, config, rows, mesh, batch_size=5)
    np.testing.assert_allclose(padded['sum_loss'], scores['sum_loss'][:6], rtol=1e-6, atol=0)
    np.testing.assert_allclose(padded['mean_loss'], scores['mean_loss'][:6], rtol=1e-6, atol=0)


def test_scoring_again_traces_nothing(model, examples, enc, scores):
    """Training scores the same rows every hellaswag_interval: the model is traced and compiled
    once in a run, not at every evaluation."""
    config, params, mesh = model
    rows = hellaswag.process_rows(examples, enc, config.block_size)  # those of scores
    traced = []
    def count(event, seconds, **kwargs):
        if event == '/jax/core/compile/jaxpr_trace_duration':
            traced.append(kwargs.get('fun_name'))
    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        again = hellaswag.evaluate(params, config, rows, mesh, batch_size=3)
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert 'row_losses' not in traced
    np.testing.assert_array_equal(again['sum_loss'], scores['sum_loss'])


def test_eval_script_on_two_devices(gpt2, data_root, torch_scores):
    # the script run in a process with 2 CPU devices, its result read from its globals
    sums, means, acc, acc_norm = torch_scores
    args = [f'--init_from={gpt2[0]}', f'--data_root={data_root}', '--batch_size=3', '--device=cpu',
            '--compilation_cache=']
    code = (f"import json, runpy, sys; sys.argv = ['eval_hellaswag.py'] + {args!r}; "
            f"g = runpy.run_path('eval_hellaswag.py', run_name='__main__'); "
            f"print(json.dumps(g['result']['sum_loss'].tolist()))")
    p = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=env(XLA_FLAGS=cpu_devices(2)))
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert 'scoring 12 examples on 2 device(s)' in lines
    assert f"hellaswag: acc {acc:.4f}, acc_norm {acc_norm:.4f} over 12 examples" in lines
    np.testing.assert_allclose(np.array(json.loads(lines[-1])), sums, rtol=0, atol=1e-4)


def test_a_stop_while_scoring_is_one_line(gpt2, data_root, script_env):
    p = started('eval_hellaswag.py', [f'--init_from={gpt2[0]}', f'--data_root={data_root}', '--compilation_cache='],
                script_env)
    sent = stop(p, signal.SIGINT, 'scoring 12 examples')
    answered(p, sent, '^C received: stopped')
    assert ended(p, 130, within=3) == ['^C received: stopped']


def test_bad_inputs_stop_with_one_line(tmp_path, data_root, examples):
    bad = tmp_path / 'bad'
    bad.mkdir()
    (bad / 'hellaswag').mkdir()
    three_endings = dict(examples[1], endings=examples[1]['endings'][:3])
    write_jsonl(bad / 'hellaswag' / 'hellaswag_val.jsonl', [examples[0], three_endings])
    (tmp_path / 'not.jsonl').write_text('<html>404</html>\n')
    (tmp_path / 'empty_cache').mkdir()
    no_network = dict(HTTPS_PROXY=NO_NETWORK, https_proxy=NO_NETWORK, HTTP_PROXY=NO_NETWORK, http_proxy=NO_NETWORK)
    prepare = 'data/hellaswag/prepare.py'
    cases = [  # script, args, env, what the error says
        ('eval_hellaswag.py', ['--init_from=gpt2', f'--data_root={tmp_path}'], {},
         f"{tmp_path}/hellaswag/hellaswag_val.jsonl not found: prepare it first with `python "
         f"data/hellaswag/prepare.py --out_dir={tmp_path}/hellaswag`"),
        ('eval_hellaswag.py', ['--init_from=gpt2', f'--data_root={bad}'], {},
         f"{bad}/hellaswag/hellaswag_val.jsonl, line 2: not a HellaSwag example"),
        ('eval_hellaswag.py', ['--init_from=gpt2', f'--data_root={data_root}'],
         dict(no_network, TIKTOKEN_CACHE_DIR=str(tmp_path / 'empty_cache')),
         f"cannot load the GPT-2 tokenizer: tiktoken finds its files neither in its cache {tmp_path}/empty_cache"),
        ('eval_hellaswag.py', ['--init_from=gpt2', f'--data_root={data_root}', '--device=cpu'],
         dict(HF_HUB_CACHE=str(tmp_path / 'empty_cache')),
         "cannot get openai-community/gpt2 from the Hugging Face hub"),
        (prepare, [f'--out_dir={tmp_path}/out'], no_network,
         "cannot download https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"),
        (prepare, [f'--input={tmp_path}/not.jsonl', f'--out_dir={tmp_path}/out'], {},
         f"{tmp_path}/not.jsonl, line 1: not JSON"),
    ]
    procs = [subprocess.Popen([sys.executable, script, *args], cwd=REPO, env=env(**extra), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for script, args, extra, _ in cases]
    for (script, args, _, message), p in zip(cases, procs):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 2 and len(err.splitlines()) == 1 and err.startswith(f"error: {message}"), \
            (script, args, p.returncode, err)
    assert not os.path.exists(tmp_path / 'out' / 'hellaswag_val.jsonl')


def test_prepare_checks_and_copies_a_local_copy(tmp_path, data_root, monkeypatch, capsys):
    monkeypatch.setattr(sys, 'path', list(sys.path))  # the script puts data/ and the repo root on it
    spec = importlib.util.spec_from_file_location('hellaswag_prepare', os.path.join(REPO, 'data', 'hellaswag', 'prepare.py'))
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    source = os.path.join(data_root, 'hellaswag', 'hellaswag_val.jsonl')
    assert prepare.prepare(source, str(tmp_path)) == 12
    assert f"{tmp_path}/hellaswag_val.jsonl holds 12 examples" in capsys.readouterr().out
    with open(source, 'rb') as f, open(tmp_path / 'hellaswag_val.jsonl', 'rb') as g:
        assert f.read() == g.read()
    assert os.listdir(tmp_path) == ['hellaswag_val.jsonl']


def test_training_scores_hellaswag_as_it_goes(gpt2, data_root, torch_scores, script_env, tmp_path):
    """--hellaswag_interval: fine-tuning the tiny GPT-2 on Shakespeare scores HellaSwag every 3
    iterations beside the val loss (at iteration 0 the scores torch computed for the same weights),
    writes them to metrics.csv, which plot_jax.py draws in a panel of its own, and still learns."""
    shakespeare = tmp_path / 'data'
    shutil.copytree(data_root, shakespeare)
    run_script('data/shakespeare/prepare.py', [f'--input={SHAKESPEARE}', f'--out_dir={shakespeare / "shakespeare"}'],
               script_env)
    out = run_script('train_jax.py', [f'--init_from={gpt2[0]}', '--dataset=shakespeare', f'--data_root={shakespeare}',
                                      f'--out_dir={tmp_path / "out"}', '--device=cpu', '--block_size=64',
                                      '--batch_size=4', '--gradient_accumulation_steps=1', '--eval_iters=2',
                                      '--eval_interval=3', '--hellaswag_interval=3', '--max_iters=6',
                                      '--learning_rate=1e-3', '--decay_lr=False'], script_env).stdout
    _, _, acc, acc_norm = torch_scores
    assert f"step 0: hellaswag acc_norm {acc_norm:.4f}, acc {acc:.4f} (12 examples)" in out
    rows = metrics(tmp_path / 'out', ('iter', 'val_loss', 'hellaswag_acc', 'hellaswag_acc_norm'))
    scored = [(int(i), float(a), float(n)) for i, _, a, n in rows if n]
    assert [i for i, _, _ in scored] == [0, 3, 6] and scored[0][1:] == pytest.approx((acc, acc_norm), abs=1e-6)
    val = [float(v) for _, v, _, _ in rows if v]
    assert len(val) == 3 and val[2] < val[0]
    run_script('plot_jax.py', [f'--out_dir={tmp_path / "out"}'], script_env)
    png = (tmp_path / 'out' / 'loss.png').read_bytes()
    assert png[16:24] == (800).to_bytes(4, 'big') + (800).to_bytes(4, 'big')  # two panels: 8 x 8 inches at 100 dpi
