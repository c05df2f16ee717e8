"""`pgen` command line: parse arguments, call the library, print. Everything is callable from Python."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pgen_runtime.errors import PgenError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pgen", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build", help="build the kernels of a spec for one or more targets")
    p.add_argument("--spec", required=True, help="spec TOML file (see specs/)")
    p.add_argument("--target", default="llvm", help="llvm, cuda:sm_80,sm_90 or both, comma separated")
    p.add_argument("-o", "--out", help="copy each built library into this folder")

    p = sub.add_parser("package", help="build an ahead-of-time package that loads without TVM")
    p.add_argument("--spec", required=True)
    p.add_argument("--targets", default="llvm")
    p.add_argument("-o", "--out", required=True, help="NAME.pgenpkg")
    p.add_argument("--tar", action="store_true", help="write NAME.pgenpkg.tar instead of a folder")

    p = sub.add_parser("check", help="build the kernels of a spec for the CPU and check them against NumPy")
    p.add_argument("--spec", default=None, help="spec TOML file (default: specs/llama3-8b.toml, fp32)")

    p = sub.add_parser("compile-model", help="compile an ONNX decoder export (past/present KV) into a model package")
    p.add_argument("model", help="MODEL.onnx")
    p.add_argument("--target", default="llvm")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--eos-token-id", type=int, default=None, help="default: the model's eos_token_id metadata")
    p.add_argument("-o", "--out", required=True, help="NAME.pgenpkg")

    args = parser.parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except PgenError as err:
        print(f"pgen {args.command}: error: {err}", file=sys.stderr)
        return 2


def _build(args) -> int:
    import shutil

    from . import load_spec
    from .build import build_library
    from .target import parse_targets

    spec = load_spec(args.spec)
    for target in parse_targets(args.target):
        print(f"building {spec.uri} for {target.name} ...", flush=True)
        lib = build_library(spec, target)
        print(lib.summary(), flush=True)
        if args.out:
            dest = Path(args.out) / target.name.replace(":", "-").replace(",", "-")
            dest.mkdir(parents=True, exist_ok=True)
            for file in lib.path.parent.iterdir():
                shutil.copy2(file, dest / file.name)
            print(f"copied to {dest}")
    return 0


def _package(args) -> int:
    from . import load_spec
    from .package import package

    package(load_spec(args.spec), args.targets, args.out, as_tar=args.tar,
            progress=lambda line: print(line, flush=True))
    return 0


def _check(args) -> int:
    from .check import check_spec

    return 0 if check_spec(args.spec, progress=lambda line: print(line, flush=True)) else 1


def _compile_model(args) -> int:
    from .onnx import compile_model

    compile_model(args.model, args.out, target=args.target, block_size=args.block_size,
                  eos_token_id=args.eos_token_id, progress=lambda line: print(line, flush=True))
    return 0


_COMMANDS = {"build": _build, "package": _package, "check": _check, "compile-model": _compile_model}

if __name__ == "__main__":
    sys.exit(main())
