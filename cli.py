"""What every command of this repository shares: its command line and how it writes files.

    @dataclass
    class Config:                                              # settings: each field is also a flag
        epochs: int = cli.setting(40, "planned maximum", type=cli.positive(int))
    parser = cli.ArgumentParser(description=__doc__)           # defaults in --help, mistakes in one line
    cli.add_settings(parser, Config, "training")               # --epochs, from the field
    config = cli.settings(parser.parse_args(), Config)         # every field from its flag
    with cli.one_line_errors():                                # a bad file or value: one line, exit code 1
        ...
    cli.write_atomic(path, text)                               # readers never see half a file
    device = cli.resolve_device("auto")                        # the --device flag

A setting is defined once, as a dataclass field made by `setting` (default, help, type, choices);
the flag is generated from it, so a field without a flag or a flag without a field cannot exist.
A field made by `derived` is filled from other settings or the data, never from the command line.
Written here, not with transformers' HfArgumentParser: that one takes lists as space-separated
values and has its own errors, and these command lines take comma-separated lists and one-line
errors. Nothing here knows about MELD or models; every other file may import it.
"""

import argparse
import contextlib
import dataclasses
import difflib
import errno
import json
import os
import shutil
from pathlib import Path

import torch


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help: the module docstring as written, and the default of every flag that has one (lists
    comma-separated, as they are given)."""

    def _get_help_string(self, action):
        shown, default = action.help or "", action.default
        if isinstance(default, (list, tuple)):
            shown += f" (default: {','.join(map(str, default))})"
        elif (action.option_strings and default is not None and default is not False
              and default != argparse.SUPPRESS and "%(default)" not in shown):
            shown += " (default: '')" if default == "" else " (default: %(default)s)"
        return shown


class ArgumentParser(argparse.ArgumentParser):
    """argparse with HelpFormatter, and a usage mistake (unknown flag or choice, bad value) as one
    line on stderr, exit code 2, instead of the usage text and the error."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)   # --epoch is a typo, not --epochs
        super().__init__(*args, **kwargs)

    def error(self, message):
        if message.startswith("unrecognized arguments: "):   # a typo: name the nearest flags
            flags = [s for action in self._actions for s in action.option_strings]
            near = [m for word in message.split(": ", 1)[1].split() if word.startswith("--")
                    for m in difflib.get_close_matches(word.split("=")[0], flags, n=2)]
            message += f" (did you mean {' or '.join(near)}?)" if near else ""
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


