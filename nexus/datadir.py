"""Where Nexus keeps data on disk: ``$XDG_DATA_HOME/nexus``, else ``~/.local/share/nexus``."""

from __future__ import annotations

import os
from pathlib import Path


def default_data_dir() -> Path:
    """The default data directory (not created here): ``$XDG_DATA_HOME/nexus``, else ``~/.local/share/nexus``."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "nexus"
