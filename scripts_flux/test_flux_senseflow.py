"""Generate images with a SenseFlow-distilled FLUX.1-dev generator (4 steps, no guidance embedding).

    python scripts_flux/test_flux_senseflow.py --flux_ckpt /data/FLUX.1-dev \\
        --checkpoint runs/flux/ckpt_model_12000.pth [--sampler x0|euler] [--num_steps 4] ...

--dit_config (default: the shipped guidance-free FLUX.1-dev config) must describe the generator, i.e. the
teacher's transformer without its guidance embedder. --checkpoint also takes the released SenseFlow-FLUX
transformer folder (diffusers format).
Writes OUTPUT_DIR/senseflow_flux/<index:04d>.png and grid.png; all options: --help and the README.
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
            prog="test_flux_senseflow.py",
            description=__doc__.split("\n\n")[0],
            teacher_flag="--flux_ckpt",
            default_config="configs/FLUX/flux_senseflow.yaml",
            folder="senseflow_flux",
            repo_root=REPO,
            net_config_flag="--dit_config",
            net_config_default="exp_flux/flux-wo-guidance-embed/transformer/config.json",
            report=print,
        )
    except SenseFlowError as err:
        print(err, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
