"""Generate images with a SenseFlow-distilled SD3.5 Large generator (4 steps, guidance baked in).

    python scripts_sd35/test_senseflow_sd35_large.py --sd35_ckpt /data/stable-diffusion-3.5-large \\
        --checkpoint runs/sd35l/ckpt_model_30000.pth [--sampler x0|euler] [--num_steps 4] ...

Writes OUTPUT_DIR/senseflow_sd35_large/<index:04d>.png and grid.png; all options: --help and the README.
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
            prog="test_senseflow_sd35_large.py",
            description=__doc__.split("\n\n")[0],
            teacher_flag="--sd35_ckpt",
            default_config="configs/SD35/sd35_large_senseflow.yaml",
            folder="senseflow_sd35_large",
            repo_root=REPO,
            sd35_legacy_flag=True,
            report=print,
        )
    except SenseFlowError as err:
        print(err, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