def probability_list(text):
    """An argparse type: comma-separated floats in [0, 1] -> list of float ("0.3,0.2")."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 0 or max(values) > 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated numbers in [0, 1]")
    return values


def str_list(text):
    """An argparse type: comma-separated words -> list of str ("video,text"); the caller checks them."""
    return [x.strip() for x in text.split(",")]


# ------------------------------------------------------------------------------------------------
# Settings: dataclass fields that are also command-line flags


def setting(default, help, type=None, choices=None):
    """A dataclass field that is also the flag --name-with-hyphens: its default, its help text, its
    argparse type (default: the default's own type; a bool gives --name / --no-name) and its choices
    (any container; a registry dict offers its keys, so a part added to it is a choice at once)."""
    return dataclasses.field(default=default, metadata=dict(help=help, type=type, choices=choices))


def derived(help, default=None):
    """A dataclass field filled from other settings or from the data, never by a flag of its own."""
    return dataclasses.field(default=default, metadata=dict(derived=help))


def flag_fields(config_class):
    """The fields of a settings dataclass that are flags (made by `setting`)."""
    return [f for f in dataclasses.fields(config_class) if "help" in f.metadata]


def add_settings(parser, config_class, title):
    """One argument group of flags, one per `setting` field of config_class. A field name that
    another group already uses is argparse's conflict error: a setting lives in one place."""
    group = parser.add_argument_group(title)
    for f in flag_fields(config_class):
        flag, kind = "--" + f.name.replace("_", "-"), f.metadata["type"] or type(f.default)
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            group.add_argument(flag, type=kind, default=f.default, choices=f.metadata["choices"],
                               help=f.metadata["help"])


def values(args, config_class):
    """{field: value} of config_class's `setting` fields from parsed flags (AttributeError if one is missing)."""
    return {f.name: getattr(args, f.name) for f in flag_fields(config_class)}


def settings(args, config_class, **derived_values):
    """config_class built from parsed flags: every `setting` field from the flag of its name,
    `derived` fields from derived_values."""
    return config_class(**values(args, config_class), **derived_values)


def check_choices(config):
    """ValueError naming the field, the value and the choices, for a field whose value is not one of
    its choices (a config built in Python gets the check the command line makes)."""
    for f in flag_fields(type(config)):
        choices, value = f.metadata["choices"], getattr(config, f.name)
        if choices is not None and value not in choices:
            raise ValueError(f"unknown {f.name} {value!r}; choose one of {', '.join(map(str, choices))}")


def field_defaults(*config_classes):
    """{name: default} of every flag field of these classes (a tuple as a list, as JSON and the parser give it)."""
    return {f.name: list(f.default) if isinstance(f.default, tuple) else f.default
            for c in config_classes for f in flag_fields(c)}


def config_argv(values, parser, source, command_line_only=()):
    """A config file's {setting: value} as command-line tokens (["--lr=0.001", "--no-speakers"]) that
    parser accepts, so a config file is checked exactly as a command line is. SystemExit in one line
    naming source for a name that is no setting of parser (with the nearest names), one of
    command_line_only, or a switch whose value is not true or false. A value None keeps the default;
    "argv" (the command lines args.json records besides the settings) is skipped."""
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    tokens = []
    for key, value in values.items():
        if key == "argv" or value is None:
            continue
        if key in command_line_only:
            raise SystemExit(f"{source}: {key!r} is given on the command line only, not in a config file")
        if key not in actions:
            near = difflib.get_close_matches(key, list(actions), n=3)
            raise SystemExit(f"{source}: unknown setting {key!r}" + (f" (did you mean {' or '.join(near)}?)"
                                                                       if near else ""))
        flag = actions[key].option_strings[0]
        if isinstance(actions[key], argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise SystemExit(f"{source}: {key} must be true or false, got {value!r}")
            tokens.append(flag if value else f"--no-{flag[2:]}")
        else:
            tokens.append(f"{flag}={','.join(map(str, value)) if isinstance(value, (list, tuple)) else value}")
    return tokens


def read_config(path):
    """A JSON file of {setting: value} (a run's args.json is one). SystemExit in one line for a file
    that is missing, not JSON or not an object."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise SystemExit(f"--config {path}: {first_line(e, path)} (a JSON file or a preset's name)") from None
    try:
        values = json.loads(text)
    except ValueError as e:
        raise SystemExit(f"--config {path}: not JSON ({first_line(e)})") from None
    if not isinstance(values, dict):
        raise SystemExit(f"--config {path}: not a JSON object of settings")
    return values


def format_flags(values, keys):
    """{'batch_size': 16, 'modalities': ['video', 'text'], 'wandb': False} -> "--batch-size 16 --modalities
    video,text --no-wandb" (a switch as its flag)."""
    def show(key, value):
        flag = f"--{key.replace('_', '-')}"
        if isinstance(value, bool):
            return flag if value else f"--no-{flag[2:]}"
        if isinstance(value, (list, tuple)):
            return f"{flag} {','.join(map(str, value))}"
        return f"{flag} {repr(value) if value == '' else value}"
    return " ".join(show(key, values[key]) for key in keys)


def add_config(parser, presets):
    """--config FILE|NAME (repeatable), and a flag --NAME for each of presets ({name: {setting: value}})."""
    parser.add_argument("--config", action="append", help="a JSON file of settings (a run's args.json is one) or "
                        f"a preset ({', '.join(presets)}); several apply in turn, and flags override them all")
    for name, values in presets.items():
        parser.add_argument(f"--{name}", action="store_true", help=f"--config {name}: {format_flags(values, values)}")


def parse_settings(parser, argv, presets, command_line_only=()):
    """argv parsed over the defaults as changed by the presets' flags (--demo) and then each --config
    (a JSON file or a preset's name), in turn -> (args, without those flags; the names of the
    settings the configs and argv give). Each config is checked as the command line is, a mistake
    reported with its name; the settings in command_line_only cannot come from a config."""
    meta = argparse.ArgumentParser(add_help=False)
    meta.add_argument("--config", action="append", default=[])
    for name in presets:
        meta.add_argument(f"--{name}", action="store_true")
    chosen = vars(meta.parse_known_args(argv)[0])
    given = set()
    for source in [name for name in presets if chosen[name]] + chosen["config"]:
        values = presets[source] if source in presets else read_config(source)
        prog, parser.prog = parser.prog, f"--config {source}"      # a bad value is reported with the file's name
        parsed = parser.parse_args(config_argv(values, parser, f"--config {source}",
                                               ("config", *presets, *command_line_only)))
        parser.prog = prog
        values = {k: getattr(parsed, k) for k, v in values.items() if k != "argv" and v is not None}
        parser.set_defaults(**values)
        given |= set(values)
    args = parser.parse_args(argv)
    for name in ("config", *presets):
        delattr(args, name)
    for key, value in vars(args).items():
        if isinstance(value, tuple):   # a default: the list a flag or a JSON file gives
            setattr(args, key, list(value))
    return args, given | given_flags(parser, argv)


def given_flags(parser, argv):
    """The dests of the flags argv gives explicitly (parsed with every default suppressed)."""
    defaults = {a.dest: a.default for a in parser._actions}
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    try:
        return set(vars(parser.parse_args(argv)))
    finally:
        for action in parser._actions:
            action.default = defaults[action.dest]


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


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)   # no space left on the device, or over its quota


def disk_full(path):
    """"the disk holding PATH is full (N MB free)": what a write that failed for room says."""
    try:
        free = f"{shutil.disk_usage(Path(path) if Path(path).is_dir() else Path(path).parent).free / 2 ** 20:.0f} MB"
    except OSError:
        free = "unknown space"
    return f"the disk holding {path} is full ({free} free)"


def write_atomic(path, content):
    """Write str (UTF-8, line ends as given) or bytes to a temporary file beside `path`, then
    rename it over `path`: a reader, or a run resumed after a kill, never sees half a file, and a
    write that fails (a full disk) leaves no temporary file behind. content may also be a function
    that writes to the path it is given (e.g. a torch.save)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"     # its own: another process may write the same file
    try:
        if callable(content):
            content(tmp)
        elif isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content, encoding="utf-8", newline="")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
