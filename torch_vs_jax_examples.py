"""
PyTorch beside JAX, Flax and Optax for the pieces of nanoGPT: each pair computes one thing both
ways, from the same numbers, and checks that the two sides agree. Read a pair to see how a line of
a PyTorch training script becomes JAX; docs/torch_to_jax.md has the whole map.

$ python torch_vs_jax_examples.py   # one line per pair; exit code 1 if any pair disagrees

Where this project has the JAX side as a function (jax_transformer.py, jax_sampling.py,
jax_train_utils.py) the pair calls it, so what is checked is what train_jax.py and sample_jax.py
run. Needs torch (pip install -r requirements-dev.txt).
"""
import math
import sys

import numpy as np
try:
    import torch
    import torch.nn.functional as F
except ImportError:
    print("error: the examples need PyTorch: pip install -r requirements-dev.txt", file=sys.stderr)
    sys.exit(2)
import jax
import jax.numpy as jnp
import flax.linen as nn
import optax

import jax_train_utils as tu
from jax_transformer import GPTConfig, CausalSelfAttention, Dropout, dense, layer_norm, cross_entropy
from jax_sampling import sample_token

# compare on the CPU, where torch runs here: a GPU may do float32 products in TF32
jax.config.update('jax_platforms', 'cpu')
CONSTANT_LR = tu.lr_schedule(1e-2, False, 0, 0, 0.0)  # decay_lr=False: the learning rate at every step


def t2j(tensor):
    """A torch tensor as a jax array (the same float32 numbers)."""
    return jnp.asarray(tensor.detach().numpy())


def close(torch_value, jax_value, atol=1e-5):
    """The largest difference between the two sides, once checked to be at most atol."""
    a, b = (v.detach().numpy() if isinstance(v, torch.Tensor) else np.asarray(v) for v in (torch_value, jax_value))
    np.testing.assert_allclose(b, a, rtol=0, atol=atol)
    return float(np.max(np.abs(a - b)))


# -----------------------------------------------------------------------------
# the model

def linear_to_dense():
    """nn.Linear(16, 48) stores weight (48, 16) and computes x @ weight.T + bias; Flax's nn.Dense
    stores kernel (16, 48) and computes x @ kernel + bias: the kernel is the weight transposed."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 48)
    x = torch.randn(2, 5, 16)
    params = {'kernel': t2j(linear.weight).T, 'bias': t2j(linear.bias)}
    y = dense(GPTConfig(bias=True), 48, 'c_attn').apply({'params': params}, t2j(x))
    return f"max |diff| {close(linear(x), y):.1e}"


def layernorm():
    """nanoGPT's LayerNorm (F.layer_norm, eps 1e-5, bias optional) is nn.LayerNorm with
    use_bias=config.bias; torch's weight is Flax's scale."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    weight, bias = 1 + 0.1 * torch.randn(32), 0.1 * torch.randn(32)
    diffs = []
    for with_bias in (True, False):
        y = F.layer_norm(x, (32,), weight, bias if with_bias else None, 1e-5)
        params = {'scale': t2j(weight), **({'bias': t2j(bias)} if with_bias else {})}
        y_jax = layer_norm(GPTConfig(bias=with_bias), 'ln_1').apply({'params': params}, t2j(x))
        diffs.append(close(y, y_jax))
    return f"max |diff| {max(diffs):.1e}, with and without bias"


