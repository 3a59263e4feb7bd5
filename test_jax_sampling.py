"""Tests of jax_sampling.py and sample_jax.py: generation against nanoGPT's generate, in one call
and in chunks, from a prompt buffer of any length; stop strings, streaming and prompt after prompt,
on tiny models, one of them made to write a known text.
$ python -m pytest -q test_jax_sampling.py
"""
import os
import queue
import re
import subprocess
import sys
import threading

import numpy as np
import pytest
import jax
import jax.numpy as jnp

import checks
from gpt2_weights import save_pretrained
from jax_transformer import GPTConfig, init_params, param_shapes
from jax_sampling import generate, generate_stream, printable_end, prompt_buffer, sample_token, stop_tables
from conftest import REPO, TIKTOKEN_CACHE, nanogpt_model, run_script, start_script
from test_jax_transformer import TINY, randomized

GPT2_TINY = GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=32)  # GPT-2's vocabulary
SEPARATOR = '---------------\n'  # after each sample sample_jax.py prints


def numpy_params(config, seed, vector_std=0.0):
    """Params of config's shapes drawn with NumPy, which compiles nothing (init_params compiles an
    op per shape, seconds for GPT-2's vocabulary): weights N(0, 0.02), LayerNorm scales 1 and
    biases 0, plus N(0, vector_std) noise."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if len(leaf.shape) > 1:
            return rng.normal(0.0, 0.02, leaf.shape).astype(np.float32)
        return ((path[-1].key == 'scale') + rng.normal(0.0, vector_std, leaf.shape)).astype(np.float32)
    return jax.tree_util.tree_map_with_path(draw, param_shapes(config))


@pytest.mark.parametrize('prompt_len,max_new_tokens', [(20, 30), (40, 6)])
def test_sampling_follows_nanogpts_generate(prompt_len, max_new_tokens, monkeypatch):
    """The cached generation samples the tokens of nanoGPT's generate (its model.py, the same weights)
    given the same random draws: torch.multinomial there draws with the Gumbel noise sample_token
    adds to the logits here. (20, 30) fills the key/value cache, then slides nanoGPT's window past
    block_size 32; (40, 6) starts with a prompt longer than block_size. The same in chunks from a
    prompt padded to block_size, as prompt after prompt samples (a shape that fits any prompt)."""
    import torch
    from nanogpt_checkpoints import params_to_nanogpt
    nanogpt = nanogpt_model()
    torch.manual_seed(0)
    model = nanogpt.GPT(nanogpt.GPTConfig(block_size=TINY.block_size, vocab_size=TINY.vocab_size, n_layer=2,
                                          n_head=4, n_embd=48, bias=True, dropout=0.0)).eval()
    params = randomized(init_params(TINY, jax.random.key(0)), jax.random.key(1), scale=0.5)
    # every matrix 10 times nanoGPT's init: sharp logits (the top_k cut matters), and attention that makes each
    # token depend on the context (a cache that lost it would not sample these tokens)
    params = jax.tree.map(lambda p: p * 10 if p.ndim == 2 else p, params)
    weights = params_to_nanogpt(params)
    model.load_state_dict({**{k: torch.tensor(v) for k, v in weights.items()},
                           'lm_head.weight': torch.tensor(weights['transformer.wte.weight'])})
    idx = np.random.default_rng(3).integers(0, TINY.vocab_size, (3, prompt_len))
    key = jax.random.key(7)
    for temperature, top_k in ((1.0, None), (1.5, 1), (0.7, 5)):  # top_k=1 is greedy
        keys = jax.random.split(key, max_new_tokens)
        draws = iter(np.array(jax.random.gumbel(k, (3, TINY.vocab_size))) for k in keys)
        gumbel_max = lambda probs, num_samples: torch.argmax(torch.log(probs) + torch.from_numpy(next(draws)), -1,
                                                             keepdim=True)
        monkeypatch.setattr(torch, 'multinomial', gumbel_max)
        with torch.no_grad():
            want = model.generate(torch.tensor(idx), max_new_tokens, temperature, top_k).numpy()
        got = generate(params, TINY, jnp.asarray(idx, jnp.int32), key, max_new_tokens, temperature, top_k)
        np.testing.assert_array_equal(got, want, err_msg=f"temperature {temperature}, top_k {top_k}")
    # the last draws again, in chunks of 4, from a prompt buffer that fits any prompt (block_size tokens)
    prompt, length = prompt_buffer(idx, TINY.block_size)
    *_, (tokens, step, _) = generate_stream(params, TINY, prompt, length, key, max_new_tokens, temperature, top_k,
                                            chunk=4)
    assert step == max_new_tokens
    np.testing.assert_array_equal(tokens[:, length:length + max_new_tokens], want[:, prompt_len:])


def test_top_p_keeps_the_fewest_tokens_adding_up_to_p():
    logits = jnp.log(jnp.array([[[0.05, 0.5, 0.15, 0.3]]]))  # (1, 1, 4)
    keys = jax.random.split(jax.random.key(0), 4000)
    for top_p, kept in ((0.4, [1]), (0.7, [1, 3]), (0.9, [1, 3, 2]), (1.0, [1, 3, 2, 0])):
        tokens = jax.vmap(lambda k: sample_token(logits, k, 1.0, None, top_p))(keys)
        freq = np.bincount(np.ravel(tokens), minlength=4) / len(keys)
        want = np.zeros(4)
        want[kept] = np.exp(np.asarray(logits[0, 0]))[kept] / np.exp(np.asarray(logits[0, 0]))[kept].sum()
        np.testing.assert_allclose(freq, want, atol=0.03, err_msg=f"top_p {top_p}")


# -----------------------------------------------------------------------------
# stop strings

def test_the_stop_key_splits_at_bars_outside_special_tokens():
    assert checks.stop_strings('') == []
    assert checks.stop_strings('\n\n') == ['\n\n']
    assert checks.stop_strings('ld!|<|endoftext|>|END') == ['ld!', '<|endoftext|>', 'END']
    assert checks.stop_strings(['a|b', '<|endoftext|>']) == ['a|b', '<|endoftext|>']  # a list, from a config file


def test_printable_end_holds_back_what_may_begin_a_stop_string():
    stops = [b'\n\n', b'END']
    prompt = b'>\n'  # the prompt's bytes come first; a stop string there does not count
    assert printable_end(prompt + b'a\n', stops, 2, False) == (3, False)  # '\n' may begin '\n\n'
    assert printable_end(prompt + b'a\nEN', stops, 2, False) == (4, False)  # 'EN' may begin 'END'
    assert printable_end(prompt + b'a\nEN', stops, 2, True) == (6, True)  # the last token: all of it
    assert printable_end(prompt + b'a\nEND\n\n', stops, 2, False) == (4, True)  # the first to begin
    assert printable_end(prompt, stops, 2, False) == (2, False)  # the prompt's '\n' is not held back
    assert printable_end(b'\n\n', stops, 2, False) == (2, False)
    assert printable_end(b'\n\n\n', stops, 2, False) == (2, False)
    assert printable_end(b'\n\n\n\n', stops, 2, False) == (2, True)


# every token's bytes for TINY's 96 ids: tokens of several bytes, and the two bytes of 'é' apart and together
SMALL_PIECES = [b'a', b'b', b'ab', b'ba', b'abc', b'\xc3', b'\xa9', b'c\xc3', b'\xc3\xa9', b'', b'c', b'cc']


def test_each_row_stops_where_its_first_stop_string_ends():
    """A row is done at the token where the first of its stop strings ends, inside a token or at its
    end, begun tokens earlier; generation ends when every row is done, before max_new_tokens. The
    reference: the same generation without stop strings (which follows nanoGPT's generate), its
    bytes searched on the host."""
    pieces = [SMALL_PIECES[i % len(SMALL_PIECES)] for i in range(TINY.vocab_size)]
    stops = [b'bab', b'\xa9c']
    params = numpy_params(TINY, 0, vector_std=0.1)
    idx = np.random.default_rng(0).integers(0, TINY.vocab_size, (6, 4))
    key, max_new_tokens = jax.random.key(3), 28  # all within block_size: the cache alone
    unstopped = generate(params, TINY, idx, key, max_new_tokens)[:, 4:]
    want, inside = [], []  # each row: the tokens generated when it is done; whether the stop ends inside a token
    for row in unstopped:
        text = b''.join(pieces[t] for t in row)
        end = min(text.find(stop) + len(stop) for stop in stops if stop in text)
        token_ends = np.cumsum([len(pieces[t]) for t in row])
        want.append(int(np.searchsorted(token_ends, end)) + 1)
        inside.append(end not in token_ends)
    assert max(want) < max_new_tokens and any(inside) and not all(inside)
    prompt, length = prompt_buffer(idx, 4)
    for chunk in (1, None):
        done_at = {}
        for tokens, step, done in generate_stream(params, TINY, prompt, length, key, max_new_tokens,
                                                  stops=stop_tables(pieces, stops), chunk=chunk):
            done_at.update({row: step for row in np.flatnonzero(done) if row not in done_at})
        assert step == max(want)  # the generation stopped there
        np.testing.assert_array_equal(tokens[:, 4:4 + step], unstopped[:, :step])
        if chunk == 1:
            assert [done_at[row] for row in range(6)] == want


@pytest.fixture(scope='module')
def enc():
    """GPT-2's encoding from the offline tiktoken cache."""
    tiktoken = pytest.importorskip('tiktoken')
    if not os.path.isdir(TIKTOKEN_CACHE):
        pytest.skip(f"the tiktoken cache is not at {TIKTOKEN_CACHE} (set NANOGPT_SHARED_DATA)")
    with pytest.MonkeyPatch.context() as env:
        env.setenv('TIKTOKEN_CACHE_DIR', TIKTOKEN_CACHE)
        return tiktoken.get_encoding('gpt2')


@pytest.fixture(scope='module')
def tape(enc):
    """The tokens a tape model writes at positions 1, 2, ...: 'é' as its two bytes apart, and the
    end-of-text token."""
    e_acute = [enc.encode_single_token(b'\xc3'), enc.encode_single_token(b'\xa9')]
    return enc.encode('Hi Hello') + e_acute + enc.encode(' world, ld\n\n') + [enc.eot_token] + enc.encode(' More text')


def tape_params(config, tape):
    """Params of a GPT that writes tape[p] at every position p >= 1, whatever came before: its blocks
    add nothing (every c_proj is zero), and the embedding of position p - 1 points 10 times further
    than anything else along an axis that, of all token embeddings (tied to the output), only
    tape[p]'s has: a logit ~50 above all others."""
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: np.zeros_like(p) if 'c_proj' in jax.tree_util.keystr(path) else p, numpy_params(config, 0))
    axis = {token: i for i, token in enumerate(dict.fromkeys(tape))}
    assert len(axis) <= config.n_embd
    wte, wpe = params['wte']['embedding'], np.zeros((config.block_size, config.n_embd), np.float32)
    for token, i in axis.items():
        wte[token] = 10 * np.eye(config.n_embd)[i]
    for p in range(1, len(tape)):
        wpe[p - 1] = 100 * np.eye(config.n_embd)[axis[tape[p]]]
    return dict(params, wpe={'embedding': wpe})


