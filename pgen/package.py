"""Ahead-of-time packages: every target's kernel library, the TVM runtime libraries, a manifest.

A package is a folder `NAME.pgenpkg/` (or that folder as one `.tar`) that a host with only numpy and
apache-tvm-ffi loads through `pgen_runtime.load_package`: no TVM compiler, no rebuild per GPU.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import jinja2

from pgen_runtime.errors import PackageError
from pgen_runtime.package import FORMAT_VERSION, MANIFEST, hash_files
from pgen_runtime.spec import NULL_BLOCK_ID, AttentionSpec

from . import templates
from .build import BuiltLibrary, build_library, versions
from .target import BuildTarget, cpu_features, parse_targets

_TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(templates.__file__).parent),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
)


def package(spec: AttentionSpec, targets: str | Iterable[BuildTarget], out: str | Path,
            name: str | None = None, as_tar: bool = False, progress=print,
            overrides: dict[str, dict[str, Any]] | None = None) -> Path:
    """Build `spec` for every target and write a package.

    Args:
        spec: what to build.
        targets: `llvm,cuda:sm_80,sm_90` or parsed targets.
        out: the package folder to write (its parent must exist); `.tar` is appended with as_tar.
        name: package name (default: the folder's name without suffix).
        as_tar: write one uncompressed tar instead of a folder.
        progress: called with one line of text per step.
        overrides: kernel name -> schedule config to build instead of the tuned or default one.

    Returns:
        The path written.

    Raises:
        BuildError: a kernel failed to build. PackageError: the output cannot be written.
    """
    targets = parse_targets(targets) if isinstance(targets, str) else list(targets)
    out = Path(out)
    name = name or out.name.split(".")[0]
    built: list[BuiltLibrary] = []
    for target in targets:
        progress(f"[{len(built) + 1}/{len(targets)}] building {spec.uri} for {target.name} ...")
        lib = build_library(spec, target, overrides)
        progress(lib.summary())
        built.append(lib)
    return publish(out, lambda root: assemble(spec, built, root, name), as_tar=as_tar, progress=progress)


def publish(out: Path, fill: Callable[[Path], dict], as_tar: bool = False,
            progress: Callable[[str], None] = print, check: Callable[[Path], None] | None = None) -> Path:
    """Write a package atomically: `fill(staging)` writes its files and returns the manifest; the
    sha256 of every file is added, `check(staging)` may still refuse it (by raising: nothing is
    written, and a package already at `out` stays), then the folder (or one .tar) replaces `out`
    in one rename.

    Raises:
        PackageError: `out`'s parent folder does not exist.
    """
    out = Path(out)
    if not out.parent.is_dir():
        raise PackageError(f"cannot write {out}: {out.parent} does not exist; create it first")
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        manifest = fill(staging)
        manifest["files"] = hash_files(staging)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        progress(f"manifest: {len(manifest['files'])} files, targets {[t['name'] for t in manifest['targets']]}")
        if check is not None:
            check(staging)
        final = out.with_name(out.name + ".tar") if as_tar else out
        if as_tar:
            tmp_tar = staging.with_suffix(".tar.tmp")
            with tarfile.open(tmp_tar, "w") as tar:
                tar.add(staging, arcname=out.name)
            os.replace(tmp_tar, final)
        else:
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    progress(f"wrote {final}")
    return final


def assemble(spec: AttentionSpec, built: list[BuiltLibrary], root: Path, name: str) -> dict:
    """Copy the kernel libraries and TVM runtime into `root`, render the header and README, and
    return the manifest (without `files`: `publish` hashes what ends up in the package)."""
    from . import cuda

    has_cuda = any(b.target.kind == "cuda" for b in built)
    runtime_dir = root / "lib" / "tvm"
    runtime_dir.mkdir(parents=True)
    runtime_libs = {"cpu": [], "cuda": []}
    for path in cuda.tvm_runtime_lib_paths(cuda=has_cuda):
        shutil.copy2(path, runtime_dir / path.name)
        rel = f"lib/tvm/{path.name}"
        runtime_libs["cpu" if path.name == "libtvm_runtime.so" else "cuda"].append(rel)
    targets = []
    for lib in built:
        folder = Path("targets") / lib.target.name.replace(":", "-").replace(",", "-")
        (root / folder).mkdir(parents=True)
        shutil.copy2(lib.path, root / folder / "kernels.so")
        for cubin in sorted(lib.path.parent.glob("*.cubin")):
            shutil.copy2(cubin, root / folder / cubin.name)
        targets.append({
            "name": lib.target.name,
            "kind": lib.target.kind,
            "archs": list(lib.target.archs),
            "mcpu": lib.target.mcpu,
            "machine": platform.machine(),
            "cpu_features": cpu_features(lib.target.mcpu) if lib.target.kind == "llvm" else [],
            "library": f"{folder}/kernels.so",
            "ptx_arch": lib.target.archs[-1] if lib.target.kind == "cuda" else None,
            "kernels": {
                k: {"symbol": k, "args": lib.signatures[k], "config": c.config, "provenance": c.source,
                    "rule": c.rule}
                for k, c in lib.choices.items()
            },
            "sass": lib.sass,
            "build_key": lib.key,
        })
    context = {
        "name": name,
        "format_version": FORMAT_VERSION,
        "spec": spec.to_dict(),
        "spec_uri": spec.uri,
        "kv_layout": spec.kv_layout,
        "null_block_id": NULL_BLOCK_ID,
        "pool_rows": spec.pool_rows,
        "kv_scale_rows": spec.kv_scale_rows,
        "kv_storage_dtype": spec.kv_storage_dtype,
        "versions": versions(),
        "has_cuda": has_cuda,
        "kernels": targets[0]["kernels"] and {k: v["args"] for k, v in targets[0]["kernels"].items()},
        "targets": [{**t, "kernels": list(t["kernels"])} for t in targets],
        "header": f"pgen_{spec.uri}.h",
        "guard": spec.uri.upper(),
    }
    (root / "include").mkdir()
    (root / "include" / context["header"]).write_text(_TEMPLATES.get_template("header.h.j2").render(context))
    (root / "README.md").write_text(_TEMPLATES.get_template("README.md.j2").render(context))
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "spec": spec.to_dict(),
        "spec_uri": spec.uri,
        "kv_layout": spec.kv_layout,
        "null_block_id": NULL_BLOCK_ID,
        "versions": versions(),
        "runtime_libs": runtime_libs,
        "targets": targets,
    }
    return manifest
