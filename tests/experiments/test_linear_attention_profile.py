"""``experiments/benchmarks/linear_attention_profile.py``: the HLO classifier on a hand-written module, and a
small traced run of the CLI."""

from __future__ import annotations

import json

from experiments.benchmarks import linear_attention_profile as profile_bench

HLO = """HloModule m

%fused_dot (p0: f32[4,4], p1: f32[4,4]) -> f32[4,4] {
  %p0 = f32[4,4]{1,0} parameter(0)
  %p1 = f32[4,4]{1,0} parameter(1)
  ROOT %d = f32[4,4]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_exp (p0: f32[4,4]) -> f32[4,4] {
  %p0 = f32[4,4]{1,0} parameter(0)
  ROOT %e = f32[4,4]{1,0} exponential(%p0)
}

ENTRY %main (a: f32[4,4]) -> (f32[4,4], s32[]) {
  %a = f32[4,4]{1,0} parameter(0)
  %dot.1 = f32[4,4]{1,0} dot(%a, %a), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %ynn_fusion.2 = f32[4,4]{1,0} fusion(%a, %a), kind=kCustom, calls=%fused_dot
  %exp_fusion = f32[4,4]{1,0} fusion(%dot.1), kind=kLoop, calls=%fused_exp
  %while.3 = (f32[4,4], s32[]) while(%t), condition=%c, body=%b
  ROOT %t = (f32[4,4], /*index=1*/s32[]) tuple(%exp_fusion, %i)
}
"""


def test_instructions_are_classed_by_the_hlo():
  kinds = profile_bench.instruction_kinds(HLO)
  assert kinds["dot.1"] == "dot" and kinds["ynn_fusion.2"] == "dot"
  assert kinds["exp_fusion"] == "other" and kinds["t"] == "other"
  assert kinds["while.3"] == "container"


def test_cli_writes_a_profile(tmp_path):
  profile_bench.main(["--case", "delta_rule", "--setting", "H2_D32", "--seq-len", "128", "--calls", "2",
                      "--repeats", "2", "--top", "5", "--out", str(tmp_path)])
  result = json.loads((tmp_path / "linear_attention_profile_cpu_delta_rule_H2_D32.json").read_text())
  kinds = {e["kind"] for e in result["instructions"].values()}
  assert {"dot", "other"} <= kinds and result["dot_ms"] > 0 and result["other_ms"] > 0
  assert result["wall_ms"] > 0
  text = (tmp_path / "linear_attention_profile_cpu_delta_rule_H2_D32.md").read_text()
  assert text.count("\n| ") == 6 and "| dot | " in text  # header + 5 instructions
