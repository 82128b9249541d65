"""What every command of this repository shares: its command line and how it writes files.

    parser = cli.ArgumentParser(description=__doc__)          # defaults in --help, mistakes in one line
    parser.add_argument("--epochs", type=cli.positive(int), default=40)
    with cli.one_line_errors():                                # a bad file or value: one line, exit code 1
        ...
    cli.write_atomic(path, text)                               # readers never see half a file
    device = cli.resolve_device("auto")                        # the --device flag

Nothing here knows about MELD or models; every other file may import it.
"""

import argparse
import contextlib
import os
from pathlib import Path

import torch


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help: the module docstring as written, and the default of every flag that has one."""

    def _get_help_string(self, action):
        shown = action.help or ""
        default = action.default
        if action.option_strings and default is not None and default is not False and default != argparse.SUPPRESS:
            shown += " (default: '')" if action.default == "" else " (default: %(default)s)"
        return shown


class ArgumentParser(argparse.ArgumentParser):
    """argparse with HelpFormatter, and a usage mistake (unknown flag or choice, bad value) as one
    line on stderr, exit code 2, instead of the usage text and the error."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive(kind, low=0.0, high=None, low_allowed=False):
    """An argparse type: kind(text) (int or float) that must be > low (>= low with low_allowed)
    and, given high, <= high."""
    def parse(text):
        value = kind(text)
        if value < low or (value == low and not low_allowed) or (high is not None and value > high):
            bounds = f"{'>=' if low_allowed else '>'} {low:g}" + (f" and <= {high:g}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value
    parse.__name__ = kind.__name__           # argparse names the type in "invalid int value"
    return parse


def non_negative(kind):
    """An argparse type: kind(text) >= 0."""
    return positive(kind, low_allowed=True)


def probability(text):
    """An argparse type: a float in [0, 1]."""
    return positive(float, low_allowed=True, high=1.0)(text)


def int_list(text):
    """An argparse type: comma-separated integers > 0 -> list of int ("32,64,128")."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated whole numbers > 0")
    return values


@contextlib.contextmanager
def one_line_errors():
    """For a command line's set-up: a ValueError, OSError or ImportError (a value, file, folder or
    package the user gave or lacks; its message names it) ends the program with that message as
    one line on stderr and exit code 1, not a traceback. Errors of any other type keep theirs."""
    try:
        yield
    except (ValueError, OSError, ImportError) as e:
        raise SystemExit(f"error: {e}") from None


# torch.load's generic advice around the reason a weights_only load failed
TORCH_LOAD_ADVICE = ("Weights only load failed", "(1)", "(2)", "Check the documentation")


def first_line(error, name=""):
    """Why `error` happened, as one line for a one-line report: the first sentence of the first line
    of its message that says something, without `name` (the file the report already names, which
    libraries repeat), the punctuation around it, and torch.load's generic weights_only advice (for
    a refused pickle, the unpickler's reason is kept); the exception's type name when nothing is left."""
    text = str(error).replace(str(name), "") if name else str(error)
    lines = [line.split("WeightsUnpickler error:")[-1].strip(" :;'\"") for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith(TORCH_LOAD_ADVICE)]
    return lines[0].split(". ")[0] if lines else type(error).__name__


def write_atomic(path, content):
    """Write str (UTF-8, line ends as given) or bytes to a temporary file beside `path`, then
    rename it over `path`: a reader, or a run resumed after a kill, never sees half a file.
    content may also be a function that writes to the path it is given (e.g. a torch.save)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp"
    if callable(content):
        content(tmp)
    elif isinstance(content, bytes):
        tmp.write_bytes(content)
    else:
        tmp.write_text(content, encoding="utf-8", newline="")
    os.replace(tmp, path)


def resolve_device(name):
    """The --device flag: "auto" = the first CUDA device if there is one, else the CPU; otherwise
    torch.device(name) ("cpu", "cuda", "cuda:1"). SystemExit in one line for a name torch does not
    know, or a CUDA device this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise SystemExit(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SystemExit(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                         "use --device cpu (or auto)")
    return device
