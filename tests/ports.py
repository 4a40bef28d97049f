"""A free local TCP port for the tests that spawn ``torch.distributed`` (gloo) ranks."""
import socket


def free_port() -> int:
    """A port on 127.0.0.1 that no one is listening on now (for ``MASTER_PORT``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
