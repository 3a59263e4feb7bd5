"""
HellaSwag's validation set, for eval_hellaswag.py: the original hellaswag_val.jsonl of
https://github.com/rowanz/hellaswag, 10,042 examples, one JSON object per line (ctx, 4 endings,
label, ...). It is downloaded once, or a local copy is checked and copied.

$ python data/hellaswag/prepare.py                                       # downloads data/hellaswag/hellaswag_val.jsonl
$ python data/hellaswag/prepare.py --input=hellaswag_val.jsonl           # a local copy
$ python data/hellaswag/prepare.py --out_dir=/tmp/data/hellaswag         # then: eval_hellaswag.py --data_root=/tmp/data
"""
import os
import sys
import argparse
import shutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from inputs import download, quit_on_signal  # noqa: E402
from checks import read_hellaswag  # noqa: E402  (inputs put the repo root on sys.path)

DATA_URL = 'https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl'


def prepare(input_path=None, out_dir=None):
    out_dir = out_dir or os.path.dirname(os.path.abspath(__file__))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, 'hellaswag_val.jsonl')
    if input_path is None:
        if not os.path.exists(path):
            download(DATA_URL, path)
        input_path = path
    examples = read_hellaswag(input_path)
    if os.path.abspath(input_path) != os.path.abspath(path):
        # copied to a temp file first, so that an interrupted copy leaves nothing behind
        shutil.copyfile(input_path, path + '.tmp')
        os.replace(path + '.tmp', path)
    print(f"{path} holds {len(examples):,} examples")
    return len(examples)


if __name__ == '__main__':
    quit_on_signal()  # ^C or SIGTERM: one line, exit code 130 or 143
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument('--input', default=None, help="a local copy of hellaswag_val.jsonl (default: download it)")
    parser.add_argument('--out_dir', default=None, help="where to write hellaswag_val.jsonl (default: next to this script)")
    args = parser.parse_args()
    prepare(args.input, args.out_dir)

# hellaswag_val.jsonl holds 10,042 examples
