"""AVSegFormer (AAAI 2024) in JAX/Flax.

Public API (kept stable):
  build_model(config) -> flax.linen.Module
  convert.torch_to_flax(state_dict, config) -> variables
  model.apply(variables, frames [N,H,W,3], audio [N,96,64], frame_mask=None,
              train=False) -> (logits [N,H,W,C], mask_feature [N,H/4,W/4,256])
"""

__version__ = "0.1.0"


def build_model(config):
  """The AVSegFormer module for `config` (a full config or its `.model`)."""
  from avsegformer_jax import avsegformer  # lazy: keeps `import` cheap
  return avsegformer.build_model(config)
