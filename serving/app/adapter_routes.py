"""The Ingress's admin routes for adapters (a mixin of serving/app/http.py's Ingress): GET/POST /v1/adapters and
DELETE /v1/adapters/{name}, and the admin check every admin route (experiments too) makes."""
from __future__ import annotations

import hmac

from fastapi import Request
from fastapi.responses import JSONResponse

from adapters_store import AdapterError, check_name, parse_ref

from . import logs
from .access import is_local_client
from .bodies import AdapterBody, read_json
from .errors import ROW_CODES, ApiError, exact_path_param
from .web import app


class AdapterRoutes:
    """Mixin of Ingress (needs its cfg, model, pusher, metrics, base_name, catalog, _serve, _parse, _retry)."""

    def _check_admin(self, request: Request) -> None:
        key = self.cfg.admin_api_key
        if key is None:
            if not is_local_client(request.scope, request.headers, self.cfg.forwarded_allow_ips):
                raise ApiError(403, "admin routes answer only local clients (not through a proxy) when no "
                               "admin_api_key is configured", "forbidden")
            return
        auth = request.headers.get("authorization")
        if not auth:
            raise ApiError(401, "admin route: send Authorization: Bearer <admin key>", "missing_api_key",
                           {"WWW-Authenticate": "Bearer"})
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "admin route: Authorization must be 'Bearer <admin key>'", "missing_api_key",
                           {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(403, "admin route: wrong API key", "invalid_api_key")

    async def _forget_adapter(self, name: str) -> None:
        if self.pusher is None:
            self.metrics.forget_adapter(name)
            return
        try:
            await self.pusher.forget_adapter(name)
        except Exception:  # noqa: BLE001 - the delete itself succeeded; only its series linger
            self.metrics.forget_adapter(name)

    @app.get("/v1/adapters")
    async def list_adapters(self, request: Request):
        return await self._serve("adapters", request, self._list_adapters)

    async def _list_adapters(self, request: Request):
        self._check_admin(request)
        listing = await self.model.adapter_listing.remote()
        return JSONResponse({"object": "list", "data": listing["data"], "broken": listing["broken"]})

    @app.post("/v1/adapters")
    async def add_adapter(self, request: Request):
        return await self._serve("adapters", request, self._add_adapter)

    async def _add_adapter(self, request: Request):
        self._check_admin(request)
        body = self._parse(AdapterBody, await read_json(request, self.cfg.max_body_bytes))
        logs.note(action="adapter.add", adapter=body.name[:logs.MAX_CHARS], source=logs.safe_source(body.source))
        try:
            check_name(body.name)
            if body.name == self.base_name:  # "model": <base name> always means the base: never reachable
                raise AdapterError(f"invalid adapter name {body.name!r}: the base model's name")
        except AdapterError as exc:
            raise ApiError(422, str(exc), "invalid_name") from None
        await self._ensure_experiments()
        if body.name in self.catalog:  # "model": <experiment> means the experiment: the adapter would be unreachable
            raise ApiError(409, f"adapter name {body.name!r} is an experiment's name (/v1/experiments): choose "
                           "another name", "name_taken")
        out = await self.model.add_adapter.remote(body.name, body.source, body.labels)
        if out.get("error"):
            status = ROW_CODES.get(out["code"], (422, ""))[0]
            raise ApiError(status, out["error"], out["code"], self._retry() if status == 429 else None)
        out.pop("load_s", None)  # recorded by the model replica (polyhead_adapter_load_seconds)
        if self.pusher is not None:  # registered again just after a delete: its series count at once
            await self.pusher.remember_adapter(body.name)
        logs.note(version=out.get("version"))
        return JSONResponse(dict(out, object="adapter"), status_code=201)

    @app.delete("/v1/adapters/{name:path}")
    async def remove_adapter(self, name: str, request: Request):
        async def handler(request: Request):
            self._check_admin(request)
            logs.note(action="adapter.remove", adapter=name[:logs.MAX_CHARS])
            exact_path_param(request, name)
            try:
                parse_ref(name)  # `name` (every version) or `name@N`
            except AdapterError:
                raise ApiError(404, f"unknown adapter {name[:80]!r}", "model_not_found", adapter="unknown") from None
            if name in self.cfg.adapters:  # in every replica's config: removing it from one would split them
                raise ApiError(409, f"adapter {name!r} comes from the serve config (`adapters`); remove it there "
                               "and redeploy", "config_adapter")
            if not await self.model.remove_adapter.remote(name):
                raise ApiError(404, f"unknown adapter {name!r}", "model_not_found", adapter="unknown")
            if "@" not in name:  # every version is gone: so are its series (one version: the name stays)
                await self._forget_adapter(name)
            return JSONResponse({"id": name, "object": "adapter", "deleted": True})

        return await self._serve("adapters", request, handler)
