"""A stand-in for the Hugging Face Hub's HTTP API on 127.0.0.1: it answers the calls a
Space deploy makes (repo creation, preupload, commit, secrets, variables) the way the Hub
does, and records each one, so that tests see exactly what huggingface_hub sent."""

from __future__ import annotations

import base64
import json
import secrets

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


def create_hub() -> FastAPI:
    app = FastAPI()
    app.state.calls = []

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "HEAD"])
    async def record(path: str, request: Request):
        body = await request.body()
        call = {"method": request.method, "path": "/" + path, "query": dict(request.query_params),
                "authorization": request.headers.get("authorization"), "body": body}
        app.state.calls.append(call)
        parts = path.split("/")
        if path == "api/validate-yaml":  # the Hub checks a README's front matter before a commit
            return {"errors": [], "warnings": []}
        if path == "api/repos/create":
            payload = json.loads(body)
            repo = f"{payload.get('organization') or 'me'}/{payload['name']}"
            return {"url": f"{request.base_url}spaces/{repo}", "name": repo, "id": secrets.token_hex(12)}
        if len(parts) >= 5 and parts[0] == "api" and parts[1] == "spaces":
            action = parts[4]
            if action == "preupload":
                files = json.loads(body)["files"]
                return {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                   "oid": None} for f in files], "commitOid": "0" * 40}
            if action == "commit":
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                call["commit"] = lines
                return {"commitUrl": f"{request.base_url}spaces/{parts[2]}/{parts[3]}/commit/{'1' * 40}",
                        "commitOid": "1" * 40, "pullRequestUrl": None}
            if action in ("secrets", "variables"):
                return {}
        return JSONResponse({"error": f"not served by the test hub: {request.method} /{path}"}, status_code=404)

    return app


def committed_files(calls: list[dict]) -> dict[str, bytes]:
    """Path -> content of every file the recorded commits uploaded."""
    files = {}
    for call in calls:
        for line in call.get("commit", ()):
            if line.get("key") == "file":
                value = line["value"]
                files[value["path"]] = base64.b64decode(value["content"])
    return files
