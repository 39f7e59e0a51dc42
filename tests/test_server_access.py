"""The server on a network: tokens per role, no start beyond loopback without them, requests read
as sent, no orphaned task processes, no page that loads anything from outside.

The server with tokens runs on 10.23.0.1, an address that is not loopback, in a network namespace
the test makes (``network_namespace``), and the requests run inside it; where this machine does
not allow that, the same configuration runs on 127.0.0.1 (the test prints which). The other
servers here run on 127.0.0.1, each of its own, as each test stops or restarts it.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import network_namespace
import psutil
import pytest
import requests
from fastapi import FastAPI
from http_calls import perform
from server_fixtures import BAD_REQUESTS, make_studies, save_tiny_checkpoint, smooth_field, tiny_trust_card
from starlette.testclient import TestClient

from monai_sal_app.access import MIN_TOKEN_LENGTH, OPERATOR, READER, AccessTokens, check_listen_address, is_loopback
from monai_sal_app.data.io import write_nifti
from monai_sal_app.evaluation.trust import trust_card_path, write_trust_card
from monai_sal_app.lib.access_control import AccessControl, launcher_listen_host, required_role
from monai_sal_app.serve import start_background_server, write_app_folder

pytestmark = pytest.mark.server

READER_TOKEN, OPERATOR_TOKEN = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
TOKENS_ENV = {"MONAI_SAL_READER_TOKEN": READER_TOKEN, "MONAI_SAL_OPERATOR_TOKEN": OPERATOR_TOKEN}
TASK_MODULE = "monailabel.interfaces.utils.app"  # what MONAI Label's train and scoring processes run
SCORED_VOLUMES = 32  # datastore volumes that keep a scoring run busy for about a minute
ENDS_WITHIN_S = 10  # the longest a task process may outlive its server


def _models_and_studies(root: Path, card: bool = False) -> tuple[Path, Path, dict]:
    """Tiny 2D and 3D checkpoints in ``root/model`` and the test images in ``root/studies``; with
    ``card``, the 2D model alone, with a trust card written after the images."""
    model_dir = root / "model"
    save_tiny_checkpoint(model_dir / "classifier_2d.pt", 2, seed=0)
    if not card:
        save_tiny_checkpoint(model_dir / "classifier_3d.pt", 3, seed=1)
    items = make_studies(root / "studies")
    if card:
        write_trust_card(tiny_trust_card(model_dir / "classifier_2d.pt"), model_dir / "classifier_2d.pt")
    return model_dir, root / "studies", items


# ------------------------------------------------------------------------------------------------
# the server with tokens, on an address that is not loopback
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def network_server(tmp_path_factory):
    """The server with both tokens set (in its environment), on 10.23.0.1 in a network namespace
    where this machine allows one, else on 127.0.0.1. Yields {"url", "server", "call", "items",
    "bad", "inside"}: ``call(calls)`` runs ``http_calls.perform`` where the server can be reached."""
    root = tmp_path_factory.mktemp("network")
    model_dir, studies, items = _models_and_studies(root)
    inside = network_namespace.available()
    host = network_namespace.ADDRESS if inside else "127.0.0.1"
    print(f"server with tokens on {host} ({'a network namespace' if inside else 'loopback: no user namespaces here'})")

    def call(server, calls):
        if inside:
            return network_namespace.perform_inside(server.pid, server.url, calls)
        return perform(server.url, calls)

    def answers(server):
        try:
            return call(server, [{"method": "GET", "path": "/info/"}])[0]["status"] == 401
        except (RuntimeError, requests.ConnectionError):
            return False

    server = start_background_server(
        studies,
        conf={"model_dir": str(model_dir)},
        workdir=root / "run",
        host=host,
        port=8000 if inside else None,  # the namespace is the server's alone
        extra_env={"OMP_NUM_THREADS": "1", "MONAI_LABEL_AUTO_UPDATE_SCORING": "false", **TOKENS_ENV},
        wrapper=network_namespace.wrapper() if inside else (),
        answers=answers,
        timeout=240,
    )
    bad = root / "bad"
    bad.mkdir()
    try:
        yield {
            "server": server,
            "call": lambda calls: call(server, calls),
            "items": items,
            "bad": bad,
            "inside": inside,
        }
    finally:
        server.stop()


# (method, path, JSON body or None, role needed, whether the operator's token is tried on it:
# not where it would start real work the test does not want, or a program that is not here)
ENDPOINTS = [
    ("GET", "/", None, READER, True),
    ("GET", "/openapi.json", None, READER, True),
    ("GET", "/info/", None, READER, True),
    ("POST", "/infer/classifier_2d?image=xray_png&output=json", {"method": "gradient"}, READER, True),
    ("GET", "/datastore/?output=all", None, READER, True),
    ("GET", "/datastore/image?image=xray_png", None, READER, True),
    ("HEAD", "/datastore/image?image=xray_png", None, READER, True),
    ("GET", "/datastore/image/info?image=xray_png", None, READER, True),
    ("GET", "/datastore/label?label=xray_png&tag=final", None, READER, True),
    ("GET", "/session/no_such_session", None, READER, True),
    ("POST", "/activelearning/random", None, READER, True),
    ("GET", "/train/", None, OPERATOR, True),
    ("POST", "/train/classifier_2d?run_sync=true", {"epochs": 0}, OPERATOR, True),
    ("DELETE", "/train/", None, OPERATOR, True),
    ("GET", "/scoring/", None, OPERATOR, True),
    ("POST", "/scoring/trust?run_sync=true", {"model": "no_such_model"}, OPERATOR, True),
    ("DELETE", "/scoring/", None, OPERATOR, True),
    ("PUT", "/datastore/image", None, OPERATOR, True),
    ("DELETE", "/datastore/image?id=no_such_image", None, OPERATOR, True),
    ("PUT", "/datastore/label", None, OPERATOR, True),
    ("DELETE", "/datastore/label?id=no_such_label&tag=final", None, OPERATOR, True),
    ("PUT", "/datastore/image/info?image=xray_png", None, OPERATOR, True),
    ("GET", "/logs/", None, OPERATOR, True),
    ("GET", "/logs/gpu", None, OPERATOR, False),
    ("GET", "/model/classifier_2d", None, OPERATOR, True),
    ("GET", "/model/info/classifier_2d", None, OPERATOR, True),
    ("PUT", "/model/classifier_2d", None, OPERATOR, True),
    ("DELETE", "/model/classifier_2d", None, OPERATOR, False),
    ("POST", "/batch/infer/classifier_2d", None, OPERATOR, False),
    ("GET", "/proxy/dicom/qido/studies", None, OPERATOR, True),
    ("GET", "/no/such/endpoint", None, OPERATOR, True),
]


def test_every_endpoint_answers_401_without_a_valid_token_and_403_to_the_wrong_role(network_server):
    calls = []
    for method, path, body, _role, with_operator in ENDPOINTS:
        tokens = [None, "not-the-token-" + "x" * MIN_TOKEN_LENGTH, READER_TOKEN]
        tokens += [OPERATOR_TOKEN] if with_operator else []
        calls += [{"method": method, "path": path, "json": body, "token": token} for token in tokens]
    answers = iter(network_server["call"](calls))
    for method, path, _body, role, with_operator in ENDPOINTS:
        missing, wrong, reader = next(answers), next(answers), next(answers)
        where = f"{method} {path}"
        for answer in (missing, wrong):
            assert answer["status"] == 401, (where, answer)
            assert answer["headers"]["www-authenticate"] == "Bearer", where
        if role == OPERATOR:
            assert reader["status"] == 403, (where, reader)
            if method != "HEAD":
                assert "operator" in reader["body"]["detail"], where
        else:
            assert reader["status"] not in (401, 403), (where, reader)
        if with_operator:
            operator = next(answers)
            assert operator["status"] not in (401, 403), (where, operator)


def test_every_earlier_bad_or_hostile_input_is_still_a_4xx_with_a_token(network_server):
    env = {"items": network_server["items"], "bad": network_server["bad"]}
    cases = sorted(BAD_REQUESTS)
    calls = []
    for case in cases:
        kwargs = {"model": "classifier_2d", "image": "xray_png", **BAD_REQUESTS[case][0](env)}
        kwargs = {k: str(v) if isinstance(v, Path) else v for k, v in kwargs.items()}
        calls.append({"infer": kwargs, "token": READER_TOKEN})
    calls.append({"infer": {"model": "classifier_2d", "image": "xray_png"}, "token": READER_TOKEN})
    *answers, still = network_server["call"](calls)
    for case, answer in zip(cases, answers, strict=True):
        _, status, words = BAD_REQUESTS[case]
        assert answer["status"] == status, (case, answer)
        assert words.lower() in answer["body"]["detail"].lower(), (case, answer)
    assert still["status"] == 200, still


def test_infer_reads_the_form_field_and_a_json_body_and_refuses_anything_else(network_server):
    infer = "/infer/classifier_2d?image=xray_png&output=json"
    form = {"method": "POST", "path": infer, "data": {"params": '{"method": "gradient_x_input"}'}}
    form_with_file = {**form, "path": "/infer/classifier_2d?output=json"}
    form_with_file["files"] = {"file": str(network_server["items"]["xray_png"]["path"])}
    refused = {  # what each must say it expected
        "a form field other than params": ({"method": "POST", "path": infer, "data": {"method": "gradient"}}, 400),
        "a query parameter other than image, session_id, output": (
            {"method": "POST", "path": infer + "&method=x"},
            400,
        ),
        "a JSON body that is not an object": ({"method": "POST", "path": infer, "json": ["gradient"]}, 400),
        "a JSON body that is not JSON": (
            {"method": "POST", "path": infer, "data": "{method", "content_type": "application/json"},
            400,
        ),
        "a plain text body": ({"method": "POST", "path": infer, "data": "method=x", "content_type": "text/plain"}, 415),
    }
    calls = [
        form,
        form_with_file,
        {"method": "POST", "path": infer, "json": {"method": "gradient", "target": 1}},
        {"method": "POST", "path": infer},  # no body: the defaults
        *[request for request, _ in refused.values()],
    ]
    answers = network_server["call"]([{**c, "token": READER_TOKEN} for c in calls])
    as_form, as_form_with_file, as_json, as_nothing, *refusals = answers
    assert as_form["status"] == 200 and as_form["body"]["method"] == "gradient_x_input", as_form
    assert as_form_with_file["status"] == 200 and as_form_with_file["body"]["method"] == "gradient_x_input"
    assert as_json["status"] == 200, as_json
    assert (as_json["body"]["method"], as_json["body"]["target"]["index"]) == ("gradient", 1)
    assert as_nothing["status"] == 200 and as_nothing["body"]["method"] == "gradcam", as_nothing
    for (case, (_, status)), answer in zip(refused.items(), refusals, strict=True):
        assert answer["status"] == status, (case, answer)
        detail = answer["body"]["detail"]
        assert "'params'" in detail or "JSON" in detail, (case, detail)


def test_no_page_the_server_returns_loads_anything_from_outside(network_server):
    """Every GET endpoint without path parameters that the API lists, and every page MONAI Label
    had: no HTML or text answer names a URL of another host."""
    (schema,) = network_server["call"]([{"method": "GET", "path": "/openapi.json", "token": READER_TOKEN}])
    paths = [p for p, ops in schema["body"]["paths"].items() if "get" in ops and "{" not in p]
    pages = [
        "/",
        "/docs",
        "/redoc",
        "/logs/",
        "/logs/?html=true",
        "/ohif/",
        "/ohif/index.html",
        "/static/ohif/index.html",
    ]
    answers = network_server["call"](
        [{"method": "GET", "path": p, "token": OPERATOR_TOKEN} for p in sorted({*paths, *pages})]
    )
    assert "/info/" in paths and "/datastore/" in paths
    served_pages = 0
    for answer in answers:
        text = answer["body"] if isinstance(answer["body"], str) else ""
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.IGNORECASE), text[:500]
        served_pages += answer["content_type"].startswith("text/html")
    assert served_pages >= 1  # the home page at least
    (home,) = network_server["call"]([{"method": "GET", "path": "/", "token": READER_TOKEN}])
    assert "classifier_2d" in home["body"] and "<script" not in home["body"]


def test_tokens_are_never_logged(network_server):
    network_server["call"]([{"method": "GET", "path": "/logs/", "token": READER_TOKEN}])  # a refusal is logged
    log = network_server["server"].log()
    assert "refused GET /logs/" in log
    for token in (READER_TOKEN, OPERATOR_TOKEN):
        assert token not in log


# ------------------------------------------------------------------------------------------------
# no start beyond loopback without tokens
# ------------------------------------------------------------------------------------------------


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    return errors[0]


def test_the_server_refuses_to_listen_beyond_loopback_without_tokens(tmp_path):
    """Each launcher: ``monai-sal serve --host``, ``monailabel start_server`` (whose default is
    0.0.0.0) and ``uvicorn --host`` on an address that is not loopback (in the namespace, where
    there is one)."""
    model_dir, studies, _ = _models_and_studies(tmp_path)
    app = write_app_folder(tmp_path / "app")
    env = {k: v for k, v in os.environ.items() if k not in TOKENS_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), str(app)) if p)
    cli = [sys.executable, "-m", "monai_sal_app.cli", "serve", "--data", "none", "--workdir", str(app)]
    cli += ["--studies", str(studies), "--model-dir", str(model_dir), "--host", "0.0.0.0"]
    monailabel = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies)]
    monailabel += ["--conf", "model_dir", str(model_dir), "--port", "0"]
    inside = network_namespace.available()
    address = network_namespace.ADDRESS if inside else "0.0.0.0"
    uvicorn = [*(network_namespace.wrapper() if inside else ()), sys.executable, "-m", "uvicorn", "monailabel.app:app"]
    uvicorn += ["--host", address, "--port", "0"]
    uvicorn_env = {**env, "MONAI_LABEL_APP_DIR": str(app), "MONAI_LABEL_STUDIES": str(studies)}
    uvicorn_env["MONAI_LABEL_APP_CONF"] = f'{{"model_dir": "{model_dir}"}}'
    for command, environment, host in (
        (cli, env, "0.0.0.0"),
        (monailabel, env, "0.0.0.0"),
        (uvicorn, uvicorn_env, address),
    ):
        done = subprocess.run(command, env=environment, cwd=tmp_path, capture_output=True, text=True, timeout=240)
        line = _one_error_line(done)
        assert f"refusing to listen on {host}" in line and "MONAI_SAL_OPERATOR_TOKEN" in line, line
    assert not (app / "data").exists()  # serve refused before preparing anything

    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(f"reader={READER_TOKEN}\noperator={OPERATOR_TOKEN}\n")
    tokens_file.chmod(0o644)
    done = subprocess.run(
        [*cli, "--tokens-file", str(tokens_file)], env=env, capture_output=True, text=True, timeout=240
    )
    assert "readable by other users" in _one_error_line(done)


def test_tokens_file_and_environment_are_read_and_checked(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"# the server's tokens\nreader = {READER_TOKEN}\noperator={OPERATOR_TOKEN}\n")
    path.chmod(0o600)
    tokens = AccessTokens.from_settings({"tokens_file": str(path)}, environ={})
    assert (tokens.reader, tokens.operator) == (READER_TOKEN, OPERATOR_TOKEN)
    assert READER_TOKEN not in repr(tokens) and OPERATOR_TOKEN not in repr(tokens)
    assert tokens.role_of(READER_TOKEN) == READER and tokens.role_of(OPERATOR_TOKEN) == OPERATOR
    assert tokens.role_of(READER_TOKEN[:-1]) is None and tokens.role_of("") is None
    assert AccessTokens.from_settings({}, environ=TOKENS_ENV) == tokens
    assert not AccessTokens.from_settings({}, environ={}).enabled
    for content, message in (
        ("reader=short\n", "at least 16"),
        (f"reader={READER_TOKEN}\noperator={READER_TOKEN}\n", "must differ"),
        (f"viewer={READER_TOKEN}\n", "line 1"),
        (f"reader={READER_TOKEN}\nreader={OPERATOR_TOKEN}\n", "line 2"),
    ):
        path.write_text(content)
        with pytest.raises(ValueError, match=message):
            AccessTokens.from_settings({"tokens_file": str(path)}, environ={})
    with pytest.raises(ValueError, match="not both"):
        AccessTokens.from_settings({"tokens_file": str(path)}, environ=TOKENS_ENV)
    with pytest.raises(ValueError, match="cannot read"):
        AccessTokens.from_settings({"tokens_file": str(tmp_path / "missing")}, environ={})


def test_where_the_server_may_listen_without_tokens():
    for host in ("127.0.0.1", "127.0.0.53", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
        check_listen_address(host, AccessTokens())
    for host in ("0.0.0.0", "::", "", "10.23.0.1", "192.0.2.7", "no-such-host.invalid"):
        assert not is_loopback(host), host
        with pytest.raises(ValueError, match="without authentication"):
            check_listen_address(host, AccessTokens())
        check_listen_address(host, AccessTokens(reader=READER_TOKEN, operator=OPERATOR_TOKEN))
    assert launcher_listen_host(["/venv/bin/monailabel", "start_server", "--app", "a"]) == "0.0.0.0"
    assert launcher_listen_host(["/venv/bin/monailabel", "start_server", "-i", "127.0.0.1"]) == "127.0.0.1"
    assert launcher_listen_host(["/venv/lib/uvicorn/__main__.py", "monailabel.app:app"]) == "127.0.0.1"
    assert launcher_listen_host(["/venv/bin/uvicorn", "monailabel.app:app", "--host", "0.0.0.0"]) == "0.0.0.0"
    assert launcher_listen_host(["/venv/bin/monai-sal", "serve", "--host", "0.0.0.0"]) is None  # checked by serve


def test_without_tokens_a_request_from_another_address_is_refused():
    """The access control alone (a stand-in for a launcher that the start check does not know),
    on a FastAPI app, with Starlette's test client posing as a loopback and a remote client."""
    app = FastAPI()
    app.get("/info/")(lambda: {"ok": True})
    app.add_middleware(AccessControl, tokens=AccessTokens())
    assert TestClient(app, client=("127.0.0.1", 50000)).get("/info/").status_code == 200
    remote = TestClient(app, client=("192.0.2.7", 50000)).get("/info/")
    assert remote.status_code == 403 and "only on loopback" in remote.json()["detail"]


