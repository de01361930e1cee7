"""NVFlare's streaming settings for slow links, set in every process of the job: the server's, each site's NVFlare
client and, through its environment, the trainer that client starts.

NVFlare streams a message in chunks of 1 MiB and, by default, sends up to 64 MiB of them before it waits for the
receiver's acknowledgement, which comes every 4 MiB or at the end of a message. A chunk not acknowledged within 5 s
is sent again, and a stream whose chunk is still not acknowledged 60 s after its first retry fails. Over a slow link
the acknowledgements are late: chunks go again and again, taking the link from the data, and a large tensor's
download fails ("Received duplicate chunk 0", "retry failed after 60 s"), in NVFlare's stock job too.

With the settings below no more than WINDOW bytes are on their way at once, each chunk is acknowledged as it arrives,
and a chunk goes again only after RETRY_WAIT: so a site whose share of the server's link is at least
WINDOW / RETRY_WAIT (0.28 Mbit/s) sends nothing twice, and a link that stops moving fails a transfer within
RETRY_WAIT + RETRY_TIMEOUT (6 minutes). With flare_ddp's pieces of 2 MiB, one request of NVFlare's download moves at
most 2 MiB, well within its 600 s timeouts at that rate.

NVFlare reads these from the process's comm_config.json or its NVFLARE_<NAME> environment variables, not from a job.
This component sets the environment variables where they are not set yet, in the process that builds it (which is
before that process streams anything); a comm_config.json of the system's own still has the last word."""

import os

from nvflare.apis.fl_component import FLComponent
from nvflare.fuel.utils.config_service import ConfigService

CHUNK = 2**20  # NVFlare's streaming chunk (its default)
WINDOW = 2 * CHUNK  # bytes a stream sends before it waits for an acknowledgement (NVFlare: 64 MiB)
RETRY_WAIT = 120.0  # seconds before an unacknowledged chunk goes again (NVFlare: 5)
RETRY_TIMEOUT = 300.0  # seconds of retries before the stream fails (NVFlare: 60)
SETTINGS = {
    "streaming_window_size": WINDOW,
    "streaming_ack_interval": CHUNK,  # acknowledge every chunk (NVFlare: 4 MiB)
    "streaming_retry_wait": RETRY_WAIT,
    "streaming_retry_timeout": RETRY_TIMEOUT,
    # A stream that waits on a full window fails when no acknowledgement came for this long (NVFlare: 60 s).
    "streaming_ack_progress_timeout": RETRY_WAIT + RETRY_TIMEOUT,
}


class SlowLinkStreaming(FLComponent):
    """Sets SETTINGS in this process's environment, where neither the environment nor NVFlare already has them."""

    def __init__(self):
        super().__init__()
        read = ConfigService.get_var_values()  # what this process has read already, and keeps
        late = {name: read[name] for name, value in SETTINGS.items() if name in read and read[name] != value}
        for name, value in SETTINGS.items():
            os.environ.setdefault(f"NVFLARE_{name.upper()}", str(value))
        if late:
            self.logger.warning(f"streaming settings read before this job could set them, kept as they are: {late}")
        else:
            self.logger.info(f"streaming settings for slow links: {SETTINGS}, unless the system sets them")
