"""Run one engine operation in a fresh process (for crash tests).

``python engine_op.py CONFIG_JSON OPERATION ARG...`` opens the engine with the
config (a JSON object of :class:`dmfs.config.Config` fields), runs the
operation and closes it.  With ``DMFS_FAILPOINT`` set, the process dies at that
point instead, leaving whatever it had done.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dmfs.config import Config
from dmfs.pool.snapshotter import Snapshotter


def config_from_json(text: str) -> Config:
    values = json.loads(text)
    for name in ("root_path", "runtime_path"):
        if values.get(name):
            values[name] = Path(values[name])
    return Config(**values)


def config_to_json(config: Config) -> str:
    return json.dumps({
        "pool_name": config.pool_name, "base_image_size": config.base_image_size,
        "root_path": str(config.root_path), "runtime_path": str(config.runtime_path),
        "driver": config.driver, "async_remove": config.async_remove,
        "idle_timeout": config.idle_timeout, "fs_type": config.fs_type,
    })


async def run(config: Config, operation: str, args: list[str]) -> None:
    async with Snapshotter.open(config) as engine:
        if operation == "open":
            return
        method = getattr(engine, operation)
        await method(*args)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="engine_op: %(levelname)s %(message)s")
    trio.run(run, config_from_json(sys.argv[1]), sys.argv[2], sys.argv[3:])
