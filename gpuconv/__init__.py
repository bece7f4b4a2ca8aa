"""gpuconv: 1-, 2- and 3-D convolutions with gradients on NumPy and CuPy arrays.

NumPy arrays run on the CPU backend, CuPy arrays on raw CUDA kernels compiled
by CuPy.  Importing gpuconv never imports CuPy and never fails on a CPU-only
machine.
"""
from ._api import (
    conv, conv_input_grad, conv_weight_grad, conv_bias_grad, conv_transpose, conv_output_shape,
    conv_transpose1d, conv_transpose2d, conv_transpose3d, conv_transpose_output_shape,
    conv_transpose_input_grad, conv_transpose_weight_grad,
    conv1d, conv2d, conv3d,
    conv1d_input_grad, conv2d_input_grad, conv3d_input_grad,
    conv1d_weight_grad, conv2d_weight_grad, conv3d_weight_grad,
)
from ._dispatch import (
    BackendUnavailableError, available_backends, backend_info, precompile, use_backend,
)
from ._cpu import get_workspace_limit, set_workspace_limit
from ._precision import get_float32_precision, set_float32_precision

__version__ = "0.1.0"

__all__ = [
    "conv", "conv_input_grad", "conv_weight_grad", "conv_bias_grad", "conv_transpose",
    "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "conv_output_shape", "conv_transpose_output_shape",
    "conv_transpose_input_grad", "conv_transpose_weight_grad",
    "conv1d", "conv2d", "conv3d",
    "conv1d_input_grad", "conv2d_input_grad", "conv3d_input_grad",
    "conv1d_weight_grad", "conv2d_weight_grad", "conv3d_weight_grad",
    "BackendUnavailableError", "available_backends", "backend_info", "precompile", "use_backend",
    "get_workspace_limit", "set_workspace_limit",
    "get_float32_precision", "set_float32_precision",
]

from ._dispatch import _precompile_on_import

_precompile_on_import()
del _precompile_on_import
