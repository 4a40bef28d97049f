"""Parameter / MAC counting (``counting``), the ``resfast models`` table (``models_table``)
and training-memory measurement (``memory``)."""
from resfast.profiling.counting import count_macs, count_params, model_counts

__all__ = ["count_params", "count_macs", "model_counts"]
