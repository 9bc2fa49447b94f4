"""`aot` JSON results (deltaworld_jax/aot.py) as the Markdown table of benchmarks/RESULTS.md."""

from __future__ import annotations

from typing import Any

from deltaworld_jax.aot import GIB
from deltaworld_jax.flops import format_flops


def aot_markdown_table(results: list[dict[str, Any]]) -> str:
    """benchmarks/ table rows for `aot` JSON results."""
    head = ("| stage | slice | mesh | remat | per-chip batch x accumulation | args | temps | code | total / HBM "
            "| matmul FLOPs/step | roofline step | samples/s/chip at peak | compile |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [head]
    for r in results:
        m = r["memory"]
        g = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
        rows.append(
            f"| {r['config_kind']} | {r['num_slices']} x {r['topology']} ({r['accelerator_type']}) | "
            f"{'x'.join(f'{k}={v}' for k, v in r['mesh'].items() if v > 1) or 'single'} | {r['remat']} | "
            f"{r['per_chip_batch']} x {r['accumulation_steps']} | {g(m['arguments'])} | {g(m['temporaries'])} | "
            f"{g(m['generated_code'])} | {g(m['total'])} / {g(m['hbm'])} ({100 * m['hbm_fraction']:.1f}%) | "
            f"{format_flops(r.get('matmul_flops_per_step', float('nan')))} | "
            f"{1e3 * r.get('roofline_step_seconds', float('nan')):.1f} ms | "
            f"{r.get('roofline_samples_per_second_per_chip', float('nan')):.1f} | {r['compile_seconds']:.0f} s |")
    return "\n".join(rows)
