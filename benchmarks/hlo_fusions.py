"""Where named XLA kernels come from: for each kernel name (as ``--profile`` of
``train_step.py`` lists it), the fusion's outputs and the JAX ops (``op_name`` metadata: the last
path element, e.g. ``mul``, ``reduce_sum``; the full path names the ``jit``/``transpose``/
``checkpoint`` scopes) and shapes of its body, from an after-optimizations HLO dump.

    XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_dump_hlo_as_text" python benchmarks/train_step.py ...
    python benchmarks/hlo_fusions.py /tmp/dump input_add_multiply_reduce_slice_fusion ...

Profile names write the HLO's ``.`` as ``_`` (``gemm_fusion_dot_239`` is ``gemm_fusion_dot.239``);
both spellings are looked up.
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

COMPUTATION = re.compile(r"^(%[\w.\-]+) [^\n]*\{\n(.*?)\n\}", re.S | re.M)
SHAPE = re.compile(r"= (\w+\[[\d,]*\])")


def hlo_spellings(name: str) -> set[str]:
    """The profile name and its HLO spelling (a trailing ``_N`` is ``.N``)."""
    return {name, re.sub(r"_(\d+)$", r".\1", name)}


def describe(text: str, name: str, top: int) -> list[str]:
    """Lines describing every instruction called ``name`` in one HLO module's text."""
    bodies = {m.group(1): m.group(2) for m in COMPUTATION.finditer(text)}
    lines = []
    for spelling in hlo_spellings(name):
        for line in re.findall(rf"^\s*(?:ROOT )?%{re.escape(spelling)} = [^\n]*", text, re.M):
            lines.append(f"{name}: {line.strip()[:400]}")
            called = re.search(r"calls=(%[\w.\-]+)", line)
            body = bodies.get(called.group(1), "") if called else ""
            ops = collections.Counter(
                m.group(1).split("/")[-1] for m in re.finditer(r'op_name="([^"]+)"', body))
            lines.append(f"  ops: {ops.most_common(top)}")
            shapes = collections.Counter(SHAPE.findall(body))
            lines.append(f"  shapes: {shapes.most_common(top)}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dump", type=Path, help="the --xla_dump_to directory")
    parser.add_argument("names", nargs="+", help="kernel names from the profile")
    parser.add_argument("--top", type=int, default=12, help="ops / shapes listed")
    args = parser.parse_args()
    for path in sorted(args.dump.glob("*after_optimizations.txt")):
        text = path.read_text()
        for name in args.names:
            for line in describe(text, name, args.top):
                print(f"{path.name[:48]}  {line}")


if __name__ == "__main__":
    main()
