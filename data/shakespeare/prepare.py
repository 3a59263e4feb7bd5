"""
Prepare the Shakespeare dataset with the GPT-2 BPE tokenizer (tiktoken).
Writes train.bin and val.bin (uint16 token ids).
Output is byte-identical to nanoGPT's data/shakespeare/prepare.py.

$ python data/shakespeare/prepare.py                      # as in nanoGPT
$ python data/shakespeare/prepare.py --input=input.txt --out_dir=/tmp/s
"""
import os
import argparse
import sys
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from inputs import gpt2_encoding, quit_on_signal  # noqa: E402
from tiny_shakespeare import read_text  # noqa: E402


def prepare(input_path=None, out_dir=None):
    out_dir = out_dir or os.path.dirname(os.path.abspath(__file__))
    os.makedirs(out_dir, exist_ok=True)
    data = read_text(input_path, out_dir)

    # split the text 90/10 by characters, then encode each part separately
    n = len(data)
    split = int(n * 0.9)
    enc = gpt2_encoding()
    train_ids = np.array(enc.encode_ordinary(data[:split]), dtype=np.uint16)
    val_ids = np.array(enc.encode_ordinary(data[split:]), dtype=np.uint16)
    print(f"train has {len(train_ids):,} tokens")
    print(f"val has {len(val_ids):,} tokens")

    train_ids.tofile(os.path.join(out_dir, 'train.bin'))
    val_ids.tofile(os.path.join(out_dir, 'val.bin'))
    return len(train_ids), len(val_ids)


if __name__ == '__main__':
    quit_on_signal()  # ^C or SIGTERM: one line, exit code 130 or 143
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument('--input', default=None, help="local input.txt (default: input.txt in out_dir, downloaded if missing)")
    parser.add_argument('--out_dir', default=None, help="where to write train.bin/val.bin (default: next to this script)")
    args = parser.parse_args()
    prepare(args.input, args.out_dir)

# train has 301,966 tokens
# val has 36,059 tokens
