"""HTTP API for the pool: register (LoRA upload or whole model), list, show, update, remove,
and train a PHATGOOSE gate as a background job with a status URL."""

from __future__ import annotations

import json
import shutil
import threading
import uuid
from typing import Optional

from fastapi import APIRouter, Request, UploadFile
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from moerge.experts.errors import (
    ExpertError,
    UnknownExpertError,
    UnsupportedMediaTypeError,
    UploadTooLargeError,
    full_disk_is_507,
)
from moerge.service.archive import ArchiveLimits, archive_kind
from moerge.service.uploads import MAX_FILES, check_part, extract_tar, new_upload_dir, save_files

MAX_FORM_FIELDS = 32


class ExpertPatch(BaseModel):
    description: Optional[str] = None
    tags: Optional[list[str]] = None
    examples: Optional[list[str]] = None
    # [{"prompt", "answer"}]: what `verify` checks the expert's answers against (router/verify.py)
    answered_examples: Optional[list[dict]] = None


class ModelExpertBody(BaseModel):
    """JSON body registering a whole model."""
    model_config = ConfigDict(extra="forbid")
    kind: str = "model"
    name: str
    description: str = ""
    model: Optional[str] = None
    api_base: Optional[str] = None
    api_key_env: Optional[str] = None
    tags: list[str] = Field(default_factory=list, max_length=64)
    examples: list[str] = Field(default_factory=list, max_length=256)


def _model_body(body) -> ModelExpertBody:
    if not isinstance(body, dict) or body.get("kind", "model") != "model":
        raise ExpertError("a JSON body registers a whole model: {\"kind\": \"model\", \"name\", "
                          "\"description\", \"model\", \"api_base\"}; upload LoRA files as multipart")
    try:
        return ModelExpertBody.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ()))
        raise ExpertError(f"invalid whole-model body: {where}: {err.get('msg')}") from None


class GateExample(BaseModel):
    prompt: str
    answer: str


class GateRequest(BaseModel):
    examples: list[GateExample] = Field(min_length=4, max_length=5000)
    steps: int = Field(default=100, ge=1, le=2000)


def card_json(card) -> dict:
    data = card.model_dump()
    data["has_gate"] = "gate" in card.artifacts
    data["has_arrow"] = "arrow" in card.artifacts
    return data


def _form_list(form, key: str) -> list[str]:
    values = form.getlist(key)
    if len(values) == 1 and isinstance(values[0], str) and values[0].strip().startswith("["):
        try:
            return [str(v) for v in json.loads(values[0])]
        except ValueError:
            raise ExpertError(f"form field {key!r} is not a JSON list") from None
    return [str(v) for v in values if isinstance(v, str)]


