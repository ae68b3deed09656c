"""Writes one benchmark's section of bench/RESULTS.md and describes the machine it ran on."""

from __future__ import annotations

import os
import platform


def write_section(path: str, section: str) -> None:
    """Replaces the section of `path` whose heading is `section`'s first line, or appends it.

    A section runs from its `## ` heading to the next `## ` heading or the end of the file. The
    file is rewritten through a temporary file, so a reader sees the old or the new text.
    """
    heading = section.splitlines()[0]
    text = ""
    if os.path.exists(path):
        with open(path) as handle:
            text = handle.read()

    start = text.find(heading)
    if start < 0:
        text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + section
    else:
        end = text.find("\n## ", start + len(heading))
        end = len(text) if end < 0 else end + 1
        text = text[:start] + section + ("\n" if end < len(text) else "") + text[end:]

    temporary = path + ".tmp"
    with open(temporary, "w") as handle:
        handle.write(text)
    os.replace(temporary, path)


def cpu_description() -> str:
    """Returns the CPU model name (from /proc/cpuinfo where it exists) and the core count."""
    model_name = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model_name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model_name}, {os.cpu_count()} cores"


def load_average() -> str:
    """Returns the one-minute load average with one decimal, or "unknown" where it is missing."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "unknown"
