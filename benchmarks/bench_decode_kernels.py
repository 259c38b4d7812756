"""The kernels a decoding step runs on the default model, side by side in one process; writes benchmarks/results/decode_kernels.json.

(a) Linear layers: F.linear (CPU BLAS) against oneDNN (``evaluation.fast_linears.onednn_linear``) for each weight
    shape of the model and several row counts, each pass over all of the model's weights of that shape (as a forward
    pass reads them: from memory, not from cache), interleaved, medians of ``--reps``.
(b) One-query attention over a left-padded cache with room (``RoomyLayer``'s strided views) for 30 layers: PyTorch's
    fused ``scaled_dot_product_attention`` (as transformers calls it for a decoding step: grouped heads packed) against
    ``evaluation.decode_attention.matmul_attention``.

    .venv/bin/python benchmarks/bench_decode_kernels.py [--threads 2] [--reps 5]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from pathlib import Path

import torch

from instructedit.config import DEFAULT_MODEL
from instructedit.evaluation.decode_attention import matmul_attention
from instructedit.evaluation.fast_linears import onednn_available, onednn_linear
from instructedit.io import write_json
from instructedit.models.loading import load_model

from common import cpu_name  # benchmarks/common.py

RESULTS = Path(__file__).resolve().parent / "results" / "decode_kernels.json"
ROWS = (1, 2, 4, 8, 16, 64, 168, 400)
ATTENTION = ((250, 68), (168, 72), (40, 80), (4, 80))  # (rows, cached positions) of decoding steps in an evaluation


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not onednn_available():
        raise SystemExit("this PyTorch has no oneDNN linear")
    model, _ = load_model(DEFAULT_MODEL)
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            by_shape.setdefault(tuple(m.weight.shape), []).append(m.weight.detach())
    linears = []
    with torch.no_grad():
        for shape, weights in by_shape.items():
            for rows in ROWS:
                x = torch.randn(rows, shape[1])
                blas = lambda: [torch.nn.functional.linear(x, w) for w in weights]  # noqa: E731
                onednn = lambda: [onednn_linear(x, w, None) for w in weights]  # noqa: E731
                blas(), onednn()
                times = {"blas": [], "onednn": []}
                for _ in range(args.reps):
                    times["blas"].append(_timed(blas))
                    times["onednn"].append(_timed(onednn))
                med = {k: statistics.median(v) / len(weights) for k, v in times.items()}
                linears.append({"shape": list(shape), "weights": len(weights), "rows": rows, "blas_ms": med["blas"] * 1e3,
                                "onednn_ms": med["onednn"] * 1e3, "blas_over_onednn": med["blas"] / med["onednn"]})
                print(f"linear {shape} × {len(weights)}, {rows} rows: BLAS {med['blas'] * 1e3:.3f} ms, oneDNN {med['onednn'] * 1e3:.3f} ms "
                      f"({med['blas'] / med['onednn']:.2f}×)", flush=True)
        config = model.config
        heads, kv = config.num_attention_heads, config.num_key_value_heads
        d = config.hidden_size // heads
        attention = []
        for rows, length in ATTENTION:
            layers = [(torch.randn(rows + 8, kv, length + 16, d)[:rows, :, :length], torch.randn(rows + 8, kv, length + 16, d)[:rows, :, :length])
                      for _ in range(config.num_hidden_layers)]
            query = torch.randn(rows, heads, 1, d)
            mask = torch.ones(rows, 1, 1, length, dtype=torch.bool)
            mask[: rows // 2, ..., :5] = False
            packed = query.reshape(rows, kv, heads // kv, d)  # transformers' pack_gqa for one query
            fused = lambda: [torch.nn.functional.scaled_dot_product_attention(packed, k, v, attn_mask=mask) for k, v in layers]  # noqa: E731
            matmul = lambda: [matmul_attention(query, k, v, mask, None) for k, v in layers]  # noqa: E731
            fused(), matmul()
            times = {"fused": [], "matmul": []}
            for _ in range(args.reps):
                times["fused"].append(_timed(fused))
                times["matmul"].append(_timed(matmul))
            med = {k: statistics.median(v) for k, v in times.items()}
            attention.append({"rows": rows, "positions": length, "layers": config.num_hidden_layers, "fused_ms": med["fused"] * 1e3,
                              "matmul_ms": med["matmul"] * 1e3, "fused_over_matmul": med["fused"] / med["matmul"]})
            print(f"attention {rows} rows × {length} positions, {config.num_hidden_layers} layers: fused {med['fused'] * 1e3:.1f} ms, "
                  f"matmul {med['matmul'] * 1e3:.1f} ms ({med['fused'] / med['matmul']:.2f}×)", flush=True)
    write_json(args.output, {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "model": DEFAULT_MODEL, "threads": args.threads, "reps": args.reps,
        "torch": torch.__version__, "cpu": cpu_name(), "linear": linears, "attention": attention,
    })


if __name__ == "__main__":
    main()
