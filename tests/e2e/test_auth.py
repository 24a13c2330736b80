"""The server is not open: a real `prefect server start` with PREFECT_SERVER_API_AUTH_STRING refuses
every API request without that string, from the HTTP API, the Python client, the CLI and the browser.

Its own small stack: the server alone (no pools, deployments or workers), on a free loopback port.
The full stack of test_operate.py runs with an auth string too: its workers, `prefect deploy`, `homer
serve` and the browser all get through with PREFECT_API_AUTH_STRING (or the UI's login).

    python -m pytest tests/e2e/test_auth.py -q
"""

from __future__ import annotations

import base64

import httpx
import pytest

from tests.e2e.conftest import Stack, log_in

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`prefect server start` with a random auth string, torn down by PID at module end."""
    stack = Stack(tmp_path_factory.mktemp("auth"))
    try:
        stack.start_server()
        yield stack
    finally:
        stack.close()


def basic(credentials: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()}


REQUESTS = [("GET", "/admin/version", None), ("POST", "/flow_runs/filter", {}), ("POST", "/work_pools/filter", {}),
            ("GET", "/work_pools/homer-pool", None), ("POST", "/deployments/filter", {})]


@pytest.mark.parametrize("method, path, body", REQUESTS, ids=[path for _, path, _ in REQUESTS])
def test_an_api_request_without_the_auth_string_is_refused(server, method, path, body):
    def call(headers: dict | None) -> httpx.Response:
        return httpx.request(method, f"{server.api_url}{path}", json=body, headers=headers, timeout=30)

    refused = {
        "no Authorization header": call(None),
        "a wrong string": call(basic(server.auth_string + "x")),
        "a user name before the string": call(basic(f"admin:{server.auth_string}")),
        "the string as a bearer token": call({"Authorization": f"Bearer {server.auth_string}"}),
        "a header that is not base64": call({"Authorization": "Basic %%%"}),
    }
    for what, response in refused.items():
        assert response.status_code == 401, f"{what}: {method} {path} -> {response.status_code} {response.text[:200]}"
        assert response.json() == {"exception_message": "Unauthorized"}, what
    allowed = call(basic(server.auth_string))
    # 404 for the pool that does not exist: the request got past authentication
    assert allowed.status_code == (404 if path.startswith("/work_pools/homer") else 200), allowed.text[:300]


def test_health_stays_open_for_probes(server):
    assert httpx.get(f"{server.api_url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{server.api_url}/ready", timeout=10).status_code == 200


def test_the_python_client_needs_the_string(server):
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.exceptions import PrefectHTTPStatusError

    for wrong in (None, "not-the-string"):
        with SyncPrefectClient(server.api_url, auth_string=wrong) as client:
            with pytest.raises(PrefectHTTPStatusError) as refused:
                client.read_work_pools()
            assert refused.value.response.status_code == 401
    with SyncPrefectClient(server.api_url, auth_string=server.auth_string) as client:
        assert client.read_work_pools() == []


def test_the_cli_needs_the_string(server):
    """`prefect` commands (what operators and `prefect deploy` run) with and without PREFECT_API_AUTH_STRING."""
    import subprocess

    from tests.e2e.conftest import PYTHON, REPO

    without = {k: v for k, v in server.env.items() if k != "PREFECT_API_AUTH_STRING"}
    for env in (without, {**server.env, "PREFECT_API_AUTH_STRING": "not-the-string"}):
        done = subprocess.run([PYTHON, "-m", "prefect", "work-pool", "create", "intruder", "--type", "process"], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert done.returncode != 0 and "401" in done.stdout + done.stderr, done.stdout + done.stderr
    output = server.cli("work-pool", "create", "homer-auth-check", "--type", "process")
    assert "Created work pool 'homer-auth-check'" in output, output
    names = [p["name"] for p in server.rest("POST", "/work_pools/filter", json={})]
    assert names == ["homer-auth-check"], "nothing created without the string"


def test_the_ui_asks_for_the_string_and_refuses_a_wrong_one(server, browser):
    """The UI's login page: a wrong string stays on it ("Authentication failed."), the right one opens the pages."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(f"{server.ui_url}/work-pools")  # not logged in: the UI sends us to its login page
    field = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "input[type=password]")))
    assert "/login" in browser.current_url
    field.send_keys("not-the-string", Keys.ENTER)
    wait.until(lambda d: "Authentication failed" in d.find_element(By.TAG_NAME, "body").text)
    assert "/login" in browser.current_url
    assert browser.execute_script("return localStorage.getItem('prefect-password')") is None

    log_in(browser, server)
    browser.get(f"{server.ui_url}/work-pools")
    wait.until(lambda d: "/login" not in d.current_url and "Work Pools" in d.find_element(By.TAG_NAME, "body").text)
    stored = browser.execute_script("return localStorage.getItem('prefect-password')")
    assert base64.b64decode(stored).decode() == server.auth_string  # what the UI sends as Basic credentials
