"""Peak resident memory of `convert_hf` on a synthetic checkpoint, relative to its size on disk.

Writes random bf16 weights of a Qwen3.5-shaped model (about 1.9 GB by default) as sharded
safetensors, converts them in a child process and reports the child's peak RSS next to the size of
the checkpoint and of the Python + JAX runtime (a child that only imports the package).

    python benchmarks/convert_memory.py [--hidden 2048 --layers 16 --vocab 32768] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from flare_jax.config import FULL, LINEAR, ModelConfig
from flare_jax.convert.synthetic import write_random_checkpoint

PEAK_RSS = "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))"


def child_peak_rss(code: str) -> int:
    """Peak RSS in bytes of a fresh Python process running ``code``: its own ``VmHWM`` (which
    starts anew at exec, unlike ``ru_maxrss`` of a child forked from a large parent)."""
    out = subprocess.run([sys.executable, "-c", f"{code}\n{PEAK_RSS}"], check=True,
                         capture_output=True, text=True).stdout
    return int(out.split()[-1]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    h = args.hidden
    config = ModelConfig(
        vocab_size=args.vocab, hidden_size=h, intermediate_size=3 * h, num_hidden_layers=args.layers,
        num_attention_heads=h // 256, num_key_value_heads=max(1, h // 1024), head_dim=256,
        linear_num_key_heads=h // 128, linear_num_value_heads=h // 128, linear_key_head_dim=128,
        linear_value_head_dim=128, linear_conv_kernel_dim=4,
        layer_types=tuple(FULL if (i + 1) % 4 == 0 else LINEAR for i in range(args.layers)))
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        src, dst = Path(tmp) / "hf", Path(tmp) / "ckpt"
        write_random_checkpoint(src, config, max_shard_bytes=512 * 1024**2)
        size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        baseline = child_peak_rss("import flare_jax, jax; jax.numpy.zeros(1).block_until_ready()")
        peak = child_peak_rss(f"import flare_jax; flare_jax.convert_hf({str(src)!r}, {str(dst)!r})")
    gib = 1024**3
    print(f"checkpoint size on disk : {size / gib:.2f} GiB")
    print(f"runtime baseline RSS    : {baseline / gib:.2f} GiB (python + jax + flare_jax imports)")
    print(f"convert_hf peak RSS     : {peak / gib:.2f} GiB")
    print(f"peak / size             : {peak / size:.2f}x")
    print(f"(peak - baseline) / size: {(peak - baseline) / size:.2f}x")


if __name__ == "__main__":
    main()
