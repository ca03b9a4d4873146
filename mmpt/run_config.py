"""Read a training config (a recipe or a run's saved ``config.yaml``) outside ``mmpt fit``.

``mmpt eval`` (and any command that loads a checkpoint with the model and data of its run)
builds the model and datamodule from the same YAML files ``fit`` took, or from the
``config.yaml`` that LightningCLI saved into the run's folder. That file also holds the keys of
the ``fit`` subcommand itself (``ckpt_path``, ``weights_only``), which the model/data/trainer
parser refuses: :func:`config_args` drops them.
"""

from __future__ import annotations

from typing import Any

import yaml

from mmpt.io import read_yaml

#: The parts of a training config; a saved run config's other top-level keys (``ckpt_path``,
#: ``weights_only`` ...) are arguments of the subcommand that ran.
CONFIG_KEYS = ("seed_everything", "trainer", "model", "data", "optimizer", "lr_scheduler")


def config_args(configs: list[str], flag: str = "-c") -> list[str]:
    """``["-c", config, ...]`` for :func:`mmpt.cli.build_cli`, saved run configs accepted.

    Args:
        configs: YAML files, composed in order (as ``mmpt fit -c A -c B``).
        flag: The option the files came from, named in errors.

    Raises:
        FileNotFoundError: A file does not exist.
        ValueError: A file is not a YAML mapping.
    """
    out: list[str] = []
    for path in configs:
        doc = read_yaml(path, flag)
        if not isinstance(doc, dict):
            raise ValueError(f"{flag} {path}: a config is a YAML mapping (trainer:, model:, data:)")
        if set(doc) - set(CONFIG_KEYS):  # a run's saved config.yaml
            doc = {k: v for k, v in doc.items() if k in CONFIG_KEYS}
            out += ["-c", yaml.safe_dump(doc, sort_keys=False)]
        else:
            out += ["-c", str(path)]
    return out


#: Trainer overrides of the commands that only read a model (export, generate): one CPU process,
#: whatever devices, nodes and strategy the training config asked for.
CPU_ONLY = [
    *("--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.num_nodes=1"),
    "--trainer.strategy=auto",
]


def build_from_config(
    configs: list[str], overrides: list[str] | None = None, cpu: bool = False
) -> Any:
    """The LightningCLI (model, datamodule, trainer) of a training config, not run.

    Args:
        configs: Recipe files or a run's saved ``config.yaml`` (see :func:`config_args`).
        overrides: Dotted command-line overrides (``--data.init_args.batch_size=8``).
        cpu: Build the trainer for one CPU process (:data:`CPU_ONLY`), e.g. to export.

    Returns:
        The :class:`~mmpt.cli.MMPTCLI`, with ``model`` and ``datamodule`` instantiated and no
        logger.
    """
    from mmpt.cli import build_cli

    device = CPU_ONLY if cpu else []
    args = [*config_args(configs), "--trainer.logger=false", *device, *(overrides or [])]
    return build_cli(args, run=False)


def fill_logger_dirs(cfg: Any) -> None:
    """Give every configured logger without ``save_dir`` the trainer's ``default_root_dir``.

    Recipes leave ``save_dir`` out, so ``--trainer.default_root_dir`` moves the logs, the saved
    config and (``ModelCheckpoint`` without ``dirpath``) the checkpoints together.

    Args:
        cfg: The parsed config (a jsonargparse namespace with ``trainer``).
    """
    loggers = cfg.get("trainer.logger")
    root = cfg.get("trainer.default_root_dir") or "."
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        init_args = getattr(logger, "init_args", None)
        if init_args is not None and "save_dir" in init_args and init_args.save_dir is None:
            init_args.save_dir = str(root)


def eval_stream_config(datamodule: Any, data: str | None) -> tuple[Any, str, str]:
    """The stream ``mmpt eval`` reads: ``--data``, else the config's ``val``, else ``test``.

    Args:
        datamodule: The config's datamodule (``val_cfg``, ``test_cfg``).
        data: The ``--data`` value, or None.

    Returns:
        ``(StreamConfig, field, description)``: the field names the source in errors, the
        description goes into the report.

    Raises:
        ValueError: No ``--data`` and the config has neither ``data.val`` nor ``data.test``.
    """
    from mmpt.datamodules.streams import StreamConfig

    if data:
        return StreamConfig(urls=data, shuffle_buffer=0, shuffle_shards=False), "--data", data
    for cfg, field in ((getattr(datamodule, "val_cfg", None), "data.val"),
                       (getattr(datamodule, "test_cfg", None), "data.test")):  # fmt: skip
        if cfg is not None:
            plain = StreamConfig(urls=cfg.urls, shuffle_buffer=0, shuffle_shards=False)
            urls = cfg.urls if isinstance(cfg.urls, str) else ",".join(cfg.urls)
            return plain, field, urls
    raise ValueError(
        "--data: give the evaluation shards (the config sets no data.val or data.test)"
    )
