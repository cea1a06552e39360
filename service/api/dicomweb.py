"""DICOMweb at ``/dicomweb`` (PS3.18): STOW-RS, QIDO-RS and WADO-RS, one router for :mod:`service.api`.

Each transaction has its module: :mod:`service.api.dicomweb_stow` (store, through the same durable ingest
as ``POST /v1/studies``), :mod:`service.api.dicomweb_qido` (search), :mod:`service.api.dicomweb_wado`
(retrieve instances and metadata, our SR and preview included). The router sits under the protected
router, so the bearer-token rules hold as everywhere: a reader token searches and retrieves, STOW needs
the admin role.
"""

from __future__ import annotations

from fastapi import APIRouter

from service.api import dicomweb_qido, dicomweb_stow, dicomweb_wado
from service.api.dicomweb_common import PREFIX

__all__ = ["router"]

router = APIRouter(prefix=PREFIX)
router.include_router(dicomweb_stow.router)
router.include_router(dicomweb_qido.router)  # before WADO: /studies/{study}/series is a search
router.include_router(dicomweb_wado.router)
