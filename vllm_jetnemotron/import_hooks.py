"""Patch a vLLM module when it is imported: the one mechanism of the plugin's import-time
patches (`cpu_seeded_sampling`, `cpu_rejection_sampling`, `lora_adapter_config`), so a
process that never imports the patched module (an API server without a model runner, a
worker without the server's code) pays nothing."""

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable
from types import ModuleType


def patch_when_imported(module_name: str, patch: Callable[[ModuleType], object]) -> None:
    """`patch(module)` now if `module_name` is imported, else right after its import.
    Idempotent: one hook per module name."""
    module = sys.modules.get(module_name)
    if module is not None:
        patch(module)
    elif not any(isinstance(f, _PatchOnImport) and f.module_name == module_name for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport(module_name, patch))


class _PatchingLoader(importlib.abc.Loader):
    """The module's own loader, then the patch on the loaded module."""

    def __init__(self, loader, patch: Callable[[ModuleType], object]):
        self._loader = loader
        self._patch = patch

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._patch(module)

    def __getattr__(self, name):  # get_source, get_filename, ... for inspect and linecache
        return getattr(self._loader, name)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, module_name: str, patch: Callable[[ModuleType], object]):
        self.module_name = module_name
        self._patch = patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.module_name:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader, self._patch)
        return spec