def causal_self_attention():
    """F.scaled_dot_product_attention(is_causal=True), or the masked softmax with the registered
    tril buffer, against the CausalSelfAttention module of jax_transformer.py: its mask is made
    from positions when it is traced, so there is no buffer to register."""
    torch.manual_seed(0)
    B, T, C, n_head = 2, 8, 32, 4
    c_attn, c_proj = torch.nn.Linear(C, 3 * C), torch.nn.Linear(C, C)
    x = torch.randn(B, T, C)
    heads = lambda a: a.view(B, T, n_head, C // n_head).transpose(1, 2)  # (B, nh, T, hs)
    q, k, v = map(heads, c_attn(x).split(C, dim=2))
    fused = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    tril = torch.tril(torch.ones(T, T)).view(1, 1, T, T)  # what register_buffer('bias', ...) holds
    att = (q @ k.transpose(-2, -1) / math.sqrt(C // n_head)).masked_fill(tril == 0, float('-inf'))
    masked = F.softmax(att, dim=-1) @ v
    close(fused, masked)
    y = c_proj(fused.transpose(1, 2).reshape(B, T, C))

    params = {'c_attn': {'kernel': t2j(c_attn.weight).T, 'bias': t2j(c_attn.bias)},
              'c_proj': {'kernel': t2j(c_proj.weight).T, 'bias': t2j(c_proj.bias)}}
    config = GPTConfig(block_size=T, n_head=n_head, n_embd=C, bias=True)
    y_jax = CausalSelfAttention(config).apply({'params': params}, t2j(x), deterministic=True, decode=False, start=0)
    return f"max |diff| {close(y, y_jax):.1e}"


def tied_embeddings():
    """nanoGPT ties lm_head.weight to wte.weight, so the embedding's gradient adds up both uses;
    Flax's nn.Embed is both layers: wte(idx) and wte.attend(x) (x @ embedding.T)."""
    torch.manual_seed(0)
    V, C = 20, 8
    wte, lm_head = torch.nn.Embedding(V, C), torch.nn.Linear(C, V, bias=False)
    lm_head.weight = wte.weight
    idx, targets = torch.randint(V, (3, 6)), torch.randint(V, (3, 6))
    loss = F.cross_entropy(lm_head(torch.tanh(wte(idx))).view(-1, V), targets.view(-1))
    loss.backward()

    embed = nn.Embed(V, C)

    def loss_fn(params):
        h = jnp.tanh(embed.apply({'params': params}, t2j(idx)))
        return cross_entropy(embed.apply({'params': params}, h, method=nn.Embed.attend), t2j(targets))
    loss_jax, grads = jax.value_and_grad(loss_fn)({'embedding': t2j(wte.weight)})
    return (f"loss |diff| {close(loss, loss_jax):.1e}, "
            f"gradient of the shared weight |diff| {close(wte.weight.grad, grads['embedding']):.1e}")


def cross_entropy_ignore_index():
    """F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-1) against
    jax_transformer.cross_entropy: the mean over the targets that are not -1, whose positions
    get no gradient."""
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 11, requires_grad=True)
    targets = torch.randint(11, (2, 7))
    targets[0, :3] = -1
    loss = F.cross_entropy(logits.view(-1, 11), targets.view(-1), ignore_index=-1)
    loss.backward()
    loss_jax, grad = jax.value_and_grad(cross_entropy)(t2j(logits), t2j(targets))
    assert float(jnp.abs(grad[0, :3]).max()) == 0.0, "ignored positions got a gradient"
    return f"loss |diff| {close(loss, loss_jax):.1e}, gradient |diff| {close(logits.grad, grad):.1e}"


# -----------------------------------------------------------------------------
# the optimizer

def some_params():
    """A parameter tree shaped like a model's: matrices and embeddings, biases, LayerNorm scales."""
    rng = np.random.default_rng(0)
    shapes = {'wte': {'embedding': (10, 8)}, 'c_fc': {'kernel': (8, 16), 'bias': (16,)}, 'ln_f': {'scale': (8,)}}
    return jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), shapes, is_leaf=lambda s: isinstance(s, tuple))


