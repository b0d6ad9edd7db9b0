"""jlora: LoRA fine-tuning as a one-line function transform for any JAX model.

>>> import jax, jax.numpy as jnp, jlora
>>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
>>> apply_fn = lambda p, x: x @ p["dense"]["kernel"]
>>> lora_params, apply = jlora.inject(params, apply_fn, rank=2)
>>> bool(jnp.allclose(apply(lora_params, jnp.ones((1, 4))), apply_fn(params, jnp.ones((1, 4)))))
True
"""

from jlora._bank import LoraBank, adapter_ids, adapter_names, add_adapter, remove_adapter, select_adapter, \
    stack_adapters
from jlora._combine import combine_adapters
from jlora._checkpoint import CheckpointError, Restored, TrainCheckpointer, load_adapters, save_adapters
from jlora._apply import Apply
from jlora._inject import inject
from jlora._report import FusedReport, Report
from jlora._value import UnsupportedOpError
from jlora._node import Layout, LoraKernel, Trainable
from jlora._peft import LLAMA_MODULE_MAP, export_peft, import_peft
from jlora._quant import Int8Tensor, NF4Tensor, QuantizedKernel, dequantize, is_quantized, quantize
from jlora._version import __version__  # noqa: F401
from jlora._tree import combine, convert_to_lora, labels, loraplus, merge, optimizer, split, summary


__all__ = [
    "Apply",
    "CheckpointError",
    "FusedReport",
    "Int8Tensor",
    "LLAMA_MODULE_MAP",
    "Layout",
    "LoraBank",
    "LoraKernel",
    "NF4Tensor",
    "QuantizedKernel",
    "Report",
    "Restored",
    "TrainCheckpointer",
    "Trainable",
    "UnsupportedOpError",
    "adapter_ids",
    "adapter_names",
    "add_adapter",
    "combine",
    "combine_adapters",
    "convert_to_lora",
    "dequantize",
    "export_peft",
    "import_peft",
    "inject",
    "is_quantized",
    "labels",
    "load_adapters",
    "loraplus",
    "merge",
    "optimizer",
    "quantize",
    "remove_adapter",
    "save_adapters",
    "select_adapter",
    "split",
    "stack_adapters",
    "summary",
]

