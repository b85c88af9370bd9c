"""``classify``: the data set named by ``[data]`` (digits by default), the model named by
``[model]``, mean cross entropy, test accuracy. The default task."""

from __future__ import annotations

from ..data import augment_batch, load_data
from .base import Task, accuracy, task_options
from .loading import build_model_from_config


def build(cfg) -> Task:
    task_options(cfg, {}, "classify")
    splits = load_data(cfg.data, cfg.train.seed)
    model = build_model_from_config(cfg, splits.input_shape, splits.num_classes)
    augment = None
    if cfg.data.augment:
        seed = cfg.train.seed

        def augment(x, epoch, batch_index):
            return augment_batch(x, seed, epoch, batch_index)

    return Task(model=model, train=(splits.train_x, splits.train_y), test=(splits.test_x, splits.test_y),
                loss=None, metrics=accuracy, name="classify", augment=augment,
                info={"data": cfg.data.name, "num_train": int(splits.train_x.shape[0]),
                      "num_classes": int(splits.num_classes)})