def torch_adamw(params, lr, weight_decay):
    """nanoGPT's configure_optimizers: weight decay on the parameters of 2 or more dims only."""
    tensors = jax.tree.map(lambda p: torch.tensor(np.asarray(p), requires_grad=True), params)
    leaves = jax.tree.leaves(tensors)
    groups = [{'params': [p for p in leaves if p.dim() >= 2], 'weight_decay': weight_decay},
              {'params': [p for p in leaves if p.dim() < 2], 'weight_decay': 0.0}]
    return tensors, torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def torch_step(tensors, optimizer, grads, grad_clip=0.0):
    for p, g in zip(jax.tree.leaves(tensors), jax.tree.leaves(grads)):
        p.grad = torch.tensor(np.asarray(g))
    if grad_clip > 0.0:
        torch.nn.utils.clip_grad_norm_(jax.tree.leaves(tensors), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def jax_steps(tx, params, grads_list):
    """params after one tx update per gradient tree of grads_list."""
    state, update = tx.init(params), jax.jit(tx.update)
    for grads in grads_list:
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


def adamw_decay_groups():
    """torch.optim.AdamW with two parameter groups (weight_decay 0.1 and 0.0) is one AdamW with a
    mask saying which parameters decay: tu.decay_mask. optax.adamw(mask=...) is the library's; this
    project's jax_train_utils.adamw is the same update in one pass per parameter."""
    params = some_params()
    rng = np.random.default_rng(1)
    grads_list = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params) for _ in range(3)]
    tensors, optimizer = torch_adamw(params, 1e-2, 0.1)
    for grads in grads_list:
        torch_step(tensors, optimizer, grads)
    mask = tu.decay_mask(params)
    ours = jax_steps(tu.adamw(CONSTANT_LR, 0.1, 0.9, 0.95, 0.0, mask), params, grads_list)
    library = jax_steps(optax.adamw(1e-2, 0.9, 0.95, eps=1e-8, weight_decay=0.1, mask=mask), params, grads_list)
    torch_params = jax.tree.map(lambda t: t.detach().numpy(), tensors)
    diffs = [close(t, j) for tree in (ours, library) for t, j in zip(jax.tree.leaves(torch_params), jax.tree.leaves(tree))]
    return f"3 steps, max |diff| {max(diffs):.1e} (tu.adamw and optax.adamw)"


def clip_grad_norm():
    """torch.nn.utils.clip_grad_norm_(params, 1.0) scales the gradients in place to a global norm
    of at most 1 and returns the norm before; optax.tree.norm and optax.clip_by_global_norm(1.0)
    do the same on a tree, and tu.adamw(grad_clip=1.0) clips before its update, as nanoGPT does."""
    params = some_params()
    rng = np.random.default_rng(2)
    grads = jax.tree.map(lambda p: (5 * rng.normal(size=p.shape)).astype(np.float32), params)
    tensors = [torch.zeros(g.shape, requires_grad=True) for g in jax.tree.leaves(grads)]
    for t, g in zip(tensors, jax.tree.leaves(grads)):
        t.grad = torch.tensor(g)
    norm = torch.nn.utils.clip_grad_norm_(tensors, 1.0)
    clipped, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    close(norm, optax.tree.norm(grads), atol=1e-4)
    diff = max(close(t.grad, c) for t, c in zip(tensors, jax.tree.leaves(clipped)))

    tensors, optimizer = torch_adamw(params, 1e-2, 0.1)
    torch_step(tensors, optimizer, grads, grad_clip=1.0)
    ours = jax_steps(tu.adamw(CONSTANT_LR, 0.1, 0.9, 0.95, 1.0, tu.decay_mask(params)), params, [grads])
    step = max(close(t, j) for t, j in zip(jax.tree.leaves(tensors), jax.tree.leaves(ours)))
    return f"norm {float(norm):.2f} clipped to 1, gradients |diff| {diff:.1e}, clip + AdamW step |diff| {step:.1e}"


