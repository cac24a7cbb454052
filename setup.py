"""microbatch-diffusion: a lean Stable Diffusion runtime for checkpoint files on small GPUs or CPUs."""
from setuptools import setup

setup(
    name="microbatch-diffusion",
    version="0.1.0",
    description="Stable Diffusion checkpoints, micro-batched: exact DDIM/PLMS, modern samplers, low memory",
    python_requires=">=3.9",
    packages=[
        "ldm",
        "ldm.models",
        "ldm.models.diffusion",
        "ldm.modules",
        "ldm.modules.diffusionmodules",
        "ldm.modules.distributions",
        "ldm.modules.encoders",
        "sgm",
        "sgm.models",
        "sgm.modules",
        "sgm.modules.diffusionmodules",
        "sgm.modules.encoders",
        "samplers",
        "microbatch",
        "microbatch.configs",
        "microbatch.demo",
        "microbatch.server",
    ],
    # The yaml configs live in the top-level configs/ folder (the original layout); they are also
    # installed as package data so that a non-editable install finds them.
    package_dir={"microbatch.configs": "configs"},
    package_data={
        "ldm.modules.encoders": ["bpe_simple_vocab_16e6.txt.gz"],
        "microbatch.configs": ["*.yaml", "*/*.yaml"],
        "microbatch": ["assets/*", "assets/*/*"],
        "microbatch.server": ["static/*"],  # the web page at /
    },
    install_requires=[
        # Install the CUDA build of torch for your platform first on a GPU machine; any 2.1+ works.
        "torch>=2.1,<3",
        "transformers>=4.30",
        "safetensors>=0.3",
        "einops>=0.6",
        "omegaconf>=2.1",
        "tqdm>=4.60",
        "numpy>=1.22",
        "pillow>=9.0",
        "regex",
    ],
    extras_require={
        # httpx: FastAPI's TestClient (tests/test_server.py, which also needs the serve extra); peft: diffusers'
        # LoRA loading, the reference of tests/test_lora.py; playwright: drives the system's Chromium
        # (/usr/bin/chromium, Debian's package; never `playwright install`) in tests/test_webpage.py.
        "test": ["pytest>=7", "hypothesis>=6", "diffusers>=0.30", "scipy", "httpx>=0.24,<1", "peft", "playwright>=1.40"],
        # Jobs on a Ray cluster: scripts/batch_gen.py --ray ...
        "ray": ["ray>=2.9"],
        # scripts/serve.py: the web UI's HTTP API.
        "serve": ["fastapi>=0.100,<1", "uvicorn>=0.23,<1"],
    },
)