def test_end_of_text_stops_at_the_end_of_text_token(enc, tape):
    """With GPT-2's vocabulary the stop string <|endoftext|> is the end-of-text token 50256; the rows
    stop there and the generation ends, 8 tokens before max_new_tokens."""
    pieces = [enc.decode_single_token_bytes(i) for i in range(enc.n_vocab)]
    params = tape_params(GPT2_TINY, tape)
    prompt, length = prompt_buffer(np.tile(enc.encode('Hi'), (2, 1)), 1)
    for chunk in (4, None):
        *_, (tokens, step, done) = generate_stream(params, GPT2_TINY, prompt, length, jax.random.key(0), 17,
                                                   stops=stop_tables(pieces, [b'<|endoftext|>']), chunk=chunk)
        assert step == tape.index(50256) == 9 and done.all()
        np.testing.assert_array_equal(tokens[:, :1 + step], np.tile(tape[:10], (2, 1)))


# -----------------------------------------------------------------------------
# sample_jax.py

@pytest.fixture(scope='module')
def tape_model(tape, tmp_path_factory):
    """tape_params as a Hugging Face GPT-2 folder."""
    folder = str(tmp_path_factory.mktemp('tape_model'))
    save_pretrained(tape_params(GPT2_TINY, tape), GPT2_TINY, folder)
    return folder


