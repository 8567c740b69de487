"""The vendor's own ``aliyun-python-sdk-core``, unmodified, against the local gateway's
POP RPC: FileTrans SubmitTask/GetTaskResult written as in the documentation's sample
(seed 000, with the domain and protocol pointed at the gateway) and CreateToken.

The SDK blocks, so the gateway runs in a background thread; the test waits for the task
on the gateway's loop (bounded) instead of sleeping between polls.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
from helpers import AK_ID, AK_SECRET, APPKEY, FIXTURES, TRANSCRIPTS, word_errors

from nlsstream.gateway import Gateway, GatewayThread
from nlsstream.gateway.engine import sphinx_available

acs_client = pytest.importorskip("aliyunsdkcore.client")
acs_request = pytest.importorskip("aliyunsdkcore.request")
acs_exceptions = pytest.importorskip("aliyunsdkcore.acs_exception.exceptions")

pytestmark = pytest.mark.skipif(not sphinx_available(), reason="needs pocketsphinx")

TIMEOUT = 60.0


@pytest.fixture
def running() -> Iterator[GatewayThread]:
    gw = Gateway(appkeys=[APPKEY], access_keys={AK_ID: AK_SECRET}, tokens=["tok-1"])
    thread = gw.run_in_thread()
    with thread:
        yield thread


def domain(gw: Gateway) -> str:
    return gw.http_url.removeprefix("http://")


def wait_done(thread: GatewayThread, task_id: str) -> None:
    """Block until the gateway finished the task (on its own loop), at most TIMEOUT."""
    gw, loop = thread.gateway, thread.loop
    assert gw.files is not None and loop is not None
    done = gw.files.tasks[task_id].done
    future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(done.wait(), TIMEOUT), loop)
    future.result(TIMEOUT + 5)


def test_filetrans_as_in_the_documentation_sample(running: GatewayThread) -> None:
    gw = running.gateway
    # The constant parameters (the sample's), the domain and protocol pointed at the gateway.
    REGION_ID = "cn-shanghai"
    PRODUCT = "nls-filetrans"
    DOMAIN = domain(gw)
    API_VERSION = "2018-08-17"
    client = acs_client.AcsClient(AK_ID, AK_SECRET, REGION_ID)
    postRequest = acs_request.CommonRequest()
    postRequest.set_domain(DOMAIN)
    postRequest.set_version(API_VERSION)
    postRequest.set_product(PRODUCT)
    postRequest.set_action_name("SubmitTask")
    postRequest.set_method("POST")
    postRequest.set_protocol_type("http")
    fileLink = (FIXTURES / "two_channel.flac").as_uri()
    task = {"appkey": APPKEY, "file_link": fileLink, "version": "4.0", "enable_words": False}
    task = json.dumps(task)
    postRequest.add_body_params("Task", task)
    postResponse = json.loads(client.do_action_with_exception(postRequest))
    assert postResponse["StatusText"] == "SUCCESS"
    taskId = postResponse["TaskId"]

    wait_done(running, taskId)
    getRequest = acs_request.CommonRequest()
    getRequest.set_domain(DOMAIN)
    getRequest.set_version(API_VERSION)
    getRequest.set_product(PRODUCT)
    getRequest.set_action_name("GetTaskResult")
    getRequest.set_method("GET")
    getRequest.set_protocol_type("http")
    getRequest.add_query_param("TaskId", taskId)
    getResponse = json.loads(client.do_action_with_exception(getRequest))
    assert getResponse["StatusText"] == "SUCCESS" and getResponse["TaskId"] == taskId
    sentences = getResponse["Result"]["Sentences"]
    for channel, expected in enumerate(TRANSCRIPTS["two_channel.flac"]):
        (text,) = [s["Text"] for s in sentences if s["ChannelId"] == channel]
        assert word_errors(expected, text) <= 1, (expected, text)


def test_wrong_secret_is_a_server_exception(running: GatewayThread) -> None:
    client = acs_client.AcsClient(AK_ID, "not-the-secret", "cn-shanghai")
    request = acs_request.CommonRequest()
    request.set_domain(domain(running.gateway))
    request.set_version("2018-08-17")
    request.set_product("nls-filetrans")
    request.set_action_name("GetTaskResult")
    request.set_method("GET")
    request.set_protocol_type("http")
    request.add_query_param("TaskId", "0" * 32)
    with pytest.raises(acs_exceptions.ServerException) as info:
        client.do_action_with_exception(request)
    assert info.value.get_error_code() == "SignatureDoesNotMatch"
    assert info.value.get_http_status() == 400


def test_create_token_as_the_token_documentation_shows(running: GatewayThread) -> None:
    gw = running.gateway
    client = acs_client.AcsClient(AK_ID, AK_SECRET, "cn-shanghai")
    request = acs_request.CommonRequest()
    request.set_method("POST")
    request.set_domain(domain(gw))
    request.set_version("2019-02-28")
    request.set_action_name("CreateToken")
    request.set_protocol_type("http")
    response = json.loads(client.do_action_with_exception(request))
    token = response["Token"]["Id"]
    assert token and response["Token"]["ExpireTime"] > 0
    # The gateway accepts its own tokens on /ws/v1 (it was started with another one).
    from websockets.sync.client import connect

    with connect(gw.url, additional_headers={"X-NLS-Token": token}, open_timeout=10) as ws:
        assert ws.protocol.state.name == "OPEN"
