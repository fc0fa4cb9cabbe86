"""Loading and unloading LoRA adapters while the server runs (the admin routes, named as vLLM names them).

`lmforge serve BASE --lora NAME=PATH ...` serves adapters from the start; these routes change the set at run time:
POST /v1/load_lora_adapter {"lora_name", "lora_path"} reads an adapter folder (PEFT's format or lmforge's) from
the server's disk and serves it under its name, POST /v1/unload_lora_adapter {"lora_name"} stops serving one
(400 while requests use it). A request picks an adapter by sending its name as `model`; /v1/models lists them.

Reading a folder named by a client is an operator's act, so these routes answer only on a server started with an
API key (403 otherwise), and only to a request that carries one (the edge checks it, as on every /v1 route).
"""

from __future__ import annotations

from fastapi import APIRouter

from lmforge.serve.errors import ApiError
from lmforge.serve.protocol import LoadAdapterRequest, UnloadAdapterRequest
from lmforge.serve.routes import ServerDep

router = APIRouter()


def require_admin(server) -> None:
    if not server.api_keys:
        raise ApiError(
            403,
            "adapters are loaded and unloaded at run time only on a server started with --api-key "
            "(or --api-key-file); start it with one, or give adapters with --lora NAME=PATH",
            type="permission_error",
            code="admin_needs_api_key",
        )


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(req: LoadAdapterRequest, server: ServerDep):
    require_admin(server)
    try:
        await server.load_adapter(req.lora_name, req.lora_path)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise ApiError(400, f"lora_path: {e}", "lora_path") from None
    return {"object": "lora_adapter", "id": req.lora_name, "loaded": True}


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(req: UnloadAdapterRequest, server: ServerDep):
    require_admin(server)
    server.check_model(req.lora_name)  # 404 for a name that is not served
    if req.lora_name == server.settings.model_name:
        raise ApiError(400, f"{req.lora_name!r} is the served model itself, not an adapter", "lora_name")
    await server.unload_adapter(req.lora_name)
    return {"object": "lora_adapter", "id": req.lora_name, "loaded": False}
