"""Settings.from_env: which variables give which URL, appkey and token provider."""

from __future__ import annotations

import pytest

from nlsstream.auth import AccessKeyTokenProvider, StaticTokenProvider
from nlsstream.config import DEFAULT_URL, ConfigurationError, Settings, gateway_url
from nlsstream.errors import NlsError


def test_default_url_is_the_official_sdks_default() -> None:
    assert DEFAULT_URL == "wss://nls-gateway.cn-shanghai.aliyuncs.com/ws/v1"


def test_empty_environment() -> None:
    s = Settings.from_env({})
    assert s.url == DEFAULT_URL
    assert s.appkey is None
    assert s.token_provider is None
    assert not s.has_credentials
    assert not s.cloud_configured
    with pytest.raises(ConfigurationError, match=r"NLS_APPKEY.*NLS_TOKEN"):
        s.require_cloud()


async def test_static_token() -> None:
    s = Settings.from_env({"NLS_TOKEN": "tok-abc", "NLS_APPKEY": "app1"})
    assert isinstance(s.token_provider, StaticTokenProvider)
    assert await s.token_provider.get_token() == "tok-abc"
    assert s.appkey == "app1"
    assert s.cloud_configured
    s.require_cloud()
    assert "tok-abc" not in repr(s)


def test_access_key_pair() -> None:
    env = {"ALIYUN_AK_ID": "LTAIid", "ALIYUN_AK_SECRET": "the-secret", "NLS_APPKEY": "app"}
    s = Settings.from_env(env)
    assert isinstance(s.token_provider, AccessKeyTokenProvider)
    assert s.token_provider.endpoint == "https://nls-meta.cn-shanghai.aliyuncs.com/"
    assert s.cloud_configured
    assert "the-secret" not in repr(s)


def test_token_wins_over_access_key() -> None:
    env = {"NLS_TOKEN": "tok", "ALIYUN_AK_ID": "id", "ALIYUN_AK_SECRET": "secret"}
    assert isinstance(Settings.from_env(env).token_provider, StaticTokenProvider)


def test_standard_alibaba_cloud_names() -> None:
    env = {"ALIBABA_CLOUD_ACCESS_KEY_ID": "id", "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "secret"}
    assert isinstance(Settings.from_env(env).token_provider, AccessKeyTokenProvider)


@pytest.mark.parametrize(
    ("env", "missing"),
    [
        ({"ALIYUN_AK_ID": "id"}, "ALIYUN_AK_SECRET"),
        ({"ALIYUN_AK_SECRET": "secret-value"}, "ALIYUN_AK_ID"),
        ({"ALIYUN_AK_ID": "id", "ALIYUN_AK_SECRET": "  "}, "ALIYUN_AK_SECRET"),
    ],
)
def test_half_configured_access_key_is_an_error(env: dict[str, str], missing: str) -> None:
    with pytest.raises(ConfigurationError, match=f"{missing} is not") as info:
        Settings.from_env(env)
    assert isinstance(info.value, NlsError)
    assert "secret-value" not in str(info.value)


def test_empty_values_count_as_unset() -> None:
    s = Settings.from_env({"NLS_TOKEN": "", "NLS_URL": " ", "NLS_APPKEY": ""})
    assert s.token_provider is None
    assert s.url == DEFAULT_URL
    assert s.appkey is None


def test_url_override_and_validation() -> None:
    assert Settings.from_env({"NLS_URL": "ws://127.0.0.1:8765/ws/v1"}).url == (
        "ws://127.0.0.1:8765/ws/v1"
    )
    with pytest.raises(ConfigurationError, match="NLS_URL"):
        Settings.from_env({"NLS_URL": "https://example.com/ws/v1"})


def test_region_sets_gateway_and_token_endpoint() -> None:
    env = {"NLS_REGION": "ap-southeast-1", "ALIYUN_AK_ID": "id", "ALIYUN_AK_SECRET": "s"}
    s = Settings.from_env(env)
    assert s.region == "ap-southeast-1"
    assert s.url == "wss://nls-gateway-ap-southeast-1.aliyuncs.com/ws/v1"
    assert isinstance(s.token_provider, AccessKeyTokenProvider)
    assert s.token_provider.endpoint == "https://nlsmeta.ap-southeast-1.aliyuncs.com/"
    assert gateway_url("cn-beijing") == "wss://nls-gateway-cn-beijing.aliyuncs.com/ws/v1"


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "NLS_TOKEN",
        "ALIYUN_AK_ID",
        "ALIYUN_AK_SECRET",
        "ALIBABA_CLOUD_ACCESS_KEY_ID",
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET",
        "NLS_URL",
        "NLS_REGION",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NLS_APPKEY", "from-os-environ")
    assert Settings.from_env().appkey == "from-os-environ"


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(AttributeError):
        s.url = "ws://x"  # type: ignore[misc]


def test_the_access_key_is_kept_for_file_trans_but_never_shown() -> None:
    env = {"ALIYUN_AK_ID": "LTAIid", "ALIYUN_AK_SECRET": "s3cret-v4lue", "NLS_TOKEN": "tok"}
    s = Settings.from_env(env)
    assert s.access_key == ("LTAIid", "s3cret-v4lue")  # even with NLS_TOKEN for tokens
    assert isinstance(s.token_provider, StaticTokenProvider)
    assert "s3cret-v4lue" not in repr(s)
    assert Settings.from_env({"NLS_TOKEN": "tok"}).access_key is None
