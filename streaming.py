"""NVFlare's streaming settings for slow links, set in every process of the job: the server's, each site's NVFlare
client and, through its environment, the trainer that client starts.

NVFlare streams a message in chunks of 1 MiB and, by default, sends up to 64 MiB of them before it waits for the
receiver's acknowledgement, which comes every 4 MiB or at the end of a message. A chunk not acknowledged within 5 s
is sent again, and a stream whose chunk is still not acknowledged 60 s after its first retry fails. Over a slow link
the acknowledgements are late: chunks go again and again, taking the link from the data, and a large tensor's
download fails ("Received duplicate chunk 0", "retry failed after 60 s"), in NVFlare's stock job too.

With the settings below no more than WINDOW bytes are on their way at once, each chunk is acknowledged as it arrives,
a chunk goes again only after RETRY_WAIT, and a connection is closed only when a chunk could not go into it within
RETRY_WAIT: so a site whose share of the server's link is at least WINDOW / RETRY_WAIT (0.14 Mbit/s) sends nothing
twice, and a link that stops moving fails a transfer within
RETRY_WAIT + RETRY_TIMEOUT (7 minutes; by design, not yet seen in a run). With flare_ddp's pieces of 8 MiB, one
request of NVFlare's download moves at most 8 MiB, within its 600 s timeouts at that rate.

NVFlare reads these from the process's comm_config.json or its NVFLARE_<NAME> environment variables, not from a job,
and keeps what it has read. This component, built in the server's job process and in each site's, sets the
environment variables there, and replaces what the process has read already (NVFlare's defaults: a server's job
process was seen to stream before it built the job's components); a setting that the system gives in the
environment or in comm_config.json stays as it is. The send timeout is read as each connection is made: a connection
made before this component (a site's first one to the server; on a real system, those the system made before the
job) keeps the system's own (docs/performance.md, Slow links)."""

import os

from nvflare.apis.fl_component import FLComponent
from nvflare.fuel.f3.comm_config import CommConfigurator
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
    # How long one frame (a chunk) may take to go into a connection's socket before NVFlare closes the connection,
    # failing every stream on it (NVFlare: 30 s; read as each connection is made). A chunk behind a window's worth
    # of bytes waits for them to cross: at 0.3 Mbit/s, a site's share of a 0.6 Mbit/s link, more than 30 s.
    "streaming_send_timeout": RETRY_WAIT,
}


class SlowLinkStreaming(FLComponent):
    """Sets SETTINGS for this process, except those its system sets itself (in the environment or comm_config.json)."""

    def __init__(self):
        super().__init__()
        system = CommConfigurator().config or {}  # this process's comm_config.json
        read = ConfigService.get_var_values()  # what this process has read so far: NVFlare keeps it, and uses it
        ours = {}
        for name, value in SETTINGS.items():
            variable = f"NVFLARE_{name.upper()}"
            if name in system or os.environ.get(variable, str(value)) != str(value):  # the system's own
                continue
            os.environ[variable] = str(value)  # for what this process reads later, and the processes it starts
            if name in read:  # read already, as NVFlare's default (a job process may stream before it builds this)
                read[name] = value
            ours[name] = value
        own = sorted(set(SETTINGS) - set(ours))
        self.logger.info(f"streaming settings for slow links: {ours}; the system's own: {own}")
