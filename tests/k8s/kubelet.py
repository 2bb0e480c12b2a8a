"""Kubelet's ConfigMap volume update, replayed step by step (pkg/volume/util/atomic_writer.go):
a fresh timestamped folder with the new files, a `..data_tmp` symlink to it renamed over
`..data`, the user-visible names as symlinks through `..data`, then the old folder deleted."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path


class ConfigMapVolume:
    def __init__(self, mount: Path):
        self.mount = mount
        mount.mkdir(parents=True, exist_ok=True)
        self.updates = 0

    def write(self, files: dict[str, str]) -> Path:
        stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime()) + f"{time.time_ns() % 10**9:09d}"
        new = self.mount / stamp
        new.mkdir()
        for name, text in files.items():
            (new / name).write_text(text)
        data = self.mount / "..data"
        old = Path(os.readlink(data)) if data.is_symlink() else None
        tmp = self.mount / "..data_tmp"
        os.symlink(stamp, tmp)
        os.rename(tmp, data)  # the atomic swap
        for name in files:
            link = self.mount / name
            if not link.is_symlink():
                os.symlink(f"..data/{name}", link)
        if old is not None:
            shutil.rmtree(self.mount / old)  # the folder the file resolved to is gone
        self.updates += 1
        return new
