"""``experiments/benchmarks/spiking.py``: the grid, the cap and the markdown (synthetic rows: no timing)."""

from __future__ import annotations

from experiments.benchmarks import spiking


def _row(case, neurons, seq, impl, ms, status="ok"):
  return {"case": case, "neurons": neurons, "batch": spiking.BATCH, "seq_len": seq, "implementation": impl,
          "status": status, **({"fwd_ms": ms / 3, "fwd_bwd_ms": ms, "memory_bytes": 2 ** 20} if status == "ok" else {})}


def test_implementations_and_markdown_ratio():
  assert spiking.implementations_here("no_reset", "cpu") == ["reference", "xla", "xla[assoc]"]
  assert spiking.implementations_here("lif_subtract", "gpu") == ["reference", "xla", "pallas_triton"]
  rows = [_row("lif_subtract", 1024, 16, "reference", 8.0), _row("lif_subtract", 1024, 16, "xla", 2.0),
          _row("no_reset", 1024, 16, "reference", 4.0), _row("no_reset", 1024, 16, "xla", 4.0),
          _row("no_reset", 1024, 16, "xla[assoc]", 1.0, "skipped: B*N*T > 2^26 on cpu"),
          _row("no_reset", 2 ** 20, 16, "xla", 10.0), _row("no_reset", 2 ** 20, 16, "xla[assoc]", 25.0)]
  device = {"platform": "cpu", "device_kind": "cpu", "cpu_model": "test", "cpu_count": 2, "jax": "0"}
  text = spiking.to_markdown({"device": device, "repeats": 3, "rows": rows}, ["other jobs were running"])
  assert "| 1024 | 16 | 2.67 | 8.00 | 1.0 | 0.67 | 2.00 | 1.0 | 4.00x |" in text
  assert "| skip | skip | skip | 1.00x |" in text and "- other jobs were running" in text
  assert "- no_reset: xla[assoc] / xla = 2.50x to 2.50x over 1 points." in text  # only points >= 2^22 count
