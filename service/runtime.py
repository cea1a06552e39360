"""What a process of ours does once it has started: start-up's objects out of the garbage collector's walks.

Shared by the service (:mod:`service.app`, once started and again once the models are loaded) and each
listener process (:mod:`service.ingest.front`), which must not import the app to get it.
"""

from __future__ import annotations

import gc

__all__ = ["freeze_startup_objects"]


def freeze_startup_objects() -> None:
    """What start-up made (settings, routes, the ORM's and pydicom's tables, ~290,000 objects in the
    service) moved out of the garbage collector's reach (:func:`gc.freeze`), after a collection so that no
    garbage is kept.

    Why: these live as long as the process, yet every full collection walked them all: ~100 ms with the
    GIL held, once or twice a minute while instances arrive (a C-STORE waiting for its answer meanwhile);
    four associations' 4,800 instances met one such pause (``gc.callbacks``, bench/RESULTS.md, session 29).
    Objects made later are collected as ever."""
    gc.collect()
    gc.freeze()