@pytest.fixture(scope='module')
def random_model(tmp_path_factory):
    """A random GPT-2 of GPT2_TINY's shape as a Hugging Face GPT-2 folder."""
    folder = str(tmp_path_factory.mktemp('random_model'))
    save_pretrained(numpy_params(GPT2_TINY, 1, vector_std=0.1), GPT2_TINY, folder)
    return folder


def samples(stdout):
    """The text sample_jax.py prints after its preamble."""
    return stdout.split('assuming GPT-2 encodings...\n', 1)[1]


def test_streamed_samples_are_those_of_one_call(random_model, script_env):
    """With a fixed seed, the samples printed as they are written, 4 tokens per device call, one
    after the other, are those printed at the end of one call: cut before the first stop string
    each writes (the rows stop at different tokens), and with a byte that is no character."""
    args = [f'--init_from={random_model}', '--num_samples=3', '--max_new_tokens=30', '--start=Once upon',
            '--stop=Rash|marches|Host']
    printed = samples(run_script('sample_jax.py', args, script_env).stdout)
    streamed = samples(run_script('sample_jax.py', args + ['--stream=True', '--stream_chunk=4'], script_env).stdout)
    assert streamed == printed
    texts = printed.split(SEPARATOR)[:3]
    assert not any(stop in text for text in texts for stop in ('Rash', 'marches', 'Host'))
    assert len({len(text) for text in texts}) == 3 and '\ufffd' in printed


