"""Tests of jax_sampling.py: generation against nanoGPT's generate, nucleus sampling.
$ python -m pytest -q test_jax_sampling.py
"""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

from jax_transformer import init_params
from jax_sampling import generate, sample_token
from conftest import nanogpt_model
from test_jax_transformer import TINY, randomized


@pytest.mark.parametrize('prompt_len,max_new_tokens', [(20, 30), (40, 6)])
def test_sampling_follows_nanogpts_generate(prompt_len, max_new_tokens, monkeypatch):
    """The cached generation samples the tokens of nanoGPT's generate (its model.py, the same weights)
    given the same random draws: torch.multinomial there draws with the Gumbel noise sample_token
    adds to the logits here. (20, 30) fills the key/value cache, then slides nanoGPT's window past
    block_size 32; (40, 6) starts with a prompt longer than block_size."""
    import torch
    from nanogpt_checkpoints import params_to_nanogpt
    nanogpt = nanogpt_model()
    torch.manual_seed(0)
    model = nanogpt.GPT(nanogpt.GPTConfig(block_size=TINY.block_size, vocab_size=TINY.vocab_size, n_layer=2,
                                          n_head=4, n_embd=48, bias=True, dropout=0.0)).eval()
    params = randomized(init_params(TINY, jax.random.key(0)), jax.random.key(1), scale=0.5)
    params = dict(params, wte={'embedding': params['wte']['embedding'] * 10})  # sharp logits: the top_k cut matters
    weights = params_to_nanogpt(params)
    model.load_state_dict({**{k: torch.from_numpy(v) for k, v in weights.items()},
                           'lm_head.weight': torch.from_numpy(weights['transformer.wte.weight'])})
    idx = np.random.default_rng(3).integers(0, TINY.vocab_size, (3, prompt_len))
    key = jax.random.key(7)
    for temperature, top_k in ((1.0, None), (0.7, 5), (1.5, 1)):  # top_k=1 is greedy
        keys = jax.random.split(key, max_new_tokens)
        draws = iter(np.asarray(jax.random.gumbel(k, (3, TINY.vocab_size))) for k in keys)
        gumbel_max = lambda probs, num_samples: torch.argmax(torch.log(probs) + torch.from_numpy(next(draws)), -1,
                                                             keepdim=True)
        monkeypatch.setattr(torch, 'multinomial', gumbel_max)
        with torch.no_grad():
            want = model.generate(torch.tensor(idx), max_new_tokens, temperature, top_k).numpy()
        got = generate(params, TINY, jnp.asarray(idx, jnp.int32), key, max_new_tokens, temperature, top_k)
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"temperature {temperature}, top_k {top_k}")


def test_top_p_keeps_the_fewest_tokens_adding_up_to_p():
    logits = jnp.log(jnp.array([[[0.05, 0.5, 0.15, 0.3]]]))  # (1, 1, 4)
    keys = jax.random.split(jax.random.key(0), 4000)
    for top_p, kept in ((0.4, [1]), (0.7, [1, 3]), (0.9, [1, 3, 2]), (1.0, [1, 3, 2, 0])):
        tokens = jax.vmap(lambda k: sample_token(logits, k, 1.0, None, top_p))(keys)
        freq = np.bincount(np.ravel(tokens), minlength=4) / len(keys)
        want = np.zeros(4)
        want[kept] = np.exp(np.asarray(logits[0, 0]))[kept] / np.exp(np.asarray(logits[0, 0]))[kept].sum()
        np.testing.assert_allclose(freq, want, atol=0.03, err_msg=f"top_p {top_p}")
