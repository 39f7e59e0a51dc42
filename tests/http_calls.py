"""HTTP calls described as data, so that the same batch can run here or inside a network namespace
(``network_namespace.perform_inside``).

A call is a dict: ``{"method", "path", "token"?, "json"?, "data"?, "files"? {field: path},
"content_type"?}`` for any request, or ``{"infer": post_infer kwargs, "token"?}`` for an infer
request as ``server_fixtures.post_infer`` sends it (file and label given as paths).
Each answer: ``{"status", "content_type", "body"}`` (the text, or the parsed JSON), and
``"headers"`` (lower-case names).
"""

from __future__ import annotations

from pathlib import Path

import requests
from server_fixtures import post_infer


def _answer(response: requests.Response) -> dict:
    content_type = response.headers.get("content-type", "")
    body = response.json() if content_type.startswith("application/json") and response.content else response.text
    return {
        "status": response.status_code,
        "content_type": content_type,
        "body": body,
        "headers": {k.lower(): v for k, v in response.headers.items()},
    }


def perform(url: str, calls: list[dict]) -> list[dict]:
    """Each call (module docstring) against the server at ``url``, in order."""
    answers = []
    for call in calls:
        headers = {"Authorization": f"Bearer {call['token']}"} if call.get("token") else {}
        if "infer" in call:
            kwargs = dict(call["infer"])
            for field in ("file", "label"):
                if isinstance(kwargs.get(field), str):
                    kwargs[field] = Path(kwargs[field])
            kwargs.setdefault("output", "json")
            answers.append(_answer(post_infer(url, headers=headers, **kwargs)[-1]))
            continue
        if call.get("content_type"):
            headers["Content-Type"] = call["content_type"]
        files = {field: (Path(path).name, Path(path).read_bytes()) for field, path in (call.get("files") or {}).items()}
        response = requests.request(
            call["method"],
            url + call["path"],
            headers=headers,
            json=call.get("json"),
            data=call.get("data"),
            files=files or None,
            timeout=120,
        )
        answers.append(_answer(response))
    return answers