def test_interactive_streams_prompt_after_prompt_and_compiles_once(tape_model, tape, enc, script_env, tmp_path):
    """Over a pipe, each line is a start text, sampled and printed a token at a time as soon as it is
    read; three start texts of 1, 2 and 3 tokens give the tape from their lengths on, printed whole
    characters at a time (the two bytes of 'é' come in two tokens; the second alone is no character),
    'ld' held back until it cannot begin 'ld!', ending before <|endoftext|>. The programs the first
    one compiled (into a new compilation cache) are all the others need."""
    cache = tmp_path / 'cache'
    p = start_script('sample_jax.py', [f'--init_from={tape_model}', '--interactive=True', '--num_samples=2',
                                       '--cpu_devices=2',  # a sample per device, as where num_samples splits
                                       '--max_new_tokens=16', '--stream_chunk=1', '--stop=ld!|<|endoftext|>'],
                     dict(script_env, JAX_COMPILATION_CACHE_DIR=str(cache)), stdin=subprocess.PIPE)
    lines = queue.Queue()  # stdout's lines, then None at its end
    threading.Thread(target=lambda: [lines.put(line) for line in p.stdout] + [lines.put(None)], daemon=True).start()

    def read_samples(n):  # stdout up to the end of n samples
        out = []
        while out.count(SEPARATOR) < n:
            out.append(lines.get(timeout=120))
            assert out[-1] is not None, p.stderr.read()
        return ''.join(out)

    def answer(text):  # the two samples the tape model writes after text, decoded by tiktoken
        ids = enc.encode(text)
        sample = enc.decode(ids + tape[len(ids):])
        return 2 * f"{sample[:sample.index('<|endoftext|>')]}\n{SEPARATOR}"

    p.stdin.write('Hi\n')
    p.stdin.flush()
    assert samples(read_samples(2)) == answer('Hi') == 2 * f"Hi Hello\u00e9 world, ld\n\n\n{SEPARATOR}"
    programs = sorted(os.listdir(cache))
    assert [name.split('-')[0] for name in programs].count('jit_generate_chunk') == 1
    p.stdin.write('To be\nTo be or\n')
    p.stdin.close()
    assert read_samples(4) == answer('To be') + answer('To be or')
    assert answer('To be or').startswith('To be or\ufffd world')
    assert p.wait(timeout=60) == 0 and lines.get(timeout=60) is None
    assert sorted(os.listdir(cache)) == programs  # nothing compiled for the next start texts


def test_interactive_with_stdin_ended_or_closed(tape_model, script_env):
    """stdin at its end at once is the end of the session: nothing to sample, exit 0. A closed
    stdin (<&-) is a mistake in how the script was started: one line, exit 2."""
    args = [sys.executable, os.path.join(REPO, 'sample_jax.py'), f'--init_from={tape_model}', '--interactive=True']
    empty = subprocess.run(args, env=script_env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert empty.returncode == 0 and samples(empty.stdout) == '' and empty.stderr == ''
    closed = subprocess.run(['bash', '-c', 'exec "$@" <&-', 'bash'] + args, env=script_env, capture_output=True,
                            text=True, timeout=300)
    assert closed.returncode == 2 and closed.stderr == ("error: interactive=True reads the start texts from stdin, "
                                                        "which is closed: pipe them in or type them\n")


def test_samples_that_cannot_fit_in_memory_stop_before_any_work(random_model, script_env):
    """200,000 samples at once: the generation's compiled programs need more memory than the machine
    has, which is known before they run: one line with both figures, exit code 1, no sample."""
    args = [f'--init_from={random_model}', '--num_samples=200000', '--max_new_tokens=2', '--start=Hi',
            '--cpu_devices=2']
    p = run_script('sample_jax.py', args, script_env, check=False)
    assert p.returncode == 1 and re.fullmatch(
        r"error: sampling needs [\d,.]+ GiB of memory \(2 CPU devices x [\d,.]+ GiB\), more than the [\d,.]+ GiB "
        r"available: try fewer --num_samples at a time\n", p.stderr), p.stderr[-3000:]
    assert samples(p.stdout) == ''
