# the character-level shakespeare model sized for a laptop CPU: nanoGPT README's CPU command line
# python train_jax.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
#   --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
#   --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0
# as a config file. Reaches a val loss of about 1.88 at iter 2000.

import os
exec(open(os.path.join(os.path.dirname(__file__), 'train_shakespeare_char.py')).read())  # from any folder

device = 'cpu'
compile = False
eval_iters = 20
log_interval = 1
block_size = 64
batch_size = 12
n_layer = 4
n_head = 4
n_embd = 128
max_iters = 2000
lr_decay_iters = 2000
dropout = 0.0
