"""`python -m vllm_jetnemotron.converter`: the `jet-nemotron-convert` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
