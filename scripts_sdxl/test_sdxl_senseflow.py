"""Generate images with a SenseFlow-distilled SDXL generator (4 steps at t = 999, 749, 499, 249).

    python scripts_sdxl/test_sdxl_senseflow.py --sdxl_ckpt /data/stable-diffusion-xl-base-1.0 \\
        --checkpoint runs/sdxl/ckpt_model_18000.pth [--sampler x0|euler] [--num_steps 4] ...

Writes OUTPUT_DIR/senseflow_sdxl/<index:04d>.png and grid.png; all options: --help and the README.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing the package

from senseflow.errors import SenseFlowError  # noqa: E402
from senseflow.inference import run_script  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Run; a user mistake prints one line to stderr and exits with code 2."""
    try:
        run_script(
            argv,
            prog="test_sdxl_senseflow.py",
            description=__doc__.split("\n\n")[0],
            teacher_flag="--sdxl_ckpt",
            default_config="configs/sdxl/sdxl_senseflow.yaml",
            folder="senseflow_sdxl",
            repo_root=REPO,
            net_config_flag="--unet_config",
            report=print,
        )
    except SenseFlowError as err:
        print(err, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
