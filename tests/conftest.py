"""Shared pytest fixtures and options."""

from __future__ import annotations

import gc
import shutil

import pytest
from reference_models import Reference, build_reference

from sdtorch.config import SD15, SD21, TINY, ModelConfig


def _reference(tmp_path_factory: pytest.TempPathFactory, preset: ModelConfig):
    """Build a preset's random-weight reference once per session; delete it afterwards
    (a full-size one takes ~8 GB of disk)."""
    root = tmp_path_factory.mktemp(f"{preset.name}_reference")
    reference = build_reference(preset, root)
    gc.collect()
    yield reference
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory) -> Reference:
    """TINY as a diffusers folder and an original-layout .safetensors file."""
    yield from _reference(tmp_path_factory, TINY)


@pytest.fixture(scope="session")
def sd15_reference(tmp_path_factory) -> Reference:
    """SD 1.5 architecture, random weights (slow: ~4 GB per copy)."""
    yield from _reference(tmp_path_factory, SD15)


@pytest.fixture(scope="session")
def sd21_reference(tmp_path_factory) -> Reference:
    """SD 2.1 (768, v-prediction) architecture, random weights (slow: ~4 GB per copy)."""
    yield from _reference(tmp_path_factory, SD21)
