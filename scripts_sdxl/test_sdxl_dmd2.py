"""Generate images with a DMD2-distilled SDXL generator (4 steps at the trained t = 999, 749, 499, 249).

    python scripts_sdxl/test_sdxl_dmd2.py --sdxl_ckpt /data/stable-diffusion-xl-base-1.0 \\
        --checkpoint runs/dmd2/ckpt_model_18000.pth ...

Reads our {"model": ...} checkpoints and DMD2's raw state dicts alike, strictly (the original script
silently loaded nothing from the former, B6), and samples at the trained timesteps rather than the LCM
default 999, 759, 499, 259. Writes OUTPUT_DIR/senseflow_sdxl_dmd2/<index:04d>.png and grid.png.
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
            prog="test_sdxl_dmd2.py",
            description=__doc__.split("\n\n")[0],
            teacher_flag="--sdxl_ckpt",
            default_config="configs/sdxl/sdxl_dmd2.yaml",
            folder="senseflow_sdxl_dmd2",
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
