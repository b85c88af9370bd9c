"""Metric backends beside ``metrics.jsonl``: each receives the typed records (zohpc.metrics).

:class:`TensorBoardSink` writes TensorBoard event files (``logging.tensorboard = true``,
the optional extra ``zohpc[tensorboard]``): per step the training loss, learning rate,
queries and seconds; per evaluation the test loss and every task metric (accuracy, ...),
all at the global step. tensorboard's own writer is used (no torch.utils.tensorboard
needed); files are flushed after each evaluation and on close.
"""

from __future__ import annotations

import math

from . import metrics as rec


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class TensorBoardSink:
    """Scalars of step and eval records into event files under ``logdir``."""

    def __init__(self, logdir: str):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
        from tensorboard.compat.proto import event_pb2, summary_pb2
        self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
        self.writer = EventFileWriter(logdir)

    def _scalars(self, step: int, values: dict) -> None:
        pb = self._summary_pb2
        summary = pb.Summary(value=[pb.Summary.Value(tag=k, simple_value=float(v))
                                    for k, v in values.items() if _number(v)])
        if summary.value:
            import time
            self.writer.add_event(self._event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def write(self, record) -> None:
        if isinstance(record, rec.Step):
            self._scalars(record.step, {"train/loss": record.loss, "train/lr": record.lr,
                                        "train/queries": record.queries, "train/free_queries": record.free_queries,
                                        "train/seconds": record.seconds})
        elif isinstance(record, rec.Eval):
            values = {"test/loss": record.test_loss}
            values.update({f"test/{k}": v for k, v in record.metrics.items()})
            self._scalars(record.step, values)
            self.writer.flush()
        elif isinstance(record, (rec.Done, rec.Stopped)):
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()


__all__ = ["TensorBoardSink"]
