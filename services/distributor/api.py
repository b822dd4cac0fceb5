"""The distributor's HTTP face: packages by SHA-256 (range requests, `ETag` = the SHA-256), only
those it released, and `GET /v1/releases`; a bearer token when `release_token` is set."""

from __future__ import annotations

import hmac
import re
from typing import Any

from fastapi import FastAPI, Header, HTTPException, Request, Response
from visionloop.libs.bus import Runtime
from visionloop.libs.db import quote_ident
from visionloop.libs.refusals import install_refusals
from visionloop.services.distributor import store
from visionloop.services.distributor.config import DistributorSettings

_RANGE = re.compile(r"^bytes=(\d{0,18})-(\d{0,18})$")
"""One byte range; 18 digits at most (more is no real offset, and `int()` refuses very long numbers)."""


def _span(range_: str | None, size: int) -> tuple[int, int, int]:
    """(start, end, status) of what a `Range` header asks of `size` bytes; 416 when unusable."""
    if not range_:
        return 0, size, 200
    match = _RANGE.match(range_.strip())
    if not match or (not match.group(1) and not match.group(2)):
        raise HTTPException(416, detail={"reason": "bad_range", "message": "use a single range: bytes=START-END"},
                            headers={"Content-Range": f"bytes */{size}"})
    if match.group(1):
        start = int(match.group(1))
        end = min(int(match.group(2)) + 1, size) if match.group(2) else size
    else:
        start, end = max(0, size - int(match.group(2))), size
    if start >= size or end <= start:
        raise HTTPException(416, detail={"reason": "range_not_satisfiable", "message": f"the package has {size} bytes"},
                            headers={"Content-Range": f"bytes */{size}"})
    return start, end, 206


def package_server(runtime: Runtime, blobs: Any, config: DistributorSettings) -> FastAPI:
    """The HTTP face: packages by SHA-256 (ranges, ETag) and releases."""
    app = FastAPI(title="visionloop distributor", version="1", docs_url=None, redoc_url=None)
    install_refusals(app)
    token = config.release_token.get_secret_value() if config.release_token else None

    def authorise(authorization: str | None) -> None:
        # Compared in constant time, so the answer's timing says nothing about the token.
        if token is not None and not hmac.compare_digest((authorization or "").encode(), f"Bearer {token}".encode()):
            raise HTTPException(401, detail={"reason": "unauthorised", "message": "a valid bearer token is required"},
                                headers={"WWW-Authenticate": 'Bearer realm="visionloop"'})

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    async def package(sha256: str, request: Request, authorization: str | None = Header(default=None),
                      range_: str | None = Header(default=None, alias="Range"),
                      if_none_match: str | None = Header(default=None, alias="If-None-Match")) -> Response:
        authorise(authorization)
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise HTTPException(400, detail={"reason": "invalid_sha256", "message": "packages are addressed by 64 lowercase hex digits"})
        assert runtime.pool is not None
        if not await store.package_known(runtime.pool, quote_ident(runtime.schema), sha256):
            raise HTTPException(404, detail={"reason": "unknown_package", "message": "no released package has this SHA-256"})
        stat = await blobs.stat(sha256)
        etag = f'"{sha256}"'
        headers = {"ETag": etag, "Accept-Ranges": "bytes", "Content-Type": "application/x-tar"}
        if if_none_match == etag:
            return Response(status_code=304, headers=headers)
        start, end, status = _span(range_, stat.size)
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{stat.size}"
        headers["Content-Length"] = str(end - start)
        if request.method == "HEAD":
            return Response(status_code=status, headers=headers)
        body = await blobs.get(sha256) if status == 200 else await blobs.open_range(sha256, start, end)
        return Response(content=body, status_code=status, headers=headers)

    # One route per method, so each has its own operation id in the OpenAPI document.
    app.add_api_route("/v1/packages/{sha256}", package, methods=["GET"], operation_id="get_package")
    app.add_api_route("/v1/packages/{sha256}", package, methods=["HEAD"], operation_id="head_package")

    @app.get("/v1/releases")
    async def releases(fleet: str | None = None, authorization: str | None = Header(default=None)) -> list[dict[str, Any]]:
        authorise(authorization)
        assert runtime.pool is not None
        return await store.releases_report(runtime.pool, runtime.schema, fleet)

    return app
