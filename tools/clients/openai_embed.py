"""Embed texts through a running sembed server with the official `openai` package.

    python tools/clients/openai_embed.py BASE_URL MODEL < texts.json > vectors.json

BASE_URL is e.g. http://127.0.0.1:8080/v1. Reads a JSON list of texts on stdin, writes the list of
vectors on stdout (the client's default base64 transfer, decoded by the client), plus usage.
"""
import json
import sys

from openai import OpenAI


def main():
    base_url, model = sys.argv[1], sys.argv[2]
    texts = json.load(sys.stdin)
    client = OpenAI(base_url=base_url, api_key="not-needed", max_retries=0, timeout=60)
    resp = client.embeddings.create(model=model, input=texts)
    assert resp.model == model, resp.model
    assert [d.index for d in resp.data] == list(range(len(texts)))
    json.dump({"vectors": [d.embedding for d in resp.data], "prompt_tokens": resp.usage.prompt_tokens}, sys.stdout)


if __name__ == "__main__":
    main()
