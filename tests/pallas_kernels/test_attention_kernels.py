"""The Pallas attention kernels (``pallas_tpu``, ``pallas_triton``) in interpret mode against ``reference``:
outputs and gradients of q, k, v, the fused gate and learnable normalizer parameters, on GQA with lengths
that are not multiples of the block, padded head dims, windows, segments with a query offset, a key mask and
a row that sees no key. The real kernels are cross-lowered for their platforms (forward and backward), and
bad block sizes / unsupported normalizers are rejected. The default run covers each kernel x each normalizer
the kernels take (backward for half of them; the shared tile math's backward of every normalizer is also
tested through ``xla``); ``-m slow`` runs the full product of normalizers x masks x dtypes."""

from __future__ import annotations

import importlib
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels.attention import BlockSizes, attention_op, masking, normalizers

IMPLS = ("pallas_tpu", "pallas_triton")
KERNEL_NORMALIZERS = sorted(name for name, cls in normalizers.NORMALIZERS.items() if cls.kernel_supported)
# Small tiles (interpret mode): T = 21 and S = 37 span several blocks with padded last ones; forward and
# backward tiled differently.
BLOCKS = {"pallas_tpu": BlockSizes(8, 8, 8, 16), "pallas_triton": BlockSizes(16, 16, 16, 32)}
BATCH, SEQ, KEYS, HEADS, KV_HEADS, DIM, VALUE_DIM = 2, 21, 37, 4, 2, 8, 3
# Query segment 9 has no keys: row 4 of batch row 0 sees nothing (output 0, finite gradients).
MASKS = {
    "causal": dict(),
    "window": dict(window=9, gate="elementwise"),
    "non_causal_window": dict(causal=False, window=6),
    "segments": dict(segment_ids=(jnp.array([[0, 0, 0, 0, 9] + [1] * 16, [0] * 5 + [1] * 16]),
                                  jnp.array([[0] * 17 + [1] * 20, [0] * 20 + [1] * 17])),
                     key_mask=(jnp.arange(KEYS) % 5 != 1)[None].repeat(BATCH, 0),
                     query_offset=jnp.array([3, 16]), gate="headwise"),
}
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}

pytestmark = pytest.mark.usefixtures("fast_compile")


def _normalizer(name: str, param):
  """The normalizer with its learnable array (SSMax ``s``, selective temperature), or by name."""
  if name == "ssmax":
    return normalizers.SSMax(s=param)
  if name == "selective":
    return normalizers.Selective(temperature=param[None, None, :] * jnp.ones((BATCH, SEQ, HEADS)))
  return name


def _run(implementation: str, name: str, mask: str, dtype, backward: bool):
  """Output and (with ``backward``) gradients of q, k, v, gate and the normalizer parameter, jitted."""
  ks = jax.random.split(jax.random.PRNGKey(0), 5)
  q = (1.5 * jax.random.normal(ks[0], (BATCH, SEQ, HEADS, DIM))).astype(dtype)
  k = jax.random.normal(ks[1], (BATCH, KEYS, KV_HEADS, DIM)).astype(dtype)
  v = jax.random.normal(ks[2], (BATCH, KEYS, KV_HEADS, VALUE_DIM)).astype(dtype)
  do = jax.random.normal(ks[3], (BATCH, SEQ, HEADS, VALUE_DIM)).astype(dtype)
  kwargs = dict(MASKS[mask])
  gate_kind = kwargs.pop("gate", None)
  gate = None if gate_kind is None else jax.nn.sigmoid(jax.random.normal(
      ks[4], (BATCH, SEQ, HEADS, VALUE_DIM if gate_kind == "elementwise" else 1))).astype(dtype)
  param = jnp.array([0.5, 1.0, 1.5, 2.0])

  def attend(q, k, v, gate, param):
    return pallas_kernels.attention(q, k, v, normalizer=_normalizer(name, param), gate=gate,
                                    block_sizes=BLOCKS.get(implementation), implementation=implementation, **kwargs)

  def run(*args):
    if not backward:
      return attend(*args), ()
    o, vjp = jax.vjp(attend, *args)
    return o, vjp(do)

  with pallas_kernels.interpret():
    return jax.jit(run)(q, k, v, gate, param)


def _check(implementation: str, name: str, mask: str, dtype, backward: bool):
  got = _run(implementation, name, mask, dtype, backward)
  want = _run("reference", name, mask, dtype, backward)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):  # atol relative to each array's largest entry
    assert g.dtype == w.dtype and g.shape == w.shape
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, w, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * max(1.0, np.abs(w).max()))
  if mask == "segments":
    np.testing.assert_array_equal(np.asarray(got[0][0, 4], np.float32), 0.0)


# (normalizer, mask, dtype, backward): every normalizer the kernels take, each mask, both dtypes, the gate in
# both forms, the learnable parameters of SSMax and selective attention.
DEFAULT_CASES = [
    ("softmax", "window", jnp.bfloat16, True),
    ("softpick", "segments", jnp.float32, True),
    ("sigmoid", "non_causal_window", jnp.float32, True),
    ("ssmax", "causal", jnp.float32, True),
    ("selective", "segments", jnp.bfloat16, False),
    ("stablemax", "window", jnp.float32, False),
    ("relu", "causal", jnp.float32, False),
    ("self_adjust", "non_causal_window", jnp.float32, False),
    ("lssa", "segments", jnp.float32, False),
]


@pytest.mark.parametrize("implementation", IMPLS)
@pytest.mark.parametrize("name, mask, dtype, backward", DEFAULT_CASES)
def test_kernel_matches_reference(implementation, name, mask, dtype, backward):
  _check(implementation, name, mask, dtype, backward)


