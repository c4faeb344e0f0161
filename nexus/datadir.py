"""Where a Nexus node keeps data on disk: one directory per node.

Everything a node keeps (the plugins' key-value state with the memory bus, the messaging plugin's database, what
any plugin stores under ``ctx.config["data_dir"]``) goes into its data directory: ``--data-dir`` /
``NEXUS_DATA_DIR`` / ``data_dir``, else ``<base>/node-<grpc port>`` under the base ``$XDG_DATA_HOME/nexus``
(``~/.local/share/nexus``). So two servers on one machine never share files by accident, and a node restarted on
its port finds its own data again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final


def default_data_dir() -> Path:
    """The base of the default data directories (not created here): ``$XDG_DATA_HOME/nexus``, else
    ``~/.local/share/nexus``. A node's own is :func:`node_data_dir`."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "nexus"


def node_data_dir(grpc_port: int) -> Path:
    """The default data directory of the node serving gRPC on ``grpc_port``: ``<base>/node-<port>``.

    A server on a free port (``0``) uses ``node-0``: its port changes at every start, its directory does not.
    """
    return default_data_dir() / f"node-{grpc_port}"


EARLIER_FILES: Final = ("kv.sqlite3", "messaging.sqlite3")
"""What a node kept directly in the base directory before each node had its own."""


def earlier_files(base: Path | None = None) -> list[Path]:
    """Files an earlier Nexus kept in the shared base directory (``base``, default :func:`default_data_dir`),
    which a node with its own data directory no longer reads."""
    folder = base if base is not None else default_data_dir()
    return [folder / name for name in EARLIER_FILES if (folder / name).is_file()]
