"""(being built)"""

from __future__ import annotations

from fastapi import APIRouter


def build_router(service) -> APIRouter:
    return APIRouter()
