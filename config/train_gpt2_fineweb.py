# reproduce GPT-2 (124M) on FineWeb-Edu's 10B-token sample, as build-nanogpt does, in nanoGPT's keys:
# 10B tokens in one epoch, HellaSwag every 250 iterations (GPT-2 124M scores acc_norm 0.2955 there)
# $ python data/fineweb_edu/prepare.py && python data/hellaswag/prepare.py
# $ python train_jax.py config/train_gpt2_fineweb.py   # 8 GPUs, or a TPU host: 1 micro-step per device
# on one GPU, the same tokens per iteration in smaller micro-batches:
# $ python train_jax.py config/train_gpt2_fineweb.py --batch_size=16 --gradient_accumulation_steps=32

wandb_log = False  # override via command line if you like
wandb_project = 'fineweb'
wandb_run_name = 'gpt2-124M'
out_dir = 'out-gpt2-fineweb'
dataset = 'fineweb_edu'

# 64 sequences of 1024 tokens x 8 accumulation steps = 524,288 tokens per iteration
batch_size = 64
block_size = 1024
gradient_accumulation_steps = 8

# 19,073 iterations of 524,288 tokens: the 10B tokens once
max_iters = 19073
lr_decay_iters = 19073
warmup_iters = 715
learning_rate = 6e-4
min_lr = 6e-5
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95

# eval and HellaSwag every 250 iterations; val loss over 20 batches, as build-nanogpt
eval_interval = 250
eval_iters = 20
hellaswag_interval = 250
