"""Chat with a running server through the OpenAI client.

    python -m vllm_jetnemotron serve path/to/checkpoint --kv-cache-memory-bytes 2147483648 &
    python examples/openai_chat.py --base-url http://127.0.0.1:8000/v1
"""

import argparse

from openai import OpenAI

MESSAGES = [{"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "What is linear attention?"}]
MAX_TOKENS = 48


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default=None, help="served model name (default: the first one)")
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key="EMPTY")
    model = args.model or client.models.list().data[0].id
    reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0.0)
    print(reply.choices[0].message.content)


if __name__ == "__main__":
    main()
