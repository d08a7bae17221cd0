#!/usr/bin/env python3
"""One chat completion through the OpenAI Python SDK over TLS/TCP with a
client certificate (the SDK speaks HTTP/1.1 and h2, not HTTP/3).

Prints one JSON line: {"text", "finish_reason", "usage", "chunks"} on
success; on an API error {"error": {"status", "type", "message"}} and exit 1.
Run with the venv that `cargo xtask setup` makes: target/pyenv/bin/python.
"""

import argparse
import json
import ssl
import sys

import httpx2
import openai


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--base-url", required=True, help="https://localhost:PORT/v1")
    p.add_argument("--ca", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--api-key", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--content", required=True)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stream", action="store_true")
    a = p.parse_args()

    ctx = ssl.create_default_context(cafile=a.ca)
    ctx.load_cert_chain(a.cert, a.key)
    client = openai.OpenAI(
        base_url=a.base_url,
        api_key=a.api_key,
        http_client=httpx2.Client(verify=ctx),
        max_retries=0,
    )
    args = dict(
        model=a.model,
        messages=[{"role": "user", "content": a.content}],
        max_tokens=a.max_tokens,
        temperature=a.temperature,
        seed=a.seed,
    )
    try:
        if a.stream:
            text, reason, usage, chunks = "", None, None, 0
            for chunk in client.chat.completions.create(stream=True, **args):
                chunks += 1
                if chunk.usage is not None:
                    usage = chunk.usage.model_dump()
                for choice in chunk.choices:
                    text += choice.delta.content or ""
                    reason = choice.finish_reason or reason
        else:
            r = client.chat.completions.create(**args)
            text, reason, usage, chunks = r.choices[0].message.content, r.choices[0].finish_reason, r.usage.model_dump(), 1
    except openai.APIStatusError as e:
        print(json.dumps({"error": {"status": e.status_code, "message": str(e)}}), flush=True)
        sys.exit(1)
    except openai.APIError as e:
        print(json.dumps({"error": {"status": None, "message": str(e)}}), flush=True)
        sys.exit(1)
    print(json.dumps({"text": text, "finish_reason": reason, "usage": usage, "chunks": chunks}), flush=True)


if __name__ == "__main__":
    main()
