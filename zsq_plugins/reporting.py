"""Results as data: environment capture, atomic JSON files and generated Markdown tables.

Every figure in the docs comes from a JSON written through here (docs/results.md).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import tempfile
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

TRACKED_PACKAGES = ("torch", "numpy", "safetensors", "nncf", "brevitas", "torchao", "zsq-plugins")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_versions(packages: Sequence[str] = TRACKED_PACKAGES) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def environment_info() -> dict[str, Any]:
    return {
        "versions": library_versions(),
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and a rename: never half a file."""
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file and a rename: never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make results private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def _cell(value: Any, digits: int) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | Mapping[str, str],
    digits: int = 2,
) -> str:
    """A GitHub Markdown table; ``columns`` maps row keys to headers (or lists the keys)."""
    headers = dict(columns) if isinstance(columns, Mapping) else {c: c for c in columns}
    lines = [
        "| " + " | ".join(headers.values()) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key), digits) for key in headers) + " |")
    return "\n".join(lines) + "\n"


def environment_footer(env: Mapping[str, Any]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    return (
        f"\n_Measured on {env['cpu']} with {env['torch_threads']} torch thread(s); {versions}._\n"
    )


def replace_generated_section(path: str | os.PathLike[str], name: str, content: str) -> None:
    """Replaces the text between ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->``.

    Lets a hand-written page carry a generated table without anyone typing its numbers.
    """
    path = Path(path)
    text = path.read_text()
    begin, end = f"<!-- generated:{name} -->", f"<!-- /generated:{name} -->"
    head, found_begin, rest = text.partition(begin)
    _, found_end, tail = rest.partition(end)
    if not (found_begin and found_end):
        raise ValueError(f"{path} has no '{begin}' ... '{end}' section")
    write_text_atomic(path, f"{head}{begin}\n{content.strip()}\n{end}{tail}")


def save_image_grid(
    images: torch.Tensor, path: str | os.PathLike[str], columns: int = 8, scale: int = 2
) -> None:
    """Saves images (N, C, H, W) in [0, 1] as one PNG grid (values outside are clipped)."""
    from PIL import Image

    n, channels, height, width = images.shape
    rows = -(-n // columns)
    grid = torch.ones(channels, rows * (height + 1) + 1, columns * (width + 1) + 1)
    for index in range(n):
        row, column = divmod(index, columns)
        top, left = 1 + row * (height + 1), 1 + column * (width + 1)
        grid[:, top : top + height, left : left + width] = images[index].clamp(0, 1)
    array = (grid.permute(1, 2, 0).squeeze(-1) * 255).round().to(torch.uint8).numpy()
    picture = Image.fromarray(array)
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    picture.save(tmp)
    os.replace(tmp, path)
