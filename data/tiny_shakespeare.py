"""Tiny Shakespeare, the input of the shakespeare and shakespeare_char datasets."""
import os
import sys
import urllib.request

DATA_URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'


def download(url, path):
    # write to a temp file first so an interrupted download leaves nothing behind
    print(f"downloading {url} to {path}")
    try:
        with urllib.request.urlopen(url) as r:
            data = r.read()
    except OSError as e:
        sys.exit(f"error: cannot download {url} ({e}); offline, put the file at {path} or pass --input=PATH")
    with open(path + '.tmp', 'wb') as f:
        f.write(data)
    os.replace(path + '.tmp', path)


def read_text(input_path, out_dir):
    """The text of input_path, or by default of input.txt in out_dir, downloaded if missing as in nanoGPT."""
    if input_path is None:
        input_path = os.path.join(out_dir, 'input.txt')
        if not os.path.exists(input_path):
            download(DATA_URL, input_path)
    if not os.path.isfile(input_path):
        sys.exit(f"error: input file {input_path} not found")
    with open(input_path, 'r', encoding='utf-8') as f:
        return f.read()
