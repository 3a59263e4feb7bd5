"""
Poor Man's Configurator, as in nanoGPT. The scripts call

    configure(globals(), sys.argv[1:])

which reads each argument in order:
$ python train_jax.py config/override_file.py --batch_size=32
a bare argument is a config file, executed in the script's globals; a --key=value argument
overrides an existing config key, the value parsed as a Python literal (or kept as a string)
and of the same type as the default (an int is accepted where a float is expected).
Any mistake stops the script with a one-line error and exit code 2, before any work starts.
"""

import ast
import difflib
import sys
from ast import literal_eval

CONFIG_TYPES = (int, float, bool, str)


def die(message, code=2):
    """Stop the script with a one-line error and exit code 2 (a mistake in what it was given)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def or_die(f, *args):
    """f(*args), or the script stopped with the one line of the ValueError it raised."""
    try:
        return f(*args)
    except ValueError as e:
        die(str(e))


def config_keys(config_globals):
    """The names that can be overridden: the script's int/float/bool/str globals."""
    return [k for k, v in config_globals.items() if not k.startswith('_') and isinstance(v, CONFIG_TYPES)]


def script_defaults(path):
    """{key: default} of the config of a script like train_jax.py: the names it sets, at the top
    level, before it calls configure, to values computed from literals alone (5 * 8, 2 ** 16). So
    that compile_jax.py takes train_jax.py's keys and defaults without a copy of them."""
    with open(path) as f:
        tree = ast.parse(f.read())
    defaults = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and \
                getattr(node.value.func, 'id', None) == 'configure':
            break
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                defaults[node.targets[0].id] = eval(compile(ast.Expression(node.value), path, 'eval'), {'__builtins__': {}})
            except Exception:  # not computed from literals alone
                continue
    return {k: v for k, v in defaults.items() if not k.startswith('_') and isinstance(v, CONFIG_TYPES)}


def parse_value(key, text, default):
    try:
        value = literal_eval(text)
    except (SyntaxError, ValueError):
        value = text  # a plain string, e.g. --dataset=shakespeare_char
    if type(default) is float and type(value) is int:
        value = float(value)
    if type(value) is not type(default):
        die(f"--{key}={text}: expected a {type(default).__name__} like the default {default!r}, "
            f"got a {type(value).__name__}")
    return value


def run_config_file(path, config_globals):
    try:
        with open(path) as f:
            source = f.read()
    except OSError as e:
        die(f"cannot read config file {path}: {e.strerror}")
    print(f"Overriding config with {path}:")
    print(source)
    try:
        exec(compile(source, path, 'exec'), config_globals)
    except Exception as e:
        line = getattr(e, 'lineno', None)
        where = f"{path}, line {line}" if line else path
        message = e.msg if isinstance(e, SyntaxError) else e  # its str repeats the file and line
        die(f"config file {where}: {type(e).__name__}: {message}")


def configure(config_globals, argv):
    """Apply the config files and --key=value overrides of argv to config_globals."""
    for arg in argv:
        if not arg.startswith('--'):
            run_config_file(arg, config_globals)
            continue
        if '=' not in arg:
            die(f"{arg}: overrides are written --key=value")
        key, text = arg[2:].split('=', 1)
        keys = config_keys(config_globals)
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=1)
            die(f"unknown config key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        value = parse_value(key, text, config_globals[key])
        print(f"Overriding: {key} = {value}")
        config_globals[key] = value
