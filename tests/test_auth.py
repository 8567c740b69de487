"""Token providers: POP signature test vector and CreateToken against a local HTTP server.

The fake CreateToken service (``helpers.py``) re-computes every signature from the
parameters it receives with its own signer, so a wrong canonicalisation in nlsstream fails
these tests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time

import pytest
from helpers import AK_ID, AK_SECRET, FakeTokenService

from nlsstream.auth import (
    AccessKeyTokenProvider,
    RefreshableTokenProvider,
    StaticTokenProvider,
    Token,
    TokenProvider,
    as_provider,
    create_token,
    percent_encode,
    pop_signature,
    signed_params,
    string_to_sign,
    token_endpoint,
)
from nlsstream.errors import NlsError, TokenError

# ----------------------------------------------------------------------------------------
# §8.2 test vector

VECTOR = {
    "AccessKeyId": "my_access_key_id",
    "Action": "CreateToken",
    "Format": "JSON",
    "RegionId": "cn-shanghai",
    "SignatureMethod": "HMAC-SHA1",
    "SignatureNonce": "b924c8c3-6d03-4c5d-ad36-d984d3116788",
    "SignatureVersion": "1.0",
    "Timestamp": "2019-04-18T08:32:31Z",
    "Version": "2019-02-28",
}


def test_vector_string_to_sign() -> None:
    assert string_to_sign("GET", VECTOR) == (
        "GET&%2F&AccessKeyId%3Dmy_access_key_id%26Action%3DCreateToken%26Format%3DJSON"
        "%26RegionId%3Dcn-shanghai%26SignatureMethod%3DHMAC-SHA1%26SignatureNonce"
        "%3Db924c8c3-6d03-4c5d-ad36-d984d3116788%26SignatureVersion%3D1.0%26Timestamp"
        "%3D2019-04-18T08%253A32%253A31Z%26Version%3D2019-02-28"
    )


def test_vector_signatures_get_and_post() -> None:
    assert pop_signature("GET", VECTOR, "my_access_key_secret") == "hHq4yNsPitlfDJ2L0nQPdugdEzM="
    assert percent_encode(pop_signature("GET", VECTOR, "my_access_key_secret")) == (
        "hHq4yNsPitlfDJ2L0nQPdugdEzM%3D"
    )
    assert pop_signature("POST", VECTOR, "my_access_key_secret") == "X4/yeE8FUchC5Wv7AZJybEuDWzw="
    # aliyunsdkcore adds an empty SignatureType (docs/protocol.md §8.3)
    with_type = {**VECTOR, "SignatureType": ""}
    assert (
        pop_signature("POST", with_type, "my_access_key_secret") == "k6vIw2kExUY35EBusdXUa73pzzQ="
    )


def test_file_trans_vectors_use_the_same_signer() -> None:
    """docs/protocol.md §11.3: SubmitTask signs its Task wherever it travels."""
    common = {**VECTOR, "Version": "2018-08-17"}
    task = json.dumps(
        {
            "appkey": "your-appkey",
            "file_link": "https://gw.alipayobjects.com/os/bmw-prod/"
            "0574ee2e-f494-45a5-820f-63aee583045a.wav",
            "version": "4.0",
            "enable_words": False,
        }
    )
    submit = {**common, "Action": "SubmitTask", "Task": task}
    secret = "my_access_key_secret"
    assert pop_signature("POST", submit, secret) == "w3L6W50KAbvTLR0Co8fA3Q3eqdY="
    with_type = {**submit, "SignatureType": ""}
    assert pop_signature("POST", with_type, secret) == "JS1H60NcO7kgPjugTZKexYwg+TU="
    get = {**common, "Action": "GetTaskResult", "TaskId": "b505e78c4c6d11e9a213e11db149ffff"}
    assert pop_signature("GET", get, secret) == "Kf3Bv7iGG0zJVGJKsWltBR/h2k4="
    # signed_params is that signer with the common parameters filled in.
    params = signed_params(
        "GET",
        "id",
        secret,
        "GetTaskResult",
        region="cn-shanghai",
        version="2018-08-17",
        extra={"TaskId": "t"},
    )
    assert params["Signature"] == pop_signature("GET", params, secret)
    assert params["Action"] == "GetTaskResult" and params["TaskId"] == "t"


def test_signature_ignores_signature_param() -> None:
    signed = {**VECTOR, "Signature": "whatever"}
    assert pop_signature("GET", signed, "my_access_key_secret") == "hHq4yNsPitlfDJ2L0nQPdugdEzM="


def test_percent_encode_rules() -> None:
    assert percent_encode("a b*c~d/é+=") == "a%20b%2Ac~d%2F%C3%A9%2B%3D"


def test_token_endpoints() -> None:
    assert token_endpoint() == "https://nls-meta.cn-shanghai.aliyuncs.com/"
    assert token_endpoint("cn-beijing") == "https://nls-meta.cn-beijing.aliyuncs.com/"
    assert token_endpoint("ap-southeast-1") == "https://nlsmeta.ap-southeast-1.aliyuncs.com/"


# ----------------------------------------------------------------------------------------
# Static provider / contract


async def test_static_provider_and_as_provider() -> None:
    provider = as_provider("tok-123")
    assert isinstance(provider, StaticTokenProvider)
    assert isinstance(provider, TokenProvider)
    assert not isinstance(provider, RefreshableTokenProvider)
    assert await provider.get_token() == "tok-123"
    assert "tok-123" not in repr(provider)
    assert as_provider(provider) is provider


def test_access_key_provider_is_refreshable() -> None:
    provider = AccessKeyTokenProvider(AK_ID, AK_SECRET, endpoint="http://127.0.0.1:9/")
    assert isinstance(provider, RefreshableTokenProvider)
    assert AK_SECRET not in repr(provider)
    assert AK_ID not in repr(provider)  # only a prefix is shown


def test_token_repr_hides_value() -> None:
    assert "abc-secret-token" not in repr(Token("abc-secret-token", 1.0))


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        (("", AK_SECRET), {}),
        ((AK_ID, ""), {}),
        ((AK_ID, AK_SECRET), {"timeout": 0}),
        ((AK_ID, AK_SECRET), {"refresh_margin": -1}),
    ],
)
def test_provider_rejects_bad_arguments(args: tuple[str, str], kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        AccessKeyTokenProvider(*args, **kwargs)  # type: ignore[arg-type]


async def test_create_token_rejects_bad_endpoint() -> None:
    with pytest.raises(ValueError, match="http"):
        await create_token(AK_ID, AK_SECRET, endpoint="ftp://example.com/")


# ----------------------------------------------------------------------------------------
# A local CreateToken service


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


# ----------------------------------------------------------------------------------------
# The whole flow


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_create_token_signed_request_accepted(service: FakeTokenService, method: str) -> None:
    token = await create_token(AK_ID, AK_SECRET, endpoint=service.url, method=method)  # type: ignore[arg-type]
    assert token.value.startswith("token-1-")
    assert token.expire_time == pytest.approx(time.time() + service.lifetime, abs=5)
    [(seen_method, params)] = service.requests
    assert seen_method == method
    assert params["AccessKeyId"] == AK_ID
    assert params["RegionId"] == "cn-shanghai"
    assert AK_SECRET not in json.dumps(params)


async def test_region_is_sent(service: FakeTokenService) -> None:
    await create_token(AK_ID, AK_SECRET, "ap-southeast-1", endpoint=service.url)
    assert service.requests[0][1]["RegionId"] == "ap-southeast-1"


async def test_caching_second_call_makes_no_request(service: FakeTokenService) -> None:
    provider = AccessKeyTokenProvider(AK_ID, AK_SECRET, endpoint=service.url)
    first = await provider.get_token()
    second = await provider.get_token()
    assert first == second
    assert len(service.requests) == 1
    assert provider.requests == 1


async def test_refresh_before_expiry(service: FakeTokenService) -> None:
    service.lifetime = 1000
    clock = FakeClock()
    provider = AccessKeyTokenProvider(
        AK_ID, AK_SECRET, endpoint=service.url, refresh_margin=60, clock=clock
    )
    first = await provider.get_token()
    info = provider.cached
    assert info is not None
    # margin = max(60 s, 10 % of 1000 s) = 100 s: still cached 150 s before expiry ...
    clock.now = info.expire_time - 150
    assert await provider.get_token() == first
    assert len(service.requests) == 1
    # ... but refreshed 90 s before expiry, while the old token is still valid.
    clock.now = info.expire_time - 90
    second = await provider.get_token()
    assert second != first
    assert len(service.requests) == 2
    assert await provider.get_token() == second
    assert len(service.requests) == 2


async def test_short_lived_token_still_cached(service: FakeTokenService) -> None:
    # A 60 s margin on a 20 s token would mean "always refetch"; it is capped at half.
    service.lifetime = 20
    clock = FakeClock()
    provider = AccessKeyTokenProvider(AK_ID, AK_SECRET, endpoint=service.url, clock=clock)
    first = await provider.get_token()
    clock.now += 5
    assert await provider.get_token() == first
    clock.now += 10
    assert await provider.get_token() != first
    assert len(service.requests) == 2


async def test_concurrent_callers_share_one_request(service: FakeTokenService) -> None:
    service.delay = 0.2  # keep the first request in flight while the others arrive
    provider = AccessKeyTokenProvider(AK_ID, AK_SECRET, endpoint=service.url)
    tokens = await asyncio.gather(*(provider.get_token() for _ in range(50)))
    assert len(set(tokens)) == 1
    assert len(service.requests) == 1


async def test_cancelled_caller_does_not_cancel_shared_request(
    service: FakeTokenService,
) -> None:
    service.delay = 0.2
    provider = AccessKeyTokenProvider(AK_ID, AK_SECRET, endpoint=service.url)
    impatient = asyncio.ensure_future(provider.get_token())
    patient = asyncio.ensure_future(provider.get_token())
    await asyncio.sleep(0.05)
    impatient.cancel()
    token = await asyncio.wait_for(patient, 5)
    assert token.startswith("token-1-")
    assert len(service.requests) == 1


async def test_invalidate_forces_refresh_once(service: FakeTokenService) -> None:
    provider = AccessKeyTokenProvider(AK_ID, AK_SECRET, endpoint=service.url)
    old = await provider.get_token()
    provider.invalidate(old)
    new = await provider.get_token()
    assert new != old
    # other sessions report the same stale token: the fresh one is kept
    provider.invalidate(old)
    assert await provider.get_token() == new
    assert len(service.requests) == 2
    provider.invalidate()
    assert await provider.get_token() not in (old, new)
    assert len(service.requests) == 3


async def test_wrong_secret_maps_server_error(service: FakeTokenService) -> None:
    wrong = "definitely-wrong-secret"
    provider = AccessKeyTokenProvider(AK_ID, wrong, endpoint=service.url)
    with pytest.raises(TokenError) as info:
        await provider.get_token()
    exc = info.value
    assert isinstance(exc, NlsError)
    assert exc.code == "SignatureDoesNotMatch"
    assert exc.server_message == "Specified signature is not matched with our calculation."
    assert exc.http_status == 400
    assert exc.request_id and exc.request_id in str(exc)
    assert not exc.retryable
    assert "SignatureDoesNotMatch" in str(exc)
    assert wrong not in str(exc) and wrong not in repr(exc)
    assert provider.cached is None


async def test_unknown_access_key(service: FakeTokenService) -> None:
    with pytest.raises(TokenError) as info:
        await create_token("LTAIunknown", AK_SECRET, endpoint=service.url)
    assert info.value.code == "InvalidAccessKeyId.NotFound"
    assert info.value.http_status == 404
    assert not info.value.retryable


async def test_secret_echoed_by_server_is_redacted(
    service: FakeTokenService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="nlsstream")
    service.mode = "echo_secret"
    provider = AccessKeyTokenProvider(AK_ID, AK_SECRET, endpoint=service.url)
    with pytest.raises(TokenError) as info:
        await provider.get_token()
    assert "leaky server says ***" in str(info.value)
    for text in (str(info.value), repr(info.value), str(info.value.server_message), caplog.text):
        assert AK_SECRET not in text


@pytest.mark.parametrize(
    ("mode", "status", "code"),
    [
        ("error500", 500, "InternalError"),
        ("throttle", 400, "Throttling.User"),
        ("garbage", 502, None),
    ],
)
async def test_transient_server_errors_are_retryable(
    service: FakeTokenService, mode: str, status: int, code: str | None
) -> None:
    service.mode = mode
    with pytest.raises(TokenError) as info:
        await create_token(AK_ID, AK_SECRET, endpoint=service.url)
    assert info.value.http_status == status
    assert info.value.code == code
    assert info.value.retryable


async def test_failed_refresh_keeps_valid_cached_token(
    service: FakeTokenService, caplog: pytest.LogCaptureFixture
) -> None:
    service.lifetime = 1000
    clock = FakeClock()
    provider = AccessKeyTokenProvider(AK_ID, AK_SECRET, endpoint=service.url, clock=clock)
    first = await provider.get_token()
    info = provider.cached
    assert info is not None
    service.mode = "error500"
    clock.now = info.expire_time - 50  # due for refresh, still valid
    assert await provider.get_token() == first
    assert "refresh failed" in caplog.text
    clock.now = info.expire_time + 1  # expired: the failure surfaces
    with pytest.raises(TokenError):
        await provider.get_token()
    assert first not in caplog.text


async def test_failure_is_not_cached(service: FakeTokenService) -> None:
    service.mode = "error500"
    provider = AccessKeyTokenProvider(AK_ID, AK_SECRET, endpoint=service.url)
    with pytest.raises(TokenError):
        await provider.get_token()
    service.mode = "ok"
    assert (await provider.get_token()).startswith("token-1-")


async def test_timeout_on_server_that_never_answers() -> None:
    # A listening socket that is never accepted: TCP connects, no HTTP answer ever comes.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        provider = AccessKeyTokenProvider(
            AK_ID, AK_SECRET, endpoint=f"http://127.0.0.1:{port}/", timeout=0.3
        )
        with pytest.raises(TokenError) as info:
            await asyncio.wait_for(provider.get_token(), 5)
    assert info.value.retryable
    assert info.value.code is None
    assert AK_SECRET not in str(info.value)


async def test_connection_refused_is_retryable_token_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TokenError) as info:
        await create_token(AK_ID, AK_SECRET, endpoint=f"http://127.0.0.1:{port}/", timeout=2)
    assert info.value.retryable
    assert f"127.0.0.1:{port}" in str(info.value)
