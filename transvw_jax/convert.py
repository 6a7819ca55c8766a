"""Convert released or trained weights between formats, from the command line.

    python -m transvw_jax.convert IN OUT [--head | --no-head]

IN:  a `.pt` / `.pth` / `.safetensors` file (the reference PyTorch layout), a Keras `.h5` /
     `.hdf5` release of Models Genesis or TransVW (`keras_weights`), or a pretraining
     workdir (its best checkpoint, else its latest).
OUT: by suffix, `.safetensors` or `.pt` (the reference PyTorch layout; `.pt` needs the
     torch extra), or a directory: an Orbax checkpoint (step 0 under
     `OUT/checkpoints/`) that `finetune.pretrained=OUT` and
     `checkpointing.read_stored_variables(OUT)` read like a pretraining workdir.
`--no-head` leaves out the visual-word head (`clc_out`), e.g. for a UNet3D.

Every output is written under a temporary name and renamed when complete (files by
`export.save`, checkpoints by Orbax). A bad argument prints one `error: ...` line and
exits with 2, a missing, corrupt or mismatched input with 1; success prints one line
saying what was written.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flax.traverse_util import flatten_dict

from transvw_jax import export
from transvw_jax.errors import CheckpointError, ConfigError, TransVWError

INPUT_SUFFIXES = (".pt", ".pth", ".safetensors", *export.KERAS_SUFFIXES)
FILE_OUTPUTS = {".safetensors": "safetensors", ".pt": "PyTorch .pt"}
HEAD = "clc_out"


def read_variables(src: str | os.PathLike) -> tuple[str, dict]:
    """(description, {'params', 'batch_stats'}) of a weight file or a pretraining workdir."""
    found = export.read_weights(src, "file or directory")
    if found is None:
        raise CheckpointError(f"{src}: no best/ or checkpoints/ with a complete step")
    where, step, variables = found
    return (where if step is None else f"{where} (step {step})"), variables


def _without_head(variables: Mapping[str, Any]) -> dict:
    return {collection: {k: v for k, v in dict(tree).items() if k != HEAD}
            for collection, tree in variables.items()}


def _count(variables: Mapping[str, Any]) -> tuple[int, int]:
    """(arrays, parameters): leaves of every collection, elements of `params`."""
    leaves = sum(len(flatten_dict(dict(tree))) for tree in variables.values())
    params = sum(int(np.size(v)) for v in flatten_dict(dict(variables.get("params", {}))).values())
    return leaves, params


def output_format(dst: str | os.PathLike) -> str:
    """The format `dst` names: a FILE_OUTPUTS value or "Orbax checkpoint".

    Raises:
      ConfigError for a suffix that names no output format.
    """
    dst = Path(dst)
    if dst.suffix.lower() in FILE_OUTPUTS and not dst.is_dir():
        return FILE_OUTPUTS[dst.suffix.lower()]
    if dst.is_dir() or not dst.suffix:
        return "Orbax checkpoint"
    raise ConfigError(f"{dst}: unknown output format; use a .safetensors or .pt file, or a directory "
                      "(an Orbax checkpoint)")


def convert(src: str | os.PathLike, dst: str | os.PathLike, head: bool = True) -> str:
    """Read `src`, write `dst` (formats: the module doc); returns the line to print.

    Raises:
      ConfigError for arguments that name no format; CheckpointError (one line naming the
      file) for a missing, corrupt or mismatched input or an output directory that
      already holds checkpoints.
    """
    src, dst = Path(src), Path(dst)
    fmt = output_format(dst)
    if src.is_file() and src.suffix.lower() not in INPUT_SUFFIXES:
        raise ConfigError(f"{src}: unknown input format; use a {', '.join(INPUT_SUFFIXES)} file "
                          "or a pretraining workdir")
    if src.exists() and dst.exists() and src.resolve() == dst.resolve():
        raise ConfigError(f"{dst}: the output would overwrite the input")
    if fmt == FILE_OUTPUTS[".pt"] and importlib.util.find_spec("torch") is None:  # fail before the work
        raise CheckpointError(f"{dst}: .pt files need PyTorch; install the extra: pip install "
                              "'transvw-jax[torch]', or write a .safetensors file")
    if fmt == "Orbax checkpoint":
        from transvw_jax import checkpointing

        # Checked before reading: Orbax would refuse step 0 of a used directory, and a
        # workdir's best/ would shadow what is written here.
        taken = [d for d in (checkpointing.checkpoint_dir(dst), checkpointing.best_dir(dst))
                 if d.is_dir() and any(d.iterdir())]
        if taken:
            raise CheckpointError(f"{taken[0]}: already holds checkpoints; write to a new directory")
    source, variables = read_variables(src)
    if not head:
        variables = _without_head(variables)
    if fmt == "Orbax checkpoint":
        checkpointing.save(dst, 0, variables)
        arrays, params = _count(variables)
        where = checkpointing.checkpoint_dir(dst) / "0"
    else:
        state_dict = export.to_torch_state_dict(variables, head=head)
        export.save(dst, variables, head=head)
        arrays, params = len(state_dict), _count(variables)[1]
        where = dst
    return f"wrote {where}: {fmt}, {arrays} arrays, {params:,} parameters (from {source})"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of argparse's usage block
        raise ConfigError(f"{message} (usage: python -m transvw_jax.convert IN OUT [--head | --no-head])")


def main(argv: Sequence[str] | None = None) -> int:
    """The command; returns its exit status (0, 1 bad input file, 2 bad arguments)."""
    parser = _Parser(prog="python -m transvw_jax.convert", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="a .pt/.pth/.safetensors/.h5/.hdf5 file or a pretraining workdir")
    parser.add_argument("output", help="a .safetensors or .pt file, or a directory (Orbax checkpoint)")
    parser.add_argument("--head", action=argparse.BooleanOptionalAction, default=True,
                        help="keep the visual-word head clc_out (default: keep)")
    # Warnings (a head left out, a dropped Keras layer) as single lines beside the result.
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s", stream=sys.stderr)
    try:
        args = parser.parse_args(argv)
        print(convert(args.input, args.output, head=args.head))
    except TransVWError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # an unwritable output (permissions, a full disk)
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