def warmup_cosine_schedule():
    """nanoGPT computes get_lr(it) in Python and writes it into every param_group before each step;
    here the schedule is a function of the optimizer's own step count, tu.lr_schedule, so it lives in
    the optimizer state and resumes with it. (optax.warmup_cosine_decay_schedule warms up from
    step 0 to warmup_steps; nanoGPT's warmup is lr * (it + 1) / (warmup_iters + 1).)"""
    lr, warmup, decay_iters, min_lr = 1e-2, 5, 20, 1e-3

    def nanogpt_lr(it):
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        if it > decay_iters:
            return min_lr
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * (it - warmup) / (decay_iters - warmup))) * (lr - min_lr)
    params = some_params()
    rng = np.random.default_rng(3)
    grads_list = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params) for _ in range(25)]
    tensors, optimizer = torch_adamw(params, lr, 0.1)
    torch_lrs = []
    for it, grads in enumerate(grads_list):
        for group in optimizer.param_groups:
            group['lr'] = nanogpt_lr(it)
        torch_lrs.append(optimizer.param_groups[0]['lr'])
        torch_step(tensors, optimizer, grads)
    schedule = tu.lr_schedule(lr, True, warmup, decay_iters, min_lr)
    close(np.array(torch_lrs), schedule(jnp.arange(25)), atol=1e-8)  # float32 against Python floats
    ours = jax_steps(tu.adamw(schedule, 0.1, 0.9, 0.95, 0.0, tu.decay_mask(params)), params, grads_list)
    diff = max(close(t, j) for t, j in zip(jax.tree.leaves(tensors), jax.tree.leaves(ours)))
    return f"the same rate at iterations 0-24, params after 25 steps |diff| {diff:.1e}"


# -----------------------------------------------------------------------------
# randomness and the training step

def dropout_with_keys():
    """nn.Dropout draws its mask from torch's global generator (torch.manual_seed); the model's
    Dropout (flax's nn.Dropout on cheaper random bits) draws it from the 'dropout' key passed to
    apply, and train_jax.py derives one key per iteration and micro-step with jax.random.fold_in,
    so a resumed run gets the same masks. The masks of two generators differ; what must agree is
    what dropout computes: zeros, the kept values scaled by 1/(1-p), a fraction 1-p kept, and
    nothing at all in eval mode."""
    p = 0.2
    x = torch.rand(200_000) + 1  # no zeros of its own
    torch.manual_seed(0)
    drop = torch.nn.Dropout(p)
    y = drop.train()(x)
    y_eval = drop.eval()(x)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(1337), 10), 0)  # iteration 10, micro-step 0
    apply = lambda key, deterministic: Dropout(p).apply({}, t2j(x), deterministic, rngs={'dropout': key})
    y_jax = apply(key, False)
    fractions = []
    for out, kept in ((y.numpy(), y.numpy() != 0), (np.asarray(y_jax), np.asarray(y_jax) != 0)):
        close(out[kept], x.numpy()[kept] / (1 - p), atol=1e-6)
        fractions.append(kept.mean())
    assert abs(fractions[0] - (1 - p)) < 0.005 and abs(fractions[1] - (1 - p)) < 0.005, f"kept {fractions}"
    close(y_eval, apply(key, True), atol=0)
    assert bool(jnp.all(apply(key, False) == y_jax)), "the same key gave another mask"
    assert not bool(jnp.all(apply(jax.random.fold_in(key, 1), False) == y_jax)), "another key gave the same mask"
    return f"kept torch {fractions[0]:.4f}, jax {fractions[1]:.4f} (1-p = {1 - p}); eval mode is the identity"


class Bigram(nn.Module):
    """The smallest language model: the next token's logits are a row of one table."""
    vocab_size: int

    @nn.compact
    def __call__(self, idx, targets, deterministic=True):
        logits = nn.Embed(self.vocab_size, self.vocab_size, name='wte')(idx)
        return logits, cross_entropy(logits, targets)


