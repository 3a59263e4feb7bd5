"""
Prepare the Shakespeare dataset for character-level language modeling.
Instead of encoding with GPT-2 BPE tokens, each character is mapped to an int.
Writes train.bin and val.bin (uint16 ids) and meta.pkl (vocab_size, itos, stoi).
Output is byte-identical to nanoGPT's data/shakespeare_char/prepare.py.

$ python data/shakespeare_char/prepare.py                      # as in nanoGPT
$ python data/shakespeare_char/prepare.py --input=input.txt --out_dir=/tmp/sc
"""
import os
import pickle
import argparse
import sys
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from inputs import quit_on_signal  # noqa: E402
from tiny_shakespeare import read_text  # noqa: E402


def prepare(input_path=None, out_dir=None):
    out_dir = out_dir or os.path.dirname(os.path.abspath(__file__))
    os.makedirs(out_dir, exist_ok=True)
    data = read_text(input_path, out_dir)
    print(f"length of dataset in characters: {len(data):,}")

    # the vocabulary is every character that occurs in the text, sorted
    chars = sorted(set(data))
    vocab_size = len(chars)
    print("all the unique characters:", ''.join(chars))
    print(f"vocab size: {vocab_size:,}")
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}

    # first 90% of the characters is train, the rest is val
    n = len(data)
    split = int(n * 0.9)
    train_ids = np.array([stoi[c] for c in data[:split]], dtype=np.uint16)
    val_ids = np.array([stoi[c] for c in data[split:]], dtype=np.uint16)
    print(f"train has {len(train_ids):,} tokens")
    print(f"val has {len(val_ids):,} tokens")

    train_ids.tofile(os.path.join(out_dir, 'train.bin'))
    val_ids.tofile(os.path.join(out_dir, 'val.bin'))

    # the meta information, to encode/decode later (e.g. in sample.py)
    meta = {'vocab_size': vocab_size, 'itos': itos, 'stoi': stoi}
    with open(os.path.join(out_dir, 'meta.pkl'), 'wb') as f:
        pickle.dump(meta, f)
    return meta


if __name__ == '__main__':
    quit_on_signal()  # ^C or SIGTERM: one line, exit code 130 or 143
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument('--input', default=None, help="local input.txt (default: input.txt in out_dir, downloaded if missing)")
    parser.add_argument('--out_dir', default=None, help="where to write train.bin/val.bin/meta.pkl (default: next to this script)")
    args = parser.parse_args()
    prepare(args.input, args.out_dir)

# length of dataset in characters: 1,115,394
# all the unique characters:
#  !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz
# vocab size: 65
# train has 1,003,854 tokens
# val has 111,540 tokens
