"""`pgen` command line: parse arguments, call the library, print. Everything is callable from Python."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pgen_runtime.errors import PgenError, TuneError


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
    p.add_argument("--target", default="llvm", help="llvm, cuda:sm_80,sm_90, or both (llvm,cuda:sm_80,sm_90)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--eos-token-id", type=int, default=None,
                   help="default: the export's eos_token_id metadata, else generation_config.json or config.json "
                        "beside it")
    p.add_argument("--tokenizer", help="the model's HF tokenizer.json to ship in the package (default: byte-level)")
    p.add_argument("--sliding-window", type=int, default=None,
                   help="every layer's sliding window, 0 for none (default: what each layer's mask builds)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip comparing the compiled model's logits with onnxruntime's before writing it")
    p.add_argument("--bounds-checks", action="store_true",
                   help="check every buffer access at run time (raises instead of reading out of bounds; slower)")
    p.add_argument("--kv-dtype", default=None, help="KV cache dtype (default: the model's): float32, float16, "
                   "bfloat16, or int8 / fp8_e4m3 (one-byte codes, a float32 scale per cached token and head)")
    p.add_argument("--weight-dtype", default="float32", choices=("float32", "bfloat16", "int8", "float16"),
                   help="dtype of the dense layers' weights: bfloat16 (llvm) halves their bytes and, on CPUs with "
                   "AVX-512 BF16, doubles the matmuls' multiply rate (inputs rounded to bf16, fp32 accumulation); "
                   "int8 (CPUs with AVX-512 VNNI) quantizes weights per column and inputs per token (W8A8); "
                   "float16 (CUDA) runs them on tensor cores")
    p.add_argument("-o", "--out", required=True, help="NAME.pgenpkg")

    p = sub.add_parser("tune", help="search the kernels' knobs on a device and write its tuning log")
    p.add_argument("--spec", help="spec TOML file (see specs/); not needed with --ingest")
    p.add_argument("--target", default="llvm", help="llvm, or cuda:sm_90 (with --rpc-tracker or --offline)")
    p.add_argument("--kernels", default="decode,extend", help="comma list of decode, extend")
    p.add_argument("--trials", type=int, default=8, help="candidates per kernel, the default included")
    p.add_argument("--workload", help="JSON/TOML: per kernel seq_lens (+ new_tokens; decode: optional guard.seq_lens), "
                   "optional [lengths]")
    p.add_argument("--jobs", type=int, default=2, help="candidates built at once")
    p.add_argument("--logs", help="tuning_logs root (default: $PGEN_TUNING_LOGS or the repository's)")
    p.add_argument("--rpc-tracker", metavar="HOST:PORT", help="time on the servers of this TVM RPC tracker")
    p.add_argument("--rpc-key", help="the key the RPC servers registered with")
    p.add_argument("--offline", metavar="DIR", help="write a measuring bundle for a device that cannot reach here")
    p.add_argument("--refine-from", metavar="LOG", help="with --offline: the device's tuning log; the bundle "
                   "holds configs one knob away from its fastest records instead of a sample")
    p.add_argument("--ingest", metavar="RESULTS", help="merge the results a bundle's measuring script wrote")
    p.add_argument("--bundle", metavar="DIR", help="the bundle the --ingest results came from (build failures)")
    p.add_argument("--block-sizes", help="co-tune the block size over these, e.g. 8,16,32,64")

    p = sub.add_parser("report", help="render tuning logs as one HTML page with charts")
    p.add_argument("logs", nargs="+", help="tuning log JSON files")
    p.add_argument("-o", "--out", required=True, help="report.html")

    p = sub.add_parser("run", help="build (or reuse) the default tiny model for the CPU and generate a batch")
    p.add_argument("--package", help="a model package (default: the tiny model, built on first use)")
    p.add_argument("-n", type=int, default=4, help="parallel samples per prompt")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)

    # NOTE: the server parses its own arguments (python -m pgen_runtime.server works without pgen).
    p = sub.add_parser("serve", add_help=False, help="serve a model package over an OpenAI-compatible HTTP API "
                       "(PACKAGE --host 127.0.0.1 --port 8000; see pgen serve -h)")

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return _serve(argv[1:])
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
                  eos_token_id=args.eos_token_id, tokenizer=args.tokenizer, bounds_checks=args.bounds_checks,
                  sliding_window=args.sliding_window, verify=not args.no_verify, kv_dtype=args.kv_dtype,
                  weight_dtype=args.weight_dtype,
                  progress=lambda line: print(line, flush=True))
    return 0


def _tune(args) -> int:
    from . import load_spec, tune
    from .target import parse_targets

    printer = lambda line: print(line, flush=True)  # noqa: E731
    logs = Path(args.logs) if args.logs else None
    if args.ingest:
        path = tune.ingest(Path(args.ingest), Path(args.bundle) if args.bundle else None, logs)
        print(f"wrote {path}\n{tune.summary(path)}")
        return 0
    if not args.spec:
        raise TuneError("pgen tune needs --spec FILE (or --ingest RESULTS to merge a device's results)")
    spec = load_spec(args.spec)
    (target,) = parse_targets(args.target)
    kernels = tune.parse_kernels(args.kernels)
    workload = tune.load_workload(args.workload) if args.workload else {}
    if args.refine_from and not args.offline:
        raise TuneError("--refine-from goes with --offline DIR (online runs refine by themselves)")
    if args.offline:
        out = tune.emit_bundle(spec, target, Path(args.offline), kernels, args.trials, workload, args.jobs, printer,
                               Path(args.refine_from) if args.refine_from else None)
        print(f"wrote {out}: copy it to the device, run\n  python -m pgen_runtime.measure {out.name} "
              f"--device {'cuda:0' if target.kind == 'cuda' else 'cpu'} -o results.json\n"
              f"then: pgen tune --ingest results.json --bundle {out}")
        return 0
    runner = None
    if args.rpc_tracker or args.rpc_key:
        if not (args.rpc_tracker and args.rpc_key):
            raise TuneError("remote tuning needs both --rpc-tracker HOST:PORT and --rpc-key KEY")
        from .rpc import RpcRunner

        runner = RpcRunner(args.rpc_tracker, args.rpc_key, "cuda" if target.kind == "cuda" else "cpu")
    if args.block_sizes:
        from . import blocksize

        sizes = tune.parse_ints("--block-sizes", args.block_sizes)
        result = blocksize.study(spec, sizes, workload, target, kernels, args.trials, logs, args.jobs, printer, runner)
        print(blocksize.table(result))
        print(f"recommended block_size = {result['recommended']} (lowest score = kernel x memory); "
              f"stored in {result['log']}")
        return 0
    path = tune.tune(spec, target, kernels, args.trials, workload, logs, args.jobs, printer, runner)
    print(f"wrote {path}\n{tune.summary(path)}")
    return 0


def _report(args) -> int:
    from .report import render

    print(f"wrote {render([Path(p) for p in args.logs], Path(args.out))}")
    return 0


def _run(args) -> int:
    from .run import report, run

    result = run(args.package, n=args.n, max_tokens=args.max_tokens, temperature=args.temperature,
                 seed=args.seed, progress=lambda line: print(line, flush=True))
    print(report(result))
    return 0


def _serve(argv: list[str]) -> int:
    try:
        from pgen_runtime.server import main as serve_main
    except ImportError as err:
        print(f"pgen serve: error: {err}", file=sys.stderr)
        return 2
    return serve_main(argv, prog="pgen serve")


_COMMANDS = {"build": _build, "package": _package, "check": _check, "compile-model": _compile_model,
             "tune": _tune, "report": _report, "run": _run}

if __name__ == "__main__":
    sys.exit(main())
