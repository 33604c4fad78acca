"""models/ tests: offline (the HuggingFace oracle is built from configs with random weights), one thread."""

import os

import pytest
from helpers import one_thread

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


_one_thread = pytest.fixture(autouse=True, name="_one_thread")(one_thread)
