"""The worker entry under torchrun: `lowvram train --nproc N` starts N of these (`distributed.launch`).

A module of its own above the run assembly, so `train/distributed.py` (which the recipe uses) never imports the run
that uses it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lowvram.errors import LowvramError
from lowvram.train.distributed import current


def main(argv: list[str]) -> int:
    """Worker entry under torchrun: `python -m lowvram.train.worker RUN_DIR/launch.json`."""
    from lowvram.config import RunConfig
    from lowvram.profiles import HardwareProfile
    from lowvram.train.run import run_train

    env = current()
    try:
        spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
        cfg = RunConfig.model_validate(spec["config"])
        profile = None if spec["profile"] is None else HardwareProfile.model_validate(spec["profile"])
        return run_train(
            cfg,
            profile=profile,
            force=spec["force"],
            auto_recover=spec["auto_recover"],
            nproc=1 if env is None else env.world_size,
        )
    except LowvramError as e:
        where = "" if env is None or env.is_main else f" (rank {env.rank})"
        print(f"lowvram: error{where}: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
