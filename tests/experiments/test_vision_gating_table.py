"""The vision_gating table: its grid, the claim judges on synthetic means, a micro run end to end, and the
classifier's argument checks."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import pytest

from experiments import tables
from experiments.tables import common
from experiments.tables import vision_gating as vg
from gated_jax.models import VisionClassifier


def _means(acc):
  return {vg.variant(m, f): {"accuracy": acc.get((m, f), 50.0)} for m in vg.MODELS for f in vg.FRACTIONS}


def test_grid_and_configs():
  assert tables.get("vision_gating") is vg.TABLE and vg.TABLE.default_seeds == 3
  assert len(vg.TABLE.variants) == len(vg.MODELS) * len(vg.FRACTIONS)
  config = vg.TABLE.config("tiny", "gated_swin_rmt_swat@25%")
  assert config.data.fraction == 0.25 and not config.model.position_embedding
  assert vg.TABLE.config("tiny", "convit@10%").model.mixer == ("convit",) * 4 + ("vit",) * 2
  for claim in vg.TABLE.claims:
    assert set(claim.variants) <= set(vg.TABLE.variants)


def test_claim_judges():
  acc = {("convit", "10%"): 60.0, ("vit", "10%"): 50.0, ("convit", "100%"): 91.0, ("vit", "100%"): 90.0,
         ("gated_swin_rmt_swat", "100%"): 92.0, ("gated_swin_rmt_retention", "100%"): 91.5,
         ("swin_rmt", "100%"): 91.2}
  assert vg._convit_claim(_means(acc)) and vg._ordering_claim(_means(acc)) and vg._small_map_claim(_means(acc))
  assert not vg._convit_claim(_means({**acc, ("convit", "100%"): 101.0}))
  assert not vg._ordering_claim(_means({**acc, ("swin_rmt", "100%"): 91.6}))
  assert not vg._small_map_claim(_means({**acc, ("swin_rmt", "100%"): 90.0}))


def test_micro_end_to_end(tmp_path, fast_compile):
  text = common.reproduce(vg.TABLE, scale="micro", seeds=1, out=tmp_path, log=lambda _: None)
  runs = common.read_runs(tmp_path / "vision_gating")
  assert [r["variant"] for r in runs] == list(vg.TABLE.micro_variants)
  for run in runs:
    assert run["metrics"]["train_examples"] == 142 and 0.0 <= run["metrics"]["accuracy"] <= 100.0
    assert len(run["history"]) == 2
  assert "vision_gating (micro scale" in text


@pytest.mark.parametrize("fields, match", [
    (dict(image_size=(8, 7)), r"image_size: got \(8, 7\)"),
    (dict(mixer="conv"), "vision mixer: got 'conv'; known: convit"),
    (dict(mixer_kwargs=({}, {})), "mixer_kwargs: got"),
])
def test_classifier_bad_arguments(fields, match):
  model = VisionClassifier(**{"image_size": (8, 8), "patch_size": 2, "num_classes": 10, "d_model": 8,
                              "num_layers": 1, "num_heads": 2, **fields})
  with pytest.raises(ValueError, match=match):
    model.block_specs()


def test_classifier_rejects_wrong_images():
  model = VisionClassifier(image_size=(8, 8), patch_size=2, num_classes=10, d_model=8, num_layers=1, num_heads=2)
  with pytest.raises(ValueError, match=r"images_BHWC: got shape \(1, 4, 4, 1\)"):
    model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))
