"""Receptive fields of any model: traced R / J / start per node, gradient measurement, effective field, layer report.

Conventions (used everywhere in the subpackage):

* Input pixels are indexed 0..n-1 along each spatial axis and pixel ``i`` is centred at ``i``; the input itself
  has ``R = 1``, ``J = 1``, ``start = 0`` (if you picture pixel ``i`` as the interval ``[i, i+1]``, add 0.5).
* A node's field is the field of its *first* unit (index 0 along every spatial axis); unit ``u`` has the same
  field shifted by ``u * J``. It covers input pixels ``start - (R-1)/2 .. start + (R-1)/2``; with padding,
  ``start`` can be negative or fractional and the field can stick out of the image.
* conv / pool with kernel ``k``, stride ``s``, padding ``p``, dilation ``d`` (``k_eff = d(k-1)+1``):
  ``R_n = R_{n-1} + (k_eff-1) J_{n-1}``, ``J_n = J_{n-1} s``, ``start_n = start_{n-1} + ((k_eff-1)/2 - p) J_{n-1}``.
* At a merge (``x + identity``, ``torch.cat``, ``x * gate``) the field is the union of the inputs' fields.
* "whole" axes: after a global/adaptive-to-1 pool, a reduction, a flatten or a linear layer over a spatial axis,
  the node no longer has positions along that axis; its field there is the union over all positions that fed it,
  clipped to the image (``R`` = image size when everything is covered) and ``J`` is undefined.

The graph is followed with module forward hooks (for names) plus a ``TorchFunctionMode`` that sees every torch
function and tensor method the forward calls (``F.conv2d``, ``F.max_pool2d``, ``x + identity``, ``torch.cat``,
``view`` / ``flatten`` ...), so models that ``torch.fx`` cannot trace (data-dependent control flow) work too.
The forward runs on the ``meta`` device (shapes only, no memory) and falls back to a real CPU forward.

Modules: ``geometry`` (one axis's field and the recurrence), ``ops`` and ``shape_ops`` (what each torch op does
to the field), ``trace`` (the tracer, ``RFRow``, ``receptive_fields``), ``measure`` (gradient measurement and
effective field), ``tables``, ``plots``, ``layers`` (the layer report) and ``run`` (models by name, the run).
"""
from .layers import LargeActivationWarning, LayerInfo, layer_report, layer_report_markdown
from .measure import ERFResult, RFMeasurement, effective_receptive_field, measure_receptive_field
from .plots import plot_erf, plot_rf_box
from .run import default_input_shape, model_from_name, receptive_field_run
from .tables import rf_table_markdown, write_rf_table
from .trace import RFRow, parse_input_shape, receptive_fields, select_rows

__all__ = [
    "RFRow", "RFMeasurement", "ERFResult", "LayerInfo", "LargeActivationWarning",
    "receptive_fields", "select_rows", "rf_table_markdown", "write_rf_table",
    "measure_receptive_field", "effective_receptive_field", "plot_erf", "plot_rf_box",
    "layer_report", "layer_report_markdown", "model_from_name", "default_input_shape",
    "parse_input_shape", "receptive_field_run",
]
