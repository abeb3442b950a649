"""Config helpers: where ``conf/`` lives, the custom OmegaConf resolvers, and composing outside ``@hydra.main``."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf"


def _window(fixed_age, jitter, default, sign: int) -> int:
    """Contrastive window edge: F ± max(2, J) when an age is fixed, else the given default."""
    if fixed_age is None or fixed_age == "None":
        return int(default)
    return int(fixed_age) + sign * max(2, int(jitter or 0))


def register_resolvers() -> None:
    """``${window_lo:F,J,default}`` / ``${window_hi:F,J,default}`` / ``${rank_suffix:}`` /
    ``${world_weights:dex|arcface|sam}`` (the world network shipped in the package; idempotent)."""
    if not OmegaConf.has_resolver("window_lo"):
        OmegaConf.register_new_resolver("window_lo", lambda f, j, d: _window(f, j, d, -1))
    if not OmegaConf.has_resolver("window_hi"):
        OmegaConf.register_new_resolver("window_hi", lambda f, j, d: _window(f, j, d, +1))
    if not OmegaConf.has_resolver("rank_suffix"):
        OmegaConf.register_new_resolver("rank_suffix", _rank_suffix)
    if not OmegaConf.has_resolver("world_weights"):
        OmegaConf.register_new_resolver("world_weights", _world_weights)


def _world_weights(name: str) -> str:
    """Path of a shipped world network; a missing file is a FileNotFoundError naming the rebuild command."""
    from agingnet.world.weights import weight_path

    return str(weight_path(name))


def _rank_suffix() -> str:
    """``""`` on the (global) rank 0 process, ``.rank<r>`` on the others: one log file per DDP process."""
    from agingnet.distributed import env_rank

    r = env_rank()
    return "" if r == 0 else f".rank{r}" if r > 0 else f".node{os.environ.get('NODE_RANK', '?')}"


def compose_config(overrides: Sequence[str] = (), output_dir: str | Path | None = None,
                   config_name: str = "train") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with overrides, as ``python -m agingnet.train`` would, and pin
    ``paths.output_dir`` (which otherwise comes from the Hydra runtime) to ``output_dir``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        if output_dir is not None:
            cfg.paths.output_dir = str(output_dir)
            cfg.paths.log_dir = str(Path(output_dir).parent)
        cfg.paths.work_dir = str(Path.cwd())
        del cfg["hydra"]
    return cfg


#: a full, read-only or quota-limited disk, or a folder without write permission
DISK_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES)

#: errors that describe bad input (a file, key or value); anything else is a bug and keeps its traceback
USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, KeyError)


@contextmanager
def user_errors(program: str, extra: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Report bad input as one line ``<program>: error: …`` and exit 1; the full traceback only with
    ``HYDRA_FULL_ERROR=1`` (Hydra's own switch). Files written before the error are left untouched.
    ``extra``: further exception types that are reported the same way (e.g. a diverged run). A full, read-only
    or quota-limited disk (``OSError`` ENOSPC/EROFS/EDQUOT) is reported with the file it concerns."""
    from hydra.errors import InstantiationException

    handled = (*USER_ERRORS, *extra)
    try:
        yield
    except OSError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or not (isinstance(e, handled) or e.errno in DISK_ERRNOS):
            raise
        if isinstance(e, handled):
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        else:  # a disk error: the file (when known) and the reason, without "[Errno N]"
            msg = f"{e.filename}: {e.strerror}" if e.filename and str(e.filename) not in str(e.strerror) else e.strerror
        if getattr(e, "agreed_across_ranks", False) and _rank_suffix():  # DDP: rank 0 says it once
            sys.exit(1)
        print(f"{program}: error: {msg}", file=sys.stderr)
        sys.exit(1)
    except (InstantiationException, *handled) as e:
        cause = e.__cause__ if isinstance(e, InstantiationException) else e
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or not isinstance(cause, handled):
            raise
        msg = cause.args[0] if isinstance(cause, KeyError) and cause.args else cause
        if getattr(cause, "agreed_across_ranks", False) and _rank_suffix():  # DDP: rank 0 says it once
            sys.exit(1)
        print(f"{program}: error: {msg}", file=sys.stderr)
        sys.exit(1)
