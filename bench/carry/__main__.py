"""python3 -m bench.carry COMMAND ...: the steps of bench/wheelhouse.sh (here) and bench/gpu.sh (there).

prune SRC DST [--arch 90]            keep the GPU code sm_ARCH loads (fatbin.py), verify, print a summary
strip --out DIR MODEL...             skeletons + weight manifests (weights.py); fp32 export first
regenerate SKELETON OUT              draw the weights again, write OUT.onnx
build OUT_DIR --tree-bytes N NAME=DIR...   pack each DIR as NAME.tar.xz, split to fit the calls, write
                                     OUT_DIR/carry.json, print the calls
stash CARRIED STORE                  move this call's parts out of the working-tree copy
unpack STORE ROOT                    unpack every archive whose parts are all in STORE into ROOT/NAME
                                     (skipped when ROOT/NAME already holds that SHA-256); print what is ready
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.carry import bundle

READY_MARK = ".carry-sha256"


def _prune(args: argparse.Namespace) -> int:
    from bench.carry import fatbin

    data = args.src.read_bytes()
    pruned, report = fatbin.prune(data, args.arch)
    fatbin.verify(data, pruned, args.arch)
    args.dst.write_bytes(pruned)
    args.dst.chmod(args.src.stat().st_mode)
    print(f"{args.src.name}: {report}; verified")
    return 0


def _strip(args: argparse.Namespace) -> int:
    from bench.carry import weights

    for skeleton in weights.strip(args.models, args.out, base_seed=args.seed):
        print(f"{skeleton}: {skeleton.stat().st_size} bytes")
    return 0


def _regenerate(args: argparse.Namespace) -> int:
    from bench.carry import weights

    result = weights.regenerate(args.skeleton, args.out)
    print(
        f"{args.out}: {result['tensors']} initializers drawn with numpy {result['numpy']}; "
        f"{'identical to' if result['identical'] else 'DIFFERENT from'} the values drawn where the skeleton was made"
    )
    return 0


def _build(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    room = bundle.CALL_LIMIT_BYTES - args.tree_bytes - 64 * 1024 - bundle.CALL_MARGIN_BYTES
    archives = []
    for spec in args.archives:
        name, _, folder = spec.partition("=")
        path = args.out / f"{name}.tar.xz"
        bundle.pack(Path(folder), path)
        archives.append(bundle.split(path, room))
    calls = bundle.plan_calls(archives, args.tree_bytes)
    bundle.write_manifest(args.out, archives, calls, args.tree_bytes)
    for archive in archives:
        print(f"{archive.name}: {archive.size} bytes in {len(archive.parts)} part(s), sha256 {archive.sha256}")
    for i, parts in enumerate(calls, 1):
        size = sum(s for a in archives for p, s in a.parts if p in parts)
        print(f"call {i}: {', '.join(parts)}: {size} + tree {args.tree_bytes} bytes (limit {bundle.CALL_LIMIT_BYTES})")
    return 0


def _stash(args: argparse.Namespace) -> int:
    moved = bundle.stash(args.carried, args.store)
    print(f"stashed in {args.store}: {', '.join(moved) or 'nothing (this call carried no parts)'}")
    return 0


def _unpack(args: argparse.Namespace) -> int:
    if not (args.store / bundle.MANIFEST).is_file():
        print(f"no {bundle.MANIFEST} in {args.store}: nothing was carried")
        return 0
    status = 0
    for archive in bundle.read_manifest(args.store):
        dest = args.root / archive.name
        mark = dest / READY_MARK
        if mark.is_file() and mark.read_text().strip() == archive.sha256:
            print(f"{archive.name}: ready in {dest}")
            continue
        missing = bundle.missing_parts(archive, args.store)
        if missing:
            print(f"{archive.name}: waiting for {', '.join(missing)}")
            continue
        try:
            bundle.unpack(archive, args.store, dest)
        except (bundle.BundleError, OSError, EOFError) as exc:  # one damaged archive must not hide the others
            print(f"{archive.name}: FAILED: {exc}")
            status = 1
            continue
        mark.write_text(archive.sha256 + "\n")
        for name, _ in archive.parts:
            (args.store / name).unlink()  # unpacked: the parts are no longer needed
        print(f"{archive.name}: unpacked into {dest}")
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.carry", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prune")
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--arch", type=int, default=90, help="compute capability as a number, 90 = 9.0 (H100, H200)")
    p.set_defaults(run=_prune)
    p = sub.add_parser("strip")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("models", type=Path, nargs="+")
    p.set_defaults(run=_strip)
    p = sub.add_parser("regenerate")
    p.add_argument("skeleton", type=Path)
    p.add_argument("out", type=Path)
    p.set_defaults(run=_regenerate)
    p = sub.add_parser("build")
    p.add_argument("out", type=Path)
    p.add_argument("--tree-bytes", type=int, required=True)
    p.add_argument("archives", nargs="+", metavar="NAME=DIR")
    p.set_defaults(run=_build)
    p = sub.add_parser("stash")
    p.add_argument("carried", type=Path)
    p.add_argument("store", type=Path)
    p.set_defaults(run=_stash)
    p = sub.add_parser("unpack")
    p.add_argument("store", type=Path)
    p.add_argument("root", type=Path)
    p.set_defaults(run=_unpack)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
