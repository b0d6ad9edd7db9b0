"""jlora: LoRA fine-tuning as a one-line function transform for any JAX model.

>>> import jax, jax.numpy as jnp, jlora
>>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
>>> apply_fn = lambda p, x: x @ p["dense"]["kernel"]
>>> lora_params, apply = jlora.inject(params, apply_fn, rank=2)
>>> bool(jnp.allclose(apply(lora_params, jnp.ones((1, 4))), apply_fn(params, jnp.ones((1, 4)))))
True
"""

from jlora._inject import Apply, Report, inject
from jlora._interpret import UnsupportedOpError
from jlora._node import Layout, LoraKernel, Trainable
from jlora._quant import Int8Tensor, NF4Tensor, dequantize, is_quantized, quantize
from jlora._tree import combine, labels, merge, optimizer, split, summary

__version__ = "0.1.0"

__all__ = [
    "Apply",
    "Int8Tensor",
    "Layout",
    "LoraKernel",
    "NF4Tensor",
    "Report",
    "Trainable",
    "UnsupportedOpError",
    "combine",
    "dequantize",
    "inject",
    "is_quantized",
    "labels",
    "merge",
    "optimizer",
    "quantize",
    "split",
    "summary",
]