def test_endpoints_a_later_monailabel_adds_need_the_operator():
    assert required_role("GET", "/info/") == READER
    assert required_role("POST", "/infer/any_model") == READER
    assert required_role("DELETE", "/datastore/image") == OPERATOR
    assert required_role("GET", "/some/new/endpoint") == OPERATOR
    assert required_role("POST", "/infer/a/b") == OPERATOR


# ------------------------------------------------------------------------------------------------
# no orphaned work; scoring at start only after a change
# ------------------------------------------------------------------------------------------------


def _task_started(url: str) -> bool:
    """Whether the scoring task's output says that the app in it is up (the last lines of a task's
    output are in its status)."""
    status = requests.get(f"{url}/scoring/", timeout=30)
    return status.status_code == 200 and any(
        "serving classifier_3d" in line for line in status.json().get("details") or []
    )


def _task_processes(server_pid: int) -> list[psutil.Process]:
    try:
        children = psutil.Process(server_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [p for p in children if TASK_MODULE in " ".join(_cmdline(p))]


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return []


def _ended(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_a_scoring_run_ends_with_the_server(tmp_path, signum):
    """SIGTERM and SIGINT: the server ends its task processes as it stops; SIGKILL: the kernel
    ends them (they asked to be told when the server goes). The datastore holds 32 more volumes
    and the run explains them by occlusion, so that, left alone, it would go on for about a minute
    (measured: 1.75 s per volume on one core) after the server ended."""
    model_dir, studies, _ = _models_and_studies(tmp_path)
    for seed in range(SCORED_VOLUMES):
        write_nifti(smooth_field((16, 16, 16), seed=seed), studies / f"volume_{seed:02d}.nii.gz")
    server = start_background_server(
        studies,
        conf={"model_dir": str(model_dir), "models": "classifier_3d"},
        workdir=tmp_path / "run",
        extra_env={"OMP_NUM_THREADS": "1", "MONAI_LABEL_AUTO_UPDATE_SCORING": "false"},
        timeout=240,
    )
    tasks = []
    try:
        run = {"replace": True, "methods": ["occlusion"], "checks": ["randomization"]}
        started = requests.post(f"{server.url}/scoring/trust", json=run, timeout=60)
        assert started.status_code == 200, started.text
        deadline = time.monotonic() + 120
        while not _task_started(server.url) and time.monotonic() < deadline:  # past its imports, working
            time.sleep(0.25)
        tasks = _task_processes(server.pid)
        assert tasks, "no scoring process is running"
        server.process.send_signal(signum)
        server.process.wait(timeout=60)
        deadline = time.monotonic() + ENDS_WITHIN_S
        while not all(_ended(p) for p in tasks) and time.monotonic() < deadline:
            time.sleep(0.25)
        left = [(p.pid, _cmdline(p)) for p in tasks if not _ended(p)]
        assert not left, left
    finally:
        for process in tasks:
            if not _ended(process):
                process.kill()
        server.stop()


def test_scoring_runs_at_start_only_after_a_checkpoint_or_the_datastore_changed(tmp_path):
    model_dir, studies, _ = _models_and_studies(tmp_path, card=True)
    card_written = trust_card_path(model_dir / "classifier_2d.pt").stat().st_mtime

    def scoring_at_start() -> bool:
        server = start_background_server(
            studies, conf={"model_dir": str(model_dir)}, workdir=tmp_path / "run", extra_env={"OMP_NUM_THREADS": "1"}
        )
        try:
            status = requests.get(f"{server.url}/scoring/", timeout=30)
            assert status.status_code in (200, 404), status.text
            return status.status_code == 200  # 404: "No Scoring Tasks Found"
        finally:
            server.stop()

    assert not scoring_at_start()  # the card is newer than the weights and every datastore file
    later = card_written + 5
    os.utime(studies / "xray_png.png", (later, later))
    assert scoring_at_start()  # a datastore image changed
    os.utime(studies / "xray_png.png", (card_written - 5, card_written - 5))
    os.utime(trust_card_path(model_dir / "classifier_2d.pt"), (card_written, card_written))
    os.utime(model_dir / "classifier_2d.pt", (later, later))
    assert scoring_at_start()  # the weights changed
