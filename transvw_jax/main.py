"""Entry point: python -m transvw_jax.main --config configs/demo.py --workdir runs/demo

Intentionally thin: the logic lives in `stages.py` and the modules it calls, which tests
import directly. Bad input (a missing config file, an unknown key in an override, an
unknown stage, an unreadable checkpoint) prints one line and exits non-zero: 2 for
command-line and config errors, 1 for other input errors.
"""

from __future__ import annotations

import difflib
import re
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from transvw_jax import hostenv
from transvw_jax.errors import TransVWError
from transvw_jax.fileio import load_module

FLAGS = flags.FLAGS
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, exports.")
config_flags.DEFINE_config_file(
    "config", None, "ml_collections config file, optionally path:arg.", lock_config=True
)


def _fail(message: str, code: int, label: str = "error") -> None:
    print(f"{label}: {message}", file=sys.stderr)
    sys.exit(code)


def _one_line(e: BaseException) -> str:
    """A flag or config-file error as one line: its first line and, when it embeds a
    traceback (a config file that raised), the traceback's last line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    if any(line.startswith("Traceback") for line in lines):
        return f"{lines[0]} {lines[-1]}"
    return " ".join(lines)


# An override, as config_flags recognises one: -config.a.b or --config.a.b, --noconfig.a.b
# for a boolean, with "=value" or the value in the next argument.
_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")


def _unknown_key(argv: list[str]) -> str | None:
    """The first `--config.a.b=...` override whose path the config file's config lacks, as
    one line naming the key, its section and the closest known key. The config is loaded
    again without the overrides and walked, so the line does not depend on the wording of
    ml_collections' own error. None when every override exists (the error was another)."""
    config = _config_without_overrides(argv)
    if config is None:
        return None
    for arg in argv:
        found = _OVERRIDE.match(arg)
        if found is None:
            continue
        node, section = config, "config"
        for key in found.group(1).split("."):
            known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                return f"{arg}: unknown config key {key!r} in {section}{hint}"
            node, section = node[key], f"{section}.{key}"
    return None


def _config_without_overrides(argv: list[str]) -> ml_collections.ConfigDict | None:
    """The config `--config path[:arg]` names, as its file returns it; None when it cannot
    be loaded (its own error is reported instead)."""
    value = None
    for i, arg in enumerate(argv):
        if re.match(r"^--?config=", arg):
            value = arg.split("=", 1)[1]
        elif arg in ("-config", "--config") and i + 1 < len(argv):
            value = argv[i + 1]
    if not value:
        return None
    path, *arg = value.split(":", 1)  # as config_flags: "path:arg" calls get_config(arg)
    try:
        config = load_module(path).get_config(*arg)
    except Exception:  # noqa: BLE001 - a config file can raise anything: report the original error
        return None
    return config if isinstance(config, ml_collections.ConfigDict) else None


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, but bad input gives one line and exit code 2 (absl exits 1)."""
    try:
        rest = FLAGS(argv)
        if FLAGS["config"].value is not None:
            FLAGS.config.get("stages")  # config_flags loads lazily: fail here, not later
    except flags.Error as e:
        _fail(_one_line(e), 2)
    except OSError as e:
        reason = [line.strip() for line in str(e).splitlines() if line.strip()][-1:]
        _fail(f"cannot load the config file given to --config: {' '.join(reason)}", 2)
    except (AttributeError, KeyError) as e:
        _fail(_unknown_key(argv) or f"cannot load the config file given to --config: {type(e).__name__}: "
              f"{_one_line(e)}", 2)
    except Exception as e:  # noqa: BLE001 - a config file can raise anything (SyntaxError...)
        _fail(f"cannot load the config file given to --config: {type(e).__name__}: "
              f"{_one_line(e)}", 2)
    missing = [f"--{name}" for name in ("config", "workdir") if FLAGS[name].value is None]
    if missing:
        _fail(f"missing required flag(s) {' '.join(missing)}", 2)
    if len(rest) > 1:
        _fail(f"unexpected arguments: {' '.join(rest[1:])}", 2)
    return rest


def _hide_library_info(record) -> bool:
    """Keep our INFO lines, drop the libraries' (Orbax logs ~30 lines per checkpoint)."""
    return record.levelno >= logging.converter.STANDARD_WARNING or not any(
        part in record.pathname for part in ("/orbax/", "/jax/_src/", "/grain/"))


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_hide_library_info)
    from transvw_jax import stages  # imports JAX: only after hostenv.prepare() (see run)

    try:
        stages.run(FLAGS.config, _WORKDIR.value)
    except TransVWError as e:
        _fail(str(e), e.exit_code, e.label)


def run() -> None:
    """The entry point of both `python -m transvw_jax.main` and the `transvw-jax` script.

    The host settings come first: `hostenv.prepare()` may re-execute the process, which is
    cheap while JAX is not yet imported (this module imports it only in `main`)."""
    hostenv.prepare()
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
