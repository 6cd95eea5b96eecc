"""Old location of ``count_parameters`` (now ``core/params.py``), kept only until the tools import
it from ``himoe_plugin.core``; delete it then."""
from .params import ParameterCount, count_parameters

__all__ = ["ParameterCount", "count_parameters"]
