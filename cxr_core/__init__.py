"""cxr_core: the library behind the cxr pipeline (data, training, evaluation, registry).

It never imports the orchestrator (prefect) nor the application layer (flows).
"""

__version__ = "0.1.0"
