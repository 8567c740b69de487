#!/usr/bin/env bash
# Install nlsstream with its test extras into .venv, then run ruff, mypy and pytest.
# This is the README's test command; CI runs it through .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# A venv is (re)installed only when what decides its contents changed since its last
# install: pyproject.toml, the pinned lowest versions or this script. The installs are
# editable, so code changes need none, and pip takes 5-15 s per venv to rebuild an
# editable install even when nothing changed. (Delete a venv to force a fresh one.)
STAMP=$(cat pyproject.toml scripts/lowest-versions.txt scripts/test.sh | sha256sum | cut -d' ' -f1)
current() { [ "$(cat "$1/nlsstream-installed" 2>/dev/null)" = "$STAMP" ]; }
installed() { echo "$STAMP" >"$1/nlsstream-installed"; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
if ! current .venv; then
    pip install -e '.[dev,local,light]'
    # The official SDK is installed for the compatibility tests only. Its matplotlib/oss2
    # requirements are never imported, so it goes in without them; the one module it does
    # import (aliyunsdkcore) is installed explicitly.
    pip install --no-deps 'alibabacloud-nls-python-sdk==1.0.2'
    pip install 'aliyun-python-sdk-core>=2.13.3'
    installed .venv
fi
# Fail loudly (not skip) if an optional test dependency did not install.
.venv/bin/python -c "import nls, pocketsphinx, picows, python_socks.async_.asyncio"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
# Tests mostly wait (on gateways, real-time audio, timeouts): three workers on two cores
# take about 60 % of the time of one. NLSSTREAM_TEST_WORKERS=0 runs them in this process.
WORKERS=(-n "${NLSSTREAM_TEST_WORKERS:-3}")
.venv/bin/python -m pytest -q "${WORKERS[@]}" "$@"
# The lowest versions the project declares: the client, the audio path and the full
# gateway against them (scripts/lowest-versions.txt).
[ -x .venv-lowest/bin/python ] || "$PY" -m venv .venv-lowest
if ! current .venv-lowest; then
    .venv-lowest/bin/python -m pip --disable-pip-version-check -q install -c \
        scripts/lowest-versions.txt -e '.[files,local,otel,proxy,uvloop]' 'pytest>=8' \
        'pytest-asyncio>=0.24' 'pytest-xdist>=3.8' opentelemetry-sdk
    installed .venv-lowest
fi
.venv-lowest/bin/python -m pip list 2>/dev/null |
    grep -E '^(websockets|numpy|soundfile|soxr|python-socks|aiohttp|pocketsphinx|uvloop|opentelemetry-api|opentelemetry-sdk) '
.venv-lowest/bin/python -m pytest -q "${WORKERS[@]}" -p no:cacheprovider tests/test_audio.py \
    tests/realtime/test_connection.py tests/realtime/test_session.py \
    tests/realtime/test_session_errors.py tests/realtime/test_pacing.py \
    tests/realtime/test_protocol.py tests/realtime/test_resume.py \
    tests/realtime/test_latency.py tests/realtime/test_telemetry.py \
    tests/gateway/test_gateway.py tests/gateway/test_gateway_faults.py \
    tests/gateway/test_gateway_validation.py tests/recordings/test_files.py
# The light gateway on the lowest picows (its own venv: see scripts/lowest-versions.txt).
[ -x .venv-lowest-light/bin/python ] || "$PY" -m venv .venv-lowest-light
if ! current .venv-lowest-light; then
    .venv-lowest-light/bin/python -m pip --disable-pip-version-check -q install \
        'picows==2.3.0' -e '.[local,light]' 'pytest>=8' 'pytest-asyncio>=0.24' 'pytest-xdist>=3.8'
    installed .venv-lowest-light
fi
.venv-lowest-light/bin/python -m pytest -q "${WORKERS[@]}" -p no:cacheprovider tests/gateway/test_light_gateway.py \
    tests/gateway/test_gateway_rules.py
