"""A model's life in service that needs no table of its own: drift alarms computed in memory
(:mod:`service.lifecycle.drift`), from per-series summaries taken on the hot path
(:func:`service.inference.domain.summarise_series`) and compared with :mod:`service.lifecycle.drift_stats`."""
