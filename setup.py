"""rlsoft: reward weighting for policy-gradient RL on language models, in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="rlsoft",
    version="0.1.0",
    description="How a group of sampled answers with verifiable rewards becomes policy-gradient weights.",
    python_requires=">=3.10",
    packages=find_packages(include=["rlsoft*", "models*", "envs*", "experiments*", "benchmarks*"]),
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10.0",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.12.0",
        "chex>=0.1.87",
        "numpy>=1.26",
        "scipy>=1.11",
        "tensorboard>=2.16",
        "tensorboardX>=2.6",
        "sentencepiece>=0.2.0",
        "tensorflow-datasets>=4.9.4",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        # Hugging Face checkpoints and tokenizers (models/hf.py), read without torch.
        "safetensors>=0.4.3",
        "tokenizers>=0.20",
        "huggingface_hub>=0.23",  # split_state_dict_into_shards_factory: sharded exports (save_model)
        "jinja2>=3.1",
        # Tree search over thought tokens (rlsoft/thought_search.py).
        "mctx>=0.0.5",
        # IQM and stratified-bootstrap confidence intervals for results tables (rlsoft/stats.py).
        "rliable>=1.0",
        # rliable needs arch < 8, whose 7.x fails to import under pandas 3 (deprecate_kwarg's signature).
        "pandas<3",
        # GSM8K / MATH answers checked by math-verify (envs/math_verify_reward.py), each call in a pebble
        # process pool with a per-call timeout (math-verify's own uses signal.alarm: main thread only).
        "math-verify>=0.8.0,<0.9",  # 0.8: the parse / verify API read here
        "pebble>=5.0",
    ],
    extras_require={
        "dev": [
            "pytest>=8.0",
            "hypothesis>=6.100",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
            # Parity tests and side-by-side benchmarks only. torch is pinned: its CPU build is on
            # disk here, and an unpinned torch pulls a CUDA build of several GB.
            "torch==2.13.0",
            "transformers>=4.45",
        ],
        # The peers benchmarks/peers.py measures against (tunix's sampler, TRL's GRPOTrainer) and
        # tests/test_peers_parity.py. Never needed by the tests or the main job: they pin
        # transformers below dev's, so install them in a venv of their own (README, "Against the peers").
        "peers": [
            "google-tunix==0.1.7",
            "trl==1.16.0",
        ],
    },
)
