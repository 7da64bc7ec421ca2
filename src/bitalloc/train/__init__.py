"""Training: one loop for FP32 and quantization-aware training, checkpoints, schedules, data-parallel runs.

::

    from bitalloc.train import TrainConfig, fit, evaluate

    cfg = TrainConfig(epochs=8, batch_size=128, optimizer="adam", lr=1e-3, checkpoint="runs/lenet5.pt")
    result = fit(model, train_set, val_set, cfg)            # also works under torchrun --nproc_per_node N
    print(result.best_accuracy, evaluate(model, val_set).accuracy)

Quantization-aware methods plug in with an *objective hook* (``fit(..., objective=obj)``; see
:mod:`bitalloc.train.loop`); named recipes per model and the ``--method`` registry live in
:mod:`bitalloc.train.presets`; cross-rank helpers (``all_reduce_tensors``, ``is_main_process``,
``world_size``) in :mod:`bitalloc.train.distributed`.
"""

from bitalloc.train.checkpoint import (check_output_path, checkpoint_info, load_checkpoint, load_model_checkpoint,
                                       save_checkpoint)
from bitalloc.train.distributed import (all_gather_object, all_reduce_dict, all_reduce_tensors, barrier,
                                        broadcast_object, init_distributed, is_distributed, is_main_process, rank,
                                        select_device, world_size)
from bitalloc.train.loop import (Callback, DivergenceError, EvalResult, Objective, StopAfter, TrainConfig,
                                 TrainResult, build_optimizer, build_param_groups, evaluate, fit, seed_everything)
from bitalloc.train.presets import METHODS, PRESETS, Method, Preset, get_method, get_preset, register_method
from bitalloc.train.schedules import SCHEDULES, ScheduleSpec

__all__ = [
    "fit", "evaluate", "TrainConfig", "TrainResult", "EvalResult", "Objective", "Callback", "StopAfter",
    "DivergenceError", "build_param_groups", "build_optimizer", "seed_everything",
    "save_checkpoint", "load_checkpoint", "load_model_checkpoint", "checkpoint_info", "check_output_path",
    "all_reduce_tensors", "all_reduce_dict", "all_gather_object", "broadcast_object", "barrier", "is_main_process",
    "is_distributed", "world_size", "rank", "init_distributed", "select_device",
    "Preset", "PRESETS", "get_preset", "Method", "METHODS", "register_method", "get_method",
    "ScheduleSpec", "SCHEDULES",
]
