"""streaming.py, with NVFlare's own configuration reader, in a fresh process each: what a process of the job reads
for its streams once the component is built, and that a system's own settings still win."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, venv_env
from streaming import SETTINGS

READ = """
import json, sys
from nvflare.fuel.f3.comm_config import CommConfigurator
from streaming import SlowLinkStreaming
c = CommConfigurator()
if sys.argv[1] == "read first":  # as a server's job process that streamed before it built the job's components
    c.get_streaming_window_size(-1), c.get_streaming_retry_wait(-1), c.get_streaming_send_timeout(30.0)
SlowLinkStreaming()
print(json.dumps({
    "streaming_window_size": c.get_streaming_window_size(-1),
    "streaming_ack_interval": c.get_streaming_ack_interval(-1),
    "streaming_retry_wait": c.get_streaming_retry_wait(-1),
    "streaming_retry_timeout": c.get_streaming_retry_timeout(-1),
    "streaming_ack_progress_timeout": c.get_streaming_ack_progress_timeout(-1),
    "streaming_send_timeout": c.get_streaming_send_timeout(-1),
}))
"""


def read_settings(when: str = "built first", **env) -> dict:
    result = subprocess.run([sys.executable, "-c", READ, when], cwd=ROOT, env=venv_env(**env), capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("when", ["built first", "read first"])
def test_every_stream_of_a_process_with_the_component_uses_the_slow_link_settings(when):
    assert read_settings(when) == SETTINGS


def test_a_setting_the_system_gives_in_the_environment_wins():
    read = read_settings(NVFLARE_STREAMING_WINDOW_SIZE=str(64 * 2**20))
    assert read == {**SETTINGS, "streaming_window_size": 64 * 2**20}
