"""Metric writers: TensorBoard event files (clu) plus a JSON-lines file, on process 0 only.

`WORKDIR/metrics.jsonl` holds one object per write: {"step": N, "name": value, ...}; it is what
scripts and the report read. Each write is flushed at once (one line per log interval), so the
file holds every logged step while the run goes on and after it is killed. Non-zero processes
log nothing to files.
"""

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from clu import metric_writers
from clu.metric_writers import interface


class JsonlWriter(interface.MetricWriter):
    """Appends scalars (and hparams) as JSON lines, flushed on every write; survives restarts by
    appending."""

    def __init__(self, path: str):
        self._path = path
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        self._write({"step": int(step), **{k: float(np.asarray(v)) for k, v in scalars.items()}})

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        self._write({"hparams": {k: _jsonable(v) for k, v in hparams.items()}})

    def write_summaries(self, step, values, metadata=None) -> None:
        del step, values, metadata

    def write_images(self, step, images) -> None:
        del step, images

    def write_videos(self, step, videos) -> None:
        del step, videos

    def write_audios(self, step, audios, *, sample_rate) -> None:
        del step, audios, sample_rate

    def write_texts(self, step, texts) -> None:
        del step, texts

    def write_histograms(self, step, arrays, num_buckets=None) -> None:
        del step, arrays, num_buckets

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def create_writer(workdir: str) -> metric_writers.MetricWriter:
    """TensorBoard + JSON lines + logging on process 0; logging only elsewhere."""
    if jax.process_index() != 0:
        return metric_writers.create_default_writer(just_logging=True)
    default = metric_writers.create_default_writer(workdir, asynchronous=False)
    return metric_writers.MultiWriter(
        [default, JsonlWriter(os.path.join(workdir, "metrics.jsonl"))]
    )


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
