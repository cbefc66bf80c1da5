"""The HTTP application: the web page, the native jobs API (/v1/jobs, /v1/events) and
AUTOMATIC1111's routes (sdtorch.serve.routes_a1111), on one `Service`."""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from sdtorch.generate import RequestError
from sdtorch.serve import a1111
from sdtorch.serve.service import QueueFull, Service
from sdtorch.serve.store import STATES

STATIC = Path(__file__).parent / "static"
_basic = HTTPBasic(auto_error=False)


class JobBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str
    request: dict = {}


def create_app(service: Service) -> FastAPI:
    # the schema and its docs page are ordinary routes here, so that --api-auth guards them too
    app = FastAPI(title="sdtorch", dependencies=[Depends(_auth(service))], docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.service = service

    @app.get("/openapi.json", include_in_schema=False)
    def openapi():
        return app.openapi()

    @app.get("/docs", include_in_schema=False)
    def docs():
        from fastapi.openapi.docs import get_swagger_ui_html

        return get_swagger_ui_html(openapi_url="/openapi.json", title="sdtorch API")
    app.add_middleware(BodyLimit, limit=service.settings.max_body)
    _errors(app)
    _page(app)
    _jobs(app, service)
    from sdtorch.serve.routes_a1111 import add_routes

    add_routes(app, service)
    return app


def _auth(service: Service):
    users = service.settings.auth

    def check(credentials: HTTPBasicCredentials | None = Depends(_basic)) -> None:
        if not users:
            return
        if credentials is not None:
            for user, password in users:
                ok_user = secrets.compare_digest(credentials.username.encode(), user.encode())
                ok_pass = secrets.compare_digest(credentials.password.encode(), password.encode())
                if ok_user and ok_pass:
                    return
        raise HTTPException(401, "incorrect or missing credentials", headers={"WWW-Authenticate": "Basic"})

    return check


class BodyLimit:
    """413 with a JSON detail for request bodies above `limit` bytes, declared (Content-Length)
    or streamed (Starlette's own limit answers in plain text)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge()
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send) -> None:
        body = json.dumps({"detail": f"request body is larger than this server's limit of {self.limit} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def detail(e: RequestError) -> str:
    msg = str(e)
    return msg if msg.startswith(e.field) else f"{e.field}: {msg}"


def _errors(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError):
        return JSONResponse({"detail": detail(e), "field": e.field}, status_code=422)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, e: QueueFull):
        return JSONResponse({"detail": "the queue is full; retry later"}, status_code=429,
                            headers={"Retry-After": str(e.retry_after)})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse({"detail": e.detail}, status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        return JSONResponse({"detail": f"internal error: {type(e).__name__}: {e}"}, status_code=500)

    @app.exception_handler(ValidationError)
    async def validation(request: Request, e: ValidationError):
        return JSONResponse({"detail": _pydantic_detail(e.errors())}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def request_validation(request: Request, e: RequestValidationError):
        return JSONResponse({"detail": _pydantic_detail(e.errors())}, status_code=422)


def _pydantic_detail(errors) -> list[dict]:
    out = []
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body",)]
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = f"unknown field {loc[-1]!r}" if loc else "unknown field"
        elif err.get("type") == "json_invalid":
            loc, msg = [], f"malformed JSON: {err.get('ctx', {}).get('error', msg)}"
        out.append({"loc": loc, "msg": f"{'.'.join(loc) or 'body'}: {msg}", "type": err.get("type")})
    return out


def _page(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str):
        path = STATIC / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise HTTPException(404, f"no static file {name!r}")
        return FileResponse(path, headers={"Cache-Control": "no-cache"})


def _jobs(app: FastAPI, service: Service) -> None:
    def get_job(job_id: str):
        job = service.store.get(job_id)
        if job is None:
            raise HTTPException(404, f"unknown job {job_id!r}")
        return job

    @app.post("/v1/jobs", status_code=202)
    def submit(body: JobBody):
        if body.kind not in a1111.KINDS:
            raise RequestError("kind", f"kind must be one of {', '.join(a1111.KINDS)}, got {body.kind!r}")
        job = service.submit(body.kind, a1111.parse(body.kind, body.request))
        return {"id": job.id, "state": job.state, "position": service.store.position(job)}

    @app.get("/v1/jobs")
    def list_jobs(state: str | None = None, limit: int = 200):
        if state is not None and state not in STATES:
            raise RequestError("state", f"state must be one of {', '.join(STATES)}, got {state!r}")
        return [service.public(j) for j in service.store.jobs(state, limit=min(max(limit, 1), 1000))]

    @app.get("/v1/jobs/{job_id}")
    def job(job_id: str):
        return service.public(get_job(job_id))

    @app.get("/v1/jobs/{job_id}/images/{n}")
    def image(job_id: str, n: int):
        job = get_job(job_id)
        if not 0 <= n < job.images:
            raise HTTPException(404, f"job {job_id} has no image {n} (it has {job.images})")
        return Response(service.store.image_bytes(job_id, n), media_type="image/png",
                        headers={"Content-Disposition": f'inline; filename="{job_id[:8]}-{n}.png"'})

    @app.get("/v1/jobs/{job_id}/preview")
    def preview(job_id: str):
        job = get_job(job_id)
        p = service.worker.progress_of(job_id)
        if p is not None and p.preview is not None:
            return Response(p.preview, media_type="image/png", headers={"Cache-Control": "no-store"})
        if job.state == "completed" and job.images:
            return Response(service.store.image_bytes(job_id, 0), media_type="image/png")
        raise HTTPException(404, "no preview yet")

    @app.delete("/v1/jobs/{job_id}")
    def cancel(job_id: str):
        get_job(job_id)
        before = service.store.cancel(job_id)
        if before == "running":
            service.worker.cancel(job_id)
        elif before == "pending":
            service.hub.publish({"id": job_id, "state": "canceled", "step": 0, "steps": 0, "eta_s": None})
        return service.public(get_job(job_id))

    @app.get("/v1/events")
    async def events(request: Request):
        queue = service.hub.subscribe()

        async def stream():
            try:
                yield ": connected\n\n"
                while True:
                    try:
                        event = await asyncio.wait_for(queue.get(), timeout=10)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            return
                        yield ": keep-alive\n\n"
                        continue
                    if event is None:
                        return
                    yield f"data: {json.dumps(event)}\n\n"
            finally:
                service.hub.unsubscribe(queue)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
