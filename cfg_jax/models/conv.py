"""nnx.Conv whose input gradient is itself a forward convolution (faster on XLA:CPU).

For y = conv(x, k), ∂L/∂x is a convolution of ∂L/∂y with k̃: k flipped in space, its
input and output channels swapped. `jax.grad` writes that as a transposed convolution on a
reversed kernel (`dim_labels=…01oi`, with `lhs_dilate` for a strided layer). Inside a
`lax.scan` body, such as the classifier gradient of a guided sampler, XLA:CPU's YNNPACK
fusion does not take that form, and the bare convolutions made a classifier-guided step
several times slower (benchmarks/PERF_FINDINGS.md). Here the same gradient is a plain
forward convolution, which is fused like any other: ∂L/∂y is spread out with zeros between
its pixels (for a stride s > 1) and padded, then correlated with k̃.

The values are the same up to float rounding and the parameters are nnx.Conv's. "SAME"
padding without dilation or groups takes this path; any other convolution goes to
`lax.conv_general_dilated` unchanged. The custom VJP rules out forward-mode
differentiation (`jax.jvp`) of these layers; nothing in cfg_jax uses it.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """XLA's "SAME" padding (low, high) of one spatial axis: ceil(size / stride) outputs."""
  outputs = -(-size // stride)
  total = max((outputs - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def _conv(x, kernel, strides, padding, precision):
  return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC,
                                  precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def same_conv(x, kernel, strides=(1, 1), precision=None):
  """NHWC × HWIO convolution with "SAME" padding and the given strides."""
  return _conv(x, kernel, strides, "SAME", precision)


def _same_conv_fwd(x, kernel, strides, precision):
  return same_conv(x, kernel, strides, precision), (x, kernel)


def _same_conv_bwd(strides, precision, residuals, grad_y):
  x, kernel = residuals
  # y[i] = Σ_d x[s·i + d − low]·k[d], so ∂L/∂x[j] = Σ_e g[j − (K − 1 − low) + e]·k[K − 1 − e],
  # where g is ∂L/∂y with s − 1 zeros between its pixels: a "VALID" forward correlation of
  # g, padded by (K − 1 − low, size + low − len(g)), with the flipped kernel.
  pads = [(0, 0, 0)]
  for size, k, s, out in zip(x.shape[1:3], kernel.shape[:2], strides, grad_y.shape[1:3]):
    low, _ = same_padding(size, k, s)
    pads.append((k - 1 - low, size + low - ((out - 1) * s + 1), s - 1))
  pads.append((0, 0, 0))
  spread = lax.pad(grad_y, jnp.zeros((), grad_y.dtype), pads)
  if any(stride > 1 for stride in strides):
    # Else XLA folds the zeros back into the convolution as `lhs_dilate`, off YNN's path.
    spread = lax.optimization_barrier(spread)
  flipped = jnp.flip(kernel, axis=(0, 1)).swapaxes(2, 3)
  grad_x = _conv(spread, flipped, (1, 1), "VALID", precision)
  # ∂L/∂k: the weight gradient as JAX writes it (YNN fuses that one already).
  _, kernel_vjp = jax.vjp(lambda k: _conv(x, k, strides, "SAME", precision), kernel)
  (grad_kernel,) = kernel_vjp(grad_y)
  return grad_x.astype(x.dtype), grad_kernel


same_conv.defvjp(_same_conv_fwd, _same_conv_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, **kwargs):
  """`lax.conv_general_dilated`, with undilated "SAME" NHWC convolutions sent to `same_conv`.

  The signature nnx.Conv calls (its `conv_general_dilated` argument).
  """
  takes_fast_path = (
      lhs.ndim == 4 and isinstance(padding, str) and padding == "SAME"
      and all(d == 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
      and feature_group_count == 1
      and all(v is None for v in kwargs.values())  # e.g. out_sharding, preferred_element_type
      and dimension_numbers == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
  if takes_fast_path:
    return same_conv(lhs, rhs, tuple(window_strides), precision)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      precision=precision, **kwargs)


# nnx.Conv (the same parameters) whose input gradient is a forward convolution.
Conv = functools.partial(nnx.Conv, conv_general_dilated=conv_general_dilated)


def unfused_convolutions(compiled_hlo: str) -> int:
  """The `convolution(`s of an optimised HLO text outside any fusion or custom call: on
  XLA:CPU, the ones that run off YNNPACK's fast path."""
  bodies, current = {}, None
  for line in compiled_hlo.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if header:
      current = header.group(1)
      bodies[current] = []
    elif current:
      bodies[current].append(line)
  fused = set()
  for lines in bodies.values():
    for line in lines:
      if " fusion(" in line or "custom-call(" in line:
        fused.update(re.findall(r"calls=%?([\w.\-]+)", line))
  return sum("convolution(" in line for name, lines in bodies.items() if name not in fused
             for line in lines)
