"""The edge agent's local HTTP API: health, the active model, predictions on raw image bytes.

Refusals are `{reason, message}` JSON: 401 `unauthenticated` without the agent's local token, 503
`no_model` before any model is active, 400 `image_undecodable`, 413 `image_too_large`.

Every endpoint but `/healthz` takes the agent's local token (`Authorization: Bearer <token>`): a
file the agent creates at its first start, readable by its owner only (`local_token`). Software
on the device reads it from there; nothing else can drive the device.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import secrets
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from visionloop.contracts import Detection
from visionloop.libs.inference import InferenceError
from visionloop.libs.refusals import install_refusals
from visionloop.services.edge_agent.agent import EdgeAgent, EdgeError

MAX_IMAGE_BYTES = 32 * 1024 * 1024
"""Largest image body `POST /v1/predict` reads."""


class Prediction(BaseModel):
    """The boxes of the active model on one image."""

    model: dict[str, Any] = Field(description="`{model_id, version}` of the model that answered.")
    boxes: list[Detection] = Field(description="Absolute pixel corners in the original image, highest score first.")


TOKEN_FILE = "api-token"
"""The local token's file in the agent's home (mode 0600)."""


def local_token(home: Path) -> str:
    """The agent's local API token: read from `home/api-token`, created there (0600) at first start."""
    path = home / TOKEN_FILE
    if path.exists():
        return path.read_text().strip()
    home.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return token


def _refusal(status: int, reason: str, message: str) -> JSONResponse:
    return JSONResponse({"reason": reason, "message": message}, status_code=status)


def create_app(agent: EdgeAgent, *, token: str, max_image_bytes: int = MAX_IMAGE_BYTES) -> FastAPI:
    """The FastAPI app of one agent; every endpoint but `/healthz` needs `token`."""
    app = FastAPI(
        title=f"visionloop edge agent {agent.device_id}",
        description="Health, the active model, and predictions of the model the fleet's releases installed.",
    )
    install_refusals(app)

    def authenticated(request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(401, detail={"reason": "unauthenticated", "message": (
                f"send the agent's local token: `Authorization: Bearer <token>` (in {TOKEN_FILE} of the agent's home)")},
                headers={"WWW-Authenticate": "Bearer"})

    guarded = [Depends(authenticated)]
    _status_routes(app, agent, guarded)
    _predict_route(app, agent, guarded, max_image_bytes)
    return app


def _status_routes(app: FastAPI, agent: EdgeAgent, guarded: list[Any]) -> None:
    """`/healthz` (no token) and `/v1/model`."""

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Alive; says whether a model is active."""
        active = agent.active
        return {
            "status": "ok",
            "fleet": agent.fleet,
            "device_id": agent.device_id,
            "active_model": active.model.model_dump() if active else None,
        }

    @app.get("/v1/model", dependencies=guarded, responses={
        401: {"description": "No local token (`unauthenticated`)."}, 503: {"description": "No model is active yet (`no_model`)."}})
    async def model() -> Any:
        """The active model and its manifest summary."""
        summary = agent.summary()
        if not summary:
            return _refusal(503, "no_model", "no model is active on this device yet: release one to its fleet")
        return summary


def _predict_route(app: FastAPI, agent: EdgeAgent, guarded: list[Any], max_image_bytes: int) -> None:
    """`/v1/predict`: boxes of the active model on the body's image."""

    @app.post(
        "/v1/predict",
        response_model=Prediction,
        dependencies=guarded,
        responses={
            401: {"description": "No local token (`unauthenticated`)."},
            400: {"description": "The body is not a readable image (`image_undecodable`)."},
            413: {"description": "The body is larger than the limit (`image_too_large`)."},
            503: {"description": "No model is active yet (`no_model`)."},
        },
        openapi_extra={"requestBody": {"required": True, "content": {
            media: {"schema": {"type": "string", "format": "binary"}} for media in ("image/*", "application/octet-stream")
        }}},
    )
    async def predict(request: Request) -> Any:
        """Boxes of the active model on the raw image bytes of the body (JPEG, PNG, WebP...)."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_image_bytes:
            return _refusal(413, "image_too_large", f"send images of at most {max_image_bytes} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_image_bytes:
                return _refusal(413, "image_too_large", f"send images of at most {max_image_bytes} bytes")
        try:
            model, boxes = await asyncio.to_thread(agent.predict_with_model, bytes(body))
        except EdgeError as exc:
            return _refusal(503, exc.reason, str(exc.args[0]))
        except InferenceError as exc:
            return _refusal(400, exc.reason, str(exc.args[0]))
        return Prediction(model=model.model_dump(), boxes=boxes)
