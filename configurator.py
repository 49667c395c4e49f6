"""
How a script's settings are read, nanoGPT-style: its defaults (plain module-level assignments in
train.py), then config files (plain Python assignments, run in the order given), then --key=value
flags, which win wherever they stand on the command line. A key that is not one of the defaults, or
a value of another type, is one sentence naming the key and where it was set. train.py reads its
configuration with `read`; study.py its own options with `parse_flag` and `typed`.
"""
import ast
import difflib
import os
import types

from errors import UserError
from files import flag_path

CONFIG_BYTES = 2**20  # a config holds lines of key = value, a few kB: a larger file is data given in its place


def parse_flag(arg, defaults=None):
    """'--key=value' -> (key, value): a Python literal where the text reads as one (8, 2e-3, True,
    None), else the text itself (--adapter=lora); a text setting takes the text as written (--out_dir=5)."""
    key, eq, text = arg[2:].partition("=")
    if not arg.startswith("--") or not key:
        raise UserError(f"argument '{arg}' is not of the form --key=value.")
    if not eq:
        if defaults is not None and key not in defaults:  # misspelt: named with its closest, not given a value to fail
            typed(key, None, defaults, f"flag {arg}")
        value = "True" if isinstance((defaults or {}).get(key), bool) else "VALUE"  # a switch: --dry_run alone meant on
        raise UserError(f"flag '{arg}' needs a value: write --{key}={value}.")
    if text.startswith("~"):  # --out_dir=~/x: the home folder, as the shell gives --out_dir ~/x
        text = flag_path(text)
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):  # the last two: thousands of operators in a row
        return key, text
    return key, text if isinstance((defaults or {}).get(key), str) and not isinstance(value, str) else value


def typed(key, value, defaults, origin):
    """value for defaults[key], checked against the default's type (an int may stand for a float)."""
    if key not in defaults:
        # another case first: difflib's ratio is case-sensitive, so --R=16 or --LEARNING_RATE=1e-3 was named with none
        close = [k for k in defaults if k.lower() == key.lower()] or difflib.get_close_matches(key, defaults, n=1)
        raise UserError(f"unknown config key '{key}' in {origin}" + (f"; did you mean '{close[0]}'?" if close else "."))
    if isinstance(value, int) and value.bit_length() > 1023:  # str() of it fails past 4300 digits
        raise UserError(f"config key '{key}' in {origin} is too large for a float or any setting "
                        f"({value.bit_length()} bits).")
    default = defaults[key]
    if default is None or (isinstance(value, type(default)) and isinstance(value, bool) == isinstance(default, bool)):
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    raise UserError(f"config key '{key}' in {origin} must be of type {type(default).__name__}, got {value!r}.")


def read(argv, defaults):
    """[config/FILE.py ...] [--key=value ...] -> (config dict, the keys the files and flags set). A
    config file is a script the user wrote, run as nanoGPT runs its configs: it may compute values
    (max_iters = 2_500_000 // 128) and start from another config (exec(open(...).read()); __file__ is its path)."""
    cfg, explicit = dict(defaults), set()
    # "--" ends torchrun's own flags (it reads --r=8 as an abbreviation of one); each flag's form is checked before
    # any file runs: `--adapter lora` is a flag without its value, not a config file named lora
    flags = [(arg, *parse_flag(arg, defaults)) for arg in argv if arg.startswith("--") and arg != "--"]
    for arg in (a for a in argv if not a.startswith("--")):  # the files in their order, then the flags
        if arg.startswith(("-", "\u2013", "\u2014")) and not os.path.exists(arg):  # -r=16, or a dash a web page typeset
            raise UserError(f"argument '{arg}' is not of the form --key=value (two hyphens).")
        ours = os.path.join(os.path.dirname(os.path.abspath(__file__)), arg)  # config/x.py, run from another folder
        if not os.path.lexists(arg) and os.path.isfile(ours):  # was "does not exist; the configs are in config/."
            raise UserError(f"config file '{arg}' does not exist in the current folder; the project's is {ours}: "
                            "pass that path.")
        if not os.path.isfile(arg):
            what = ("is a folder, not a file" if os.path.isdir(arg) else "does not exist" if not os.path.exists(arg)
                    else "is a named pipe or a device, not a file")  # <(...) of bash, /dev/stdin
            raise UserError(f"config file '{arg}' {what}; the configs are in config/.")
        if (size := os.path.getsize(arg)) > CONFIG_BYTES:  # a data file: compiled as Python, 3 MB of JSONL took 100 MB
            raise UserError(f"config file '{arg}' holds {size:,} bytes, too many for a config of key = value lines; "
                            "give the run its data as --data_dir, a folder that python data.py prepare wrote.")
        namespace = {"__file__": arg}  # a config may start from another beside it, wherever it is run from
        try:  # bytes: a BOM or coding line is honoured, as python reads a script
            with open(arg, "rb") as f:
                exec(compile(f.read(), arg, "exec"), namespace)
        except KeyboardInterrupt:  # Ctrl-C while a config runs stops the script, as it stops a run
            raise
        except SystemExit as e:  # exit(0) would end train.py before it trains, with the code of a run that succeeded
            code = "" if e.code is None else repr(e.code)
            raise UserError(f"config file '{arg}' calls exit({code}), which would end the script before it trains; "
                            "remove the call: a config only sets keys, in plain key = value lines.")
        except BaseException as e:  # a raise of GeneratorExit or of a class of its own was a traceback
            said = " ".join(str(e).split())
            raise UserError(f"config file '{arg}' failed to run ({type(e).__name__}{': ' * bool(said)}{said}); "
                            "it should hold plain key = value lines.")
        keys = [k for k, v in namespace.items()  # modules: `import time` has no __file__
                if not k.startswith("_") and not callable(v) and not isinstance(v, types.ModuleType)]
        if not keys:  # JSON ({"r": 16}) and YAML (r: 16) run as Python too, setting nothing without a word
            raise UserError(f"config file '{arg}' sets no key; write it as plain Python, key = value lines (run as "
                            "Python, a JSON or YAML file sets nothing).")
        for key in keys:  # out_dir = "~/runs/x": the home folder, as in a flag (it was a folder named "~" here)
            value = namespace[key]
            cfg[key] = typed(key, flag_path(value) if isinstance(value, str) and value.startswith("~") else value,
                             defaults, f"config file {arg}")
            explicit.add(key)
    for arg, key, value in flags:
        cfg[key] = typed(key, value, defaults, f"flag {arg}")
        explicit.add(key)
    return cfg, explicit
