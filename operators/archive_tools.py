"""The external tools archive reading needs at run time, and what to say when they are missing."""

from __future__ import annotations

import rarfile

# rarfile decompresses through an external tool; without one a compressed member cannot be read.
RAR_TOOL_HINT = ("compressed RAR members need an extraction tool and none was found: install unar "
                 "(Debian/Ubuntu: apt-get install unar) or bsdtar (apt-get install libarchive-tools)")
RAR_SUFFIXES = (".rar", ".cbr")


def rar_tool_missing() -> bool:
    """True when rarfile finds no tool (unrar, unar, 7z, bsdtar) to decompress RAR members with."""
    try:
        rarfile.tool_setup(force=True)
    except rarfile.RarCannotExec:
        return True
    return False
