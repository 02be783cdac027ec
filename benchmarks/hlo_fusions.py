"""Where named XLA kernels come from: for each kernel name (as ``--profile`` of
``train_step.py`` lists it), the fusion's outputs, the JAX ops (``op_name`` metadata: the last
path element, e.g. ``mul``, ``reduce_sum``; the full path names the ``jit``/``transpose``/
``checkpoint`` scopes) and shapes of its body, and the lines of this repository that the body's
instructions come from (``stack_frame_id`` metadata, resolved through the module's ``FileNames``,
``FunctionNames``, ``FileLocations`` and ``StackFrames`` tables: the innermost frame in the repo),
from an after-optimizations HLO dump.

    XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_dump_hlo_as_text" python benchmarks/train_step.py ...
    python benchmarks/hlo_fusions.py /tmp/dump input_add_multiply_reduce_slice_fusion ...

With ``--profile`` (a ``train_step.py`` result: a JSON list of rows) it tabulates the
``profile_top`` of row ``--row`` against that row's step module: each kernel's ms per step, how
many fusions share its name, their source lines and ops; then the ms totalled by source line (a
kernel counted at its most frequent line):

    python benchmarks/hlo_fusions.py --profile result.json --row 1 --top 80 \
        /tmp/dump/module_0042.jit_step_on_mesh.sm_9.0a_gpu_after_optimizations.txt

Profile names write the HLO's ``.`` as ``_`` (``gemm_fusion_dot_239`` is ``gemm_fusion_dot.239``);
both spellings are looked up. Fusions that share a ``deduplicated_name`` run one kernel, and so do
fusions without one whose computations are alike (XLA reuses a kernel for the same code: the
``wrapped_slice`` of every layer); the profile reports the kernel under one of their names (mostly
the first in the text, not always the ``deduplicated_name``), summed over all of them. A name
stands for its fusion's whole group.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
COMPUTATION = re.compile(r"^(%[\w.\-]+) [^\n]*\{\n(.*?)\n\}", re.S | re.M)
SHAPE = re.compile(r"= (\w+\[[\d,]*\])")
INSTRUCTION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = ")
TABLE = re.compile(r"^(FileNames|FunctionNames|FileLocations|StackFrames)\n(.*?)(?:\n\n|\Z)", re.S | re.M)
ROW = re.compile(r"^(\d+) (.*)$", re.M)
FIELD = re.compile(r"(\w+)=(\d+)")


class Frame(NamedTuple):
    """One Python frame of an instruction's stack."""

    file: str
    line: int
    function: str


def hlo_spellings(name: str) -> set[str]:
    """The profile name and its HLO spelling (a trailing ``_N`` is ``.N``)."""
    return {name, re.sub(r"_(\d+)$", r".\1", name)}


def stack_frames(text: str) -> dict[int, tuple[Frame, ...]]:
    """Every ``stack_frame_id`` of one HLO module's text as its chain of frames, innermost first.

    The text prints a frame's parent as the parent's id + 1 (``1``: none)."""
    tables = {m.group(1): {int(i): row for i, row in ROW.findall(m.group(2))} for m in TABLE.finditer(text)}
    files, functions = ({i: row.strip('"') for i, row in tables.get(table, {}).items()}
                        for table in ("FileNames", "FunctionNames"))
    chains: dict[int, tuple[Frame, ...]] = {}
    for i, row in sorted(tables.get("StackFrames", {}).items()):
        frame = {key: int(value) for key, value in FIELD.findall(row)}
        location = tables["FileLocations"][frame["file_location_id"]]
        at = {key: int(value) for key, value in FIELD.findall(location)}
        source = Frame(files[at["file_name_id"]], at["line"], functions[at["function_name_id"]])
        chains[i] = (source, *chains.get(frame["parent_frame_id"] - 1, ()))
    return chains


def repo_frame(chain: tuple[Frame, ...], root: Path) -> Frame | None:
    """The innermost frame of ``chain`` in a file under ``root``, its path relative to ``root``."""
    for frame in chain:
        if frame.file.startswith(f"{root}/"):
            return frame._replace(file=str(Path(frame.file).relative_to(root)))
    return None


