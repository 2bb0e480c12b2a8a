"""The jobs API over REST. Thin: read, call the JobService, answer.

POST /v2/models/{m}/jobs   a v2 inference body (+ callback_url, ttl_s; Idempotency-Key
                           header): 202 {"id", "status_url"}; the same key again: 200,
                           the first job. Bad input 400, unknown model 404, full 429.
GET  /v1/jobs/{id}         the job: state, attempts, version, timestamps, result or error
DELETE /v1/jobs/{id}       cancels a queued job (409 once it runs or ended)
GET  /v1/jobs?model=&state=&limit=&cursor=   a page of jobs (no results), oldest first
Submitting and cancelling change state: they need the server token when one is set.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from runtime.errors import Code, ServingError, invalid
from runtime.service.core import Core
from runtime.server.http import json_response, read_body

MAX_PAGE = 500


def _jobs(core: Core):
    if core.jobs is None:
        raise ServingError(Code.UNAVAILABLE, "jobs are not enabled on this server")
    return core.jobs


def build(core: Core) -> APIRouter:
    r = APIRouter()
    limits = core.settings.limits

    @r.post("/v2/models/{model}/jobs")
    async def submit(request: Request, model: str):
        jobs = _jobs(core)
        core.control.authorize(request.headers.get("authorization"), f"submit_job model={model}")
        if request.headers.get("inference-header-content-length") is not None:
            raise invalid("a job takes a JSON body: the binary tensor extension is not supported here")
        body = await read_body(request, limits.max_body_bytes, limits.request_timeout_s)
        job, created = await jobs.submit(model, body, dict(request.headers),
                                         request.headers.get("idempotency-key"))
        url = f"/v1/jobs/{job.id}"
        return json_response({"id": job.id, "status_url": url, "state": job.state},
                             202 if created else 200, {"location": url})

    @r.get("/v1/jobs/{job_id}")
    async def get(job_id: str):
        return json_response((await _jobs(core).get(job_id)).view())

    @r.delete("/v1/jobs/{job_id}")
    async def cancel(request: Request, job_id: str):
        jobs = _jobs(core)
        core.control.authorize(request.headers.get("authorization"), f"cancel_job id={job_id}")
        return json_response((await jobs.cancel(job_id)).view())

    @r.get("/v1/jobs")
    async def listing(model: str | None = None, state: str | None = None, limit: int = 100,
                      cursor: str | None = None):
        if not 1 <= limit <= MAX_PAGE:
            raise invalid(f"limit must be 1 to {MAX_PAGE}, got {limit}")
        page, nxt = await _jobs(core).list(model, state, limit, cursor)
        rows = []
        for j in page:
            v = j.view()
            v.pop("result", None)
            rows.append(v)
        return json_response({"jobs": rows, "next": nxt})

    return r
