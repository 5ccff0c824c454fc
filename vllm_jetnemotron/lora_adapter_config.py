"""A LoRA adapter whose `adapter_config.json` vLLM cannot read is the client's error: loading it
answers 400 naming the file and the problem, and the server goes on serving.

Upstream cause (vLLM 0.32, `vllm/entrypoints/openai/models/serving.py`,
`OpenAIServingModels.load_lora_adapter`, behind `/v1/load_lora_adapter` and `--lora-modules`):
the API server checks a load request's names only (`_check_load_lora_adapter_request`) and hands
the folder to the engine (`add_lora`). The worker reads the config (`PEFTHelper.from_local_dir`,
`vllm/lora/peft_helper.py`: a bare `json.load`, then `from_dict`), and every failure but a
missing folder comes back as a 500 "InternalServerError" carrying the parser's message without
the file's name ("Worker failed with error 'Unterminated string starting at: line 3 column 3'").

The fix reads the config in the API server as the worker will, as the last of the request
checks: JSON that does not parse, a value that is not an object, or a config `PEFTHelper`
rejects (required fields missing, a rank that is not a positive integer) is a 400 that names the
adapter, its `lora_path` and the file (vLLM's error responses show server paths as `<path>`).
Only a local folder holding the file is read: vLLM answers a missing one with its own 404, and
the worker downloads a Hub id.

It is applied only where it is needed: the probe (`needs_fix`) runs the installed request check
on a folder whose `adapter_config.json` is not JSON and patches it only if the check lets the
request through. `install()` is idempotent; it patches the class at once if its module is
imported, otherwise when it is (an import hook): only the API server imports it.
"""

from .import_hooks import patch_when_imported
from .patches import replace_once

SERVING_MODULE = "vllm.entrypoints.openai.models.serving"
CHECK_NAME = "_check_load_lora_adapter_request"
_MARKER = "_jetnemotron_lora_config_check"
# The patched-out check, kept on its replacement (for tests and debugging).
UPSTREAM_ATTR = "upstream_check"


def adapter_config_problem(lora_path: str) -> str | None:
    """Why vLLM cannot read the `adapter_config.json` of the local adapter folder `lora_path`;
    None if it can, or if there is no such local file."""
    import json
    from pathlib import Path

    from vllm.lora.peft_helper import PEFTHelper

    config_file = Path(lora_path).expanduser().absolute() / "adapter_config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as error:  # not UTF-8, or not JSON
        return f"{config_file.name} is not valid JSON: {error}"
    if not isinstance(config, dict):
        return f"{config_file.name} must hold a JSON object, got {type(config).__name__}"
    try:
        PEFTHelper.from_dict(config)
    except (ValueError, TypeError) as error:
        return f"{config_file.name}: {error}"
    return None


def needs_fix(check) -> bool:
    """True when `check`, run like `OpenAIServingModels._check_load_lora_adapter_request`, lets
    through a request for a folder whose `adapter_config.json` is not JSON (vLLM 0.32). False
    if it raises: a check that cannot run on the stand-in is not known to have this bug."""
    import asyncio
    import concurrent.futures
    import tempfile
    from pathlib import Path
    from types import SimpleNamespace

    from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

    no_adapters = SimpleNamespace(is_base_model=lambda name: False, lora_requests={})
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "adapter_config.json").write_text('{"r": ')
        request = LoadLoRAAdapterRequest(lora_name="probe", lora_path=folder)
        # On a loop of its own: the caller may run inside one.
        with concurrent.futures.ThreadPoolExecutor(1) as thread:
            try:
                return thread.submit(asyncio.run, check(no_adapters, request)).result() is None
            except Exception:
                return False


def install() -> None:
    """Fix `OpenAIServingModels` now if its module is loaded, else as soon as it is."""
    patch_when_imported(SERVING_MODULE, lambda module: patch_class(module.OpenAIServingModels))


def patch_class(models_cls) -> bool:
    """Extend `models_cls._check_load_lora_adapter_request` (once) if it lets a config vLLM
    cannot read through. Returns whether the class carries the fix."""
    import functools
    from http import HTTPStatus

    from vllm.entrypoints.serve import create_error_response

    def wrap(upstream):
        @functools.wraps(upstream)
        async def _check_load_lora_adapter_request(self, request):
            error = await upstream(self, request)
            if error is not None:
                return error
            problem = adapter_config_problem(request.lora_path)
            if problem is None:
                return None
            return create_error_response(
                message=f"LoRA adapter '{request.lora_name}' at {request.lora_path}: {problem}",
                err_type="InvalidUserInput", status_code=HTTPStatus.BAD_REQUEST, param="lora_path")

        setattr(_check_load_lora_adapter_request, UPSTREAM_ATTR, upstream)
        return _check_load_lora_adapter_request

    return replace_once(models_cls, CHECK_NAME, __name__, needs_fix, wrap, _MARKER)