def gradient_accumulation():
    """nanoGPT runs loss / gradient_accumulation_steps backward once per micro-step and lets .grad
    add up; tu.mean_grads scans over the micro-batches (GA, B, T) inside one jitted function and
    returns the mean gradient and loss."""
    V, GA = 13, 4
    torch.manual_seed(0)
    table = torch.nn.Embedding(V, V)
    x, y = torch.randint(V, (GA, 3, 8)), torch.randint(V, (GA, 3, 8))
    total = 0.0
    for micro_step in range(GA):
        loss = F.cross_entropy(table(x[micro_step]).view(-1, V), y[micro_step].view(-1)) / GA
        loss.backward()
        total += loss.item()
    params = {'wte': {'embedding': t2j(table.weight)}}
    grads, loss_jax = jax.jit(tu.mean_grads, static_argnums=1)(params, Bigram(V).apply, t2j(x), t2j(y),
                                                               jax.random.key(0))
    return (f"{GA} micro-steps, loss |diff| {close(total, loss_jax):.1e}, "
            f"gradient |diff| {close(table.weight.grad, grads['wte']['embedding']):.1e}")


# -----------------------------------------------------------------------------
# sampling

def top_k_sampling():
    """nanoGPT's generate: torch.topk, the logits below the k-th set to -inf, softmax and
    torch.multinomial. jax_sampling.sample_token masks the same way and draws from the logits by
    the Gumbel-max trick (the argmax of the logits plus Gumbel noise is a draw from their softmax,
    what jax.random.categorical does too). The draws of two generators differ: what must agree is
    which tokens can be drawn (the same top k) and how often each is drawn."""
    V, k, temperature, n = 50, 10, 0.8, 20_000
    torch.manual_seed(0)
    logits = torch.randn(1, V)
    scaled = logits / temperature
    kth = torch.topk(scaled, k)[0][:, [-1]]
    probs = F.softmax(scaled.masked_fill(scaled < kth, -float('inf')), dim=-1)[0]
    top = set(torch.topk(logits, k)[1][0].tolist())
    draws = torch.multinomial(probs, n, replacement=True)
    keys = jax.random.split(jax.random.key(0), n)
    draws_jax = jax.vmap(lambda key: sample_token(t2j(logits)[:, None, :], key, temperature, k))(keys)[:, 0]
    worst = 0.0
    for name, d in (('torch', draws.numpy()), ('jax', np.asarray(draws_jax))):
        assert set(d.tolist()) == top, f"{name} drew {sorted(set(d.tolist()))}, not the top {k} {sorted(top)}"
        worst = max(worst, close(probs, np.bincount(d, minlength=V) / n, atol=0.015))
    return f"both draw exactly the top {k} tokens, {n} draws each within {worst:.4f} of their probabilities"


PAIRS = [
    ('nn.Linear -> nn.Dense (kernel = weight.T)', linear_to_dense),
    ('LayerNorm -> nn.LayerNorm', layernorm),
    ('scaled_dot_product_attention -> CausalSelfAttention', causal_self_attention),
    ('tied lm_head.weight -> nn.Embed.attend', tied_embeddings),
    ('F.cross_entropy(ignore_index=-1) -> cross_entropy', cross_entropy_ignore_index),
    ('AdamW param groups -> a weight decay mask', adamw_decay_groups),
    ('clip_grad_norm_ -> clip inside the optimizer', clip_grad_norm),
    ('get_lr into param_groups -> a schedule of the step', warmup_cosine_schedule),
    ('nn.Dropout + manual_seed -> explicit keys', dropout_with_keys),
    ('backward per micro-step -> tu.mean_grads', gradient_accumulation),
    ('topk + multinomial -> Gumbel-max', top_k_sampling),
]


def main(pairs=PAIRS):
    """Run every pair, one line each; exit code 1 if any disagrees."""
    failed = 0
    for name, pair in pairs:
        try:
            print(f"{name}: ok, {pair()}")
        except AssertionError as e:
            failed += 1
            print(f"{name}: MISMATCH: {' '.join(str(e).split())[:300]}")
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