@pytest.mark.slow
@pytest.mark.parametrize("implementation", IMPLS)
@pytest.mark.parametrize("name, mask, dtype", list(itertools.product(KERNEL_NORMALIZERS, MASKS,
                                                                     (jnp.float32, jnp.bfloat16))))
def test_kernel_matches_reference_full_product(implementation, name, mask, dtype):
  _check(implementation, name, mask, dtype, backward=True)


@pytest.mark.parametrize("normalizer", [pytest.param(normalizers.Softpick(), id="softpick"),
                                        pytest.param(normalizers.LSSA(), id="lssa", marks=pytest.mark.slow)])
@pytest.mark.parametrize("dim", [128, 256])
@pytest.mark.parametrize("module, platform, marker", [("tpu", "tpu", "tpu_custom_call"),
                                                      ("gpu", "cuda", "__gpu$xla.gpu.triton")])
def test_cross_lowers_forward_and_backward(module, platform, marker, dim, normalizer):
  """The real kernels (default tiles, not interpret mode) lower for their platform: bf16, GQA, head dims 128
  and 256, a window, segments, a key mask and a headwise gate, with gradients of q, k, v and the gate
  (softpick by default; LSSA's softplus in the slow run)."""
  implementation = importlib.import_module(f"pallas_kernels.attention.{module}").attention
  batch, seq, heads, kv_heads = 1, 256, 4, 2

  def loss(q, k, v, gate, seg, key_mask):
    mask = masking.Mask(jnp.zeros((batch,), jnp.int32), seg, seg, key_mask, causal=True, window=128)
    q_scale = jnp.full((batch, seq, heads), dim ** -0.5)
    o = implementation(q, k, v, normalizer=normalizer, mask=mask, q_scale=q_scale, gate=gate, block_sizes=None)
    return jnp.sum(o.astype(jnp.float32))

  sds = jax.ShapeDtypeStruct
  args = (sds((batch, seq, heads, dim), jnp.bfloat16), sds((batch, seq, kv_heads, dim), jnp.bfloat16),
          sds((batch, seq, kv_heads, dim), jnp.bfloat16), sds((batch, seq, heads, 1), jnp.float32),
          sds((batch, seq), jnp.int32), sds((batch, seq), jnp.bool_))
  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  assert text.count(marker) >= 3
  for kernel in ("fwd", "dq", "dkv"):
    assert f"attention_{kernel}" in text


def test_auto_never_picks_an_unvalidated_kernel():
  for backend in ("cpu", "gpu", "tpu"):
    assert attention_op.auto_order(backend) == ("xla", "reference")


@pytest.mark.parametrize("implementation", IMPLS)
@pytest.mark.parametrize("name", ["clipped_softmax", "sparsemax"])
def test_multi_pass_normalizers_are_not_implemented_in_kernels(implementation, name):
  q = jnp.ones((1, 4, 1, 2))
  with pallas_kernels.interpret(), pytest.raises(NotImplementedError, match=f"{implementation}.*{name}.*more than "
                                                                            "one pass.*the kernels take"):
    pallas_kernels.attention(q, q, q, normalizer=name, implementation=implementation)


def test_auto_falls_back_from_a_kernel_with_a_warning():
  q = jnp.ones((1, 3, 1, 2))
  with pallas_kernels.interpret(), pytest.warns(pallas_kernels.FallbackWarning,
                                                match="ran 'reference' after pallas_triton: .*'clipped_softmax'"):
    o = pallas_kernels.attention(q, q, q, normalizer="clipped_softmax", implementation=("pallas_triton", "reference"))
  assert o.shape == q.shape


def _blocks_error(implementation, blocks, *, interpret=True):
  q = jnp.ones((1, 40, 2, 16))
  with pallas_kernels.interpret(interpret):
    module = importlib.import_module(f"pallas_kernels.attention.{'tpu' if implementation == 'pallas_tpu' else 'gpu'}")
    mask = masking.Mask(jnp.zeros((1,), jnp.int32), None, None, None, causal=True, window=None)
    jax.eval_shape(lambda q: module.attention(q, q, q, normalizer=normalizers.Softmax(), mask=mask,
                                              q_scale=jnp.ones((1, 40, 2)), gate=None, block_sizes=blocks), q)


@pytest.mark.parametrize("call, message", [
    (lambda: BlockSizes(q=0), r"block_sizes.q: got 0; allowed: a positive int or None"),
    (lambda: BlockSizes(kv_bwd=2.5), r"block_sizes.kv_bwd: got 2.5"),
    (lambda: pallas_kernels.attention(jnp.ones((1, 2, 1, 2)), jnp.ones((1, 2, 1, 2)), jnp.ones((1, 2, 1, 2)),
                                      block_sizes={"q": 16}), r"block_sizes: got \{'q': 16\}; allowed: None or"),
    (lambda: _blocks_error("pallas_triton", BlockSizes(q=24)),
     r"block_sizes.q: got 24 for pallas_triton; allowed: powers of two >= 16"),
    (lambda: _blocks_error("pallas_triton", BlockSizes(kv_bwd=8)), r"block_sizes.kv_bwd: got 8 for pallas_triton"),
    (lambda: _blocks_error("pallas_tpu", BlockSizes(q_bwd=12)), r"block_sizes.q_bwd: got 12 for pallas_tpu; "
                                                                 r"allowed: multiples of 8"),
    (lambda: _blocks_error("pallas_tpu", BlockSizes(kv=32), interpret=False),
     r"block_sizes.kv: got 32 for pallas_tpu; allowed: key blocks that are multiples of 128"),
])
def test_bad_block_sizes_raise_value_error_naming_them(call, message):
  with pytest.raises(ValueError, match=message):
    call()
