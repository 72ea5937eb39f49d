"""SenseFlow: distribution-matching distillation of flow and diffusion text-to-image models.

Implements SenseFlow (arXiv 2506.00523, ICLR 2026): DMD with implicit distribution alignment (IDA),
intra-segment guidance (ISG) and a vision-foundation-model discriminator, for SD3.5, FLUX.1-dev and SDXL.
"""

__version__ = "0.1.0"