class Module:
    """One after-optimizations HLO module: its fusion instructions grouped by the kernel they run,
    the computations they call and the module's stack frames."""

    def __init__(self, text: str) -> None:
        self.bodies = {m.group(1): m.group(2) for m in COMPUTATION.finditer(text)}
        self.frames = stack_frames(text)
        self.shared: dict[str, str] = {}  # fusion name -> its deduplicated name, else its code
        self.fusions: dict[str, list[str]] = collections.defaultdict(list)  # by that key
        for line in text.splitlines():
            if " fusion(" in line and (m := INSTRUCTION.match(line)):
                shared = re.search(r'deduplicated_name="([^"]+)"', line)
                self.shared[m.group(1)] = key = shared.group(1) if shared else self.code(self.body(line))
                self.fusions[key].append(line.strip())

    def code(self, body: str) -> str:
        """A computation's text without metadata, its names numbered, the computations it calls
        written out: alike for fusions that run one kernel."""
        names: dict[str, str] = {}

        def name(m: re.Match[str]) -> str:
            called = self.bodies.get(m.group(0))
            return f"{{{self.code(called)}}}" if called else names.setdefault(m.group(0), f"%{len(names)}")

        return re.sub(r"%[\w.\-]+", name, re.sub(r", metadata=\{[^}]*\}", "", body))

    def lines(self, name: str) -> list[str]:
        """The fusion instructions of the kernel a profile reports as ``name`` (either spelling):
        the fusion so named and every one sharing its deduplicated name or, without one, its code."""
        keys = {self.shared.get(spelling, spelling) for spelling in hlo_spellings(name)}
        return [line for key in sorted(keys) for line in self.fusions.get(key, [])]

    def body(self, line: str) -> str:
        """The text of the computation a fusion instruction calls."""
        called = re.search(r"calls=(%[\w.\-]+)", line)
        return self.bodies.get(called.group(1), "") if called else ""

    def ops(self, name: str) -> collections.Counter[str]:
        """The last ``op_name`` elements of the body instructions of ``name``'s fusions."""
        return collections.Counter(op.split("/")[-1] for line in self.lines(name)
                                   for op in re.findall(r'op_name="([^"]+)"', self.body(line)))

    def sources(self, name: str, root: Path = REPO) -> collections.Counter[Frame]:
        """The innermost frames under ``root`` of the body instructions of ``name``'s fusions."""
        chains = (self.frames.get(int(i), ()) for line in self.lines(name)
                  for i in re.findall(r"stack_frame_id=(\d+)", self.body(line)))
        return collections.Counter(frame for chain in chains if (frame := repo_frame(chain, root)))


def where(frame: Frame) -> str:
    """``path:line`` of a frame."""
    return f"{frame.file}:{frame.line}"


def describe(module: Module, name: str, top: int) -> list[str]:
    """Lines describing every fusion a profile reports as ``name``, then its ops, shapes and sources."""
    lines = [f"{name}: {line[:400]}" for line in module.lines(name)]
    if lines:
        shapes = collections.Counter(shape for line in module.lines(name)
                                     for shape in SHAPE.findall(module.body(line)))
        sources = [(where(frame), n) for frame, n in module.sources(name).most_common(top)]
        lines += [f"  ops: {module.ops(name).most_common(top)}", f"  shapes: {shapes.most_common(top)}",
                  f"  sources: {sources}"]
    return lines


def profile_table(module: Module, kernels: list[dict], top: int, lines: int, root: Path = REPO) -> list[str]:
    """The ``top`` costliest kernels with their fusions' sources and ops, then the ms of all
    ``kernels`` totalled by each one's most frequent source line (the ``lines`` costliest)."""
    out = [f"{'kernel':48} {'ms/step':>8} {'fus':>4}  sources (body instructions)  |  ops"]
    ms_by_line: collections.Counter[str] = collections.Counter()
    kernels_by_line: collections.Counter[str] = collections.Counter()
    for rank, kernel in enumerate(kernels):
        name, ms, fusions = kernel["name"], kernel["ms_per_call"], module.lines(kernel["name"])
        sources = module.sources(name, root)
        if not fusions:
            line = "(not an XLA fusion: cuBLAS, Pallas, custom call)"
        elif sources:
            frame = sources.most_common(1)[0][0]
            line = f"{where(frame)} {frame.function}"
        else:
            line = "(fusion without a repo frame)"
        ms_by_line[line] += ms
        kernels_by_line[line] += 1
        if rank < top:
            found = " ".join(f"{where(frame)}×{n}" for frame, n in sources.most_common(3))
            ops = " ".join(f"{op}×{n}" for op, n in module.ops(name).most_common(3))
            out.append(f"{name[:48]:48} {ms:8.3f} {len(fusions):4}  {found or '-'}  |  {ops or '-'}")
    total = sum(kernel["ms_per_call"] for kernel in kernels)
    out += ["", f"ms per step by source line, over the {len(kernels)} profiled kernels ({total:.1f} ms):",
            f"{'ms/step':>8} {'share':>6} {'kernels':>7}  line"]
    out += [f"{ms:8.3f} {ms / total:6.1%} {kernels_by_line[line]:7}  {line[:150]}"
            for line, ms in ms_by_line.most_common(lines)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dump", type=Path, help="the --xla_dump_to directory, or one module's text")
    parser.add_argument("names", nargs="*", help="kernel names from the profile")
    parser.add_argument("--top", type=int, default=12, help="ops / shapes listed; with --profile: kernels")
    parser.add_argument("--profile", type=Path, help="a train_step.py result (JSON rows) to tabulate")
    parser.add_argument("--row", type=int, default=0, help="the row of --profile")
    parser.add_argument("--lines", type=int, default=40, help="source lines totalled with --profile")
    args = parser.parse_args()
    paths = [args.dump] if args.dump.is_file() else sorted(args.dump.glob("*after_optimizations.txt"))
    if args.profile:
        if not args.dump.is_file():
            parser.error("--profile takes the step's module text as DUMP")
        kernels = json.loads(args.profile.read_text())[args.row]["profile_top"]
        print("\n".join(profile_table(Module(args.dump.read_text()), kernels, args.top, args.lines)))
    if args.names:
        for path in paths:
            module = Module(path.read_text())
            for name in args.names:
                for line in describe(module, name, args.top):
                    print(f"{path.name[:48]}  {line}")


if __name__ == "__main__":
    main()
