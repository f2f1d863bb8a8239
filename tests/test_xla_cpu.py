"""xla_cpu.configure: which jaxlibs get the YNNPACK setting, and when it
leaves XLA_FLAGS alone (an unknown XLA flag aborts the process)."""
import os

import pytest

from avsegformer_jax import xla_cpu


@pytest.fixture
def env(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setattr(xla_cpu, "_accelerator_plugin_installed", lambda: False)

  def set_jaxlib(version):
    monkeypatch.setattr(xla_cpu.metadata, "version", lambda name: version)
  return set_jaxlib


@pytest.mark.parametrize("version", ["0.10.2", "0.11.2", "0.12.0.1"])
def test_sets_flag_on_measured_jaxlibs(env, version, monkeypatch):
  env(version)
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  assert xla_cpu.configure()
  assert os.environ["XLA_FLAGS"] == (
      "--xla_force_host_platform_device_count=2 " + xla_cpu.FLAGS)


@pytest.mark.parametrize("version", ["0.9.2", "0.13.0"])
def test_leaves_untested_jaxlib_alone(env, version):
  env(version)
  assert not xla_cpu.configure()
  assert "XLA_FLAGS" not in os.environ


def test_user_choice_and_accelerators_win(env, monkeypatch):
  env("0.10.2")
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
  assert not xla_cpu.configure()
  assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type="
  monkeypatch.delenv("XLA_FLAGS")
  monkeypatch.setattr(xla_cpu, "_accelerator_plugin_installed", lambda: True)
  assert not xla_cpu.configure()
  assert "XLA_FLAGS" not in os.environ
