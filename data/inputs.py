"""
What the data/*/prepare.py scripts read: files they download once, and the GPT-2 tokenizer.
Anything missing, unreachable or unreadable stops a script with one line on stderr,
`error: ...`, and exit code 2 (configurator.die), never a traceback.
"""
import os
import sys
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from configurator import die  # noqa: E402
from checks import gpt2_encoding  # noqa: E402,F401  the prepare scripts' tokenizer


def download(url, path):
    """Download url to path. It is written to a temp file first, so that an interrupted download
    leaves nothing behind."""
    print(f"downloading {url} to {path}")
    try:
        with urllib.request.urlopen(url) as r:
            data = r.read()
    except OSError as e:
        die(f"cannot download {url} ({e}); offline, put the file at {path} or pass --input=PATH")
    with open(path + '.tmp', 'wb') as f:
        f.write(data)
    os.replace(path + '.tmp', path)
