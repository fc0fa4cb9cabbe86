"""Property-based API testing: schemathesis generates requests from the running server's /openapi.json.

Every operation gets up to EXAMPLES generated requests (valid ones and edge cases the schema allows: huge
numbers, empty strings, odd unicode, missing optional fields); whatever they are, the server must answer with
a 2xx or a 4xx that explains the problem, never a 5xx. A tiny model and a small --max-model-len keep each
generation short, so the whole run stays around a minute.
"""

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from test_chat_repl import tiny_model_folder

from lmforge.serve.process import start_server, stop_server

pytestmark = pytest.mark.slow

EXAMPLES = 150  # per operation; the GET operations without inputs need one, the POST bodies use them all
MIN_REQUESTS = 500
KEY = "schema-key"


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    folder = tiny_model_folder(tmp_path_factory.mktemp("schema") / "model", block_size=64)
    proc, url = start_server(
        folder, "--api-key", KEY, "--max-model-len", "32", "--max-queue", "256", "--log-level", "warning"
    )
    yield url
    stop_server(proc)


def test_no_server_errors(server_url):
    """One hypothesis run per operation of the schema (schemathesis's pytest plugin does not load under pytest 9,
    so the strategies are driven directly); every response must be < 500 and at least MIN_REQUESTS are sent."""
    schema = schemathesis.openapi.from_url(server_url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    model_id = httpx.get(server_url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]["id"]
    sent: dict[str, list[int]] = {}
    errors: list[str] = []

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        def check(case):
            # A random model name only ever meets the 404 for unknown models: every body names the served model,
            # so the rest of the request (prompts, messages, sampling settings, formats) reaches generation.
            if isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = model_id
            response = case.call(base_url=server_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
            sent.setdefault(case.operation.label, []).append(response.status_code)
            if response.status_code >= 500:
                errors.append(
                    f"{case.operation.label} answered {response.status_code}: {response.text[:300]}\n"
                    f"reproduce with: {case.as_curl_command()}"
                )

        check()

    assert not errors, f"{len(errors)} server errors, the first ones:\n" + "\n".join(errors[:5])
    total = sum(map(len, sent.values()))
    assert total >= MIN_REQUESTS, f"only {total} requests: { {k: len(v) for k, v in sent.items()} }"
    assert any("chat/completions" in label for label in sent), sent
    # The generated requests reach generation, not only validation errors.
    assert any(
        200 <= status < 300 for label, statuses in sent.items() if "completions" in label for status in statuses
    ), sent