def build_router(runtime, keys) -> APIRouter:
    api = APIRouter()
    jobs: dict[str, dict] = {}
    jobs_lock = threading.Lock()

    @api.post("/v1/experts", status_code=201)
    async def register(request: Request):
        keys.admin_call(request.headers.get("authorization"))
        pool = runtime.pool
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("application/json"):
            try:
                body = await request.json()
            except ValueError:
                raise ExpertError("the body is not valid JSON") from None
            spec = _model_body(body)
            card = await run_in_threadpool(
                pool.register_model, spec.name, spec.description, model=spec.model, api_base=spec.api_base,
                api_key_env=spec.api_key_env, tags=spec.tags, examples=spec.examples)
            return JSONResponse(card_json(card), status_code=201)
        if not ctype.startswith("multipart/form-data"):
            raise UnsupportedMediaTypeError(f"content type {ctype or 'none'!r} is not accepted here: send "
                                            "multipart/form-data with the adapter files (or one tar.gz), "
                                            "or application/json for a whole model")
        form = await request.form(max_files=MAX_FILES, max_fields=MAX_FORM_FIELDS)
        name = form.get("name")
        if not isinstance(name, str):
            raise ExpertError("form field 'name' is required")
        uploads = [v for _, v in form.multi_items() if isinstance(v, UploadFile) or hasattr(v, "filename")]
        if not uploads:
            raise ExpertError("no files uploaded: send adapter_config.json and adapter_model.safetensors, "
                              "or one .tar.gz holding them")
        with full_disk_is_507(pool.root):
            folder = new_upload_dir(pool.store.staging.parent / "uploads")
        # an ESFT adapter (moerge-esft/1 over the pool's MoE base): form field kind=esft, or its file names
        esft = form.get("kind") == "esft" or any((up.filename or "").startswith("esft_") for up in uploads)
        try:
            limit = runtime.settings.max_esft_upload_bytes if esft else runtime.settings.max_upload_bytes
            files = []
            for up in uploads:
                fname = up.filename or ""
                cap = ArchiveLimits.for_upload(limit).max_total_bytes if archive_kind(fname) else limit
                data = await up.read(cap + 1)
                if len(data) > cap:
                    raise UploadTooLargeError(f"{fname} is over the limit of {cap / 2**20:.1f} MiB: raise "
                                              f"MOERGE_MAX_{'ESFT_' if esft else ''}UPLOAD_MB or upload a smaller "
                                              "adapter")
                check_part(fname, up.content_type, data)
                files.append((fname, data))
            if any(archive_kind(fname) for fname, _ in files) and len(files) != 1:
                raise ExpertError("send either one archive or the adapter's files, not both")
            with full_disk_is_507(pool.root):     # the upload is written under the pool folder
                if archive_kind(files[0][0]):
                    extract_tar(folder, files[0][1], limit, filename=files[0][0])
                else:
                    save_files(folder, files, limit)
            card = await run_in_threadpool(
                pool.register_esft if esft else pool.register_lora, folder, name, str(form.get("description") or ""),
                tags=_form_list(form, "tags"), examples=_form_list(form, "examples"))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return JSONResponse(card_json(card), status_code=201)

    @api.get("/v1/experts")
    async def list_experts():
        return {"object": "list", "data": [card_json(c) for c in runtime.pool.list()]}

    @api.get("/v1/experts/{name}")
    async def show(name: str):
        return card_json(runtime.pool.get(name))

    @api.patch("/v1/experts/{name}")
    async def patch(name: str, body: ExpertPatch, request: Request):
        keys.admin_call(request.headers.get("authorization"))
        card = await run_in_threadpool(runtime.pool.update, name, description=body.description, tags=body.tags,
                                       examples=body.examples, answered_examples=body.answered_examples)
        return card_json(card)

    @api.delete("/v1/experts/{name}")
    async def delete(name: str, request: Request):
        keys.admin_call(request.headers.get("authorization"))
        await run_in_threadpool(runtime.pool.remove, name)
        return {"deleted": name}

    @api.post("/v1/experts/{name}/gate", status_code=202)
    async def train_gate(name: str, body: GateRequest, request: Request):
        keys.admin_call(request.headers.get("authorization"))
        card = runtime.pool.get(name)
        if card.kind != "lora":
            raise ExpertError(f"expert {name!r} is a {card.kind}: only LoRA experts have gates")
        job_id = uuid.uuid4().hex[:16]
        job = {"id": job_id, "expert": name, "status": "running", "steps": body.steps, "error": None}
        with jobs_lock:
            jobs[job_id] = job

        def work():
            from moerge.experts.gate_jobs import train_gate_for_card
            try:
                train_gate_for_card(runtime.pool, name, [e.prompt for e in body.examples],
                                    [e.answer for e in body.examples], steps=body.steps, show_progress=False)
                job["status"] = "succeeded"
            except Exception as e:  # noqa: BLE001 - reported through the job status
                job["status"], job["error"] = "failed", f"{type(e).__name__}: {e}"

        threading.Thread(target=work, daemon=True, name=f"gate-{name}").start()
        return JSONResponse({**job, "status_url": f"/v1/jobs/{job_id}"}, status_code=202)

    @api.get("/v1/jobs/{job_id}")
    async def job_status(job_id: str):
        job = jobs.get(job_id)
        if job is None:
            raise UnknownExpertError(f"no job {job_id!r}")
        return job

    return api
